"""TorchRec sharding for ``TTEmbeddingBagCollection``: sharder, sharded module, planning helpers."""
from .mean_pooling_guard import MeanPoolingCheckedEBCSharder
from .planning import get_sharders_and_planner, shard_model, tt_constraints
from .tt_embedding_bag_collection import (
    TT_COMPUTE_KERNEL,
    TT_SHARDING_TYPES,
    ShardedTTEmbeddingBagCollection,
    TTEmbeddingBagCollectionSharder,
)

__all__ = ["MeanPoolingCheckedEBCSharder", "TT_COMPUTE_KERNEL", "TT_SHARDING_TYPES", "ShardedTTEmbeddingBagCollection",
           "TTEmbeddingBagCollectionSharder", "get_sharders_and_planner", "shard_model", "tt_constraints"]
