"""``TTEmbeddingBagCollection``: ``torchrec.EmbeddingBagCollection`` with TT-compressed tables mixed in."""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, get_embedding_names_by_table
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from .. import ops
from ..config import TTEmbeddingBagConfig
from ..decomposition import tt_svd
from ..in_backward import mark_fused_in_backward
from .tt_embedding_bag import TTEmbeddingBag

__all__ = ["TTEmbeddingBagCollection", "check_kjt", "tt_module_from_config", "mark_in_backward"]

_POOLING = {PoolingType.SUM: "sum", PoolingType.MEAN: "mean"}


def tt_module_from_config(config: TTEmbeddingBagConfig, device: Optional[torch.device] = None) -> TTEmbeddingBag:
    """Build the ``TTEmbeddingBag`` a ``TTEmbeddingBagConfig`` describes (KJT offsets convention)."""
    if config.pooling not in _POOLING:
        raise ValueError(f"table '{config.name}': TT tables support SUM and MEAN pooling, got {config.pooling}")
    table = TTEmbeddingBag(
        config.num_embeddings, config.embedding_dim, config.tt_ranks, config.tt_p_shapes, config.tt_q_shapes,
        num_cores=config.num_cores, mode=_POOLING[config.pooling], include_last_offset=True,
        weights_init=config.weights_init, optimizer=config.fused_optimizer_config(),
        bounds_check_mode=config.bounds_check_mode, name=config.name, device=device,
        dtype=config.core_dtype(), **config.cache_kwargs())
    mark_in_backward(table)
    return table


def _tt_svd_config(config: TTEmbeddingBagConfig, weight: torch.Tensor
                   ) -> Tuple[TTEmbeddingBagConfig, List[torch.Tensor], float]:
    """TT-SVD of ``weight`` at ``config``'s shapes: the config with the ranks the data kept, the cores (in
    ``config``'s dtype) and the relative error."""
    shapes = tt_module_from_config(config, torch.device("meta"))  # the shapes the config resolves to
    cores, error = tt_svd(weight.detach().float(), shapes.p_shapes, shapes.q_shapes, shapes.ranks[1:-1])
    ranks = [int(c.shape[3]) for c in cores[:-1]]
    config = dataclasses.replace(config, tt_ranks=ranks, tt_p_shapes=list(shapes.p_shapes),
                                 tt_q_shapes=list(shapes.q_shapes))
    return config, [c.to(config.core_dtype()) for c in cores], error


def lookup_feature(table: TTEmbeddingBag, feature, weighted: bool) -> torch.Tensor:
    """``table`` pooled over one feature's JaggedTensor. KJT weights are fp32 whatever the table's
    dtype (FBGEMM's TBE takes them so with fp16 tables); the op wants them in the cores' dtype."""
    weights = feature.weights().to(table.core_list()[0].dtype) if weighted else None
    return table(feature.values(), feature.offsets(), weights)


def mark_in_backward(table: TTEmbeddingBag) -> None:
    """Mark the cores of a fused-optimizer table with TorchRec's in-backward convention, so
    ``torchrec.optim.optimizers.in_backward_optimizer_filter`` keeps them out of dense optimizers."""
    if table.optimizer is not None:
        cached = [table.cache.weight] if table.cache is not None else []
        for param in list(table.cores) + cached:
            mark_fused_in_backward(param, table.name, table.optimizer)


def check_kjt(features: KeyedJaggedTensor, feature_names: Sequence[str], is_weighted: bool,
              bounds: Dict[str, Tuple[str, int, bool]]) -> None:
    """Validate a KJT before any lookup or collective, so every rank fails the same way.

    ``bounds`` maps a feature to ``(table name, num_embeddings, fatal)``; ids are range-checked only
    where ``fatal`` (TT tables in warn/ignore mode drop bad ids in the op instead), and neither ids nor
    weights (NaN / infinity) at all for features missing from it (the TT op checks its own).
    """
    if isinstance(features, torch.fx.Proxy):  # its ids are checked and its tables looked up in Python
        raise TypeError("TT collections cannot be traced symbolically by torch.fx: trace them as leaf modules, "
                        "torchrec.fx.symbolic_trace(model, leaf_modules=['TTEmbeddingBagCollection']), or use "
                        "torch.export (examples/dlrm/export.py)")
    if not isinstance(features, KeyedJaggedTensor):
        raise TypeError(f"expected a KeyedJaggedTensor, got {type(features).__name__}")
    keys = features.keys()
    expected = set(feature_names)
    unknown = [k for k in keys if k not in expected]
    if unknown:
        raise ValueError(f"unknown feature(s) {unknown} in the KeyedJaggedTensor; this collection expects "
                         f"{list(feature_names)}")
    missing = [f for f in feature_names if f not in set(keys)]
    if missing:
        raise ValueError(f"feature(s) {missing} missing from the KeyedJaggedTensor (got {list(keys)})")
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate feature names in the KeyedJaggedTensor: {list(keys)}")
    if features.variable_stride_per_key():
        raise ValueError("KeyedJaggedTensor with a batch size per feature (variable stride, VBE) is not supported: "
                         f"batch sizes {features.stride_per_key()} for {list(keys)}")
    values, lengths = features.values(), features.lengths()
    for name, t in (("values", values), ("lengths", lengths)):  # (before a dense table's own, nameless error)
        if t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"KeyedJaggedTensor {name} must be int32 or int64, got {t.dtype} (features {list(keys)})")
    weights = features.weights_or_none()
    if is_weighted and weights is None:
        raise ValueError("this collection is weighted (is_weighted=True) but the KeyedJaggedTensor has no weights")
    if weights is not None and is_weighted and not weights.is_floating_point():
        raise TypeError(f"KeyedJaggedTensor weights must be floating point, got {weights.dtype}")
    if torch.compiler.is_compiling():  # traced (torch.compile / torch.export): no value-dependent checks, as
        return                         # the stock EBC; the TT op still checks its ids when the program runs
    stride = features.stride()
    if lengths.numel() != stride * len(keys):
        raise ValueError(f"KeyedJaggedTensor lengths has {lengths.numel()} entries, expected "
                         f"{len(keys)} features x batch {stride}")
    if lengths.numel() and int(lengths.min()) < 0:
        raise ValueError("KeyedJaggedTensor lengths must be non-negative")
    per_key = lengths.view(len(keys), stride).sum(dim=1).tolist() if keys else []
    total = int(sum(per_key))
    if total != values.numel():
        raise ValueError(f"KeyedJaggedTensor lengths sum to {total} but there are {values.numel()} values "
                         f"(per feature: {dict(zip(keys, per_key))})")
    if weights is not None and is_weighted:
        if weights.numel() != values.numel():
            raise ValueError(f"KeyedJaggedTensor has {weights.numel()} weights for {values.numel()} values")
        if values.numel() and not bool(torch.isfinite(weights).all()):  # a dense table would pool it silently
            for key, segment in zip(keys, torch.split(weights, [int(n) for n in per_key])):
                bad = ~torch.isfinite(segment)
                if key in bounds and bool(bad.any()):  # (other features: TT tables, whose op says the same)
                    pos = int(bad.nonzero()[0])
                    raise ValueError(f"table '{bounds[key][0]}' (feature '{key}'): weight {float(segment[pos])} at "
                                     f"position {pos} is NaN or infinite")
    if values.numel():
        for key, segment in zip(keys, torch.split(values, [int(n) for n in per_key])):
            table, n, fatal = bounds.get(key, ("", 0, False))
            if fatal and segment.numel():
                lo, hi = torch.aminmax(segment)
                if int(lo) < 0 or int(hi) >= n:
                    bad = segment[(segment < 0) | (segment >= n)][0]
                    raise IndexError(f"table '{table}' (feature '{key}'): id {int(bad)} out of range "
                                     f"[0, {n})")


class TTEmbeddingBagCollection(nn.Module):
    """``torchrec.EmbeddingBagCollection`` whose tables may be Tensor-Train compressed.

    Same contract as the stock EBC: ``forward`` takes a ``KeyedJaggedTensor`` (weighted when
    ``is_weighted``) and returns a ``KeyedTensor`` whose keys are the tables' features in declaration
    order (a feature used by several tables is named ``feature@table``, as in the EBC). Tables given as
    ``TTEmbeddingBagConfig`` are stored as ``TTEmbeddingBag`` modules in ``tt_tables`` (keyed by
    table name); plain ``EmbeddingBagConfig`` tables live in a real ``EmbeddingBagCollection`` child
    ``dense`` (``None`` when there are none), so TorchRec shards them as usual. Table names must be
    unique across both kinds. ``device="meta"`` defers initialisation (as the EBC).

    Fused-optimizer TT tables update their cores in backward; their cores carry
    ``_in_backward_optimizers`` so ``in_backward_optimizer_filter`` keeps them out of dense optimizers.

    Example::

        >>> import torch
        >>> from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
        >>> from torchrec_tt.config import TTEmbeddingBagConfig
        >>> from torchrec_tt.modules.tt_embedding_bag_collection import TTEmbeddingBagCollection
        >>> ebc = TTEmbeddingBagCollection(tables=[
        ...     EmbeddingBagConfig(name="small", embedding_dim=8, num_embeddings=100, feature_names=["f1"]),
        ...     TTEmbeddingBagConfig(name="big", embedding_dim=8, num_embeddings=10_000,
        ...                          feature_names=["f2"], tt_ranks=4),
        ... ])
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(
        ...     keys=["f1", "f2"], values=torch.tensor([1, 2, 3, 9_999]), lengths=torch.tensor([2, 0, 1, 1]))
        >>> out = ebc(kjt)
        >>> out.keys(), out.values().shape
        (['f1', 'f2'], torch.Size([2, 16]))
    """

    def __init__(self, tables: List[EmbeddingBagConfig], device: Optional[Union[str, torch.device]] = None,
                 is_weighted: bool = False) -> None:
        super().__init__()
        if not tables:
            raise ValueError("TTEmbeddingBagCollection needs at least one table")
        names = [t.name for t in tables]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"table names must be unique across dense and TT tables; duplicated: {dup}")
        for t in tables:
            if not t.feature_names:
                raise ValueError(f"table '{t.name}' has no feature_names")
        device = torch.device(device) if device is not None else torch.device("cpu")
        self._device = device
        self._is_weighted = is_weighted
        self._configs: List[EmbeddingBagConfig] = list(tables)
        dense = [t for t in tables if not isinstance(t, TTEmbeddingBagConfig)]
        self.dense: Optional[EmbeddingBagCollection] = (
            EmbeddingBagCollection(tables=dense, is_weighted=is_weighted, device=device) if dense else None)
        self.tt_tables = nn.ModuleDict({
            t.name: tt_module_from_config(t, device) for t in tables if isinstance(t, TTEmbeddingBagConfig)})
        embedding_names = get_embedding_names_by_table(self._configs)
        # (table, feature, output key) in declaration order
        self._features: List[Tuple[str, str, str]] = [
            (t.name, f, e) for t, names in zip(self._configs, embedding_names) for f, e in zip(t.feature_names, names)]
        self._embedding_names = [e for _, _, e in self._features]
        dims = {t.name: t.embedding_dim for t in self._configs}
        self._length_per_key = [dims[t] for t, _, _ in self._features]
        self._feature_names = list(dict.fromkeys(f for _, f, _ in self._features))
        self._dense_names = {t.name for t in dense}
        # the dense child names its outputs over its own tables only: map them to ours
        self._dense_key_map: Dict[str, str] = {}
        for t, child_names in zip(dense, get_embedding_names_by_table(dense)):
            ours = [e for tn, _, e in self._features if tn == t.name]
            self._dense_key_map.update(zip(child_names, ours))

    @classmethod
    @torch.no_grad()
    def from_dense(cls, tables: List[EmbeddingBagConfig], weights: Dict[str, torch.Tensor],
                   device: Optional[Union[str, torch.device]] = None,
                   is_weighted: bool = False) -> "TTEmbeddingBagCollection":
        """A collection of ``tables`` warm-started from dense ``[N, D]`` weights by table name, e.g. a trained
        EBC's ``{t.name: ebc.embedding_bags[t.name].weight for t in ebc.embedding_bag_configs()}`` with
        ``tables`` from ``torchrec_tt.planner.choose_compression``: TT tables by TT-SVD at their shapes,
        dense ones copied. A TT table's ranks are the requested ones clipped to what its data needs (the
        configs in ``embedding_bag_configs()`` say which, so sharding rebuilds the same shapes);
        ``reconstruction_errors()`` gives ``||W - W_tt||_F / ||W||_F`` per TT table."""
        names = {t.name for t in tables}
        unknown = sorted(set(weights) - names)
        if unknown:
            raise ValueError(f"weights given for unknown table(s) {unknown}; tables are {sorted(names)}")
        for t in tables:
            w = weights.get(t.name)
            if w is None:
                raise ValueError(f"table '{t.name}': no dense weight given")
            if tuple(w.shape) != (t.num_embeddings, t.embedding_dim) or not w.is_floating_point():
                raise ValueError(f"table '{t.name}': weight must be a float [{t.num_embeddings}, {t.embedding_dim}] "
                                 f"tensor, got {w.dtype} {list(w.shape)}")
            if not bool(torch.isfinite(w).all()):
                raise ValueError(f"table '{t.name}': weight has NaN or infinite values")
        decomposed = {t.name: _tt_svd_config(t, weights[t.name]) for t in tables if isinstance(t, TTEmbeddingBagConfig)}
        module = cls([decomposed[t.name][0] if t.name in decomposed else t for t in tables], device=device,
                     is_weighted=is_weighted)
        for name, (_, cores, error) in decomposed.items():
            table = module.tt_tables[name]
            for core, value in zip(table.cores, cores):
                core.copy_(value)
            table.reconstruction_error = error
            if table.cache is not None:  # its rows came from the random init
                table.cache.reset()
        for t in module.dense_configs():
            module.dense.embedding_bags[t.name].weight.copy_(weights[t.name])
        return module

    def reconstruction_errors(self) -> Dict[str, float]:
        """``||W - W_tt||_F / ||W||_F`` of the TT tables made by ``from_dense``."""
        return {n: t.reconstruction_error for n, t in self.tt_tables.items() if hasattr(t, "reconstruction_error")}

    # ---- EBC contract ------------------------------------------------------------------------------

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return self._configs

    def is_weighted(self) -> bool:
        return self._is_weighted

    @property
    def device(self) -> torch.device:
        return self._device

    def feature_names(self) -> List[str]:
        """Input features, unique, in declaration order."""
        return list(self._feature_names)

    def embedding_names(self) -> List[str]:
        """Output keys of the ``KeyedTensor``, in order."""
        return list(self._embedding_names)

    def tt_configs(self) -> List[TTEmbeddingBagConfig]:
        return [t for t in self._configs if isinstance(t, TTEmbeddingBagConfig)]

    def dense_configs(self) -> List[EmbeddingBagConfig]:
        return [t for t in self._configs if not isinstance(t, TTEmbeddingBagConfig)]

    def bounds(self, include_tt: bool = True) -> Dict[str, Tuple[str, int, bool]]:
        """feature -> (table, num_embeddings, ids must be checked here). Without ``include_tt`` only the
        dense tables count: the TT op checks its own ids (with the same error), which is enough when no
        collective has to be spared a bad batch (the unsharded collection)."""
        out: Dict[str, Tuple[str, int, bool]] = {}
        for t in self._configs:
            if not include_tt and isinstance(t, TTEmbeddingBagConfig):
                continue
            fatal = True
            if isinstance(t, TTEmbeddingBagConfig):
                fatal = self.tt_tables[t.name].bounds_check_mode == ops.BoundsCheckMode.FATAL
            for f in t.feature_names:
                prev = out.get(f)
                out[f] = (t.name, t.num_embeddings, fatal) if prev is None or t.num_embeddings < prev[1] \
                    else prev
        return out

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """(Re)initialise all tables; after ``to_empty`` this materialises a ``device="meta"`` module."""
        if self.dense is not None:
            # the stock EBC skips init while its recorded device is meta, even after to_empty()
            for config in self.dense.embedding_bag_configs():
                weight = self.dense.embedding_bags[config.name].weight
                if not weight.is_meta and config.init_fn is not None:
                    config.init_fn(weight)
        for table in self.tt_tables.values():
            table.reset_parameters()

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        check_kjt(features, self._feature_names, self._is_weighted, self.bounds(include_tt=False))
        if features.stride() == 0:  # no bags: torchrec's KJT.to_dict (so its EBC too) fails on these
            return self._empty_batch(features.values())
        jt = features.to_dict()
        pooled: Dict[str, torch.Tensor] = {}
        if self.dense is not None:
            dense_features = [f for t, f, _ in self._features if t in self._dense_names]
            dense_kjt = _select(features, list(dict.fromkeys(dense_features)))
            pooled.update({self._dense_key_map[k]: v for k, v in self.dense(dense_kjt).to_dict().items()})
        for table_name, feature, key in self._features:
            if table_name in self._dense_names:
                continue
            pooled[key] = lookup_feature(self.tt_tables[table_name], jt[feature], self._is_weighted)
        return self._keyed(pooled)

    def _empty_batch(self, ids: torch.Tensor) -> KeyedTensor:
        """The output of a batch of no bags: ``[0, sum of dims]``, in the dtype a batch would have."""
        no_bags = torch.zeros(1, dtype=ids.dtype, device=ids.device)
        pooled: Dict[str, torch.Tensor] = {}
        for table_name, _, key in self._features:
            if table_name in self._dense_names:
                weight = self.dense.embedding_bags[table_name].weight
                pooled[key] = weight.new_empty(0, weight.shape[1])
            else:
                pooled[key] = self.tt_tables[table_name](ids, no_bags)
        return self._keyed(pooled)

    def _keyed(self, pooled: Dict[str, torch.Tensor]) -> KeyedTensor:
        """The output: each key's pooled ``[B, dim]`` side by side, in declaration order."""
        return KeyedTensor(keys=list(self._embedding_names),
                           values=torch.cat([pooled[k] for k in self._embedding_names], dim=1),
                           length_per_key=list(self._length_per_key))


def _select(features: KeyedJaggedTensor, keys: List[str]) -> KeyedJaggedTensor:
    """The sub-KJT with ``keys`` in that order (weights kept)."""
    index = {k: i for i, k in enumerate(features.keys())}
    if features.keys() == keys:
        return features
    return features.permute([index[k] for k in keys])
