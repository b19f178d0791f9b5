"""Parameters sharded by FSDP2 (DTensors, each process holding a block of rows): the local block,
and where it sits in the whole tensor, so that the Fisher F and the anchor theta* are read and kept
for those rows only. Plain tensors (one process, DDP) are their own single shard."""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor, Shard


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's block of `t` (the tensor itself when it is not sharded)."""
    return t.to_local() if isinstance(t, DTensor) else t


def rows(p: torch.Tensor) -> slice | None:
    """The rows of the whole tensor that this process holds (None: all of it). FSDP2 shards dim 0 as
    torch.chunk does: blocks of ceil(n / world) rows, the last ones shorter or empty."""
    if not isinstance(p, DTensor):
        return None
    if tuple(p.placements) != (Shard(0),):
        raise ValueError(f"expected a parameter sharded on dim 0 over one mesh dimension, got {p.placements}")
    n, world, rank = p.shape[0], p.device_mesh.size(), p.device_mesh.get_local_rank()
    start = min(rank * math.ceil(n / world), n)
    held = p.to_local().shape[0]
    if start + held > n:
        raise ValueError(f"a shard of {held} rows from row {start} does not fit a tensor of {n}")
    return slice(start, start + held)


def whole(rows: torch.Tensor, like: DTensor) -> torch.Tensor:
    """The whole tensor of which every process holds `rows`, sharded as `like` (every process takes
    part and gets it)."""
    return DTensor.from_local(rows, like.device_mesh, like.placements, shape=like.shape, stride=like.stride()).full_tensor()
