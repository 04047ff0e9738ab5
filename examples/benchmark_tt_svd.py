"""TT-SVD warm start (``TTEmbeddingBagCollection.from_dense``) of a Kaggle-shaped table on CPU.

Times, in one run and alternating ``--rounds`` times: the decomposition with its error as shipped
(``tt_svd``: the rows rebuilt by blocks of GEMMs against the contracted cores) and the same error
computed as before (``reference.tt_full_weight``, one chain of small products per row), so the
ratio of the two error computations is measured on the same machine at the same moment. Reports
medians and the process's peak resident memory (which includes both methods' buffers).

    python examples/benchmark_tt_svd.py --threads 2 --rows 10131227 --rounds 1
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from torchrec_tt.decomposition import _distance, tt_svd
from torchrec_tt.reference import tt_full_weight


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--p", type=int, nargs="+", default=None, help="default: 3 balanced factors")
    parser.add_argument("--q", type=int, nargs="+", default=[2, 2, 4])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from torchrec_tt.shapes import suggest_p_shapes
    p = args.p or suggest_p_shapes(args.rows, len(args.q))
    weight = torch.randn(args.rows, args.dim, generator=torch.Generator().manual_seed(0)) * 0.01
    print(f"table {args.rows:,} x {args.dim}, p={p}, q={args.q}, rank {args.rank}, {args.threads} threads")
    svd_s, block_s, rows_s = [], [], []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        cores, err = tt_svd(weight, p, args.q, args.rank)
        svd_s.append(time.perf_counter() - t0)
        cores64, w64 = [c.double() for c in cores], weight.double()
        t0 = time.perf_counter()
        blocks = float(_distance(cores64, w64))
        block_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        rows = float(torch.linalg.norm(tt_full_weight(cores64, args.rows) - w64))
        rows_s.append(time.perf_counter() - t0)
        assert abs(blocks - rows) <= 1e-9 * rows, (blocks, rows)
    med = statistics.median
    print(f"tt_svd (decomposition + error): median {med(svd_s):.1f} s over {args.rounds}, relative error {err:.4f}")
    print(f"error by blocks of GEMMs: {med(block_s):.2f} s; by the reference's per-row rebuild: {med(rows_s):.2f} s "
          f"({med(rows_s) / med(block_s):.1f}x); both give {blocks:.6g}")
    print(f"peak resident memory of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
