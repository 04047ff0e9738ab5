"""Train one TT table the size of Criteo Kaggle's largest (10,131,227 x 16) on synthetic Zipf ids.

Labels come from a planted teacher (a hidden random TT table and a linear read-out), so the loss
has somewhere to go: a working table drives it well below the label entropy it starts at.
Prints the compression ratio, the loss curve and the throughput.

    python examples/demo_tt_table.py --steps 300 --threads 2
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from torchrec_tt import FusedOptimizerConfig, TTEmbeddingBag

KAGGLE_LARGEST = 10_131_227


def zipf_batch(rng: np.random.Generator, rows: int, size: int, alpha: float) -> torch.Tensor:
    out = np.empty(0, dtype=np.int64)
    while out.size < size:
        x = rng.zipf(alpha, size=2 * size)
        out = np.concatenate([out, x[x <= rows] - 1])
    return torch.from_numpy(out[:size])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=KAGGLE_LARGEST)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--alpha", type=float, default=1.05)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)

    teacher = TTEmbeddingBag(args.rows, args.dim, tt_ranks=2, name="teacher")
    teacher_head = torch.randn(args.dim) * 3 / teacher.full_weight()[:4096].std() / args.dim**0.5
    table = TTEmbeddingBag(args.rows, args.dim, tt_ranks=args.rank, name="C3",
                           optimizer=FusedOptimizerConfig("rowwise_adagrad", learning_rate=args.lr))
    head = torch.nn.Linear(args.dim, 1)
    head_opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    print(table)
    print(f"dense table: {table.dense_bytes() / 2**20:,.0f} MiB; TT cores + optimizer state: "
          f"{table.tt_bytes() / 2**20:.2f} MiB; compression {table.compression_ratio():.0f}x")

    offsets = torch.arange(args.batch)
    losses, seen, t0 = [], 0, time.perf_counter()
    for step in (bar := tqdm(range(args.steps), desc="training", unit="step")):
        ids = zipf_batch(rng, args.rows, args.batch, args.alpha)
        with torch.no_grad():
            labels = torch.bernoulli(torch.sigmoid(teacher(ids, offsets) @ teacher_head))
        logits = head(table(ids, offsets)).squeeze(1)
        loss = F.binary_cross_entropy_with_logits(logits, labels)
        head_opt.zero_grad()
        loss.backward()  # updates the TT cores in place (fused row-wise Adagrad)
        head_opt.step()
        losses.append(loss.item())
        seen += args.batch
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", samples_s=f"{seen / (time.perf_counter() - t0):,.0f}")
    elapsed = time.perf_counter() - t0
    first, last = np.mean(losses[:20]), np.mean(losses[-20:])
    print(f"log loss: first 20 steps {first:.4f} -> last 20 steps {last:.4f}")
    print(f"throughput: {seen / elapsed:,.0f} samples/s ({1e3 * elapsed / args.steps:.1f} ms/step incl. data "
          f"and teacher), {args.threads} threads")


if __name__ == "__main__":
    main()
