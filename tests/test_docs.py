"""The examples users read first run as written: README's Python blocks and every docstring example."""
import doctest
import importlib
import os
import pkgutil
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_blocks():
    with open(os.path.join(REPO, "README.md")) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), re.S)


def test_readme_has_python_examples():
    assert len(_readme_blocks()) >= 2


@pytest.mark.parametrize("index", range(len(_readme_blocks())))
def test_readme_python_block_runs(index, capsys):
    exec(compile(_readme_blocks()[index], f"README.md python block {index}", "exec"), {})


def _modules():
    import torchrec_tt
    names = [m.name for m in pkgutil.walk_packages(torchrec_tt.__path__, prefix="torchrec_tt.")
             if not m.name.endswith("._C")]
    return sorted(set(names) | {"torchrec_tt.planner", "torchrec_tt.planner.estimators",
                                "torchrec_tt.planner.chooser"})


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples failed in {name}"


def test_the_modules_users_start_from_have_examples():
    for name in ["torchrec_tt.modules.tt_embedding_bag", "torchrec_tt.modules.tt_embedding_bag_collection"]:
        tests = doctest.DocTestFinder().find(importlib.import_module(name))
        assert sum(len(t.examples) for t in tests) >= 4, name


def test_sharded_collection_example_trains_and_checkpoints(tmp_path):
    import subprocess
    import sys
    sys.path.insert(0, os.path.dirname(__file__))
    from dist_utils import free_port
    ckpt = tmp_path / "ckpt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           os.path.join(REPO, "examples", "sharded_tt_ebc.py"), "--steps", "3", "--ckpt", str(ckpt)]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"step \d: loss ([0-9.]+)", run.stdout)]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert "query" in run.stdout and (ckpt / ".metadata").exists()
