"""Shared by the benchmarks: build the models and data, run the training script, read its logs."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import fairhuman_demo  # noqa: E402

# name -> (model size in fairhuman_demo, latent sample size, resolution, demo image scale)
CONFIGS = {
    "tiny": ("tiny", 16, 32, 1),
    "mid": ("mid", 16, 128, 2),
}


def prepare(config: str, work_dir: str) -> tuple[str, str, int]:
    """Build (once) the model folder and the demo dataset of a config; return (model, data, resolution)."""
    size, sample_size, resolution, scale = CONFIGS[config]
    model = os.path.join(work_dir, f"{config}-sd")
    data = os.path.join(work_dir, f"{config}-data")
    if not os.path.exists(os.path.join(model, "model_index.json")):
        fairhuman_demo.build_tiny_pipeline(model, size=size, sample_size=sample_size)
    if not os.path.exists(os.path.join(data, "metadata.jsonl")):
        fairhuman_demo.build_demo_dataset(data, num_images=16, scale=scale)
    return model, data, resolution


def run_training(model: str, data: str, out: str, resolution: int, extra: list[str]) -> None:
    """One run of train_fairhuman_lora.py in a fresh single process (same conditions for every mode),
    into an emptied ``out`` (so its logs hold this run alone)."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, os.path.join(REPO, "train_fairhuman_lora.py"), "--pretrained_model_name_or_path", model,
           "--train_data_dir", data, "--output_dir", out, "--resolution", str(resolution),
           "--report_to", "tensorboard", "--checkpointing_steps", "1000000", "--seed", "0", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")


def read_scalars(folder: str) -> dict[str, list[float]]:
    """All scalars the run logged to TensorBoard, by tag, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[float]] = {}
    for root, _, files in os.walk(folder):
        if any("tfevents" in f for f in files):
            acc = EventAccumulator(root)
            acc.Reload()
            for tag in acc.Tags()["scalars"]:
                scalars[tag] = [e.value for e in sorted(acc.Scalars(tag), key=lambda e: e.step)]
    return scalars


def machine() -> str:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    return f"{device}; {platform.platform()}; Python {platform.python_version()}; torch {torch.__version__}"
