import string

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from torchrec_tt.reference import row_digits, tt_embedding_bag_reference, tt_full_weight, tt_rows
from torchrec_tt.shapes import full_ranks


def prod(xs):
    out = 1
    for x in xs:
        out *= int(x)
    return out


def random_cores(p, q, ranks, seed, dtype=torch.float64, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    r = full_ranks(ranks, len(p))
    return [
        torch.randn(p[k], r[k], q[k], r[k + 1], generator=g, dtype=dtype).requires_grad_(requires_grad)
        for k in range(len(p))
    ]


def einsum_dense(cores, num_embeddings):
    """Independent dense reconstruction: one einsum over all cores.

    W[(i_1..i_d), (j_1..j_d)] = sum_a prod_k G_k[i_k, a_{k-1}, j_k, a_k]
    """
    d = len(cores)
    letters = iter(string.ascii_letters)
    ii = [next(letters) for _ in range(d)]
    jj = [next(letters) for _ in range(d)]
    aa = [next(letters) for _ in range(d + 1)]
    terms = [ii[k] + aa[k] + jj[k] + aa[k + 1] for k in range(d)]
    # boundary ranks are 1: sum them out as well
    expr = ",".join(terms) + "->" + "".join(ii) + "".join(jj)
    full = torch.einsum(expr, *cores)
    P = prod(c.shape[0] for c in cores)
    D = prod(c.shape[2] for c in cores)
    return full.reshape(P, D)[:num_embeddings]


def random_bags(gen, n_rows, n_bags, max_len, allow_empty=True):
    lengths = torch.randint(0 if allow_empty else 1, max_len + 1, (n_bags,), generator=gen)
    offsets = torch.zeros(n_bags, dtype=torch.long)
    offsets[1:] = torch.cumsum(lengths, 0)[:-1]
    L = int(lengths.sum())
    indices = torch.randint(0, n_rows, (L,), generator=gen)
    return indices, offsets, lengths


def test_row_digits():
    p = [3, 4, 5]
    ids = torch.arange(60)
    d1, d2, d3 = row_digits(ids, p)
    assert torch.equal(d1 * 20 + d2 * 5 + d3, ids)
    assert int(d1.max()) == 2 and int(d2.max()) == 3 and int(d3.max()) == 4
    assert [int(x) for x in row_digits(torch.tensor([37]), p)] == [1, 3, 2]


def test_chain_convention_explicit():
    # row i = G1[i1] . G2[i2] with G_k[i_k] viewed (r_{k-1}, q_k r_k)
    cores = random_cores([3, 4], [2, 3], 2, seed=0)
    i = 7
    i1, i2 = i // 4, i % 4
    P1 = cores[0][i1].reshape(2, 2)  # (q1, r1)
    P2 = (P1 @ cores[1][i2].reshape(2, 3)).reshape(6)
    assert torch.allclose(tt_rows(cores, torch.tensor([i]))[0], P2)


@settings(max_examples=40, deadline=None)
@given(d=st.integers(2, 4), data=st.data())
def test_tt_rows_vs_einsum(d, data):
    p = data.draw(st.lists(st.integers(1, 4), min_size=d, max_size=d))
    q = data.draw(st.lists(st.integers(1, 3), min_size=d, max_size=d))
    ranks = data.draw(st.lists(st.integers(1, 3), min_size=d - 1, max_size=d - 1))
    P = prod(p)
    N = data.draw(st.integers(1, P))
    cores = random_cores(p, q, ranks, seed=data.draw(st.integers(0, 10**6)))
    dense = einsum_dense(cores, N)
    ids = torch.tensor(data.draw(st.lists(st.integers(0, N - 1), min_size=0, max_size=30)), dtype=torch.long)
    rows = tt_rows(cores, ids)
    assert rows.shape == (ids.numel(), prod(q))
    assert torch.allclose(rows, dense[ids], atol=1e-12, rtol=1e-10)
    assert torch.allclose(tt_full_weight(cores, N, chunk_size=data.draw(st.integers(1, 50))), dense, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    d=st.integers(2, 4),
    data=st.data(),
    mode=st.sampled_from(["sum", "mean"]),
    include_last_offset=st.booleans(),
    weighted=st.booleans(),
)
def test_bag_vs_torch_embedding_bag(d, data, mode, include_last_offset, weighted):
    if weighted and mode == "mean":
        mode = "sum"  # torch only supports per_sample_weights with sum
    p = data.draw(st.lists(st.integers(1, 4), min_size=d, max_size=d))
    q = data.draw(st.lists(st.integers(1, 3), min_size=d, max_size=d))
    ranks = data.draw(st.lists(st.integers(1, 3), min_size=d - 1, max_size=d - 1))
    N = data.draw(st.integers(1, prod(p)))
    seed = data.draw(st.integers(0, 10**6))
    cores = random_cores(p, q, ranks, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    n_bags = data.draw(st.integers(1, 8))
    indices, offsets, _ = random_bags(gen, N, n_bags, 5)
    psw = torch.randn(indices.numel(), generator=gen, dtype=torch.float64) if weighted else None
    if include_last_offset:
        offsets = torch.cat([offsets, torch.tensor([indices.numel()])])
    out = tt_embedding_bag_reference(cores, indices, offsets, psw, mode=mode, include_last_offset=include_last_offset)
    W = tt_full_weight(cores, N)
    expected = F.embedding_bag(
        indices, W, offsets, mode=mode, per_sample_weights=psw, include_last_offset=include_last_offset
    )
    assert out.shape == expected.shape == (n_bags, prod(q))
    assert torch.allclose(out, expected, atol=1e-12, rtol=1e-10)


def manual_bags(W, indices, offsets, weights, mode):
    bounds = offsets.tolist() + [indices.numel()]
    out = []
    for b in range(len(offsets)):
        s, e = bounds[b], bounds[b + 1]
        acc = torch.zeros(W.shape[1], dtype=W.dtype)
        for j in range(s, e):
            w = 1.0 if weights is None else weights[j]
            acc = acc + w * W[indices[j]]
        if mode == "mean" and e > s:
            acc = acc / (e - s)
        out.append(acc)
    return torch.stack(out)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_bag_manual_with_empty_bags(mode, weighted):
    cores = random_cores([5, 4, 3], [2, 2, 3], [3, 2], seed=1)
    N = 55
    W = tt_full_weight(cores, N)
    indices = torch.tensor([3, 54, 0, 7, 7, 12, 40, 1])
    offsets = torch.tensor([0, 0, 3, 3, 3, 6, 8])  # empty bags at 0, 2, 3 and the last one
    weights = torch.linspace(-1, 2, indices.numel(), dtype=torch.float64) if weighted else None
    out = tt_embedding_bag_reference(cores, indices, offsets, weights, mode=mode)
    expected = manual_bags(W, indices, offsets, weights, mode)
    assert torch.allclose(out, expected, atol=1e-12)
    for b in (0, 2, 3, 6):
        assert torch.equal(out[b], torch.zeros_like(out[b]))
    # include_last_offset drops nothing when the last offset is the end
    out2 = tt_embedding_bag_reference(
        cores, indices, torch.cat([offsets, torch.tensor([8])]), weights, mode=mode, include_last_offset=True
    )
    assert torch.allclose(out2, out)
    if not weighted:
        e = F.embedding_bag(indices, W, offsets, mode=mode)
        assert torch.allclose(out, e, atol=1e-12)


def test_bag_edge_cases():
    cores = random_cores([3, 3], [2, 2], 2, seed=2)
    empty = torch.empty(0, dtype=torch.long)
    out = tt_embedding_bag_reference(cores, empty, torch.tensor([0, 0, 0]))
    assert out.shape == (3, 4) and torch.equal(out, torch.zeros(3, 4, dtype=torch.float64))
    out = tt_embedding_bag_reference(cores, empty, torch.tensor([0]), include_last_offset=True)
    assert out.shape == (0, 4)
    with pytest.raises(ValueError):
        tt_embedding_bag_reference(cores, torch.tensor([1]), torch.tensor([0]), mode="max")
    with pytest.raises(IndexError):
        tt_rows(cores, torch.tensor([9]))
    # int32 indices/offsets
    idx = torch.tensor([1, 2, 8], dtype=torch.int32)
    off = torch.tensor([0, 1], dtype=torch.int32)
    W = tt_full_weight(cores, 9)
    assert torch.allclose(
        tt_embedding_bag_reference(cores, idx, off), F.embedding_bag(idx.long(), W, off.long(), mode="sum")
    )


def test_autograd_matches_dense_gradient():
    p, q = [4, 3, 2], [2, 3, 2]
    cores = random_cores(p, q, [2, 3], seed=3, requires_grad=True)
    gen = torch.Generator().manual_seed(3)
    indices, offsets, _ = random_bags(gen, 20, 6, 4)
    psw = torch.randn(indices.numel(), generator=gen, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(6, 12, generator=gen, dtype=torch.float64)

    out = tt_embedding_bag_reference(cores, indices, offsets, psw)
    g_ref = torch.autograd.grad((out * grad_out).sum(), cores + [psw])

    W = einsum_dense(cores, 20)
    expected = F.embedding_bag(indices, W, offsets, mode="sum", per_sample_weights=psw)
    g_dense = torch.autograd.grad((expected * grad_out).sum(), cores + [psw])
    for a, b in zip(g_ref, g_dense):
        assert torch.allclose(a, b, atol=1e-10)


def test_gradcheck_small():
    cores = random_cores([2, 3], [2, 2], 2, seed=4, requires_grad=True)
    indices = torch.tensor([0, 5, 3, 3])
    offsets = torch.tensor([0, 1, 1])
    w = torch.rand(4, dtype=torch.float64, requires_grad=True)

    def f(c0, c1, w):
        return tt_embedding_bag_reference([c0, c1], indices, offsets, w, mode="mean")

    assert torch.autograd.gradcheck(f, (cores[0], cores[1], w))
