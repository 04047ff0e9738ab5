"""TT-SVD: compress an existing dense embedding table into TT cores.

Useful to warm-start a TT table from a trained dense one and to measure how
well a given rank can represent it.  The algorithm (Oseledets 2011):

1. pad the ``[N, D]`` weight with zero rows to ``prod(p)`` rows;
2. view it as a ``2d``-way tensor ``(p_1..p_d, q_1..q_d)`` and permute to
   ``(p_1, q_1, .., p_d, q_d)`` so each core owns one ``(p_k, q_k)`` pair;
3. peel off one core at a time with a truncated SVD of the current unfolding
   ``(r_{k-1} p_k q_k) x rest``, keeping ``min(requested r_k, numerical rank)``
   singular vectors.

Work is done in float64 (SVD of float32 loses the small singular values) and
the cores are returned in the weight's dtype, in the ``[p_k, r_{k-1}, q_k, r_k]``
layout, possibly with smaller ranks than requested.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import torch

from .shapes import full_ranks

__all__ = ["tt_svd"]


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out


def _tail(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Cores 2..d contracted: ``[r_1, p_2..p_d, q_2..q_d]`` (row and column digits most significant first)."""
    tail = cores[-1][..., 0].permute(1, 0, 2)  # [r_{d-1}, p_d, q_d]
    for core in reversed(cores[1:-1]):  # [p, r_prev, q, r]
        p, r_prev, q, r = core.shape
        rows, cols = tail.shape[1], tail.shape[2]
        t = core.permute(1, 0, 2, 3).reshape(r_prev * p * q, r) @ tail.reshape(r, rows * cols)
        tail = t.reshape(r_prev, p, q, rows, cols).permute(0, 1, 3, 2, 4).reshape(r_prev, p * rows, q * cols)
    return tail


def _distance(cores: Sequence[torch.Tensor], weight: torch.Tensor, block_rows: int = 1 << 20) -> torch.Tensor:
    """``||W - W_tt||_F`` over ``weight``'s rows, the TT rows rebuilt by blocks of the first core's slices
    (one GEMM per block against the contracted tail) rather than one chain of products per row."""
    first, tail = cores[0], _tail(cores)  # [p_1, 1, q_1, r_1], [r_1, rows, cols]
    p1, _, q1, r1 = first.shape
    rows, cols = tail.shape[1], tail.shape[2]
    n = weight.shape[0]
    step = max(1, block_rows // rows)
    total = weight.new_zeros(())
    for start in range(0, min(p1, -(-n // rows)), step):
        stop = min(p1, start + step)
        block = (first[start:stop, 0].reshape(-1, r1) @ tail.reshape(r1, -1))  # [(i1, q1), (rows, cols)]
        block = block.reshape(stop - start, q1, rows, cols).permute(0, 2, 1, 3).reshape(-1, q1 * cols)
        lo = start * rows
        real = weight[lo:lo + block.shape[0]]
        total += ((block[:real.shape[0]] - real) ** 2).sum()
    return total.sqrt()


@torch.no_grad()
def tt_svd(
    weight: torch.Tensor,
    p_shapes: Sequence[int],
    q_shapes: Sequence[int],
    tt_ranks: Union[int, Sequence[int]],
) -> Tuple[List[torch.Tensor], float]:
    """TT-SVD of a dense ``[N, D]`` table.

    Returns ``(cores, rel_error)`` where ``cores[k]`` has shape
    ``[p_k, r_{k-1}, q_k, r_k]`` (ranks ``<=`` the requested ones, clipped by
    the unfolding sizes and by the numerical rank of the data) and
    ``rel_error = ||W - W_tt||_F / ||W||_F`` over the ``N`` real rows
    (0.0 for an all-zero table reproduced exactly).
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [N, D], got shape {tuple(weight.shape)}")
    p = [int(x) for x in p_shapes]
    q = [int(x) for x in q_shapes]
    if len(p) != len(q) or len(p) < 1:
        raise ValueError(f"p_shapes and q_shapes must be non-empty and of equal length, got {p} and {q}")
    d = len(p)
    N, D = int(weight.shape[0]), int(weight.shape[1])
    P = _prod(p)
    if _prod(q) != D:
        raise ValueError(f"prod(q_shapes)={_prod(q)} must equal embedding_dim={D}")
    if P < N:
        raise ValueError(f"prod(p_shapes)={P} must be >= num_embeddings={N}")
    requested = full_ranks(tt_ranks, d)

    padded = torch.zeros((P, D), dtype=torch.float64, device=weight.device)
    padded[:N] = weight.detach()
    w64 = padded[:N]  # the real rows in float64, a view: no second float64 copy of a big table
    # (p_1..p_d, q_1..q_d) -> (p_1, q_1, ..., p_d, q_d)
    t = padded.reshape(*p, *q)
    perm = [x for k in range(d) for x in (k, d + k)]
    t = t.permute(*perm).contiguous()

    cores64: List[torch.Tensor] = []
    r_prev = 1
    rest = t.reshape(-1)
    del t  # the first unfolding is rest's last reference: freed once the first core is peeled off
    # singular values below the input's own precision carry no information
    # (e.g. float32 round-off of an exactly low-rank table): drop them.
    # Round-off noise of the input is bounded by in_eps * ||W||_F, so singular
    # values below 2 * in_eps * ||unfolding||_F are indistinguishable from it.
    in_eps = torch.finfo(weight.dtype).eps if weight.is_floating_point() else 0.0
    eps = torch.finfo(torch.float64).eps
    for k in range(d - 1):
        rows = r_prev * p[k] * q[k]
        mat = rest.reshape(rows, -1)
        U, S, Vh = torch.linalg.svd(mat, full_matrices=False)
        # numerical rank: singular values above a relative floor
        if S.numel() > 0 and float(S[0]) > 0:
            tol = max(float(S[0]) * max(mat.shape) * eps, 2.0 * in_eps * float(torch.linalg.norm(S)))
            num_rank = int((S > tol).sum())
        else:
            num_rank = 1
        r = max(1, min(requested[k + 1], num_rank, S.numel()))
        core = U[:, :r].reshape(r_prev, p[k], q[k], r).permute(1, 0, 2, 3).contiguous()
        cores64.append(core)
        rest = S[:r, None] * Vh[:r]
        r_prev = r
        del mat, U, S, Vh  # before the next, smaller SVD
    cores64.append(rest.reshape(r_prev, p[-1], q[-1], 1).permute(1, 0, 2, 3).contiguous())

    ref_norm = torch.linalg.norm(w64)
    diff_norm = _distance(cores64, w64)
    if float(ref_norm) == 0.0:
        err = 0.0 if float(diff_norm) == 0.0 else float("inf")
    else:
        err = float(diff_norm / ref_norm)
    cores = [c.to(dtype=weight.dtype) for c in cores64]
    return cores, err
