"""Checks run before any long work (before weights load, before the data pass): the flags, the output folders,
the trackers, the dataset (every row, every image decoded once), the LoRA target modules, the captions' length.
Each problem is one :class:`fairhuman_utils.UsageError` naming the flag, column or row."""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import UnidentifiedImageError

import fairhuman_utils as fh
import model_families as mf
from hub import ignore_patterns as hub_ignore_patterns
from lora_files import LORA_WEIGHT_NAME, lora_targets
from regions import check_regions, region_flag

UsageError = fh.UsageError
logger = logging.getLogger(__name__)


# Exact MPD every step (the authors' method). The cheap interval mode (8, prediction weights, diagonal
# calibration) kept 97 % of exact's hand gain but 85 % of its face gain on the effect benchmark (5 seeds),
# per-objective weights 1.01 / 1.16 / 0.88 of exact's (benchmarks/RESULTS.md, issue 9).
DEFAULT_FAIR_UPDATE_INTERVAL = 1


TRACKERS_RECORDING_ARGV = ("wandb", "all")  # --report_to values whose tracker records sys.argv (wandb does)


def check_args(args) -> None:
    """Refuse impossible flag combinations up front, naming the flags."""
    if args.dataset_name is None and args.train_data_dir is None and not args.estimate_memory:
        raise UsageError("give a dataset: --dataset_name or --train_data_dir")
    if args.dataset_name is not None and args.train_data_dir is not None:
        raise UsageError("--dataset_name and --train_data_dir are exclusive; give one")
    if args.cache_latents and args.square_crop and not args.center_crop:
        raise UsageError("--cache_latents holds one crop per image, but --square_crop without --center_crop draws a "
                         "new random square crop every epoch, which the cache cannot hold: add --center_crop, or drop "
                         "--square_crop (buckets train each image whole; their region-safe crop is drawn once per "
                         "image when latents are cached), or drop --cache_latents")
    if args.square_crop and (args.bucket_reso_steps is not None or args.max_bucket_aspect_ratio != 4.0):
        raise UsageError("--bucket_reso_steps and --max_bucket_aspect_ratio set the aspect-ratio buckets, which "
                         "--square_crop turns off; give one or the other")
    for name in ("hand_loss_weight", "face_loss_weight"):
        if args.weighting != "equal" and getattr(args, name) != 1.0:
            raise UsageError(f"--{name} is the static weight of --weighting equal; --weighting {args.weighting} "
                             + ("chooses the weights itself" if args.weighting == "fair" else "does not use the regions"))
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
    if args.validation_prompt is not None and not args.validation_prompt.strip():
        raise UsageError("--validation_prompt is empty: give a prompt to sample, or leave the flag out (no validation)")
    if args.validation_prompt is not None and args.num_validation_images < 1:
        raise UsageError(f"--validation_prompt samples --num_validation_images images: give at least 1, got "
                         f"{args.num_validation_images}")
    if not args.pretrained_model_name_or_path:
        raise UsageError("--pretrained_model_name_or_path is empty")
    for flag in ("image_column", "caption_column", "hand_box_column", "face_box_column", "logging_dir"):
        if not getattr(args, flag):
            raise UsageError(f"--{flag} is empty")
    if not args.region_specs:
        (_, hand_kind, hand), (_, face_kind, face) = args.regions
        if hand == face:
            raise UsageError(f"the hand and face regions are read from the same column {hand!r} "
                             f"({region_flag(args, 'hand', hand_kind, hand, with_column=False)}, "
                             f"{region_flag(args, 'face', face_kind, face, with_column=False)}): give each its own")
        for flag, column in (("--hand_mask_column", args.hand_mask_column), ("--face_mask_column", args.face_mask_column)):
            if column is not None and column in (args.image_column, args.caption_column):
                raise UsageError(f"{flag} {column!r} is also --image_column or --caption_column")
    else:  # named regions: the same rules, each region named with its flag
        readers = {}
        for name, kind, column in args.regions:
            flag = region_flag(args, name, kind, column)
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
        hub_ignore_patterns(args)  # a --cache_dir that is the output folder itself is refused now
    if args.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes")
    if args.cache_dir is not None and os.path.isfile(args.cache_dir):
        raise UsageError(f"--cache_dir {args.cache_dir!r} is a file, not a folder")


def check_model(args, resume_path: str | None):
    """The model family (``model_index.json``) and every check that needs only config files and flags: the
    folder's parts, the family's flags, quantization, the sizes the denoiser takes. Run before the data pass
    and before any weight loads. Sets the family's defaults (LoRA targets; the resolution: the checkpoint's when
    resuming, else the model's native one). Returns ``(family, bucket_step)``."""
    from checkpoints import check_resume_compatible, run_settings, saved_setting  # checkpoints imports this module

    try:
        family = mf.family_for_model(args)
    except UsageError:
        if resume_path is not None:  # a resume with another base model is named as such first
            check_resume_compatible(resume_path, run_settings(args, None), args)
        raise
    family.check_parts()
    family.check_args(args)
    if args.lora_target_modules is None:
        args.lora_target_modules = family.default_lora_targets
    check_lora_target_modules(args, family)
    mf.check_quantize_available(args)  # one error before any weight loads
    vae_scale, size_step, granularity, native_resolution = family.geometry()
    if args.resolution is None:
        args.resolution = (saved_setting(resume_path, "resolution") if resume_path else None) or native_resolution
    why = "the VAE factor" if size_step == vae_scale else "VAE factor x patch size"
    if args.square_crop and args.resolution % size_step:
        raise UsageError(f"--resolution must be a multiple of {size_step} for {family.label} ({why}), got "
                         f"{args.resolution}")
    bucket_step = args.bucket_reso_steps or granularity
    if bucket_step % size_step:
        raise UsageError(f"--bucket_reso_steps must be a multiple of {size_step} for {family.label} ({why}), got "
                         f"{bucket_step}")
    if not args.square_crop and args.resolution < bucket_step:
        raise UsageError(f"--resolution {args.resolution} is below the bucket step {bucket_step} (--bucket_reso_steps)")
    check_image_sides(family, [args.resolution], "--resolution")
    return family, bucket_step


def check_image_sides(family, sides, flag: str) -> None:
    """Image sides larger than the denoiser takes (:meth:`model_families.ModelFamily.max_image_side`), named."""
    limit = family.max_image_side()
    if limit is not None and max(sides) > limit[0]:
        largest, setting = limit
        raise UsageError(f"{flag}: {family.label} takes images of at most {largest} px a side (its transformer's "
                         f"{setting}), got {max(sides)}; train at --resolution {largest} or less"
                         + ("" if flag == "--resolution" else " or with a lower --max_bucket_aspect_ratio"))


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
    if args.cache_dir is not None:  # the datasets cache, the Hub downloads and --cache_latents' files go there
        _check_writable(args.cache_dir, "--cache_dir")
    if args.report_to != "none":
        _check_writable(os.path.join(args.output_dir, args.logging_dir), "--logging_dir")
    if args.save_mask_previews:
        _check_writable(os.path.join(args.output_dir, "mask_previews"), "--save_mask_previews (OUTPUT_DIR/mask_previews)")


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


def _image_columns(args) -> list[str]:
    return [args.image_column] + [c for _, kind, c in args.regions if kind == "mask"]


def recipe_columns(dataset, args):
    """The dataset narrowed to the columns the recipe reads, image columns left undecoded.

    Raises :class:`UsageError` naming the flag of a column that is missing. Other columns (possibly
    other images) are never read.
    """
    import datasets

    columns = list(dataset.column_names)
    needed = [("--image_column", args.image_column), ("--caption_column", args.caption_column)]
    needed += [(region_flag(args, region, kind, column, with_column=False), column) for region, kind, column in args.regions]
    for flag, column in needed:
        if column not in columns:
            raise UsageError(f"{flag}: column '{column}' not found in the dataset; its columns are: {', '.join(columns)}")
    dataset = dataset.select_columns(list(dict.fromkeys(column for _, column in needed)))
    for region, kind, column in args.regions:  # a mask flag on a column of boxes: say which flag reads it
        feature = dataset.features.get(column)
        if kind == "mask" and isinstance(feature, (list, datasets.Sequence, datasets.LargeList)):
            raise UsageError(f"{region_flag(args, region, 'mask', column)}: column '{column}' holds boxes, not mask "
                             f"images; use {region_flag(args, region, 'boxes', column)}")
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
    mask_sources = [(region, column) for region, kind, column in args.regions if kind == "mask"]
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


@dataclass
class CheckedDataset:
    """What :func:`check_dataset` found, row by row: what the torch dataset, the buckets and the checkpoints need."""

    dataset: object  # the dataset, reduced to the columns the recipe reads
    sizes: list  # per row, the image's (width, height), upright
    boxes: dict  # region -> per row, its parsed pixel boxes (None for a region given as mask images)
    captions: list  # per row, its captions (a list of strings)
    counts: dict  # region -> how many rows have at least one box of it


def check_dataset(dataset, args) -> CheckedDataset:
    """Check every row before any long work; return what the torch dataset needs.

    Reads only image headers (sizes, in the upright frame: EXIF orientation applied; :func:`verify_images`
    decodes every image), parses every box cell (clipping and dropping as
    :func:`fairhuman_utils.parse_boxes` documents), checks each box column's numbers are in the unit
    ``--relative_boxes`` says (:func:`fairhuman_utils.box_units_problem`) and that mask images open with
    the image's size. Raises :class:`UsageError` naming the column and row of the first problem.
    """
    dataset = recipe_columns(dataset, args)
    regions = [region for region, _, _ in args.regions]
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
        for region, kind, column in args.regions:
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
    return CheckedDataset(dataset=dataset, sizes=sizes, boxes=boxes, captions=captions, counts=counts)


def report_regions(checked: CheckedDataset, args, mask_regions: dict | None = None) -> list[str]:
    """Warn, with counts, where the regions (hand, face by default) vanish: boxes dropped by clipping (entirely outside
    their image, or no area), images without any region (they train the global objective only), and
    an objective absent from the whole dataset (then ``--weighting fair`` has nothing to balance for
    it). Regions given as mask images count through ``mask_regions`` (region -> per row, whether the
    mask has a region pixel; from :func:`verify_images`). Returns the warnings, each also logged."""
    warnings, total = [], len(checked.sizes)
    present, columns = {}, {}
    for region, kind, column in args.regions:
        columns[region] = column
        if kind == "boxes":
            given = sum(len(cell) for cell in checked.dataset[column] if isinstance(cell, (list, tuple)))
            kept = sum(len(boxes) for boxes in checked.boxes[region])
            if kept < given:
                warnings.append(f"column '{column}': {given - kept} of {given} {region} boxes were dropped (outside "
                                "their image or no area left after clipping); check --box_format and --relative_boxes")
            present[region] = [bool(boxes) for boxes in checked.boxes[region]]
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


def unmatched_target_modules(module_names, targets) -> list[str]:
    """The ``targets`` that name no module, matched as peft matches a list of names: a module ``name``
    is targeted by ``t`` when ``name == t`` or ``name`` ends with ``"." + t``."""
    names = list(module_names)
    return [t for t in targets if not any(name == t or name.endswith("." + t) for name in names)]


def check_lora_target_modules(args, family) -> None:
    """Every ``--lora_target_modules`` entry must name at least one module of the UNet / transformer. Checked
    on the model built from its config on the meta device (no weights loaded), before the models are loaded."""
    names = family.denoiser_module_names()
    top_level = sorted(t for t in lora_targets(args) if "." not in t and t in names)
    if top_level:  # peft matches a bare suffix anywhere: the top-level module of that name trains too
        nested = {t: sum(name.endswith("." + t) for name in names) for t in top_level}
        logger.warning(f"--lora_target_modules: {', '.join(top_level)} also match{'es' if len(top_level) == 1 else ''} "
                       f"the top-level module{'s' if len(top_level) > 1 else ''} of the {family.denoiser_label} of that "
                       f"name, besides the nested ones ({', '.join(f'{n} {t}' for t, n in nested.items())}): it trains "
                       "too. "
                       "Name the nested ones with their parent (e.g. attn.to_q) to leave it out")
    unmatched = unmatched_target_modules(names, lora_targets(args))
    if unmatched:
        examples = family.attention_module_examples(names)
        raise UsageError(f"--lora_target_modules: {', '.join(unmatched)} match no module of the "
                         f"{family.denoiser_label} "
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


def warn_long_captions(checked: CheckedDataset, tokenizer, limit: int | None = None, encoder: str = "text encoder",
                       flag: str | None = None) -> dict:
    """Warn once, with numbers, when captions are cut at the text encoder's limit (the end of a long caption
    is not seen in training)."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # its own "sequence length is longer than" message: ours says more
    try:
        counts = caption_overflow([c for row in checked.captions for c in row], tokenizer, limit)
    finally:
        transformers.logging.set_verbosity(verbosity)
    if counts["long"]:
        logger.warning(f"{counts['long']} of {counts['captions']} captions are longer than the {encoder}'s "
                       f"{counts['limit']} tokens: {counts['tokens_lost']} tokens are cut off in all (up to "
                       f"{counts['max_lost']} in one caption), and training never sees them. Put what matters first, "
                       "or shorten the captions" + (f" (or raise {flag})" if flag else ""))
    return counts
