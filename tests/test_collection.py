"""TTEmbeddingBagCollection vs torchrec.EmbeddingBagCollection with the TT tables densified."""
import dataclasses

import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType
from torchrec.optim.optimizers import in_backward_optimizer_filter

from torchrec_tt.config import TTEmbeddingBagConfig
from torchrec_tt.modules.tt_embedding_bag_collection import TTEmbeddingBagCollection


def make_tables(pooling=PoolingType.SUM, optimizer=None):
    return [
        EmbeddingBagConfig(name="d0", embedding_dim=4, num_embeddings=20, feature_names=["f0"], pooling=pooling),
        TTEmbeddingBagConfig(name="t0", embedding_dim=8, num_embeddings=150, feature_names=["f1", "f2"],
                             pooling=pooling, tt_ranks=3, optimizer=optimizer),
        EmbeddingBagConfig(name="d1", embedding_dim=6, num_embeddings=30, feature_names=["f3"], pooling=pooling),
        TTEmbeddingBagConfig(name="t1", embedding_dim=4, num_embeddings=64, feature_names=["f4"],
                             pooling=pooling, tt_p_shapes=[4, 4, 4], tt_q_shapes=[1, 2, 2], tt_ranks=[2, 3]),
    ]


def random_kjt(tables, batch, weighted, gen, keys=None):
    feats = [(f, t.num_embeddings) for t in tables for f in t.feature_names]
    if keys is not None:
        feats = sorted(feats, key=lambda x: keys.index(x[0]))
    lengths = torch.randint(0, 4, (len(feats) * batch,), generator=gen)
    values = torch.cat([torch.randint(0, n, (int(lengths[i * batch:(i + 1) * batch].sum()),), generator=gen)
                        for i, (_, n) in enumerate(feats)])
    weights = torch.rand(values.numel(), generator=gen) if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(keys=[f for f, _ in feats], values=values, lengths=lengths,
                                               weights=weights)


def reference(tt_ebc, tables, weighted):
    """A stock EBC with the same tables, all dense; weights copied (TT ones from full_weight())."""
    dense_tables = [EmbeddingBagConfig(name=t.name, embedding_dim=t.embedding_dim, num_embeddings=t.num_embeddings,
                                       feature_names=list(t.feature_names), pooling=t.pooling) for t in tables]
    ref = EmbeddingBagCollection(tables=dense_tables, is_weighted=weighted)
    with torch.no_grad():
        for t in tables:
            w = (tt_ebc.tt_tables[t.name].full_weight() if isinstance(t, TTEmbeddingBagConfig)
                 else tt_ebc.dense.embedding_bags[t.name].weight)
            ref.embedding_bags[t.name].weight.copy_(w)
    return ref


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
def test_matches_ebc_forward_backward(weighted, pooling):
    if weighted and pooling == PoolingType.MEAN:
        pytest.skip("the stock EBC (nn.EmbeddingBag) has no per-sample weights with mean pooling")
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    tables = make_tables(pooling)
    model = TTEmbeddingBagCollection(tables, is_weighted=weighted)
    ref = reference(model, tables, weighted)
    kjt = random_kjt(tables, 5, weighted, gen)
    out, ref_out = model(kjt), ref(kjt)
    assert out.keys() == ref_out.keys() == ["f0", "f1", "f2", "f3", "f4"]
    assert out.length_per_key() == ref_out.length_per_key() == [4, 8, 8, 6, 4]
    torch.testing.assert_close(out.values(), ref_out.values(), rtol=1e-5, atol=1e-6)

    # backward: the dense reference with the TT weights rebuilt differentiably from the cores
    g = torch.randn_like(out.values())
    (out.values() * g).sum().backward()
    cores = {n: [c.detach().clone().requires_grad_() for c in m.cores] for n, m in model.tt_tables.items()}
    from torchrec_tt.reference import tt_full_weight
    params = {f"embedding_bags.{n}.weight": tt_full_weight(cs, model.tt_tables[n].num_embeddings)
              for n, cs in cores.items()}
    ref_out2 = torch.func.functional_call(ref, params, (kjt,), strict=False)
    (ref_out2.values() * g).sum().backward()
    for n, cs in cores.items():
        for c, c_ref in zip(model.tt_tables[n].cores, cs):
            torch.testing.assert_close(c.grad, c_ref.grad, rtol=1e-4, atol=1e-5)
    for n in ["d0", "d1"]:
        torch.testing.assert_close(model.dense.embedding_bags[n].weight.grad, ref.embedding_bags[n].weight.grad)


def test_key_order_and_shared_feature():
    tables = [TTEmbeddingBagConfig(name="a", embedding_dim=4, num_embeddings=10, feature_names=["x"], tt_ranks=2),
              EmbeddingBagConfig(name="b", embedding_dim=2, num_embeddings=10, feature_names=["x", "y"])]
    model = TTEmbeddingBagCollection(tables)
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["y", "x"], values=torch.tensor([1, 2, 3]),
                                              lengths=torch.tensor([1, 0, 1, 1]))
    out = model(kjt)
    assert out.keys() == ["x@a", "x@b", "y"]
    assert out.values().shape == (2, 8)
    ref = reference(model, tables, False)
    torch.testing.assert_close(out.values(), ref(kjt).values())


def test_fused_tables_are_filtered_and_train_in_backward():
    tables = make_tables(optimizer="adagrad")
    model = TTEmbeddingBagCollection(tables)
    dense_names = {n for n, _ in in_backward_optimizer_filter(model.named_parameters())}
    assert not any(n.startswith("tt_tables.t0") for n in dense_names)
    assert any(n.startswith("tt_tables.t1") for n in dense_names) and "dense.embedding_bags.d0.weight" in dense_names
    before = [c.detach().clone() for c in model.tt_tables["t0"].cores]
    kjt = random_kjt(tables, 4, False, torch.Generator().manual_seed(0))
    model(kjt).values().sum().backward()
    assert all(c.grad is None for c in model.tt_tables["t0"].cores)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.tt_tables["t0"].cores))
    assert any(s.abs().sum() > 0 for s in model.tt_tables["t0"].optimizer_state())


def test_meta_device_and_configs():
    tables = make_tables()
    model = TTEmbeddingBagCollection(tables, device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert model.embedding_bag_configs() == tables
    assert [t.name for t in model.tt_configs()] == ["t0", "t1"]
    model.to_empty(device="cpu")
    model.reset_parameters()
    out = model(random_kjt(tables, 3, False, torch.Generator().manual_seed(0)))
    assert torch.isfinite(out.values()).all()


def test_bad_configs():
    with pytest.raises(ValueError, match="unique.*'t0'|t0"):
        TTEmbeddingBagCollection([EmbeddingBagConfig(name="t0", embedding_dim=4, num_embeddings=5, feature_names=["a"]),
                                  TTEmbeddingBagConfig(name="t0", embedding_dim=4, num_embeddings=5,
                                                       feature_names=["b"])])
    with pytest.raises(ValueError, match="table 'c': cache_rows=10 exceeds num_embeddings=5"):
        TTEmbeddingBagCollection([TTEmbeddingBagConfig(name="c", embedding_dim=4, num_embeddings=5,
                                                       feature_names=["a"], cache_rows=10)])
    with pytest.raises(ValueError, match="'c'.*pooling"):
        TTEmbeddingBagCollection([TTEmbeddingBagConfig(name="c", embedding_dim=4, num_embeddings=5,
                                                       feature_names=["a"], pooling=PoolingType.NONE)])


def test_bad_inputs():
    tables = make_tables()
    model = TTEmbeddingBagCollection(tables)
    good = random_kjt(tables, 2, False, torch.Generator().manual_seed(0))
    keys = good.keys()
    unknown = KeyedJaggedTensor.from_lengths_sync(keys=keys[:-1] + ["zz"], values=good.values(),
                                                  lengths=good.lengths())
    with pytest.raises(ValueError, match="unknown feature.*zz"):
        model(unknown)
    missing = KeyedJaggedTensor.from_lengths_sync(keys=keys[:-1], values=good.values()[:0],
                                                  lengths=torch.zeros(2 * (len(keys) - 1), dtype=torch.long))
    with pytest.raises(ValueError, match=r"\['f4'\] missing"):
        model(missing)
    mismatch = KeyedJaggedTensor(keys=keys, values=good.values()[:-1] if good.values().numel() else
                                 torch.tensor([0]), lengths=good.lengths())
    with pytest.raises(ValueError, match="lengths sum to"):
        model(mismatch)
    for feature, table, n in [("f2", "t0", 150), ("f3", "d1", 30)]:
        lengths = torch.ones(len(keys) * 2, dtype=torch.long)
        values = torch.zeros(len(keys) * 2, dtype=torch.long)
        values[keys.index(feature) * 2 + 1] = n
        bad = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values, lengths=lengths)
        with pytest.raises(IndexError, match=f"table '{table}'.*{n}"):
            model(bad)
    with pytest.raises(ValueError, match="weights"):
        TTEmbeddingBagCollection(tables, is_weighted=True)(good)
    vbe = KeyedJaggedTensor(keys=keys, values=torch.zeros(len(keys) + 1, dtype=torch.long),
                            lengths=torch.ones(len(keys) + 1, dtype=torch.long),
                            stride_per_key_per_rank=[[2]] + [[1]] * (len(keys) - 1))
    with pytest.raises(ValueError, match=r"batch size per feature \(variable stride, VBE\) is not supported"):
        model(vbe)
    floats = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=good.values().float(), lengths=good.lengths())
    with pytest.raises(TypeError, match=r"values must be int32 or int64, got torch.float32"):
        model(floats)  # (the dense tables' own error would name no table or feature)


@pytest.mark.parametrize("feature,table", [("f3", "d1"), ("f2", "t0")])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_name_the_table(feature, table, bad):
    # A dense table would pool a NaN weight silently; the TT op refuses it itself.
    tables = make_tables()
    model = TTEmbeddingBagCollection(tables, is_weighted=True)
    lengths = torch.ones(5 * 2, dtype=torch.long)
    keys = ["f0", "f1", "f2", "f3", "f4"]
    weights = torch.ones(10)
    weights[keys.index(feature) * 2 + 1] = bad
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.zeros(10, dtype=torch.long), lengths=lengths,
                                              weights=weights)
    with pytest.raises(ValueError, match=f"table '{table}'.*(NaN|infinit)"):
        model(kjt)


def test_cached_tables_read_like_uncached():
    """A config's hot-row cache reaches its table; in eval the cache is a read cache."""
    tables = make_tables()
    cached = [dataclasses.replace(t, cache_fraction=0.5, cache_refresh_interval=2) if isinstance(t, TTEmbeddingBagConfig)
              else t for t in tables]
    plain, model = TTEmbeddingBagCollection(tables), TTEmbeddingBagCollection(cached)
    model.load_state_dict(plain.state_dict(), strict=False)
    assert all(t.cache is not None for t in model.tt_tables.values())
    g = torch.Generator().manual_seed(3)
    for _ in range(3):  # training-mode forwards observe ids; refreshes admit rows from the cores
        model(random_kjt(tables, 8, False, g))
    for t in model.tt_tables.values():
        t.refresh_cache()
        assert t.cache_stats()["cached_rows"] > 0
    model.eval()
    kjt = random_kjt(tables, 8, False, g)
    with torch.no_grad():
        torch.testing.assert_close(model(kjt).values(), plain(kjt).values())


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("data_type", ["FP16", "BF16"])
def test_half_data_type_tables_train_on_cpu(data_type, weighted):
    # data_type FP16 / BF16: half cores (and fp32 optimizer state) computed in fp32 by the CPU op: the
    # output is the FP32 table's on the same rounded cores, rounded once; a fused step stays close.
    # Weighted: the KJT's weights are fp32, as TorchRec makes them (FBGEMM's TBE takes them with fp16
    # tables); the collection hands them to the table in its dtype.
    from torchrec.modules.embedding_configs import DataType
    dtype = {"FP16": torch.float16, "BF16": torch.bfloat16}[data_type]
    kw = dict(name="u", embedding_dim=8, num_embeddings=500, feature_names=["u"], tt_ranks=4,
              optimizer="rowwise_adagrad", learning_rate=0.1)
    half = TTEmbeddingBagCollection([TTEmbeddingBagConfig(**kw, data_type=DataType[data_type])], is_weighted=weighted)
    full = TTEmbeddingBagCollection([TTEmbeddingBagConfig(**kw)], is_weighted=weighted)
    with torch.no_grad():
        for a, b in zip(full.tt_tables["u"].cores, half.tt_tables["u"].cores):
            a.copy_(b.float())
    kjt = random_kjt([TTEmbeddingBagConfig(**kw)], 16, weighted, torch.Generator().manual_seed(0))
    if weighted:  # weights the half dtype holds exactly, so both tables see the same ones
        kjt = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths(),
                                weights=kjt.weights().to(dtype).float())
        assert kjt.weights().dtype == torch.float32
    out_half, out_full = half(kjt).values(), full(kjt).values()
    assert out_half.dtype == dtype
    assert torch.equal(out_half, out_full.to(out_half.dtype))
    out_half.float().square().sum().backward()
    out_full.square().sum().backward()
    tol = 2e-3 if data_type == "FP16" else 2e-2
    for a, b in zip(half.tt_tables["u"].cores, full.tt_tables["u"].cores):
        assert a.dtype == out_half.dtype
        torch.testing.assert_close(a.float(), b.detach(), rtol=tol, atol=tol)


def test_fx_tracing_as_a_leaf_module():
    """TorchRec's fx tracer: tracing through a TT collection is refused with the way out (the leaf
    module); traced as a leaf, the graph module computes what the eager model does, gradients too."""
    import torchrec.fx

    tables = make_tables()
    torch.manual_seed(0)
    ebc = TTEmbeddingBagCollection(tables)
    width = sum(t.embedding_dim * len(t.feature_names) for t in tables)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ebc, self.out = ebc, torch.nn.Linear(width, 1)

        def forward(self, kjt):
            return self.out(self.ebc(kjt).values())

    model = Model()
    with pytest.raises(TypeError, match=r"leaf_modules=\['TTEmbeddingBagCollection'\]"):
        torchrec.fx.symbolic_trace(model)
    traced = torchrec.fx.symbolic_trace(model, leaf_modules=["TTEmbeddingBagCollection"])
    assert any(n.op == "call_module" and n.target == "ebc" for n in traced.graph.nodes)
    kjt = random_kjt(tables, 3, False, torch.Generator().manual_seed(1))
    eager = model(kjt)
    eager.sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    out = traced(kjt)
    out.sum().backward()
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    for p, g in zip(traced.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)


@pytest.mark.parametrize("weighted", [False, True])
def test_empty_batch_gives_no_rows_and_changes_nothing(weighted):
    """A KJT of no bags (batch size 0; torchrec's own EBC fails on it in KJT.to_dict): [0, width] out,
    keys as for any batch, and a backward through it leaves every table (fused, cached) as it was."""
    tables = make_tables(optimizer="sgd")
    tables.append(TTEmbeddingBagConfig(name="t2", embedding_dim=4, num_embeddings=500, feature_names=["f5"],
                                       tt_ranks=2, optimizer="rowwise_adagrad", cache_fraction=0.05))
    torch.manual_seed(0)
    model = TTEmbeddingBagCollection(tables, is_weighted=weighted)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    keys = [f for t in tables for f in t.feature_names]
    empty = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.zeros(0, dtype=torch.long),
                                                lengths=torch.zeros(0, dtype=torch.long),
                                                weights=torch.zeros(0) if weighted else None)
    out = model(empty)
    width = sum(t.embedding_dim * len(t.feature_names) for t in tables)
    assert out.values().shape == (0, width) and out.values().dtype == torch.float32
    assert out.keys() == model.embedding_names()
    out.values().sum().backward()
    for k, v in model.state_dict().items():
        if not k.endswith("cache.counters"):  # (the cache counts the batch as a training step)
            torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)
    # the next real batch still works
    batch = random_kjt(tables, 2, weighted, torch.Generator().manual_seed(2))
    assert model(batch).values().shape == (2, width)
