"""Compression chooser: which tables become TT, and at what rank, so that the sharding plan fits.

Policy (why): memory is saved where it is largest, and quality is lost where it is least. TT's quality
loss grows as the rank falls, and TT-Rec reports the largest tables compress the most at the smallest
loss, so

1. if the all-dense model plans within the budget, nothing is compressed;
2. otherwise the largest tables (by dense bytes) become TT at ``max_rank``, one more at a time, until
   the plan fits (found by bisection on how many: fewer TT tables = less quality risk);
3. if every candidate at ``max_rank`` still does not fit, all candidates share one rank, the highest in
   ``[min_rank, max_rank)`` that fits (bisection);
4. if even ``min_rank`` does not fit, ``InsufficientMemoryError`` says by how much.

A table is a candidate only where TT at ``min_rank`` compresses it at least ``min_ratio`` x (default 2:
a table that barely shrinks is not worth TT's quality risk), and its rank is capped at the highest one
that still does. "Fits" means TorchRec's
planner, with the TT estimators, finds a plan in the topology's per-device memory: HBM on GPU, and on
CPU the DDR capacity (``make_topology`` puts the budget there, as TorchRec's CPU topology has no HBM).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torchrec.distributed.planner.types import ParameterConstraints, PlannerError, Topology
from torchrec.distributed.types import ShardingPlan
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, data_type_to_dtype

from torchrec_tt.config import TTEmbeddingBagConfig

from .estimators import dense_table_bytes, tt_table_bytes

__all__ = ["Choice", "InsufficientMemoryError", "choose", "choose_compression", "make_topology", "memory_budget",
           "to_tt_config"]


class InsufficientMemoryError(ValueError):
    """Even the most compressed model (every candidate table TT at ``min_rank``) does not fit."""


def make_topology(world_size: int, memory_bytes: int, compute_device: str = "cpu",
                  local_world_size: Optional[int] = None, **kwargs: Any) -> Topology:
    """A topology with ``memory_bytes`` per device: HBM on cuda, DDR on cpu (TorchRec zeroes CPU HBM)."""
    cap = {"hbm_cap": int(memory_bytes)} if compute_device != "cpu" else {"ddr_cap": int(memory_bytes)}
    return Topology(world_size=world_size, compute_device=compute_device,
                    local_world_size=local_world_size or world_size, **cap, **kwargs)


def memory_budget(topology: Topology) -> int:
    """Per-device bytes the planner may fill: HBM on GPU, DDR on CPU (the smallest device's)."""
    gpu = topology.compute_device in ("cuda", "mtia")
    return min(d.storage.hbm if gpu else d.storage.ddr for d in topology.devices)


def to_tt_config(table: EmbeddingBagConfig, rank: int, **tt_fields: Any) -> TTEmbeddingBagConfig:
    """The TT version of a dense table config (every ``EmbeddingBagConfig`` field kept unless ``tt_fields``
    sets it, e.g. ``data_type=DataType.BF16`` for half cores)."""
    base = {f.name: getattr(table, f.name) for f in dataclasses.fields(EmbeddingBagConfig) if f.init}
    return TTEmbeddingBagConfig(**{**base, **tt_fields}, tt_ranks=rank)


def _dense_bytes(t: EmbeddingBagConfig) -> int:
    return dense_table_bytes(t.num_embeddings, t.embedding_dim, data_type_to_dtype(t.data_type).itemsize).weights


def _rank_cap(t: EmbeddingBagConfig, min_rank: int, max_rank: int, tt_fields: Dict[str, Any],
              min_ratio: float) -> int:
    """Highest rank in [min_rank, max_rank] whose TT table is ``min_ratio`` x smaller than the dense one
    (0: none)."""
    dense = _dense_bytes(t) / min_ratio
    lo, hi = min_rank, max_rank
    if tt_table_bytes(to_tt_config(t, lo, **tt_fields)).weights >= dense:
        return 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if tt_table_bytes(to_tt_config(t, mid, **tt_fields)).weights < dense:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclasses.dataclass
class Choice:
    """What ``choose`` decided: the new configs, the plan, and the planner's sharding options (for
    ``per_rank_bytes`` / ``format_plan``)."""

    tables: List[EmbeddingBagConfig]
    plan: ShardingPlan
    options: List[Any]


def _plan(tables: List[EmbeddingBagConfig], topology: Topology, batch_size: int,
          constraints: Optional[Dict[str, ParameterConstraints]], fused_params: Optional[Dict[str, Any]],
          estimator_kwargs: Optional[Dict[str, Any]], planner_kwargs: Dict[str, Any],
          ) -> Tuple[Optional[ShardingPlan], Any]:
    """Plan a meta-device collection of ``tables``; ``(None, error)`` when it does not fit."""
    from torchrec_tt.distributed.planning import get_sharders_and_planner  # late: planning imports us
    from torchrec_tt.modules.tt_embedding_bag_collection import TTEmbeddingBagCollection

    module = TTEmbeddingBagCollection(tables, device=torch.device("meta"))
    sharders, planner = get_sharders_and_planner(
        tables, topology.world_size, batch_size, topology=topology, constraints=constraints,
        fused_params=fused_params, estimator_kwargs=estimator_kwargs, **planner_kwargs)
    try:
        return planner.plan(module, sharders), planner
    except PlannerError as e:
        return None, e


def choose_compression(tables: Sequence[EmbeddingBagConfig], topology: Topology, *, batch_size: int,
                       min_rank: int = 1, max_rank: int = 64, **kwargs: Any,
                       ) -> Tuple[List[EmbeddingBagConfig], ShardingPlan]:
    """``(new_tables, plan)``; see ``choose`` for the arguments and the module docstring for the policy."""
    c = choose(tables, topology, batch_size=batch_size, min_rank=min_rank, max_rank=max_rank, **kwargs)
    return c.tables, c.plan


def choose(tables: Sequence[EmbeddingBagConfig], topology: Topology, *, batch_size: int,
           min_rank: int = 1, max_rank: int = 64, num_cores: int = 3,
           tt_optimizer: Any = None, tt_learning_rate: Optional[float] = None,
           tt_cache: Optional[Dict[str, Any]] = None, tt_data_type: Optional[DataType] = None,
           keep_dense: Sequence[str] = (), constraints: Optional[Dict[str, ParameterConstraints]] = None,
           fused_params: Optional[Dict[str, Any]] = None, module_path: str = "",
           estimator_kwargs: Optional[Dict[str, Any]] = None, min_ratio: float = 2.0,
           **planner_kwargs: Any) -> Choice:
    """Turn the fewest, largest tables into TT at the highest rank that makes the plan fit (module docstring).

    Args:
        tables: dense ``EmbeddingBagConfig`` s (``TTEmbeddingBagConfig`` entries are kept as given).
        topology: world size and per-device memory (``make_topology``); ``batch_size``: per rank.
        min_rank, max_rank: the TT rank range; ``num_cores``, ``tt_optimizer`` (``None`` = dense core
            gradients, or ``"sgd"``/``"adagrad"``/``"rowwise_adagrad"`` fused), ``tt_learning_rate``: TT fields.
        tt_cache: hot-row cache fields of every TT table (e.g. ``{"cache_fraction": 0.01}``), so the
            plan budgets the cached rows, their state and tracker too.
        tt_data_type: the TT tables' cores (and cached rows): FP32, FP16 or BF16; default the dense
            table's own ``data_type``. Half cores take half the core bytes in the plan (optimizer state stays fp32).
        keep_dense: table names never compressed; ``min_ratio``: least compression worth a TT table.
        constraints, fused_params, estimator_kwargs: as ``get_sharders_and_planner``.
        module_path: FQN of the ``TTEmbeddingBagCollection`` in the model (the plan is keyed by it).
        planner_kwargs: to ``EmbeddingShardingPlanner`` (e.g. ``stats=[NoopEmbeddingStats()]``).

    Returns a ``Choice`` (``tables``, ``plan``, ``options``): build ``TTEmbeddingBagCollection(tables)`` at
    ``module_path`` and pass ``plan`` to ``DistributedModelParallel`` (with sharders built with the same
    ``fused_params``). Raises ``InsufficientMemoryError`` when nothing fits.
    """
    if not 1 <= min_rank <= max_rank:
        raise ValueError(f"need 1 <= min_rank <= max_rank, got {min_rank}, {max_rank}")
    tables = list(tables)
    tt_fields: Dict[str, Any] = {"num_cores": num_cores, "optimizer": tt_optimizer}
    if tt_learning_rate is not None:
        tt_fields["learning_rate"] = tt_learning_rate
    tt_fields.update(tt_cache or {})
    if tt_data_type is not None:
        tt_fields["data_type"] = tt_data_type
    caps = {t.name: _rank_cap(t, min_rank, max_rank, tt_fields, min_ratio) for t in tables
            if not isinstance(t, TTEmbeddingBagConfig) and t.name not in keep_dense}
    candidates = sorted((n for n, c in caps.items() if c), key=lambda n: -_dense_bytes(
        next(t for t in tables if t.name == n)))

    def build(num_tt: int, rank: int) -> List[EmbeddingBagConfig]:
        chosen = set(candidates[:num_tt])
        return [to_tt_config(t, min(rank, caps[t.name]), **tt_fields) if t.name in chosen else t for t in tables]

    tried: Dict[Tuple[int, int], Tuple[Optional[ShardingPlan], Any]] = {}

    def attempt(num_tt: int, rank: int) -> Optional[ShardingPlan]:
        if (num_tt, rank) not in tried:
            tried[(num_tt, rank)] = _plan(build(num_tt, rank), topology, batch_size, constraints, fused_params,
                                          estimator_kwargs, planner_kwargs)
        return tried[(num_tt, rank)][0]

    def finish(num_tt: int, rank: int) -> Choice:
        plan, planner = tried[(num_tt, rank)]
        assert plan is not None
        if module_path:
            plan = ShardingPlan(plan={module_path: v for v in plan.plan.values()})
        return Choice(build(num_tt, rank), plan, list(planner._best_plan or []))

    n = len(candidates)
    if attempt(0, max_rank) is not None:
        return finish(0, max_rank)
    if n and attempt(n, max_rank) is not None:  # phase 2: fewest largest tables at max_rank
        lo, hi = 1, n  # attempt(hi) fits
        while lo < hi:
            mid = (lo + hi) // 2
            if attempt(mid, max_rank) is not None:
                hi = mid
            else:
                lo = mid + 1
        return finish(hi, max_rank)
    if n and max_rank > min_rank and attempt(n, min_rank) is not None:  # phase 3: one shared rank
        lo, hi = min_rank, max_rank - 1  # attempt(lo) fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if attempt(n, mid) is not None:
                lo = mid
            else:
                hi = mid - 1
        return finish(n, lo)
    smallest = build(n, min_rank)
    sizes = [tt_table_bytes(t).state if isinstance(t, TTEmbeddingBagConfig) else _dense_bytes(t) for t in smallest]
    last_error = tried[(n, min_rank)][1] if (n, min_rank) in tried else tried[(0, max_rank)][1]
    said = str(last_error).strip().splitlines()[0] if str(last_error).strip() else type(last_error).__name__
    raise InsufficientMemoryError(
        f"no sharding plan fits even with all {n} compressible table(s) as TT at min_rank={min_rank}: the "
        f"tables alone need {sum(sizes):,} bytes (largest {max(sizes):,}) vs a budget of "
        f"{memory_budget(topology):,} bytes per device x {topology.world_size}. Lower min_rank, add devices "
        f"or memory, or reduce batch_size ({batch_size}). Planner said: {said}")
