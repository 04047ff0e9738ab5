"""Inference deployment: torch.export (dynamic batch sizes) and AOTInductor of a TT table, and
torch.export / torch.compile of the collection with its KeyedJaggedTensor input, as the stock EBC."""
import pytest
import torch
from torch.export import Dim
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor

from torchrec_tt import TTEmbeddingBag
from torchrec_tt.config import TTEmbeddingBagConfig
from torchrec_tt.modules.tt_embedding_bag_collection import TTEmbeddingBagCollection


def batch(gen, n_ids, n_bags, n_rows=1000):
    ids = torch.randint(0, n_rows, (n_ids,), generator=gen)
    offsets = torch.sort(torch.randint(0, n_ids + 1, (n_bags,), generator=gen)).values
    offsets[0] = 0
    return ids, offsets


def test_table_exports_with_dynamic_batch_and_runs_under_aot_inductor(tmp_path):
    torch.manual_seed(0)
    table = TTEmbeddingBag(1000, 12, tt_ranks=[4, 3], tt_p_shapes=[10, 10, 10], tt_q_shapes=[2, 3, 2],
                           mode="mean", name="users").eval()
    gen = torch.Generator().manual_seed(1)
    ids, offsets = batch(gen, 40, 8)
    program = torch.export.export(table, (ids, offsets),
                                  dynamic_shapes=({0: Dim("ids", min=2, max=1 << 20)},
                                                  {0: Dim("bags", min=2, max=1 << 16)}))
    for n_ids, n_bags in [(40, 8), (3, 2), (517, 64)]:  # other batch shapes than traced
        ids, offsets = batch(gen, n_ids, n_bags)
        torch.testing.assert_close(program.module()(ids, offsets), table(ids, offsets), rtol=0, atol=0)
    with pytest.raises(IndexError, match=r"table 'users': id 1000 at position 2 is out of range"):
        program.module()(torch.tensor([1, 2, 1000]), torch.tensor([0, 1]))  # the op checks when the program runs

    package = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "tt_table.pt2"))
    compiled = torch._inductor.aoti_load_package(package)
    ids, offsets = batch(gen, 300, 33)
    torch.testing.assert_close(compiled(ids, offsets), table(ids, offsets))


@pytest.mark.parametrize("optimizer", ["rowwise_adagrad", None])  # the cache's kernel path, its tensor-op path
def test_cached_table_exports_its_trained_rows(optimizer):
    # After training, a cached id's row lives in the cache (trained there, not yet written back to
    # the cores): the exported program must read it from there, as eager eval does.
    torch.manual_seed(0)
    table = TTEmbeddingBag(1000, 8, tt_ranks=4, optimizer=optimizer, cache_rows=50, name="users")
    opt = torch.optim.SGD(table.parameters(), lr=0.5) if optimizer is None else None
    gen = torch.Generator().manual_seed(4)
    for step in range(4):
        table(torch.randint(0, 60, (64,), generator=gen), torch.arange(0, 64, 4)).square().sum().backward()
        if opt is not None:
            opt.step()
            opt.zero_grad()
        if step == 1:
            table.refresh_cache()  # rows admitted, then trained for two steps
    table.eval()
    ids, offsets = batch(gen, 40, 8, n_rows=60)
    program = torch.export.export(table, (ids, offsets), dynamic_shapes=({0: Dim("ids", min=2, max=1 << 20)},
                                                                          {0: Dim("bags", min=2, max=1 << 16)}))
    uncached = TTEmbeddingBag(1000, 8, tt_ranks=4, name="users").eval()
    uncached.load_state_dict({k: v for k, v in table.state_dict().items() if k.startswith("cores")})
    ids, offsets = batch(gen, 77, 9, n_rows=60)
    out = program.module()(ids, offsets)
    torch.testing.assert_close(out, table(ids, offsets), rtol=0, atol=0)
    assert (out - uncached(ids, offsets)).abs().max() > 1e-3  # the cached rows did count


def make_collection(weighted):
    tables = [
        EmbeddingBagConfig(name="country", embedding_dim=4, num_embeddings=30, feature_names=["country"]),
        TTEmbeddingBagConfig(name="user", embedding_dim=8, num_embeddings=1000, feature_names=["user", "friend"],
                             tt_ranks=4),
        TTEmbeddingBagConfig(name="item", embedding_dim=6, num_embeddings=500, feature_names=["item"], tt_ranks=3,
                             tt_q_shapes=[1, 2, 3]),
    ]
    torch.manual_seed(0)
    return TTEmbeddingBagCollection(tables, is_weighted=weighted).eval()


def kjt(gen, batch_size, weighted):
    sizes = {"country": 30, "user": 1000, "friend": 1000, "item": 500}
    lengths = torch.randint(0, 4, (len(sizes) * batch_size,), generator=gen)
    values = torch.cat([torch.randint(0, n, (int(lengths[i * batch_size:(i + 1) * batch_size].sum()),), generator=gen)
                        for i, n in enumerate(sizes.values())])
    weights = torch.rand(values.numel(), generator=gen) if weighted else None
    return KeyedJaggedTensor(keys=list(sizes), values=values, lengths=lengths, weights=weights)


@pytest.mark.parametrize("weighted", [False, True])
def test_collection_exports_with_dynamic_ids(weighted):
    model = make_collection(weighted)
    gen = torch.Generator().manual_seed(2)
    example = kjt(gen, 4, weighted)
    ids = Dim("ids", min=2, max=1 << 20)
    # KJT leaves: values, weights, lengths, offsets, stride per rank, inverse indices
    dims = [{0: ids}, {0: ids} if weighted else None, None, None, None, None]
    program = torch.export.export(model, (example,), dynamic_shapes=(dims,), strict=False)
    for _ in range(3):  # same batch size, other numbers of ids per feature
        features = kjt(gen, 4, weighted)
        out, ref = program.module()(features), model(features)
        assert out.keys() == ref.keys()
        torch.testing.assert_close(out.values(), ref.values(), rtol=0, atol=0)


def test_collection_compiles_fullgraph_like_eager():
    model = make_collection(False)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    gen = torch.Generator().manual_seed(3)
    features = kjt(gen, 5, False)
    torch.testing.assert_close(compiled(features).values(), model(features).values())
    bad = KeyedJaggedTensor(keys=features.keys(), values=features.values().float(), lengths=features.lengths())
    # the structural checks are traced too: with fullgraph, Dynamo reports the error it met (its own type)
    with pytest.raises(Exception, match="values must be int32 or int64"):
        compiled(bad)


def test_torchrec_int8_quantization_takes_the_dense_tables_and_keeps_tt_exact():
    # torchrec.inference's quantize_embeddings swaps the dense child EBC for its int8 version; the TT
    # tables (already 17-300x smaller) stay as they are.
    import torchrec.quant.embedding_modules as quant
    from torchrec.inference.modules import quantize_embeddings

    class Model(torch.nn.Module):
        def __init__(self, sparse):
            super().__init__()
            self.sparse = sparse

        def forward(self, features):
            return self.sparse(features)

    model = Model(make_collection(False))
    features = kjt(torch.Generator().manual_seed(5), 6, False)
    ref = model(features)
    quantized = quantize_embeddings(model, dtype=torch.qint8, inplace=False)
    assert isinstance(quantized.sparse.dense, quant.EmbeddingBagCollection)
    out = quantized(features)
    assert out.keys() == ref.keys()
    for key in ref.keys():
        if key == "country":  # int8 rows: within the per-row quantisation step
            torch.testing.assert_close(out[key], ref[key], rtol=0, atol=0.02)
        else:
            torch.testing.assert_close(out[key], ref[key], rtol=0, atol=0)
