"""Builds and registers the XLA:CPU attention kernel of ``_cpu_attention.cc``.

XLA:CPU runs attention's batched ``(T x D) @ (D x T)`` products one (batch, head)
after another on one core, at 35-42 GFLOP/s for all-MiniLM-L6-v2's shapes; the
kernel runs each (batch, head) pair's whole forward or backward as one task in
L1/L2 and spreads the pairs over XLA's intra-op thread pool
(docs/performance.md has the measurements).

It is compiled on first use with the host's C++ compiler (``$CXX``, else ``c++``
or ``g++``) for the host's CPU (``-march=native``) into a cache directory
(``$JLORA_KERNEL_CACHE``, default ``~/.cache/jlora``), under a name hashing the
source, the compiler, the flags, jaxlib's version and the CPU, so it is rebuilt
only when one of them changes. Without a compiler, or when the build fails,
:func:`available` is False after a one-line warning saying why, and the models
use XLA's attention. ``JLORA_CPU_ATTENTION=0`` turns the kernel off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp

SOURCE = Path(__file__).with_name("_cpu_attention.cc")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
TILE = 32  # T and D must be multiples of the kernel's widest register tile
TARGETS = {"jlora_attention_forward": "JloraAttentionForward",
           "jlora_attention_inference": "JloraAttentionInference",
           "jlora_attention_backward": "JloraAttentionBackward"}


def _cpu_identity() -> bytes:
    """The CPU's model and feature flags (``-march=native`` builds for exactly these)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor().encode()
    keep = [ln for ln in lines if ln.split(":")[0].strip() in ("model name", "flags")]
    return "\n".join(dict.fromkeys(keep)).encode()


def _cache_dir() -> Path:
    root = os.environ.get("JLORA_KERNEL_CACHE") or Path.home() / ".cache" / "jlora"
    path = Path(root)
    try:
        path.mkdir(parents=True, exist_ok=True)
        if os.access(path, os.W_OK):
            return path
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix="jlora-kernels-"))


def compiler() -> str | None:
    """The C++ compiler the kernel is built with: ``$CXX``, else ``c++`` or ``g++`` on PATH."""
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def _build() -> Path:
    """Compiles the kernel (or finds it compiled); raises ``RuntimeError`` saying why not."""
    cxx = compiler()
    if not cxx:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    import jaxlib

    include = jax.ffi.include_dir()
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), cxx.encode(), " ".join(FLAGS).encode(),
                                     jaxlib.__version__.encode(), _cpu_identity()])).hexdigest()[:16]
    target = _cache_dir() / f"cpu_attention-{key}.so"
    if target.exists():
        return target
    # Compile beside the target and rename: concurrent processes never load a half-written file.
    fd, partial = tempfile.mkstemp(dir=target.parent, suffix=".so.partial")
    os.close(fd)
    try:
        done = subprocess.run([cxx, *FLAGS, f"-I{include}", str(SOURCE), "-o", partial],
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or ["(no message)"]
            first = next((ln for ln in lines if "error" in ln), lines[0])
            raise RuntimeError(f"{cxx} failed on {SOURCE.name}: {first}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


@functools.cache
def available() -> bool:
    """Whether the kernel is built and registered with XLA for the CPU platform."""
    if os.environ.get("JLORA_CPU_ATTENTION", "1") == "0":
        return False
    try:
        library = ctypes.cdll.LoadLibrary(str(_build()))
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as err:
        warnings.warn(f"jlora's CPU attention kernel is unavailable, using XLA's attention: {err}",
                      RuntimeWarning, stacklevel=2)
        return False
    for name, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    return True


def fits(*arrays) -> bool:
    """Whether ``(B, T, H, D)`` operands can take the kernel on this backend."""
    q = arrays[0]
    return (jax.default_backend() == "cpu" and all(a.dtype == jnp.float32 for a in arrays)
            and q.ndim == 4 and q.shape[1] % TILE == 0 and q.shape[3] % TILE == 0 and available())


def _call(target, results, *args, causal):
    # Under vmap every operand gains the same leading axes, which the kernel folds into B.
    return jax.ffi.ffi_call(target, results, vmap_method="broadcast_all")(*args, causal=bool(causal))


def forward(q, k, v, key_bias, *, causal=False):
    """``(o, p)``: the output and the ``(B, H, T, T)`` probabilities the backward needs.
    ``causal``: token i attends only to tokens j <= i as well."""
    b, t, h, _ = q.shape
    return _call("jlora_attention_forward", (jax.ShapeDtypeStruct(q.shape, q.dtype),
                                             jax.ShapeDtypeStruct((b, h, t, t), q.dtype)),
                 q, k, v, key_bias, causal=causal)


def inference(q, k, v, key_bias, *, causal=False):
    """The output alone (no probabilities kept)."""
    return _call("jlora_attention_inference", jax.ShapeDtypeStruct(q.shape, q.dtype), q, k, v, key_bias,
                 causal=causal)


def backward(q, k, v, p, o, do, key_bias, *, causal=False):
    """``(dq, dk, dv)``."""
    like = jax.ShapeDtypeStruct(q.shape, q.dtype)
    return _call("jlora_attention_backward", (like, like, like), q, k, v, p, o, do, key_bias,
                 causal=causal)
