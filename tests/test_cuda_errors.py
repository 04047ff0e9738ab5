"""The CUDA op's errors and bad input against the CPU op's: the same exception and message, the same
drops in warn / ignore mode, nothing written on an invalid batch (both plan paths, as test_cuda.py).

TORCHREC_TT_TEST_DEVICE=cpu runs this file against the CPU op (a dry run without a GPU).
"""
import os
import re
import sys
import warnings

import pytest
import torch

import torchrec_tt  # noqa: F401  (registers the ops)
from torchrec_tt import TTEmbeddingBag

sys.path.insert(0, os.path.dirname(__file__))
from cuda_cases import DEV, OPS, close, cuda_only, random_cores  # noqa: E402
from cuda_cases import plan_path  # noqa: E402, F401  (autouse fixture: every test on both plan paths)

pytestmark = pytest.mark.skipif(DEV == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")


# ---- bad input ----------------------------------------------------------------------------------

BASE = dict(ids=[1, 2, 3, 4], offsets=[0, 1, 3], psw=None, include_last=False)
BAD = [
    ("id_too_large", dict(ids=[1, 2, 100, 500])),
    ("negative_id", dict(ids=[1, -3, 4, -5])),
    ("int32_bad_id", dict(ids=torch.tensor([1, 2, 3, 100], dtype=torch.int32))),
    ("decreasing_offsets", dict(offsets=[0, 3, 1])),
    ("offsets_not_at_zero", dict(offsets=[1, 2, 3])),
    ("offset_past_end", dict(offsets=[0, 1, 5])),
    ("last_offset_mismatch", dict(offsets=[0, 1, 3], include_last=True)),
    ("empty_offsets_with_ids", dict(offsets=[])),
    ("nan_weight", dict(psw=[1.0, float("nan"), 1.0, 1.0])),
    ("inf_weight", dict(psw=[1.0, 1.0, 1.0, float("-inf")])),
    ("offsets_before_ids", dict(ids=[1, 200, 3, 4], offsets=[0, 3, 2])),
    ("weights_before_ids", dict(ids=[1, 200, 3, 4], psw=[1.0, float("nan"), 1.0, 1.0])),
]


def bad_args(change, device, cores):
    a = dict(BASE, **change)
    ids = a["ids"] if isinstance(a["ids"], torch.Tensor) else torch.tensor(a["ids"])
    offsets = torch.tensor(a["offsets"], dtype=torch.long)
    psw = None if a["psw"] is None else torch.tensor(a["psw"], dtype=torch.float32).to(device)
    return [x.to(device) for x in cores], ids.to(device), offsets.to(device), psw, a["include_last"]


def raised(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return type(e), str(e).splitlines()[0]
    return None


@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize("case,change", BAD, ids=[b[0] for b in BAD])
def test_bad_input_same_error_as_cpu(case, change, mode):
    cores = [x.float() for x in random_cores([10, 10], [2, 2], [1, 3, 1], 0)]

    def call(device):
        cs, ids, offsets, psw, last = bad_args(change, device, cores)
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            return OPS.tt_embedding_bag(cs, ids, offsets, psw, 100, 0, last, mode, "users")

    cpu_err, dev_err = raised(lambda: call("cpu")), raised(lambda: call(DEV))
    if mode == 1 and case in ("id_too_large", "negative_id", "int32_bad_id"):
        assert cpu_err is None and dev_err is None
        return
    assert cpu_err is not None
    assert dev_err == cpu_err



@pytest.mark.parametrize("where", ["id", "offset", "weight", "dropped"])
@pytest.mark.parametrize("n", [1000, 40_000])  # one-block validation, and the grid + finalize launches
def test_validation_of_large_batches_like_cpu(where, n):
    """Errors far into a batch, on both validation paths: the same message as the CPU op; in warn
    mode the same dropped count."""
    cores = [x.float() for x in random_cores([10, 10], [2, 2], [1, 3, 1], 0)]
    g = torch.Generator().manual_seed(n)
    ids = torch.randint(0, 100, (n,), generator=g)
    offsets = torch.arange(0, n, 4)
    psw = torch.ones(n)
    if where in ("id", "dropped"):
        ids[n - 7] = 100 + n
        ids[n - 3] = -1
    elif where == "offset":
        offsets[len(offsets) - 5] -= 9
    else:
        psw[n - 2] = float("nan")
    mode = 1 if where == "dropped" else 0

    def call(device):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            out = OPS.tt_embedding_bag([c.to(device) for c in cores], ids.to(device), offsets.to(device),
                                       psw.to(device), 100, 0, False, mode, "big")
        return out.cpu(), [str(x.message).split(" (Triggered")[0] for x in w]

    if mode == 0:
        cpu_err, dev_err = raised(lambda: call("cpu")), raised(lambda: call(DEV))
        assert cpu_err is not None and dev_err == cpu_err
        return
    (cpu_out, cpu_msgs), (dev_out, dev_msgs) = call("cpu"), call(DEV)
    close(dev_out, cpu_out, 1e-5)
    assert dev_msgs == cpu_msgs == [f"torchrec_tt: table 'big': dropped 2 of {n} ids outside [0, 100)"]

@pytest.mark.parametrize("mode", [1, 2])
def test_lenient_modes_drop_like_cpu(mode):
    cores = [x.float() for x in random_cores([10, 10], [2, 2], [1, 3, 1], 0)]
    outs, msgs = {}, {}
    for device in ("cpu", DEV):
        cs, ids, offsets, psw, last = bad_args(dict(ids=[1, -2, 300, 4], psw=[1.0, 2.0, 3.0, 4.0]), device, cores)
        cs = [x.requires_grad_() for x in cs]  # C++ warnings reach Python on the autograd path
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            outs[device] = OPS.tt_embedding_bag(cs, ids, offsets, psw, 100, 1, last, mode, "ads").detach()
        # Strip torch's " (Triggered internally at <file>:<line>.)" suffix: it names the C++ source.
        msgs[device] = [re.sub(r"\s*\(Triggered internally at .*\)\s*$", "", str(x.message), flags=re.S)
                        for x in w if "torchrec_tt" in str(x.message)]
    close(outs[DEV], outs["cpu"], 1e-6)
    assert msgs[DEV] == msgs["cpu"]
    assert len(msgs["cpu"]) == (1 if mode == 1 else 0)
    if mode == 1:
        assert "table 'ads': dropped 2 of 4 ids outside [0, 100)" in msgs["cpu"][0]


@pytest.mark.parametrize("optimizer", [None, "adagrad"])
@pytest.mark.parametrize("case,change", [b for b in BAD if b[0] != "int32_bad_id"], ids=[b[0] for b in BAD if b[0] != "int32_bad_id"])
def test_bad_input_leaves_module_untouched(case, change, optimizer):
    t = TTEmbeddingBag(100, 8, tt_ranks=4, name="users", optimizer=optimizer, device=DEV)
    t(torch.tensor([1, 2, 3], device=DEV), torch.tensor([0, 1], device=DEV)).sum().backward()
    before = {k: v.clone() for k, v in t.state_dict().items()}
    _, ids, offsets, psw, last = bad_args(change, DEV, [])
    t.include_last_offset = last
    with pytest.raises((IndexError, ValueError), match="table 'users': "):
        t(ids, offsets, psw).sum().backward()
    for k, v in t.state_dict().items():
        assert torch.equal(v, before[k]), k


@cuda_only
@pytest.mark.parametrize("change", [dict(psw=[1.0, float("nan"), 1.0, 1.0]), dict(offsets=[0, 3, 1])])
def test_backward_guard_writes_nothing_on_invalid_batch(change):
    # The backward ops do not synchronise to raise; an invalid batch (which the forward rejects)
    # leaves cores, optimizer state and gradients untouched.
    cores32 = [x.float() for x in random_cores([10, 10], [2, 2], [1, 3, 1], 0)]
    cores, ids, offsets, psw, last = bad_args(change, DEV, cores32)
    state = [torch.rand(c.shape, device=DEV) for c in cores]
    before = [x.clone() for x in cores + state]
    grad = torch.randn(len(offsets), 4, device=DEV)
    OPS.tt_embedding_bag_backward_fused_(grad, cores, state, ids, offsets, psw, 100, 0, last, "adagrad", 0.1, 1e-8, "t")
    for a, b in zip(cores + state, before):
        assert torch.equal(a, b)
    grads, _ = OPS.tt_embedding_bag_backward(grad, cores, ids, offsets, psw, 100, 0, last, False, "t")
    assert all(int(torch.count_nonzero(g)) == 0 for g in grads)


def test_backward_drops_invalid_ids_like_cpu():
    cores32 = [x.float() for x in random_cores([10, 10], [2, 2], [1, 3, 1], 0)]
    res = {}
    for device in ("cpu", DEV):
        # Fresh copies per device: x.to("cpu") is a no-op alias and the fused op updates in place,
        # so without the clone the second run would start from the first run's updated cores.
        cores, ids, offsets, psw, last = bad_args(dict(ids=[1, 500, 3, -1]), device, [c.clone() for c in cores32])
        state = [torch.ones(c.shape[0], device=device) for c in cores]
        grad = torch.randn(3, 4, generator=torch.Generator().manual_seed(0)).to(device)
        OPS.tt_embedding_bag_backward_fused_(grad, cores, state, ids, offsets, psw, 100, 1, last, "rowwise_adagrad",
                                             0.1, 1e-8, "t")
        res[device] = cores + state
    for a, b in zip(res[DEV], res["cpu"]):
        close(a, b, 1e-5)


@pytest.mark.parametrize("pooling", [0, 1])
def test_dense_backward_drops_invalid_ids_like_cpu(pooling):
    # Dense-gradient twin of the fused test above (tells a fused-update bug from a gradient bug).
    cores32 = [x.float() for x in random_cores([10, 10], [2, 2], [1, 3, 1], 0)]
    grad = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    res = {}
    for device in ("cpu", DEV):
        cores, ids, offsets, psw, last = bad_args(dict(ids=[1, 500, 3, -1]), device, [c.clone() for c in cores32])
        grads, _ = OPS.tt_embedding_bag_backward(grad.to(device), cores, ids, offsets, psw, 100, pooling, last, False,
                                                 "t")
        res[device] = grads
    for a, b in zip(res[DEV], res["cpu"]):
        close(a, b, 1e-5)
    # Only the kept ids (1 and 3, both with leading digit 0) contribute.
    assert int(torch.count_nonzero(res["cpu"][0].flatten(1).abs().sum(1))) == 1
    assert sorted(torch.nonzero(res["cpu"][1].flatten(1).abs().sum(1)).flatten().tolist()) == [1, 3]


def test_empty_batch_and_empty_bags():
    cores = [x.float().to(DEV) for x in random_cores([4, 5], [2, 3], [1, 2, 1], 0)]
    ids = torch.tensor([], dtype=torch.long, device=DEV)
    out = OPS.tt_embedding_bag(cores, ids, torch.tensor([0, 0, 0], device=DEV), None, 20, 1, False, 0, "t")
    assert out.shape == (3, 6) and int(torch.count_nonzero(out)) == 0
    out = OPS.tt_embedding_bag(cores, ids, torch.tensor([0], device=DEV), None, 20, 0, True, 0, "t")
    assert out.shape == (0, 6)
    grads, _ = OPS.tt_embedding_bag_backward(torch.ones(3, 6, device=DEV), cores, ids,
                                             torch.tensor([0, 0, 0], device=DEV), None, 20, 0, False, False, "t")
    assert all(int(torch.count_nonzero(g)) == 0 for g in grads)

