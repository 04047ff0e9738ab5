import math

import pytest
import torch

from torchrec_tt.init import (
    INIT_METHODS,
    core_std,
    init_cores_,
    sampled_gaussian,
    truncated_normal_variance,
)
from torchrec_tt.reference import tt_full_weight
from torchrec_tt.shapes import full_ranks


def make_cores(p, q, ranks, dtype=torch.float32):
    r = full_ranks(ranks, len(p))
    return [torch.empty(p[k], r[k], q[k], r[k + 1], dtype=dtype) for k in range(len(p))]


# (p_shapes, q_shapes, inner ranks, num_embeddings)
SHAPES = [
    ([100, 100], [8, 8], 16, 9950),
    ([100, 90], [16, 4], [32], 9000),
    ([20, 20, 20], [4, 4, 4], 8, 7990),
    ([24, 20, 18], [4, 2, 8], [16, 4], 8600),
    ([16, 10, 10, 16], [4, 2, 2, 4], [8, 8, 8], 25000),
    ([16, 9, 10, 16], [4, 2, 2, 4], [8, 2, 6], 23000),
]


@pytest.mark.parametrize("method", INIT_METHODS)
@pytest.mark.parametrize("p,q,ranks,n", SHAPES)
def test_rebuilt_row_statistics(method, p, q, ranks, n):
    # Pool a few independent initialisations: the realised variance of one
    # table fluctuates with the (finite) number of entries in each core.
    g = torch.Generator().manual_seed(1234)
    sums, sq_sums, count = 0.0, 0.0, 0
    for _ in range(6):
        cores = make_cores(p, q, ranks)
        init_cores_(cores, n, method=method, generator=g)
        w = tt_full_weight(cores, n).double()
        sums += w.sum().item()
        sq_sums += (w * w).sum().item()
        count += w.numel()
    target = 1.0 / math.sqrt(3 * n)
    mean = sums / count
    std = math.sqrt(sq_sums / count - mean * mean)
    assert abs(mean) < 0.1 * target
    assert std == pytest.approx(target, rel=0.1)


@pytest.mark.parametrize("threshold", [0.0, 0.5, 1.0, 2.0])
def test_sampled_gaussian_threshold(threshold):
    p, q, ranks, n = [20, 20, 20], [4, 4, 4], 8, 8000
    cores = make_cores(p, q, ranks)
    init_cores_(cores, n, method="sampled_gaussian", threshold=threshold, generator=torch.Generator().manual_seed(0))
    sigma = core_std(n, full_ranks(ranks, 3))
    scale = sigma / math.sqrt(truncated_normal_variance(threshold))
    for c in cores:
        assert torch.isfinite(c).all()
        assert (c.abs() >= threshold * scale * (1 - 1e-6)).all()
        # both signs occur, variance matches sigma^2
        assert (c > 0).any() and (c < 0).any()
        if c.numel() > 5000:
            assert c.double().std().item() == pytest.approx(sigma, rel=0.05)
    w = tt_full_weight(cores, n).double()
    assert w.std().item() == pytest.approx(1 / math.sqrt(3 * n), rel=0.1)


def test_truncated_normal_variance_matches_samples():
    t = 1.0
    x = torch.empty(400000, dtype=torch.float64)
    sampled_gaussian(x, std=1.0, threshold=t, generator=torch.Generator().manual_seed(3))
    assert x.var().item() == pytest.approx(1.0, rel=0.02)
    assert x.mean().item() == pytest.approx(0.0, abs=0.01)
    # unscaled draws of |x| >= t have variance v_t
    v = truncated_normal_variance(t)
    assert (x.abs() >= t / math.sqrt(v) - 1e-12).all()
    assert v == pytest.approx(1 + t * math.exp(-t * t / 2) / math.sqrt(2 * math.pi) / (0.5 * math.erfc(t / math.sqrt(2))))
    assert truncated_normal_variance(0.0) == 1.0


def test_core_std_formula():
    assert core_std(1000, [1, 4, 4, 1]) == pytest.approx((1 / (3 * 1000 * 16)) ** (1 / 6))
    assert core_std(10, [1, 3, 1]) == pytest.approx((1 / (3 * 10 * 3)) ** (1 / 4))
    assert core_std(10**7, [1, 128, 128, 128, 1]) > 0


def test_deterministic_with_generator_and_inplace():
    cores_a = make_cores([10, 10, 10], [2, 2, 2], 3)
    cores_b = make_cores([10, 10, 10], [2, 2, 2], 3)
    ptrs = [c.data_ptr() for c in cores_a]
    out = init_cores_(cores_a, 1000, generator=torch.Generator().manual_seed(7))
    init_cores_(cores_b, 1000, generator=torch.Generator().manual_seed(7))
    assert out is cores_a
    assert [c.data_ptr() for c in cores_a] == ptrs
    for a, b in zip(cores_a, cores_b):
        assert torch.equal(a, b)


def test_parameters_and_dtypes():
    params = torch.nn.ParameterList(
        [torch.nn.Parameter(c) for c in make_cores([10, 10], [4, 4], 4, dtype=torch.float64)]
    )
    for method in INIT_METHODS:
        init_cores_(params, 100, method=method)
        for c in params:
            assert c.dtype == torch.float64 and c.requires_grad and torch.isfinite(c).all()
    half = make_cores([10, 10], [4, 4], 4, dtype=torch.bfloat16)
    init_cores_(half, 100)
    assert all(c.dtype == torch.bfloat16 and torch.isfinite(c.float()).all() for c in half)


def test_bad_arguments():
    cores = make_cores([4, 4], [2, 2], 2)
    with pytest.raises(ValueError, match="sampled_gaussian"):
        init_cores_(cores, 16, method="xavier")
    with pytest.raises(ValueError):
        init_cores_(cores, 16, threshold=-1.0)
    with pytest.raises(ValueError):
        init_cores_([torch.empty(4, 1, 2, 3), torch.empty(4, 2, 2, 1)], 16)
