"""Scripts run as CPU ranks by the tests (``tests.conftest.start_ranks``), and what they share."""

from __future__ import annotations

import gc
import os
import sys


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
