"""Criteo-format data for the DLRM example: a streaming TSV loader and a synthetic generator.

Both yield ``Batch(dense [B, 13] float, sparse KeyedJaggedTensor of 26 features, labels [B] float)``.

TSV format (Criteo Kaggle / Terabyte): label, 13 integer features, 26 categorical features as
8-hex-digit hashes, tab separated; an empty field is missing. Integers: missing -> 0, negatives
clamped to 0, then log(1 + x) (the usual DLRM preprocessing). Categoricals: int(hex, 16) modulo the
table size (missing -> id 0). Corrupt lines (wrong field count, non-integer dense value, non-hex
categorical, label not 0/1) are counted and skipped with a warning, or raise in ``strict`` mode.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Iterable, Iterator, List, Optional, Sequence

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

NUM_DENSE = 13
CAT_FEATURES = [f"cat_{i}" for i in range(26)]
# Table sizes of the 26 categorical features as used by the DLRM reference (TorchRec dlrm README).
KAGGLE_CARDINALITIES = [1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27,
                        14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572]
TERABYTE_CARDINALITIES = [45833188, 36746, 17245, 7413, 20243, 3, 7114, 1441, 62, 29275261, 1572176, 345138, 10,
                          2209, 11267, 128, 4, 974, 14, 48937457, 11316796, 40094537, 452104, 12606, 104, 35]


@dataclass
class Batch(Pipelineable):
    """One batch; Pipelineable (``to``, ``record_stream``, ``pin_memory``) so TorchRec's train pipelines
    can copy it to the device ahead of its step."""
    dense: torch.Tensor
    sparse: KeyedJaggedTensor
    labels: torch.Tensor

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        return Batch(self.dense.to(device, non_blocking=non_blocking),
                     self.sparse.to(device, non_blocking=non_blocking),
                     self.labels.to(device, non_blocking=non_blocking))

    def record_stream(self, stream: torch.Stream) -> None:
        self.dense.record_stream(stream)
        self.sparse.record_stream(stream)
        self.labels.record_stream(stream)

    def pin_memory(self) -> "Batch":
        return Batch(self.dense.pin_memory(), self.sparse.pin_memory(), self.labels.pin_memory())


def _kjt(cat_ids: np.ndarray) -> KeyedJaggedTensor:
    """One id per feature per sample: [B, 26] -> KJT with feature-major values."""
    batch = cat_ids.shape[0]
    return KeyedJaggedTensor.from_lengths_sync(
        keys=CAT_FEATURES, values=torch.from_numpy(np.ascontiguousarray(cat_ids.T).reshape(-1)),
        lengths=torch.ones(len(CAT_FEATURES) * batch, dtype=torch.int32))


class CorruptLineError(ValueError):
    pass


def parse_line(line: str, cardinalities: Sequence[int]):
    """One TSV line -> (label, dense[13] float32 (log-transformed), cat[26] int64) or CorruptLineError."""
    fields = line.rstrip("\r\n").split("\t")
    if len(fields) != 1 + NUM_DENSE + 26:
        raise CorruptLineError(f"expected 40 tab-separated fields, got {len(fields)}")
    if fields[0] not in ("0", "1"):
        raise CorruptLineError(f"label must be 0 or 1, got {fields[0]!r}")
    try:
        dense = [max(int(x), 0) if x else 0 for x in fields[1:1 + NUM_DENSE]]
    except ValueError as e:
        raise CorruptLineError(f"integer feature is not an integer: {e}") from None
    try:
        cats = [int(x, 16) % n if x else 0 for x, n in zip(fields[1 + NUM_DENSE:], cardinalities)]
    except ValueError as e:
        raise CorruptLineError(f"categorical feature is not hexadecimal: {e}") from None
    return int(fields[0]), np.log1p(np.asarray(dense, dtype=np.float32)), np.asarray(cats, dtype=np.int64)


class CriteoTSV:
    """Streams batches from Criteo-format TSV files (any number, read in order).

    ``skip``/``take`` select a line range (e.g. a held-out split); ``rank``/``world_size`` give each
    rank every world_size-th batch. ``stats`` counts lines read and skipped.
    """

    def __init__(self, paths: Sequence[str], batch_size: int, cardinalities: Sequence[int] = KAGGLE_CARDINALITIES,
                 strict: bool = False, skip: int = 0, take: Optional[int] = None, rank: int = 0,
                 world_size: int = 1, drop_last: bool = True) -> None:
        self.paths, self.batch_size, self.cardinalities = list(paths), batch_size, list(cardinalities)
        self.strict, self.skip, self.take = strict, skip, take
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.stats = {"lines": 0, "skipped": 0}

    def _lines(self) -> Iterator[tuple]:
        index = 0
        for path in self.paths:
            with open(path, "r", encoding="utf-8", errors="replace") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    index += 1
                    if index <= self.skip:
                        continue
                    if self.take is not None and index > self.skip + self.take:
                        return
                    self.stats["lines"] += 1
                    try:
                        yield parse_line(line, self.cardinalities)
                    except CorruptLineError as e:
                        if self.strict:
                            raise CorruptLineError(f"{path}:{lineno}: {e}") from None
                        self.stats["skipped"] += 1
                        warnings.warn(f"{path}:{lineno}: skipped corrupt line ({e})")

    def __iter__(self) -> Iterator[Batch]:
        rows: List[tuple] = []
        batch_index = 0
        for row in self._lines():
            rows.append(row)
            if len(rows) == self.batch_size:
                if batch_index % self.world_size == self.rank:
                    yield self._collate(rows)
                batch_index += 1
                rows = []
        if rows and not self.drop_last and batch_index % self.world_size == self.rank:
            yield self._collate(rows)

    @staticmethod
    def _collate(rows: List[tuple]) -> Batch:
        labels = torch.tensor([r[0] for r in rows], dtype=torch.float32)
        dense = torch.from_numpy(np.stack([r[1] for r in rows]))
        return Batch(dense, _kjt(np.stack([r[2] for r in rows])), labels)


class SyntheticCriteo:
    """Endless, seeded, Criteo-shaped batches with labels from a planted teacher.

    Ids of each feature are Zipf(alpha) over its table (rank 1 -> id 0). The teacher gives every
    id a hidden embedding (hashed into ``teacher_buckets`` random vectors per feature, so it costs
    no table-sized memory) and scores a sample by a dense-feature linear term plus the sum of its
    ids' embeddings projected on a hidden direction plus pairwise products of two feature groups;
    the label is Bernoulli(sigmoid(score)). AUC is therefore well-defined and bounded by the
    teacher's own (``oracle_logits``; about 0.84 on the Kaggle shapes).

    Batch ``k`` of rank ``r`` depends only on ``(seed, k * world_size + r)``: ``batches(start=k)``
    resumes a stream exactly, and ``seed`` picks an independent stream (train vs eval).
    """

    def __init__(self, batch_size: int, cardinalities: Sequence[int] = KAGGLE_CARDINALITIES, seed: int = 0,
                 alpha: float = 1.05, teacher_seed: int = 1234, teacher_buckets: int = 1 << 16, dim: int = 8,
                 scale: float = 2.0, rank: int = 0, world_size: int = 1) -> None:
        self.batch_size, self.cardinalities, self.alpha = batch_size, list(cardinalities), alpha
        self.seed, self.rank, self.world_size = seed, rank, world_size
        t = np.random.default_rng(teacher_seed)
        self.buckets = teacher_buckets
        self.teacher_emb = t.standard_normal((len(self.cardinalities), teacher_buckets, dim)).astype(np.float32)
        self.teacher_proj = t.standard_normal((len(self.cardinalities), dim)).astype(np.float32) / math.sqrt(dim)
        self.teacher_dense = t.standard_normal(NUM_DENSE).astype(np.float32) / math.sqrt(NUM_DENSE)
        self.hash_a = t.integers(1, 2**31 - 1, size=len(self.cardinalities))
        self.scale = scale

    @staticmethod
    def _zipf(rng: np.random.Generator, alpha: float, n: int, size: int) -> np.ndarray:
        out = np.empty(0, dtype=np.int64)
        while out.size < size:
            x = rng.zipf(alpha, size=2 * size)
            out = np.concatenate([out, x[x <= n] - 1])
        return out[:size]

    def oracle_logits(self, dense: np.ndarray, cats: np.ndarray) -> np.ndarray:
        f = np.arange(len(self.cardinalities))
        h = (cats * self.hash_a[None, :]) % self.buckets                     # [B, F]
        emb = self.teacher_emb[f[None, :], h]                                # [B, F, dim]
        first = (emb * self.teacher_proj[None]).sum(-1)                      # [B, F]
        half = len(self.cardinalities) // 2
        inter = (emb[:, :half].sum(1) * emb[:, half:].sum(1)).sum(-1) / len(self.cardinalities)
        score = dense @ self.teacher_dense + first.sum(1) / math.sqrt(len(self.cardinalities)) + inter
        return self.scale * (score - 0.0) / 2.0 - 1.0                       # ~25 % positives

    def batch(self, k: int) -> Batch:
        """This rank's batch number ``k`` (deterministic)."""
        rng = np.random.default_rng([self.seed, k * self.world_size + self.rank])
        b = self.batch_size
        cats = np.stack([self._zipf(rng, self.alpha, n, b) for n in self.cardinalities], axis=1)
        dense = np.log1p(rng.exponential(5.0, size=(b, NUM_DENSE))).astype(np.float32)
        logits = self.oracle_logits(dense - 1.6, cats)
        labels = (rng.random(b) < 1 / (1 + np.exp(-logits))).astype(np.float32)
        return Batch(torch.from_numpy(dense), _kjt(cats), torch.from_numpy(labels))

    def batches(self, start: int = 0) -> Iterator[Batch]:
        k = start
        while True:
            yield self.batch(k)
            k += 1

    def __iter__(self) -> Iterator[Batch]:
        return self.batches()


def scale_cardinalities(cardinalities: Sequence[int], factor: float, floor: int = 64) -> List[int]:
    """``--scale-tables F``: each table gets ``ceil(F * n)`` rows, but never fewer than ``min(n, floor)``
    (small tables such as 3-valued ones stay as they are). ``F = 1`` keeps the real sizes."""
    if factor <= 0:
        raise ValueError(f"scale factor must be positive, got {factor}")
    return [max(min(n, floor), math.ceil(n * factor)) if factor < 1 else n for n in cardinalities]


def take(batches: Iterable[Batch], n: int) -> Iterator[Batch]:
    for i, b in enumerate(batches):
        if i >= n:
            return
        yield b
