"""The C++ TT op against the pure-PyTorch reference and dense reconstruction, its fused
optimizers against torch.optim on dense gradients, and its error handling."""
import math

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import torchrec_tt  # noqa: F401
from torchrec_tt import TTEmbeddingBag, ops
from torchrec_tt.reference import tt_embedding_bag_reference, tt_full_weight

torch.set_num_threads(2)
OPS = torch.ops.torchrec_tt


def random_cores(p, q, ranks, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p[k], ranks[k], q[k], ranks[k + 1], generator=g, dtype=dtype) / math.sqrt(ranks[k + 1])
            for k in range(len(p))]


@st.composite
def tt_batches(draw, max_q=3, max_rank=4):
    d = draw(st.integers(2, 4))
    p = [draw(st.integers(1, 5)) for _ in range(d)]
    q = [draw(st.integers(1, max_q)) for _ in range(d)]
    ranks = [1] + [draw(st.integers(1, max_rank)) for _ in range(d - 1)] + [1]
    n_rows = draw(st.integers(1, math.prod(p)))
    lengths = draw(st.lists(st.integers(0, 6), min_size=0, max_size=6))
    if not lengths and draw(st.booleans()):
        lengths = [0]
    ids = draw(st.lists(st.integers(0, n_rows - 1), min_size=sum(lengths), max_size=sum(lengths)))
    return dict(p=p, q=q, ranks=ranks, n_rows=n_rows, lengths=lengths, ids=ids,
                mode=draw(st.sampled_from(["sum", "mean"])), weighted=draw(st.booleans()),
                include_last=draw(st.booleans()), index_dtype=draw(st.sampled_from([torch.int32, torch.int64])),
                seed=draw(st.integers(0, 2**16)))


def make_inputs(b):
    lengths = torch.tensor(b["lengths"], dtype=torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    if not b["include_last"]:
        offsets = offsets[:-1]
    ids = torch.tensor(b["ids"], dtype=b["index_dtype"])
    offsets = offsets.to(b["index_dtype"])
    g = torch.Generator().manual_seed(b["seed"])
    psw = torch.rand(len(b["ids"]), generator=g, dtype=torch.float64) + 0.5 if b["weighted"] else None
    return ids, offsets, psw


@settings(max_examples=150, deadline=None)
@given(tt_batches())
def test_forward_and_gradients_match_reference(b):
    check_against_reference(b)


@settings(max_examples=30, deadline=None)
@given(tt_batches(max_q=6, max_rank=40))
def test_wide_slices_match_reference(b):
    """Wide core slices take the register-tiled kernels (>= 16 doubles per row) and their remainders."""
    check_against_reference(b)


def check_against_reference(b):
    cores = [c.requires_grad_() for c in random_cores(b["p"], b["q"], b["ranks"], seed=b["seed"])]
    ids, offsets, psw = make_inputs(b)
    if psw is not None:
        psw.requires_grad_()
    kw = dict(mode=b["mode"], include_last_offset=b["include_last"])
    out = ops.tt_embedding_bag(cores, ids, offsets, psw, num_embeddings=b["n_rows"], **kw)
    ref = tt_embedding_bag_reference(cores, ids, offsets, psw, **kw)
    torch.testing.assert_close(out, ref)

    # dense reconstruction through torch's own EmbeddingBag (sum mode supports weights there)
    if psw is None or b["mode"] == "sum":
        dense = F.embedding_bag(ids.long(), tt_full_weight(cores, b["n_rows"]), offsets.long(), mode=b["mode"],
                                per_sample_weights=psw, include_last_offset=b["include_last"])
        torch.testing.assert_close(out, dense)

    grad = torch.randn_like(out)
    inputs = cores + ([psw] if psw is not None else [])
    got = torch.autograd.grad(out, inputs, grad, allow_unused=True)
    # the reference returns a constant for batches without ids: every gradient is then zero
    want = torch.autograd.grad(ref, inputs, grad, allow_unused=True) if ref.requires_grad else [None] * len(inputs)
    for g_got, g_want in zip(got, want):
        torch.testing.assert_close(g_got, torch.zeros_like(g_got) if g_want is None else g_want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_training_and_inference_forward_agree(dtype):
    """A narrow level (here the last: q_d = 4 < r = 32) runs one product per core slice over its
    nodes; a training forward also keeps its plan and partial products for the backward."""
    cores = random_cores([9, 11, 13], [2, 2, 4], [1, 32, 32, 1], dtype=dtype, seed=3)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 9 * 11 * 13, (500,), generator=g)
    offsets = torch.arange(0, 500, 5)
    with torch.no_grad():
        infer = ops.tt_embedding_bag(cores, ids, offsets, None, num_embeddings=9 * 11 * 13)
    train = ops.tt_embedding_bag([c.requires_grad_() for c in cores], ids, offsets, None, num_embeddings=9 * 11 * 13)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else {}
    torch.testing.assert_close(train.detach(), infer, **tol)
    torch.testing.assert_close(infer, tt_embedding_bag_reference(cores, ids, offsets, None), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p,q,ranks", [
    ([8, 8, 8], [4, 2, 2], [1, 8, 8, 1]),      # slices 16 wide: the register-tile path for float64
    ([8, 8, 8], [2, 2, 4], [1, 16, 16, 1]),    # 32 wide: the register-tile path for float32
    ([6, 7], [4, 8], [1, 32, 1]),              # d = 2, 256-wide slices, rows not a multiple of the tile
    ([5, 6, 7, 3], [3, 2, 5, 2], [1, 12, 20, 9, 1]),  # d = 4, odd widths: tile + remainder columns
    ([2, 64, 3], [2, 4, 2], [1, 16, 8, 1]),    # parents with > 32 children: per-child parent gradients
])
def test_production_sized_ranks_match_reference(p, q, ranks, dtype):
    """The property test above draws tiny ranks; these shapes take the wide (register-tiled) kernels."""
    cores = [c.to(dtype).requires_grad_() for c in random_cores(p, q, ranks, seed=7)]
    n_rows = math.prod(p) - 3
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, n_rows, (300,), generator=g)
    ids[:60] = ids[0]  # a hot id: nodes sharing prefixes and digits
    offsets = torch.arange(0, 300, 3)
    psw = torch.rand(300, generator=g, dtype=dtype)
    out = ops.tt_embedding_bag(cores, ids, offsets, psw, num_embeddings=n_rows, mode="mean")
    ref = tt_embedding_bag_reference(cores, ids, offsets, psw, mode="mean")
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else {}
    torch.testing.assert_close(out, ref, **tol)
    grad = torch.randn(out.shape, generator=g, dtype=dtype)
    for got, want in zip(torch.autograd.grad(out, cores, grad), torch.autograd.grad(ref, cores, grad)):
        torch.testing.assert_close(got, want, **tol)


def test_float32_matches_float64():
    p, q, ranks = [7, 6, 5], [2, 3, 3], [1, 5, 4, 1]
    cores64 = random_cores(p, q, ranks)
    cores32 = [c.float() for c in cores64]
    ids = torch.randint(0, 200, (300,))
    offsets = torch.arange(0, 300, 3)
    out32 = ops.tt_embedding_bag(cores32, ids, offsets, num_embeddings=200)
    out64 = ops.tt_embedding_bag(cores64, ids, offsets, num_embeddings=200)
    torch.testing.assert_close(out32, out64.float(), rtol=1e-5, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(tt_batches(), st.sampled_from([torch.float16, torch.bfloat16]),
       st.sampled_from(["sgd", "adagrad", "rowwise_adagrad"]))
def test_half_cores_on_cpu_compute_in_fp32(b, dtype, name):
    """float16 / bfloat16 cores on CPU: the op computes on fp32 copies, so every result is the float32
    op's on the same (rounded) cores, rounded once to the cores' dtype: output, dense gradients and a fused
    step (fp32 optimizer state), bitwise. And within half-precision error of the float64 reference."""
    ids, offsets, psw = make_inputs(b)
    pooling = 1 if b["mode"] == "mean" else 0
    half = [c.to(dtype) for c in random_cores(b["p"], b["q"], b["ranks"], seed=b["seed"])]
    full = [c.float() for c in half]
    w16, w32 = (None, None) if psw is None else (psw.to(dtype), psw.to(dtype).float())
    args = (ids, offsets)
    tail = (b["n_rows"], pooling, b["include_last"])
    out = OPS.tt_embedding_bag(half, *args, w16, *tail, 0, "t")
    ref32 = OPS.tt_embedding_bag(full, *args, w32, *tail, 0, "t")
    assert out.dtype == dtype and torch.equal(out, ref32.to(dtype))
    ref64 = tt_embedding_bag_reference([c.double() for c in full], ids, offsets,
                                       None if w32 is None else w32.double(), b["mode"], b["include_last"])
    tol = 1e-2 if dtype == torch.float16 else 6e-2  # one rounding of each output to the cores' dtype
    torch.testing.assert_close(out.double(), ref64, rtol=tol, atol=tol)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    g16, pg16 = OPS.tt_embedding_bag_backward(grad, half, *args, w16, *tail, psw is not None, "t")
    g32, pg32 = OPS.tt_embedding_bag_backward(grad.float(), full, *args, w32, *tail, psw is not None, "t")
    assert all(torch.equal(a, c.to(dtype)) for a, c in zip(g16, g32)) and torch.equal(pg16, pg32.to(dtype))
    state = [torch.rand(c.shape[0]) if name == "rowwise_adagrad" else torch.rand(c.shape) if name == "adagrad"
             else torch.empty(0) for c in half]
    s16, s32 = [x.clone() for x in state], [x.clone() for x in state]
    c16, c32 = [c.clone() for c in half], [c.clone() for c in full]
    OPS.tt_embedding_bag_backward_fused_(grad, c16, s16 if name != "sgd" else [], *args, w16, *tail, name, 0.1,
                                         1e-6, "t")
    OPS.tt_embedding_bag_backward_fused_(grad.float(), c32, s32 if name != "sgd" else [], *args, w32, *tail, name,
                                         0.1, 1e-6, "t")
    assert all(torch.equal(a, c.to(dtype)) for a, c in zip(c16, c32))
    assert all(torch.equal(a, c) for a, c in zip(s16, s32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("optimizer", [None, "adagrad", "rowwise_adagrad"])
def test_half_table_step_is_the_fp32_step_rounded(dtype, optimizer):
    # Through autograd, where backward reuses forward's fp32 copies of the cores: each step equals the
    # float32 table's on the same rounded cores (re-synced after every step), rounded once.
    kw = dict(tt_ranks=[3, 4], tt_p_shapes=[7, 7, 7], tt_q_shapes=[2, 3, 2], optimizer=optimizer, mode="mean")
    torch.manual_seed(0)
    half, full = TTEmbeddingBag(300, 12, dtype=dtype, **kw), TTEmbeddingBag(300, 12, **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        full.load_state_dict(half.state_dict())  # the rounded cores as fp32; the fp32 optimizer state
        ids, offsets = torch.randint(0, 300, (60,), generator=g), torch.arange(0, 60, 6)
        grad = torch.randn(10, 12, generator=g).to(dtype)
        out_half, out_full = half(ids, offsets), full(ids, offsets)
        assert out_half.dtype == dtype and torch.equal(out_half, out_full.to(dtype))
        out_half.backward(grad)
        out_full.backward(grad.float())
        if optimizer is None:
            assert all(torch.equal(a.grad, b.grad.to(dtype)) for a, b in zip(half.cores, full.cores))
            return
        assert all(torch.equal(a, b.detach().to(dtype)) for a, b in zip(half.cores, full.cores))
        assert all(torch.equal(a, b) for a, b in zip(half.optimizer_state(), full.optimizer_state()))


def test_result_independent_of_thread_count():
    p, q, ranks = [20, 20, 20], [2, 2, 4], [1, 8, 8, 1]
    cores = [c.float().requires_grad_() for c in random_cores(p, q, ranks)]
    ids = (torch.distributions.Pareto(1.0, 1.0).sample((2000,)).long() - 1).clamp(max=7999)
    offsets = torch.arange(0, 2000, 2)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        out = ops.tt_embedding_bag(cores, ids, offsets, num_embeddings=8000)
        results.append([out] + list(torch.autograd.grad(out.square().sum(), cores)))
    torch.set_num_threads(2)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("others", [1000, 300])
def test_parent_with_many_children_matches_reference(others):
    """100 ids under one level-1 parent among `others` spread ids: that parent holds under 1/8 of the
    last level's nodes (its thread sums its children's gradients) or over it (per-child products in
    parallel, then summed per parent)."""
    p, q, ranks = [4, 4, 300], [2, 1, 3], [1, 3, 4, 1]
    cores = [c.requires_grad_() for c in random_cores(p, q, ranks, seed=others)]
    g = torch.Generator().manual_seed(others)
    ids = torch.cat([torch.randperm(300, generator=g)[:100], 300 + torch.randperm(4799 - 300, generator=g)[:others]])
    offsets = torch.arange(0, ids.numel(), 3)
    out = ops.tt_embedding_bag(cores, ids, offsets, num_embeddings=4800)
    ref = tt_embedding_bag_reference(cores, ids, offsets)
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, cores, grad), torch.autograd.grad(ref, cores, grad)):
        torch.testing.assert_close(got, want)


# ---- fused optimizers ----------------------------------------------------------------------------

def rowwise_adagrad_step(cores, grads, states, lr, eps):
    for c, g, s in zip(cores, grads, states):
        s += g.square().flatten(1).mean(1)
        c -= lr * g / (s.sqrt() + eps).view(-1, 1, 1, 1)


@pytest.mark.parametrize("name", ["sgd", "adagrad", "rowwise_adagrad"])
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_fused_step_equals_optimizer_on_dense_gradients(name, mode):
    lr, eps = 0.05, 1e-8
    fused = TTEmbeddingBag(500, 12, tt_ranks=[4, 3], tt_p_shapes=[8, 8, 8], tt_q_shapes=[3, 2, 2], mode=mode,
                           optimizer=ops and torchrec_tt.FusedOptimizerConfig(name, lr, eps), dtype=torch.float64)
    plain = TTEmbeddingBag(500, 12, tt_ranks=[4, 3], tt_p_shapes=[8, 8, 8], tt_q_shapes=[3, 2, 2], mode=mode,
                           dtype=torch.float64)
    plain.load_state_dict({k: v for k, v in fused.state_dict().items() if k.startswith("cores")})
    if name == "sgd":
        opt = torch.optim.SGD(plain.parameters(), lr=lr)
    elif name == "adagrad":
        opt = torch.optim.Adagrad(plain.parameters(), lr=lr, eps=eps)
    else:
        states = [torch.zeros(c.shape[0], dtype=c.dtype) for c in plain.cores]
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        ids = torch.randint(0, 500, (40,), generator=g)
        ids[:10] = 3  # duplicates share slices
        offsets = torch.tensor([0, 5, 5, 17, 30])
        psw = torch.rand(40, generator=g, dtype=torch.float64)
        target = torch.randn(5, 12, generator=g, dtype=torch.float64)
        (fused(ids, offsets, psw) - target).square().sum().backward()
        assert all(c.grad is None for c in fused.cores), "fused mode must not leave dense gradients"
        loss = (plain(ids, offsets, psw) - target).square().sum()
        if name == "rowwise_adagrad":
            grads = torch.autograd.grad(loss, list(plain.cores))
            with torch.no_grad():
                rowwise_adagrad_step(list(plain.cores), grads, states, lr, eps)
        else:
            opt.zero_grad()
            loss.backward()
            opt.step()
        for a, b in zip(fused.cores, plain.cores):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    if name == "rowwise_adagrad":
        for a, b in zip(fused.optimizer_state(), states):
            torch.testing.assert_close(a, b)
    if name == "adagrad":
        for a, c in zip(fused.optimizer_state(), plain.cores):
            torch.testing.assert_close(a, opt.state[c]["sum"])


def accumulated_leaves(grad_fn):
    """The tensors whose AccumulateGrad nodes the engine would run from grad_fn."""
    seen, stack, leaves = set(), [grad_fn], []
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if type(fn).__name__ == "AccumulateGrad":
            leaves.append(fn.variable)
        stack.extend(f for f, _ in fn.next_functions)
    return leaves


@pytest.mark.parametrize("cache_rows", [0, 16])
def test_fused_step_records_one_core_and_updates_all(cache_rows):
    # A fused backward returns no core gradient: one recorded core makes it run; an AccumulateGrad
    # node per core would only cost the engine time. Every core is still updated in place.
    t = TTEmbeddingBag(512, 8, tt_ranks=[3, 3], tt_p_shapes=[8, 8, 8], tt_q_shapes=[2, 2, 2], optimizer="sgd",
                       cache_rows=cache_rows, name="one_edge")
    before = [c.detach().clone() for c in t.cores]
    out = t(torch.tensor([1, 70, 300, 511, 70]), torch.tensor([0, 2]))
    leaves = accumulated_leaves(out.grad_fn)
    assert len(leaves) == 1 and any(leaves[0] is c for c in t.cores)
    out.square().sum().backward()
    assert all(c.grad is None for c in t.cores)
    assert all(not torch.equal(a, b) for a, b in zip(before, t.cores)), "every core takes its fused update"
    with torch.no_grad():  # no recording at all without grad mode
        assert t(torch.tensor([1]), torch.tensor([0])).grad_fn is None


def test_fused_state_is_checkpointed():
    t = TTEmbeddingBag(100, 8, tt_ranks=4, optimizer="rowwise_adagrad")
    t(torch.tensor([1, 2, 3]), torch.tensor([0])).sum().backward()
    sd = t.state_dict()
    assert any(k.startswith("optimizer_state_") for k in sd)
    u = TTEmbeddingBag(100, 8, tt_ranks=4, optimizer="rowwise_adagrad")
    u.load_state_dict(sd)
    for a, b in zip(t.optimizer_state(), u.optimizer_state()):
        assert torch.equal(a, b) and a.abs().sum() > 0


@pytest.mark.parametrize("bad", ["adam", "lamb", "EXACT_ADAM", "partial_rowwise_adam"])
def test_unsupported_fused_optimizer_rejected_by_name(bad):
    with pytest.raises(ValueError, match=f"unsupported fused optimizer '{bad}'"):
        TTEmbeddingBag(100, 8, optimizer=bad)
    t = TTEmbeddingBag(100, 8)
    with pytest.raises(ValueError, match=f"table 'tt_table': unsupported fused optimizer '{bad}'"):
        ops.tt_embedding_bag_fused(list(t.cores), [], torch.tensor([1]), torch.tensor([0]), num_embeddings=100,
                                   optimizer=bad, learning_rate=0.1)


def test_fbgemm_optimizer_names_map_exactly():
    assert torchrec_tt.FusedOptimizerConfig("EXACT_ROWWISE_ADAGRAD").name == "rowwise_adagrad"
    assert torchrec_tt.FusedOptimizerConfig("EXACT_SGD").name == "sgd"


# ---- custom-op plumbing --------------------------------------------------------------------------

def test_opcheck():
    cores = [c.float().requires_grad_() for c in random_cores([4, 3, 5], [2, 1, 3], [1, 3, 2, 1])]
    ids = torch.tensor([0, 5, 59, 5, 12, 33])
    offsets = torch.tensor([0, 2, 2, 6])
    psw = torch.rand(6, requires_grad=True)
    torch.library.opcheck(OPS.tt_embedding_bag.default, (cores, ids, offsets, psw, 60, 0, True, 0, "t"))
    torch.library.opcheck(OPS.tt_embedding_bag.default, (cores, ids.int(), offsets[:-1].int(), None, 60, 1, False, 0, "t"))
    grad = torch.randn(3, 6)
    torch.library.opcheck(OPS.tt_embedding_bag_backward.default,
                          (grad, [c.detach() for c in cores], ids, offsets, psw.detach(), 60, 0, True, True, "t"))
    state = [torch.zeros(c.shape[0]) for c in cores]
    torch.library.opcheck(OPS.tt_embedding_bag_backward_fused_.default,
                          (grad, [c.detach().clone() for c in cores], state, ids, offsets, None, 60, 1, True,
                           "rowwise_adagrad", 0.1, 1e-8, "t"))


def test_torch_compile_traces_module():
    t = TTEmbeddingBag(1000, 16, tt_ranks=4)
    ids, offsets = torch.randint(0, 1000, (64,)), torch.arange(0, 64, 4)
    compiled = torch.compile(t, backend="aot_eager", fullgraph=True)
    out = compiled(ids, offsets)
    torch.testing.assert_close(out, t(ids, offsets))
    out.sum().backward()
    assert all(c.grad is not None for c in t.cores)


@pytest.mark.skipif(tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 13),
                    reason="torch 2.11's AOTAutograd cannot trace a backward that updates a leaf parameter in place "
                           "('a leaf Variable that requires grad is being used in an in-place operation'); "
                           "2.13 can (2.12 not tried)")
def test_torch_compile_fused_table_trains_like_eager():
    torch.manual_seed(0)
    t = TTEmbeddingBag(1000, 16, tt_ranks=4, optimizer="rowwise_adagrad")
    eager = TTEmbeddingBag(1000, 16, tt_ranks=4, optimizer="rowwise_adagrad")
    eager.load_state_dict(t.state_dict())
    compiled = torch.compile(t, backend="aot_eager", fullgraph=True)
    g = torch.Generator().manual_seed(2)
    for _ in range(2):
        ids, offsets = torch.randint(0, 1000, (64,), generator=g), torch.arange(0, 64, 4)
        compiled(ids, offsets).square().sum().backward()
        eager(ids, offsets).square().sum().backward()
    for a, b in zip(list(t.cores) + t.optimizer_state(), list(eager.cores) + eager.optimizer_state()):
        torch.testing.assert_close(a, b)
    assert t.optimizer_state()[1].abs().sum() > 0  # the fused rule ran


# ---- bad input: clear errors, state untouched ----------------------------------------------------

BAD_INPUTS = [
    ("id_too_large", dict(ids=[1, 2, 100]), IndexError, r"table 'users': id 100 at position 2 is out of range \[0, 100\)"),
    ("negative_id", dict(ids=[1, -3, 4]), IndexError, r"table 'users': negative id -3 at position 1"),
    ("decreasing_offsets", dict(offsets=[0, 2, 1]), ValueError, r"table 'users': offsets must be non-decreasing"),
    ("offsets_not_at_zero", dict(offsets=[1, 2]), ValueError, r"table 'users': offsets must start at 0"),
    ("offset_past_end", dict(offsets=[0, 5]), ValueError, r"table 'users': the last offset \(5\) is beyond"),
    ("float_ids", dict(ids=[1.0, 2.0, 3.0]), TypeError, r"table 'users': indices must be int32 or int64"),
    ("float_offsets", dict(offsets=[0.0, 1.0]), TypeError, r"table 'users': offsets must be int32 or int64"),
    ("nan_weight", dict(psw=[1.0, float("nan"), 1.0]), ValueError, r"table 'users': per_sample_weights contains NaN"),
    ("inf_weight", dict(psw=[1.0, float("inf"), 1.0]), ValueError, r"per_sample_weights contains NaN or infinity"),
    ("short_weights", dict(psw=[1.0, 1.0]), ValueError, r"table 'users': per_sample_weights must be 1-D with one weight per id"),
    ("double_weights", dict(psw=torch.ones(3, dtype=torch.float64)), TypeError, r"table 'users': per_sample_weights has dtype Double"),
    ("ids_2d_offsets", dict(ids=[[1, 2, 3]], offsets=[0]), ValueError, r"table 'users': offsets must be None when input is 2-D"),
]


@pytest.mark.parametrize("optimizer", [None, "adagrad"])
@pytest.mark.parametrize("case,change,exc,msg", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_raises_and_leaves_state_untouched(case, change, exc, msg, optimizer):
    t = TTEmbeddingBag(100, 8, tt_ranks=4, name="users", optimizer=optimizer)
    t(torch.tensor([1, 2, 3]), torch.tensor([0, 1])).sum().backward()  # non-trivial state
    before = {k: v.clone() for k, v in t.state_dict().items()}
    ids = change.get("ids", [1, 2, 3])
    ids = torch.tensor(ids) if not isinstance(ids, torch.Tensor) else ids
    offsets = torch.tensor(change.get("offsets", [0, 1]))
    psw = change.get("psw")
    psw = torch.tensor(psw) if isinstance(psw, list) else psw
    with pytest.raises(exc, match=msg):
        t(ids, offsets, psw).sum().backward()
    for k, v in t.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_integer_cores_are_rejected_by_name():
    cores = [c.to(torch.int32) for c in random_cores([4, 4], [2, 2], [1, 2, 1])]
    with pytest.raises(TypeError, match=r"table 't': cores must be floating point, got Int"):
        ops.tt_embedding_bag(cores, torch.tensor([1]), torch.tensor([0]), num_embeddings=16, table_name="t")


def test_include_last_offset_must_cover_all_ids():
    t = TTEmbeddingBag(100, 8, tt_ranks=4, include_last_offset=True, name="items")
    with pytest.raises(ValueError, match=r"table 'items': with include_last_offset=True the last offset \(2\) must equal"):
        t(torch.tensor([1, 2, 3]), torch.tensor([0, 2]))


def test_bad_grad_output_is_rejected():
    cores = [c.float() for c in random_cores([4, 4], [2, 2], [1, 2, 1])]
    with pytest.raises(ValueError, match=r"table 't': grad_output must have shape \[2, 4\]"):
        OPS.tt_embedding_bag_backward(torch.ones(3, 4), cores, torch.tensor([1, 2]), torch.tensor([0, 1]), None,
                                      16, 0, False, False, "t")


def test_malformed_cores_are_rejected():
    good = [c.float() for c in random_cores([4, 4], [2, 2], [1, 2, 1])]
    with pytest.raises(ValueError, match="has input rank 3 but the previous output rank is 2"):
        ops.tt_embedding_bag([good[0], torch.zeros(4, 3, 2, 1)], torch.tensor([1]), torch.tensor([0]), num_embeddings=16)
    with pytest.raises(ValueError, match=r"num_embeddings=17 must be in \[1, prod\(p_shapes\)=16\]"):
        ops.tt_embedding_bag(good, torch.tensor([1]), torch.tensor([0]), num_embeddings=17)
    with pytest.raises(ValueError, match="at least 2 cores"):
        ops.tt_embedding_bag(good[:1], torch.tensor([1]), torch.tensor([0]), num_embeddings=4)


@pytest.mark.parametrize("mode", ["warn", "ignore"])
def test_lenient_bounds_check_drops_bad_ids(mode):
    t = TTEmbeddingBag(100, 8, tt_ranks=4, mode="mean", bounds_check_mode=mode, name="ads")
    ids, offsets = torch.tensor([1, 200, 3, -1, -5]), torch.tensor([0, 3])
    if mode == "warn":
        with pytest.warns(UserWarning, match=r"table 'ads': dropped 3 of 5 ids"):
            out = t(ids, offsets)
    else:
        out = t(ids, offsets)
    want = t(torch.tensor([1, 3]), torch.tensor([0, 2]))
    torch.testing.assert_close(out, want)
    out.sum().backward()  # backward skips the dropped ids too



def test_dropped_ids_warning_obeys_python_filters():
    """The warn-mode warning goes through Python's warnings module (torch.ops itself would print it to
    stderr), so a filter that turns it into an error raises before anything is trained."""
    t = TTEmbeddingBag(100, 8, tt_ranks=4, bounds_check_mode="warn", name="ads", optimizer="sgd")
    before = [c.detach().clone() for c in t.cores]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match=r"table 'ads': dropped 1 of 3 ids"):
            t(torch.tensor([1, 200, 3]), torch.tensor([0, 2])).sum().backward()
    assert all(torch.equal(a, b) for a, b in zip(before, t.cores))


def test_autograd_formulas_are_cpp():
    """Training steps run no Python autograd code: the three lookup ops have C++ Autograd kernels and
    their outputs' grad_fn are C++ nodes (a Python formula would show up as a BackwardCFunction)."""
    for op in ("tt_embedding_bag", "tt_embedding_bag_fused", "tt_cached_embedding_bag_fused"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"torchrec_tt::{op}", "Autograd"), op
    ids, offsets = torch.tensor([1, 2, 3]), torch.tensor([0, 2])
    for optimizer, node in ((None, "LookupFn"), ("sgd", "FusedLookupFn")):
        t = TTEmbeddingBag(100, 8, tt_ranks=4, optimizer=optimizer)
        fn = t(ids, offsets).grad_fn
        assert fn.name().endswith(f"::{node}>"), fn.name()
        assert not isinstance(fn, torch.autograd.function.BackwardCFunction)

def test_empty_batch_and_empty_bags():
    t = TTEmbeddingBag(100, 7, tt_ranks=3, mode="mean")
    out = t(torch.tensor([], dtype=torch.int64), torch.tensor([0, 0, 0]))
    assert out.shape == (3, 7) and not out.any()
    out.sum().backward()
    assert all(torch.count_nonzero(c.grad) == 0 for c in t.cores)
    assert t(torch.tensor([], dtype=torch.int64), torch.tensor([], dtype=torch.int64)).shape == (0, 7)


# ---- forward hands its plan to backward ------------------------------------------------------------

@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_evaluation_under_no_grad_keeps_no_plan(device):
    """A forward of a training table under torch.no_grad has no backward: it must not keep its plan
    (whose key holds the batch's tensors, and which would churn the store in evaluation; on CUDA its
    workspace is device memory)."""
    import gc
    import weakref
    cores = [c.to(device).requires_grad_() for c in random_cores([4, 3, 5], [2, 1, 3], [1, 3, 2, 1], torch.float32)]
    offsets = torch.tensor([0, 9, 25, 40], device=device)

    def forward_and_watch_ids():
        ids = torch.randint(0, 60, (40,)).to(device)
        ops.tt_embedding_bag(cores, ids, offsets, num_embeddings=60, include_last_offset=True)
        return weakref.ref(ids)

    kept = forward_and_watch_ids()  # grad enabled: kept for a backward that may follow
    gc.collect()
    assert kept() is not None
    with torch.no_grad():
        dropped = forward_and_watch_ids()
    gc.collect()
    assert dropped() is None


def test_backward_reuses_plan_only_for_the_same_batch():
    """Forward stores its plan for backward, keyed on the ids/offsets/weights tensors themselves: a
    backward given other tensors (same shapes, other values) or tensors changed in place must not
    reuse it, and forward calls that never get a backward must not break later ones."""
    cores = [c.requires_grad_() for c in random_cores([4, 3, 5], [2, 1, 3], [1, 3, 2, 1])]
    n = 60
    g = torch.Generator().manual_seed(1)
    ids_a, ids_b = torch.randint(0, n, (40,), generator=g), torch.randint(0, n, (40,), generator=g)
    offsets = torch.tensor([0, 9, 9, 25, 40])
    grad = torch.randn(4, 6, dtype=torch.float64, generator=g)

    def reference_grads(ids):
        leaves = [c.detach().clone().requires_grad_() for c in cores]
        tt_embedding_bag_reference(leaves, ids, offsets, include_last_offset=True).backward(grad)
        return [c.grad for c in leaves]

    def backward_op(ids):
        return OPS.tt_embedding_bag_backward(grad, [c.detach() for c in cores], ids, offsets, None, n, 0, True,
                                             False, "t")[0]

    for _ in range(100):  # forward calls without backward (e.g. evaluation with grad enabled) age out
        ops.tt_embedding_bag(cores, ids_b.clone(), offsets, num_embeddings=n, include_last_offset=True)
    ops.tt_embedding_bag(cores, ids_a, offsets, num_embeddings=n, include_last_offset=True)
    for got, want in zip(backward_op(ids_b), reference_grads(ids_b)):  # other ids: not ids_a's plan
        torch.testing.assert_close(got, want)
    ops.tt_embedding_bag(cores, ids_b, offsets, num_embeddings=n, include_last_offset=True)
    ids_b[:5] = ids_b[5:10].clone()  # changed in place after forward: the stored plan is stale
    for got, want in zip(backward_op(ids_b), reference_grads(ids_b)):
        torch.testing.assert_close(got, want)
    ops.tt_embedding_bag(cores, ids_a, offsets, num_embeddings=n, include_last_offset=True)
    for got, want in zip(backward_op(ids_a), reference_grads(ids_a)):  # the matching plan
        torch.testing.assert_close(got, want)
