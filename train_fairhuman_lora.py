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
import io
import json
import logging
import math
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

import fairhuman_utils as fh

logger = logging.getLogger(__name__)

CHECKPOINT_MARKER = "fairhuman_state.json"
DEFAULT_FAIR_UPDATE_INTERVAL = 8  # chosen from benchmarks/RESULTS.md: ~1.1x plain training, update cosine ~0.99
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


class UsageError(ValueError):
    """Bad input found before training starts; the message names the flag, column or row."""


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps in a row); the message says what to try."""


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description="FairHuman LoRA training (SD 1.x/2.x and SDXL).")

    g = parser.add_argument_group("Model")
    g.add_argument("--pretrained_model_name_or_path", type=str, required=True,
                   help="Hub id or local folder of a diffusers SD 1.x/2.x or SDXL model (SDXL is recognised by text_encoder_2).")
    g.add_argument("--pretrained_vae_model_name_or_path", type=str, default=None,
                   help="A separate VAE, e.g. madebyollin/sdxl-vae-fp16-fix (what the authors used for SDXL in fp16).")
    g.add_argument("--revision", type=str, default=None, help="Revision of the pretrained model on the Hub.")
    g.add_argument("--variant", type=str, default=None, help="Variant of the model files, e.g. fp16.")
    g.add_argument("--cache_dir", type=str, default=None, help="Where downloaded models and datasets are cached.")

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
    g.add_argument("--max_train_samples", type=int, default=None,
                   help="Train on the first N rows only (for debugging or quick runs).")
    g.add_argument("--resolution", type=int, default=None,
                   help="Training resolution; default: the model's own (unet sample_size x VAE factor: 512 for SD 1.5, 1024 for SDXL).")
    g.add_argument("--center_crop", action="store_true", help="Crop the centre instead of a random square.")
    g.add_argument("--random_flip", action="store_true", help="Mirror image AND masks left-right with probability 1/2.")
    g.add_argument("--dataloader_num_workers", type=int, default=0, help="Worker processes for data loading.")

    g = parser.add_argument_group("FairHuman: region masks and objectives")
    g.add_argument("--mask_dilation", type=int, default=8,
                   help="Grow each box by this many pixels on every side (8 = the authors' 16x16 dilation kernel).")
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
    g.add_argument("--fair_alpha", type=float, default=2.0,
                   help="alpha of the alpha-fair weights: 2 = Minimum Potential Delay (the paper), 1 = proportional fairness.")
    g.add_argument("--fair_update_interval", type=int, default=None,
                   help="Solve the exact fair weights (one backward pass per objective) every N optimizer steps; "
                        "1 = exact MPD every step, the authors' method, about 2x the cost of plain LoRA training. In "
                        "between, ONE backward pass of the losses weighted as --fair_interval_weights says, at about "
                        "the cost of plain training. Default 8: measured ~1.1x plain training with an update cosine "
                        "of ~0.99 to exact MPD (README: speed and fidelity).")
    g.add_argument("--fair_interval_weights", type=str, default="prediction", choices=["prediction", "reuse"],
                   help="With --fair_update_interval > 1, the weights on the steps between exact solves: 'prediction' "
                        "re-solves every step on the Gram matrix of the objectives' gradients with respect to the "
                        "prediction (no extra backward pass; scaled to the last exact solve); 'reuse' keeps the last "
                        "solved weights.")
    g.add_argument("--fair_batched_backward", action="store_true",
                   help="Get the per-objective gradients with one vmapped backward pass (is_grads_batched) instead "
                        "of one pass per objective. Same numbers; see README for when it is faster.")
    g.add_argument("--fair_fidelity_check", action="store_true",
                   help="Diagnostic for --fair_update_interval > 1: on the steps between solves also compute the "
                        "exact weights and log fidelity/update_cosine and fidelity/weight_rel_error (costs the "
                        "exact step's time).")
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
    g.add_argument("--lora_target_modules", type=str, default="to_q,to_k,to_v,to_out.0",
                   help="Comma-separated UNet module names that get LoRA adapters.")

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
                   help='One of "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup".')
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

    g = parser.add_argument_group("Logging and Hub")
    g.add_argument("--logging_dir", type=str, default="logs", help="TensorBoard log folder, under --output_dir.")
    g.add_argument("--report_to", type=str, default="tensorboard",
                   help='"tensorboard", "wandb", "all" or "none".')
    g.add_argument("--push_to_hub", action="store_true", help="Push the LoRA and its model card to the Hub.")
    g.add_argument("--hub_model_id", type=str, default=None, help="Repository id; default: the output folder's name.")
    g.add_argument("--hub_token", type=str, default=None, help="Hub token (not with --report_to wandb).")

    args = parser.parse_args(input_args)
    if args.lora_alpha is None:
        args.lora_alpha = float(args.rank)
    if args.output_name is None:
        args.output_name = Path(os.path.abspath(args.output_dir)).name
    return args


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
    for name in ["max_train_steps", "max_train_samples", "checkpoints_total_limit", "resolution", "fair_update_interval"]:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name} must be at least 1, got {value}")
    if args.resolution is not None and args.resolution % 8:
        raise UsageError(f"--resolution must be a multiple of 8, got {args.resolution}")
    for name in ["mask_dilation", "save_mask_previews", "num_validation_images", "lr_warmup_steps",
                 "dataloader_num_workers"]:
        if getattr(args, name) < 0:
            raise UsageError(f"--{name} must not be negative, got {getattr(args, name)}")
    for name in ["fair_alpha", "local_loss_scale", "learning_rate", "snr_gamma", "noise_offset", "max_grad_norm",
                 "lora_alpha", "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon"]:
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            raise UsageError(f"--{name} must be a finite number, got {value}")
    if args.fair_alpha <= 0:
        raise UsageError(f"--fair_alpha must be positive, got {args.fair_alpha}")
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
    if args.weighting != "fair" and (args.fair_update_interval is not None or args.fair_batched_backward
                                     or args.fair_fidelity_check):
        raise UsageError("--fair_update_interval, --fair_batched_backward and --fair_fidelity_check need --weighting fair")
    if args.fair_update_interval is None:
        args.fair_update_interval = DEFAULT_FAIR_UPDATE_INTERVAL if args.weighting == "fair" else 1
    if args.fair_fidelity_check and args.fair_update_interval == 1:
        raise UsageError("--fair_fidelity_check compares a --fair_update_interval above 1 with the exact update; "
                         "with --fair_update_interval 1 every step is exact")
    if args.report_to == "wandb" and args.hub_token is not None:
        raise UsageError("--report_to wandb and --hub_token cannot be used together (the token would be logged); "
                         "log in with `hf auth login` instead")
    if args.report_to not in ("tensorboard", "wandb", "all", "none"):
        raise UsageError(f"--report_to must be tensorboard, wandb, all or none, got {args.report_to!r}")
    targets = [t.strip() for t in args.lora_target_modules.split(",") if t.strip()]
    if not targets:
        raise UsageError("--lora_target_modules is empty")
    if (not args.output_name or args.output_name != Path(args.output_name).name or args.output_name.startswith(".")
            or args.output_name.lower().endswith("pytorch_lora_weights")):
        raise UsageError(f"--output_name must be a plain file name (no folder, not hidden, not ending in "
                         f"pytorch_lora_weights), got {args.output_name!r}")
    if args.resume_from_checkpoint not in (None, "latest") and not os.path.isdir(args.resume_from_checkpoint):
        raise UsageError(f"--resume_from_checkpoint: no such folder {args.resume_from_checkpoint!r}")


# ---------------------------------------------------------------------------------------------
# Data: loading, checking every row before training, the torch dataset
# ---------------------------------------------------------------------------------------------


def load_training_dataset(args):
    """The train split as a ``datasets.Dataset``: Hub id, local folder, save_to_disk folder or imagefolder."""
    import datasets

    flag, source = ("--train_data_dir", args.train_data_dir) if args.train_data_dir else ("--dataset_name", args.dataset_name)
    if args.train_data_dir is not None and not os.path.isdir(args.train_data_dir):
        raise UsageError(f"--train_data_dir: no such folder {args.train_data_dir!r}")
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
        reason = "the dataset is empty" if empty else f"{type(error).__name__}: {error}"
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


def open_image(cell) -> Image.Image:
    """Open an image cell as stored by ``datasets``: a PIL image, a {path, bytes} dict or a path."""
    if isinstance(cell, Image.Image):
        return cell
    if isinstance(cell, dict):
        if cell.get("bytes"):
            return Image.open(io.BytesIO(cell["bytes"]))
        if cell.get("path"):
            return Image.open(cell["path"])
    if isinstance(cell, (str, os.PathLike)):
        return Image.open(cell)
    raise TypeError(f"not an image: {type(cell).__name__}")


def _region_sources(args):
    """(region, 'boxes' | 'mask', column) for hand and face."""
    return [
        ("hand", "mask", args.hand_mask_column) if args.hand_mask_column else ("hand", "boxes", args.hand_box_column),
        ("face", "mask", args.face_mask_column) if args.face_mask_column else ("face", "boxes", args.face_box_column),
    ]


def check_dataset(dataset, args) -> dict:
    """Check every row before any long work; return what the torch dataset needs.

    Reads only image headers (sizes), parses every box cell (clipping and dropping as
    :func:`fairhuman_utils.parse_boxes` documents) and checks mask images open with the image's
    size. Raises :class:`UsageError` naming the column and row of the first problem.
    """
    import datasets

    columns = list(dataset.column_names)
    needed = [("--image_column", args.image_column), ("--caption_column", args.caption_column)]
    for region, kind, column in _region_sources(args):
        needed.append((f"--{region}_{'mask' if kind == 'mask' else 'box'}_column", column))
    for flag, column in needed:
        if column not in columns:
            raise UsageError(f"{flag}: column '{column}' not found in the dataset; its columns are: {', '.join(columns)}")
    # only the columns the recipe reads (other image columns would be decoded for nothing), images undecoded
    dataset = dataset.select_columns(list(dict.fromkeys(column for _, column in needed)))
    image_columns = [args.image_column] + [c for _, kind, c in _region_sources(args) if kind == "mask"]
    for column in image_columns:
        if isinstance(dataset.features.get(column), datasets.Image):
            dataset = dataset.cast_column(column, datasets.Image(decode=False))

    sizes, boxes, captions = [], {"hand": [], "face": []}, []
    counts = {"hand": 0, "face": 0}
    for row, example in enumerate(dataset):
        try:
            with open_image(example[args.image_column]) as image:
                size = image.size
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
        for region, kind, column in _region_sources(args):
            if kind == "boxes":
                try:
                    parsed = fh.parse_boxes(example[column], width=size[0], height=size[1], box_format=args.box_format,
                                            relative=args.relative_boxes, column=column, row=row)
                except fh.AnnotationError as error:
                    raise UsageError(str(error)) from None
                boxes[region].append(parsed)
                counts[region] += bool(parsed)
            else:
                try:
                    with open_image(example[column]) as mask:
                        mask_size = mask.size
                except (OSError, UnidentifiedImageError, TypeError, ValueError) as error:
                    raise UsageError(f"column '{column}', row {row}: cannot read the mask image ({error})") from None
                if mask_size != size:
                    raise UsageError(f"column '{column}', row {row}: mask size {mask_size[0]}x{mask_size[1]} differs "
                                     f"from the image size {size[0]}x{size[1]}")
                boxes[region].append(None)
    return {"dataset": dataset, "sizes": sizes, "boxes": boxes, "captions": captions, "counts": counts}


class FairHumanDataset(torch.utils.data.Dataset):
    """Training examples: image and hand/face masks moved by one transform, plus caption and seed.

    Keys are ``(epoch, row)`` pairs (see :class:`EpochShuffleSampler`), so every random draw of an
    example is made from ``fairhuman_utils.item_seed(seed, epoch, row)``.
    """

    def __init__(self, checked: dict, args, seed: int, resolution: int):
        self.dataset = checked["dataset"]
        self.boxes = checked["boxes"]
        self.captions = checked["captions"]
        self.sources = _region_sources(args)
        self.args = args
        self.seed = seed
        self.resolution = resolution

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, row = key if isinstance(key, tuple) else (0, key)
        seed = fh.item_seed(self.seed, epoch, row)
        rng = random.Random(seed)
        example = self.dataset[row]
        try:
            image = open_image(example[self.args.image_column])
            image.load()
        except (OSError, UnidentifiedImageError, TypeError, ValueError) as error:
            raise UsageError(f"column '{self.args.image_column}', row {row}: cannot read the image ({error})") from None
        masks = []
        for region, kind, column in self.sources:
            if kind == "boxes":
                masks.append(fh.boxes_to_mask(self.boxes[region][row], image.width, image.height, self.args.mask_dilation))
            else:
                try:
                    mask = open_image(example[column])
                    masks.append(fh.binarize_mask_image(mask, image.size, column=column, row=row))
                except fh.AnnotationError as error:
                    raise UsageError(str(error)) from None
        out = fh.paired_transform(image, masks, self.resolution, center_crop=self.args.center_crop,
                                  random_flip=self.args.random_flip, rng=rng)
        return {
            "pixel_values": out.pixel_values,
            "masks": out.masks,
            "original_size": out.original_size,
            "crop_top_left": out.crop_top_left,
            "caption": rng.choice(self.captions[row]),
            "seed": seed,
            "row": row,
        }


class EpochShuffleSampler(torch.utils.data.Sampler):
    """Yields ``(epoch, row)`` keys in a permutation that depends only on (seed, epoch)."""

    def __init__(self, num_rows: int, seed: int):
        self.num_rows, self.seed, self.epoch = num_rows, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return self.num_rows

    def __iter__(self):
        generator = torch.Generator().manual_seed(fh.item_seed(self.seed, self.epoch, 0, stream=1))
        for row in torch.randperm(self.num_rows, generator=generator).tolist():
            yield (self.epoch, row)


def collate_fn(examples):
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]).contiguous(),
        "masks": torch.stack([e["masks"] for e in examples]),
        "original_sizes": [e["original_size"] for e in examples],
        "crop_top_lefts": [e["crop_top_left"] for e in examples],
        "captions": [e["caption"] for e in examples],
        "seeds": [e["seed"] for e in examples],
        "rows": [e["row"] for e in examples],
    }


def save_mask_previews(dataset: FairHumanDataset, keys, folder: str) -> None:
    """Write image, hand mask, face mask and an overlay per example, all at the training resolution."""
    os.makedirs(folder, exist_ok=True)
    for i, key in enumerate(keys):
        example = dataset[key]
        pixels = ((example["pixel_values"].permute(1, 2, 0).numpy() + 1.0) * 127.5).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"{i}_image.png"))
        overlay = pixels.astype(np.float32)
        for mask, name, colour in zip(example["masks"], ("hand", "face"), ((255, 64, 64), (64, 128, 255))):
            m = mask.numpy()
            Image.fromarray((m * 255).round().astype(np.uint8)).save(os.path.join(folder, f"{i}_{name}.png"))
            overlay = overlay * (1 - 0.45 * m[..., None]) + 0.45 * m[..., None] * np.array(colour, np.float32)
        Image.fromarray(overlay.clip(0, 255).astype(np.uint8)).save(os.path.join(folder, f"{i}_overlay.png"))


# ---------------------------------------------------------------------------------------------
# Models and conditioning
# ---------------------------------------------------------------------------------------------


def is_sdxl_model(path: str, revision: str | None, cache_dir: str | None) -> bool:
    """SDXL pipelines have a second text encoder; read model_index.json to tell."""
    from diffusers import DiffusionPipeline

    try:
        config = DiffusionPipeline.load_config(path, revision=revision, cache_dir=cache_dir)
    except Exception as error:  # noqa: BLE001 - any failure here means the path is not a diffusers model
        raise UsageError(f"--pretrained_model_name_or_path: cannot read model_index.json of {path!r} ({error})") from None
    return "text_encoder_2" in config


def encode_prompt(text_encoders, tokenizers, captions, device, sdxl: bool):
    """Text conditioning: SD -> (hidden states, None); SDXL -> (both encoders' penultimate hidden
    states concatenated, pooled embedding of the second encoder)."""
    embeds, pooled = [], None
    for text_encoder, tokenizer in zip(text_encoders, tokenizers):
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        if not sdxl:
            return text_encoder(ids)[0], None
        out = text_encoder(ids, output_hidden_states=True)
        pooled = out[0]
        embeds.append(out.hidden_states[-2])
    return torch.cat(embeds, dim=-1), pooled


def sdxl_time_ids(original_sizes, crop_top_lefts, resolution, device, dtype):
    """SDXL micro-conditioning: (original h, w, crop top, left, target h, w) per example."""
    rows = [list(o) + list(c) + [resolution, resolution] for o, c in zip(original_sizes, crop_top_lefts)]
    return torch.tensor(rows, device=device, dtype=dtype)


SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def save_lora(pipeline_cls, unet, folder: str, *, diffusers: bool = True, diffusers_dtype=None,
              kohya_file: str | None = None, kohya_dtype=None, kohya_metadata: dict | None = None) -> list[str]:
    """Write the UNet's LoRA into ``folder``; returns the paths written. A dtype of None keeps the
    parameters' own (fp32: the script keeps the trainable LoRA weights in fp32).

    * ``pytorch_lora_weights.safetensors`` (with ``diffusers``): the diffusers format,
      ``unet.{module}.lora_A.weight`` / ``lora_B.weight`` for EVERY module plus the LoRA config as
      adapter metadata. The keys are peft's as they are: diffusers' ``convert_state_dict_to_diffusers``
      renames only to_q/to_k/to_v/to_out.0 (to ``lora.down``/``lora.up``), and a file mixing the two
      spellings loses the renamed half in ``load_lora_weights``, which decides on the first key alone.
    * ``kohya_file`` (when given): the kohya format of :func:`fairhuman_utils.lora_to_kohya` with
      ``kohya_metadata`` as safetensors metadata, for ComfyUI / A1111 / Forge.
    """
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    state = get_peft_model_state_dict(unet)
    written = []
    if diffusers:
        pipeline_cls.save_lora_weights(
            folder,
            unet_lora_layers={k: v.detach().to(diffusers_dtype or v.dtype) for k, v in state.items()},
            unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
            safe_serialization=True,
        )
        written.append(os.path.join(folder, LORA_WEIGHT_NAME))
    if kohya_file is not None:  # the script's LoraConfig: one rank and alpha for every module, plain LoRA
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, kohya_file)
        alpha = unet.peft_config["default"].lora_alpha
        save_file(fh.lora_to_kohya(state, alpha, dtype=kohya_dtype), path, metadata=kohya_metadata)
        written.append(path)
    return written


def training_settings(args, global_step: int) -> dict:
    """The settings a LoRA was trained with: the model card's table and the kohya file's metadata."""
    return {
        "weighting": args.weighting, "fair_alpha": args.fair_alpha, "fair_update_interval": args.fair_update_interval,
        "fair_interval_weights": args.fair_interval_weights if args.fair_update_interval > 1 else "-",
        "local_loss_scale": args.local_loss_scale,
        "local_loss_normalization": args.local_loss_normalization, "mask_dilation": args.mask_dilation,
        "latent_mask_mode": args.latent_mask_mode, "hand column": args.hand_mask_column or args.hand_box_column,
        "face column": args.face_mask_column or args.face_box_column, "box_format": args.box_format,
        "relative_boxes": args.relative_boxes, "rank": args.rank, "lora_alpha": args.lora_alpha,
        "lora_target_modules": args.lora_target_modules, "resolution": args.resolution,
        "center_crop": args.center_crop, "random_flip": args.random_flip, "learning_rate": args.learning_rate,
        "lr_scheduler": args.lr_scheduler, "train_batch_size": args.train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps, "optimizer steps": global_step,
        "max_grad_norm": args.max_grad_norm, "use_8bit_adam": args.use_8bit_adam,
        "mixed_precision": args.mixed_precision, "snr_gamma": args.snr_gamma, "noise_offset": args.noise_offset,
        "prediction_type": args.prediction_type or "model default", "seed": args.seed,
    }


def base_model_version(unet_config, sdxl: bool) -> str:
    """kohya's ``ss_base_model_version``: sdxl_base_v1-0, sd_v2 (1024-wide cross-attention, OpenCLIP-H) or
    sd_v1. A1111 shows a LoRA for models of this version."""
    if sdxl:
        return "sdxl_base_v1-0"
    return "sd_v2" if unet_config.cross_attention_dim == 1024 else "sd_v1"


def kohya_metadata(args, unet_config, sdxl: bool, prediction_type: str, global_step: int) -> dict[str, str]:
    """Safetensors metadata of the kohya file: kohya's ``ss_*`` keys (what A1111 / Forge / ComfyUI
    metadata viewers show), a ``modelspec`` header and every FairHuman setting as ``fairhuman_settings``."""
    version = base_model_version(unet_config, sdxl)
    architecture = {"sdxl_base_v1-0": "stable-diffusion-xl-v1-base", "sd_v2": "stable-diffusion-v2",
                    "sd_v1": "stable-diffusion-v1"}[version]
    metadata = {
        "ss_network_module": "networks.lora", "ss_network_dim": str(args.rank), "ss_network_alpha": str(args.lora_alpha),
        "ss_base_model_version": version, "ss_v2": str(version == "sd_v2"),
        "ss_v_parameterization": str(prediction_type == "v_prediction"),
        "ss_sd_model_name": args.pretrained_model_name_or_path, "ss_output_name": args.output_name,
        "ss_resolution": f"({args.resolution}, {args.resolution})", "ss_steps": str(global_step),
        "ss_learning_rate": str(args.learning_rate), "ss_lr_scheduler": args.lr_scheduler,
        "ss_seed": str(args.seed), "ss_mixed_precision": str(args.mixed_precision),
        "ss_gradient_accumulation_steps": str(args.gradient_accumulation_steps),
        "ss_max_grad_norm": str(args.max_grad_norm), "ss_noise_offset": str(args.noise_offset),
        "ss_min_snr_gamma": str(args.snr_gamma), "ss_dataset_dirs": str(args.dataset_name or args.train_data_dir),
        "ss_training_comment": "FairHuman LoRA (arXiv 2507.02714): global + hand + face objectives with "
                               "Minimum Potential Delay weights; authors' inference: LoRA scale 0.3, 30 UniPC steps, "
                               "CFG 7.5",
        "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": f"{architecture}/lora",
        "modelspec.implementation": "diffusers", "modelspec.title": args.output_name,
        "modelspec.resolution": f"{args.resolution}x{args.resolution}",
        "fairhuman_settings": json.dumps(training_settings(args, global_step)),
    }
    if args.pretrained_vae_model_name_or_path:
        metadata["ss_vae_name"] = args.pretrained_vae_model_name_or_path
    return metadata


def save_lora_files(args, pipeline_cls, unet, folder: str, sdxl: bool, prediction_type: str, global_step: int,
                    checkpoint: bool = False) -> list[str]:
    """The LoRA files --save_lora_format asks for.

    At the end of training (``checkpoint=False``): ``pytorch_lora_weights.safetensors`` and/or
    ``{output_name}.safetensors``, both in --save_precision. In a checkpoint: the diffusers file always,
    as trained (fp32; what --resume_from_checkpoint reads, so resuming is exact), and with kohya or both
    ``{output_name}-step{N}.safetensors`` in --save_precision, to try the intermediate LoRA in a UI.
    """
    dtype = SAVE_DTYPES[args.save_precision]
    kohya = args.save_lora_format in ("kohya", "both")
    if checkpoint:
        diffusers, diffusers_dtype, name = True, None, f"{args.output_name}-step{global_step}"
    else:
        diffusers, diffusers_dtype, name = args.save_lora_format in ("diffusers", "both"), dtype, args.output_name
    return save_lora(pipeline_cls, unet, folder, diffusers=diffusers, diffusers_dtype=diffusers_dtype,
                     kohya_file=f"{name}.safetensors" if kohya else None, kohya_dtype=dtype,
                     kohya_metadata=kohya_metadata(args, unet.config, sdxl, prediction_type, global_step) if kohya else None)


def load_lora_into_unet(pipeline_cls, unet, folder: str) -> None:
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    state = pipeline_cls.lora_state_dict(folder, weight_name=LORA_WEIGHT_NAME)  # the fp32 file, not the kohya one
    state = state[0] if isinstance(state, tuple) else state
    unet_state = {k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")}
    incompatible = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(unet_state), adapter_name="default")
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


def save_checkpoint(accelerator, args, global_step: int, seed: int, fair_state: dict | None = None) -> str:
    """Save a resumable checkpoint atomically: written to a hidden folder, then renamed.

    A kill while writing leaves only ``.checkpoint-N.partial``, which ``latest`` never picks. Older
    checkpoints beyond ``--checkpoints_total_limit`` are removed only after the new one is complete.
    """
    final = os.path.join(args.output_dir, f"checkpoint-{global_step}")
    partial = os.path.join(args.output_dir, f".checkpoint-{global_step}.partial")
    if accelerator.is_main_process and os.path.exists(partial):
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(partial)
    if accelerator.is_main_process:
        with open(os.path.join(partial, CHECKPOINT_MARKER), "w") as f:
            json.dump({"global_step": global_step, "seed": seed, "fair_state": fair_state}, f)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(partial, final)
        if args.checkpoints_total_limit is not None:
            for _, old in list_checkpoints(args.output_dir)[: -args.checkpoints_total_limit]:
                shutil.rmtree(old)
        logger.info(f"Saved state to {final}")
    accelerator.wait_for_everyone()
    return final


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


def run_validation(args, accelerator, pipeline_cls, components, unet, noise_scheduler, weight_dtype, step, tag):
    """Sample ``--num_validation_images`` with UniPC; the trained UNet is used as is, never cast."""
    from diffusers import UniPCMultistepScheduler

    logger.info(f"Running validation: {args.num_validation_images} images of {args.validation_prompt!r}")
    scheduler = UniPCMultistepScheduler.from_config(noise_scheduler.config)
    pipeline = pipeline_cls(unet=accelerator.unwrap_model(unet), scheduler=scheduler, **components)
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    autocast = (torch.autocast(accelerator.device.type, dtype=weight_dtype)
                if weight_dtype != torch.float32 and accelerator.device.type == "cuda" else contextlib.nullcontext())
    with autocast, torch.no_grad():
        images = [pipeline(args.validation_prompt, num_inference_steps=args.validation_inference_steps,
                           generator=generator, height=args.resolution, width=args.resolution).images[0]
                  for _ in range(args.num_validation_images)]
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(tag, np.stack([np.asarray(im) for im in images]), step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Image(im, caption=f"{i}: {args.validation_prompt}") for i, im in enumerate(images)]})
    del pipeline
    return images


def lora_usage(args, repo_id: str, pipeline_cls: str) -> str:
    """The model card's "How to use": which file goes where, with the authors' inference setting
    (LoRA scale 0.3, 30 UniPC steps, CFG 7.5)."""
    kohya_file = f"{args.output_name}.safetensors"
    files = []
    if args.save_lora_format in ("diffusers", "both"):
        files.append(f"| `{LORA_WEIGHT_NAME}` | diffusers format | diffusers `load_lora_weights` |")
    if args.save_lora_format in ("kohya", "both"):
        files.append(f"| `{kohya_file}` | kohya format | ComfyUI: `models/loras/`; AUTOMATIC1111 / Forge: "
                     f"`models/Lora/` (diffusers `load_lora_weights` reads it too) |")
    weight_name = "" if args.save_lora_format != "kohya" else f', weight_name="{kohya_file}"'
    text = f"""## How to use

Weights in {args.save_precision}, UNet only, rank {args.rank}, alpha {args.lora_alpha}:

| file | format | where it goes |
| --- | --- | --- |
""" + "\n".join(files) + f"""

The authors sampled with LoRA scale 0.3, 30 UniPC steps and CFG 7.5.

```python
import torch
from diffusers import {pipeline_cls}, UniPCMultistepScheduler

pipe = {pipeline_cls}.from_pretrained("{args.pretrained_model_name_or_path}", torch_dtype=torch.float16).to("cuda")
pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
pipe.load_lora_weights("{repo_id}"{weight_name})
pipe.fuse_lora(lora_scale=0.3)
image = pipe("a photo of a person waving", num_inference_steps=30, guidance_scale=7.5).images[0]
```
"""
    if args.save_lora_format in ("kohya", "both"):
        text += f"""
- ComfyUI: put `{kohya_file}` in `ComfyUI/models/loras/`, add a *Load LoRA* node after the checkpoint loader,
  `strength_model` 0.3 (the LoRA has no text-encoder part, `strength_clip` does nothing); KSampler: 30 steps,
  cfg 7.5, sampler `uni_pc`.
- AUTOMATIC1111 / Forge: put `{kohya_file}` in `models/Lora/` and add `<lora:{args.output_name}:0.3>` to the
  prompt; sampler UniPC, 30 steps, CFG scale 7.5.
"""
    return text


def write_model_card(args, folder: str, repo_id: str, sdxl: bool, images, global_step: int) -> str:
    """README.md for the LoRA: base model, data, every FairHuman setting, samples, how to load it."""
    for i, image in enumerate(images):
        image.save(os.path.join(folder, f"image_{i}.png"))
    dataset = args.dataset_name or args.train_data_dir
    gallery = "\n".join(f"![sample {i}](./image_{i}.png)" for i in range(len(images)))
    pipeline_cls = "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline"
    settings = training_settings(args, global_step)
    usage = lora_usage(args, repo_id, pipeline_cls)
    table = "\n".join(f"| {k} | {v} |" for k, v in settings.items())
    card = f"""---
base_model: {args.pretrained_model_name_or_path}
library_name: diffusers
license: other
tags:
- {"stable-diffusion-xl" if sdxl else "stable-diffusion"}
- text-to-image
- diffusers
- lora
- fairhuman
inference: true
---

# FairHuman LoRA: {repo_id}

LoRA adapters for `{args.pretrained_model_name_or_path}` trained with FairHuman (ICCV 2025,
arXiv 2507.02714): a global denoising loss plus hand- and face-region losses from box annotations,
combined with Minimum Potential Delay (alpha-fair) weights, to improve hands and faces.

Training data: `{dataset}`.

{gallery}

## Settings

| setting | value |
| --- | --- |
{table}

{usage}
"""
    path = os.path.join(folder, "README.md")
    with open(path, "w") as f:
        f.write(card)
    return path


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def main(args):
    from accelerate import Accelerator
    from accelerate.logging import get_logger
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params, compute_snr
    from huggingface_hub import create_repo, upload_folder
    from peft import LoraConfig
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    global logger
    check_args(args)
    resume_path = resolve_resume(args)
    if resume_path is not None and args.seed is None:
        with open(os.path.join(resume_path, CHECKPOINT_MARKER)) as f:
            args.seed = json.load(f)["seed"]  # the run's seed decides data order and noise: keep it
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
        repo_id = create_repo(repo_id=args.hub_model_id or Path(args.output_dir).name, exist_ok=True,
                              token=args.hub_token).repo_id

    # ---- Data check (before any model is loaded: bad input fails in seconds) -----------------
    checked = check_dataset(load_training_dataset(args), args)
    logger.info(f"{len(checked['sizes'])} training images; with hand boxes: {checked['counts']['hand']}, "
                f"with face boxes: {checked['counts']['face']}")

    # ---- Models --------------------------------------------------------------------------------
    path, rev, var = args.pretrained_model_name_or_path, args.revision, args.variant
    sdxl = is_sdxl_model(path, rev, args.cache_dir)
    pipeline_cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", revision=rev)
    if args.prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=args.prediction_type)
    tokenizers = [AutoTokenizer.from_pretrained(path, subfolder="tokenizer", revision=rev, use_fast=False)]
    text_encoders = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder", revision=rev, variant=var)]
    if sdxl:
        tokenizers.append(AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2", revision=rev, use_fast=False))
        text_encoders.append(CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2",
                                                                         revision=rev, variant=var))
    if args.pretrained_vae_model_name_or_path is not None:
        vae = AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path, revision=rev)
    else:
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", revision=rev, variant=var)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", revision=rev, variant=var)
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    if args.resolution is None:
        args.resolution = int(unet.config.sample_size) * vae_scale
    if args.resolution % vae_scale:
        raise UsageError(f"--resolution must be a multiple of the VAE factor {vae_scale}, got {args.resolution}")

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    # The SDXL VAE overflows in fp16: keep it fp32 unless a separate (fp16-fix) VAE was given.
    vae_dtype = torch.float32 if (sdxl and args.pretrained_vae_model_name_or_path is None) else weight_dtype
    for model in [vae, unet, *text_encoders]:
        model.requires_grad_(False)
    unet.to(accelerator.device, dtype=weight_dtype)
    vae.to(accelerator.device, dtype=vae_dtype)
    for text_encoder in text_encoders:
        text_encoder.to(accelerator.device, dtype=weight_dtype)

    # ---- LoRA ----------------------------------------------------------------------------------
    targets = [t.strip() for t in args.lora_target_modules.split(",") if t.strip()]
    try:
        unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.lora_alpha, init_lora_weights="gaussian",
                                    target_modules=targets))
    except ValueError as error:
        raise UsageError(f"--lora_target_modules {args.lora_target_modules!r}: {error}") from None
    if args.save_lora_format in ("kohya", "both"):  # a module the kohya format cannot name fails now, not after training
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
                save_lora_files(args, pipeline_cls, accelerator.unwrap_model(model), output_dir, sdxl,
                                noise_scheduler.config.prediction_type, global_step, checkpoint=True)
        while weights:  # the full UNet is not saved: the LoRA is all that changes
            weights.pop()

    def load_model_hook(models, input_dir):
        while models:
            load_lora_into_unet(pipeline_cls, accelerator.unwrap_model(models.pop()), input_dir)
        cast_training_params(unet, dtype=torch.float32)

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    # ---- Optimizer -----------------------------------------------------------------------------
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    optimizer = make_optimizer(args, lora_params, accelerator.device)

    # ---- Data ----------------------------------------------------------------------------------
    train_dataset = FairHumanDataset(checked, args, args.seed, args.resolution)
    sampler = EpochShuffleSampler(len(train_dataset), args.seed)
    train_dataloader = torch.utils.data.DataLoader(train_dataset, sampler=sampler, collate_fn=collate_fn,
                                                   batch_size=args.train_batch_size,
                                                   num_workers=args.dataloader_num_workers)
    if args.save_mask_previews and accelerator.is_main_process:
        keys = list(iter(sampler))[: args.save_mask_previews]
        save_mask_previews(train_dataset, keys, os.path.join(args.output_dir, "mask_previews"))
        logger.info(f"Wrote {len(keys)} mask previews to {os.path.join(args.output_dir, 'mask_previews')}")

    batches_per_epoch = math.ceil(len(train_dataset) / (args.train_batch_size * accelerator.num_processes))
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes)
    unet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(unet, optimizer, train_dataloader, lr_scheduler)

    if accelerator.is_main_process:
        config = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in vars(args).items()}
        config.pop("hub_token", None)
        accelerator.init_trackers("fairhuman-lora", config=config)

    # ---- Training loop -------------------------------------------------------------------------
    fair = args.weighting == "fair"
    objective_grads = fh.ObjectiveGradients(lora_params) if fair else None
    fixed = {"global": [1.0, 0.0, 0.0], "equal": [1.0, 1.0, 1.0]}.get(args.weighting)
    # the coefficients of the objective gradients in the update (K w for fair; the last solved ones)
    coefficients = None if fair else torch.tensor(fixed, dtype=torch.float64)
    num_objectives = len(fh.OBJECTIVES)
    prediction_weights = fair and args.fair_update_interval > 1 and args.fair_interval_weights == "prediction"
    gram_scale = 1.0  # exact Gram / prediction-space Gram at the last exact solve (prediction_weights)
    prediction_gram_sum = torch.zeros(num_objectives, num_objectives, dtype=torch.float64)
    latent_size = (args.resolution // vae_scale, args.resolution // vae_scale)
    text_components = ({"text_encoder": text_encoders[0], "tokenizer": tokenizers[0]} if not sdxl else
                       {"text_encoder": text_encoders[0], "text_encoder_2": text_encoders[1],
                        "tokenizer": tokenizers[0], "tokenizer_2": tokenizers[1]})
    components = dict(vae=vae, **text_components)
    if not sdxl:
        components.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)

    global_step, first_epoch, resume_batches = 0, 0, 0
    if resume_path is not None:
        accelerator.load_state(resume_path)
        with open(os.path.join(resume_path, CHECKPOINT_MARKER)) as f:
            state = json.load(f)
        global_step = state["global_step"]
        if fair and state.get("fair_state"):
            coefficients = torch.tensor(state["fair_state"]["coefficients"], dtype=torch.float64)
            gram_scale = state["fair_state"]["gram_scale"]
        first_epoch = global_step // steps_per_epoch
        resume_batches = (global_step % steps_per_epoch) * args.gradient_accumulation_steps
        logger.info(f"Resumed from {resume_path} at optimizer step {global_step}")
    elif args.resume_from_checkpoint == "latest":
        logger.info("No complete checkpoint in --output_dir; starting a new run.")

    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running FairHuman training *****")
    logger.info(f"  Model = {'SDXL' if sdxl else 'SD'} at {args.resolution}px, weighting = {args.weighting}"
                f"{f' (alpha {args.fair_alpha}, solved every {args.fair_update_interval} steps)' if fair else ''}")
    logger.info(f"  Examples = {len(train_dataset)}, total batch = {total_batch}, optimizer steps = {args.max_train_steps}")
    progress_bar = tqdm(range(args.max_train_steps), initial=global_step, desc="Steps",
                        disable=not accelerator.is_local_main_process)

    scaler = accelerator.scaler  # the fp16 GradScaler, or None
    step_losses = torch.zeros(len(fh.OBJECTIVES), device=accelerator.device)
    nonfinite_in_a_row, skipped_steps, images = 0, 0, []
    last_step_time = time.perf_counter()
    unet.train()
    for epoch in range(first_epoch, args.num_train_epochs):
        dataloader = train_dataloader
        if epoch == first_epoch and resume_batches:
            dataloader = accelerator.skip_first_batches(train_dataloader, resume_batches)
        dataloader.set_epoch(epoch)  # reaches EpochShuffleSampler; accelerate would count from 0 after a resume
        for batch in dataloader:
            # fair steps that solve the weights need each objective's gradient (one VJP per objective,
            # averaged across processes by hand, so DDP must not reduce); the others one weighted backward.
            solve_now = fair and (coefficients is None or global_step % args.fair_update_interval == 0)
            per_objective = solve_now or args.fair_fidelity_check
            with accelerator.accumulate(unet), (accelerator.no_sync(unet) if per_objective else contextlib.nullcontext()):
                generators = [torch.Generator().manual_seed(s) for s in batch["seeds"]]
                with torch.no_grad():
                    pixels = batch["pixel_values"].to(accelerator.device, dtype=vae_dtype)
                    latent_dist = vae.encode(pixels).latent_dist
                    eps = torch.stack([torch.randn(latent_dist.mean.shape[1:], generator=g) for g in generators])
                    latents = latent_dist.mean + latent_dist.std * eps.to(latent_dist.mean)
                    latents = (latents * vae.config.scaling_factor).to(weight_dtype)
                    noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in generators])
                    if args.noise_offset:
                        offsets = torch.stack([torch.randn(latents.shape[1], 1, 1, generator=g) for g in generators])
                        noise = noise + args.noise_offset * offsets
                    noise = noise.to(latents)
                    timesteps = torch.cat([torch.randint(0, noise_scheduler.config.num_train_timesteps, (1,), generator=g)
                                           for g in generators]).to(accelerator.device)
                    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
                    prompt_embeds, pooled = encode_prompt(text_encoders, tokenizers, batch["captions"],
                                                          accelerator.device, sdxl)
                    added_cond = None
                    if sdxl:
                        added_cond = {"text_embeds": pooled,
                                      "time_ids": sdxl_time_ids(batch["original_sizes"], batch["crop_top_lefts"],
                                                                args.resolution, accelerator.device, prompt_embeds.dtype)}
                    if noise_scheduler.config.prediction_type == "epsilon":
                        target = noise
                    elif noise_scheduler.config.prediction_type == "v_prediction":
                        target = noise_scheduler.get_velocity(latents, noise, timesteps)
                    else:
                        raise UsageError(f"unsupported prediction type {noise_scheduler.config.prediction_type!r}")
                    latent_masks = fh.masks_to_latent(batch["masks"], latent_size, args.latent_mask_mode)
                    present = [True] + [bool(latent_masks[:, i].any()) for i in range(2)]  # on the CPU: no sync
                    latent_masks = latent_masks.to(accelerator.device, non_blocking=True)
                    sample_weights = None
                    if args.snr_gamma is not None:
                        snr = compute_snr(noise_scheduler, timesteps)
                        if noise_scheduler.config.prediction_type == "v_prediction":
                            snr = snr + 1
                        sample_weights = torch.clamp(snr, max=args.snr_gamma) / snr

                model_pred = unet(noisy_latents, timesteps, prompt_embeds, added_cond_kwargs=added_cond).sample
                loss_fn = functools.partial(fh.fairhuman_losses, target=target, hand_mask=latent_masks[:, 0:1],
                                            face_mask=latent_masks[:, 1:2], local_loss_scale=args.local_loss_scale,
                                            normalization=args.local_loss_normalization, sample_weights=sample_weights)
                losses = loss_fn(model_pred)
                step_losses += losses.detach() / args.gradient_accumulation_steps
                if prediction_weights:  # cheap weights between exact solves: no backward pass through the UNet
                    prediction_gram = fh.prediction_space_gram(loss_fn, model_pred) / args.gradient_accumulation_steps**2
                    if accelerator.num_processes > 1:
                        prediction_gram = accelerator.reduce(prediction_gram.to(accelerator.device), "mean").cpu()
                    if solve_now:
                        prediction_gram_sum += prediction_gram
                    else:
                        estimate = gram_scale * args.gradient_accumulation_steps * prediction_gram
                        coefficients = (fh.fair_coefficients(estimate, args.fair_alpha)[1] if torch.isfinite(estimate).all()
                                        else torch.full((num_objectives,), float("nan"), dtype=torch.float64))
                if per_objective:
                    scale = scaler.get_scale() if scaler is not None else 1.0
                    objective_grads.accumulate(losses * (scale / args.gradient_accumulation_steps), present,
                                               batched=args.fair_batched_backward)
                else:
                    accelerator.backward(losses @ coefficients.to(losses))

                if accelerator.sync_gradients:
                    fidelity = None
                    if per_objective:  # average over processes, solve on the unscaled Gram, write K G w into .grad
                        fair_step = objective_grads.fair_update(args.fair_alpha, grad_scale=scale,
                                                                stale=None if solve_now else coefficients)
                        if solve_now:
                            exact = fair_step.exact
                            if prediction_weights:
                                gram_scale = fh.fair_scale(fair_step.gram, prediction_gram_sum)
                                prediction_gram_sum.zero_()
                            if coefficients is not None and args.fair_update_interval > 1:
                                # an objective absent at this solve keeps its last weight for the steps until the next
                                exact = torch.where(exact == 0, coefficients, exact)
                            if torch.isfinite(exact).all():
                                coefficients = exact
                        else:
                            fidelity = fair_step.fidelity()
                        step_weights = fair_step.applied
                    else:
                        step_weights = coefficients
                    grad_norm = accelerator.clip_grad_norm_(lora_params, args.max_grad_norm)
                    finite = torch.isfinite(torch.as_tensor(grad_norm)) and torch.isfinite(step_losses).all()
                    if scaler is None and not finite:
                        step_skipped = True  # no scaler to skip it for us
                    else:
                        optimizer.step()
                        step_skipped = accelerator.optimizer_step_was_skipped
                    if not step_skipped:
                        lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)

            if accelerator.sync_gradients:
                progress_bar.update(1)
                global_step += 1
                step_losses = accelerator.reduce(step_losses, "mean")
                nonfinite_in_a_row = nonfinite_in_a_row + 1 if step_skipped else 0
                skipped_steps += step_skipped
                if step_skipped:
                    logger.warning(f"step {global_step}: non-finite loss or gradients, step skipped "
                                   f"({nonfinite_in_a_row} in a row, {skipped_steps} in all)")
                if nonfinite_in_a_row >= args.max_nonfinite_steps:
                    raise TrainingStopped(
                        f"{nonfinite_in_a_row} optimizer steps in a row had non-finite losses or gradients. Try a lower "
                        "--learning_rate, --mixed_precision bf16 or no, the fp16-fix VAE "
                        "(--pretrained_vae_model_name_or_path madebyollin/sdxl-vae-fp16-fix), or check the data.")
                logs = {f"loss/{name}": float(v) for name, v in zip(fh.OBJECTIVES, step_losses)}
                logs.update({f"weight/{name}": float(v) for name, v in zip(fh.OBJECTIVES, step_weights)})
                now = time.perf_counter()
                logs.update({"lr": lr_scheduler.get_last_lr()[0], "skipped_steps": skipped_steps,
                             "perf/step_seconds": now - last_step_time, "perf/peak_memory_mb": peak_memory_mb()})
                last_step_time = now
                if fidelity is not None:
                    logs["fidelity/update_cosine"], logs["fidelity/weight_rel_error"] = fidelity
                if scaler is not None:
                    logs["loss_scale"] = scaler.get_scale()
                accelerator.log(logs, step=global_step)
                progress_bar.set_postfix(
                    {"L_g": f"{logs['loss/global']:.4f}", "L_h": f"{logs['loss/hand']:.4f}",
                     "L_f": f"{logs['loss/face']:.4f}", "w": "/".join(f"{float(v):.3g}" for v in step_weights),
                     "lr": f"{logs['lr']:.2e}"})
                step_losses = torch.zeros_like(step_losses)

                if global_step % args.checkpointing_steps == 0:
                    fair_state = None if coefficients is None or not fair else {
                        "coefficients": [float(c) for c in coefficients], "gram_scale": gram_scale}
                    save_checkpoint(accelerator, args, global_step, args.seed, fair_state)
                if (args.validation_prompt and global_step % args.validation_steps == 0
                        and accelerator.is_main_process):
                    run_validation(args, accelerator, pipeline_cls, components, unet, noise_scheduler,
                                   weight_dtype, global_step, "validation")
            if global_step >= args.max_train_steps:
                break
        if global_step >= args.max_train_steps:
            break

    # ---- Save, card, push ----------------------------------------------------------------------
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(unet)
        written = save_lora_files(args, pipeline_cls, unwrapped, args.output_dir, sdxl,
                                  noise_scheduler.config.prediction_type, global_step)
        logger.info(f"Saved the LoRA ({args.save_precision}) to {', '.join(written)}")
        if args.validation_prompt and args.num_validation_images > 0:
            images = run_validation(args, accelerator, pipeline_cls, components, unet, noise_scheduler,
                                    weight_dtype, global_step, "test")
        write_model_card(args, args.output_dir, repo_id or Path(args.output_dir).name, sdxl, images, global_step)
        if args.push_to_hub:
            upload_folder(repo_id=repo_id, folder_path=args.output_dir, commit_message="End of training",
                          token=args.hub_token,
                          ignore_patterns=["checkpoint-*", ".checkpoint-*", f"{args.logging_dir}/*", "step_*", "epoch_*"])
    accelerator.end_training()


def cli(input_args=None):
    args = parse_args(input_args)
    try:
        main(args)
    except (UsageError, TrainingStopped) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    cli()
