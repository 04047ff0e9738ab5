r"""Initialisation of TT cores so that rebuilt rows look like a dense table's init.

Target
------
TorchRec initialises a dense ``[N, D]`` table with ``U(-1/sqrt(N), 1/sqrt(N))``:
mean 0 and standard deviation ``1/sqrt(3N)``.  A TT table should start from
the same row statistics so that optimiser settings tuned for dense tables
carry over.

Derivation (any ``d >= 1`` and any ranks)
-----------------------------------------
An element of row ``i`` is

.. math::

    W[i, j] = \sum_{a_1..a_{d-1}} G_1[i_1, 1, j_1, a_1] G_2[i_2, a_1, j_2, a_2]
              \cdots G_d[i_d, a_{d-1}, j_d, 1],

a sum over ``R = prod_{k=1}^{d-1} r_k`` rank paths of products of ``d``
entries, one from each core.  With all core entries independent and zero
mean, every product has mean 0 and variance ``prod_k sigma_k^2``, and distinct
paths are uncorrelated (they differ in at least one independent zero-mean
factor).  Hence ``E W = 0`` and ``Var W = R * prod_k sigma_k^2``.  Using the
same ``sigma`` for every core and matching ``Var W = 1/(3N)`` gives

.. math::

    \sigma = \left(\frac{1}{3 N \prod_k r_k}\right)^{1/(2d)}.

Methods
-------
* ``"uniform"``: ``U(-sqrt(3) sigma, sqrt(3) sigma)`` (variance ``sigma^2``).
* ``"normal"``: ``N(0, sigma^2)``.
* ``"sampled_gaussian"`` (TT-Rec paper): a standard normal conditioned on
  ``|x| >= t`` (``t = threshold``), which keeps core entries away from 0 so the
  chained products do not collapse towards 0.  It is drawn without rejection
  loops by inverse CDF: ``u ~ U(0, Phi(-t))``, ``|x| = -ndtri(u)``, with a
  random sign.  Its variance is ``v_t = 1 + t phi(t) / (1 - Phi(t))``, so the
  samples are scaled by ``sigma / sqrt(v_t)`` to get variance ``sigma^2``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

__all__ = [
    "init_cores_",
    "core_std",
    "truncated_normal_variance",
    "sampled_gaussian",
    "uniform",
    "normal",
    "INIT_METHODS",
]


def core_std(num_embeddings: int, ranks: Sequence[int]) -> float:
    """Per-entry std ``sigma`` of each core so rebuilt rows have std ``1/sqrt(3N)``.

    ``ranks`` is the full rank list ``[1, r_1, .., r_{d-1}, 1]`` (d = len - 1).
    Computed in log space so huge tables/ranks do not underflow.
    """
    ranks = [int(r) for r in ranks]
    d = len(ranks) - 1
    if d < 1:
        raise ValueError(f"ranks must be a full rank list of length >= 2, got {ranks!r}")
    if num_embeddings < 1:
        raise ValueError(f"num_embeddings must be >= 1, got {num_embeddings}")
    log_r = sum(math.log(r) for r in ranks[1:-1])
    return math.exp(-(math.log(3.0 * num_embeddings) + log_r) / (2.0 * d))


def truncated_normal_variance(threshold: float) -> float:
    """Variance ``1 + t phi(t)/(1 - Phi(t))`` of a standard normal conditioned on ``|x| >= t``."""
    t = float(threshold)
    if t <= 0.0:
        return 1.0
    phi = math.exp(-0.5 * t * t) / math.sqrt(2.0 * math.pi)
    tail = 0.5 * math.erfc(t / math.sqrt(2.0))
    return 1.0 + t * phi / tail


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    # sample in at least float32 (half/bfloat16 ndtri is imprecise or missing)
    if dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype


def _check_float(tensor: torch.Tensor) -> None:
    if not tensor.is_floating_point():
        raise ValueError(f"TT cores must be floating point, got {tensor.dtype}")


@torch.no_grad()
def uniform(tensor: torch.Tensor, std: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """In place ``U(-sqrt(3) std, sqrt(3) std)`` (zero mean, standard deviation ``std``)."""
    _check_float(tensor)
    a = math.sqrt(3.0) * float(std)
    return tensor.uniform_(-a, a, generator=generator)


@torch.no_grad()
def normal(tensor: torch.Tensor, std: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """In place ``N(0, std^2)``."""
    _check_float(tensor)
    return tensor.normal_(0.0, float(std), generator=generator)


@torch.no_grad()
def sampled_gaussian(
    tensor: torch.Tensor,
    std: float,
    threshold: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """In place: standard normal conditioned on ``|x| >= threshold``, rescaled to std ``std``.

    Vectorised inverse-CDF sampling (no rejection loop).  Every entry satisfies
    ``|x| >= threshold * std / sqrt(truncated_normal_variance(threshold))``.
    """
    _check_float(tensor)
    t = float(threshold)
    if not (t >= 0.0 and math.isfinite(t)):
        raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}")
    wd = _work_dtype(tensor.dtype)
    tail = 0.5 * math.erfc(t / math.sqrt(2.0))  # Phi(-t) = 1 - Phi(t)
    # u in (0, Phi(-t)]: torch.rand is in [0, 1), so 1 - rand is in (0, 1]
    u = torch.rand(tensor.shape, generator=generator, device=tensor.device, dtype=wd)
    u = (1.0 - u) * tail
    mag = torch.special.ndtri(u).neg_().clamp_min_(t)  # |x| >= t (clamp guards rounding)
    sign = torch.randint(0, 2, tensor.shape, generator=generator, device=tensor.device, dtype=wd)
    sign = sign.mul_(2.0).sub_(1.0)
    scale = float(std) / math.sqrt(truncated_normal_variance(t))
    tensor.copy_(mag.mul_(sign).mul_(scale))
    return tensor


INIT_METHODS = ("sampled_gaussian", "uniform", "normal")


@torch.no_grad()
def init_cores_(
    cores: Sequence[torch.Tensor],
    num_embeddings: int,
    method: str = "sampled_gaussian",
    threshold: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> Sequence[torch.Tensor]:
    """Initialise TT cores in place so rebuilt rows have mean 0 and std ``1/sqrt(3N)``.

    ``cores[k]`` has shape ``[p_k, r_{k-1}, q_k, r_k]``; the ranks are read from
    the cores.  ``method`` is one of ``"sampled_gaussian"``, ``"uniform"``,
    ``"normal"``; ``threshold`` only applies to ``"sampled_gaussian"``.
    Returns ``cores``.
    """
    if method not in INIT_METHODS:
        raise ValueError(f"unknown init method {method!r}; valid methods: {', '.join(INIT_METHODS)}")
    core_list = list(cores)
    if len(core_list) < 1:
        raise ValueError("need at least one TT core")
    ranks = [1]
    for k, c in enumerate(core_list):
        if c.dim() != 4:
            raise ValueError(f"core {k} must have shape [p_k, r_(k-1), q_k, r_k], got {tuple(c.shape)}")
        if c.shape[1] != ranks[-1]:
            raise ValueError(
                f"core {k} has left rank {c.shape[1]} but the previous core's right rank is {ranks[-1]}"
            )
        ranks.append(int(c.shape[3]))
    if ranks[-1] != 1:
        raise ValueError(f"last core must have right rank 1, got {ranks[-1]}")
    std = core_std(int(num_embeddings), ranks)
    for c in core_list:
        if method == "sampled_gaussian":
            sampled_gaussian(c, std, threshold=threshold, generator=generator)
        elif method == "uniform":
            uniform(c, std, generator=generator)
        else:
            normal(c, std, generator=generator)
    return cores
