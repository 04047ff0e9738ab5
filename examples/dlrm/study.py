"""Accuracy study behind docs/accuracy.md: dense vs TT DLRM runs, then a table and a plot.

    python examples/dlrm/study.py synthetic --out out/study      # dense vs TT ranks, inits, seeds
    python examples/dlrm/study.py criteo --out out/study         # the real Criteo sample

Each run is ``examples/dlrm/train.py`` in its own process (1 thread; ``--jobs`` at a time); its
summary.json lands in ``<out>/<name>/``. Runs already done are not repeated.
"""
import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
CRITEO = "/work/shared/data/criteo_kaggle_head7k.tsv"
CACHE_FRACTION = 0.002  # of each TT table's rows: keeps the TT tables >= 100x smaller than dense


def synthetic_runs(steps: int, seeds: int = 2):
    common = ["--scale-tables", "0.1", "--tt-tables", "5", "--batch-size", "1024", "--steps", str(steps),
              "--eval-batches", "64", "--eval-every", str(steps // 4)]
    runs = {}
    for seed in range(seeds):  # dense vs the >= 100x TT point (without and with a hot-row cache), paired by seed
        runs[f"dense_s{seed}"] = common + ["--tt-tables", "0", "--seed", str(seed)]
        runs[f"tt_r16_s{seed}"] = common + ["--tt-rank", "16", "--seed", str(seed)]
        runs[f"tt_r16_cache_s{seed}"] = common + ["--tt-rank", "16", "--seed", str(seed), "--tt-cache-fraction",
                                                  str(CACHE_FRACTION), "--tt-cache-refresh", "250"]
    for rank in (8, 32, 64):
        runs[f"tt_r{rank}_s0"] = common + ["--tt-rank", str(rank)]
    for init in ("uniform", "normal"):
        runs[f"tt_r16_{init}_s0"] = common + ["--tt-rank", "16", "--tt-init", init]
    return runs


def criteo_runs(path: str):
    common = ["--train", path, "--test", path, "--train-lines", "1:6001", "--test-lines", "6001:",
              "--batch-size", "128", "--epochs", "1", "--steps", "100000", "--scale-tables", "0.1",
              "--tt-tables", "5"]
    runs = {}
    for seed in (0, 1, 2):
        runs[f"criteo_dense_s{seed}"] = common + ["--tt-tables", "0", "--seed", str(seed)]
        runs[f"criteo_tt_r16_s{seed}"] = common + ["--tt-rank", "16", "--seed", str(seed)]
    return runs


def run(name: str, flags, out: str) -> dict:
    target = os.path.join(out, name)
    summary = os.path.join(target, "summary.json")
    if not os.path.exists(summary):
        cmd = [sys.executable, os.path.join(HERE, "train.py"), *flags, "--threads", "1", "--out", target]
        print(" ".join(cmd), flush=True)
        with open(os.path.join(out, f"{name}.log"), "w") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    return json.load(open(summary))


def table(results: dict) -> str:
    rows = ["| run | TT rank | init | cache hit rate | AUC | log loss | TT-table compression | "
            "embedding compression | whole-model compression | samples/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in results.items():
        tt = s["tt_tables"] > 0
        caches = s.get("tt_cache", {})
        hit = f"{100 * sum(c['hit_rate'] for c in caches.values()) / len(caches):.0f} %" if caches else "-"
        rows.append(f"| {name} | {s['tt_rank'] if tt else '-'} | {s['tt_init'] if tt else '-'} | {hit} | "
                    f"{s['auc']:.4f} | {s['logloss']:.4f} | {s['tt_compression']:,.0f}x | {s['emb_compression']:.1f}x | "
                    f"{s['model_compression']:.1f}x | {s['samples_per_s']:,.0f} |")
    return "\n".join(rows)


def plot(results: dict, path: str) -> None:
    """AUC curves and final AUC vs compression; one colour per configuration (its seeds share it)."""
    import re

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    groups = list(dict.fromkeys(re.sub(r"_s\d+$", "", n) for n in results))
    colour = {g: plt.get_cmap("tab10")(i % 10) for i, g in enumerate(groups)}
    labelled = set()
    for name, s in results.items():
        g = re.sub(r"_s\d+$", "", name)
        label = None if g in labelled else g
        labelled.add(g)
        hist = json.load(open(os.path.join(os.path.dirname(path), name, "history.json")))
        ev = [h for h in hist if "auc" in h]
        a.plot([h["step"] for h in ev], [h["auc"] for h in ev], marker=".", color=colour[g], label=label, lw=0.8)
        b.scatter(s["tt_compression"] if s["tt_tables"] else 1.0, s["auc"], color=colour[g], label=label)
    b.set(xscale="log", xlabel="compression of the TT tables (x; dense = 1)", ylabel="final eval AUC",
          title="AUC vs compression (each point one seed)")
    b.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    a.set(xlabel="step", ylabel="eval AUC", title="eval AUC during training")
    a.legend(fontsize=7)
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("which", choices=["synthetic", "criteo"])
    p.add_argument("--out", default="out/study")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--seeds", type=int, default=2, help="seeds of the dense and rank-16 synthetic runs")
    p.add_argument("--data", default=CRITEO)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    runs = synthetic_runs(args.steps, args.seeds) if args.which == "synthetic" else criteo_runs(args.data)
    with ThreadPoolExecutor(args.jobs) as pool:
        results = dict(zip(runs, pool.map(lambda kv: run(kv[0], kv[1], args.out), runs.items())))
    md = table(results)
    print(md)
    with open(os.path.join(args.out, f"{args.which}.md"), "w") as f:
        f.write(md + "\n")
    plot(results, os.path.join(args.out, f"{args.which}.png"))


if __name__ == "__main__":
    main()
