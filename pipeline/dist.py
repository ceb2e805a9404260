"""Which process this is: the global rank (who writes outputs) and the data-parallel group (who reads what).

Importing this module imports neither torch nor Lightning: the harness asks for the rank in every stage,
and most stages never train.
"""
from __future__ import annotations

import os
import sys


def global_rank() -> int:
    """This process's rank under torchrun, SLURM or Lightning's launcher (0 when not distributed).

    Lightning's own record when a stage trained with it (its launcher sets no RANK); otherwise the
    launcher's environment, without importing Lightning (~10 s) into stages that never use it.
    """
    rank_zero = sys.modules.get("lightning.fabric.utilities.rank_zero")
    if rank_zero is not None:
        return int(getattr(rank_zero.rank_zero_only, "rank", 0) or 0)
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def data_parallel() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed process group, or (0, 1) without one."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1
