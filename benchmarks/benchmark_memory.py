#!/usr/bin/env python
"""Accelerator memory of one training step of train_fairhuman_lora.py at real size, estimated on the CPU from
public configs on fake tensors (memory_estimate.py: FakeTensorMode + MemTracker; FLOPs with FlopCounterMode in
a separate pass), over a grid of settings; prints a markdown table (docs/memory.md, benchmarks/RESULTS.md).

    python benchmarks/benchmark_memory.py                    # the docs' grid (each setting in a subprocess)
    python benchmarks/benchmark_memory.py --quick            # SD 1.5 only
    python benchmarks/benchmark_memory.py --format out.jsonl # the table of saved results
    python memory_estimate.py --model sdxl --rank 256 --mode fair_exact   # one setting, with details
"""
import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

CACHED = ["--cache_latents", "--cache_text_embeddings"]
GRID = [  # (model, rank, mode, extra flags of memory_estimate.py)
    ("sd15", 16, "plain", []), ("sd15", 16, "fair_exact", []), ("sd15", 256, "fair_exact", []),
    ("sdxl", 16, "plain", CACHED), ("sdxl", 16, "fair_exact", CACHED), ("sdxl", 64, "fair_exact", CACHED),
    ("sdxl", 256, "plain", []), ("sdxl", 256, "fair_exact", []), ("sdxl", 256, "plain", CACHED),
    ("sdxl", 256, "fair_exact", CACHED), ("sdxl", 256, "fair_interval", CACHED),
]
CARDS = (12, 16, 24, 48, 80)
OVERHEAD_GIB = 1.0  # CUDA context + workspaces, on top of the tensors; and 10% allocator overhead


def fits(peak_gib):
    """The smallest card (GB = 10^9 bytes as sold) that holds the tensors + 10% + 1 GiB, or '>80'."""
    need = (peak_gib * 1.1 + OVERHEAD_GIB) * 1024**3 / 1e9
    return next((f"{card} GB" for card in CARDS if need <= card), ">80 GB")


def table(results):
    lines = ["| model | res | rank | mode | caches | precision | peak tensors GiB (phase) | resident at start | "
             "smallest card that fits | flags |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        cached = r.get("cache_latents") and r.get("cache_text_embeddings")
        flags = ["--gradient_checkpointing", "--use_8bit_adam", f"--rank {r['rank']}", f"--mixed_precision {r['mixed_precision']}"]
        flags.append({"plain": "--weighting global", "fair_exact": "--weighting fair --fair_update_interval 1",
                      "fair_interval": "--weighting fair --fair_update_interval 8"}[r["mode"]])
        if cached:
            flags += ["--cache_latents", "--cache_text_embeddings"]
        peak = r["peak_total"] / 1024**3
        lines.append(f"| {r['model']} | {r['resolution']} | {r['rank']} | {r['mode']} | {'both' if cached else 'none'} | "
                     f"{r['mixed_precision']} | {peak:.2f} ({r['peak_phase']}) | {r['start_total'] / 1024**3:.2f} | "
                     f"{fits(peak)} | `{' '.join(flags)}` |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default="memory_results.jsonl", help="results file (JSON lines, appended)")
    ap.add_argument("--quick", action="store_true", help="SD 1.5 rows only")
    ap.add_argument("--format", default=None, help="print the table of this results file and exit")
    args = ap.parse_args()
    if args.format:
        with open(args.format) as f:
            print(table([json.loads(line) for line in f if line.strip()]))
        return
    for model, rank, mode, extra in GRID:
        if args.quick and model != "sd15":
            continue
        subprocess.run([sys.executable, os.path.join(REPO, "memory_estimate.py"), "--model", model, "--rank", str(rank),
                        "--mode", mode, "--no_flops", "--quiet", "--json", args.json, *extra], check=True)
    with open(args.json) as f:
        print(table([json.loads(line) for line in f if line.strip()]))


if __name__ == "__main__":
    main()
