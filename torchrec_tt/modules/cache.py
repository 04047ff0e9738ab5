"""Hot-row cache for ``TTEmbeddingBag``: the most frequent rows kept uncompressed (TT-Rec, issue 5).

Recommendation ids are heavily skewed, so a small set of rows takes most lookups. Cached rows cost
a copy instead of a chain of matrix products and are trained at full capacity. Against the
reference CUDA cache (DESIGN.md §3) this one

* ages its counts (exponential decay per training step) and keeps them in bounded memory: one
  counter per cache slot for the ids it holds (hits: a scatter-add per step), and for the others a
  fixed-size candidate set of ``K`` ids (a few times the cache size) plus a fixed-size buffer of
  the missed ids seen since the last merge; both are merged with ``torch.unique`` and trimmed to
  the top ``K`` when the buffer fills or at a refresh (never one counter per row of the table);
* refreshes automatically every ``refresh_interval`` training steps (and on ``refresh_cache()``);
* writes what evicted rows learned back into the cores (a few L-BFGS steps on
  ``||tt_rows(ids) - cached_rows||^2`` over the touched core slices) and reports the residual;
* never keeps stale slots: the id -> slot map is rebuilt from ``cached_ids`` at every refresh;
* agrees across data-parallel replicas: counts and "trained" flags are combined over the default
  process group at refresh, so every rank admits and evicts the same rows.

Two lookup paths, equal up to float rounding (tested against each other):

* CPU tables with a fused optimizer: the TT kernel itself takes the cache (``tt_cached_embedding_bag_fused``).
  Its per-batch plan looks each distinct id up in the id -> slot map, leaves cached ids out of the
  prefix tree, pools their uncompressed rows, and its backward applies the fused rule to them in the
  same pass as the core slices; the per-lookup counting is one C++ pass too (``tt_cache_count_``).
* everywhere else (CUDA, ``torch.optim`` mode): tensor ops split each batch into cached and
  rebuilt ids (a hash-map gather, cumulative sums for the two sets of offsets), a dense
  ``embedding_bag`` on the cached rows and the TT op on the rest.

Host syncs happen only at refresh.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..in_backward import mark_fused_in_backward
from ..reference import row_digits

__all__ = ["TTRowCache", "resolve_cache_rows"]

_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as int64: Fibonacci hashing multiplier
_COUNT_UNIT = 2.0 ** 32  # fixed-point unit of summed counts (see TTRowCache._sum_by_id)


def resolve_cache_rows(name: str, num_embeddings: int, embedding_dim: int, element_size: int,
                       optimizer: Optional[str], rows: int = 0, fraction: Optional[float] = None,
                       nbytes: Optional[int] = None, refresh_interval: int = 1000, decay: float = 0.999) -> int:
    """Cache size in rows from at most one of ``rows`` / ``fraction`` of N / ``nbytes`` (weights + state);
    also checks the other cache arguments, so bad values fail at construction naming the table."""
    if isinstance(refresh_interval, bool) or int(refresh_interval) != refresh_interval or refresh_interval <= 0:
        raise ValueError(f"table '{name}': cache_refresh_interval must be a positive integer, "
                         f"got {refresh_interval!r}")
    if not (0 < decay <= 1):
        raise ValueError(f"table '{name}': cache_decay must be in (0, 1], got {decay!r}")
    given = [x for x in (rows or None, fraction, nbytes) if x is not None]
    if rows is None or isinstance(rows, bool) or int(rows) != rows or rows < 0:
        raise ValueError(f"table '{name}': cache_rows must be an integer >= 0, got {rows!r}")
    if len(given) > 1:
        raise ValueError(f"table '{name}': give only one of cache_rows, cache_fraction, cache_bytes")
    if fraction is not None:
        if not (0 < fraction <= 1):
            raise ValueError(f"table '{name}': cache_fraction must be in (0, 1], got {fraction!r}")
        rows = max(1, int(fraction * num_embeddings))
    if nbytes is not None:
        per_row = embedding_dim * element_size
        per_row += {"adagrad": embedding_dim * 4, "rowwise_adagrad": 4}.get(optimizer or "", 0)
        if int(nbytes) != nbytes or nbytes < 0:
            raise ValueError(f"table '{name}': cache_bytes must be an integer >= 0, got {nbytes!r}")
        rows = int(nbytes) // per_row
        if rows > num_embeddings:
            raise ValueError(f"table '{name}': cache_bytes={nbytes} holds {rows} rows, more than the "
                             f"table's {num_embeddings} (at most {num_embeddings * per_row} bytes)")
    if rows > num_embeddings:
        raise ValueError(f"table '{name}': cache_rows={rows} exceeds num_embeddings={num_embeddings}")
    return int(rows)


def _chain(slices):
    """Rows from per-row core slices ``[n, r_{k-1}, q_k, r_k]`` (the ``tt_rows`` chain, differentiable)."""
    n = slices[0].shape[0]
    part = slices[0].reshape(n, -1, slices[0].shape[3])
    for g in slices[1:]:
        part = torch.bmm(part, g.reshape(n, g.shape[1], -1)).reshape(n, -1, g.shape[3])
    return part.reshape(n, -1)


class _FusedCacheLookup(torch.autograd.Function):
    """Dense pooled lookup of cache slots whose backward applies the table's fused rule to the rows
    it touched (as the fused TT op does to core slices) and leaves no gradient behind."""

    @staticmethod
    def forward(ctx, weight, slots, offsets, psw, cache, opt):
        ctx.cache, ctx.opt = cache, opt
        ctx.save_for_backward(slots, offsets, psw)
        return F.embedding_bag(slots, weight, offsets, mode="sum", per_sample_weights=psw,
                               include_last_offset=True)

    @staticmethod
    def backward(ctx, grad):
        slots, offsets, psw = ctx.saved_tensors
        bag = torch.repeat_interleave(torch.arange(offsets.numel() - 1, device=grad.device),
                                      offsets[1:] - offsets[:-1], output_size=slots.numel())
        rows = grad.index_select(0, bag)
        if psw is not None:
            rows = rows * psw.unsqueeze(1)
        ctx.cache._apply_fused(ctx.opt, slots, rows)
        return None, None, None, None, None, None


class TTRowCache(nn.Module):
    """Uncompressed copies of a table's hot rows, their optimizer state and the frequency tracker.

    Built by ``TTEmbeddingBag(cache_rows=...)``; not used on its own. Knobs that are not constructor
    arguments of the table can be set here after construction (``candidates``, ``writeback_steps``).
    """

    def __init__(self, table, rows: int, refresh_interval: int = 1000, decay: float = 0.999,
                 candidate_factor: float = 4.0, writeback_steps: int = 50) -> None:
        super().__init__()
        name = table.name
        resolve_cache_rows(name, table.num_embeddings, 1, 1, None, rows, None, None, refresh_interval, decay)
        if not rows > 0:
            raise ValueError(f"table '{name}': a cache needs at least one row, got {rows}")
        if candidate_factor < 1:
            raise ValueError(f"table '{name}': candidate_factor must be >= 1, got {candidate_factor}")
        core = table.cores[0]
        dev, dtype, D = core.device, core.dtype, table.embedding_dim
        self.table_name, self.num_embeddings = name, table.num_embeddings
        self.rows, self.refresh_interval, self.decay = int(rows), int(refresh_interval), float(decay)
        self.writeback_steps = int(writeback_steps)
        self.candidates = max(self.rows, int(candidate_factor * self.rows))
        self.fused = table.optimizer  # FusedOptimizerConfig or None (torch.optim sees `weight`)
        self.weight = nn.Parameter(torch.zeros(self.rows, D, device=dev, dtype=dtype))
        if self.fused is not None:  # TorchRec convention: keep it out of dense optimizers
            mark_fused_in_backward(self.weight, name, self.fused)
            state_dtype = torch.promote_types(dtype, torch.float32)
            if self.fused.name == "adagrad":
                self.register_buffer("optimizer_state", torch.zeros(self.rows, D, device=dev, dtype=state_dtype))
            elif self.fused.name == "rowwise_adagrad":
                self.register_buffer("optimizer_state", torch.zeros(self.rows, device=dev, dtype=state_dtype))
        long = dict(device=dev, dtype=torch.long)
        self.register_buffer("cached_ids", torch.full((self.rows,), -1, **long))  # slot -> id, -1 = empty
        self.register_buffer("trained", torch.zeros(self.rows, device=dev, dtype=torch.bool))
        self.register_buffer("cand_ids", torch.full((self.candidates,), -1, **long))
        self.register_buffer("cand_counts", torch.zeros(self.candidates, device=dev, dtype=torch.float64))
        self.register_buffer("pending_ids", torch.full((self.candidates,), -1, **long))
        self.register_buffer("pending_steps", torch.zeros(self.candidates, **long))
        # decayed count of each cached id, as of the last merge (hits since then weighted up by
        # decay^-(age), so a merge rescales all counts at once)
        self.register_buffer("slot_counts", torch.zeros(self.rows, device=dev, dtype=torch.float64))
        # step counter, fill of pending_ids, step of the last merge (Python mirrors avoid host syncs)
        self.register_buffer("counters", torch.zeros(3, **long))
        # hits, misses, evictions (int64); write-back residual before/after, rows written back (float64)
        self.register_buffer("hit_stats", torch.zeros(3, **long))
        self.register_buffer("writeback_stats", torch.zeros(3, device=dev, dtype=torch.float64))
        # id -> slot hash map (derived, rebuilt at refresh/load): open addressing, 2^b >= 2 x rows
        # entries (id << shift | slot), -1 = empty; _map_probes: the longest probe run it holds
        self._shift, self._log_map_size = max(1, self.rows.bit_length()), (self.rows - 1).bit_length() + 1
        self.register_buffer("_map", torch.full((1 << self._log_map_size,), -1, **long), persistent=False)
        self._map_probes = 1
        self.steps = self.fill = self.merged_at = 0
        # replicas that must agree on the cached rows: the default group when one is initialised;
        # a ProcessGroup, or None where the table lives on one rank only (e.g. table-wise sharding)
        self.process_group = "default"
        # CPU tables with a fused optimizer take the kernel's cached path (False: the tensor-op path,
        # which every device and torch.optim mode use; tests compare the two)
        self.use_kernel = True

    # ---- bookkeeping -------------------------------------------------------------------------------

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.steps, self.fill, self.merged_at = (int(x) for x in self.counters.tolist())
        self._rebuild_map()

    def _save_to_state_dict(self, *args, **kwargs):
        self._set_counters()  # the Python mirrors change every step; the buffer only when saved
        super()._save_to_state_dict(*args, **kwargs)

    def _set_counters(self) -> None:
        self.counters.copy_(torch.tensor([self.steps, self.fill, self.merged_at]))

    def _home(self, ids: torch.Tensor) -> torch.Tensor:
        """Each id's home entry in the map (Fibonacci hashing, as CacheMap::home in csrc/cpu/tt_plan.h)."""
        return ((ids * _GOLDEN) >> (64 - self._log_map_size)) & ((1 << self._log_map_size) - 1)

    def _rebuild_map(self) -> None:
        """Rebuild the id -> slot hash map from ``cached_ids`` (so no slot can go stale).

        Linear probing in ``2^b >= 2 x rows`` entries of 8 bytes (at most half full): a lookup reads
        one short run, nearly always one cache line, and the map is 16-32 B per cached row. Built
        with tensor ops, all unplaced ids probing their next entry at once; an entry, once taken,
        stays taken, so every id's run from its home entry is unbroken, as sequential insertion
        would leave it."""
        size = 1 << self._log_map_size
        slots = torch.nonzero(self.cached_ids >= 0).reshape(-1)
        ids = self.cached_ids.index_select(0, slots)
        entry, home = (ids << self._shift) | slots, self._home(ids)
        table = torch.full((size,), -1, dtype=torch.long, device=ids.device)
        order = torch.arange(ids.numel(), device=ids.device)  # the unplaced ids, by rank
        claim = torch.empty(size, dtype=torch.long, device=ids.device)
        probe = 0
        while order.numel():
            at = (home.index_select(0, order) + probe) & (size - 1)
            free = table.index_select(0, at) < 0
            rank = torch.arange(order.numel(), device=ids.device)
            claim.fill_(order.numel()).scatter_reduce_(0, at[free], rank[free], reduce="amin")  # lowest rank wins
            won = free & (claim.index_select(0, at) == rank)
            table[at[won]] = entry.index_select(0, order[won])
            order, probe = order[~won], probe + 1
        self._map, self._map_probes = table, max(1, probe)

    @torch.no_grad()
    def reset(self) -> None:
        """Drop all cached rows and counts (e.g. after the cores were re-initialised)."""
        self.weight.zero_()
        self.cached_ids.fill_(-1)
        self.trained.zero_()
        self.cand_ids.fill_(-1)
        self.cand_counts.zero_()
        self.slot_counts.zero_()
        if hasattr(self, "optimizer_state"):
            self.optimizer_state.zero_()
        self.steps = self.fill = self.merged_at = 0
        self._set_counters()
        self.reset_stats()
        self._rebuild_map()

    def reset_stats(self) -> None:
        self.hit_stats.zero_()
        self.writeback_stats.zero_()

    def stats(self) -> Dict[str, float]:
        hits, misses, evictions = (int(x) for x in self.hit_stats.tolist())
        before, after, written = self.writeback_stats.tolist()
        return {"hits": hits, "misses": misses, "hit_rate": hits / max(1, hits + misses),
                "evictions": evictions, "rows_written_back": int(written),
                "writeback_residual": after, "writeback_residual_before": before,
                "cached_rows": int((self.cached_ids >= 0).sum()), "capacity": self.rows, "steps": self.steps}

    def slots_of(self, ids: torch.Tensor) -> torch.Tensor:
        """Slot of each id (int64), -1 where the id is not cached."""
        ids = ids.long()
        probes = torch.arange(self._map_probes, device=ids.device)
        at = (self._home(ids).unsqueeze(1) + probes) & (self._map.numel() - 1)
        rows = self._map.index_select(0, at.reshape(-1)).reshape(at.shape)  # each id's longest possible run
        mask = (1 << self._shift) - 1
        raw = torch.where((rows >= 0) & ((rows >> self._shift) == ids.unsqueeze(1)), rows & mask, -1).amax(1)
        return torch.where(raw < self.rows, raw, -1)

    @torch.no_grad()
    def overlay(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` (the cores' dense table) with the cached rows put in: what lookups actually see."""
        live = self.cached_ids >= 0
        out = weight.clone()
        out[self.cached_ids[live]] = self.weight[live].to(out.dtype)
        return out

    # ---- frequency tracking ------------------------------------------------------------------------

    def observe(self, ids: torch.Tensor) -> None:
        """Count ``ids`` (e.g. to warm a read-only cache before ``refresh``); ids outside the table are ignored."""
        self._observe(ids.reshape(-1).long())

    @torch.no_grad()
    def _observe(self, ids: torch.Tensor) -> None:
        """Append ``ids`` for the current step (invalid ids are dropped at the merge). No host sync."""
        ids = ids.reshape(-1)
        if ids.numel() > self.candidates:  # more ids than the buffer (huge batches): in pieces
            for part in ids.split(self.candidates):
                self._observe(part)
            return
        if self.fill + ids.numel() > self.candidates:
            self._merge()
        self.pending_ids[self.fill:self.fill + ids.numel()] = ids
        self.pending_steps[self.fill:self.fill + ids.numel()] = self.steps
        self.fill += ids.numel()

    @torch.no_grad()
    def _count(self, ids: torch.Tensor, where: torch.Tensor) -> None:
        """Per lookup: hit/miss statistics; in training also the counts (``where``: each id's slot,
        -1 rebuilt, -2 dropped). Hits add to their slot's counter, missed ids go to the buffer."""
        hit, miss = where >= 0, where == -1
        self.hit_stats[:2] += torch.stack((hit.sum(), miss.sum()))
        if not self.training:
            return
        # every id adds to a slot (misses add 0 to slot 0): cheaper than compacting the hits first
        weight = self.decay ** (self.merged_at - self.steps)
        self.slot_counts.index_add_(0, where.clamp(min=0), hit.to(torch.float64) * weight)
        self._observe(ids[miss])
        self._end_step()

    def _end_step(self) -> None:
        self.steps += 1
        if self.steps - self.merged_at >= 10_000:  # keep the weights of hits since the merge finite
            self._merge()

    @torch.no_grad()
    def _merge(self) -> None:
        """Fold pending ids into the candidate set with decayed weights; keep the top ``K``."""
        now = self.steps
        scale = self.decay ** (now - self.merged_at)
        self.slot_counts *= scale
        if self.fill == 0:
            self.cand_counts *= scale
            self.merged_at = now
            return
        w_old = self.cand_counts * scale
        ages = now - self.pending_steps[:self.fill]  # in [0, now - merged_at]: a table instead of pow per id
        w_new = (self.decay ** torch.arange(now - self.merged_at + 1, dtype=torch.float64,
                                            device=ages.device)).index_select(0, ages)
        ids = torch.cat([self.cand_ids, self.pending_ids[:self.fill]])
        w = torch.cat([w_old, w_new])
        self._set_candidates(ids, w)
        self.fill, self.merged_at = 0, now

    @staticmethod
    def _sum_by_id(inv: torch.Tensor, w: torch.Tensor, n: int) -> torch.Tensor:
        """Per-id sums of count weights, added in fixed point (units of 2^-32, counts below 2^31):
        integer adds are exact, so the sums do not depend on the order a device adds them in (CUDA's
        float index_add_ is atomic, in no fixed order). Equal counts then tie the same way on every
        device, run and replica, and so do the cache's admission decisions."""
        units = torch.round(w * _COUNT_UNIT).to(torch.int64)
        sums = torch.zeros(n, dtype=torch.int64, device=w.device).index_add_(0, inv, units)
        return sums.to(torch.float64) / _COUNT_UNIT

    @staticmethod
    def _top_counts(counts: torch.Tensor, k: int, prefer: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mask of the ``k`` largest counts, ties going to ``prefer`` (bool) first, then to the lower
        index: the set a stable descending sort by (count, prefer) would put first, found with a
        partial selection instead of sorting every count (the sorts were most of a merge's time)."""
        if counts.numel() <= k:
            return torch.ones_like(counts, dtype=torch.bool)
        threshold = torch.topk(counts, k, sorted=False).values.min()
        keep = counts > threshold
        ties = torch.nonzero(counts == threshold).reshape(-1)
        if prefer is not None:
            ties = ties[torch.sort(prefer[ties].to(torch.int8), descending=True, stable=True).indices]
        keep[ties[:k - int(keep.sum())]] = True
        return keep

    def _set_candidates(self, ids: torch.Tensor, w: torch.Tensor) -> None:
        keep = (ids >= 0) & (ids < self.num_embeddings)
        uniq, inv = torch.unique(ids[keep], return_inverse=True)  # sorted: ties below break by id
        counts = self._sum_by_id(inv, w[keep], uniq.numel())
        top = self._top_counts(counts, self.candidates)  # (the candidates' order does not matter)
        k = int(top.sum())
        self.cand_ids.fill_(-1)
        self.cand_counts.zero_()
        self.cand_ids[:k], self.cand_counts[:k] = uniq[top], counts[top]

    # ---- refresh -----------------------------------------------------------------------------------

    @torch.no_grad()
    def refresh(self, table) -> None:
        """Admit the top-count rows, write evicted trained rows back into the cores, rebuild the map."""
        if not bool(torch.isfinite(self.weight).all()):  # before any state changes (empty slots hold zeros)
            raise FloatingPointError(
                f"table '{table.name}': the hot-row cache holds NaN or infinity in its rows at refresh, so they "
                "cannot be written back into the cores: training diverged (learning rate? an fp16 table's "
                "optimizer eps below fp16's smallest value, such as torch.optim.Adagrad's default 1e-10, "
                "divides by zero)")
        self._merge()
        trained = self.trained.clone()
        group = None if self.process_group == "default" else self.process_group
        replicated = self.process_group is not None and dist.is_available() and dist.is_initialized()
        world = dist.get_world_size(group) if replicated else 1
        if world > 1:  # every replica must choose the same rows: combine counts and trained flags
            ids = [torch.empty_like(self.cand_ids) for _ in range(world)]
            cnt = [torch.empty_like(self.cand_counts) for _ in range(world)]
            dist.all_gather(ids, self.cand_ids.contiguous(), group=group)
            dist.all_gather(cnt, self.cand_counts.contiguous(), group=group)
            self._set_candidates(torch.cat(ids), torch.cat(cnt))
            self.cand_counts /= world  # stored share: the next sum over ranks counts history once
            dist.all_reduce(self.slot_counts, group=group)  # replicas hold the same ids in the same slots
            self.slot_counts /= world
            flags = trained.to(torch.int32)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
            trained = flags.bool()
        # rank candidates and current rows: count desc, then already cached (no churn on ties), then id
        live, cand = self.cached_ids >= 0, self.cand_ids >= 0
        cur = self.cached_ids[live]
        pool = torch.cat([self.cand_ids[cand], cur])
        pool_counts = torch.cat([self.cand_counts[cand], self.slot_counts[live]])
        uniq, inv = torch.unique(pool, return_inverse=True)
        counts = self._sum_by_id(inv, pool_counts, uniq.numel())
        top = self._top_counts(counts, self.rows, prefer=torch.isin(uniq, cur))
        chosen = uniq[top]
        # ids left out go (back) to the candidates with their counts
        self._set_candidates(uniq[~top], counts[~top])

        stay = live & torch.isin(self.cached_ids, chosen)
        evict = live & ~stay
        wb = evict & trained
        if bool(wb.any()):
            self._write_back(table, self.cached_ids[wb], self.weight[wb])
            if world > 1:  # guard against nondeterministic float paths: rank 0's cores win
                for core in table.cores:
                    dist.broadcast(core.data, src=0, group=group)
        self.hit_stats[2] += int(evict.sum())
        new_ids = chosen[~torch.isin(chosen, self.cached_ids[stay])]
        free = torch.nonzero(~stay).reshape(-1)[:new_ids.numel()]  # enough: |new| <= rows - |stay|
        self.cached_ids[~stay] = -1
        self.slot_counts[~stay] = 0
        self.weight[~stay] = 0
        if hasattr(self, "optimizer_state"):
            self.optimizer_state[~stay] = 0  # admitted rows start with fresh optimizer state
        if self.weight.grad is not None:  # torch.optim mode: a reused slot must not inherit a gradient
            self.weight.grad[~stay] = 0
        if new_ids.numel():  # admission after write-back, so new rows see the updated cores
            self.cached_ids[free] = new_ids
            self.slot_counts[free] = counts[torch.searchsorted(uniq, new_ids)]  # uniq is sorted
            self.weight[free] = table.rows(new_ids).to(self.weight.dtype)
        self.trained.copy_(trained & stay)
        self._rebuild_map()

    def _write_back(self, table, ids: torch.Tensor, target: torch.Tensor) -> None:
        """Fit the core slices touched by ``ids`` so that ``tt_rows(ids) ~= target`` (L-BFGS).

        Half cores are fitted in fp32 (L-BFGS's line search overflows fp16; in bf16 it fits 2-3x worse) and
        rounded once at the end; the residual reported is the rounded cores'."""
        cores = table.core_list()
        fit_dtype = torch.promote_types(cores[0].dtype, torch.float32)
        digits = row_digits(ids, table.p_shapes)
        uniq, inv = zip(*(torch.unique(d, return_inverse=True) for d in digits))
        params = [c.detach()[u].to(fit_dtype).requires_grad_(True) for c, u in zip(cores, uniq)]
        target = target.detach().to(fit_dtype)
        norm = target.norm().clamp_min(1e-30)

        def loss_fn(slices=params):  # relative squared error: scale-free tolerances
            return (_chain([p[i] for p, i in zip(slices, inv)]) - target).square().sum() / norm.square()

        with torch.enable_grad():
            before = float(loss_fn().detach().sqrt())
            opt = torch.optim.LBFGS(params, lr=1, max_iter=self.writeback_steps, history_size=10,
                                    tolerance_grad=1e-12, tolerance_change=1e-14, line_search_fn="strong_wolfe")

            def closure():
                opt.zero_grad()
                loss = loss_fn()
                loss.backward()
                return loss

            if self.writeback_steps > 0:
                opt.step(closure)
        fitted = [p.detach().to(c.dtype) for c, p in zip(cores, params)]
        after = float(loss_fn([f.to(fit_dtype) for f in fitted]).sqrt())
        if after <= before:  # never make the cores worse than they were
            for c, u, f in zip(cores, uniq, fitted):
                c.data.index_copy_(0, u, f)
        else:
            after = before
        self.writeback_stats.copy_(torch.tensor([before, after, self.writeback_stats[2].item() + ids.numel()]))

    # ---- lookup ------------------------------------------------------------------------------------

    def _apply_fused(self, opt, slots: torch.Tensor, rows: torch.Tensor) -> None:
        """The table's fused rule on the touched cache rows (same formulas as the TT kernels)."""
        w = self.weight.data
        self.trained.index_fill_(0, slots, True)
        if opt.name == "sgd":  # linear in the gradient: duplicates can be added one by one
            rows = rows.to(w.dtype) * -opt.learning_rate  # scatter_add_ is ~5x faster than index_add_ on CPU
            w.scatter_add_(0, slots.unsqueeze(1).expand(-1, w.shape[1]), rows)
            return
        uniq, inv = torch.unique(slots, return_inverse=True)
        g = torch.zeros(uniq.numel(), rows.shape[1], device=rows.device, dtype=rows.dtype).index_add_(0, inv, rows)
        if opt.name == "adagrad":
            s = self.optimizer_state.index_select(0, uniq) + g.square()
            self.optimizer_state.index_copy_(0, uniq, s)
            w.index_add_(0, uniq, -opt.learning_rate * g / (s.sqrt() + opt.eps))
        else:  # rowwise_adagrad: one accumulator per row, fed the mean squared gradient
            s = self.optimizer_state.index_select(0, uniq) + g.square().mean(1)
            self.optimizer_state.index_copy_(0, uniq, s)
            w.index_add_(0, uniq, g * (-opt.learning_rate / (s.sqrt() + opt.eps)).unsqueeze(1))

    def _kernel_lookup(self, table, ids, offsets, psw, include_last_offset) -> torch.Tensor:
        """The CPU kernel's cached path (fused optimizers): one plan per call; cached ids read their
        row instead of the TT chain and are trained in the same backward; nothing else in Python."""
        state = getattr(self, "optimizer_state", None)
        opt = table.optimizer
        traced = self._traced_inference()
        # .data: backward updates the rows without bumping the parameter's version (traced: a read only)
        weight = self.weight.detach() if traced else self.weight.data
        out, where = ops.tt_cached_embedding_bag_fused(
            table.core_list(), table.optimizer_state(), weight,
            state if state is not None else self.weight.new_empty(0), self._map, self.trained, ids, offsets, psw,
            num_embeddings=table.num_embeddings, optimizer=opt.name, learning_rate=opt.learning_rate,
            eps=opt.eps, mode=table.mode, include_last_offset=include_last_offset,
            bounds_check_mode=table.bounds_check_mode, table_name=table.name)
        if not traced:
            self._count_in_kernel(ids.reshape(-1).long(), where)
        return out

    def _traced_inference(self) -> bool:
        """An eval lookup traced by torch.export / torch.compile: the cache is read only, and its hit
        statistics (a host-side count) are left out of the program."""
        return not self.training and torch.compiler.is_compiling()

    @torch.no_grad()
    def _count_in_kernel(self, ids: torch.Tensor, where: torch.Tensor) -> None:
        """``_count`` for the kernel path: one pass in C++ (the tensor ops cost ~0.2 ms a step at
        8,192 ids), same results; steps that need a merge first take ``_count`` itself."""
        if self.training and self.fill + ids.numel() > self.candidates:
            self._count(ids, where)
            return
        added = ops.tt_cache_count_(where, ids, self.slot_counts, self.hit_stats, self.pending_ids,
                                    self.pending_steps, fill=self.fill,
                                    weight=self.decay ** (self.merged_at - self.steps), step=self.steps,
                                    training=self.training, table_name=self.table_name)
        if self.training:
            self.fill += added
            self._end_step()

    def lookup(self, table, ids: torch.Tensor, offsets: torch.Tensor, psw: Optional[torch.Tensor],
               include_last_offset: bool) -> torch.Tensor:
        """Pooled lookup: on the kernel path the TT op reads cached rows itself; otherwise cached ids go
        through a dense ``embedding_bag`` on ``weight`` and the rest through the TT op with recomputed
        offsets. Either way the sum equals the uncached module's output."""
        if self.training and self.steps > 0 and self.steps % self.refresh_interval == 0:
            self.refresh(table)  # at a step boundary: the previous step's backward has run
        if self.use_kernel and self.fused is not None and self.weight.device.type == "cpu":
            return self._kernel_lookup(table, ids, offsets, psw, include_last_offset)
        # few, cheap ops per step (each one costs on a loaded 2-core box): no host sync anywhere here
        ids = ids.reshape(-1)
        L, dev = ids.numel(), ids.device
        off = offsets.reshape(-1).long()
        if not include_last_offset:
            off = torch.cat([off, torch.full((1,), L, device=dev, dtype=torch.long)])
        off = off.clamp(0, L)
        ids64 = ids.long()
        slots = self.slots_of(ids64)  # -1 for ids not cached, including ids outside the table
        hit = slots >= 0
        miss = ~hit
        zero = torch.zeros(1, device=dev, dtype=torch.long)
        c_hit = torch.cat([zero, hit.cumsum(0)])
        h_off = c_hit.index_select(0, off)
        m_off = off - h_off  # misses before each offset
        valid = (ids64 >= 0) & (ids64 < self.num_embeddings)
        if not self._traced_inference():
            self._count(ids64, torch.where(valid, slots, -2))
        w = psw.reshape(-1) if psw is not None else None
        if table.mode == "mean":  # divide by the full bag size (valid ids), not by the part on each side
            c_val = torch.cat([zero, valid.cumsum(0)])
            size = (c_val[off[1:]] - c_val[off[:-1]]).clamp_min(1).to(self.weight.dtype)
            bag = (torch.searchsorted(off, torch.arange(L, device=dev), right=True) - 1).clamp(0, size.numel() - 1)
            inv_size = 1.0 / size[bag]
            w = inv_size if w is None else w * inv_size
        # uncached part through the TT op (sum pooling; mean is folded into the weights above)
        common = dict(num_embeddings=table.num_embeddings, mode="sum", include_last_offset=True,
                      bounds_check_mode=table.bounds_check_mode, table_name=table.name)
        m_ids, m_w = ids[miss], (w[miss] if w is not None else None)
        cores = table.core_list()
        if table.optimizer is None or not torch.is_grad_enabled():
            out = ops.tt_embedding_bag(cores, m_ids, m_off, m_w, **common)
        else:
            out = ops.tt_embedding_bag_fused(cores, table.optimizer_state(), m_ids, m_off, m_w,
                                             optimizer=table.optimizer.name, eps=table.optimizer.eps,
                                             learning_rate=table.optimizer.learning_rate, **common)
        # cached part: a copy per id instead of a chain of products
        h_slots = slots[hit]  # boolean compaction: cheap on CPU (a size read on CUDA)
        h_w = w[hit].to(self.weight.dtype) if w is not None else None
        if self.fused is not None and torch.is_grad_enabled():  # as the TT op: fused whenever grad is on
            cached = _FusedCacheLookup.apply(self.weight, h_slots, h_off, h_w, self, table.optimizer)
        else:
            if self.fused is None and torch.is_grad_enabled() and self.weight.requires_grad:
                self.trained[h_slots] = True  # torch.optim may update these rows
            weight = self.weight if self.fused is None else self.weight.detach()
            cached = F.embedding_bag(h_slots, weight, h_off, mode="sum", per_sample_weights=h_w,
                                     include_last_offset=True)
        return out + cached.to(out.dtype)

    def extra_repr(self) -> str:
        return (f"rows={self.rows}, candidates={self.candidates}, refresh_interval={self.refresh_interval}, "
                f"decay={self.decay}, fused={self.fused.name if self.fused else None}")
