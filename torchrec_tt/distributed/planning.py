"""One-call planning for models with ``TTEmbeddingBagCollection`` s: sharders, constraints, planner."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.stats import EmbeddingStats
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ModuleSharder, ShardingPlan, ShardingType
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from ..config import TTEmbeddingBagConfig
from ..in_backward import resolve_tt_config
from ..modules.tt_embedding_bag_collection import TTEmbeddingBagCollection
from ..planner.estimators import tt_estimators
from ..planner.report import TTStats
from .mean_pooling_guard import MeanPoolingCheckedEBCSharder, mean_pooling_constraints
from .tt_embedding_bag_collection import TT_COMPUTE_KERNEL, TT_SHARDING_TYPES, TTEmbeddingBagCollectionSharder

__all__ = ["get_sharders_and_planner", "shard_model", "tt_constraints"]


def _collections(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``(path, module)`` of the model's TT collections and of its stock EBCs that are not a TT collection's
    dense child (TorchRec shards that child as part of its parent)."""
    children = {id(m.dense) for m in model.modules() if isinstance(m, TTEmbeddingBagCollection)}
    return [(path, m) for path, m in model.named_modules()
            if isinstance(m, TTEmbeddingBagCollection)
            or (isinstance(m, EmbeddingBagCollection) and id(m) not in children)]


def _tables(model_or_tables: Union[nn.Module, Sequence[EmbeddingBagConfig]]) -> List[EmbeddingBagConfig]:
    """The model's table configs, TT ones with the fused optimizer they train with (their own or
    ``apply_optimizer_in_backward``'s: such tables are placed table-wise)."""
    if not isinstance(model_or_tables, nn.Module):
        return list(model_or_tables)
    out: List[EmbeddingBagConfig] = []
    for path, m in _collections(model_or_tables):
        for t in m.embedding_bag_configs():
            if isinstance(m, TTEmbeddingBagCollection) and isinstance(t, TTEmbeddingBagConfig):
                t = resolve_tt_config(t, m.tt_tables[t.name])
            elif isinstance(t, TTEmbeddingBagConfig):  # the stock EBC reads it as a plain config
                raise ValueError(
                    f"table '{t.name}': a TTEmbeddingBagConfig in torchrec's EmbeddingBagCollection "
                    f"(module '{path}') is stored dense ({t.num_embeddings} x {t.embedding_dim}); "
                    "build that collection as a TTEmbeddingBagCollection")
            out.append(t)
    return out


def _dense_groups(model_or_tables: Union[nn.Module, Sequence[EmbeddingBagConfig]]) -> List[List[EmbeddingBagConfig]]:
    """The dense tables of each EBC that TorchRec will shard as one module (a TT collection's dense child,
    a stock EBC); a table list counts as one collection."""
    if not isinstance(model_or_tables, nn.Module):
        return [[t for t in model_or_tables if not isinstance(t, TTEmbeddingBagConfig)]]
    return [m.dense_configs() if isinstance(m, TTEmbeddingBagCollection) else list(m.embedding_bag_configs())
            for _, m in _collections(model_or_tables)]


def tt_constraints(tables: Sequence[EmbeddingBagConfig], world_size: int,
                   constraints: Optional[Dict[str, ParameterConstraints]] = None,
                   ) -> Dict[str, ParameterConstraints]:
    """User constraints completed so that TT tables plan only as data_parallel/table_wise with
    ``customized_kernel`` (table_wise only when the table has a fused optimizer) and dense tables never
    get ``customized_kernel``."""
    out = dict(constraints or {})
    for t in tables:
        c = out.get(t.name) or ParameterConstraints()
        if isinstance(t, TTEmbeddingBagConfig):
            allowed = [s for s in TT_SHARDING_TYPES
                       if not (s == ShardingType.DATA_PARALLEL.value and t.optimizer is not None)]
            if c.sharding_types:
                bad = [s for s in c.sharding_types if s not in allowed]
                if bad:
                    raise ValueError(f"TT table '{t.name}': sharding types {bad} not supported; use {allowed}")
                allowed = list(c.sharding_types)
            c = dataclasses.replace(c, sharding_types=allowed, compute_kernels=[TT_COMPUTE_KERNEL])
        else:
            kernels = c.compute_kernels or ["dense", "fused"]
            if TT_COMPUTE_KERNEL in kernels:
                raise ValueError(f"dense table '{t.name}' cannot use {TT_COMPUTE_KERNEL!r}")
            c = dataclasses.replace(c, compute_kernels=list(kernels))
        out[t.name] = c
    return out


def get_sharders_and_planner(
    model_or_tables: Union[nn.Module, Sequence[EmbeddingBagConfig]],
    world_size: int,
    batch_size: int,
    *,
    compute_device: str = "cpu",
    local_world_size: Optional[int] = None,
    constraints: Optional[Dict[str, ParameterConstraints]] = None,
    fused_params: Optional[Dict[str, Any]] = None,
    topology: Optional[Topology] = None,
    estimator_kwargs: Optional[Dict[str, Any]] = None,
    **planner_kwargs: Any,
) -> Tuple[List[ModuleSharder[nn.Module]], EmbeddingShardingPlanner]:
    """Sharders (TT collection + stock EBC) and a planner with TT estimators and constraints.

    ``fused_params`` go to TorchRec's EBC sharder for the dense tables (e.g.
    ``{"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.1}``); TT tables take their fused
    optimizer from their config. Use ``planner.collective_plan(model, sharders, pg)`` and pass the plan
    to ``DistributedModelParallel(..., plan=plan, sharders=sharders)`` (or call ``shard_model``).
    ``estimator_kwargs`` go to ``tt_estimators`` (e.g. ``unique_ratio``, ``flops_per_second``,
    ``autograd_optimizer_factor``); other keyword arguments to ``EmbeddingShardingPlanner`` (e.g.
    ``storage_reservation``). The planner logs TorchRec's stats table and a TT table (real TT bytes).
    """
    tables = _tables(model_or_tables)
    names = [t.name for t in tables]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"table names must be unique across the model (planner constraints are keyed by "
                         f"name); duplicated: {dup}")
    topology = topology or Topology(world_size=world_size, compute_device=compute_device,
                                    local_world_size=local_world_size or world_size)
    ebc_sharder = MeanPoolingCheckedEBCSharder(fused_params=fused_params)
    tt_sharder = TTEmbeddingBagCollectionSharder(dense_sharder=ebc_sharder)
    sharders: List[ModuleSharder[nn.Module]] = [tt_sharder, ebc_sharder]  # type: ignore[list-item]
    # MEAN dense tables of mixed collections stay off row-wise types (a TorchRec bug: mean_pooling_guard)
    dense_types = tt_sharder.dense_sharding_types(topology.compute_device)
    cons = mean_pooling_constraints(_dense_groups(model_or_tables), dense_types,
                                    tt_constraints(tables, world_size, constraints))
    enumerator = EmbeddingEnumerator(topology=topology, batch_size=batch_size, constraints=cons,
                                     estimator=tt_estimators(topology, cons, **(estimator_kwargs or {})))
    planner_kwargs.setdefault("stats", [EmbeddingStats(), TTStats()])
    planner = EmbeddingShardingPlanner(topology=topology, batch_size=batch_size, constraints=cons,
                                       enumerator=enumerator, **planner_kwargs)
    return sharders, planner


def shard_model(model: nn.Module, batch_size: int, *, device: Optional[torch.device] = None,
                pg: Optional[dist.ProcessGroup] = None, plan: Optional[ShardingPlan] = None,
                **planner_kwargs: Any) -> DistributedModelParallel:
    """Plan (collectively) and wrap ``model`` in ``DistributedModelParallel``; ``dmp.plan`` holds the plan."""
    pg = pg or dist.GroupMember.WORLD
    world_size = dist.get_world_size(pg)
    device = device or torch.device("cpu")
    sharders, planner = get_sharders_and_planner(model, world_size, batch_size, compute_device=device.type,
                                                 **planner_kwargs)
    if plan is None:
        plan = planner.collective_plan(model, sharders, pg)
    return DistributedModelParallel(model, device=device, plan=plan, sharders=sharders)
