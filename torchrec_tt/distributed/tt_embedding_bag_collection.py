"""Sharding of ``TTEmbeddingBagCollection`` under TorchRec's ``DistributedModelParallel``.

``TTEmbeddingBagCollectionSharder`` plans and shards the whole collection:

* dense tables (the ``dense`` child ``EmbeddingBagCollection``) are handed to TorchRec's own
  ``EmbeddingBagCollectionSharder`` with their part of the plan (any sharding type it supports);
* TT tables are planned as one meta proxy ``[N, D]`` per table with compute kernel
  ``"customized_kernel"`` and placed

  - ``data_parallel``: every rank holds the cores and looks up its own batch; the cores are *not*
    reported as sharded parameters, so DMP's DDP wrapper all-reduces (averages) their gradients.
    Fused optimizers are refused here (each rank would update with its local gradient only).
  - ``table_wise``: the whole table lives on one rank. Its features go there through TorchRec's
    ``KJTAllToAll``; pooled rows come back through ``PooledEmbeddingsAllToAll`` (whose backward
    divides by world size, as DDP averages, so both placements train identically). In
    ``state_dict`` the cores (and fused optimizer state) are ``ShardedTensor`` s with one shard on the
    owner, under the unsharded FQNs, so ``torch.distributed.checkpoint`` saves/loads them.

Fused-optimizer TT tables (their config's optimizer, or TorchRec's ``apply_optimizer_in_backward`` on their
cores: ``torchrec_tt.in_backward``) show up in ``fused_optimizer`` (a ``KeyedOptimizer`` whose ``step`` is a
no-op: the update happens in backward), combined with the dense child's fused optimizer, so
``dmp.fused_optimizer`` covers both.

Inputs are validated on every rank before any collective (unknown/missing feature, lengths vs values,
ids out of range naming the table), so identical bad input fails everywhere without a hang.

The stages (``input_dist`` / ``compute_and_output_dist``) have the shapes TorchRec's train pipelines
expect, so ``TrainPipelineSparseDist`` pipelines the collection (input distribution a batch ahead, the
splits all-to-alls fused with other sharded modules'), dense tables and TT tables alike.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Tuple, Type

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import (
    Shard,
    ShardedTensor,
    ShardedTensorMetadata,
    ShardMetadata,
    TensorProperties,
)
from torchrec.distributed.dist_data import KJTAllToAll, PooledEmbeddingsAllToAll
from torchrec.distributed.embedding_sharding import KJTListSplitsAwaitable
from torchrec.distributed.embedding_types import EmbeddingComputeKernel, KJTList
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.types import (
    Awaitable,
    LazyAwaitable,
    LazyNoWait,
    ModuleSharder,
    NoWait,
    ParameterSharding,
    ShardedModule,
    ShardingEnv,
    ShardingType,
)
from torchrec.distributed.utils import append_prefix
from torchrec.optim.fused import FusedOptimizerModule
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer
from torchrec.streamable import Multistreamable
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from ..config import TTEmbeddingBagConfig
from ..in_backward import resolve_tt_config
from ..modules.tt_embedding_bag import TTEmbeddingBag
from ..modules.tt_embedding_bag_collection import (
    TTEmbeddingBagCollection,
    check_kjt,
    lookup_feature,
    mark_in_backward,
    tt_module_from_config,
    _select,
)
from .mean_pooling_guard import check_mean_pooling_plan

__all__ = ["TT_COMPUTE_KERNEL", "TT_SHARDING_TYPES", "ShardedTTEmbeddingBagCollection", "TTCollectionContext",
           "TTEmbeddingBagCollectionSharder"]

TT_COMPUTE_KERNEL = EmbeddingComputeKernel.CUSTOMIZED_KERNEL.value
TT_SHARDING_TYPES = [ShardingType.DATA_PARALLEL.value, ShardingType.TABLE_WISE.value]


def _whole_on_rank(tensor: Optional[torch.Tensor], shape: torch.Size, dtype: torch.dtype, owner: int,
                   device: torch.device, pg: dist.ProcessGroup) -> ShardedTensor:
    """A ShardedTensor of ``shape`` with a single shard (all of it) on ``owner``; no collective."""
    placement = f"rank:{owner}/{device.type}" + (f":{device.index}" if device.index is not None else "")
    md = ShardMetadata(shard_offsets=[0] * len(shape), shard_sizes=list(shape), placement=placement)
    props = TensorProperties(dtype=dtype, layout=torch.strided, requires_grad=False,
                             memory_format=torch.contiguous_format, pin_memory=False)
    gmd = ShardedTensorMetadata(shards_metadata=[md], size=torch.Size(shape), tensor_properties=props)
    local = [Shard(tensor=tensor, metadata=md)] if tensor is not None else []
    return ShardedTensor._init_from_local_shards_and_global_metadata(local, gmd, process_group=pg)


class TTCollectionContext(Multistreamable):
    """Per-batch state between the stages: the dense child's context, the local batch size and how many
    of the distributed inputs are the dense child's. ``sharding_contexts`` exposes the child's, so
    TorchRec's awaitables record the dense all-to-all splits where the child reads them."""

    def __init__(self, dense_ctx: Optional[Multistreamable] = None) -> None:
        self.dense_ctx = dense_ctx
        self.batch = 0
        self.num_dense = 0

    @property
    def sharding_contexts(self) -> List[Any]:
        return getattr(self.dense_ctx, "sharding_contexts", [])

    def record_stream(self, stream: torch.Stream) -> None:
        if self.dense_ctx is not None:
            self.dense_ctx.record_stream(stream)


def _load_resolved(dst: TTEmbeddingBag, src: TTEmbeddingBag) -> None:
    """``src``'s state into ``dst``; optimizer state that only ``dst`` has (its optimizer was applied in
    backward to ``src``'s cores) keeps its fresh zeros."""
    result = dst.load_state_dict(src.state_dict(), strict=False)
    fresh = [k for k in result.missing_keys if "optimizer_state" not in k]
    if result.unexpected_keys or fresh:
        raise RuntimeError(f"table '{dst.name}': state of the unsharded table does not fit its sharded form "
                           f"(missing {fresh}, unexpected {result.unexpected_keys})")


class _TTFusedOptimizer(KeyedOptimizer):
    """Exposes fused TT tables' optimizer state by key. The update itself runs inside backward, so
    ``step`` only carries learning-rate changes (schedulers, warmup) from ``param_groups`` to the local
    tables, which apply them from the next backward on (as FBGEMM's fused optimizer does)."""

    def __init__(self, params: Dict[str, Any], state: Dict[Any, Any], param_groups: List[Dict[str, Any]],
                 tables: List[Optional[TTEmbeddingBag]]):
        super().__init__(params, state, param_groups)
        self._tables = tables  # per group: the table on this rank, or None where another rank owns it

    def zero_grad(self, set_to_none: bool = False) -> None:
        pass

    def step(self, closure: Any = None) -> None:
        for group, table in zip(self.param_groups, self._tables):
            if table is not None:
                table.optimizer.learning_rate = float(group["lr"])

    def update_hyper_parameters(self, params_dict: Dict[str, Any]) -> None:  # pragma: no cover
        pass


class ShardedTTEmbeddingBagCollection(ShardedModule[Any, Any, KeyedTensor, Any], FusedOptimizerModule):
    """The sharded form of ``TTEmbeddingBagCollection`` (see the module docstring)."""

    def __init__(self, module: TTEmbeddingBagCollection, table_name_to_parameter_sharding: Dict[str, ParameterSharding],
                 env: ShardingEnv, device: torch.device, dense_sharder: EmbeddingBagCollectionSharder,
                 module_fqn: Optional[str] = None) -> None:
        super().__init__()
        self._env = env
        self._pg = env.process_group
        self._rank, self._world = env.rank, env.world_size
        self._device = device
        self._is_weighted = module.is_weighted()
        self._configs = module.embedding_bag_configs()
        self._features = list(module._features)
        self._embedding_names = module.embedding_names()
        self._length_per_key = list(module._length_per_key)
        self._feature_names = module.feature_names()
        self._bounds = module.bounds()
        self._dense_key_map = dict(module._dense_key_map)
        self._dense_names = {t.name for t in module.dense_configs()}
        plan = table_name_to_parameter_sharding

        # ---- dense tables: TorchRec's sharder ----
        dense_plan = {n: ps for n, ps in plan.items() if n in self._dense_names}
        self.dense: Optional[nn.Module] = None
        if module.dense is not None:
            missing = self._dense_names - set(dense_plan)
            if missing:
                raise ValueError(f"no sharding plan for dense table(s) {sorted(missing)}")
            # here too, not only in MeanPoolingCheckedEBCSharder: the dense sharder may be a plain one
            check_mean_pooling_plan(module.dense_configs(), dense_plan, append_prefix(module_fqn or "", "dense"))
            self.dense = dense_sharder.shard(module.dense, dense_plan, env, device,
                                             append_prefix(module_fqn or "", "dense"))
        self._dense_features = list(dict.fromkeys(f for t, f, _ in self._features if t in self._dense_names))

        # ---- TT tables ----
        # each table's config with the fused optimizer it trains with (its own or apply_optimizer_in_backward's)
        self._tt_configs: Dict[str, TTEmbeddingBagConfig] = {
            t.name: resolve_tt_config(t, module.tt_tables[t.name]) for t in module.tt_configs()}
        self._tt_placement: Dict[str, Tuple[str, Optional[int]]] = {}
        for name, config in self._tt_configs.items():
            if name not in plan:
                raise ValueError(f"no sharding plan for TT table '{name}'")
            ps = plan[name]
            if ps.compute_kernel != TT_COMPUTE_KERNEL or ps.sharding_type not in TT_SHARDING_TYPES:
                raise ValueError(f"TT table '{name}': unsupported plan {ps.sharding_type}/{ps.compute_kernel}; "
                                 f"TT tables take {TT_SHARDING_TYPES} with compute kernel {TT_COMPUTE_KERNEL!r}")
            if ps.sharding_type == ShardingType.DATA_PARALLEL.value:
                if config.optimizer is not None:
                    raise ValueError(f"TT table '{name}': data_parallel placement cannot use a fused optimizer "
                                     f"({config.fused_optimizer_config().name}, from its config or "
                                     "apply_optimizer_in_backward; replicas would drift apart); use table_wise or "
                                     "train the cores with a dense optimizer")
                self._tt_placement[name] = (ps.sharding_type, None)
            else:
                if not ps.ranks or len(ps.ranks) != 1:
                    raise ValueError(f"TT table '{name}': table_wise needs exactly one rank, got {ps.ranks}")
                self._tt_placement[name] = (ps.sharding_type, int(ps.ranks[0]))
        local = {}
        for name, config in self._tt_configs.items():
            kind, owner = self._tt_placement[name]
            if owner is not None and owner != self._rank:
                continue
            src: TTEmbeddingBag = module.tt_tables[name]
            dst = tt_module_from_config(config, device)
            if not src.cores[0].is_meta:  # cores, fused optimizer state, hot-row cache
                _load_resolved(dst, src)
            if owner is not None and dst.cache is not None:
                dst.cache.process_group = None  # the owner sees every rank's ids: nothing to agree on
            mark_in_backward(dst)
            local[name] = dst
        self.tt_tables = nn.ModuleDict(local)

        # data-parallel slots: (table, feature, key); table-wise slots grouped by owner rank
        self._dp_slots = [s for s in self._features if self._tt_placement.get(s[0], ("", None))[0]
                          == ShardingType.DATA_PARALLEL.value]
        self._dp_features = list(dict.fromkeys(f for _, f, _ in self._dp_slots))
        self._tw_slots_by_rank: List[List[Tuple[str, str, str]]] = [[] for _ in range(self._world)]
        for s in self._features:
            placement = self._tt_placement.get(s[0])
            if placement is not None and placement[1] is not None:
                self._tw_slots_by_rank[placement[1]].append(s)
        self._tw_slots = [s for slots in self._tw_slots_by_rank for s in slots]
        dims = {t.name: t.embedding_dim for t in self._configs}
        self._tw_dims = [sum(dims[t] for t, _, _ in slots) for slots in self._tw_slots_by_rank]
        # one dtype for the pooled all-to-all on every rank (its buffers are raw bytes: a bf16 block read as
        # fp16, or fp32 as bf16, is garbage): the table-wise tables' common dtype, else fp32
        tw_dtypes = {self._tt_configs[t].core_dtype() for t, _, _ in self._tw_slots}
        self._tw_dtype = tw_dtypes.pop() if len(tw_dtypes) == 1 else torch.float32
        # communication modules are kept out of the module tree (their buffers must not reach state_dict)
        self._comms: Dict[str, nn.Module] = {}
        if self._tw_slots:
            self._comms["kjt"] = KJTAllToAll(self._pg, [len(s) for s in self._tw_slots_by_rank])
            self._comms["pooled"] = PooledEmbeddingsAllToAll(self._pg, self._tw_dims, device)

        # ShardedTensor views of table-wise state (cores, fused optimizer state, hot-row cache), built
        # once: they alias the live tensors, which are only ever updated in place. Shapes come from the resolved
        # config (the unsharded table lacks the state of an optimizer applied in backward)
        self._tw_state: Dict[str, ShardedTensor] = {}
        for name, (kind, owner) in self._tt_placement.items():
            if owner is None:
                continue
            live = self.tt_tables[name].state_dict(keep_vars=True) if name in self.tt_tables else None
            shapes = tt_module_from_config(self._tt_configs[name], torch.device("meta"))
            for key, ref in shapes.state_dict(keep_vars=True).items():
                t = live[key].detach() if live is not None else None
                self._tw_state[f"tt_tables.{name}.{key}"] = _whole_on_rank(
                    t, ref.shape, ref.dtype, owner, device, self._pg)
        self._fused = self._build_fused_optimizer()
        self.register_state_dict_post_hook(ShardedTTEmbeddingBagCollection._post_state_dict_hook)
        self.register_load_state_dict_pre_hook(ShardedTTEmbeddingBagCollection._pre_load_state_dict_hook)

    # ---- optimizer --------------------------------------------------------------------------------

    def _build_fused_optimizer(self) -> KeyedOptimizer:
        params: Dict[str, Any] = {}
        state: Dict[Any, Any] = {}
        groups: List[Dict[str, Any]] = []
        tables: List[Optional[TTEmbeddingBag]] = []
        for name, config in self._tt_configs.items():
            opt = config.fused_optimizer_config()
            if opt is None:
                continue
            group_params = []
            ncores = len(self._tw_state_keys(name, "cores"))
            for k in range(ncores):
                p = self._tw_state[f"tt_tables.{name}.cores.{k}"]
                params[f"tt_tables.{name}.cores.{k}"] = p
                group_params.append(p)
                skey = f"tt_tables.{name}.optimizer_state_{k}"
                if skey in self._tw_state:
                    state[p] = {f"{name}.{opt.name}_state_{k}": self._tw_state[skey]}
            groups.append({"params": group_params, "lr": opt.learning_rate, "eps": opt.eps,
                           "optimizer": opt.name})
            tables.append(self.tt_tables[name] if name in self.tt_tables else None)
        tt_opt = _TTFusedOptimizer(params, state, groups, tables)
        parts: List[Tuple[str, KeyedOptimizer]] = []
        if self.dense is not None and isinstance(self.dense, FusedOptimizerModule):
            parts.append(("dense", self.dense.fused_optimizer))
        parts.append(("", tt_opt))
        return CombinedOptimizer(parts)

    def _tw_state_keys(self, name: str, what: str) -> List[str]:
        prefix = f"tt_tables.{name}.{what}"
        return [k for k in self._tw_state if k.startswith(prefix)]

    @property
    def fused_optimizer(self) -> KeyedOptimizer:
        return self._fused

    # ---- state dict -------------------------------------------------------------------------------

    @staticmethod
    def _post_state_dict_hook(module: "ShardedTTEmbeddingBagCollection", state_dict: Dict[str, Any],
                              prefix: str, local_metadata: Any) -> None:
        for key, st in module._tw_state.items():
            state_dict[prefix + key] = st

    @staticmethod
    def _pre_load_state_dict_hook(module: "ShardedTTEmbeddingBagCollection", state_dict: Dict[str, Any],
                                  prefix: str, local_metadata: Any, strict: bool, missing_keys: List[str],
                                  unexpected_keys: List[str], error_msgs: List[str]) -> None:
        for key in module._tw_state:
            full = prefix + key
            if full not in state_dict:
                continue
            value = state_dict[full]
            table = key.split(".")[1]
            if table not in module.tt_tables:
                del state_dict[full]  # owned by another rank
            elif isinstance(value, ShardedTensor):
                shards = value.local_shards()
                if len(shards) != 1:
                    error_msgs.append(f"{full}: expected the whole table on this rank, got {len(shards)} shards")
                    del state_dict[full]
                else:
                    state_dict[full] = shards[0].tensor

    def sharded_parameter_names(self, prefix: str = "") -> Iterator[str]:
        if self.dense is not None:
            yield from self.dense.sharded_parameter_names(append_prefix(prefix, "dense"))
        for name, table in self.tt_tables.items():
            if self._tt_placement[name][1] is not None:
                for k, _ in table.named_parameters(append_prefix(prefix, f"tt_tables.{name}")):
                    yield k

    # ---- forward ----------------------------------------------------------------------------------
    # TorchRec's three stages, in the shapes its train pipelines expect: input_dist returns a
    # KJTListSplitsAwaitable whose awaitables are the dense child's input dists, then the table-wise
    # features' KJTAllToAll, then the data-parallel features (local); TrainPipelineSparseDist fuses
    # the splits all-to-alls of every such module and runs input_dist a batch ahead.

    def create_context(self) -> "TTCollectionContext":
        return TTCollectionContext(self.dense.create_context() if self.dense is not None else None)

    def input_dist(self, ctx: "TTCollectionContext", features: KeyedJaggedTensor) -> KJTListSplitsAwaitable:
        check_kjt(features, self._feature_names, self._is_weighted, self._bounds)
        if features.stride() == 0:  # before any collective; torchrec's KJT.to_dict fails on it
            raise ValueError("a KeyedJaggedTensor of no bags (batch size 0) cannot go through the sharded TT "
                             "collection (TorchRec's KJT splits fail on it): skip empty batches")
        ctx.batch = features.stride()
        awaitables: List[Any] = []
        if self.dense is not None:
            dense = self.dense.input_dist(ctx.dense_ctx, _select(features, self._dense_features))
            awaitables.extend(dense.awaitables)
            ctx.num_dense = len(dense.awaitables)
        jt = features.to_dict() if (self._dp_slots or self._tw_slots) else {}
        if self._tw_slots:
            parts = [jt[f] for _, f, _ in self._tw_slots]
            weights = torch.cat([p.weights() for p in parts]) if self._is_weighted else None
            awaitables.append(self._comms["kjt"](KeyedJaggedTensor.from_lengths_sync(
                keys=[f"{t}/{key}" for t, _, key in self._tw_slots],
                values=torch.cat([p.values() for p in parts]), lengths=torch.cat([p.lengths() for p in parts]),
                weights=weights)))
        if self._dp_slots:  # no communication: this rank's own features
            awaitables.append(NoWait(NoWait(_select(features, self._dp_features))))
        return KJTListSplitsAwaitable(awaitables, ctx)

    def compute(self, ctx: "TTCollectionContext", dist_input: KJTList) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        n = ctx.num_dense
        if self.dense is not None:
            out["dense"] = self.dense.compute_and_output_dist(ctx.dense_ctx, KJTList(dist_input.features[:n]))
        if self._tw_slots:
            mine = self._tw_slots_by_rank[self._rank]
            if mine:
                jt = dist_input[n].to_dict()
                local = torch.cat([self._lookup(t, jt[f"{t}/{key}"]).to(self._tw_dtype) for t, _, key in mine], dim=1)
            else:  # no local table-wise table: still take part (with a graph node) in both all-to-alls
                local = torch.zeros(ctx.batch * self._world, 0, device=self._device, dtype=self._tw_dtype,
                                    requires_grad=True)
            out["tw"] = local
        jt = dist_input[-1].to_dict() if self._dp_slots else {}  # the data-parallel features come last
        out["dp"] = {key: self._lookup(t, jt[f]) for t, f, key in self._dp_slots}
        return out

    def _lookup(self, table: str, jt) -> torch.Tensor:
        return lookup_feature(self.tt_tables[table], jt, self._is_weighted)

    def output_dist(self, ctx: "TTCollectionContext", output: Dict[str, Any]) -> LazyAwaitable[KeyedTensor]:
        pooled: Dict[str, torch.Tensor] = {}
        if self.dense is not None:
            kt = output["dense"]
            kt = kt.wait() if isinstance(kt, Awaitable) else kt
            pooled.update({self._dense_key_map[k]: v for k, v in kt.to_dict().items()})
        pooled.update(output["dp"])
        if self._tw_slots:
            received = self._comms["pooled"](output["tw"]).wait()
            dims = {t.name: t.embedding_dim for t in self._configs}
            offset = 0
            for _, (t, _, key) in enumerate(self._tw_slots):
                pooled[key] = received[:, offset:offset + dims[t]]
                offset += dims[t]
        values = torch.cat([pooled[k] for k in self._embedding_names], dim=1)
        return LazyNoWait(KeyedTensor(keys=list(self._embedding_names), values=values,
                                      length_per_key=list(self._length_per_key)))

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:  # type: ignore[override]
        ctx = self.create_context()
        dist_input = self.input_dist(ctx, features).wait().wait()
        return self.compute_and_output_dist(ctx, dist_input).wait()

    @property
    def unsharded_module_type(self) -> Type[TTEmbeddingBagCollection]:
        return TTEmbeddingBagCollection

    def plan_summary(self) -> Dict[str, str]:
        """table -> placement, e.g. ``{"big": "table_wise@rank1", "users": "data_parallel"}``."""
        return {n: k if r is None else f"{k}@rank{r}" for n, (k, r) in self._tt_placement.items()}


class TTEmbeddingBagCollectionSharder(ModuleSharder[TTEmbeddingBagCollection]):
    """``ModuleSharder`` for ``TTEmbeddingBagCollection`` (TT tables: data_parallel / table_wise;
    dense tables: delegated to ``dense_sharder``, by default ``EmbeddingBagCollectionSharder(fused_params)``).

    Plan with TT-aware estimators (``torchrec_tt.planner.estimators``) and per-table constraints that
    keep TT tables on ``customized_kernel`` and dense tables off it; ``get_sharders_and_planner`` builds
    all of that.
    """

    def __init__(self, dense_sharder: Optional[EmbeddingBagCollectionSharder] = None,
                 fused_params: Optional[Dict[str, Any]] = None, qcomm_codecs_registry=None) -> None:
        super().__init__(qcomm_codecs_registry)
        self._dense_sharder = dense_sharder or EmbeddingBagCollectionSharder(
            fused_params=fused_params, qcomm_codecs_registry=qcomm_codecs_registry)

    @property
    def dense_sharder(self) -> EmbeddingBagCollectionSharder:
        return self._dense_sharder

    @property
    def fused_params(self) -> Optional[Dict[str, Any]]:
        return self._dense_sharder.fused_params

    @property
    def module_type(self) -> Type[TTEmbeddingBagCollection]:
        return TTEmbeddingBagCollection

    def shardable_parameters(self, module: TTEmbeddingBagCollection) -> Dict[str, nn.Parameter]:
        params: Dict[str, nn.Parameter] = {}
        if module.dense is not None:
            params.update(self._dense_sharder.shardable_parameters(module.dense))
        for t in module.tt_configs():
            # a meta proxy of the dense shape: the planner treats it as a table; estimators read real TT bytes
            params[t.name] = nn.Parameter(torch.empty(t.num_embeddings, t.embedding_dim, device="meta"),
                                          requires_grad=False)
        return params

    def dense_sharding_types(self, compute_device_type: str) -> List[str]:
        types = list(self._dense_sharder.sharding_types(compute_device_type))
        # TorchRec 1.8.0 lists row_wise for cuda only, but its CPU/gloo row-wise path works
        # (tests/test_distributed.py); offer it so CPU runs can exercise it.
        if compute_device_type == "cpu" and ShardingType.ROW_WISE.value not in types:
            types.append(ShardingType.ROW_WISE.value)
        return types

    def sharding_types(self, compute_device_type: str) -> List[str]:
        types = self.dense_sharding_types(compute_device_type)
        return types + [t for t in TT_SHARDING_TYPES if t not in types]

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> List[str]:
        kernels: List[str] = []
        if sharding_type in self.dense_sharding_types(compute_device_type):
            kernels += self._dense_sharder.compute_kernels(sharding_type, compute_device_type)
        if sharding_type in TT_SHARDING_TYPES:
            kernels.append(TT_COMPUTE_KERNEL)
        return kernels

    def shard(self, module: TTEmbeddingBagCollection, params: Dict[str, ParameterSharding], env: ShardingEnv,
              device: Optional[torch.device] = None, module_fqn: Optional[str] = None,
              ) -> ShardedTTEmbeddingBagCollection:
        return ShardedTTEmbeddingBagCollection(module, params, env, device or torch.device("cpu"),
                                               self._dense_sharder, module_fqn)
