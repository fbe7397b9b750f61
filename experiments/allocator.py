"""Start experiments under a tuned ``malloc`` (see docs/performance.md).

XLA:CPU steps run 7-30% faster when freed buffers are reused instead of being
returned to the kernel. :func:`ensure_tuned` re-executes the current script with
``GLIBC_TUNABLES`` set to :data:`jlora._alloc.RECOMMENDED_TUNABLES` unless the
process already runs tcmalloc/jemalloc/mimalloc or tuned glibc, or the user asked
for the default with ``JLORA_ALLOCATOR=default``.
"""

from __future__ import annotations

import os
import sys

from jlora._alloc import RECOMMENDED_TUNABLES, allocator


def ensure_tuned() -> None:
    """Re-exec ``sys.argv`` with the recommended glibc tunables (no-op when set)."""
    if os.environ.get("JLORA_ALLOCATOR", "") == "default" or allocator() != "glibc":
        return
    env = dict(os.environ)
    old = env.get("GLIBC_TUNABLES", "")
    env["GLIBC_TUNABLES"] = f"{old}:{RECOMMENDED_TUNABLES}" if old else RECOMMENDED_TUNABLES
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable] + sys.argv, env)
