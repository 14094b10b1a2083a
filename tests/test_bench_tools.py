"""The benchmark helpers that run on CPU: the A/B table built from an ab_variants.sh log."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
HEADER = ("| case | batch | N | k | GPU us per kernel (profiler) | graph us/call | host us/call | launches us | "
          "launches |")
LOG = f"""name, memory.total [MiB], driver_version
=== profile _variants/base 00:58:23
{HEADER}
| topk | 1 | 8K | 64 | _score_kernel 8.5, _finalize_kernel 4.6 | 26.1 | 171.4 | 0.0 | 0 |
| topk | 1 | 128K | 2048 | _score_kernel 94.7 | 127.6 | 175.7 | 0.0 | 0 |
=== profile _variants/short2 00:59:09
{HEADER}
| topk | 1 | 8K | 64 | _score_kernel 7.4, _finalize_kernel 6.0 | 25.7 | 292.7 | 0.0 | 0 |
Traceback (most recent call last):
=== done 00:59:18
"""


def _ab_table(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / "ab_table.py"), *args], capture_output=True, text=True,
                          timeout=300, env={"PYTHONPATH": f"{BENCH}:{BENCH.parent}", "PATH": "/usr/bin:/bin"})


def test_ab_table_puts_each_variants_graph_time_in_its_column(tmp_path):
    """A case a variant did not reach (its profile stopped) shows as '-'; the table is also written with --out."""
    log, out = tmp_path / "ab.log", tmp_path / "table.md"
    log.write_text(LOG)
    run = _ab_table(str(log), "--out", str(out))
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.splitlines() == out.read_text().splitlines() == [
        "| case | base | short2 |", "|---|---:|---:|",
        "| topk b1 8K k=64 | 26.1 | 25.7 |", "| topk b1 128K k=2048 | 127.6 | - |"]


def test_ab_table_rejects_a_log_without_profiles(tmp_path):
    log = tmp_path / "other.log"
    log.write_text("pytest output only\n")
    run = _ab_table(str(log))
    assert run.returncode != 0 and "ab_variants.sh" in run.stderr
