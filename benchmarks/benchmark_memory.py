#!/usr/bin/env python
"""Accelerator memory of train_fairhuman_lora.py runs at real size, phase by phase (caption embedding, latent
caching, training step, validation sampling), estimated on the CPU from public configs on fake tensors
(memory_estimate.py, through the model's family), over a grid of settings; prints a markdown table
(docs/memory.md, README.md, benchmarks/RESULTS.md).

    python benchmarks/benchmark_memory.py                    # the docs' grid (each setting in a subprocess)
    python benchmarks/benchmark_memory.py --quick            # SD 1.5 only
    python benchmarks/benchmark_memory.py --families_2026    # Z-Image, FLUX.2 klein, Qwen-Image, Chroma (issue 27)
    python benchmarks/benchmark_memory.py --format out.jsonl # the table of saved results
    python memory_estimate.py --model flux-dev --rank 16 --mixed_precision bf16 --validation   # one, with details

Each setting runs once unquantized; its ``--quantize_base nf4`` and ``--quantize_text_encoders nf4`` rows are
derived from the same run (bitsandbytes' storage is analytic in memory_estimate.py as well: the bytes saved,
plus one dequantized weight, in each phase that holds the quantized model).
"""
import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

CACHED = ["--cache_latents", "--cache_text_embeddings"]
VALIDATION = ["--validation"]
GRID = [  # (model, rank, mode, extra flags of memory_estimate.py)
    ("sd15", 16, "fair_exact", VALIDATION), ("sdxl", 16, "fair_exact", CACHED + VALIDATION),
    ("flux-dev", 16, "fair_exact", CACHED + VALIDATION), ("sd35-large", 16, "fair_exact", CACHED + VALIDATION),
]
GRID_2026 = [  # issue 27: the 2026 families at 1024 px, rank 16 and 64 (NF4 rows derived from the same runs)
    (model, rank, "fair_exact", CACHED + VALIDATION + ["--resolution", "1024"])
    for model in ("zimage-turbo", "zimage", "flux2-klein-base-4b", "flux2-klein-base-9b", "qwen-image", "chroma")
    for rank in (16, 64)
]
FLOW_MODELS = ("flux-dev", "sd35-large", *dict.fromkeys(model for model, *_ in GRID_2026))
CARDS = (8, 12, 16, 24, 32, 48, 80)  # 8 (RTX 4060), 12, 16, 24 (RTX 4090), 32 (RTX 5090), 48, 80 GB
OVERHEAD_GIB = 1.0  # CUDA context + workspaces, on top of the tensors; and 10% allocator overhead


def fits(peak_gib):
    """The smallest card (GB = 10^9 bytes as sold) that holds the tensors + 10% + 1 GiB, or '>80 GB'."""
    need = (peak_gib * 1.1 + OVERHEAD_GIB) * 1024**3 / 1e9
    return next((f"{card} GB" for card in CARDS if need <= card), ">80 GB")


def derived_phases(r, quantization="none", text_quantization="none"):
    """The run's phases with the denoiser in ``quantization`` and the large text encoders in
    ``text_quantization`` (``r`` estimated with neither), by memory_estimate's own rule (``quantized_phases``;
    the large encoders never stay for the step: only CLIP-only families keep theirs)."""
    from memory_estimate import quantized_phases

    assert r["quantization"] == "none" and r["quantize_text_encoders"] == "none"
    saved, dequantized = r["quantization_options"].get(quantization, (0, 0))
    te_saved, te_dequantized = r["text_encoder_quantization_options"].get(text_quantization, (0, 0))
    return quantized_phases(r["phases"], r["step_phase_peak"], saved, dequantized, te_saved, te_dequantized)[0]


def table(results):
    lines = ["| model | res | rank | weighting | caches | base quant. | text-encoder quant. | caption embedding | "
             "latent caching | training step | validation sampling | **run peak** (phase) | smallest card |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        cached = r.get("cache_latents") and r.get("cache_text_embeddings")
        large_encoders = r["text_encoder_quantization_options"]["nf4"][0] > 0
        for q in ("none", "nf4") if large_encoders else ("none",):
            for tq in ("none", "nf4") if large_encoders else ("none",):
                phases = derived_phases(r, q, tq)
                peak = max(phases, key=phases.get)
                cells = [f"{phases[k] / 1024**3:.2f}" if k in phases else "-"
                         for k in ("caption", "latents", "step", "validation")]
                gib = phases[peak] / 1024**3
                lines.append(f"| {r['model']} | {r['resolution']} | {r['rank']} | {r['mode']} | "
                             f"{'latents + text' if cached else 'none'} | {q} | {tq} | {' | '.join(cells)} | "
                             f"**{gib:.2f}** ({peak}) | {fits(gib)} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default="memory_results.jsonl", help="results file (JSON lines, appended)")
    ap.add_argument("--quick", action="store_true", help="SD 1.5 rows only")
    ap.add_argument("--families_2026", action="store_true",
                    help="the grid of Z-Image (Turbo, Base), FLUX.2 klein base 4B / 9B, Qwen-Image and Chroma instead")
    ap.add_argument("--format", default=None, help="print the table of this results file and exit")
    args = ap.parse_args()
    if args.format:
        with open(args.format) as f:
            print(table([json.loads(line) for line in f if line.strip()]))
        return
    for model, rank, mode, extra in GRID_2026 if args.families_2026 else GRID:
        if args.quick and model != "sd15":
            continue
        precision = ["--mixed_precision", "bf16"] if model in FLOW_MODELS else []
        subprocess.run([sys.executable, os.path.join(REPO, "memory_estimate.py"), "--model", model, "--rank", str(rank),
                        "--mode", mode, "--no_flops", "--quiet", "--json", args.json, *precision, *extra], check=False)
    with open(args.json) as f:
        print(table([json.loads(line) for line in f if line.strip()]))


if __name__ == "__main__":
    main()
