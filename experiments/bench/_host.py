"""What a benchmark's report says about the machine and the packages it ran with."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import subprocess
import sys


def cpu_name() -> str:
    """lscpu's model name with the family and model numbers, which tell CPU
    generations apart where the name does not ("AMD EPYC": family 25 is Zen 3
    and Zen 4, 26 is Zen 5)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return platform.processor() or "unknown CPU"
    fields = {k.strip(): v.strip() for k, v in
              (line.split(":", 1) for line in out.splitlines() if ":" in line)}
    name = fields.get("Model name") or platform.processor() or "unknown CPU"
    if "CPU family" in fields and "Model" in fields:
        name += f" (family {fields['CPU family']}, model {fields['Model']})"
    return name


def version(package: str) -> str:
    """The installed version of ``package``, or "not installed"."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def unoptimized_xla(xla_flags: str | None = None) -> str | None:
    """Why this process's XLA code is not what users run, or None.

    The test command compiles with ``--xla_backend_optimization_level=0`` (LLVM's
    optimisation off, for compile time); a benchmark started from such an
    environment would time unoptimised elementwise code.
    """
    flags = os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags
    levels = re.findall(r"--xla_backend_optimization_level=(\d+)", flags)
    if levels and int(levels[-1]) < 2:  # XLA takes a repeated flag's last value
        return (f"XLA_FLAGS sets --xla_backend_optimization_level={levels[-1]}: "
                "timings in this process are of unoptimised code (unset it to benchmark)")
    return None


def warn_if_unoptimized() -> None:
    """Print :func:`unoptimized_xla`'s reason to stderr, if there is one."""
    if (reason := unoptimized_xla()) is not None:
        print(f"warning: {reason}", file=sys.stderr)
