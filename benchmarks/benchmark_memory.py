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
GRID = [  # (model, rank, mode, extra flags of memory_estimate.py); nf4 rows are derived from each run (see table())
    ("sd15", 16, "plain", []), ("sd15", 16, "fair_exact", []), ("sd15", 16, "fair_exact", CACHED),
    ("sdxl", 16, "plain", CACHED), ("sdxl", 16, "fair_exact", CACHED), ("sdxl", 16, "fair_exact", []),
    ("sdxl", 64, "plain", CACHED), ("sdxl", 64, "fair_exact", CACHED),
    ("sdxl", 256, "plain", []), ("sdxl", 256, "fair_exact", []), ("sdxl", 256, "plain", CACHED),
    ("sdxl", 256, "fair_exact", CACHED),
    ("flux-dev", 16, "plain", CACHED), ("flux-dev", 16, "fair_exact", CACHED), ("flux-dev", 64, "fair_exact", CACHED),
    ("sd35-large", 16, "plain", CACHED), ("sd35-large", 16, "fair_exact", CACHED),
    ("sd35-large", 64, "fair_exact", CACHED),
]
CARDS = (12, 16, 24, 48, 80)
OVERHEAD_GIB = 1.0  # CUDA context + workspaces, on top of the tensors; and 10% allocator overhead


def fits(peak_gib):
    """The smallest card (GB = 10^9 bytes as sold) that holds the tensors + 10% + 1 GiB, or '>80 GB'."""
    need = (peak_gib * 1.1 + OVERHEAD_GIB) * 1024**3 / 1e9
    return next((f"{card} GB" for card in CARDS if need <= card), ">80 GB")


def quantized_peak(r, quantization):
    """The run's peak with the denoiser's frozen Linear weights in ``quantization`` (memory_estimate's model:
    minus the bytes saved everywhere, plus one dequantized weight in the denoiser's phases)."""
    if quantization == "none":
        return r["peak_total"]
    saved, largest = r["quantization_options"][quantization]
    return max(v - saved + (largest if k not in ("vae_encode", "text_encode") else 0) for k, v in r["phase_peak"].items())


def table(results, quantizations=("none", "nf4")):
    lines = ["| model | res | rank | weighting | caches | quant. | precision | peak tensors GiB | smallest card |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        cached = r.get("cache_latents") and r.get("cache_text_embeddings")
        for q in quantizations if r["model"] in ("flux-dev", "sd35-large") else ("none",):
            peak = quantized_peak(r, q) / 1024**3
            lines.append(f"| {r['model']} | {r['resolution']} | {r['rank']} | {r['mode']} | "
                         f"{'latents + text' if cached else 'none'} | {q} | {r['mixed_precision']} | {peak:.2f} | "
                         f"{fits(peak)} |")
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
        precision = ["--mixed_precision", "bf16"] if model in ("flux-dev", "sd35-large") else []
        subprocess.run([sys.executable, os.path.join(REPO, "memory_estimate.py"), "--model", model, "--rank", str(rank),
                        "--mode", mode, "--no_flops", "--quiet", "--json", args.json, *precision, *extra], check=False)
    with open(args.json) as f:
        print(table([json.loads(line) for line in f if line.strip()]))


if __name__ == "__main__":
    main()
