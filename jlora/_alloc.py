"""Detect glibc's default ``malloc`` under XLA:CPU and say, once, how to tune it.

XLA:CPU allocates every temporary buffer of every execution afresh. Under glibc's
default ``malloc`` those buffers come from per-thread arenas that are returned
to the kernel between steps, so each training step pays tens of thousands of
minor page faults (measured in docs/performance.md). A faster allocator is a
process-level choice the library cannot make for its user; it can only notice
the default one and point at the fix:

* preload tcmalloc or jemalloc (``LD_PRELOAD=/path/to/libtcmalloc.so``), or
* keep glibc but tune it: ``GLIBC_TUNABLES=`` :data:`RECOMMENDED_TUNABLES`
  (one arena, no ``mmap`` for large blocks, freed memory kept for reuse).

Both must be set before the process starts. :func:`hint` warns at most once per
process, with category :class:`AllocatorHint`; silence it with
``warnings.filterwarnings("ignore", category=jlora.AllocatorHint)`` or the
environment variable ``JLORA_NO_ALLOCATOR_HINT=1``.
"""

from __future__ import annotations

import os
import sys
import warnings

#: glibc malloc tunables that make XLA:CPU's per-step buffers reuse memory
#: (one arena, no mmap'd blocks, a 4 GiB trim threshold).
RECOMMENDED_TUNABLES = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                        "glibc.malloc.trim_threshold=4294967296")

_FAST = ("tcmalloc", "jemalloc", "mimalloc")


class AllocatorHint(UserWarning):
    """Category of the one-time hint that glibc's default ``malloc`` slows XLA:CPU."""


def allocator(environ=None, maps_path: str = "/proc/self/maps") -> str:
    """Which allocator the process runs: ``"tcmalloc"``, ``"jemalloc"``,
    ``"mimalloc"``, ``"glibc-tuned"`` (``GLIBC_TUNABLES`` sets malloc options) or
    ``"glibc"`` (the default one).

    Example::

        >>> from jlora._alloc import allocator
        >>> allocator({"GLIBC_TUNABLES": "glibc.malloc.arena_max=1"}, maps_path="")
        'glibc-tuned'
        >>> allocator({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, maps_path="")
        'jemalloc'
    """
    env = os.environ if environ is None else environ
    loaded = env.get("LD_PRELOAD", "")
    if maps_path:
        try:
            with open(maps_path) as f:
                loaded += f.read()
        except OSError:
            pass
    for name in _FAST:
        if name in loaded:
            return name
    if "glibc.malloc." in env.get("GLIBC_TUNABLES", ""):
        return "glibc-tuned"
    return "glibc"


_hinted = False


def hint() -> None:
    """Warn once (category :class:`AllocatorHint`) when XLA runs on CPU under
    glibc's default ``malloc``; a no-op otherwise and after the first call."""
    global _hinted
    if _hinted:
        return
    _hinted = True
    if os.environ.get("JLORA_NO_ALLOCATOR_HINT", "") not in ("", "0"):
        return
    if not sys.platform.startswith("linux"):  # glibc's arenas are a Linux matter
        return
    import jax

    if jax.default_backend() != "cpu" or allocator() != "glibc":
        return
    warnings.warn(
        "jlora: XLA:CPU under glibc's default malloc spends much of each step in page faults; "
        f"start Python with LD_PRELOAD=<libtcmalloc.so> or GLIBC_TUNABLES={RECOMMENDED_TUNABLES} "
        "(see docs/performance.md; silence with JLORA_NO_ALLOCATOR_HINT=1)",
        AllocatorHint, stacklevel=3)
