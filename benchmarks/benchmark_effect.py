#!/usr/bin/env python
"""Does the FairHuman weighting change hands and faces? A controlled experiment on the CPU.

    nice -n 10 python benchmarks/benchmark_effect.py            # full: 5 seeds x 10 modes (~20 min on 2 cores as 2 processes, --only_seed)
    nice -n 10 python benchmarks/benchmark_effect.py --quick    # a few minutes: 1 seed, 80 steps, 5 modes
    nice -n 10 python benchmarks/benchmark_effect.py --shoes --seeds 5   # three regions (K = 4): hands, faces, shoes

1. A base model that denoises COARSE drawn people (hands and faces are plain ellipses, larger than the
   demo's: ``PERSON``): the tiny demo SD model (``fairhuman_demo.build_tiny_pipeline``, VAE made
   near-deterministic with unit-spread latents) whose whole UNet is pretrained here on coarse people.
   Cached under ``--cache_dir`` (gitignored): reruns skip it. The same UNet trained with the same budget on
   DETAILED people gives the ceiling: the most any fine-tune of this model size can lower the errors.
2. Fine-tunes with the recipe, ``train_fairhuman_lora.py``'s ``main`` run in this process exactly as
   from the command line (only flags), on DETAILED people (finger strokes, hair, eyes, mouth) that the base
   has never seen: one run per (mode, seed).
3. Held-out denoising error of every LoRA on other detailed people with fixed (noise, timestep)
   draws: global (whole latent), hand region and face region (mean squared error inside the boxes),
   by timestep band; paired differences against ``--weighting global`` of the same seed, mean over
   seeds with a t interval.

With ``--shoes`` the people also wear shoes (plain blocks in the base's data, sole, toe cap and laces in
the detailed data: ``fairhuman_demo.draw_person(shoes=True)``), every run names three regions
(``--region hand=hand_boxes --region face=face_boxes --region shoe=shoe_boxes``, K = 4 objectives) and
the errors are reported for each; data version 3, its own cache entries and ``--output_dir`` ``effect_k4``.

Writes ``{--output_dir}/effect.json`` (every number), ``effect.png`` (the plot) and prints a Markdown
table for ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, machine, read_scalars  # noqa: E402

import fairhuman_demo  # noqa: E402
import fairhuman_utils as fh  # noqa: E402

RESOLUTION = 64  # the "tiny-vae4" VAE quarters it: 16x16 latents
MODEL_SIZE, VAE_FACTOR = "tiny-vae4", 4
# larger people than the demo's (faces 17-34 px wide on 64 px, hands 3/4 of the face): 4-8 latent cells
PERSON = dict(person_scale=1.6, hand_scale=0.75)
DATA_VERSION = 2  # 1: demo-sized people, detail without hair (the first measurement); part of every cache key
SHOES_DATA_VERSION = 3  # --shoes: the same people wearing shoes (a third region)
SHOE_REGIONS = ["--region", "hand=hand_boxes", "--region", "face=face_boxes", "--region", "shoe=shoe_boxes"]
SHOE_MODES = ["global", "equal s=1", "equal s=5", "fair exact", "fair interval 8"]
CAPTIONS = [f"a photo of a person{' waving ' + str(n) + ' hands' if n else ''}" for n in range(3)]
BANDS = [(0, 333), (333, 667), (667, 1000)]
STATIC_AT_MPD = "static at MPD's mean balance"
# mode name -> flags of train_fairhuman_lora.py (on top of the common ones)
MODES = {
    "global": ["--weighting", "global"],
    "equal s=1": ["--weighting", "equal", "--local_loss_scale", "1"],
    "equal s=2": ["--weighting", "equal", "--local_loss_scale", "2"],
    "equal s=5": ["--weighting", "equal", "--local_loss_scale", "5"],
    "fair exact": ["--weighting", "fair", "--fair_update_interval", "1"],
    "fair interval 8": ["--weighting", "fair", "--fair_update_interval", "8", "--fair_interval_calibration", "diagonal"],
    "fair interval 8, trace calibration": ["--weighting", "fair", "--fair_update_interval", "8",
                                           "--fair_interval_calibration", "trace"],
    "fair exact alpha=1": ["--weighting", "fair", "--fair_update_interval", "1", "--fair_alpha", "1"],
    "fair exact alpha=8": ["--weighting", "fair", "--fair_update_interval", "1", "--fair_alpha", "8"],
    # a STATIC weighting at exact MPD's mean balance (its mean coefficients K w on this experiment, global 371,
    # hand 24.8, face 4.37, divided by the global one; same s = 5): does MPD's per-batch adaptivity add anything?
    STATIC_AT_MPD: [],  # set from --static_weights
}
# optional (--modes): the other cheap variants
EXTRA_MODES = {
    "fair default": ["--weighting", "fair"],  # whatever the script's default is (exact since issue 9)
    "equal s=0.5": ["--weighting", "equal", "--local_loss_scale", "0.5"],
    "fair interval 8, reuse": ["--weighting", "fair", "--fair_update_interval", "8", "--fair_interval_weights", "reuse"],
    "fair interval 4": ["--weighting", "fair", "--fair_update_interval", "4"],
}
# the cheap modes also run with --fair_fidelity_check (same updates, exact weights logged beside them) for
# the first seed: their weight ratios come from that seed, their step cost from the others
CHEAP_MODES = ["fair interval 8", "fair interval 8, trace calibration", "fair interval 8, reuse", "fair interval 4"]
QUICK_MODES = ["global", "equal s=1", "equal s=5", "fair exact", "fair interval 8"]
STATIC_CURVE = ["equal s=0.5", "equal s=1", "equal s=2", "equal s=5"]


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 80 steps, 5 modes (a few minutes).")
    parser.add_argument("--seeds", type=int, default=5, help="Fine-tune seeds per mode (paired across modes).")
    parser.add_argument("--modes", type=str, default=None, help="Comma-separated subset of the modes (default: all).")
    parser.add_argument("--max_train_steps", type=int, default=300, help="LoRA fine-tune steps.")
    parser.add_argument("--train_images", type=int, default=200, help="Detailed people in the fine-tune set.")
    parser.add_argument("--eval_images", type=int, default=64, help="Held-out detailed people.")
    parser.add_argument("--eval_draws", type=int, default=8, help="Fixed (noise, timestep) draws per held-out image.")
    parser.add_argument("--pretrain_steps", type=int, default=1500, help="Base-model pretraining steps on coarse people.")
    parser.add_argument("--cache_dir", type=str, default=os.path.join(REPO, "benchmarks", ".effect_cache"),
                        help="The pretrained base, the datasets and finished runs (gitignored; reruns reuse them).")
    parser.add_argument("--output_dir", type=str, default=os.path.join(REPO, "benchmarks", "effect"),
                        help="Where effect.json and effect.png go.")
    parser.add_argument("--train_args", type=str, default="--rank 16 --learning_rate 1e-3 --train_batch_size 4 "
                        "--lora_target_modules to_q,to_k,to_v,to_out.0,conv1,conv2 --mask_dilation 1",
                        help="Flags common to every fine-tune.")
    parser.add_argument("--only_seed", type=int, default=None,
                        help="Run (and cache) this seed's runs only, no summary: start one process per seed to use "
                             "several cores, then run again without it to summarise.")
    parser.add_argument("--model_size", type=str, default=MODEL_SIZE, choices=["tiny-vae4", "small-vae4"],
                        help="The base UNet: the tiny demo UNet (1.0M parameters) or one with 2 layers per level and "
                             "64/128 channels (5.5M; ~4x the time). Both on the same 3-level VAE.")
    parser.add_argument("--static_weights", type=str, default="0.0668,0.0118",
                        help=f"hand,face weights of the mode {STATIC_AT_MPD!r}: exact MPD's mean coefficients divided by "
                             "the global one, read off the 'fair exact' runs (the default: this experiment's tiny model).")
    parser.add_argument("--skip_ceiling", action="store_true",
                        help="Do not train (once, cached) the same UNet on DETAILED people with the base's budget, whose "
                             "held-out errors bound what any fine-tune of this model size can reach (skipped by --quick).")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy CPU).")
    parser.add_argument("--shoes", action="store_true",
                        help="Three regions (K = 4 objectives): the people also wear shoes, a third detailed region "
                             f"trained with named regions ({' '.join(SHOE_REGIONS)}); default modes {SHOE_MODES}, "
                             "no ceiling, output_dir effect_k4.")
    args = parser.parse_args(input_args)
    args.regions = ["hand", "face", "shoe"] if args.shoes else ["hand", "face"]
    args.data_version = SHOES_DATA_VERSION if args.shoes else DATA_VERSION
    if args.shoes:
        args.skip_ceiling = True
        args.modes = args.modes or ",".join(SHOE_MODES)
        if args.output_dir == os.path.join(REPO, "benchmarks", "effect"):
            args.output_dir = os.path.join(REPO, "benchmarks", "effect_k4")
    if args.quick:
        args.seeds, args.max_train_steps, args.skip_ceiling = 1, 80, True
        args.modes = args.modes or ",".join(QUICK_MODES)
        args.output_dir = args.output_dir + "_quick"
    args.modes = [m.strip() for m in args.modes.split(",")] if args.modes else list(MODES)
    MODES.update(EXTRA_MODES)
    hand, face = args.static_weights.split(",")
    MODES[STATIC_AT_MPD] = ["--weighting", "equal", "--local_loss_scale", "5", "--hand_loss_weight", hand.strip(),
                            "--face_loss_weight", face.strip()]
    if args.shoes and STATIC_AT_MPD in (args.modes or []):
        parser.error(f"--modes: {STATIC_AT_MPD!r} has hand and face weights only; not with --shoes")
    unknown = [m for m in args.modes if m not in MODES]
    if unknown:
        parser.error(f"--modes: unknown {unknown}; known: {list(MODES)}")
    if "global" not in args.modes:
        parser.error("--modes must include global (the baseline of the paired differences)")
    return args


# ---- data --------------------------------------------------------------------------------------


def draw_people(n: int, seed: int, detailed: bool, shoes: bool = False):
    """``n`` people, each from its own generator: the coarse and detailed versions show the same people
    (``(image, faces, hands)``, with ``shoes`` ``(image, faces, hands, shoes)``)."""
    extra = {"shoes": True} if shoes else {}
    return [fairhuman_demo.draw_person(RESOLUTION, RESOLUTION, random.Random(seed * 1_000_003 + i), detailed=detailed,
                                       **PERSON, **extra) for i in range(n)]


def encode(vae, images, batch: int = 64):
    """Latents ``mean * scaling_factor`` (the demo VAE's sampling std is ~1e-3 of their spread)."""
    import torch

    out = []
    for i in range(0, len(images), batch):
        pixels = np.stack([np.asarray(im) for im in images[i : i + batch]])
        pixels = torch.tensor(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.no_grad():
            out.append(vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor)
    return torch.cat(out)


def text_embeddings(pipe, captions):
    import torch

    ids = pipe.tokenizer(captions, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


# ---- the base model ----------------------------------------------------------------------------


def pretrain_base(folder: str, steps: int, num_images: int = 2000, batch: int = 16, lr: float = 2e-3,
                  detailed: bool = False, model_size: str = MODEL_SIZE, shoes: bool = False) -> dict:
    """The tiny demo SD model (UNet ``model_size``) with its WHOLE UNet trained to denoise coarse people (epsilon loss); with
    ``detailed`` on detailed people instead (the ceiling: what a model of this size can reach on them)."""
    import torch
    from diffusers import StableDiffusionPipeline

    start = time.perf_counter()
    raw = folder + "-random"
    fairhuman_demo.build_tiny_pipeline(raw, sample_size=RESOLUTION // VAE_FACTOR, size=model_size)
    pipe = StableDiffusionPipeline.from_pretrained(raw, safety_checker=None)
    people = draw_people(num_images, seed=1000, detailed=detailed, shoes=shoes)
    latents = encode(pipe.vae, [p[0] for p in people])
    embeds = text_embeddings(pipe, CAPTIONS)
    caption_index = torch.tensor([len(p[2]) for p in people])
    unet, scheduler = pipe.unet, pipe.scheduler
    unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-2)
    lr_schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for step in range(steps):
        idx = torch.randint(0, len(latents), (batch,), generator=gen)
        noise = torch.randn(latents[idx].shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=gen)
        pred = unet(scheduler.add_noise(latents[idx], noise, t), t, embeds[caption_index[idx]]).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()
        losses.append(float(loss))
        if step % 100 == 0 or step == steps - 1:
            print(f"  pretrain step {step}/{steps}: loss {np.mean(losses[-100:]):.4f}", flush=True)
    unet.eval()
    fairhuman_demo.save_pipeline(folder, unet=unet, vae=pipe.vae, text_encoder=pipe.text_encoder)
    info = {"steps": steps, "images": num_images, "batch": batch, "lr": lr, "final_loss": float(np.mean(losses[-100:])),
            "seconds": time.perf_counter() - start}
    with open(os.path.join(folder, "pretrain.json"), "w") as f:
        json.dump(info, f)
    return info


# ---- evaluation ----------------------------------------------------------------------------------


class HeldOut:
    """Held-out detailed people, their latents, soft box masks on the latent grid and fixed
    (noise, timestep) draws (timesteps stratified over the bands)."""

    def __init__(self, pipe, num_images: int, draws: int, seed: int = 2, detailed: bool = True,
                 regions=("hand", "face")):
        import torch

        self.regions = list(regions)
        people = draw_people(num_images, seed=seed, detailed=detailed, shoes="shoe" in self.regions)
        latents = encode(pipe.vae, [p[0] for p in people])
        embeds = text_embeddings(pipe, CAPTIONS)
        gen = torch.Generator().manual_seed(seed)
        size = latents.shape[-1]
        masks = []
        for _, faces, hands, *shoes in people:
            pixel = [fh.boxes_to_mask(boxes, RESOLUTION, RESOLUTION) for boxes in (hands, faces, *shoes)]
            pixel = torch.stack([torch.tensor(np.asarray(m), dtype=torch.float32) / 255 for m in pixel])
            masks.append(fh.masks_to_latent(pixel[None], (size, size), "soft")[0])
        masks = torch.stack(masks)
        rows = []  # one row per (image, draw)
        for d in range(draws):
            band = BANDS[d % len(BANDS)]
            t = torch.randint(band[0], band[1], (num_images,), generator=gen)
            noise = torch.randn(latents.shape, generator=gen)
            rows.append((t, noise))
        self.timesteps = torch.cat([r[0] for r in rows])
        self.noise = torch.cat([r[1] for r in rows])
        self.latents = latents.repeat(draws, 1, 1, 1)
        self.masks = masks.repeat(draws, 1, 1, 1)
        self.embeds = embeds[torch.tensor([len(p[2]) for p in people])].repeat(draws, 1, 1)

    def errors(self, unet, scheduler, batch: int = 128) -> dict:
        """Per (image, draw): global MSE and the MSE inside each region's boxes (NaN where absent)."""
        import torch

        out = {name: [] for name in ["global", *self.regions]}
        with torch.no_grad():
            for i in range(0, len(self.latents), batch):
                sl = slice(i, i + batch)
                noisy = scheduler.add_noise(self.latents[sl], self.noise[sl], self.timesteps[sl])
                sq = (unet(noisy, self.timesteps[sl], self.embeds[sl]).sample - self.noise[sl]).pow(2).mean(dim=1)
                out["global"].append(sq.mean(dim=(1, 2)))
                for k, name in enumerate(self.regions):
                    m = self.masks[sl, k]
                    area = m.sum(dim=(1, 2))
                    out[name].append(torch.where(area > 0, (m * sq).sum(dim=(1, 2)) / area.clamp_min(1e-8), float("nan")))
        return {k: torch.cat(v).numpy().astype(float) for k, v in out.items()}

    def summary(self, per_row: dict) -> dict:
        """Mean errors overall and by timestep band."""
        t = self.timesteps.numpy()
        result = {}
        for name, values in per_row.items():
            result[name] = float(np.nanmean(values))
            for lo, hi in BANDS:
                result[f"{name} t{lo}-{hi}"] = float(np.nanmean(values[(t >= lo) & (t < hi)]))
        return result


# ---- runs ----------------------------------------------------------------------------------------


def mode_flags(mode: str, seed: int, shoes: bool = False) -> list[str]:
    return (MODES[mode] + (["--fair_fidelity_check"] if mode in CHEAP_MODES and seed == 0 else [])
            + (SHOE_REGIONS if shoes else []))


def run_key(args, mode: str, seed: int) -> str:
    key = [mode_flags(mode, seed, args.shoes), args.train_args, args.max_train_steps, args.train_images,
           args.pretrain_steps, seed, args.data_version]
    text = json.dumps(key if args.model_size == MODEL_SIZE else key + [args.model_size])
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def fine_tune(args, base: str, data: str, out: str, mode: str, seed: int) -> dict:
    """One run of the recipe (its main(), flags only) and what it logged."""
    import shutil

    from accelerate.state import AcceleratorState, GradientState, PartialState

    import train_fairhuman_lora as train

    shutil.rmtree(out, ignore_errors=True)
    argv = ["--pretrained_model_name_or_path", base, "--train_data_dir", data, "--output_dir", out,
            "--resolution", str(RESOLUTION), "--max_train_steps", str(args.max_train_steps), "--seed", str(seed),
            "--report_to", "tensorboard", "--checkpointing_steps", "1000000", *args.train_args.split(),
            *mode_flags(mode, seed, args.shoes)]
    for state in (AcceleratorState, GradientState, PartialState):
        state._reset_state(*( [True] if state is AcceleratorState else []))
    start = time.perf_counter()
    train.main(train.parse_args(argv))
    seconds = time.perf_counter() - start
    for state in (AcceleratorState, GradientState, PartialState):
        state._reset_state(*( [True] if state is AcceleratorState else []))
    logs = read_scalars(os.path.join(out, "logs"))
    info = {"seconds": seconds, "step_seconds": float(np.median(logs["perf/step_seconds"][1:]))}
    for name in ["global", *args.regions]:
        info[f"weight/{name}"] = float(np.mean(logs[f"weight/{name}"]))
    for tag, values in logs.items():
        if tag.startswith("fidelity/"):
            info[tag] = float(np.nanmean(values))
    return info


def percent_change(new: float, old: float) -> float:
    """``new`` relative to ``old`` in percent (negative = lower error = better)."""
    return 100 * (new / old - 1)


def changes(new: dict, old: dict) -> str:
    """``global -1.22 %, hand -0.43 %, face -1.44 %``: the errors ``new`` relative to ``old`` (every objective
    both have, in ``new``'s order)."""
    names = [n for n in new if n in old and " t" not in n]
    return ", ".join(f"{n} {percent_change(new[n], old[n]):+.2f} %" for n in names)


def t_interval(diffs):
    """Mean and the half-width of the 95 % t interval (NaN for one value)."""
    diffs = np.asarray(diffs, dtype=float)
    if len(diffs) < 2:
        return float(diffs.mean()), float("nan")
    df = len(diffs) - 1
    t975 = T975[df - 1] if df <= len(T975) else 1.96 + 2.4 / df  # Student's t 0.975 quantile (no scipy here)
    return float(diffs.mean()), float(t975 * diffs.std(ddof=1) / math.sqrt(len(diffs)))


T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228]


def main(args):
    import torch
    from diffusers import StableDiffusionPipeline

    # one thread: on a shared 2-core machine two threads per process were measured 3-10x SLOWER
    torch.set_num_threads(args.threads)
    experiment_start = time.perf_counter()
    os.makedirs(args.cache_dir, exist_ok=True)
    os.makedirs(args.output_dir, exist_ok=True)
    size = "" if args.model_size == MODEL_SIZE else f"{args.model_size}-"
    base = os.path.join(args.cache_dir, f"base-v{args.data_version}-{size}{args.pretrain_steps}")
    if not os.path.exists(os.path.join(base, "pretrain.json")):
        print(f"pretraining the base model on coarse people ({args.pretrain_steps} steps; cached in {base})", flush=True)
        pretrain_base(base, args.pretrain_steps, model_size=args.model_size, shoes=args.shoes)
    with open(os.path.join(base, "pretrain.json")) as f:
        pretrain = json.load(f)
    data = os.path.join(args.cache_dir, f"detailed-v{args.data_version}-{args.train_images}")
    if not os.path.exists(os.path.join(data, "metadata.jsonl")):
        fairhuman_demo.build_demo_dataset(data, num_images=args.train_images, seed=7, detailed=True, size=RESOLUTION,
                                          **PERSON, **({"shoes": True} if args.shoes else {}))

    objectives = ["global", *args.regions]
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None)
    pipe.unet.eval()
    held_out = HeldOut(pipe, args.eval_images, args.eval_draws, regions=args.regions)
    base_errors = held_out.summary(held_out.errors(pipe.unet, pipe.scheduler))
    # the same people, plain
    coarse = HeldOut(pipe, args.eval_images, args.eval_draws, detailed=False, regions=args.regions)
    base_coarse = coarse.summary(coarse.errors(pipe.unet, pipe.scheduler))
    print(f"base model: detailed held-out {' / '.join(f'{base_errors[n]:.4f}' for n in objectives)} "
          f"({'/'.join(objectives)}); coarse {' / '.join(f'{base_coarse[n]:.4f}' for n in objectives)}", flush=True)
    ceiling = None
    if not args.skip_ceiling:
        ceiling_dir = base + "-detailed"
        if not os.path.exists(os.path.join(ceiling_dir, "pretrain.json")):
            print(f"training the ceiling model on detailed people ({args.pretrain_steps} steps; cached in {ceiling_dir})",
                  flush=True)
            pretrain_base(ceiling_dir, args.pretrain_steps, detailed=True, model_size=args.model_size)
        ceiling_unet = StableDiffusionPipeline.from_pretrained(ceiling_dir, safety_checker=None).unet.eval()
        ceiling = held_out.summary(held_out.errors(ceiling_unet, pipe.scheduler))
        del ceiling_unet
        print(f"ceiling (the same UNet trained on detailed people) vs the base: {changes(ceiling, base_errors)}",
              flush=True)

    runs = {}
    for seed in range(args.seeds) if args.only_seed is None else [args.only_seed]:
        for mode in args.modes:
            key = run_key(args, mode, seed)
            record = os.path.join(args.cache_dir, "runs", f"{key}.json")
            if os.path.exists(record):
                with open(record) as f:
                    runs[(mode, seed)] = json.load(f)
                continue
            out = os.path.join(args.cache_dir, "runs", key)
            print(f"[{time.perf_counter() - experiment_start:6.0f}s] {mode}, seed {seed}", flush=True)
            info = fine_tune(args, base, data, out, mode, seed)
            pipe.load_lora_weights(out)
            per_row = held_out.errors(pipe.unet, pipe.scheduler)
            pipe.unload_lora_weights()
            info.update(mode=mode, seed=seed, errors=held_out.summary(per_row),
                        per_row={k: v.tolist() for k, v in per_row.items()})
            with open(record, "w") as f:
                json.dump(info, f)
            runs[(mode, seed)] = info
            e = info["errors"]
            print(f"    {' / '.join(f'{e[n]:.4f}' for n in objectives)} in {info['seconds']:.0f}s", flush=True)

    if args.only_seed is not None:
        return None

    # ---- paired comparison ---------------------------------------------------------------------
    seeds = range(args.seeds)
    table = {}
    for mode in args.modes:
        row = {"flags": " ".join(MODES[mode])}
        for name in objectives:
            row[name] = float(np.mean([runs[(mode, s)]["errors"][name] for s in seeds]))
            # relative change vs global of the same seed, in percent
            diffs = [percent_change(runs[(mode, s)]["errors"][name], runs[("global", s)]["errors"][name]) for s in seeds]
            row[f"{name} vs global %"], row[f"{name} vs global ci"] = t_interval(diffs)
            for lo, hi in BANDS:
                band = f"{name} t{lo}-{hi}"
                row[band] = float(np.mean([runs[(mode, s)]["errors"][band] for s in seeds]))
                row[f"{band} vs global %"] = float(np.mean(
                    [percent_change(runs[(mode, s)]["errors"][band], runs[("global", s)]["errors"][band]) for s in seeds]))
        timed = [s for s in seeds if not (mode in CHEAP_MODES and s == 0)] or list(seeds)
        row["step_seconds"] = float(np.mean([runs[(mode, s)]["step_seconds"] for s in timed]))
        for tag in runs[(mode, 0)]:
            if tag.startswith("weight/") or tag.startswith("fidelity/"):
                row[tag] = float(np.nanmean([runs[(mode, s)].get(tag, float("nan")) for s in seeds]))
        table[mode] = row
    for mode, row in table.items():
        row["cost vs global"] = row["step_seconds"] / table["global"]["step_seconds"]
        if "fair exact" in table and mode.startswith("fair"):
            # the region coefficients relative to the global one, against exact MPD's (1 = the same balance)
            exact = table["fair exact"]
            for name in args.regions:
                row[f"{name}/global coefficient vs exact"] = ((row[f"weight/{name}"] / row["weight/global"])
                                                               / (exact[f"weight/{name}"] / exact["weight/global"]))
    for name in args.regions:
        exact_gain = table.get("fair exact", {}).get(f"{name} vs global %")
        for row in table.values():
            if exact_gain:
                row[f"{name} share of exact's gain"] = row[f"{name} vs global %"] / exact_gain

    # the question of item 3: does MPD beat a static weighting with its own mean balance? (paired per seed)
    static_vs_fair = None
    if STATIC_AT_MPD in table and "fair exact" in table:
        static_vs_fair = {name: t_interval([percent_change(runs[(STATIC_AT_MPD, s)]["errors"][name],
                                                           runs[("fair exact", s)]["errors"][name]) for s in seeds])
                          for name in objectives}
    elapsed = time.perf_counter() - experiment_start
    result = {"machine": machine(), "seconds": elapsed, "args": {k: v for k, v in vars(args).items()},
              "pretrain": pretrain, "base_detailed": base_errors, "base_coarse": base_coarse, "ceiling": ceiling,
              "table": table, "static_vs_fair_exact": static_vs_fair, "objectives": objectives}
    with open(os.path.join(args.output_dir, "effect.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(table, base_errors, os.path.join(args.output_dir, "effect.png"), args.seeds, args.regions)
    print(markdown(result))
    return result


def markdown(result) -> str:
    table = result["table"]
    names = result.get("objectives", ["global", "hand", "face"])
    regions = names[1:]
    slash = " / ".join(names)
    base_d, base_c = result["base_detailed"], result["base_coarse"]
    lines = [f"Machine: {result['machine']}. Experiment time {result['seconds'] / 60:.1f} min "
             f"(base pretraining {result['pretrain']['seconds'] / 60:.1f} min, cached).",
             f"Base model on held-out detailed people: {', '.join(f'{n} {base_d[n]:.4f}' for n in names)} (on the same "
             f"people drawn coarse: {', '.join(f'{base_c[n]:.4f}' for n in names)}). Global-only fine-tune vs the base: "
             f"{changes(table['global'], result['base_detailed'])}."
             + ("" if not result.get("ceiling") else " Ceiling (the same UNet trained on detailed people with the "
                f"base's budget) vs the base: {changes(result['ceiling'], result['base_detailed'])}."), "",
             "| mode | " + " | ".join(f"{n} err" for n in names) + " | global vs global-only % | "
             + " | ".join(f"{n} %" for n in regions) + f" | coef. {slash} (K w, mean) | "
             + ", ".join(f"{n}/global" for n in regions) + " coef. vs exact | "
             f"per-step weight ratio {slash} (applied / exact) | step cost |",
             "|" + " --- |" * (2 * len(names) + 5)]

    def pm(row, name):
        mean, ci = row[f"{name} vs global %"], row[f"{name} vs global ci"]
        return f"{mean:+.2f}" + ("" if math.isnan(ci) else f" ± {ci:.2f}")

    for mode, row in table.items():
        ratios = (" / ".join(f"{row[f'fidelity/weight_ratio_{n}']:.2f}" for n in names)
                  if f"fidelity/weight_ratio_{regions[0]}" in row else "")
        balance = (", ".join(f"{row[f'{n}/global coefficient vs exact']:.2f}" for n in regions)
                   if f"{regions[0]}/global coefficient vs exact" in row else "")
        coefficients = " / ".join(f"{row[f'weight/{n}']:.3g}" for n in names)
        lines.append(f"| {mode} | " + " | ".join(f"{row[n]:.4f}" for n in names) + " | "
                     + " | ".join(pm(row, n) for n in names) + f" | {coefficients} | {balance} | {ratios} | "
                     f"{row['cost vs global']:.2f}x |")
    if result.get("static_vs_fair_exact"):
        lines += ["", f"{STATIC_AT_MPD} vs fair exact, paired per seed (%, negative = the static weighting is better): "
                  + ", ".join(f"{n} {m:+.2f} ± {ci:.2f}" for n, (m, ci) in result["static_vs_fair_exact"].items())]
    lines += ["", f"By timestep band (mean paired change vs global-only training, %; {slash}):", "",
              "| mode | " + " | ".join(f"t in [{lo}, {hi})" for lo, hi in BANDS) + " |",
              "| --- |" + " --- |" * len(BANDS)]
    for mode, row in table.items():
        cells = [" / ".join(f"{row[f'{n} t{lo}-{hi} vs global %']:+.2f}" for n in names)
                 for lo, hi in BANDS]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(table, base_errors, path, seeds, regions=("hand", "face")) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(regions), figsize=(5.5 * len(regions), 4.5))
    for ax, name in zip(axes, regions):
        curve = [m for m in ["global", *STATIC_CURVE] if m in table]
        ax.plot([table[m]["global vs global %"] for m in curve], [table[m][f"{name} vs global %"] for m in curve],
                "-", color="gray", label="static weightings: global, then equal with growing s")
        for mode, row in table.items():
            marker = "s" if mode in curve else "o"
            xerr = None if math.isnan(row["global vs global ci"]) else row["global vs global ci"]
            yerr = None if math.isnan(row[f"{name} vs global ci"]) else row[f"{name} vs global ci"]
            ax.errorbar(row["global vs global %"], row[f"{name} vs global %"], xerr=xerr, yerr=yerr, fmt=marker,
                        capsize=3, label=mode)
        ax.set_xlabel("held-out global error vs global-only training (%)")
        ax.set_ylabel(f"held-out {name}-region error vs global-only training (%)")
        ax.axhline(0, lw=0.5, color="k")
        ax.axvline(0, lw=0.5, color="k")
        ax.set_title(f"{name}: lower-left is better ({seeds} seed{'s' if seeds > 1 else ''}, 95% t interval)")
    axes[-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main(parse_args())
