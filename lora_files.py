"""The LoRA files a run writes and reads: the diffusers file, the kohya file (ComfyUI / A1111 / Forge) and its
metadata, the settings recorded in both."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

import fairhuman_utils as fh
from regions import region_loss_weights, run_objectives

UsageError = fh.UsageError
logger = logging.getLogger(__name__)


LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


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


def lora_targets(args) -> list[str]:
    return [t.strip() for t in args.lora_target_modules.split(",") if t.strip()]


SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def write_lora_files(family, denoiser, folder: str, *, diffusers: bool = True, diffusers_dtype=None,
              kohya_file: str | None = None, kohya_dtype=None, kohya_metadata: dict | None = None,
              diffusers_metadata: dict | None = None) -> list[str]:
    """Write the denoiser's LoRA into ``folder``; returns the paths written. A dtype of None keeps the
    parameters' own (fp32: the script keeps the trainable LoRA weights in fp32).

    * ``pytorch_lora_weights.safetensors`` (with ``diffusers``): the diffusers format,
      ``{unet|transformer}.{module}.lora_A.weight`` / ``lora_B.weight`` for EVERY module plus the LoRA config
      as adapter metadata, what the family's pipeline ``load_lora_weights`` reads (and ``diffusers_metadata``, when
      given, in its header: the ``ss_*`` / modelspec keys of a family whose UI file is this one). The keys are peft's as they
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
        fh.make_safetensors_reproducible(path, diffusers_metadata if path.endswith(LORA_WEIGHT_NAME) else None)
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
    sources = args.regions
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
    metadata = {
        "ss_network_module": family.network_module(), "ss_network_dim": str(args.rank), "ss_network_alpha": str(args.lora_alpha),
        "ss_base_model_version": version, **family.kohya_version_fields(),
        "ss_sd_model_name": args.pretrained_model_name_or_path, "ss_output_name": args.output_name,
        "ss_resolution": f"({args.resolution}, {args.resolution})", "ss_steps": str(global_step),
        "ss_learning_rate": str(args.learning_rate), "ss_lr_scheduler": args.lr_scheduler,
        "ss_seed": str(args.seed), "ss_mixed_precision": str(args.mixed_precision),
        "ss_gradient_accumulation_steps": str(args.gradient_accumulation_steps),
        "ss_max_grad_norm": str(args.max_grad_norm), "ss_noise_offset": str(args.noise_offset),
        "ss_min_snr_gamma": str(args.snr_gamma), "ss_dataset_dirs": str(args.dataset_name or args.train_data_dir),
        "ss_training_comment": f"FairHuman LoRA (arXiv 2507.02714): {' + '.join(run_objectives(args))} objectives "
                               f"with Minimum Potential Delay weights; {family.kohya_training_comment()}",
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


def save_run_lora(args, family, denoiser, folder: str, global_step: int, checkpoint: bool = False) -> list[str]:
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
    metadata = kohya_metadata(args, family, global_step) if kohya or family.diffusers_file_is_the_ui_file() else None
    return write_lora_files(family, denoiser, folder, diffusers=diffusers, diffusers_dtype=diffusers_dtype,
                     kohya_file=f"{name}.safetensors" if kohya else None, kohya_dtype=dtype,
                     kohya_metadata=metadata if kohya else None,
                     diffusers_metadata=metadata if family.diffusers_file_is_the_ui_file() else None)


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
