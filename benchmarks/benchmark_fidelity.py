#!/usr/bin/env python
"""How close the cheap fair modes stay to exact per-step MPD, on the same batches.

    python benchmarks/benchmark_fidelity.py --steps 300

Each cheap mode (--fair_update_interval N with --fair_interval_weights prediction or reuse) trains
with --fair_fidelity_check: on every step between exact solves the script also computes the exact
per-objective gradients of that same batch and logs the cosine between the update it applied and
the exact MPD update (`fidelity/update_cosine`), the relative error of its coefficients
(`fidelity/weight_rel_error`) and, per objective, applied weight / exact weight
(`fidelity/weight_ratio_{global,hand,face}`). The trajectory is the cheap mode's own.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np
from common import CONFIGS, machine, prepare, read_scalars, run_training


def main(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--intervals", type=str, default="2,4,8,16")
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--work_dir", type=str, default=os.path.join(tempfile.gettempdir(), "fairhuman-bench"))
    args = parser.parse_args(input_args)

    model, data, resolution = prepare(args.config, args.work_dir)
    print(f"# {args.config}, {resolution}px, batch {args.batch_size}, {args.steps} steps, lr {args.learning_rate}, "
          f"random flip; machine: {machine()}")
    print("| interval | weights between solves | steps compared | update cosine: mean | p10 | min | "
          "weight rel. error: median | mean | weight ratio global / hand / face: median |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    variants = [("prediction", "diagonal"), ("prediction", "trace"), ("reuse", None)]
    for interval in [int(i) for i in args.intervals.split(",")]:
        for weights, calibration in variants:
            name = weights + (f", {calibration} calibration" if calibration else "")
            out = os.path.join(args.work_dir, "runs", f"fidelity-{args.config}-{interval}-{weights}-{calibration}")
            run_training(model, data, out, resolution, [
                "--weighting", "fair", "--fair_update_interval", str(interval), "--fair_interval_weights", weights,
                *(["--fair_interval_calibration", calibration] if calibration else []),
                "--fair_fidelity_check", "--max_train_steps", str(args.steps), "--random_flip",
                "--learning_rate", str(args.learning_rate), "--train_batch_size", str(args.batch_size)])
            scalars = read_scalars(out)
            cos = np.array(scalars["fidelity/update_cosine"])
            err = np.array(scalars["fidelity/weight_rel_error"])
            ratios = " / ".join(f"{np.nanmedian(scalars[f'fidelity/weight_ratio_{o}']):.3f}" for o in ("global", "hand", "face"))
            print(f"| {interval} | {name} | {len(cos)} | {cos.mean():.4f} | {np.percentile(cos, 10):.4f} | "
                  f"{cos.min():.4f} | {np.median(err):.3f} | {err.mean():.3f} | {ratios} |", flush=True)


if __name__ == "__main__":
    main()
