"""Pushing the output folder to the Hugging Face Hub, with one clear error when the Hub cannot be reached."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from pathlib import Path

import fairhuman_utils as fh
from lora_files import LORA_WEIGHT_NAME

UsageError = fh.UsageError
logger = logging.getLogger(__name__)


class HubError(RuntimeError):
    """The Hub could not be reached or refused a call; the message says what is saved and how to push it later."""


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


def ignore_patterns(args) -> list[str]:
    """What the upload leaves out: checkpoints, step samples, evaluation images, the logs, and a ``--cache_dir``
    inside the output folder (its latents decode back to the training images; the datasets cache too)."""
    patterns = HUB_IGNORE_PATTERNS + [f"{args.logging_dir}/*"]
    if args.cache_dir is not None:
        inside = os.path.relpath(os.path.abspath(args.cache_dir), os.path.abspath(args.output_dir))
        if inside == ".":
            raise UsageError("--cache_dir is --output_dir: the cache would be uploaded with the LoRA by "
                             "--push_to_hub; give the cache a folder of its own")
        if not inside.startswith(".."):
            patterns.append(f"{Path(inside).as_posix()}/*")
    return patterns


def upload_command(args, repo_id: str) -> str:
    """The command that pushes the output folder by hand, as the script would."""
    excludes = " ".join(f"--exclude '{p}'" for p in ignore_patterns(args))
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
                      token=args.hub_token, ignore_patterns=ignore_patterns(args))
    except hub_errors() as error:
        return (f"--push_to_hub: the upload to {repo_id!r} failed ({type(error).__name__}: {error}). Nothing is lost: "
                f"the LoRA ({LORA_WEIGHT_NAME}) and its model card are saved in {args.output_dir!r}. Push them later "
                f"with: {upload_command(args, repo_id)}")
    return None
