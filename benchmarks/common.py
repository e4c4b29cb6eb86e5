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
from fairhuman_demo import read_scalars  # noqa: E402,F401  (re-exported for the benchmarks)

# name -> (model size, latent sample size, resolution, demo image scale). "sd15" and "sdxl" are the
# public UNet configs of stable-diffusion-v1-5 and stable-diffusion-xl-base-1.0 with random weights
# (for a GPU: 860M and 2.6B parameters), with small text encoders of the right widths and a small
# 8x VAE, since the benchmark is about the UNet's training step.
CONFIGS = {
    "tiny": ("tiny", 16, 32, 1),
    "mid": ("mid", 16, 128, 2),
    "sd15": ("sd15", 64, 512, 8),
    "sdxl": ("sdxl", 128, 1024, 16),
    # the tiny FLUX.1 / SD3 of fairhuman_demo (issue 18; add --extra "--max_sequence_length 32")
    "tiny-flux": ("flux", None, 32, 1),
    "tiny-sd3": ("sd3", None, 32, 1),
    # the tiny Z-Image / Qwen-Image / FLUX.2 klein of fairhuman_demo (issue 27; add --extra "--max_sequence_length 256")
    "tiny-zimage": ("zimage", None, 32, 1),
    "tiny-qwenimage": ("qwenimage", None, 32, 1),
    "tiny-flux2klein": ("flux2klein", None, 32, 1),
    # the tiny Chroma of fairhuman_demo (issue 27; add --extra "--max_sequence_length 32")
    "tiny-chroma": ("chroma", None, 32, 1),
}

PUBLIC_UNETS = {
    "sd15": dict(
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        sample_size=64, in_channels=4, out_channels=4, norm_num_groups=32,
    ),
    "sdxl": dict(
        block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
        attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
        sample_size=128, in_channels=4, out_channels=4, norm_num_groups=32,
    ),
}


def build_public_size_pipeline(folder: str, which: str) -> str:
    """A pipeline folder with the public SD 1.5 / SDXL UNet config (random weights), 2-layer CLIP text
    encoders of the real widths (768; 768 + 1280 with a 1280 projection for SDXL) and a small 8x VAE."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    sdxl = which == "sdxl"

    def text_config(width):
        return CLIPTextConfig(bos_token_id=514, eos_token_id=515, pad_token_id=515, hidden_size=width,
                              intermediate_size=4 * width, num_attention_heads=8, num_hidden_layers=2,
                              vocab_size=516, max_position_embeddings=77, projection_dim=width)

    unet = UNet2DConditionModel(**PUBLIC_UNETS[which])
    vae = AutoencoderKL(block_out_channels=(32, 32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=32,
                        sample_size=PUBLIC_UNETS[which]["sample_size"] * 8)
    text_encoder_2 = CLIPTextModelWithProjection(text_config(1280)) if sdxl else None
    return fairhuman_demo.save_pipeline(folder, unet=unet, vae=vae, text_encoder=CLIPTextModel(text_config(768)),
                                        text_encoder_2=text_encoder_2)


def prepare(config: str, work_dir: str) -> tuple[str, str, int]:
    """Build (once) the model folder and the demo dataset of a config; return (model, data, resolution)."""
    size, sample_size, resolution, scale = CONFIGS[config]
    model = os.path.join(work_dir, f"{config}-sd")
    data = os.path.join(work_dir, f"{config}-data")
    if not os.path.exists(os.path.join(model, "model_index.json")):
        if size in PUBLIC_UNETS:
            build_public_size_pipeline(model, size)
        elif size in fairhuman_demo.FAMILY_BUILDERS:
            fairhuman_demo.FAMILY_BUILDERS[size](model)
        else:
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


def machine() -> str:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    return f"{device}; {platform.platform()}; Python {platform.python_version()}; torch {torch.__version__}"
