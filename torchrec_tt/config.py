"""``TTEmbeddingBagConfig``: a ``torchrec.EmbeddingBagConfig`` that asks for a Tensor-Train table."""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Union

import torch
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig

from .modules.tt_embedding_bag import FusedOptimizerConfig

__all__ = ["TTEmbeddingBagConfig", "is_tt_config"]

_CORE_DTYPES = {DataType.FP32: torch.float32, DataType.FP16: torch.float16, DataType.BF16: torch.bfloat16}
# EmbeddingBagConfig features with no TT meaning yet: refused rather than ignored (field -> its default)
_UNSUPPORTED = {"need_pos": False, "num_embeddings_post_pruning": None, "total_num_buckets": None,
                "use_virtual_table": False, "virtual_table_eviction_policy": None, "enable_embedding_update": False}


@dataclasses.dataclass
class TTEmbeddingBagConfig(EmbeddingBagConfig):
    """Table config for a TT-compressed table in a ``TTEmbeddingBagCollection``.

    All ``EmbeddingBagConfig`` fields keep their meaning (``num_embeddings``, ``embedding_dim``,
    ``name``, ``feature_names``, ``pooling``: SUM or MEAN; ``data_type``: the cores' dtype, FP32 or
    FP16 / BF16, computed in fp32 with fp32 optimizer state). The TT fields (all defaulted):

    - ``tt_ranks``: inner TT ranks, an int for all or ``d - 1`` ints.
    - ``tt_p_shapes`` / ``tt_q_shapes``: row / column factorisations (chosen balanced when ``None``;
      ``num_cores`` cores then).
    - ``weights_init``: ``"sampled_gaussian"`` (paper), ``"uniform"`` or ``"normal"``.
    - ``optimizer``: ``None`` (cores get dense gradients, use any torch optimizer) or a
      ``FusedOptimizerConfig`` / optimizer name (``"sgd"``, ``"adagrad"``, ``"rowwise_adagrad"``) to
      update the cores inside backward; ``learning_rate`` / ``eps`` apply when a name is given. TorchRec's
      ``apply_optimizer_in_backward`` on the table's cores is the other way to ask (``torchrec_tt.in_backward``).
    - ``bounds_check_mode``: ``"error"`` (default), ``"warn"`` or ``"ignore"``.
    - ``cache_rows`` / ``cache_fraction`` / ``cache_bytes``: hot-row cache of that many uncompressed rows,
      that fraction of ``num_embeddings``, or as many rows as fit the byte budget (default: no cache);
      ``cache_refresh_interval`` / ``cache_decay``: see ``torchrec_tt.modules.cache``.

    ``init_fn`` / ``weight_init_min`` / ``weight_init_max`` (dense-row initialisation) do not apply: the
    cores are initialised by ``weights_init``. Pruning, virtual tables, positions and bucketing are refused.

    Plain ``EmbeddingBagConfig`` entries in the same collection stay dense.
    """

    tt_ranks: Union[int, List[int]] = 16
    tt_p_shapes: Optional[List[int]] = None
    tt_q_shapes: Optional[List[int]] = None
    num_cores: int = 3
    weights_init: str = "sampled_gaussian"
    optimizer: Union[None, str, FusedOptimizerConfig] = None
    learning_rate: Optional[float] = None
    eps: Optional[float] = None
    bounds_check_mode: str = "error"
    cache_rows: int = 0
    cache_fraction: Optional[float] = None
    cache_bytes: Optional[int] = None
    cache_refresh_interval: int = 1000
    cache_decay: float = 0.999

    def __post_init__(self) -> None:
        self.core_dtype()  # a data_type TT cores cannot have fails here, naming the table
        unsupported = {f: getattr(self, f) for f, default in _UNSUPPORTED.items() if getattr(self, f) != default}
        if unsupported:
            raise ValueError(f"table '{self.name}': TT tables do not support {unsupported}")

    def core_dtype(self) -> torch.dtype:
        """``data_type`` as the dtype of the cores (and of the hot-row cache rows)."""
        if self.data_type not in _CORE_DTYPES:
            raise ValueError(f"table '{self.name}': TT cores take data_type FP32, FP16 or BF16, got "
                             f"{self.data_type.name}")
        return _CORE_DTYPES[self.data_type]

    def cache_kwargs(self) -> dict:
        """The hot-row cache arguments of ``TTEmbeddingBag``."""
        return dict(cache_rows=self.cache_rows, cache_fraction=self.cache_fraction, cache_bytes=self.cache_bytes,
                    cache_refresh_interval=self.cache_refresh_interval, cache_decay=self.cache_decay)

    def fused_optimizer_config(self) -> Optional[FusedOptimizerConfig]:
        """The fused optimizer this table asks for (``None`` for dense core gradients)."""
        opt = self.optimizer
        if opt is None:
            if self.learning_rate is not None or self.eps is not None:
                raise ValueError(f"table '{self.name}': learning_rate/eps given but optimizer is None")
            return None
        if isinstance(opt, FusedOptimizerConfig):
            if self.learning_rate is not None or self.eps is not None:
                raise ValueError(f"table '{self.name}': give learning_rate/eps inside the FusedOptimizerConfig")
            return opt
        kwargs = {}
        if self.learning_rate is not None:
            kwargs["learning_rate"] = self.learning_rate
        if self.eps is not None:
            kwargs["eps"] = self.eps
        return FusedOptimizerConfig(opt, **kwargs)


def is_tt_config(config: EmbeddingBagConfig) -> bool:
    return isinstance(config, TTEmbeddingBagConfig)
