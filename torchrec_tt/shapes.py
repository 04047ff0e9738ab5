"""Shape and rank helpers for Tensor-Train (TT) embedding tables.

A TT table of ``N`` rows and ``D`` columns is stored as ``d`` cores.  Rows are
indexed in mixed radix over ``p_shapes`` (``prod(p) >= N``: the padded rows
are never looked up) and columns in mixed radix over ``q_shapes``
(``prod(q) == D`` exactly, because every column is produced by the chain of
matrix products).  Core ``k`` has shape ``[p_k, r_{k-1}, q_k, r_k]`` and the
full rank list is ``[1, r_1, ..., r_{d-1}, 1]``.

The helpers here pick factorisations, validate/clip ranks and count
parameters, so that users can choose ranks from a memory budget
(compression ratio) instead of by trial and error.
"""

from __future__ import annotations

import math
import operator
from typing import List, Sequence, Union

__all__ = [
    "suggest_p_shapes",
    "suggest_q_shapes",
    "full_ranks",
    "max_ranks",
    "clip_ranks",
    "tt_num_parameters",
    "compression_ratio",
    "ranks_for_compression_ratio",
]


def _as_pos_int(x, name: str) -> int:
    if isinstance(x, bool):
        raise ValueError(f"{name} must be a positive integer, got {x!r}")
    try:
        v = operator.index(x)
    except TypeError:
        raise ValueError(f"{name} must be a positive integer, got {x!r}") from None
    if v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v}")
    return v


def _prod(xs: Sequence[int]) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out


def _int_root_ceil(n: int, d: int) -> int:
    """Smallest integer x with x**d >= n (exact integer arithmetic, no float drift)."""
    if n <= 1:
        return 1
    x = max(1, int(round(n ** (1.0 / d))))
    while x**d < n:
        x += 1
    while x > 1 and (x - 1) ** d >= n:
        x -= 1
    return x


def suggest_p_shapes(num_embeddings: int, d: int = 3) -> List[int]:
    """Balanced row factorisation ``[p_1..p_d]`` with ``prod >= num_embeddings``.

    Rows need not factor exactly (N is often prime): we take
    ``p_1 = ceil(N ** (1/d))`` and recurse on ``ceil(N / p_1)``, which keeps all
    factors close to ``N ** (1/d)`` (balanced cores minimise parameters) and the
    padding below one "slice" of the first core.
    """
    n = _as_pos_int(num_embeddings, "num_embeddings")
    d = _as_pos_int(d, "d")
    shapes: List[int] = []
    rem = n
    for k in range(d, 0, -1):
        if k == 1:
            p = rem
        else:
            p = _int_root_ceil(rem, k)
        shapes.append(p)
        rem = -(-rem // p)
    assert _prod(shapes) >= n
    return shapes


def _factorisations(n: int, k: int, max_factor: int):
    """All non-increasing tuples of k factors (each <= max_factor) with product n."""
    if k == 1:
        if n <= max_factor:
            yield (n,)
        return
    # largest factor f must satisfy f**k >= n
    lo = _int_root_ceil(n, k)
    for f in range(min(n, max_factor), lo - 1, -1):
        if n % f == 0:
            for rest in _factorisations(n // f, k - 1, f):
                yield (f,) + rest


def suggest_q_shapes(embedding_dim: int, d: int = 3) -> List[int]:
    """Exact factorisation of ``embedding_dim`` into ``d`` factors, sorted descending.

    Columns must factor exactly (``prod(q) == D``) since each column of a row is
    an entry of the TT chain product.  Among all factorisations we pick the most
    balanced one (smallest sum of squared log-deviations from ``D ** (1/d)``);
    a prime ``D`` yields ``[D, 1, ..., 1]``.
    """
    dim = _as_pos_int(embedding_dim, "embedding_dim")
    d = _as_pos_int(d, "d")
    target = math.log(dim) / d
    best = None
    best_cost = None
    for fac in _factorisations(dim, d, dim):
        cost = sum((math.log(f) - target) ** 2 for f in fac)
        if best_cost is None or cost < best_cost - 1e-12:
            best, best_cost = fac, cost
    assert best is not None
    return list(best)


def full_ranks(tt_ranks: Union[int, Sequence[int]], d: int) -> List[int]:
    """Normalise ``tt_ranks`` (an int, or ``d-1`` inner ranks) to ``[1, r_1, .., r_{d-1}, 1]``.

    The boundary ranks are always 1 because the chain starts/ends with a row
    vector; accepting just the inner ranks avoids users passing inconsistent ends.
    """
    d = _as_pos_int(d, "d")
    if isinstance(tt_ranks, bool):
        raise ValueError(f"tt_ranks must be a positive int or a sequence of {d - 1} positive ints, got {tt_ranks!r}")
    try:
        r = operator.index(tt_ranks)
    except TypeError:
        r = None
    if r is not None:
        r = _as_pos_int(r, "tt_ranks")
        return [1] + [r] * (d - 1) + [1]
    try:
        inner = list(tt_ranks)
    except TypeError:
        raise ValueError(
            f"tt_ranks must be a positive int or a sequence of {d - 1} positive ints, got {tt_ranks!r}"
        ) from None
    if len(inner) != d - 1:
        raise ValueError(
            f"tt_ranks must have d-1 = {d - 1} entries (inner ranks r_1..r_{d - 1}), got {len(inner)}: {inner!r}"
        )
    return [1] + [_as_pos_int(x, "each tt rank") for x in inner] + [1]


def _check_pq(p_shapes: Sequence[int], q_shapes: Sequence[int]):
    p = [_as_pos_int(x, "p_shapes entries") for x in p_shapes]
    q = [_as_pos_int(x, "q_shapes entries") for x in q_shapes]
    if len(p) != len(q):
        raise ValueError(f"p_shapes and q_shapes must have the same length, got {len(p)} and {len(q)}")
    if len(p) < 1:
        raise ValueError("p_shapes/q_shapes must be non-empty")
    return p, q


def max_ranks(p_shapes: Sequence[int], q_shapes: Sequence[int]) -> List[int]:
    """Largest useful full rank list: ``r_k <= min(prod_{j<=k} p_j q_j, prod_{j>k} p_j q_j)``.

    ``r_k`` is the rank of the k-th unfolding matrix, so larger ranks only add
    redundant parameters.
    """
    p, q = _check_pq(p_shapes, q_shapes)
    d = len(p)
    sizes = [a * b for a, b in zip(p, q)]
    out = [1]
    for k in range(1, d):
        out.append(min(_prod(sizes[:k]), _prod(sizes[k:])))
    out.append(1)
    return out


def clip_ranks(ranks, p_shapes: Sequence[int], q_shapes: Sequence[int]) -> List[int]:
    """Clip ranks elementwise to :func:`max_ranks`; returns the full rank list.

    ``ranks`` may be an int, the ``d-1`` inner ranks or a full list of ``d+1``.
    """
    p, q = _check_pq(p_shapes, q_shapes)
    d = len(p)
    if not isinstance(ranks, bool) and hasattr(ranks, "__len__") and len(ranks) == d + 1:
        ranks = list(ranks)
        if int(ranks[0]) != 1 or int(ranks[-1]) != 1:
            raise ValueError(f"a full rank list must start and end with 1, got {ranks!r}")
        ranks = ranks[1:-1]
    fr = full_ranks(ranks, d)
    mr = max_ranks(p, q)
    return [min(a, b) for a, b in zip(fr, mr)]


def tt_num_parameters(p_shapes: Sequence[int], q_shapes: Sequence[int], ranks: Sequence[int]) -> int:
    """Number of TT parameters ``sum_k p_k r_{k-1} q_k r_k`` (``ranks`` = full list)."""
    p, q = _check_pq(p_shapes, q_shapes)
    ranks = [int(r) for r in ranks]
    if len(ranks) != len(p) + 1:
        raise ValueError(f"ranks must be the full list of length d+1 = {len(p) + 1}, got {ranks!r}")
    return sum(p[k] * ranks[k] * q[k] * ranks[k + 1] for k in range(len(p)))


def compression_ratio(num_embeddings: int, embedding_dim: int, p_shapes, q_shapes, ranks) -> float:
    """Dense parameter count ``N*D`` divided by the TT parameter count."""
    return float(num_embeddings) * float(embedding_dim) / tt_num_parameters(p_shapes, q_shapes, ranks)


def ranks_for_compression_ratio(
    num_embeddings: int, embedding_dim: int, target_ratio: float, p_shapes, q_shapes
) -> int:
    """Largest uniform rank R whose (clipped) TT table still compresses by >= ``target_ratio``.

    Lets users size a table from a memory budget.  The parameter count is
    non-decreasing in R and stops growing once every rank is clipped, so we
    binary-search ``R in [1, max(max_ranks)]``.  Raises ``ValueError`` if even
    ``R = 1`` is too large.
    """
    n = _as_pos_int(num_embeddings, "num_embeddings")
    dim = _as_pos_int(embedding_dim, "embedding_dim")
    target = float(target_ratio)
    if not target > 0:
        raise ValueError(f"target_ratio must be > 0, got {target_ratio!r}")
    p, q = _check_pq(p_shapes, q_shapes)
    d = len(p)

    def ratio(r: int) -> float:
        return compression_ratio(n, dim, p, q, clip_ranks(r, p, q))

    if ratio(1) < target:
        raise ValueError(
            f"cannot reach compression ratio {target} with p_shapes={p}, q_shapes={q}: "
            f"rank 1 already gives only {ratio(1):.4g}"
        )
    lo, hi = 1, max(max_ranks(p, q)) if d > 1 else 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ratio(mid) >= target:
            lo = mid
        else:
            hi = mid - 1
    return lo
