"""What a benchmark's report says about the machine and the packages it ran with."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess


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
