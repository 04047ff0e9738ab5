"""TTEmbeddingBagCollection.from_dense: a trained dense collection's weights into TT tables by TT-SVD."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from dist_utils import random_kjt, run_ranks  # noqa: E402

P, Q, N, D = [10, 10, 10], [2, 2, 2], 1000, 8


def configs(rank=8, **kw):
    from torchrec import EmbeddingBagConfig, PoolingType
    from torchrec_tt.config import TTEmbeddingBagConfig
    return [EmbeddingBagConfig(name="a", embedding_dim=4, num_embeddings=30, feature_names=["fa"]),
            TTEmbeddingBagConfig(name="b", embedding_dim=D, num_embeddings=N, feature_names=["fb", "fc"],
                                 tt_ranks=rank, tt_p_shapes=P, tt_q_shapes=Q, pooling=PoolingType.MEAN, **kw)]


def dense_twin(tables, weights):
    """The stock EBC with the same weights: what the TT collection replaces."""
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    plain = [EmbeddingBagConfig(name=t.name, embedding_dim=t.embedding_dim, num_embeddings=t.num_embeddings,
                                feature_names=t.feature_names, pooling=t.pooling) for t in tables]
    ebc = EmbeddingBagCollection(plain)
    with torch.no_grad():
        for t in plain:
            ebc.embedding_bags[t.name].weight.copy_(weights[t.name])
    return ebc


def low_rank_weight(rank, seed=0):
    from torchrec_tt.reference import tt_full_weight
    g = torch.Generator().manual_seed(seed)
    ranks = [1, rank, rank, 1]
    cores = [torch.randn(P[k], ranks[k], Q[k], ranks[k + 1], generator=g, dtype=torch.float64) for k in range(3)]
    return tt_full_weight(cores, N).float()


def test_exact_tt_rank_data_comes_back_exactly_at_the_ranks_it_needs():
    from torchrec_tt.modules.tt_embedding_bag_collection import TTEmbeddingBagCollection, tt_module_from_config
    tables = configs(rank=8)
    weights = {"a": torch.randn(30, 4), "b": low_rank_weight(3)}
    tt = TTEmbeddingBagCollection.from_dense(tables, weights)
    assert tt.reconstruction_errors()["b"] < 1e-6
    config = tt.tt_configs()[0]
    assert config.tt_ranks == [3, 3] and tt.tt_tables["b"].ranks == [1, 3, 3, 1]
    # the sharder rebuilds a table from its config: the shapes must be the same
    rebuilt = tt_module_from_config(config, torch.device("meta"))
    assert [c.shape for c in rebuilt.cores] == [c.shape for c in tt.tt_tables["b"].cores]
    ebc = dense_twin(tables, weights)
    for seed in range(5):
        kjt = random_kjt(tables, 6, seed, 0, 5)
        out, want = tt(kjt), ebc(kjt)
        assert out.keys() == want.keys() == ["fa", "fb", "fc"]
        torch.testing.assert_close(out.values(), want.values(), rtol=1e-4, atol=1e-5)


def test_lossy_ranks_report_the_error_of_the_cores_they_keep():
    from torchrec_tt.modules.tt_embedding_bag_collection import TTEmbeddingBagCollection
    from torchrec_tt.reference import tt_full_weight
    weight = torch.randn(N, D)
    errors = []
    for rank in (2, 6):
        tt = TTEmbeddingBagCollection.from_dense(configs(rank=rank), {"a": torch.randn(30, 4), "b": weight})
        cores = [c.detach().double() for c in tt.tt_tables["b"].cores]
        independent = float(torch.linalg.norm(tt_full_weight(cores, N) - weight.double()) / torch.linalg.norm(weight))
        assert tt.reconstruction_errors()["b"] == pytest.approx(independent, rel=1e-5)
        errors.append(independent)
    assert 0.1 < errors[1] < errors[0] < 1.0


def test_half_tables_get_rounded_cores_and_a_fresh_cache():
    from torchrec.modules.embedding_configs import DataType
    from torchrec_tt.modules.tt_embedding_bag_collection import TTEmbeddingBagCollection
    weights = {"a": torch.randn(30, 4), "b": low_rank_weight(3)}
    full = TTEmbeddingBagCollection.from_dense(configs(), weights)
    half = TTEmbeddingBagCollection.from_dense(configs(data_type=DataType.BF16, cache_rows=16), weights)
    assert all(c.dtype == torch.bfloat16 for c in half.tt_tables["b"].cores)
    assert int((half.tt_tables["b"].cache.cached_ids >= 0).sum()) == 0
    kjt = random_kjt(configs(), 6, 1, 1, 5)
    half.eval()
    torch.testing.assert_close(half(kjt).values().float(), full(kjt).values(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("weights, match", [
    ({"a": torch.randn(30, 4)}, "table 'b': no dense weight given"),
    ({"a": torch.randn(30, 4), "b": torch.randn(N, D + 1)}, r"table 'b': weight must be a float \[1000, 8\]"),
    ({"a": torch.randn(30, 4), "b": torch.zeros(N, D, dtype=torch.long)}, r"table 'b': weight must be a float"),
    ({"a": torch.full((30, 4), float("nan")), "b": torch.randn(N, D)}, "table 'a': weight has NaN"),
    ({"a": torch.randn(30, 4), "b": torch.randn(N, D), "z": torch.randn(3, 3)}, r"unknown table\(s\) \['z'\]"),
])
def test_bad_weights_name_the_table(weights, match):
    from torchrec_tt.modules.tt_embedding_bag_collection import TTEmbeddingBagCollection
    with pytest.raises(ValueError, match=match):
        TTEmbeddingBagCollection.from_dense(configs(), weights)


def _sharded(rank, world):
    from test_distributed import build
    from torchrec_tt.modules.tt_embedding_bag_collection import TTEmbeddingBagCollection
    tables = configs(rank=8)
    model = TTEmbeddingBagCollection.from_dense(tables, {"a": torch.randn(30, 4, generator=torch.Generator().manual_seed(1)),
                                                         "b": low_rank_weight(3)})
    _, ref, dmp, _ = build(rank, world, tables=tables, model=model, constraints={"a": "table_wise", "b": "table_wise"})
    kjt = random_kjt(tables, 6, rank, 0, 5)
    torch.testing.assert_close(dmp(kjt).values(), ref(kjt).values(), rtol=1e-5, atol=1e-6)
    return True


def test_warm_started_collection_shards_with_its_clipped_ranks():
    assert run_ranks(_sharded) == [True, True]
