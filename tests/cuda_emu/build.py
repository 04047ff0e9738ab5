"""Builds csrc/cuda's kernels for the CPU emulator (emu.h) as a torch extension.

The sources are copied into a build folder with four mechanical rewrites that the emulator cannot
do with macros: kernel launches `k<<<grid, block, smem, stream>>>(args)` become
`::emu::launch(::emu::LaunchCfg(grid, block, smem, stream), "k", k, args)`, `extern __shared__ T x[];`
becomes a pointer to the block's dynamic shared memory, each static `__shared__` declaration is
followed by a call that fills it with 0xff bytes once per block, and the CUB / Thrust includes are
dropped (emu_cub.h stands in). Everything else is compiled as it is, by g++, with a grid cap of 3
blocks (TORCHREC_TT_MAX_GRID) so that every grid-stride loop takes several turns.

    python tests/cuda_emu/build.py [--src csrc/cuda]   # prints the module's path
"""
import argparse
import functools
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent

_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;{}]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)
_DYN_SMEM = re.compile(r"extern\s+__shared__\s+(\w+)\s+(\w+)\s*\[\s*\]\s*;")
_LIBS = re.compile(r"^\s*#\s*include\s*<(cub|thrust)/[^>]*>\s*$", re.M)


def _launch(m: re.Match) -> str:
    kernel, cfg = m.group(1), " ".join(m.group(2).split())
    rest = m.string[m.end():].lstrip()
    comma = "" if rest.startswith(")") else ", "
    return f'::emu::launch(::emu::LaunchCfg({cfg}), "{kernel}", {kernel}{comma}'


_STATIC_SMEM = re.compile(r"(?<!extern )__shared__\s+([^;(){}]+);")


def _poison(m: re.Match) -> str:
    """A static __shared__ declaration, then a call that fills it with 0xff once per block."""
    decl = m.group(1)
    parts = [decl] if "<" in decl else decl.split(",")
    names = [re.search(r"(\w+)\s*(?:\[[^\]]*\]\s*)*$", part.strip()).group(1) for part in parts]
    return m.group(0) + "".join(f" ::emu::poison_once(&{n}, sizeof({n}));" for n in names)


def rewrite(text: str) -> str:
    text = _LIBS.sub("", text)
    text = _DYN_SMEM.sub(r"\1* \2 = ::emu::dynamic_smem<\1>();", text)
    text = _STATIC_SMEM.sub(_poison, text)
    return _LAUNCH.sub(_launch, text)


@functools.lru_cache(maxsize=None)
def cuda_include() -> str:
    """The folder of cuda_runtime.h: CUDA_HOME, torch's guess, /usr/local/cuda, or where nvcc looks."""
    from torch.utils.cpp_extension import CUDA_HOME
    dirs = [Path(h) / "include" for h in (os.environ.get("CUDA_HOME"), CUDA_HOME, "/usr/local/cuda") if h]
    if shutil.which("nvcc"):  # nvcc may be a wrapper script: ask it
        dry = subprocess.run(["nvcc", "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True)
        dirs += [Path(m) for m in re.findall(r'INCLUDES="-I([^"]+)"', dry.stderr + dry.stdout)]
    for d in dirs:
        if (d / "cuda_runtime.h").exists():
            return str(d)
    raise RuntimeError(f"CUDA headers (cuda_runtime.h) not found in {[str(d) for d in dirs]}; set CUDA_HOME")


def build(src: Path = ROOT / "csrc" / "cuda", verbose: bool = False):
    """Compiles (or reuses) the emulated kernels of `src`; returns the loaded module."""
    from torch.utils.cpp_extension import load
    files = sorted(list(src.glob("*.cuh")) + list(src.glob("*.cu")))
    ours = [HERE / n for n in ("emu.h", "emu_cub.h", "binding.cpp", "kernels.cpp", "selftest.cpp")]
    digest = hashlib.sha1()
    for f in files + ours:
        digest.update(f.name.encode())
        digest.update(f.read_bytes())
    digest.update(Path(__file__).read_bytes())  # the flags below
    tag = digest.hexdigest()[:12]
    out = ROOT / "build" / f"cuda_emu_{tag}"
    out.mkdir(parents=True, exist_ok=True)
    for f in files:
        (out / f.name).write_text(rewrite(f.read_text()))
    for f in ours:  # selftest.cpp's launches are rewritten like the kernels'
        (out / f.name).write_text(rewrite(f.read_text()) if f.suffix == ".cpp" else f.read_text())
    return load(
        name=f"tt_cuda_emu_{tag}",
        sources=[str(out / n) for n in ("binding.cpp", "kernels.cpp", "selftest.cpp")],
        extra_include_paths=[str(out), cuda_include()],
        # -fsanitize=alignment: a misaligned float4 (or any) access aborts, naming the line, as a GPU
        # would fault; x86 itself would read it silently. Under pytest the report dies with the
        # captured stderr: run with -s, or UBSAN_OPTIONS=log_path=... set before Python starts (.ci/run).
        extra_cflags=["-O1", "-std=c++17", "-Wno-unknown-pragmas", "-Wno-attributes", "-DTORCHREC_TT_MAX_GRID=3",
                      "-fsanitize=alignment", "-fno-sanitize-recover=alignment"],
        extra_ldflags=["-fsanitize=alignment"],
        build_directory=str(out),
        verbose=verbose,
    )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=ROOT / "csrc" / "cuda")
    args = ap.parse_args()
    mod = build(args.src, verbose=True)
    print(mod.__file__)
    sys.exit(0)
