"""Table lists in YAML (``kaggle.yaml``, ``terabyte.yaml`` ship with the package) -> ``EmbeddingBagConfig`` s.

Format: top-level defaults ``embedding_dim`` and ``pooling_factor``, then ``tables:`` entries with
``name``, ``num_embeddings`` and optionally ``features`` (default ``[name]``), ``embedding_dim``,
``pooling_factor``. Pooling factors go to the planner as ``ParameterConstraints`` (``load_constraints``).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

import yaml
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.modules.embedding_configs import EmbeddingBagConfig

__all__ = ["BUNDLED", "load_tables", "load_constraints", "read_spec"]

_HERE = os.path.dirname(os.path.abspath(__file__))
BUNDLED = {"kaggle": os.path.join(_HERE, "kaggle.yaml"), "terabyte": os.path.join(_HERE, "terabyte.yaml")}


def read_spec(path_or_name: str) -> Dict[str, Any]:
    """The parsed YAML (``"kaggle"`` / ``"terabyte"`` name the bundled files)."""
    path = BUNDLED.get(path_or_name, path_or_name)
    with open(path) as f:
        spec = yaml.safe_load(f)
    if not isinstance(spec, dict) or not isinstance(spec.get("tables"), list) or not spec["tables"]:
        raise ValueError(f"{path}: expected a mapping with a non-empty 'tables' list")
    return spec


def load_tables(path_or_name: str, embedding_dim: Optional[int] = None) -> List[EmbeddingBagConfig]:
    """Dense configs for every table; ``embedding_dim`` overrides the file's dims."""
    spec = read_spec(path_or_name)
    out = []
    for i, t in enumerate(spec["tables"]):
        if "name" not in t or "num_embeddings" not in t:
            raise ValueError(f"{path_or_name}: table #{i} needs 'name' and 'num_embeddings'")
        dim = embedding_dim or t.get("embedding_dim") or spec.get("embedding_dim")
        if not dim:
            raise ValueError(f"{path_or_name}: table '{t['name']}' has no embedding_dim (set it or a default)")
        out.append(EmbeddingBagConfig(name=str(t["name"]), num_embeddings=int(t["num_embeddings"]),
                                      embedding_dim=int(dim), feature_names=list(t.get("features", [t["name"]]))))
    return out


def load_constraints(path_or_name: str) -> Dict[str, ParameterConstraints]:
    """Per-table pooling factors from the file, as planner constraints."""
    spec = read_spec(path_or_name)
    default = float(spec.get("pooling_factor", 1.0))
    return {str(t["name"]): ParameterConstraints(
        pooling_factors=[float(t.get("pooling_factor", default))] * len(t.get("features", [t["name"]])))
        for t in spec["tables"]}
