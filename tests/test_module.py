"""TTEmbeddingBag: construction, helpers, TT-SVD warm start, nn.EmbeddingBag-style inputs."""
import math

import pytest
import torch
import torch.nn.functional as F

from torchrec_tt import TTEmbeddingBag
from torchrec_tt.shapes import ranks_for_compression_ratio


def test_automatic_shapes_cover_the_table():
    t = TTEmbeddingBag(10_131_227, 16, tt_ranks=8, device="meta")
    assert math.prod(t.p_shapes) >= 10_131_227 and math.prod(t.q_shapes) == 16
    assert len(t.cores) == 3 and t.ranks == [1, 8, 8, 1]
    assert t.compression_ratio() == pytest.approx(10_131_227 * 16 / t.num_tt_parameters())
    assert t.tt_bytes() == 4 * t.num_tt_parameters()


def test_ranks_are_clipped_to_what_shapes_allow():
    t = TTEmbeddingBag(100, 4, tt_ranks=64, tt_p_shapes=[10, 10], tt_q_shapes=[2, 2])
    assert t.ranks == [1, 20, 1]


def test_meta_device_then_materialise():
    t = TTEmbeddingBag(1000, 8, tt_ranks=4, device="meta", optimizer="adagrad")
    assert all(c.is_meta for c in t.cores)
    t = t.to_empty(device="cpu")
    t.reset_parameters()
    out = t(torch.tensor([1, 2, 999]), torch.tensor([0, 2]))
    assert out.shape == (2, 8) and torch.isfinite(out).all()
    assert all(torch.count_nonzero(s) == 0 for s in t.optimizer_state())


def test_default_init_has_dense_default_spread():
    n = 50_000
    t = TTEmbeddingBag(n, 16, tt_ranks=16)
    w = t.full_weight()
    target = 1 / math.sqrt(3 * n)
    assert abs(w.std().item() - target) < 0.1 * target
    assert abs(w.mean().item()) < 0.1 * target


def test_rows_and_full_weight_agree_and_check_ids():
    t = TTEmbeddingBag(500, 6, tt_ranks=3)
    ids = torch.tensor([0, 499, 17, 17])
    torch.testing.assert_close(t.rows(ids), t.full_weight()[ids])
    with pytest.raises(IndexError, match="table 'tt_table': ids must be in"):
        t.rows(torch.tensor([500]))


def test_two_dimensional_input_is_fixed_size_bags():
    t = TTEmbeddingBag(300, 5, tt_ranks=3, mode="mean")
    ids = torch.randint(0, 300, (4, 3))
    w = torch.rand(4, 3)
    torch.testing.assert_close(t(ids), t(ids.reshape(-1), torch.arange(0, 12, 3)))
    torch.testing.assert_close(t(ids, per_sample_weights=w), t(ids.reshape(-1), torch.arange(0, 12, 3), w.reshape(-1)))
    dense = F.embedding_bag(ids, t.full_weight(), mode="mean")
    torch.testing.assert_close(t(ids), dense)


def test_from_dense_recovers_exact_tt_table():
    src = TTEmbeddingBag(8 * 9 * 10, 12, tt_ranks=[3, 4], tt_p_shapes=[8, 9, 10], tt_q_shapes=[2, 3, 2],
                         dtype=torch.float64)
    w = src.full_weight().detach()
    t = TTEmbeddingBag.from_dense(w, tt_ranks=[6, 6], tt_p_shapes=[8, 9, 10], tt_q_shapes=[2, 3, 2])
    assert t.reconstruction_error < 1e-8
    assert t.ranks[1] <= 3 and t.ranks[2] <= 4
    torch.testing.assert_close(t.full_weight(), w)
    ids, offsets = torch.tensor([5, 700, 3]), torch.tensor([0, 1])
    torch.testing.assert_close(t(ids, offsets), F.embedding_bag(ids, w, offsets, mode="sum"))


def test_from_dense_reports_error_of_a_lossy_fit():
    torch.manual_seed(0)
    w = torch.randn(1000, 16)
    errors = [TTEmbeddingBag.from_dense(w, tt_ranks=r, num_cores=2).reconstruction_error for r in (2, 8, 16)]
    assert 0 < errors[2] < errors[1] < errors[0] < 1


def test_ranks_for_target_compression_ratio():
    p, q = [200, 220, 250], [2, 2, 4]
    r = ranks_for_compression_ratio(10_131_227, 16, 300, p, q)
    t = TTEmbeddingBag(10_131_227, 16, tt_ranks=r, tt_p_shapes=p, tt_q_shapes=q, device="meta")
    t_more = TTEmbeddingBag(10_131_227, 16, tt_ranks=r + 1, tt_p_shapes=p, tt_q_shapes=q, device="meta")
    assert t.compression_ratio() >= 300 > t_more.compression_ratio()


@pytest.mark.parametrize("kwargs,msg", [
    (dict(tt_p_shapes=[5, 5], tt_q_shapes=[2, 4]), r"prod\(tt_p_shapes\)=25 < num_embeddings=100"),
    (dict(tt_p_shapes=[10, 10], tt_q_shapes=[3, 3]), r"prod\(tt_q_shapes\)=9 != embedding_dim=8"),
    (dict(mode="max"), "unsupported pooling mode 'max'"),
    (dict(weights_init="xavier"), "unknown weights_init 'xavier'"),
    (dict(bounds_check_mode="sometimes"), "unknown bounds_check_mode"),
    (dict(tt_p_shapes=[100], tt_q_shapes=[8]), "need >= 2 cores"),
])
def test_bad_configuration(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        TTEmbeddingBag(100, 8, **kwargs)
