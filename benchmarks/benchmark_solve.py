#!/usr/bin/env python
"""What K objectives cost the fair update: the alpha-fair solve and the whole per-step combination.

    python benchmarks/benchmark_solve.py                       # K = 2, 3, 4, 8
    python benchmarks/benchmark_solve.py --ks 2,4,8 --params 200000,2000000

For each K (1 global + K - 1 regions): ``fairhuman_utils.solve_fair_weights`` on the Gram matrix of K
gradients with a shared part and conflicting region parts (like the recipe's: a large global gradient,
smaller region gradients), median over ``--repeats`` solves with the Newton iterations it took; and
``ObjectiveGradients.fair_update`` (Gram in float64 chunks + solve + writing ``K G w`` into ``.grad``) on
P trainable parameters (rank 4 of the mid-size benchmark UNet is 0.2M, rank 256 13M). The backward passes
(one per present objective) are not included: they cost what a backward pass costs, K times.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine  # noqa: E402

import fairhuman_utils as fh  # noqa: E402


def gradients(k: int, p: int, seed: int):
    import torch

    generator = torch.Generator().manual_seed(seed)
    common = torch.randn(p, generator=generator)
    rows = [20.0 * common + torch.randn(p, generator=generator)]
    for i in range(1, k):
        rows.append(0.3 * common + torch.randn(p, generator=generator) * (0.5 + i / k))
    return torch.stack(rows)


def main(input_args=None):
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ks", default="2,3,4,8", help="Numbers of objectives K.")
    parser.add_argument("--repeats", type=int, default=200, help="Solves per K (different gradients each).")
    parser.add_argument("--params", default="200000,2000000", help="P for the whole-update timing.")
    parser.add_argument("--update_repeats", type=int, default=5)
    args = parser.parse_args(input_args)
    torch.set_num_threads(1)
    ks = [int(k) for k in args.ks.split(",")]
    sizes = [int(p) for p in args.params.split(",")]
    print(f"# {machine()}; torch threads 1")
    print("| K | solve median (ms) | p90 (ms) | Newton residual (max) | "
          + " | ".join(f"fair_update at P = {p / 1e6:g}M (ms)" for p in sizes) + " |")
    print("| --- | --- | --- | --- |" + " --- |" * len(sizes))
    for k in ks:
        times, residuals = [], []
        for r in range(args.repeats):
            g = gradients(k, 64, seed=r).double()
            gram = g @ g.T
            start = time.perf_counter()
            w = fh.solve_fair_weights(gram)
            times.append(time.perf_counter() - start)
            residuals.append(float(fh.fair_equation_residual(gram, w)))
        times.sort()
        cells = []
        for p in sizes:
            params = [torch.nn.Parameter(torch.zeros(p))]
            grads = fh.ObjectiveGradients(params, k)
            update_times = []
            for r in range(args.update_repeats):
                g = gradients(k, p, seed=r)
                grads.accumulate(g @ params[0])  # d (g_i . x) / dx = g_i: row i holds g_i (not timed)
                start = time.perf_counter()
                grads.fair_update()
                update_times.append(time.perf_counter() - start)
            cells.append(f"{1000 * statistics.median(update_times):.1f}")
        print(f"| {k} | {1000 * statistics.median(times):.2f} | {1000 * times[int(0.9 * len(times))]:.2f} | "
              f"{max(residuals):.1e} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
