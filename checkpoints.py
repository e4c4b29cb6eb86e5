"""Resumable checkpoints: writing them atomically, rotating them, finding and checking the one to resume from,
and the run settings a resume is compared with."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import zipfile

import fairhuman_utils as fh
from lora_files import LORA_WEIGHT_NAME, lora_targets
from regions import run_objectives
from training_checks import CheckedDataset

UsageError = fh.UsageError
logger = logging.getLogger(__name__)


CHECKPOINT_MARKER = "fairhuman_state.json"


RUN_SETTINGS_FILE = "fairhuman_run_settings.json"  # in each checkpoint: the settings it was trained with


FAIR_STATE_FILE = "fair_update_state.json"  # in each checkpoint: FairUpdate.state_dict() as JSON (never a pickle)


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


def refuse_other_runs_checkpoints(args) -> None:
    """A new run (no ``--resume_from_checkpoint``, or ``latest`` with nothing complete) in an output folder that
    holds complete checkpoints is REFUSED (:class:`UsageError` naming them): its first checkpoint would overwrite
    theirs, the rotation would delete it, and ``latest`` would resume the other run. The way out:
    ``--resume_from_checkpoint latest`` to continue that run, or another ``--output_dir``."""
    found = list_checkpoints(args.output_dir)
    if found:
        names = ", ".join(os.path.basename(path) for _, path in found)
        raise UsageError(f"--output_dir {args.output_dir!r} holds the checkpoints of another run ({names}): a new "
                         "run would overwrite or rotate them away and --resume_from_checkpoint latest would then "
                         "resume the other run. Continue that run with --resume_from_checkpoint latest, or start "
                         "this one in another --output_dir (or move those checkpoints away)")


def settle_checkpoint_branch(args, resume_path: str) -> list[str]:
    """Make sure ``latest`` and the rotation only ever see THIS run's checkpoints; returns what it did.

    A run resumed from ``checkpoint-N`` while checkpoints of later steps exist (the earlier run went on past N)
    branches off: those later checkpoints are renamed ``checkpoint-M.superseded`` (``.superseded-2`` ... when
    taken), which ``latest`` and the rotation ignore, with a warning naming each. Nothing is deleted.
    """
    step = read_marker(resume_path)["global_step"]
    later = [(s, path) for s, path in list_checkpoints(args.output_dir) if s > step]
    if not later:
        return []
    messages = []
    for _, path in later:
        target, n = path + SUPERSEDED, 1
        while os.path.exists(target):
            n += 1
            target = f"{path}{SUPERSEDED}-{n}"
        os.replace(path, target)
        messages.append(f"{os.path.basename(path)} -> {os.path.basename(target)}")
    message = (f"resuming from {os.path.basename(os.path.normpath(resume_path))} (step {step}) while --output_dir holds "
               f"checkpoints of later steps from the run that went on past it; moved aside so that "
               f"--resume_from_checkpoint latest and --checkpoints_total_limit only see this run's: {'; '.join(messages)}")
    logger.warning(message)
    return [message]


def read_marker(checkpoint: str) -> dict:
    """The marker file of a complete checkpoint: ``{"global_step": N, "seed": S}``."""
    with open(os.path.join(checkpoint, CHECKPOINT_MARKER)) as f:
        return json.load(f)


def load_checkpoint(accelerator, checkpoint: str, fair_update) -> int:
    """Restore LoRA, optimizer, scheduler and RNG states (accelerate) and the fair update (from
    ``fair_update_state.json``); returns the checkpoint's optimizer step."""
    accelerator.load_state(checkpoint)  # the fair update is not registered with accelerate: nothing is unpickled
    with open(os.path.join(checkpoint, FAIR_STATE_FILE)) as f:
        fair_update.load_state_dict(json.load(f))
    return read_marker(checkpoint)["global_step"]


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
    if not os.path.isfile(fair):
        problems.append(f"{FAIR_STATE_FILE} is missing")
    else:
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
                          "dataset", "dataset_rows", "dataset_fingerprint",
                          # the family's flags (None where the family does not use them: never compared)
                          "max_sequence_length", "weighting_scheme", "logit_mean", "logit_std", "mode_scale",
                          "guidance_scale", "precondition_outputs", "quantize_base", "quantize_text_encoders")


def rows_fingerprint(checked: CheckedDataset) -> str:
    """A short hash of what the run reads from the dataset: image sizes, boxes and captions of every row."""
    content = json.dumps([checked.sizes, checked.boxes, checked.captions], sort_keys=True, default=str)
    return hashlib.sha256(content.encode()).hexdigest()[:16]


def run_settings(args, checked: CheckedDataset | None) -> dict:
    """The settings a checkpoint is written with (``fairhuman_run_settings.json``), to check a resume against
    (``checked`` None: those known before the data pass)."""
    names = [n for n in RESUME_MUST_MATCH + RESUME_WARN_IF_CHANGED if hasattr(args, n)]
    settings = {name: getattr(args, name) for name in names}
    def where(source):  # a local folder by its absolute path, so ./model and /abs/model compare equal
        return os.path.abspath(source) if source is not None and os.path.isdir(source) else source

    settings["pretrained_model_name_or_path"] = where(args.pretrained_model_name_or_path)
    settings["lora_alpha"] = float(args.lora_alpha)
    settings["lora_target_modules"] = sorted(set(lora_targets(args))) if args.lora_target_modules is not None else None
    settings["dataset"] = where(args.dataset_name or args.train_data_dir)
    if checked is not None:
        settings["dataset_rows"] = len(checked.sizes)
        settings["dataset_fingerprint"] = rows_fingerprint(checked)
    if settings.get("region_loss_weight") is None:  # only stored when given
        settings.pop("region_loss_weight", None)
    if args.region_specs:  # named regions (absent: the default global, hand, face)
        settings["objectives"] = list(run_objectives(args))
    return settings


def saved_setting(resume_path: str, key: str):
    """One setting the checkpoint was written with (``None`` when it has no settings file or no such key)."""
    path = os.path.join(resume_path, RUN_SETTINGS_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f).get(key)


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
