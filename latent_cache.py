"""--cache_latents / --cache_text_embeddings: the per-row cache of VAE latents (with the region masks) and
caption embeddings, in memory or on disk under --cache_dir, keyed by everything its content depends on."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil

import torch

import fairhuman_utils as fh

UsageError = fh.UsageError
logger = logging.getLogger(__name__)


@torch.no_grad()
def build_cache(dataset, args, family, device, caption_conditioning) -> dict:
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
                if flip:  # FairHuman: the masks mirrored with the image
                    pixels, masks = pixels.flip(-1), masks.flip(-1)
                    sizes = {**sizes, "crop_top_left": mirrored_crop_top_left(example)}
                mean, std = family.latent_distribution(pixels[None].to(device, dtype=vae.dtype))
                # FairHuman: the region masks on the latent grid, cached with the latents they weigh
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


def mirrored_crop_top_left(example) -> tuple[int, int]:
    """SDXL's crop conditioning of an example mirrored left-right: the crop's left edge measured in the mirrored
    resized image, ``resized_width - left - width`` (as :func:`fairhuman_utils.paired_transform` reports a flip)."""
    (height, width), (top, left), (target_h, target_w) = (example["original_size"], example["crop_top_left"],
                                                          example["target_size"])
    resized_width = fh.resize_crop_plan((width, height), (target_w, target_h), center_crop=True).resized[0]
    return top, resized_width - left - target_w


def weights_fingerprint(args, family) -> str | None:
    """The size and modification time of every file of the models the cache is made with: the model folder
    without the denoiser's subfolder (VAE, text encoders, tokenizers), and a separate VAE folder. A weight file
    changed in place gives another key. A Hub id is identified by ``--revision`` alone (``None`` here)."""
    roots = [(args.pretrained_model_name_or_path, family.denoiser_name),
             (args.pretrained_vae_model_name_or_path, None)]
    digest, local = hashlib.sha256(), False
    for root, skip in roots:
        if root is None or not os.path.isdir(root):
            continue
        local = True
        entries = []
        for folder, dirs, files in os.walk(root, followlinks=True):
            dirs[:] = [d for d in dirs if not (folder == root and d == skip)]
            for name in files:
                stat = os.stat(os.path.join(folder, name))
                entries.append(f"{os.path.relpath(os.path.join(folder, name), root)}|{stat.st_size}|{stat.st_mtime_ns}")
        digest.update("\n".join(sorted(entries)).encode() + b"\n")
    return digest.hexdigest() if local else None


CACHE_KEY_FLAGS = ("pretrained_model_name_or_path", "revision", "variant", "pretrained_vae_model_name_or_path",
                   "dataset_name", "dataset_config_name", "train_data_dir", "image_column", "caption_column",
                   "hand_box_column", "face_box_column", "box_format", "relative_boxes", "hand_mask_column",
                   "face_mask_column", "region_specs", "max_train_samples", "resolution", "center_crop", "square_crop",
                   "bucket_reso_steps", "max_bucket_aspect_ratio", "random_flip", "mask_dilation", "latent_mask_mode",
                   "max_sequence_length", "quantize_text_encoders", "cache_latents", "cache_text_embeddings")
"""The flags a cached latent or text embedding depends on (with the data, the buckets and the encoders' dtypes)."""


def source_fingerprint(args, dataset) -> str:
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


def cache_key_fields(args, dataset, targets, family) -> dict:
    """Everything the cache's content depends on; a cache on disk is read only when all of it is equal."""
    fields = {flag: getattr(args, flag) for flag in CACHE_KEY_FLAGS}
    fields["weights"] = weights_fingerprint(args, family)
    fields["data"] = source_fingerprint(args, dataset)
    fields["rows"] = len(dataset)
    fields["buckets"] = hashlib.sha256(json.dumps(targets if isinstance(targets, int) else [list(t) for t in targets])
                                       .encode()).hexdigest()
    fields["vae_dtype"] = str(family.vae.dtype)
    fields["text_encoder_dtype"] = family.text_encoder_dtype  # the first encoder's, recorded as it loaded
    if args.cache_latents and not args.center_crop:
        fields["seed"] = args.seed  # the crop drawn once per image comes from the run's seed
    return fields


def load_or_build_cache(dataset, args, family, accelerator, targets, caption_conditioning) -> dict:
    """The cache of :func:`build_cache`: in memory, or with ``--cache_dir`` in
    ``{cache_dir}/fairhuman-cache/{key}.pt`` (key: a hash of :func:`cache_key_fields`), read back only when every
    field is equal (another configuration's cache is never read: a new one is built, the differing fields
    logged). Written to a temporary file and renamed, so a full disk or a kill never leaves a half-written cache
    that a later run reads; a failed write stops the run naming the path."""
    if args.cache_dir is None:
        return build_cache(dataset, args, family, accelerator.device, caption_conditioning)
    fields = json.loads(json.dumps(cache_key_fields(args, dataset, targets, family),
                                   default=str))  # as stored: JSON values
    key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]
    folder = os.path.join(args.cache_dir, "fairhuman-cache")
    path = os.path.join(folder, f"{key}.pt")
    if os.path.exists(path):
        try:
            stored = torch.load(path, weights_only=True)
            if stored.get("fields") == fields:
                logger.info(f"Reading the latent/text cache {path}")
                return stored["cache"]
            logger.warning(f"{path} was written for another configuration; building a new cache")
        except Exception as error:  # noqa: BLE001 - an unreadable cache is rebuilt, never half read
            logger.warning(f"{path} is unreadable ({type(error).__name__}: {error}); building a new cache")
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith(".json") and name != f"{key}.json":
            try:
                with open(os.path.join(folder, name)) as f:
                    other = json.load(f)
            except (OSError, ValueError):
                continue
            differ = [k for k in sorted(set(other) | set(fields)) if other.get(k) != fields.get(k)]
            logger.info(f"{os.path.join(folder, name[:-5] + '.pt')}: a cache of another configuration (differs in "
                     f"{', '.join(differ)}); not read")
    cache = build_cache(dataset, args, family, accelerator.device, caption_conditioning)
    if accelerator.is_main_process:
        write_atomically(path, lambda f: torch.save({"fields": fields, "cache": cache}, f))
        write_atomically(os.path.join(folder, f"{key}.json"), lambda f: f.write(json.dumps(fields, indent=1).encode()))
        logger.info(f"Wrote the latent/text cache {path}")
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
    except (OSError, RuntimeError) as error:  # torch.save reports a full disk as a RuntimeError
        with contextlib.suppress(OSError):
            os.remove(tmp)
        reason = getattr(error, "strerror", None) or str(error).splitlines()[0]
        with contextlib.suppress(OSError):
            reason += f"; {shutil.disk_usage(os.path.dirname(path)).free / 2**20:.1f} MiB free there"
        raise UsageError(f"--cache_dir: cannot write {path} ({reason}); free space there, or leave "
                         "out --cache_dir to keep the cache in memory") from None
