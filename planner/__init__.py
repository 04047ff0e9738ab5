"""TT-aware planning for TorchRec's sharding planner (installed as ``torchrec_tt.planner``).

- ``estimators``: storage/perf estimators for TT sharding options (``tt_estimators``), ``per_rank_bytes``.
- ``chooser``: ``choose_compression`` picks which tables become TT, and at what rank, so the plan fits.
- ``python -m torchrec_tt.planner``: the chooser from the command line; ``... calibrate`` redoes the
  FLOP-rate calibration (docs/planner.md).
"""
from .estimators import TTPerfEstimator, TTStorageEstimator, TableBytes, per_rank_bytes, tt_estimators
from .chooser import InsufficientMemoryError, choose_compression, make_topology, memory_budget
from .tables import load_tables

__all__ = ["InsufficientMemoryError", "TTPerfEstimator", "TTStorageEstimator", "TableBytes", "choose_compression",
           "load_tables", "make_topology", "memory_budget", "per_rank_bytes", "tt_estimators"]
