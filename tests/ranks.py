"""Running a script as 2 CPU ranks (gloo) from a test: a free port, the launcher, and a clean end for workers."""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def free_port() -> int:
    """A TCP port free at the time of the call, for ``MASTER_PORT``."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(worker: Path, args: list[str], logs: Path, world_size: int = 2, timeout: int = 300) -> None:
    """Run ``python worker *args`` as ``world_size`` ranks (``RANK``/``WORLD_SIZE``/``MASTER_*`` set, one thread each)
    and assert that every rank exits 0, showing the end of each rank's log otherwise."""
    port, processes = free_port(), []
    for rank in range(world_size):
        env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1")
        env.update(MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        log = open(logs / f"log{rank}.txt", "w")  # noqa: SIM115 (closed below)
        command = [sys.executable, str(worker), *args]
        processes.append((subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    codes = []
    for process, log in processes:
        codes.append(process.wait(timeout=timeout))
        log.close()
    tails = "".join((logs / f"log{rank}.txt").read_text()[-3000:] for rank in range(world_size))
    assert codes == [0] * world_size, f"exit codes {codes}\n{tails}"


def end_process_group() -> None:
    """Tear a worker down so that no gloo thread outlives the interpreter.

    Both ranks first wait for each other (no rank closes its sockets while the other still has collectives in
    flight), whatever the caller freed is collected while the process group exists, the group is destroyed, and the
    process exits without interpreter finalization: gloo's C++ threads and work objects would otherwise be destroyed
    during finalization, which aborts a rank now and then with "terminate called without an active exception".
    """
    import torch.distributed as dist

    dist.barrier()
    gc.collect()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
