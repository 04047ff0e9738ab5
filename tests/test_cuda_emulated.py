"""csrc/cuda's kernels run on the CPU by an emulator (tests/cuda_emu), against the CPU op: forward,
dense and fused backward, validation records, the backward guard, both plan paths, half cores.

Why: most machines this project is built on have no GPU, and the CUDA tests (test_cuda.py) skip
there. The emulator compiles the very kernel sources with g++ and runs each block as fibers that
switch only at barriers and warp intrinsics, so indexing, synchronisation and determinism are
checked everywhere; speed, the memory model and the torch glue (tt_embedding_bag_cuda.cpp) are not.
Arithmetic is g++'s IEEE float without contraction, not nvcc's --use_fast_math (FMA contraction,
approximate division and sqrt, flush-to-zero), so comparisons with the CPU op are within tolerance
and the bitwise checks are between emulated runs only. The emulator's own checks come first: its
intrinsics against CUDA's definitions, a missing barrier, a deadlock and misused warp intrinsics that
it must expose.
"""
import hashlib
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchrec_tt.reference import tt_embedding_bag_reference

sys.path.insert(0, os.path.dirname(__file__))
from cuda_cases import (CASES, OPS, PLAN_PATHS, SHAPES, WIDE, WIDE_IDS, close, fresh_state,  # noqa: E402
                        random_cores, set_plan_path)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "cuda_emu"))
import build as emu_build  # noqa: E402

OPTIMIZERS = {"sgd": 1, "adagrad": 2, "rowwise_adagrad": 3}
NO_PLAN = torch.empty(0, dtype=torch.uint8)
NO_RECORD = torch.empty(0, dtype=torch.long)
ERR_NONE = -1  # kNoErrorKey as int64
ERR_OFFSETS_START, ERR_OFFSETS_DECREASING, ERR_LAST_OFFSET, ERR_WEIGHT, ERR_ID = 1, 2, 3, 4, 5
ALL_CASES, ALL_CASE_IDS = CASES + WIDE, [f"case{i}" for i in range(len(CASES))] + WIDE_IDS


@pytest.fixture(scope="module")
def emu():
    try:
        emu_build.cuda_include()
    except RuntimeError as e:  # a machine without the CUDA headers; .ci/run sets TORCHREC_TT_REQUIRE_EMU=1
        if os.environ.get("TORCHREC_TT_REQUIRE_EMU") == "1":
            raise
        pytest.skip(str(e))
    return emu_build.build()


@pytest.fixture(params=sorted(PLAN_PATHS))
def plan_path(request, monkeypatch):
    """Both plan paths, for the tests that ask for them (not autouse, unlike test_cuda.py's fixture of
    that name from cuda_cases: the emulator's self-checks and property tests run once)."""
    set_plan_path(monkeypatch, request.param)
    return request.param


def args(c, dtype=torch.float32):
    """The kernels' inputs for case c: cores, ids, int64 offsets, weights."""
    psw = None if c["psw"] is None else c["psw"].to(dtype)
    return [x.to(dtype) for x in c["cores"]], c["ids"], c["offsets"].long(), psw


def emu_forward(emu, c, cores=None, dtype=torch.float32, record_id_errors=True):
    cs, ids, offsets, psw = args(c, dtype)
    return emu.forward(cores if cores is not None else cs, ids, offsets, psw, c["n_rows"], c["pooling"] == 1,
                       c["include_last"], record_id_errors)


def grad_of(c, seed=7, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(c["num_bags"], c["dim"], generator=g, dtype=torch.float64).to(dtype)


def emu_fused_step(emu, c, name, cores, state, grad, lr=0.05, eps=1e-6):
    """A training step: forward (its plan and record handed to backward), fused backward in place.
    The record reports no id errors, as the glue asks in warn / ignore mode (error mode raises)."""
    _, ids, offsets, psw = args(c, cores[0].dtype)
    out, plan, rec = emu_forward(emu, c, cores=cores, dtype=cores[0].dtype, record_id_errors=False)
    emu.backward(grad, cores, state, ids, offsets, psw, c["n_rows"], c["pooling"] == 1, c["include_last"],
                 OPTIMIZERS[name], lr, eps, False, plan, rec)
    return out


def cpu_fused_step(c, name, cores, state, grad, lr=0.05, eps=1e-6):
    _, ids, _, psw = args(c, cores[0].dtype)
    OPS.tt_embedding_bag_backward_fused_(grad, cores, state, ids, c["offsets"], psw, c["n_rows"], c["pooling"],
                                         c["include_last"], name, lr, eps, "t")


# ---- the emulator itself ------------------------------------------------------------------------

@pytest.mark.parametrize("threads", [32, 96, 256])
def test_emulator_intrinsics_match_cuda_definitions(emu, threads):
    out, err = emu.selftest("intrinsics", threads, 1)
    assert err == 0
    got = torch.tensor(out).view(threads, 5)
    for t in range(threads):
        lane, base = t % 32, t - t % 32
        ballot = sum(1 << k for k in range(32) if (base + k) % 3 == 0)
        expected = [2 * (base + 5), t - 3 if lane >= 3 else t, t ^ 1, ballot - (1 << 32 if ballot >= 1 << 31 else 0),
                    sum(1 for u in range(threads) if u % 4 == 0)]
        assert got[t].tolist() == expected, t


def test_emulator_syncthreads_and_counts_only_threads_at_the_barrier(emu):
    out, err = emu.selftest("and", 96, 1)
    assert err == 0 and out[:64] == [1] * 64  # all of 64 passed 1; not all passed t != 5


def test_emulator_exposes_missing_barrier_deadlock_and_misuse(emu):
    for seed in (1, 2):  # new values each run: stale shared memory from the last run cannot pass
        out, err = emu.selftest("reverse", 64, seed)
        assert err == 0 and out[:64] == [seed * 10000 + 63 - t for t in range(64)]
        out, err = emu.selftest("reverse_without_barrier", 64, seed)
        assert err == 0 and out[:64] != [seed * 10000 + 63 - t for t in range(64)]
    for misuse in ("deadlock", "mixed", "partial_mask"):
        _, err = emu.selftest(misuse, 64, 1)
        assert err != 0, misuse  # cudaErrorLaunchFailure, with a message on stderr
    out, err = emu.selftest("reverse", 64, 3)  # the error was reported once and cleared
    assert err == 0 and out[0] == 30063


def test_emulator_fails_a_launch_over_48_kib_of_shared_memory(emu):
    """Static + dynamic shared memory over 48 KiB fails a launch on a GPU (without an opt-in): 4 KiB of
    static array and 44 KiB dynamic fit, 4 bytes more do not."""
    emu.launch_log(clear=True)
    out, err = emu.selftest("smem_fits", 64, 4)
    assert err == 0 and out[0] == 40063
    _, err = emu.selftest("smem_over", 64, 4)
    assert err != 0
    (name, (launches, threads, dynamic, static)), = emu.launch_log(clear=True).items()
    assert (name, launches, threads, dynamic, static) == ("reverse_kernel<true>", 1, 64, 44 * 1024, 4096)


def test_emulator_aborts_on_a_misaligned_vector_load(emu):
    """A misaligned float4 faults on a GPU; the emulator (-fsanitize=alignment) must not read it."""
    code = ("import sys; sys.path.insert(0, %r); import build; "
            "build.build().selftest('misaligned', 32, 1)" % os.path.join(os.path.dirname(__file__), "cuda_emu"))
    env = {k: v for k, v in os.environ.items() if k != "UBSAN_OPTIONS"}  # the report on stderr
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode != 0
    assert "misaligned address" in r.stderr and "float4" in r.stderr, r.stderr[-2000:]


# ---- against the CPU op -------------------------------------------------------------------------

@pytest.mark.parametrize("c", ALL_CASES, ids=ALL_CASE_IDS)
def test_forward_matches_cpu(emu, c, plan_path):
    cores, ids, _, psw = args(c)
    out, _, rec = emu_forward(emu, c)
    close(out, OPS.tt_embedding_bag(cores, ids, c["offsets"], psw, c["n_rows"], c["pooling"], c["include_last"], 0,
                                    "t"), 1e-5)
    if rec.numel():  # the one-block plan validated the batch in the same launch
        assert rec.tolist() == [ERR_NONE, rec[1].item(), rec[2].item(), 0]


@pytest.mark.parametrize("with_forward_plan", [True, False])
@pytest.mark.parametrize("c", ALL_CASES, ids=ALL_CASE_IDS)
def test_dense_backward_matches_cpu(emu, c, with_forward_plan, plan_path):
    cores, ids, offsets, psw = args(c)
    grad = grad_of(c)
    weighted = psw is not None
    _, plan, rec = emu_forward(emu, c)
    grads, psw_grad = emu.backward(grad, cores, [], ids, offsets, psw, c["n_rows"], c["pooling"] == 1,
                                   c["include_last"], 0, 0.0, 0.0, weighted, plan if with_forward_plan else NO_PLAN,
                                   rec if with_forward_plan else NO_RECORD)
    ref, ref_psw = OPS.tt_embedding_bag_backward(grad, cores, ids, c["offsets"], psw, c["n_rows"], c["pooling"],
                                                 c["include_last"], weighted, "t")
    for g, h in zip(grads, ref):
        close(g, h, 1e-4)
    if weighted:
        close(psw_grad, ref_psw, 1e-4)


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("c", CASES[:12] + CASES[-len(SHAPES):] + WIDE,
                         ids=[f"case{i}" for i in range(12)] + [f"shape{i}" for i in range(len(SHAPES))] + WIDE_IDS)
def test_fused_update_matches_cpu(emu, c, name, plan_path):
    grad = grad_of(c, 3)
    emu_cores, emu_state = [x.float() for x in c["cores"]], fresh_state(name, c["cores"], 5)
    emu_fused_step(emu, c, name, emu_cores, emu_state, grad)
    cpu_cores, cpu_state = [x.float() for x in c["cores"]], fresh_state(name, c["cores"], 5)
    cpu_fused_step(c, name, cpu_cores, cpu_state, grad)
    for a, b in zip(emu_cores + emu_state, cpu_cores + cpu_state):
        close(a, b, 1e-4)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 5e-3), (torch.bfloat16, 4e-2)])
def test_half_cores_match_float32(emu, dtype, tol, plan_path):
    for c in CASES[:6] + CASES[-len(SHAPES):]:
        cores = [x.to(dtype) for x in c["cores"]]  # the float32 reference takes the same rounded cores
        out = emu_forward(emu, c, cores=cores, dtype=dtype)[0]
        _, ids, _, psw = args(c, dtype)
        ref = OPS.tt_embedding_bag([x.float() for x in cores], ids, c["offsets"], None if psw is None else psw.float(),
                                   c["n_rows"], c["pooling"], c["include_last"], 0, "t")
        assert out.dtype == dtype
        close(out, ref, tol * max(1.0, float(ref.abs().max())))


@st.composite
def batches(draw):
    """Random shapes (d = 2..4, slices up to 5 x 40 x 40) and batches: duplicates, empty bags, bags
    longer than 64 ids (filled by the whole block in the one-block plan), weights, both id dtypes."""
    d = draw(st.integers(2, 4))
    p = [draw(st.integers(1, 7)) for _ in range(d)]
    q = [draw(st.integers(1, 5)) for _ in range(d)]
    ranks = [1] + [draw(st.integers(1, 40)) for _ in range(d - 1)] + [1]
    n_rows = draw(st.integers(max(1, math.prod(p) // 2), math.prod(p)))
    lengths = draw(st.lists(st.sampled_from([0, 1, 2, 3, 8, 70]), min_size=0, max_size=10))
    ids = draw(st.lists(st.integers(0, n_rows - 1), min_size=sum(lengths), max_size=sum(lengths)))
    include_last = draw(st.booleans())
    starts = [sum(lengths[:b]) for b in range(len(lengths))]
    offsets = starts + ([sum(lengths)] if include_last else [])
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    return dict(cores=[torch.randn(p[k], ranks[k], q[k], ranks[k + 1], generator=g, dtype=torch.float64)
                       / math.sqrt(ranks[k + 1]) for k in range(d)],
                ids=torch.tensor(ids, dtype=draw(st.sampled_from([torch.int32, torch.int64]))),
                offsets=torch.tensor(offsets, dtype=torch.int64),
                psw=torch.rand(len(ids), generator=g, dtype=torch.float64) + 0.5 if draw(st.booleans()) else None,
                n_rows=n_rows, pooling=draw(st.sampled_from([0, 1])), include_last=include_last,
                num_bags=len(lengths), dim=math.prod(q), path=draw(st.sampled_from(sorted(PLAN_PATHS))))


@settings(max_examples=80, deadline=None)
@given(batches())
def test_random_shapes_match_reference(emu, b):
    """Forward, core and weight gradients against the pure-PyTorch reference (independent of both ops)."""
    with pytest.MonkeyPatch.context() as mp:  # (hypothesis reruns the test body: no function-scoped fixture)
        set_plan_path(mp, b["path"])
        cores, ids, offsets, psw = args(b)
        out, plan, rec = emu_forward(emu, b)
        weighted = psw is not None
        grad = grad_of(b, 5, torch.float64)
        grads, psw_grad = emu.backward(grad.float(), cores, [], ids, offsets, psw, b["n_rows"], b["pooling"] == 1,
                                       b["include_last"], 0, 0.0, 0.0, weighted, plan, rec)
    ref_in = [c.clone().requires_grad_() for c in b["cores"]]
    ref_in += [b["psw"].clone().requires_grad_()] if weighted else []
    ref = tt_embedding_bag_reference(ref_in[:len(cores)], b["ids"], b["offsets"], ref_in[-1] if weighted else None,
                                     "mean" if b["pooling"] else "sum", b["include_last"])
    close(out, ref, 1e-4)
    if ref.requires_grad:  # a batch without ids: the reference is a constant, every gradient 0
        want = torch.autograd.grad(ref, ref_in, grad, allow_unused=True)
    else:
        want = [None] * len(ref_in)
    for g_got, g_want in zip(grads + ([psw_grad] if weighted else []), want):
        close(g_got, torch.zeros_like(g_got) if g_want is None else g_want, 1e-4)


@settings(max_examples=40, deadline=None)
@given(batches(), st.sampled_from(sorted(OPTIMIZERS)))
def test_random_shapes_fused_step_matches_cpu(emu, b, name):
    """A fused training step (forward's plan handed to backward) against the CPU op's. Optimizer state
    starts at >= 0.5: a tiny Adagrad accumulator turns float noise in a gradient into a large change of
    the step (lr g / sqrt(state + g^2)), which would test conditioning, not the kernels."""
    with pytest.MonkeyPatch.context() as mp:
        set_plan_path(mp, b["path"])
        emu_cores, emu_state = [x.float() for x in b["cores"]], [x + 0.5 for x in fresh_state(name, b["cores"], 3)]
        emu_fused_step(emu, b, name, emu_cores, emu_state, grad_of(b, 2))
    cpu_cores, cpu_state = [x.float() for x in b["cores"]], [x + 0.5 for x in fresh_state(name, b["cores"], 3)]
    cpu_fused_step(b, name, cpu_cores, cpu_state, grad_of(b, 2))
    for a, c in zip(emu_cores, cpu_cores):
        close(a, c, 1e-4)
    for a, c in zip(emu_state, cpu_state):  # Adagrad sums g^2: twice the relative float error of g
        close(a, c, 2e-4)


# ---- bad input: validation records and the backward guard -----------------------------------------

def small_case(ids, offsets, psw=None, include_last=False, n_rows=60):
    return dict(cores=random_cores([4, 3, 5], [2, 1, 3], [1, 3, 2, 1], 0), ids=torch.tensor(ids),
                offsets=torch.tensor(offsets), psw=None if psw is None else torch.tensor(psw, dtype=torch.float64),
                n_rows=n_rows, pooling=0, include_last=include_last,
                num_bags=len(offsets) - (1 if include_last else 0), dim=6)


BAD = [  # (ids, offsets, psw, include_last) -> (kind, position, value0) of the first error
    (([1, 2, 3, 4], [1, 2, 3], None, False), (ERR_OFFSETS_START, 0, 1)),
    (([1, 2, 3, 4], [0, 3, 2], None, False), (ERR_OFFSETS_DECREASING, 2, 2)),
    (([1, 2, 3, 4], [0, 1, 5], None, True), (ERR_LAST_OFFSET, 2, 5)),
    (([1, 2, 3, 4], [0, 1, 6], None, False), (ERR_LAST_OFFSET, 2, 6)),
    (([1, 2, 3, 4], [0, 2], [1.0, float("nan"), 1.0, 1.0], False), (ERR_WEIGHT, 0, None)),
    (([1, 60, 3, -2], [0, 2], None, False), (ERR_ID, 1, 60)),
    (([1, 2, 3, -2], [0, 2], None, False), (ERR_ID, 3, -2)),
    (([1, 2, 3, 4], [0, 3, 2], [1.0, float("inf"), 1.0, 1.0], False), (ERR_OFFSETS_DECREASING, 2, 2)),
]


@pytest.mark.parametrize("case,expected", BAD)
def test_validation_record_names_the_first_error(emu, case, expected, plan_path):
    c = small_case(*case)
    cores, ids, offsets, psw = args(c)
    kind, pos, value0 = expected
    records = [emu.validate(cores, ids, offsets, psw, c["n_rows"], c["include_last"], True)]
    rec = emu_forward(emu, c)[2]
    if rec.numel():
        records.append(rec)
    for r in records:
        key = r[0].item() & (2 ** 64 - 1)
        assert (key >> 56, key & (2 ** 56 - 1)) == (kind, pos)
        if value0 is not None:
            assert r[1].item() == value0
    assert emu.validate(cores, ids, offsets, psw, c["n_rows"], c["include_last"], False)[0].item() == (
        ERR_NONE if kind == ERR_ID else records[0][0].item())  # id errors only when asked for


@pytest.mark.parametrize("case", [b[0] for b in BAD if b[1][0] != ERR_ID])
def test_guard_leaves_cores_and_state_untouched(emu, case, plan_path):
    c = small_case(*case)
    cores, ids, offsets, psw = args(c)
    guard = emu.validate(cores, ids, offsets, psw, c["n_rows"], c["include_last"], False)
    state = fresh_state("rowwise_adagrad", c["cores"], 1)
    before = [x.clone() for x in cores + state]
    emu.backward(grad_of(c), cores, state, ids, offsets, psw, c["n_rows"], False, c["include_last"],
                 OPTIMIZERS["rowwise_adagrad"], 0.5, 1e-8, False, NO_PLAN, guard)
    for a, b in zip(cores + state, before):
        assert torch.equal(a, b)


def test_invalid_ids_are_dropped_like_cpu(emu, plan_path):
    c = small_case([1, 60, 3, -2, 59, 7, 100, 0], [0, 3, 3, 6])
    cores, ids, offsets, _ = args(c)
    out, _, rec = emu_forward(emu, c, record_id_errors=False)
    close(out, OPS.tt_embedding_bag(cores, ids, c["offsets"], None, 60, 0, False, 2, "t"), 1e-5)
    assert emu.validate(cores, ids, offsets, None, 60, False, False)[3].item() == 3  # dropped ids counted
    if rec.numel():
        assert rec[0].item() == ERR_NONE and rec[3].item() == 3
    emu_cores, emu_state = [x.float() for x in c["cores"]], fresh_state("adagrad", c["cores"], 2)
    emu_fused_step(emu, c, "adagrad", emu_cores, emu_state, grad_of(c))
    cpu_cores, cpu_state = [x.float() for x in c["cores"]], fresh_state("adagrad", c["cores"], 2)
    cpu_fused_step(c, "adagrad", cpu_cores, cpu_state, grad_of(c))
    for a, b in zip(emu_cores + emu_state, cpu_cores + cpu_state):
        close(a, b, 1e-5)


# ---- plan paths and scheduling: bitwise -----------------------------------------------------------

def batch(n, n_rows, bags, seed):
    g = torch.Generator().manual_seed(seed)
    p = [2 ** 10] * 3
    ids = torch.randint(0, n_rows, (n,), generator=g)
    ids[: n // 3] = ids[n // 3: 2 * (n // 3)]  # shared prefixes and repeated rows
    offsets = torch.sort(torch.randint(0, n + 1, (bags,), generator=g)).values
    offsets[0] = 0
    return dict(cores=random_cores(p, [2, 2, 2], [1, 3, 3, 1], seed, torch.float32), ids=ids, offsets=offsets,
                psw=torch.rand(n, generator=g, dtype=torch.float64) + 0.5, n_rows=n_rows, pooling=0,
                include_last=False, num_bags=bags, dim=8)


def step_outputs(emu, c):
    cores, state = [x.float().clone() for x in c["cores"]], fresh_state("rowwise_adagrad", c["cores"], 4)
    out = emu_fused_step(emu, c, "rowwise_adagrad", cores, state, grad_of(c, 1))
    return [out] + cores + state


@pytest.mark.parametrize("n,n_rows,bags", [(700, 2 ** 10 - 1, 100), (11_264, 200_000, 1609)])
def test_one_block_plan_equals_general_plan(emu, n, n_rows, bags, monkeypatch):
    """At the one-block capacity too, and with N = 2^k - 1 (the sentinel key has every bit set)."""
    c = batch(n, n_rows, bags, n)
    results = []
    for path in sorted(PLAN_PATHS):
        set_plan_path(monkeypatch, path)
        results.append(step_outputs(emu, c))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("c", [WIDE[2], WIDE[3], batch(3000, 50_000, 300, 5)], ids=["hot_ids", "warp", "batch"])
def test_block_and_thread_order_do_not_change_results(emu, c, monkeypatch):
    """Blocks and threads run in reverse and in two random orders (EMU_SCHEDULE, EMU_SEED): no result
    may depend on the order in which blocks run or threads reach a barrier (no float atomics, no races)."""
    results = []
    for schedule, seed in (("forward", "0"), ("reverse", "0"), ("shuffle", "1"), ("shuffle", "2")):
        monkeypatch.setenv("EMU_SCHEDULE", schedule)
        monkeypatch.setenv("EMU_SEED", seed)
        results.append(step_outputs(emu, c))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
    assert math.isfinite(float(results[0][0].abs().sum()))


@pytest.mark.parametrize("config", ["a", "b"])
def test_benchmark_configs_match_cpu(emu, config, monkeypatch):
    """The GPU benchmark's own batches and tables (examples/benchmark_tt_embedding_cuda.py: (a) the
    Kaggle table, (b) the reference code's configuration), one fused-SGD step on the one-block plan
    they take: the kernel paths the timed figures come from."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
    import benchmark_tt_embedding_cuda as bench
    cfg = bench.CONFIGS[config]
    ids, offsets = bench.make_batch(cfg, "cpu")
    ranks = [1] + [cfg["rank"]] * (len(cfg["p"]) - 1) + [1]
    c = dict(cores=random_cores(cfg["p"], cfg["q"], ranks, 0, torch.float32), ids=ids, offsets=offsets, psw=None,
             n_rows=cfg["num_rows"], pooling=0, include_last=False, num_bags=offsets.numel(), dim=cfg["dim"])
    set_plan_path(monkeypatch, "one_block_plan")
    grad = grad_of(c, 1)
    emu_cores = [x.clone() for x in c["cores"]]
    out = emu_fused_step(emu, c, "sgd", emu_cores, [], grad, lr=0.05)
    cpu_cores = [x.clone() for x in c["cores"]]
    close(out, OPS.tt_embedding_bag(cpu_cores, ids, offsets, None, cfg["num_rows"], 0, False, 0, "t"), 1e-5)
    cpu_fused_step(c, "sgd", cpu_cores, [], grad, lr=0.05)
    for a, b in zip(emu_cores, cpu_cores):
        close(a, b, 1e-5)



# ---- resources: what each launch asks of a block against what ptxas gave each kernel ----------------

NVCC_FLAGS = ["-O3", "--use_fast_math", "-std=c++20", "--expt-relaxed-constexpr"]  # as setup.py builds them
ARCHS = ("sm_80", "sm_90")
BLOCK_REGISTERS, BLOCK_SHARED_BYTES = 65536, 48 * 1024  # both archs; more shared memory needs an opt-in


def ptxas_logs(archs):
    """{arch: nvcc -Xptxas -v's report of csrc/cuda/tt_kernels.cu}, compiled in parallel and cached per
    source digest under build/."""
    src = Path(__file__).resolve().parent.parent / "csrc" / "cuda"
    caches, jobs = {}, {}
    for arch in archs:
        digest = hashlib.sha1(" ".join(NVCC_FLAGS + [arch]).encode())
        for f in sorted(src.glob("*.cu*")):
            digest.update(f.name.encode() + f.read_bytes())
        caches[arch] = src.parent.parent / "build" / f"ptxas_{arch}_{digest.hexdigest()[:12]}.txt"
        if not caches[arch].exists():
            jobs[arch] = subprocess.Popen(["nvcc", "-c", *NVCC_FLAGS, f"-arch={arch}", "-Xptxas", "-v",
                                           str(src / "tt_kernels.cu"), "-o", os.devnull],
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for arch, job in jobs.items():
        _, err = job.communicate(timeout=900)
        assert job.returncode == 0, err[-3000:]
        caches[arch].parent.mkdir(exist_ok=True)
        caches[arch].write_text(err)
    return {arch: caches[arch].read_text() for arch in archs}


def ptxas_resources(arch, text):
    """{kernel name: (most registers per thread, most static shared memory bytes)} over the kernel's
    instantiations, from ptxas' report `text`."""
    assert f"for '{arch}'" in text, text[-2000:]
    entries = re.findall(r"Compiling entry function '(\w+)'.*?Used (\d+) registers([^\n]*)", text, re.S)
    names = subprocess.run(["c++filt"], input="\n".join(e[0] for e in entries), capture_output=True, text=True,
                           check=True).stdout.split("\n")
    out = {}
    for (_, regs, rest), demangled in zip(entries, names):  # rest: ", used 1 barriers, 2192 bytes smem, ..."
        ours = re.match(r"(?:void )?torchrec_tt::cuda::(?:\(anonymous namespace\)::)?(\w+)", demangled)
        if ours is None:
            continue  # CUB's own kernels: CUB sizes their launches
        kernel = ours.group(1)
        smem = re.search(r"(\d+) bytes smem", rest)
        old = out.get(kernel, (0, 0))
        out[kernel] = (max(old[0], int(regs)), max(old[1], int(smem.group(1)) if smem else 0))
    assert len(entries) > 20 and out, text[-2000:]
    return out


def test_every_kernel_launch_fits_a_block(emu, monkeypatch):
    """A launch fails on a GPU when a block needs more than 64K registers or more than 48 KiB of static +
    dynamic shared memory. The emulator records each kernel's largest block and dynamic shared memory
    over every test case, both plan paths, forward and dense / fused backward, float and bfloat16 cores;
    ptxas says each kernel's registers and static shared memory for sm_80 and sm_90. Every kernel that
    ptxas compiled must be among those launched, so none goes unchecked."""
    if shutil.which("nvcc") is None or shutil.which("c++filt") is None:
        if os.environ.get("TORCHREC_TT_REQUIRE_EMU") == "1":
            pytest.fail("nvcc and c++filt are needed for the resource check")
        pytest.skip("no nvcc")
    emu.launch_log(clear=True)
    for path in sorted(PLAN_PATHS):
        set_plan_path(monkeypatch, path)
        for i, c in enumerate(ALL_CASES):
            dtype = torch.bfloat16 if i % 3 == 0 else torch.float32
            cores, ids, offsets, psw = args(c, dtype)
            emu.validate(cores, ids, offsets, psw, c["n_rows"], c["include_last"], i % 2 == 0)
            _, plan, rec = emu_forward(emu, c, cores=cores, dtype=dtype)
            own_plan = i % 2 == 0  # backward without forward's plan builds its own
            emu.backward(grad_of(c).to(dtype), cores, [], ids, offsets, psw, c["n_rows"], c["pooling"] == 1,
                         c["include_last"], 0, 0.0, 0.0, psw is not None, NO_PLAN if own_plan else plan,
                         NO_RECORD if own_plan else rec)
            name = list(OPTIMIZERS)[i % 3]
            emu_fused_step(emu, c, name, [x.float() for x in c["cores"]], fresh_state(name, c["cores"], 1),
                           grad_of(c, 3))
    c = ALL_CASES[0]  # a batch over the one-block validation's 32,768 positions: the grid-wide one
    long_ids = torch.randint(0, c["n_rows"], (40_000,), generator=torch.Generator().manual_seed(0))
    emu.validate(args(c)[0], long_ids, torch.tensor([0, 20_000]), None, c["n_rows"], False, True)
    launched = {}
    for name, (_, threads, dynamic, static) in emu.launch_log(clear=True).items():
        kernel = name.split("<")[0]
        old = launched.get(kernel, (0, 0, 0))
        launched[kernel] = (max(old[0], threads), max(old[1], dynamic), max(old[2], static))
    for arch, log in ptxas_logs(ARCHS).items():
        resources = ptxas_resources(arch, log)
        assert any(static for _, static in resources.values()), resources  # the smem figures were parsed
        assert not set(resources) - set(launched), f"never launched here: {sorted(set(resources) - set(launched))}"
        for kernel, (regs, static) in sorted(resources.items()):
            threads, dynamic, reached = launched[kernel]
            static = max(static, reached)  # (ptxas drops arrays a kernel never reads)
            per_warp = -(-regs * 32 // 256) * 256  # registers are allocated per warp, 256 at a time
            assert per_warp * -(-threads // 32) <= BLOCK_REGISTERS, (arch, kernel, regs, threads)
            assert static + dynamic <= BLOCK_SHARED_BYTES, (arch, kernel, static, dynamic)
