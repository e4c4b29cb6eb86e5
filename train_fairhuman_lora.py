#!/usr/bin/env python
"""FairHuman LoRA training for Stable Diffusion 1.x/2.x, SDXL, FLUX.1 (dev, schnell) and SD3/3.5.

Shaped like diffusers' ``examples/text_to_image/train_text_to_image_lora.py``: ``parse_args`` and a
``main`` that reads top to bottom (accelerator, data check, models, LoRA, optimizer, data, loop,
save, card, push). What is FairHuman-specific -- region masks from boxes, the paired transform, the
K losses (global plus one per region) and the Minimum Potential Delay weights -- lives in ``fairhuman_utils.py``;
what differs between model families in ``model_families.py``; what is not training (checks, checkpoints, LoRA
files, card, Hub, cache) in modules named for it (README.md, "Copying the recipe").

    accelerate launch train_fairhuman_lora.py \
      --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \
      --dataset_name your/dataset --output_dir out
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import UnidentifiedImageError

import fairhuman_utils as fh
import model_families as mf
from checkpoints import (
    check_checkpoint,
    check_resume_compatible,
    load_checkpoint,
    read_marker,
    refuse_other_runs_checkpoints,
    resolve_resume,
    run_settings,
    save_checkpoint,
    settle_checkpoint_branch,
)
from flag_types import FINITE, NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT, flag_number
from hub import HubError, create_hub_repo, push_output_folder
from latent_cache import load_or_build_cache
from lora_files import default_output_name, load_lora_into_denoiser, lora_targets, save_run_lora, writes_kohya_file
from mask_previews import save_mask_previews
from model_card import write_model_card
from regions import RegionAction, region_loss_weights, region_sources, run_objectives
from training_checks import (
    CheckedDataset,
    check_args,
    check_dataset,
    check_image_sides,
    check_imagefolder_metadata,
    check_model,
    check_output_dir,
    check_trackers,
    error_with_causes,
    report_regions,
    verify_images,
    warn_long_captions,
)

logger = logging.getLogger(__name__)


UsageError = fh.UsageError  # bad input found before training starts; the message names the flag, column or row


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps in a row); the message says what to try."""


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
    parser = argparse.ArgumentParser(description="FairHuman LoRA training (SD 1.x/2.x, SDXL, FLUX.1, SD3/3.5, Z-Image, Qwen-Image, FLUX.2 klein, Chroma).")

    g = parser.add_argument_group("Model")
    g.add_argument("--pretrained_model_name_or_path", type=str, required=True,
                   help="Hub id or local folder of a diffusers model of a family in docs/model_families.md (the family is read "
                        "from its model_index.json).")
    g.add_argument("--pretrained_vae_model_name_or_path", type=str, default=None,
                   help="A separate VAE, e.g. madebyollin/sdxl-vae-fp16-fix (what the authors used for SDXL in fp16).")
    g.add_argument("--revision", type=str, default=None, help="Revision of the pretrained model on the Hub.")
    g.add_argument("--variant", type=str, default=None, help="Variant of the model files, e.g. fp16.")
    g.add_argument("--cache_dir", type=str, default=None, help="Where downloaded models and datasets are cached.")
    g.add_argument("--quantize_base", type=str, default="none", choices=mf.QUANTIZE_CHOICES,
                   help="Load the frozen transformer (the flow-matching families) in 4-bit NF4 or 8-bit (bitsandbytes, diffusers' "
                        "BitsAndBytesConfig; needs a CUDA GPU), computing in the run's precision; the LoRA on top "
                        "trains in full precision. Peak memory per setting: docs/memory.md.")
    g.add_argument("--quantize_text_encoders", type=str, default="none", choices=mf.QUANTIZE_CHOICES,
                   help="Load the large text encoders (T5-XXL, the Qwen LLMs) in 4-bit NF4 or 8-bit (bitsandbytes, "
                        "transformers' BitsAndBytesConfig) for the one pass that embeds every caption and prompt "
                        "before training; they are freed before the denoiser loads. Refused for SD/SDXL (CLIP only).")

    g = parser.add_argument_group("Flow matching (FLUX.1, SD3 and the 2026 families): as diffusers' DreamBooth LoRA examples")
    g.add_argument("--weighting_scheme", type=str, default=None, choices=mf.WEIGHTING_SCHEMES,
                   help="Timestep density and loss weighting (diffusers.training_utils); default: none for FLUX.1, "
                        "logit_normal for SD3 (the diffusers examples' defaults).")
    g.add_argument("--logit_mean", type=FINITE, default=None,
                   help="Mean of the logit_normal timestep density (default 0.0).")
    g.add_argument("--logit_std", type=POSITIVE, default=None,
                   help="Std of the logit_normal timestep density, positive (default 1.0).")
    g.add_argument("--mode_scale", type=flag_number(float, minimum=mf.MODE_SCALE_RANGE[0], maximum=mf.MODE_SCALE_RANGE[1]), default=None,
                   help="Scale of the mode timestep density (default 1.29), from -1 to 1.75: beyond, the density "
                        "draws times outside [0, 1].")
    g.add_argument("--guidance_scale", type=NON_NEGATIVE, default=None,
                   help="FLUX.1-dev's guidance embedding during training. Default 1.0, as kohya's FLUX.1 docs and "
                        "diffusers' QLoRA FLUX example (diffusers' DreamBooth example uses 3.5); schnell has none.")
    g.add_argument("--precondition_outputs", type=int, default=None, choices=[0, 1],
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
    g.add_argument("--max_train_samples", type=POSITIVE_INT, default=None,
                   help="Train on the first N rows only (for debugging or quick runs).")
    g.add_argument("--resolution", type=flag_number(int, minimum=1, multiple_of=8), default=None,
                   help="Training resolution; default: the model's own (unet sample_size x VAE factor: 512 for SD 1.5, 1024 for SDXL).")
    g.add_argument("--center_crop", action="store_true",
                   help="Take the centred crop instead of a random one (with buckets: the middle of the offsets that "
                        "keep the hand and face regions inside).")
    g.add_argument("--square_crop", action="store_true",
                   help="The diffusers examples' behaviour: resize the short side to --resolution and crop a square "
                        "(random, or centred with --center_crop), which can cut hands and faces off portrait and "
                        "landscape photos. Default: aspect-ratio buckets (each image whole, see docs/buckets_and_crops.md).")
    g.add_argument("--bucket_reso_steps", type=POSITIVE_INT, default=None,
                   help="Bucket sides are multiples of this many pixels. Default: the model's granularity, VAE "
                        "factor x UNet downsampling read from its config.json files (64 for SD 1.x/2.x and SDXL).")
    g.add_argument("--max_bucket_aspect_ratio", type=flag_number(float, minimum=1), default=4.0,
                   help="Longest bucket side / shortest, at most (4 = SDXL's own extreme buckets); lower it to "
                        "crop very long images more instead.")
    g.add_argument("--random_flip", action="store_true", help="Mirror image AND masks left-right with probability 1/2.")
    g.add_argument("--dataloader_num_workers", type=NON_NEGATIVE_INT, default=0,
                   help="Worker processes for data loading (also for decoding every image once before training).")
    g.add_argument("--skip_bad_images", action="store_true",
                   help="Rows whose image (or mask image) cannot be decoded -- truncated or corrupt files, images "
                        "above PIL's decompression-bomb limit -- are left out with a warning that counts them, "
                        "instead of stopping the run before training (the default).")

    g = parser.add_argument_group("FairHuman: region masks and objectives")
    g.add_argument("--mask_dilation", type=NON_NEGATIVE_INT, default=8,
                   help="Grow each box by this many TRAINING pixels (at the example's bucket size) on every side "
                        "(8 = the authors' 16x16 dilation kernel at 1024 px), whatever the photo's own size.")
    g.add_argument("--latent_mask_mode", type=str, default="hard", choices=["hard", "soft"],
                   help="Pixel masks are area-averaged onto the latent grid; 'hard' then thresholds at 0.5 (the "
                        "authors' 0/1 masks), 'soft' keeps the covered fraction.")
    g.add_argument("--local_loss_scale", type=POSITIVE, default=5.0,
                   help="s in L_region = mean((s * M * (pred - target))^2); 5 in the authors' runs.")
    g.add_argument("--local_loss_normalization", type=str, default="latent", choices=["latent", "area"],
                   help="'latent': region losses average over the whole latent (the authors'); 'area': over the region only.")
    g.add_argument("--weighting", type=str, default="fair", choices=["fair", "equal", "global"],
                   help="fair: alpha-fair (MPD) weights on the K objective gradients (global plus one per region; FairHuman); "
                        "equal: plain sum of the K losses; global: plain diffusers LoRA training (the baseline).")
    g.add_argument("--hand_loss_weight", type=NON_NEGATIVE, default=1.0,
                   help="With --weighting equal: the static weight of the hand loss, the update being that of L_global "
                        "+ hand_loss_weight * L_hand + face_loss_weight * L_face (a tuned static baseline for MPD).")
    g.add_argument("--face_loss_weight", type=NON_NEGATIVE, default=1.0,
                   help="With --weighting equal: the static weight of the face loss (see --hand_loss_weight).")
    g.add_argument("--region_loss_weight", metavar="NAME=W", action="append", default=None,
                   help="With --weighting equal: the static weight of region NAME's loss (repeatable; default 1; "
                        "--hand_loss_weight / --face_loss_weight are the same for the regions named hand and face).")
    g.add_argument("--fair_alpha", type=POSITIVE, default=2.0,
                   help="alpha of the alpha-fair weights: 2 = Minimum Potential Delay (the paper), 1 = proportional fairness.")
    g.add_argument("--fair_update_interval", type=POSITIVE_INT, default=None,
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
    g.add_argument("--save_mask_previews", type=NON_NEGATIVE_INT, default=0,
                   help="Write the first N training examples after the transforms to {output_dir}/mask_previews/ "
                        "({i}_image.png, {i}_hand.png, {i}_face.png, {i}_overlay.png) to check the masks sit on hands and faces.")
    g.add_argument("--prediction_type", type=str, default=None, choices=["epsilon", "v_prediction"],
                   help="Override the scheduler's prediction type. Leave unset to use the model's.")
    g.add_argument("--snr_gamma", type=POSITIVE, default=None,
                   help="Min-SNR weighting gamma (5.0 recommended); applied to every objective. https://huggingface.co/papers/2303.09556")
    g.add_argument("--noise_offset", type=NON_NEGATIVE, default=0.0, help="Scale of the offset noise (0 = off).")

    g = parser.add_argument_group("LoRA")
    g.add_argument("--rank", type=POSITIVE_INT, default=4, help="LoRA rank (the authors used 256 on SDXL).")
    g.add_argument("--lora_alpha", type=POSITIVE, default=None, help="LoRA alpha; default: equal to --rank.")
    g.add_argument("--lora_target_modules", type=str, default=None,
                   help="Comma-separated UNet / transformer module names (peft suffix match) that get LoRA adapters; "
                        "default: to_q,to_k,to_v,to_out.0 (SD/SDXL), the family's diffusers example's list (the others).")

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
    g.add_argument("--seed", type=flag_number(int, minimum=0, maximum=fh.SEED_MAX), default=None,
                   help="Seed: same seed and data give the same LoRA. Every random draw of an example (crop, flip, "
                        "noise, timestep) depends only on (seed, epoch, row), not on batching or resumption.")
    g.add_argument("--train_batch_size", type=POSITIVE_INT, default=1, help="Batch size per device.")
    g.add_argument("--num_train_epochs", type=POSITIVE_INT, default=100)
    g.add_argument("--max_train_steps", type=POSITIVE_INT, default=None, help="Optimizer steps; overrides --num_train_epochs.")
    g.add_argument("--gradient_accumulation_steps", type=POSITIVE_INT, default=1,
                   help="Micro-batches per optimizer step; with --weighting fair the per-objective gradients are summed "
                        "over them and the weights solved once per optimizer step.")
    g.add_argument("--gradient_checkpointing", action="store_true", help="Trade compute for memory in the UNet.")
    g.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                   help="Overrides the accelerate config. LoRA parameters stay fp32; fp16 needs a GPU (on CPU the run "
                        "falls back to fp32 and says so).")
    g.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere and newer GPUs.")
    g.add_argument("--max_nonfinite_steps", type=POSITIVE_INT, default=20,
                   help="Stop when this many optimizer steps in a row had non-finite losses or gradients (each is skipped).")

    g = parser.add_argument_group("Optimizer and learning rate")
    g.add_argument("--learning_rate", type=POSITIVE, default=1e-4, help="Initial learning rate (the authors: 1e-5).")
    g.add_argument("--scale_lr", action="store_true",
                   help="Multiply the learning rate by accumulation steps x batch size x processes.")
    g.add_argument("--lr_scheduler", type=str, default="constant",
                   help='One of "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", '
                        '"piecewise_constant" (with --lr_step_rules).')
    g.add_argument("--lr_step_rules", type=str, default=None,
                   help='The rules of --lr_scheduler piecewise_constant (diffusers\' step_rules): "multiple:step,...,'
                        'last_multiple", e.g. "1:100,0.1:200,0.01" = the full rate to step 100, a tenth to 200, then a '
                        'hundredth.')
    g.add_argument("--lr_warmup_steps", type=NON_NEGATIVE_INT, default=0, help="Warm-up optimizer steps.")
    g.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit instead of torch AdamW.")
    g.add_argument("--adam_beta1", type=flag_number(float, minimum=0, exclusive_maximum=1), default=0.9)
    g.add_argument("--adam_beta2", type=flag_number(float, minimum=0, exclusive_maximum=1), default=0.999)
    g.add_argument("--adam_weight_decay", type=NON_NEGATIVE, default=1e-2)
    g.add_argument("--adam_epsilon", type=POSITIVE, default=1e-08)
    g.add_argument("--max_grad_norm", type=POSITIVE, default=1.0, help="Clip the combined update to this norm.")

    g = parser.add_argument_group("Checkpoints")
    g.add_argument("--checkpointing_steps", type=POSITIVE_INT, default=500, help="Save a resumable checkpoint every N optimizer steps.")
    g.add_argument("--checkpoints_total_limit", type=POSITIVE_INT, default=None, help="Keep at most this many checkpoints.")
    g.add_argument("--resume_from_checkpoint", type=str, default=None,
                   help='A checkpoint folder, or "latest" for the newest complete one in --output_dir.')

    g = parser.add_argument_group("Validation")
    g.add_argument("--validation_prompt", type=str, default=None, help="Prompt to sample during and after training.")
    g.add_argument("--num_validation_images", type=NON_NEGATIVE_INT, default=4)
    g.add_argument("--validation_steps", type=POSITIVE_INT, default=500, help="Sample every N optimizer steps.")
    g.add_argument("--validation_inference_steps", type=POSITIVE_INT, default=None,
                   help="Sampling steps per validation image; default: the model family's advice (30 UniPC steps for "
                        "SD/SDXL, 28 for FLUX.1-dev and SD3, 4 for FLUX.1-schnell). Guidance: the family's too.")
    g.add_argument("--evaluate_prompts_file", type=str, default=None,
                   help="After training, run evaluate_fairhuman.py on the saved LoRA: these prompts (one per line), "
                        "--num_validation_images per prompt, base model vs LoRA from the same seeds, MediaPipe hand and "
                        "face scores (needs requirements-prepare.txt); writes OUTPUT_DIR/evaluation/ and puts the "
                        "table in the model card.")

    g = parser.add_argument_group("Logging and Hub")
    g.add_argument("--logging_dir", type=str, default="logs", help="TensorBoard log folder, under --output_dir.")
    g.add_argument("--report_to", type=str, default="tensorboard", choices=["tensorboard", "wandb", "all", "none"],
                   help="Where losses, weights and samples are logged.")
    g.add_argument("--push_to_hub", action="store_true", help="Push the LoRA and its model card to the Hub.")
    g.add_argument("--hub_model_id", type=str, default=None, help="Repository id; default: the output folder's name.")
    g.add_argument("--hub_token", type=str, default=None,
                   help="Hub token. Prefer `hf auth login`: a token on the command line is seen in the process list "
                        "and shell history, and accelerate launch prints the whole command line when a run fails. "
                        "Refused with --report_to wandb or all (wandb records the command line).")

    args = parser.parse_args(input_args)
    try:  # the region objectives, in their order, derived once: (name, "boxes" | "mask", column) each
        args.regions = region_sources(args)
    except UsageError as error:
        parser.error(str(error))
    if args.lora_alpha is None:
        args.lora_alpha = float(args.rank)
    if args.output_name is None:
        args.output_name = default_output_name(args.output_dir, args.save_lora_format)
    elif args.output_name.lower().endswith(".safetensors"):  # the extension is added when the file is written
        args.output_name = args.output_name[: -len(".safetensors")]
    return args


# ---------------------------------------------------------------------------------------------
# Data: loading, checking every row before training, the torch dataset
# ---------------------------------------------------------------------------------------------


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


class FairHumanDataset(torch.utils.data.Dataset):
    """Training examples: image and hand/face masks moved by one transform, plus caption and seed.

    ``targets`` is each row's example size ``(width, height)`` (its aspect-ratio bucket), or one int for
    the ``--square_crop`` square. Keys are ``(epoch, row)`` or ``(epoch, row, copy)`` (see
    :class:`BucketBatchSampler`), so every random draw of an example is made from
    ``fairhuman_utils.item_seed(seed, epoch, row)`` (a repeat ``copy`` > 0 of a row in the same epoch
    gets its own stream). Images and mask images are read upright (:func:`fairhuman_utils.open_image`).
    """

    def __init__(self, checked: CheckedDataset, args, seed: int, targets, keep_regions: bool = True):
        self.dataset = checked.dataset
        self.boxes = checked.boxes
        self.captions = checked.captions
        self.sources = args.regions
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
        for region, kind, column in self.sources:  # FairHuman: one mask per region, built from its boxes or mask image
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
        # FairHuman: the masks are resized, cropped and flipped with the image (one plan for both)
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


def plan_buckets(checked: CheckedDataset, args, step: int):
    """The example size of every row and the rows of each bucket.

    Aspect-ratio buckets (:func:`fairhuman_utils.make_buckets` at ``--resolution`` with sides multiples of
    ``step``, each row in the bucket of the closest aspect ratio), or with ``--square_crop`` one
    ``resolution x resolution`` bucket. Returns ``(buckets, targets, bucket_rows)``.
    """
    if args.square_crop:
        return [(args.resolution, args.resolution)], args.resolution, [list(range(len(checked.sizes)))]
    buckets = fh.make_buckets(args.resolution, step, args.max_bucket_aspect_ratio)
    assigned = [fh.assign_bucket(size, buckets) for size in checked.sizes]
    bucket_rows = [[row for row, b in enumerate(assigned) if b == i] for i in range(len(buckets))]
    return buckets, [buckets[b] for b in assigned], bucket_rows


def bucket_table(buckets, bucket_rows, repeats) -> str:
    """The bucket table logged before training: size, images, repeats filling its last global batch."""
    lines = ["  bucket (w x h) | images | repeats per epoch to fill the last global batch"]
    for (w, h), rows, extra in zip(buckets, bucket_rows, repeats):
        if rows:
            lines.append(f"  {w:>5} x {h:<5}    | {len(rows):>6} | {extra}")
    return "\n".join(lines)


def crop_statistics(checked: CheckedDataset, args, targets, seed: int) -> dict:
    """How much hand/face box area the crops of epoch 0 cut away (box columns only; flips change nothing).

    Replays each row's epoch-0 crop (:func:`fairhuman_utils.resize_crop_plan` with the same random
    draws and the same ``keep`` boxes as the dataset) from the image size and boxes alone, without
    decoding an image. Regions given as mask images are not decoded here, so they are left out. Returns counts: images with boxes, images losing more than 1 % of their box
    area, images losing a whole region (all their hand or all their face box area), and the fraction of
    all box area lost.
    """
    regions = [region for region, kind, _ in args.regions if kind == "boxes"]
    with_boxes = lose_some = lose_region = 0
    kept_all = total_all = 0.0
    for row, size in enumerate(checked.sizes):
        boxes = {region: checked.boxes[region][row] for region in regions}
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


CROP_CUT_WARNING = 0.05
"""Warn when more than this fraction of the images with boxes lose box area to the crop."""


def log_buckets(checked: CheckedDataset, args, buckets, targets, bucket_rows, step: int, global_batch: int) -> dict:
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
    loss = crop_statistics(checked, args, targets, args.seed)
    if loss["with_boxes"]:
        names = [name for name, kind, _ in args.regions if kind == "boxes"]
        message = (f"{loss['lose_some']} of {loss['with_boxes']} images with boxes lose {'/'.join(names)} box area to the "
                   f"crop, {loss['lose_region']} a whole region ({' or '.join(f'all their {n}' for n in names)} boxes); "
                   f"{100 * loss['lost_fraction']:.1f} % of all box area is cut away (epoch 0's crops)")
        if loss["lose_some"] > CROP_CUT_WARNING * loss["with_boxes"]:
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
               "masks": torch.stack([e["masks"] for e in examples])})  # FairHuman: the masks batch with the images
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


# ---------------------------------------------------------------------------------------------
# Models and conditioning
# ---------------------------------------------------------------------------------------------


@dataclass
class StepInputs:
    """What the denoiser's forward pass and the K losses need for one batch."""

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

    def __init__(self, max_in_a_row: int, family_advice: str = ""):
        self.max_in_a_row, self.in_a_row, self.total = max_in_a_row, 0, 0
        self.family_advice = family_advice  # the family's own way out (ModelFamily.nonfinite_advice)

    def record(self, skipped: bool, step: int) -> None:
        self.in_a_row = self.in_a_row + 1 if skipped else 0
        self.total += skipped
        if skipped:
            logger.warning(f"step {step}: non-finite loss or gradients, step skipped "
                           f"({self.in_a_row} in a row, {self.total} in all)")
        if self.in_a_row >= self.max_in_a_row:
            raise TrainingStopped(
                f"{self.in_a_row} optimizer steps in a row had non-finite losses or gradients. Try a lower "
                f"--learning_rate, --mixed_precision bf16 or no{self.family_advice}, or check the data.")


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


LEGACY_FAIR_STATE_FILE = "custom_checkpoint_0.pkl"  # where checkpoints of the previous format kept the fair update


# ---------------------------------------------------------------------------------------------
# Validation, model card, Hub
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def stage(name: str, device):
    """Log a loading stage, and on CUDA its peak memory (the staged loading: docs/memory.md)."""
    logger.info(f"Stage: {name}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    try:
        yield
    except OSError as error:  # a weight file missing or unreadable: named, not a library traceback
        detail = " ".join(str(error).split())
        raise UsageError(f"--pretrained_model_name_or_path: {name} failed ({type(error).__name__}: {detail})") from None
    peak = f", peak {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB on {device}" if device.type == "cuda" else ""
    logger.info(f"Stage done: {name} ({time.perf_counter() - start:.1f} s{peak})")


def move_vae(args, vae, device="cpu") -> None:
    """With ``--cache_latents``: the VAE off the accelerator once the latents are cached, on it to decode samples."""
    if args.cache_latents:
        vae.to(device)
        if device == "cpu" and torch.cuda.is_available():
            torch.cuda.empty_cache()


def sampling_autocast(device, weight_dtype):
    """Sampling runs the fp32 LoRA over the ``weight_dtype`` base under autocast, on every device."""
    return (torch.autocast(device.type, dtype=weight_dtype) if weight_dtype != torch.float32
            else contextlib.nullcontext())


class TrainedDenoiserSampler:
    """The evaluation's sampler at the end of a run (``evaluate_fairhuman.generate``): the TRAINED denoiser as it is
    on the device (quantized with ``--quantize_base``), no second pipeline, the prompts' stored embeddings (no text
    encoder); "base" is the denoiser with its LoRA disabled, a LoRA model the LoRA at the evaluation's scale."""

    def __init__(self, family, denoiser, device, weight_dtype):
        self.family, self.denoiser, self.device, self.weight_dtype = family, denoiser, device, weight_dtype
        self.pipeline = family.sampling_pipeline(denoiser)

    def select(self, name, scale) -> None:
        if scale is None:
            self.denoiser.disable_adapters()
        else:
            self.denoiser.enable_adapters()
            self.denoiser.set_adapters(["default"], weights=[scale])

    def __call__(self, prompt, count, generators, **kwargs):
        with sampling_autocast(self.device, self.weight_dtype), torch.no_grad():
            return self.pipeline(**self.family.sampling_call(prompt, count, self.device), generator=generators,
                                 **kwargs).images

    def close(self) -> None:
        self.denoiser.enable_adapters()
        self.denoiser.set_adapters(["default"], weights=[1.0])
        self.pipeline = None


def run_validation(args, accelerator, family, denoiser, weight_dtype, step, tag):
    """Sample ``--num_validation_images`` with the family's pipeline (SD/SDXL: UniPC; the flow-matching families:
    their Euler scheduler) from the prompt's stored embeddings; the trained denoiser is used as is, never cast."""
    logger.info(f"Running validation: {args.num_validation_images} images of {args.validation_prompt!r}")
    move_vae(args, family.vae, accelerator.device)
    pipeline = family.sampling_pipeline(accelerator.unwrap_model(denoiser))
    call = family.sampling_call(args.validation_prompt, 1, accelerator.device)
    advice = family.inference_advice()  # the family's sampling steps and guidance, as the card advises
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    with sampling_autocast(accelerator.device, weight_dtype), torch.no_grad():
        images = [pipeline(**call, num_inference_steps=args.validation_inference_steps or advice["steps"],
                           **family.guidance_call_kwargs(advice["guidance"]), generator=generator, height=args.resolution, width=args.resolution).images[0]
                  for _ in range(args.num_validation_images)]
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(tag, np.stack([np.asarray(im) for im in images]), step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Image(im, caption=f"{i}: {args.validation_prompt}") for i, im in enumerate(images)]})
    del pipeline
    move_vae(args, family.vae)
    return images


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def main(args):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig
    from tqdm.auto import tqdm

    import memory_estimate

    if args.estimate_memory:  # the run's checks of flags and configs, no data, no weights
        check_args(args)
        family, _ = check_model(args, None)
        memory_estimate.print_memory_estimate(args, args.mixed_precision
                                              or os.environ.get("ACCELERATE_MIXED_PRECISION", "no"), family)
        return
    check_args(args)
    check_trackers(args)
    check_output_dir(args)
    if args.hub_token is not None:
        logger.warning(
            "--hub_token on the command line is seen in the process list and shell history, and accelerate launch "
            "prints the whole command line when a run fails: log in once with `hf auth login` instead")
    resume_path = resolve_resume(args)
    if resume_path is not None:
        check_checkpoint(resume_path, args.output_dir)
    if resume_path is None:
        refuse_other_runs_checkpoints(args)  # a new run over another run's checkpoints: refused now
    if resume_path is not None and args.seed is None:
        args.seed = read_marker(resume_path)["seed"]  # the run's seed decides data order and noise: keep it
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2**31)
    # The model family (docs/model_families.md) and its checks from config files: before the data pass, no weights
    family, bucket_step = check_model(args, resume_path)

    # ---- Accelerator -------------------------------------------------------------------------
    mixed_precision = args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if mixed_precision == "fp16" and not torch.cuda.is_available():
        logger.warning(
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
    # one logger per module, all through the root handler; other processes than the main one say only errors
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
                        level=logging.INFO if accelerator.is_main_process else logging.ERROR)
    if not accelerator.is_local_main_process:
        import datasets
        import diffusers
        import transformers

        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
    set_seed(args.seed)  # the LoRA initialisation; per-example draws use fairhuman_utils.item_seed
    repo_id = None
    if args.push_to_hub and accelerator.is_main_process:
        repo_id = create_hub_repo(args)
    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps

    # ---- Data check (before any model is loaded: bad input fails in seconds) -----------------
    dataset, mask_regions = verify_images(load_training_dataset(args), args)
    checked = check_dataset(dataset, args)  # FairHuman: every row's boxes (or mask images) parsed and checked
    objectives = run_objectives(args)  # FairHuman: ("global", *regions); hand and face by default
    logger.info(f"{len(checked.sizes)} training images; "
                + ", ".join(f"with {name} boxes: {count}" for name, count in checked.counts.items()))
    report_regions(checked, args, mask_regions)

    settings = run_settings(args, checked)
    settings["model_family"] = family.label
    if resume_path is not None:
        check_resume_compatible(resume_path, settings, args)
        if accelerator.is_main_process:  # later checkpoints of the run that went on past this one: moved aside
            settle_checkpoint_branch(args, resume_path)
        accelerator.wait_for_everyone()
    if accelerator.is_main_process:  # made once every check has passed: a refused run leaves no empty folder
        os.makedirs(args.output_dir, exist_ok=True)

    # ---- Models (configs first: resolution and buckets are known before any weights load) -------
    buckets, example_sizes, bucket_rows = plan_buckets(checked, args, bucket_step)
    check_image_sides(family, [side for bucket in buckets for side in bucket], "--max_bucket_aspect_ratio")
    if accelerator.device.type == "cuda" and accelerator.is_main_process:
        memory_estimate.warn_if_over_memory(args, accelerator, logger, family)
    log_buckets(checked, args, buckets, example_sizes, bucket_rows, bucket_step, global_batch=total_batch)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    device = accelerator.device
    # Staged: the text encoders embed every caption and sampling prompt, and are freed (unless they embed each batch)
    # before the VAE encodes the latent cache; only then do the denoiser's weights load (docs/memory.md)
    prompts = [args.validation_prompt] if args.validation_prompt else []
    if args.evaluate_prompts_file is not None:
        import evaluate_fairhuman

        prompts += evaluate_fairhuman.read_prompts(args.evaluate_prompts_file, flag="--evaluate_prompts_file")
    with stage("text encoders: load", device):
        family.load_text_encoders(device, weight_dtype)
    for tokenizer, limit, encoder, flag in family.caption_token_limits():
        warn_long_captions(checked, tokenizer, limit, encoder, flag)
    with stage(f"captions and {len(prompts)} sampling prompts: embed", device):
        caption_conditioning = family.caption_conditioning(checked.captions, device, prompts)
    with stage("VAE: load", device):
        family.load_vae_stage(device, weight_dtype)
    train_dataset = FairHumanDataset(checked, args, args.seed, example_sizes, keep_regions=not args.square_crop)
    if args.cache_latents or args.cache_text_embeddings:
        with stage("cache: encode", device):
            train_dataset.cache = load_or_build_cache(train_dataset, args, family, accelerator, example_sizes,
                                                      caption_conditioning)
        move_vae(args, family.vae)
        logger.info(f"Cached {'latents' if args.cache_latents else ''}"
                    f"{' and ' if args.cache_latents and args.cache_text_embeddings else ''}"
                    f"{'text embeddings' if args.cache_text_embeddings else ''} of {len(train_dataset)} images"
                    + (" (each image's crop drawn once)" if args.cache_latents else ""))
    with stage(f"{family.denoiser_label}: load" + (f" ({args.quantize_base})" if args.quantize_base != "none" else ""),
               device):
        family.load_denoiser(device, weight_dtype)
    denoiser = family.denoiser  # the UNet or transformer that gets the LoRA

    # ---- LoRA ----------------------------------------------------------------------------------
    targets = lora_targets(args)
    try:
        denoiser.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.lora_alpha, init_lora_weights="gaussian",
                                    target_modules=targets))
    except ValueError as error:
        raise UsageError(f"--lora_target_modules {args.lora_target_modules!r}: {error}") from None
    if writes_kohya_file(args, family):  # a module the kohya format cannot name fails now, not after training
        from peft.utils import get_peft_model_state_dict

        try:
            fh.lora_to_kohya(get_peft_model_state_dict(denoiser), args.lora_alpha)
        except ValueError as error:
            raise UsageError(f"--lora_target_modules {args.lora_target_modules!r} with --save_lora_format "
                             f"{args.save_lora_format}: {error}") from None
    cast_training_params(denoiser, dtype=torch.float32)  # trainable LoRA weights stay fp32 under fp16/bf16
    if args.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    lora_params = [p for p in denoiser.parameters() if p.requires_grad]

    def save_model_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:  # global_step: main's, read when the checkpoint is saved
                save_run_lora(args, family, accelerator.unwrap_model(model), output_dir, global_step, checkpoint=True)
        while weights:  # the full denoiser is not saved: the LoRA is all that changes
            weights.pop()

    def load_model_hook(models, input_dir):
        while models:
            load_lora_into_denoiser(family, accelerator.unwrap_model(models.pop()), input_dir)
        cast_training_params(denoiser, dtype=torch.float32)

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    # ---- Optimizer -----------------------------------------------------------------------------
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    optimizer = make_optimizer(args, lora_params, accelerator.device)
    # FairHuman: how the K objectives' gradients become the update (every --weighting mode)
    fair_update = fh.FairUpdate(lora_params, args.weighting, alpha=args.fair_alpha,
                                update_interval=args.fair_update_interval, interval_weights=args.fair_interval_weights,
                                calibration=args.fair_interval_calibration,
                                batched_backward=args.fair_batched_backward, fidelity_check=args.fair_fidelity_check,
                                region_weights=region_loss_weights(args), objectives=objectives,
                                row_dtype=fair_gradient_dtype(args.fair_gradient_dtype, accelerator.mixed_precision))

    # ---- Data ----------------------------------------------------------------------------------
    batch_sampler = BucketBatchSampler(bucket_rows, args.train_batch_size,
                                       accelerator.num_processes * args.gradient_accumulation_steps, args.seed)
    train_dataloader = torch.utils.data.DataLoader(train_dataset, batch_sampler=batch_sampler, collate_fn=collate_fn,
                                                   num_workers=args.dataloader_num_workers)
    if args.save_mask_previews and accelerator.is_main_process:
        keys = [key for batch in batch_sampler.global_batches(0) for key in batch][: args.save_mask_previews]
        save_mask_previews(train_dataset, keys, os.path.join(args.output_dir, "mask_previews"))
        logger.info(f"Wrote {len(keys)} mask previews to {os.path.join(args.output_dir, 'mask_previews')}")

    steps_per_epoch = batch_sampler.global_batches_per_epoch  # one global batch per optimizer step
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer, step_rules=args.lr_step_rules,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes)
    denoiser, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(denoiser, optimizer, train_dataloader, lr_scheduler)

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
    skipped_steps, images = SkippedSteps(args.max_nonfinite_steps, family.nonfinite_advice()), []
    last_step_time = time.perf_counter()
    denoiser.train()
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
            with accelerator.accumulate(denoiser), fair_update.no_sync(accelerator, denoiser):
                inputs = prepare_inputs(batch, args, family, caption_conditioning, weight_dtype, accelerator.device)
                model_pred = family.predict(denoiser, inputs)  # on the (unpacked) latent grid
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
                    run_validation(args, accelerator, family, denoiser, weight_dtype, global_step, "validation")
            if global_step >= args.max_train_steps:
                break

    # ---- Save, card, push ----------------------------------------------------------------------
    accelerator.wait_for_everyone()
    push_error = None
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(denoiser)
        written = save_run_lora(args, family, unwrapped, args.output_dir, global_step)
        logger.info(f"Saved the LoRA ({args.save_precision}) to {', '.join(written)}")
        if args.validation_prompt and args.num_validation_images > 0:
            images = run_validation(args, accelerator, family, denoiser, weight_dtype, global_step, "test")
        evaluation = None
        if args.evaluate_prompts_file is not None:
            import evaluate_fairhuman

            # the trained (quantized) denoiser samples, LoRA off for "base": no second pipeline, no text encoder
            sampler = TrainedDenoiserSampler(family, unwrapped, accelerator.device, weight_dtype)
            evaluation = evaluate_fairhuman.evaluate_trained_lora(args, written[0], sampler)
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
