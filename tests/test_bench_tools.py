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


def test_bench_kernels_tables_are_well_formed_and_compare_like_with_like(monkeypatch):
    """bench_kernels.py's Top-k and attention rows on the CPU (torch references, a stand-in clock): every row has
    its header's cells, and the plain torch baseline is unsorted like ours (a sort charged to one side only would
    flatter the ratio)."""
    import torch

    sys.path.insert(0, str(BENCH))
    try:
        import bench_kernels
    finally:
        sys.path.remove(str(BENCH))
    real_randn = torch.randn
    monkeypatch.setattr(bench_kernels.torch, "randn", lambda *shape, device=None, **kw: real_randn(*shape, **kw))
    monkeypatch.setattr(bench_kernels, "graph_time", lambda fn, sets: [fn(*args) for args in sets] and 1e-5)
    monkeypatch.setattr(bench_kernels, "eager_time", lambda fn, args: 2e-5)
    calls = []
    real_topk = torch.topk
    monkeypatch.setattr(bench_kernels.torch, "topk", lambda *a, **kw: calls.append(kw) or real_topk(*a, **kw))
    topk_rows, attn_rows = [], []
    bench_kernels.bench_topk(3e12, 3.2e12, (1,), (4096,), topk_rows)
    bench_kernels.bench_attention(3e12, (1,), (4096,), 256, attn_rows)
    assert len(topk_rows) == 3 and len(attn_rows) == 1
    assert {len(row.split("|")) for row in topk_rows} == {15} and len(attn_rows[0].split("|")) == 12
    assert calls and all(kw.get("sorted") is False for kw in calls)
    floor = 8 * 4096 * 128 * 2 / 3e12
    cells = [c.strip() for c in topk_rows[0].strip("|").split("|")]
    assert cells[5] == f"{1e-5 / floor:.2f}" and cells[6] == f"{1e-5 * 3.2e12 / (8 * 4096 * 128 * 2):.2f}"
