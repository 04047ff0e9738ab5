"""Python face of the ``torchrec_tt`` custom ops (C++ schemas in ``csrc/schema.cpp``).

This layer only binds: it turns friendly arguments into the schema's integers, registers fake
kernels (shape functions, so ``torch.compile`` can trace the ops). The autograd formulas are
C++ (``csrc/tt_autograd.cpp``).

Offsets convention (as ``torch.nn.EmbeddingBag``): with ``include_last_offset=False`` there is one
offset per bag, ``offsets[0] == 0``, and the last bag runs to the end of ``indices``; with
``include_last_offset=True`` there are B + 1 offsets and the last equals ``len(indices)``
(TorchRec's KJT form). Offsets must be non-decreasing; empty bags pool to zeros.
"""
from __future__ import annotations

import enum
import math
from typing import List, Optional, Sequence, Union

import torch

from . import _C  # noqa: F401  (loading the extension registers the ops)

__all__ = [
    "BoundsCheckMode",
    "FUSED_OPTIMIZERS",
    "pooling_mode",
    "tt_embedding_bag",
    "tt_embedding_bag_fused",
    "tt_cached_embedding_bag_fused",
]

_ops = torch.ops.torchrec_tt

# Fused optimizers run inside backward; anything else goes through torch.optim on dense gradients.
FUSED_OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad")


class BoundsCheckMode(enum.IntEnum):
    """What to do with ids outside ``[0, num_embeddings)``; values match fbgemm_gpu's enum."""

    FATAL = 0  # raise IndexError naming the table, the id and its position (default)
    WARNING = 1  # drop the id from its bag and warn
    IGNORE = 2  # drop the id silently

    @classmethod
    def parse(cls, mode: Union[str, int, "BoundsCheckMode"]) -> "BoundsCheckMode":
        if isinstance(mode, str):
            names = {"error": cls.FATAL, "fatal": cls.FATAL, "warn": cls.WARNING, "warning": cls.WARNING,
                     "ignore": cls.IGNORE}
            if mode.lower() not in names:
                raise ValueError(f"unknown bounds_check_mode {mode!r}; use one of {sorted(names)}")
            return names[mode.lower()]
        try:
            return cls(int(getattr(mode, "value", mode)))
        except ValueError:
            raise ValueError(f"unsupported bounds_check_mode {mode!r} (TT kernels always check ids: "
                             "FATAL, WARNING or IGNORE)") from None


def pooling_mode(mode: str) -> int:
    modes = {"sum": 0, "mean": 1}
    if mode not in modes:
        raise ValueError(f"unsupported pooling mode {mode!r}; TT tables support 'sum' and 'mean'")
    return modes[mode]


def tt_embedding_bag(
    cores: Sequence[torch.Tensor],
    indices: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor] = None,
    *,
    num_embeddings: int,
    mode: str = "sum",
    include_last_offset: bool = False,
    bounds_check_mode: Union[str, int, BoundsCheckMode] = BoundsCheckMode.FATAL,
    table_name: str = "tt_table",
) -> torch.Tensor:
    """Pooled lookup of a TT table: [num_bags, prod(q)]. Gradients flow to the cores as dense tensors."""
    return _ops.tt_embedding_bag(
        list(cores), indices, offsets, per_sample_weights, num_embeddings, pooling_mode(mode),
        include_last_offset, int(BoundsCheckMode.parse(bounds_check_mode)), table_name)


def _check_no_weight_grad(per_sample_weights: Optional[torch.Tensor], table_name: str) -> None:
    if per_sample_weights is not None and per_sample_weights.requires_grad:
        raise ValueError(f"torchrec_tt: table '{table_name}': gradients for per_sample_weights are not "
                         "available with a fused optimizer; detach them or use optimizer=None")


def tt_embedding_bag_fused(
    cores: Sequence[torch.Tensor],
    optimizer_state: Sequence[torch.Tensor],
    indices: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor] = None,
    *,
    num_embeddings: int,
    optimizer: str,
    learning_rate: float,
    eps: float = 1e-8,
    mode: str = "sum",
    include_last_offset: bool = False,
    bounds_check_mode: Union[str, int, BoundsCheckMode] = BoundsCheckMode.FATAL,
    table_name: str = "tt_table",
) -> torch.Tensor:
    """Same lookup; its backward applies ``optimizer`` to the touched core slices in place and
    returns no gradient for the cores (as FBGEMM's fused TBE)."""
    _check_no_weight_grad(per_sample_weights, table_name)
    return _ops.tt_embedding_bag_fused(
        list(cores), list(optimizer_state), indices, offsets, per_sample_weights, num_embeddings,
        pooling_mode(mode), include_last_offset, int(BoundsCheckMode.parse(bounds_check_mode)), optimizer,
        float(learning_rate), float(eps), table_name)


def tt_cached_embedding_bag_fused(
    cores: Sequence[torch.Tensor],
    optimizer_state: Sequence[torch.Tensor],
    cache_weight: torch.Tensor,
    cache_state: torch.Tensor,
    cache_map: torch.Tensor,
    cache_trained: torch.Tensor,
    indices: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor] = None,
    *,
    num_embeddings: int,
    optimizer: str,
    learning_rate: float,
    eps: float = 1e-8,
    mode: str = "sum",
    include_last_offset: bool = False,
    bounds_check_mode: Union[str, int, BoundsCheckMode] = BoundsCheckMode.FATAL,
    table_name: str = "tt_table",
):
    """``tt_embedding_bag_fused`` with a hot-row cache (CPU): ids found in ``cache_map`` (the
    ``TTRowCache`` id -> slot hash map) read row ``cache_weight[slot]`` instead of the TT chain, and
    backward applies ``optimizer`` to those rows too (``cache_state``: their Adagrad state, empty for
    SGD) and sets ``cache_trained[slot]``. Returns the pooled output and, per id, int64 its cache slot
    (-1: rebuilt from the cores, -2: dropped by the bounds check)."""
    _check_no_weight_grad(per_sample_weights, table_name)
    return _ops.tt_cached_embedding_bag_fused(
        list(cores), list(optimizer_state), cache_weight, cache_state, cache_map, cache_trained, indices,
        offsets, per_sample_weights, num_embeddings, pooling_mode(mode), include_last_offset,
        int(BoundsCheckMode.parse(bounds_check_mode)), optimizer, float(learning_rate), float(eps), table_name)


def tt_cache_count_(where: torch.Tensor, indices: torch.Tensor, slot_counts: torch.Tensor, hit_stats: torch.Tensor,
                    pending_ids: torch.Tensor, pending_steps: torch.Tensor, *, fill: int, weight: float, step: int,
                    training: bool, table_name: str = "tt_table") -> int:
    """A hot-row cache's bookkeeping of one lookup in one pass (CPU, int64 ``where``/``indices`` as
    returned by ``tt_cached_embedding_bag_fused``): hits and misses into ``hit_stats``; in training,
    ``weight`` added to each hit's ``slot_counts`` entry and missed ids appended to ``pending_ids`` /
    ``pending_steps`` at ``fill``. Returns the number of ids appended."""
    return int(_ops.tt_cache_count_(where, indices, slot_counts, hit_stats, pending_ids, pending_steps, int(fill),
                                    float(weight), int(step), bool(training), table_name))


# ---- fake kernels (shapes only) ----------------------------------------------------------------

def _pooled_shape(cores: List[torch.Tensor], offsets: torch.Tensor, include_last_offset: bool):
    bags = offsets.shape[0] - 1 if include_last_offset else offsets.shape[0]
    return bags, math.prod(c.shape[2] for c in cores)


@torch.library.register_fake("torchrec_tt::tt_embedding_bag")
def _(cores, indices, offsets, per_sample_weights, num_embeddings, pooling_mode, include_last_offset,
      bounds_check_mode, table_name):
    return cores[0].new_empty(_pooled_shape(cores, offsets, include_last_offset))


@torch.library.register_fake("torchrec_tt::tt_embedding_bag_fused")
def _(cores, optimizer_state, indices, offsets, per_sample_weights, num_embeddings, pooling_mode,
      include_last_offset, bounds_check_mode, optimizer, learning_rate, eps, table_name):
    return cores[0].new_empty(_pooled_shape(cores, offsets, include_last_offset))


@torch.library.register_fake("torchrec_tt::tt_embedding_bag_backward")
def _(grad_output, cores, indices, offsets, per_sample_weights, num_embeddings, pooling_mode,
      include_last_offset, per_sample_weights_grad, table_name):
    grad_psw = (torch.empty_like(per_sample_weights) if per_sample_weights_grad
                else cores[0].new_empty((0,)))
    return [torch.empty_like(c) for c in cores], grad_psw


@torch.library.register_fake("torchrec_tt::tt_embedding_bag_backward_fused_")
def _(grad_output, cores, optimizer_state, indices, offsets, per_sample_weights, num_embeddings,
      pooling_mode, include_last_offset, optimizer, learning_rate, eps, table_name):
    return None


@torch.library.register_fake("torchrec_tt::tt_cached_embedding_bag_fused")
def _(cores, optimizer_state, cache_weight, cache_state, cache_map, cache_trained, indices, offsets,
      per_sample_weights, num_embeddings, pooling_mode, include_last_offset, bounds_check_mode, optimizer,
      learning_rate, eps, table_name):
    return (cores[0].new_empty(_pooled_shape(cores, offsets, include_last_offset)),
            indices.new_empty((indices.numel(),), dtype=torch.long))


@torch.library.register_fake("torchrec_tt::tt_cache_count_")
def _(where, indices, slot_counts, hit_stats, pending_ids, pending_steps, fill, weight, step, training, table_name):
    return where.new_empty((), dtype=torch.int64)


@torch.library.register_fake("torchrec_tt::tt_cached_embedding_bag_backward_fused_")
def _(grad_output, cores, optimizer_state, cache_weight, cache_state, cache_map, cache_trained, indices,
      offsets, per_sample_weights, num_embeddings, pooling_mode, include_last_offset, optimizer, learning_rate,
      eps, table_name):
    return None

