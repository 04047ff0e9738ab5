"""The CUDA op against the CPU op and the pure-PyTorch reference: forward, dense backward, fused
optimizers, half/bfloat16 cores, the one-block plan against the general one, bitwise determinism,
opcheck and the hot-row cache (errors and bad input: test_cuda_errors.py).

TORCHREC_TT_TEST_DEVICE=cpu runs this file against the CPU op (a dry run of the test logic on a
machine without a GPU; the float16/bfloat16 and CUDA-only tests are skipped then).
"""
import math
import os
import sys
import warnings

import pytest
import torch

import torchrec_tt  # noqa: F401  (registers the ops)
from torchrec_tt import TTEmbeddingBag
from torchrec_tt.reference import tt_embedding_bag_reference

sys.path.insert(0, os.path.dirname(__file__))
from cuda_cases import (CASES, DEV, OPS, SHAPES, WIDE, WIDE_IDS, close, cuda_only, fresh_state,  # noqa: E402
                        make_case, on, random_cores, run_backward, run_forward)
from cuda_cases import plan_path  # noqa: E402, F401  (autouse fixture: every test on both plan paths)

pytestmark = pytest.mark.skipif(DEV == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")


# ---- forward / backward -------------------------------------------------------------------------

@pytest.mark.parametrize("c", CASES)
def test_forward_matches_cpu_and_reference(c):
    out = run_forward(c, DEV)
    assert out.device.type == torch.device(DEV).type
    assert out.shape == (c["num_bags"], c["dim"]) and out.dtype == torch.float32
    close(out, run_forward(c, "cpu"), 1e-5)
    ref = tt_embedding_bag_reference(c["cores"], c["ids"], c["offsets"], c["psw"],
                                     "mean" if c["pooling"] else "sum", c["include_last"])
    close(out, ref, 1e-4)


@pytest.mark.parametrize("c", CASES)
def test_dense_backward_matches_cpu(c):
    grad = torch.randn(c["num_bags"], c["dim"], generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    core_grads, psw_grad = run_backward(c, grad, DEV)
    cpu_grads, cpu_psw_grad = run_backward(c, grad, "cpu")
    for g, h in zip(core_grads, cpu_grads):
        assert g.shape == h.shape and g.dtype == h.dtype
        close(g, h, 1e-4)
    close(psw_grad, cpu_psw_grad, 1e-4)


def test_autograd_matches_reference():
    c = make_case(3, d=3, p=[5, 4, 6], q=[2, 3, 3], ranks=[1, 4, 7, 1], n_bags=30)
    c["psw"] = torch.rand(c["ids"].numel(), dtype=torch.float64) + 0.5
    cores = [x.float().to(DEV).requires_grad_() for x in c["cores"]]
    psw = c["psw"].float().to(DEV).requires_grad_()
    mode = "mean" if c["pooling"] else "sum"
    out = torchrec_tt.ops.tt_embedding_bag(cores, c["ids"].to(DEV), c["offsets"].to(DEV), psw, num_embeddings=c["n_rows"],
                                           mode=mode, include_last_offset=c["include_last"])
    grad = torch.randn_like(out)
    out.backward(grad)
    ref_cores = [x.clone().requires_grad_() for x in c["cores"]]
    ref_psw = c["psw"].clone().requires_grad_()
    ref = tt_embedding_bag_reference(ref_cores, c["ids"], c["offsets"], ref_psw, mode, c["include_last"])
    ref.backward(grad.cpu().double())
    close(out.detach(), ref.detach(), 1e-4)
    for a, b in zip(cores, ref_cores):
        close(a.grad, b.grad, 1e-4)
    close(psw.grad, ref_psw.grad, 1e-4)


# ---- fused optimizers ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sgd", "adagrad", "rowwise_adagrad"])
@pytest.mark.parametrize("c", CASES[:12] + CASES[-len(SHAPES):])
def test_fused_optimizer_matches_cpu(name, c):
    results = {}
    for device in (DEV, "cpu"):
        cores = [x.float().to(device) for x in c["cores"]]
        state = [s.to(device) for s in fresh_state(name, c["cores"], 5)]
        for step in range(2):
            grad = torch.randn(c["num_bags"], c["dim"], generator=torch.Generator().manual_seed(step))
            OPS.tt_embedding_bag_backward_fused_(grad.to(device), cores, state, on(c["ids"], device),
                                                 on(c["offsets"], device), on(c["psw"], device, torch.float32),
                                                 c["n_rows"], c["pooling"], c["include_last"], name, 0.05, 1e-6, "t")
        results[device] = cores + state
    for a, b in zip(results[DEV], results["cpu"]):
        close(a, b, 1e-4)


@pytest.mark.parametrize("name", [None, "sgd", "rowwise_adagrad"])
@pytest.mark.parametrize("c", WIDE, ids=WIDE_IDS)
def test_wide_shapes_match_cpu(name, c):
    close(run_forward(c, DEV), run_forward(c, "cpu"), 1e-4)
    grad = torch.randn(c["num_bags"], c["dim"], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    if name is None:
        for g, h in zip(*(run_backward(c, grad, device)[0] for device in (DEV, "cpu"))):
            close(g, h, 1e-4)
        return
    results = {}
    for device in (DEV, "cpu"):
        cores = [x.float().to(device) for x in c["cores"]]
        state = [s.to(device) for s in fresh_state(name, c["cores"], 5)]
        OPS.tt_embedding_bag_backward_fused_(grad.float().to(device), cores, state, c["ids"].to(device),
                                             c["offsets"].to(device), on(c["psw"], device, torch.float32),
                                             c["n_rows"], c["pooling"], False, name, 0.05, 1e-6, "t")
        results[device] = cores + state
    for a, b in zip(results[DEV], results["cpu"]):
        close(a, b, 1e-4)


def test_backward_reuses_forward_plan_only_for_the_same_batch():
    """Forward hands its plan to the backward of the same batch (same ids/offsets/weights tensors,
    unchanged); a backward given other tensors, or tensors changed in place since, builds its own."""
    c = make_case(7, d=3, p=[5, 4, 6], q=[2, 3, 3], ranks=[1, 4, 7, 1], n_bags=30)
    n = c["n_rows"]
    cores = [x.float().to(DEV).requires_grad_() for x in c["cores"]]
    g = torch.Generator().manual_seed(2)
    ids_a = torch.randint(0, n, (c["ids"].numel(),), generator=g).to(DEV)
    ids_b = torch.randint(0, n, (c["ids"].numel(),), generator=g).to(DEV)
    offsets = c["offsets"].to(DEV)
    grad = torch.randn(c["num_bags"], c["dim"], generator=g).to(DEV)

    def backward_op(ids):
        return OPS.tt_embedding_bag_backward(grad, [x.detach() for x in cores], ids, offsets, None, n, 0,
                                             c["include_last"], False, "t")[0]

    def cpu_grads(ids):
        return OPS.tt_embedding_bag_backward(grad.cpu(), [x.detach().cpu() for x in cores], ids.cpu(),
                                             offsets.cpu(), None, n, 0, c["include_last"], False, "t")[0]

    def forward(ids):
        return torchrec_tt.ops.tt_embedding_bag(cores, ids, offsets, num_embeddings=n,
                                                include_last_offset=c["include_last"])

    for _ in range(70):  # forwards without a backward age out of the store
        forward(ids_b.clone())
    forward(ids_a)
    for x, y in zip(backward_op(ids_b), cpu_grads(ids_b)):  # other ids: not ids_a's plan
        close(x, y, 1e-4)
    forward(ids_b)
    ids_b[:5] = ids_b[5:10].clone()  # changed in place after forward: its plan is stale
    for x, y in zip(backward_op(ids_b), cpu_grads(ids_b)):
        close(x, y, 1e-4)
    forward(ids_a)
    for x, y in zip(backward_op(ids_a), cpu_grads(ids_a)):  # the matching plan
        close(x, y, 1e-4)


@pytest.mark.parametrize("optimizer", [None, "sgd", "adagrad", "rowwise_adagrad"])
def test_module_training_matches_cpu(optimizer):
    torch.manual_seed(0)
    cpu = TTEmbeddingBag(1000, 12, tt_ranks=6, tt_p_shapes=[10, 10, 10], tt_q_shapes=[2, 3, 2], mode="mean",
                         optimizer=optimizer)
    dev = TTEmbeddingBag(1000, 12, tt_ranks=6, tt_p_shapes=[10, 10, 10], tt_q_shapes=[2, 3, 2], mode="mean",
                         optimizer=optimizer, device=DEV)
    dev.load_state_dict(cpu.state_dict())
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (cpu, dev)] if optimizer is None else None
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        ids = torch.randint(0, 1000, (64,), generator=g)
        offsets = torch.arange(0, 64, 4)
        for i, m in enumerate((cpu, dev)):
            device = "cpu" if m is cpu else DEV
            out = m(ids.to(device), offsets.to(device))
            (out.float() ** 2).sum().backward()
            if opts:
                opts[i].step()
                opts[i].zero_grad()
    for (k, a), (_, b) in zip(cpu.state_dict().items(), dev.state_dict().items()):
        close(b, a, 1e-4)


# ---- half precision -----------------------------------------------------------------------------

@cuda_only
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 5e-3), (torch.bfloat16, 4e-2)])
@pytest.mark.parametrize("c", CASES[:10] + CASES[-len(SHAPES):])
def test_half_cores_match_float32(dtype, tol, c):
    # Same (rounded) values in both runs: only the output rounding differs (fp32 accumulation).
    c16 = dict(c, cores=[x.to(dtype).double() for x in c["cores"]],
               psw=None if c["psw"] is None else c["psw"].to(dtype).double())
    out16 = run_forward(c16, DEV, dtype)
    assert out16.dtype == dtype
    close(out16, run_forward(c16, DEV), tol)
    grad = torch.randn(c["num_bags"], c["dim"], generator=torch.Generator().manual_seed(3)).to(dtype).double()
    g16, p16 = run_backward(c16, grad, DEV, dtype)
    g32, p32 = run_backward(c16, grad, DEV)
    for a, b in zip(g16, g32):
        assert a.dtype == dtype
        close(a, b, tol * max(1.0, float(b.abs().max())))
    close(p16, p32, tol * max(1.0, float(p32.abs().max()) if p32.numel() else 1.0))


@cuda_only
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 5e-3), (torch.bfloat16, 4e-2)])
@pytest.mark.parametrize("name", ["sgd", "adagrad", "rowwise_adagrad"])
def test_half_fused_update_close_to_float32(dtype, tol, name):
    c = make_case(101, d=3, p=[5, 4, 6], q=[2, 3, 3], ranks=[1, 4, 7, 1], n_bags=60, max_len=12)
    cores16 = [x.to(dtype).to(DEV) for x in c["cores"]]
    cores32 = [x.float() for x in cores16]
    st16 = [s.to(DEV) for s in fresh_state(name, c["cores"], 5)]
    st32 = [s.clone() for s in st16]
    grad = torch.randn(c["num_bags"], c["dim"], generator=torch.Generator().manual_seed(3)).to(dtype).to(DEV)
    for cores, st, g in ((cores16, st16, grad), (cores32, st32, grad.float())):
        OPS.tt_embedding_bag_backward_fused_(g, cores, st, c["ids"].to(DEV), c["offsets"].to(DEV),
                                             on(c["psw"], DEV, cores[0].dtype), c["n_rows"], c["pooling"],
                                             c["include_last"], name, 0.05, 1e-6, "t")
    for a, b in zip(cores16 + st16, cores32 + st32):
        close(a, b, tol * max(1.0, float(b.abs().max())))



# ---- the one-block plan (small batches) against the general plan -----------------------------------

def plan_outputs(cores, ids, offsets, psw, n_rows, include_last, mode, grad):
    """Forward output, then the cores and row-wise Adagrad state after a fused backward (the whole
    plan feeds these: any difference in it shows)."""
    cs = [x.clone() for x in cores]
    state = [torch.zeros(x.shape[0], device=x.device) for x in cs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = OPS.tt_embedding_bag(cs, ids, offsets, psw, n_rows, 0, include_last, mode, "t")
    OPS.tt_embedding_bag_backward_fused_(grad, cs, state, ids, offsets, psw, n_rows, 0, include_last,
                                         "rowwise_adagrad", 0.05, 1e-8, "t")
    return [out] + cs + state


@cuda_only
@pytest.mark.parametrize("n,n_rows,bad,bags", [
    (1, 1, 0, 1), (700, 2 ** 10 - 1, 9, 100), (4096, 2 ** 12 - 1, 0, 585), (11_263, 3_000, 40, 1609),
    (11_264, 200_000, 0, 1609), (11_265, 200_000, 0, 1609), (3000, 5 * 10 ** 9, 5, 428), (9000, 50_000, 3, 4),
    (5000, 50_000, 0, 300)])
def test_one_block_plan_equals_general_plan(n, n_rows, bad, bags, monkeypatch):
    """Bitwise-equal results from both plan paths: at the one-block capacity (11,264 ids) and just
    over it, N = 2^k - 1 (the invalid-id sentinel has every key bit set), invalid ids dropped
    (ignore mode), N >= 2^32 (general sort keys on both), bags longer than 64 ids (filled by the
    whole block) and many empty bags."""
    g = torch.Generator().manual_seed(n)
    p = [2 ** 10, 2 ** 10, 2 ** 10] if n_rows < 2 ** 30 else [80_000, 80_000]
    d = len(p)
    cores = [x.float().to(DEV) for x in random_cores(p, [2] * d, [1] + [3] * (d - 1) + [1], n, torch.float32)]
    ids = torch.randint(0, n_rows, (n,), generator=g)
    ids[torch.randperm(n, generator=g)[:bad]] = torch.tensor([-1, n_rows, n_rows + 5])[torch.arange(bad) % 3]
    ids[: n // 3] = ids[n // 3: 2 * (n // 3)]  # shared prefixes and repeated rows
    offsets = torch.sort(torch.randint(0, n + 1, (bags,), generator=g)).values
    offsets[0] = 0
    if bags == 300:
        offsets[100:250] = offsets[100]  # 150 empty bags in a row
    psw = torch.rand(n, generator=g) + 0.5
    grad = torch.randn(offsets.numel(), 2 ** d, generator=g).to(DEV)
    args = [ids.to(DEV), offsets.to(DEV), psw.to(DEV), n_rows, False, 2 if bad else 0, grad]
    results = {}
    for path in ("1", "0"):
        monkeypatch.setenv("TORCHREC_TT_CUDA_SMALL_PLAN", path)
        results[path] = plan_outputs(cores, *args)
    for a, b in zip(results["1"], results["0"]):
        assert torch.equal(a, b)
    close(results["1"][0], OPS.tt_embedding_bag([c.cpu() for c in cores], ids, offsets, psw, n_rows, 0, False,
                                                2, "t"), 1e-4)

# ---- determinism --------------------------------------------------------------------------------

def zipf_case(seed, n=20000, n_bags=2000):
    g = torch.Generator().manual_seed(seed)
    p, q, ranks = [10, 20, 25], [2, 3, 4], [1, 8, 8, 1]
    n_rows = 5000
    ranks_w = torch.arange(1, n_rows + 1, dtype=torch.float64) ** -1.05
    ids = torch.multinomial(ranks_w, n, replacement=True, generator=g)
    offsets = torch.sort(torch.randint(0, n + 1, (n_bags,), generator=g)).values
    offsets[0] = 0
    return dict(cores=random_cores(p, q, ranks, seed), ids=ids, offsets=offsets,
                psw=torch.rand(n, generator=g, dtype=torch.float64), n_rows=n_rows, pooling=1, include_last=False,
                num_bags=n_bags, dim=math.prod(q))


def test_deterministic_bitwise():
    c = zipf_case(0)
    grad = torch.randn(c["num_bags"], c["dim"], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        outs = [run_forward(c, DEV) for _ in range(2)]
        assert torch.equal(outs[0], outs[1])
        grads = [run_backward(c, grad, DEV) for _ in range(2)]
        for a, b in zip(grads[0][0] + [grads[0][1]], grads[1][0] + [grads[1][1]]):
            assert torch.equal(a, b)
        fused = []
        for _ in range(2):
            cores = [x.float().to(DEV) for x in c["cores"]]
            state = [s.to(DEV) for s in fresh_state("rowwise_adagrad", c["cores"], 2)]
            OPS.tt_embedding_bag_backward_fused_(grad.float().to(DEV), cores, state, c["ids"].to(DEV),
                                                 c["offsets"].to(DEV), c["psw"].float().to(DEV), c["n_rows"], 1,
                                                 False, "rowwise_adagrad", 0.05, 1e-8, "t")
            fused.append(cores + state)
        for a, b in zip(*fused):
            assert torch.equal(a, b)
    finally:
        torch.use_deterministic_algorithms(before)
    close(outs[0], run_forward(c, "cpu"), 1e-4)
    for a, b in zip(grads[0][0], run_backward(c, grad, "cpu")[0]):
        close(a, b, 1e-3)

# ---- opcheck ------------------------------------------------------------------------------------

def test_opcheck():
    cores = [c.float().to(DEV).requires_grad_() for c in random_cores([4, 3, 5], [2, 1, 3], [1, 3, 2, 1], 0)]
    ids = torch.tensor([0, 5, 59, 5, 12, 33], device=DEV)
    offsets = torch.tensor([0, 2, 2, 6], device=DEV)
    psw = torch.rand(6, device=DEV, requires_grad=True)
    torch.library.opcheck(OPS.tt_embedding_bag.default, (cores, ids, offsets, psw, 60, 0, True, 0, "t"))
    torch.library.opcheck(OPS.tt_embedding_bag.default,
                          (cores, ids.int(), offsets[:-1].int(), None, 60, 1, False, 2, "t"))
    grad = torch.randn(3, 6, device=DEV)
    torch.library.opcheck(OPS.tt_embedding_bag_backward.default,
                          (grad, [c.detach() for c in cores], ids, offsets, psw.detach(), 60, 0, True, True, "t"))
    state = [torch.zeros(c.shape[0], device=DEV) for c in cores]
    torch.library.opcheck(OPS.tt_embedding_bag_backward_fused_.default,
                          (grad, [c.detach().clone() for c in cores], state, ids, offsets, None, 60, 1, True,
                           "rowwise_adagrad", 0.1, 1e-8, "t"))


# ---- hot-row cache ------------------------------------------------------------------------------

@pytest.mark.parametrize("optimizer,mode", [("adagrad", "mean"), ("sgd", "sum"), (None, "sum")])
def test_cached_table_trains_like_cpu(optimizer, mode):
    """A cached table on the device (tensor-op cache path) against the same table on the CPU (the
    kernel's cache path for fused optimizers): outputs, cores, cached rows, optimizer state, counts
    and statistics agree over training steps with refreshes (admission, eviction, write-back)."""
    import copy
    torch.manual_seed(3)
    # float64 where both devices have it (the CPU dry run); the CUDA kernels take float32/16 cores, and
    # float32 rounding differs between the devices (and grows through the write-back fits)
    dtype = torch.float64 if DEV == "cpu" else torch.float32
    out_tol, state_tol = (dict(rtol=1e-7, atol=1e-8), dict(rtol=1e-6, atol=1e-8)) if dtype == torch.float64 else (
        dict(rtol=1e-4, atol=2e-5), dict(rtol=1e-2, atol=1e-3))  # Adagrad amplifies float32 rounding in cached rows
    cpu = TTEmbeddingBag(512, 8, tt_ranks=8, tt_p_shapes=[8, 8, 8], tt_q_shapes=[2, 2, 2], mode=mode,
                         optimizer=optimizer, cache_rows=48, cache_refresh_interval=4, dtype=dtype,
                         include_last_offset=True, name="dev_cache")
    dev = copy.deepcopy(cpu).to(DEV)
    dev.cache.use_kernel = False  # on CUDA it is off anyway; in the CPU dry run it makes this test the comparison
    opts = [torch.optim.SGD(t.parameters(), lr=0.05) for t in (cpu, dev)] if optimizer is None else []
    g = torch.Generator().manual_seed(4)
    for step in range(13):
        ids = (torch.rand(90, generator=g).square() * 150).long() + (step // 5) * 150
        offsets = torch.tensor([0, 10, 10, 41, 77, 90])
        psw = torch.rand(90, generator=g, dtype=dtype) if mode == "sum" else None
        target = torch.randn(5, 8, generator=g, dtype=dtype)
        out_cpu = cpu(ids, offsets, psw)
        out_dev = dev(ids.to(DEV), offsets.to(DEV), psw.to(DEV) if psw is not None else None)
        torch.testing.assert_close(out_dev.cpu(), out_cpu, **out_tol)  # write-back: L-BFGS on each device
        (out_cpu - target).square().sum().backward()
        (out_dev - target.to(DEV)).square().sum().backward()
        for opt in opts:
            opt.step()
            opt.zero_grad()
    assert cpu.cache_stats()["evictions"] > 0
    want_state, got_state = cpu.state_dict(), {k: v.cpu() for k, v in dev.state_dict().items()}
    if DEV != "cpu":  # candidates with (nearly) equal counts: their order follows float rounding (CUDA's
        # index_add_ sums in another order), so compare the candidate buffers as id -> count maps
        for state in (want_state, got_state):
            order = torch.argsort(state["cache.cand_ids"])
            state["cache.cand_ids"], state["cache.cand_counts"] = (state["cache.cand_ids"][order],
                                                                   state["cache.cand_counts"][order])
    for name, x in want_state.items():
        torch.testing.assert_close(got_state[name], x, **state_tol, msg=lambda m, name=name: f"{name} differs: {m}")
    got, want = dev.cache_stats(), cpu.cache_stats()
    assert got.keys() == want.keys()
    for key in want:  # counts exactly; fitted residuals (float32: at rounding level) closely
        if isinstance(want[key], int):
            assert got[key] == want[key], key
        else:
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), key
