"""TTEmbeddingBagCollection under DistributedModelParallel: 2 CPU ranks over gloo, spawned processes."""
import copy
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from dist_utils import random_kjt, run_ranks  # noqa: E402

BATCH, LR, STEPS = 4, 0.1, 3


def make_tables():
    from torchrec import EmbeddingBagConfig, PoolingType
    from torchrec_tt.config import TTEmbeddingBagConfig
    return [
        EmbeddingBagConfig(name="d_tw", embedding_dim=4, num_embeddings=20, feature_names=["f0"]),
        TTEmbeddingBagConfig(name="t_dp", embedding_dim=8, num_embeddings=100, feature_names=["f1"], tt_ranks=3),
        # NB: a MEAN dense table row-wise next to a table-wise one is pooled wrongly by TorchRec 1.8.0
        # (tests/test_mean_pooling_guard.py), so the dense tables here are both SUM.
        EmbeddingBagConfig(name="d_rw", embedding_dim=4, num_embeddings=40, feature_names=["f2"]),
        # with a hot-row cache refreshed every 2 steps: the owner sees the global batch, as the reference does
        TTEmbeddingBagConfig(name="t_tw", embedding_dim=4, num_embeddings=64, feature_names=["f3"], tt_ranks=2,
                             optimizer="adagrad", learning_rate=LR, cache_rows=12, cache_refresh_interval=2),
        TTEmbeddingBagConfig(name="t_tw2", embedding_dim=4, num_embeddings=50, feature_names=["f4", "f5"],
                             tt_ranks=2, pooling=PoolingType.MEAN),
    ]


CONSTRAINTS = {"d_tw": "table_wise", "d_rw": "row_wise", "t_dp": "data_parallel", "t_tw": "table_wise",
               "t_tw2": "table_wise"}


def batch(tables, seed):
    return random_kjt(tables, BATCH, seed, 0, 4)


def concat(kjts):
    """The global batch: each feature's bags from rank 0, then rank 1, ..."""
    from torchrec import KeyedJaggedTensor
    keys = kjts[0].keys()
    ds = [k.to_dict() for k in kjts]
    weights = torch.cat([d[f].weights() for f in keys for d in ds]) if kjts[0].weights_or_none() is not None else None
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=torch.cat([d[f].values() for f in keys for d in ds]),
        lengths=torch.cat([d[f].lengths() for f in keys for d in ds]), weights=weights)


def loss_fn(kt):
    target = torch.linspace(-1, 1, kt.values().shape[1])
    return ((kt.values() - target) ** 2).sum(dim=1).mean()


def build(rank, world, seed=0, plan=None, tables=None, constraints=None, weighted=False, wrap=None, model=None):
    """``tables`` (default ``make_tables()``) as a collection (or ``model``, built already), optionally wrapped
    by ``wrap``, sharded under ``constraints`` (default CONSTRAINTS); returns the tables, an unsharded copy,
    the DMP and the plan."""
    import torch.distributed as dist
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner.types import ParameterConstraints
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec_tt.distributed import get_sharders_and_planner
    from torchrec_tt.modules.tt_embedding_bag_collection import TTEmbeddingBagCollection
    torch.manual_seed(seed)
    tables = tables or make_tables()
    model = model if model is not None else TTEmbeddingBagCollection(tables, is_weighted=weighted)
    model = wrap(model) if wrap is not None else model
    ref = copy.deepcopy(model)
    cons = {n: ParameterConstraints(sharding_types=[s]) for n, s in (constraints or CONSTRAINTS).items()}
    sharders, planner = get_sharders_and_planner(
        model, world, BATCH, constraints=cons, fused_params={"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": LR})
    plan = plan or planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan, sharders=sharders)
    dmp.load_state_dict(ref.state_dict())  # TorchRec's dense sharding re-initialises dense weights
    return tables, ref, dmp, plan


def make_optimizer(dmp):
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                                  lambda params: torch.optim.SGD(params, lr=LR))
    return CombinedOptimizer([dmp.fused_optimizer, dense])


def train(dmp, opt, tables, rank, world, steps, start=0):
    losses = []
    for step in range(start, start + steps):
        kjt = batch(tables, 100 * step + rank)
        opt.zero_grad()
        loss = loss_fn(dmp(kjt))
        loss.backward()
        opt.step()
        t = loss.detach().clone()
        torch.distributed.all_reduce(t)
        losses.append(float(t) / world)
    return losses


# ---- forward + training equivalence -------------------------------------------------------------

def _equivalence(rank, world):
    from torchrec.optim.optimizers import in_backward_optimizer_filter
    tables, ref, dmp, plan = build(rank, world)
    # forward: sharded local batch == unsharded on the same rows
    kjt = batch(tables, 7 + rank)
    out, expect = dmp(kjt), ref(kjt)
    assert out.keys() == expect.keys() == ["f0", "f1", "f2", "f3", "f4", "f5"]
    torch.testing.assert_close(out.values(), expect.values(), rtol=1e-5, atol=1e-6)
    # state_dict keys == unsharded keys (no all-to-all buffers)
    assert sorted(dmp.state_dict().keys()) == sorted(ref.state_dict().keys())
    assert any(k.startswith("tt_tables.t_tw.") for k in dmp.fused_optimizer.state_dict()["state"])

    # N steps under DMP == N steps of the unsharded model on the concatenated global batch
    opt = make_optimizer(dmp)
    losses = train(dmp, opt, tables, rank, world, STEPS)
    ref_opt = torch.optim.SGD([p for _, p in in_backward_optimizer_filter(ref.named_parameters())], lr=LR)
    ref_losses = []
    for step in range(STEPS):
        kjt = concat([batch(tables, 100 * step + r) for r in range(world)])
        ref_opt.zero_grad()
        loss = loss_fn(ref(kjt))
        loss.backward()
        ref_opt.step()
        ref_losses.append(float(loss))
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
    # and the weights agree afterwards (TT tables compared through full_weight where they live)
    kjt = batch(tables, 999 + rank)
    torch.testing.assert_close(dmp(kjt).values(), ref(kjt).values(), rtol=1e-4, atol=1e-5)
    local = _find_sharded(dmp).tt_tables
    # a learning-rate change on dmp.fused_optimizer (a scheduler's job) reaches the fused TT table
    for group in dmp.fused_optimizer.param_groups:
        if group.get("optimizer") == "adagrad":
            group["lr"] = 0.0123
    dmp.fused_optimizer.step()
    if "t_tw" in local:
        assert local["t_tw"].optimizer.learning_rate == 0.0123  # the hot-row cache was refreshed and used, and picked the reference's rows
        assert local["t_tw"].cache_stats()["hits"] > 0
        assert torch.equal(local["t_tw"].cache.cached_ids, ref.tt_tables["t_tw"].cache.cached_ids)
    return {"plan": str(plan), "losses": losses, "local_tt": sorted(_find_sharded(dmp).tt_tables.keys())}


def _find_sharded(dmp):
    from torchrec_tt.distributed import ShardedTTEmbeddingBagCollection
    return next(m for m in dmp.modules() if isinstance(m, ShardedTTEmbeddingBagCollection))


def test_sharded_forward_and_training_match_unsharded():
    results = run_ranks(_equivalence)
    assert results[0]["losses"] == results[1]["losses"]
    assert "data_parallel" in results[0]["plan"] and "row_wise" in results[0]["plan"]
    # t_dp on both ranks; each table-wise TT table on exactly one rank
    local = [set(r["local_tt"]) for r in results]
    assert all("t_dp" in s for s in local)
    for t in ["t_tw", "t_tw2"]:
        assert sum(t in s for s in local) == 1


# ---- mixed table dtypes, weighted features -------------------------------------------------------

def mixed_dtype_tables():
    from torchrec import DataType, EmbeddingBagConfig
    from torchrec_tt.config import TTEmbeddingBagConfig
    return [
        EmbeddingBagConfig(name="d", embedding_dim=4, num_embeddings=20, feature_names=["f0"]),
        TTEmbeddingBagConfig(name="t_bf16", embedding_dim=8, num_embeddings=100, feature_names=["f1"], tt_ranks=3,
                             data_type=DataType.BF16, optimizer="rowwise_adagrad", learning_rate=LR),
        TTEmbeddingBagConfig(name="t_fp16", embedding_dim=4, num_embeddings=50, feature_names=["f2"], tt_ranks=2,
                             data_type=DataType.FP16),
        TTEmbeddingBagConfig(name="t_fp32", embedding_dim=4, num_embeddings=64, feature_names=["f3"], tt_ranks=2),
    ]


def _mixed_dtypes(rank, world):
    """bf16 and fp16 TT tables table-wise on different ranks, an fp32 one data-parallel, fp32 KJT weights."""
    from torchrec.optim.optimizers import in_backward_optimizer_filter
    cons = {"t_bf16": "table_wise", "t_fp16": "table_wise", "t_fp32": "data_parallel", "d": "data_parallel"}
    tables, ref, dmp, _ = build(rank, world, tables=mixed_dtype_tables(), constraints=cons, weighted=True)
    placement = _find_sharded(dmp).plan_summary()
    dense = [p for _, p in in_backward_optimizer_filter(dmp.named_parameters())]
    opt = torch.optim.SGD(dense, lr=LR)
    ref_opt = torch.optim.SGD([p for _, p in in_backward_optimizer_filter(ref.named_parameters())], lr=LR)
    outs, ref_outs = [], []
    for step in range(2):  # the sharded step on the local batch == the unsharded one on the global batch
        kjts = [random_kjt(tables, BATCH, 10 * step + r, 0, 4, weighted=True) for r in range(world)]
        out = dmp(kjts[rank])
        glob = ref(concat(kjts))
        assert out.values().dtype == glob.values().dtype == torch.float32
        outs.append(out.values().detach())
        ref_outs.append(glob.values().detach()[rank * BATCH:(rank + 1) * BATCH])
        opt.zero_grad()
        loss_fn(out).backward()
        opt.step()
        ref_opt.zero_grad()
        loss_fn(glob).backward()
        ref_opt.step()
    return placement, [o.tolist() for o in outs], [o.tolist() for o in ref_outs]  # plain data through the queue


def test_mixed_dtype_tables_and_weighted_features_match_unsharded():
    # The pooled all-to-all moved bf16 and fp16 blocks as each other (silently wrong outputs) or crashed
    # against an fp32 block; weighted features handed fp32 KJT weights to half tables (TypeError).
    for placement, outs, ref_outs in run_ranks(_mixed_dtypes):
        assert placement["t_fp32"] == "data_parallel"
        assert {placement["t_bf16"], placement["t_fp16"]} == {"table_wise@rank0", "table_wise@rank1"}, placement
        for out, ref_out in zip(outs, ref_outs):
            torch.testing.assert_close(torch.tensor(out), torch.tensor(ref_out), rtol=1e-6, atol=1e-7)


# ---- TorchRec's TrainPipelineSparseDist ----------------------------------------------------------

class _TrainStep(torch.nn.Module):
    """The shape TorchRec's train pipelines call: a Batch in, (loss, output) out."""

    def __init__(self, ebc):
        super().__init__()
        self.ebc = ebc

    def forward(self, batch):
        kt = self.ebc(batch.sparse_features)
        loss = loss_fn(kt)
        return loss, (loss.detach(), kt.values().detach())


def _pipelined(rank, world, pipelined, weighted):
    from torchrec.datasets.utils import Batch
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
    tables, _, dmp, _ = build(rank, world, weighted=weighted, wrap=_TrainStep)
    opt = make_optimizer(dmp)
    batches = [Batch(dense_features=torch.zeros(BATCH, 1), labels=torch.zeros(BATCH),
                     sparse_features=random_kjt(tables, BATCH, 100 * k + rank, 0, 4, weighted=weighted))
               for k in range(5)]
    losses = []
    if pipelined:  # input_dist of batch k+1 runs before batch k's compute; the pipeline steps opt itself
        pipe = TrainPipelineSparseDist(dmp, opt, torch.device("cpu"))
        it = iter(batches)
        for _ in batches:
            losses.append(float(pipe.progress(it)[0]))
        pipelined_names = [type(m.forward).__name__ for m in dmp.modules() if hasattr(m, "tt_tables")]
    else:
        for b in batches:
            opt.zero_grad()
            loss, _ = dmp(b)
            loss.backward()  # the fused tables update here, opt.step the rest
            opt.step()
            losses.append(float(loss))
        pipelined_names = []
    return losses, pipelined_names


@pytest.mark.parametrize("weighted", [False, True])
def test_train_pipeline_sparse_dist_trains_like_the_plain_loop(weighted):
    """TorchRec's TrainPipelineSparseDist (input_dist a batch ahead, the splits all-to-alls of all
    sharded modules fused) pipelines the collection and trains exactly as the plain loop does."""
    plain = run_ranks(_pipelined, False, weighted)
    piped = run_ranks(_pipelined, True, weighted)
    for rank in range(2):
        assert piped[rank][1] == ["PipelinedForward"], piped[rank][1]  # the collection was pipelined
        assert piped[rank][0] == plain[rank][0]  # bitwise


# ---- checkpoint / resume -------------------------------------------------------------------------

def _optim_state(dmp):
    """The fused optimizer state without the empty entries of stateless (SGD) tables: DCP saves
    nothing for an empty dict, then reports it missing on load."""
    sd = dmp.fused_optimizer.state_dict()
    sd["state"] = {k: v for k, v in sd["state"].items() if v}
    return sd


def _ckpt_phase1(rank, world, path):
    import torch.distributed.checkpoint as dcp
    tables, ref, dmp, plan = build(rank, world)
    opt = make_optimizer(dmp)
    train(dmp, opt, tables, rank, world, 2)
    dcp.save({"model": dmp.state_dict(), "optim": _optim_state(dmp)}, checkpoint_id=path)
    # the in-memory round trip too
    sd = {k: (v.clone() if isinstance(v, torch.Tensor) and not hasattr(v, "local_shards") else v)
          for k, v in dmp.state_dict().items()}
    dmp.load_state_dict(sd)
    return train(dmp, opt, tables, rank, world, 3, start=2), plan, sorted(_find_sharded(dmp).tt_tables)


def _ckpt_phase2(rank, world, path, plan):
    import torch.distributed.checkpoint as dcp
    tables, ref, dmp, _ = build(rank, world, seed=123, plan=plan)  # different init: the load must matter
    opt = make_optimizer(dmp)
    state = {"model": dmp.state_dict(), "optim": _optim_state(dmp)}
    dcp.load(state, checkpoint_id=path)
    dmp.load_state_dict(state["model"])
    full = dmp.fused_optimizer.state_dict()
    full["state"].update(state["optim"]["state"])
    dmp.fused_optimizer.load_state_dict(full)
    return train(dmp, opt, tables, rank, world, 3, start=2), sorted(_find_sharded(dmp).tt_tables)


def _move_tt_tables(plan, world):
    """``plan`` with every table-wise TT table on the next rank (DCP has to reshard their state)."""
    from torchrec_tt.distributed import TT_COMPUTE_KERNEL
    plan = copy.deepcopy(plan)
    for module_plan in plan.plan.values():
        for ps in module_plan.values():
            if ps.compute_kernel == TT_COMPUTE_KERNEL and ps.sharding_type == "table_wise":
                ps.ranks = [(ps.ranks[0] + 1) % world]
                for shard in getattr(ps.sharding_spec, "shards", None) or []:
                    shard.placement = torch.distributed._remote_device(f"rank:{ps.ranks[0]}/cpu")
    return plan


@pytest.mark.parametrize("move", [False, True], ids=["same_plan", "tt_tables_moved"])
def test_checkpoint_resume_matches_uninterrupted(tmp_path, move):
    path = str(tmp_path / "ckpt")
    first = run_ranks(_ckpt_phase1, path)
    uninterrupted, plan, _ = first[0]
    resumed = run_ranks(_ckpt_phase2, path, _move_tt_tables(plan, 2) if move else plan)
    torch.testing.assert_close(torch.tensor(resumed[0][0]), torch.tensor(uninterrupted), rtol=1e-6, atol=1e-7)
    for before, after in zip(first, resumed):  # t_dp everywhere; the table-wise ones stayed or moved
        assert (before[2] != after[1]) == move and "t_dp" in after[1]


# ---- bad input: same clear error on every rank, no hang -----------------------------------------

def _bad_inputs(rank, world):
    from torchrec import KeyedJaggedTensor
    tables, ref, dmp, _ = build(rank, world)
    good = batch(tables, rank)
    keys = good.keys()
    cases = {
        "unknown": KeyedJaggedTensor.from_lengths_sync(keys=keys[:-1] + ["zz"], values=good.values(),
                                                       lengths=good.lengths()),
        "missing": KeyedJaggedTensor.from_lengths_sync(keys=keys[1:], values=good.values()[:0],
                                                       lengths=torch.zeros(BATCH * (len(keys) - 1), dtype=torch.long)),
        "lengths": KeyedJaggedTensor(keys=keys, values=torch.cat([good.values(), torch.tensor([0])]),
                                     lengths=good.lengths()),
        "no_bags": KeyedJaggedTensor.from_lengths_sync(keys=keys, values=good.values()[:0],
                                                       lengths=torch.zeros(0, dtype=torch.long)),
    }
    for feature, n in [("f3", 64), ("f0", 20)]:  # a table-wise TT table owned by one rank; a dense table
        lengths = torch.ones(len(keys) * BATCH, dtype=torch.long)
        values = torch.zeros(len(keys) * BATCH, dtype=torch.long)
        values[keys.index(feature) * BATCH + 1] = n
        cases[f"range_{feature}"] = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values, lengths=lengths)
    messages = {}
    for name, kjt in cases.items():
        try:
            dmp(kjt)
            messages[name] = None
        except (ValueError, IndexError) as e:
            messages[name] = str(e)
    dmp(good).values().sum().backward()  # still usable afterwards, no desync
    return messages


def test_bad_input_fails_on_every_rank():
    for messages in run_ranks(_bad_inputs):
        assert "zz" in messages["unknown"]
        assert "f0" in messages["missing"] and "missing" in messages["missing"]
        assert "lengths sum to" in messages["lengths"]
        assert "t_tw" in messages["range_f3"] and "64" in messages["range_f3"]
        assert "d_tw" in messages["range_f0"]
        assert "no bags (batch size 0)" in messages["no_bags"]
