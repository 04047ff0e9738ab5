"""TT-EmbeddingBag on CPU vs FBGEMM's dense TBE and a naive PyTorch TT, measured in one run.

Configuration (DESIGN.md §6): Kaggle's largest Criteo table 10,131,227 x 16 as TT with
p=(200,220,250), q=(2,2,4), R=32; a batch of 8192 ids drawn Zipf(1.05), one id per bag; each step
is forward + backward + update (SGD). Prints and writes median ms per step, the ratios
tt_vs_tbe (ours / TBE) and naive_vs_tt (naive / ours), our GFLOP/s on the unique rows (nominal
chain FLOPs, fwd + 2x for bwd, shared prefixes counted as if recomputed) and its fraction of the
machine's fp32 sgemm rate measured here, and the memory of each implementation.

    python examples/benchmark_tt_embedding.py --threads 2 --json out/bench.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np
import torch

from torchrec_tt import TTEmbeddingBag
from torchrec_tt.reference import tt_embedding_bag_reference


def zipf_ids(num_rows: int, batch: int, alpha: float, seed: int) -> torch.Tensor:
    """Zipf(alpha) ids truncated to the table (rank 1 = id 0, as hot ids cluster after hashing-free remaps)."""
    rng = np.random.default_rng(seed)
    out = np.empty(0, dtype=np.int64)
    while out.size < batch:
        x = rng.zipf(alpha, size=4 * batch)
        out = np.concatenate([out, x[x <= num_rows] - 1])
    return torch.from_numpy(out[:batch])


def median_ms(step, iters: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def chain_flops_per_row(p, q, ranks) -> int:
    """Forward FLOPs to rebuild one row: sum_k 2 * (q_1..q_{k-1}) * r_{k-1} * q_k * r_k."""
    flops, m = 0, q[0]
    for k in range(1, len(q)):
        flops += 2 * m * ranks[k] * q[k] * ranks[k + 1]
        m *= q[k]
    return flops


def sgemm_gflops(n: int = 1024, iters: int = 20) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    ms = median_ms(lambda: torch.mm(a, b), iters)
    return 2 * n**3 / (ms * 1e-3) / 1e9


def bench_tbe(num_rows, dim, ids, offsets, lr, iters):
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice, SplitTableBatchedEmbeddingBagsCodegen)

    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(num_rows, dim, EmbeddingLocation.HOST, ComputeDevice.CPU)], optimizer=EmbOptimType.EXACT_SGD,
        learning_rate=lr, device="cpu")
    grad = 1e-3 * torch.randn(offsets.numel() - 1, dim)
    ms = median_ms(lambda: tbe(ids, offsets).backward(grad), iters)
    return ms, num_rows * dim * 4


def bench_naive(table, ids, offsets, lr, iters, dedupe=False):
    cores = [torch.nn.Parameter(c.detach().clone()) for c in table.cores]
    opt = torch.optim.SGD(cores, lr=lr)
    grad = 1e-3 * torch.randn(offsets.numel() - 1, table.embedding_dim)

    def step():
        opt.zero_grad()
        if dedupe:
            uniq, inverse = torch.unique(ids, return_inverse=True)
            rows = tt_embedding_bag_reference(cores, uniq, torch.arange(uniq.numel() + 1), include_last_offset=True)
            out = torch.zeros(offsets.numel() - 1, table.embedding_dim).index_add_(
                0, torch.repeat_interleave(torch.arange(offsets.numel() - 1), offsets.diff()), rows[inverse])
        else:
            out = tt_embedding_bag_reference(cores, ids, offsets, include_last_offset=True)
        out.backward(grad)
        opt.step()

    ms = median_ms(step, iters, warmup=1)
    return ms, 2 * sum(c.numel() * 4 for c in cores)  # cores + their dense gradients


def add_config_args(ap: argparse.ArgumentParser) -> None:
    """The table/batch configuration shared by the CPU benchmarks (DESIGN.md §6 by default)."""
    ap.add_argument("--rows", type=int, default=10_131_227)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--p", type=int, nargs="+", default=[200, 220, 250])
    ap.add_argument("--q", type=int, nargs="+", default=[2, 2, 4])
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8192)
    ap.add_argument("--alpha", type=float, default=1.05)
    ap.add_argument("--threads", type=int, default=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(ap)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--naive-iters", type=int, default=7)
    ap.add_argument("--no-tbe", action="store_true", help="skip FBGEMM (e.g. where fbgemm_gpu is absent)")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lr = 0.01

    ids = zipf_ids(args.rows, args.batch, args.alpha, seed=0)
    offsets = torch.arange(args.batch + 1)
    unique = int(ids.unique().numel())
    table = TTEmbeddingBag(args.rows, args.dim, args.rank, args.p, args.q, include_last_offset=True,
                           optimizer="sgd", name="kaggle_c3")
    table.optimizer.learning_rate = lr
    # Small upstream gradients keep repeated steps on one batch from diverging (TT is a product of
    # cores: a fixed gradient direction grows them geometrically, and inf/NaN would time a different path).
    grad = 1e-3 * torch.randn(args.batch, args.dim)
    res = {"config": dict(rows=args.rows, dim=args.dim, p=args.p, q=args.q, rank=args.rank, batch=args.batch,
                          alpha=args.alpha, unique_ids=unique, threads=args.threads),
           "machine": platform.processor() or platform.machine(), "torch": torch.__version__}

    res["tt_ms"] = median_ms(lambda: table(ids, offsets).backward(grad), args.iters)
    res["tt_bytes"] = table.tt_bytes()
    assert all(torch.isfinite(c).all() for c in table.cores), "cores diverged during timing"
    for tag, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):  # half cores: fp32 copies per call
        half = TTEmbeddingBag(args.rows, args.dim, args.rank, args.p, args.q, include_last_offset=True,
                              optimizer="sgd", name="kaggle_c3", dtype=dtype)
        half.load_state_dict(table.state_dict())  # the same cores, rounded
        half.optimizer.learning_rate = lr
        res[f"tt_{tag}_ms"] = median_ms(lambda: half(ids, offsets).backward(grad.to(dtype)), args.iters)
        res[f"tt_{tag}_bytes"] = half.tt_bytes()
    if not args.no_tbe:
        res["tbe_ms"], res["tbe_bytes"] = bench_tbe(args.rows, args.dim, ids, offsets, lr, args.iters)
        res["tt_vs_tbe"] = res["tt_ms"] / res["tbe_ms"]
    res["naive_ms"], res["naive_bytes"] = bench_naive(table, ids, offsets, lr, args.naive_iters)
    res["naive_dedupe_ms"], _ = bench_naive(table, ids, offsets, lr, args.naive_iters, dedupe=True)
    res["naive_vs_tt"] = res["naive_ms"] / res["tt_ms"]
    flops = 3 * chain_flops_per_row(args.p, args.q, table.ranks) * unique
    res["tt_gflops"] = flops / (res["tt_ms"] * 1e-3) / 1e9
    res["sgemm_gflops"] = sgemm_gflops()
    res["fraction_of_sgemm"] = res["tt_gflops"] / res["sgemm_gflops"]
    res["compression_ratio"] = table.compression_ratio()

    print(f"{args.rows:,} x {args.dim}, p={args.p} q={args.q} R={args.rank}, batch {args.batch} Zipf({args.alpha}),"
          f" {unique} unique ids, {args.threads} threads")
    rows = [("torchrec_tt fused SGD", res["tt_ms"], res["tt_bytes"]),
            ("  the same, bf16 cores", res["tt_bf16_ms"], res["tt_bf16_bytes"]),
            ("  the same, fp16 cores", res["tt_fp16_ms"], res["tt_fp16_bytes"])]
    if "tbe_ms" in res:
        rows.append(("FBGEMM TBE dense EXACT_SGD", res["tbe_ms"], res["tbe_bytes"]))
    rows += [("naive PyTorch TT (autograd)", res["naive_ms"], res["naive_bytes"]),
             ("naive PyTorch TT + unique", res["naive_dedupe_ms"], res["naive_bytes"])]
    for name, ms, nbytes in rows:
        print(f"  {name:30s} {ms:9.2f} ms/step   {nbytes / 2**20:9.1f} MiB")
    if "tt_vs_tbe" in res:
        print(f"  tt_vs_tbe   {res['tt_vs_tbe']:.2f}  (target <= 1.0)")
    print(f"  naive_vs_tt {res['naive_vs_tt']:.1f}  (target >= 25)")
    print(f"  TT {res['tt_gflops']:.1f} GFLOP/s on unique rows = {100 * res['fraction_of_sgemm']:.0f}% of sgemm "
          f"({res['sgemm_gflops']:.0f} GFLOP/s)  (target >= 40%)")
    print(f"  compression {res['compression_ratio']:.0f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
