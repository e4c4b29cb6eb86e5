#!/usr/bin/env python
"""Build the embedded default: tiny SD and SDXL models and a small demo dataset, offline.

    python fairhuman_demo.py --output_dir demo_assets

writes ``demo_assets/tiny-sd``, ``demo_assets/tiny-sdxl`` (diffusers folders with random weights,
built from configs, loadable with ``from_pretrained``) and ``demo_assets/demo_dataset`` (an
imagefolder: drawn people with box annotations in ``metadata.jsonl``). The tests build the same
things in temporary folders through these functions.
"""

from __future__ import annotations

import argparse
import json
import os
import random

from PIL import Image, ImageDraw


def write_tiny_tokenizer(folder: str, model_max_length: int = 77) -> None:
    """A CLIP tokenizer from a hand-made vocab: every byte-level character, alone and word-final."""
    from transformers import CLIPTokenizer

    # GPT-2 / CLIP byte-to-unicode table, written out here so no tokenizer is downloaded.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    vocab = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    for token in ("<|startoftext|>", "<|endoftext|>"):
        vocab[token] = len(vocab)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    tokenizer = CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                              model_max_length=model_max_length, pad_token="<|endoftext|>")
    tokenizer.save_pretrained(folder)


MODEL_SIZES = {
    # UNet levels, layers per level, text width; VAE levels (the VAE factor is 2 ** (levels - 1))
    "tiny": dict(unet_channels=(32, 64), layers_per_block=1, text_width=32, vae_channels=(32, 64)),
    "mid": dict(unet_channels=(96, 192, 384), layers_per_block=2, text_width=256, vae_channels=(32, 32, 64, 64)),
}


def build_tiny_pipeline(folder: str, sdxl: bool = False, sample_size: int = 16, seed: int = 0, size: str = "tiny") -> str:
    """Save a small SD (or SDXL) pipeline folder with random weights; returns ``folder``.

    ``size="tiny"`` (tests, demo): UNet of 2 levels (32/64 channels, ~1M parameters), a 2-level VAE
    (latents at 1/2 of the pixels), CLIP text encoders of width 32. ``size="mid"`` (benchmarks): UNet
    of 3 levels (128/256/512, tens of millions of parameters), a 4-level VAE (latents at 1/8, like
    Stable Diffusion), text width 256. ``sample_size`` is the latent size, so the native resolution
    is ``sample_size`` times the VAE factor.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    spec = MODEL_SIZES[size]
    width, levels = spec["text_width"], len(spec["unet_channels"])
    text_config = dict(bos_token_id=514, eos_token_id=515, pad_token_id=515, hidden_size=width, intermediate_size=37,
                       layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=2, vocab_size=516,
                       max_position_embeddings=77, hidden_act="gelu", projection_dim=width)
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1)
    up = ("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",)
    unet_kwargs = dict(block_out_channels=spec["unet_channels"], layers_per_block=spec["layers_per_block"],
                       sample_size=sample_size, in_channels=4, out_channels=4, down_block_types=down,
                       up_block_types=up, attention_head_dim=8, norm_num_groups=32)
    if sdxl:
        unet_kwargs.update(cross_attention_dim=2 * width, addition_embed_type="text_time", addition_time_embed_dim=8,
                           projection_class_embeddings_input_dim=6 * 8 + width, use_linear_projection=True,
                           transformer_layers_per_block=(1,) * levels)
    else:
        unet_kwargs.update(cross_attention_dim=width)
    unet = UNet2DConditionModel(**unet_kwargs)
    vae_levels = len(spec["vae_channels"])
    vae = AutoencoderKL(block_out_channels=spec["vae_channels"], in_channels=3, out_channels=3,
                        down_block_types=("DownEncoderBlock2D",) * vae_levels,
                        up_block_types=("UpDecoderBlock2D",) * vae_levels, latent_channels=4,
                        sample_size=sample_size * 2 ** (vae_levels - 1), norm_num_groups=32)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_config)) if sdxl else None
    return save_pipeline(folder, unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2)


def save_pipeline(folder: str, *, unet, vae, text_encoder, text_encoder_2=None) -> str:
    """Save an SD pipeline (SDXL when ``text_encoder_2`` is given) with the hand-made tokenizer and a
    DDPM scheduler, in the diffusers folder layout that ``from_pretrained`` and the training script load."""
    import shutil

    from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, prediction_type="epsilon")
    tok_dir = os.path.join(folder, "_tokenizer_src")
    write_tiny_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    if text_encoder_2 is not None:
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.save_pretrained(folder)
    shutil.rmtree(tok_dir)
    return folder


def draw_person(width: int, height: int, rng: random.Random):
    """A drawn 'person': a skin-coloured face ellipse and 0-2 hands; returns (image, face boxes, hand boxes)."""
    bg = tuple(rng.randint(40, 200) for _ in range(3))
    image = Image.new("RGB", (width, height), bg)
    draw = ImageDraw.Draw(image)
    skin = (rng.randint(170, 240), rng.randint(120, 190), rng.randint(90, 160))
    fw = rng.randint(width // 6, width // 3)
    fx, fy = rng.randint(0, width - fw), rng.randint(0, height // 2)
    face = [fx, fy, fx + fw, min(height, fy + int(fw * 1.3))]
    body = (fx - fw // 2, face[3], fx + fw + fw // 2, height)
    draw.rectangle(body, fill=tuple(rng.randint(0, 255) for _ in range(3)))
    draw.ellipse(face, fill=skin)
    hands = []
    for _ in range(rng.randint(0, 2)):
        hw = max(4, fw // 2)
        hx, hy = rng.randint(0, width - hw), rng.randint(height // 3, height - hw)
        hands.append([hx, hy, hx + hw, hy + hw])
        draw.ellipse(hands[-1], fill=skin)
    return image, [face], hands


def build_demo_dataset(folder: str, num_images: int = 12, seed: int = 0, scale: int = 1) -> str:
    """An imagefolder of drawn people at mixed sizes and aspect ratios (times ``scale``), boxes in pixel xyxy."""
    rng = random.Random(seed)
    os.makedirs(folder, exist_ok=True)
    sizes = [(96 * scale, 64 * scale), (64 * scale, 96 * scale), (80 * scale, 80 * scale), (120 * scale, 72 * scale)]
    rows = []
    for i in range(num_images):
        w, h = sizes[i % len(sizes)]
        image, faces, hands = draw_person(w, h, rng)
        name = f"person_{i:03d}.png"
        image.save(os.path.join(folder, name))
        n = len(hands)
        caption = f"a photo of a person{' waving ' + str(n) + ' hands' if n else ''}"
        rows.append({"file_name": name, "text": caption, "hand_boxes": hands, "face_boxes": faces})
    with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return folder


def read_scalars(folder: str) -> dict[str, list[float]]:
    """All scalars a training run logged to TensorBoard under ``folder``, by tag, in step order
    (used by the tests and the benchmarks to read what the script logged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[float]] = {}
    for root, _, files in os.walk(folder):
        if any("tfevents" in f for f in files):
            acc = EventAccumulator(root)
            acc.Reload()
            for tag in acc.Tags()["scalars"]:
                scalars[tag] = [e.value for e in sorted(acc.Scalars(tag), key=lambda e: e.step)]
    return scalars


def main(input_args=None):
    parser = argparse.ArgumentParser(description="Build the tiny demo models and dataset (offline).")
    parser.add_argument("--output_dir", default="demo_assets", help="Folder for tiny-sd, tiny-sdxl and demo_dataset.")
    parser.add_argument("--num_images", type=int, default=12, help="Images in the demo dataset.")
    args = parser.parse_args(input_args)
    build_tiny_pipeline(os.path.join(args.output_dir, "tiny-sd"), sdxl=False)
    build_tiny_pipeline(os.path.join(args.output_dir, "tiny-sdxl"), sdxl=True)
    build_demo_dataset(os.path.join(args.output_dir, "demo_dataset"), num_images=args.num_images)
    print(f"wrote {args.output_dir}/tiny-sd, {args.output_dir}/tiny-sdxl and {args.output_dir}/demo_dataset")


if __name__ == "__main__":
    main()
