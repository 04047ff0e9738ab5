"""Kernel-by-kernel comparison of two runs of examples/profile_tt_embedding_cuda.py (a tree and a baseline).

Each profile lists one step's kernels in launch order per config ("=== config b: one step, kernels in
launch order (us)"). The two trees may launch different kernels (a change can merge or split launches),
so the kernel sequences are aligned by name (difflib); each row is then a kernel of both trees, of this
tree only or of the baseline only. A kernel at least ``--ratio`` times slower and ``--min-us`` slower
than the baseline's is flagged: session 11 found a 2.2x slower kernel by reading two such logs by eye.

    python3 scripts/compare_profiles.py out/profile.log out/profile_baseline.log
"""
from __future__ import annotations

import argparse
import difflib
import re
import sys
from typing import Dict, List, Tuple

HEADER = re.compile(r"^=== config (\S+): one step, kernels in launch order")
ROW = re.compile(r"^\s*([0-9.]+)\s+(.+)$")


def kernel_name(signature: str) -> str:
    """``void ns::(anonymous namespace)::chain_kernel<float, 4>(args...`` -> ``chain_kernel<float, 4>``."""
    sig = re.sub(r"^void\s+", "", signature.strip())
    depth, cut = 0, len(sig)
    for i, ch in enumerate(sig):  # the argument list starts at the first '(' outside template brackets
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0 and not sig.startswith("(anonymous namespace)", i):
            cut = i
            break
    return sig[:cut].split("::")[-1]


def parse(text: str) -> Dict[str, List[Tuple[str, float]]]:
    """Config -> [(kernel name, us)] in launch order."""
    out: Dict[str, List[Tuple[str, float]]] = {}
    current = None
    for line in text.splitlines():
        m = HEADER.match(line)
        if m:
            current = out.setdefault(m.group(1), [])
            continue
        if line.startswith("==="):
            current = None
            continue
        if current is not None:
            r = ROW.match(line)
            if r:
                current.append((kernel_name(r.group(2)), float(r.group(1))))
    return out


def compare(ours: List[Tuple[str, float]], base: List[Tuple[str, float]], ratio: float, min_us: float):
    """Rows (name, base us or None, ours us or None, flagged) aligned by kernel name."""
    rows = []
    sm = difflib.SequenceMatcher(a=[n for n, _ in base], b=[n for n, _ in ours], autojunk=False)
    for tag, i0, i1, j0, j1 in sm.get_opcodes():
        if tag == "equal":
            for (name, tb), (_, to) in zip(base[i0:i1], ours[j0:j1]):
                rows.append((name, tb, to, to >= ratio * tb and to - tb >= min_us))
        else:
            rows += [(name, tb, None, False) for name, tb in base[i0:i1]]
            rows += [(name, None, to, False) for name, to in ours[j0:j1]]
    return rows


def report(ours_text: str, base_text: str, ratio: float = 1.25, min_us: float = 5.0) -> Tuple[str, int]:
    """Markdown tables per config and the number of flagged kernels."""
    ours, base = parse(ours_text), parse(base_text)
    lines, flagged = [], 0
    for cfg in sorted(set(ours) | set(base)):
        if cfg not in ours or cfg not in base:
            lines.append(f"config {cfg}: only in {'this tree' if cfg in ours else 'the baseline'}'s profile\n")
            continue
        lines += [f"### config {cfg}: one step, us per kernel", "",
                  "| kernel (launch order) | baseline | this tree | ratio |", "|---|---|---|---|"]
        for name, tb, to, bad in compare(ours[cfg], base[cfg], ratio, min_us):
            fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
            r = f"{to / tb:.2f}" if tb and to is not None else "-"
            flagged += bad
            lines.append(f"| {name} | {fmt(tb)} | {fmt(to)} | {'**' + r + ' SLOWER**' if bad else r} |")
        tb, to = sum(t for _, t in base[cfg]), sum(t for _, t in ours[cfg])
        lines += [f"| all kernels | {tb:.1f} | {to:.1f} | {to / tb:.2f} |" if tb else "", ""]
    lines.append(f"{flagged} kernel(s) at least {ratio}x and {min_us} us slower than the baseline's")
    return "\n".join(lines) + "\n", flagged


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ours", help="profile of this tree")
    ap.add_argument("baseline", help="profile of the baseline tree (or environment)")
    ap.add_argument("--ratio", type=float, default=1.25)
    ap.add_argument("--min-us", type=float, default=5.0)
    args = ap.parse_args(argv)
    with open(args.ours) as f_ours, open(args.baseline) as f_base:
        text, flagged = report(f_ours.read(), f_base.read(), args.ratio, args.min_us)
    print(text, end="")
    return 1 if flagged else 0


if __name__ == "__main__":
    sys.exit(main())
