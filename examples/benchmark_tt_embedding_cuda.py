"""CUDA benchmark of one training step (forward + backward + optimizer update) of a TT table.

Compared (torch only, no torchrec/fbgemm):
  * dense:    torch.nn.EmbeddingBag(sparse=True) + torch.optim.SGD on its sparse gradient (the
              fastest plain-PyTorch dense table step);
  * naive_tt: torchrec_tt.reference (gather cores per id + bmm chain, autograd) + torch.optim.SGD;
  * ours_dense: torchrec_tt op with dense core gradients + torch.optim.SGD;
  * ours:     torchrec_tt op with the fused SGD update in backward (TTEmbeddingBag(optimizer="sgd"));
  * ours_graph: the same step captured once in a CUDA graph (torch.cuda.graph) and replayed: the step
              without the host's launch overhead (the batch's shapes are fixed; CUDA only).

Configs:
  (a) 10,131,227 x 16, p=(200,220,250), q=(2,2,4), R=32, 8192 ids ~ Zipf(1.05), one id per bag;
  (b) the reference paper code's table: p=(200,220,250), q=(4,4,4) (11,000,000 x 64), R=32,
      512 bags x 20 ids, ids uniform by default (--dist-b zipf for Zipf(1.05)).
Zipf ranks are scattered over the table by a fixed random permutation (hot ids do not all share
prefixes). The batch is fixed across iterations. Timing: CUDA events around each step, warm-up,
median of --iters (>= 20) steps, the methods taking turns step by step (so host noise hits them alike).
Each step is synchronised, so the GPU idles while the host issues the next one's first launches. A
training loop does not wait: it issues step i + 1 while the GPU runs step i. The second table times
that: bursts of --burst steps issued back to back (one event pair around the burst), the median burst's
ms per step, dense / ours / ours_graph taking turns burst by burst.

    python examples/benchmark_tt_embedding_cuda.py --json out.json --markdown out.md
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

import torchrec_tt  # noqa: F401
from torchrec_tt import FusedOptimizerConfig, TTEmbeddingBag
from torchrec_tt.ops import tt_embedding_bag
from torchrec_tt.reference import tt_embedding_bag_reference

LR = 0.01
DEVICE = "cuda"  # --device cpu: dry run of this script (wall-clock timing) on a machine without a GPU


def zipf_ids(n: int, num_rows: int, alpha: float, gen: torch.Generator, device) -> torch.Tensor:
    w = torch.arange(1, num_rows + 1, device=device, dtype=torch.float64).pow_(-alpha)
    cdf = torch.cumsum(w, 0)
    u = torch.rand(n, generator=gen, device=device, dtype=torch.float64) * cdf[-1]
    ranks = torch.searchsorted(cdf, u).clamp_(max=num_rows - 1)
    perm = torch.randperm(num_rows, generator=gen, device=device)
    del w, cdf
    return perm[ranks]


def make_batch(cfg, device):
    gen = torch.Generator(device=device).manual_seed(0)
    n = cfg["bags"] * cfg["bag_size"]
    if cfg["dist"] == "zipf":
        ids = zipf_ids(n, cfg["num_rows"], 1.05, gen, device)
    else:
        ids = torch.randint(0, cfg["num_rows"], (n,), generator=gen, device=device)
    offsets = torch.arange(0, n, cfg["bag_size"], device=device)
    return ids.long(), offsets.long()


def timed(step) -> float:
    """ms of one step: CUDA events around it (host time counts when the GPU waits for it)."""
    if DEVICE == "cpu":
        t0 = time.perf_counter()
        step()
        return (time.perf_counter() - t0) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def time_back_to_back(steps: dict, names, bursts: int, per_burst: int) -> dict:
    """Median ms per step over ``bursts`` bursts of ``per_burst`` steps issued without synchronising in
    between (the throughput of a training loop, host and GPU overlapping), the methods taking turns burst
    by burst. Only methods in ``steps`` (those that survived warm-up) are timed."""
    names = [n for n in names if n in steps]
    times = {name: [] for name in names}

    def burst(step):
        return lambda: [step() for _ in range(per_burst)]

    for i in range(bursts):
        for j in range(len(names)):
            name = names[(i + j) % len(names)]
            times[name].append(timed(burst(steps[name])) / per_burst)
    return {name: statistics.median(t) for name, t in times.items()}


def time_interleaved(steps: dict, iters: int, warmup: int, errors: dict) -> dict:
    """Median ms per step of each method, the methods taking turns step by step (the first one moves
    round each iteration): a burst of load on the host hits every method alike, so the ratios hold
    even when absolute times drift between runs. A method that fails in warm-up goes to ``errors``."""
    names = []
    for name, step in steps.items():
        try:
            for _ in range(warmup):
                step()
            names.append(name)
        except Exception as e:  # noqa: BLE001  (one failing method must not hide the others)
            errors[name] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    times = {name: [] for name in names}
    for i in range(iters):
        for j in range(len(names)):
            name = names[(i + j) % len(names)]
            times[name].append(timed(steps[name]))
    return {name: statistics.median(t) for name, t in times.items()}


def dense_step(cfg, ids, offsets, grad):
    emb = torch.nn.EmbeddingBag(cfg["num_rows"], cfg["dim"], mode="sum", sparse=True, device=DEVICE)
    opt = torch.optim.SGD(emb.parameters(), lr=LR)

    def step():
        opt.zero_grad(set_to_none=True)
        emb(ids, offsets).backward(grad)
        opt.step()

    return step


def tt_module(cfg, optimizer):
    torch.manual_seed(0)
    return TTEmbeddingBag(cfg["num_rows"], cfg["dim"], tt_ranks=cfg["rank"], tt_p_shapes=cfg["p"],
                          tt_q_shapes=cfg["q"], mode="sum", optimizer=optimizer, device=DEVICE)


def autograd_step(lookup, cfg, grad):
    """A step of a TT lookup with dense core gradients: lookup(cores) -> pooled, backward, torch SGD."""
    cores = list(tt_module(cfg, None).cores)
    opt = torch.optim.SGD(cores, lr=LR)

    def step():
        opt.zero_grad(set_to_none=True)
        lookup(cores).backward(grad)
        opt.step()

    return step


def naive_step(cfg, ids, offsets, grad):
    return autograd_step(lambda cores: tt_embedding_bag_reference(cores, ids, offsets, None, "sum", False),
                         cfg, grad)


def ours_dense_step(cfg, ids, offsets, grad):
    return autograd_step(lambda cores: tt_embedding_bag(cores, ids, offsets, num_embeddings=cfg["num_rows"],
                                                        mode="sum", bounds_check_mode="ignore"),
                         cfg, grad)


def ours_step(cfg, ids, offsets, grad, bounds_check_mode="ignore"):
    t = tt_module(cfg, FusedOptimizerConfig("sgd", learning_rate=LR))
    t.bounds_check_mode = torchrec_tt.ops.BoundsCheckMode.parse(bounds_check_mode)

    def step():
        t(ids, offsets).backward(grad)

    return step


def graph_step(cfg, ids, offsets, grad):
    """``ours``, the whole step (forward, backward, fused update) captured once in a CUDA graph and
    replayed. Capture needs bounds_check_mode ignore (nothing is read back) and fixed shapes."""
    step = ours_step(cfg, ids, offsets, grad)
    side = torch.cuda.Stream()  # warm-up on a side stream, as torch.cuda.graph asks
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def row_flops(q, r):
    """Forward FLOPs of one row: sum_k 2 (q_0..q_{k-1}) r_k q_k r_{k+1} (k >= 1)."""
    total, m = 0, q[0]
    for k in range(1, len(q)):
        total += 2 * m * r[k] * q[k] * r[k + 1]
        m *= q[k]
    return total


CONFIGS = {
    "a": dict(name="(a) 10,131,227 x 16, q=(2,2,4), 8192 ids Zipf(1.05), 1 id/bag", num_rows=10_131_227, dim=16,
              p=[200, 220, 250], q=[2, 2, 4], rank=32, bags=8192, bag_size=1, dist="zipf"),
    "tiny": dict(name="(tiny) dry-run table", num_rows=5000, dim=8, p=[10, 20, 25], q=[2, 2, 2], rank=4, bags=64,
                 bag_size=3, dist="zipf"),
    "b": dict(name="(b) 11,000,000 x 64, q=(4,4,4), 512 bags x 20 ids", num_rows=200 * 220 * 250, dim=64,
              p=[200, 220, 250], q=[4, 4, 4], rank=32, bags=512, bag_size=20, dist="uniform"),
}


def run(args):
    results = []
    for key in args.configs:
        cfg = dict(CONFIGS[key])
        if key == "b":
            cfg["dist"] = args.dist_b
            cfg["name"] += f" ({cfg['dist']})"
        ids, offsets = make_batch(cfg, DEVICE)
        n = ids.numel()
        unique = int(torch.unique(ids).numel())
        grad = torch.randn(cfg["bags"], cfg["dim"], device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(1))
        r = [1] + [cfg["rank"]] * (len(cfg["p"]) - 1) + [1]
        res = dict(config=key, name=cfg["name"], ids=n, unique_ids=unique, ms={}, errors={})
        makers = [("dense", dense_step), ("naive_tt", naive_step), ("ours_dense", ours_dense_step),
                  ("ours", ours_step),
                  ("ours_checked", lambda *a: ours_step(*a, bounds_check_mode="error"))]  # one D2H copy per step
        if DEVICE == "cuda":
            makers.append(("ours_graph", graph_step))
        steps = {}
        for label, make in makers:
            try:
                steps[label] = make(cfg, ids, offsets, grad)
            except Exception as e:  # noqa: BLE001  (one failing method must not hide the others)
                res["errors"][label] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        t0 = time.time()
        res["ms"] = time_interleaved(steps, args.iters, args.warmup, res["errors"])
        live = {k: v for k, v in steps.items() if k in res["ms"]}
        res["ms_back_to_back"] = time_back_to_back(live, ("dense", "ours", "ours_graph"), args.bursts, args.burst)
        print(f"  [{key}] {res['ms']} back to back {res['ms_back_to_back']} ({time.time() - t0:.1f}s)", flush=True)
        del steps
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        ms = res["ms"]
        if "ours" in ms:
            if "dense" in ms:
                res["ours_over_dense"] = ms["ours"] / ms["dense"]
            if "naive_tt" in ms:
                res["naive_over_ours"] = ms["naive_tt"] / ms["ours"]
            res["us_per_lookup_fwd_bwd"] = ms["ours"] * 1e3 / n
            flops = 3 * row_flops(cfg["q"], r) * unique
            res["gflops_unique_rows"] = flops / (ms["ours"] * 1e-3) / 1e9
        if "ours_graph" in ms:
            res["us_per_lookup_graph"] = ms["ours_graph"] * 1e3 / n
        b2b = res["ms_back_to_back"]
        if "ours" in b2b:
            res["us_per_lookup_back_to_back"] = b2b["ours"] * 1e3 / n
            if "dense" in b2b:
                res["ours_over_dense_back_to_back"] = b2b["ours"] / b2b["dense"]
        results.append(res)
    return results


def _field(result):
    """``result[key]`` formatted, or "-" where the run has no such figure."""
    return lambda key, fmt: fmt.format(result[key]) if key in result else "-"


def markdown(meta, results):
    lines = [f"# TT embedding CUDA benchmark ({meta['device']}, torch {meta['torch']})", "",
             "Median ms per training step (forward + backward + SGD update), "
             f"{meta['iters']} iterations after {meta['warmup']} warm-up.", "",
             "| config | ids (unique) | dense EmbeddingBag | naive TT | ours dense+SGD | ours fused SGD | "
             "ours fused, bounds check error | ours fused, CUDA graph | ours/dense | naive/ours | us/lookup | "
             "us/lookup (graph) | GFLOP/s (unique rows) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ms = r["ms"]
        f = lambda k: f"{ms[k]:.3f}" if k in ms else ("err" if k in r["errors"] else "-")  # noqa: E731
        g = _field(r)
        lines.append(f"| {r['name']} | {r['ids']} ({r['unique_ids']}) | {f('dense')} | {f('naive_tt')} | "
                     f"{f('ours_dense')} | {f('ours')} | {f('ours_checked')} | "
                     f"{f('ours_graph')} | {g('ours_over_dense', '{:.2f}')} | "
                     f"{g('naive_over_ours', '{:.1f}')} | {g('us_per_lookup_fwd_bwd', '{:.4f}')} | "
                     f"{g('us_per_lookup_graph', '{:.4f}')} | {g('gflops_unique_rows', '{:.0f}')} |")
    lines += ["", f"Back to back: median of {meta['bursts']} bursts of {meta['burst']} steps issued without "
              "synchronising in between, ms per step.", "",
              "| config | dense EmbeddingBag | ours fused SGD | ours fused, CUDA graph | ours/dense | us/lookup |",
              "|---|---|---|---|---|---|"]
    for r in results:
        b = r.get("ms_back_to_back", {})
        f = lambda k: f"{b[k]:.3f}" if k in b else "-"  # noqa: E731
        g = _field(r)
        lines.append(f"| {r['name']} | {f('dense')} | {f('ours')} | {f('ours_graph')} | "
                     f"{g('ours_over_dense_back_to_back', '{:.2f}')} | {g('us_per_lookup_back_to_back', '{:.4f}')} |")
    for r in results:
        for k, v in r["errors"].items():
            lines.append(f"\n- {r['config']} {k} failed: `{v}`")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["a", "b"], choices=sorted(CONFIGS))
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--bursts", type=int, default=7, help="back-to-back bursts per method (median)")
    ap.add_argument("--burst", type=int, default=10, help="steps per back-to-back burst")
    ap.add_argument("--dist-b", default="uniform", choices=["uniform", "zipf"])
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    if args.iters < 20:
        ap.error("--iters must be >= 20")
    if args.bursts < 1 or args.burst < 1:
        ap.error("--bursts and --burst must be >= 1")
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("benchmark_tt_embedding_cuda: no CUDA device", file=sys.stderr)
        return 1
    meta = dict(device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (dry run)",
                torch=torch.__version__, cuda=torch.version.cuda,
                iters=args.iters, warmup=args.warmup, bursts=args.bursts, burst=args.burst)
    results = run(args)
    md = markdown(meta, results)
    print(md)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(meta=meta, results=results), fh, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
