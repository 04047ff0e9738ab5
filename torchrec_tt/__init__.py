"""Tensor-Train compressed embedding tables for TorchRec."""
from . import ops  # noqa: F401  (registers the custom ops)
from .ops import BoundsCheckMode
from .modules.tt_embedding_bag import FusedOptimizerConfig, TTEmbeddingBag

__all__ = ["BoundsCheckMode", "FusedOptimizerConfig", "TTEmbeddingBag", "ops"]
