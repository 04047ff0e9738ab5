"""One fused-SGD training step of a benchmark config, for Nsight Compute and compute-sanitizer
(scripts/gpu_check.sh with NCU=1 / SANITIZE=1): warm-up steps, then one step between
cudaProfilerStart and cudaProfilerStop (`ncu --profile-from-start off` sees that step's kernels only).

    PYTHONPATH=. python3 examples/cuda_kernel_step.py --config b
"""
import argparse
import os
import sys

import torch

import benchmark_tt_embedding_cuda as b  # beside this script (its directory is on sys.path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="b", choices=sorted(b.CONFIGS))
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--general-plan", action="store_true", help="TORCHREC_TT_CUDA_SMALL_PLAN=0 for this run")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help=argparse.SUPPRESS)  # dry run
    args = ap.parse_args()
    dev = b.DEVICE = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        print("cuda_kernel_step: no CUDA device", file=sys.stderr)
        return 1
    if args.general_plan:
        os.environ["TORCHREC_TT_CUDA_SMALL_PLAN"] = "0"
    cfg = b.CONFIGS[args.config]
    ids, offsets = b.make_batch(cfg, dev)
    grad = torch.randn(offsets.numel(), cfg["dim"], device=dev) * 1e-3
    step = b.ours_step(cfg, ids, offsets, grad)
    for _ in range(args.warmup):
        step()
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
    step()
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
    print(f"cuda_kernel_step: one step of config {args.config} ({ids.numel()} ids) done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
