"""benchmarks/kernel_resources.py: the launches it records are the CUDA path's, and it compiles them for sm_90."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from topklab.kernels import topk

pytest.importorskip("triton")


def test_kernel_resources_records_the_cuda_launches_and_compiles_them_for_sm90(tmp_path):
    """benchmarks/kernel_resources.py records the launches the CUDA path would make (on CPU tensors: 132 SMs,
    bf16 products, not the interpreter's choices) and compiles them for the H100 without a GPU (registers, spills,
    SASS instructions, shared memory per launch)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_resources.py"
    spec = importlib.util.spec_from_file_location("kernel_resources", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    q, keys = torch.empty(2, 8, 64, dtype=torch.bfloat16), torch.empty(2, 2, 5000, 64, dtype=torch.bfloat16)
    with tool.recorded_launches() as records:
        topk(q, keys, 100, sorted=False)
    assert [r["kernel"].fn.__name__ for r in records] == ["_sample_kernel", "_threshold_kernel", "_score_kernel",
                                                         "_finalize_kernel"]
    score = records[2]
    assert score["constants"]["DOT_FP32"] is False and score["constants"]["PDL"] is True
    assert score["grid"] == (4, 40), "4 KV rows x 40 spans of 128 keys (132 SMs would take up to 132 spans a row)"
    # compiled in a fresh process: after the interpreter tests re-imported triton.language, this one cannot compile
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(path.parents[1])}
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run([sys.executable, str(path), "--only", "topk b1 8K k=64 per q head"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in run.stdout.splitlines() if line.startswith("| topk")]
    assert [cells[1].strip() for cells in rows] == ["_sample_kernel", "_threshold_kernel", "_score_kernel",
                                                    "_finalize_kernel"]
    converts = []
    for cells in rows:
        registers, spill, instructions, shared = int(cells[5]), int(cells[6]), int(cells[7]), float(cells[8])
        converts.append(int(cells[9]))
        assert 0 < registers <= 255 and spill >= 0 and instructions > 0 and shared >= 0 and converts[-1] >= 0
    assert sum(converts) > 0, "the TTGIR's layout conversions are counted (the score kernel moves its scores from " \
        "the dot's layout to its atomic's)"
    assert rows[2][2].strip() == "8x32", "the score kernel's grid at 8K: 8 KV rows x 32 spans of 256 keys (one wave)"
    assert rows[0][2].strip() == "8x8", "the sample kernel's grid at 8K: 8 KV rows x 1024 samples in 8 tiles"
    assert any(tmp_path.rglob("*.cubin")), "compiled for sm_90 in this test"
    assert tool.programs_per_sm({"reg": 255, "shared": 0}, 8) == (1, "registers")
    assert tool.programs_per_sm({"reg": 64, "shared": 100 * 1024}, 4) == (2, "shared")
