"""Plan report with TT tables at their real size (TorchRec's stats table sizes them by the dense proxy)."""
from __future__ import annotations

import logging
from typing import Any, List, Optional, Sequence

from torchrec.distributed.planner.types import ShardingOption, Stats, Topology

from .estimators import _is_tt, _tt_config, per_rank_bytes, tt_geometry, tt_table_bytes

__all__ = ["TTStats", "format_plan"]

logger = logging.getLogger(__name__)


def _mib(n: float) -> str:
    return f"{n / 2**20:,.2f}"


def _placement(o: ShardingOption) -> str:
    ranks = sorted({s.rank for s in o.shards if s.rank is not None})
    if o.sharding_type == "data_parallel":
        return "data_parallel (all ranks)"
    return f"{o.sharding_type}@{','.join(map(str, ranks))}"


def format_plan(options: Sequence[ShardingOption], topology: Topology, budget: Optional[int] = None) -> str:
    """Per table: dense MiB, TT MiB (cores + optimizer state + cache), ranks, ratio, placement;
    then per rank: state, gradients, IO buffers, total (MiB)."""
    head = f"{'table':<24}{'rows':>12}{'dim':>5}{'dense MiB':>12}{'TT MiB':>10}{'ranks':>14}{'ratio':>9}  placement"
    lines = [head, "-" * len(head)]
    for o in sorted(options, key=lambda o: -o.tensor.shape[0] * o.tensor.shape[1]):
        rows, dim = o.tensor.shape[0], o.tensor.shape[1]
        dense = rows * dim * o.tensor.element_size()
        if _is_tt(o):
            config = _tt_config(o)
            _, _, ranks = tt_geometry(config)
            tt = tt_table_bytes(config)
            tt_s, rank_s, ratio = _mib(tt.state), "x".join(map(str, ranks[1:-1])), f"{dense / tt.weights:,.0f}x"
        else:
            tt_s, rank_s, ratio = "-", "dense", "1x"
        lines.append(f"{o.name:<24}{rows:>12,}{dim:>5}{_mib(dense):>12}{tt_s:>10}{rank_s:>14}{ratio:>9}  "
                     f"{_placement(o)}/{o.compute_kernel}")
    lines.append("")
    lines.append(f"{'rank':<6}{'state MiB':>12}{'grads MiB':>12}{'IO MiB':>10}{'total MiB':>12}"
                 + (f"{'budget MiB':>12}" if budget else ""))
    for r, b in enumerate(per_rank_bytes(options, world_size=topology.world_size)):
        lines.append(f"{r:<6}{_mib(b.state):>12}{_mib(b.grads):>12}{_mib(b.io):>10}{_mib(b.total):>12}"
                     + (f"{_mib(budget):>12}" if budget else ""))
    return "\n".join(lines)


class TTStats(Stats):
    """Logs ``format_plan`` (INFO, logger ``torchrec_tt.planner.report``) after each plan."""

    def log(self, sharding_plan: Any, topology: Topology, batch_size: int, storage_reservation: Any,
            num_proposals: int, num_plans: int, run_time: float, best_plan: List[ShardingOption],
            constraints: Any = None, sharders: Any = None, enumerator: Any = None, debug: bool = False,
            debug_stats: Any = None) -> None:
        if best_plan and logger.isEnabledFor(logging.INFO):
            logger.info("TT-aware plan summary (TT tables at real size):\n%s", format_plan(best_plan, topology))
