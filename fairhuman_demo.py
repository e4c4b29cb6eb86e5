#!/usr/bin/env python
"""Build the embedded default: a tiny model of every family and a small demo dataset, offline.

    python fairhuman_demo.py --output_dir demo_assets [--families sd,sdxl,flux,sd3,zimage,qwenimage,flux2klein,chroma]

writes ``demo_assets/tiny-{family}`` for each of ``--families`` (default: sd, sdxl, flux, sd3)
(diffusers folders with random weights and offline-made CLIP / T5 / Qwen tokenizers,
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

from flag_types import POSITIVE_INT


def byte_symbols() -> list[str]:
    """GPT-2's byte-to-unicode table (CLIP's and Qwen's byte-level symbols), in byte order, written out here so
    no tokenizer is downloaded."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_tiny_tokenizer(folder: str, model_max_length: int = 77) -> None:
    """A CLIP tokenizer from a hand-made vocab: every byte-level character, alone and word-final."""
    from transformers import CLIPTokenizer

    chars = byte_symbols()
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
    # the effect benchmark: the tiny UNet on a 3-level VAE (latents at 1/4 of the pixels)
    "tiny-vae4": dict(unet_channels=(32, 64), layers_per_block=1, text_width=32, vae_channels=(32, 64, 64)),
    # the effect benchmark's larger check: 5.5x the tiny UNet's parameters (2 layers per level, 64/128 channels)
    "small-vae4": dict(unet_channels=(64, 128), layers_per_block=2, text_width=32, vae_channels=(32, 64, 64)),
    "mid": dict(unet_channels=(96, 192, 384), layers_per_block=2, text_width=256, vae_channels=(32, 32, 64, 64)),
}


def build_tiny_pipeline(folder: str, sdxl: bool = False, sample_size: int = 16, seed: int = 0, size: str = "tiny") -> str:
    """Save a small SD (or SDXL) pipeline folder with random weights; returns ``folder``.

    ``size="tiny"`` (tests, demo): UNet of 2 levels (32/64 channels, ~1M parameters), a 2-level VAE
    (latents at 1/2 of the pixels), CLIP text encoders of width 32. ``size="mid"`` (benchmarks): UNet
    of 3 levels (128/256/512, tens of millions of parameters), a 4-level VAE (latents at 1/8, like
    Stable Diffusion), text width 256. ``sample_size`` is the latent size, so the native resolution
    is ``sample_size`` times the VAE factor. ``size="tiny-vae4"`` (effect benchmark): the tiny UNet on a
    3-level VAE (latents at 1/4). The random VAE is made near-deterministic with unit-spread latents
    (:func:`make_latents_carry_the_image`), so what is trained on its latents is the image, not noise.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    spec = MODEL_SIZES[size]
    width, levels = spec["text_width"], len(spec["unet_channels"])
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
    make_latents_carry_the_image(vae, resolution=sample_size * 2 ** (vae_levels - 1))
    text_encoder = CLIPTextModel(tiny_clip_config(width, width))
    text_encoder_2 = CLIPTextModelWithProjection(tiny_clip_config(width, width)) if sdxl else None
    return save_pipeline(folder, unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2)


VAE_LOGVAR = -14.0  # sampling std exp(-7) ~ 1e-3 of the latent mean's spread


def make_latents_carry_the_image(vae, resolution: int, num_images: int = 32, seed: int = 1) -> dict[str, float]:
    """Make a randomly initialised ``AutoencoderKL`` usable for training on its latents.

    A random VAE's encoder predicts a log-variance near 0, so its latent SAMPLES are mostly its own
    noise (sampling std ~1.06 against a spread of the means of ~0.26 on drawn people). Here the
    log-variance half of ``quant_conv`` is set to the constant ``VAE_LOGVAR`` (sampling std
    ``exp(VAE_LOGVAR / 2)``) and ``scaling_factor`` to ``1 / std(mean)`` over ``num_images`` drawn
    people at ``resolution`` (per-channel centred), so ``latents = sample * scaling_factor`` have unit
    spread, as Stable Diffusion's do. Returns the spread of the means and the sampling std before and
    after (scaled latents), for the record.
    """
    import numpy as np
    import torch

    rng = random.Random(seed)
    pixels = np.stack([np.asarray(draw_person(resolution, resolution, rng)[0]) for _ in range(num_images)])
    pixels = torch.tensor(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1

    def stats():
        with torch.no_grad():
            dist = vae.encode(pixels).latent_dist
        spread = float((dist.mean - dist.mean.mean(dim=(0, 2, 3), keepdim=True)).std())
        return spread, float(dist.std.mean())

    spread_before, std_before = stats()
    latent_channels = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[latent_channels:] = 0
        vae.quant_conv.bias[latent_channels:] = VAE_LOGVAR
    spread, std = stats()
    vae.register_to_config(scaling_factor=1.0 / spread)
    if vae.config.shift_factor is not None:  # FLUX.1 / SD3 VAEs: latents = (sample - shift_factor) * scaling_factor
        with torch.no_grad():
            vae.register_to_config(shift_factor=float(vae.encode(pixels).latent_dist.mean.mean()))
    return {"mean_spread_before": spread_before, "sample_std_before": std_before,
            "mean_spread_after": 1.0, "sample_std_after": std / spread}


def write_t5_tokenizer(folder: str, model_max_length: int = 512) -> None:
    """An offline T5 tokenizer (sentencepiece-style Unigram, no sentencepiece package): T5's special ids
    (<pad> 0, </s> 1, <unk> 2), the word-start marker, and every printable ASCII character word-initial and
    word-internal, scored so whole words split into characters. Saved as tokenizer.json + config."""
    from transformers import T5TokenizerFast

    characters = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + c, -4.0) for c in characters] + [(c, -5.0) for c in characters]
    T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length).save_pretrained(folder)


def tiny_clip_config(width: int = 32, projection_dim: int = 32):
    """The tiny CLIP text config: ids of :func:`write_tiny_tokenizer` (512 <|startoftext|>, 513 <|endoftext|>).
    ``eos_token_id`` must be the tokenizer's end token: CLIP pools the hidden state at its first position."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(bos_token_id=512, eos_token_id=513, pad_token_id=513, hidden_size=width,
                          intermediate_size=37, layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=2,
                          vocab_size=516, max_position_embeddings=77, hidden_act="gelu", projection_dim=projection_dim)


def tiny_t5(vocab_size: int, width: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=width, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, relative_attention_max_distance=32,
                                   dropout_rate=0.0, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
                                   decoder_start_token_id=0, is_encoder_decoder=False, use_cache=False,
                                   tie_word_embeddings=False))


def tiny_flow_vae(shift_factor: float, scaling_factor: float, resolution: int = 64):
    """A 2-level VAE with 16 latent channels (latents at 1/2 of the pixels), FLUX.1/SD3's shift and scale; built
    with ``quant_conv`` (real FLUX/SD3 VAEs have none) so :func:`make_latents_carry_the_image` can quiet it."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 32), layers_per_block=1,
                        latent_channels=16, norm_num_groups=32, sample_size=resolution, use_quant_conv=True,
                        use_post_quant_conv=True, shift_factor=shift_factor, scaling_factor=scaling_factor)
    make_latents_carry_the_image(vae, resolution=resolution)
    return vae


def build_tiny_flux(folder: str, seed: int = 0) -> str:
    """A tiny FLUX.1-dev-layout pipeline (one double and one single block, guidance embedding, CLIP-L pooled +
    T5 text, FLUX.1-dev's dynamic-shift scheduler), saved with its tokenizers; native 64 px."""
    import shutil

    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    tokenizer, tokenizer_2 = _tiny_tokenizers(folder)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    vae = tiny_flow_vae(shift_factor=0.1159, scaling_factor=0.3611)
    text_encoder = CLIPTextModel(tiny_clip_config())
    text_encoder_2 = tiny_t5(len(tokenizer_2), 32)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                 text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer).save_pretrained(folder)
    shutil.rmtree(folder + "_tokenizers")
    return folder


def make_flux2_latents_carry_the_image(vae, resolution: int, num_images: int = 32, seed: int = 1) -> None:
    """:func:`make_latents_carry_the_image` for an ``AutoencoderKLFlux2``: the encoder's log-variance quieted to
    ``VAE_LOGVAR`` and the batch-norm running statistics (FLUX.2's latent normalisation over the 2x2-patchified
    channels) set to the patchified latent means of ``num_images`` drawn people, so normalised latents carry the
    image with unit spread."""
    import numpy as np
    import torch
    from diffusers import Flux2KleinPipeline

    rng = random.Random(seed)
    pixels = np.stack([np.asarray(draw_person(resolution, resolution, rng)[0]) for _ in range(num_images)])
    pixels = torch.tensor(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        vae.quant_conv.weight[vae.config.latent_channels:] = 0
        vae.quant_conv.bias[vae.config.latent_channels:] = VAE_LOGVAR
        patches = Flux2KleinPipeline._patchify_latents(vae.encode(pixels).latent_dist.mean)
        vae.bn.running_mean.copy_(patches.mean(dim=(0, 2, 3)))
        vae.bn.running_var.copy_(patches.var(dim=(0, 2, 3)))


def build_tiny_flux2klein(folder: str, seed: int = 0, distilled: bool = False) -> str:
    """A tiny FLUX.2 klein-layout pipeline (one double and one single block, no guidance embedding, a Qwen3 causal
    LM of 27 layers whose hidden states 9, 18, 27 are stacked as the pipeline does, a 2-level AutoencoderKLFlux2
    with 8 latent channels patchified to 32), the offline Qwen tokenizer; ``distilled`` marks it as the
    step-distilled checkpoint (model_index.json ``is_distilled``). Native 64 px."""
    import shutil

    import torch
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = _qwen_tokenizer(folder)
    torch.manual_seed(seed)
    text_encoder = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                                num_hidden_layers=27, num_attention_heads=2, num_key_value_heads=1,
                                                head_dim=8, max_position_embeddings=512, tie_word_embeddings=True,
                                                pad_token_id=tokenizer.pad_token_id))
    latent_channels = 8
    transformer = Flux2Transformer2DModel(patch_size=1, in_channels=4 * latent_channels, num_layers=1,
                                          num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                          joint_attention_dim=3 * 16, timestep_guidance_channels=32,
                                          axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)
    vae = AutoencoderKLFlux2(block_out_channels=(32, 32), layers_per_block=1, latent_channels=latent_channels,
                             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                             norm_num_groups=32, sample_size=64)
    make_flux2_latents_carry_the_image(vae, resolution=64)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                time_shift_type="exponential")
    Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                       transformer=transformer, is_distilled=distilled).save_pretrained(folder)
    shutil.rmtree(folder + "_tokenizers")
    return folder


def build_tiny_chroma(folder: str, seed: int = 0) -> str:
    """A tiny Chroma-layout pipeline (one double and one single block, the distilled-guidance approximator, T5
    only, FLUX.1's 16-channel VAE and scheduler), saved with the offline T5 tokenizer; native 64 px."""
    import shutil

    import torch
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    _, tokenizer = _tiny_tokenizers(folder)
    torch.manual_seed(seed)
    transformer = ChromaTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                           attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                           axes_dims_rope=(4, 6, 6), approximator_num_channels=16,
                                           approximator_hidden_dim=32, approximator_layers=1)
    vae = tiny_flow_vae(shift_factor=0.1159, scaling_factor=0.3611)
    text_encoder = tiny_t5(len(tokenizer), 32)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    ChromaPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                   transformer=transformer).save_pretrained(folder)
    shutil.rmtree(folder + "_tokenizers")
    return folder


def build_tiny_sd3(folder: str, seed: int = 0) -> str:
    """A tiny SD3.5-layout pipeline (two joint blocks, qk RMSNorm, one dual-attention layer, the last block
    context_pre_only, CLIP-L + CLIP-G + T5 text; T5 width = 2 x CLIP width, as SD3's pipeline pads CLIP to it)."""
    import shutil

    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    tokenizer, tokenizer_3 = _tiny_tokenizers(folder)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                                        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64,
                                        caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=32,
                                        qk_norm="rms_norm", dual_attention_layers=(0,))
    vae = tiny_flow_vae(shift_factor=0.0609, scaling_factor=1.5305)
    text_encoder = CLIPTextModelWithProjection(tiny_clip_config())
    text_encoder_2 = CLIPTextModelWithProjection(tiny_clip_config())
    text_encoder_3 = tiny_t5(len(tokenizer_3), 64)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    StableDiffusion3Pipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             text_encoder_2=text_encoder_2, tokenizer_2=tokenizer, text_encoder_3=text_encoder_3,
                             tokenizer_3=tokenizer_3, transformer=transformer).save_pretrained(folder)
    shutil.rmtree(folder + "_tokenizers")
    return folder


QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<think>", "</think>")
"""Qwen's special tokens, after the 256 byte symbols of :func:`write_qwen_tokenizer` (ids 256-265)."""

# The single-turn text case of Qwen3's chat template (all diffusers' Z-Image pipeline renders), with its
# enable_thinking switch: False adds the empty think block.
QWEN_CHAT_TEMPLATE = ("{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                      "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                      "{%- if enable_thinking is defined and not enable_thinking %}{{ '<think>\\n\\n</think>\\n\\n' }}"
                      "{%- endif %}{%- endif %}")


def write_qwen_tokenizer(folder: str) -> None:
    """An offline Qwen2-style tokenizer: byte-level BPE over the 256 byte symbols (no merges, so every byte is a
    token), Qwen's special tokens and the chat template above; saved as a ``Qwen2Tokenizer`` folder (266 ids)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(byte_symbols())}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   model_max_length=32768)
    fast.chat_template = QWEN_CHAT_TEMPLATE
    fast.save_pretrained(folder)
    config_path = os.path.join(folder, "tokenizer_config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["tokenizer_class"] = "Qwen2Tokenizer"  # what the real Qwen folders name; AutoTokenizer loads it so
    with open(config_path, "w") as f:
        json.dump(config, f, indent=1)


def _qwen_tokenizer(folder: str):
    from transformers import AutoTokenizer

    source = folder + "_tokenizers"
    write_qwen_tokenizer(source)
    return AutoTokenizer.from_pretrained(source)


def build_tiny_zimage(folder: str, seed: int = 0) -> str:
    """A tiny Z-Image-layout pipeline (two main layers, one noise and one context refiner layer, a Qwen3 text
    encoder of width 16 read at its penultimate layer, FLUX.1's 16-channel VAE), saved with its offline Qwen
    tokenizer; native 64 px."""
    import shutil

    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = _qwen_tokenizer(folder)
    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32,
                                           n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16,
                                           axes_dims=[8, 4, 4], axes_lens=[256, 32, 32])
    with torch.no_grad():  # diffusers creates them with torch.empty in some versions: defined values
        transformer.x_pad_token.normal_(std=0.02)
        transformer.cap_pad_token.normal_(std=0.02)
    text_encoder = Qwen3Model(Qwen3Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                                          max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id))
    vae = tiny_flow_vae(shift_factor=0.1159, scaling_factor=0.3611)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                   transformer=transformer).save_pretrained(folder)
    shutil.rmtree(folder + "_tokenizers")
    return folder


def build_tiny_qwenimage(folder: str, seed: int = 0) -> str:
    """A tiny Qwen-Image-layout pipeline (two blocks, a Qwen2.5-VL text encoder of width 16, a 2-level
    AutoencoderKLQwenImage with 16 latent channels and per-channel latent mean/std, Qwen-Image's
    dynamic-shift scheduler), saved with its offline Qwen tokenizer; native 64 px."""
    import shutil

    import torch
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = _qwen_tokenizer(folder)
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                              axes_dims_rope=(4, 6, 6))
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=1024,
                         bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
                         rope_theta=1000000.0, rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default",
                                                             "type": "default"}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16),
        vocab_size=len(tokenizer), bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"), vision_token_id=ids("<|vision_pad|>"),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"))
    text_encoder = Qwen2_5_VLForConditionalGeneration(config)
    rng = torch.Generator().manual_seed(seed)
    vae = AutoencoderKLQwenImage(base_dim=16, z_dim=16, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                                 latents_mean=(torch.randn(16, generator=rng) * 0.1).tolist(),
                                 latents_std=(1 + torch.rand(16, generator=rng)).tolist())
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
                                                max_image_seq_len=8192, shift_terminal=0.02,
                                                time_shift_type="exponential")
    QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                      transformer=transformer).save_pretrained(folder)
    shutil.rmtree(folder + "_tokenizers")
    return folder


def _tiny_tokenizers(folder: str):
    """The hand-made CLIP tokenizer and the offline T5 tokenizer, written next to ``folder`` and loaded."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    source = folder + "_tokenizers"
    write_tiny_tokenizer(os.path.join(source, "clip"))
    write_t5_tokenizer(os.path.join(source, "t5"))
    return CLIPTokenizer.from_pretrained(os.path.join(source, "clip")), T5TokenizerFast.from_pretrained(
        os.path.join(source, "t5"))


FAMILY_BUILDERS = {"sd": lambda folder: build_tiny_pipeline(folder, sdxl=False),
                   "sdxl": lambda folder: build_tiny_pipeline(folder, sdxl=True),
                   "flux": build_tiny_flux, "sd3": build_tiny_sd3, "zimage": build_tiny_zimage,
                   "qwenimage": build_tiny_qwenimage, "flux2klein": build_tiny_flux2klein, "chroma": build_tiny_chroma}


def save_pipeline(folder: str, *, unet, vae, text_encoder, text_encoder_2=None) -> str:
    """Save an SD pipeline (SDXL when ``text_encoder_2`` is given) with the hand-made tokenizer and a
    DDPM scheduler, in the diffusers folder layout that ``from_pretrained`` and the training script load."""
    import shutil

    from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, prediction_type="epsilon",
                              steps_offset=1, clip_sample=False)  # as SD's and SDXL's own scheduler configs
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


def draw_person(width: int, height: int, rng: random.Random, detailed: bool = False, person_scale: float = 1.0,
                hand_scale: float = 0.5, shoes: bool = False):
    """A drawn 'person': a skin-coloured face ellipse and 0-2 hands; returns (image, face boxes, hand boxes),
    and with ``shoes`` also the shoe boxes: (image, face boxes, hand boxes, shoe boxes).

    ``detailed=False``: hands and face are plain ellipses. ``detailed=True`` (the same people from the
    same ``rng`` state, with detail drawn on top): each hand is a palm with 3-5 finger strokes and
    background between the fingers, each face has hair, two eyes and a mouth. The effect benchmark
    pretrains a base model on the plain version and fine-tunes on the detailed one. The face is
    ``person_scale`` x (1/6 to 1/3) of ``width`` wide, a hand ``hand_scale`` x the face's width (the
    defaults draw the demo dataset; the effect benchmark draws larger people).

    ``shoes`` (a third kind of detailed region, for named region objectives: ``--region shoe=shoe_boxes``)
    adds two shoes at the bottom of the body, drawn before the hands: plain dark rounded blocks, or with
    ``detailed`` a light sole, a toe cap and criss-cross laces. Without ``shoes`` the image and the ``rng``
    draws are exactly those of a run without the option.
    """
    bg = tuple(rng.randint(40, 200) for _ in range(3))
    image = Image.new("RGB", (width, height), bg)
    draw = ImageDraw.Draw(image)
    skin = (rng.randint(170, 240), rng.randint(120, 190), rng.randint(90, 160))
    fw = rng.randint(int(width * person_scale / 6), int(width * person_scale / 3))
    fx, fy = rng.randint(0, width - fw), rng.randint(0, height // 2)
    face = [fx, fy, fx + fw, min(height, fy + int(fw * 1.3))]
    body = (fx - fw // 2, face[3], fx + fw + fw // 2, height)
    draw.rectangle(body, fill=tuple(rng.randint(0, 255) for _ in range(3)))
    draw.ellipse(face, fill=skin)
    hands = []
    for _ in range(rng.randint(0, 2)):
        hw = max(4, int(fw * hand_scale))
        hx, hy = rng.randint(0, width - hw), rng.randint(height // 3, height - hw)
        hands.append([hx, hy, hx + hw, hy + hw])
    shoe_boxes, shoe_colour = [], None
    if shoes:  # under the hands (drawn next), the same in both versions
        shoe_boxes, shoe_colour = draw_shoes(draw, body, fw, width, height, rng)
    if not detailed:
        for hand in hands:
            draw.ellipse(hand, fill=skin)
    if detailed:  # after every draw of the plain version, so both versions show the same people
        for shoe in shoe_boxes:  # no rng draw: under the hands, as in the plain version
            draw_detailed_shoe(draw, shoe, shoe_colour)
        for hand in hands:
            draw_detailed_hand(draw, hand, skin, rng)
        draw_detailed_face(draw, face, rng)
    if shoes:
        return image, [face], hands, shoe_boxes
    return image, [face], hands


def draw_shoes(draw, body, fw: int, width: int, height: int, rng: random.Random):
    """Two plain shoes (dark rounded blocks) side by side at the bottom of ``body``; returns their boxes
    and colour."""
    sw, sh = max(4, int(fw * 0.8)), max(3, int(fw * 0.45))
    centre = (body[0] + body[2]) // 2
    colour = tuple(rng.randint(20, 110) for _ in range(3))
    boxes = []
    for side in (-1, 1):
        x0 = centre + (-sw - 1 if side < 0 else 1) + rng.randint(-2, 2)
        x0 = max(0, min(width - sw, x0))
        y0 = height - sh - rng.randint(0, 2)
        boxes.append([x0, y0, x0 + sw, y0 + sh])
        draw.rounded_rectangle(boxes[-1], radius=max(1, sh // 3), fill=colour)
    return boxes, colour


def draw_detailed_shoe(draw, box, colour) -> None:
    """Detail on a plain shoe ``box``: a light sole along the bottom, a toe cap of another shade and
    criss-cross laces (what a model that has only seen plain shoes gets wrong)."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    sole = max(1, h // 4)
    draw.rectangle([x0, y1 - sole, x1, y1], fill=(235, 235, 225))
    cap = tuple(min(255, c + 70) for c in colour)
    toe_left = x0 % 2 == 0  # the toe's side, from the position (no rng draw)
    draw.chord([x0, y0 + h // 4, x0 + w // 2, y1 - sole] if toe_left else [x1 - w // 2, y0 + h // 4, x1, y1 - sole],
               90 if toe_left else 270, 270 if toe_left else 90, fill=cap)
    lace = (250, 250, 250)
    lx0, lx1 = x0 + w * 0.35, x0 + w * 0.65
    for k in range(max(2, w // 4)):
        y = y0 + 1 + k * max(1, (h - sole - 2)) / max(2, w // 4)
        draw.line([(lx0, y), (lx1, y + 1)], fill=lace, width=1)


def draw_detailed_hand(draw, box, skin, rng: random.Random) -> None:
    """A palm in the lower half of ``box`` and 3-5 finger strokes up to its top edge, fanned out, with
    what lies behind visible between them (the detail a plain ellipse lacks)."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    palm_top = y0 + h // 2
    draw.ellipse([x0 + w // 6, palm_top - 1, x1 - w // 6, y1], fill=skin)
    fingers = max(3, min(5, w // 2))
    stroke = max(1, w // 8)
    for k in range(fingers):
        base_x = x0 + w // 6 + (k + 0.5) * (w - 2 * (w // 6)) / fingers
        tip_x = x0 + (k + 0.5) * w / fingers + rng.uniform(-0.5, 0.5)
        tip_y = y0 + rng.randint(0, max(0, h // 6))
        draw.line([(base_x, palm_top + 1), (tip_x, tip_y)], fill=skin, width=stroke)


HAIR = [(40, 25, 15), (90, 55, 25), (20, 20, 20), (200, 170, 90)]


def draw_detailed_face(draw, face, rng: random.Random) -> None:
    """Hair over the top of the face ellipse ``face``, two dark eyes and a mouth inside it: detail that
    covers about a third of the face box and sits where a face predicts it (what a model that has only
    seen plain ellipses gets wrong, and can learn)."""
    x0, y0, x1, y1 = face
    w, h = x1 - x0, y1 - y0
    draw.chord([x0, y0, x1, y1], 200, 340, fill=rng.choice(HAIR))
    dark = tuple(rng.randint(10, 70) for _ in range(3))
    r = max(1, w // 8)
    for cx in (x0 + w * 0.32, x0 + w * 0.68):
        cy = y0 + h * 0.45
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=dark)
    mouth_y = y0 + h * rng.uniform(0.68, 0.76)
    draw.line([(x0 + w * 0.28, mouth_y), (x0 + w * 0.72, mouth_y)], fill=(150, 30, 40), width=max(1, w // 8))


def build_demo_dataset(folder: str, num_images: int = 12, seed: int = 0, scale: int = 1, detailed: bool = False,
                       size: int | None = None, **person) -> str:
    """An imagefolder of drawn people at mixed sizes and aspect ratios (times ``scale``; all ``size`` x
    ``size`` when given), boxes in pixel xyxy; ``detailed`` draws hair, eyes, mouths and fingers, and
    ``person`` (``person_scale``, ``hand_scale``) sizes them (``draw_person``); ``shoes=True`` among them adds
    a ``shoe_boxes`` column (a third region)."""
    rng = random.Random(seed)
    os.makedirs(folder, exist_ok=True)
    sizes = [(96 * scale, 64 * scale), (64 * scale, 96 * scale), (80 * scale, 80 * scale), (120 * scale, 72 * scale)]
    if size is not None:
        sizes = [(size, size)]
    rows = []
    for i in range(num_images):
        w, h = sizes[i % len(sizes)]
        image, faces, hands, *shoes = draw_person(w, h, rng, detailed=detailed, **person)
        name = f"person_{i:03d}.png"
        image.save(os.path.join(folder, name))
        n = len(hands)
        caption = f"a photo of a person{' waving ' + str(n) + ' hands' if n else ''}"
        rows.append({"file_name": name, "text": caption, "hand_boxes": hands, "face_boxes": faces})
        if shoes:  # person["shoes"]: a third region column (--region shoe=shoe_boxes)
            rows[-1]["shoe_boxes"] = shoes[0]
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
    parser.add_argument("--output_dir", default="demo_assets",
                        help="Folder for tiny-{family} and demo_dataset.")
    parser.add_argument("--families", default="sd,sdxl,flux,sd3",
                        help=f"Which tiny models to build (comma-separated; known: {', '.join(FAMILY_BUILDERS)}).")
    parser.add_argument("--num_images", type=POSITIVE_INT, default=12, help="Images in the demo dataset.")
    parser.add_argument("--shoes", action="store_true",
                        help="Draw shoes too and write a third region column, shoe_boxes (train with "
                             "--region hand=hand_boxes --region face=face_boxes --region shoe=shoe_boxes).")
    args = parser.parse_args(input_args)
    written = []
    for family in [f.strip() for f in args.families.split(",") if f.strip()]:
        if family not in FAMILY_BUILDERS:
            raise SystemExit(f"error: --families: unknown {family!r}; known: {', '.join(FAMILY_BUILDERS)}")
        written.append(FAMILY_BUILDERS[family](os.path.join(args.output_dir, f"tiny-{family}")))
    written.append(build_demo_dataset(os.path.join(args.output_dir, "demo_dataset"), num_images=args.num_images,
                                      **({"shoes": True} if args.shoes else {})))
    print(f"wrote {', '.join(written)}")


if __name__ == "__main__":
    main()
