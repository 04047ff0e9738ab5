"""TT-aware shard estimators for TorchRec's planner (``torchrec_tt.planner.estimators``).

TorchRec's default estimators raise for ``compute_kernel="customized_kernel"`` and, even if they did not,
would size a TT table by its dense-equivalent proxy ``[N, D]``. These estimators size TT options from the
table's real geometry and hand every other option to TorchRec's own estimators. TorchRec 1.8.0's
``EmbeddingShardingPlanner`` takes them through the enumerator (the list replaces both defaults)::

    enumerator = EmbeddingEnumerator(topology, batch_size, constraints,
                                     estimator=tt_estimators(topology, constraints))
    planner = EmbeddingShardingPlanner(topology=topology, batch_size=batch_size,
                                       constraints=constraints, enumerator=enumerator)

Storage of a TT option (per rank that holds it): cores + dense core gradients (autograd mode; DMP's DDP
uses ``gradient_as_bucket_view`` so there is one copy) or fused optimizer state (Adagrad: like the cores;
row-wise Adagrad: one float per core slice) + the hot-row cache (``tt_cache_bytes``) + TorchRec's IO
buffers for the sharding type (ids in, pooled rows out; table-wise serves every rank's batch).

Perf of a TT option: compute = chain-product FLOPs on the rows actually rebuilt (unique ids) at a
calibrated per-device rate (``calibration.json``, see docs/planner.md); backward = 2x forward, as the
benchmark that calibrates the rate counts it. Communication: table-wise as TorchRec models its
KJT/pooled all-to-alls (TorchRec's estimator is run on a dense stand-in of the option and only its
comms are kept); data-parallel pays TorchRec's all-reduce formula on the *core* gradient bytes.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Union

from torchrec.distributed.planner.shard_estimators import EmbeddingPerfEstimator, EmbeddingStorageEstimator
from torchrec.distributed.planner.types import (
    CollectiveType,
    ParameterConstraints,
    Perf,
    Shard,
    SharderDataMap,
    ShardEstimator,
    ShardingOption,
    Storage,
    Topology,
)
from torchrec.distributed.types import ShardingPlan, ShardingType

from torchrec_tt.config import TTEmbeddingBagConfig
from torchrec_tt.in_backward import resolve_tt_config
from torchrec_tt.shapes import clip_ranks, full_ranks, suggest_p_shapes, suggest_q_shapes, tt_num_parameters

__all__ = ["TT_COMPUTE_KERNEL", "CALIBRATION_PATH", "TableBytes", "TTPerfEstimator", "TTStorageEstimator",
           "load_calibration", "per_rank_bytes", "tt_cache_bytes", "tt_estimators", "tt_flops_per_row",
           "tt_cache_rows", "tt_geometry", "tt_table_bytes", "dense_table_bytes", "io_bytes"]

TT_COMPUTE_KERNEL = "customized_kernel"
CALIBRATION_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "calibration.json")
_INDEX_BYTES = 8  # TorchRec counts ids as int64 (TBE converts int32 anyway)
_FP32 = 4


@dataclasses.dataclass
class TableBytes:
    """A byte breakdown; ``state`` (weights + optimizer + cache) is what stays allocated between steps."""

    weights: int = 0
    optimizer: int = 0
    grads: int = 0
    cache: int = 0
    io: int = 0

    @property
    def state(self) -> int:
        return self.weights + self.optimizer + self.cache

    @property
    def total(self) -> int:
        return self.state + self.grads + self.io

    def __add__(self, other: "TableBytes") -> "TableBytes":
        return TableBytes(*(getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)))


# ---- sizes ---------------------------------------------------------------------------------------------

def tt_geometry(config: TTEmbeddingBagConfig):
    """``(p_shapes, q_shapes, full ranks)`` exactly as ``TTEmbeddingBag`` builds them from the config."""
    p, q = config.tt_p_shapes, config.tt_q_shapes
    d = len(p) if p is not None else len(q) if q is not None else config.num_cores
    p = list(p) if p is not None else suggest_p_shapes(config.num_embeddings, d)
    q = list(q) if q is not None else suggest_q_shapes(config.embedding_dim, d)
    return p, q, clip_ranks(full_ranks(config.tt_ranks, d), p, q)


def tt_flops_per_row(p: Sequence[int], q: Sequence[int], ranks: Sequence[int]) -> float:
    """Forward FLOPs to rebuild one row: step k multiplies (q1..q_{k-1}) x r_{k-1} by r_{k-1} x (q_k r_k)."""
    flops, width = 0.0, q[0]
    for k in range(1, len(q)):
        flops += 2.0 * width * ranks[k] * q[k] * ranks[k + 1]
        width *= q[k]
    return flops


def tt_cache_rows(config: Any) -> int:
    """Rows of the hot-row cache a config asks for (``cache_rows`` / ``cache_fraction`` / ``cache_bytes``),
    resolved by the cache module itself when it is there, so the two never disagree."""
    rows = int(getattr(config, "cache_rows", 0) or 0)
    fraction, nbytes = getattr(config, "cache_fraction", None), getattr(config, "cache_bytes", None)
    if not rows and fraction is None and nbytes is None:
        return 0
    try:
        from torchrec_tt.modules.cache import resolve_cache_rows
    except ImportError:  # pragma: no cover - cache module absent: count cache_rows only
        return rows
    opt = config.fused_optimizer_config() if hasattr(config, "fused_optimizer_config") else None
    return resolve_cache_rows(config.name, config.num_embeddings, config.embedding_dim, _element_bytes(config),
                              opt.name if opt is not None else None, rows, fraction, nbytes)


def _element_bytes(config: Any) -> int:
    """Bytes per core / cached-row element: the config's ``data_type`` (FP32, FP16, BF16); optimizer
    state stays fp32 whatever the cores."""
    return config.core_dtype().itemsize if hasattr(config, "core_dtype") else _FP32


def tt_cache_bytes(config: Any, candidate_factor: float = 4.0) -> int:
    """Resident bytes of the hot-row cache (``TTRowCache`` layout): rows (the cores' dtype) + their fused optimizer
    state + slot ids, trained flags and float64 hit counters (17 B a row) + the frequency tracker of
    ``candidate_factor`` x R candidates (ids, counts, pending ids, steps: 32 B each) + 72 B of counters,
    plus the derived id -> slot hash map: ``2^(ceil(log2 R) + 1)`` (>= 2R) entries of 8 B."""
    rows = tt_cache_rows(config)
    if rows <= 0:
        return 0
    opt = config.fused_optimizer_config() if hasattr(config, "fused_optimizer_config") else None
    dim = config.embedding_dim
    state = {"adagrad": rows * dim * _FP32, "rowwise_adagrad": rows * _FP32}.get(opt.name if opt else "", 0)
    candidates = max(rows, int(candidate_factor * rows))
    persistent = rows * dim * _element_bytes(config) + state + rows * (_INDEX_BYTES + 1 + 8) + candidates * 4 * _INDEX_BYTES + 72
    return persistent + (1 << ((rows - 1).bit_length() + 1)) * _INDEX_BYTES


def tt_table_bytes(config: TTEmbeddingBagConfig, autograd_optimizer_factor: float = 0.0) -> TableBytes:
    """Bytes of a whole TT table. With ``optimizer=None`` the cores get dense gradients and the user's
    torch optimizer keeps ``autograd_optimizer_factor`` x cores of state (0 SGD, 1 Adagrad, 2 Adam)."""
    p, q, ranks = tt_geometry(config)
    numel, elem = tt_num_parameters(p, q, ranks), _element_bytes(config)
    cores = numel * elem
    opt = config.fused_optimizer_config()
    if opt is None:  # the cached rows are a parameter too: dense gradients (and torch-optimizer state)
        grad_bytes = cores + tt_cache_rows(config) * config.embedding_dim * elem
        optimizer, grads = int(grad_bytes * autograd_optimizer_factor), grad_bytes
    else:
        grads = 0
        optimizer = {"adagrad": numel * _FP32, "rowwise_adagrad": sum(p) * _FP32}.get(opt.name, 0)
    return TableBytes(weights=cores, optimizer=optimizer, grads=grads, cache=tt_cache_bytes(config))


# fbgemm EmbOptimType name -> (per-element, per-row) optimizer floats of a dense TBE table
_DENSE_OPT_STATE = {"EXACT_SGD": (0, 0), "SGD": (0, 0), "EXACT_ROWWISE_ADAGRAD": (0, 1), "ROWWISE_ADAGRAD": (0, 1),
                    "EXACT_ADAGRAD": (1, 0), "ADAGRAD": (1, 0), "ADAM": (2, 0), "LAMB": (2, 0),
                    "PARTIAL_ROWWISE_ADAM": (1, 1), "PARTIAL_ROWWISE_LAMB": (1, 1)}


def dense_table_bytes(rows: int, cols: int, element_size: int = _FP32, optimizer: Any = None) -> TableBytes:
    """Bytes of a dense (shard of a) table under TorchRec's fused TBE with the given ``EmbOptimType``."""
    name = getattr(optimizer, "name", optimizer)
    per_elem, per_row = _DENSE_OPT_STATE.get(str(name).upper(), (0, 0)) if name is not None else (0, 0)
    return TableBytes(weights=rows * cols * element_size, optimizer=(per_elem * rows * cols + per_row * rows) * _FP32)


def io_bytes(sharding_type: str, batch_size: int, world_size: int, pooling_factors: Sequence[float],
             embedding_dim: int, output_element_size: int = _FP32) -> int:
    """TorchRec's IO-buffer model (ids in + pooled rows out); table-wise serves ``world_size`` batches."""
    inputs = sum(pf * batch_size for pf in pooling_factors)
    outputs = sum(min(1.0, pf) * batch_size for pf in pooling_factors)
    scale = world_size if sharding_type == ShardingType.TABLE_WISE.value else 1
    return math.ceil(inputs * scale * _INDEX_BYTES) + math.ceil(outputs * scale * embedding_dim * output_element_size)


# ---- calibration ---------------------------------------------------------------------------------------

def load_calibration(compute_device: str = "cpu", path: Optional[str] = None) -> Dict[str, Any]:
    """The calibration entry for ``compute_device`` (``tt_gflops``, ``unique_ratio``, provenance)."""
    with open(path or CALIBRATION_PATH) as f:
        data = json.load(f)
    if compute_device not in data:
        raise KeyError(f"no TT calibration for device {compute_device!r} in {path or CALIBRATION_PATH}; "
                       f"have {sorted(data)} (see docs/planner.md to calibrate)")
    return data[compute_device]


# ---- option helpers ------------------------------------------------------------------------------------

def _is_tt(option: ShardingOption) -> bool:
    return option.compute_kernel == TT_COMPUTE_KERNEL


def _tt_config(option: ShardingOption) -> TTEmbeddingBagConfig:
    module = option.module[1]
    configs = {t.name: t for t in module.tt_configs()} if hasattr(module, "tt_configs") else {}
    if option.name not in configs:
        raise ValueError(f"table '{option.name}': compute kernel {TT_COMPUTE_KERNEL!r} is only valid for TT "
                         f"tables of a TTEmbeddingBagCollection (module {option.path!r})")
    # with the fused optimizer it trains with (its config's or apply_optimizer_in_backward's): its state counts
    return resolve_tt_config(configs[option.name], module.tt_tables[option.name])


def _pooling_factors(option: ShardingOption, constraints: Optional[Dict[str, ParameterConstraints]]) -> List[float]:
    c = constraints.get(option.name) if constraints else None
    if c is not None and c.pooling_factors:
        return [float(x) for x in c.pooling_factors]
    return [float(x) for x in option.input_lengths] or [1.0]


def _tt_option_bytes(option: ShardingOption, world_size: int, constraints=None,
                     autograd_optimizer_factor: float = 0.0) -> TableBytes:
    config = _tt_config(option)
    b = tt_table_bytes(config, autograd_optimizer_factor)
    b.io = io_bytes(option.sharding_type, option.batch_size, world_size, _pooling_factors(option, constraints),
                    config.embedding_dim)
    return b


def _on_device(nbytes: int, compute_device: str) -> Storage:
    gpu = compute_device in ("cuda", "mtia")
    return Storage(hbm=nbytes if gpu else 0, ddr=0 if gpu else nbytes)


class TTStorageEstimator(ShardEstimator):
    """Real TT bytes for TT options (see module docstring); TorchRec's estimate for all others."""

    def __init__(self, topology: Topology, constraints: Optional[Dict[str, ParameterConstraints]] = None,
                 autograd_optimizer_factor: float = 0.0, **kwargs: Any) -> None:
        self._topology = topology
        self._constraints = constraints
        self._factor = autograd_optimizer_factor
        self._dense = EmbeddingStorageEstimator(topology=topology, constraints=constraints, **kwargs)

    def estimate(self, sharding_options: List[ShardingOption],
                 sharder_data_map: Optional[SharderDataMap] = None) -> None:
        others = [o for o in sharding_options if not _is_tt(o)]
        if others:
            self._dense.estimate(others, sharder_data_map)
        for option in sharding_options:
            if _is_tt(option):
                total = _tt_option_bytes(option, self._topology.world_size, self._constraints, self._factor).total
                for shard in option.shards:
                    shard.storage = _on_device(total, self._topology.compute_device)


class TTPerfEstimator(ShardEstimator):
    """FLOP-based compute and TorchRec-modelled comms for TT options; TorchRec's estimate for others.

    ``flops_per_second`` overrides the calibrated rate; ``unique_ratio`` (a float, or per table name) is the
    expected fraction of looked-up ids that are distinct in a batch (default: the calibration run's).
    """

    def __init__(self, topology: Topology, constraints: Optional[Dict[str, ParameterConstraints]] = None,
                 flops_per_second: Optional[float] = None,
                 unique_ratio: Union[None, float, Dict[str, float]] = None,
                 calibration_path: Optional[str] = None, **kwargs: Any) -> None:
        self._topology = topology
        self._constraints = constraints
        cal: Dict[str, Any] = {}
        if flops_per_second is None or unique_ratio is None:
            cal = load_calibration(topology.compute_device, calibration_path)
        self._flops = float(flops_per_second or cal["tt_gflops"] * 1e9)
        self._unique = unique_ratio if unique_ratio is not None else float(cal.get("unique_ratio", 1.0))
        self._dense = EmbeddingPerfEstimator(topology=topology, constraints=constraints, **kwargs)

    def _unique_ratio(self, name: str) -> float:
        return float(self._unique.get(name, 1.0) if isinstance(self._unique, dict) else self._unique)

    def _table_wise_comms(self, option: ShardingOption, sharder_data_map: Optional[SharderDataMap]) -> List[Perf]:
        """TorchRec's own TW comms: estimate a dense stand-in of the option and keep only its comms."""
        proxy = copy.copy(option)
        proxy.compute_kernel = "fused"
        proxy.shards = [Shard(size=list(s.size), offset=list(s.offset), rank=s.rank) for s in option.shards]
        self._dense.estimate([proxy], sharder_data_map)
        return [s.perf for s in proxy.shards]

    def estimate(self, sharding_options: List[ShardingOption],
                 sharder_data_map: Optional[SharderDataMap] = None) -> None:
        others = [o for o in sharding_options if not _is_tt(o)]
        if others:
            self._dense.estimate(others, sharder_data_map)
        topo = self._topology
        world = topo.world_size
        for option in sharding_options:
            if not _is_tt(option):
                continue
            config = _tt_config(option)
            p, q, ranks = tt_geometry(config)
            dp = option.sharding_type == ShardingType.DATA_PARALLEL.value
            lookups = option.batch_size * sum(_pooling_factors(option, self._constraints)) * (1 if dp else world)
            rows = min(lookups * self._unique_ratio(option.name), float(config.num_embeddings))
            fwd = rows * tt_flops_per_row(p, q, ranks) / self._flops
            if dp:
                # TorchRec's DP all-reduce formula, on the core gradient bytes instead of N x D
                grad_bytes = tt_table_bytes(config).weights
                nodes = min(world / topo.local_world_size, 2)
                bw = topo.comms_bandwidths.get_bw(world_size=world, local_world_size=topo.intra_group_size,
                                                  collective_type=CollectiveType.ALL_REDUCE)
                allreduce = grad_bytes * (2 * nodes - 1) / nodes / bw if world > 1 and bw > 0 else 0.0
                comms = [Perf(fwd_compute=0.0, fwd_comms=0.0, bwd_compute=0.0, bwd_comms=allreduce)
                         for _ in option.shards]
            else:
                comms = self._table_wise_comms(option, sharder_data_map)
            for shard, c in zip(option.shards, comms):
                shard.perf = Perf(fwd_compute=fwd, fwd_comms=c.fwd_comms, bwd_compute=2.0 * fwd,
                                  bwd_comms=c.bwd_comms, input_dist_comms=c.input_dist_comms)


def tt_estimators(topology: Topology, constraints: Optional[Dict[str, ParameterConstraints]] = None,
                  **kwargs: Any) -> List[ShardEstimator]:
    """``[perf, storage]`` for ``EmbeddingEnumerator(..., estimator=...)``. ``kwargs``: ``flops_per_second``,
    ``unique_ratio``, ``calibration_path`` (perf) and ``autograd_optimizer_factor`` (storage)."""
    perf_keys = {"flops_per_second", "unique_ratio", "calibration_path"}
    perf_kw = {k: v for k, v in kwargs.items() if k in perf_keys}
    storage_kw = {k: v for k, v in kwargs.items() if k not in perf_keys}
    return [TTPerfEstimator(topology, constraints, **perf_kw), TTStorageEstimator(topology, constraints, **storage_kw)]


# ---- per-rank accounting -------------------------------------------------------------------------------

def _spec_shards(ps, world_size: int):
    """(rank, rows, cols) of each shard a ParameterSharding places."""
    spec = getattr(ps, "sharding_spec", None)
    if spec is not None and getattr(spec, "shards", None):
        for md in spec.shards:
            yield md.placement.rank(), md.shard_sizes[0], md.shard_sizes[1]
    elif ps.sharding_type == ShardingType.DATA_PARALLEL.value:
        for r in range(world_size):
            yield r, None, None
    else:
        for r in ps.ranks or []:
            yield r, None, None


def per_rank_bytes(plan_or_options: Union[ShardingPlan, Sequence[ShardingOption]],
                   tables: Optional[Sequence[Any]] = None, *, world_size: Optional[int] = None,
                   batch_size: Optional[int] = None, fused_params: Optional[Dict[str, Any]] = None,
                   autograd_optimizer_factor: float = 0.0) -> List[TableBytes]:
    """Bytes per rank of the embedding tables, TT tables at their real size.

    From the planner's sharding options (``planner._best_plan``): TT options are broken down by
    ``tt_table_bytes`` + IO; dense options count their shard weights and put the rest of TorchRec's
    estimate under ``io``. From a ``ShardingPlan``: pass ``tables`` (the configs) and ``world_size``;
    dense shards count weights and the fused optimizer state of ``fused_params["optimizer"]``, IO only
    when ``batch_size`` is given (pooling factor 1).
    """
    if isinstance(plan_or_options, ShardingPlan):
        if tables is None or world_size is None:
            raise ValueError("per_rank_bytes(plan): pass tables= and world_size=")
        by_name = {t.name: t for t in tables}
        out = [TableBytes() for _ in range(world_size)]
        opt = (fused_params or {}).get("optimizer")
        for module_plan in plan_or_options.plan.values():
            for name, ps in module_plan.items():  # type: ignore[union-attr]
                t = by_name[name]
                for rank, rows, cols in _spec_shards(ps, world_size):
                    if isinstance(t, TTEmbeddingBagConfig):
                        b = tt_table_bytes(t, autograd_optimizer_factor)
                    else:
                        b = dense_table_bytes(rows if rows is not None else t.num_embeddings,
                                              cols if cols is not None else t.embedding_dim,
                                              optimizer=None if ps.compute_kernel == "dense" else opt)
                    if batch_size:
                        dim = cols if cols is not None else t.embedding_dim
                        b.io = io_bytes(ps.sharding_type, batch_size, world_size, [1.0] * len(t.feature_names), dim)
                    out[rank] = out[rank] + b
        return out
    options = list(plan_or_options)
    ranks = [s.rank for o in options for s in o.shards if s.rank is not None]
    n = world_size or (max(ranks) + 1 if ranks else 0)
    out = [TableBytes() for _ in range(n)]
    for o in options:
        for s in o.shards:
            if s.rank is None:
                continue
            if _is_tt(o):
                b = _tt_option_bytes(o, n, None, autograd_optimizer_factor)
            else:
                w = math.prod(s.size) * o.tensor.element_size()
                total = (s.storage.hbm + s.storage.ddr) if s.storage is not None else w
                b = TableBytes(weights=w, io=max(0, total - w))
            out[s.rank] = out[s.rank] + b
    return out
