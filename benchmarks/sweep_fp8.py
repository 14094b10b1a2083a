"""Sweep the Triton FP8 index-scoring kernel's launch configurations in one run, each timed against the same floor.

For each case (batch, queries M, N; 64 index heads, d = 128) and each configuration (how many index-head columns go
into one FP8 product, BLOCK_N, warps, pipeline stages, programs per SM), the kernel replaces
``fp8_index._tile_config`` for the run: time per call (CUDA graph), ratio to the floor (the larger of the bytes moved
at the copy bandwidth and the FLOPs at the FP8 matmul rate, both measured in this run), and the largest error
against the torch reference. The shipped configuration is the row marked ``*``. The run holds
``TOPKLAB_FP8_GLUON=0``: on Hopper ``fp8_index_scores`` would take the Gluon kernel (its own table, checked by
``compile_fp8_gluon.py``).

    PYTHONPATH=.:benchmarks python3 benchmarks/sweep_fp8.py --out /tmp/sweep_fp8.md
"""

from __future__ import annotations

import argparse
import datetime

import torch
from bench_kernels import (copy_bandwidth, fp8_floors, fp8_inputs, fp8_kernel, fp8_peak, graph_time,
                           settle_fp8_inputs, write_lines)

from topklab.kernels import fp8_index
from topklab.kernels.fp8_index import fp8_index_scores, fp8_index_scores_reference

CASES = ((16, 4, 131072), (16, 1, 32768))
# (columns per product, BLOCK_N, warps, stages, programs per SM); None = the shipped choice
CONFIGS = (None,
           (128, 64, 4, 3, 3), (128, 64, 4, 5, 3), (128, 64, 4, 4, 2), (128, 64, 4, 3, 4), (128, 64, 4, 2, 4),
           (128, 64, 8, 4, 2), (128, 64, 8, 3, 2), (128, 64, 8, 3, 3), (128, 128, 8, 3, 1),
           (256, 64, 8, 3, 2), (256, 64, 8, 4, 2), (64, 128, 4, 3, 4))


def run_config(config, args) -> tuple[float, float]:
    """(seconds per call, max relative error vs the reference) with ``config`` in place of the shipped one."""
    shipped = fp8_index._tile_config, fp8_index.MAX_PRODUCT_COLUMNS
    if config is not None:
        columns, block_n, warps, stages, per_sm = config
        fp8_index.MAX_PRODUCT_COLUMNS = columns
        fp8_index._tile_config = lambda _columns, _products: (block_n, warps, stages, per_sm)
    try:
        with fp8_kernel(gluon=False):
            out = fp8_index_scores(*args)
            ref = fp8_index_scores_reference(*(a[:1] for a in args))
            error = ((out[:1] - ref).abs().max() / ref.abs().max()).item()
            return graph_time(fp8_index_scores, [args]), error
    finally:
        fp8_index._tile_config, fp8_index.MAX_PRODUCT_COLUMNS = shipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out")
    opts = parser.parse_args()
    bw, peak = copy_bandwidth(), fp8_peak()
    rows = [f"{torch.cuda.get_device_name()}, {datetime.date.today()}, torch {torch.__version__}, copy "
            f"{bw / 1e12:.2f} TB/s, FP8 {peak / 1e12:.0f} TFLOP/s", "",
            "| batch | M | N | columns/product | BLOCK_N | warps | stages | programs/SM | us | /floor | max rel err |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    print("\n".join(rows), flush=True)
    for batch, m, n in CASES:
        args = fp8_inputs(batch, m, n)
        settle_fp8_inputs([args])  # else the first configuration timed runs on unsettled inputs
        floor = max(fp8_floors(batch, m, n, bw, peak))
        for config in CONFIGS:
            try:
                seconds, error = run_config(config, args)
            except Exception as err:  # a configuration the compiler or the SM cannot take (registers, shared memory)
                rows.append(f"| {batch} | {m} | {n // 1024}K | {config} | failed: {type(err).__name__} |")
                print(rows[-1], flush=True)
                continue
            shown = ("*", "", "", "", "") if config is None else config
            rows.append(f"| {batch} | {m} | {n // 1024}K | {' | '.join(map(str, shown))} | {seconds * 1e6:.1f} | "
                        f"{seconds / floor:.2f} | {error:.1e} |")
            print(rows[-1], flush=True)
    write_lines(opts.out, rows)


if __name__ == "__main__":
    main()
