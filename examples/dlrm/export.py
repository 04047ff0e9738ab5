"""From a training checkpoint to a serving artifact: load the DCP checkpoint that train.py wrote (on any
number of ranks, tables sharded or not) into one unsharded DLRM on the CPU, export it with
torch.export (dynamic batch size), check the exported program against the eager model on held-out
batches, and save it as a .pt2 (optionally also an AOTInductor package).

    python examples/dlrm/export.py out/dlrm/ckpt                 # the latest checkpoint there
    python examples/dlrm/export.py out/dlrm/ckpt/step_0001000 --out model.pt2 --aoti model_aoti.pt2

The TT tables travel as their cores (and hot-row caches), so the artifact is as small as the
trained model: a serving host never materialises the dense tables. Loading needs torchrec_tt imported
(its ops) and the KJT class allowed by torch.load: ``load_exported(path)`` below.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.export import Dim  # noqa: E402
from torchrec import KeyedJaggedTensor  # noqa: E402

from examples.dlrm.data import SyntheticCriteo  # noqa: E402
from examples.dlrm.model import human_bytes, model_from_record, size_report  # noqa: E402


def resolve_checkpoint(path: str) -> str:
    """A step_* folder as given, or the one a checkpoint directory's ``latest`` names."""
    if os.path.exists(os.path.join(path, "model.json")):
        return path
    marker = os.path.join(path, "latest")
    if os.path.exists(marker):
        with open(marker) as f:
            return os.path.join(path, f.read().strip())
    raise SystemExit(f"{path}: neither a checkpoint (no model.json) nor a checkpoint directory (no 'latest')")


def load_model(checkpoint: str) -> torch.nn.Module:
    """The trained DLRM, unsharded, on the CPU, in eval mode."""
    with open(os.path.join(checkpoint, "model.json")) as f:
        record = json.load(f)
    model = model_from_record(record)
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=checkpoint)  # reads every rank's shards into the full tensors
    model.load_state_dict(state["model"])
    return model.eval()


def load_exported(path: str) -> torch.export.ExportedProgram:
    """A saved program; its example inputs hold a KeyedJaggedTensor, which torch.load's weights-only
    unpickler refuses unless allowed."""
    with torch.serialization.safe_globals([KeyedJaggedTensor]):
        return torch.export.load(path)


def main(argv: Optional[List[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="a checkpoint (step_* folder) or a --ckpt-dir of train.py")
    ap.add_argument("--out", default="out/dlrm/model.pt2", help="the exported program (torch.export.save)")
    ap.add_argument("--aoti", default=None, help="also an AOTInductor package here (compiles C++: minutes)")
    ap.add_argument("--check-batches", type=int, default=4, help="held-out batches compared with eager")
    ap.add_argument("--batch-size", type=int, default=256, help="of the example and check batches")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", module=r"(torch|torchrec|fbgemm_gpu)\b")
    # torchrec warns that exporting KJT.to_dict is slow (it is what its own EBC does): seconds here
    logging.getLogger().addFilter(lambda r: "KJT to_dict" not in r.getMessage())

    checkpoint = resolve_checkpoint(args.checkpoint)
    model = load_model(checkpoint)
    ebc = model.sparse_arch.embedding_bag_collection
    cardinalities = [t.num_embeddings for t in ebc.embedding_bag_configs()]
    data = SyntheticCriteo(args.batch_size, cardinalities, seed=7_000_003)
    example = data.batch(0)
    # dense [B, 13]; the KJT's leaves: values and lengths (26 per sample) vary with the batch
    batch, ids = Dim("batch", min=2, max=1 << 16), Dim("ids", min=2, max=1 << 26)
    kjt_dims = [{0: ids}, None, {0: len(cardinalities) * batch}, None, None, None]
    t0 = time.perf_counter()
    program = torch.export.export(model, (example.dense, example.sparse), dynamic_shapes=({0: batch}, kjt_dims),
                                  strict=False)
    export_s = time.perf_counter() - t0

    worst = 0.0
    with torch.no_grad():
        for k in range(1, args.check_batches + 1):  # other samples, other batch sizes
            b = SyntheticCriteo(args.batch_size // k + 1, cardinalities, seed=7_000_003).batch(k)
            got, want = program.module()(b.dense, b.sparse), model(b.dense, b.sparse)
            worst = max(worst, float((got - want).abs().max()))
    if worst > 1e-5:
        raise SystemExit(f"exported program differs from the eager model by {worst:.3g} (logits)")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    torch.export.save(program, args.out)
    b = data.batch(98)
    with torch.no_grad():  # the saved file round-trips
        if not torch.equal(load_exported(args.out).module()(b.dense, b.sparse), program.module()(b.dense, b.sparse)):
            raise SystemExit(f"{args.out}: the saved program does not reproduce the exported one")
    report = {"checkpoint": checkpoint, "out": args.out, "bytes": os.path.getsize(args.out),
              "dense_table_bytes": size_report(model)["emb_bytes_dense"],
              "export_s": export_s, "max_abs_logit_diff": worst, "check_batches": args.check_batches}
    if args.aoti:
        t0 = time.perf_counter()
        package = torch._inductor.aoti_compile_and_package(program, package_path=args.aoti)
        compiled = torch._inductor.aoti_load_package(package)
        b = data.batch(99)
        with torch.no_grad():
            aoti_diff = float((compiled(b.dense, b.sparse) - model(b.dense, b.sparse)).abs().max())
        report.update(aoti=package, aoti_s=time.perf_counter() - t0, aoti_max_abs_logit_diff=aoti_diff)
    print(f"exported {checkpoint} -> {args.out} ({human_bytes(report['bytes'])}; the tables as dense fp32 would be "
          f"{human_bytes(report['dense_table_bytes'])}), in {export_s:.1f} s; {args.check_batches} held-out batches "
          f"of batch sizes {args.batch_size + 1}..{args.batch_size // args.check_batches + 1} match eager "
          f"(max |logit diff| {worst:.2g})" + (f"; AOTInductor package {args.aoti} (max |logit diff| "
                                               f"{report['aoti_max_abs_logit_diff']:.2g})" if args.aoti else ""))
    return report


if __name__ == "__main__":
    main()
