"""Train TorchRec's DLRM with Tensor-Train compressed embedding tables (torchrec_tt).

Single process (synthetic Criteo-shaped data, the 5 largest Kaggle tables TT at rank 32):

    python examples/dlrm/train.py --steps 500 --scale-tables 0.01

Two ranks (gloo on CPU, NCCL on GPUs), directly or through torchx (see README.md):

    torchrun --nproc_per_node 2 examples/dlrm/train.py --steps 500
    torchx run -s local_cwd examples/dlrm/component.py:dlrm -j 1x2 -- --steps 500

Real data: ``--train day_0.tsv --test held_out.tsv`` (Criteo Kaggle/Terabyte TSV). Checkpoints (DCP)
go to ``--ckpt-dir`` every ``--ckpt-every`` steps; a rerun with the same ``--ckpt-dir`` resumes from
the latest one. Outputs (summary.json, history.json, curve.png) go to ``--out``.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import itertools
import json
import logging
import os
import shutil
import socket
import sys
import time
import warnings
from typing import Dict, Iterator, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.rendezvous import rendezvous

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from fbgemm_gpu.split_embedding_configs import EmbOptimType  # noqa: E402
from torchmetrics.functional.classification import binary_auroc  # noqa: E402
from torchrec.distributed.model_parallel import DistributedModelParallel  # noqa: E402
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist  # noqa: E402
from torchrec.modules.embedding_configs import DataType  # noqa: E402
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper  # noqa: E402
from torchrec.optim.optimizers import in_backward_optimizer_filter  # noqa: E402
from tqdm import tqdm  # noqa: E402

from examples.dlrm.data import (KAGGLE_CARDINALITIES, TERABYTE_CARDINALITIES, Batch, CriteoTSV,  # noqa: E402
                                SyntheticCriteo, _kjt, scale_cardinalities)
from examples.dlrm.model import (describe_tables, human_bytes, make_dlrm, make_tables, model_record,  # noqa: E402
                                 size_report)
from torchrec_tt.config import TTEmbeddingBagConfig  # noqa: E402
from torchrec_tt.distributed import get_sharders_and_planner  # noqa: E402
from torchrec_tt.modules.tt_embedding_bag import TTEmbeddingBag  # noqa: E402


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--train", nargs="*", default=[], help="Criteo TSV file(s) to train on (default: synthetic)")
    d.add_argument("--test", nargs="*", default=[], help="Criteo TSV file(s) to evaluate on")
    d.add_argument("--train-lines", type=str, default=None,
                   help="line range START:STOP (1-based lines, STOP exclusive) of --train, e.g. 1:6001")
    d.add_argument("--test-lines", type=str, default=None, help="line range of --test, as --train-lines")
    d.add_argument("--epochs", type=int, default=1, help="passes over --train")
    d.add_argument("--strict", action="store_true", help="a corrupt input line is an error (default: skip + warn)")
    d.add_argument("--cardinalities", choices=["kaggle", "terabyte"], default="kaggle")
    d.add_argument("--scale-tables", type=float, default=1.0,
                   help="shrink every table to ceil(F * rows) (never below min(rows, 64)); ids are hashed/drawn "
                        "into the scaled sizes. 1 = real Criteo sizes")
    d.add_argument("--zipf", type=float, default=1.05, help="synthetic: Zipf exponent of the ids")
    d.add_argument("--eval-batches", type=int, default=16, help="synthetic: held-out batches per rank per eval")
    d.add_argument("--eval-seed", type=int, default=1_000_003,
                   help="synthetic: seed of the held-out stream (fixed, so runs with other --seed share it)")
    m = p.add_argument_group("model")
    m.add_argument("--embedding-dim", type=int, default=16)
    m.add_argument("--dense-arch", type=str, default="64", help="bottom MLP hidden sizes (output = embedding dim)")
    m.add_argument("--over-arch", type=str, default="128,64", help="top MLP hidden sizes (output = 1 logit)")
    m.add_argument("--tt-tables", type=int, default=5, help="the N largest tables are TT (0 = all dense)")
    m.add_argument("--tt-rank", type=int, default=32)
    m.add_argument("--tt-cache-fraction", type=float, default=0.0,
                   help="hot-row cache of each TT table: this fraction of its rows kept uncompressed (0: none)")
    m.add_argument("--tt-cache-refresh", type=int, default=200, help="training steps between cache refreshes")
    m.add_argument("--tt-data-type", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="dtype of the TT cores and cached rows (fp32 accumulation; optimizer state stays fp32)")
    m.add_argument("--tt-init", default="sampled_gaussian", choices=["sampled_gaussian", "uniform", "normal"])
    m.add_argument("--tt-optimizer", default="rowwise_adagrad", choices=["rowwise_adagrad", "adagrad", "sgd", "none"],
                   help="fused optimizer of the TT cores; 'none' = dense core gradients + the MLP optimizer")
    m.add_argument("--auto-compress", action="store_true",
                   help="let torchrec_tt.planner.choose_compression pick TT tables and ranks for --hbm-gb")
    m.add_argument("--hbm-gb", type=float, default=None, help="per-rank memory budget for --auto-compress")
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=1000, help="training steps (for --train: at most)")
    t.add_argument("--batch-size", type=int, default=1024, help="per rank")
    t.add_argument("--lr", type=float, default=0.05, help="Adagrad learning rate of the MLPs")
    t.add_argument("--emb-lr", type=float, default=0.05, help="row-wise Adagrad learning rate of dense tables")
    t.add_argument("--tt-lr", type=float, default=None, help="learning rate of the TT cores (default --emb-lr)")
    t.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (0: 5 per run)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: cores / local ranks)")
    t.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    t.add_argument("--pipeline", action="store_true",
                   help="train with TorchRec's TrainPipelineSparseDist (each batch's input all-to-alls run during "
                        "the previous step)")
    c = p.add_argument_group("checkpoints and outputs")
    c.add_argument("--ckpt-dir", default=None, help="DCP checkpoints; resumes from the latest one found here")
    c.add_argument("--ckpt-every", type=int, default=0, help="steps between checkpoints (0: only at the end)")
    c.add_argument("--resume-from", default=None, help="a checkpoint directory to start from")
    c.add_argument("--out", default="out/dlrm", help="summary.json, history.json, curve.png")
    c.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    if args.auto_compress and args.hbm_gb is None:
        p.error("--auto-compress needs --hbm-gb")
    if args.test and not args.train:
        p.error("--test needs --train")
    args.tt_lr = args.emb_lr if args.tt_lr is None else args.tt_lr
    return args


# ---- distributed setup ----------------------------------------------------------------------------

def init_distributed(device_flag: str) -> torch.device:
    """gloo on CPU, NCCL on GPUs; a plain ``python train.py`` is a world of one."""
    use_cuda = device_flag == "cuda" or (device_flag == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        backend = "nccl" if use_cuda else "gloo"
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if restart is None:
            dist.init_process_group(backend)
        else:
            # under torchrun the store outlives a failed attempt: give each attempt its own key space,
            # else a restarted rank can read the dead attempt's addresses (gloo: "connection refused")
            store, rank, world = next(rendezvous("env://"))
            dist.init_process_group(backend, store=dist.PrefixStore(f"dlrm_attempt_{restart}", store),
                                    rank=rank, world_size=world)
    return device


def synced(batches: Iterator[Batch], stop_when_any_done: bool) -> Iterator[Optional[Batch]]:
    """Keep ranks in lock step over streams of possibly different length (collectives need it).

    Training stops when any rank runs out; evaluation goes on while any rank has data, ranks that
    are done run a 1-row dummy batch (``None`` is yielded to them so its output is dropped).
    """
    while True:
        batch = next(batches, None)
        flag = torch.tensor([batch is not None], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN if stop_when_any_done else dist.ReduceOp.MAX)
        if not flag.item():
            return
        yield batch


class FetchTimer:
    """An iterator over ``batches`` that counts the seconds spent fetching them (excluded from step times;
    the train pipeline fetches inside its step)."""

    def __init__(self, batches: Iterator[Batch]) -> None:
        self.batches, self.seconds = batches, 0.0

    def __iter__(self) -> "FetchTimer":
        return self

    def __next__(self) -> Batch:
        t0 = time.perf_counter()
        try:
            return next(self.batches)
        finally:
            self.seconds += time.perf_counter() - t0


@contextlib.contextmanager
def detached(pipe: Optional[TrainPipelineSparseDist]):
    """The model's own forwards while evaluating or checkpointing a pipelined run (then back)."""
    if pipe is None:
        yield
        return
    pipe.detach()
    try:
        yield
    finally:
        pipe.attach()


def dummy_batch() -> Batch:
    return Batch(torch.zeros(1, 13), _kjt(np.zeros((1, 26), dtype=np.int64)), torch.zeros(1))


def line_range(spec: Optional[str]) -> Dict[str, Optional[int]]:
    if not spec:
        return {"skip": 0, "take": None}
    start, stop = (int(x) if x else None for x in spec.split(":"))
    start = start or 1
    return {"skip": start - 1, "take": None if stop is None else stop - start}


# ---- checkpoints ----------------------------------------------------------------------------------

def optimizer_state(opt: CombinedOptimizer) -> Dict:
    """Optimizer state without empty entries (stateless tables: DCP saves nothing for an empty dict,
    then reports it missing on load)."""
    return {k: v for k, v in opt.state_dict()["state"].items() if v}


def save_checkpoint(ckpt_dir: str, step: int, dmp, opt, history: List[Dict], record: Dict) -> str:
    """DCP of the model, optimizer and step; with ``record`` (model.json: what rebuilds the model, for
    examples/dlrm/export.py) and the history so far."""
    path = os.path.join(ckpt_dir, f"step_{step:07d}")
    dcp.save({"model": dmp.state_dict(), "optim": optimizer_state(opt), "progress": {"step": torch.tensor(step)}},
             checkpoint_id=path)
    dist.barrier()
    if dist.get_rank() == 0:  # "latest" moves only once every rank has written its shards
        with open(os.path.join(path, "history.json"), "w") as f:
            json.dump(history, f)
        with open(os.path.join(path, "model.json"), "w") as f:
            json.dump(record, f, indent=1)
        with open(os.path.join(ckpt_dir, "latest.tmp"), "w") as f:
            f.write(os.path.basename(path))
        os.replace(os.path.join(ckpt_dir, "latest.tmp"), os.path.join(ckpt_dir, "latest"))
        for old in sorted(x for x in os.listdir(ckpt_dir) if x.startswith("step_"))[:-2]:  # keep the last 2
            shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
    dist.barrier()
    return path


def latest_checkpoint(ckpt_dir: Optional[str]) -> Optional[str]:
    marker = os.path.join(ckpt_dir, "latest") if ckpt_dir else None
    if marker and os.path.exists(marker):
        with open(marker) as f:
            return os.path.join(ckpt_dir, f.read().strip())
    return None


def load_checkpoint(path: str, dmp, opt) -> (int, List[Dict]):
    state = {"model": dmp.state_dict(), "optim": optimizer_state(opt), "progress": {"step": torch.tensor(0)}}
    dcp.load(state, checkpoint_id=path)
    dmp.load_state_dict(state["model"])
    full = opt.state_dict()
    full["state"].update(state["optim"])
    opt.load_state_dict(full)
    history_file = os.path.join(path, "history.json")
    history = json.load(open(history_file)) if os.path.exists(history_file) else []
    return int(state["progress"]["step"]), history


def maybe_fail(step: int, rank: int, ckpt_dir: Optional[str]) -> None:
    """Fault injection for the restart test: ``DLRM_FAIL_AT_STEP=k`` makes rank ``DLRM_FAIL_RANK``
    (default 1) exit at step k, once (a marker file, ``DLRM_FAIL_MARKER`` or <ckpt-dir>/failure_injected,
    remembers that it happened)."""
    if step != int(os.environ.get("DLRM_FAIL_AT_STEP", -1)) or rank != int(os.environ.get("DLRM_FAIL_RANK", 1)):
        return
    marker = os.environ.get("DLRM_FAIL_MARKER") or os.path.join(ckpt_dir or ".", "failure_injected")
    if not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(f"rank {rank} exited at step {step}\n")
        print(f"[rank {rank}] DLRM_FAIL_AT_STEP: exiting at step {step}", flush=True)
        os._exit(17)


# ---- evaluation -----------------------------------------------------------------------------------

@torch.no_grad()
def cache_report(dmp) -> Dict[str, Dict[str, float]]:
    """Hot-row cache statistics of every cached TT table, summed over the ranks that hold it (the
    owner of a table-wise table counts every rank's ids; data-parallel replicas count their own)."""
    local = {m.name: m.cache_stats() for m in dmp.modules() if isinstance(m, TTEmbeddingBag) and m.cache is not None}
    gathered: List[Dict] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(gathered, local)
    report: Dict[str, Dict[str, float]] = {}
    for stats in gathered:
        for name, st in stats.items():
            r = report.setdefault(name, {"hits": 0, "misses": 0, "evictions": 0, "rows_written_back": 0,
                                         "capacity": st["capacity"]})
            for k in ("hits", "misses", "evictions", "rows_written_back"):
                r[k] += st[k]
    for r in report.values():
        r["hit_rate"] = r["hits"] / max(1, r["hits"] + r["misses"])
    return report


@torch.no_grad()
def evaluate(dmp, batches: Iterator[Batch], device: torch.device) -> Dict[str, float]:
    """AUC (torchmetrics BinaryAUROC) and log loss over every rank's held-out batches."""
    dmp.eval()
    logits, labels = [], []
    for batch in synced(batches, stop_when_any_done=False):
        b = batch if batch is not None else dummy_batch()
        _, (_, out, _) = dmp(b.to(device))
        if batch is not None:
            logits.append(out.float().cpu())
            labels.append(batch.labels)
    dmp.train()
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (torch.cat(logits) if logits else torch.zeros(0),
                                      torch.cat(labels) if labels else torch.zeros(0)))
    logit = torch.cat([g[0] for g in gathered])
    label = torch.cat([g[1] for g in gathered])
    return {"auc": float(binary_auroc(torch.sigmoid(logit), label.long())),
            "logloss": float(F.binary_cross_entropy_with_logits(logit, label)), "eval_samples": int(label.numel())}


# ---- main -----------------------------------------------------------------------------------------

def dense_fused_params(args) -> Dict:
    """TorchRec's fused TBE optimizer for the dense tables."""
    return {"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": args.emb_lr}


def build_tables(args, cardinalities: List[int], world: int, device: torch.device, rank: int):
    tt_opt = None if args.tt_optimizer == "none" else args.tt_optimizer
    tt_data_type = DataType[args.tt_data_type.upper()]
    if not args.auto_compress:
        return make_tables(cardinalities, args.embedding_dim, args.tt_tables, args.tt_rank, tt_opt, args.tt_lr,
                           args.tt_init, args.tt_cache_fraction, args.tt_cache_refresh, tt_data_type)
    try:
        from torchrec_tt.planner import choose_compression, make_topology
    except ImportError as e:
        raise SystemExit(f"--auto-compress needs torchrec_tt.planner.choose_compression, which is not "
                         f"available in this build ({e}); use --tt-tables/--tt-rank instead") from None
    # the budget is per device: HBM on GPUs, DDR on CPU
    topology = make_topology(world, int(args.hbm_gb * 2**30), compute_device=device.type)
    dense = make_tables(cardinalities, args.embedding_dim, 0, args.tt_rank, tt_opt, args.tt_lr)
    cache = dict(cache_fraction=args.tt_cache_fraction, cache_refresh_interval=args.tt_cache_refresh) \
        if args.tt_cache_fraction else {}
    tables, _ = choose_compression(dense, topology, batch_size=args.batch_size, min_rank=1, max_rank=64,
                                   tt_optimizer=tt_opt, tt_learning_rate=args.tt_lr if tt_opt else None,
                                   tt_cache=cache, tt_data_type=tt_data_type, fused_params=dense_fused_params(args))
    if rank == 0:
        chosen = [f"{t.name} (rank {t.tt_ranks})" for t in tables if isinstance(t, TTEmbeddingBagConfig)]
        print(f"compression chooser, {args.hbm_gb} GB per rank: TT tables {chosen or 'none (all dense fit)'}")
    return [dataclasses.replace(t, weights_init=args.tt_init)
            if isinstance(t, TTEmbeddingBagConfig) else t for t in tables]


def main(argv: Optional[List[str]] = None) -> Dict:
    args = parse_args(argv)
    # library deprecation chatter hides what matters here (our own warnings, e.g. corrupt lines, stay)
    warnings.filterwarnings("ignore", module=r"(torch|torchrec|fbgemm_gpu)\b")
    logging.getLogger("torchrec").setLevel(logging.ERROR)
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)  # an API note torchrec's calls trigger
    # TorchRec's plan check logs this (root logger) for every data-parallel table, which has no spec by design
    logging.getLogger().addFilter(lambda r: not r.getMessage().startswith("Sharding spec not found for"))
    device = init_distributed(args.device)
    rank, world = dist.get_rank(), dist.get_world_size()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // local_world))
    say = print if rank == 0 else (lambda *a, **k: None)

    base = KAGGLE_CARDINALITIES if args.cardinalities == "kaggle" else TERABYTE_CARDINALITIES
    cardinalities = scale_cardinalities(base, args.scale_tables)
    torch.manual_seed(args.seed)
    tables = build_tables(args, cardinalities, world, device, rank)
    dense_arch, over_arch = ([int(x) for x in a.split(",") if x] for a in (args.dense_arch, args.over_arch))
    model = make_dlrm(tables, dense_arch, over_arch, train_step=True)
    model_json = model_record(tables, dense_arch, over_arch)  # written next to each checkpoint
    sizes = size_report(model)
    say(f"DLRM: {world} rank(s) on {device.type}, batch {args.batch_size}/rank, tables:\n{describe_tables(model)}")

    sharders, planner = get_sharders_and_planner(
        model, world, args.batch_size, compute_device=device.type,
        fused_params=dense_fused_params(args))
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    say(f"sharding plan:\n{plan}")
    dmp = DistributedModelParallel(model, device=device, plan=plan, sharders=sharders)
    dense_params = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    opt = CombinedOptimizer([dmp.fused_optimizer, KeyedOptimizerWrapper(
        dense_params, lambda ps: torch.optim.Adagrad(ps, lr=args.lr))])

    step, history = 0, []
    resume = args.resume_from or latest_checkpoint(args.ckpt_dir)
    if resume:
        step, history = load_checkpoint(resume, dmp, opt)
        say(f"resumed from {resume} at step {step}")

    # data: batch k of this rank is a function of k, so a resumed run sees what it would have seen
    loaders: List[CriteoTSV] = []  # for the corrupt-line counts
    if args.train:
        def tsv(paths, lines, **kw) -> CriteoTSV:
            loaders.append(CriteoTSV(paths, args.batch_size, cardinalities, args.strict, rank=rank, world_size=world,
                                     **line_range(lines), **kw))
            return loaders[-1]

        def train_stream(start: int) -> Iterator[Batch]:
            epochs = (tsv(args.train, args.train_lines) for _ in range(args.epochs))
            return itertools.islice(itertools.chain.from_iterable(epochs), start, None)

        def eval_stream() -> Iterator[Batch]:
            return iter(tsv(args.test, args.test_lines, drop_last=False))
    else:
        synthetic = SyntheticCriteo(args.batch_size, cardinalities, seed=args.seed, alpha=args.zipf, rank=rank,
                                    world_size=world)
        held_out = copy.copy(synthetic)
        held_out.seed = args.eval_seed  # same teacher, other samples

        def train_stream(start: int) -> Iterator[Batch]:
            return synthetic.batches(start)

        def eval_stream() -> Iterator[Batch]:
            return itertools.islice(held_out.batches(), args.eval_batches)
    has_eval = bool(args.test) or not args.train
    eval_every = args.eval_every or max(1, args.steps // 5)

    feed = FetchTimer(synced(train_stream(step), stop_when_any_done=True))
    pipe = TrainPipelineSparseDist(dmp, opt, device) if args.pipeline else None
    # a live bar on a terminal; in logs (torchx, CI) the per-evaluation lines only
    bar = tqdm(total=None if args.train else args.steps, initial=step, unit="step", dynamic_ncols=True,
               disable=rank != 0 or not sys.stderr.isatty(), mininterval=0.5)
    losses, step_times, last, rate = [], [], None, 0.0
    while step < args.steps:
        maybe_fail(step, rank, args.ckpt_dir)
        t0, fetching = time.perf_counter(), feed.seconds
        if pipe is not None:  # zero_grad, forward, backward, step; the next batch's input_dist in between
            try:
                loss = pipe.progress(feed)[0]
            except StopIteration:
                break
        else:
            batch = next(feed, None)
            if batch is None:
                break
            loss, _ = dmp(batch.to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses.append(loss.item())
        step_times.append(time.perf_counter() - t0 - (feed.seconds - fetching))
        step += 1
        timed = step_times[1:] or step_times  # the first step of a process is warm-up (lazy init)
        rate = len(timed) * args.batch_size * world / sum(timed)
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", samples_s=f"{rate:,.0f}", refresh=False)
        record = {"step": step, "train_loss": float(np.mean(losses)), "samples_per_s": rate}
        if has_eval and (step % eval_every == 0 or step == args.steps):
            with detached(pipe):
                record.update(evaluate(dmp, eval_stream(), device))
            if rank == 0:
                bar.write(f"step {step}: train loss {record['train_loss']:.4f}  eval AUC {record['auc']:.4f}  "
                          f"log loss {record['logloss']:.4f}  {rate:,.0f} samples/s")
            history.append(record)
            losses = []
        last = record
        if args.ckpt_dir and args.ckpt_every and step % args.ckpt_every == 0 and step < args.steps:
            with detached(pipe):
                save_checkpoint(args.ckpt_dir, step, dmp, opt, history, model_json)
    bar.close()
    if pipe is not None:
        pipe.detach()  # the plain model for the last evaluation and checkpoint
    if has_eval and (not history or history[-1]["step"] != step):
        last = {"step": step, **evaluate(dmp, eval_stream(), device)}
        history.append(last)
    if args.ckpt_dir:
        save_checkpoint(args.ckpt_dir, step, dmp, opt, history, model_json)

    final = history[-1] if history else (last or {})
    summary = {"steps": step, "world_size": world, "batch_size_per_rank": args.batch_size,
               "samples_per_s": rate if step_times else None,
               "step_ms_median": 1e3 * float(np.median(step_times)) if step_times else None,
               "auc": final.get("auc"), "logloss": final.get("logloss"), **sizes,
               "tt_rank": args.tt_rank, "tt_init": args.tt_init, "scale_tables": args.scale_tables,
               "args": vars(args)}
    if args.tt_cache_fraction:
        summary["tt_cache"] = cache_report(dmp)
    if args.train:  # every rank reads every line, so rank 0's counts are the totals
        summary["lines_read"] = sum(x.stats["lines"] for x in loaders)
        summary["corrupt_lines_skipped"] = sum(x.stats["skipped"] for x in loaders)
    if rank == 0:
        print_summary(summary)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        with open(os.path.join(args.out, "history.json"), "w") as f:
            json.dump(history, f, indent=1)
        if not args.no_plot and history:
            plot_history(history, os.path.join(args.out, "curve.png"))
    summary["history"] = history
    return summary


def print_summary(s: Dict) -> None:
    print("\n== summary ==")  # dense = fp32 tables; TT = cores (and cached rows) in their own dtype
    print(f"embedding tables: {human_bytes(s['emb_bytes_dense'])} dense fp32 -> {human_bytes(s['emb_bytes_ours'])} "
          f"with TT ({s['emb_compression']:.1f}x); the {s['tt_tables']} TT tables: "
          f"{human_bytes(s['tt_bytes_dense'])} -> {human_bytes(s['tt_bytes_ours'])} ({s['tt_compression']:,.0f}x)")
    print(f"whole model (tables + MLPs): {s['model_compression']:.1f}x smaller than with fp32 dense tables")
    if s["auc"] is not None:
        print(f"eval AUC {s['auc']:.4f}, log loss {s['logloss']:.4f}")
    for name, c in s.get("tt_cache", {}).items():
        print(f"hot-row cache {name}: {c['capacity']:,} rows, hit rate {100 * c['hit_rate']:.1f} % "
              f"({c['hits']:,} hits, {c['misses']:,} misses), {c['evictions']:,} evictions, "
              f"{c['rows_written_back']:,} rows written back")
    if "lines_read" in s:
        print(f"input: {s['lines_read']:,} lines read (all passes), {s['corrupt_lines_skipped']:,} corrupt lines skipped")
    if s["samples_per_s"]:
        print(f"{s['steps']} steps, {s['samples_per_s']:,.0f} samples/s over {s['world_size']} rank(s), "
              f"median step {s['step_ms_median']:.1f} ms (training steps after the first, data loading excluded)")


def plot_history(history: List[Dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    evals = [h for h in history if "auc" in h]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot([h["step"] for h in history if "train_loss" in h], [h["train_loss"] for h in history if "train_loss" in h],
           label="train (mean since last eval)")
    a.plot([h["step"] for h in evals], [h["logloss"] for h in evals], label="eval")
    a.set(xlabel="step", ylabel="log loss", title="loss")
    a.legend()
    b.plot([h["step"] for h in evals], [h["auc"] for h in evals], marker="o")
    b.set(xlabel="step", ylabel="AUC", title="eval AUC")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
    dist.destroy_process_group()
