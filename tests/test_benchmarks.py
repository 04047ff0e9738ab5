"""The CUDA benchmark script's logic, dry-run on the CPU (tiny table): every method is timed, in turns,
and one failing method is reported without hiding the others."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import benchmark_tt_embedding_cuda as bench  # noqa: E402


@pytest.fixture
def on_cpu(monkeypatch):
    monkeypatch.setattr(bench, "DEVICE", "cpu")


def test_methods_take_turns_and_failures_are_reported(on_cpu):
    calls, errors = [], {}

    def method(name):
        return lambda: calls.append(name)

    def broken():
        raise RuntimeError("out of memory")

    ms = bench.time_interleaved({"a": method("a"), "b": method("b"), "bad": broken}, iters=20, warmup=2,
                                errors=errors)
    assert set(ms) == {"a", "b"} and errors == {"bad": "RuntimeError: out of memory"}
    timed = calls[4:]  # after the warm-up steps (2 per method)
    assert len(timed) == 40 and timed[:4] == ["a", "b", "b", "a"]  # the first method moves round


def test_dry_run_writes_every_method(on_cpu, tmp_path, monkeypatch):
    out = tmp_path / "bench.json"
    monkeypatch.setattr(sys, "argv", ["bench", "--device", "cpu", "--configs", "tiny", "--iters", "20",
                                      "--warmup", "1", "--json", str(out)])
    assert bench.main() == 0
    res = json.loads(out.read_text())["results"][0]
    assert res["errors"] == {}
    assert set(res["ms"]) == {"dense", "naive_tt", "ours_dense", "ours", "ours_checked"}
    assert res["ours_over_dense"] == pytest.approx(res["ms"]["ours"] / res["ms"]["dense"])
    b2b = res["ms_back_to_back"]
    assert set(b2b) == {"dense", "ours"}  # no CUDA graph on the CPU
    assert res["ours_over_dense_back_to_back"] == pytest.approx(b2b["ours"] / b2b["dense"])


def test_back_to_back_bursts_take_turns(on_cpu):
    calls = []
    ms = bench.time_back_to_back({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                 ("a", "b", "missing"), bursts=3, per_burst=4)
    assert set(ms) == {"a", "b"} and all(v >= 0 for v in ms.values())
    assert calls == ["a"] * 4 + ["b"] * 4 + ["b"] * 4 + ["a"] * 4 + ["a"] * 4 + ["b"] * 4


def test_kernel_step_script_dry_run(on_cpu, monkeypatch, capsys):
    import cuda_kernel_step
    monkeypatch.setattr(sys, "argv", ["step", "--device", "cpu", "--config", "tiny", "--warmup", "1"])
    assert cuda_kernel_step.main() == 0
    assert "one step of config tiny (192 ids) done" in capsys.readouterr().out


def test_tt_svd_benchmark_dry_run(monkeypatch, capsys):
    import benchmark_tt_svd
    monkeypatch.setattr(sys, "argv", ["svd", "--rows", "3000", "--rank", "4", "--rounds", "1", "--threads", "1"])
    assert benchmark_tt_svd.main() == 0
    out = capsys.readouterr().out
    assert "error by blocks of GEMMs" in out and "per-row rebuild" in out
