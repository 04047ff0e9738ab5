"""``TTEmbeddingBag``: one Tensor-Train compressed embedding table with ``nn.EmbeddingBag``'s contract."""
from __future__ import annotations

import dataclasses
import math
from typing import List, Optional, Sequence, Union

import torch
from torch import nn

from .. import ops
from ..decomposition import tt_svd
from ..init import INIT_METHODS, init_cores_
from ..reference import tt_full_weight
from .cache import TTRowCache, resolve_cache_rows
from ..shapes import clip_ranks, full_ranks, suggest_p_shapes, suggest_q_shapes, tt_num_parameters

__all__ = ["FusedOptimizerConfig", "TTEmbeddingBag"]

# fbgemm_gpu EmbOptimType names that have an exact fused TT counterpart.
_FBGEMM_OPTIMIZERS = {"EXACT_SGD": "sgd", "SGD": "sgd", "EXACT_ADAGRAD": "adagrad",
                      "EXACT_ROWWISE_ADAGRAD": "rowwise_adagrad"}


@dataclasses.dataclass
class FusedOptimizerConfig:
    """Optimizer applied inside backward (FBGEMM TBE style): ``sgd``, ``adagrad`` or ``rowwise_adagrad``.

    Row-wise Adagrad keeps one accumulator per core slice ``G_k[i]`` (the TT analogue of a row).
    ``name`` may also be an fbgemm_gpu ``EmbOptimType`` with an exact counterpart; anything else is
    rejected by name rather than mapped to something close.
    """

    name: str = "sgd"
    learning_rate: float = 0.01
    eps: float = 1e-8

    def __post_init__(self) -> None:
        name = getattr(self.name, "name", self.name)
        name = _FBGEMM_OPTIMIZERS.get(str(name).upper(), str(name).lower())
        if name not in ops.FUSED_OPTIMIZERS:
            raise ValueError(f"unsupported fused optimizer {self.name!r}; supported: "
                             f"{', '.join(ops.FUSED_OPTIMIZERS)} (or optimizer=None with any torch.optim optimizer)")
        if not (self.learning_rate >= 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"learning_rate must be finite and >= 0, got {self.learning_rate}")
        if not (self.eps >= 0 and math.isfinite(self.eps)):
            raise ValueError(f"eps must be finite and >= 0, got {self.eps}")
        self.name = name


class TTEmbeddingBag(nn.Module):
    """An ``[N, D]`` embedding table stored as ``d`` TT cores; rows are rebuilt on the fly.

    Core ``k`` is ``[p_k, r_{k-1}, q_k, r_k]`` with ``prod(p) >= N`` (padding rows are never valid ids)
    and ``prod(q) == D``; row ``i`` is the product of one slice per core, selected by the mixed-radix
    digits of ``i``. Memory is ``sum_k p_k r_{k-1} q_k r_k`` numbers instead of ``N * D``.

    Args:
        num_embeddings, embedding_dim: the dense table's shape.
        tt_ranks: inner ranks, an int for all or ``d - 1`` ints (clipped to what the shapes allow).
        tt_p_shapes, tt_q_shapes: row/column factorisations; chosen balanced when absent (``num_cores``).
        mode: ``"sum"`` or ``"mean"`` pooling. include_last_offset: offsets convention (see ``ops``).
        weights_init: ``"sampled_gaussian"`` (paper), ``"uniform"`` or ``"normal"``; rows start with
            the spread of TorchRec's dense default init (derivation in ``torchrec_tt.init``).
        optimizer: ``None`` for dense core gradients (any ``torch.optim``), or a ``FusedOptimizerConfig``
            / optimizer name to update the cores inside backward.
        bounds_check_mode: ``"error"`` (default), ``"warn"`` or ``"ignore"`` for ids outside ``[0, N)``.
        name: the table name used in error messages.
        cache_rows / cache_fraction / cache_bytes: hot-row cache (issue 5) of that many rows, that
            fraction of ``N``, or as many rows as fit the byte budget (weights + their optimizer state);
            at most one, default no cache. See ``torchrec_tt.modules.cache``.
        cache_refresh_interval: training forward calls between automatic refreshes (also ``refresh_cache()``).
        cache_decay: per-training-step decay of the id counts that pick the cached rows.

    Example::

        >>> import torch
        >>> from torchrec_tt import TTEmbeddingBag
        >>> table = TTEmbeddingBag(100_000, 16, tt_ranks=8, mode="sum")
        >>> table.p_shapes, table.q_shapes, table.ranks
        ([47, 47, 46], [4, 2, 2], [1, 8, 8, 1])
        >>> ids, offsets = torch.tensor([1, 2, 99_999, 5]), torch.tensor([0, 3])
        >>> table(ids, offsets).shape
        torch.Size([2, 16])
        >>> round(table.compression_ratio())  # 1.6 M numbers dense, 8,256 as cores
        194
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        tt_ranks: Union[int, Sequence[int]] = 16,
        tt_p_shapes: Optional[Sequence[int]] = None,
        tt_q_shapes: Optional[Sequence[int]] = None,
        *,
        num_cores: int = 3,
        mode: str = "sum",
        include_last_offset: bool = False,
        weights_init: str = "sampled_gaussian",
        optimizer: Union[None, str, FusedOptimizerConfig] = None,
        bounds_check_mode: Union[str, int, ops.BoundsCheckMode] = "error",
        name: str = "tt_table",
        device: Optional[torch.device] = None,
        dtype: torch.dtype = torch.float32,
        # hot-row cache (issue 5), off by default
        cache_rows: int = 0,
        cache_fraction: Optional[float] = None,
        cache_bytes: Optional[int] = None,
        cache_refresh_interval: int = 1000,
        cache_decay: float = 0.999,
    ) -> None:
        super().__init__()
        if num_embeddings <= 0 or embedding_dim <= 0:
            raise ValueError(f"table '{name}': num_embeddings and embedding_dim must be positive, "
                             f"got {num_embeddings} x {embedding_dim}")
        ops.pooling_mode(mode)
        if weights_init not in INIT_METHODS:
            raise ValueError(f"table '{name}': unknown weights_init {weights_init!r}; use one of {INIT_METHODS}")
        p = list(tt_p_shapes) if tt_p_shapes is not None else None
        q = list(tt_q_shapes) if tt_q_shapes is not None else None
        d = len(p) if p is not None else len(q) if q is not None else num_cores
        p = p if p is not None else suggest_p_shapes(num_embeddings, d)
        q = q if q is not None else suggest_q_shapes(embedding_dim, d)
        if len(p) != d or len(q) != d or d < 2:
            raise ValueError(f"table '{name}': need >= 2 cores and as many p as q shapes, got p={p}, q={q}")
        if math.prod(p) < num_embeddings:
            raise ValueError(f"table '{name}': prod(tt_p_shapes)={math.prod(p)} < num_embeddings={num_embeddings}")
        if math.prod(q) != embedding_dim:
            raise ValueError(f"table '{name}': prod(tt_q_shapes)={math.prod(q)} != embedding_dim={embedding_dim}")
        self.num_embeddings, self.embedding_dim, self.name = int(num_embeddings), int(embedding_dim), name
        self.p_shapes, self.q_shapes = [int(x) for x in p], [int(x) for x in q]
        self.ranks = clip_ranks(full_ranks(tt_ranks, d), self.p_shapes, self.q_shapes)
        self.mode, self.include_last_offset, self.weights_init = mode, include_last_offset, weights_init
        self.bounds_check_mode = ops.BoundsCheckMode.parse(bounds_check_mode)
        if isinstance(optimizer, str) or (optimizer is not None and not isinstance(optimizer, FusedOptimizerConfig)):
            optimizer = FusedOptimizerConfig(optimizer)
        self.optimizer = optimizer
        self.cores = nn.ParameterList(
            nn.Parameter(torch.empty(self.p_shapes[k], self.ranks[k], self.q_shapes[k], self.ranks[k + 1],
                                     device=device, dtype=dtype))
            for k in range(d))
        self._register_optimizer_state()
        self.reset_parameters()
        # hot-row cache (issue 5): uncompressed copies of the most frequent rows, or None
        rows = resolve_cache_rows(name, self.num_embeddings, self.embedding_dim, self.cores[0].element_size(),
                                  optimizer.name if optimizer is not None else None, cache_rows,
                                  cache_fraction, cache_bytes, cache_refresh_interval, cache_decay)
        self.cache = TTRowCache(self, rows, cache_refresh_interval, cache_decay) if rows else None

    # ---- construction helpers --------------------------------------------------------------------

    def _register_optimizer_state(self) -> None:
        """Fused Adagrad state lives in buffers next to the cores, so it checkpoints with the module."""
        opt = self.optimizer.name if self.optimizer is not None else None
        for k, core in enumerate(self.cores):
            state_dtype = torch.promote_types(core.dtype, torch.float32)
            if opt == "adagrad":
                self.register_buffer(f"optimizer_state_{k}", torch.zeros_like(core, dtype=state_dtype))
            elif opt == "rowwise_adagrad":
                self.register_buffer(f"optimizer_state_{k}",
                                     torch.zeros(core.shape[0], dtype=state_dtype, device=core.device))

    def optimizer_state(self) -> List[torch.Tensor]:
        # Straight from the buffer dict (getattr/hasattr through nn.Module cost ~1 us each, per step).
        buffers = self._buffers
        return [buffers[name] for name in (f"optimizer_state_{k}" for k in range(len(self.p_shapes)))
                if name in buffers]

    def core_list(self) -> List[torch.Tensor]:
        """The cores as a list, for the ops (``list(self.cores)`` takes a getattr per core)."""
        return list(self.cores._parameters.values())

    @torch.no_grad()
    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        if self.cores[0].device.type != "meta":
            init_cores_(list(self.cores), self.num_embeddings, self.weights_init, generator=generator)
        for s in self.optimizer_state():
            s.zero_()
        if getattr(self, "cache", None) is not None:  # cached rows came from the old cores
            self.cache.reset()

    @classmethod
    def from_dense(cls, weight: torch.Tensor, tt_ranks: Union[int, Sequence[int]],
                   tt_p_shapes: Optional[Sequence[int]] = None, tt_q_shapes: Optional[Sequence[int]] = None,
                   **kwargs) -> "TTEmbeddingBag":
        """Warm start from a dense (e.g. trained) table by TT-SVD.

        Ranks are the requested ones clipped by what the data needs, so a table of exact TT-rank
        <= tt_ranks comes back exactly. ``module.reconstruction_error`` holds
        ``||W - W_tt||_F / ||W||_F`` over the real rows.
        """
        n, dim = weight.shape
        d = len(tt_p_shapes) if tt_p_shapes is not None else len(tt_q_shapes) if tt_q_shapes is not None \
            else kwargs.pop("num_cores", 3)
        p = list(tt_p_shapes) if tt_p_shapes is not None else suggest_p_shapes(n, d)
        q = list(tt_q_shapes) if tt_q_shapes is not None else suggest_q_shapes(dim, d)
        cores, err = tt_svd(weight.detach(), p, q, tt_ranks)
        ranks = [1] + [int(c.shape[3]) for c in cores]
        module = cls(n, dim, ranks[1:-1], p, q, device=weight.device, dtype=weight.dtype, **kwargs)
        with torch.no_grad():
            for core, value in zip(module.cores, cores):
                core.copy_(value)
        module.reconstruction_error = err
        return module

    # ---- sizes -----------------------------------------------------------------------------------

    def num_tt_parameters(self) -> int:
        return tt_num_parameters(self.p_shapes, self.q_shapes, self.ranks)

    def tt_bytes(self, include_optimizer_state: bool = True) -> int:
        total = sum(c.numel() * c.element_size() for c in self.cores)
        if include_optimizer_state:
            total += sum(s.numel() * s.element_size() for s in self.optimizer_state())
        return total

    def dense_bytes(self) -> int:
        return self.num_embeddings * self.embedding_dim * self.cores[0].element_size()

    def compression_ratio(self) -> float:
        """Dense weight size over TT core size (optimizer state excluded on both sides)."""
        return self.num_embeddings * self.embedding_dim / self.num_tt_parameters()

    # ---- materialisation -------------------------------------------------------------------------

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rebuilt rows ``[len(ids), D]`` (differentiable); ids are range-checked. One id per bag
        through the TT op, so shared prefixes are multiplied once (cache admission rebuilds ~10^5 rows)."""
        ids = ids.reshape(-1)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_embeddings):
            raise IndexError(f"table '{self.name}': ids must be in [0, {self.num_embeddings})")
        offsets = torch.arange(ids.numel() + 1, device=ids.device)
        return ops.tt_embedding_bag(self.core_list(), ids, offsets, None, num_embeddings=self.num_embeddings,
                                    mode="sum", include_last_offset=True, table_name=self.name)

    def full_weight(self) -> torch.Tensor:
        """The dense ``[N, D]`` table these cores represent (for checks and export)."""
        return tt_full_weight(list(self.cores), self.num_embeddings)

    # ---- lookup ----------------------------------------------------------------------------------

    def forward(self, input: torch.Tensor, offsets: Optional[torch.Tensor] = None,
                per_sample_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Pooled lookup, as ``nn.EmbeddingBag``: 2-D ``input`` is fixed-size bags, 1-D needs ``offsets``."""
        include_last_offset = self.include_last_offset
        if input.dim() == 2:
            if offsets is not None:
                raise ValueError(f"table '{self.name}': offsets must be None when input is 2-D")
            bags, length = input.shape
            offsets = torch.arange(0, bags * length, length, device=input.device, dtype=input.dtype)
            input, include_last_offset = input.reshape(-1), False
            if per_sample_weights is not None:
                per_sample_weights = per_sample_weights.reshape(-1)
        elif input.dim() == 1:
            if offsets is None:
                raise ValueError(f"table '{self.name}': offsets are required when input is 1-D")
        else:
            raise ValueError(f"table '{self.name}': input must be 1-D or 2-D, got shape {tuple(input.shape)}")
        common = dict(num_embeddings=self.num_embeddings, mode=self.mode, include_last_offset=include_last_offset,
                      bounds_check_mode=self.bounds_check_mode, table_name=self.name)
        if self.cache is not None:  # hot-row cache (issue 5): cached ids skip the TT chain
            return self.cache.lookup(self, input, offsets, per_sample_weights, include_last_offset)
        cores = self.core_list()
        if self.optimizer is None or not torch.is_grad_enabled():
            return ops.tt_embedding_bag(cores, input, offsets, per_sample_weights, **common)
        return ops.tt_embedding_bag_fused(cores, self.optimizer_state(), input, offsets, per_sample_weights,
                                          optimizer=self.optimizer.name, learning_rate=self.optimizer.learning_rate,
                                          eps=self.optimizer.eps, **common)

    # ---- hot-row cache (issue 5) -----------------------------------------------------------------

    def refresh_cache(self) -> None:
        """Re-pick the cached rows now (write-back of evicted trained rows, admission from the cores)."""
        if self.cache is not None:
            self.cache.refresh(self)

    def cache_stats(self) -> dict:
        """Hits, misses, hit rate, evictions, write-back residual (empty dict without a cache)."""
        return self.cache.stats() if self.cache is not None else {}

    def extra_repr(self) -> str:
        opt = self.optimizer.name if self.optimizer else None
        return (f"name={self.name!r}, {self.num_embeddings}x{self.embedding_dim}, p={self.p_shapes}, "
                f"q={self.q_shapes}, ranks={self.ranks}, mode={self.mode!r}, fused_optimizer={opt}, "
                f"compression={self.compression_ratio():.1f}x")
