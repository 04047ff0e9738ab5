"""Planner extension: TT estimators, per-rank accounting, compression chooser, CLI, calibration."""
import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from dist_utils import random_kjt, run_ranks  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 8
BUDGET = 1_000_000  # bytes per rank: the dense tables below need ~2.4 MB in all


def dense_tables():
    from torchrec import EmbeddingBagConfig
    return [EmbeddingBagConfig(name="big", embedding_dim=16, num_embeddings=20_000, feature_names=["f0"]),
            EmbeddingBagConfig(name="big2", embedding_dim=16, num_embeddings=16_000, feature_names=["f1"]),
            EmbeddingBagConfig(name="mid", embedding_dim=8, num_embeddings=3_000, feature_names=["f2"]),
            EmbeddingBagConfig(name="small", embedding_dim=4, num_embeddings=50, feature_names=["f3"])]


def fused_params():
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    return {"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.1}


def choose(world=2, budget=BUDGET, **kw):
    from torchrec.distributed.planner.stats import NoopEmbeddingStats
    from torchrec_tt.planner import choose_compression, make_topology
    kw.setdefault("max_rank", 16)
    kw.setdefault("tt_optimizer", "rowwise_adagrad")
    kw.setdefault("tt_learning_rate", 0.1)
    return choose_compression(dense_tables(), make_topology(world, budget, "cpu"), batch_size=BATCH,
                              fused_params=fused_params(), stats=[NoopEmbeddingStats()], **kw)


def kjt_for(tables, seed):
    return random_kjt(tables, BATCH, seed, 1, 3)


def allocated_bytes(dmp):
    """Bytes of distinct storages behind the sharded module's parameters, buffers, state_dict and fused
    optimizer state on this rank (views of one flat TBE buffer count once)."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    seen = {}

    def visit(x):
        if isinstance(x, ShardedTensor):
            for s in x.local_shards():
                visit(s.tensor)
        elif isinstance(x, torch.Tensor):
            if hasattr(x, "to_local"):
                x = x.to_local()
            if x.device.type != "meta" and x.numel():
                st = x.untyped_storage()
                seen[st.data_ptr()] = st.nbytes()
        elif isinstance(x, dict):
            for v in x.values():
                visit(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                visit(v)

    visit([p for _, p in dmp.named_parameters()])
    visit([b for _, b in dmp.named_buffers()])
    visit(dmp.state_dict())
    visit(dmp.fused_optimizer.state_dict()["state"])
    return sum(seen.values())


def _train_chosen(rank, world):
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec_tt.config import TTEmbeddingBagConfig
    from torchrec_tt.distributed import get_sharders_and_planner
    from torchrec_tt.modules.tt_embedding_bag_collection import TTEmbeddingBagCollection
    from torchrec_tt.planner import per_rank_bytes
    tables, plan = choose(world)
    torch.manual_seed(0)
    model = TTEmbeddingBagCollection(tables)
    sharders, _ = get_sharders_and_planner(tables, world, BATCH, fused_params=fused_params())
    dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan, sharders=sharders)
    estimate = per_rank_bytes(plan, tables, world_size=world, fused_params=fused_params())[rank].state
    actual = allocated_bytes(dmp)
    kjt = kjt_for(tables, rank)
    losses = []
    for _ in range(6):
        kt = dmp(kjt)
        loss = ((kt.values() - 0.5) ** 2).sum(dim=1).mean()
        loss.backward()  # every table has a fused optimizer: the update happens here
        losses.append(float(loss.detach()))
    return {"tt": sorted(t.name for t in tables if isinstance(t, TTEmbeddingBagConfig)), "plan": str(plan),
            "estimate": estimate, "actual": actual, "losses": losses}


@pytest.mark.distributed
def test_chooser_plan_trains_on_two_ranks_and_estimate_within_5_percent():
    """The dense model does not fit 2 x 1 MB; the chooser's plan does, DMP trains it, and the estimated
    per-rank bytes (weights + optimizer state) are within 5 % of what the ranks allocate."""
    results = run_ranks(_train_chosen)
    assert results[0]["tt"] == results[1]["tt"] == ["big"]  # fewest, largest first
    assert results[0]["plan"] == results[1]["plan"]
    for r in results:
        assert r["losses"][-1] < r["losses"][0], r["losses"]
        assert abs(r["estimate"] - r["actual"]) <= 0.05 * r["actual"], r
        assert r["actual"] > 0


def test_dense_model_does_not_fit_but_fits_when_compressed():
    from torchrec_tt.config import TTEmbeddingBagConfig
    from torchrec_tt.planner import per_rank_bytes
    from torchrec_tt.planner.chooser import choose as choose_details, make_topology
    # all dense with a budget of 2 x 10 MB: unchanged
    tables, plan = choose(budget=10_000_000)
    assert not any(isinstance(t, TTEmbeddingBagConfig) for t in tables)
    # tight budget: only "big" compressed, at the highest rank that saves memory (<= max_rank)
    tables, plan = choose()
    tt = [t for t in tables if isinstance(t, TTEmbeddingBagConfig)]
    assert [t.name for t in tt] == ["big"] and tt[0].tt_ranks == 16 and tt[0].optimizer == "rowwise_adagrad"
    assert [(t.name, t.num_embeddings, type(t).__name__) for t in tables[1:]] == [
        (t.name, t.num_embeddings, "EmbeddingBagConfig") for t in dense_tables()[1:]]
    per_rank = per_rank_bytes(plan, tables, world_size=2, fused_params=fused_params(), batch_size=BATCH)
    assert all(b.total <= BUDGET for b in per_rank)
    # tighter: every candidate TT, and the shared rank is lowered
    c = choose_details(dense_tables(), make_topology(2, 60_000, "cpu"), batch_size=BATCH, max_rank=16,
                       tt_optimizer="rowwise_adagrad", fused_params=fused_params(), module_path="sparse.ebc")
    ranks = {t.name: t.tt_ranks for t in c.tables if isinstance(t, TTEmbeddingBagConfig)}
    assert {"big", "big2", "mid"} <= set(ranks) and max(ranks.values()) < 16, ranks
    assert list(c.plan.plan) == ["sparse.ebc"]
    # options-based accounting agrees with the planner's own storage (TT at real size, not N x D)
    totals = per_rank_bytes(c.options, world_size=2)
    assert all(b.total <= 60_000 for b in totals)
    assert sum(b.total for b in totals) == sum(s.storage.ddr for o in c.options for s in o.shards if s.rank is not None)


def test_impossible_budget_raises_clear_error():
    from torchrec_tt.planner import InsufficientMemoryError
    with pytest.raises(InsufficientMemoryError, match="min_rank=4.*budget of 5,000 bytes per device x 2"):
        choose(budget=5_000, min_rank=4)
    with pytest.raises(ValueError, match="min_rank <= max_rank"):
        choose(min_rank=8, max_rank=4)


def test_storage_estimator_counts_real_tt_bytes():
    """TT options: cores + optimizer state (or dense core grads) + IO; DP pays no all-to-all."""
    from torchrec_tt.config import TTEmbeddingBagConfig
    from torchrec_tt.modules.tt_embedding_bag import TTEmbeddingBag
    from torchrec_tt.planner.estimators import io_bytes, tt_cache_bytes, tt_geometry, tt_table_bytes
    for opt, extra in [(None, "grads"), ("adagrad", "optimizer"), ("rowwise_adagrad", "optimizer"), ("sgd", None)]:
        c = TTEmbeddingBagConfig(name="t", embedding_dim=16, num_embeddings=10_000, feature_names=["f"],
                                 tt_ranks=[5, 7], optimizer=opt)
        m = TTEmbeddingBag(10_000, 16, [5, 7], optimizer=opt)
        b = tt_table_bytes(c)
        assert (tt_geometry(c)[2], b.weights) == (m.ranks, m.tt_bytes(False))
        assert b.weights + b.optimizer == m.tt_bytes(True)
        assert b.grads == (b.weights if opt is None else 0)
    assert io_bytes("table_wise", 8, 4, [2.0], 16) == 4 * io_bytes("data_parallel", 8, 1, [2.0], 16)
    assert tt_cache_bytes(c) == 0


@pytest.mark.parametrize("opt", [None, "adagrad", "rowwise_adagrad"])
def test_cache_bytes_match_module(opt):
    """With a hot-row cache the estimate covers the module's persistent state exactly and budgets the
    derived id -> slot map (its width depends on the cached ids) from above, within 10 %."""
    pytest.importorskip("torchrec_tt.modules.cache")
    from torchrec_tt.config import TTEmbeddingBagConfig
    from torchrec_tt.modules.tt_embedding_bag import TTEmbeddingBag
    from torchrec_tt.planner.estimators import tt_table_bytes
    c = TTEmbeddingBagConfig(name="t", embedding_dim=16, num_embeddings=10_000, feature_names=["f"], tt_ranks=6,
                             optimizer=opt, cache_rows=300)
    m = TTEmbeddingBag(10_000, 16, 6, optimizer=opt, cache_rows=300)
    g = torch.Generator().manual_seed(0)
    m(torch.randint(0, 10_000, (4096,), generator=g), torch.arange(0, 4096, 4))
    m.refresh_cache()
    persistent = sum(t.numel() * t.element_size() for t in m.state_dict().values())
    actual = persistent + m.cache._map.numel() * m.cache._map.element_size()
    b = tt_table_bytes(c)
    assert actual <= b.state <= 1.10 * actual
    assert b.grads == (sum(p.numel() * 4 for p in m.parameters()) if opt is None else 0)


@pytest.mark.parametrize("data_type", ["FP16", "BF16"])
@pytest.mark.parametrize("opt", [None, "adagrad", "rowwise_adagrad"])
def test_half_core_bytes_match_module(data_type, opt):
    """data_type FP16 / BF16 halves the cores and cached rows, not the fp32 optimizer state."""
    from torchrec.modules.embedding_configs import DataType
    from torchrec_tt.config import TTEmbeddingBagConfig
    from torchrec_tt.modules.tt_embedding_bag_collection import tt_module_from_config
    from torchrec_tt.planner.estimators import tt_table_bytes
    c = TTEmbeddingBagConfig(name="t", embedding_dim=16, num_embeddings=10_000, feature_names=["f"], tt_ranks=6,
                             optimizer=opt, cache_rows=300, data_type=DataType[data_type])
    m = tt_module_from_config(c)
    assert m.cores[0].element_size() == 2 and m.cache.weight.element_size() == 2
    b = tt_table_bytes(c)
    assert b.weights == m.tt_bytes(False) and b.weights + b.optimizer == m.tt_bytes(True)
    persistent = sum(t.numel() * t.element_size() for t in m.state_dict().values())
    assert persistent <= b.state <= persistent + 2 * 300 * 2 * 8  # + the id -> slot map (at most 4 x 300 entries)
    assert b.grads == (sum(p.numel() * 2 for p in m.parameters()) if opt is None else 0)


def test_tt_config_data_type():
    from torchrec.modules.embedding_configs import DataType
    from torchrec_tt.config import TTEmbeddingBagConfig
    with pytest.raises(ValueError, match="table 'u': TT cores take data_type FP32, FP16 or BF16, got INT8"):
        TTEmbeddingBagConfig(name="u", embedding_dim=8, num_embeddings=100, feature_names=["u"],
                             data_type=DataType.INT8)
    with pytest.raises(ValueError, match=r"table 'u': TT tables do not support \{'use_virtual_table': True\}"):
        TTEmbeddingBagConfig(name="u", embedding_dim=8, num_embeddings=100, feature_names=["u"],
                             use_virtual_table=True)


def test_perf_estimator_flops_and_comms():
    from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
    from torchrec_tt.config import TTEmbeddingBagConfig
    from torchrec_tt.distributed import get_sharders_and_planner
    from torchrec_tt.modules.tt_embedding_bag_collection import TTEmbeddingBagCollection
    from torchrec_tt.planner import make_topology, tt_estimators

    def perfs(rank):
        tables = [TTEmbeddingBagConfig(name="t", embedding_dim=16, num_embeddings=100_000, feature_names=["f"],
                                       tt_ranks=rank)]
        topo = make_topology(4, 2**30, "cpu")
        sharders, planner = get_sharders_and_planner(tables, 4, 64, topology=topo)
        cons = planner._constraints
        enum = EmbeddingEnumerator(topo, 64, cons, estimator=tt_estimators(topo, cons, unique_ratio=1.0,
                                                                           flops_per_second=1e9))
        opts = enum.enumerate(TTEmbeddingBagCollection(tables, device="meta"), sharders)
        return {o.sharding_type: o.shards[0].perf for o in opts}

    lo, hi = perfs(4), perfs(16)
    for st in ("data_parallel", "table_wise"):
        assert hi[st].fwd_compute > 4 * lo[st].fwd_compute  # chain FLOPs ~ r^2
        assert hi[st].bwd_compute == pytest.approx(2 * hi[st].fwd_compute)
    assert hi["table_wise"].fwd_compute == pytest.approx(4 * hi["data_parallel"].fwd_compute)  # serves 4 batches
    assert hi["table_wise"].fwd_comms > 0 and hi["table_wise"].input_dist_comms > 0
    assert hi["data_parallel"].fwd_comms == 0 and hi["data_parallel"].bwd_comms > lo["data_parallel"].bwd_comms > 0


def test_calibrate_roundtrip(tmp_path):
    from torchrec_tt.planner.__main__ import main
    from torchrec_tt.planner.estimators import load_calibration
    bench = {"tt_gflops": 42.5, "tt_ms": 1.0, "sgemm_gflops": 100.0, "machine": "x", "torch": "t",
             "config": {"batch": 1000, "unique_ids": 250, "threads": 4}}
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    out = tmp_path / "cal.json"
    assert main(["calibrate", "--from", str(tmp_path / "bench.json"), "--device", "cuda", "--out", str(out)]) == 0
    cal = load_calibration("cuda", str(out))
    assert (cal["tt_gflops"], cal["unique_ratio"], cal["threads"]) == (42.5, 0.25, 4)
    assert load_calibration("cpu")["tt_gflops"] > 0  # the shipped file
    with pytest.raises(KeyError, match="no TT calibration"):
        load_calibration("cpu", str(out))


def test_calibrate_from_the_cuda_benchmark(tmp_path):
    from torchrec_tt.planner.__main__ import main
    from torchrec_tt.planner.estimators import load_calibration
    bench = {"meta": {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130"},
             "results": [{"config": "b", "name": "(b)", "ids": 10240, "unique_ids": 10231, "ms": {"ours": 0.6},
                          "gflops_unique_rows": 1886.8},
                         {"config": "a", "name": "(a)", "ids": 8192, "unique_ids": 4237, "ms": {"ours": 0.4465},
                          "gflops_unique_rows": 262.345}]}
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    out = tmp_path / "cal.json"
    assert main(["calibrate", "--from", str(tmp_path / "bench.json"), "--device", "cuda", "--out", str(out)]) == 0
    cal = load_calibration("cuda", str(out))
    assert (cal["tt_gflops"], cal["unique_ratio"], cal["threads"]) == (262.345, 0.5172, None)
    assert "config a" in cal["source"] and "0.447 ms/step" in cal["source"] and "H100" in cal["machine"]
    with pytest.raises(SystemExit, match="no measured config 'c'"):
        main(["calibrate", "--from", str(tmp_path / "bench.json"), "--device", "cuda", "--config", "c",
              "--out", str(out)])


def test_bundled_tables():
    from torchrec_tt.planner import load_tables
    kaggle, tb = load_tables("kaggle"), load_tables("terabyte", embedding_dim=64)
    assert len(kaggle) == len(tb) == 26
    assert sum(t.num_embeddings for t in kaggle) == 33_762_577 and kaggle[2].num_embeddings == 10_131_227
    assert {t.embedding_dim for t in tb} == {64} and max(t.num_embeddings for t in tb) == 48_937_457


def test_cli_smoke():
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torchrec_tt.planner", "--tables", "kaggle", "--dim", "128", "--world-size", "8",
           "--hbm-gb", "0.5"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "table(s) compressed to TT" in out and "customized_kernel" in out and "budget MiB" in out
    assert out.count("\nt_C") == 26 and len(re.findall(r"^\d\s{3,}", out, re.M)) == 8
    r = subprocess.run(cmd[:-1] + ["0.001"], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert r.returncode == 2 and "no sharding plan fits" in r.stderr


def test_chooser_budgets_the_hot_row_cache():
    """With ``tt_cache`` the chosen TT tables carry the cache and the plan's per-rank estimate includes
    its bytes: a budget that fits the cache-less choice exactly no longer fits once the cache is added."""
    from torchrec_tt.config import TTEmbeddingBagConfig
    from torchrec_tt.planner import per_rank_bytes
    from torchrec_tt.planner.estimators import tt_cache_bytes
    tables, plan = choose(tt_cache={"cache_fraction": 0.05, "cache_refresh_interval": 7})
    tt = [t for t in tables if isinstance(t, TTEmbeddingBagConfig)]
    assert tt and all(t.cache_fraction == 0.05 and t.cache_refresh_interval == 7 for t in tt)
    with_cache = per_rank_bytes(plan, tables, world_size=2, fused_params=fused_params(), batch_size=BATCH)
    plain = [dataclasses.replace(t, cache_fraction=None) if isinstance(t, TTEmbeddingBagConfig) else t
             for t in tables]
    without = per_rank_bytes(plan, plain, world_size=2, fused_params=fused_params(), batch_size=BATCH)
    assert sum(b.total for b in with_cache) - sum(b.total for b in without) == sum(tt_cache_bytes(t) for t in tt) > 0
    assert all(b.total <= BUDGET for b in with_cache)


def test_chooser_gives_half_cores_with_tt_data_type():
    """``tt_data_type=BF16``: the chosen TT tables get bf16 cores (dense tables keep FP32), and the plan
    budgets 2-byte cores, so a budget that forces fp32 cores down to a lower rank affords a higher one."""
    from torchrec import DataType
    from torchrec_tt.config import TTEmbeddingBagConfig
    from torchrec_tt.planner import per_rank_bytes

    def chosen(**kw):
        tables, plan = choose(budget=60_000, **kw)
        assert all(b.total <= 60_000 for b in per_rank_bytes(plan, tables, world_size=2, fused_params=fused_params(),
                                                            batch_size=BATCH))
        return tables
    fp32, bf16 = chosen(), chosen(tt_data_type=DataType.BF16)
    assert {t.data_type for t in fp32} == {DataType.FP32}
    assert {t.data_type for t in bf16 if isinstance(t, TTEmbeddingBagConfig)} == {DataType.BF16}
    assert {t.data_type for t in bf16 if not isinstance(t, TTEmbeddingBagConfig)} <= {DataType.FP32}
    rank = {n: max(t.tt_ranks for t in ts if isinstance(t, TTEmbeddingBagConfig)) for n, ts in
            [("fp32", fp32), ("bf16", bf16)]}
    assert rank["bf16"] > rank["fp32"], rank


def test_cli_tt_data_type_halves_the_tt_bytes(capsys):
    from torchrec_tt.planner.__main__ import main
    args = ["--tables", "kaggle", "--dim", "128", "--world-size", "8", "--hbm-gb", "0.5"]
    tt_mib = {}
    for dt in ("fp32", "bf16"):
        assert main(args + ["--tt-data-type", dt]) == 0
        row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("t_C3 "))
        tt_mib[dt] = float(row.split()[4])  # table rows dim dense-MiB TT-MiB ...
    assert tt_mib["bf16"] == pytest.approx(tt_mib["fp32"] / 2, abs=0.01), tt_mib


def test_tt_config_in_a_stock_ebc_is_refused_at_planning():
    """torchrec's EmbeddingBagCollection reads a TTEmbeddingBagConfig as a plain one: a dense table."""
    from torchrec import EmbeddingBagCollection
    from torchrec_tt.config import TTEmbeddingBagConfig
    from torchrec_tt.distributed import get_sharders_and_planner
    model = torch.nn.Module()
    model.sparse = EmbeddingBagCollection(tables=dense_tables()[3:] + [TTEmbeddingBagConfig(
        name="users", embedding_dim=16, num_embeddings=1_000_000, feature_names=["u"])], device="meta")
    with pytest.raises(ValueError, match=r"table 'users': a TTEmbeddingBagConfig in torchrec's EmbeddingBagCollection "
                                         r"\(module 'sparse'\) is stored dense \(1000000 x 16\)"):
        get_sharders_and_planner(model, 2, BATCH)
