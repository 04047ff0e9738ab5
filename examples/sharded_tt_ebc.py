"""Shard a mixed dense + TT embedding collection with TorchRec, train a few steps, checkpoint.

    torchrun --nproc_per_node 2 examples/sharded_tt_ebc.py [--steps 5] [--ckpt /tmp/tt_ckpt]

CPU / gloo. Dense tables go through TorchRec's own EBC sharding; TT tables are data_parallel or
table_wise (whichever the planner picks, within the constraints below).
"""
import argparse

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed.model_parallel import DistributedModelParallel
from torch.distributed.optim import _apply_optimizer_in_backward as apply_optimizer_in_backward
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from torchrec_tt.config import TTEmbeddingBagConfig
from torchrec_tt.distributed import get_sharders_and_planner
from torchrec_tt.modules.tt_embedding_bag_collection import TTEmbeddingBagCollection


def random_batch(tables, batch_size, gen):
    feats = [(f, t.num_embeddings) for t in tables for f in t.feature_names]
    lengths = torch.randint(1, 4, (len(feats) * batch_size,), generator=gen)
    values = torch.cat([torch.randint(0, n, (int(lengths[i * batch_size:(i + 1) * batch_size].sum()),), generator=gen)
                        for i, (_, n) in enumerate(feats)])
    return KeyedJaggedTensor.from_lengths_sync(keys=[f for f, _ in feats], values=values, lengths=lengths)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--ckpt", default="/tmp/tt_ebc_ckpt")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)

    tables = [
        EmbeddingBagConfig(name="country", embedding_dim=16, num_embeddings=200, feature_names=["country"]),
        EmbeddingBagConfig(name="category", embedding_dim=16, num_embeddings=5_000, feature_names=["category"]),
        TTEmbeddingBagConfig(name="user", embedding_dim=16, num_embeddings=1_000_000, feature_names=["user"],
                             tt_ranks=16),  # dense core gradients: data_parallel or table_wise
        TTEmbeddingBagConfig(name="item", embedding_dim=16, num_embeddings=500_000, feature_names=["item"],
                             tt_ranks=16, optimizer="rowwise_adagrad", learning_rate=0.05),  # fused: table_wise
        TTEmbeddingBagConfig(name="query", embedding_dim=16, num_embeddings=2_000_000, feature_names=["query"],
                             tt_ranks=16),  # fused too, given the TorchRec way below
    ]
    model = TTEmbeddingBagCollection(tables, device=torch.device("meta"))  # nothing allocated before sharding
    # TorchRec's way to give tables a fused optimizer works on TT cores as on dense weights
    apply_optimizer_in_backward(RowWiseAdagrad, model.tt_tables["query"].parameters(), {"lr": 0.05})

    sharders, planner = get_sharders_and_planner(
        model, world, args.batch_size,
        fused_params={"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.05})
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    if rank == 0:
        print(plan)
    dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan, sharders=sharders)

    # fused tables (dense TBE and TT) update in backward; the rest (e.g. a table-wise "user" table
    # with dense core gradients) takes a regular optimizer. A rank may hold no such parameter.
    dense_params = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    optimizers = [dmp.fused_optimizer]
    if dense_params:
        optimizers.append(KeyedOptimizerWrapper(dense_params, lambda ps: torch.optim.Adagrad(ps, lr=0.05)))
    opt = CombinedOptimizer(optimizers)
    gen = torch.Generator().manual_seed(rank)
    target = torch.randn(80)
    for step in range(args.steps):
        kt = dmp(random_batch(tables, args.batch_size, gen))
        loss = ((kt.values() - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0:
            print(f"step {step}: loss {loss.item():.4f}")

    dcp.save({"model": dmp.state_dict(),
              "optim": {"state": {k: v for k, v in dmp.fused_optimizer.state_dict()["state"].items() if v}}},
             checkpoint_id=args.ckpt)
    if rank == 0:
        print(f"checkpoint written to {args.ckpt}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
