"""Shared by the CUDA test files: the device under test, the both-plan-paths fixture, random cases and
the helpers that run the ops on them. TORCHREC_TT_TEST_DEVICE=cpu runs those files against the CPU op
(a dry run of the test logic on a machine without a GPU)."""
import math
import os
import random

import pytest
import torch

import torchrec_tt  # noqa: F401  (registers the ops)

DEV = os.environ.get("TORCHREC_TT_TEST_DEVICE", "cuda")
cuda_only = pytest.mark.skipif(DEV != "cuda", reason="CUDA-specific behaviour")
OPS = torch.ops.torchrec_tt


PLAN_PATHS = {"one_block_plan": "1", "general_plan": "0"}  # -> TORCHREC_TT_CUDA_SMALL_PLAN


def set_plan_path(monkeypatch, path):
    """Batches of up to 11,264 ids take the one-block plan kernels unless TORCHREC_TT_CUDA_SMALL_PLAN=0
    (read by the launchers at each call)."""
    monkeypatch.setenv("TORCHREC_TT_CUDA_SMALL_PLAN", PLAN_PATHS[path])


@pytest.fixture(autouse=True, params=sorted(PLAN_PATHS))
def plan_path(request, monkeypatch):
    """Every test on both plan paths."""
    set_plan_path(monkeypatch, request.param)
    return request.param


# ---- cases --------------------------------------------------------------------------------------

def random_cores(p, q, ranks, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p[k], ranks[k], q[k], ranks[k + 1], generator=g, dtype=dtype) / math.sqrt(ranks[k + 1])
            for k in range(len(p))]


def make_case(seed, d=None, p=None, q=None, ranks=None, n_bags=None, max_len=8):
    rng = random.Random(seed)
    d = d or rng.choice([2, 3, 4])
    p = p or [rng.randint(1, 6) for _ in range(d)]
    q = q or [rng.randint(1, 4) for _ in range(d)]
    ranks = ranks or [1] + [rng.randint(1, 5) for _ in range(d - 1)] + [1]
    n_rows = rng.randint(max(1, math.prod(p) // 2), math.prod(p))
    n_bags = rng.randint(0, 12) if n_bags is None else n_bags
    lengths = [rng.choice([0, 1, 1, 2, 3, 5, max_len]) for _ in range(n_bags)]
    hot = [rng.randrange(n_rows) for _ in range(3)]  # duplicates within and across bags
    ids = [rng.choice(hot) if rng.random() < 0.4 else rng.randrange(n_rows) for _ in range(sum(lengths))]
    include_last = rng.random() < 0.5
    starts = [0]
    for length in lengths[:-1]:
        starts.append(starts[-1] + length)
    offsets = (starts if n_bags else []) + ([sum(lengths)] if include_last else [])
    id_dtype = rng.choice([torch.int32, torch.int64])
    off_dtype = rng.choice([torch.int32, torch.int64])
    weighted = rng.random() < 0.5
    g = torch.Generator().manual_seed(seed + 1)
    return dict(
        cores=random_cores(p, q, ranks, seed),
        ids=torch.tensor(ids, dtype=id_dtype),
        offsets=torch.tensor(offsets, dtype=off_dtype),
        psw=torch.rand(len(ids), generator=g, dtype=torch.float64) + 0.5 if weighted else None,
        n_rows=n_rows,
        pooling=rng.choice([0, 1]),
        include_last=include_last,
        num_bags=n_bags,
        dim=math.prod(q),
    )


def on(t, device, dtype=None):
    if t is None:
        return None
    t = t.to(device)
    return t.to(dtype) if dtype is not None else t


def run_forward(c, device, dtype=torch.float32, mode=0, name="t"):
    return OPS.tt_embedding_bag([on(x, device, dtype) for x in c["cores"]], on(c["ids"], device),
                                on(c["offsets"], device), on(c["psw"], device, dtype), c["n_rows"], c["pooling"],
                                c["include_last"], mode, name)


def run_backward(c, grad, device, dtype=torch.float32):
    return OPS.tt_embedding_bag_backward(on(grad, device, dtype), [on(x, device, dtype) for x in c["cores"]],
                                         on(c["ids"], device), on(c["offsets"], device), on(c["psw"], device, dtype),
                                         c["n_rows"], c["pooling"], c["include_last"], c["psw"] is not None, "t")


def close(a, b, tol):
    torch.testing.assert_close(a.cpu().double(), b.cpu().double(), rtol=tol, atol=tol)


SHAPES = [  # (d, p, q, ranks): odd D, mixed ranks, slices bigger than a block, d = 5
    (2, [7, 9], [3, 5], [1, 6, 1]),
    (3, [5, 4, 6], [2, 3, 3], [1, 4, 7, 1]),
    (3, [7, 5, 6], [4, 8, 2], [1, 24, 20, 1]),
    (4, [3, 4, 2, 5], [2, 1, 3, 2], [1, 3, 5, 2, 1]),
    (5, [2, 3, 2, 3, 2], [1, 2, 3, 1, 2], [1, 2, 3, 2, 3, 1]),
    (3, [2, 40, 5], [2, 2, 2], [1, 3, 4, 1]),  # many children per parent: parent gradients by digit, then reduced
]
CASES = [make_case(s) for s in range(40)] + [
    make_case(100 + i, d=d, p=p, q=q, ranks=r, n_bags=60, max_len=12) for i, (d, p, q, r) in enumerate(SHAPES)]


def wide_case(seed, p, q, ranks, n_ids, bag_size):
    """Every row id once (a permutation, so each digit of level k has as many nodes as level k-1),
    in bags of bag_size, with weights: the shapes that make the CUDA backward take its multi-pass,
    unstaged and multi-chunk paths."""
    g = torch.Generator().manual_seed(seed)
    n_rows = math.prod(p)
    ids = torch.randperm(n_rows, generator=g)[:n_ids]
    return dict(cores=random_cores(p, q, ranks, seed), ids=ids, offsets=torch.arange(0, n_ids, bag_size),
                psw=torch.rand(n_ids, generator=g, dtype=torch.float64) + 0.5, n_rows=n_rows, pooling=0,
                include_last=False, num_bags=(n_ids + bag_size - 1) // bag_size, dim=math.prod(q))


def hot_case(seed):
    """Two ids occurring 150 and 40 times among others (more occurrences than a warp has lanes), D = 40."""
    c = wide_case(seed, [6, 7, 8], [2, 5, 4], [1, 3, 4, 1], 300, 5)
    c["ids"][torch.arange(0, 300, 2)] = 17
    c["ids"][torch.arange(1, 200, 5)] = 250
    c["pooling"] = 1
    return c


WIDE = [  # core slices of 64 x 256 (more than a block holds in one pass or in shared memory) and
    # 16 x 136; 600 nodes at the last level, 300 per digit (more than one chunk of node numbers); hot ids
    wide_case(0, [3, 4, 5], [2, 16, 2], [1, 64, 16, 1], 60, 3),
    wide_case(1, [300, 2], [8, 17], [1, 16, 1], 600, 4),
    hot_case(2),
    # level 1 takes the warp-per-node parent-gradient kernel (nk = 36 >= 32, rk = 40 >= 16): two
    # column groups of 32 lanes, rows in groups of 4 and 2 (m_prev = 6), several nodes per warp; its
    # forward chain the 4-rows-per-thread kernel
    wide_case(3, [40, 6, 3], [6, 3, 2], [1, 40, 12, 1], 300, 4),
    # an odd nk (33) at a wide rank: the warp kernel's c loop (unrolled by 4) ends with a remainder
    wide_case(4, [30, 5, 2], [3, 11, 2], [1, 20, 3, 1], 200, 3),
    # rk = 16 (nk = 32): the warp kernel with half its lanes idle (t >= rk)
    wide_case(5, [30, 6, 2], [4, 8, 2], [1, 16, 4, 1], 200, 3),
    # bags of 70 ids, mean pooling: pooling walks a bag 32 positions at a time
    dict(wide_case(6, [5, 6, 7], [2, 2, 2], [1, 4, 4, 1], 210, 70), pooling=1),
]
WIDE_IDS = ["wide_slices", "many_nodes_per_digit", "hot_ids", "warp_parent_grads", "warp_parent_grads_odd",
            "warp_16_lanes", "long_bags"]


def fresh_state(name, cores, seed):
    g = torch.Generator().manual_seed(seed)
    if name == "adagrad":
        return [torch.rand(c.shape, generator=g, dtype=torch.float32) for c in cores]
    if name == "rowwise_adagrad":
        return [torch.rand(c.shape[0], generator=g, dtype=torch.float32) for c in cores]
    return []
