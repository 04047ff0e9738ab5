"""torchx component for the DLRM example.

    torchx run -s local_cwd examples/dlrm/component.py:dlrm -j 1x2 -- --steps 500 --ckpt-dir /tmp/dlrm_ckpt
    torchx run -s slurm      examples/dlrm/component.py:dlrm -j 4x8 --gpu 8 -- --steps 100000 ...
    torchx run -s kubernetes examples/dlrm/component.py:dlrm -j 4x8 --gpu 8 --image <your image> -- ...

Everything after ``--`` goes to ``examples/dlrm/train.py``. The job is ``torchrun`` on every node
(one process per GPU, or ``nproc_per_node`` CPU processes); ``train.py`` picks NCCL when it sees
GPUs and gloo otherwise, so the same component runs here (2 CPU ranks) and on a GPU cluster.

Fault tolerance, ``max_retries`` (default 3) does two things: torchrun restarts the whole worker group
up to that many times when a worker dies (this works on every scheduler, local_cwd included), and
schedulers that support it (slurm, kubernetes) may also reschedule the job. Each restart resumes
from the latest checkpoint in ``--ckpt-dir`` (pass one that every node can read, e.g. shared storage).
"""

import shlex
from typing import Dict, Optional

import torchx
from torchx import specs
from torchx.components.dist import parse_nnodes


def dlrm(
    *script_args: str,
    j: str = "1x2",
    image: str = torchx.IMAGE,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 16384,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 3,
    rdzv_port: int = 29500,
    script: str = "examples/dlrm/train.py",
) -> specs.AppDef:
    """DLRM with Tensor-Train embedding tables (torchrec_tt), trained with torchrun on each node.

    Args:
        script_args: arguments of examples/dlrm/train.py (put them after ``--``)
        j: {nnodes}x{nproc_per_node}, e.g. 1x2 (one node, two processes)
        image: container image (local_cwd: the current directory is used)
        cpu: CPUs per node
        gpu: GPUs per node (0: CPU training over gloo)
        memMB: memory per node in MB
        h: a registered named resource (overrides cpu/gpu/memMB)
        env: extra environment variables, e.g. DLRM_FAIL_AT_STEP=20 for the fault-injection test
        max_retries: worker-group restarts by torchrun (and scheduler retries where supported)
        rdzv_port: rendezvous port on the first node (multi-node only)
        script: the training script
    """
    min_nnodes, max_nnodes, nproc_per_node, nnodes_rep = parse_nnodes(j)
    # single node: a free port chosen by torchrun; multi-node: the scheduler names the first host
    endpoint = "localhost:0" if max_nnodes == 1 else f"$${{{specs.macros.rank0_env}:=localhost}}:{rdzv_port}"
    cmd = ["torchrun", "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", specs.macros.app_id,
           "--nnodes", nnodes_rep, "--nproc_per_node", str(nproc_per_node), "--max_restarts", str(max_retries),
           "--tee", "3", script, *script_args]
    env = dict(env or {})
    env.setdefault("PYTHONPATH", ".")  # the repository root (the working directory of local_cwd)
    env.setdefault("LOGLEVEL", "WARNING")
    return specs.AppDef(
        name="dlrm",
        roles=[specs.Role(
            name="trainer", image=image, entrypoint="bash",
            args=["-c", " ".join(shlex.quote(c) if "$" not in c else c for c in cmd)],
            env=env, num_replicas=int(max_nnodes), min_replicas=min_nnodes,
            resource=specs.resource(cpu=cpu, gpu=gpu, memMB=memMB, h=h),
            port_map={"c10d": rdzv_port}, max_retries=max_retries)],
    )
