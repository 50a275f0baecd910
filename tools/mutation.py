"""Mutation testing of the modules that hold the math and the protocol (docs/mutation.md).

mutmut (configured in pyproject.toml, [tool.mutmut]) copies bknbench/ into mutants/, makes
one-token changes in norms/, kernels/reference.py, report/summary.py, diagnose/ and
request.py, and runs the fast tests that cover each changed function.

    python tools/mutation.py --sample 6     # 6 mutants per module, seeded: docs/mutation.md
    python tools/mutation.py                # every mutant (~4300: hours on 2 cores)
    python tools/mutation.py --report       # the table of the results in mutants/ so far

Equivalent mutants (no input tells them apart) are listed with their reason in
tools/mutation-equivalent.txt and left out of the score.
"""
from __future__ import annotations

import argparse
import random
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MUTMUT = [sys.executable, "-m", "mutmut"]
EQUIVALENT = Path(__file__).with_name("mutation-equivalent.txt")
SAMPLE = ROOT / "mutants" / "sample.txt"
KILLED = {"killed", "timeout", "segfault"}  # a test run that did not pass
NAME = re.compile(r"^(?P<module>[\w.]+?)\.x(?:_|ǁ)")


def results() -> dict[str, str]:
    """mutant name -> status (killed, survived, not checked, ...) of every mutant."""
    out = subprocess.run(MUTMUT + ["results", "--all", "true"], cwd=ROOT, text=True,
                         capture_output=True, check=True).stdout
    found = {}
    for line in out.splitlines():
        name, _, status = line.strip().rpartition(": ")
        if NAME.match(name):
            found[name] = status
    return found


def equivalent() -> dict[str, str]:
    if not EQUIVALENT.exists():
        return {}
    pairs = (line.split("#", 1) for line in EQUIVALENT.read_text().splitlines()
             if line.strip() and not line.startswith("#"))
    return {name.strip(): reason.strip() for name, reason in pairs}


def by_module(names) -> dict[str, list[str]]:
    groups = defaultdict(list)
    for name in sorted(names):
        groups[NAME.match(name)["module"]].append(name)
    return groups


def sample(k: int, seed: int) -> list[str]:
    """k mutants of each module, the same ones for the same seed and source; kept in
    mutants/sample.txt, which a later --report reads (the source may have changed since)."""
    if SAMPLE.exists():
        kept = SAMPLE.read_text().split("\n", 1)
        if kept[0] == f"{k} {seed}":
            return kept[1].split()
    rng = random.Random(seed)
    names = [n for group in by_module(results()).values()
             for n in rng.sample(group, min(k, len(group)))]
    SAMPLE.write_text(f"{k} {seed}\n" + "\n".join(names))
    return names


def report(names: list[str] | None = None) -> None:
    """Markdown: per module, mutants run, killed, equivalent, survived, and the score."""
    status, same = results(), equivalent()
    chosen = [n for n in (names or status) if status.get(n, "not checked") != "not checked"]
    print("| module | run | killed | equivalent | survived | killed of non-equivalent |")
    print("|---|---|---|---|---|---|")
    total = defaultdict(int)
    for module, group in by_module(chosen).items():
        k = sum(status[n] in KILLED for n in group)
        e = sum(n in same and status[n] not in KILLED for n in group)
        row = {"run": len(group), "killed": k, "equivalent": e,
               "survived": len(group) - k - e}
        for key, v in row.items():
            total[key] += v
        score = k / max(1, len(group) - e)
        print(f"| {module} | {row['run']} | {k} | {e} | {row['survived']} | {score:.0%} |")
    score = total["killed"] / max(1, total["run"] - total["equivalent"])
    print(f"| **all** | {total['run']} | {total['killed']} | {total['equivalent']} | "
          f"{total['survived']} | **{score:.0%}** |")
    print()
    for n in chosen:
        if status[n] not in KILLED:
            print(f"- `{n}`: {status[n]}" + (f"; equivalent: {same[n]}" if n in same else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=int, help="mutants per module (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="of the sample")
    parser.add_argument("--jobs", type=int, default=1, help="mutants tested at once")
    parser.add_argument("--report", action="store_true", help="only print the table")
    args = parser.parse_args()
    names = None
    if not args.report:
        if args.sample:
            # a run of one mutant makes mutants/ (and the test coverage map) to sample from
            subprocess.run(MUTMUT + ["run", "bknbench.request.x_flag__mutmut_1"], cwd=ROOT,
                           check=True)
            names = sample(args.sample, args.seed)
        subprocess.run(MUTMUT + ["run", "--max-children", str(args.jobs), *(names or [])],
                       cwd=ROOT, check=True)
    elif args.sample:
        names = sample(args.sample, args.seed)
    report(names)


if __name__ == "__main__":
    main()
