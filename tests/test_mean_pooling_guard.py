"""The guard against TorchRec 1.8.0 dividing non-row-wise tables by bag lengths when a MEAN table of the
same EBC is row-wise (torchrec_tt.distributed.mean_pooling_guard)."""
import copy
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from dist_utils import random_kjt, run_ranks  # noqa: E402

BATCH = 4


def tables(*poolings):
    from torchrec import EmbeddingBagConfig, PoolingType
    from torchrec_tt.config import TTEmbeddingBagConfig
    dense = [EmbeddingBagConfig(name=f"d{i}", embedding_dim=4, num_embeddings=20 + 10 * i, feature_names=[f"f{i}"],
                                pooling=PoolingType[p]) for i, p in enumerate(poolings)]
    return dense + [TTEmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=100, feature_names=["ft"],
                                         tt_ranks=2)]


def plan_of(**types):
    from torchrec.distributed.types import ParameterSharding
    return {n: ParameterSharding(sharding_type=s, compute_kernel="fused", ranks=[0]) for n, s in types.items()}


@pytest.mark.parametrize("types, poolings, bad", [
    ({"d0": "table_wise", "d1": "row_wise"}, ("SUM", "MEAN"), True),
    ({"d0": "data_parallel", "d1": "table_row_wise"}, ("MEAN", "MEAN"), True),
    ({"d0": "column_wise", "d1": "row_wise"}, ("SUM", "MEAN"), True),
    ({"d0": "row_wise", "d1": "row_wise"}, ("SUM", "MEAN"), False),
    ({"d0": "table_wise", "d1": "row_wise"}, ("MEAN", "SUM"), False),
    ({"d0": "table_wise", "d1": "table_wise"}, ("SUM", "MEAN"), False),
])
def test_plans_torchrec_would_pool_wrongly_are_refused(types, poolings, bad):
    from torchrec_tt.distributed.mean_pooling_guard import check_mean_pooling_plan
    configs = tables(*poolings)[:2]
    if not bad:
        check_mean_pooling_plan(configs, plan_of(**types), "sparse")
        return
    with pytest.raises(ValueError, match=r"EmbeddingBagCollection 'sparse': MEAN-pooled table\(s\) \['d1'\] are "
                                         r"sharded row-wise next to \['d0 \("):
        check_mean_pooling_plan(configs, plan_of(**types), "sparse")


def test_planner_keeps_mean_tables_of_mixed_collections_off_row_wise():
    from torchrec.distributed.planner.types import ParameterConstraints
    from torchrec_tt.distributed import get_sharders_and_planner
    from torchrec_tt.modules.tt_embedding_bag_collection import TTEmbeddingBagCollection
    ebc = TTEmbeddingBagCollection(tables("SUM", "MEAN"), device="meta")
    sharders, planner = get_sharders_and_planner(ebc, world_size=2, batch_size=BATCH)
    options = planner._enumerator.enumerate(ebc, sharders)
    types = {n: {o.sharding_type for o in options if o.name == n} for n in ["d0", "d1"]}
    assert "row_wise" in types["d0"] and types["d1"] and "row_wise" not in types["d1"]
    # a collection whose only dense table is MEAN, or a user's explicit choice, keeps row-wise
    alone = TTEmbeddingBagCollection(tables("MEAN"), device="meta")
    sharders, planner = get_sharders_and_planner(alone, world_size=2, batch_size=BATCH)
    assert "row_wise" in {o.sharding_type for o in planner._enumerator.enumerate(alone, sharders) if o.name == "d0"}
    sharders, planner = get_sharders_and_planner(
        ebc, world_size=2, batch_size=BATCH, constraints={"d1": ParameterConstraints(sharding_types=["row_wise"])})
    assert {o.sharding_type for o in planner._enumerator.enumerate(ebc, sharders) if o.name == "d1"} == {"row_wise"}


def _shard(rank, world, types, poolings, stock):
    import torch.distributed as dist
    from torchrec import EmbeddingBagCollection
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner.types import ParameterConstraints
    from torchrec_tt.distributed import get_sharders_and_planner
    from torchrec_tt.modules.tt_embedding_bag_collection import TTEmbeddingBagCollection
    torch.manual_seed(0)
    configs = tables(*poolings)
    if stock:
        configs = configs[:-1]
        model = torch.nn.Module()
        model.sparse = EmbeddingBagCollection(configs)
    else:
        model = TTEmbeddingBagCollection(configs)
    ref = copy.deepcopy(model)
    cons = {n: ParameterConstraints(sharding_types=[s]) for n, s in types.items()}
    sharders, planner = get_sharders_and_planner(model, world, BATCH, constraints=cons)
    if stock:  # TorchRec lists row_wise for CUDA only; its CPU path works (tests/test_distributed.py)
        types = sharders[0].dense_sharding_types("cpu")
        sharders[1].sharding_types = lambda compute_device_type: types
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    try:
        dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan, sharders=sharders)
    except ValueError as e:
        return str(e)
    dmp.load_state_dict(ref.state_dict())
    kjt = random_kjt(configs, BATCH, rank, 1, 5)
    run = (lambda m: m.sparse(kjt)) if stock else (lambda m: m(kjt))
    got, want = run(dmp.module if stock else dmp).to_dict(), run(ref).to_dict()
    return max(float((got[k] - want[k]).abs().max()) for k in want)


@pytest.mark.parametrize("stock", [False, True], ids=["tt_collection", "stock_ebc"])
def test_sharding_refuses_the_wrong_plan_and_all_row_wise_is_exact(stock):
    bad = run_ranks(_shard, {"d0": "table_wise", "d1": "row_wise"}, ("SUM", "MEAN"), stock)
    fqn = "sparse" if stock else "dense"
    assert all(m.startswith(f"EmbeddingBagCollection '{fqn}': MEAN-pooled table(s) ['d1']") for m in bad)
    # TorchRec's divisor carries a 1e-6 guard, hence not bitwise
    assert all(d < 1e-5 for d in run_ranks(_shard, {"d0": "row_wise", "d1": "row_wise"}, ("SUM", "MEAN"), stock))
