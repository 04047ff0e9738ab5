"""Tables and model for the DLRM example: which tables are TT, the DLRM itself, and its byte counts."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType

from torchrec_tt.config import TTEmbeddingBagConfig
from torchrec_tt.modules.tt_embedding_bag_collection import TTEmbeddingBagCollection

from examples.dlrm.data import CAT_FEATURES, NUM_DENSE


def make_tables(cardinalities: Sequence[int], dim: int, tt_tables: int, tt_rank: int,
                tt_optimizer: Optional[str], tt_lr: float, tt_init: str = "sampled_gaussian",
                cache_fraction: Optional[float] = None, cache_refresh_interval: int = 1000,
                tt_data_type: DataType = DataType.FP32) -> List[EmbeddingBagConfig]:
    """One table per categorical feature; the ``tt_tables`` largest become ``TTEmbeddingBagConfig``
    with cores of ``tt_data_type`` (and a hot-row cache of ``cache_fraction`` of their rows when given)."""
    order = sorted(range(len(cardinalities)), key=lambda i: -cardinalities[i])
    tt = set(order[:tt_tables])
    tables: List[EmbeddingBagConfig] = []
    for i, n in enumerate(cardinalities):
        common = dict(name=f"t_{CAT_FEATURES[i]}", embedding_dim=dim, num_embeddings=n,
                      feature_names=[CAT_FEATURES[i]])
        if i in tt:
            tables.append(TTEmbeddingBagConfig(
                **common, tt_ranks=tt_rank, weights_init=tt_init, optimizer=tt_optimizer,
                learning_rate=tt_lr if tt_optimizer else None, cache_fraction=cache_fraction or None,
                cache_refresh_interval=cache_refresh_interval, data_type=tt_data_type))
        else:
            tables.append(EmbeddingBagConfig(**common))
    return tables


class DLRMTrainStep(DLRM):
    """DLRM whose forward takes a ``Batch`` and returns ``(loss, (loss, logits, labels))``: the shape
    TorchRec's train pipelines call (as ``torchrec.models.dlrm.DLRMTrain``), with DLRM's own parameter
    names, so its checkpoints load into a plain ``DLRM`` for export."""

    def forward(self, batch) -> Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        logits = super().forward(batch.dense, batch.sparse).squeeze(-1)
        loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
        return loss, (loss.detach(), logits.detach(), batch.labels)


def make_dlrm(tables: List[EmbeddingBagConfig], dense_arch: Sequence[int], over_arch: Sequence[int],
              device: torch.device = torch.device("meta"), train_step: bool = False) -> DLRM:
    """TorchRec's DLRM over a ``TTEmbeddingBagCollection`` (a drop-in for its EmbeddingBagCollection);
    ``train_step``: a ``DLRMTrainStep``.

    Embedding tables are created on ``device`` (``meta`` by default: DMP materialises them after
    sharding, so no rank ever allocates a full table it does not own); MLPs live on the CPU first.
    """
    ebc = TTEmbeddingBagCollection(tables, device=device)
    dim = tables[0].embedding_dim
    return (DLRMTrainStep if train_step else DLRM)(
        embedding_bag_collection=ebc, dense_in_features=NUM_DENSE, dense_arch_layer_sizes=list(dense_arch) + [dim],
        over_arch_layer_sizes=list(over_arch) + [1], dense_device=torch.device("cpu"))


def model_record(tables: Sequence[EmbeddingBagConfig], dense_arch: Sequence[int], over_arch: Sequence[int]
                 ) -> Dict[str, Any]:
    """What rebuilds the model outside training (JSON; written next to each checkpoint): the tables as
    trained (after ``--auto-compress`` too) and the MLP sizes. Inverse: ``model_from_record``."""
    base = {f.name for f in dataclasses.fields(EmbeddingBagConfig)}
    records = []
    for t in tables:
        r: Dict[str, Any] = {"name": t.name, "num_embeddings": t.num_embeddings, "embedding_dim": t.embedding_dim,
                             "feature_names": list(t.feature_names), "pooling": t.pooling.name,
                             "data_type": t.data_type.name}
        if isinstance(t, TTEmbeddingBagConfig):
            r["tt"] = {f.name: getattr(t, f.name) for f in dataclasses.fields(t) if f.name not in base}
            if dataclasses.is_dataclass(r["tt"]["optimizer"]):  # a FusedOptimizerConfig: rebuilding for
                r["tt"]["optimizer"] = r["tt"]["optimizer"].name  # inference needs only its name
        records.append(r)
    return {"tables": records, "dense_arch": list(dense_arch), "over_arch": list(over_arch)}


def model_from_record(record: Dict[str, Any], device: torch.device = torch.device("cpu")) -> DLRM:
    """The DLRM described by ``model_record``, its tables on ``device`` (initialised; load weights next)."""
    tables: List[EmbeddingBagConfig] = []
    for r in record["tables"]:
        common = dict(name=r["name"], num_embeddings=r["num_embeddings"], embedding_dim=r["embedding_dim"],
                      feature_names=r["feature_names"], pooling=PoolingType[r["pooling"]],
                      data_type=DataType[r.get("data_type", "FP32")])  # records before 2026-11 lack it
        tables.append(TTEmbeddingBagConfig(**common, **r["tt"]) if "tt" in r else EmbeddingBagConfig(**common))
    return make_dlrm(tables, record["dense_arch"], record["over_arch"], device=device)


def size_report(model: DLRM) -> Dict[str, float]:
    """Bytes of the embedding tables as fp32 dense tables vs as built (TT cores and cached rows in their
    own dtype: fp16 / bf16 cores count 2 bytes), and of the whole model.

    Optimizer state is excluded on both sides (row-wise Adagrad adds N floats per dense table).
    """
    ebc: TTEmbeddingBagCollection = model.sparse_arch.embedding_bag_collection
    dense_all = sum(t.num_embeddings * t.embedding_dim * 4 for t in ebc.embedding_bag_configs())
    tt_dense = sum(t.num_embeddings * t.embedding_dim * 4 for t in ebc.tt_configs())
    tt_cache = sum(m.cache.weight.numel() * m.cache.weight.element_size()
                   for m in ebc.tt_tables.values() if m.cache is not None)
    tt_ours = tt_cache + sum(m.tt_bytes(include_optimizer_state=False) for m in ebc.tt_tables.values())
    mlp = sum(p.numel() * 4 for n, p in model.named_parameters() if "embedding_bag_collection" not in n)
    ours = dense_all - tt_dense + tt_ours
    return {"emb_bytes_dense": dense_all, "emb_bytes_ours": ours, "tt_bytes_dense": tt_dense,
            "tt_bytes_ours": tt_ours, "tt_cache_bytes": tt_cache, "mlp_bytes": mlp,
            "tt_compression": tt_dense / tt_ours if tt_ours else 1.0,
            "emb_compression": dense_all / ours, "model_compression": (dense_all + mlp) / (ours + mlp),
            "tt_tables": len(ebc.tt_configs())}


def describe_tables(model: DLRM) -> str:
    ebc: TTEmbeddingBagCollection = model.sparse_arch.embedding_bag_collection
    lines = []
    for t in ebc.embedding_bag_configs():
        if t.name in ebc.tt_tables:
            m = ebc.tt_tables[t.name]
            lines.append(f"  {t.name:8s} {t.num_embeddings:>10,} x {t.embedding_dim}  TT ranks {m.ranks[1:-1]} "
                         f"{t.data_type.name} p={m.p_shapes} q={m.q_shapes} init={m.weights_init} opt="
                         f"{m.optimizer.name if m.optimizer else 'dense-grad'}  {m.compression_ratio():,.0f}x"
                         + (f"  cache {m.cache.rows:,} rows" if m.cache is not None else ""))
    dense = [t for t in ebc.embedding_bag_configs() if t.name not in ebc.tt_tables]
    if dense:
        lines.append(f"  {len(dense)} dense tables, {sum(t.num_embeddings for t in dense):,} rows in all")
    return "\n".join(lines)


def human_bytes(n: float) -> str:
    for unit in ["B", "KiB", "MiB", "GiB"]:
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)

