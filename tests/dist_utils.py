"""Run a function on N CPU ranks (gloo) in spawned processes, with a hard timeout."""
import datetime
import os
import queue
import socket
import traceback

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank, world_size, port, q, args):
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
        torch.set_num_threads(1)
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size,
                                             timeout=datetime.timedelta(seconds=60))
        result = fn(rank, world_size, *args)
        q.put((rank, True, result))
    except BaseException:  # noqa: BLE001  (report everything to the parent)
        q.put((rank, False, traceback.format_exc()))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run_ranks(fn, *args, world_size: int = 2, timeout: float = 150.0):
    """``fn(rank, world_size, *args)`` on each rank; returns results by rank, raises on error or timeout."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, q, args), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, {}
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
    try:
        while len(results) + len(errors) < world_size:
            left = (deadline - datetime.datetime.now()).total_seconds()
            if left <= 0:
                raise TimeoutError(f"ranks {sorted(set(range(world_size)) - set(results) - set(errors))} did not "
                                   f"finish within {timeout}s (hang?); errors so far: {errors}")
            try:
                rank, ok, value = q.get(timeout=min(left, 1.0))
            except queue.Empty:
                if all(not p.is_alive() for p in procs) and q.empty():
                    raise RuntimeError(f"ranks died without reporting (exit codes "
                                       f"{[p.exitcode for p in procs]}); errors: {errors}")
                continue
            (results if ok else errors)[rank] = value
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("\n".join(f"--- rank {r} ---\n{e}" for r, e in sorted(errors.items())))
    return [results[r] for r in range(world_size)]


def random_kjt(tables, batch: int, seed: int, min_len: int, max_len: int, weighted: bool = False):
    """A seeded KJT over every feature of ``tables``: bag lengths in [min_len, max_len), ids in range
    (``weighted``: fp32 weights in [0, 1), as TorchRec's weighted features)."""
    import torch
    from torchrec import KeyedJaggedTensor
    g = torch.Generator().manual_seed(seed)
    feats = [(f, t.num_embeddings) for t in tables for f in t.feature_names]
    lengths = torch.randint(min_len, max_len, (len(feats) * batch,), generator=g)
    values = torch.cat([torch.randint(0, n, (int(lengths[i * batch:(i + 1) * batch].sum()),), generator=g)
                        for i, (_, n) in enumerate(feats)])
    weights = torch.rand(values.numel(), generator=g) if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(keys=[f for f, _ in feats], values=values, lengths=lengths,
                                               weights=weights)
