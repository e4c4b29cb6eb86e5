#!/usr/bin/env python
"""Estimate the peak GPU memory and the FLOPs of ONE training step of train_fairhuman_lora.py, on a CPU,
without weights and without a GPU (the project's estimator core: used by ``train_fairhuman_lora.py
--estimate_memory`` and ``benchmarks/benchmark_memory.py``; its method and validation are described in
docs/memory.md).

How: every model (UNet, VAE, text encoders) is built from its public config under torch's FakeTensorMode
(tensors have shapes, dtypes and storages sizes, but no data), and one training step is replayed in the
order the training script runs it (prepare_inputs -> UNet forward -> losses -> FairUpdate.backward ->
FairUpdate.write_update -> unscale + clip -> optimizer.step -> zero_grad), under
torch.distributed._tools.mem_tracker.MemTracker (live bytes by category, peak) and
torch.utils.flop_counter.FlopCounterMode (FLOPs). The project's FairUpdate is imported from fairhuman_utils and
used as the script uses it, so its backward passes, retain_graph and buffers are the real ones.

GPU specifics that a CPU run does not have are emulated:
* fp16 mixed precision: torch.autocast('cpu', float16) casts linear/conv/matmul/SDPA inputs to fp16 like
  CUDA autocast; a TorchFunctionMode adds CUDA autocast's fp32 policy for group_norm, layer_norm,
  softmax, log_softmax (CPU autocast leaves these in the input dtype). Autocast's weight-cast cache
  (fp16 copies of the fp32 LoRA weights during the forward) is real autocast behaviour on both devices.
* attention: F.scaled_dot_product_attention on fake CPU tensors dispatches to the fused (flash) CPU
  kernel, which keeps the same tensors for backward as CUDA flash / memory-efficient attention
  (q, k, v, out, logsumexp): no N x N matrix. Its FLOPs are registered with the flash formula.
* allocations are rounded up to 512 bytes as the CUDA caching allocator does.
Not modelled: CUDA context, cuBLAS/cuDNN workspaces, allocator fragmentation/segment rounding, the
kernels' internal scratch space (flash backward's fp32 dq accumulator, ...). See the report.

Usage (one configuration):
    python memory_estimate.py --model sdxl --rank 256 --mode fair_exact [--cache_latents --cache_text_embeddings]
    python memory_estimate.py --model flux-dev --rank 16 --mixed_precision bf16 --quantization nf4 --cache_latents \
        --cache_text_embeddings
    python memory_estimate.py --model path/to/diffusers/folder   # config files only
Several: benchmarks/benchmark_memory.py (the table of docs/memory.md). Validation against real CPU
allocations: tests/test_memory_estimate.py (:func:`measure_real`).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import inspect
import json
import math
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F

GiB = 1024**3

# ---------------------------------------------------------------------------------------------
# Public configs (diffusers / transformers config.json values of the released checkpoints)
# ---------------------------------------------------------------------------------------------

SDXL_UNET = dict(
    act_fn="silu", addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], center_input_sample=False,
    class_embed_type=None, class_embeddings_concat=False, conv_in_kernel=3, conv_out_kernel=3,
    cross_attention_dim=2048, cross_attention_norm=None,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], downsample_padding=1,
    dual_cross_attention=False, encoder_hid_dim=None, encoder_hid_dim_type=None, flip_sin_to_cos=True, freq_shift=0,
    in_channels=4, layers_per_block=2, mid_block_only_cross_attention=None, mid_block_scale_factor=1,
    mid_block_type="UNetMidBlock2DCrossAttn", norm_eps=1e-05, norm_num_groups=32, num_attention_heads=None,
    num_class_embeds=None, only_cross_attention=False, out_channels=4, projection_class_embeddings_input_dim=2816,
    resnet_out_scale_factor=1.0, resnet_skip_time_act=False, resnet_time_scale_shift="default", sample_size=128,
    time_cond_proj_dim=None, time_embedding_act_fn=None, time_embedding_dim=None, time_embedding_type="positional",
    timestep_post_act=None, transformer_layers_per_block=[1, 2, 10],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], upcast_attention=None,
    use_linear_projection=True,
)
SD15_UNET = dict(
    act_fn="silu", attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280], center_input_sample=False,
    cross_attention_dim=768,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
    mid_block_scale_factor=1, norm_eps=1e-05, norm_num_groups=32, out_channels=4, sample_size=64,
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
)
VAE = dict(  # SD 1.x and SDXL VAEs share the architecture (83.65 M parameters)
    act_fn="silu", block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
    in_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, out_channels=3,
    up_block_types=["UpDecoderBlock2D"] * 4,
)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)

# a small SD-1.x-shaped model for checking the method against real CPU tensors (--validate)
SMALL_UNET = dict(SD15_UNET, block_out_channels=[64, 128, 256, 256], cross_attention_dim=256)
SMALL_VAE = dict(VAE, block_out_channels=[32, 64, 128, 128])
SMALL_CLIP = dict(CLIP_L, hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                  projection_dim=256)

# FLUX.1-dev and SD3.5-large: the transformer / VAE / text-encoder config.json values of the released checkpoints
FLUX_DEV_TRANSFORMER = dict(attention_head_dim=128, guidance_embeds=True, in_channels=64, joint_attention_dim=4096,
                            num_attention_heads=24, num_layers=19, num_single_layers=38, patch_size=1,
                            pooled_projection_dim=768, axes_dims_rope=[16, 56, 56])
FLOW_VAE = dict(VAE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)  # FLUX.1 (SD3.5: with)
SD35_LARGE_TRANSFORMER = dict(attention_head_dim=64, caption_projection_dim=2432, in_channels=16, joint_attention_dim=4096,
                              num_attention_heads=38, num_layers=38, out_channels=16, patch_size=2,
                              pooled_projection_dim=2048, pos_embed_max_size=192, qk_norm="rms_norm", sample_size=128)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, is_encoder_decoder=False)

MODELS = {
    "flux-dev": dict(family="flux", transformer=FLUX_DEV_TRANSFORMER, vae=FLOW_VAE,
                     text_encoders=[("clip", CLIP_L), ("t5", T5_XXL)], text_lengths=[77, 512], resolution=1024,
                     scaling_factor=0.3611, sdxl=False),
    "sd35-large": dict(family="sd3", transformer=SD35_LARGE_TRANSFORMER,
                       vae=dict(FLOW_VAE, use_quant_conv=True, use_post_quant_conv=True),
                       text_encoders=[("clip_proj", CLIP_L), ("clip_proj", CLIP_BIGG), ("t5", T5_XXL)],
                       text_lengths=[77, 77, 256], resolution=1024, scaling_factor=1.5305, sdxl=False),
    "sdxl": dict(unet=SDXL_UNET, text_encoders=[("clip", CLIP_L), ("clip_proj", CLIP_BIGG)], resolution=1024,
                 scaling_factor=0.13025, sdxl=True),
    "sd15": dict(unet=SD15_UNET, text_encoders=[("clip", CLIP_L)], resolution=512, scaling_factor=0.18215, sdxl=False),
    "small": dict(unet=SMALL_UNET, vae=SMALL_VAE, text_encoders=[("clip", SMALL_CLIP)], resolution=512,
                  scaling_factor=0.18215, sdxl=False),
}



def _read_config(path):
    with open(path) as f:
        return {k: v for k, v in json.load(f).items() if not k.startswith("_")}


def model_spec(model: str) -> dict:
    """The built-in spec ``model`` (``sdxl``, ``sd15``, ``small``) or one read from a diffusers model folder's
    config files (``unet/config.json``, ``vae/config.json``, ``text_encoder[_2]/config.json``; no weights
    needed). SDXL-ness is read from the UNet config (``addition_embed_type == "text_time"``)."""
    if model in MODELS:
        return MODELS[model]
    if os.path.isfile(os.path.join(model, "transformer", "config.json")):
        return flow_model_spec(model)
    unet_path = os.path.join(model, "unet", "config.json")
    if not os.path.isfile(unet_path):
        raise FileNotFoundError(f"{model}: neither a built-in model ({', '.join(sorted(MODELS))}) nor a folder "
                                f"with unet/config.json or transformer/config.json")
    unet = _read_config(unet_path)
    vae_path = os.path.join(model, "vae", "config.json")
    vae = _read_config(vae_path) if os.path.isfile(vae_path) else dict(VAE)
    text_encoders = []
    for sub, kind in (("text_encoder", "clip"), ("text_encoder_2", "clip_proj")):
        path = os.path.join(model, sub, "config.json")
        if os.path.isfile(path):
            cfg = _read_config(path)
            cfg = {k: cfg[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                       "num_attention_heads", "max_position_embeddings", "hidden_act",
                                       "projection_dim") if k in cfg}
            text_encoders.append((kind, cfg))
    sdxl = unet.get("addition_embed_type") == "text_time"
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    return dict(unet=unet, vae=vae, text_encoders=text_encoders, resolution=unet.get("sample_size", 64) * factor,
                scaling_factor=vae.get("scaling_factor", 0.13025 if sdxl else 0.18215), sdxl=sdxl)


def flow_model_spec(model: str) -> dict:
    """A FLUX.1 or SD3 diffusers folder's spec from its config files: ``transformer/`` (``_class_name`` tells the
    family), ``vae/``, ``text_encoder*/`` (CLIP; the last one T5). Prompt lengths: FLUX.1 512 T5 tokens,
    SD3 77 CLIP + 256 T5 (the diffusers training scripts' defaults)."""
    with open(os.path.join(model, "transformer", "config.json")) as f:
        class_name = json.load(f).get("_class_name", "")
    family = "flux" if "Flux" in class_name else "sd3" if "SD3" in class_name else None
    if family is None:
        raise ValueError(f"{model}/transformer: unknown transformer {class_name!r} (FLUX.1 or SD3 expected)")
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    cls = FluxTransformer2DModel if family == "flux" else SD3Transformer2DModel
    transformer = {k: v for k, v in _read_config(os.path.join(model, "transformer", "config.json")).items()
                   if k in inspect.signature(cls.__init__).parameters}
    vae = _read_config(os.path.join(model, "vae", "config.json"))
    text_encoders = []
    for sub in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        path = os.path.join(model, sub, "config.json")
        if not os.path.isfile(path):
            continue
        cfg = _read_config(path)
        if cfg.get("model_type") == "t5" or "d_model" in cfg:
            keep = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "feed_forward_proj",
                    "relative_attention_num_buckets", "relative_attention_max_distance")
            text_encoders.append(("t5", {**{k: cfg[k] for k in keep if k in cfg}, "is_encoder_decoder": False}))
        else:
            keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "max_position_embeddings", "hidden_act", "projection_dim")
            kind = "clip_proj" if family == "sd3" else "clip"
            text_encoders.append((kind, {k: cfg[k] for k in keep if k in cfg}))
    lengths = [77] * (len(text_encoders) - 1) + [512 if family == "flux" else 256]
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    native = transformer.get("sample_size", 128) * factor if family == "sd3" else 1024
    return dict(family=family, transformer=transformer, vae=vae, text_encoders=text_encoders, text_lengths=lengths,
                resolution=native, scaling_factor=vae.get("scaling_factor", 1.0), sdxl=False)


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

def make_tracker(round_like_cuda: bool = True):
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


def build_models(args, spec, weight_dtype):
    with fake_safe_module_to():
        return _build_models(args, spec, weight_dtype)


def _build_models(args, spec, weight_dtype):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    if spec.get("family") == "flux":
        from diffusers import FluxTransformer2DModel
        unet = FluxTransformer2DModel(**spec["transformer"])
    elif spec.get("family") == "sd3":
        from diffusers import SD3Transformer2DModel
        unet = SD3Transformer2DModel(**spec["transformer"])
    else:
        unet_cfg = dict(spec["unet"])
        if args.unet_config:
            with open(args.unet_config) as f:
                unet_cfg = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
        unet = UNet2DConditionModel(**unet_cfg)
    unet.requires_grad_(False)
    to_dtype(unet, weight_dtype)
    targets = [t.strip() for t in args.lora_target_modules.split(",") if t.strip()]
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian", target_modules=targets))
    cast_training_params(unet, dtype=torch.float32)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()

    vae_cfg = dict(spec.get("vae", VAE))
    if args.vae_config:
        with open(args.vae_config) as f:
            vae_cfg = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    if args.cache_latents:  # --cache_latents: the VAE has left the accelerator once the cache is built
        return unet, None, [] if args.no_text_encoders else _text_encoders(args, spec, weight_dtype)
    vae = AutoencoderKL(**vae_cfg)
    vae.requires_grad_(False)
    # the script: the SDXL VAE stays fp32 unless --pretrained_vae_model_name_or_path (fp16-fix) is given
    vae_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.vae_dtype] if args.vae_dtype != "auto" else (
        torch.float32 if spec["sdxl"] else weight_dtype)
    to_dtype(vae, vae_dtype)

    return unet, vae, [] if args.no_text_encoders else _text_encoders(args, spec, weight_dtype)


def _text_encoders(args, spec, weight_dtype):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    text_encoders = []
    for kind, cfg in spec["text_encoders"]:
        if kind == "t5":
            from transformers import T5Config, T5EncoderModel
            te = T5EncoderModel(T5Config(**cfg))
        else:
            te = (CLIPTextModelWithProjection if kind == "clip_proj" else CLIPTextModel)(CLIPTextConfig(**cfg))
        te.requires_grad_(False)
        to_dtype(te, weight_dtype)
        text_encoders.append(te)
    return text_encoders


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
    """FakeTensorMode whose data-dependent scalars (Tensor.item / float / bool) read as 1 / True, logged.

    The training step asks a few: FairUpdate's finiteness checks of the 3 x 3 Gram matrix. They steer no
    allocation of any size that matters; every one is counted in DATA_DEPENDENT."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    class ScalarFakeTensorMode(FakeTensorMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                t = args[0]
                DATA_DEPENDENT.append(f"{tuple(t.shape)} {t.dtype}")
                return True if t.dtype == torch.bool else (1.0 if t.is_floating_point() else 1)
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


def sd_text_inputs(spec, text_encoders, input_ids, bsz, weight_dtype):
    """SD 1.x / SDXL conditioning as the script encodes it (SDXL: penultimate hidden states of both encoders,
    the pooled output of the second); with cached embeddings (no encoders) tensors of the same sizes."""
    embeds, pooled = [], None
    for te, ids in zip(text_encoders, input_ids):
        if not spec["sdxl"]:
            embeds.append(te(ids)[0])
            break
        out = te(ids, output_hidden_states=True)
        pooled = out[0]
        embeds.append(out.hidden_states[-2])
        del out
    if not text_encoders:
        embeds = [torch.randn(bsz, 77, spec["unet"]["cross_attention_dim"], dtype=weight_dtype)]
        pooled = torch.randn(bsz, 1280, dtype=weight_dtype) if spec["sdxl"] else None
    prompt_embeds = torch.cat(embeds, dim=-1) if len(embeds) > 1 else embeds[0]
    added = None
    if spec["sdxl"]:
        added = {"text_embeds": pooled, "time_ids": torch.zeros(bsz, 6, dtype=prompt_embeds.dtype)}
    return dict(encoder_hidden_states=prompt_embeds, added_cond_kwargs=added)


def flow_text_inputs(spec, text_encoders, input_ids, bsz, weight_dtype):
    """FLUX.1: T5 hidden states + the CLIP-L pooled output; SD3: CLIP-L/G penultimate states (padded to the T5
    width) joined with T5's along the sequence, both pooled outputs. Cached: tensors of the same sizes."""
    cfg = spec["transformer"]
    lengths = spec["text_lengths"]
    if text_encoders:
        outs = [te(ids, output_hidden_states=True) for te, ids in zip(text_encoders, input_ids)]
        t5 = outs[-1].last_hidden_state
        clip = [o for o in outs[:-1]]
        pooled = torch.cat([o.text_embeds if "text_embeds" in o else o.pooler_output for o in clip], dim=-1)
        if spec["family"] == "sd3":
            states = torch.cat([o.hidden_states[-2] for o in clip], dim=-1)
            states = torch.nn.functional.pad(states, (0, t5.shape[-1] - states.shape[-1]))
            t5 = torch.cat([states, t5], dim=-2)
        del outs, clip
    else:
        tokens = lengths[-1] + (lengths[0] if spec["family"] == "sd3" else 0)
        t5 = torch.randn(bsz, tokens, cfg["joint_attention_dim"], dtype=weight_dtype)
        pooled = torch.randn(bsz, cfg["pooled_projection_dim"], dtype=weight_dtype)
    cond = dict(encoder_hidden_states=t5, pooled_projections=pooled)
    if spec["family"] == "flux":
        cond["txt_ids"] = torch.zeros(t5.shape[1], 3, dtype=weight_dtype)
    return cond


def denoise(model, spec, noisy_latents, cond, bsz):
    """One forward of the denoiser in the layout the family needs; the prediction in the latents' layout."""
    timesteps = torch.full((bsz,), 500.0)
    if spec.get("family") == "flux":
        from diffusers import FluxPipeline

        b, c, h, w = noisy_latents.shape
        packed = FluxPipeline._pack_latents(noisy_latents, b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, packed.device, packed.dtype)
        guidance = torch.full((b,), 3.5) if spec["transformer"].get("guidance_embeds") else None
        pred = model(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance, img_ids=img_ids,
                     return_dict=False, **cond)[0]
        return pred.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
    if spec.get("family") == "sd3":
        return model(hidden_states=noisy_latents, timestep=timesteps, return_dict=False, **cond)[0]
    return model(noisy_latents, timesteps.long(), **cond).sample


def vae_encode(vae, pixels, spec, weight_dtype):
    """The script's latents: a sample of the VAE's posterior, scaled, in the weight dtype."""
    latent_dist = vae.encode(pixels).latent_dist
    eps = torch.randn(latent_dist.mean.shape)
    latents = latent_dist.mean + latent_dist.std * eps.to(latent_dist.mean)
    return (latents * spec["scaling_factor"]).to(weight_dtype)


def simulate(args):
    """Memory pass (MemTracker) and, separately, FLOP pass (FlopCounterMode): FlopCounterMode's module
    tracker keeps tensors alive through backward, so it must not run under the memory tracker."""
    result = simulate_once(args, measure="memory")
    if args.flops:
        result["flops"] = simulate_once(args, measure="flops")["flops"]
    return result


def simulate_once(args, measure):
    import fairhuman_utils as fh

    with fair_solver_on_fake_grams(fh):
        return _simulate_once(args, measure, fh)


def _simulate_once(args, measure, fh):
    from torch.utils.flop_counter import FlopCounterMode

    spec = model_spec(args.model)
    resolution = args.resolution or spec["resolution"]
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    register_cpu_sdpa_flops()
    fp32_policy = CudaAutocastFp32Policy()
    timings = {}

    fake = contextlib.nullcontext() if args.real else make_fake_mode()
    t0 = time.time()
    with fake:
        unet, vae, text_encoders = build_models(args, spec, weight_dtype)
        lora_params = [p for p in unet.parameters() if p.requires_grad]
        n_lora = sum(p.numel() for p in lora_params)
        n_unet = sum(p.numel() for p in unet.parameters()) - n_lora
        n_vae = sum(p.numel() for p in vae.parameters()) if vae is not None else 0
        n_te = sum(p.numel() for te in text_encoders for p in te.parameters())
        timings["build_s"] = time.time() - t0

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
        if not args.real:  # the script keeps these on the CPU: real tensors, not fake ones
            from torch._subclasses.fake_tensor import unset_fake_temporarily
            with unset_fake_temporarily():
                if fair_update.coefficients is not None:  # the fixed coefficients of 'global' (region weights 1)
                    fair_update.coefficients = fh.fixed_coefficients(weighting, (1.0,) * args.num_regions)
                fair_update._prediction_gram_sum = torch.zeros(len(objectives), len(objectives), dtype=torch.float64)

        # steady state: the optimizer already holds its states (created on the first step)
        for p in lora_params:
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.mode == "fair_interval":  # a step between exact solves: coefficients and calibration exist
            fair_update.step = 1
            with unset_fake_temporarily():
                fair_update.coefficients = torch.tensor([1.0] + [0.5] * args.num_regions, dtype=torch.float64)
                fair_update.gram_scale = torch.ones(len(objectives), dtype=torch.float64)
            assert not fair_update.exact_step and not fair_update.per_objective

        # the batch (CPU side: pixel values, masks; the script moves pixels to the device in the VAE dtype)
        bsz = args.batch_size
        h = w = resolution
        vae_cfg = spec.get("vae", VAE)
        factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
        latent_hw = (h // factor, w // factor)
        if vae is not None:
            pixels = torch.randn(bsz, 3, h, w).to(vae.dtype)
        else:  # --cache_latents: the cached latent of the batch, in the weight dtype
            pixels = torch.randn(bsz, vae_cfg.get("latent_channels", 4), *latent_hw).to(weight_dtype)
        region_masks = [torch.zeros(bsz, 1, *latent_hw) for _ in range(args.num_regions)]
        lengths = spec.get("text_lengths", [77] * len(spec["text_encoders"]))
        input_ids = [torch.zeros(bsz, n, dtype=torch.long) for n, _ in zip(lengths, text_encoders)]
        persistent_other = [pixels, *region_masks, *input_ids]

        tracker = None if (args.real or measure != "memory") else make_tracker()
        count_flops = measure == "flops"
        flops: dict[str, int] = {}

        profiling = measure == "profile"
        prof = (torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
                if profiling else None)

        @contextlib.contextmanager
        def phase(name):
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
            tracker.track_external(*[m for m in (unet, vae) if m is not None], *text_encoders, optimizer,
                                   *persistent_other)
        gc.collect()
        with (tracker if tracker is not None else prof if profiling else contextlib.nullcontext()), fp32_policy:
            start_total = tracker.current_total() if tracker is not None else 0
            # ---- prepare_inputs (torch.no_grad) ----
            with torch.no_grad():
                with phase("vae_encode"):
                    latents = pixels if vae is None else vae_encode(vae, pixels, spec, weight_dtype)
                with phase("text_encode"):
                    text_inputs = flow_text_inputs if spec.get("family") in ("flux", "sd3") else sd_text_inputs
                    cond = text_inputs(spec, text_encoders, input_ids, bsz, weight_dtype)
                    noise = torch.randn(latents.shape).to(latents)
                    noisy_latents = latents * 0.5 + noise * 0.5  # add_noise / (1 - sigma) x + sigma n: same sizes
                    target = noise - latents if spec.get("family") else noise
                    present = [True] * len(objectives)  # worst case: every region in the batch
            # ---- forward (accelerate: autocast + outputs converted to fp32) ----
            with phase("unet_forward"):
                amp = (torch.autocast("cpu", dtype=weight_dtype) if args.mixed_precision in ("fp16", "bf16")
                       else contextlib.nullcontext())
                with amp:
                    model_pred = denoise(unet, spec, noisy_latents, cond, bsz)
                model_pred = model_pred.float()
                def loss_fn(pred, target=target, masks=tuple(region_masks)):
                    return fh.fairhuman_losses(pred, target, *masks, local_loss_scale=5.0, normalization="latent")

                losses = loss_fn(model_pred)
            # ---- FairUpdate.backward: per-objective passes (exact) or one pass of sum_i c_i L_i ----
            with phase("backward"), numbered_backward_phases(tracker):
                fair_update.backward(accelerator, losses, present, loss_fn=loss_fn, model_pred=model_pred)
            del model_pred, losses, loss_fn
            # ---- write_update, unscale + clip, optimizer step, zero_grad ----
            with phase("write_update"):
                fair_update.write_update(accelerator)
            with phase("clip"):
                accelerator.unscale_and_clip(lora_params, 1.0)
            with phase("optimizer_step"):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if tracker is not None:
                tracker.set_phase("end")

    if profiling:
        return dict(profile=profile_peaks(prof), timings=timings)
    # ---- resident bytes by what they are (analytic, from the tensors themselves) ----
    def nbytes(tensors):
        return sum(math.ceil(t.numel() * t.element_size() / 512) * 512 for t in tensors)

    opt_states = [v for st in optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    resident = {
        "UNet frozen weights": nbytes([p for p in unet.parameters() if not p.requires_grad]) + nbytes(list(unet.buffers())),
        "text encoders": nbytes([p for te in text_encoders for p in te.parameters()]) + nbytes([b for te in text_encoders for b in te.buffers()]),
        "VAE": nbytes(list(vae.parameters())) if vae is not None else 0,
        "LoRA params (fp32)": nbytes(lora_params),
        "optimizer states": nbytes(opt_states),
    }
    result = dict(
        model=args.model, resolution=resolution, rank=args.rank, mode=args.mode, gc=args.gradient_checkpointing,
        optimizer=opt_name, mixed_precision=args.mixed_precision,
        vae_dtype="cached" if vae is None else str(vae.dtype).replace("torch.", ""),
        cache_latents=bool(args.cache_latents), cache_text_embeddings=bool(args.no_text_encoders),
        fair_batched_backward=bool(args.fair_batched_backward),
        quantization=args.quantization,
        params=dict(unet=n_unet, lora=n_lora, vae=n_vae, text_encoders=n_te),
        resident=resident, timings=timings, flops=flops,
    )
    if tracker is not None:
        result["quantization_options"] = {q: quantization_saving(unet, q) for q in QUANTIZED_BYTES}
        saved, dequantized = quantization_saving(unet, args.quantization)
        result["quantization_saved"] = saved
        if saved:
            resident["UNet frozen weights"] -= saved
            tracker.phase_peak = {k: v - saved + (dequantized if k not in ("vae_encode", "text_encode") else 0)
                                  for k, v in tracker.phase_peak.items()}
            start_total -= saved
        result["start_total"] = start_total
        result["peak_total"] = max(tracker.phase_peak.values())
        result["phase_peak"] = {k: tracker.phase_peak[k] for k in tracker.order}
        result["phase_snap"] = {k: tracker.phase_snap[k] for k in tracker.order}
        peak_phase = max(tracker.order, key=lambda k: tracker.phase_peak[k])
        result["peak_phase"] = peak_phase
        result["peak_snap"] = tracker.phase_snap[peak_phase]
        result["data_dependent_scalars"] = list(DATA_DEPENDENT)
    return result


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------

def gib(x):
    return f"{x / GiB:6.2f}"


def print_result(r):
    p = r["params"]
    print(f"\n== {r['model']} @ {r['resolution']}px, rank {r['rank']}, mode {r['mode']}, "
          f"gradient checkpointing {'on' if r['gc'] else 'off'}, {r['mixed_precision']}, {r['optimizer']}, VAE {r['vae_dtype']}")
    print(f"   params: UNet {p['unet']/1e6:.1f} M frozen, LoRA {p['lora']/1e6:.2f} M trainable, VAE {p['vae']/1e6:.1f} M, "
          f"text encoders {p['text_encoders']/1e6:.1f} M")
    print("   resident (GiB):", ", ".join(f"{k} {v/GiB:.2f}" for k, v in r["resident"].items() if v))
    if "peak_total" in r:
        print(f"   PEAK tracked tensor memory: {r['peak_total']/GiB:.2f} GiB in phase '{r['peak_phase']}' "
              f"(resident at step start {r['start_total']/GiB:.2f} GiB)")
        print("   phase peaks (GiB):", ", ".join(f"{k} {v/GiB:.2f}" for k, v in r["phase_peak"].items()))
        snap = r["peak_snap"]
        print("   at the peak, by MemTracker category (GiB):",
              ", ".join(f"{k} {v/GiB:.2f}" for k, v in snap.items() if k != "Total" and v))
    if r["flops"]:
        print("   FLOPs (TFLOP):", ", ".join(f"{k} {v/1e12:.2f}" for k, v in r["flops"].items() if v))
        print(f"   UNet training FLOPs (forward + backward): {(r['flops'].get('unet_forward',0)+r['flops'].get('backward',0))/1e12:.2f} TFLOP")
    print("   wall seconds:", ", ".join(f"{k} {v:.1f}" for k, v in r["timings"].items()))


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sdxl",
                    help=f"built-in configs ({', '.join(sorted(MODELS))}) or a diffusers model folder with config files")
    ap.add_argument("--rank", type=int, default=256)
    ap.add_argument("--mode", choices=["plain", "fair_exact", "fair_interval"], default="fair_exact")
    ap.add_argument("--num_regions", type=int, default=2,
                    help="region objectives beside the global one (2: hand, face; K = num_regions + 1 rows)")
    ap.add_argument("--resolution", type=int, default=None, help="default: 1024 (sdxl), 512 (sd15)")
    ap.add_argument("--batch_size", type=int, default=1)
    gcg = ap.add_mutually_exclusive_group()
    gcg.add_argument("--gradient_checkpointing", dest="gradient_checkpointing", action="store_true", default=True)
    gcg.add_argument("--no_gradient_checkpointing", dest="gradient_checkpointing", action="store_false")
    ap.add_argument("--mixed_precision", choices=["fp16", "bf16", "no"], default="fp16")
    ap.add_argument("--fair_gradient_dtype", choices=["auto", "fp32", "bf16"], default="auto",
                    help="as train_fairhuman_lora.py (auto: bf16 under fp16/bf16 mixed precision)")
    ap.add_argument("--fair_batched_backward", action="store_true",
                    help="as train_fairhuman_lora.py: the per-objective gradients from one vmapped backward pass")
    ap.add_argument("--cache_latents", action="store_true", help="latents cached: no VAE on the accelerator")
    ap.add_argument("--cache_text_embeddings", dest="no_text_encoders", action="store_true",
                    help="text embeddings cached: no text encoders on the accelerator")
    ap.add_argument("--quantization", choices=["none", "nf4", "int8"], default="none",
                    help="frozen Linear weights of the denoiser stored by bitsandbytes (modelled analytically)")
    ap.add_argument("--optimizer", choices=["adamw8bit", "adamw"], default="adamw8bit")
    ap.add_argument("--try_bnb", action="store_true", help="try bitsandbytes' own AdamW8bit under fake tensors "
                    "(default: a stub with its exact state tensors; its update kernel is in place)")
    ap.add_argument("--vae_dtype", choices=["auto", "fp32", "fp16", "bf16"], default="auto",
                    help="auto: as the script (SDXL VAE fp32 unless an fp16-fix VAE is given; SD1.5 in fp16)")
    ap.add_argument("--fair_interval_weights", choices=["prediction", "reuse"], default="prediction")
    ap.add_argument("--lora_target_modules", default="to_q,to_k,to_v,to_out.0")
    ap.add_argument("--unet_config", default=None, help="a UNet config.json instead of the built-in one")
    ap.add_argument("--vae_config", default=None)
    ap.add_argument("--no_flops", dest="flops", action="store_false", default=True)
    ap.add_argument("--real", action="store_true", help="real CPU tensors instead of fake ones (small models only)")
    ap.add_argument("--json", default=None, help="append the result as one JSON line to this file")
    ap.add_argument("--quiet", action="store_true")
    return ap


def estimate(**settings) -> dict:
    """One configuration's estimate (the flags of :func:`build_parser` as keyword arguments; memory only
    unless ``flops=True``). Returns the result dict: ``peak_total`` (bytes), ``phase_peak``, ``resident``..."""
    settings.setdefault("flops", False)
    args = build_parser().parse_args([])
    for key, value in settings.items():
        if not hasattr(args, key):
            raise TypeError(f"estimate() got an unknown setting {key!r}")
        setattr(args, key, value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        DATA_DEPENDENT.clear()
        return simulate(args)


def measure_real(**settings) -> dict:
    """The same step with REAL CPU tensors (small models only), its allocations read from the CPU allocator's
    own events (``torch.profiler``, ``profile_memory=True``): ``peak_delta`` is the peak of bytes allocated
    above what was live at the step's start; compare with ``estimate()['peak_total'] - ['start_total']``."""
    settings.setdefault("flops", False)
    args = build_parser().parse_args([])
    for key, value in settings.items():
        setattr(args, key, value)
    args.real = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        return simulate_once(args, measure="profile")["profile"]


def main(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    result = simulate(args)
    if not args.quiet:
        print_result(result)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result, default=str) + "\n")
    return result


if __name__ == "__main__":
    main()
