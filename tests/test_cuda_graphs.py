"""CUDA graph capture of the lookups (CUDA only; skipped without a GPU). Separate from test_cuda.py so
that a capture gone wrong cannot leave a stream in capture mode under the other CUDA tests
(scripts/gpu_check.sh runs this file last)."""
import pytest
import torch

import torchrec_tt  # noqa: F401  (registers the ops)
from torchrec_tt import TTEmbeddingBag

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEV = "cuda"


@pytest.mark.parametrize("plan", ["one_block_plan", "general_plan"])
@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad"])
def test_cuda_graph_replays_train_like_eager_steps(optimizer, plan, monkeypatch):
    # A fused table's training step in ignore mode never synchronises and allocates only through the
    # caching allocator, so torch.cuda.graph captures it whole. Replays on new ids and gradients,
    # copied into the captured buffers, must train exactly like eager steps (deterministic kernels).
    monkeypatch.setenv("TORCHREC_TT_CUDA_SMALL_PLAN", "1" if plan == "one_block_plan" else "0")
    kw = dict(tt_ranks=[4, 3], tt_p_shapes=[8, 9, 7], tt_q_shapes=[2, 3, 2], optimizer=optimizer,
              bounds_check_mode="ignore", device=DEV)
    torch.manual_seed(0)
    graphed, eager = TTEmbeddingBag(500, 12, **kw), TTEmbeddingBag(500, 12, **kw)
    eager.load_state_dict(graphed.state_dict())
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randint(-3, 503, (48,), generator=g), torch.randn(6, 12, generator=g)) for _ in range(6)]
    offsets = torch.arange(0, 48, 8, device=DEV)
    ids_buf, grad_buf = batches[0][0].to(DEV), batches[0][1].to(DEV)

    def graphed_step():
        graphed(ids_buf, offsets).backward(grad_buf)

    side = torch.cuda.Stream()  # warm-up on a side stream, as torch.cuda.graph asks
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for ids, grad in batches[:2]:
            ids_buf.copy_(ids)
            grad_buf.copy_(grad)
            graphed_step()
    torch.cuda.current_stream().wait_stream(side)
    for ids, grad in batches[:2]:
        eager(ids.to(DEV), offsets).backward(grad.to(DEV))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed_step()  # recorded, not run
    for ids, grad in batches[2:]:
        ids_buf.copy_(ids)
        grad_buf.copy_(grad)
        graph.replay()
        eager(ids.to(DEV), offsets).backward(grad.to(DEV))
        torch.cuda.synchronize()
        for a, b in zip(list(graphed.cores) + graphed.optimizer_state(), list(eager.cores) + eager.optimizer_state()):
            assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["error", "warn"])
def test_cuda_graph_capture_of_a_checked_lookup_is_refused(mode):
    # Those modes read the validation record back to the host: the capture is refused before any
    # launch, with an error that says what to use instead.
    t = TTEmbeddingBag(100, 8, tt_ranks=4, bounds_check_mode=mode, device=DEV, name="captured")
    ids, offsets = torch.tensor([1, 2, 3], device=DEV), torch.tensor([0], device=DEV)
    t(ids, offsets)  # eager: fine
    with pytest.raises(ValueError, match=f"captured.*bounds_check_mode '{mode}'.*bounds_check_mode='ignore'"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            t(ids, offsets)
    assert torch.isfinite(t(ids, offsets)).all()  # the stream still works after the refused capture
