"""Splitting benchmark requests over data-parallel replicas of a training run.

Each DP replica holds the whole model (its TP/PP ranks generate together), so during training
the replicas can decode different requests: replica r takes the r-th slice of every round of
``batch_size x replicas`` requests, and the answers of a round are all-gathered over the
data-parallel group, so every rank ends with every answer in the original order (the rank that
writes files then writes what a single replica would have written).

Not split when replicas are not independent: expert parallelism (EP > 1, or an expert-TP group
wider than TP) runs one MoE layer across DP ranks, which must then decode the same requests in
lockstep.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional


@dataclass
class ReplicaShare:
    """This rank's place among the replicas that split the requests."""

    rank: int
    """Data-parallel rank of this replica."""
    size: int
    """Replicas that split the requests."""
    group: object = None
    """torch.distributed group over which the answers are gathered (the DP group)."""

    def slice(self, n: int) -> tuple[int, int]:
        """[lo, hi) of this replica's part of a round of n requests: contiguous, as even as can
        be, and exactly ``batch_size`` each when the round is full."""
        k = math.ceil(n / self.size)
        return min(n, self.rank * k), min(n, (self.rank + 1) * k)

    def gather(self, obj) -> list:
        """Every replica's ``obj``, in DP rank order (collective over the DP group)."""
        import torch.distributed as dist

        out = [None] * self.size
        dist.all_gather_object(out, obj, group=self.group)
        return out


def share_from_parallel_state() -> Optional[ReplicaShare]:
    """The DP split of the current Megatron layout, or None (one replica, or replicas that must
    run together: see the module docstring)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if not (dist.is_available() and dist.is_initialized()):
        return None
    size = ps.get_data_parallel_world_size()
    if size <= 1:
        return None
    if (
        ps.get_expert_model_parallel_world_size() != 1
        or ps.get_expert_tensor_parallel_world_size() != ps.get_tensor_model_parallel_world_size()
    ):
        return None
    return ReplicaShare(ps.get_data_parallel_rank(), size, ps.get_data_parallel_group())
