#!/usr/bin/env python
"""Estimate the peak accelerator memory of a train_fairhuman_lora.py run, phase by phase, on a CPU, without
weights and without a GPU (used by ``train_fairhuman_lora.py --estimate_memory``, by the run's start-up check
on CUDA and by ``benchmarks/benchmark_memory.py``; its method and validation are described in docs/memory.md).

How: the model's family (``model_families.family_for_model``, from ``model_index.json``'s ``_class_name``)
builds its text encoders, VAE and denoiser from their config.json files under torch's FakeTensorMode (tensors
have shapes, dtypes and storage sizes, but no data), and the run is replayed in its stages, each under
torch.distributed._tools.mem_tracker.MemTracker (live bytes, peak) holding only what the run holds then:

1. caption embedding: the text encoders (``--quantize_text_encoders``: the family's large ones, T5, stored by
   bitsandbytes) and one ``family.encode_captions`` call at the run's sequence lengths;
2. latent caching (``--cache_latents``): the VAE and one encode at the training resolution;
3. the training step: the denoiser (``--quantize_base``), its LoRA, the optimizer, the VAE / text encoders the
   step still needs (``family.text_encoders_in_step``), ``family.noisy_inputs`` -> ``family.predict`` under
   autocast -> losses -> FairUpdate.backward -> write_update -> unscale + clip -> optimizer.step -> zero_grad
   (the project's FairUpdate from fairhuman_utils, so its backward passes, retain_graph and buffers are real);
4. validation sampling (``--validation_prompt``): what the run keeps resident mid-run (denoiser, LoRA,
   optimizer states) + one ``family.predict`` at the validation resolution on the sampling batch (two rows
   where the family samples with classifier-free guidance) + the VAE decode;
5. evaluation sampling (``--evaluate_prompts_file``): the same with evaluation's images per call.

Nothing here asks which family it runs: what differs (models, captions, noise, packing, CFG, which encoders
stay) comes from the family's methods. FLOPs of the step: torch.utils.flop_counter.FlopCounterMode.

GPU specifics that a CPU run does not have are emulated:
* fp16/bf16 mixed precision: torch.autocast('cpu', ...) casts linear/conv/matmul/SDPA inputs like CUDA
  autocast; a wrapper adds CUDA autocast's fp32 policy for group_norm, layer_norm, softmax, log_softmax.
* attention: F.scaled_dot_product_attention on fake CPU tensors dispatches to the fused (flash) CPU kernel,
  which keeps the same tensors for backward as CUDA flash / memory-efficient attention: no N x N matrix.
* allocations are rounded up to 512 bytes as the CUDA caching allocator does.
* bitsandbytes storage (NF4 / int8) of frozen Linear weights: analytic (the bytes saved, plus one dequantized
  weight at a time).
Not modelled: CUDA context, cuBLAS/cuDNN workspaces, allocator fragmentation, the GPU kernels' scratch space.
The CPU's flash-attention kernels' scratch (per-thread fp32 tiles allocated inside the kernel, which neither
FakeTensorMode nor MemTracker sees) is modelled on request (``--kernel_workspace cpu``): the real-allocation
checks on a CPU need it, a GPU estimate does not (:func:`cpu_attention_workspace`).

Usage (one configuration):
    python memory_estimate.py --model sdxl --rank 256 --mode fair_exact [--cache_latents --cache_text_embeddings]
    python memory_estimate.py --model flux-dev --rank 16 --mixed_precision bf16 --quantization nf4 --cache_latents \\
        --cache_text_embeddings --validation [--quantize_text_encoders nf4]
    python memory_estimate.py --model path/to/diffusers/folder   # config files only (model_index.json, */config.json)
Several: benchmarks/benchmark_memory.py (the tables of docs/memory.md). Validation against real CPU
allocations: tests/test_memory_estimate.py (:func:`measure_real`).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import math
import os
import sys
import tempfile
import time
import types
import warnings

import torch
import torch.nn.functional as F

from flag_types import NON_NEGATIVE_INT, POSITIVE_INT, flag_number

GiB = 1024**3

# ---------------------------------------------------------------------------------------------
# Named models: the config files of public checkpoints (data only; the family is read from the
# model_index.json's _class_name, as for any folder)
# ---------------------------------------------------------------------------------------------

_CLIP_L = dict(model_type="clip_text_model", vocab_size=49408, hidden_size=768, intermediate_size=3072,
               num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
               projection_dim=768)
_CLIP_BIGG = dict(_CLIP_L, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                  hidden_act="gelu", projection_dim=1280)
_T5_XXL = dict(model_type="t5", vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
               feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, is_encoder_decoder=False)
_VAE = dict(act_fn="silu", block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
            in_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, out_channels=3,
            up_block_types=["UpDecoderBlock2D"] * 4)
_DDPM = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
             prediction_type="epsilon", steps_offset=1, clip_sample=False)
_SD15_UNET = dict(
    act_fn="silu", attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280], center_input_sample=False,
    cross_attention_dim=768,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
    mid_block_scale_factor=1, norm_eps=1e-05, norm_num_groups=32, out_channels=4, sample_size=64,
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"])
_SDXL_UNET = dict(
    act_fn="silu", addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], center_input_sample=False,
    cross_attention_dim=2048, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
    mid_block_scale_factor=1, mid_block_type="UNetMidBlock2DCrossAttn", norm_eps=1e-05, norm_num_groups=32,
    out_channels=4, projection_class_embeddings_input_dim=2816, sample_size=128,
    transformer_layers_per_block=[1, 2, 10], up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    use_linear_projection=True)


def _index(pipeline, **components):
    return {"_class_name": pipeline, **{name: list(library_class) for name, library_class in components.items()}}


MODELS = {
    "sd15": {
        "model_index.json": _index("StableDiffusionPipeline", text_encoder=("transformers", "CLIPTextModel"),
                                   unet=("diffusers", "UNet2DConditionModel"), vae=("diffusers", "AutoencoderKL")),
        "unet/config.json": _SD15_UNET, "vae/config.json": dict(_VAE, scaling_factor=0.18215, sample_size=512),
        "text_encoder/config.json": _CLIP_L, "scheduler/scheduler_config.json": _DDPM},
    "sdxl": {
        "model_index.json": _index("StableDiffusionXLPipeline", text_encoder=("transformers", "CLIPTextModel"),
                                   text_encoder_2=("transformers", "CLIPTextModelWithProjection"),
                                   unet=("diffusers", "UNet2DConditionModel"), vae=("diffusers", "AutoencoderKL")),
        "unet/config.json": _SDXL_UNET, "vae/config.json": dict(_VAE, scaling_factor=0.13025, sample_size=1024),
        "text_encoder/config.json": _CLIP_L, "text_encoder_2/config.json": _CLIP_BIGG,
        "scheduler/scheduler_config.json": _DDPM},
    "flux-dev": {
        "model_index.json": _index("FluxPipeline", text_encoder=("transformers", "CLIPTextModel"),
                                   text_encoder_2=("transformers", "T5EncoderModel"),
                                   transformer=("diffusers", "FluxTransformer2DModel"),
                                   vae=("diffusers", "AutoencoderKL")),
        "transformer/config.json": dict(attention_head_dim=128, guidance_embeds=True, in_channels=64,
                                        joint_attention_dim=4096, num_attention_heads=24, num_layers=19,
                                        num_single_layers=38, patch_size=1, pooled_projection_dim=768,
                                        axes_dims_rope=[16, 56, 56]),
        "vae/config.json": dict(_VAE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                                scaling_factor=0.3611, shift_factor=0.1159, sample_size=1024),
        "text_encoder/config.json": _CLIP_L, "text_encoder_2/config.json": _T5_XXL,
        "scheduler/scheduler_config.json": dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096,
                                                max_shift=1.15)},
    "sd35-large": {
        "model_index.json": _index("StableDiffusion3Pipeline",
                                   text_encoder=("transformers", "CLIPTextModelWithProjection"),
                                   text_encoder_2=("transformers", "CLIPTextModelWithProjection"),
                                   text_encoder_3=("transformers", "T5EncoderModel"),
                                   transformer=("diffusers", "SD3Transformer2DModel"),
                                   vae=("diffusers", "AutoencoderKL")),
        "transformer/config.json": dict(attention_head_dim=64, caption_projection_dim=2432, in_channels=16,
                                        joint_attention_dim=4096, num_attention_heads=38, num_layers=38,
                                        out_channels=16, patch_size=2, pooled_projection_dim=2048,
                                        pos_embed_max_size=192, qk_norm="rms_norm", sample_size=128),
        "vae/config.json": dict(_VAE, latent_channels=16, use_quant_conv=True, use_post_quant_conv=True,
                                scaling_factor=1.5305, shift_factor=0.0609, sample_size=1024),
        "text_encoder/config.json": _CLIP_L, "text_encoder_2/config.json": _CLIP_BIGG,
        "text_encoder_3/config.json": _T5_XXL,
        "scheduler/scheduler_config.json": dict(num_train_timesteps=1000, shift=3.0)},
}

# The 2026 families (issue 27): the released checkpoints' config values (the keys that set a size; the rest are
# the classes' defaults, which equal the releases' here)
_QWEN3_4B = dict(model_type="qwen3", vocab_size=151936, hidden_size=2560, intermediate_size=9728,
                 num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                 max_position_embeddings=40960, rope_theta=1000000, rms_norm_eps=1e-6, tie_word_embeddings=True)
_QWEN3_8B = dict(_QWEN3_4B, hidden_size=4096, intermediate_size=12288, tie_word_embeddings=False)
_FLUX1_VAE = dict(_VAE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611,
                  shift_factor=0.1159, sample_size=1024)
_FLUX1_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
                        base_shift=0.5, max_image_seq_len=4096, max_shift=1.15)
_ZIMAGE = {
    "model_index.json": _index("ZImagePipeline", text_encoder=("transformers", "Qwen3Model"),
                               transformer=("diffusers", "ZImageTransformer2DModel"),
                               vae=("diffusers", "AutoencoderKL")),
    "transformer/config.json": dict(all_patch_size=[2], all_f_patch_size=[1], in_channels=16, dim=3840, n_layers=30,
                                    n_refiner_layers=2, n_heads=30, n_kv_heads=30, cap_feat_dim=2560),
    "vae/config.json": _FLUX1_VAE, "text_encoder/config.json": _QWEN3_4B,
    "scheduler/scheduler_config.json": dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)}


def _klein(distilled: bool, double: int, single: int, heads: int, text_encoder: dict) -> dict:
    return {
        "model_index.json": dict(_index("Flux2KleinPipeline", text_encoder=("transformers", "Qwen3ForCausalLM"),
                                        transformer=("diffusers", "Flux2Transformer2DModel"),
                                        vae=("diffusers", "AutoencoderKLFlux2")), is_distilled=distilled),
        "transformer/config.json": dict(in_channels=128, num_layers=double, num_single_layers=single,
                                        attention_head_dim=128, num_attention_heads=heads,
                                        joint_attention_dim=3 * text_encoder["hidden_size"], guidance_embeds=False),
        "vae/config.json": dict(latent_channels=32, block_out_channels=[128, 256, 512, 512], sample_size=1024),
        "text_encoder/config.json": text_encoder,
        "scheduler/scheduler_config.json": dict(_FLUX1_SCHEDULER, time_shift_type="exponential")}


MODELS.update({
    "zimage-turbo": _ZIMAGE,  # Tongyi-MAI/Z-Image-Turbo: the base's configs (the name tells them apart)
    "zimage": _ZIMAGE,  # Tongyi-MAI/Z-Image
    "flux2-klein-base-4b": _klein(False, 5, 20, 24, _QWEN3_4B),
    "flux2-klein-base-9b": _klein(False, 8, 24, 32, _QWEN3_8B),
    "qwen-image": {
        "model_index.json": _index("QwenImagePipeline",
                                   text_encoder=("transformers", "Qwen2_5_VLForConditionalGeneration"),
                                   transformer=("diffusers", "QwenImageTransformer2DModel"),
                                   vae=("diffusers", "AutoencoderKLQwenImage")),
        "transformer/config.json": dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60,
                                        attention_head_dim=128, num_attention_heads=24, joint_attention_dim=3584),
        "vae/config.json": dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                temperal_downsample=[False, True, True]),
        "text_encoder/config.json": dict(
            model_type="qwen2_5_vl", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
            num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
            rope_theta=1000000.0, rms_norm_eps=1e-6, rope_scaling=dict(type="mrope", mrope_section=[16, 24, 24]),
            vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                               out_hidden_size=3584, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                               window_size=112, fullatt_block_indexes=[7, 15, 23, 31], in_chans=3)),
        "scheduler/scheduler_config.json": dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True,
                                                base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192,
                                                max_shift=0.9, shift_terminal=0.02, time_shift_type="exponential")},
    "chroma": {
        "model_index.json": _index("ChromaPipeline", text_encoder=("transformers", "T5EncoderModel"),
                                   transformer=("diffusers", "ChromaTransformer2DModel"),
                                   vae=("diffusers", "AutoencoderKL")),
        "transformer/config.json": dict(num_layers=19, num_single_layers=38, attention_head_dim=128,
                                        num_attention_heads=24, joint_attention_dim=4096, in_channels=64),
        "vae/config.json": _FLUX1_VAE, "text_encoder/config.json": _T5_XXL,
        "scheduler/scheduler_config.json": _FLUX1_SCHEDULER},
})
"""Named models: each a diffusers folder's config files (released checkpoints' values), written to a temporary
folder and read like any model folder."""


@contextlib.contextmanager
def model_folder(model: str):
    """A folder of ``model``'s config files: ``model`` itself, or a named model's files written to a temporary
    folder (removed afterwards)."""
    if model not in MODELS:
        if not os.path.isfile(os.path.join(model, "model_index.json")):
            raise FileNotFoundError(f"{model}: neither a named model ({', '.join(sorted(MODELS))}) nor a diffusers "
                                    "folder with model_index.json")
        yield model
        return
    with tempfile.TemporaryDirectory(prefix=f"memory-estimate-{model}-") as folder:
        for name, config in MODELS[model].items():
            os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
            with open(os.path.join(folder, name), "w") as f:
                json.dump(config, f)
        yield folder


class TokenizerOutput(dict):
    """A tokenizer's ``BatchEncoding`` as the pipelines read it: by key, by attribute, ``.to(device)``."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device):
        return TokenizerOutput({k: v.to(device) for k, v in self.items()})


class ShapeTokenizer:
    """Stands in for a tokenizer (config folders have none): token ids of the length the caller pads to
    (``padding="max_length"``), one token otherwise; the text encoder's ``max_position_embeddings`` as
    ``model_max_length``. The ids' values never matter to memory, their shapes do."""

    added_tokens_encoder: dict = {}

    def __init__(self, text_encoder):
        self.model_max_length = getattr(text_encoder.config, "max_position_embeddings", 512)

    def __call__(self, text, padding=None, max_length=None, **_kwargs):
        count = len(text) if isinstance(text, (list, tuple)) else 1
        # padded to max_length, or (padding to the longest, cut at max_length: Qwen-Image) as long as it may be
        length = (max_length or self.model_max_length) if padding == "max_length" or (padding and max_length) else 1
        ids = torch.zeros(count, length, dtype=torch.long)
        return TokenizerOutput(input_ids=ids, attention_mask=torch.ones_like(ids))

    def apply_chat_template(self, messages, tokenize=False, **_kwargs):
        """The chat-templated prompt's text (Qwen text encoders): its length comes from ``max_length``."""
        return "".join(m["content"] for m in messages)

    def tokenize(self, text):
        return []

    def batch_decode(self, ids, **_kwargs):
        return [""] * len(ids)


QUANTIZED_BYTES = {"nf4": 0.5 + 1 / 64 + 4 / (64 * 256), "int8": 1.0}
"""Bytes per frozen ``nn.Linear`` weight number under bitsandbytes: NF4 with double quantization (4 bits +
an 8-bit absmax per 64 + an fp32 absmax per 256 of those), LLM.int8 (1 byte + a per-row scale, not counted)."""


def quantization_saving(unet, quantization: str) -> tuple[int, int]:
    """``(bytes saved, bytes of the largest dequantized weight)`` when the frozen ``nn.Linear`` weights of the
    denoiser are stored by bitsandbytes (``quantization``: ``nf4``/``int8``) instead of the weight dtype.

    Modelled analytically (the peak minus the saving, plus one dequantized weight in the compute dtype: bnb
    dequantizes one layer at a time); convolutions, norms and the LoRA stay as they are."""
    if quantization in (None, "none"):
        return 0, 0
    saved = largest = 0
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and "lora_" not in name and not module.weight.requires_grad:
            n, size = module.weight.numel(), module.weight.numel() * module.weight.element_size()
            saved += size - math.ceil(n * QUANTIZED_BYTES[quantization])
            largest = max(largest, size)
    return saved, largest


# ---------------------------------------------------------------------------------------------
# CUDA autocast emulation on CPU (fp32 policy that CPU autocast lacks)
# ---------------------------------------------------------------------------------------------

class CudaAutocastFp32Policy:
    """While CPU autocast is on, run CUDA autocast's fp32-list functions used here (group_norm, layer_norm,
    softmax, log_softmax) in fp32, casting every floating argument (input, weight, bias) as CUDA autocast
    does (CPU autocast leaves them in the input dtype). Done by wrapping the torch.nn.functional entries
    (nn.GroupNorm / nn.LayerNorm call them), so it also holds in the recomputation of checkpointed blocks."""

    NAMES = ("group_norm", "layer_norm", "softmax", "log_softmax")

    def __enter__(self):
        self.saved = {name: getattr(F, name) for name in self.NAMES}
        for name, fn in self.saved.items():
            setattr(F, name, self._wrap(fn))
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(F, name, fn)

    @staticmethod
    def _wrap(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if torch.is_autocast_enabled("cpu"):
                def up(x):
                    return x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float32 else x
                args = tuple(up(a) for a in args)
                kwargs = {k: up(v) for k, v in kwargs.items()}
                if kwargs.get("dtype") is not None:
                    kwargs["dtype"] = torch.float32
            return fn(*args, **kwargs)
        return wrapper


def register_cpu_sdpa_flops():
    """FlopCounterMode counts CUDA flash/efficient attention; give the fused CPU kernel the same formulas."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    if aten._scaled_dot_product_flash_attention_for_cpu in fc.flop_registry:
        return

    @fc.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu, get_raw=True)
    def _fwd(query, key, value, *args, out_val=None, **kwargs):
        return fc.sdpa_flop_count(query.shape, key.shape, value.shape)

    @fc.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward, get_raw=True)
    def _bwd(grad_out, query, key, value, *args, out_val=None, **kwargs):
        return fc.sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


# ---------------------------------------------------------------------------------------------
# Memory tracking with phases
# ---------------------------------------------------------------------------------------------

def _rounded(nbytes: int) -> int:
    return math.ceil(nbytes / 512) * 512 if nbytes else 0


def cpu_attention_workspace(func, args) -> int:
    """Bytes PyTorch's CPU flash-attention kernels (ATen's FlashAttentionKernel.cpp) allocate INSIDE the kernel,
    live only while it runs: per thread a tile of the score matrix in the accumulation dtype (forward: the
    q x kv tile, row max and sum, the output tile; backward: the score and score-gradient tiles and the row sums
    of grad_out * out), the reduced-precision copies of those tiles for fp16/bf16, and in backward a contiguous
    copy of a non-contiguous grad_out. No tensor comes out of these allocations, so FakeTensorMode and MemTracker
    never see them; the real CPU step does (``num_threads`` of them: 1 MiB a thread at 768+ tokens). 0 for any
    other op. Tiles: ``min(q_split, q_len) x min(512, kv_len)`` with ``q_split`` 256 from 768 query tokens, 64
    from 192, else 32. (fp16 on CPUs with oneDNN packing adds packed K/V copies: not modelled.)"""
    ops = torch.ops.aten
    if func is ops.convolution.default:
        return cpu_convolution_workspace(*args[:9])
    if func is ops._scaled_dot_product_flash_attention_for_cpu.default:
        query, key, value = args[:3]
        backward = False
    elif func is ops._scaled_dot_product_flash_attention_for_cpu_backward.default:
        grad_out, query, key, value = args[:4]
        backward = True
    else:
        return 0
    q_len, kv_len, head = query.shape[-2], key.shape[-2], value.shape[-1]
    q_tile = min(256 if q_len >= 768 else 64 if q_len >= 192 else 32, q_len)
    kv_tile = min(512, kv_len)
    threads = torch.get_num_threads()
    size = query.element_size()
    accumulate = 8 if query.dtype == torch.float64 else 4
    reduced = query.dtype in (torch.float16, torch.bfloat16)
    if not backward:
        return (_rounded(threads * (q_tile * kv_tile + 2 * q_tile + q_tile * head) * accumulate)
                + _rounded(threads * q_tile * kv_tile * size if reduced else 0))
    copy = 0 if grad_out.transpose(1, 2).is_contiguous() else grad_out.numel() * grad_out.element_size()
    chunks = min(threads, math.prod(query.shape[:-2]))  # parallel over batch x heads, one row-sum buffer each
    return (_rounded(copy) + _rounded(threads * 2 * q_tile * kv_tile * accumulate)
            + _rounded(threads * 2 * q_tile * kv_tile * size if reduced else 0)
            + chunks * _rounded(q_tile * accumulate))


def cpu_convolution_workspace(x, weight, bias, stride, padding, dilation, transposed, output_padding, groups) -> int:
    """A float32 forward convolution that ATen gives oneDNN (its ``use_mkldnn`` rule: more than one thread, or
    a strided / dilated / non-1x1 / batched one; and grouped, batched, 5x5+ or over 20480 input elements):
    oneDNN reorders the input and the weight into its blocked layout and computes the output there, then
    copies it back -- ``max(input + weight, output)`` bytes beyond the output, for the op's duration."""
    if x.dtype != torch.float32 or transposed or x.dim() != 4:
        return 0
    one_by_one = weight.shape[-1] == 1 and weight.shape[-2] == 1
    eligible = ((any(s != 1 for s in stride) or any(d != 1 for d in dilation) or x.shape[0] >= 16 or not one_by_one
                 or torch.get_num_threads() > 1)
                and (groups > 1 or (weight.shape[-1] > 3 and weight.shape[-2] > 3) or x.shape[0] > 1
                     or x.numel() > 20480))
    if not eligible:
        return 0
    out = math.prod(x.shape[:1]) * weight.shape[0] * 4 * math.prod(
        (size + 2 * pad - dil * (k - 1) - 1) // st + 1
        for size, pad, dil, k, st in zip(x.shape[2:], padding, dilation, weight.shape[2:], stride))
    return max(_rounded(x.numel() * 4) + _rounded(weight.numel() * 4), _rounded(out))


KERNEL_WORKSPACES = {"none": None, "cpu": cpu_attention_workspace}
"""``--kernel_workspace``: the attention kernels' internal scratch to count (none: the GPU estimate's default)."""

WORKSPACE = "Kernel workspace"  # its key in the tracker's breakdown


def make_tracker(round_like_cuda: bool = True, kernel_workspace=None):
    """A MemTracker with phases; ``kernel_workspace(func, args) -> bytes`` (:data:`KERNEL_WORKSPACES`) adds each
    op's internal scratch on top of what is live when the op has made its outputs, for the op's duration."""
    from torch.distributed._tools import mem_tracker as mtmod

    if round_like_cuda and not getattr(mtmod._WeakRefInfo, "_memsim_patched", False):
        def _calc(self):
            mem = self.size * self.element_size
            return math.ceil(mem / 512) * 512 if mem else 0
        mtmod._WeakRefInfo._calculate_mem_consumed = _calc
        mtmod._WeakRefInfo._memsim_patched = True

    class PhaseTracker(mtmod.MemTracker):
        """MemTracker that also records, per named phase, the largest live total and its breakdown."""

        def __init__(self):
            super().__init__()
            self.phase = "setup"
            self.phase_peak: dict[str, int] = {}
            self.phase_snap: dict[str, dict] = {}
            self.order: list[str] = []

        def set_phase(self, name):
            self.phase = name
            if name not in self.order:
                self.order.append(name)
            self._note()

        def _note(self):
            total, snap = 0, {}
            for dev_snap in self._curr_mem_snap.values():
                total += dev_snap.get("Total", 0)
                for k, v in dev_snap.items():
                    snap[str(k)] = snap.get(str(k), 0) + v
            if total > self.phase_peak.get(self.phase, -1):
                self.phase_peak[self.phase] = total
                self.phase_snap[self.phase] = snap

        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            # MemTracker hooks every parameter, which fails on frozen ones: hook only the trainable ones
            out = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
            if install_grad_hooks:
                for param in module.parameters():
                    if param.requires_grad and self._param_to_grad_hook_handles.get(param, None) is None:
                        def _grad_hook(grad):
                            try:
                                self._update_and_maybe_create_winfos(grad, mtmod._MemRefType.GRAD)
                            except NotImplementedError:  # a vmapped (batched) backward's gradient: its storage
                                pass  # is the underlying tensor, tracked where it was allocated
                        self._param_to_grad_hook_handles[param] = (
                            param.register_hook(_grad_hook),
                            param.register_post_accumulate_grad_hook(lambda p: _grad_hook(p.grad)))
            return out

        def _update_peak_stats(self, peak_state):
            # the global peak only: MemTracker's per-module bookkeeping walks every module on every op
            for dev, dev_snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < dev_snap["Total"]:
                    self._peak_mem[dev] = dev_snap["Total"]
                    self._peak_mem_snap[dev] = dict(dev_snap)
            self._note()

        def current_total(self):
            return sum(d.get("Total", 0) for d in self._curr_mem_snap.values())

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = super().__torch_dispatch__(func, types, args, kwargs)
            extra = kernel_workspace(func, args) if kernel_workspace is not None else 0
            tensor = next((a for a in args if isinstance(a, torch.Tensor)), None)
            if extra and tensor is not None and tensor.device in self._curr_mem_snap:
                # the kernel's scratch, allocated after its outputs and freed before it returns
                snap = self._curr_mem_snap[tensor.device]
                snap["Total"] += extra
                snap[WORKSPACE] = extra
                self._update_peak_stats(None)
                snap["Total"] -= extra
                snap[WORKSPACE] = 0
            return out

    return PhaseTracker()


# ---------------------------------------------------------------------------------------------
# Building the models under FakeTensorMode
# ---------------------------------------------------------------------------------------------

def to_dtype(module, dtype):
    """module.to(dtype) without Module._apply, which cannot swap FakeTensor parameters (weakrefs)."""
    for m in module.modules():
        for k, p in list(m._parameters.items()):
            if p is not None and p.is_floating_point() and p.dtype != dtype:
                m._parameters[k] = torch.nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)
        for k, b in list(m._buffers.items()):
            if b is not None and b.is_floating_point() and b.dtype != dtype:
                m._buffers[k] = b.to(dtype)
    return module


@contextlib.contextmanager
def fake_safe_module_to():
    """Module.to(...) as to_dtype (device moves ignored: everything is one fake device) while building."""
    original = torch.nn.Module.to

    def to(self, *args, **kwargs):
        _device, dtype, _non_blocking, _fmt = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is not None:
            to_dtype(self, dtype)
        return self

    torch.nn.Module.to = to
    try:
        yield
    finally:
        torch.nn.Module.to = original


class StubScaler:
    def __init__(self, scale):
        self.scale = scale

    def get_scale(self):
        return self.scale


class StubAccelerator:
    """The parts of accelerate.Accelerator that FairUpdate and the loop touch (one process, no accumulation)."""

    def __init__(self, loss_scale):
        self.gradient_accumulation_steps = 1
        self.num_processes = 1
        self.scaler = StubScaler(loss_scale) if loss_scale else None
        self.sync_gradients = True

    def backward(self, loss):
        loss = loss / self.gradient_accumulation_steps
        if self.scaler is not None:
            loss = loss * self.scaler.get_scale()
        loss.backward()

    def reduce(self, t, op):
        return t

    def no_sync(self, model):
        return contextlib.nullcontext()

    def unscale_and_clip(self, params, max_norm):
        grads = [p.grad for p in params if p.grad is not None]
        if self.scaler is not None:  # GradScaler.unscale_: in place
            torch._foreach_mul_(grads, 1.0 / self.scaler.get_scale())
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)


def make_fake_mode():
    """FakeTensorMode whose data-dependent scalars (Tensor.item / float / bool) read as 1 / True and whose masks
    select every cell (``nonzero``: the caption masks of Z-Image / Qwen-Image, all ones here), logged.

    The training step asks a few: FairUpdate's finiteness checks of the 3 x 3 Gram matrix. They steer no
    allocation of any size that matters; every one is counted in DATA_DEPENDENT."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    class ScalarFakeTensorMode(FakeTensorMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                t = args[0]
                DATA_DEPENDENT.append(f"{tuple(t.shape)} {t.dtype}")
                return True if t.dtype == torch.bool else (1.0 if t.is_floating_point() else 1)
            if func is torch.ops.aten.nonzero.default:  # a mask's True cells: every cell, as a mask of ones
                t = args[0]
                DATA_DEPENDENT.append(f"nonzero {tuple(t.shape)}")
                return super().__torch_dispatch__(torch.ops.aten.empty.memory_format, types, ([t.numel(), t.dim()],),
                                                  {"dtype": torch.long, "device": t.device})
            return super().__torch_dispatch__(func, types, args, kwargs)

    return ScalarFakeTensorMode(allow_non_fake_inputs=True)


DATA_DEPENDENT: list[str] = []


@contextlib.contextmanager
def fair_solver_on_fake_grams(fh):
    """The alpha-fair solve is a K x K problem on the CPU; under fake tensors the Gram has no values, so the
    real solver runs on a fixed real Gram (typical magnitudes) and returns REAL weights, as the script has.
    ``fh.fair_coefficients`` is swapped for the step and restored after it (the training process that asks
    for an estimate keeps the real solver)."""
    from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

    original = fh.fair_coefficients

    def fair_coefficients(gram, alpha=2.0, grad_scale=1.0):
        if isinstance(gram, FakeTensor):
            with unset_fake_temporarily():
                k = gram.shape[0]  # typical magnitudes: a large global row, smaller region rows, weak coupling
                real = torch.full((k, k), 0.1, dtype=torch.float64)
                real[0, 1:] = real[1:, 0] = 0.6
                real.diagonal()[:] = torch.tensor([4.0] + [1.0] * (k - 1), dtype=torch.float64)
                return original(real, alpha, 1.0)
        return original(gram, alpha, grad_scale)

    fh.fair_coefficients = fair_coefficients
    try:
        yield
    finally:
        fh.fair_coefficients = original


def make_optimizer(args, params):
    """AdamW8bit (bitsandbytes, run under fake tensors through its registered fake kernels when possible,
    else an analytic stub with its exact state tensors) or torch AdamW (foreach, as on CUDA)."""
    if args.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=1e-4, foreach=True), "torch AdamW fp32 (foreach)"
    if args.optimizer == "adamw8bit" and args.try_bnb:
        try:
            import bitsandbytes as bnb

            opt = bnb.optim.AdamW8bit(params, lr=1e-4)
            return opt, "bitsandbytes AdamW8bit"
        except Exception as error:  # noqa: BLE001
            print(f"[note] bitsandbytes AdamW8bit unavailable ({error!r}); using the analytic stub", file=sys.stderr)

    class AdamW8bitStub(torch.optim.Optimizer):
        """bitsandbytes AdamW8bit's state layout: uint8 state1/state2 + fp32 absmax per 256-block (params with
        >= 4096 elements; smaller ones fp32 states). Its update kernel works in place (no temporaries)."""

        def __init__(self, params):
            super().__init__(params, dict(lr=1e-4))

        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    st = self.state[p]
                    if not st:
                        n = p.numel()
                        if n < 4096:
                            st["state1"] = torch.zeros_like(p, dtype=torch.float32)
                            st["state2"] = torch.zeros_like(p, dtype=torch.float32)
                        else:
                            blocks = n // 256 + bool(n % 256)
                            st["state1"] = torch.zeros_like(p, dtype=torch.uint8)
                            st["state2"] = torch.zeros_like(p, dtype=torch.uint8)
                            st["absmax1"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
                            st["absmax2"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
                    p.add_(p.grad, alpha=-1e-4)  # in place, stands for the fused kernel

    return AdamW8bitStub(params), "AdamW8bit (analytic stub of bitsandbytes' state tensors)"


# ---------------------------------------------------------------------------------------------
# One training step, as train_fairhuman_lora.py runs it
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def numbered_backward_phases(tracker):
    """Each torch.autograd.backward call (Tensor.backward goes through it) becomes phase 'backward#k'."""
    if tracker is None:
        yield
        return
    original = torch.autograd.backward
    count = [0]

    def backward(*args, **kwargs):
        count[0] += 1
        tracker.set_phase(f"backward#{count[0]}" + (" (retain_graph)" if kwargs.get("retain_graph") else ""))
        out = original(*args, **kwargs)
        tracker._note()
        tracker.set_phase(f"after backward#{count[0]}")
        return out

    torch.autograd.backward = backward
    try:
        yield
    finally:
        torch.autograd.backward = original


def profile_peaks(prof):
    """From the CPU allocator's events recorded by the profiler (profile_memory=True): the peak of live
    bytes allocated since the profiler started, overall and per phase (record_function ranges)."""
    events = prof.profiler.kineto_results.events()
    mem = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    phases = [(e.name()[len("phase:"):], e.start_ns(), e.start_ns() + e.duration_ns()) for e in events
              if e.name().startswith("phase:")]
    live, peak, peak_t = 0, 0, None
    curve = []
    for t, delta in mem:
        live += delta
        curve.append((t, live))
        if live > peak:
            peak, peak_t = live, t
    per_phase = {}
    for name, start, end in phases:
        before = [v for t, v in curve if t < start]  # the level carried into the phase counts too
        values = [v for t, v in curve if start <= t <= end] + before[-1:]
        if values:
            per_phase[name] = max(per_phase.get(name, 0), max(values))
    peak_phase = next((n for n, s, e in phases if peak_t is not None and s <= peak_t <= e), None)
    return dict(peak_delta=peak, peak_phase=peak_phase, phase_peak_delta=per_phase, end_delta=live,
                n_events=len(mem))




# ---------------------------------------------------------------------------------------------
# The run, stage by stage, through the model's family
# ---------------------------------------------------------------------------------------------

PHASES = ("caption", "latents", "step", "validation", "evaluation")
DENOISER_PHASES = ("step", "validation", "evaluation")  # the phases that hold the denoiser
"""The run's phases in order (keys of ``result["phases"]``); their printed names come from :func:`phase_name`."""


def phase_name(key: str, family, args, resolution: int) -> str:
    """What a phase is, in words (the denoiser named as the family names it: a transformer is not a UNet)."""
    return {
        "caption": "caption embedding by the text encoders",
        "latents": f"latent caching by the VAE at {resolution} px",
        "step": f"{family.denoiser_label} training step",
        "validation": f"validation sampling at {args.validation_resolution or resolution} px",
        "evaluation": f"evaluation sampling at {args.evaluation_resolution or resolution} px, "
                      f"{args.evaluation_images} images per call",
    }[key]


def family_for_settings(args, folder: str):
    """The model family of ``folder`` (``model_families.family_for_model``: its model_index.json's _class_name)
    over the training script's own flag defaults, with the family's defaults filled in (``check_args``)."""
    import model_families as mf
    import train_fairhuman_lora as train

    argv = ["--pretrained_model_name_or_path", folder, "--train_data_dir", "-"]
    if args.max_sequence_length is not None:
        argv += ["--max_sequence_length", str(args.max_sequence_length)]
    run_args = train.parse_args(argv)
    family = mf.family_for_model(run_args)
    family.check_args(run_args)
    return family


def simulate(args):
    """Memory pass (MemTracker) and, separately, FLOP pass of the step (FlopCounterMode): FlopCounterMode's
    module tracker keeps tensors alive through backward, so it must not run under the memory tracker."""
    result = simulate_once(args, measure="memory")
    if args.flops:
        result["flops"] = simulate_once(args, measure="flops")["flops"]
    return result


def simulate_once(args, measure):
    import fairhuman_utils as fh

    with fair_solver_on_fake_grams(fh), model_folder(args.model) as folder:
        return _simulate_once(args, measure, fh, family_for_settings(args, folder))


def nbytes(tensors) -> int:
    return sum(math.ceil(t.numel() * t.element_size() / 512) * 512 for t in tensors)


def _simulate_once(args, measure, fh, family):
    from torch.utils.flop_counter import FlopCounterMode

    vae_factor, _step, _granularity, native = family.geometry()
    resolution = args.resolution or native
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    register_cpu_sdpa_flops()
    fp32_policy = CudaAutocastFp32Policy()
    device = torch.device("cpu")
    timings = {}
    memory = measure == "memory" and not args.real
    profiling = measure == "profile"
    count_flops = measure == "flops"
    amp = (functools.partial(torch.autocast, "cpu", dtype=weight_dtype) if args.mixed_precision in ("fp16", "bf16")
           else contextlib.nullcontext)
    phases, trackers = {}, {}
    workspace = KERNEL_WORKSPACES[args.kernel_workspace]

    def run_phase(key, tracked, body, sub_phases=False):
        """``body()`` under a fresh tracker that holds ``tracked`` (what the run has on the device then)."""
        if not memory:
            return body()
        tracker = make_tracker(kernel_workspace=workspace)
        tracker.track_external(*tracked)
        gc.collect()
        with tracker, fp32_policy:
            tracker.set_phase(key)
            start = tracker.current_total()
            out = body()
            tracker._note()
        trackers[key] = (tracker, start)
        phases[key] = max(tracker.phase_peak.values())
        return out

    fake = contextlib.nullcontext() if args.real else make_fake_mode()
    t0 = time.time()
    with fake:
        with fake_safe_module_to():
            family.build_from_configs(weight_dtype, ShapeTokenizer)
            if args.vae_dtype != "auto":
                to_dtype(family.vae, {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.vae_dtype])
            add_lora(args, family.denoiser)
        denoiser, vae, text_encoders = family.denoiser, family.vae, family.text_encoders
        lora_params = [p for p in denoiser.parameters() if p.requires_grad]
        n_lora = sum(p.numel() for p in lora_params)
        params = dict(denoiser=sum(p.numel() for p in denoiser.parameters()) - n_lora, lora=n_lora,
                      vae=sum(p.numel() for p in vae.parameters()),
                      text_encoders=sum(p.numel() for te in text_encoders for p in te.parameters()))
        timings["build_s"] = time.time() - t0
        bsz = args.batch_size
        latent_channels = family.latent_channels()
        in_step = family.text_encoders_in_step(args)

        # ---- 1. caption embedding: the text encoders alone, one caption at the run's sequence lengths ----
        def embed():
            with torch.no_grad():
                return family.memory_captions(device)

        if profiling or count_flops:  # the step only
            caption = embed()
        else:
            caption = run_phase("caption", text_encoders, embed)

        # ---- 2. latent caching: the VAE alone, one image at the training resolution ----
        if args.cache_latents and memory:
            pixels = torch.randn(1, 3, resolution, resolution).to(vae.dtype)

            def encode():
                with torch.no_grad():
                    return family.latent_distribution(pixels)

            run_phase("latents", [vae, pixels], encode)
            del pixels

        # ---- 3. the training step ----
        optimizer, opt_name = make_optimizer(args, lora_params)
        weighting = "global" if args.mode == "plain" else "fair"
        interval = 8 if args.mode == "fair_interval" else 1
        row_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[
            args.fair_gradient_dtype if args.fair_gradient_dtype != "auto"
            else ("bf16" if args.mixed_precision in ("fp16", "bf16") else "fp32")]
        objectives = ("global", *(f"region{i}" for i in range(args.num_regions)))
        fair_update = fh.FairUpdate(lora_params, weighting, alpha=2.0, update_interval=interval, objectives=objectives,
                                    interval_weights=args.fair_interval_weights, row_dtype=row_dtype,
                                    batched_backward=args.fair_batched_backward)
        accelerator = StubAccelerator(65536.0 if args.mixed_precision == "fp16" else None)
        steady_state(args, fh, fair_update, optimizer, lora_params, objectives, weighting)

        latent_hw = (resolution // vae_factor, resolution // vae_factor)
        if args.cache_latents:  # the batch's cached posterior, in the weight dtype
            batch = family.memory_batch(bsz, latents=torch.randn(bsz, latent_channels, *latent_hw).to(weight_dtype))
        else:  # pixels, moved to the device in the VAE's dtype
            batch = family.memory_batch(bsz, pixels=torch.randn(bsz, 3, resolution, resolution).to(vae.dtype))
        region_masks = [torch.zeros(bsz, 1, *latent_hw) for _ in range(args.num_regions)]
        stored = None if in_step else {k: torch.cat([v] * bsz) for k, v in caption.items()}
        persistent = [t for t in batch.values() if isinstance(t, torch.Tensor)] + region_masks
        persistent += list(stored.values()) if stored else []
        step_models = [denoiser, optimizer, *([] if args.cache_latents else [vae]), *(text_encoders if in_step else [])]

        tracker = make_tracker(kernel_workspace=workspace) if memory else None
        flops: dict[str, int] = {}
        prof = (torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
                if profiling else None)

        @contextlib.contextmanager
        def sub_phase(name):
            if profiling:
                with torch.profiler.record_function("phase:" + name):
                    yield
                return
            if tracker is not None:
                tracker.set_phase(name)
            fc = FlopCounterMode(display=False) if count_flops else contextlib.nullcontext()
            t = time.time()
            with fc:
                yield
            timings[name] = time.time() - t
            if count_flops:
                flops[name] = flops.get(name, 0) + fc.get_total_flops()
            if tracker is not None:
                tracker._note()

        if tracker is not None:
            tracker.track_external(*step_models, *persistent)
        gc.collect()
        with (tracker if tracker is not None else prof if profiling else contextlib.nullcontext()), fp32_policy:
            start_total = tracker.current_total() if tracker is not None else 0
            with torch.no_grad(), sub_phase("prepare_inputs"):  # the script's prepare_inputs
                cond = family.encode_captions(["a photo of a person"] * bsz, device) if in_step else stored
                noisy = family.noisy_inputs(batch, cond, device, weight_dtype)
                inputs = types.SimpleNamespace(model_input=noisy.model_input, timesteps=noisy.timesteps,
                                               conditioning=cond, extras=noisy.extras)
                present = [True] * len(objectives)  # worst case: every region in the batch
            with sub_phase("forward"):  # accelerate: autocast + outputs converted to fp32
                with amp():
                    model_pred = family.predict(denoiser, inputs)
                model_pred = model_pred.float()

                def loss_fn(pred, target=noisy.target, masks=tuple(region_masks), weights=noisy.sample_weights):
                    return fh.fairhuman_losses(pred, target, *masks, local_loss_scale=5.0, normalization="latent",
                                               sample_weights=weights)

                losses = loss_fn(model_pred)
            with sub_phase("backward"), numbered_backward_phases(tracker):
                fair_update.backward(accelerator, losses, present, loss_fn=loss_fn, model_pred=model_pred)
            del model_pred, losses, loss_fn, inputs, noisy, cond
            with sub_phase("write_update"):
                fair_update.write_update(accelerator)
            with sub_phase("clip"):
                accelerator.unscale_and_clip(lora_params, 1.0)
            with sub_phase("optimizer_step"):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if tracker is not None:
                tracker.set_phase("end")
        del batch, region_masks, persistent
        if profiling:
            return dict(profile=profile_peaks(prof), timings=timings)
        if count_flops:
            return dict(flops=flops, timings=timings)
        phases["step"] = max(tracker.phase_peak.values())

        # ---- 4./5. sampling mid-run and after training: what stays resident + the denoiser + the VAE decode ----
        resident = [denoiser, optimizer, vae, *(text_encoders if in_step else []), *caption.values()]
        rows = 2 if family.cfg_sampling else 1
        for key, images, sample_resolution in (("validation", 1 if args.validation else 0, args.validation_resolution),
                                               ("evaluation", args.evaluation_images, args.evaluation_resolution)):
            if images:
                run_phase(key, resident, functools.partial(
                    sample, family, caption, images * rows, images, (sample_resolution or resolution) // vae_factor,
                    latent_channels, weight_dtype, amp, device))

    # ---- bitsandbytes storage, analytic: the bytes saved by every phase that holds the model ----
    saved, dequantized = quantization_saving(denoiser, args.quantization)
    large = family.large_text_encoders()
    te_saved = te_dequantized = 0
    for text_encoder in large:
        s, d = quantization_saving(text_encoder, args.quantize_text_encoders)
        te_saved, te_dequantized = te_saved + s, max(te_dequantized, d)
    phases, step_phase_peak = quantized_phases(phases, tracker.phase_peak, saved, dequantized, te_saved,
                                               te_dequantized, in_step)
    start_total -= saved + (te_saved if in_step else 0)

    opt_states = [v for st in optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    resident_bytes = {
        "denoiser frozen weights": nbytes([p for p in denoiser.parameters() if not p.requires_grad])
        + nbytes(list(denoiser.buffers())) - saved,
        "text encoders": (nbytes([p for te in text_encoders for p in te.parameters()]) - te_saved) if in_step else 0,
        "VAE": 0 if args.cache_latents else nbytes(list(vae.parameters())),
        "LoRA params (fp32)": nbytes(lora_params),
        "optimizer states": nbytes(opt_states),
    }
    names = {key: phase_name(key, family, args, resolution) for key in phases}
    peak_key = max(phases, key=phases.get)
    return dict(
        model=args.model, family=family.label, resolution=resolution, rank=args.rank, mode=args.mode,
        gc=args.gradient_checkpointing, optimizer=opt_name, mixed_precision=args.mixed_precision,
        vae_dtype=str(vae.dtype).replace("torch.", ""), cache_latents=bool(args.cache_latents),
        cache_text_embeddings=bool(args.cache_text_embeddings), fair_batched_backward=bool(args.fair_batched_backward),
        quantization=args.quantization, quantize_text_encoders=args.quantize_text_encoders,
        validation=bool(args.validation), evaluation_images=args.evaluation_images,
        params=params, resident=resident_bytes, timings=timings, flops={},
        phases={key: phases[key] for key in PHASES if key in phases}, phase_names=names,
        peak_total=phases[peak_key], peak_phase=peak_key, peak_name=names[peak_key],
        step_peak=phases["step"], start_total=start_total,
        step_phase_peak={k: step_phase_peak[k] for k in tracker.order},
        step_peak_snap=tracker.phase_snap[max(tracker.order, key=lambda k: tracker.phase_peak[k])],
        data_dependent_scalars=list(DATA_DEPENDENT),
        # (bytes saved, largest dequantized weight) of each storage: the denoiser's, the large text encoders'
        quantization_options={q: quantization_saving(denoiser, q) for q in QUANTIZED_BYTES},
        text_encoder_quantization_options={q: (sum(quantization_saving(te, q)[0] for te in large),
                                               max([quantization_saving(te, q)[1] for te in large], default=0))
                                           for q in QUANTIZED_BYTES},
    )


def quantized_phases(phases: dict, step_phase_peak: dict, saved: int, dequantized: int, te_saved: int = 0,
                     te_dequantized: int = 0, text_encoders_in_step: bool = False) -> tuple[dict, dict]:
    """The run's phase peaks (bytes) and the training step's sub-phase peaks with bitsandbytes storage, from those
    estimated without: the denoiser's frozen Linear weights ``saved`` bytes smaller in every phase that holds it,
    plus one ``dequantized`` weight while it computes (not while the step prepares its inputs); the large text
    encoders' likewise in the caption phase, and ``te_saved`` smaller in the denoiser's phases too when they stay
    for the step (``text_encoders_in_step``). Returns new ``(phases, step_phase_peak)``."""
    phases, step_phase_peak = dict(phases), dict(step_phase_peak)
    if saved:
        step_phase_peak = {k: v - saved + (dequantized if k != "prepare_inputs" else 0) for k, v in step_phase_peak.items()}
        for key in DENOISER_PHASES:
            if key in phases:
                phases[key] += dequantized - saved
        phases["step"] = max(step_phase_peak.values())
    phases["caption"] += te_dequantized - te_saved
    if text_encoders_in_step:
        for key in DENOISER_PHASES:
            if key in phases:
                phases[key] -= te_saved
        step_phase_peak = {k: v - te_saved for k, v in step_phase_peak.items()}
    return phases, step_phase_peak


def add_lora(args, denoiser):
    """The run's LoRA on the denoiser (fp32 trainable weights) and gradient checkpointing, as the script sets them."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    targets = [t.strip() for t in args.lora_target_modules.split(",") if t.strip()]
    denoiser.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                    target_modules=targets))
    cast_training_params(denoiser, dtype=torch.float32)
    if args.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    denoiser.train()


def steady_state(args, fh, fair_update, optimizer, lora_params, objectives, weighting):
    """The step as it runs after the first: the optimizer holds its states; an interval run between solves."""
    if not args.real:  # the script keeps these on the CPU: real tensors, not fake ones
        from torch._subclasses.fake_tensor import unset_fake_temporarily
        with unset_fake_temporarily():
            if fair_update.coefficients is not None:  # the fixed coefficients of 'global' (region weights 1)
                fair_update.coefficients = fh.fixed_coefficients(weighting, (1.0,) * args.num_regions)
            fair_update._prediction_gram_sum = torch.zeros(len(objectives), len(objectives), dtype=torch.float64)
    for p in lora_params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if args.mode == "fair_interval":  # a step between exact solves: coefficients and calibration exist
        from torch._subclasses.fake_tensor import unset_fake_temporarily
        fair_update.step = 1
        with unset_fake_temporarily():
            fair_update.coefficients = torch.tensor([1.0] + [0.5] * args.num_regions, dtype=torch.float64)
            fair_update.gram_scale = torch.ones(len(objectives), dtype=torch.float64)
        assert not fair_update.exact_step and not fair_update.per_objective


def sample(family, caption, rows, images, latent_side, latent_channels, weight_dtype, amp, device):
    """One sampling step of the pipeline (``rows`` = images x 2 with classifier-free guidance) on the stored
    caption embeddings, through the family's own ``noisy_inputs`` / ``predict``, then the VAE decode of the
    images (no gradients, under the run's autocast)."""
    with torch.no_grad():
        latents = torch.randn(rows, latent_channels, latent_side, latent_side).to(weight_dtype)
        cond = {k: torch.cat([v] * rows) for k, v in caption.items()}
        noisy = family.noisy_inputs(family.memory_batch(rows, latents=latents), cond, device, weight_dtype)
        inputs = types.SimpleNamespace(model_input=noisy.model_input, timesteps=noisy.timesteps, conditioning=cond,
                                       extras=noisy.extras)
        with amp():
            prediction = family.predict(family.denoiser, inputs)
        del prediction, inputs, noisy, cond, latents
        decoded = family.decode_latents(torch.randn(images, latent_channels, latent_side, latent_side)
                                        .to(family.vae.dtype))
        del decoded


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------

def memory_estimate_lines(result) -> list[str]:
    """What ``--estimate_memory`` prints: what the training step holds, one line per phase
    (``phase NAME: N.NN GiB``), and last ``estimated peak: N.NN GiB (NAME)``."""
    resident = ", ".join(f"{k} {v / GiB:.2f}" for k, v in result["resident"].items() if v)
    lines = [f"resident through training: {result['start_total'] / GiB:.2f} GiB ({resident})"]
    lines += [f"phase {result['phase_names'][key]}: {value / GiB:.2f} GiB" for key, value in result["phases"].items()]
    lines.append("Tensors only: add the CUDA context (0.3-1 GiB) and 5-20% allocator overhead (docs/memory.md).")
    lines.append(f"estimated peak: {result['peak_total'] / GiB:.2f} GiB ({result['peak_name']})")
    return lines


def print_result(r):
    p = r["params"]
    print(f"\n== {r['model']} ({r['family']}) @ {r['resolution']}px, rank {r['rank']}, mode {r['mode']}, gradient "
          f"checkpointing {'on' if r['gc'] else 'off'}, {r['mixed_precision']}, {r['optimizer']}, VAE {r['vae_dtype']}")
    print(f"   params: denoiser {p['denoiser']/1e6:.1f} M frozen, LoRA {p['lora']/1e6:.2f} M trainable, "
          f"VAE {p['vae']/1e6:.1f} M, text encoders {p['text_encoders']/1e6:.1f} M")
    if "phases" in r:
        print("   training step phases (GiB):", ", ".join(f"{k} {v/GiB:.2f}" for k, v in r["step_phase_peak"].items()))
        for line in memory_estimate_lines(r):
            print("   " + line)
    if r["flops"]:
        print("   FLOPs (TFLOP):", ", ".join(f"{k} {v/1e12:.2f}" for k, v in r["flops"].items() if v))
        print(f"   denoiser training FLOPs (forward + backward): "
              f"{(r['flops'].get('forward', 0) + r['flops'].get('backward', 0))/1e12:.2f} TFLOP")
    print("   wall seconds:", ", ".join(f"{k} {v:.1f}" for k, v in r["timings"].items()))


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sdxl",
                    help=f"a named model ({', '.join(sorted(MODELS))}) or a diffusers folder with its config files")
    ap.add_argument("--rank", type=POSITIVE_INT, default=256)
    ap.add_argument("--mode", choices=["plain", "fair_exact", "fair_interval"], default="fair_exact")
    ap.add_argument("--num_regions", type=NON_NEGATIVE_INT, default=2,
                    help="region objectives beside the global one (2: hand, face; K = num_regions + 1 rows)")
    ap.add_argument("--resolution", type=flag_number(int, minimum=8, multiple_of=8), default=None, help="default: the model's native resolution")
    ap.add_argument("--batch_size", type=POSITIVE_INT, default=1)
    ap.add_argument("--max_sequence_length", type=POSITIVE_INT, default=None, help="T5 tokens (default: the family's)")
    gcg = ap.add_mutually_exclusive_group()
    gcg.add_argument("--gradient_checkpointing", dest="gradient_checkpointing", action="store_true", default=True)
    gcg.add_argument("--no_gradient_checkpointing", dest="gradient_checkpointing", action="store_false")
    ap.add_argument("--mixed_precision", choices=["fp16", "bf16", "no"], default="fp16")
    ap.add_argument("--fair_gradient_dtype", choices=["auto", "fp32", "bf16"], default="auto",
                    help="as train_fairhuman_lora.py (auto: bf16 under fp16/bf16 mixed precision)")
    ap.add_argument("--fair_batched_backward", action="store_true",
                    help="as train_fairhuman_lora.py: the per-objective gradients from one vmapped backward pass")
    ap.add_argument("--cache_latents", action="store_true",
                    help="latents cached before training (a latent-caching phase; no VAE in the step)")
    ap.add_argument("--cache_text_embeddings", action="store_true",
                    help="text embeddings cached before training (families that embed per batch keep no encoder)")
    ap.add_argument("--quantization", choices=["none", "nf4", "int8"], default="none",
                    help="--quantize_base: the denoiser's frozen Linear weights stored by bitsandbytes (analytic)")
    ap.add_argument("--quantize_text_encoders", choices=["none", "nf4", "int8"], default="none",
                    help="the family's large text encoders (T5) stored by bitsandbytes for the caption pass (analytic)")
    ap.add_argument("--validation", action="store_true", help="validation sampling mid-run (--validation_prompt)")
    ap.add_argument("--validation_resolution", type=flag_number(int, minimum=8, multiple_of=8), default=None, help="default: --resolution")
    ap.add_argument("--evaluation_images", type=NON_NEGATIVE_INT, default=0,
                    help="images per pipeline call of the evaluation (--evaluate_prompts_file); 0: none")
    ap.add_argument("--evaluation_resolution", type=flag_number(int, minimum=8, multiple_of=8), default=None, help="default: --resolution")
    ap.add_argument("--optimizer", choices=["adamw8bit", "adamw"], default="adamw8bit")
    ap.add_argument("--try_bnb", action="store_true", help="try bitsandbytes' own AdamW8bit under fake tensors "
                    "(default: a stub with its exact state tensors; its update kernel is in place)")
    ap.add_argument("--vae_dtype", choices=["auto", "fp32", "fp16", "bf16"], default="auto",
                    help="auto: the family's (SDXL: fp32 unless an fp16-fix VAE is given; others the weight dtype)")
    ap.add_argument("--fair_interval_weights", choices=["prediction", "reuse"], default="prediction")
    ap.add_argument("--lora_target_modules", default=None, help="default: the family's default targets")
    ap.add_argument("--no_flops", dest="flops", action="store_false", default=True)
    ap.add_argument("--kernel_workspace", choices=sorted(KERNEL_WORKSPACES), default="none",
                    help="the attention kernels' internal scratch to count: none (a GPU estimate) or cpu (PyTorch's "
                    "CPU flash kernels at this process's thread count: to compare with real CPU allocations)")
    ap.add_argument("--real", action="store_true", help="real CPU tensors instead of fake ones (small models only)")
    ap.add_argument("--json", default=None, help="append the result as one JSON line to this file")
    ap.add_argument("--quiet", action="store_true")
    return ap


def _args(settings):
    args = build_parser().parse_args([])
    for key, value in settings.items():
        if not hasattr(args, key):
            raise TypeError(f"estimate() got an unknown setting {key!r}")
        setattr(args, key, value)
    return args


def _default_targets(args):
    if args.lora_target_modules is None:
        with model_folder(args.model) as folder:
            args.lora_target_modules = family_for_settings(args, folder).default_lora_targets


def estimate(**settings) -> dict:
    """One configuration's estimate (the flags of :func:`build_parser` as keyword arguments; memory only
    unless ``flops=True``). Returns the result dict: ``phases`` (bytes by phase key), ``peak_total``,
    ``peak_phase``, ``step_peak``, ``start_total``, ``step_phase_peak``, ``resident``..."""
    settings.setdefault("flops", False)
    args = _args(settings)
    _default_targets(args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        DATA_DEPENDENT.clear()
        return simulate(args)


def measure_real(**settings) -> dict:
    """The training step with REAL CPU tensors (small models only), its allocations read from the CPU allocator's
    own events (``torch.profiler``, ``profile_memory=True``): ``peak_delta`` is the peak of bytes allocated
    above what was live at the step's start; compare with ``estimate()['step_peak'] - ['start_total']``."""
    settings.setdefault("flops", False)
    args = _args(settings)
    args.real = True
    _default_targets(args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        return simulate_once(args, measure="profile")["profile"]


# ---------------------------------------------------------------------------------------------
# The training run's estimate: --estimate_memory and the start-up check on CUDA
# ---------------------------------------------------------------------------------------------

MODEL_CONFIG_FILES = ("model_index.json", "scheduler/scheduler_config.json", "vae/config.json",
                      "text_encoder/config.json", "text_encoder_2/config.json", "text_encoder_3/config.json")
"""The config files the estimate reads beside the denoiser's (those a model lacks, e.g. SD 1.x's text_encoder_2,
are skipped)."""


def model_config_folder(args, family) -> str:
    """A folder holding the model's config files: ``--pretrained_model_name_or_path`` itself when it is a folder,
    else the Hub snapshot of its config files alone (``hf_hub_download`` of each; no weights): the family's
    denoiser config (``unet/`` or ``transformer/``), which must be there, and :data:`MODEL_CONFIG_FILES`."""
    import model_families as mf

    if os.path.isdir(args.pretrained_model_name_or_path):
        return args.pretrained_model_name_or_path
    from huggingface_hub import hf_hub_download

    required = f"{family.denoiser_name}/config.json"
    folder = None
    for name in (required, *MODEL_CONFIG_FILES):
        try:
            path = hf_hub_download(args.pretrained_model_name_or_path, name, revision=args.revision,
                                   cache_dir=args.cache_dir)
        except Exception as error:  # noqa: BLE001 - a missing text_encoder_2 (SD 1.x) is normal
            if name == required:
                raise mf.UsageError(f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path}: cannot "
                                    f"read {required} ({error})") from None
            continue
        folder = folder or os.path.dirname(os.path.dirname(path))
    return folder


def estimate_settings(args, mixed_precision: str, family) -> dict:
    """The settings of :func:`estimate` for this run's flags (the worst step: hands and faces present, an exact
    fair solve; validation sampling when --validation_prompt is given, evaluation with --evaluate_prompts_file)."""
    import evaluate_fairhuman
    import train_fairhuman_lora as train

    evaluation_batch = evaluate_fairhuman.parse_args(
        ["--pretrained_model_name_or_path", "-", "--prompts_file", "-", "--output_dir", "-"]).batch_size
    return dict(
        model=model_config_folder(args, family), rank=args.rank, resolution=args.resolution,
        mode="plain" if args.weighting != "fair" else "fair_exact", num_regions=len(train.run_objectives(args)) - 1,
        batch_size=args.train_batch_size, max_sequence_length=args.max_sequence_length,
        gradient_checkpointing=bool(args.gradient_checkpointing), mixed_precision=mixed_precision,
        optimizer="adamw8bit" if args.use_8bit_adam else "adamw", lora_target_modules=args.lora_target_modules,
        fair_gradient_dtype=args.fair_gradient_dtype, fair_batched_backward=bool(args.fair_batched_backward),
        vae_dtype="auto" if args.pretrained_vae_model_name_or_path is None else
        {"fp16": "fp16", "bf16": "bf16"}.get(mixed_precision, "fp32"),
        cache_latents=args.cache_latents, cache_text_embeddings=args.cache_text_embeddings,
        quantization=args.quantize_base, quantize_text_encoders=args.quantize_text_encoders,
        validation=bool(args.validation_prompt) and args.num_validation_images > 0,
        validation_resolution=args.resolution,  # run_validation samples at --resolution
        evaluation_images=(min(evaluation_batch, max(1, args.num_validation_images))
                           if args.evaluate_prompts_file is not None else 0),
        evaluation_resolution=args.resolution)


def print_memory_estimate(args, mixed_precision: str, family) -> dict:
    """``--estimate_memory``: estimate this run, phase by phase, from config files alone and print it (``family``:
    the run's, from the training script's ``check_model``, which also set the default LoRA targets)."""
    settings = estimate_settings(args, mixed_precision, family)
    print(f"estimating the run on fake tensors ({settings['mode']}, rank {args.rank}, {mixed_precision}, "
          f"batch {args.train_batch_size}) from {settings['model']} ...", flush=True)
    result = estimate(**settings)
    for line in memory_estimate_lines(result):
        print(line)
    return result


def warn_if_over_memory(args, accelerator, logger, family) -> None:
    """On CUDA: estimate the run (config files only, before any weight loads) and say up front when its peak
    exceeds the device's free memory, naming the phase that peaks and the flags that lower it (the family's
    :meth:`~model_families.ModelFamily.memory_advice`). The run still starts: it is an estimate."""
    try:
        result = print_memory_estimate(args, accelerator.mixed_precision, family)
        advice = family.memory_advice(args, result["peak_phase"])
    except Exception as error:  # noqa: BLE001 - an estimate that fails must never stop a run
        logger.warning(f"memory estimate unavailable ({error!r})")
        return
    estimated = result["peak_total"] / GiB
    free = torch.cuda.mem_get_info(accelerator.device)[0] / GiB
    if estimated > free:
        logger.warning(f"estimated peak {estimated:.2f} GiB ({result['peak_name']}) exceeds the {free:.2f} GiB free "
                       f"on {accelerator.device}; expect an out-of-memory error or a slow, swapping run. Flags that "
                       f"lower that phase: {', '.join(advice) or 'none'}. Starting anyway.")


def main(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    _default_targets(args)
    DATA_DEPENDENT.clear()
    result = simulate(args)
    if not args.quiet:
        print_result(result)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result, default=str) + "\n")
    return result


if __name__ == "__main__":
    main()
