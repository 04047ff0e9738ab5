"""A guard against a TorchRec 1.8.0 bug that gives wrong outputs without an error.

When an ``EmbeddingBagCollection`` shards a MEAN-pooled table row-wise (or table-row-wise), TorchRec
pools those shards by sum and divides the whole output by a per-feature divisor afterwards. That
divisor is 1 only for the row-wise SUM features: every table of the same collection sharded any other
way (table-wise, column-wise, data-parallel) is divided by its bag lengths too, SUM tables mean-pooled
and MEAN tables divided twice (``ShardedEmbeddingBagCollection._create_mean_pooling_divisor``). Plans
are fine when all or none of a collection's tables are row-wise, or when no row-wise table is MEAN.

The planner helpers keep MEAN tables of mixed collections off row-wise types unless constrained
(``mean_pooling_constraints``); a plan that still mixes them is refused at sharding time
(``check_mean_pooling_plan``), for the TT collection's dense tables and for stock EBCs sharded with
``MeanPoolingCheckedEBCSharder``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Sequence

from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ParameterSharding, ShardingType
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType

__all__ = ["MeanPoolingCheckedEBCSharder", "check_mean_pooling_plan", "mean_pooling_constraints"]

ROW_WISE_TYPES = (ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value)


def check_mean_pooling_plan(configs: Sequence[EmbeddingBagConfig], plan: Dict[str, ParameterSharding],
                            module: str = "") -> None:
    """Refuse a plan of one EBC's ``configs`` that TorchRec would pool wrongly (see the module docstring)."""
    placed = [(t, plan[t.name].sharding_type) for t in configs if t.name in plan]
    mean_rw = [t.name for t, s in placed if s in ROW_WISE_TYPES and t.pooling == PoolingType.MEAN]
    others = [f"{t.name} ({s})" for t, s in placed if s not in ROW_WISE_TYPES]
    if mean_rw and others:
        raise ValueError(
            f"EmbeddingBagCollection '{module}': MEAN-pooled table(s) {mean_rw} are sharded row-wise next to "
            f"{others}; TorchRec 1.8.0 then divides those tables' outputs by their bag lengths (wrong results, no "
            "error). Shard the MEAN tables another way (table_wise, column_wise, data_parallel) or all of this "
            "collection's tables row-wise")


def mean_pooling_constraints(groups: Sequence[Sequence[EmbeddingBagConfig]], sharding_types: Sequence[str],
                             constraints: Dict[str, ParameterConstraints]) -> Dict[str, ParameterConstraints]:
    """``constraints`` with the MEAN tables of every mixed group (an EBC with other tables too) kept to
    ``sharding_types`` minus the row-wise ones, unless the user constrained their types already."""
    out = dict(constraints)
    allowed = [s for s in sharding_types if s not in ROW_WISE_TYPES]
    for group in groups:
        if len(group) < 2:
            continue
        for t in group:
            c = out.get(t.name) or ParameterConstraints()
            if t.pooling == PoolingType.MEAN and not c.sharding_types:
                out[t.name] = dataclasses.replace(c, sharding_types=list(allowed))
    return out


class MeanPoolingCheckedEBCSharder(EmbeddingBagCollectionSharder):
    """TorchRec's ``EmbeddingBagCollectionSharder`` that refuses plans its sharded EBC would pool wrongly."""

    def shard(self, module: Any, params: Dict[str, ParameterSharding], env: Any, device: Optional[Any] = None,
              module_fqn: Optional[str] = None) -> Any:
        check_mean_pooling_plan(module.embedding_bag_configs(), params, module_fqn or "")
        return super().shard(module, params, env, device, module_fqn)
