#!/usr/bin/env python
"""FairHuman LoRA training for Stable Diffusion 1.x/2.x and SDXL.

Shaped like diffusers' ``examples/text_to_image/train_text_to_image_lora.py``: ``parse_args`` and a
``main`` that reads top to bottom (accelerator, data check, models, LoRA, optimizer, data, loop,
save, card, push). What is FairHuman-specific -- region masks from boxes, the paired transform, the
three losses and the Minimum Potential Delay weights -- lives in ``fairhuman_utils.py``.

    accelerate launch train_fairhuman_lora.py \
      --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \
      --dataset_name your/dataset --output_dir out
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import importlib
import importlib.util
import json
import logging
import math
import os
import random
import re
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

import fairhuman_utils as fh
import model_families as mf

logger = logging.getLogger(__name__)

CHECKPOINT_MARKER = "fairhuman_state.json"
RUN_SETTINGS_FILE = "fairhuman_run_settings.json"  # in each checkpoint: the settings it was trained with
FAIR_STATE_FILE = "fair_update_state.json"  # in each checkpoint: FairUpdate.state_dict() as JSON (never a pickle)
# Exact MPD every step (the authors' method). The cheap interval mode (8, prediction weights, diagonal
# calibration) kept 97 % of exact's hand gain but 85 % of its face gain on the effect benchmark (5 seeds),
# per-objective weights 1.01 / 1.16 / 0.88 of exact's (benchmarks/RESULTS.md, issue 9).
DEFAULT_FAIR_UPDATE_INTERVAL = 1
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


TRACKERS_RECORDING_ARGV = ("wandb", "all")  # --report_to values whose tracker records sys.argv (wandb does)

UsageError = fh.UsageError  # bad input found before training starts; the message names the flag, column or row


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps in a row); the message says what to try."""


class HubError(RuntimeError):
    """The Hub could not be reached or refused a call; the message says what is saved and how to push it later."""


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------


def fair_gradient_dtype(choice: str, mixed_precision: str | None) -> torch.dtype:
    """The dtype of the fair update's region-gradient rows for ``--fair_gradient_dtype`` (``auto``: bf16 under
    fp16/bf16 mixed precision, fp32 otherwise)."""
    if choice == "auto":
        choice = "bf16" if mixed_precision in ("fp16", "bf16") else "fp32"
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[choice]


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description="FairHuman LoRA training (SD 1.x/2.x, SDXL, FLUX.1, SD3/3.5).")

    g = parser.add_argument_group("Model")
    g.add_argument("--pretrained_model_name_or_path", type=str, required=True,
                   help="Hub id or local folder of a diffusers SD 1.x/2.x or SDXL model (SDXL is recognised by text_encoder_2).")
    g.add_argument("--pretrained_vae_model_name_or_path", type=str, default=None,
                   help="A separate VAE, e.g. madebyollin/sdxl-vae-fp16-fix (what the authors used for SDXL in fp16).")
    g.add_argument("--revision", type=str, default=None, help="Revision of the pretrained model on the Hub.")
    g.add_argument("--variant", type=str, default=None, help="Variant of the model files, e.g. fp16.")
    g.add_argument("--cache_dir", type=str, default=None, help="Where downloaded models and datasets are cached.")
    g.add_argument("--quantize_base", type=str, default="none", choices=mf.QUANTIZE_CHOICES,
                   help="Load the frozen FLUX.1/SD3 transformer in 4-bit NF4 or 8-bit (bitsandbytes, diffusers' "
                        "BitsAndBytesConfig; needs a CUDA GPU); the LoRA on top trains in full precision. "
                        "Peak memory per setting: docs/model_families.md.")

    g = parser.add_argument_group("Flow matching (FLUX.1, SD3): as diffusers' train_dreambooth_lora_flux/_sd3.py")
    g.add_argument("--weighting_scheme", type=str, default=None, choices=mf.WEIGHTING_SCHEMES,
                   help="Timestep density and loss weighting (diffusers.training_utils); default: none for FLUX.1, "
                        "logit_normal for SD3 (the diffusers examples' defaults).")
    g.add_argument("--logit_mean", type=float, default=0.0, help="Mean of the logit_normal timestep density.")
    g.add_argument("--logit_std", type=float, default=1.0, help="Std of the logit_normal timestep density.")
    g.add_argument("--mode_scale", type=float, default=1.29, help="Scale of the mode timestep density.")
    g.add_argument("--guidance_scale", type=float, default=1.0,
                   help="FLUX.1-dev's guidance embedding during training. Default 1.0, as kohya's FLUX.1 docs and "
                        "diffusers' QLoRA FLUX example (diffusers' DreamBooth example uses 3.5); schnell has none.")
    g.add_argument("--precondition_outputs", type=int, default=1, choices=[0, 1],
                   help="SD3: EDM-style preconditioning of the prediction (prediction * -sigma + noisy, target x0), "
                        "as diffusers' SD3 example (default 1).")
    g.add_argument("--max_sequence_length", type=int, default=None,
                   help="T5 tokens per caption; default 512 for FLUX.1, 77 for SD3 (the diffusers examples').")

    g = parser.add_argument_group("Data")
    g.add_argument("--dataset_name", type=str, default=None,
                   help="Hub dataset id, a local dataset folder, or a folder written by Dataset.save_to_disk. "
                        "No dataset loading scripts are executed.")
    g.add_argument("--dataset_config_name", type=str, default=None, help="Config of the dataset, if it has several.")
    g.add_argument("--train_data_dir", type=str, default=None,
                   help="An imagefolder: images plus metadata.jsonl with the caption and box columns.")
    g.add_argument("--image_column", type=str, default="image", help="Column holding the images.")
    g.add_argument("--caption_column", type=str, default="text",
                   help="Column holding the captions (a string, or a list of strings of which one is drawn).")
    g.add_argument("--hand_box_column", type=str, default="hand_boxes",
                   help="Column holding, per image, a list of hand boxes (possibly empty).")
    g.add_argument("--face_box_column", type=str, default="face_boxes",
                   help="Column holding, per image, a list of face boxes (possibly empty).")
    g.add_argument("--box_format", type=str, default="xyxy", choices=["xyxy", "xywh"],
                   help="xyxy = (x0, y0, x1, y1); xywh = (x0, y0, width, height).")
    g.add_argument("--relative_boxes", action="store_true",
                   help="Box numbers are fractions of the image width/height instead of pixels.")
    g.add_argument("--hand_mask_column", type=str, default=None,
                   help="Use white-on-black mask images from this column for hands instead of --hand_box_column.")
    g.add_argument("--face_mask_column", type=str, default=None,
                   help="Use white-on-black mask images from this column for faces instead of --face_box_column.")
    g.add_argument("--region", dest="region_specs", metavar="NAME=COLUMN", action=RegionAction, const="boxes",
                   default=None,
                   help="A named region objective from a box column (repeatable; e.g. --region text=text_boxes --region "
                        "logo=logo_boxes). When --region or --region_mask is given, the objectives are 'global' plus "
                        "exactly these regions in the order given, and the hand/face column flags are not used; "
                        "without them: global, hand, face (docs/regions.md).")
    g.add_argument("--region_mask", dest="region_specs", metavar="NAME=COLUMN", action=RegionAction, const="mask",
                   help="A named region objective from a column of white-on-black mask images (repeatable; mixes with "
                        "--region, the order of both on the command line is the objectives' order).")
    g.add_argument("--max_train_samples", type=int, default=None,
                   help="Train on the first N rows only (for debugging or quick runs).")
    g.add_argument("--resolution", type=int, default=None,
                   help="Training resolution; default: the model's own (unet sample_size x VAE factor: 512 for SD 1.5, 1024 for SDXL).")
    g.add_argument("--center_crop", action="store_true",
                   help="Take the centred crop instead of a random one (with buckets: the middle of the offsets that "
                        "keep the hand and face regions inside).")
    g.add_argument("--square_crop", action="store_true",
                   help="The diffusers examples' behaviour: resize the short side to --resolution and crop a square "
                        "(random, or centred with --center_crop), which can cut hands and faces off portrait and "
                        "landscape photos. Default: aspect-ratio buckets (each image whole, see docs/buckets_and_crops.md).")
    g.add_argument("--bucket_reso_steps", type=int, default=None,
                   help="Bucket sides are multiples of this many pixels. Default: the model's granularity, VAE "
                        "factor x UNet downsampling read from its config.json files (64 for SD 1.x/2.x and SDXL).")
    g.add_argument("--max_bucket_aspect_ratio", type=float, default=4.0,
                   help="Longest bucket side / shortest, at most (4 = SDXL's own extreme buckets); lower it to "
                        "crop very long images more instead.")
    g.add_argument("--random_flip", action="store_true", help="Mirror image AND masks left-right with probability 1/2.")
    g.add_argument("--dataloader_num_workers", type=int, default=0,
                   help="Worker processes for data loading (also for decoding every image once before training).")
    g.add_argument("--skip_bad_images", action="store_true",
                   help="Rows whose image (or mask image) cannot be decoded -- truncated or corrupt files, images "
                        "above PIL's decompression-bomb limit -- are left out with a warning that counts them, "
                        "instead of stopping the run before training (the default).")

    g = parser.add_argument_group("FairHuman: region masks and objectives")
    g.add_argument("--mask_dilation", type=int, default=8,
                   help="Grow each box by this many TRAINING pixels (at the example's bucket size) on every side "
                        "(8 = the authors' 16x16 dilation kernel at 1024 px), whatever the photo's own size.")
    g.add_argument("--latent_mask_mode", type=str, default="hard", choices=["hard", "soft"],
                   help="Pixel masks are area-averaged onto the latent grid; 'hard' then thresholds at 0.5 (the "
                        "authors' 0/1 masks), 'soft' keeps the covered fraction.")
    g.add_argument("--local_loss_scale", type=float, default=5.0,
                   help="s in L_region = mean((s * M * (pred - target))^2); 5 in the authors' runs.")
    g.add_argument("--local_loss_normalization", type=str, default="latent", choices=["latent", "area"],
                   help="'latent': region losses average over the whole latent (the authors'); 'area': over the region only.")
    g.add_argument("--weighting", type=str, default="fair", choices=["fair", "equal", "global"],
                   help="fair: alpha-fair (MPD) weights on the three objective gradients (FairHuman); equal: plain sum "
                        "of the three losses; global: plain diffusers LoRA training (the baseline).")
    g.add_argument("--hand_loss_weight", type=float, default=1.0,
                   help="With --weighting equal: the static weight of the hand loss, the update being that of L_global "
                        "+ hand_loss_weight * L_hand + face_loss_weight * L_face (a tuned static baseline for MPD).")
    g.add_argument("--face_loss_weight", type=float, default=1.0,
                   help="With --weighting equal: the static weight of the face loss (see --hand_loss_weight).")
    g.add_argument("--region_loss_weight", metavar="NAME=W", action="append", default=None,
                   help="With --weighting equal: the static weight of region NAME's loss (repeatable; default 1; "
                        "--hand_loss_weight / --face_loss_weight are the same for the regions named hand and face).")
    g.add_argument("--fair_alpha", type=float, default=2.0,
                   help="alpha of the alpha-fair weights: 2 = Minimum Potential Delay (the paper), 1 = proportional fairness.")
    g.add_argument("--fair_update_interval", type=int, default=None,
                   help="Solve the exact fair weights (one backward pass per objective) every N optimizer steps; "
                        "1 = exact MPD every step, the authors' method, about 2x the cost of plain LoRA training. In "
                        "between, ONE backward pass of the losses weighted as --fair_interval_weights says, at about "
                        "the cost of plain training. Default 1 (exact). 8: measured ~1.0-1.1x plain training, "
                        "per-objective weights within 12-20%% of exact MPD, 97%% of exact's hand and 85%% of its face "
                        "gains on our benchmark (docs/results.md).")
    g.add_argument("--fair_interval_weights", type=str, default="prediction", choices=["prediction", "reuse"],
                   help="With --fair_update_interval > 1, the weights on the steps between exact solves: 'prediction' "
                        "re-solves every step on the Gram matrix of the objectives' gradients with respect to the "
                        "prediction (no extra backward pass; scaled to the last exact solve); 'reuse' keeps the last "
                        "solved weights.")
    g.add_argument("--fair_interval_calibration", type=str, default="diagonal", choices=list(fh.GRAM_CALIBRATIONS),
                   help="With --fair_interval_weights prediction: how the prediction-space Gram is scaled onto the "
                        "exact one at each exact solve. 'diagonal': one scale per objective (c_i = |g_i|^2 / |v_i|^2); "
                        "'trace': one scale for all (trace ratio), which under-weights the hand and face regions.")
    g.add_argument("--fair_batched_backward", action="store_true",
                   help="Get the per-objective gradients with one vmapped backward pass (is_grads_batched) instead "
                        "of one pass per objective. Same numbers; see docs/results.md for when it is faster.")
    g.add_argument("--fair_gradient_dtype", type=str, default="auto", choices=["auto", "fp32", "bf16"],
                   help="dtype of the hand/face objective gradients held on an exact fair step (the global one is "
                        "float32 and becomes .grad). 'auto': bf16 under --mixed_precision fp16/bf16 (8 bytes per LoRA "
                        "parameter instead of 12 at the step's peak; plain: 4), fp32 otherwise. The Gram is summed "
                        "in float64 either way (docs/memory.md).")
    g.add_argument("--fair_fidelity_check", action="store_true",
                   help="Diagnostic for --fair_update_interval > 1: on the steps between solves also compute the "
                        "exact weights and log fidelity/update_cosine, fidelity/weight_rel_error and "
                        "fidelity/weight_ratio_{global,hand,face} (applied / exact weight; costs the "
                        "exact step's time).")
    g.add_argument("--cache_latents", action="store_true",
                   help="Encode every training image with the VAE once before training (keyed by dataset row, at its "
                        "bucket's size; the region masks cached with it; with --random_flip the flipped latent and "
                        "masks too) and move the VAE off the accelerator. The crop of each image is then drawn once "
                        "(epoch 0), not per epoch. Held in memory, or with --cache_dir in {cache_dir}/fairhuman-cache/, "
                        "keyed by data, resolution, buckets, model and VAE (another configuration's cache is never read).")
    g.add_argument("--cache_text_embeddings", action="store_true",
                   help="Encode every caption once before training (keyed by dataset row) and move the text encoders "
                        "off the accelerator. Held in memory, or on disk with --cache_dir (as --cache_latents).")
    g.add_argument("--estimate_memory", action="store_true",
                   help="Print the estimated accelerator memory of one training step of this run as configured (from "
                        "the model's config files only: no weights are loaded or downloaded, no GPU needed) and exit. "
                        "Last line: 'estimated peak: N.NN GiB'. See docs/memory.md.")
    g.add_argument("--save_mask_previews", type=int, default=0,
                   help="Write the first N training examples after the transforms to {output_dir}/mask_previews/ "
                        "({i}_image.png, {i}_hand.png, {i}_face.png, {i}_overlay.png) to check the masks sit on hands and faces.")
    g.add_argument("--prediction_type", type=str, default=None, choices=["epsilon", "v_prediction"],
                   help="Override the scheduler's prediction type. Leave unset to use the model's.")
    g.add_argument("--snr_gamma", type=float, default=None,
                   help="Min-SNR weighting gamma (5.0 recommended); applied to every objective. https://huggingface.co/papers/2303.09556")
    g.add_argument("--noise_offset", type=float, default=0.0, help="Scale of the offset noise (0 = off).")

    g = parser.add_argument_group("LoRA")
    g.add_argument("--rank", type=int, default=4, help="LoRA rank (the authors used 256 on SDXL).")
    g.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha; default: equal to --rank.")
    g.add_argument("--lora_target_modules", type=str, default=None,
                   help="Comma-separated UNet / transformer module names (peft suffix match) that get LoRA adapters; "
                        "default: to_q,to_k,to_v,to_out.0 (SD/SDXL), the diffusers SD3 example's attention list (FLUX.1/SD3).")

    g = parser.add_argument_group("Saving the LoRA")
    g.add_argument("--save_lora_format", type=str, default="both", choices=["diffusers", "kohya", "both"],
                   help="diffusers: pytorch_lora_weights.safetensors (diffusers load_lora_weights); kohya: "
                        "{output_name}.safetensors (ComfyUI models/loras/, A1111/Forge models/Lora/); both.")
    g.add_argument("--save_precision", type=str, default="fp16", choices=["fp32", "fp16", "bf16"],
                   help="Precision of the final LoRA files and of the kohya file in checkpoints. The diffusers file "
                        "in a checkpoint (what --resume_from_checkpoint reads) is always fp32.")
    g.add_argument("--output_name", type=str, default=None,
                   help="Base name of the kohya-format file ({output_name}.safetensors; {output_name}-step{N} in "
                        "checkpoints), the name the UIs show; default: the --output_dir folder's name.")

    g = parser.add_argument_group("Training")
    g.add_argument("--output_dir", type=str, default="fairhuman-lora", help="Where the LoRA, checkpoints and card go.")
    g.add_argument("--seed", type=int, default=None,
                   help="Seed: same seed and data give the same LoRA. Every random draw of an example (crop, flip, "
                        "noise, timestep) depends only on (seed, epoch, row), not on batching or resumption.")
    g.add_argument("--train_batch_size", type=int, default=1, help="Batch size per device.")
    g.add_argument("--num_train_epochs", type=int, default=100)
    g.add_argument("--max_train_steps", type=int, default=None, help="Optimizer steps; overrides --num_train_epochs.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1,
                   help="Micro-batches per optimizer step; with --weighting fair the per-objective gradients are summed "
                        "over them and the weights solved once per optimizer step.")
    g.add_argument("--gradient_checkpointing", action="store_true", help="Trade compute for memory in the UNet.")
    g.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                   help="Overrides the accelerate config. LoRA parameters stay fp32; fp16 needs a GPU (on CPU the run "
                        "falls back to fp32 and says so).")
    g.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere and newer GPUs.")
    g.add_argument("--max_nonfinite_steps", type=int, default=20,
                   help="Stop when this many optimizer steps in a row had non-finite losses or gradients (each is skipped).")

    g = parser.add_argument_group("Optimizer and learning rate")
    g.add_argument("--learning_rate", type=float, default=1e-4, help="Initial learning rate (the authors: 1e-5).")
    g.add_argument("--scale_lr", action="store_true",
                   help="Multiply the learning rate by accumulation steps x batch size x processes.")
    g.add_argument("--lr_scheduler", type=str, default="constant",
                   help='One of "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", '
                        '"piecewise_constant" (with --lr_step_rules).')
    g.add_argument("--lr_step_rules", type=str, default=None,
                   help='The rules of --lr_scheduler piecewise_constant (diffusers\' step_rules): "multiple:step,...,'
                        'last_multiple", e.g. "1:100,0.1:200,0.01" = the full rate to step 100, a tenth to 200, then a '
                        'hundredth.')
    g.add_argument("--lr_warmup_steps", type=int, default=0, help="Warm-up optimizer steps.")
    g.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit instead of torch AdamW.")
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=1e-2)
    g.add_argument("--adam_epsilon", type=float, default=1e-08)
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="Clip the combined update to this norm.")

    g = parser.add_argument_group("Checkpoints")
    g.add_argument("--checkpointing_steps", type=int, default=500, help="Save a resumable checkpoint every N optimizer steps.")
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    g.add_argument("--resume_from_checkpoint", type=str, default=None,
                   help='A checkpoint folder, or "latest" for the newest complete one in --output_dir.')

    g = parser.add_argument_group("Validation")
    g.add_argument("--validation_prompt", type=str, default=None, help="Prompt to sample during and after training.")
    g.add_argument("--num_validation_images", type=int, default=4)
    g.add_argument("--validation_steps", type=int, default=500, help="Sample every N optimizer steps.")
    g.add_argument("--validation_inference_steps", type=int, default=30, help="UniPC steps per validation image.")
    g.add_argument("--evaluate_prompts_file", type=str, default=None,
                   help="After training, run evaluate_fairhuman.py on the saved LoRA: these prompts (one per line), "
                        "--num_validation_images per prompt, base model vs LoRA from the same seeds, MediaPipe hand and "
                        "face scores (needs requirements-prepare.txt); writes OUTPUT_DIR/evaluation/ and puts the "
                        "table in the model card.")

    g = parser.add_argument_group("Logging and Hub")
    g.add_argument("--logging_dir", type=str, default="logs", help="TensorBoard log folder, under --output_dir.")
    g.add_argument("--report_to", type=str, default="tensorboard",
                   help='"tensorboard", "wandb", "all" or "none".')
    g.add_argument("--push_to_hub", action="store_true", help="Push the LoRA and its model card to the Hub.")
    g.add_argument("--hub_model_id", type=str, default=None, help="Repository id; default: the output folder's name.")
    g.add_argument("--hub_token", type=str, default=None,
                   help="Hub token. Prefer `hf auth login`: a token on the command line is seen in the process list "
                        "and shell history, and accelerate launch prints the whole command line when a run fails. "
                        "Refused with --report_to wandb or all (wandb records the command line).")

    args = parser.parse_args(input_args)
    if args.lora_alpha is None:
        args.lora_alpha = float(args.rank)
    if args.output_name is None:
        args.output_name = default_output_name(args.output_dir, args.save_lora_format)
    elif args.output_name.lower().endswith(".safetensors"):  # the extension is added when the file is written
        args.output_name = args.output_name[: -len(".safetensors")]
    return args


class RegionAction(argparse.Action):
    """``--region`` / ``--region_mask NAME=COLUMN``: appends ``(kind, "NAME=COLUMN")`` to ``args.region_specs``,
    both flags in one list so that their command-line order is the objectives' order (checked by
    :func:`region_sources`)."""

    def __call__(self, parser, namespace, values, option_string=None):
        specs = list(getattr(namespace, self.dest, None) or [])
        specs.append((self.const, values))
        setattr(namespace, self.dest, specs)


DEFAULT_REGION_COLUMNS = {"hand_box_column": "hand_boxes", "face_box_column": "face_boxes", "hand_mask_column": None,
                          "face_mask_column": None}
"""The hand/face column flags and their defaults: they describe the regions only without --region/--region_mask."""


def region_sources(args) -> list[tuple[str, str, str]]:
    """``(region, 'boxes' | 'mask', column)`` per region objective, in the objectives' order.

    With ``--region NAME=COLUMN`` / ``--region_mask NAME=COLUMN``: those, in the order given (a malformed
    spec, an empty name or column, a duplicate name or the name "global" is a :class:`UsageError` naming the
    flag). Without them: hand and face from the hand/face column flags, exactly as before named regions.
    """
    if not getattr(args, "region_specs", None):
        return [
            ("hand", "mask", args.hand_mask_column) if args.hand_mask_column else ("hand", "boxes", args.hand_box_column),
            ("face", "mask", args.face_mask_column) if args.face_mask_column else ("face", "boxes", args.face_box_column),
        ]
    sources = []
    for kind, spec in args.region_specs:
        flag = "--region" if kind == "boxes" else "--region_mask"
        name, equals, column = str(spec).partition("=")
        name, column = name.strip(), column.strip()
        if not equals or not name or not column:
            raise UsageError(f"{flag} {spec!r}: expected NAME=COLUMN, e.g. {flag} text=text_boxes")
        if not fh.REGION_NAME.fullmatch(name):
            raise UsageError(f"{flag} {spec!r}: the region name {name!r} must be letters, digits, '_' or '-', "
                             "starting with a letter (it names the logs loss/NAME and weight/NAME)")
        if name == fh.GLOBAL_OBJECTIVE:
            raise UsageError(f"{flag} {spec!r}: the region name 'global' clashes with the global objective; "
                             "choose another name")
        if name in ("image", "overlay"):
            raise UsageError(f"{flag} {spec!r}: the region name {name!r} is taken by the mask previews' "
                             f"{{i}}_{name}.png; choose another name")
        if any(name == other for other, _, _ in sources):
            raise UsageError(f"{flag} {spec!r}: region name {name!r} is given twice; every region needs its own name")
        sources.append((name, kind, column))
    return sources


def run_objectives(args) -> tuple[str, ...]:
    """The run's objectives, ``("global", *regions)``: the order of losses, weights, logs and checkpoints."""
    return fh.objective_names([name for name, _, _ in region_sources(args)])


def region_loss_weights(args) -> tuple[float, ...]:
    """The static weight of each region's loss (``--weighting equal``), in the objectives' order:
    ``--region_loss_weight NAME=W``, or ``--hand_loss_weight`` / ``--face_loss_weight`` for the regions named
    hand and face, else 1. Raises :class:`UsageError` naming the flag for a malformed or unknown entry."""
    names = [name for name, _, _ in region_sources(args)]
    weights = {}
    for spec in args.region_loss_weight or []:
        name, equals, value = str(spec).partition("=")
        name = name.strip()
        try:
            weight = float(value)
        except ValueError:
            weight = None
        if not equals or weight is None:
            raise UsageError(f"--region_loss_weight {spec!r}: expected NAME=W with a number W, e.g. text=0.5")
        if name not in names:
            raise UsageError(f"--region_loss_weight {spec!r}: no region named {name!r} (the regions: {', '.join(names)})")
        if name in weights:
            raise UsageError(f"--region_loss_weight: region {name!r} is given twice")
        if not math.isfinite(weight) or weight < 0:
            raise UsageError(f"--region_loss_weight {spec!r}: the weight must be a finite number, not negative")
        weights[name] = weight
    for name in ("hand", "face"):
        flag_value = getattr(args, f"{name}_loss_weight")
        if flag_value == 1.0:
            continue
        if name not in names:
            raise UsageError(f"--{name}_loss_weight: this run has no region named {name} (the regions: {', '.join(names)}); "
                             "use --region_loss_weight NAME=W")
        if name in weights:
            raise UsageError(f"--{name}_loss_weight and --region_loss_weight {name}=... both weight the {name} region; "
                             "give one")
        weights[name] = flag_value
    return tuple(weights.get(name, 1.0) for name in names)


def check_regions(args) -> None:
    """The region flags: well-formed, unique names (:func:`region_sources`), the hand/face column flags not
    mixed with --region/--region_mask, and the static region weights (:func:`region_loss_weights`)."""
    sources = region_sources(args)
    if args.region_specs:
        mixed = [f"--{flag}" for flag, default in DEFAULT_REGION_COLUMNS.items() if getattr(args, flag) != default]
        if mixed:
            raise UsageError(f"{', '.join(mixed)} describe the default hand/face regions, which --region/--region_mask "
                             "replace: name every region with --region NAME=COLUMN or --region_mask NAME=COLUMN")
        if args.relative_boxes and all(kind == "mask" for _, kind, _ in sources):
            raise UsageError("--relative_boxes has no effect when every region is given with --region_mask")
    if args.region_loss_weight and args.weighting != "equal":
        raise UsageError(f"--region_loss_weight sets the static weights of --weighting equal; --weighting {args.weighting} "
                         + ("chooses the weights itself" if args.weighting == "fair" else "does not use the regions"))
    region_loss_weights(args)


def default_output_name(output_dir: str, save_lora_format: str) -> str:
    """The kohya file's base name when --output_name is not given: the output folder's name, without leading
    dots (a hidden file would not show in a UI's LoRA list), and not the diffusers file's name when both
    formats are written into the same folder."""
    name = Path(os.path.abspath(output_dir)).name.lstrip(".") or "fairhuman-lora"
    if name.lower().endswith(".safetensors"):
        name = name[: -len(".safetensors")] or "fairhuman-lora"
    if save_lora_format == "both" and name.lower() == Path(LORA_WEIGHT_NAME).stem:
        name += "_kohya"
    return name


def check_args(args) -> None:
    """Refuse impossible flag combinations up front, naming the flags."""
    if args.dataset_name is None and args.train_data_dir is None:
        raise UsageError("give a dataset: --dataset_name or --train_data_dir")
    if args.dataset_name is not None and args.train_data_dir is not None:
        raise UsageError("--dataset_name and --train_data_dir are exclusive; give one")
    positive = ["train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "checkpointing_steps",
                "validation_steps", "validation_inference_steps", "rank", "max_nonfinite_steps"]
    for name in positive:
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ["max_train_steps", "max_train_samples", "checkpoints_total_limit", "resolution", "fair_update_interval",
                 "bucket_reso_steps"]:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name} must be at least 1, got {value}")
    if args.resolution is not None and args.resolution % 8:
        raise UsageError(f"--resolution must be a multiple of 8, got {args.resolution}")
    for name in ["mask_dilation", "save_mask_previews", "num_validation_images", "lr_warmup_steps",
                 "dataloader_num_workers"]:
        if getattr(args, name) < 0:
            raise UsageError(f"--{name} must not be negative, got {getattr(args, name)}")
    for name in ["hand_loss_weight", "face_loss_weight", "fair_alpha", "local_loss_scale", "learning_rate",
                 "snr_gamma", "noise_offset", "max_grad_norm",
                 "lora_alpha", "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon", "guidance_scale",
                 "logit_mean", "logit_std", "mode_scale"]:
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            raise UsageError(f"--{name} must be a finite number, got {value}")
    if args.cache_latents and args.square_crop and not args.center_crop:
        raise UsageError("--cache_latents holds one crop per image, but --square_crop without --center_crop draws a "
                         "new random square crop every epoch, which the cache cannot hold: add --center_crop, or drop "
                         "--square_crop (buckets train each image whole; their region-safe crop is drawn once per "
                         "image when latents are cached), or drop --cache_latents")
    if not (math.isfinite(args.max_bucket_aspect_ratio) and args.max_bucket_aspect_ratio >= 1):
        raise UsageError(f"--max_bucket_aspect_ratio must be a number of at least 1, got {args.max_bucket_aspect_ratio}")
    if args.square_crop and (args.bucket_reso_steps is not None or args.max_bucket_aspect_ratio != 4.0):
        raise UsageError("--bucket_reso_steps and --max_bucket_aspect_ratio set the aspect-ratio buckets, which "
                         "--square_crop turns off; give one or the other")
    if args.fair_alpha <= 0:
        raise UsageError(f"--fair_alpha must be positive, got {args.fair_alpha}")
    for name in ("hand_loss_weight", "face_loss_weight"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name} must not be negative, got {getattr(args, name)}")
        if args.weighting != "equal" and getattr(args, name) != 1.0:
            raise UsageError(f"--{name} is the static weight of --weighting equal; --weighting {args.weighting} "
                             + ("chooses the weights itself" if args.weighting == "fair" else "does not use the regions"))
    if args.local_loss_scale <= 0:
        raise UsageError(f"--local_loss_scale must be positive, got {args.local_loss_scale}")
    if args.learning_rate <= 0:
        raise UsageError(f"--learning_rate must be positive, got {args.learning_rate}")
    if args.snr_gamma is not None and args.snr_gamma <= 0:
        raise UsageError(f"--snr_gamma must be positive, got {args.snr_gamma}")
    if args.max_grad_norm <= 0:
        raise UsageError(f"--max_grad_norm must be positive, got {args.max_grad_norm}")
    if args.hand_mask_column is not None and args.relative_boxes and args.face_mask_column is not None:
        raise UsageError("--relative_boxes has no effect when both --hand_mask_column and --face_mask_column are given")
    check_regions(args)
    if args.weighting != "fair" and (args.fair_update_interval is not None or args.fair_batched_backward
                                     or args.fair_fidelity_check):
        raise UsageError("--fair_update_interval, --fair_batched_backward and --fair_fidelity_check need --weighting fair")
    if args.fair_update_interval is None:
        args.fair_update_interval = DEFAULT_FAIR_UPDATE_INTERVAL if args.weighting == "fair" else 1
    if args.fair_fidelity_check and args.fair_update_interval == 1:
        raise UsageError("--fair_fidelity_check compares a --fair_update_interval above 1 with the exact update; "
                         "with --fair_update_interval 1 every step is exact")
    if args.report_to in TRACKERS_RECORDING_ARGV and args.hub_token is not None:
        raise UsageError(f"--report_to {args.report_to} and --hub_token cannot be used together: wandb records the "
                         "command line, token included (and accelerate launch prints it when a run fails); log in "
                         "with `hf auth login` instead and drop --hub_token")
    if args.report_to not in ("tensorboard", "wandb", "all", "none"):
        raise UsageError(f"--report_to must be tensorboard, wandb, all or none, got {args.report_to!r}")
    if args.lora_target_modules is not None and not lora_targets(args):
        raise UsageError("--lora_target_modules is empty")
    if args.evaluate_prompts_file is not None:  # checked now, not after hours of training
        import evaluate_fairhuman

        evaluate_fairhuman.read_prompts(args.evaluate_prompts_file, flag="--evaluate_prompts_file")
        evaluate_fairhuman.check_detector_available()
    if not args.output_name or args.output_name != Path(args.output_name).name or args.output_name.startswith("."):
        raise UsageError(f"--output_name must be a plain file name (no folder, not hidden), got {args.output_name!r}")
    if args.save_lora_format == "both" and args.output_name.lower() == Path(LORA_WEIGHT_NAME).stem:
        raise UsageError(f"--output_name {args.output_name!r} with --save_lora_format both: the kohya file would "
                         f"overwrite the diffusers file {LORA_WEIGHT_NAME}; choose another name")
    check_value_domains(args)
    if args.resume_from_checkpoint not in (None, "latest") and not os.path.isdir(args.resume_from_checkpoint):
        raise UsageError(f"--resume_from_checkpoint: no such folder {args.resume_from_checkpoint!r}")


def lr_scheduler_names() -> list[str]:
    from diffusers.optimization import SchedulerType

    return [t.value for t in SchedulerType]


def parse_step_rules(rules: str) -> list[tuple[float, int | None]]:
    """diffusers' piecewise_constant rules ``"m1:s1,m2:s2,...,m_last"`` as ``[(m1, s1), ..., (m_last, None)]``;
    raises ``ValueError`` saying what is wrong: every multiple a finite number >= 0, every step a positive
    integer, the steps increasing, the last rule a multiple alone."""
    parts = [p.strip() for p in rules.split(",")]
    parsed = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        pieces = part.split(":")
        if len(pieces) != (1 if last else 2):
            raise ValueError(f"rule {part!r}: expected " + ("the last multiple alone, e.g. 0.01" if last
                                                           else "multiple:step, e.g. 0.1:200"))
        try:
            multiple = float(pieces[0])
            step = None if last else int(pieces[1])
        except ValueError:
            raise ValueError(f"rule {part!r}: not numbers") from None
        if not (math.isfinite(multiple) and multiple >= 0):
            raise ValueError(f"rule {part!r}: the multiple must be a finite number of at least 0")
        if step is not None and (step < 1 or (parsed and step <= parsed[-1][1])):
            raise ValueError(f"rule {part!r}: steps must be positive and increasing")
        parsed.append((multiple, step))
    return parsed


def check_value_domains(args) -> None:
    """Every value flag within its domain, as the optimizer, scheduler, clipping and seeding functions that
    take it would require -- checked here, before any model loads, naming the flag."""
    if args.seed is not None and not 0 <= args.seed <= fh.SEED_MAX:
        raise UsageError(f"--seed must be an integer from 0 to {fh.SEED_MAX} (2**32 - 1, numpy's limit), got {args.seed}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(args, name) < 1.0:
            raise UsageError(f"--{name} must be in [0, 1), got {getattr(args, name)}")
    if not args.adam_epsilon > 0:
        raise UsageError(f"--adam_epsilon must be positive, got {args.adam_epsilon}")
    if not args.adam_weight_decay >= 0:
        raise UsageError(f"--adam_weight_decay must not be negative, got {args.adam_weight_decay}")
    if not args.lora_alpha > 0:
        raise UsageError(f"--lora_alpha must be positive (the LoRA is scaled by lora_alpha / rank; 0 trains a LoRA "
                         f"that does nothing), got {args.lora_alpha}")
    if args.noise_offset < 0:
        raise UsageError(f"--noise_offset must not be negative, got {args.noise_offset}")
    names = lr_scheduler_names()
    if args.lr_scheduler not in names:
        raise UsageError(f"--lr_scheduler must be one of {', '.join(names)}, got {args.lr_scheduler!r}")
    if args.lr_scheduler == "piecewise_constant":
        if args.lr_step_rules is None:
            raise UsageError('--lr_scheduler piecewise_constant needs --lr_step_rules, e.g. "1:100,0.1:200,0.01"')
        try:
            parse_step_rules(args.lr_step_rules)
        except ValueError as error:
            raise UsageError(f"--lr_step_rules {args.lr_step_rules!r}: {error}") from None
    elif args.lr_step_rules is not None:
        raise UsageError("--lr_step_rules only applies to --lr_scheduler piecewise_constant")
    if args.lr_warmup_steps and args.lr_scheduler in ("constant", "piecewise_constant"):
        raise UsageError(f"--lr_scheduler {args.lr_scheduler} ignores --lr_warmup_steps (diffusers' schedule has no "
                         "warm-up): use --lr_scheduler constant_with_warmup, or drop --lr_warmup_steps")
    if args.validation_prompt is not None and args.num_validation_images < 1:
        raise UsageError(f"--validation_prompt samples --num_validation_images images: give at least 1, got "
                         f"{args.num_validation_images}")
    if not args.pretrained_model_name_or_path:
        raise UsageError("--pretrained_model_name_or_path is empty")
    for flag in ("image_column", "caption_column", "hand_box_column", "face_box_column", "logging_dir"):
        if not getattr(args, flag):
            raise UsageError(f"--{flag} is empty")
    if not args.region_specs:
        (_, hand_kind, hand), (_, face_kind, face) = region_sources(args)
        if hand == face:
            raise UsageError(f"the hand and face regions are read from the same column {hand!r} "
                             f"(--hand_{'mask' if hand_kind == 'mask' else 'box'}_column, "
                             f"--face_{'mask' if face_kind == 'mask' else 'box'}_column): give each its own")
        for flag, column in (("--hand_mask_column", args.hand_mask_column), ("--face_mask_column", args.face_mask_column)):
            if column is not None and column in (args.image_column, args.caption_column):
                raise UsageError(f"{flag} {column!r} is also --image_column or --caption_column")
    else:  # named regions: the same rules, each region named with its flag
        readers = {}
        for name, kind, column in region_sources(args):
            flag = f"--{'region' if kind == 'boxes' else 'region_mask'} {name}={column}"
            if column in readers:
                raise UsageError(f"{readers[column]} and {flag} read the same column {column!r}: give each region "
                                 "its own")
            if column in (args.image_column, args.caption_column):
                raise UsageError(f"{flag}: {column!r} is also --image_column or --caption_column")
            readers[column] = flag
    if args.push_to_hub:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        repo_id = args.hub_model_id or Path(args.output_dir).name
        try:
            validate_repo_id(repo_id)
        except HFValidationError as error:
            where = "--hub_model_id" if args.hub_model_id else "--hub_model_id (default: the --output_dir folder's name)"
            raise UsageError(f"{where} {repo_id!r} is not a valid Hub repository id ({error})") from None
    if args.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes")
    if args.cache_dir is not None and os.path.isfile(args.cache_dir):
        raise UsageError(f"--cache_dir {args.cache_dir!r} is a file, not a folder")


def check_trackers(args) -> None:
    """Every tracker of ``--report_to`` must be importable: a missing one would log nothing, silently."""
    wanted = {"tensorboard": ["tensorboard"], "wandb": ["wandb"], "all": ["tensorboard", "wandb"]}.get(args.report_to, [])
    missing = []
    for name in wanted:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise UsageError(f"--report_to {args.report_to} needs {' and '.join(missing)}, which is not installed: "
                         f"pip install {' '.join(missing)} (or choose another --report_to, e.g. none)")


def _check_writable(path: str, flag: str) -> None:
    """Write (and remove) a file in ``path``, or in its nearest existing parent when ``path`` does not exist yet.

    Writing is the only reliable test: as root ``os.access`` says yes on a read-only mount.
    """
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        where = "is a file" if existing == os.path.abspath(path) else f"lies under {existing!r}, which is a file"
        raise UsageError(f"{flag}: {path!r} {where}, not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".fairhuman-write-test-") as probe:
            probe.write(b"ok")
            probe.flush()
    except OSError as error:
        raise UsageError(f"{flag}: cannot write into {existing!r} ({error.strerror or error}); "
                         "choose a writable folder") from None


def check_output_dir(args) -> None:
    """Every folder the run writes -- the output folder (LoRA, checkpoints, card, samples), the logs, the
    mask previews -- must be writable, tested by writing a file before any model is loaded."""
    _check_writable(args.output_dir, "--output_dir")
    if args.report_to != "none":
        _check_writable(os.path.join(args.output_dir, args.logging_dir), "--logging_dir")
    if args.save_mask_previews:
        _check_writable(os.path.join(args.output_dir, "mask_previews"), "--save_mask_previews (OUTPUT_DIR/mask_previews)")


# ---------------------------------------------------------------------------------------------
# Data: loading, checking every row before training, the torch dataset
# ---------------------------------------------------------------------------------------------


def error_with_causes(error: BaseException) -> str:
    """``Type: message`` of an exception and of the causes behind it (datasets wraps the real reason in a
    ``DatasetGenerationError`` that only says "An error occurred while generating the dataset")."""
    parts, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        parts.append(f"{type(error).__name__}: {error}")
        error = error.__cause__ or error.__context__
    return " <- caused by ".join(parts)


def check_imagefolder_metadata(folder: str) -> None:
    """The top-level metadata.jsonl of an imagefolder, line by line, before ``datasets`` reads it: UTF-8 text,
    a JSON object per line whose ``file_name`` is a relative path inside the folder. Raises
    :class:`UsageError` naming the line (datasets would only say that generating the dataset failed)."""
    path = os.path.join(folder, "metadata.jsonl")
    if not os.path.isfile(path):
        return
    root = os.path.realpath(folder)
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise UsageError(f"--train_data_dir: {path}, line {number} is not UTF-8 text ({error.reason} at byte "
                                 f"{error.start}); save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as error:
                raise UsageError(f"--train_data_dir: {path}, line {number}: not valid JSON ({error})") from None
            name = row.get("file_name") if isinstance(row, dict) else None
            if isinstance(name, str):
                inside = os.path.realpath(os.path.join(root, name))
                if os.path.isabs(name) or os.path.commonpath([root, inside]) != root:
                    raise UsageError(f"--train_data_dir: {path}, line {number}: file_name {name!r} "
                                     "points outside the data folder; datasets reads only files inside it: copy the "
                                     "image into the folder and give its relative path")


def load_training_dataset(args):
    """The train split as a ``datasets.Dataset``: Hub id, local folder, save_to_disk folder or imagefolder."""
    import datasets

    flag, source = ("--train_data_dir", args.train_data_dir) if args.train_data_dir else ("--dataset_name", args.dataset_name)
    if args.train_data_dir is not None and not os.path.isdir(args.train_data_dir):
        raise UsageError(f"--train_data_dir: no such folder {args.train_data_dir!r}")
    if args.train_data_dir is not None:
        check_imagefolder_metadata(args.train_data_dir)
    saved_to_disk = os.path.isdir(source) and any(
        os.path.exists(os.path.join(source, name)) for name in ("dataset_info.json", "dataset_dict.json"))
    try:
        if args.train_data_dir is not None:
            dataset = datasets.load_dataset("imagefolder", data_dir=source, cache_dir=args.cache_dir)
        elif saved_to_disk:
            dataset = datasets.load_from_disk(source)
        else:
            dataset = datasets.load_dataset(source, args.dataset_config_name, cache_dir=args.cache_dir)
    except Exception as error:  # noqa: BLE001 - datasets raises many kinds; the user needs the flag and the cause
        empty = "corresponds to no data" in str(error) or (
            saved_to_disk and isinstance(error, IndexError))  # load_from_disk of a 0-row dataset
        reason = "the dataset is empty" if empty else error_with_causes(error)
        raise UsageError(f"{flag}: cannot load {source!r}: {reason}") from None
    if isinstance(dataset, (datasets.DatasetDict, dict)):
        if "train" not in dataset:
            raise UsageError(f"the dataset has no 'train' split (splits: {', '.join(dataset.keys())})")
        dataset = dataset["train"]
    if args.max_train_samples is not None:
        dataset = dataset.select(range(min(args.max_train_samples, len(dataset))))
    if len(dataset) == 0:
        raise UsageError("the dataset is empty: nothing to train on")
    return dataset


def _image_columns(args) -> list[str]:
    return [args.image_column] + [c for _, kind, c in region_sources(args) if kind == "mask"]


def recipe_columns(dataset, args):
    """The dataset narrowed to the columns the recipe reads, image columns left undecoded.

    Raises :class:`UsageError` naming the flag of a column that is missing. Other columns (possibly
    other images) are never read.
    """
    import datasets

    columns = list(dataset.column_names)
    needed = [("--image_column", args.image_column), ("--caption_column", args.caption_column)]
    for region, kind, column in region_sources(args):
        if args.region_specs:
            needed.append((f"--{'region' if kind == 'boxes' else 'region_mask'} {region}={column}", column))
        else:
            needed.append((f"--{region}_{'mask' if kind == 'mask' else 'box'}_column", column))
    for flag, column in needed:
        if column not in columns:
            raise UsageError(f"{flag}: column '{column}' not found in the dataset; its columns are: {', '.join(columns)}")
    dataset = dataset.select_columns(list(dict.fromkeys(column for _, column in needed)))
    for column in _image_columns(args):
        if isinstance(dataset.features.get(column), datasets.Image):
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
    return dataset


def _image_file(cell) -> str:
    """The file name of an image cell, for messages ('' when it has none)."""
    path = cell.get("path") if isinstance(cell, dict) else cell if isinstance(cell, (str, os.PathLike)) else None
    return f" {os.path.basename(str(path))!r}" if path else ""


class _ImageDecoder(torch.utils.data.Dataset):
    """Row ``i`` -> ``(i, problem, regions)``: every image cell of the row fully decoded; ``problem`` is
    ``None`` or a message naming column, row and file; ``regions`` says, per mask column, whether the
    mask has any region pixel."""

    def __init__(self, dataset, args):
        self.dataset, self.columns = dataset, _image_columns(args)
        self.masks = self.columns[1:]

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, row):
        example = self.dataset[row]
        regions = []
        for column in self.columns:
            cell = example[column]
            try:
                with fh.open_image(cell) as image:
                    image.load()
                    if column in self.masks:
                        has_region = fh.binarize_mask_image(image, image.size, column=column, row=row).getbbox() is not None
                        raw = image if image.mode.startswith("I") else image.convert("L")  # the values as stored
                        regions.append((has_region, 0 if has_region else int(np.asarray(raw).max())))
            except Exception as error:  # noqa: BLE001 - PIL raises OSError, SyntaxError, DecompressionBombError, ...
                what = "mask image" if column in self.masks else "image"
                return row, (f"column '{column}', row {row}: cannot read the {what}{_image_file(cell)} "
                             f"({type(error).__name__}: {error})"), ()
        return row, None, tuple(regions)


def _as_list(batch):
    return batch


def verify_images(dataset, args):
    """Decode every image (and mask image) of the dataset once, fully, before any model is loaded.

    Reading headers is not enough: a truncated JPEG opens fine and fails only when its pixels are
    decoded, i.e. at the training step that reaches it. Images above PIL's decompression-bomb limit
    (``Image.MAX_IMAGE_PIXELS`` x 2, about 179 M pixels) count as unreadable too. Runs in a torch
    ``DataLoader`` with ``--dataloader_num_workers`` workers, with a progress bar; with several processes
    each decodes its share of the rows and the problems are gathered.

    Policy: any unreadable row stops the run with a :class:`UsageError` naming row, column and file
    (how many there are, the first few listed); with ``--skip_bad_images`` those rows are left out
    with a warning that counts them. Returns the dataset (without the bad rows) and, per region given
    as mask images, whether each of its rows has a region pixel (for :func:`report_regions`).
    """
    from accelerate import PartialState
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    state = PartialState()
    decoder = _ImageDecoder(recipe_columns(dataset, args), args)
    share = list(range(state.process_index, len(decoder), state.num_processes))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(decoder, share), batch_size=16, collate_fn=_as_list,
                                         num_workers=args.dataloader_num_workers)
    results = []
    with tqdm(total=len(dataset), desc="Decoding images", unit="img", disable=not state.is_local_main_process) as bar:
        for batch in loader:
            results.extend(batch)
            bar.update(len(batch) * state.num_processes)
    if state.num_processes > 1:
        results = gather_object(results)
    results.sort(key=lambda result: result[0])
    bad = [(row, problem) for row, problem, _ in results if problem is not None]
    mask_sources = [(region, column) for region, kind, column in region_sources(args) if kind == "mask"]
    kept = [regions for _, problem, regions in results if problem is None]
    regions = {region: [flags[k][0] for flags in kept] for k, (region, _) in enumerate(mask_sources)}
    for k, (region, column) in enumerate(mask_sources):  # FairHuman: 0/1 label maps read as masks hold no region
        peaks = [flags[k][1] for flags in kept if not flags[k][0] and 0 < flags[k][1] <= 127]
        if peaks:
            logger.warning(f"column '{column}': {len(peaks)} of {len(kept)} {region} masks have pixels but none above "
                           f"127 (values up to {max(peaks)}): they look like 0/1 label maps, which read as white-on-black "
                           "masks hold no region; write them as 0/255 images (e.g. mask * 255)")
    if not bad:
        return dataset, regions
    listed = "; ".join(problem for _, problem in bad[:5]) + ("; ..." if len(bad) > 5 else "")
    if not args.skip_bad_images:
        raise UsageError(f"{len(bad)} of {len(dataset)} rows {'has' if len(bad) == 1 else 'have'} an image that "
                         f"cannot be decoded: {listed}. "
                         "Fix or remove them (downscale images above the decompression-bomb limit: training resizes "
                         "to --resolution anyway), or pass --skip_bad_images to train without these rows")
    if len(bad) == len(dataset):
        raise UsageError(f"--skip_bad_images: every one of the {len(dataset)} rows has an image that cannot be "
                         f"decoded, nothing is left to train on: {listed}")
    logger.warning(f"--skip_bad_images: leaving out {len(bad)} of {len(dataset)} rows whose image cannot be decoded "
                   f"({listed}); rows are numbered without them from here on")
    skipped = {row for row, _ in bad}
    return dataset.select([row for row in range(len(dataset)) if row not in skipped]), regions


def check_dataset(dataset, args) -> dict:
    """Check every row before any long work; return what the torch dataset needs.

    Reads only image headers (sizes, in the upright frame: EXIF orientation applied; :func:`verify_images`
    decodes every image), parses every box cell (clipping and dropping as
    :func:`fairhuman_utils.parse_boxes` documents), checks each box column's numbers are in the unit
    ``--relative_boxes`` says (:func:`fairhuman_utils.box_units_problem`) and that mask images open with
    the image's size. Raises :class:`UsageError` naming the column and row of the first problem.
    """
    dataset = recipe_columns(dataset, args)
    regions = [region for region, _, _ in region_sources(args)]
    sizes, boxes, captions = [], {region: [] for region in regions}, []
    counts = {region: 0 for region in regions}
    ranges = {}  # box column -> [smallest, largest] number over all its boxes
    for row, example in enumerate(dataset):
        try:
            size = fh.image_size(example[args.image_column])
        except (OSError, UnidentifiedImageError, TypeError, ValueError) as error:
            raise UsageError(f"column '{args.image_column}', row {row}: cannot read the image ({error})") from None
        sizes.append(size)
        caption = example[args.caption_column]
        if isinstance(caption, str):
            captions.append([caption])
        elif isinstance(caption, (list, tuple)) and caption and all(isinstance(c, str) for c in caption):
            captions.append(list(caption))
        else:
            raise UsageError(f"column '{args.caption_column}', row {row}: expected a string or a list of strings, got {caption!r}")
        for region, kind, column in region_sources(args):
            if kind == "boxes":
                try:
                    parsed = fh.parse_boxes(example[column], width=size[0], height=size[1], box_format=args.box_format,
                                            relative=args.relative_boxes, column=column, row=row)
                except fh.AnnotationError as error:
                    raise UsageError(str(error)) from None
                boxes[region].append(parsed)
                counts[region] += bool(parsed)
                numbers = [float(v) for box in (example[column] or []) for v in box]
                if numbers:
                    low, high = ranges.setdefault(column, [math.inf, -math.inf])
                    ranges[column] = [min(low, min(numbers)), max(high, max(numbers))]
            else:
                try:
                    mask_size = fh.image_size(example[column])
                except (OSError, UnidentifiedImageError, TypeError, ValueError) as error:
                    raise UsageError(f"column '{column}', row {row}: cannot read the mask image ({error})") from None
                if mask_size != size:
                    raise UsageError(f"column '{column}', row {row}: mask size {mask_size[0]}x{mask_size[1]} differs "
                                     f"from the image size {size[0]}x{size[1]}")
                boxes[region].append(None)
    for column, (low, high) in ranges.items():
        problem = fh.box_units_problem(low, high, args.relative_boxes)
        if problem:
            raise UsageError(f"column '{column}': {problem}")
    return {"dataset": dataset, "sizes": sizes, "boxes": boxes, "captions": captions, "counts": counts}


def report_regions(checked: dict, args, mask_regions: dict | None = None) -> list[str]:
    """Warn, with counts, where the regions (hand, face by default) vanish: boxes dropped by clipping (entirely outside
    their image, or no area), images without any region (they train the global objective only), and
    an objective absent from the whole dataset (then ``--weighting fair`` has nothing to balance for
    it). Regions given as mask images count through ``mask_regions`` (region -> per row, whether the
    mask has a region pixel; from :func:`verify_images`). Returns the warnings, each also logged."""
    warnings, total = [], len(checked["sizes"])
    present, columns = {}, {}
    for region, kind, column in region_sources(args):
        columns[region] = column
        if kind == "boxes":
            given = sum(len(cell) for cell in checked["dataset"][column] if isinstance(cell, (list, tuple)))
            kept = sum(len(boxes) for boxes in checked["boxes"][region])
            if kept < given:
                warnings.append(f"column '{column}': {given - kept} of {given} {region} boxes were dropped (outside "
                                "their image or no area left after clipping); check --box_format and --relative_boxes")
            present[region] = [bool(boxes) for boxes in checked["boxes"][region]]
        elif mask_regions is not None and region in mask_regions:
            present[region] = list(mask_regions[region])
    if args.weighting == "global":  # plain LoRA training: the regions are not used
        present = {}
    if present and len(present) == len(columns):
        empty = sum(1 for flags in zip(*present.values()) if not any(flags))
        if 0 < empty < total:
            names = list(columns)  # "hand or face"; "text, logo or shoe"
            listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
            warnings.append(f"{empty} of {total} images have no {listed} region: they train the global objective only")
    absent = [region for region, flags in present.items() if not any(flags)]
    for region in absent:
        balance = (" --weighting fair has nothing to balance for it" if args.weighting == "fair"
                   else " --weighting equal adds nothing for it")
        warnings.append(f"no image has a {region} region (column '{columns[region]}'): the {region} objective is zero "
                        f"for the whole run;{balance}")
    if absent and len(absent) == len(columns):
        warnings.append(f"no image has any region: --weighting {args.weighting} trains exactly as plain LoRA "
                        "(--weighting global) on this dataset")
    for message in warnings:
        logger.warning(message)
    return warnings


def dataset_fingerprint(checked: dict) -> str:
    """A short hash of what the run reads from the dataset: image sizes, boxes and captions of every row."""
    content = json.dumps([checked["sizes"], checked["boxes"], checked["captions"]], sort_keys=True, default=str)
    return hashlib.sha256(content.encode()).hexdigest()[:16]


class FairHumanDataset(torch.utils.data.Dataset):
    """Training examples: image and hand/face masks moved by one transform, plus caption and seed.

    ``targets`` is each row's example size ``(width, height)`` (its aspect-ratio bucket), or one int for
    the ``--square_crop`` square. Keys are ``(epoch, row)`` or ``(epoch, row, copy)`` (see
    :class:`BucketBatchSampler`), so every random draw of an example is made from
    ``fairhuman_utils.item_seed(seed, epoch, row)`` (a repeat ``copy`` > 0 of a row in the same epoch
    gets its own stream). Images and mask images are read upright (:func:`fairhuman_utils.open_image`).
    """

    def __init__(self, checked: dict, args, seed: int, targets, keep_regions: bool = True):
        self.dataset = checked["dataset"]
        self.boxes = checked["boxes"]
        self.captions = checked["captions"]
        self.sources = region_sources(args)
        self.args = args
        self.seed = seed
        self.targets = targets
        self.keep_regions = keep_regions

    def __len__(self):
        return len(self.dataset)

    cache: dict | None = None  # row -> cached latents / text embeddings (build_cache), set after it is built

    def __getitem__(self, key):
        epoch, row, copy = (tuple(key) + (0,))[:3] if isinstance(key, tuple) else (0, key, 0)
        seed = fh.item_seed(self.seed, epoch, row, stream=0 if copy == 0 else 2 + copy)
        rng = random.Random(seed)
        cached = self.cache.get(row, {}) if self.cache is not None else {}
        if "latents" in cached:  # --cache_latents: no image read; the flip drawn per epoch among the cached ones
            variants = cached["latents"]
            out = dict(variants[rng.randrange(len(variants))] if len(variants) > 1 else variants[0])
            return {**out, **self._caption(rng, row, cached), "seed": seed, "row": row}
        example = self.dataset[row]
        try:
            image = fh.open_image(example[self.args.image_column])
        except (OSError, UnidentifiedImageError, TypeError, ValueError) as error:
            raise UsageError(f"column '{self.args.image_column}', row {row}: cannot read the image ({error})") from None
        masks, keep = [], []
        target = self.targets if isinstance(self.targets, int) else self.targets[row]
        dilation = fh.source_dilation(image.size, target, self.args.mask_dilation)  # --mask_dilation: training px
        for region, kind, column in self.sources:
            if kind == "boxes":
                masks.append(fh.boxes_to_mask(self.boxes[region][row], image.width, image.height, dilation))
                keep += fh.region_boxes(self.boxes[region][row], image.width, image.height, dilation)
            else:
                try:
                    mask = fh.open_image(example[column])
                    masks.append(fh.binarize_mask_image(mask, image.size, column=column, row=row))
                except fh.AnnotationError as error:
                    raise UsageError(str(error)) from None
                region = masks[-1].getbbox()
                if region is not None:
                    keep.append(region)
        out = fh.paired_transform(image, masks, target, center_crop=self.args.center_crop, random_flip=self.args.random_flip,
                                  rng=rng, keep=keep if self.keep_regions else None)
        return {
            "pixel_values": out.pixel_values,
            "masks": out.masks,
            "original_size": out.original_size,
            "crop_top_left": out.crop_top_left,
            "target_size": out.target_size,
            **self._caption(rng, row, cached),
            "seed": seed,
            "row": row,
        }

    def _caption(self, rng, row, cached) -> dict:
        """The example's caption (one draw of ``rng``, as ``rng.choice``), and its cached embeddings if any."""
        index = rng.randrange(len(self.captions[row]))
        out = {"caption": self.captions[row][index]}
        if "text" in cached:
            out["text"] = cached["text"][index]
        return out


class BucketBatchSampler(torch.utils.data.Sampler):
    """Per-device batches of ``(epoch, row, copy)`` keys; every optimizer step's GLOBAL batch from one bucket.

    ``bucket_rows[b]`` lists the rows of bucket ``b``. Per epoch, each bucket's rows are shuffled and cut
    into global batches of ``G = batch_size * group`` rows (``group`` = processes x accumulation steps);
    a bucket's last, short global batch is FILLED with repeats of rows of the same bucket (drawn from
    (seed, epoch), rows not already in that batch first; a repeat is key ``copy`` > 0 with its own random
    draws), so no image is ever dropped and no batch mixes sizes. The global batches are then shuffled,
    and each is yielded as ``group`` batches of ``batch_size`` keys: accelerate hands them to the
    processes round-robin and each process accumulates its consecutive ones, so every optimizer step
    sees exactly one global batch. Everything depends only on (seed, epoch) and ``G``: the same seed gives
    the same global batches however they are split over processes and micro-batches.
    """

    def __init__(self, bucket_rows, batch_size: int, group: int, seed: int):
        self.bucket_rows = [list(rows) for rows in bucket_rows]
        self.batch_size, self.group, self.seed, self.epoch = batch_size, group, seed, 0
        self.global_batch = batch_size * group
        self.sampler = self  # accelerate's DataLoaderShard.set_epoch looks for batch_sampler.sampler.set_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @staticmethod
    def repeats_needed(num_rows: int, global_batch: int) -> int:
        """How many repeats fill the last global batch of a bucket of ``num_rows`` images (every epoch)."""
        return -num_rows % global_batch

    @property
    def global_batches_per_epoch(self) -> int:
        return sum(math.ceil(len(rows) / self.global_batch) for rows in self.bucket_rows)

    def global_batches(self, epoch: int) -> list[list[tuple[int, int, int]]]:
        """The epoch's global batches in training order."""
        batches = []
        for b, rows in enumerate(self.bucket_rows):
            if not rows:
                continue
            generator = torch.Generator().manual_seed(fh.item_seed(self.seed, epoch, b, stream=2))
            order = [rows[i] for i in torch.randperm(len(rows), generator=generator).tolist()]
            keys = [(epoch, row, 0) for row in order]
            short = self.repeats_needed(len(rows), self.global_batch)
            if short:
                in_last = set(order[len(order) - len(order) % self.global_batch:])
                candidates = [r for r in order if r not in in_last] + [r for r in order if r in in_last]
                copies = {}
                for i in range(short):
                    row = candidates[i % len(candidates)]
                    copies[row] = copies.get(row, 0) + 1
                    keys.append((epoch, row, copies[row]))
            batches += [keys[i:i + self.global_batch] for i in range(0, len(keys), self.global_batch)]
        generator = torch.Generator().manual_seed(fh.item_seed(self.seed, epoch, 0, stream=1))
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]

    def __len__(self):
        return self.global_batches_per_epoch * self.group

    def __iter__(self):
        for keys in self.global_batches(self.epoch):
            for i in range(self.group):
                yield keys[i * self.batch_size:(i + 1) * self.batch_size]


def plan_buckets(checked: dict, args, step: int):
    """The example size of every row and the rows of each bucket.

    Aspect-ratio buckets (:func:`fairhuman_utils.make_buckets` at ``--resolution`` with sides multiples of
    ``step``, each row in the bucket of the closest aspect ratio), or with ``--square_crop`` one
    ``resolution x resolution`` bucket. Returns ``(buckets, targets, bucket_rows)``.
    """
    if args.square_crop:
        return [(args.resolution, args.resolution)], args.resolution, [list(range(len(checked["sizes"])))]
    buckets = fh.make_buckets(args.resolution, step, args.max_bucket_aspect_ratio)
    assigned = [fh.assign_bucket(size, buckets) for size in checked["sizes"]]
    bucket_rows = [[row for row, b in enumerate(assigned) if b == i] for i in range(len(buckets))]
    return buckets, [buckets[b] for b in assigned], bucket_rows


def bucket_table(buckets, bucket_rows, repeats) -> str:
    """The bucket table logged before training: size, images, repeats filling its last global batch."""
    lines = ["  bucket (w x h) | images | repeats per epoch to fill the last global batch"]
    for (w, h), rows, extra in zip(buckets, bucket_rows, repeats):
        if rows:
            lines.append(f"  {w:>5} x {h:<5}    | {len(rows):>6} | {extra}")
    return "\n".join(lines)


def crop_loss(checked: dict, args, targets, seed: int) -> dict:
    """How much hand/face box area the crops of epoch 0 cut away (box columns only; flips change nothing).

    Replays each row's epoch-0 crop (:func:`fairhuman_utils.resize_crop_plan` with the same random
    draws and the same ``keep`` boxes as the dataset) from the image size and boxes alone, without
    decoding an image. Regions given as mask images are not decoded here, so they are left out. Returns counts: images with boxes, images losing more than 1 % of their box
    area, images losing a whole region (all their hand or all their face box area), and the fraction of
    all box area lost.
    """
    regions = [region for region, kind, _ in region_sources(args) if kind == "boxes"]
    with_boxes = lose_some = lose_region = 0
    kept_all = total_all = 0.0
    for row, size in enumerate(checked["sizes"]):
        boxes = {region: checked["boxes"][region][row] for region in regions}
        if not any(boxes.values()):
            continue
        keep = None
        target = targets if isinstance(targets, int) else targets[row]
        target = (target, target) if isinstance(target, int) else target
        if not args.square_crop:
            keep = fh.region_boxes([b for region in regions for b in boxes[region]], size[0], size[1],
                                   fh.source_dilation(size, target, args.mask_dilation))
        plan = fh.resize_crop_plan(size, target, keep=keep, center_crop=args.center_crop,
                                   rng=random.Random(fh.item_seed(seed, 0, row)))
        with_boxes += 1
        kept_row = total_row = 0.0
        whole_region = False
        for region in regions:
            if boxes[region]:
                kept, total = fh.box_area_kept(boxes[region], size, plan)
                kept_row, total_row = kept_row + kept, total_row + total
                whole_region = whole_region or kept <= 0.01 * total
        lose_some += kept_row < 0.99 * total_row
        lose_region += whole_region
        kept_all, total_all = kept_all + kept_row, total_all + total_row
    return {"with_boxes": with_boxes, "lose_some": lose_some, "lose_region": lose_region,
            "lost_fraction": 1.0 - kept_all / total_all if total_all > 0 else 0.0}


CROP_LOSS_WARNING = 0.05
"""Warn when more than this fraction of the images with boxes lose box area to the crop."""


def log_buckets(checked: dict, args, buckets, targets, bucket_rows, step: int, global_batch: int) -> dict:
    """Log the bucket table, the rule for short buckets and how much box area the crops cut away."""
    repeats = [BucketBatchSampler.repeats_needed(len(rows), global_batch) for rows in bucket_rows]
    if args.square_crop:
        logger.info(f"Square crop (--square_crop): every image resized to {args.resolution}px on its short side and "
                    f"cropped {'in the centre' if args.center_crop else 'at random'} to {args.resolution}x{args.resolution}")
    else:
        area_problem = fh.bucket_area_problem(buckets, args.resolution, step)
        if area_problem:
            logger.warning(f"--bucket_reso_steps: {area_problem}; memory and speed follow the largest bucket")
        used = sum(bool(rows) for rows in bucket_rows)
        logger.info(f"Aspect-ratio buckets: {used} of {len(buckets)} used (about {args.resolution}^2 pixels, sides "
                    f"multiples of {step}, aspect ratio up to {args.max_bucket_aspect_ratio:g}:1):\n"
                    + bucket_table(buckets, bucket_rows, repeats))
    if any(repeats):
        logger.info(f"Every optimizer step trains on one bucket (global batch {global_batch}); a bucket's last, "
                    f"short global batch is filled with repeats of its own images, drawn anew every epoch: "
                    f"{sum(repeats)} repeated examples per epoch")
    loss = crop_loss(checked, args, targets, args.seed)
    if loss["with_boxes"]:
        names = [name for name, kind, _ in region_sources(args) if kind == "boxes"]
        message = (f"{loss['lose_some']} of {loss['with_boxes']} images with boxes lose {'/'.join(names)} box area to the "
                   f"crop, {loss['lose_region']} a whole region ({' or '.join(f'all their {n}' for n in names)} boxes); "
                   f"{100 * loss['lost_fraction']:.1f} % of all box area is cut away (epoch 0's crops)")
        if loss["lose_some"] > CROP_LOSS_WARNING * loss["with_boxes"]:
            advice = ("; aspect-ratio buckets keep every image whole: drop --square_crop" if args.square_crop else
                      "; their aspect ratios fall between two buckets (or beyond --max_bucket_aspect_ratio) and "
                      f"their {' or '.join(n + ('s' if n in ('hand', 'face') else '') for n in names)} reach the edges "
                      "that are cut: a larger --resolution or a smaller "
                      "--bucket_reso_steps cuts less")
            logger.warning(message + advice)
        else:
            logger.info(message)
    return loss


def collate_fn(examples):
    first = examples[0]
    images = ({"latent_mean": torch.stack([e["latent_mean"] for e in examples]),
               "latent_std": torch.stack([e["latent_std"] for e in examples]),
               "latent_masks": torch.stack([e["latent_masks"] for e in examples])} if "latent_mean" in first else
              {"pixel_values": torch.stack([e["pixel_values"] for e in examples]).contiguous(),
               "masks": torch.stack([e["masks"] for e in examples])})
    if "text" in first:  # --cache_text_embeddings: a dict of tensors per example
        images["text"] = {k: fh.pad_stack([e["text"][k] for e in examples]) for k in first["text"]}
    return {
        **images,
        "original_sizes": [e["original_size"] for e in examples],
        "crop_top_lefts": [e["crop_top_left"] for e in examples],
        "target_sizes": [e["target_size"] for e in examples],
        "captions": [e["caption"] for e in examples],
        "seeds": [e["seed"] for e in examples],
        "rows": [e["row"] for e in examples],
    }


REGION_COLOURS = [(255, 64, 64), (64, 128, 255), (64, 200, 64), (240, 200, 40), (220, 80, 220), (40, 210, 210),
                  (255, 140, 30), (140, 90, 255)]
"""The overlay colour of each region, by its position among the regions (the first two: hand red, face blue)."""


def region_legend(overlay: Image.Image, names, colours) -> Image.Image:
    """``overlay`` with a legend strip below it: a colour swatch and the name of each region."""
    from PIL import ImageDraw

    line = 11
    legend = Image.new("RGB", (max(overlay.width, 8 + 6 * max(len(n) for n in names) + 14), overlay.height + line * len(names) + 2),
                       (255, 255, 255))
    legend.paste(overlay, (0, 0))
    draw = ImageDraw.Draw(legend)
    for k, (name, colour) in enumerate(zip(names, colours)):
        y = overlay.height + 2 + k * line
        draw.rectangle([2, y + 1, 9, y + 8], fill=colour)
        draw.text((12, y - 1), name, fill=(0, 0, 0))
    return legend


def save_mask_previews(dataset: FairHumanDataset, keys, folder: str) -> None:
    """Write the image, each region's mask (``{i}_{region}.png``) and an overlay with a colour per region and a
    legend per example, as trained (each at its bucket's size)."""
    os.makedirs(folder, exist_ok=True)
    names = [name for name, _, _ in dataset.sources]
    colours = [REGION_COLOURS[k % len(REGION_COLOURS)] for k in range(len(names))]
    for i, key in enumerate(keys):
        example = dataset[key]
        pixels = ((example["pixel_values"].permute(1, 2, 0).numpy() + 1.0) * 127.5).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"{i}_image.png"))
        overlay = pixels.astype(np.float32)
        for mask, name, colour in zip(example["masks"], names, colours):
            m = mask.numpy()
            Image.fromarray((m * 255).round().astype(np.uint8)).save(os.path.join(folder, f"{i}_{name}.png"))
            overlay = overlay * (1 - 0.45 * m[..., None]) + 0.45 * m[..., None] * np.array(colour, np.float32)
        overlay = Image.fromarray(overlay.clip(0, 255).astype(np.uint8))
        region_legend(overlay, names, colours).save(os.path.join(folder, f"{i}_overlay.png"))


# ---------------------------------------------------------------------------------------------
# Models and conditioning
# ---------------------------------------------------------------------------------------------


def unmatched_target_modules(module_names, targets) -> list[str]:
    """The ``targets`` that name no module, matched as peft matches a list of names: a module ``name``
    is targeted by ``t`` when ``name == t`` or ``name`` ends with ``"." + t``."""
    names = list(module_names)
    return [t for t in targets if not any(name == t or name.endswith("." + t) for name in names)]


def check_lora_target_modules(args, family) -> None:
    """Every ``--lora_target_modules`` entry must name at least one module of the UNet / transformer. Checked
    on the model built from its config on the meta device (no weights loaded), before the models are loaded."""
    names = family.denoiser_module_names()
    unmatched = unmatched_target_modules(names, lora_targets(args))
    if unmatched:
        examples = family.attention_module_examples(names)
        raise UsageError(f"--lora_target_modules: {', '.join(unmatched)} match no module of the "
                         f"{'UNet' if family.denoiser_name == 'unet' else family.denoiser_name} "
                         f"(names in its attention blocks: {', '.join(examples)})")


def caption_overflow(captions, tokenizer, limit: int | None = None) -> dict:
    """How many captions (every caption of every row) are longer than the text encoder's limit (``limit``,
    default ``tokenizer.model_max_length`` tokens, 77 for CLIP, start and end tokens included): their count,
    the number of captions, the tokens cut off in all and the most cut off one caption."""
    limit = tokenizer.model_max_length if limit is None else limit
    lost = []
    for start in range(0, len(captions), 256):
        for ids in tokenizer(captions[start:start + 256], truncation=False).input_ids:
            lost.append(max(0, len(ids) - limit))
    long = [n for n in lost if n]
    return {"long": len(long), "captions": len(captions), "tokens_lost": sum(long), "max_lost": max(long, default=0),
            "limit": limit}


def warn_long_captions(checked: dict, tokenizer, limit: int | None = None, encoder: str = "text encoder",
                       flag: str | None = None) -> dict:
    """Warn once, with numbers, when captions are cut at the text encoder's limit (the end of a long caption
    is not seen in training)."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # its own "sequence length is longer than" message: ours says more
    try:
        counts = caption_overflow([c for row in checked["captions"] for c in row], tokenizer, limit)
    finally:
        transformers.logging.set_verbosity(verbosity)
    if counts["long"]:
        logger.warning(f"{counts['long']} of {counts['captions']} captions are longer than the {encoder}'s "
                       f"{counts['limit']} tokens: {counts['tokens_lost']} tokens are cut off in all (up to "
                       f"{counts['max_lost']} in one caption), and training never sees them. Put what matters first, "
                       "or shorten the captions" + (f" (or raise {flag})" if flag else ""))
    return counts


@dataclass
class StepInputs:
    """What the denoiser's forward pass and the three losses need for one batch."""

    model_input: torch.Tensor  # the noisy latents on the latent grid (B, C, h, w)
    timesteps: torch.Tensor
    conditioning: dict  # the captions' embeddings (model_families.ModelFamily.encode_captions)
    extras: dict  # family-specific inputs of the prediction (SDXL time ids, SD3 sigmas)
    target: torch.Tensor  # noise, velocity, or the flow target, on the latent grid
    region_masks: tuple  # one (B, 1, h, w) mask on the latent grid per region (hand, face by default)
    present: list  # [True, any of region 1 in the batch, ...], decided on the CPU (no device sync)
    sample_weights: torch.Tensor | None  # Min-SNR / flow weighting-scheme weights, or None


@torch.no_grad()
def prepare_inputs(batch, args, family, caption_conditioning, weight_dtype, device) -> StepInputs:
    """The diffusers loop's steps before the forward pass -- latents, noise, timesteps, noisy latents, text
    conditioning, target, loss weights (the family's :meth:`noisy_inputs`) -- plus FairHuman's region masks on
    the latent grid.

    Every random draw of an example (VAE sample, noise, offset noise, timestep) comes from a generator
    seeded with the example's own seed (``fairhuman_utils.item_seed``), so it does not depend on the
    batching, the process count or a resume.
    """
    if "text" in batch:  # --cache_text_embeddings: the family's caption embeddings, cached per row
        conditioning = {k: v.to(device, non_blocking=True) for k, v in batch["text"].items()}
    else:
        conditioning = caption_conditioning(batch["rows"], batch["captions"])
    noisy = family.noisy_inputs(batch, conditioning, device, weight_dtype)
    # FairHuman: the region masks (hand, face by default), moved with the image, reduced to the (unpacked) latent grid
    latent_masks = (batch["latent_masks"] if "latent_masks" in batch else  # --cache_latents: cached with them
                    fh.masks_to_latent(batch["masks"], noisy.target.shape[-2:], args.latent_mask_mode))
    present = [True] + [bool(latent_masks[:, i].any()) for i in range(latent_masks.shape[1])]
    latent_masks = latent_masks.to(device, non_blocking=True)
    region_masks = tuple(latent_masks[:, i : i + 1] for i in range(latent_masks.shape[1]))
    return StepInputs(noisy.model_input, noisy.timesteps, conditioning, noisy.extras, noisy.target, region_masks,
                      present, noisy.sample_weights)


def region_losses(model_pred: torch.Tensor, *, inputs: StepInputs, args) -> torch.Tensor:
    """The objectives' losses ``[L_global, L_region1, ...]`` of one prediction (:func:`fairhuman_utils.fairhuman_losses`
    with the batch's region masks and the run's flags)."""
    return fh.fairhuman_losses(model_pred, inputs.target, *inputs.region_masks, local_loss_scale=args.local_loss_scale,
                               normalization=args.local_loss_normalization, sample_weights=inputs.sample_weights)


@torch.no_grad()
def build_cache(dataset: FairHumanDataset, args, family, device, caption_conditioning) -> dict:
    """``--cache_latents`` / ``--cache_text_embeddings``: per dataset row (never per step), on the CPU.

    Latents: the example as epoch 0 draws it (its bucket's size, its region-safe crop: drawn once per image),
    encoded one by one; the VAE posterior's mean and std (each step samples ``mean + std * eps`` with the
    example's own seed, as uncached), the masks on the latent grid, the SDXL size conditioning; with
    ``--random_flip`` also the mirrored latent with mirrored masks (kohya's way; a step picks one at random).
    Text: every caption of the row, a dict of tensors each, from ``caption_conditioning`` (the family's
    :meth:`~model_families.ModelFamily.caption_conditioning`: SD/SDXL encode here; FLUX.1/SD3 have encoded every
    caption once already, and the cache copies those)."""
    vae = family.vae
    cache = {}
    for row in range(len(dataset)):
        entry = {}
        if args.cache_latents:
            example = dataset[(0, row)]
            sizes = {k: example[k] for k in ("original_size", "crop_top_left", "target_size")}
            variants = []
            for flip in ((False, True) if args.random_flip else (False,)):
                pixels, masks = example["pixel_values"], example["masks"]
                if flip:
                    pixels, masks = pixels.flip(-1), masks.flip(-1)
                mean, std = family.latent_distribution(pixels[None].to(device, dtype=vae.dtype))
                latent_masks = fh.masks_to_latent(masks[None], mean.shape[-2:], args.latent_mask_mode)[0]
                variants.append({"latent_mean": mean[0].cpu(), "latent_std": std[0].cpu(),
                                 "latent_masks": latent_masks, **sizes})
            entry["latents"] = variants
        if args.cache_text_embeddings:
            entry["text"] = []
            for caption in dataset.captions[row]:
                entry["text"].append({k: v[0].cpu() for k, v in caption_conditioning([row], [caption]).items()})
        cache[row] = entry
    return cache


CACHE_KEY_FLAGS = ("pretrained_model_name_or_path", "revision", "variant", "pretrained_vae_model_name_or_path",
                   "dataset_name", "dataset_config_name", "train_data_dir", "image_column", "caption_column",
                   "hand_box_column", "face_box_column", "box_format", "relative_boxes", "hand_mask_column",
                   "face_mask_column", "region_specs", "max_train_samples", "resolution", "center_crop", "square_crop",
                   "bucket_reso_steps", "max_bucket_aspect_ratio", "random_flip", "mask_dilation", "latent_mask_mode",
                   "max_sequence_length", "cache_latents", "cache_text_embeddings")
"""The flags a cached latent or text embedding depends on (with the data, the buckets and the encoders' dtypes)."""


def data_fingerprint(args, dataset) -> str:
    """What identifies the data's content: for ``--train_data_dir`` every file's path, size and modification
    time; otherwise the ``datasets`` fingerprint of the loaded split."""
    if args.train_data_dir is not None:
        digest = hashlib.sha256()
        for root, _dirs, files in sorted(os.walk(args.train_data_dir)):
            for name in sorted(files):
                stat = os.stat(os.path.join(root, name))
                digest.update(f"{os.path.relpath(os.path.join(root, name), args.train_data_dir)}|{stat.st_size}|"
                              f"{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()
    return str(getattr(dataset, "_fingerprint", None))


def cache_key_fields(args, dataset, targets, vae, text_encoders) -> dict:
    """Everything the cache's content depends on; a cache on disk is read only when all of it is equal."""
    fields = {flag: getattr(args, flag) for flag in CACHE_KEY_FLAGS}
    fields["data"] = data_fingerprint(args, dataset)
    fields["rows"] = len(dataset)
    fields["buckets"] = hashlib.sha256(json.dumps(targets if isinstance(targets, int) else [list(t) for t in targets])
                                       .encode()).hexdigest()
    fields["vae_dtype"] = str(vae.dtype)
    fields["text_encoder_dtype"] = str(text_encoders[0].dtype) if text_encoders else None
    if args.cache_latents and not args.center_crop:
        fields["seed"] = args.seed  # the crop drawn once per image comes from the run's seed
    return fields


def load_or_build_cache(dataset, args, family, accelerator, targets, caption_conditioning) -> dict:
    """The cache of :func:`build_cache`: in memory, or with ``--cache_dir`` in
    ``{cache_dir}/fairhuman-cache/{key}.pt`` (key: a hash of :func:`cache_key_fields`), read back only when every
    field is equal (another configuration's cache is never read: a new one is built, the differing fields
    logged). Written to a temporary file and renamed, so a full disk or a kill never leaves a half-written cache
    that a later run reads; a failed write stops the run naming the path."""
    log = logging.getLogger(__name__)
    if args.cache_dir is None:
        return build_cache(dataset, args, family, accelerator.device, caption_conditioning)
    fields = json.loads(json.dumps(cache_key_fields(args, dataset, targets, family.vae, family.text_encoders),
                                   default=str))  # as stored: JSON values
    key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]
    folder = os.path.join(args.cache_dir, "fairhuman-cache")
    path = os.path.join(folder, f"{key}.pt")
    if os.path.exists(path):
        try:
            stored = torch.load(path, weights_only=True)
            if stored.get("fields") == fields:
                log.info(f"Reading the latent/text cache {path}")
                return stored["cache"]
            log.warning(f"{path} was written for another configuration; building a new cache")
        except Exception as error:  # noqa: BLE001 - an unreadable cache is rebuilt, never half read
            log.warning(f"{path} is unreadable ({type(error).__name__}: {error}); building a new cache")
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith(".json") and name != f"{key}.json":
            try:
                with open(os.path.join(folder, name)) as f:
                    other = json.load(f)
            except (OSError, ValueError):
                continue
            differ = [k for k in sorted(set(other) | set(fields)) if other.get(k) != fields.get(k)]
            log.info(f"{os.path.join(folder, name[:-5] + '.pt')}: a cache of another configuration (differs in "
                     f"{', '.join(differ)}); not read")
    cache = build_cache(dataset, args, family, accelerator.device, caption_conditioning)
    if accelerator.is_main_process:
        write_atomically(path, lambda f: torch.save({"fields": fields, "cache": cache}, f))
        write_atomically(os.path.join(folder, f"{key}.json"), lambda f: f.write(json.dumps(fields, indent=1).encode()))
        log.info(f"Wrote the latent/text cache {path}")
    return cache


def write_atomically(path: str, write) -> None:
    """``write(file)`` into ``path`` via a temporary file renamed at the end: ``path`` is complete or absent.
    A failed write (full disk, no permission) removes the temporary file and stops the run naming ``path``."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise UsageError(f"--cache_dir: cannot write {path} ({error.strerror or error}); free space there, or leave "
                         "out --cache_dir to keep the cache in memory") from None


SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def save_lora(family, denoiser, folder: str, *, diffusers: bool = True, diffusers_dtype=None,
              kohya_file: str | None = None, kohya_dtype=None, kohya_metadata: dict | None = None) -> list[str]:
    """Write the denoiser's LoRA into ``folder``; returns the paths written. A dtype of None keeps the
    parameters' own (fp32: the script keeps the trainable LoRA weights in fp32).

    * ``pytorch_lora_weights.safetensors`` (with ``diffusers``): the diffusers format,
      ``{unet|transformer}.{module}.lora_A.weight`` / ``lora_B.weight`` for EVERY module plus the LoRA config
      as adapter metadata, what the family's pipeline ``load_lora_weights`` reads. The keys are peft's as they
      are: diffusers' ``convert_state_dict_to_diffusers`` renames only to_q/to_k/to_v/to_out.0 (to
      ``lora.down``/``lora.up``), and a file mixing the two spellings loses the renamed half in
      ``load_lora_weights``, which decides on the first key alone.
    * ``kohya_file`` (when given): :func:`fairhuman_utils.lora_to_kohya` with the family's prefix
      (``lora_unet`` for SD/SDXL; ``lora_transformer`` for FLUX.1/SD3, the names ComfyUI's key map gives the
      diffusers modules) and ``kohya_metadata`` as safetensors metadata, for ComfyUI / A1111 / Forge.

    Both are byte-reproducible: the adapter metadata lists sets sorted and each header is rewritten in
    one order (:func:`fairhuman_utils.make_safetensors_reproducible`).
    """
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    state = get_peft_model_state_dict(denoiser)
    written = []
    if diffusers:
        name = family.denoiser_name
        family.pipeline_class().save_lora_weights(
            folder,
            **{f"{name}_lora_layers": {k: v.detach().to(diffusers_dtype or v.dtype) for k, v in state.items()},
               f"{name}_lora_adapter_metadata": fh.json_ready_config(denoiser.peft_config["default"].to_dict())},
            safe_serialization=True,
        )
        written.append(os.path.join(folder, LORA_WEIGHT_NAME))
    if kohya_file is not None:  # the script's LoraConfig: one rank and alpha for every module, plain LoRA
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, kohya_file)
        alpha = denoiser.peft_config["default"].lora_alpha
        save_file(fh.lora_to_kohya(state, alpha, prefix=family.kohya_prefix, dtype=kohya_dtype), path,
                  metadata=kohya_metadata)
        written.append(path)
    for path in written:  # the same run writes the same bytes (safetensors orders its metadata at random)
        fh.make_safetensors_reproducible(path)
        # safetensors writes 0600: give the user's umask (a UI running as another user reads them)
        os.chmod(path, 0o666 & ~current_umask())
    return written


def current_umask() -> int:
    """The process's umask (read from /proc where it can be, else set and restored at once)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def training_settings(args, global_step: int, family) -> dict:
    """The settings a LoRA was trained with: the model card's table and the kohya file's metadata."""
    sources = region_sources(args)
    names = [name for name, _, _ in sources]
    if args.region_specs:  # named regions: "NAME=COLUMN (boxes | mask images)", in the objectives' order
        columns = {"regions": ", ".join(f"{name}={column} ({'boxes' if kind == 'boxes' else 'mask images'})"
                                        for name, kind, column in sources)}
    else:
        columns = {"hand column": args.hand_mask_column or args.hand_box_column,
                   "face column": args.face_mask_column or args.face_box_column}
    return family.training_settings() | {
        "weighting": args.weighting, "fair_alpha": args.fair_alpha, "fair_update_interval": args.fair_update_interval,
        "fair_interval_weights": args.fair_interval_weights if args.fair_update_interval > 1 else "-",
        "fair_interval_calibration": (args.fair_interval_calibration if args.fair_update_interval > 1
                                      and args.fair_interval_weights == "prediction" else "-"),
        f"region loss weights ({', '.join(names)})": region_loss_weights(args) if args.weighting == "equal" else "-",
        "local_loss_scale": args.local_loss_scale,
        "local_loss_normalization": args.local_loss_normalization, "mask_dilation": args.mask_dilation,
        "latent_mask_mode": args.latent_mask_mode, **columns, "box_format": args.box_format,
        "relative_boxes": args.relative_boxes, "rank": args.rank, "lora_alpha": args.lora_alpha,
        "lora_target_modules": args.lora_target_modules, "resolution": args.resolution,
        "crop": ("square (--square_crop)" if args.square_crop else
                 f"aspect-ratio buckets (steps {args.bucket_reso_steps or 'of the model'}, up to "
                 f"{args.max_bucket_aspect_ratio:g}:1)"),
        "center_crop": args.center_crop, "random_flip": args.random_flip, "learning_rate": args.learning_rate,
        "lr_scheduler": args.lr_scheduler, "train_batch_size": args.train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps, "optimizer steps": global_step,
        "max_grad_norm": args.max_grad_norm, "use_8bit_adam": args.use_8bit_adam,
        "mixed_precision": args.mixed_precision, "snr_gamma": args.snr_gamma, "noise_offset": args.noise_offset,
        "prediction_type": args.prediction_type or "model default", "seed": args.seed,
    }


def kohya_metadata(args, family, global_step: int) -> dict[str, str]:
    """Safetensors metadata of the kohya file: kohya's ``ss_*`` keys (what A1111 / Forge / ComfyUI
    metadata viewers show), a ``modelspec`` header and every FairHuman setting as ``fairhuman_settings``."""
    version, architecture = family.base_model_version(), family.modelspec_architecture()
    advice = family.inference_advice()
    prediction_type = family.noise_scheduler.config.get("prediction_type", "flow")
    metadata = {
        "ss_network_module": family.network_module(), "ss_network_dim": str(args.rank), "ss_network_alpha": str(args.lora_alpha),
        "ss_base_model_version": version, "ss_v2": str(version == "sd_v2"),
        "ss_v_parameterization": str(prediction_type == "v_prediction"),
        "ss_sd_model_name": args.pretrained_model_name_or_path, "ss_output_name": args.output_name,
        "ss_resolution": f"({args.resolution}, {args.resolution})", "ss_steps": str(global_step),
        "ss_learning_rate": str(args.learning_rate), "ss_lr_scheduler": args.lr_scheduler,
        "ss_seed": str(args.seed), "ss_mixed_precision": str(args.mixed_precision),
        "ss_gradient_accumulation_steps": str(args.gradient_accumulation_steps),
        "ss_max_grad_norm": str(args.max_grad_norm), "ss_noise_offset": str(args.noise_offset),
        "ss_min_snr_gamma": str(args.snr_gamma), "ss_dataset_dirs": str(args.dataset_name or args.train_data_dir),
        "ss_training_comment": f"FairHuman LoRA (arXiv 2507.02714): {' + '.join(run_objectives(args))} objectives "
                               "with Minimum Potential Delay weights; " + (
                                   "authors' inference: LoRA scale 0.3, 30 UniPC steps, CFG 7.5" if not family.flow_matching
                                   else f"{family.label}: try LoRA scale {advice['scale']}, {advice['steps']} steps, "
                                        f"guidance {advice['guidance']}"),
        "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": f"{architecture}/lora",
        "modelspec.implementation": "diffusers", "modelspec.title": args.output_name,
        "modelspec.resolution": f"{args.resolution}x{args.resolution}",
        "fairhuman_settings": json.dumps(training_settings(args, global_step, family)),
    }
    if args.pretrained_vae_model_name_or_path:
        metadata["ss_vae_name"] = args.pretrained_vae_model_name_or_path
    return metadata


def writes_kohya_file(args, family) -> bool:
    """Whether the run writes the kohya-format file: asked for, and the family has one (``kohya_prefix``)."""
    return args.save_lora_format in ("kohya", "both") and family.kohya_prefix is not None


def save_lora_files(args, family, denoiser, folder: str, global_step: int, checkpoint: bool = False) -> list[str]:
    """The LoRA files --save_lora_format asks for.

    At the end of training (``checkpoint=False``): ``pytorch_lora_weights.safetensors`` and/or
    ``{output_name}.safetensors``, both in --save_precision. In a checkpoint: the diffusers file always,
    as trained (fp32; what --resume_from_checkpoint reads, so resuming is exact), and with kohya or both
    ``{output_name}-step{N}.safetensors`` in --save_precision, to try the intermediate LoRA in a UI.
    """
    dtype = SAVE_DTYPES[args.save_precision]
    kohya = writes_kohya_file(args, family)
    if checkpoint:
        diffusers, diffusers_dtype, name = True, None, f"{args.output_name}-step{global_step}"
    else:
        diffusers, diffusers_dtype, name = args.save_lora_format in ("diffusers", "both"), dtype, args.output_name
    return save_lora(family, denoiser, folder, diffusers=diffusers, diffusers_dtype=diffusers_dtype,
                     kohya_file=f"{name}.safetensors" if kohya else None, kohya_dtype=dtype,
                     kohya_metadata=kohya_metadata(args, family, global_step) if kohya else None)


def load_lora_into_denoiser(family, denoiser, folder: str) -> None:
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    state = family.pipeline_class().lora_state_dict(folder, weight_name=LORA_WEIGHT_NAME)  # the fp32 file
    state = state[0] if isinstance(state, tuple) else state
    prefix = family.denoiser_name + "."
    denoiser_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    try:
        incompatible = set_peft_model_state_dict(denoiser, convert_unet_state_dict_to_peft(denoiser_state),
                                                 adapter_name="default")
    except RuntimeError as error:  # size mismatch: another --rank (checkpoints without their settings file)
        first = next((line.strip() for line in str(error).splitlines() if "size mismatch" in line), str(error)[:300])
        raise UsageError(f"--resume_from_checkpoint: the LoRA in {folder} does not fit this run's adapters ({first}): "
                         "was it written with another --rank or --lora_target_modules?") from None
    unexpected = getattr(incompatible, "unexpected_keys", None)
    if unexpected:
        raise UsageError(f"--resume_from_checkpoint: {folder} has LoRA keys this model does not have "
                         f"({unexpected[:3]}...): was it written with another model or --lora_target_modules?")


def make_optimizer(args, params, device):
    """AdamW, or bitsandbytes AdamW8bit with a clear message when it is missing or cannot run here."""
    kwargs = dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    if not args.use_8bit_adam:
        return torch.optim.AdamW(params, **kwargs)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UsageError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from None
    try:  # one step on a throw-away tensor big enough for 8-bit state (>= 4096 elements)
        probe = torch.nn.Parameter(torch.zeros(4096, device=device))
        probe.grad = torch.ones_like(probe)
        bnb.optim.AdamW8bit([probe], lr=1e-3).step()
    except Exception as error:  # noqa: BLE001 - bitsandbytes raises many kinds when no backend fits
        raise UsageError(f"--use_8bit_adam: bitsandbytes AdamW8bit cannot run on {device} ({error}); "
                         "drop --use_8bit_adam or install a bitsandbytes build for this device") from None
    return bnb.optim.AdamW8bit(params, **kwargs)


def optimizer_step(accelerator, optimizer, lr_scheduler, grad_norm, losses) -> bool:
    """``optimizer.step()``, ``lr_scheduler.step()``, ``optimizer.zero_grad()``; returns True when the step
    was skipped: by the fp16 ``GradScaler`` (inf/NaN gradients), or, without a scaler, because the
    gradient norm or the losses are not finite (the parameters and the schedule are then left alone)."""
    finite = torch.isfinite(torch.as_tensor(grad_norm)) and torch.isfinite(losses).all()
    if accelerator.scaler is None and not finite:
        skipped = True
    else:
        optimizer.step()
        skipped = accelerator.optimizer_step_was_skipped
    if not skipped:
        lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return skipped


class SkippedSteps:
    """Counts the optimizer steps skipped for non-finite losses or gradients: a warning for each, and
    :class:`TrainingStopped` with advice after ``max_in_a_row`` in a row."""

    def __init__(self, max_in_a_row: int):
        self.max_in_a_row, self.in_a_row, self.total = max_in_a_row, 0, 0

    def record(self, skipped: bool, step: int) -> None:
        self.in_a_row = self.in_a_row + 1 if skipped else 0
        self.total += skipped
        if skipped:
            logger.warning(f"step {step}: non-finite loss or gradients, step skipped "
                           f"({self.in_a_row} in a row, {self.total} in all)")
        if self.in_a_row >= self.max_in_a_row:
            raise TrainingStopped(
                f"{self.in_a_row} optimizer steps in a row had non-finite losses or gradients. Try a lower "
                "--learning_rate, --mixed_precision bf16 or no, the fp16-fix VAE "
                "(--pretrained_vae_model_name_or_path madebyollin/sdxl-vae-fp16-fix), or check the data.")


SHORT_LOSS_NAMES = {"global": "L_g", "hand": "L_h", "face": "L_f"}


def progress_postfix(logs: dict, objectives=fh.OBJECTIVES) -> dict:
    """The progress bar's summary of one step's logs: the loss of every objective (``L_g``, ``L_h``, ``L_f``;
    ``L_<name>`` for other regions), the coefficients in the objectives' order, the lr."""
    losses = {SHORT_LOSS_NAMES.get(name, f"L_{name}"): f"{logs[f'loss/{name}']:.4f}" for name in objectives}
    return {**losses, "w": "/".join(f"{logs[f'weight/{name}']:.3g}" for name in objectives), "lr": f"{logs['lr']:.2e}"}


def peak_memory_mb() -> float:
    """Peak memory of this process: CUDA allocations on a GPU, else the peak resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints ``checkpoint-N`` (with their marker file), oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = re.fullmatch(r"checkpoint-(\d+)", name)
        if match and os.path.isfile(os.path.join(output_dir, name, CHECKPOINT_MARKER)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return sorted(found)


def save_checkpoint(accelerator, args, global_step: int, settings: dict | None = None, fair_update=None) -> str:
    """Save a resumable checkpoint atomically: written to a hidden folder, then renamed.

    ``accelerator.save_state`` writes the LoRA (save hook), optimizer, scheduler and RNG states; the
    :class:`fairhuman_utils.FairUpdate`'s state goes into ``fair_update_state.json`` (JSON, never a
    pickle: a checkpoint someone hands you cannot run code); the marker file, written last, marks the
    checkpoint complete and holds its step and the run's seed. A kill while writing leaves only
    ``.checkpoint-N.partial``, which ``latest`` never picks. Older checkpoints beyond
    ``--checkpoints_total_limit`` are removed only after the new one is complete, and only checkpoints
    of an EARLIER step: the one just written is never removed (:func:`rotate_checkpoints`).
    """
    final = os.path.join(args.output_dir, f"checkpoint-{global_step}")
    partial = os.path.join(args.output_dir, f".checkpoint-{global_step}.partial")
    if accelerator.is_main_process and os.path.exists(partial):
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(partial)
    if accelerator.is_main_process:
        if settings is not None:
            with open(os.path.join(partial, RUN_SETTINGS_FILE), "w") as f:
                json.dump(settings, f, indent=1)
        if fair_update is not None:
            with open(os.path.join(partial, FAIR_STATE_FILE), "w") as f:
                json.dump(fair_update.state_dict(), f)
        with open(os.path.join(partial, CHECKPOINT_MARKER), "w") as f:
            json.dump({"global_step": global_step, "seed": args.seed}, f)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(partial, final)
        if args.checkpoints_total_limit is not None:
            rotate_checkpoints(args.output_dir, global_step, args.checkpoints_total_limit)
        logger.info(f"Saved state to {final}")
    accelerator.wait_for_everyone()
    return final


def rotate_checkpoints(output_dir: str, global_step: int, limit: int) -> list[str]:
    """Keep ``checkpoint-{global_step}`` (just written) and the newest ``limit - 1`` complete checkpoints of
    earlier steps; remove the older ones. A checkpoint of a LATER step (another run's, which
    :func:`settle_checkpoint_branch` moves aside before training) is never touched. Returns the removed."""
    earlier = [path for step, path in list_checkpoints(output_dir) if step < global_step]
    removed = earlier[: max(0, len(earlier) - (limit - 1))]
    for path in removed:
        shutil.rmtree(path)
    return removed


SUPERSEDED = ".superseded"
"""Suffix of checkpoints moved aside because a run resumed from an earlier one (``latest`` ignores them)."""


def settle_checkpoint_branch(args, resume_path: str | None, move: bool = True) -> list[str]:
    """Make sure ``latest`` and the rotation only ever see THIS run's checkpoints; returns what it did.

    * A new run (no ``--resume_from_checkpoint``, or ``latest`` with nothing complete) in an output folder
      that holds complete checkpoints is REFUSED (:class:`UsageError` naming them): its first checkpoint
      would overwrite theirs, the rotation would delete it, and ``latest`` would resume the other run.
      The way out: ``--resume_from_checkpoint latest`` to continue that run, or another ``--output_dir``.
    * A run resumed from ``checkpoint-N`` while checkpoints of later steps exist (the earlier run went on
      past N) branches off: with ``move`` those later checkpoints are renamed ``checkpoint-M.superseded``
      (``.superseded-2`` ... when taken), which ``latest`` and the rotation ignore, with a warning naming
      each. Nothing is deleted.
    """
    found = list_checkpoints(args.output_dir)
    if resume_path is None:
        if found:
            names = ", ".join(os.path.basename(path) for _, path in found)
            raise UsageError(f"--output_dir {args.output_dir!r} holds the checkpoints of another run ({names}): a new "
                             "run would overwrite or rotate them away and --resume_from_checkpoint latest would then "
                             "resume the other run. Continue that run with --resume_from_checkpoint latest, or start "
                             "this one in another --output_dir (or move those checkpoints away)")
        return []
    step = read_marker(resume_path)["global_step"]
    later = [(s, path) for s, path in found if s > step]
    if not later:
        return []
    messages = []
    for _, path in later:
        target, n = path + SUPERSEDED, 1
        while os.path.exists(target):
            n += 1
            target = f"{path}{SUPERSEDED}-{n}"
        if move:
            os.replace(path, target)
        messages.append(f"{os.path.basename(path)} -> {os.path.basename(target)}")
    message = (f"resuming from {os.path.basename(os.path.normpath(resume_path))} (step {step}) while --output_dir holds "
               f"checkpoints of later steps from the run that went on past it; moved aside so that "
               f"--resume_from_checkpoint latest and --checkpoints_total_limit only see this run's: {'; '.join(messages)}")
    if move:
        logger.warning(message)
    return [message]


def read_marker(checkpoint: str) -> dict:
    """The marker file of a complete checkpoint: ``{"global_step": N, "seed": S}``."""
    with open(os.path.join(checkpoint, CHECKPOINT_MARKER)) as f:
        return json.load(f)


def load_checkpoint(accelerator, checkpoint: str, fair_update) -> int:
    """Restore LoRA, optimizer, scheduler and RNG states (accelerate) and the fair update (from JSON);
    returns the checkpoint's optimizer step.

    The fair update's state is read from ``fair_update_state.json``. Older checkpoints are read too:
    those of the previous format hold it in ``custom_checkpoint_0.pkl`` (accelerate's custom state),
    read here with ``torch.load(weights_only=True)`` (plain lists and numbers; a file that needs more
    is refused, nothing in it runs); those of the format before hold it in the marker (``fair_state``).
    """
    marker = read_marker(checkpoint)
    json_path, pickle_path = os.path.join(checkpoint, FAIR_STATE_FILE), os.path.join(checkpoint, LEGACY_FAIR_STATE_FILE)
    if os.path.isfile(pickle_path):  # accelerate would unpickle it (weights_only=False): load a view without it
        with tempfile.TemporaryDirectory(prefix=".fairhuman-resume-") as view:
            for name in os.listdir(checkpoint):
                if name != LEGACY_FAIR_STATE_FILE:
                    os.symlink(os.path.abspath(os.path.join(checkpoint, name)), os.path.join(view, name))
            accelerator.load_state(view)
    else:
        accelerator.load_state(checkpoint)  # the fair update is not registered with accelerate: nothing is unpickled
    if os.path.isfile(json_path):
        with open(json_path) as f:
            fair_update.load_state_dict(json.load(f))
    elif os.path.isfile(pickle_path):
        try:
            state = torch.load(pickle_path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - the unpickler refuses anything but plain data
            raise UsageError(f"--resume_from_checkpoint: {pickle_path} holds more than the fair update's plain state "
                             f"and is not loaded ({type(error).__name__})") from None
        fair_update.load_state_dict(state)
    else:
        fair_state = marker.get("fair_state") or {}
        fair_update.load_state_dict({"weighting": "fair" if fair_state else None, "step": marker["global_step"],
                                     "coefficients": fair_state.get("coefficients"),
                                     "gram_scale": fair_state.get("gram_scale", 1.0)})
    return marker["global_step"]


LEGACY_FAIR_STATE_FILE = "custom_checkpoint_0.pkl"  # where checkpoints of the previous format kept the fair update


def checkpoint_problem(checkpoint: str) -> str | None:
    """What is missing or damaged in a complete-looking checkpoint, or ``None``: its files are checked
    without loading any model (LoRA file: safetensors header and size; optimizer and scheduler: a torch
    zip archive with every member's CRC; the fair update's JSON)."""
    from safetensors import safe_open

    problems = []
    lora = os.path.join(checkpoint, LORA_WEIGHT_NAME)
    if not os.path.isfile(lora):
        problems.append(f"{LORA_WEIGHT_NAME} is missing")
    else:
        try:
            with safe_open(lora, "pt") as f:  # checks the header covers exactly the file (truncation)
                keys = list(f.keys())
            if not keys:
                problems.append(f"{LORA_WEIGHT_NAME} holds no tensor")
        except Exception as error:  # noqa: BLE001 - safetensors raises its own error kinds
            problems.append(f"{LORA_WEIGHT_NAME} is damaged ({error})")
    for name in ("optimizer.bin", "scheduler.bin"):
        path = os.path.join(checkpoint, name)
        if not os.path.isfile(path):
            if name == "optimizer.bin" and os.path.isfile(os.path.join(checkpoint, "optimizer.safetensors")):
                continue
            problems.append(f"{name} is missing")
            continue
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
            if bad is not None:
                problems.append(f"{name} is damaged ({bad} fails its checksum)")
        except (zipfile.BadZipFile, OSError) as error:
            problems.append(f"{name} is damaged ({error})")
    fair = os.path.join(checkpoint, FAIR_STATE_FILE)
    if os.path.isfile(fair):
        try:
            with open(fair) as f:
                json.load(f)
        except ValueError as error:
            problems.append(f"{FAIR_STATE_FILE} is damaged ({error})")
    return "; ".join(problems) or None


def check_checkpoint(checkpoint: str, output_dir: str) -> None:
    """Refuse a damaged checkpoint before any model loads, naming what is wrong and the newest complete,
    undamaged checkpoint of an earlier step to resume from instead."""
    problem = checkpoint_problem(checkpoint)
    if problem is None:
        return
    step = read_marker(checkpoint)["global_step"]
    folder = os.path.dirname(os.path.normpath(checkpoint)) or "."
    previous = [path for s, path in list_checkpoints(folder) if s < step and checkpoint_problem(path) is None]
    way_out = (f"resume from the previous complete checkpoint: --resume_from_checkpoint {previous[-1]}" if previous
               else "no earlier complete checkpoint is there; start a new run in another --output_dir")
    raise UsageError(f"--resume_from_checkpoint: {checkpoint} is damaged: {problem}. Move it away and {way_out}")


# Settings that change what a checkpoint's weights mean: resuming with other values is refused.
RESUME_MUST_MATCH = ("pretrained_model_name_or_path", "rank", "lora_alpha", "lora_target_modules")
# Settings whose change is allowed on resume, with a warning naming it.
RESUME_WARN_IF_CHANGED = ("revision", "variant", "pretrained_vae_model_name_or_path", "weighting", "hand_loss_weight",
                          "face_loss_weight", "region_loss_weight", "fair_alpha",
                          "fair_update_interval", "fair_interval_weights", "local_loss_scale",
                          "local_loss_normalization", "mask_dilation", "latent_mask_mode", "resolution",
                          "train_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler", "seed",
                          "dataset", "dataset_rows", "dataset_fingerprint")


def lora_targets(args) -> list[str]:
    return [t.strip() for t in args.lora_target_modules.split(",") if t.strip()]


def run_settings(args, checked: dict) -> dict:
    """The settings a checkpoint is written with (``fairhuman_run_settings.json``), to check a resume against."""
    names = [n for n in RESUME_MUST_MATCH + RESUME_WARN_IF_CHANGED if hasattr(args, n)]
    settings = {name: getattr(args, name) for name in names}
    def where(source):  # a local folder by its absolute path, so ./model and /abs/model compare equal
        return os.path.abspath(source) if source is not None and os.path.isdir(source) else source

    settings["pretrained_model_name_or_path"] = where(args.pretrained_model_name_or_path)
    settings["lora_alpha"] = float(args.lora_alpha)
    settings["lora_target_modules"] = sorted(set(lora_targets(args))) if args.lora_target_modules is not None else None
    settings["dataset"] = where(args.dataset_name or args.train_data_dir)
    settings["dataset_rows"] = len(checked["sizes"])
    settings["dataset_fingerprint"] = dataset_fingerprint(checked)
    if settings.get("region_loss_weight") is None:  # only stored when given
        settings.pop("region_loss_weight", None)
    if args.region_specs:  # named regions (absent: the default global, hand, face)
        settings["objectives"] = list(run_objectives(args))
    return settings


def check_resume_compatible(resume_path: str, settings: dict, args) -> list[str]:
    """Compare this run's ``settings`` with those the checkpoint was written with.

    A change of base model, ``--rank``, ``--lora_alpha`` or ``--lora_target_modules`` changes what the
    saved weights mean (other shapes, another scale, other layers): :class:`UsageError` naming the
    flags. Other changes (weighting, resolution, data...) are allowed with a warning naming each. When
    ``--resolution`` is not given, the checkpoint's is used. A checkpoint written before the settings
    were stored resumes with a warning that nothing could be checked. Returns the warnings.
    """
    name = os.path.basename(os.path.normpath(resume_path))
    path = os.path.join(resume_path, RUN_SETTINGS_FILE)
    if not os.path.isfile(path):
        message = (f"{name} has no {RUN_SETTINGS_FILE} (written by an earlier version of this script): its settings "
                   "could not be checked against this run's (base model, --rank, --lora_alpha, --lora_target_modules "
                   "must be the ones it was trained with)")
        logger.warning(message)
        return [message]
    with open(path) as f:
        saved = json.load(f)
    if args.resolution is None and saved.get("resolution") is not None:
        args.resolution = settings["resolution"] = saved["resolution"]

    def flag(key):
        return f"--{key}" if key not in ("dataset", "dataset_rows", "dataset_fingerprint") else key.replace("_", " ")

    def show(value):
        return ",".join(value) if isinstance(value, list) else value

    if saved.get("model_family") and settings.get("model_family") and saved["model_family"] != settings["model_family"]:
        raise UsageError(f"--resume_from_checkpoint: {name} is a LoRA of a {saved['model_family']} model and "
                         f"--pretrained_model_name_or_path is a {settings['model_family']} model; a LoRA cannot move "
                         "between model families. Resume with the checkpoint's base model, or start a new run in "
                         "another --output_dir")
    saved_objectives = saved.get("objectives", list(fh.OBJECTIVES))
    run_objectives_now = settings.get("objectives", list(fh.OBJECTIVES))
    if saved_objectives != run_objectives_now:
        raise UsageError(f"--resume_from_checkpoint: {name} was trained with the objectives {', '.join(saved_objectives)}; "
                         f"this run has {', '.join(run_objectives_now)}. Resume with the same --region/--region_mask "
                         "flags (none for the default hand and face), or start a new run in another --output_dir")
    refused = [f"{flag(k)} {show(settings[k])} (the checkpoint has {show(saved[k])})"
               for k in RESUME_MUST_MATCH if k in saved and settings.get(k) is not None and saved[k] != settings[k]]
    if refused:
        raise UsageError(f"--resume_from_checkpoint: {name} was trained with other settings that change what its "
                         f"weights mean: {'; '.join(refused)}. Resume with the checkpoint's values, or start a new run "
                         "in another --output_dir")
    fair_only = {"fair_alpha", "fair_update_interval", "fair_interval_weights"}  # not compared unless both are fair
    both_fair = saved.get("weighting") == settings.get("weighting") == "fair"
    changed = [f"{flag(k)} {show(saved[k])} -> {show(settings[k])}" for k in RESUME_WARN_IF_CHANGED
               if k in saved and settings.get(k) is not None and saved[k] != settings[k]
               and (both_fair or k not in fair_only)]
    if changed:
        message = (f"resuming {name} with changed settings: {'; '.join(changed)}. The steps already trained used the "
                   "old ones")
        logger.warning(message)
        return [message]
    return []


def resolve_resume(args) -> str | None:
    if args.resume_from_checkpoint is None:
        return None
    if args.resume_from_checkpoint == "latest":
        found = list_checkpoints(args.output_dir)
        return found[-1][1] if found else None
    if not os.path.isfile(os.path.join(args.resume_from_checkpoint, CHECKPOINT_MARKER)):
        raise UsageError(f"--resume_from_checkpoint: {args.resume_from_checkpoint!r} is not a complete checkpoint "
                         f"of this script (no {CHECKPOINT_MARKER})")
    return args.resume_from_checkpoint


# ---------------------------------------------------------------------------------------------
# Validation, model card, Hub
# ---------------------------------------------------------------------------------------------


def hub_errors() -> tuple:
    """The exceptions a Hub call raises for network and server failures: ``OSError`` (``HfHubHTTPError``,
    ``OfflineModeIsEnabled``, connection errors) and the HTTP client's own errors (httpx, httpx2 or requests)."""
    errors = [OSError]
    for module, name in (("httpx", "HTTPError"), ("httpx2", "HTTPError"), ("requests", "RequestException")):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


HUB_IGNORE_PATTERNS = ["checkpoint-*", ".checkpoint-*", "step_*", "epoch_*", "evaluation/images/*"]


def upload_command(args, repo_id: str) -> str:
    """The command that pushes the output folder by hand, as the script would."""
    excludes = " ".join(f"--exclude '{p}'" for p in HUB_IGNORE_PATTERNS + [f"{args.logging_dir}/*"])
    return f"hf upload {repo_id} {args.output_dir} {excludes}"


def create_hub_repo(args) -> str:
    """Create (or find) the Hub repository at the start; a network or Hub failure is one clear :class:`HubError`."""
    from huggingface_hub import create_repo

    repo_id = args.hub_model_id or Path(args.output_dir).name
    try:
        return create_repo(repo_id=repo_id, exist_ok=True, token=args.hub_token).repo_id
    except hub_errors() as error:
        raise HubError(f"--push_to_hub: cannot create the Hub repository {repo_id!r} ({type(error).__name__}: "
                       f"{error}). Nothing was trained. Check the network and your token (`hf auth login`), or train "
                       f"without --push_to_hub and push the output folder afterwards with: "
                       f"{upload_command(args, repo_id)}") from None


def push_output_folder(args, repo_id: str) -> str | None:
    """Upload the output folder (the LoRA and card are on disk already); on failure return a message that
    says where they are and how to push them later, else ``None``."""
    from huggingface_hub import upload_folder

    try:
        upload_folder(repo_id=repo_id, folder_path=args.output_dir, commit_message="End of training",
                      token=args.hub_token, ignore_patterns=HUB_IGNORE_PATTERNS + [f"{args.logging_dir}/*"])
    except hub_errors() as error:
        return (f"--push_to_hub: the upload to {repo_id!r} failed ({type(error).__name__}: {error}). Nothing is lost: "
                f"the LoRA ({LORA_WEIGHT_NAME}) and its model card are saved in {args.output_dir!r}. Push them later "
                f"with: {upload_command(args, repo_id)}")
    return None


def offload_cached_encoders(args, vae, text_encoders, device="cpu") -> None:
    """Move the VAE (``--cache_latents``) and text encoders (``--cache_text_embeddings``) to ``device``: off the
    accelerator once their outputs are cached, back on it for validation sampling."""
    if args.cache_latents:
        vae.to(device)
    if args.cache_text_embeddings:
        for text_encoder in text_encoders:
            text_encoder.to(device)
    if device == "cpu" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_validation(args, accelerator, family, denoiser, weight_dtype, step, tag):
    """Sample ``--num_validation_images`` with the family's pipeline (SD/SDXL: UniPC; FLUX.1/SD3: their flow
    matching Euler scheduler); the trained denoiser is used as is, never cast."""
    logger.info(f"Running validation: {args.num_validation_images} images of {args.validation_prompt!r}")
    offload_cached_encoders(args, family.vae, family.text_encoders, accelerator.device)
    pipeline, call = family.validation_pipeline(accelerator.unwrap_model(denoiser), args.validation_prompt,
                                                accelerator.device)
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    autocast = (torch.autocast(accelerator.device.type, dtype=weight_dtype)
                if weight_dtype != torch.float32 and accelerator.device.type == "cuda" else contextlib.nullcontext())
    with autocast, torch.no_grad():
        images = [pipeline(**call, num_inference_steps=args.validation_inference_steps,
                           generator=generator, height=args.resolution, width=args.resolution).images[0]
                  for _ in range(args.num_validation_images)]
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(tag, np.stack([np.asarray(im) for im in images]), step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Image(im, caption=f"{i}: {args.validation_prompt}") for i, im in enumerate(images)]})
    del pipeline
    offload_cached_encoders(args, family.vae, family.text_encoders)
    return images


def lora_usage(args, repo_id: str, family) -> str:
    """The model card's "How to use": which file goes where, with the authors' inference setting
    for SD/SDXL (LoRA scale 0.3, 30 UniPC steps, CFG 7.5), the family's usual sampling for FLUX.1/SD3."""
    pipeline_cls = family.pipeline_class_name
    advice = family.inference_advice()
    kohya_file = f"{args.output_name}.safetensors"
    files = []
    if args.save_lora_format in ("diffusers", "both"):
        files.append(f"| `{LORA_WEIGHT_NAME}` | diffusers format | diffusers `load_lora_weights` |")
    if family.kohya_prefix is None:  # ComfyUI reads this family's diffusers file (and no lora_transformer_* file)
        files.append(f"| `{LORA_WEIGHT_NAME}` | ComfyUI: `models/loras/` (it reads these `{family.denoiser_name}.*` "
                     "keys) |")
    elif args.save_lora_format in ("kohya", "both"):
        files.append(f"| `{kohya_file}` | kohya format (`{family.kohya_prefix}_*` keys) | ComfyUI: `models/loras/`; "
                     + ("AUTOMATIC1111 / Forge: `models/Lora/` (diffusers `load_lora_weights` reads it too) |"
                        if not family.flow_matching else
                        ("ComfyUI also reads the diffusers file; diffusers `load_lora_weights` reads this one too |"
                         if family.diffusers_reads_kohya_file else
                         "ComfyUI also reads the diffusers file; diffusers does not read this one |")))
    weight_name = "" if args.save_lora_format != "kohya" else f", weight_name={kohya_file!r}"
    # trained with another prediction type than the model's: sampled with it too
    prediction = f", prediction_type={args.prediction_type!r}" if args.prediction_type else ""
    text = f"""## How to use

Weights in {args.save_precision}, {family.denoiser_name} only ({family.label}), rank {args.rank}, alpha {args.lora_alpha}:

| file | format | where it goes |
| --- | --- | --- |
""" + "\n".join(files) + f"""

{"The authors sampled with LoRA scale 0.3, 30 UniPC steps and CFG 7.5." if not family.flow_matching else
 f"Try LoRA scale {advice['scale']} (0.3-1.0), {advice['steps']} steps, guidance {advice['guidance']}; the FairHuman "
 "authors' settings (scale 0.3, UniPC, CFG 7.5) are for SDXL."}

```python
import torch
from diffusers import {pipeline_cls}{", UniPCMultistepScheduler" if not family.flow_matching else ""}

pipe = {pipeline_cls}.from_pretrained({args.pretrained_model_name_or_path!r}, torch_dtype=torch.{"float16" if not family.flow_matching else "bfloat16"}).to("cuda")
{"pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config" + prediction + ")" + chr(10) if not family.flow_matching else ""}pipe.load_lora_weights({repo_id!r}{weight_name})
pipe.fuse_lora(lora_scale={advice['scale']})
image = pipe("a photo of a person waving", num_inference_steps={advice['steps']}, guidance_scale={advice['guidance']}).images[0]
```
"""
    if writes_kohya_file(args, family) or family.kohya_prefix is None:
        comfy_file = kohya_file if family.kohya_prefix is not None else LORA_WEIGHT_NAME
        text += f"""
- ComfyUI: put `{comfy_file}` in `ComfyUI/models/loras/`, add a *Load LoRA* node after the checkpoint loader,
  `strength_model` {advice['scale']} (the LoRA has no text-encoder part, `strength_clip` does nothing); KSampler: {advice['steps']} steps,
  {"cfg " + str(advice['guidance']) if not isinstance(family, mf.FluxFamily) else "cfg 1.0 with a FluxGuidance node at " + str(advice['guidance'])}, sampler `{advice['comfy_sampler']}`{"; a *ModelSamplingDiscrete* node set to `v_prediction`" if args.prediction_type == "v_prediction" else ""}.
"""
        if not family.flow_matching:
            text += f"""- AUTOMATIC1111 / Forge: put `{kohya_file}` in `models/Lora/` and add `<lora:{args.output_name}:{advice['scale']}>` to the
  prompt; sampler {advice['sampler']}, {advice['steps']} steps, CFG scale {advice['guidance']}.
"""
    return text


def hub_model_id(name_or_path: str | None) -> str | None:
    """``name_or_path`` when it is a Hub model id (``owner/name`` or ``name``, valid by the Hub's rules, not a
    local path), else ``None``: a model card's ``base_model`` must name a model on the Hub."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not name_or_path or os.path.exists(name_or_path) or name_or_path.count("/") > 1:
        return None
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        return None
    return name_or_path


def card_metadata(args, family) -> str:
    """The model card's YAML front matter, written by huggingface_hub's serializer (``ModelCardData``), so
    no value can add or change keys; ``base_model`` only when the base model is a Hub id."""
    from huggingface_hub import ModelCardData

    fields = dict(library_name="diffusers", license="other", inference=True,
                  tags=[*family.tags, "text-to-image", "diffusers", "lora", "fairhuman"])
    base_model = hub_model_id(args.pretrained_model_name_or_path)
    if base_model is not None:
        fields["base_model"] = base_model
    return ModelCardData(**fields).to_yaml()


def write_model_card(args, folder: str, repo_id: str, family, images, global_step: int, evaluation=None) -> str:
    """README.md for the LoRA: base model, data, every FairHuman setting, samples, how to load it, and
    with ``evaluation`` (the report of ``evaluate_fairhuman.py``) the hand and face scores."""
    for i, image in enumerate(images):
        image.save(os.path.join(folder, f"image_{i}.png"))
    dataset = args.dataset_name or args.train_data_dir
    gallery = "\n".join(f"![sample {i}](./image_{i}.png)" for i in range(len(images)))
    settings = training_settings(args, global_step, family)
    usage = lora_usage(args, repo_id, family)
    table = "\n".join(f"| {k} | {v} |" for k, v in settings.items())
    scores = ""
    if evaluation is not None:
        import evaluate_fairhuman

        settings_used = evaluation["settings"]
        scores = (f"\n## Did it work?\n\nBase model vs this LoRA (scale {settings_used['lora_scale']}) on the prompts of "
                  f"`{args.evaluate_prompts_file}`, {settings_used['num_images_per_prompt']} image(s) per prompt from the "
                  f"same seeds, scored with MediaPipe (`evaluation/` has the images, grids and report.json):\n\n"
                  + evaluate_fairhuman.report_markdown(evaluation))
    fair_note = ""
    if args.weighting == "fair":
        fair_note = ("\nFair weights: exact MPD solved every optimizer step (the authors' method; about 1.3-2.1x the "
                     "cost of plain LoRA training)." if args.fair_update_interval == 1 else
                     f"\nFair weights: exact MPD solved every {args.fair_update_interval} optimizer steps, estimated in "
                     "between (about 1.0-1.2x the cost of plain LoRA training; per-objective weights measured within "
                     "12-20 % of exact MPD; it kept 97 % of exact's hand and 85 % of its face gains on our benchmark).")
    method = ("a global denoising loss plus hand- and face-region losses from box annotations,\n"
              "combined with Minimum Potential Delay (alpha-fair) weights, to improve hands and faces.")
    if args.region_specs:
        regions = region_sources(args)
        method = (f"a global denoising loss plus region losses for {', '.join(name for name, _, _ in regions)}\n"
                  f"(from {', '.join(f'{column!r}' for _, _, column in regions)}), combined with Minimum Potential Delay "
                  "(alpha-fair)\nweights, to improve those regions.")
    card = f"""---
{card_metadata(args, family)}
---

# FairHuman LoRA: {repo_id}

LoRA adapters for `{args.pretrained_model_name_or_path}` trained with FairHuman (ICCV 2025,
arXiv 2507.02714): {method}
{fair_note}

Training data: `{dataset}`.

{gallery}

## Settings

| setting | value |
| --- | --- |
{table}
{scores}
{usage}
"""
    path = os.path.join(folder, "README.md")
    with open(path, "w") as f:
        f.write(card)
    return path


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


MODEL_CONFIG_FILES = ("vae/config.json", "text_encoder/config.json", "text_encoder_2/config.json",
                      "text_encoder_3/config.json")
"""The config files the estimate reads beside the denoiser's (those a model lacks, e.g. SD 1.x's text_encoder_2,
are skipped)."""


def model_config_folder(args, family) -> str:
    """A folder holding the model's config files: ``--pretrained_model_name_or_path`` itself when it is a folder,
    else the Hub snapshot of its config files alone (``hf_hub_download`` of each; no weights): the family's
    denoiser config (``unet/`` or ``transformer/``), which must be there, and :data:`MODEL_CONFIG_FILES`."""
    if os.path.isdir(args.pretrained_model_name_or_path):
        return args.pretrained_model_name_or_path
    from huggingface_hub import hf_hub_download

    required = f"{family.denoiser_name}/config.json"
    folder = None
    for name in (required, *MODEL_CONFIG_FILES):
        try:
            path = hf_hub_download(args.pretrained_model_name_or_path, name, revision=args.revision,
                                   cache_dir=args.cache_dir)
        except Exception as error:  # noqa: BLE001 - a missing text_encoder_2 (SD 1.x) is normal
            if name == required:
                raise UsageError(f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path}: cannot read "
                                 f"{required} ({error})") from None
            continue
        folder = folder or os.path.dirname(os.path.dirname(path))
    return folder


def estimate_settings(args, mixed_precision: str, family) -> dict:
    """The settings of :func:`memory_estimate.estimate` for this run's flags (the worst step: hands and faces
    present, an exact fair solve)."""
    return dict(
        model=model_config_folder(args, family), rank=args.rank, resolution=args.resolution,
        mode="plain" if args.weighting != "fair" else "fair_exact", num_regions=len(run_objectives(args)) - 1,
        batch_size=args.train_batch_size,
        gradient_checkpointing=bool(args.gradient_checkpointing), mixed_precision=mixed_precision,
        optimizer="adamw8bit" if args.use_8bit_adam else "adamw", lora_target_modules=args.lora_target_modules,
        fair_gradient_dtype=args.fair_gradient_dtype, fair_batched_backward=bool(args.fair_batched_backward),
        vae_dtype="auto" if args.pretrained_vae_model_name_or_path is None else
        {"fp16": "fp16", "bf16": "bf16"}.get(mixed_precision, "fp32"),
        cache_latents=args.cache_latents, no_text_encoders=args.cache_text_embeddings,
        quantization=args.quantize_base)


def memory_estimate_lines(result) -> list[str]:
    """What ``--estimate_memory`` prints; the last line is ``estimated peak: N.NN GiB``."""
    gib = 1024**3
    lines = [f"resident at the step's start: {result['start_total'] / gib:.2f} GiB "
             + "(" + ", ".join(f"{k} {v / gib:.2f}" for k, v in result["resident"].items() if v) + ")",
             "phase peaks (GiB): " + ", ".join(f"{k} {v / gib:.2f}" for k, v in result["phase_peak"].items()),
             f"peak phase: {result['peak_phase']}. Tensors only: add the CUDA context (0.3-1 GiB) and 5-20% allocator "
             "overhead (docs/memory.md).",
             f"estimated peak: {result['peak_total'] / gib:.2f} GiB"]
    return lines


def memory_advice(args) -> str:
    """The flags that bring a run's memory down, those not already given (largest saving first)."""
    advice = []
    if args.weighting == "fair" and args.fair_gradient_dtype == "fp32":
        advice.append("--fair_gradient_dtype bf16")
    if not args.gradient_checkpointing:
        advice.append("--gradient_checkpointing")
    if not args.use_8bit_adam:
        advice.append("--use_8bit_adam")
    for flag in ("cache_latents", "cache_text_embeddings"):
        if not getattr(args, flag):
            advice.append(f"--{flag}")
    if args.pretrained_vae_model_name_or_path is None:
        advice.append("--pretrained_vae_model_name_or_path madebyollin/sdxl-vae-fp16-fix (SDXL)")
    advice.append(f"a lower --rank than {args.rank}")
    return ", ".join(advice)


def print_memory_estimate(args, mixed_precision: str) -> float:
    """``--estimate_memory``: estimate one step of this run from config files alone and print it; returns GiB."""
    import memory_estimate

    family = mf.family_for_model(args)  # model_index.json only, no weights
    if args.lora_target_modules is None:  # the family's default targets
        args.lora_target_modules = family.default_lora_targets
    settings = estimate_settings(args, mixed_precision, family)
    print(f"estimating one training step on fake tensors ({settings['mode']}, rank {args.rank}, "
          f"{mixed_precision}, batch {args.train_batch_size}) from {settings['model']} ...", flush=True)
    result = memory_estimate.estimate(**settings)
    for line in memory_estimate_lines(result):
        print(line)
    return result["peak_total"] / 1024**3


def warn_if_over_memory(args, accelerator, logger) -> None:
    """On CUDA: estimate the run (config files only, before any weight loads) and say up front when it exceeds
    the device's free memory, naming the flags that bring it down. The run still starts: it is an estimate."""
    try:
        estimated = print_memory_estimate(args, accelerator.mixed_precision)
    except Exception as error:  # noqa: BLE001 - an estimate that fails must never stop a run
        logger.warning(f"memory estimate unavailable ({error!r})")
        return
    free = torch.cuda.mem_get_info(accelerator.device)[0] / 1024**3
    if estimated > free:
        logger.warning(f"estimated peak {estimated:.2f} GiB exceeds the {free:.2f} GiB free on {accelerator.device}; "
                       f"expect an out-of-memory error or a slow, swapping run. Flags that bring it down: "
                       f"{memory_advice(args)}. Starting anyway.")


def main(args):
    from accelerate import Accelerator
    from accelerate.logging import get_logger
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig
    from tqdm.auto import tqdm

    global logger
    if args.estimate_memory:  # before any check that needs the data, before any weight loads
        print_memory_estimate(args, args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no"))
        return
    check_args(args)
    check_trackers(args)
    check_output_dir(args)
    if args.hub_token is not None:
        logging.getLogger(__name__).warning(
            "--hub_token on the command line is seen in the process list and shell history, and accelerate launch "
            "prints the whole command line when a run fails: log in once with `hf auth login` instead")
    resume_path = resolve_resume(args)
    if resume_path is not None:
        check_checkpoint(resume_path, args.output_dir)
    settle_checkpoint_branch(args, resume_path, move=False)  # a new run over another run's checkpoints: refused now
    if resume_path is not None and args.seed is None:
        args.seed = read_marker(resume_path)["seed"]  # the run's seed decides data order and noise: keep it
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2**31)

    # ---- Accelerator -------------------------------------------------------------------------
    mixed_precision = args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if mixed_precision == "fp16" and not torch.cuda.is_available():
        logging.getLogger(__name__).warning(
            "fp16 mixed precision needs a GPU; on this CPU fp16 autocast would do nothing, so training runs in fp32.")
        mixed_precision = "no"
    args.mixed_precision = mixed_precision
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, args.logging_dir)),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logger = get_logger(__name__, log_level="INFO")
    if not accelerator.is_local_main_process:
        import datasets
        import diffusers
        import transformers

        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
    set_seed(args.seed)  # the LoRA initialisation; per-example draws use fairhuman_utils.item_seed
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    repo_id = None
    if args.push_to_hub and accelerator.is_main_process:
        repo_id = create_hub_repo(args)
    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps

    # ---- Data check (before any model is loaded: bad input fails in seconds) -----------------
    dataset, mask_regions = verify_images(load_training_dataset(args), args)
    checked = check_dataset(dataset, args)
    objectives = run_objectives(args)  # FairHuman: ("global", *regions); hand and face by default
    logger.info(f"{len(checked['sizes'])} training images; "
                + ", ".join(f"with {name} boxes: {count}" for name, count in checked["counts"].items()))
    report_regions(checked, args, mask_regions)

    # ---- The model family (SD, SDXL, FLUX.1, SD3) from model_index.json, read before any weight loads
    family, family_error = None, None
    try:
        family = mf.family_for_model(args)
    except UsageError as error:  # a resume with another base model is named as such first
        family_error = error
    if family is not None:
        family.check_args(args)
        if args.lora_target_modules is None:
            args.lora_target_modules = family.default_lora_targets
    settings = run_settings(args, checked)
    settings["model_family"] = family.label if family is not None else None
    if resume_path is not None:
        check_resume_compatible(resume_path, settings, args)
        if accelerator.is_main_process:  # later checkpoints of the run that went on past this one: moved aside
            settle_checkpoint_branch(args, resume_path)
        accelerator.wait_for_everyone()
    if family_error is not None:
        raise family_error
    mf.check_quantize_available(args.quantize_base)

    # ---- Models (configs first: resolution and buckets are known before any weights load) -------
    vae_scale, size_step, granularity, native_resolution = family.geometry()
    if args.resolution is None:
        args.resolution = native_resolution
    settings["resolution"] = args.resolution
    if args.square_crop and args.resolution % size_step:
        raise UsageError(f"--resolution must be a multiple of {size_step} for {family.label} ("
                         f"{'the VAE factor' if size_step == vae_scale else 'VAE factor x patch size'}), got {args.resolution}")
    bucket_step = args.bucket_reso_steps or granularity
    if bucket_step % size_step:
        raise UsageError(f"--bucket_reso_steps must be a multiple of {size_step} for {family.label} ("
                         f"{'the VAE factor' if size_step == vae_scale else 'VAE factor x patch size'}), got {bucket_step}")
    if not args.square_crop and args.resolution < bucket_step:
        raise UsageError(f"--resolution {args.resolution} is below the bucket step {bucket_step} (--bucket_reso_steps)")
    buckets, example_sizes, bucket_rows = plan_buckets(checked, args, bucket_step)
    if accelerator.device.type == "cuda" and accelerator.is_main_process:
        warn_if_over_memory(args, accelerator, logger)
    log_buckets(checked, args, buckets, example_sizes, bucket_rows, bucket_step, global_batch=total_batch)
    check_lora_target_modules(args, family)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    family.load(accelerator.device, weight_dtype)
    unet = family.denoiser  # the UNet or transformer that gets the LoRA
    for tokenizer, limit, encoder, flag in family.caption_token_limits():
        warn_long_captions(checked, tokenizer, limit, encoder, flag)

    # ---- LoRA ----------------------------------------------------------------------------------
    targets = lora_targets(args)
    try:
        unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.lora_alpha, init_lora_weights="gaussian",
                                    target_modules=targets))
    except ValueError as error:
        raise UsageError(f"--lora_target_modules {args.lora_target_modules!r}: {error}") from None
    if writes_kohya_file(args, family):  # a module the kohya format cannot name fails now, not after training
        from peft.utils import get_peft_model_state_dict

        try:
            fh.lora_to_kohya(get_peft_model_state_dict(unet), args.lora_alpha)
        except ValueError as error:
            raise UsageError(f"--lora_target_modules {args.lora_target_modules!r} with --save_lora_format "
                             f"{args.save_lora_format}: {error}") from None
    cast_training_params(unet, dtype=torch.float32)  # trainable LoRA weights stay fp32 under fp16/bf16
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    lora_params = [p for p in unet.parameters() if p.requires_grad]

    def save_model_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:  # global_step: main's, read when the checkpoint is saved
                save_lora_files(args, family, accelerator.unwrap_model(model), output_dir, global_step, checkpoint=True)
        while weights:  # the full UNet is not saved: the LoRA is all that changes
            weights.pop()

    def load_model_hook(models, input_dir):
        while models:
            load_lora_into_denoiser(family, accelerator.unwrap_model(models.pop()), input_dir)
        cast_training_params(unet, dtype=torch.float32)

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    # ---- Optimizer -----------------------------------------------------------------------------
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    optimizer = make_optimizer(args, lora_params, accelerator.device)
    # FairHuman: how the three objectives' gradients become the update (every --weighting mode)
    fair_update = fh.FairUpdate(lora_params, args.weighting, alpha=args.fair_alpha,
                                update_interval=args.fair_update_interval, interval_weights=args.fair_interval_weights,
                                calibration=args.fair_interval_calibration,
                                batched_backward=args.fair_batched_backward, fidelity_check=args.fair_fidelity_check,
                                region_weights=region_loss_weights(args), objectives=objectives,
                                row_dtype=fair_gradient_dtype(args.fair_gradient_dtype, accelerator.mixed_precision))

    # ---- Data ----------------------------------------------------------------------------------
    train_dataset = FairHumanDataset(checked, args, args.seed, example_sizes, keep_regions=not args.square_crop)
    batch_sampler = BucketBatchSampler(bucket_rows, args.train_batch_size,
                                       accelerator.num_processes * args.gradient_accumulation_steps, args.seed)
    train_dataloader = torch.utils.data.DataLoader(train_dataset, batch_sampler=batch_sampler, collate_fn=collate_fn,
                                                   num_workers=args.dataloader_num_workers)
    if args.save_mask_previews and accelerator.is_main_process:
        keys = [key for batch in batch_sampler.global_batches(0) for key in batch][: args.save_mask_previews]
        save_mask_previews(train_dataset, keys, os.path.join(args.output_dir, "mask_previews"))
        logger.info(f"Wrote {len(keys)} mask previews to {os.path.join(args.output_dir, 'mask_previews')}")
    # Caption embeddings: per batch (SD/SDXL), or once per dataset row with the text encoders then off the device
    caption_conditioning = family.caption_conditioning(checked["captions"], accelerator.device)
    if args.cache_latents or args.cache_text_embeddings:
        train_dataset.cache = load_or_build_cache(train_dataset, args, family, accelerator, example_sizes,
                                                  caption_conditioning)
        offload_cached_encoders(args, family.vae, family.text_encoders)
        logger.info(f"Cached {'latents' if args.cache_latents else ''}"
                    f"{' and ' if args.cache_latents and args.cache_text_embeddings else ''}"
                    f"{'text embeddings' if args.cache_text_embeddings else ''} of {len(train_dataset)} images"
                    + (" (each image's crop drawn once)" if args.cache_latents else ""))

    steps_per_epoch = batch_sampler.global_batches_per_epoch  # one global batch per optimizer step
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer, step_rules=args.lr_step_rules,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes)
    unet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(unet, optimizer, train_dataloader, lr_scheduler)

    if accelerator.is_main_process:
        config = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in vars(args).items()}
        config.pop("hub_token", None)
        accelerator.init_trackers("fairhuman-lora", config=config)

    # ---- Training loop -------------------------------------------------------------------------
    global_step = 0
    # FairHuman: the fair update's state (schedule, coefficients, calibration) goes into every checkpoint, as JSON
    if resume_path is None:
        if args.resume_from_checkpoint == "latest":
            logger.info("No complete checkpoint in --output_dir; starting a new run.")
    else:
        global_step = load_checkpoint(accelerator, resume_path, fair_update)
        logger.info(f"Resumed from {resume_path} at optimizer step {global_step}")
    first_epoch = global_step // steps_per_epoch
    resume_batches = (global_step % steps_per_epoch) * args.gradient_accumulation_steps

    logger.info("***** Running FairHuman training *****")
    logger.info(f"  Model = {family.label} at {args.resolution}px, weighting = {args.weighting}"
                f"{f' (alpha {args.fair_alpha}, solved every {args.fair_update_interval} steps)' if fair_update.fair else ''}")
    logger.info(f"  Examples = {len(train_dataset)}, total batch = {total_batch}, optimizer steps = {args.max_train_steps}")
    progress_bar = tqdm(range(args.max_train_steps), initial=global_step, desc="Steps",
                        disable=not accelerator.is_local_main_process)
    step_losses = torch.zeros(len(objectives), device=accelerator.device)
    skipped_steps, images = SkippedSteps(args.max_nonfinite_steps), []
    last_step_time = time.perf_counter()
    unet.train()
    if global_step >= args.max_train_steps:
        logger.info(f"{resume_path} is at optimizer step {global_step}, --max_train_steps is {args.max_train_steps}: "
                    "no training step; saving the LoRA and finishing what was left (card, samples, push)")
    for epoch in range(first_epoch, args.num_train_epochs):
        if global_step >= args.max_train_steps:
            break
        dataloader = train_dataloader
        if epoch == first_epoch and resume_batches:
            dataloader = accelerator.skip_first_batches(train_dataloader, resume_batches)
        dataloader.set_epoch(epoch)  # accelerate would count from 0 after a resume
        batch_sampler.set_epoch(epoch)  # directly: not every accelerate wrapper (skip + shard) passes it on
        for batch in dataloader:
            # FairHuman: on per-objective steps DDP must not reduce .grad (the fair update averages the rows)
            with accelerator.accumulate(unet), fair_update.no_sync(accelerator, unet):
                inputs = prepare_inputs(batch, args, family, caption_conditioning, weight_dtype, accelerator.device)
                model_pred = family.predict(unet, inputs)  # on the (unpacked) latent grid
                # FairHuman: K objectives on one prediction, [L_global, L_region...] ([L_global, L_hand, L_face])
                loss_fn = functools.partial(region_losses, inputs=inputs, args=args)
                losses = loss_fn(model_pred)
                step_losses += losses.detach() / args.gradient_accumulation_steps
                # FairHuman: in place of accelerator.backward(loss)
                fair_update.backward(accelerator, losses, inputs.present, loss_fn=loss_fn, model_pred=model_pred)
                if accelerator.sync_gradients:
                    update_logs = fair_update.write_update(accelerator)  # FairHuman: .grad = sum_i c_i g_i
                    grad_norm = accelerator.clip_grad_norm_(lora_params, args.max_grad_norm)
                    step_skipped = optimizer_step(accelerator, optimizer, lr_scheduler, grad_norm, step_losses)

            if accelerator.sync_gradients:
                progress_bar.update(1)
                global_step += 1
                step_losses = accelerator.reduce(step_losses, "mean")
                skipped_steps.record(step_skipped, global_step)
                now = time.perf_counter()
                logs = {**{f"loss/{name}": float(v) for name, v in zip(objectives, step_losses)}, **update_logs,
                        "lr": lr_scheduler.get_last_lr()[0], "skipped_steps": skipped_steps.total,
                        "perf/step_seconds": now - last_step_time, "perf/peak_memory_mb": peak_memory_mb()}
                if accelerator.scaler is not None:
                    logs["loss_scale"] = accelerator.scaler.get_scale()
                accelerator.log(logs, step=global_step)
                progress_bar.set_postfix(progress_postfix(logs, objectives))
                last_step_time, step_losses = now, torch.zeros_like(step_losses)

                if global_step % args.checkpointing_steps == 0:
                    save_checkpoint(accelerator, args, global_step, settings, fair_update)
                if (args.validation_prompt and global_step % args.validation_steps == 0
                        and accelerator.is_main_process):
                    run_validation(args, accelerator, family, unet, weight_dtype, global_step, "validation")
            if global_step >= args.max_train_steps:
                break

    # ---- Save, card, push ----------------------------------------------------------------------
    accelerator.wait_for_everyone()
    push_error = None
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(unet)
        written = save_lora_files(args, family, unwrapped, args.output_dir, global_step)
        logger.info(f"Saved the LoRA ({args.save_precision}) to {', '.join(written)}")
        if args.validation_prompt and args.num_validation_images > 0:
            images = run_validation(args, accelerator, family, unet, weight_dtype, global_step, "test")
        evaluation = None
        if args.evaluate_prompts_file is not None:
            import evaluate_fairhuman

            evaluation = evaluate_fairhuman.evaluate_trained_lora(args, written[0])  # either format loads
        write_model_card(args, args.output_dir, repo_id or Path(args.output_dir).name, family, images, global_step,
                         evaluation)
        if args.push_to_hub:
            push_error = push_output_folder(args, repo_id)
    accelerator.end_training()
    if push_error is not None:
        raise HubError(push_error)


def cli(input_args=None):
    args = parse_args(input_args)
    try:
        main(args)
    except (UsageError, TrainingStopped, HubError) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    cli()
