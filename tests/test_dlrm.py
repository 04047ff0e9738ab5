"""The DLRM example (examples/dlrm): data, training, 2 ranks, checkpoint/resume, torchx restart."""
import json
import os
import shutil
import signal
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, ROOT)
from dist_utils import run_ranks  # noqa: E402
from examples.dlrm.data import (KAGGLE_CARDINALITIES, CorruptLineError, CriteoTSV, SyntheticCriteo,  # noqa: E402
                                scale_cardinalities)

CRITEO = "/work/shared/data/criteo_kaggle_head7k.tsv"
needs_criteo = pytest.mark.skipif(not os.path.exists(CRITEO), reason=f"{CRITEO} not present")
# small and fast: tables scaled to 1/1000 (largest 10k rows), TT on the 5 largest at rank 4
TINY = ["--scale-tables", "0.001", "--tt-rank", "4", "--batch-size", "128", "--eval-batches", "4",
        "--threads", "1", "--no-plot"]


def _corrupt_copy(tmp_path, n_good=600):
    """``n_good`` real rows with 4 corrupt lines mixed in, the last one truncated mid-line."""
    lines = open(CRITEO).read().splitlines()[:n_good]
    bad = ["1\t2\t3",                                            # too few fields
           "\t".join(["2"] + lines[0].split("\t")[1:]),        # label 2
           "\t".join(lines[1].split("\t")[:20] + ["zz!"] + lines[1].split("\t")[21:]),  # not hex
           ]
    mixed = lines[:100] + bad + lines[100:] + [lines[-1][:25]]   # truncated final line, no newline
    path = tmp_path / "corrupt.tsv"
    path.write_text("\n".join(mixed))
    return str(path), len(bad) + 1


# ---- data ----------------------------------------------------------------------------------------

@needs_criteo
def test_loader_on_real_rows():
    cards = KAGGLE_CARDINALITIES
    loader = CriteoTSV([CRITEO], batch_size=500, cardinalities=cards, take=7000)
    batches = list(loader)
    assert len(batches) == 14 and loader.stats == {"lines": 7000, "skipped": 0}
    labels = torch.cat([b.labels for b in batches])
    assert 0.18 < float(labels.mean()) < 0.28  # ~22 % positives
    b = batches[0]
    assert b.dense.shape == (500, 13) and torch.isfinite(b.dense).all() and (b.dense >= 0).all()
    ids = b.sparse.values().view(26, 500)
    assert b.sparse.keys()[0] == "cat_0" and all(int(ids[i].max()) < n for i, n in enumerate(cards))
    # the first row, by hand: log1p of the clamped integers, hex hashed into the table size
    fields = open(CRITEO).readline().rstrip("\n").split("\t")
    dense = [np.log1p(max(int(x), 0)) if x else 0.0 for x in fields[1:14]]
    np.testing.assert_allclose(b.dense[0].numpy(), dense, rtol=1e-6)
    assert [int(x) for x in ids[:, 0]] == [int(x, 16) % n if x else 0 for x, n in zip(fields[14:], cards)]
    # line ranges and rank striding: a held-out split, two ranks see disjoint batches
    test = list(CriteoTSV([CRITEO], 1000, cards, skip=6000, drop_last=False))
    assert sum(len(t.labels) for t in test) == 1000
    r0, r1 = (list(CriteoTSV([CRITEO], 1000, cards, rank=r, world_size=2)) for r in (0, 1))
    assert len(r0) == 4 and len(r1) == 3 and not torch.equal(r0[0].labels, r1[0].labels)


@needs_criteo
def test_loader_skips_corrupt_lines(tmp_path):
    path, n_bad = _corrupt_copy(tmp_path)
    loader = CriteoTSV([path], batch_size=100, cardinalities=scale_cardinalities(KAGGLE_CARDINALITIES, 0.01))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = sum(len(b.labels) for b in loader)
    assert loader.stats["skipped"] == n_bad and rows == 600
    assert sum("skipped corrupt line" in str(w.message) for w in caught) == n_bad
    with pytest.raises(CorruptLineError, match=r"corrupt.tsv:101: expected 40"):
        list(CriteoTSV([path], batch_size=100, strict=True))


def test_synthetic_is_deterministic_and_learnable():
    from torchmetrics.functional.classification import binary_auroc
    cards = scale_cardinalities(KAGGLE_CARDINALITIES, 0.01)
    a, b = (SyntheticCriteo(512, cards, seed=3) for _ in range(2))
    x, y = a.batch(5), next(iter(b.batches(start=5)))
    assert torch.equal(x.dense, y.dense) and torch.equal(x.labels, y.labels)
    assert torch.equal(x.sparse.values(), y.sparse.values())
    assert not torch.equal(a.batch(6).labels, x.labels)
    assert not torch.equal(SyntheticCriteo(512, cards, seed=4).batch(5).sparse.values(), x.sparse.values())
    r1 = SyntheticCriteo(512, cards, seed=3, rank=1, world_size=2).batch(0)
    assert not torch.equal(r1.sparse.values(), SyntheticCriteo(512, cards, seed=3, world_size=2).batch(0).sparse.values())
    ids = x.sparse.values().view(26, 512)
    assert all(int(ids[i].max()) < n for i, n in enumerate(cards))
    assert (ids[0] == 0).float().mean() > 0.1  # Zipf: id 0 is the most frequent
    big = a.batch(0)
    cats = big.sparse.values().view(26, -1).T.numpy()
    oracle = a.oracle_logits(big.dense.numpy() - 1.6, cats)
    assert 0.2 < float(big.labels.mean()) < 0.5
    assert binary_auroc(torch.tensor(oracle), big.labels.long()) > 0.75  # labels carry signal


def test_scale_tables():
    assert scale_cardinalities([10_000_000, 1000, 3], 0.001) == [10_000, 64, 3]
    assert scale_cardinalities([10, 20], 1.0) == [10, 20]


def test_model_record_rebuilds_every_table_as_trained():
    """model.json (what export.py rebuilds the model from) keeps each table's config, its data_type
    included: a bf16 / fp16 TT table comes back with half cores, not as an fp32 table."""
    from torchrec import DataType, EmbeddingBagConfig, PoolingType

    from examples.dlrm.model import model_from_record, model_record
    from torchrec_tt.config import TTEmbeddingBagConfig
    tables = [TTEmbeddingBagConfig(name="t_cat_0", embedding_dim=8, num_embeddings=5000, feature_names=["cat_0"],
                                   tt_ranks=4, data_type=DataType.BF16, optimizer="rowwise_adagrad",
                                   learning_rate=0.1),
              TTEmbeddingBagConfig(name="t_cat_1", embedding_dim=8, num_embeddings=3000, feature_names=["cat_1"],
                                   tt_ranks=4, data_type=DataType.FP16, pooling=PoolingType.MEAN),
              EmbeddingBagConfig(name="t_cat_2", embedding_dim=8, num_embeddings=40, feature_names=["cat_2"])]
    record = json.loads(json.dumps(model_record(tables, [16], [8])))
    ebc = model_from_record(record).sparse_arch.embedding_bag_collection
    def fields(t):  # a dense config's init_fn is a new partial on each construction
        return type(t), {k: v for k, v in vars(t).items() if k != "init_fn"}
    assert [fields(t) for t in ebc.embedding_bag_configs()] == [fields(t) for t in tables]
    assert ebc.tt_tables["t_cat_0"].core_list()[0].dtype == torch.bfloat16
    assert ebc.tt_tables["t_cat_1"].core_list()[1].dtype == torch.float16
    del record["tables"][0]["data_type"]  # a model.json written before data_type was recorded: fp32
    assert model_from_record(record).sparse_arch.embedding_bag_collection.tt_tables["t_cat_0"].core_list()[0].dtype \
        == torch.float32


# ---- training ------------------------------------------------------------------------------------

def _train(rank, world, argv):
    from examples.dlrm import train
    summary = train.main(argv)
    return {k: summary[k] for k in ("auc", "logloss", "steps", "history", "tt_tables", "tt_compression")
            } | {k: v for k, v in summary.items() if k in ("lines_read", "corrupt_lines_skipped", "tt_cache")}


def _metrics(history):
    """What must match between runs (throughput may differ)."""
    return [{k: v for k, v in h.items() if k != "samples_per_s"} for h in history]


def test_single_process_training_improves_auc(tmp_path):
    (s,) = run_ranks(_train, TINY + ["--steps", "60", "--out", str(tmp_path)], world_size=1)
    assert s["steps"] == 60 and s["tt_tables"] == 5 and s["tt_compression"] > 5
    assert s["auc"] > 0.58, s["history"]
    assert os.path.exists(tmp_path / "summary.json")


@needs_criteo
def test_real_data_with_corrupt_lines(tmp_path):
    path, n_bad = _corrupt_copy(tmp_path, n_good=2000)
    argv = TINY + ["--train", path, "--test", CRITEO, "--test-lines", "6001:", "--out", str(tmp_path)]
    (s,) = run_ranks(_train, argv, world_size=1)
    assert s["corrupt_lines_skipped"] == n_bad and s["steps"] == 2000 // 128
    assert s["auc"] > 0.6  # real signal, even after 15 steps
    with pytest.raises(RuntimeError, match="CorruptLineError"):
        run_ranks(_train, argv + ["--strict"], world_size=1)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """20 steps on 2 ranks, checkpoints every 10 steps."""
    d = tmp_path_factory.mktemp("dlrm2")
    argv = TINY + ["--steps", "20", "--eval-every", "5", "--ckpt-dir", str(d / "ckpt"), "--ckpt-every", "10",
                   "--out", str(d / "out")]
    results = run_ranks(_train, argv)
    return d, argv, results


def test_two_ranks(two_rank_run):
    d, _, (r0, r1) = two_rank_run
    assert r0["auc"] == r1["auc"] and r0["steps"] == 20  # every rank sees the global metrics
    assert 0.5 < r0["auc"] < 1.0
    assert sorted(os.listdir(d / "ckpt")) == ["latest", "step_0000010", "step_0000020"]


def test_resume_from_checkpoint_matches_uninterrupted(two_rank_run, tmp_path):
    d, argv, (r0, _) = two_rank_run
    argv = argv[:argv.index("--ckpt-dir")] + ["--resume-from", str(d / "ckpt" / "step_0000010"),
                                             "--ckpt-dir", str(tmp_path / "ckpt"), "--out", str(tmp_path)]
    resumed, _ = run_ranks(_train, argv)
    assert _metrics(resumed["history"]) == _metrics(r0["history"])  # same evaluations at steps 5..20, bit for bit


def test_train_pipeline_matches_the_plain_loop_and_resumes(two_rank_run, tmp_path):
    """--pipeline (TorchRec's TrainPipelineSparseDist, detached for each evaluation and checkpoint): the
    same evaluations as the plain loop, bit for bit, and so does a pipelined run resumed from its
    step-10 checkpoint."""
    d, argv, (r0, _) = two_rank_run
    base = argv[:argv.index("--ckpt-dir")] + ["--pipeline"]
    piped, _ = run_ranks(_train, base + ["--ckpt-dir", str(tmp_path / "ckpt"), "--ckpt-every", "10",
                                         "--out", str(tmp_path / "a")])
    assert _metrics(piped["history"]) == _metrics(r0["history"])
    resumed, _ = run_ranks(_train, base + ["--resume-from", str(tmp_path / "ckpt" / "step_0000010"),
                                           "--out", str(tmp_path / "b")])
    assert _metrics(resumed["history"]) == _metrics(r0["history"])


def test_export_serves_the_trained_model(two_rank_run, tmp_path):
    """examples/dlrm/export.py: the 2-rank checkpoint (table-wise TT tables, sharded dense tables) in one
    unsharded model, exported with a dynamic batch size and packaged by AOTInductor; the saved program's
    held-out AUC is the one training reported at that step (so the trained weights, not fresh ones, were
    loaded)."""
    from examples.dlrm import export
    d, _, (r0, _) = two_rank_run
    out = str(tmp_path / "model.pt2")
    report = export.main([str(d / "ckpt"), "--out", out, "--check-batches", "2", "--batch-size", "64",
                          "--aoti", str(tmp_path / "model_aoti.pt2")])
    assert report["checkpoint"].endswith("step_0000020") and report["max_abs_logit_diff"] <= 1e-5
    assert report["aoti_max_abs_logit_diff"] <= 1e-5  # the AOTInductor package (C++) serves the same logits
    auc = _held_out_auc(export.load_exported(out).module(), world_size=2)
    assert abs(auc - r0["auc"]) < 1e-4, (auc, r0["auc"])


def _held_out_auc(program, world_size):
    """AUC of ``program`` on train.py's held-out stream for TINY: eval seed, 4 batches of 128 per rank."""
    from torchmetrics.functional.classification import binary_auroc
    cardinalities = scale_cardinalities(KAGGLE_CARDINALITIES, 0.001)
    logits, labels = [], []
    for rank in range(world_size):
        held_out = SyntheticCriteo(128, cardinalities, seed=1_000_003, rank=rank, world_size=world_size)
        for k in range(4):
            b = held_out.batch(k)
            logits.append(program(b.dense, b.sparse).squeeze(-1).detach())
            labels.append(b.labels)
    return float(binary_auroc(torch.sigmoid(torch.cat(logits)), torch.cat(labels).long()))


def test_bf16_tt_tables_train_checkpoint_and_export(tmp_path):
    """--tt-data-type bf16: the TT tables train with bf16 cores, the checkpoint's model.json says so, and
    export.py rebuilds them as bf16 (not fp32 tables that DCP would silently load the bf16 values into):
    the exported program reproduces training's held-out AUC, and the size report counts 2-byte cores."""
    from examples.dlrm import export
    from examples.dlrm.model import size_report
    argv = TINY + ["--steps", "12", "--eval-every", "12", "--tt-data-type", "bf16",
                   "--ckpt-dir", str(tmp_path / "ckpt"), "--out", str(tmp_path)]
    (s,) = run_ranks(_train, argv, world_size=1)
    model = export.load_model(export.resolve_checkpoint(str(tmp_path / "ckpt")))
    tt = model.sparse_arch.embedding_bag_collection.tt_tables
    assert len(tt) == 5 and {c.dtype for m in tt.values() for c in m.core_list()} == {torch.bfloat16}
    fp32_ratio = sum(m.num_embeddings * m.embedding_dim for m in tt.values()) / sum(
        m.num_tt_parameters() for m in tt.values())
    assert s["tt_compression"] == pytest.approx(2 * fp32_ratio) == size_report(model)["tt_compression"]
    out = str(tmp_path / "model.pt2")
    report = export.main([str(tmp_path / "ckpt"), "--out", out, "--check-batches", "2", "--batch-size", "64"])
    assert report["max_abs_logit_diff"] <= 1e-5
    auc = _held_out_auc(export.load_exported(out).module(), world_size=1)
    assert abs(auc - s["auc"]) < 1e-4, (auc, s["auc"])


def test_cached_tt_tables_train_and_resume_exactly(tmp_path):
    """2 ranks, TT tables with hot-row caches (table-wise, refreshed every 4 steps): the caches are hit,
    and a run resumed from the step-8 checkpoint (caches included) matches the uninterrupted one."""
    argv = TINY + ["--steps", "16", "--eval-every", "4", "--tt-cache-fraction", "0.05", "--tt-cache-refresh", "4",
                   "--ckpt-dir", str(tmp_path / "ckpt"), "--ckpt-every", "8", "--out", str(tmp_path / "a")]
    full, _ = run_ranks(_train, argv)
    caches = full["tt_cache"]
    assert len(caches) == 5 and all(c["hit_rate"] > 0.2 and c["evictions"] > 0 for c in caches.values()), caches
    argv = argv[:argv.index("--ckpt-dir")] + ["--resume-from", str(tmp_path / "ckpt" / "step_0000008"),
                                             "--out", str(tmp_path / "b")]
    resumed, _ = run_ranks(_train, argv)
    assert _metrics(resumed["history"]) == _metrics(full["history"])


def test_torchx_restart_after_a_rank_dies(two_rank_run, tmp_path):
    """rank 1 exits at step 15 (once); torchrun restarts the group, which resumes from step 10."""
    if shutil.which("torchx") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchx")):
        pytest.skip("torchx not installed")
    d, argv, (r0, _) = two_rank_run
    argv = argv[:argv.index("--ckpt-dir")] + ["--ckpt-dir", str(tmp_path / "ckpt"), "--ckpt-every", "10",
                                             "--out", str(tmp_path / "out")]
    torchx = os.path.join(os.path.dirname(sys.executable), "torchx")
    # the component runs `torchrun` from PATH (as on a cluster image): this interpreter's bin comes first
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    cmd = [torchx, "run", "-s", "local_cwd", "examples/dlrm/component.py:dlrm", "-j", "1x2", "--max_retries", "2",
           "--env", f"DLRM_FAIL_AT_STEP=15,PYTHONPATH={ROOT}", "--", *argv]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=170)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)  # torchx cancels its job (the ranks run in their own session)
        try:
            log, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            log, _ = proc.communicate()
        pytest.fail(f"torchx job did not finish in 170 s:\n{log[-4000:]}")
    assert proc.returncode == 0, log[-4000:]
    assert "DLRM_FAIL_AT_STEP: exiting at step 15" in log and "resumed from" in log, log[-4000:]
    assert os.path.exists(tmp_path / "ckpt" / "failure_injected")
    history = json.load(open(tmp_path / "out" / "history.json"))
    assert _metrics(history) == _metrics(r0["history"])  # nothing lost: same evaluations as the uninterrupted run


def test_auto_compress_picks_tt_tables(tmp_path):
    pytest.importorskip("torchrec_tt.planner.chooser")
    argv = TINY + ["--auto-compress", "--hbm-gb", "0.001", "--steps", "2", "--out", str(tmp_path)]
    (s,) = run_ranks(_train, argv, world_size=1)
    assert s["tt_tables"] >= 1 and s["steps"] == 2
