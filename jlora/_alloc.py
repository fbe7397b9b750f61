"""glibc's ``malloc`` under XLA:CPU: tune it at import, and say so once.

XLA:CPU allocates every temporary buffer of every execution afresh. Under glibc's
default ``malloc`` those buffers are ``mmap``ed or come from per-thread arenas
that are returned to the kernel between steps, so each training step pays tens
of thousands of minor page faults (83 k per all-MiniLM-L6-v2 step at batch
8 x 128, a quarter of the step; docs/performance.md). Three fixes:

* ``import jlora`` does it for the process (:func:`tune`): on Linux with glibc's
  untuned allocator, before JAX has started its backends, it sets glibc's own
  options with ``mallopt`` to the values of :data:`RECOMMENDED_TUNABLES` (one
  arena, no ``mmap``ed blocks, freed memory kept up to 2 GiB). This must happen
  before XLA's threads create their arenas: imported after the first JAX
  computation, jlora leaves ``malloc`` alone. ``JLORA_ALLOCATOR=default`` keeps
  glibc's defaults;
* ``GLIBC_TUNABLES=`` :data:`RECOMMENDED_TUNABLES` before the process starts;
* or preload tcmalloc or jemalloc (``LD_PRELOAD=/path/to/libtcmalloc.so``).

:func:`hint` warns at most once per process (category :class:`AllocatorHint`)
when XLA runs on CPU under glibc's allocator without tunables or preload,
saying whether jlora tuned it; silence it with
``warnings.filterwarnings("ignore", category=jlora.AllocatorHint)`` or the
environment variable ``JLORA_NO_ALLOCATOR_HINT=1``.
"""

from __future__ import annotations

import ctypes
import os
import sys
import warnings

#: glibc malloc tunables that make XLA:CPU's per-step buffers reuse memory
#: (one arena, no mmap'd blocks, a 4 GiB trim threshold).
RECOMMENDED_TUNABLES = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                        "glibc.malloc.trim_threshold=4294967296")

_FAST = ("tcmalloc", "jemalloc", "mimalloc")

# glibc's mallopt parameters (malloc.h) and the values of RECOMMENDED_TUNABLES;
# mallopt takes an int, so the trim threshold is 2 GiB rather than 4.
_MALLOPT = (("M_ARENA_MAX", -8, 1), ("M_MMAP_MAX", -4, 0), ("M_TRIM_THRESHOLD", -1, 2**31 - 1))


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


_tuned = False


def _backends_started() -> bool:
    try:  # private, but the only way to know without starting them
        from jax._src import xla_bridge
    except ImportError:
        return False
    return bool(xla_bridge.backends_are_initialized())


def tune() -> bool:
    """Set glibc ``malloc``'s options in this process to those of
    :data:`RECOMMENDED_TUNABLES` (``mallopt``: one arena, no ``mmap``ed blocks,
    a 2 GiB trim threshold). ``import jlora`` calls it once.

    Returns whether the options are now set. It does nothing (and returns
    ``False``) off Linux, without glibc, when ``JLORA_ALLOCATOR=default``, when
    ``GLIBC_TUNABLES`` or a preloaded allocator already chose, or when JAX's
    backends have started: XLA's threads then own arenas under the old options,
    and ``mallopt`` no longer removes the page faults.

    Example::

        >>> from jlora import _alloc
        >>> _alloc.tune() in (True, False)
        True
    """
    global _tuned
    if _tuned:
        return True
    if (not sys.platform.startswith("linux") or os.environ.get("JLORA_ALLOCATOR", "") == "default"
            or allocator() != "glibc" or _backends_started()):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only (musl's mallopt ignores these)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _tuned = all(mallopt(param, value) == 1 for _, param, value in _MALLOPT)
    return _tuned


def tuned() -> bool:
    """Whether :func:`tune` set glibc's options in this process."""
    return _tuned


_hinted = False


def hint() -> None:
    """Warn once (category :class:`AllocatorHint`) when XLA runs on CPU under
    glibc's allocator without ``GLIBC_TUNABLES`` or a preload: saying that jlora
    tuned it at import, or, when it could not, how to; a no-op otherwise and
    after the first call."""
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
    if _tuned:
        msg = ("jlora: set glibc's malloc options for this process at import (one arena, no mmap'd "
               "blocks, 2 GiB trim threshold) so that XLA:CPU steps reuse memory instead of page "
               "faulting; JLORA_ALLOCATOR=default keeps glibc's defaults, and "
               f"GLIBC_TUNABLES={RECOMMENDED_TUNABLES} or LD_PRELOAD=<libtcmalloc.so> set it before start")
    else:
        msg = ("jlora: XLA:CPU under glibc's default malloc spends much of each step in page faults; "
               f"start Python with LD_PRELOAD=<libtcmalloc.so> or GLIBC_TUNABLES={RECOMMENDED_TUNABLES}"
               + ("" if os.environ.get("JLORA_ALLOCATOR", "") == "default"
                  else ", or import jlora before the first JAX computation"))
    warnings.warn(msg + " (see docs/performance.md; silence with JLORA_NO_ALLOCATOR_HINT=1)",
                  AllocatorHint, stacklevel=3)
