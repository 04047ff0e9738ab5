"""TorchRec's ``apply_optimizer_in_backward`` for TT tables.

TorchRec users give embedding tables their optimizer with
``apply_optimizer_in_backward(RowWiseAdagrad, ebc.parameters(), {"lr": 0.02})`` before
``DistributedModelParallel``; TorchRec's EBC sharder reads the class and kwargs off each weight and
builds FBGEMM's fused optimizer. The TT sharder, the planner and its estimators read a TT table's cores
the same way (``resolve_tt_config``): SGD, Adagrad and row-wise Adagrad, as torch's or TorchRec's
classes, become the TT kernels' fused optimizers. Anything the kernels cannot do exactly (another class,
momentum, weight decay, ...) is refused by name rather than approximated. ``lr`` / ``eps`` left out take
FBGEMM's defaults (0.01, 1e-8), as TorchRec's dense tables under the same call do. Unsharded, the cores
keep torch's own in-backward hooks (dense core gradients), which the fused kernels reproduce.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import torch

if torch.distributed.is_available():
    # DDP looks up torch.distributed.optim once it sees an in-backward marker on a parameter
    import torch.distributed.optim  # noqa: F401

if TYPE_CHECKING:  # the modules import this file (mark_fused_in_backward)
    from .config import TTEmbeddingBagConfig
    from .modules.tt_embedding_bag import FusedOptimizerConfig, TTEmbeddingBag

__all__ = ["FusedInBackward", "in_backward_optimizer", "mark_fused_in_backward", "resolve_tt_config"]


class FusedInBackward:
    """TorchRec's marker on a weight that its kernel updates in backward (``_in_backward_optimizers``):
    ``in_backward_optimizer_filter`` keeps such weights out of dense optimizers.

    Others take the marker for a torch optimizer to step after the gradient is ready: DDP does, when
    ``DistributedModelParallel`` is given no TT sharder and wraps the whole collection (each replica
    would then update from its own gradient), and so does ``apply_optimizer_in_backward`` given on top
    of a config's optimizer. ``step`` refuses both, naming the table and the fix.
    """

    def __init__(self, table: str, optimizer: "FusedOptimizerConfig") -> None:
        self.table, self.optimizer = table, optimizer

    def step(self, closure: Any = None) -> None:
        raise RuntimeError(
            f"table '{self.table}': its fused {self.optimizer.name} runs inside the TT kernel's backward, but "
            "something stepped it as a torch optimizer. Under DistributedDataParallel (DistributedModelParallel "
            "without the TT sharder) every replica would update from its own gradient: pass the sharders and "
            "plan of torchrec_tt.distributed.get_sharders_and_planner. With apply_optimizer_in_backward on "
            "top of the config's optimizer: give the optimizer one way")

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def __repr__(self) -> str:
        return f"FusedInBackward(table={self.table!r}, optimizer={self.optimizer!r})"


def mark_fused_in_backward(param: torch.Tensor, table: str, optimizer: "FusedOptimizerConfig") -> None:
    """Mark ``param`` as updated by ``table``'s fused ``optimizer`` (see ``FusedInBackward``)."""
    param._in_backward_optimizers = [FusedInBackward(table, optimizer)]  # type: ignore[attr-defined]
    # torch's apply_optimizer_in_backward appends to all three once the first exists
    param._optimizer_classes = []  # type: ignore[attr-defined]
    param._optimizer_kwargs = []  # type: ignore[attr-defined]

# kwargs the fused kernels implement ("lr" and FBGEMM's "learning_rate" alike) ...
_RATE_KEYS = ("lr", "learning_rate")
# ... and kwargs accepted only at these values (the torch defaults that make the update exact)
_NEUTRAL = {"momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False, "maximize": False,
            "lr_decay": 0.0, "initial_accumulator_value": 0.0, "foreach": None, "differentiable": False,
            "fused": None}


def _class_to_fused() -> Dict[type, str]:
    import torchrec.optim as trec_optim
    return {torch.optim.SGD: "sgd", trec_optim.SGD: "sgd",
            torch.optim.Adagrad: "adagrad", trec_optim.Adagrad: "adagrad",
            trec_optim.RowWiseAdagrad: "rowwise_adagrad"}


def _attached(core: torch.Tensor) -> Tuple[List[type], List[Dict[str, Any]]]:
    return list(getattr(core, "_optimizer_classes", None) or []), list(getattr(core, "_optimizer_kwargs", None) or [])


def in_backward_optimizer(name: str, table: TTEmbeddingBag) -> Optional[FusedOptimizerConfig]:
    """The fused optimizer that ``apply_optimizer_in_backward`` put on ``table``'s cores, or ``None``.

    All cores must carry the same single optimizer; errors name the table ``name``.
    """
    attached = [_attached(c) for c in table.core_list()]
    marked = [bool(classes) for classes, _ in attached]
    if not any(marked):
        return None
    if not all(marked):
        raise ValueError(f"table '{name}': apply_optimizer_in_backward covers {sum(marked)} of its {len(marked)} "
                         f"TT cores; apply it to all of them (e.g. the collection's parameters()) or to none")
    classes, kwargs = attached[0]
    if any(c != classes or k != kwargs for c, k in attached[1:]):
        raise ValueError(f"table '{name}': its TT cores carry different in-backward optimizers; "
                         "a table takes one optimizer")
    if len(classes) != 1:
        raise ValueError(f"table '{name}': {len(classes)} optimizers applied in backward "
                         f"({[c.__name__ for c in classes]}); a table takes one")
    from .modules.tt_embedding_bag import FusedOptimizerConfig
    cls, kw = classes[0], dict(kwargs[0]) if kwargs else {}
    # an explicit FBGEMM "optimizer" kwarg wins over the class, as in TorchRec's sharder (which also writes
    # it into the kwargs dict that all parameters of one apply_optimizer_in_backward call share)
    explicit = kw.pop("optimizer", None)
    fused = explicit if explicit is not None else _class_to_fused().get(cls)
    if fused is None:
        raise ValueError(f"table '{name}': apply_optimizer_in_backward({cls.__module__}.{cls.__name__}) has no TT "
                         "kernel; TT tables fuse SGD, Adagrad and RowWiseAdagrad (torch.optim or torchrec.optim). "
                         "For another optimizer leave the TT cores out of apply_optimizer_in_backward and give "
                         "them to a dense optimizer")
    rates = [k for k in _RATE_KEYS if k in kw]
    if len(rates) > 1:
        raise ValueError(f"table '{name}': give the learning rate once, as 'lr' or 'learning_rate', got both")
    args: Dict[str, Any] = {}
    if rates:
        args["learning_rate"] = float(kw.pop(rates[0]))
    if "eps" in kw:  # SGD ignores it, as FBGEMM's does
        args["eps"] = float(kw.pop("eps"))
    unsupported = {k: v for k, v in kw.items() if k not in _NEUTRAL or v != _NEUTRAL[k]}
    if unsupported:
        raise ValueError(f"table '{name}': the TT kernels' fused {getattr(fused, 'name', fused)} cannot apply "
                         f"{unsupported} (from apply_optimizer_in_backward({cls.__name__}, ...)); they take lr "
                         "and eps only")
    try:
        return FusedOptimizerConfig(fused, **args)
    except ValueError as e:  # an FBGEMM optimizer without a TT kernel, a negative rate, ...
        raise ValueError(f"table '{name}' (apply_optimizer_in_backward({cls.__name__}, ...)): {e}") from None


def resolve_tt_config(config: TTEmbeddingBagConfig, table: TTEmbeddingBag) -> TTEmbeddingBagConfig:
    """``config`` with the fused optimizer it trains with: its own, or the one applied in backward to
    ``table``'s cores (the same config object when there is none). Both at once is an error."""
    applied = in_backward_optimizer(config.name, table)
    if applied is None:
        return config
    if config.optimizer is not None:
        raise ValueError(f"table '{config.name}': optimizer={config.optimizer!r} in its config and "
                         f"apply_optimizer_in_backward on its cores; give the optimizer one way")
    return dataclasses.replace(config, optimizer=applied, learning_rate=None, eps=None)
