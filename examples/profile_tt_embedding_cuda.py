"""Per-kernel CUDA time of fused-SGD training steps of ours, configs (a) and (b) (torch.profiler):
totals over 10 steps, then one step's kernels in launch order (which level each launch served).

    PYTHONPATH=. python3 examples/profile_tt_embedding_cuda.py          # on a GPU machine, after building
"""
import os
import sys

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
