"""Hot-row cache on CPU: hit rate and step time for cache sizes 0, 0.1 % and 1 % of rows, vs FBGEMM TBE.

Same configuration as ``benchmark_tt_embedding.py`` (DESIGN.md §6): 10,131,227 x 16 as TT with
p=(200,220,250), q=(2,2,4), R=32; 8192 Zipf(1.05) ids, one per bag; each step is forward +
backward + fused SGD. Each cache is first warmed with a few refreshes on batches from the same
distribution (other seeds), then timed on fresh batches with refresh off (the refresh cost is
reported separately). All timings come from one run, interleaved step by step (round-robin), as
these machines are noisy; compare the ratios, not the absolute times.

Two id layouts: ``zipf`` is ``zipf_ids`` as is (rank r -> id r - 1, so hot ids share TT prefixes
and are already cheap for the TT op's prefix dedupe); ``hashed`` maps ranks through a fixed
bijection ``(a * id + c) mod N``, as hashed categorical features land in a real table.

    python examples/benchmark_tt_cache.py --threads 2 --json out/cache.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark_tt_embedding import add_config_args, bench_tbe, zipf_ids  # noqa: E402

from torchrec_tt import TTEmbeddingBag  # noqa: E402


def make_table(args, fraction: float, lr: float) -> TTEmbeddingBag:
    kw = dict(cache_fraction=fraction, cache_refresh_interval=args.warm_interval) if fraction else {}
    table = TTEmbeddingBag(args.rows, args.dim, args.rank, args.p, args.q, include_last_offset=True,
                           optimizer="sgd", name="kaggle_c3", **kw)
    table.optimizer.learning_rate = lr
    return table


def cache_bytes(cache) -> int:
    """Everything the cache holds: rows, their optimizer state, the frequency tracker (candidates and
    pending ids: 4 x rows each), counters and the id -> slot map."""
    return sum(t.numel() * t.element_size() for t in (*cache.parameters(), *cache.buffers()))


def make_ids(args, layout: str):
    """Batch sampler for a layout: ``zipf`` as is, or ``hashed`` through a fixed bijection of [0, N)."""
    a = 2654435761
    while math.gcd(a, args.rows) != 1:
        a += 2
    if layout == "zipf":
        return lambda seed: zipf_ids(args.rows, args.batch, args.alpha, seed)
    return lambda seed: (zipf_ids(args.rows, args.batch, args.alpha, seed) * a + 12345) % args.rows


def warm(table, args, sample, grad, offsets) -> float:
    """Train on same-distribution batches (seeds 100+) through ``warm_refreshes`` refreshes; returns
    the time of the last (explicit) refresh in ms."""
    for step in range(args.warm_refreshes * args.warm_interval - 1):
        table(sample(100 + step), offsets).backward(grad)
    t0 = time.perf_counter()
    table.refresh_cache()
    ms = 1e3 * (time.perf_counter() - t0)
    table.cache.refresh_interval = 10**9  # no refresh inside the timed steps
    table.cache.reset_stats()
    return ms


def make_tbe(args, lr):
    """FBGEMM's dense CPU TBE with exact SGD (as ``bench_tbe`` builds it), for round-robin timing."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice, SplitTableBatchedEmbeddingBagsCodegen)
    return SplitTableBatchedEmbeddingBagsCodegen(
        [(args.rows, args.dim, EmbeddingLocation.HOST, ComputeDevice.CPU)], optimizer=EmbOptimType.EXACT_SGD,
        learning_rate=lr, device="cpu")


def interleaved(steps, iters: int, warmup: int = 3):
    """Median and mean ms of each step, timed round-robin (one step of each config per round, order
    rotated), so load from other jobs on a shared machine hits every config alike. The mean includes
    the cache's periodic candidate merges, which the median leaves out."""
    keys, times = list(steps), {k: [] for k in steps}
    for i in range(warmup + iters):
        for j in range(len(keys)):
            k = keys[(i + j) % len(keys)]
            t0 = time.perf_counter()
            steps[k](i)
            if i >= warmup:
                times[k].append(time.perf_counter() - t0)
    return {k: (1e3 * statistics.median(v), 1e3 * statistics.fmean(v)) for k, v in times.items()}


def run_layout(args, layout: str, lr: float, offsets, grad) -> dict:
    sample = make_ids(args, layout)
    fresh = [sample(10_000 + i) for i in range(args.fresh_batches)]
    res = {"unique_ids": int(fresh[0].unique().numel()), "caches": {}}
    tables = {}
    for f in args.fractions:
        table = make_table(args, f, lr)
        entry = {"fraction": f, "cache_rows": table.cache.rows if table.cache is not None else 0}
        if table.cache is not None:
            t0 = time.perf_counter()
            entry["last_refresh_ms"] = warm(table, args, sample, grad, offsets)
            entry["warmup_s"] = time.perf_counter() - t0
        tables[f] = table
        res["caches"][str(f)] = entry

    steps = {str(f): (lambda t: lambda i: t(fresh[i % len(fresh)], offsets).backward(grad))(t)
             for f, t in tables.items()}
    if not args.no_tbe:
        tbe = make_tbe(args, lr)
        steps["tbe"] = lambda i: tbe(fresh[i % len(fresh)], offsets).backward(grad)
    for key, (ms, mean_ms) in interleaved(steps, args.iters).items():
        if key == "tbe":
            res["tbe_ms"], res["tbe_mean_ms"] = ms, mean_ms
        else:
            res["caches"][key]["ms"], res["caches"][key]["mean_ms"] = ms, mean_ms
    if not args.no_tbe:  # cross-check with the other benchmark's own TBE timing (not interleaved)
        res["tbe_ms_bench_tbe"], res["tbe_bytes"] = bench_tbe(args.rows, args.dim, fresh[0], offsets, lr,
                                                             args.iters)
    base = res["caches"][str(args.fractions[0])]
    for f, table in tables.items():
        e = res["caches"][str(f)]
        e["vs_uncached"] = e["ms"] / base["ms"]
        e["mean_vs_uncached"] = e["mean_ms"] / base["mean_ms"]
        if "tbe_ms" in res:
            e["vs_tbe"] = e["ms"] / res["tbe_ms"]
        if table.cache is not None:
            st = table.cache_stats()
            e.update(hit_rate=st["hit_rate"], evictions=st["evictions"], rows_written_back=st["rows_written_back"],
                     writeback_residual=st["writeback_residual"],
                     cache_bytes=cache_bytes(table.cache),
                     cache_row_bytes=table.cache.weight.numel() * table.cache.weight.element_size())
            hit = table.cache.slots_of(fresh[0]) >= 0
            e["unique_misses"] = int(fresh[0][~hit].unique().numel())
        else:
            e.update(hit_rate=0.0, unique_misses=res["unique_ids"], cache_bytes=0)
        e["tt_bytes"] = table.tt_bytes()
    return res


def print_layout(args, layout: str, res: dict) -> None:
    print(f"\n### {layout} ids: {res['unique_ids']} unique per batch\n")
    print("| cache | rows | hit rate | unique misses | ms/step median (mean) | vs uncached TT median (mean) | "
          "vs TBE | memory: cores + whole cache (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for f in args.fractions:
        e = res["caches"][str(f)]
        print(f"| {100 * f:.1f} % | {e['cache_rows']:,} | {100 * e['hit_rate']:.1f} % | {e['unique_misses']} | "
              f"{e['ms']:.2f} ({e['mean_ms']:.2f}) | {e['vs_uncached']:.2f} ({e['mean_vs_uncached']:.2f}) | "
              f"{e.get('vs_tbe', float('nan')):.2f} | {(e['tt_bytes'] + e['cache_bytes']) / 2**20:.1f} |")
    if "tbe_ms" in res:
        base = res["caches"][str(args.fractions[0])]["ms"]
        print(f"| FBGEMM TBE dense | {args.rows:,} | - | - | {res['tbe_ms']:.2f} ({res['tbe_mean_ms']:.2f}) | "
              f"{res['tbe_ms'] / base:.2f} | 1.00 | {res['tbe_bytes'] / 2**20:.1f} |")
    big = res["caches"][str(args.fractions[-1])]
    print(f"\n{100 * args.fractions[-1]:.1f} % cache: {big['vs_uncached']:.2f} x the uncached TT step, median "
          f"({big['mean_vs_uncached']:.2f} x in the mean; target <= 0.6); "
          f"last refresh {big.get('last_refresh_ms', 0):.0f} ms; {big.get('rows_written_back', 0)} rows written "
          f"back during warm-up, residual {big.get('writeback_residual', 0):.3f}"
          + (f"; TBE alone (bench_tbe): {res['tbe_ms_bench_tbe']:.2f} ms" if "tbe_ms_bench_tbe" in res else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(ap)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.001, 0.01])
    ap.add_argument("--layouts", nargs="+", choices=["zipf", "hashed"], default=["zipf", "hashed"])
    ap.add_argument("--warm-refreshes", type=int, default=4)
    ap.add_argument("--warm-interval", type=int, default=50, help="training steps between warm-up refreshes")
    ap.add_argument("--fresh-batches", type=int, default=8, help="timed batches (cycled), seeds 10000+")
    ap.add_argument("--iters", type=int, default=400, help="timed round-robin rounds (several candidate merges)")
    ap.add_argument("--no-tbe", action="store_true")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lr = 0.01
    offsets = torch.arange(args.batch + 1)
    grad = 1e-3 * torch.randn(args.batch, args.dim)  # small upstream gradients keep repeated steps finite
    res = {"config": vars(args), "machine": platform.processor() or platform.machine(), "torch": torch.__version__}
    print(f"{args.rows:,} x {args.dim}, p={args.p} q={args.q} R={args.rank}, batch {args.batch} Zipf({args.alpha}), "
          f"one id per bag, fused SGD, {args.threads} threads; shared, noisy machine: medians of {args.iters} "
          "round-robin steps")
    for layout in args.layouts:
        res[layout] = run_layout(args, layout, lr, offsets, grad)
        print_layout(args, layout, res[layout])
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)


if __name__ == "__main__":
    main()
