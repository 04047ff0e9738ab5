"""Hot-row cache (issue 5): read-cache equality, dense-equivalent training of cached rows,
eviction with write-back, checkpoint resume, replicated ranks, several tables, bad config."""
import copy
import os
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
import torch.nn.functional as F

from torchrec_tt import TTEmbeddingBag
from torchrec_tt.modules.cache import TTRowCache
from torchrec_tt.reference import tt_rows

sys.path.insert(0, os.path.dirname(__file__))
from dist_utils import run_ranks  # noqa: E402

torch.set_num_threads(2)
SHAPE = dict(tt_ranks=8, tt_p_shapes=[8, 8, 8], tt_q_shapes=[2, 2, 2])  # 512 x 8


def skewed(n, hi, gen, lo=0):
    """Ids in [lo, hi) with a heavy head (squared uniform)."""
    return lo + (torch.rand(n, generator=gen).square() * (hi - lo)).long()


def twin(table):
    """The same table without a cache (cores and fused state copied)."""
    kw = dict(tt_ranks=table.ranks[1:-1], tt_p_shapes=table.p_shapes, tt_q_shapes=table.q_shapes,
              mode=table.mode, optimizer=table.optimizer, bounds_check_mode=table.bounds_check_mode,
              dtype=table.cores[0].dtype, include_last_offset=table.include_last_offset)
    plain = TTEmbeddingBag(table.num_embeddings, table.embedding_dim, **kw)
    plain.load_state_dict({k: v for k, v in table.state_dict().items() if not k.startswith("cache.")})
    return plain


def check_invariants(cache):
    live = cache.cached_ids >= 0
    ids = cache.cached_ids[live]
    assert ids.unique().numel() == ids.numel(), "an id cached twice"
    assert torch.equal(cache.slots_of(ids), torch.nonzero(live).reshape(-1)), "id -> slot map is stale"
    assert torch.equal(cache.slots_of(torch.arange(cache.num_embeddings)) >= 0,
                       torch.isin(torch.arange(cache.num_embeddings), ids))
    assert not cache.weight[~live].any() and not cache.trained[~live].any()


def overlay_lookup(table, ids, offsets, psw=None):
    """What a cached table must return: dense lookup on the cores' table with cached rows put in."""
    W = table.cache.overlay(table.full_weight().detach())
    return F.embedding_bag(ids, W, offsets, mode=table.mode, per_sample_weights=psw,
                           include_last_offset=table.include_last_offset)


# ---- inference: a read cache ---------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("optimizer", [None, "adagrad"])
def test_inference_equals_uncached(mode, optimizer):
    g = torch.Generator().manual_seed(0)
    t = TTEmbeddingBag(512, 8, **SHAPE, mode=mode, optimizer=optimizer, cache_rows=64, name="t1",
                       bounds_check_mode="ignore")
    t.cache.observe(skewed(4000, 512, g))
    t.refresh_cache()
    assert t.cache_stats()["cached_rows"] == 64
    plain = twin(t).eval()
    t.eval()
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            ids = skewed(300, 512, g)
            ids[::37] = 600  # out of range: dropped in both (ignore mode), also from the mean's divisor
            offsets = torch.tensor([0, 0, 5, 100, 101, 250])
            psw = torch.rand(300, generator=g)
            torch.testing.assert_close(t(ids, offsets, psw), plain(ids, offsets, psw), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(t(ids, offsets), plain(ids, offsets), rtol=1e-5, atol=1e-6)
            two_d = skewed(60, 512, g).view(12, 5)
            torch.testing.assert_close(t(two_d), plain(two_d), rtol=1e-5, atol=1e-6)
    s = t.cache_stats()
    assert s["hits"] > 0 and s["misses"] > 0 and 0.25 < s["hit_rate"] < 1  # P(id < 64) = 0.35
    assert t.cache.steps == 0, "eval lookups are not training steps"


def test_bad_ids_still_raise_with_table_name():
    t = TTEmbeddingBag(512, 8, **SHAPE, cache_rows=16, name="clicks")
    t.cache.observe(torch.arange(16))
    t.refresh_cache()
    with pytest.raises(IndexError, match="clicks"):
        t(torch.tensor([1, 2, 512]), torch.tensor([0]))


# ---- training: cached rows train like a dense table ----------------------------------------------

@pytest.mark.parametrize("optimizer,mode", [("sgd", "sum"), ("adagrad", "mean"), ("rowwise_adagrad", "sum"),
                                            (None, "sum"), (None, "mean")])
def test_unlimited_cache_trains_like_dense(optimizer, mode):
    lr, eps, n = 0.1, 1e-8, 64
    t = TTEmbeddingBag(n, 8, tt_ranks=4, tt_p_shapes=[4, 4, 4], tt_q_shapes=[2, 2, 2], mode=mode, dtype=torch.float64,
                       optimizer=None if optimizer is None else (optimizer if optimizer != "sgd" else "sgd"),
                       cache_rows=n, cache_refresh_interval=10**6, name="unlimited")
    if t.optimizer is not None:
        t.optimizer.learning_rate, t.optimizer.eps = lr, eps
    t.cache.observe(torch.arange(n))
    t.refresh_cache()
    assert t.cache_stats()["cached_rows"] == n
    cores0 = [c.detach().clone() for c in t.cores]
    W = torch.nn.Parameter(t.full_weight().detach().clone())
    dense_opt = torch.optim.SGD([W], lr=lr) if optimizer in ("sgd", None) else \
        torch.optim.Adagrad([W], lr=lr, eps=eps) if optimizer == "adagrad" else None
    cache_opt = torch.optim.SGD(t.parameters(), lr=lr) if optimizer is None else None
    state = torch.zeros(n, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    for step in range(6):
        ids = skewed(40, n, g)
        offsets = torch.tensor([0, 7, 7, 20, 33])
        psw = torch.rand(40, generator=g, dtype=torch.float64) if mode == "sum" else None
        target = torch.randn(5, 8, generator=g, dtype=torch.float64)
        out = t(ids, offsets, psw)
        ref = F.embedding_bag(ids, W, offsets, mode=mode, per_sample_weights=psw)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
        (out - target).square().sum().backward()
        (ref - target).square().sum().backward()
        if cache_opt is not None:
            cache_opt.step()
            cache_opt.zero_grad()
        if dense_opt is not None:
            dense_opt.step()
        else:  # row-wise Adagrad, FBGEMM's rule
            with torch.no_grad():
                state += W.grad.square().mean(1)
                W -= lr * W.grad / (state.sqrt() + eps).unsqueeze(1)
        W.grad = None
        slots = t.cache.slots_of(torch.arange(n))
        torch.testing.assert_close(t.cache.weight.detach()[slots], W.detach(), rtol=1e-10, atol=1e-12)
    for a, b in zip(t.cores, cores0):  # cached ids never reach the TT chain
        assert torch.equal(a.detach(), b)
    assert t.cache_stats()["hit_rate"] == 1.0
    assert t.cache.trained.any()


# ---- eviction / admission cycles ---------------------------------------------------------------

@pytest.mark.parametrize("optimizer", ["sgd", None])
def test_eviction_cycles_write_back_and_stay_consistent(optimizer, seed=1):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    t = TTEmbeddingBag(512, 8, **SHAPE, optimizer=optimizer, cache_rows=24, cache_refresh_interval=4,
                       cache_decay=0.8, dtype=torch.float64, name="cyc")
    if t.optimizer is not None:
        t.optimizer.learning_rate = 0.05
    opt = torch.optim.SGD(t.parameters(), lr=0.05) if optimizer is None else None
    checked = 0
    for step in range(40):
        hot = (step // 8) * 60  # the hot set moves every 8 steps: trained rows must be evicted
        ids = torch.cat([skewed(30, hot + 30, g, lo=hot), torch.randint(0, 512, (10,), generator=g)])
        offsets = torch.tensor([0, 10, 20, 30])
        if t.cache.steps % t.cache.refresh_interval == 0 and t.cache.steps:
            before_ids = t.cache.cached_ids.clone()
            before_rows = t.cache.weight.detach().clone()
            before_trained = t.cache.trained.clone()
        else:
            before_ids = None
        t.train()
        out = t(ids, offsets)
        if before_ids is not None:  # a refresh ran at the start of this forward
            gone = (before_ids >= 0) & before_trained & ~torch.isin(before_ids, t.cache.cached_ids)
            if gone.any():
                held, back = before_rows[gone], tt_rows(list(t.cores), before_ids[gone]).detach()
                stale = t.cache_stats()["writeback_residual_before"]
                rel = float((back - held).norm() / held.norm())
                assert rel < 0.03 and rel < 0.05 * stale, (rel, stale)  # L-BFGS, 50 steps: ~0.3-2 % left
                assert rel == pytest.approx(t.cache_stats()["writeback_residual"], rel=1e-6, abs=1e-9)
                checked += 1
        out.square().sum().backward()
        if opt is not None:
            opt.step()
            opt.zero_grad()
        check_invariants(t.cache)
        t.eval()
        with torch.no_grad():
            probe = torch.randint(0, 512, (50,), generator=g)
            torch.testing.assert_close(t(probe, offsets), overlay_lookup(t, probe, offsets), rtol=1e-9, atol=1e-12)
    s = t.cache_stats()
    assert checked >= 3 and s["evictions"] > 0 and s["rows_written_back"] > 0
    assert s["writeback_residual"] <= s["writeback_residual_before"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_table_writes_back_through_an_fp32_fit(dtype, seed=1):
    """fp16 / bf16 cores: evicted rows are fitted in fp32 and rounded once (L-BFGS on fp16 slices overflowed
    in its line search: 'value cannot be converted to type c10::Half'); the residual reported is the
    rounded cores' own, within the dtype's rounding of the fp32 fit."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    t = TTEmbeddingBag(512, 8, **SHAPE, optimizer="rowwise_adagrad", cache_rows=24, cache_refresh_interval=4,
                       cache_decay=0.8, dtype=dtype, name="half")
    t.optimizer.learning_rate = 0.05
    checked = 0
    for step in range(40):
        hot = (step // 8) * 60  # the hot set moves every 8 steps: trained rows must be evicted
        ids = torch.cat([skewed(30, hot + 30, g, lo=hot), torch.randint(0, 512, (10,), generator=g)])
        refresh = t.cache.steps % t.cache.refresh_interval == 0 and t.cache.steps
        before_ids, before_rows, before_trained = (t.cache.cached_ids.clone(), t.cache.weight.detach().float(),
                                                   t.cache.trained.clone())
        out = t(ids, torch.tensor([0, 10, 20, 30]))
        gone = (before_ids >= 0) & before_trained & ~torch.isin(before_ids, t.cache.cached_ids)
        if refresh and gone.any():
            held = before_rows[gone]
            back = tt_rows([c.detach().float() for c in t.cores], before_ids[gone])
            rel, s = float((back - held).norm() / held.norm()), t.cache_stats()
            assert rel == pytest.approx(s["writeback_residual"], rel=1e-3)
            assert rel < 0.01 and rel < 0.05 * s["writeback_residual_before"], (rel, s)
            checked += 1
        out.float().square().sum().backward()
        assert all(c.dtype == dtype and torch.isfinite(c).all() for c in t.cores)
    assert checked >= 3 and t.cache_stats()["rows_written_back"] > 0


def test_refresh_refuses_non_finite_rows_and_leaves_state_untouched():
    """A diverged cached row (NaN) cannot be written back: refresh raises naming the table before it
    changes anything (L-BFGS on it crashed with 'value cannot be converted to type float')."""
    t = TTEmbeddingBag(512, 8, **SHAPE, optimizer=None, cache_rows=16, cache_refresh_interval=1000, name="clicks")
    g = torch.Generator().manual_seed(3)
    t(skewed(64, 40, g), torch.arange(0, 64, 8)).sum().backward()
    t.refresh_cache()
    t(skewed(64, 40, g), torch.arange(0, 64, 8)).sum().backward()
    live = torch.nonzero(t.cache.cached_ids >= 0).reshape(-1)
    with torch.no_grad():
        t.cache.weight[live[0], 3] = float("nan")
    before = copy.deepcopy(t.state_dict())
    with pytest.raises(FloatingPointError, match=r"table 'clicks': the hot-row cache holds NaN or infinity"):
        t.refresh_cache()
    for k, v in t.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, equal_nan=True, msg=k)


def test_counts_decay_and_stay_bounded():
    t = TTEmbeddingBag(512, 8, **SHAPE, cache_rows=8, cache_refresh_interval=5, cache_decay=0.5, name="dec")
    t.train()
    with torch.no_grad():
        for step in range(30):  # old hot ids (0..7) stop appearing; new ones (100..107) take over
            ids = torch.arange(8) + (0 if step < 10 else 100)
            t(ids.repeat(3), torch.tensor([0]))
            assert t.cache.cand_ids.numel() == t.cache.candidates == 32  # fixed memory
            assert t.cache.slot_counts.numel() == 8
    assert set(t.cache.cached_ids.tolist()) == set(range(100, 108))
    # the evicted ids went back to the candidates with their counts, which have aged away
    old = t.cache.cand_counts[torch.isin(t.cache.cand_ids, torch.arange(8))]
    assert old.numel() == 8 and old.max() < 1e-3 * t.cache.slot_counts.min()


@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.integers(0, 5), min_size=0, max_size=60), k=st.integers(1, 70))
def test_candidate_selection_equals_stable_sort(counts, k):
    """The merge keeps the k largest counts, ties to the lower index (ids are sorted, so to the lower
    id): the same set as the first k of a stable descending sort, found without sorting."""
    c = torch.tensor(counts, dtype=torch.float64) / 4  # few distinct values: many ties
    want = torch.sort(c, descending=True, stable=True).indices[:k].sort().values
    assert torch.equal(torch.nonzero(TTRowCache._top_counts(c, k)).reshape(-1), want)
    # refresh: ties go to the ids already cached first
    cur = torch.arange(len(counts)) % 3 == 1
    order = torch.sort(cur.to(torch.int8), descending=True, stable=True).indices
    order = order[torch.sort(c[order], descending=True, stable=True).indices]
    want = order[:k].sort().values
    assert torch.equal(torch.nonzero(TTRowCache._top_counts(c, k, prefer=cur)).reshape(-1), want)


# ---- checkpoint ----------------------------------------------------------------------------------

def test_checkpoint_round_trip_resumes_exactly():
    def make():
        return TTEmbeddingBag(512, 8, **SHAPE, optimizer="adagrad", cache_rows=20, cache_refresh_interval=3,
                              name="ckpt")

    g = torch.Generator().manual_seed(5)
    batches = [torch.cat([skewed(30, 80, g), torch.randint(0, 512, (10,), generator=g)]) for _ in range(13)]
    offsets = torch.tensor([0, 13, 26])
    a = make()
    for ids in batches[:7]:
        a(ids, offsets).square().sum().backward()
    saved = copy.deepcopy(a.state_dict())
    assert {"cache.weight", "cache.cached_ids", "cache.cand_counts", "cache.optimizer_state",
            "cache.counters", "cache.pending_ids"} <= set(saved)
    outs_a = []
    for ids in batches[7:]:
        out = a(ids, offsets)
        out.square().sum().backward()
        outs_a.append(out.detach())
    b = make()
    b.load_state_dict(saved)
    assert b.cache.steps == 7 and b.cache_stats()["cached_rows"] == 20
    for ids, want in zip(batches[7:], outs_a):
        out = b(ids, offsets)
        out.square().sum().backward()
        assert torch.equal(out.detach(), want)
    for (k, v), (k2, w) in zip(a.state_dict().items(), b.state_dict().items()):
        assert k == k2 and torch.equal(v, w), k


# ---- several tables ------------------------------------------------------------------------------

def test_several_tables_at_once():
    g = torch.Generator().manual_seed(7)
    tables = torch.nn.ModuleDict({
        "a": TTEmbeddingBag(512, 8, **SHAPE, optimizer="sgd", cache_rows=16, cache_refresh_interval=3, name="a"),
        "b": TTEmbeddingBag(300, 4, tt_ranks=4, tt_q_shapes=[2, 2], mode="mean", cache_fraction=0.1,
                            cache_refresh_interval=2, name="b"),
        "c": TTEmbeddingBag(200, 8, tt_ranks=4, optimizer="rowwise_adagrad", cache_bytes=30 * (8 * 4 + 4),
                            cache_refresh_interval=4, name="c"),
        "d": TTEmbeddingBag(100, 8, tt_ranks=4, name="d"),  # no cache
    })
    assert [t.cache.rows if t.cache is not None else 0 for t in tables.values()] == [16, 30, 30, 0]
    opt = torch.optim.SGD(tables["b"].parameters(), lr=0.1)
    offsets = torch.tensor([0, 10, 25])
    for step in range(10):
        loss = sum(t(skewed(40, t.num_embeddings, g), offsets).square().sum() for t in tables.values())
        loss.backward()
        opt.step()
        opt.zero_grad()
    tables.eval()
    for name, t in tables.items():
        if t.cache is None:
            assert t.cache_stats() == {}
            continue
        check_invariants(t.cache)
        assert t.cache.steps == 10 and t.cache_stats()["cached_rows"] > 0
        ids = skewed(40, t.num_embeddings, g)
        with torch.no_grad():
            torch.testing.assert_close(t(ids, offsets), overlay_lookup(t, ids, offsets), rtol=1e-5, atol=1e-6)
    assert len({t.cache_stats()["hits"] for t in tables.values() if t.cache is not None}) > 1
    assert "b.cache.weight" in tables.state_dict() and "d.cache.weight" not in tables.state_dict()


# ---- bad config ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(cache_rows=-1), "cache_rows"), (dict(cache_rows=513), "exceeds"), (dict(cache_rows=2.5), "cache_rows"),
    (dict(cache_fraction=0.0), "cache_fraction"), (dict(cache_fraction=1.5), "cache_fraction"),
    (dict(cache_fraction=-0.1), "cache_fraction"), (dict(cache_bytes=-4), "cache_bytes"),
    (dict(cache_bytes=10**9), "more than"), (dict(cache_rows=4, cache_fraction=0.5), "only one"),
    (dict(cache_rows=4, cache_refresh_interval=0), "refresh_interval"),
    (dict(cache_rows=4, cache_refresh_interval=-3), "refresh_interval"),
    (dict(cache_refresh_interval=0), "refresh_interval"), (dict(cache_rows=4, cache_decay=0.0), "cache_decay"),
])
def test_bad_config_names_the_table(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        TTEmbeddingBag(512, 8, **SHAPE, name="user_ids", **kwargs)
    assert "user_ids" in str(info.value)


def test_cache_fraction_one_is_the_whole_table():
    t = TTEmbeddingBag(512, 8, **SHAPE, cache_fraction=1.0)
    assert t.cache.rows == 512


# ---- replicated data-parallel ranks --------------------------------------------------------------

def _table():
    torch.manual_seed(0)
    return TTEmbeddingBag(512, 8, **SHAPE, cache_rows=40, cache_refresh_interval=3, name="dp")


def _batches(rank, steps=9):
    g = torch.Generator().manual_seed(100 + rank)
    return [skewed(24, 150, g, lo=60 * rank) for _ in range(steps)]  # ranks see different hot ids


def _dp_rank(rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP
    t = _table()
    model = DDP(t, broadcast_buffers=False)  # rank-local counts until refresh
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    offsets = torch.tensor([0, 8, 16])
    for ids in _batches(rank):
        model(ids, offsets).square().sum().backward()
        opt.step()
        opt.zero_grad()
    t.refresh_cache()
    c = t.cache
    out = {"cached_ids": c.cached_ids, "weight": c.weight.detach(), "cand_ids": c.cand_ids,
           "cand_counts": c.cand_counts, **{f"core{k}": x.detach() for k, x in enumerate(t.cores)}}
    return {"stats": t.cache_stats(), **{k: v.numpy().copy() for k, v in out.items()}}  # plain pickles


def test_replicated_ranks_keep_identical_caches():
    r0, r1 = run_ranks(_dp_rank, world_size=2, timeout=120)
    for key in ("cached_ids", "weight", "cand_ids", "cand_counts", "core0", "core1", "core2"):
        assert (r0[key] == r1[key]).all(), key
    assert r0["stats"]["evictions"] == r1["stats"]["evictions"] and r0["stats"]["hits"] != r1["stats"]["hits"]
    # counts were combined: one process that saw both ranks' ids each step picks the same rows
    ref = _table()
    with torch.no_grad():
        for a, b in zip(_batches(0), _batches(1)):
            ref(torch.cat([a, b]), torch.tensor([0]))
    ref.refresh_cache()
    assert set(ref.cache.cached_ids.tolist()) == set(r0["cached_ids"].tolist())
    assert set((r0["cached_ids"] // 60).tolist()) >= {0, 1, 2}, "both ranks' hot ids are cached"


# ---- the CPU kernel's cached path against the tensor-op path ----------------------------------------

@pytest.mark.parametrize("optimizer,mode,weighted,int32,last", [
    ("sgd", "sum", False, False, True), ("sgd", "mean", True, True, False), ("adagrad", "sum", True, False, False),
    ("adagrad", "mean", False, True, True), ("rowwise_adagrad", "sum", True, True, True),
    ("rowwise_adagrad", "mean", False, False, False)])
def test_kernel_path_equals_tensor_op_path(optimizer, mode, weighted, int32, last):
    """Same table, same batches (incl. dropped out-of-range ids, empty bags, refreshes with
    evictions and write-back): outputs, cores, cached rows, optimizer state, flags and stats agree."""
    torch.manual_seed(5)
    a = TTEmbeddingBag(512, 8, **SHAPE, mode=mode, optimizer=optimizer, cache_rows=48, cache_refresh_interval=4,
                       dtype=torch.float64, include_last_offset=last, bounds_check_mode="ignore", name="k")
    b = copy.deepcopy(a)
    b.cache.use_kernel = False
    g = torch.Generator().manual_seed(6)
    for step in range(14):
        ids = skewed(90, 512, g, lo=(step // 5) * 150)  # the hot set moves: evictions, write-backs
        ids[::23] = 700  # dropped by both
        if int32:
            ids = ids.int()
        offsets = torch.tensor([0, 10, 10, 41, 77] + ([90] if last else []))
        psw = torch.rand(90, generator=g, dtype=torch.float64) if weighted else None
        target = torch.randn(5, 8, generator=g, dtype=torch.float64)
        outs = [t(ids, offsets, psw) for t in (a, b)]
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)
        for out in outs:
            (out - target).square().sum().backward()
    assert a.cache_stats()["evictions"] > 0 and a.cache_stats()["rows_written_back"] > 0
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12, msg=f"{name} differs")
    assert a.cache_stats() == b.cache_stats()


def test_kernel_path_rejects_bad_cache_arguments_untouched():
    from torchrec_tt import ops
    t = TTEmbeddingBag(512, 8, **SHAPE, optimizer="adagrad", cache_rows=16, name="bad_cache")
    t.cache.observe(torch.arange(16))
    t.refresh_cache()
    c = t.cache
    good = dict(cores=list(t.cores), optimizer_state=t.optimizer_state(), cache_weight=c.weight.data,
                cache_state=c.optimizer_state, cache_map=c._map, cache_trained=c.trained)
    before = [x.clone() for x in (*t.cores, c.weight, c.optimizer_state)]
    ids, offsets = torch.tensor([1, 2, 300]), torch.tensor([0, 1])
    cases = [(dict(cache_weight=c.weight.data.double()), TypeError, "cache weight must have the cores' dtype"),
             (dict(cache_weight=c.weight.data[:, :4]), ValueError, r"cache weight must have shape \[rows > 0, 8\]"),
             (dict(cache_state=c.optimizer_state[:, :2].contiguous()), ValueError,
              "cache optimizer state must have shape"),
             (dict(cache_state=c.optimizer_state.t()), ValueError, "cache tensors must be contiguous"),
             (dict(cache_map=c._map.int()), ValueError, "cache map must be int64"),
             (dict(cache_trained=c.trained[:3]), ValueError, r"cache trained flags must be bool \[16\]")]
    for change, exc, match in cases:
        args = {**good, **change}
        with pytest.raises(exc, match=f"table 'bad_cache': {match}"):
            out, _ = ops.tt_cached_embedding_bag_fused(
                args["cores"], args["optimizer_state"], args["cache_weight"], args["cache_state"], args["cache_map"],
                args["cache_trained"], ids, offsets, num_embeddings=512, optimizer="adagrad", learning_rate=0.1,
                table_name="bad_cache")
            out.sum().backward()
    with pytest.raises(IndexError, match="table 'bad_cache': id 512"):
        t(torch.tensor([1, 512]), torch.tensor([0])).sum().backward()
    for x, y in zip(before, (*t.cores, c.weight, c.optimizer_state)):
        assert torch.equal(x, y)
    # a map with no empty entry (garbage ids): probes stop after one pass over it; every id is rebuilt
    full = torch.full_like(c._map, 600 << c._shift)
    with torch.no_grad():
        out, where = ops.tt_cached_embedding_bag_fused(
            good["cores"], good["optimizer_state"], c.weight.data, c.optimizer_state, full, c.trained, ids, offsets,
            num_embeddings=512, optimizer="adagrad", learning_rate=0.1, table_name="bad_cache")
    assert torch.equal(where, torch.full((3,), -1))
    rows = t.rows(ids).detach()  # bags [1] and [2, 300], all from the cores
    torch.testing.assert_close(out, torch.stack([rows[0], rows[1:].sum(0)]))


def test_opcheck_cached_op():
    from torchrec_tt import ops
    t = TTEmbeddingBag(512, 8, **SHAPE, optimizer="rowwise_adagrad", cache_rows=16, name="op")
    t.cache.observe(torch.arange(16))
    t.refresh_cache()
    c = t.cache
    ids, offsets, psw = torch.tensor([1, 2, 300, 7, 7]), torch.tensor([0, 2, 2, 5]), torch.rand(5)
    cache = (c.weight.data, c.optimizer_state, c._map, c.trained)
    torch.library.opcheck(torch.ops.torchrec_tt.tt_cached_embedding_bag_fused.default,
                          (list(t.cores), t.optimizer_state(), *cache, ids, offsets, psw, 512, 0, True, 0,
                           "rowwise_adagrad", 0.1, 1e-8, "op"))
    out, where = ops.tt_cached_embedding_bag_fused(list(t.cores), t.optimizer_state(), *cache, ids, offsets, psw,
                                                   num_embeddings=512, optimizer="rowwise_adagrad",
                                                   learning_rate=0.1, include_last_offset=True)
    slots = c.slots_of(ids)
    assert (slots[[0, 1, 3, 4]] >= 0).all() and where.tolist() == slots.tolist()  # 1, 2, 7 cached; 300 rebuilt
    bad = torch.tensor([7, 600, 300])
    _, where = ops.tt_cached_embedding_bag_fused(list(t.cores), t.optimizer_state(), *cache, bad, torch.tensor([0]),
                                                 num_embeddings=512, optimizer="rowwise_adagrad", learning_rate=0.1,
                                                 bounds_check_mode="ignore")
    assert where.tolist() == [int(slots[3]), -2, -1]  # cached, dropped, rebuilt
    grad = torch.randn(3, 8)
    torch.library.opcheck(torch.ops.torchrec_tt.tt_cached_embedding_bag_backward_fused_.default,
                          (grad, [x.detach().clone() for x in t.cores], [s.clone() for s in t.optimizer_state()],
                           c.weight.data.clone(), c.optimizer_state.clone(), c._map, c.trained.clone(), ids, offsets,
                           psw, 512, 0, True, "rowwise_adagrad", 0.1, 1e-8, "op"))


def test_count_op_matches_its_definition_and_rejects_bad_input():
    """tt_cache_count_ (the kernel path's bookkeeping) against a direct computation; bad slots,
    dtypes or a full buffer raise naming the table and write nothing; opcheck."""
    from torchrec_tt import ops
    g = torch.Generator().manual_seed(3)
    where = torch.randint(-2, 6, (50,), generator=g)
    ids = torch.randint(0, 1000, (50,), generator=g)
    counts, stats = torch.rand(6, generator=g, dtype=torch.float64), torch.tensor([5, 7, 1])
    p_ids, p_steps = torch.full((80,), -1), torch.zeros(80, dtype=torch.long)
    want_counts = counts.clone()
    for w in where[where >= 0].tolist():
        want_counts[w] += 0.25
    miss = where == -1
    added = ops.tt_cache_count_(where, ids, counts, stats, p_ids, p_steps, fill=10, weight=0.25, step=3,
                                training=True, table_name="cnt")
    assert added == int(miss.sum())
    assert torch.equal(counts, want_counts)
    assert stats.tolist() == [5 + int((where >= 0).sum()), 7 + added, 1]
    assert p_ids[10:10 + added].tolist() == ids[miss].tolist() and (p_steps[10:10 + added] == 3).all()
    assert (p_ids[:10] == -1).all() and (p_ids[10 + added:] == -1).all()
    assert ops.tt_cache_count_(where, ids, counts, stats, p_ids, p_steps, fill=79, weight=1.0, step=4,
                               training=False, table_name="cnt") == 0  # eval: statistics only
    assert torch.equal(counts, want_counts) and stats[1] == 7 + 2 * added
    before = [x.clone() for x in (counts, stats, p_ids, p_steps)]
    cases = [(dict(where=torch.tensor([0, 6, 1])), IndexError, r"cache slot 6 at position 1 is outside \[-2, 6\)"),
             (dict(where=torch.tensor([0, -3, 1])), IndexError, "cache slot -3"),
             (dict(counts=counts.float()), TypeError, "cache counting takes int64 .* and float64 slot counts"),
             (dict(fill=78), ValueError, "pending buffer of 80 entries cannot take 3 more ids at fill 78")]
    for change, exc, match in cases:
        a = {**dict(where=torch.tensor([0, 1, -1]), ids=ids[:3], counts=counts, fill=0), **change}
        with pytest.raises(exc, match=f"table 'cnt': {match}"):
            ops.tt_cache_count_(a["where"], a["ids"], a["counts"], stats, p_ids, p_steps, fill=a["fill"], weight=1.0,
                                step=5, training=True, table_name="cnt")
    for x, y in zip(before, (counts, stats, p_ids, p_steps)):
        assert torch.equal(x, y)
    torch.library.opcheck(torch.ops.torchrec_tt.tt_cache_count_.default,
                          (where, ids, counts.clone(), stats.clone(), p_ids.clone(), p_steps.clone(), 0, 0.5, 1, True,
                           "cnt"))
