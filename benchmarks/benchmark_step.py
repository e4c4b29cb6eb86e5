#!/usr/bin/env python
"""Median optimizer-step time and peak memory of each weighting mode, as ratios to --weighting global.

    python benchmarks/benchmark_step.py --config tiny --steps 72 --rounds 5
    python benchmarks/benchmark_step.py --config mid --steps 24 --rounds 2 [--rank 256]
    # on a GPU: SD-1.5 / SDXL-sized UNets (public configs, random weights) at 512 / 1024 px
    python benchmarks/benchmark_step.py --config sd15 --batch_size 1 --steps 40 --rank 4 \
        --extra "--mixed_precision fp16 --gradient_checkpointing --use_8bit_adam"
    python benchmarks/benchmark_step.py --config sdxl --batch_size 1 --steps 40 --rank 256 \
        --extra "--mixed_precision fp16 --gradient_checkpointing --use_8bit_adam"

Every mode runs train_fairhuman_lora.py in a fresh process with the same model, data, seed and
flags; the step time is the script's own `perf/step_seconds` (wall time between optimizer steps,
data loading included), median and mean over the steps after --warmup (the mean includes the
periodic exact solves of --fair_update_interval, so it is the cost to compare for those modes); memory is `perf/peak_memory_mb`
(peak resident set on CPU, peak CUDA allocation on a GPU). The rounds are interleaved
(global, equal, fair, ..., global, equal, ...) and the median over rounds is reported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

from common import CONFIGS, machine, prepare, read_scalars, run_training

MODES = {  # name -> the script's flags
    "global": ["--weighting", "global"],
    "equal": ["--weighting", "equal"],
    "fair": ["--weighting", "fair", "--fair_update_interval", "1"],
    "fair-batched": ["--weighting", "fair", "--fair_update_interval", "1", "--fair_batched_backward"],
    "fair-interval2": ["--weighting", "fair", "--fair_update_interval", "2"],
    "fair-interval4": ["--weighting", "fair", "--fair_update_interval", "4"],
    "fair-interval8": ["--weighting", "fair", "--fair_update_interval", "8"],
    "fair-interval8-reuse": ["--weighting", "fair", "--fair_update_interval", "8", "--fair_interval_weights", "reuse"],
    "global-cached": ["--weighting", "global", "--cache_latents", "--cache_text_embeddings"],
    "fair-cached": ["--weighting", "fair", "--fair_update_interval", "1", "--cache_latents", "--cache_text_embeddings"],
}


def main(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--steps", type=int, default=40, help="Optimizer steps per run.")
    parser.add_argument("--warmup", type=int, default=8,
                        help="Steps left out; keep steps - warmup a multiple of the intervals so the mean covers "
                             "whole solve periods.")
    parser.add_argument("--rounds", type=int, default=2, help="Interleaved repetitions of every mode.")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank.")
    parser.add_argument("--resolution", type=int, default=None, help="Override the config's resolution.")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--modes", type=str, default=",".join(MODES), help="Comma-separated subset of the modes.")
    parser.add_argument("--extra", type=str, default="", help="More flags for every run, e.g. '--use_8bit_adam'.")
    parser.add_argument("--work_dir", type=str, default=os.path.join(tempfile.gettempdir(), "fairhuman-bench"))
    args = parser.parse_args(input_args)

    model, data, resolution = prepare(args.config, args.work_dir)
    resolution = args.resolution or resolution
    modes = [m.strip() for m in args.modes.split(",")]
    times = {m: [] for m in modes}
    means = {m: [] for m in modes}
    memory = {m: [] for m in modes}
    for r in range(args.rounds):
        for mode in modes:
            out = os.path.join(args.work_dir, "runs", f"{args.config}-{r}-{mode}")
            extra = MODES[mode] + ["--max_train_steps", str(args.steps), "--rank", str(args.rank),
                                   "--train_batch_size", str(args.batch_size)] + args.extra.split()
            run_training(model, data, out, resolution, extra)
            scalars = read_scalars(out)
            times[mode].append(statistics.median(scalars["perf/step_seconds"][args.warmup:]))
            means[mode].append(statistics.mean(scalars["perf/step_seconds"][args.warmup:]))
            memory[mode].append(max(scalars["perf/peak_memory_mb"]))
    step = {m: statistics.median(v) for m, v in times.items()}
    mean = {m: statistics.median(v) for m, v in means.items()}
    peak = {m: statistics.median(v) for m, v in memory.items()}
    base = "global" if "global" in step else modes[0]

    import types

    from peft import LoraConfig

    import model_families

    family = model_families.family_for_model(types.SimpleNamespace(
        pretrained_model_name_or_path=model, revision=None, variant=None, cache_dir=None))
    unet = family.denoiser_class().from_pretrained(model, subfolder=family.denoiser_name)
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=family.default_lora_targets.split(",")))
    lora = sum(p.numel() for n, p in unet.named_parameters() if "lora" in n)
    total = sum(p.numel() for p in unet.parameters()) - lora

    print(f"# {args.config}: {family.label} {family.denoiser_name} {total / 1e6:.1f}M parameters, LoRA rank {args.rank} = {lora / 1e6:.3f}M "
          f"parameters, {resolution}px, batch {args.batch_size}, {args.steps} steps x {args.rounds} rounds")
    print(f"# machine: {machine()}")
    print(f"# K copies of the LoRA gradient (fp32, K=3): {3 * lora * 4 / 2**20:.1f} MB")
    print(f"| mode | flags | median step (s) | x {base} | mean step (s) | x {base} | peak memory (MB) | "
          f"+ vs {base} (MB) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for mode in modes:
        print(f"| {mode} | `{' '.join(MODES[mode])}` | {step[mode]:.4f} | {step[mode] / step[base]:.2f} | "
              f"{mean[mode]:.4f} | {mean[mode] / mean[base]:.2f} | {peak[mode]:.0f} | {peak[mode] - peak[base]:+.0f} |")


if __name__ == "__main__":
    main()
