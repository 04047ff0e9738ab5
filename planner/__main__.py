"""``python -m torchrec_tt.planner``: choose TT compression for a table list, or redo the calibration.

    python -m torchrec_tt.planner --tables kaggle --world-size 8 --hbm-gb 16
    python -m torchrec_tt.planner --tables my_tables.yaml --world-size 2 --hbm-gb 1 --device cpu
    python -m torchrec_tt.planner calibrate --from bench.json [--device cpu] [--out calibration.json]

Planning prints, per table, dense and TT bytes, ranks, ratio and placement, then per-rank totals.
``--tables`` takes a YAML file or a bundled name (``kaggle``, ``terabyte``); see docs/planner.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from typing import List, Optional

from .chooser import InsufficientMemoryError, choose, make_topology
from .estimators import CALIBRATION_PATH


def calibrate(bench_json: str, device: str, out: str, config: str = "a") -> dict:
    """Write ``device``'s entry of the calibration file from a benchmark JSON: the TT FLOP rate and
    the batch's unique-id ratio. Takes ``--json`` output of examples/benchmark_tt_embedding.py (CPU) or
    of examples/benchmark_tt_embedding_cuda.py (its ``config`` result, fused SGD step)."""
    with open(bench_json) as f:
        bench = json.load(f)
    if "results" in bench:  # the CUDA benchmark: one result per config
        found = [r for r in bench["results"] if r.get("config") == config]
        if not found or "gflops_unique_rows" not in found[0]:
            raise SystemExit(f"{bench_json}: no measured config {config!r} (is it examples/"
                             "benchmark_tt_embedding_cuda.py --json output?)")
        r, meta = found[0], bench.get("meta", {})
        entry = {"tt_gflops": round(float(r["gflops_unique_rows"]), 3),
                 "unique_ratio": round(r["unique_ids"] / r["ids"], 4),
                 "threads": None,
                 "source": f"examples/benchmark_tt_embedding_cuda.py config {config} ({r['name']}, "
                           f"{r['unique_ids']} unique of {r['ids']} ids): fused SGD {r['ms']['ours']:.3f} ms/step",
                 "machine": f"{meta.get('device')}, torch {meta.get('torch')}"}
    elif "tt_gflops" in bench:
        cfg = bench.get("config", {})
        entry = {"tt_gflops": round(float(bench["tt_gflops"]), 3),
                 "unique_ratio": round(cfg["unique_ids"] / cfg["batch"], 4) if cfg.get("batch") else 1.0,
                 "threads": cfg.get("threads"),
                 "source": f"examples/benchmark_tt_embedding.py ({cfg}): tt_ms {bench.get('tt_ms')}, "
                           f"sgemm {bench.get('sgemm_gflops')} GFLOP/s",
                 "machine": f"{bench.get('machine')}, torch {bench.get('torch')}"}
    else:
        raise SystemExit(f"{bench_json}: neither examples/benchmark_tt_embedding.py nor "
                         "examples/benchmark_tt_embedding_cuda.py --json output")
    try:
        with open(out) as f:
            data = json.load(f)
    except FileNotFoundError:
        data = {}
    data[device] = entry
    with open(out, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    print(f"{out}: {device} = {entry['tt_gflops']} GFLOP/s, unique ratio {entry['unique_ratio']}")
    return entry


def plan_main(args: argparse.Namespace) -> int:
    from torchrec.distributed.planner.stats import NoopEmbeddingStats  # quiet: we print our own report
    from torchrec.modules.embedding_configs import DataType

    from .report import format_plan
    from .tables import load_constraints, load_tables

    tables = load_tables(args.tables, args.dim)
    constraints = load_constraints(args.tables)
    budget = int(args.hbm_gb * 2**30)
    topology = make_topology(args.world_size, budget, args.device, args.local_world_size)
    try:
        choice = choose(
            tables, topology, batch_size=args.batch_size, min_rank=args.min_rank, max_rank=args.max_rank,
            num_cores=args.num_cores, tt_optimizer=args.optimizer, constraints=constraints,
            tt_data_type=DataType[args.tt_data_type.upper()] if args.tt_data_type else None,
            stats=[NoopEmbeddingStats()])
    except InsufficientMemoryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n_tt = sum(1 for t in choice.tables if type(t).__name__ == "TTEmbeddingBagConfig")
    print(f"{len(tables)} tables from {args.tables}; world size {args.world_size}, {args.hbm_gb:g} GiB per "
          f"{'GPU (HBM)' if args.device != 'cpu' else 'rank (DDR)'}, batch {args.batch_size}/rank: "
          f"{n_tt} table(s) compressed to TT")
    print(format_plan(choice.options, topology, budget))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["calibrate"]:
        ap = argparse.ArgumentParser(prog="python -m torchrec_tt.planner calibrate", description=calibrate.__doc__)
        ap.add_argument("--from", dest="bench", required=True,
                        help="--json output of examples/benchmark_tt_embedding.py or benchmark_tt_embedding_cuda.py")
        ap.add_argument("--device", default="cpu", help="calibration entry to write (cpu, cuda)")
        ap.add_argument("--config", default="a", help="which result of the CUDA benchmark (default: the Kaggle table)")
        ap.add_argument("--out", default=CALIBRATION_PATH)
        a = ap.parse_args(argv[1:])
        calibrate(a.bench, a.device, a.out, a.config)
        return 0
    ap = argparse.ArgumentParser(prog="python -m torchrec_tt.planner", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tables", required=True, help="YAML table list, or 'kaggle' / 'terabyte'")
    ap.add_argument("--world-size", type=int, required=True)
    ap.add_argument("--hbm-gb", type=float, required=True, help="memory per device, GiB (DDR with --device cpu)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="topology's compute device")
    ap.add_argument("--local-world-size", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=512, help="per rank")
    ap.add_argument("--dim", type=int, default=None, help="override every table's embedding_dim")
    ap.add_argument("--min-rank", type=int, default=1)
    ap.add_argument("--max-rank", type=int, default=64)
    ap.add_argument("--num-cores", type=int, default=3)
    ap.add_argument("--optimizer", default=None, help="TT fused optimizer (sgd, adagrad, rowwise_adagrad); "
                    "default: dense core gradients")
    ap.add_argument("--tt-data-type", default=None, choices=["fp32", "fp16", "bf16"],
                    help="dtype of the TT cores (default: the table's own data_type)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR)
    logging.getLogger().setLevel(logging.INFO if args.verbose else logging.ERROR)
    if not args.verbose:
        warnings.filterwarnings("ignore", category=FutureWarning)
    return plan_main(args)


if __name__ == "__main__":
    sys.exit(main())
