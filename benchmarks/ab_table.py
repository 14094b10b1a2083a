"""One table of an A/B run: the graph time per call of every profiled case, a column per variant.

Reads the log of ``benchmarks/ab_variants.sh`` (its profile section per variant), so the table exists even when a
variant's profile stopped early (its missing cases show as ``-``). Prints markdown; ``--out`` writes it too.

    python3 benchmarks/ab_table.py /tmp/ab_variants/ab.log
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from bench_kernels import write_lines

SECTION = re.compile(r"^=== profile (\S+) ", re.MULTILINE)
CASE_COLUMNS = ("case", "batch", "N", "k")
GRAPH_COLUMN = "graph us/call"


def graph_times(log: str) -> dict[str, dict[tuple[str, ...], str]]:
    """{variant: {(case, batch, N, k): graph us per call}} in the log's order."""
    sections = SECTION.split(log)
    variants: dict[str, dict[tuple[str, ...], str]] = {}
    for name, body in zip(sections[1::2], sections[2::2]):
        header, times = None, {}
        for line in body.splitlines():
            if not line.startswith("| "):
                continue
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if cells[0] == "case":
                header = cells
            elif header is not None and len(cells) == len(header):
                row = dict(zip(header, cells))
                times[tuple(row[c] for c in CASE_COLUMNS)] = row[GRAPH_COLUMN]
        variants[Path(name).name] = times
    return variants


def table(variants: dict[str, dict[tuple[str, ...], str]]) -> list[str]:
    """Markdown lines: a row per case (every case any variant profiled), a column per variant."""
    cases = list(dict.fromkeys(case for times in variants.values() for case in times))
    names = list(variants)
    lines = ["| case | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for what, batch, n, k in cases:
        cells = [variants[name].get((what, batch, n, k), "-") for name in names]
        lines.append(f"| {what} b{batch} {n} k={k} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", help="ab.log written by benchmarks/ab_variants.sh")
    parser.add_argument("--out", help="write the markdown table here too")
    opts = parser.parse_args()
    variants = graph_times(Path(opts.log).read_text())
    if not variants:
        raise SystemExit(f"{opts.log} holds no '=== profile VARIANT' section: is it the log of ab_variants.sh?")
    lines = table(variants)
    print("\n".join(lines))
    write_lines(opts.out, lines)


if __name__ == "__main__":
    main()
