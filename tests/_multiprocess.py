"""Launch a test worker as N real JAX processes on localhost (``jax.distributed``).

Test side::

    outs = _multiprocess.launch("tests/my_worker.py", ["arg"], processes=2, devices=4)

starts ``processes`` Python processes, each with ``devices`` simulated CPU
devices, a shared coordinator port and ``JLORA_PROCESS_ID`` /
``JLORA_NUM_PROCESSES`` / ``JLORA_COORDINATOR`` in the environment, waits for
all of them (killing the rest when one fails or ``timeout`` passes) and
returns their stdouts; a failure raises ``AssertionError`` with every
process's stderr tail. Worker side: call :func:`initialize` before any other
JAX call.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def initialize() -> tuple[int, int]:
    """``jax.distributed.initialize`` from the launcher's environment; returns (id, count)."""
    import jax

    pid = int(os.environ["JLORA_PROCESS_ID"])
    n = int(os.environ["JLORA_NUM_PROCESSES"])
    jax.distributed.initialize(coordinator_address=os.environ["JLORA_COORDINATOR"],
                               num_processes=n, process_id=pid)
    return pid, n


def launch(script: str, args=(), *, processes: int = 2, devices: int = 4,
           timeout: float = 180.0) -> list[str]:
    port = free_port()
    procs = []
    for pid in range(processes):
        env = dict(os.environ)
        env.update(JAX_PLATFORMS="cpu", JLORA_PROCESS_ID=str(pid),
                   JLORA_NUM_PROCESSES=str(processes), JLORA_COORDINATOR=f"localhost:{port}",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                   PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
        procs.append(subprocess.Popen([sys.executable, os.path.join(ROOT, script), *map(str, args)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env=env, cwd=ROOT))
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        outs = [p.communicate() for p in procs]
    codes = [p.returncode for p in procs]
    if any(codes):
        tails = "\n".join(f"--- process {i} (exit {c}):\n{err[-3000:]}"
                          for i, (c, (_, err)) in enumerate(zip(codes, outs)))
        raise AssertionError(f"{script}: a process failed or timed out\n{tails}")
    return [out for out, _ in outs]
