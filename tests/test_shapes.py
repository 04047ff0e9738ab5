import math

import pytest
from hypothesis import given, settings, strategies as st

from torchrec_tt.shapes import (
    clip_ranks,
    compression_ratio,
    full_ranks,
    max_ranks,
    ranks_for_compression_ratio,
    suggest_p_shapes,
    suggest_q_shapes,
    tt_num_parameters,
)


def prod(xs):
    out = 1
    for x in xs:
        out *= x
    return out


def test_p_shapes_known():
    p = suggest_p_shapes(10131227, 3)
    assert len(p) == 3 and prod(p) >= 10131227
    assert all(210 <= x <= 220 for x in p)
    assert suggest_p_shapes(1, 3) == [1, 1, 1]
    assert suggest_p_shapes(8, 3) == [2, 2, 2]
    assert suggest_p_shapes(1000000, 2) == [1000, 1000]


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 10**9), d=st.integers(2, 5))
def test_p_shapes_property(n, d):
    p = suggest_p_shapes(n, d)
    assert len(p) == d
    assert all(isinstance(x, int) and x >= 1 for x in p)
    assert prod(p) >= n
    # balanced: every factor close to n**(1/d); padding small
    root = n ** (1.0 / d)
    assert max(p) <= math.ceil(root) + 1
    # small padding
    assert prod(p) <= 2 * n
    if n >= 10**4:
        assert prod(p) <= n * (1 + d / root)
        assert max(p) - min(p) <= 2


def test_q_shapes_known():
    assert suggest_q_shapes(64, 3) == [4, 4, 4]
    assert prod(suggest_q_shapes(128, 3)) == 128
    assert sorted(suggest_q_shapes(128, 3)) == [4, 4, 8]
    assert suggest_q_shapes(13, 3) == [13, 1, 1]
    assert suggest_q_shapes(1, 2) == [1, 1]
    assert sorted(suggest_q_shapes(16, 2)) == [4, 4]


@settings(max_examples=150, deadline=None)
@given(dim=st.integers(1, 4096), d=st.integers(2, 4))
def test_q_shapes_property(dim, d):
    q = suggest_q_shapes(dim, d)
    assert len(q) == d and prod(q) == dim and all(x >= 1 for x in q)
    assert q == sorted(q, reverse=True)


def test_full_ranks():
    assert full_ranks(4, 3) == [1, 4, 4, 1]
    assert full_ranks([2, 3], 3) == [1, 2, 3, 1]
    assert full_ranks((5,), 2) == [1, 5, 1]
    assert full_ranks([2, 3, 4], 4) == [1, 2, 3, 4, 1]
    for bad in (0, -1, [1], [1, 2, 3], [0, 2], [2.5, 1], "ab", 1.5, None, True):
        with pytest.raises(ValueError):
            full_ranks(bad, 3)


def test_max_and_clip_ranks():
    assert max_ranks([2, 3, 4], [1, 2, 2]) == [1, 2, 8, 1]
    assert max_ranks([10, 10], [4, 4]) == [1, 40, 1]
    assert clip_ranks(100, [2, 3, 4], [1, 2, 2]) == [1, 2, 8, 1]
    assert clip_ranks([1, 5], [2, 3, 4], [1, 2, 2]) == [1, 1, 5, 1]
    assert clip_ranks([1, 100, 3, 1], [2, 3, 4], [1, 2, 2]) == [1, 2, 3, 1]


def test_num_parameters_and_ratio():
    p, q, r = [10, 20, 30], [2, 4, 8], [1, 3, 5, 1]
    expected = 10 * 1 * 2 * 3 + 20 * 3 * 4 * 5 + 30 * 5 * 8 * 1
    assert tt_num_parameters(p, q, r) == expected
    assert compression_ratio(6000, 64, p, q, r) == pytest.approx(6000 * 64 / expected)
    with pytest.raises(ValueError):
        tt_num_parameters(p, q, [3, 5])


def test_ranks_for_compression_ratio():
    n, dim = 10131227, 128
    p, q = suggest_p_shapes(n, 3), suggest_q_shapes(dim, 3)
    for target in (10.0, 100.0, 1000.0, 10000.0):
        R = ranks_for_compression_ratio(n, dim, target, p, q)
        assert R >= 1
        assert compression_ratio(n, dim, p, q, clip_ranks(R, p, q)) >= target
        assert compression_ratio(n, dim, p, q, clip_ranks(R + 1, p, q)) < target
    with pytest.raises(ValueError):
        ranks_for_compression_ratio(n, dim, 1e12, p, q)
    # saturated: target below the ratio at max ranks returns the largest meaningful rank
    R = ranks_for_compression_ratio(8, 8, 1e-6, [2, 2, 2], [2, 2, 2])
    assert clip_ranks(R, [2, 2, 2], [2, 2, 2]) == max_ranks([2, 2, 2], [2, 2, 2])


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 10**6),
    dim=st.sampled_from([8, 16, 32, 64, 96, 128]),
    d=st.integers(2, 4),
    target=st.floats(0.5, 500.0),
)
def test_ranks_for_ratio_property(n, dim, d, target):
    p, q = suggest_p_shapes(n, d), suggest_q_shapes(dim, d)
    try:
        R = ranks_for_compression_ratio(n, dim, target, p, q)
    except ValueError:
        assert compression_ratio(n, dim, p, q, full_ranks(1, d)) < target
        return
    assert compression_ratio(n, dim, p, q, clip_ranks(R, p, q)) >= target
    if R < max(max_ranks(p, q)):
        assert compression_ratio(n, dim, p, q, clip_ranks(R + 1, p, q)) < target
