"""scripts/compare_profiles.py: kernels of two profiles aligned by name, slower ones flagged."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
import compare_profiles as cp  # noqa: E402

NS = "torchrec_tt::cuda::(anonymous namespace)::"


def profile(config_rows):
    """A profile as examples/profile_tt_embedding_cuda.py prints it (names cut at 110 characters)."""
    lines = ["=== config b: 10 steps", "  (the profiler's table, ignored)  12.0  x"]
    for cfg, rows in config_rows.items():
        lines.append(f"=== config {cfg}: one step, kernels in launch order (us)")
        for us, sig in rows:
            lines.append(f"{us:9.1f}  {sig[:110]}")
    lines.append("=== config a: host ms to issue (median of 50): ours forward 0.1")
    return "\n".join(lines) + "\n"


def sig(name, template="", void=True):
    return f"{'void ' if void else ''}{NS}{name}{template}({NS}Plan, {NS}LevelArgs, float const*, float*)"


def test_kernel_names_from_cut_signatures():
    assert cp.kernel_name(sig("chain_kernel", "<float, 4>")) == "chain_kernel<float, 4>"
    assert cp.kernel_name(sig("small_group_kernel", void=False)) == "small_group_kernel"
    assert cp.kernel_name(f"void {NS}small_plan_kernel<float, long>({NS}Sm") == "small_plan_kernel<float, long>"


def test_merged_kernels_align_and_slower_ones_are_flagged():
    base = [(100.0, sig("small_plan_kernel", "<float, long>")), (17.6, sig("child_grad_kernel", "<float>")),
            (31.3, sig("dprev_reduce_kernel", void=False)), (77.0, sig("child_grad_warp_kernel", "<float>")),
            (4.0, sig("slice_grad_kernel", "<float, 1>"))]
    ours = [(81.6, sig("small_plan_kernel", "<float, long>")), (41.8, sig("parent_grad_kernel", "<float>")),
            (172.0, sig("child_grad_warp_kernel", "<float>")), (8.0, sig("slice_grad_kernel", "<float, 1>"))]
    text, flagged = cp.report(profile({"b": ours}), profile({"b": base}))
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert flagged == 1  # the warp kernel; slice_grad<float, 1> is 2x slower but only 4 us
    assert "**2.23 SLOWER**" in rows["child_grad_warp_kernel<float>"]
    assert rows["child_grad_kernel<float>"] == "| child_grad_kernel<float> | 17.6 | - | - |"
    assert rows["parent_grad_kernel<float>"] == "| parent_grad_kernel<float> | - | 41.8 | - |"
    assert rows["small_plan_kernel<float, long>"].endswith("| 0.82 |")
    assert rows["all kernels"] == "| all kernels | 229.9 | 303.4 | 1.32 |"


def test_main_exit_status_and_missing_config(tmp_path, capsys):
    same = profile({"a": [(10.0, sig("pool_kernel", "<float>"))]})
    (tmp_path / "ours.log").write_text(same)
    (tmp_path / "base.log").write_text(same.replace("config a", "config x"))
    assert cp.main([str(tmp_path / "ours.log"), str(tmp_path / "base.log")]) == 0
    out = capsys.readouterr().out
    assert "config a: only in this tree's profile" in out and "config x: only in the baseline's profile" in out
    (tmp_path / "base.log").write_text(same.replace("10.0", " 5.0"))
    assert cp.main([str(tmp_path / "ours.log"), str(tmp_path / "base.log")]) == 1
