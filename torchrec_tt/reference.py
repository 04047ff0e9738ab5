r"""Pure-PyTorch reference for TT embedding lookups (clarity over speed).

Layout
------
A table of ``N`` rows and ``D = prod(q)`` columns is stored as cores
``G_k`` of shape ``[p_k, r_{k-1}, q_k, r_k]`` with ``r_0 = r_d = 1``.

Row ``i`` (``0 <= i < N <= prod(p)``) is written in mixed radix over
``p = (p_1..p_d)``, most significant digit first::

    i_1 = i // (p_2 ... p_d),  ...,  i_d = i % p_d

and the row is the chain product

.. math::

    W[i] = G_1[i_1] \cdot G_2[i_2] \cdots G_d[i_d]

where ``G_k[i_k]`` is viewed as an ``r_{k-1} x (q_k r_k)`` matrix and after
each product the partial result is re-viewed as ``(q_1..q_k) x r_k``::

    P_1 = G_1[i_1].view(q_1, r_1)
    P_k = (P_{k-1} @ G_k[i_k].view(r_{k-1}, q_k r_k)).view(q_1..q_k, r_k)
    W[i] = P_d.view(D)

so column ``j`` is mixed radix over ``q`` (most significant first) and
``W[i, j] = sum_a prod_k G_k[i_k, a_{k-1}, j_k, a_k]``.

Everything here is built from differentiable torch ops (indexing, ``bmm``,
``index_add``), so autograd gives the reference gradients w.r.t. the cores
and the per-sample weights.  Pooling deliberately does not use
``torch.nn.functional.embedding_bag`` so that it is an independent check.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

__all__ = [
    "row_digits",
    "tt_rows",
    "tt_full_weight",
    "tt_embedding_bag_reference",
]


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out


def row_digits(ids: torch.Tensor, p_shapes: Sequence[int]) -> List[torch.Tensor]:
    """Mixed-radix digits ``[i_1, .., i_d]`` of ``ids`` over ``p_shapes`` (most significant first)."""
    p = [int(x) for x in p_shapes]
    ids = ids.long()
    digits = []
    stride = _prod(p)
    for pk in p:
        stride //= pk
        digits.append((ids // stride) % pk)
    return digits


def _check_cores(cores: Sequence[torch.Tensor]) -> None:
    if len(cores) < 1:
        raise ValueError("need at least one TT core")
    prev = 1
    for k, c in enumerate(cores):
        if c.dim() != 4:
            raise ValueError(f"core {k} must have shape [p_k, r_(k-1), q_k, r_k], got {tuple(c.shape)}")
        if c.shape[1] != prev:
            raise ValueError(f"core {k} has left rank {c.shape[1]}, expected {prev}")
        prev = c.shape[3]
    if prev != 1:
        raise ValueError(f"last core must have right rank 1, got {prev}")


def tt_rows(cores: Sequence[torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Rebuild the rows ``ids`` (1-D, any integer dtype) -> ``[n, D]``.

    Each core is gathered by its digit (``[n, r_{k-1}, q_k, r_k]``) and the
    chain ``P_k = P_{k-1} @ G_k[i_k]`` is evaluated as a batched ``bmm``.
    """
    _check_cores(cores)
    ids = ids.reshape(-1).long()
    p = [int(c.shape[0]) for c in cores]
    n = ids.numel()
    if n > 0:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= _prod(p):
            raise IndexError(f"row ids must lie in [0, {_prod(p)}), got range [{lo}, {hi}]")
    digits = row_digits(ids, p)
    g = cores[0][digits[0]]  # [n, 1, q_1, r_1]
    Q = int(g.shape[2])  # q_1 * .. * q_k so far
    partial = g.reshape(n, Q, g.shape[3])  # [n, q_1, r_1]
    for core, dig in zip(cores[1:], digits[1:]):
        g = core[dig]  # [n, r_{k-1}, q_k, r_k]
        r_prev, q_k, r_k = g.shape[1], g.shape[2], g.shape[3]
        partial = torch.bmm(partial, g.reshape(n, r_prev, q_k * r_k))  # [n, Q_{k-1}, q_k r_k]
        Q *= int(q_k)
        partial = partial.reshape(n, Q, r_k)  # [n, Q_{k-1} q_k, r_k]
    return partial.reshape(n, Q)


def tt_full_weight(
    cores: Sequence[torch.Tensor], num_embeddings: int, chunk_size: int = 65536
) -> torch.Tensor:
    """Dense ``[num_embeddings, D]`` table, rebuilt ``chunk_size`` rows at a time.

    Chunking bounds the gather/bmm intermediates (``~chunk * r * q * r``) so that
    million-row tables can be materialised for checks.
    """
    _check_cores(cores)
    n = int(num_embeddings)
    if n < 0 or n > _prod(c.shape[0] for c in cores):
        raise ValueError(f"num_embeddings={n} must be in [0, prod(p_shapes)]")
    dev = cores[0].device
    D = _prod(c.shape[2] for c in cores)
    if n == 0:
        return cores[0].new_zeros((0, D))
    chunk_size = max(1, int(chunk_size))
    parts = [
        tt_rows(cores, torch.arange(s, min(n, s + chunk_size), device=dev))
        for s in range(0, n, chunk_size)
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def tt_embedding_bag_reference(
    cores: Sequence[torch.Tensor],
    indices: torch.Tensor,
    offsets: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor] = None,
    mode: str = "sum",
    include_last_offset: bool = False,
) -> torch.Tensor:
    """Pooled TT lookup ``[B, D]`` with ``torch.nn.EmbeddingBag`` offsets semantics.

    * ``include_last_offset=False``: ``B = len(offsets)``, bag ``b`` is
      ``indices[offsets[b]:offsets[b+1]]`` and the last bag runs to the end.
    * ``include_last_offset=True``: ``B = len(offsets) - 1`` and ``offsets[-1]``
      ends the last bag.
    * ``mode="sum"``: (weighted) sum of rows; ``mode="mean"``: that sum divided
      by the number of ids in the bag.  Empty bags give zeros.
    * ``per_sample_weights`` (same length as ``indices``) scales each row
      before pooling, in both modes.
    """
    if mode not in ("sum", "mean"):
        raise ValueError(f"mode must be 'sum' or 'mean', got {mode!r}")
    _check_cores(cores)
    indices = indices.reshape(-1).long()
    offsets = offsets.reshape(-1).long().to(indices.device)
    L = indices.numel()
    D = _prod(c.shape[2] for c in cores)
    if include_last_offset:
        if offsets.numel() < 1:
            raise ValueError("include_last_offset=True needs at least one offset")
        B = offsets.numel() - 1
        starts = offsets[:-1]
        end = min(int(offsets[-1]), L) if offsets.numel() > 0 else L
    else:
        B = offsets.numel()
        starts = offsets
        end = L
    out = cores[0].new_zeros((B, D))
    if B == 0 or L == 0:
        return out
    if per_sample_weights is not None and per_sample_weights.reshape(-1).numel() != L:
        raise ValueError("per_sample_weights must have the same number of elements as indices")

    # bag id of each position: the last bag whose start <= position (empty bags
    # share their start with the next bag and so never get a position).
    pos = torch.arange(L, device=indices.device)
    bag = torch.searchsorted(starts.contiguous(), pos, right=True) - 1
    valid = (bag >= 0) & (pos < end)
    bag = bag[valid]
    rows = tt_rows(cores, indices[valid])  # [n_valid, D]
    if per_sample_weights is not None:
        w = per_sample_weights.reshape(-1)[valid].to(rows.dtype)
        rows = rows * w.unsqueeze(1)
    out = out.index_add(0, bag, rows)
    if mode == "mean":
        counts = torch.bincount(bag, minlength=B).to(out.dtype).clamp_min(1.0)
        out = out / counts.unsqueeze(1)
    return out
