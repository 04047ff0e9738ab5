"""Tensor-Train compressed embedding tables for TorchRec."""
import importlib

from . import ops  # noqa: F401  (registers the custom ops)
from .ops import BoundsCheckMode
from .modules.tt_embedding_bag import FusedOptimizerConfig, TTEmbeddingBag

__all__ = ["BoundsCheckMode", "FusedOptimizerConfig", "TTEmbeddingBag", "ops"]

# The TorchRec-facing names, imported on first use: `import torchrec_tt` (the ops and the table) needs
# torch alone, as on GPU images without torchrec / fbgemm-gpu.
_TORCHREC_NAMES = {
    "TTEmbeddingBagConfig": "torchrec_tt.config",
    "TTEmbeddingBagCollection": "torchrec_tt.modules.tt_embedding_bag_collection",
    "get_sharders_and_planner": "torchrec_tt.distributed",
    "shard_model": "torchrec_tt.distributed",
}


def __getattr__(name):
    if name in _TORCHREC_NAMES:
        value = getattr(importlib.import_module(_TORCHREC_NAMES[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'torchrec_tt' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_TORCHREC_NAMES))
