"""TorchRec's ``apply_optimizer_in_backward`` on TT tables: what the sharder and planner read off the cores."""
import copy
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from dist_utils import random_kjt, run_ranks  # noqa: E402
from test_distributed import concat, loss_fn  # noqa: E402

LR, STEPS, BATCH = 0.1, 3, 4


def apply_in_backward(optimizer_class, params, kwargs):
    from torch.distributed.optim import _apply_optimizer_in_backward
    _apply_optimizer_in_backward(optimizer_class, params, kwargs)


def tt_config(name="t", optimizer=None, **kw):
    from torchrec_tt.config import TTEmbeddingBagConfig
    return TTEmbeddingBagConfig(name=name, embedding_dim=8, num_embeddings=200, feature_names=[f"f_{name}"],
                                tt_ranks=3, optimizer=optimizer, **kw)


def resolved(optimizer_class, kwargs, **config_kw):
    from torchrec_tt.in_backward import resolve_tt_config
    from torchrec_tt.modules.tt_embedding_bag_collection import TTEmbeddingBagCollection
    ebc = TTEmbeddingBagCollection([tt_config(**config_kw)])
    apply_in_backward(optimizer_class, ebc.parameters(), kwargs)
    return resolve_tt_config(ebc.tt_configs()[0], ebc.tt_tables["t"])


# ---- the mapping ---------------------------------------------------------------------------------

def _cases():
    import torchrec.optim as trec
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    return [
        (torch.optim.SGD, {"lr": 0.3}, ("sgd", 0.3, 1e-8)),
        (torch.optim.Adagrad, {"lr": 0.05, "eps": 1e-6}, ("adagrad", 0.05, 1e-6)),
        (torch.optim.Adagrad, {"lr": 0.05, "weight_decay": 0.0, "foreach": None}, ("adagrad", 0.05, 1e-8)),
        (trec.RowWiseAdagrad, {"lr": 0.02}, ("rowwise_adagrad", 0.02, 1e-8)),
        (trec.SGD, {"learning_rate": 0.4}, ("sgd", 0.4, 1e-8)),
        (trec.Adagrad, {}, ("adagrad", 0.01, 1e-8)),  # FBGEMM's defaults, as TorchRec's dense tables get
        # an explicit FBGEMM optimizer wins over the class, as in TorchRec's sharder
        (trec.Adagrad, {"lr": 0.1, "optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD}, ("rowwise_adagrad", 0.1, 1e-8)),
    ]


@pytest.mark.parametrize("case", range(7))
def test_in_backward_optimizers_map_to_fused_ones(case):
    optimizer_class, kwargs, (name, lr, eps) = _cases()[case]
    config = resolved(optimizer_class, kwargs)
    opt = config.fused_optimizer_config()
    assert (opt.name, opt.learning_rate, opt.eps) == (name, lr, eps)


def test_tables_without_in_backward_optimizer_keep_their_config():
    from torchrec_tt.in_backward import resolve_tt_config
    from torchrec_tt.modules.tt_embedding_bag_collection import TTEmbeddingBagCollection
    configs = [tt_config("a"), tt_config("b", optimizer="adagrad", learning_rate=0.2)]
    ebc = TTEmbeddingBagCollection(configs)
    for c in configs:
        assert resolve_tt_config(c, ebc.tt_tables[c.name]) is c


def _bad():
    import torchrec.optim as trec
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    return [
        (torch.optim.Adam, {"lr": 0.1}, {}, "torch.optim.adam.Adam) has no TT kernel"),
        (trec.Adam, {"lr": 0.1}, {}, "has no TT kernel"),
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}, {}, "cannot apply {'momentum': 0.9}"),
        (torch.optim.Adagrad, {"lr": 0.1, "weight_decay": 0.01}, {}, "cannot apply {'weight_decay': 0.01}"),
        (torch.optim.SGD, {"lr": 0.1}, {"optimizer": "sgd"}, "give the optimizer one way"),
        (trec.SGD, {"lr": 0.1, "learning_rate": 0.2}, {}, "once, as 'lr' or 'learning_rate'"),
        (trec.SGD, {"lr": -1.0}, {}, "learning_rate must be finite and >= 0"),
        (trec.SGD, {"optimizer": EmbOptimType.ADAM}, {}, "unsupported fused optimizer"),
    ]


@pytest.mark.parametrize("case", range(8))
def test_in_backward_optimizers_without_exact_kernel_are_refused_naming_the_table(case):
    optimizer_class, kwargs, config_kw, message = _bad()[case]
    with pytest.raises(ValueError, match="table 't'") as e:
        resolved(optimizer_class, kwargs, **config_kw)
    assert message in str(e.value)


def test_partial_or_repeated_in_backward_optimizers_are_refused():
    from torchrec_tt.in_backward import resolve_tt_config
    from torchrec_tt.modules.tt_embedding_bag_collection import TTEmbeddingBagCollection
    ebc = TTEmbeddingBagCollection([tt_config()])
    table = ebc.tt_tables["t"]
    apply_in_backward(torch.optim.SGD, [table.cores[0]], {"lr": 0.1})
    with pytest.raises(ValueError, match="table 't': apply_optimizer_in_backward covers 1 of its 3 TT cores"):
        resolve_tt_config(ebc.tt_configs()[0], table)
    apply_in_backward(torch.optim.SGD, list(table.cores)[1:], {"lr": 0.2})
    with pytest.raises(ValueError, match="table 't': its TT cores carry different in-backward optimizers"):
        resolve_tt_config(ebc.tt_configs()[0], table)
    apply_in_backward(torch.optim.SGD, table.parameters(), {"lr": 0.1})
    with pytest.raises(ValueError, match="table 't': its TT cores carry different"):
        resolve_tt_config(ebc.tt_configs()[0], table)
    ebc = TTEmbeddingBagCollection([tt_config()])
    for _ in range(2):
        apply_in_backward(torch.optim.SGD, ebc.parameters(), {"lr": 0.1})
    with pytest.raises(ValueError, match=r"table 't': 2 optimizers applied in backward \(\['SGD', 'SGD'\]\)"):
        resolve_tt_config(ebc.tt_configs()[0], ebc.tt_tables["t"])


# ---- planning ------------------------------------------------------------------------------------

def test_planner_places_in_backward_tables_table_wise_and_counts_their_state():
    import torchrec.optim as trec
    from torchrec.distributed.planner.types import ParameterConstraints
    from torchrec_tt.distributed import get_sharders_and_planner
    from torchrec_tt.modules.tt_embedding_bag_collection import TTEmbeddingBagCollection
    from torchrec_tt.planner.estimators import _tt_config, tt_table_bytes
    ebc = TTEmbeddingBagCollection([tt_config("plain"), tt_config("fused")], device="meta")
    apply_in_backward(trec.RowWiseAdagrad, ebc.tt_tables["fused"].parameters(), {"lr": 0.1})
    sharders, planner = get_sharders_and_planner(ebc, world_size=2, batch_size=BATCH)
    plan = planner.plan(ebc, sharders).plan[""]
    assert plan["fused"].sharding_type == "table_wise"
    options = planner._enumerator.enumerate(ebc, sharders)  # the storage estimator saw the row-wise state
    fused = [o for o in options if o.name == "fused"]
    assert fused and {o.sharding_type for o in fused} == {"table_wise"}
    assert _tt_config(fused[0]).fused_optimizer_config().name == "rowwise_adagrad"
    assert tt_table_bytes(_tt_config(fused[0])).optimizer == 4 * sum(ebc.tt_tables["fused"].p_shapes)
    assert {o.sharding_type for o in options if o.name == "plain"} == {"data_parallel", "table_wise"}
    with pytest.raises(ValueError, match="TT table 'fused': sharding types \\['data_parallel'\\] not supported"):
        get_sharders_and_planner(ebc, world_size=2, batch_size=BATCH,
                                 constraints={"fused": ParameterConstraints(sharding_types=["data_parallel"])})


# ---- training under DMP --------------------------------------------------------------------------

def _tables(in_backward: bool):
    """A dense table and three TT tables; with ``in_backward`` the TT tables' optimizers are left to
    apply_optimizer_in_backward, otherwise they are in the configs."""
    from torchrec import EmbeddingBagConfig
    from torchrec_tt.config import TTEmbeddingBagConfig

    def tt(name, dim, rows, optimizer, **kw):
        opt = {} if in_backward else dict(optimizer=optimizer, learning_rate=LR, **({} if optimizer == "sgd" else
                                                                                    {"eps": 1e-8}))
        return TTEmbeddingBagConfig(name=name, embedding_dim=dim, num_embeddings=rows, feature_names=[f"f_{name}"],
                                    tt_ranks=2, **opt, **kw)
    return [EmbeddingBagConfig(name="d", embedding_dim=4, num_embeddings=30, feature_names=["f_d"]),
            tt("t_sgd", 8, 200, "sgd"), tt("t_ada", 4, 64, "adagrad"),
            tt("t_row", 4, 90, "rowwise_adagrad", cache_rows=8, cache_refresh_interval=2)]


def _apply(ebc, torch_only: bool):
    """The TorchRec way: optimizers applied in backward, the dense table and t_sgd together. With
    ``torch_only`` (an unsharded reference, where torch's hooks run) t_row keeps a config optimizer."""
    import torchrec.optim as trec
    apply_in_backward(torch.optim.SGD, list(ebc.dense.parameters()) + list(ebc.tt_tables["t_sgd"].parameters()),
                      {"lr": LR})
    apply_in_backward(torch.optim.Adagrad, ebc.tt_tables["t_ada"].parameters(), {"lr": LR, "eps": 1e-8})
    if not torch_only:
        apply_in_backward(trec.RowWiseAdagrad, ebc.tt_tables["t_row"].parameters(), {"lr": LR, "eps": 1e-8})


def _in_backward_training(rank, world):
    import torch.distributed as dist
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.optim.optimizers import in_backward_optimizer_filter
    from torchrec_tt.distributed import get_sharders_and_planner
    from torchrec_tt.modules.tt_embedding_bag_collection import TTEmbeddingBagCollection

    def collection(in_backward):
        torch.manual_seed(0)
        return TTEmbeddingBagCollection(_tables(in_backward))

    configured, applied = collection(False), collection(True)
    # the reference: unsharded, torch's in-backward hooks (t_row with its fused optimizer, cached)
    reference = copy.deepcopy(applied)
    reference.tt_tables["t_row"] = copy.deepcopy(configured.tt_tables["t_row"])
    start = copy.deepcopy(configured).state_dict()
    _apply(applied, torch_only=False)
    _apply(reference, torch_only=True)
    fused_params = {"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": LR}
    sharders, planner = get_sharders_and_planner(applied, world, BATCH, fused_params=fused_params)
    plan = planner.collective_plan(applied, sharders, dist.GroupMember.WORLD)
    dmps = {}
    for name, model in [("applied", applied), ("configured", configured)]:
        dmps[name] = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan, sharders=sharders)
        dmps[name].load_state_dict(start)  # same keys: the applied tables gained their optimizer state
    assert not [n for n, _ in in_backward_optimizer_filter(dmps["applied"].named_parameters())]
    lrs = {g["optimizer"]: g["lr"] for g in dmps["applied"].fused_optimizer.param_groups if "optimizer" in g}
    assert lrs == {"sgd": LR, "adagrad": LR, "rowwise_adagrad": LR}

    tables = _tables(False)
    losses = {name: [] for name in ["applied", "configured", "reference"]}
    for step in range(STEPS):
        kjts = [random_kjt(tables, BATCH, 100 * step + r, 0, 4) for r in range(world)]
        for name, dmp in dmps.items():
            loss = loss_fn(dmp(kjts[rank]))
            loss.backward()
            t = loss.detach().clone()
            dist.all_reduce(t)
            losses[name].append(float(t) / world)
        loss = loss_fn(reference(concat(kjts)))
        loss.backward()  # torch's hooks step the in-backward optimizers, the fused t_row updates itself
        losses["reference"].append(float(loss))
    # the same optimizers, one way or the other: bit for bit
    assert losses["applied"] == losses["configured"]
    states = [{k: v for k, v in dmps[n].fused_optimizer.state_dict()["state"].items()} for n in dmps]
    assert states[0].keys() == states[1].keys() and len(states[0]) > 0
    kjt = random_kjt(tables, BATCH, 999 + rank, 0, 4)
    assert torch.equal(dmps["applied"](kjt).values(), dmps["configured"](kjt).values())
    # and what torch's own in-backward optimizers do to the unsharded model on the global batch
    torch.testing.assert_close(torch.tensor(losses["applied"]), torch.tensor(losses["reference"]),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dmps["applied"](kjt).values(), reference(kjt).values(), rtol=1e-4, atol=1e-5)
    return losses["applied"], str(plan)


def test_in_backward_optimizers_train_tt_tables_like_their_config_and_torch():
    results = run_ranks(_in_backward_training)
    assert results[0][0] == results[1][0]
    assert "data_parallel" not in results[0][1]


# ---- DMP without the TT sharder: DDP replicates the whole collection ------------------------------

def _without_tt_sharder(rank, world, optimizer):
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec_tt.modules.tt_embedding_bag_collection import TTEmbeddingBagCollection
    torch.manual_seed(0)
    tables = [tt_config(optimizer=optimizer, **({"learning_rate": LR} if optimizer else {}))]
    dmp = DistributedModelParallel(TTEmbeddingBagCollection(tables), device=torch.device("cpu"))  # default sharders
    opt = torch.optim.SGD(dmp.parameters(), lr=LR)
    before = [p.detach().clone() for p in dmp.parameters()]
    try:
        for step in range(2):
            opt.zero_grad()
            loss_fn(dmp(random_kjt(tables, BATCH, 10 * step + rank, 1, 4))).backward()
            opt.step()
    except RuntimeError as e:
        return str(e)
    cores = torch.cat([p.detach().flatten() for p in dmp.parameters()])
    gathered = [torch.empty_like(cores) for _ in range(world)]
    torch.distributed.all_gather(gathered, cores)
    assert not torch.equal(cores, torch.cat([b.flatten() for b in before]))  # trained
    return all(torch.equal(g, gathered[0]) for g in gathered)


def test_ddp_replicas_of_a_collection_average_dense_core_gradients():
    assert run_ranks(_without_tt_sharder, None) == [True, True]


def test_ddp_refuses_to_step_a_fused_tt_table_naming_the_table_and_the_fix():
    for message in run_ranks(_without_tt_sharder, "sgd"):
        assert message.startswith("table 't': its fused sgd runs inside the TT kernel's backward")
        assert "pass the sharders and plan of torchrec_tt.distributed.get_sharders_and_planner" in message
