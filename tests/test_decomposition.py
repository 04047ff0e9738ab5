import pytest
import torch
from hypothesis import given, settings, strategies as st

from torchrec_tt.decomposition import tt_svd
from torchrec_tt.reference import tt_full_weight
from torchrec_tt.shapes import full_ranks


def random_cores(p, q, ranks, gen, dtype=torch.float64):
    r = full_ranks(ranks, len(p))
    return [torch.randn(p[k], r[k], q[k], r[k + 1], generator=gen, dtype=dtype) for k in range(len(p))]


def core_ranks(cores):
    return [1] + [int(c.shape[3]) for c in cores]


def check_layout(cores, p, q):
    assert len(cores) == len(p)
    prev = 1
    for k, c in enumerate(cores):
        assert c.dim() == 4 and c.is_contiguous()
        assert c.shape[0] == p[k] and c.shape[2] == q[k] and c.shape[1] == prev
        prev = c.shape[3]
    assert prev == 1


@settings(max_examples=25, deadline=None)
@given(
    d=st.integers(2, 4),
    data=st.data(),
)
def test_exact_recovery(d, data):
    p = data.draw(st.lists(st.integers(1, 5), min_size=d, max_size=d))
    q = data.draw(st.lists(st.integers(1, 4), min_size=d, max_size=d))
    inner = data.draw(st.lists(st.integers(1, 4), min_size=d - 1, max_size=d - 1))
    R = max(inner)
    seed = data.draw(st.integers(0, 2**31 - 1))
    cores = random_cores(p, q, inner, torch.Generator().manual_seed(seed))
    N = 1
    for x in p:
        N *= x
    w = tt_full_weight(cores, N)
    out, err = tt_svd(w, p, q, R)
    check_layout(out, p, q)
    assert all(r <= R for r in core_ranks(out))
    assert err < 1e-5
    assert torch.allclose(tt_full_weight(out, N), w, atol=1e-8 * max(1.0, w.abs().max().item()))


def test_exact_recovery_float32_and_mixed_ranks():
    p, q = [6, 5, 4], [4, 2, 4]
    cores = random_cores(p, q, [3, 5], torch.Generator().manual_seed(0), dtype=torch.float32)
    w = tt_full_weight(cores, 120)
    out, err = tt_svd(w, p, q, [3, 5])
    assert all(c.dtype == torch.float32 for c in out)
    assert core_ranks(out) == [1, 3, 5, 1]
    assert err < 1e-5
    # asking for more rank than the data has: ranks stay at the true ones
    out, err = tt_svd(w, p, q, 50)
    assert core_ranks(out) == [1, 3, 5, 1]
    assert err < 1e-5


def test_padded_rows():
    # N < prod(p): padding rows are zero; error is measured on real rows only
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(50, 16, generator=gen, dtype=torch.float64)
    out, err = tt_svd(w, [4, 4, 4], [4, 2, 2], 1000)
    check_layout(out, [4, 4, 4], [4, 2, 2])
    assert err < 1e-10
    assert torch.allclose(tt_full_weight(out, 50), w, atol=1e-10)


def test_random_dense_error_decreases_with_rank():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(500, 32, generator=gen)
    p, q = [8, 8, 8], [4, 4, 2]
    errs = []
    for r in (1, 2, 4, 8, 16):
        out, err = tt_svd(w, p, q, r)
        check_layout(out, p, q)
        assert all(x <= r for x in core_ranks(out))
        assert 0.0 < err < 1.0
        # error reported matches an independent recomputation
        rebuilt = tt_full_weight([c.double() for c in out], 500)
        ref = (rebuilt - w.double()).norm() / w.double().norm()
        assert err == pytest.approx(ref.item(), rel=1e-4)
        errs.append(err)
    assert all(a > b for a, b in zip(errs, errs[1:]))
    # full rank reproduces the table
    _, err = tt_svd(w, p, q, 10**6)
    assert err < 1e-5


def test_zero_table_and_errors():
    out, err = tt_svd(torch.zeros(10, 8), [4, 3], [4, 2], 3)
    assert err == 0.0
    check_layout(out, [4, 3], [4, 2])
    with pytest.raises(ValueError):
        tt_svd(torch.zeros(10, 8), [3, 3], [4, 2], 3)  # prod(p) < N
    with pytest.raises(ValueError):
        tt_svd(torch.zeros(10, 8), [4, 3], [4, 3], 3)  # prod(q) != D
    with pytest.raises(ValueError):
        tt_svd(torch.zeros(10, 8), [4, 3], [4, 2], [2, 2])  # wrong number of ranks


@settings(max_examples=30, deadline=None)
@given(d=st.integers(2, 4), data=st.data())
def test_error_is_the_distance_of_the_rebuilt_rows(d, data):
    """The reported error (blockwise GEMMs against the contracted tail) equals the reference's
    row-by-row rebuild, with padded rows (N < prod(p)) and lossy ranks; blocks smaller than a slice too."""
    from torchrec_tt.decomposition import _distance
    p = data.draw(st.lists(st.integers(1, 6), min_size=d, max_size=d))
    q = data.draw(st.lists(st.integers(1, 4), min_size=d, max_size=d))
    P = 1
    for x in p:
        P *= x
    N = data.draw(st.integers(1, P))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    w = torch.randn(N, int(torch.tensor(q).prod()), generator=g, dtype=torch.float64)
    cores, err = tt_svd(w, p, q, data.draw(st.integers(1, 3)))
    want = torch.linalg.norm(tt_full_weight(cores, N) - w)
    assert err == pytest.approx(float(want / torch.linalg.norm(w)), rel=1e-9, abs=1e-12)
    for block_rows in (1, 7, 1 << 20):
        assert float(_distance(cores, w, block_rows)) == pytest.approx(float(want), rel=1e-9, abs=1e-12)
