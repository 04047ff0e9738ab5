"""Per-kernel CUDA time of fused-SGD training steps of ours, configs (a) and (b) (torch.profiler):
totals over 10 steps, then one step's kernels in launch order (which level each launch served);
then where the host time goes: median host time to issue forward and backward (ours and the dense
EmbeddingBag step), and the CPU-side calls (CUDA runtime API included) sorted by self time.

    PYTHONPATH=. python3 examples/profile_tt_embedding_cuda.py          # on a GPU machine, after building
"""
import os
import statistics
import sys
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.getcwd(), "examples"))
import benchmark_tt_embedding_cuda as b  # noqa: E402

DEV = sys.argv[1] if len(sys.argv) > 1 else "cuda"
b.DEVICE = DEV
sync = torch.cuda.synchronize if DEV == "cuda" else (lambda: None)
for name in (("a", "b") if DEV == "cuda" else ("tiny",)):
    cfg = b.CONFIGS[name]
    ids, offsets = b.make_batch(cfg, DEV)
    t = b.tt_module(cfg, b.FusedOptimizerConfig("sgd", learning_rate=b.LR))
    t.bounds_check_mode = b.torchrec_tt.ops.BoundsCheckMode.parse("ignore")
    grad = torch.randn(offsets.numel(), cfg["dim"], device=DEV) * 1e-3
    for _ in range(5):
        t(ids, offsets).backward(grad)
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            t(ids, offsets).backward(grad)
        sync()
    print(f"=== config {name}: 10 steps")
    print(prof.key_averages().table(sort_by=("cuda_time_total" if DEV == "cuda" else "cpu_time_total"),
                                    row_limit=22, max_name_column_width=60))
    if DEV != "cuda":
        continue
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t(ids, offsets).backward(grad)
        sync()
    kernels = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA), key=lambda e: e.time_range.start)
    print(f"=== config {name}: one step, kernels in launch order (us)")
    for e in kernels:
        us = getattr(e, "device_time", None) or getattr(e, "cuda_time", 0.0)
        print(f"{us:9.1f}  {e.name[:110]}")


def host_times(fwd, bwd, iters=50):
    """Median host ms to issue a forward and its backward, each step starting on an idle GPU."""
    f_ms, b_ms = [], []
    for _ in range(iters + 5):
        sync()
        t0 = time.perf_counter()
        out = fwd()
        t1 = time.perf_counter()
        bwd(out)
        t2 = time.perf_counter()
        f_ms.append((t1 - t0) * 1e3)
        b_ms.append((t2 - t1) * 1e3)
    return statistics.median(f_ms[5:]), statistics.median(b_ms[5:])


if DEV == "cuda":
    for name in ("a", "b"):
        cfg = b.CONFIGS[name]
        ids, offsets = b.make_batch(cfg, DEV)
        grad = torch.randn(offsets.numel(), cfg["dim"], device=DEV) * 1e-3
        t = b.tt_module(cfg, b.FusedOptimizerConfig("sgd", learning_rate=b.LR))
        t.bounds_check_mode = b.torchrec_tt.ops.BoundsCheckMode.parse("ignore")
        emb = torch.nn.EmbeddingBag(cfg["num_rows"], cfg["dim"], mode="sum", sparse=True, device=DEV)
        opt = torch.optim.SGD(emb.parameters(), lr=b.LR)

        def dense_bwd(out):
            out.backward(grad)
            opt.step()
            opt.zero_grad(set_to_none=True)

        of, ob = host_times(lambda: t(ids, offsets), lambda out: out.backward(grad))
        df, db = host_times(lambda: emb(ids, offsets), dense_bwd)
        print(f"=== config {name}: host ms to issue (median of 50): ours forward {of:.3f} backward {ob:.3f}; "
              f"dense forward {df:.3f} backward+SGD {db:.3f}")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                t(ids, offsets).backward(grad)
            sync()
        print(f"=== config {name}: CPU-side calls over 10 steps, by self CPU time")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60))
        del emb, opt, t
        torch.cuda.empty_cache()
