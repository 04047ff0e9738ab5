"""Minimal TT-aware shard estimators for TorchRec's planner (``torchrec_tt.planner.estimators``).

TorchRec's default estimators raise for ``compute_kernel="customized_kernel"``. These two estimators
handle the TT options themselves (real TT bytes: cores + fused optimizer state) and hand every other
option to TorchRec's ``EmbeddingStorageEstimator`` / ``EmbeddingPerfEstimator``. TorchRec 1.8.0's
``EmbeddingShardingPlanner`` takes them through the enumerator::

    enumerator = EmbeddingEnumerator(topology, batch_size, constraints,
                                     estimator=[TTPerfEstimator(topology, constraints),
                                                TTStorageEstimator(topology, constraints)])
    planner = EmbeddingShardingPlanner(topology=topology, batch_size=batch_size,
                                       constraints=constraints, enumerator=enumerator)

The perf model is deliberately coarse (enough to rank placements): compute is the TT chain-product
FLOPs for the looked-up rows at the device's compute rate; table-wise pays the KJT and pooled-output
all-to-alls, data-parallel pays a gradient all-reduce of the cores (nothing when the optimizer is
fused, which data-parallel does not allow anyway).
"""
from __future__ import annotations

from typing import Dict, List, Optional

from torchrec.distributed.planner.shard_estimators import EmbeddingPerfEstimator, EmbeddingStorageEstimator
from torchrec.distributed.planner.types import (
    ParameterConstraints,
    Perf,
    SharderDataMap,
    ShardEstimator,
    ShardingOption,
    Storage,
    Topology,
)
from torchrec.distributed.types import ShardingType

__all__ = ["TT_COMPUTE_KERNEL", "TTPerfEstimator", "TTStorageEstimator", "tt_estimators"]

TT_COMPUTE_KERNEL = "customized_kernel"
_INDEX_BYTES = 8


def _is_tt(option: ShardingOption) -> bool:
    return option.compute_kernel == TT_COMPUTE_KERNEL


def _tt_table(option: ShardingOption):
    module = option.module[1]
    tables = getattr(module, "tt_tables", None)
    if tables is None or option.name not in tables:
        raise ValueError(f"table '{option.name}': compute kernel {TT_COMPUTE_KERNEL!r} is only valid for TT "
                         f"tables of a TTEmbeddingBagCollection (module {option.path!r})")
    return tables[option.name]


def _pooling_factor(option: ShardingOption, constraints: Optional[Dict[str, ParameterConstraints]]) -> float:
    c = constraints.get(option.name) if constraints else None
    if c is not None and c.pooling_factors:
        return float(sum(c.pooling_factors))
    return float(sum(option.input_lengths)) if option.input_lengths else 1.0


def _tt_flops_per_row(table) -> float:
    """Chain product G1[i1]..Gd[id]: step k multiplies (q1..q_{k-1}) x r_{k-1} by r_{k-1} x (q_k r_k)."""
    p, q, r = table.p_shapes, table.q_shapes, table.ranks
    flops, width = 0.0, q[0]
    for k in range(1, len(p)):
        flops += 2.0 * width * r[k] * q[k] * r[k + 1]
        width *= q[k]
    return flops


class TTStorageEstimator(ShardEstimator):
    """Storage of TT options = cores + optimizer state (+ ids and pooled output); others: TorchRec's."""

    def __init__(self, topology: Topology, constraints: Optional[Dict[str, ParameterConstraints]] = None,
                 **kwargs) -> None:
        self._topology = topology
        self._constraints = constraints
        self._dense = EmbeddingStorageEstimator(topology=topology, constraints=constraints, **kwargs)

    def estimate(self, sharding_options: List[ShardingOption],
                 sharder_data_map: Optional[SharderDataMap] = None) -> None:
        others = [o for o in sharding_options if not _is_tt(o)]
        if others:
            self._dense.estimate(others, sharder_data_map)
        on_gpu = self._topology.compute_device == "cuda"
        for option in sharding_options:
            if not _is_tt(option):
                continue
            table = _tt_table(option)
            batch = option.batch_size * (self._topology.world_size
                                         if option.sharding_type == ShardingType.TABLE_WISE.value else 1)
            activations = int(batch * (_pooling_factor(option, self._constraints) * _INDEX_BYTES
                                       + option.num_inputs * table.embedding_dim * 4 * 2))
            total = table.tt_bytes(include_optimizer_state=True) + activations
            for shard in option.shards:
                shard.storage = Storage(hbm=total if on_gpu else 0, ddr=0 if on_gpu else total)


class TTPerfEstimator(ShardEstimator):
    """Coarse wall-time model for TT options; others: TorchRec's ``EmbeddingPerfEstimator``."""

    def __init__(self, topology: Topology, constraints: Optional[Dict[str, ParameterConstraints]] = None,
                 flops_per_second: Optional[float] = None, **kwargs) -> None:
        self._topology = topology
        self._constraints = constraints
        self._flops = flops_per_second or (50e12 if topology.compute_device == "cuda" else 100e9)
        self._dense = EmbeddingPerfEstimator(topology=topology, constraints=constraints, **kwargs)

    def estimate(self, sharding_options: List[ShardingOption],
                 sharder_data_map: Optional[SharderDataMap] = None) -> None:
        others = [o for o in sharding_options if not _is_tt(o)]
        if others:
            self._dense.estimate(others, sharder_data_map)
        world = self._topology.world_size
        bw = self._topology.inter_host_bw if world > self._topology.local_world_size else \
            self._topology.intra_host_bw
        bw = max(float(bw), 1.0)
        for option in sharding_options:
            if not _is_tt(option):
                continue
            table = _tt_table(option)
            rows = option.batch_size * _pooling_factor(option, self._constraints)
            dp = option.sharding_type == ShardingType.DATA_PARALLEL.value
            rows_here = rows if dp else rows * world  # a table-wise owner serves every rank's batch
            fwd = rows_here * _tt_flops_per_row(table) / self._flops
            out_bytes = option.batch_size * world * table.embedding_dim * option.num_inputs * 4
            in_bytes = rows * world * _INDEX_BYTES
            fwd_comms = 0.0 if dp else out_bytes / bw
            bwd_comms = (2.0 * table.tt_bytes(False) / bw) if dp else out_bytes / bw
            for shard in option.shards:
                shard.perf = Perf(fwd_compute=fwd, fwd_comms=fwd_comms, bwd_compute=2.0 * fwd,
                                  bwd_comms=bwd_comms, input_dist_comms=0.0 if dp else in_bytes / bw)


def tt_estimators(topology: Topology, constraints: Optional[Dict[str, ParameterConstraints]] = None,
                  ) -> List[ShardEstimator]:
    """``[perf, storage]`` for ``EmbeddingEnumerator(..., estimator=...)``."""
    return [TTPerfEstimator(topology, constraints), TTStorageEstimator(topology, constraints)]
