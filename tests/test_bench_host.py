"""experiments/bench/_host.py: what the benchmark reports say about the machine."""

import importlib.metadata
import shutil

import pytest

from experiments.bench._host import cpu_name, version


def test_version_reads_installed_metadata_and_names_missing_packages():
    assert version("numpy") == importlib.metadata.version("numpy")
    assert version("no-such-package-jlora") == "not installed"


@pytest.mark.skipif(shutil.which("lscpu") is None, reason="lscpu reports the family (Linux only)")
def test_cpu_name_carries_family_and_model_where_lscpu_reports_them():
    import subprocess

    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    family = next((l.split(":", 1)[1].strip() for l in out.splitlines()
                   if l.startswith("CPU family:")), None)
    name = cpu_name()
    assert name and name != "unknown CPU"
    if family is not None:
        assert f"(family {family}, model " in name


def test_unoptimized_xla_names_a_lowered_llvm_level_and_nothing_else():
    from experiments.bench._host import unoptimized_xla

    reason = unoptimized_xla("--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
    assert reason is not None and "--xla_backend_optimization_level=0" in reason
    assert unoptimized_xla("--xla_backend_optimization_level=1") is not None
    assert unoptimized_xla("--xla_backend_optimization_level=2") is None
    assert unoptimized_xla("--xla_backend_optimization_level=3") is None
    assert unoptimized_xla("--xla_force_host_platform_device_count=8") is None
    assert unoptimized_xla("") is None
    assert unoptimized_xla("--xla_backend_optimization_level=0 --xla_backend_optimization_level=2") is None
    assert unoptimized_xla("--xla_backend_optimization_level=2 --xla_backend_optimization_level=0") is not None
