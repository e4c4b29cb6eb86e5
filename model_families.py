"""Model families: what differs between SD 1.x/2.x, SDXL, FLUX.1 and SD3/3.5, one class each.

The training script never asks which family it runs; it calls the same few methods on the object
:func:`family_for_model` returns (picked from ``model_index.json``'s ``_class_name`` before any weight
loads):

==========================  ===============================================================================
``geometry()``              ``(vae_factor, size_step, granularity, native_resolution)`` from config.json files
``denoiser_module_names()`` module names of the UNet / transformer built on the meta device (target check)
``load_text_encoders()``    stage 1: tokenizers, text encoders (the large ones quantized: --quantize_text_encoders)
``caption_conditioning()``  stage 2: rows -> caption dict, per batch (uncached SD/SDXL) or embedded once per row,
                            sampling prompts embedded, then the text encoders freed
``load_vae_stage()``        stage 3: the VAE (the latent cache is encoded next)
``load_denoiser()``         stage 4: noise scheduler and denoiser (--quantize_base: straight to the device)
``encode_captions(texts)``  caption conditioning: a dict of tensors, batch first (one row per caption)
``noisy_inputs(batch)``     latents, noise, timesteps, noisy input, target, per-example loss weights
``predict(denoiser, x)``    the prediction on the UNPACKED latent grid ``(B, C, h, w)``
``sampling_pipeline()``     the diffusers pipeline around the trained denoiser (no text encoders) for validation
``sampling_call(prompt)``   and evaluation; its call arguments from the prompt's stored embeddings
``lora_file_prefix`` etc.   file naming and kohya / modelspec metadata
==========================  ===============================================================================

Adding a family (Qwen-Image, Chroma, ...) is one new subclass registered in :data:`FAMILIES`; see
docs/model_families.md.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from dataclasses import dataclass, field

import torch

import fairhuman_utils as fh

UsageError = fh.UsageError
WEIGHTING_SCHEMES = ["none", "logit_normal", "mode", "sigma_sqrt", "cosmap"]
QUANTIZE_CHOICES = ["none", "nf4", "int8"]
logger = logging.getLogger(__name__)
MODE_SCALE_RANGE = (-1.0, 1.0 / (math.pi / 2 - 1))
"""--mode_scale s for which diffusers' mode density ``1 - u - s (cos^2(pi u / 2) - 1 + u)`` maps [0, 1] onto [0, 1]
(monotone: its derivative ``-1 - s + s (pi / 2) sin(pi u)`` stays <= 0 exactly for -1 <= s <= 1 / (pi/2 - 1))."""
FAMILY_FLAGS = {
    "guidance_scale": "the guidance embedding of a guidance-distilled model (FLUX.1-dev) during training",
    "precondition_outputs": "SD3's preconditioning of the prediction",
    "logit_mean": "the logit_normal timestep density of flow-matching training",
    "logit_std": "the logit_normal timestep density of flow-matching training",
    "mode_scale": "the mode timestep density of flow-matching training",
}
"""Flags only some families use (:meth:`ModelFamily.family_flags`), with what they set; ``None`` on the command
line means "not given"."""


@dataclass
class NoisyInputs:
    """One batch's denoiser input and what the loss compares its prediction with (latent grid)."""

    model_input: torch.Tensor  # noisy latents (B, C, h, w)
    timesteps: torch.Tensor
    target: torch.Tensor  # (B, C, h, w)
    sample_weights: torch.Tensor | None  # per-example loss weights (Min-SNR, flow weighting scheme) or None
    extras: dict = field(default_factory=dict)  # family-specific (e.g. SD3's sigmas for preconditioning)


def _model_index(path: str, revision: str | None, cache_dir: str | None) -> dict:
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.load_config(path, revision=revision, cache_dir=cache_dir)
    except Exception as error:  # noqa: BLE001 - any failure here means the path is not a diffusers model
        raise UsageError(f"--pretrained_model_name_or_path: cannot read model_index.json of {path!r} ({error})") from None


class ModelFamily:
    """The base: what every family shares. Subclasses set the class attributes and override methods."""

    name = "base"  # kohya's ss_base_model_version family (sd_v1, sdxl_base_v1-0, flux1, sd3)
    label = "base"  # for logs
    pipeline_class_names: tuple[str, ...] = ()  # model_index.json _class_name values of this family
    pipeline_class_name = ""  # the diffusers pipeline used for validation, evaluation and the LoRA file
    denoiser_name = "unet"  # the subfolder, and the prefix of the diffusers LoRA file's keys
    denoiser_class_name = "UNet2DConditionModel"
    vae_class_name = "AutoencoderKL"
    default_lora_targets = "to_q,to_k,to_v,to_out.0"
    kohya_prefix = "lora_unet"  # None: no kohya file (ComfyUI reads the diffusers file and not lora_transformer_*)
    flow_matching = False
    diffusers_reads_kohya_file = True  # the pipeline's load_lora_weights converts the kohya file
    tags = ("stable-diffusion",)

    def __init__(self, args):
        self.args = args
        self.path, self.revision, self.variant = args.pretrained_model_name_or_path, args.revision, args.variant
        self.text_encoders: list = []
        self.tokenizers: list = []
        self.vae = self.denoiser = self.noise_scheduler = None

    # ---- configs (no weights) ------------------------------------------------------------------
    @functools.cached_property
    def model_index(self) -> dict:
        """The model's ``model_index.json``, read once (:func:`family_for_model` hands over the one it read)."""
        return _model_index(self.path, self.revision, self.args.cache_dir)

    def denoiser_class(self):
        import diffusers

        return getattr(diffusers, self.denoiser_class_name)

    def denoiser_config(self) -> dict:
        try:
            return self.denoiser_class().load_config(self.path, subfolder=self.denoiser_name, revision=self.revision,
                                                     cache_dir=self.args.cache_dir)
        except Exception as error:  # noqa: BLE001 - the folder is not a usable diffusers model
            raise UsageError(f"--pretrained_model_name_or_path: cannot read the {self.denoiser_name} config.json of "
                             f"{self.path!r} ({error})") from None

    def vae_class(self):
        import diffusers

        return getattr(diffusers, self.vae_class_name)

    def vae_config(self) -> dict:
        AutoencoderKL = self.vae_class()
        vae_path = self.args.pretrained_vae_model_name_or_path
        try:
            if vae_path is not None:
                return AutoencoderKL.load_config(vae_path, revision=self.revision, cache_dir=self.args.cache_dir)
            return AutoencoderKL.load_config(self.path, subfolder="vae", revision=self.revision,
                                             cache_dir=self.args.cache_dir)
        except Exception as error:  # noqa: BLE001 - the folder is not a usable diffusers model / VAE
            if vae_path is not None:
                raise UsageError(f"--pretrained_vae_model_name_or_path: cannot read the VAE config.json of "
                                 f"{vae_path!r} ({error})") from None
            raise UsageError(f"--pretrained_model_name_or_path: cannot read the VAE config.json of {self.path!r} "
                             f"({error})") from None

    def geometry(self) -> tuple[int, int, int, int]:
        """``(vae_factor, size_step, granularity, native_resolution)`` from the config.json files (no weights):
        pixels per latent cell; the step every image side must be a multiple of; the default bucket step; the
        model's native resolution. SD/SDXL: any multiple of the VAE factor, granularity the VAE factor times the
        UNet's downsampling (64; :func:`fairhuman_utils.bucket_granularity`); FLUX.1: 2 x the VAE factor (its
        2x2 latent packing, 16 px); SD3: the patch size x the VAE factor."""
        raise NotImplementedError

    def denoiser_module_names(self) -> list[str]:
        from accelerate import init_empty_weights

        with init_empty_weights():
            model = self.denoiser_class().from_config(self.denoiser_config())
        return [name for name, _ in model.named_modules()]

    def attention_module_examples(self, names) -> list[str]:
        """Names to suggest when --lora_target_modules matches nothing."""
        return sorted({name.split("attn1.", 1)[1] for name in names if "attn1." in name})

    def family_flags(self) -> dict:
        """The optional flags of :data:`FAMILY_FLAGS` this family uses, with their defaults (``None`` on the
        command line means "not given")."""
        return {}

    def check_args(self, args) -> None:
        """Flags this family cannot use, named: one of :data:`FAMILY_FLAGS` that it does not use is refused (it
        would do nothing); the ones it uses get their defaults."""
        used = self.family_flags()
        for name, what in FAMILY_FLAGS.items():
            if name not in used and getattr(args, name) is not None:
                raise UsageError(f"--{name} does nothing for {self.label} ({self.path!r}): it sets {what}, which this "
                                 "model does not have; leave it out")
        for name, default in used.items():
            if getattr(args, name) is None:
                setattr(args, name, default)

    def check_parts(self) -> None:
        """A local model folder holds every part its ``model_index.json`` lists, each ``config.json`` readable:
        one error naming the missing folder or the broken file, before any data is read or weight loaded. (A Hub
        id is checked by the download itself.)"""
        if not os.path.isdir(self.path):
            return
        index = self.model_index
        for part, entry in sorted(index.items()):
            if part.startswith("_") or not isinstance(entry, (list, tuple)) or entry[-1] is None:
                continue
            folder = os.path.join(self.path, part)
            if not os.path.isdir(folder):
                raise UsageError(f"--pretrained_model_name_or_path: {self.path!r} has no {part}/ folder, which its "
                                 f"model_index.json lists ({entry[-1]}); copy the whole model folder")
            config = os.path.join(folder, "config.json")
            if os.path.isfile(config):
                try:
                    with open(config) as f:
                        json.load(f)
                except (OSError, ValueError) as error:
                    raise UsageError(f"--pretrained_model_name_or_path: cannot read {config} ({error})") from None

    def max_image_side(self) -> tuple[int, str] | None:
        """The largest image side in pixels the denoiser can take, and the config value that limits it; ``None``
        when it has no such limit."""
        return None

    # ---- loading, in stages (the training script's order: text encoders, captions embedded, the encoders freed,
    # the VAE (latent cache), THEN the denoiser; T5 / the LLM encoder and the denoiser are never held together) ----
    def load(self, device, weight_dtype) -> None:
        """Every model at once (tests and tools; the training script loads in stages)."""
        self.load_text_encoders(device, weight_dtype)
        self.load_vae_stage(device, weight_dtype)
        self.load_denoiser(device, weight_dtype)

    def load_text_encoders(self, device, weight_dtype) -> None:
        """Stage 1: tokenizers and text encoders (:meth:`load_text_models`) on ``device`` in ``weight_dtype``; the
        large ones (:meth:`large_text_encoders`) quantized by bitsandbytes with ``--quantize_text_encoders``, loaded
        straight onto ``device``."""
        self.load_text_models(device, weight_dtype)
        for text_encoder in self.text_encoders:
            text_encoder.requires_grad_(False)
            if getattr(text_encoder, "hf_quantizer", None) is None:  # bitsandbytes placed the quantized ones
                text_encoder.to(device, dtype=weight_dtype)
            else:
                keep_4bit_layers_trainable_on_cpu(text_encoder)  # its no-grad forwards on a CPU
        self.text_encoder_dtype = str(self.text_encoders[0].dtype) if self.text_encoders else None

    def load_text_models(self, device, weight_dtype) -> None:
        """Set ``self.tokenizers`` and ``self.text_encoders`` (:meth:`text_encoder_from_pretrained` for each)."""
        raise NotImplementedError

    def load_one_large_text_encoder(self, cls, device, weight_dtype) -> None:
        """:meth:`load_text_models` of a family with one text encoder, a large one (T5, an LLM:
        ``--quantize_text_encoders`` quantizes it): ``cls`` from ``text_encoder/``, its tokenizer from ``tokenizer/``."""
        self.tokenizers = [self.auto_tokenizer("tokenizer")]
        self.text_encoders = [self.text_encoder_from_pretrained(cls, "text_encoder", device, weight_dtype, large=True)]

    def text_encoder_from_pretrained(self, cls, subfolder: str, device, weight_dtype, large: bool = False):
        """``cls.from_pretrained`` of the model's ``subfolder``; a ``large`` encoder (T5, an LLM) in 4 or 8 bits
        with ``--quantize_text_encoders`` (transformers' ``BitsAndBytesConfig``, computing in ``weight_dtype``),
        placed on ``device`` as it loads."""
        kwargs = dict(subfolder=subfolder, revision=self.revision, variant=self.variant, cache_dir=self.args.cache_dir)
        quantization = (text_quantization_config(self.args.quantize_text_encoders, weight_dtype) if large else None)
        if quantization is not None:
            kwargs.update(quantization_config=quantization, dtype=weight_dtype, device_map={"": torch.device(device)})
        return cls.from_pretrained(self.path, **kwargs)

    def auto_tokenizer(self, subfolder: str, **kwargs):
        """``AutoTokenizer.from_pretrained`` of the model's ``subfolder`` (revision, cache_dir)."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.path, subfolder=subfolder, revision=self.revision,
                                             cache_dir=self.args.cache_dir, **kwargs)

    def text_encoders_in_step(self, args) -> bool:
        """Whether the text encoders stay (on the device) through training: they embed each batch."""
        return not args.cache_text_embeddings

    def release_text_encoders(self) -> None:
        """Stage 2's end: the text encoders are deleted (not moved) once every caption and prompt is embedded,
        unless they embed each batch (:meth:`text_encoders_in_step`); the tokenizers stay (caption checks)."""
        if self.text_encoders_in_step(self.args):
            return
        import gc

        self.text_encoders = []
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def load_vae_stage(self, device, weight_dtype) -> None:
        """Stage 3: the VAE on ``device`` in :meth:`vae_dtype` (it encodes the latent cache, decodes samples)."""
        self.vae = self.load_vae(dtype=self.vae_dtype(weight_dtype)).requires_grad_(False).to(device)

    def load_denoiser(self, device, weight_dtype) -> None:
        """Stage 4: the noise scheduler and the denoiser in ``weight_dtype``; with ``--quantize_base`` its linear
        layers in 4 or 8 bits (diffusers' ``BitsAndBytesConfig``, computing in ``weight_dtype``), loaded straight
        onto the device."""
        import diffusers

        scheduler_class = getattr(diffusers, self.scheduler_class_name)
        self.noise_scheduler = scheduler_class.from_pretrained(self.path, subfolder="scheduler", revision=self.revision, cache_dir=self.args.cache_dir)
        if getattr(self.args, "prediction_type", None) is not None:
            self.noise_scheduler.register_to_config(prediction_type=self.args.prediction_type)
        quantization = quantization_config(self.args.quantize_base, weight_dtype)
        kwargs = {} if quantization is None else dict(quantization_config=quantization)
        self.denoiser = self.denoiser_class().from_pretrained(self.path, subfolder=self.denoiser_name,
                                                              revision=self.revision, cache_dir=self.args.cache_dir, variant=self.variant,
                                                              dtype=weight_dtype, **kwargs)
        self.denoiser.requires_grad_(False)
        if quantization is None:
            self.denoiser.to(device)
        else:
            keep_4bit_layers_trainable_on_cpu(self.denoiser)

    def load_vae(self, dtype):
        AutoencoderKL = self.vae_class()
        if self.args.pretrained_vae_model_name_or_path is not None:
            return AutoencoderKL.from_pretrained(self.args.pretrained_vae_model_name_or_path, revision=self.revision, cache_dir=self.args.cache_dir,
                                                 dtype=dtype)
        return AutoencoderKL.from_pretrained(self.path, subfolder="vae", revision=self.revision, cache_dir=self.args.cache_dir, variant=self.variant,
                                             dtype=dtype)

    # ---- conditioning ----------------------------------------------------------------------------
    def encode_captions(self, captions: list[str], device) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def caption_token_limits(self) -> list[tuple]:
        """``(tokenizer, limit, name, flag)`` per text-encoder limit that cuts captions (``flag``: the flag that
        sets it, or None): CLIP's ``model_max_length`` (77 tokens)."""
        return [(self.tokenizers[0], self.tokenizers[0].model_max_length, "text encoder", None)]

    def caption_conditioning(self, captions_by_row: list[list[str]], device, prompts=()):
        """Stage 2: a function ``(rows, captions) -> dict`` giving a batch's caption conditioning, and every sampling
        prompt's embeddings (``prompts``: validation, evaluation; with the empty prompt's where the family samples
        with classifier-free guidance) stored on the CPU for :meth:`sampling_call`. Where the text encoders embed
        each batch (:meth:`text_encoders_in_step`) they stay; otherwise every caption of every dataset row is
        encoded once, kept on the CPU BY ROW AND CAPTION (not by step: diffusers' FLUX/SD3 examples index their
        cache by step while the loader shuffles, issue #14430), and the text encoders are freed."""
        with torch.no_grad():
            negative = self.encode_captions([""], device) if self.cfg_sampling and prompts else None
            self.prompt_embeds = {prompt: ({k: v.cpu() for k, v in self.encode_captions([prompt], device).items()},
                                           negative and {k: v.cpu() for k, v in negative.items()})
                                  for prompt in dict.fromkeys(prompts)}
            if self.text_encoders_in_step(self.args):
                return lambda rows, captions: self.encode_captions(captions, device)
            cache = {}
            for row, captions in enumerate(captions_by_row):
                for caption in dict.fromkeys(captions):
                    cache[row, caption] = {k: v[0].cpu() for k, v in self.encode_captions([caption], device).items()}
        self.release_text_encoders()

        def lookup(rows, captions):
            entries = [cache[row, caption] for row, caption in zip(rows, captions)]
            return {k: fh.pad_stack([e[k] for e in entries]).to(device, non_blocking=True) for k in entries[0]}

        return lookup

    def posterior_sample(self, batch, generators, device) -> torch.Tensor:
        """A sample of the VAE posterior per example (``mean + std * eps``, eps from the example's generator), from
        the batch's pixels or, with ``--cache_latents``, its cached ``latent_mean`` / ``latent_std``."""
        if "latent_mean" in batch:
            mean, std = batch["latent_mean"].to(device), batch["latent_std"].to(device)
        else:
            mean, std = self.latent_distribution(batch["pixel_values"].to(device, dtype=self.vae.dtype))
        eps = torch.stack([torch.randn(mean.shape[1:], generator=g) for g in generators])
        return mean + std * eps.to(mean)

    def latents(self, batch, generators, device, weight_dtype) -> torch.Tensor:
        """VAE latents of the batch as the denoiser sees them (:meth:`normalize_latents` of
        :meth:`posterior_sample`), in ``weight_dtype``."""
        return self.normalize_latents(self.posterior_sample(batch, generators, device)).to(weight_dtype)

    def latent_distribution(self, pixel_values) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE posterior's mean and std of a pixel batch, on the latent grid ``(B, C, h, w)``."""
        latent_dist = self.vae.encode(pixel_values).latent_dist
        return latent_dist.mean, latent_dist.std

    def normalize_latents(self, latents) -> torch.Tensor:
        """VAE latents as the denoiser sees them: ``(x - shift_factor) * scaling_factor`` (the shift for flow models)."""
        shift = getattr(self.vae.config, "shift_factor", None)
        if self.flow_matching and shift is not None:
            latents = latents - shift
        return latents * self.vae.config.scaling_factor

    def noisy_inputs(self, batch, cond: dict, device, weight_dtype) -> NoisyInputs:
        raise NotImplementedError

    def predict(self, denoiser, inputs) -> torch.Tensor:
        raise NotImplementedError

    # ---- pipelines, files ------------------------------------------------------------------------
    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    def sampling_pipeline(self, denoiser):
        """The family's diffusers pipeline around the trained ``denoiser`` and the VAE, WITHOUT text encoders (the
        prompts' embeddings were stored by :meth:`caption_conditioning`; :meth:`sampling_call` passes them), with
        its own copy of the sampling scheduler (:meth:`sampling_scheduler`; the training schedule is not touched)."""
        import inspect

        cls = self.pipeline_class()
        scheduler = self.sampling_scheduler(type(self.noise_scheduler).from_config(self.noise_scheduler.config))
        known = {"vae": self.vae, "scheduler": scheduler, self.denoiser_name: denoiser, "requires_safety_checker": False}
        params = inspect.signature(cls.__init__).parameters
        components = {name: known.get(name) for name, p in params.items() if name != "self"
                      and p.kind is p.POSITIONAL_OR_KEYWORD and (p.default is p.empty or name in known)}
        pipeline = cls(**components)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def sampling_call(self, prompt: str, count: int, device) -> dict:
        """The pipeline's call arguments for ``count`` images of ``prompt``, from its stored embeddings."""
        embeds, negative = self.prompt_embeds[prompt]

        def rows(d):
            return d and {k: v.to(device).repeat(count, *([1] * (v.dim() - 1))) for k, v in d.items()}

        return self.embeds_call_kwargs(rows(embeds), rows(negative))

    def embeds_call_kwargs(self, embeds: dict, negative: dict | None) -> dict:
        """The pipeline's ``prompt_embeds``-style arguments from :meth:`encode_captions`' dicts."""
        return dict(prompt_embeds=embeds["encoder_hidden_states"], negative_prompt_embeds=negative["encoder_hidden_states"])

    def base_model_version(self) -> str:
        return self.name

    def modelspec_architecture(self) -> str:
        raise NotImplementedError

    def network_module(self) -> str:
        return "networks.lora"

    def training_settings(self) -> dict:
        """This family's own training settings, for the model card's table and the kohya metadata."""
        return {}

    def inference_advice(self) -> dict:
        """What the model card suggests: LoRA scale, steps, guidance, sampler."""
        return dict(scale=0.3, steps=30, guidance=7.5, sampler="UniPC", comfy_sampler="uni_pc")

    # ---- what the model card and the kohya file say (every sampling number from inference_advice) -------
    def kohya_training_comment(self) -> str:
        """The sampling advice at the end of the kohya file's ``ss_training_comment``."""
        advice = self.inference_advice()
        return (f"authors' inference: LoRA scale {advice['scale']}, {advice['steps']} {advice['sampler']} steps, "
                f"CFG {advice['guidance']}")

    def kohya_version_fields(self) -> dict[str, str]:
        """kohya's ``ss_v2`` and ``ss_v_parameterization`` for this model."""
        prediction_type = self.noise_scheduler.config.get("prediction_type")
        return {"ss_v2": str(self.base_model_version() == "sd_v2"),
                "ss_v_parameterization": str(prediction_type == "v_prediction")}

    def kohya_file_readers(self) -> str:
        """The model card's "where it goes" for the kohya file, after ComfyUI's folder."""
        return "AUTOMATIC1111 / Forge: `models/Lora/` (diffusers `load_lora_weights` reads it too)"

    def diffusers_file_readers(self) -> str:
        """The model card's "where it goes" for the diffusers file."""
        return "diffusers `load_lora_weights`"

    def diffusers_file_is_the_ui_file(self) -> bool:
        """Whether the diffusers file is also the file offered to ComfyUI (a family with no kohya file,
        ``kohya_prefix`` None): it then carries the ``ss_*`` / modelspec metadata in its header."""
        return self.kohya_prefix is None

    def comfyui_file(self, diffusers_file: str | None, kohya_file: str | None) -> str | None:
        """The file the model card tells ComfyUI users to load, of the files the run writes (None: none)."""
        return diffusers_file if self.diffusers_file_is_the_ui_file() else kohya_file

    def card_sampling_note(self) -> str:
        """The model card's sentence on how to sample with the LoRA."""
        advice = self.inference_advice()
        return (f"The authors sampled with LoRA scale {advice['scale']}, {advice['steps']} {advice['sampler']} steps "
                f"and CFG {advice['guidance']}.")

    def card_code(self, prediction: str) -> tuple[str, str, str]:
        """The model card's diffusers snippet: ``(extra import, torch dtype, scheduler line)``; ``prediction`` is
        the ``, prediction_type=...`` argument when the run trained another prediction type than the model's."""
        return (", UniPCMultistepScheduler", "float16",
                f"pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config{prediction})\n")

    def guidance_call_kwargs(self, guidance: float) -> dict:
        """The pipeline call's guidance argument(s) for ``guidance`` (validation, evaluation)."""
        return {"guidance_scale": guidance}

    def card_call_kwargs(self, guidance: float) -> dict:
        """The guidance (and what it needs) in the model card's diffusers snippet."""
        return self.guidance_call_kwargs(guidance)

    def negative_prompt_kwargs(self, negative_prompt: str | None, count: int) -> dict:
        """The pipeline call's negative prompt for ``count`` images (evaluation's --negative_prompt)."""
        return {"negative_prompt": [negative_prompt] * count if negative_prompt else None}

    def comfyui_guidance(self) -> str:
        """The KSampler's guidance in the model card's ComfyUI advice."""
        return f"cfg {self.inference_advice()['guidance']}"

    def a1111_usage(self, kohya_file: str, output_name: str) -> str:
        """The model card's AUTOMATIC1111 / Forge advice ('' where those UIs are not advised)."""
        advice = self.inference_advice()
        return (f"- AUTOMATIC1111 / Forge: put `{kohya_file}` in `models/Lora/` and add `<lora:{output_name}:{advice['scale']}>` to the\n"
                f"  prompt; sampler {advice['sampler']}, {advice['steps']} steps, CFG scale {advice['guidance']}.\n")

    def sampling_scheduler(self, scheduler, prediction_type: str | None = None):
        """The scheduler that samples for the card's advice, from the pipeline's ``scheduler``: UniPC (the authors'),
        with ``prediction_type`` when the LoRA was trained with another one than the model's."""
        from diffusers import UniPCMultistepScheduler

        overrides = {"prediction_type": prediction_type} if prediction_type else {}
        return UniPCMultistepScheduler.from_config(scheduler.config, **overrides)

    def distilled_warning(self) -> str:
        """Why not to train on this checkpoint and which base checkpoint to train on, when it is a distilled one
        ('' otherwise): logged as a warning before training (not a refusal) and said in the model card."""
        return ""

    def nonfinite_advice(self) -> str:
        """What this family adds to the advice when steps keep coming out non-finite ('' or ', ...')."""
        return ""

    # ---- memory model (memory_estimate.py) ------------------------------------------------------------------
    # What the estimate builds and replays for this family; everything else it takes from the methods above
    # (configs, encode_captions, noisy_inputs, predict), so the estimate and the training step cannot drift.
    denoiser_label = "UNet"  # the phase names say what the denoiser is
    scheduler_class_name = "DDPMScheduler"  # the noise scheduler load() builds (its config only is read)
    cfg_sampling = True  # validation / evaluation sample with classifier-free guidance: the denoiser sees 2 rows

    def vae_dtype(self, weight_dtype):
        return weight_dtype

    def build_from_configs(self, weight_dtype, tokenizer) -> None:
        """The run's models from their config.json files alone, no weights (memory_estimate.py calls this under
        FakeTensorMode): the text encoders of ``model_index.json`` (its classes, in ``text_encoder``,
        ``text_encoder_2``, ... order), the VAE in :meth:`vae_dtype`, the denoiser in ``weight_dtype``, the noise
        scheduler; ``tokenizer(text_encoder)`` gives each encoder's stand-in tokenizer."""
        import diffusers
        import transformers

        index = self.model_index
        self.text_encoders = []
        for name in sorted(k for k in index if k.startswith("text_encoder")):
            entry = index[name]
            if not isinstance(entry, (list, tuple)) or entry[-1] is None:
                continue
            cls = getattr(transformers, entry[-1])
            config = cls.config_class.from_pretrained(self.path, subfolder=name, revision=self.revision,
                                                      cache_dir=self.args.cache_dir)
            self.text_encoders.append(cls(config).requires_grad_(False).to(weight_dtype))
        self.tokenizers = [tokenizer(text_encoder) for text_encoder in self.text_encoders]
        self.vae = self.vae_class().from_config(self.vae_config()).requires_grad_(False)
        self.vae.to(self.vae_dtype(weight_dtype))
        self.denoiser = self.denoiser_class().from_config(self.denoiser_config()).requires_grad_(False)
        self.denoiser.to(weight_dtype)
        scheduler_class = getattr(diffusers, self.scheduler_class_name)
        self.noise_scheduler = scheduler_class.from_config(
            scheduler_class.load_config(self.path, subfolder="scheduler", revision=self.revision,
                                        cache_dir=self.args.cache_dir))

    def large_text_encoders(self) -> list:
        """The encoders ``--quantize_text_encoders`` quantizes (T5 / LLM); none for CLIP-only families."""
        return []

    def memory_batch(self, count, latents=None, pixels=None) -> dict:
        """A batch of ``count`` examples as :meth:`noisy_inputs` reads it: cached latents or pixels, seeds."""
        batch = {"seeds": list(range(count))}
        if pixels is not None:
            batch["pixel_values"] = pixels
        else:
            batch["latent_mean"] = batch["latent_std"] = latents
        return batch

    def memory_captions(self, device) -> dict:
        """One caption's conditioning at the run's sequence lengths, as the estimate embeds it (the family's own
        ``encode_captions`` unless that needs data fake tensors lack)."""
        return self.encode_captions(["a photo of a person"], device)

    def latent_channels(self) -> int:
        """Channels of the VAE's latent grid (the estimate's stand-in latents)."""
        return int(self.vae.config.latent_channels)

    def decode_latents(self, latents) -> torch.Tensor:
        """The VAE decode of latents ``(B, C, h, w)`` as the pipeline runs it after sampling (the estimate's
        sampling phases replay it)."""
        return self.vae.decode(latents).sample

    def memory_advice(self, args, phase: str) -> list[str]:
        """The flags that lower ``phase`` (caption, latents, step, validation, evaluation) of this run, those
        not already given, largest saving first."""
        advice = []
        if phase == "step":
            if args.weighting == "fair" and args.fair_gradient_dtype == "fp32":
                advice.append("--fair_gradient_dtype bf16")
            if not args.gradient_checkpointing:
                advice.append("--gradient_checkpointing")
            if not args.use_8bit_adam:
                advice.append("--use_8bit_adam")
            advice += [f"--{flag}" for flag in ("cache_latents", "cache_text_embeddings") if not getattr(args, flag)]
            advice.append(f"a lower --rank than {args.rank}")
        if phase in ("latents", "step", "validation", "evaluation"):
            advice.append(f"a lower --resolution than {args.resolution}" if args.resolution else "a lower --resolution")
        if phase == "evaluation" and args.num_validation_images > 1:
            advice.append("--num_validation_images 1 (evaluation samples up to 4 images per call)")
        if phase == "validation":
            advice.append("no --validation_prompt")
        return advice


# =================================================================================================
# SD 1.x/2.x and SDXL (UNet, DDPM noise, epsilon / v-prediction)
# =================================================================================================


def sdxl_time_ids(original_sizes, crop_top_lefts, target_sizes, device, dtype):
    """SDXL micro-conditioning: (original h, w, crop top, left, target h, w) per example; the target is the
    example's own size (its bucket)."""
    rows = [list(o) + list(c) + list(t) for o, c, t in zip(original_sizes, crop_top_lefts, target_sizes)]
    return torch.tensor(rows, device=device, dtype=dtype)


class StableDiffusionFamily(ModelFamily):
    name = "sd"
    label = "SD"
    pipeline_class_names = ("StableDiffusionPipeline",)
    pipeline_class_name = "StableDiffusionPipeline"

    def check_args(self, args):
        super().check_args(args)
        flow_only = [f"--{name}" for name in ("weighting_scheme", "max_sequence_length") if getattr(args, name) is not None]
        flow_only += [f"--{flag}" for flag in ("quantize_base", "quantize_text_encoders")
                      if getattr(args, flag) not in (None, "none")]
        if flow_only:
            raise UsageError(f"{', '.join(flow_only)} {'is' if len(flow_only) == 1 else 'are'} for FLUX.1/SD3; "
                             f"{args.pretrained_model_name_or_path!r} is an {self.label} model")

    def geometry(self):
        vae_config, unet_config = self.vae_config(), self.denoiser_config()
        vae_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
        granularity = fh.bucket_granularity(vae_config["block_out_channels"], unet_config["block_out_channels"])
        return vae_factor, vae_factor, granularity, int(unet_config["sample_size"]) * vae_factor

    def load_text_models(self, device, weight_dtype):
        """SD: one CLIP text encoder and its tokenizer (small: --quantize_text_encoders is refused, check_args)."""
        from transformers import CLIPTextModel

        self.tokenizers = [self.auto_tokenizer("tokenizer", use_fast=False)]
        self.text_encoders = [self.text_encoder_from_pretrained(CLIPTextModel, "text_encoder", device, weight_dtype)]

    def vae_dtype(self, weight_dtype):
        return weight_dtype

    def caption_ids(self, tokenizer, captions, device):
        return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids.to(device)

    def encode_captions(self, captions, device):
        """SD: the text encoder's last hidden states as ``encoder_hidden_states``."""
        return {"encoder_hidden_states": self.text_encoders[0](self.caption_ids(self.tokenizers[0], captions, device))[0]}

    def noisy_inputs(self, batch, cond, device, weight_dtype):
        """DDPM: ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``, t uniform in [0, T); target the noise or the
        velocity; Min-SNR weights with --snr_gamma. Every draw from the example's own generator."""
        from diffusers.training_utils import compute_snr

        args, scheduler = self.args, self.noise_scheduler
        generators = [torch.Generator().manual_seed(s) for s in batch["seeds"]]
        latents = self.latents(batch, generators, device, weight_dtype)
        noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in generators])
        if args.noise_offset:
            offsets = torch.stack([torch.randn(latents.shape[1], 1, 1, generator=g) for g in generators])
            noise = noise + args.noise_offset * offsets
        noise = noise.to(latents)
        timesteps = torch.cat([torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=g)
                               for g in generators]).to(device)
        noisy_latents = scheduler.add_noise(latents, noise, timesteps)
        if scheduler.config.prediction_type == "epsilon":
            target = noise
        elif scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise UsageError(f"unsupported prediction type {scheduler.config.prediction_type!r}")
        sample_weights = None
        if args.snr_gamma is not None:
            snr = compute_snr(scheduler, timesteps)
            if scheduler.config.prediction_type == "v_prediction":
                snr = snr + 1
            sample_weights = torch.clamp(snr, max=args.snr_gamma) / snr
        return NoisyInputs(noisy_latents, timesteps, target, sample_weights,
                           {"time_ids": self.time_ids(batch, device, cond["encoder_hidden_states"].dtype)})

    def time_ids(self, batch, device, dtype):
        """SDXL's micro-conditioning; None for SD."""
        return None

    def added_cond_kwargs(self, inputs):
        """The UNet's ``added_cond_kwargs``: None for SD."""
        return None

    def predict(self, unet, inputs):
        return unet(inputs.model_input, inputs.timesteps, inputs.conditioning["encoder_hidden_states"],
                    added_cond_kwargs=self.added_cond_kwargs(inputs)).sample

    def base_model_version(self):
        """kohya's ``ss_base_model_version``: sd_v2 (1024-wide cross-attention, OpenCLIP-H) or sd_v1."""
        return "sd_v2" if self.denoiser.config.cross_attention_dim == 1024 else "sd_v1"

    def modelspec_architecture(self):
        return {"sd_v2": "stable-diffusion-v2", "sd_v1": "stable-diffusion-v1"}[self.base_model_version()]


class StableDiffusionXLFamily(StableDiffusionFamily):
    """SDXL: two CLIP text encoders (penultimate hidden states concatenated, the second's pooled embedding), the
    size micro-conditioning, a VAE kept in fp32 (it overflows in fp16) unless an fp16-fix VAE is given."""

    name = "sdxl"
    label = "SDXL"
    pipeline_class_names = ("StableDiffusionXLPipeline",)
    pipeline_class_name = "StableDiffusionXLPipeline"
    tags = ("stable-diffusion-xl",)

    def load_text_models(self, device, weight_dtype):
        from transformers import CLIPTextModelWithProjection

        super().load_text_models(device, weight_dtype)
        self.tokenizers.append(self.auto_tokenizer("tokenizer_2", use_fast=False))
        self.text_encoders.append(self.text_encoder_from_pretrained(CLIPTextModelWithProjection, "text_encoder_2",
                                                                    device, weight_dtype))

    def vae_dtype(self, weight_dtype):
        return torch.float32 if self.args.pretrained_vae_model_name_or_path is None else weight_dtype

    def encode_captions(self, captions, device):
        """Both encoders' penultimate hidden states concatenated as ``encoder_hidden_states``, the second
        encoder's pooled embedding as ``text_embeds``."""
        embeds, pooled = [], None
        for text_encoder, tokenizer in zip(self.text_encoders, self.tokenizers):
            out = text_encoder(self.caption_ids(tokenizer, captions, device), output_hidden_states=True)
            pooled = out[0]
            embeds.append(out.hidden_states[-2])
        return {"encoder_hidden_states": torch.cat(embeds, dim=-1), "text_embeds": pooled}

    def time_ids(self, batch, device, dtype):
        """(original h, w, crop top, left, target h, w) per example (:func:`sdxl_time_ids`)."""
        return sdxl_time_ids(batch["original_sizes"], batch["crop_top_lefts"], batch["target_sizes"], device, dtype)

    def added_cond_kwargs(self, inputs):
        return {"text_embeds": inputs.conditioning["text_embeds"], "time_ids": inputs.extras["time_ids"]}

    def embeds_call_kwargs(self, embeds, negative):
        """The negative side is the pipeline's own: zeros for the empty prompt (force_zeros_for_empty_prompt)."""
        return dict(prompt_embeds=embeds["encoder_hidden_states"], pooled_prompt_embeds=embeds["text_embeds"])

    def base_model_version(self):
        return "sdxl_base_v1-0"

    def modelspec_architecture(self):
        return "stable-diffusion-xl-v1-base"

    def nonfinite_advice(self):
        return (", the fp16-fix VAE (--pretrained_vae_model_name_or_path madebyollin/sdxl-vae-fp16-fix)"
                if self.args.pretrained_vae_model_name_or_path is None else "")

    # ---- memory model (memory_estimate.py) ------------------------------------------------------------------
    def memory_batch(self, count, latents=None, pixels=None) -> dict:
        """With the size micro-conditioning of each example (its own size, no crop)."""
        batch = super().memory_batch(count, latents, pixels)
        size = tuple((pixels if pixels is not None else latents).shape[-2:])
        batch.update(original_sizes=[size] * count, crop_top_lefts=[(0, 0)] * count, target_sizes=[size] * count)
        return batch

    def memory_advice(self, args, phase):
        advice = super().memory_advice(args, phase)
        uses_vae = phase in ("latents", "validation", "evaluation") or (phase == "step" and not args.cache_latents)
        if uses_vae and args.pretrained_vae_model_name_or_path is None:  # the fp32 VAE
            advice.insert(0, "--pretrained_vae_model_name_or_path madebyollin/sdxl-vae-fp16-fix")
        return advice

# =================================================================================================
# Flow matching transformers: FLUX.1 and SD3/3.5 (as diffusers' train_dreambooth_lora_{flux,sd3}.py)
# =================================================================================================


class FlowMatchingFamily(ModelFamily):
    """Rectified flow: ``x_s = (1 - s) x0 + s noise``, target ``noise - x0``, ``s`` from the model's
    ``FlowMatchEulerDiscreteScheduler`` at an index drawn by ``--weighting_scheme``
    (``diffusers.training_utils.compute_density_for_timestep_sampling``, per example from its own generator),
    per-example loss weights ``compute_loss_weighting_for_sd3``. Caption embeddings are computed once per
    dataset row, then the text encoders leave the accelerator."""

    denoiser_name = "transformer"
    kohya_prefix = "lora_transformer"  # ComfyUI's key map: "lora_transformer_{diffusers name, '.' -> '_'}"
    flow_matching = True
    # train_dreambooth_lora_sd3.py's default targets; with peft's suffix match they cover both streams'
    # attention of the joint blocks (and FLUX's single blocks' to_q/k/v). Every name is in ComfyUI's key map.
    default_lora_targets = ("attn.to_q,attn.to_k,attn.to_v,attn.to_out.0,attn.add_q_proj,attn.add_k_proj,"
                            "attn.add_v_proj,attn.to_add_out")
    default_weighting_scheme = "none"
    default_max_sequence_length = 512
    max_sequence_length_limit = (512, "T5")  # the longest --max_sequence_length, and the text encoder that sets it
    attention_prefixes = ("attn.to_", "attn.add_", "attn2.to_")  # block-relative attention names (target check)
    unsupported = {"prediction_type": None, "snr_gamma": None, "noise_offset": 0.0}

    def training_settings(self) -> dict:
        return {"weighting_scheme": self.args.weighting_scheme, "max_sequence_length": self.args.max_sequence_length,
                "quantize_base": self.args.quantize_base}

    def caption_token_limits(self) -> list[tuple]:
        """CLIP's 77 tokens, and T5's ``--max_sequence_length`` (the last tokenizer)."""
        return super().caption_token_limits() + [(self.tokenizers[-1], self.args.max_sequence_length,
                                                  "T5 text encoder", "--max_sequence_length")]

    def check_args(self, args):
        for flag, default in self.unsupported.items():
            if getattr(args, flag) != default:
                raise UsageError(f"--{flag} is for SD/SDXL (DDPM noise); {self.label} trains with flow matching "
                                 "(see --weighting_scheme)")
        super().check_args(args)
        if (args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION")) == "fp16":
            logger.warning(f"--mixed_precision fp16 with {self.label}: every reference trains it in bf16 (diffusers' "
                           "examples, kohya, SimpleTuner, ai-toolkit); its activations overflow fp16. Use "
                           "--mixed_precision bf16 (any GPU since Ampere)")
        if args.weighting_scheme is None:
            args.weighting_scheme = self.default_weighting_scheme
        if args.max_sequence_length is None:
            args.max_sequence_length = self.default_max_sequence_length
        limit, encoder = self.max_sequence_length_limit
        if args.max_sequence_length < 1 or args.max_sequence_length > limit:
            raise UsageError(f"--max_sequence_length must be between 1 and {limit} ({encoder}), got "
                             f"{args.max_sequence_length}")
        if self.distilled_warning():  # a warning, not a refusal: the run is the user's call
            logger.warning(self.distilled_warning())

    def family_flags(self):
        return {"logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29}  # diffusers' examples' defaults

    def attention_module_examples(self, names):
        """``attn.to_q``, ``attn.add_q_proj``, ... : the block-relative names of the attention layers."""
        return sorted({name.split(".", 2)[2] for name in names if name.count(".") >= 3
                       and name.split(".", 2)[2].startswith(self.attention_prefixes)})

    def geometry(self):
        vae_config = self.vae_config()
        vae_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
        step = vae_factor * self.patch_size()
        return vae_factor, step, step, self.native_resolution(vae_config, vae_factor)

    def native_resolution(self, vae_config, vae_factor) -> int:
        return int(vae_config.get("sample_size") or 1024)

    def patch_size(self) -> int:
        return 2

    def text_pipeline(self):
        """The pipeline with only its text parts, for its own ``encode_prompt``."""
        raise NotImplementedError

    def sigmas_for(self, generators, device):
        """Timesteps and sigmas of the training schedule at indices drawn per example (the scripts' get_sigmas)."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        args, scheduler = self.args, self.noise_scheduler
        u = torch.cat([compute_density_for_timestep_sampling(weighting_scheme=args.weighting_scheme, batch_size=1,
                                                             logit_mean=args.logit_mean, logit_std=args.logit_std,
                                                             mode_scale=args.mode_scale, generator=g)
                       for g in generators])
        # u is in [0, 1] for every accepted --mode_scale / --logit_std (checked up front); the clamp keeps the
        # index inside the table at both ends (a negative index would read the schedule from its end)
        indices = (u * scheduler.config.num_train_timesteps).long().clamp(0, len(scheduler.timesteps) - 1)
        return scheduler.timesteps[indices].to(device), scheduler.sigmas[indices].to(device)

    def noisy_inputs(self, batch, cond, device, weight_dtype):
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        generators = [torch.Generator().manual_seed(s) for s in batch["seeds"]]
        latents = self.latents(batch, generators, device, weight_dtype)
        noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in generators]).to(latents)
        timesteps, sigmas = self.sigmas_for(generators, device)
        sigmas = sigmas.to(latents.dtype).view(-1, 1, 1, 1)
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        weighting = compute_loss_weighting_for_sd3(weighting_scheme=self.args.weighting_scheme, sigmas=sigmas)
        target, extras = noise - latents, {"sigmas": sigmas}
        if self.preconditioned():  # SD3's EDM-style preconditioning: the prediction becomes x0's estimate
            target = latents
        return NoisyInputs(noisy, timesteps, target, weighting.view(-1).float(), extras)

    def preconditioned(self) -> bool:
        return False


    def kohya_training_comment(self):
        advice = self.inference_advice()
        return f"{self.label}: try LoRA scale {advice['scale']}, {advice['steps']} steps, guidance {advice['guidance']}"

    def kohya_version_fields(self):
        return {"ss_v2": "False", "ss_v_parameterization": "False"}

    def kohya_file_readers(self):
        return ("ComfyUI also reads the diffusers file; diffusers `load_lora_weights` reads this one too"
                if self.diffusers_reads_kohya_file else
                "ComfyUI also reads the diffusers file; diffusers does not read this one")

    def card_sampling_note(self):
        advice = self.inference_advice()
        note = (f"Try LoRA scale {advice['scale']} (0.3-1.0), {advice['steps']} steps, guidance {advice['guidance']}; "
                "the FairHuman authors' settings (scale 0.3, UniPC, CFG 7.5) are for SDXL.")
        warning = self.distilled_warning()
        return note + (f"\n\n**Trained on a distilled checkpoint.** {warning}" if warning else "")

    def card_code(self, prediction):
        return "", "bfloat16", ""

    def a1111_usage(self, kohya_file, output_name):
        return ""

    def sampling_scheduler(self, scheduler, prediction_type=None):
        return scheduler  # the pipeline's own flow-matching Euler scheduler
    # ---- memory model (memory_estimate.py) ------------------------------------------------------------------
    denoiser_label = "transformer"
    scheduler_class_name = "FlowMatchEulerDiscreteScheduler"

    def text_encoders_in_step(self, args) -> bool:
        return False  # every caption is embedded once before training (caption_conditioning)

    def large_text_encoders(self) -> list:
        return self.text_encoders[-1:]  # T5-XXL

    def memory_advice(self, args, phase):
        advice = super().memory_advice(args, phase)
        if phase == "caption" and args.quantize_text_encoders in (None, "none"):
            advice.insert(0, "--quantize_text_encoders nf4")
        if phase == "caption":
            advice.append(f"a lower --max_sequence_length than {args.max_sequence_length}"
                          if args.max_sequence_length else "a lower --max_sequence_length")
        if phase in ("step", "validation", "evaluation") and args.quantize_base in (None, "none"):
            advice.insert(0, "--quantize_base nf4")
        return [flag for flag in advice if not flag.startswith("--cache_text_embeddings")]


class FluxFamily(FlowMatchingFamily):
    """FLUX.1 (dev, schnell and fine-tunes of the same layout): CLIP-L pooled + T5, 2x2 packed latents, the
    guidance embedding (``--guidance_scale``, default 1.0: kohya's FLUX.1 docs and diffusers' QLoRA FLUX example
    train the guidance-distilled dev model at 1.0; diffusers' DreamBooth example uses 3.5)."""

    name = "flux1"
    label = "FLUX.1"
    pipeline_class_names = ("FluxPipeline",)
    pipeline_class_name = "FluxPipeline"
    denoiser_class_name = "FluxTransformer2DModel"
    default_weighting_scheme = "none"  # train_dreambooth_lora_flux.py's default
    default_max_sequence_length = 512
    tags = ("flux", "flux-diffusers")

    def family_flags(self):
        guidance = {} if self.schnell() else {"guidance_scale": 1.0}  # schnell has no guidance embedding
        return {**super().family_flags(), **guidance}

    def training_settings(self) -> dict:
        if self.schnell():
            return super().training_settings()
        return {**super().training_settings(), "guidance_scale": self.args.guidance_scale}

    def patch_size(self):  # 2x2 packing of the latent grid into tokens
        return 2

    def load_text_models(self, device, weight_dtype):
        from transformers import CLIPTextModel, T5EncoderModel

        self.tokenizers = [self.auto_tokenizer("tokenizer"), self.auto_tokenizer("tokenizer_2")]
        self.text_encoders = [self.text_encoder_from_pretrained(CLIPTextModel, "text_encoder", device, weight_dtype),
                              self.text_encoder_from_pretrained(T5EncoderModel, "text_encoder_2", device, weight_dtype,
                                                                large=True)]

    def text_pipeline(self):
        from diffusers import FluxPipeline

        return FluxPipeline(scheduler=None, vae=None, text_encoder=self.text_encoders[0], tokenizer=self.tokenizers[0],
                            text_encoder_2=self.text_encoders[1], tokenizer_2=self.tokenizers[1], transformer=None)

    def encode_captions(self, captions, device):
        embeds, pooled, _ = self.text_pipeline().encode_prompt(captions, prompt_2=None, device=device,
                                                               max_sequence_length=self.args.max_sequence_length)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def predict(self, transformer, inputs):
        """Pack (B, C, h, w) into (B, h/2 * w/2, 4C) tokens, run the transformer with the guidance embedding,
        unpack the prediction back onto the latent grid (packing is a permutation: the losses see cells)."""
        from diffusers import FluxPipeline

        x = inputs.model_input
        b, c, h, w = x.shape
        packed = FluxPipeline._pack_latents(x, b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
        text = inputs.conditioning["encoder_hidden_states"]
        txt_ids = torch.zeros(text.shape[1], 3, device=x.device, dtype=x.dtype)
        config = getattr(transformer, "config", None) or transformer.module.config
        guidance = torch.full((b,), self.args.guidance_scale, device=x.device) if config.guidance_embeds else None
        pred = transformer(hidden_states=packed, timestep=inputs.timesteps / 1000, guidance=guidance,
                           pooled_projections=inputs.conditioning["pooled_projections"], encoder_hidden_states=text,
                           txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        factor = self.vae_factor()
        return FluxPipeline._unpack_latents(pred, height=h * factor, width=w * factor, vae_scale_factor=factor)

    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def embeds_call_kwargs(self, embeds, negative):  # no classifier-free guidance: no negative
        return dict(prompt_embeds=embeds["encoder_hidden_states"], pooled_prompt_embeds=embeds["pooled_projections"])

    def schnell(self) -> bool:
        return not self.denoiser_config().get("guidance_embeds", True)

    def modelspec_architecture(self):
        return "flux-1-schnell" if self.schnell() else "flux-1-dev"

    def network_module(self):
        return "networks.lora_flux"

    def inference_advice(self):
        if self.schnell():
            return dict(scale=0.5, steps=4, guidance=0.0, sampler="Euler (flow matching)", comfy_sampler="euler")
        return dict(scale=0.5, steps=28, guidance=3.5, sampler="Euler (flow matching)", comfy_sampler="euler")

    def comfyui_guidance(self):
        return f"cfg 1.0 with a FluxGuidance node at {self.inference_advice()['guidance']}"
    # ---- memory model (memory_estimate.py) ------------------------------------------------------------------
    cfg_sampling = False  # FLUX.1's guidance is an embedding: one row per image


class Flux2KleinFamily(FlowMatchingFamily):
    """FLUX.2 klein (4B and 9B, base and step-distilled; one class, the sizes read from the configs), as diffusers'
    ``train_dreambooth_lora_flux2_klein.py``: Qwen3 hidden states of layers 9, 18 and 27 stacked per token (the
    pipeline's ``encode_prompt``, its chat template), 4-axis text and image ids, no guidance input; the 32-channel
    ``AutoencoderKLFlux2`` latents patchified 2x2 to 128 channels at H/16 and normalised by the VAE's batch-norm
    running statistics. The noisy input, target and prediction live on the H/8 grid (patchify and unpatchify are
    a permutation of latent cells), so the region masks apply there and the global loss is the example's."""

    name = "flux2_klein"
    label = "FLUX.2 klein"
    pipeline_class_names = ("Flux2KleinPipeline",)
    pipeline_class_name = "Flux2KleinPipeline"
    denoiser_class_name = "Flux2Transformer2DModel"
    vae_class_name = "AutoencoderKLFlux2"
    default_weighting_scheme = "none"  # train_dreambooth_lora_flux2_klein.py's default
    default_max_sequence_length = 512  # the example's and the pipeline's default
    diffusers_reads_kohya_file = False  # Flux2KleinPipeline.load_lora_weights reads the diffusers file
    tags = ("flux2", "flux2-klein", "flux2-diffusers")
    base_checkpoints = {3072: "black-forest-labs/FLUX.2-klein-base-4B", 4096: "black-forest-labs/FLUX.2-klein-base-9B"}

    @property
    def default_lora_targets(self) -> str:
        """The example's targets: the double blocks' image attention (``to_q``, ``to_k``, ``to_v``, ``to_out.0``),
        the single blocks' fused ``to_qkv_mlp_proj`` and, by name (a bare ``attn.to_out`` would also match the
        double blocks' ``to_out`` list), every single block's ``attn.to_out``."""
        singles = int(self.denoiser_config()["num_single_layers"])
        return ",".join(["to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj",
                         *(f"single_transformer_blocks.{i}.attn.to_out" for i in range(singles))])

    def family_flags(self):
        """The klein transformers have no guidance embedding (``guidance_embeds`` false): --guidance_scale is
        refused unless a config says otherwise."""
        guidance = {"guidance_scale": 1.0} if self.denoiser_config().get("guidance_embeds", False) else {}
        return {**super().family_flags(), **guidance}

    def size_label(self) -> str:
        config = self.denoiser_config()
        inner = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
        return {3072: "4b", 4096: "9b"}.get(inner, f"{inner}-wide")

    def distilled(self) -> bool:
        return bool(self.model_index.get("is_distilled", False))

    def distilled_warning(self):
        if not self.distilled():
            return ""
        config = self.denoiser_config()
        base = self.base_checkpoints.get(int(config["num_attention_heads"]) * int(config["attention_head_dim"]),
                                         "the base (non-distilled) FLUX.2 klein checkpoint of this size")
        return (f"--pretrained_model_name_or_path: {self.path!r} is a step-distilled FLUX.2 klein checkpoint "
                f"(model_index.json is_distilled: true). LoRAs trained on the distilled klein give grey images: "
                f"train on {base} (the base model) and use the LoRA with either")

    def caption_token_limits(self):
        return [(self.tokenizers[0], self.args.max_sequence_length, "Qwen3 text encoder", "--max_sequence_length")]

    def load_text_models(self, device, weight_dtype):
        """One Qwen3 LLM and its tokenizer."""
        from transformers import Qwen3ForCausalLM

        self.load_one_large_text_encoder(Qwen3ForCausalLM, device, weight_dtype)

    def text_pipeline(self):
        from diffusers import Flux2KleinPipeline

        return Flux2KleinPipeline(scheduler=None, vae=None, text_encoder=self.text_encoders[0],
                                  tokenizer=self.tokenizers[0], transformer=None)

    def encode_captions(self, captions, device):
        embeds, _ = self.text_pipeline().encode_prompt(captions, device=device,
                                                      max_sequence_length=self.args.max_sequence_length)
        return {"encoder_hidden_states": embeds}

    def normalize_latents(self, latents):
        """The posterior sample patchified 2x2, normalised with the VAE's batch-norm running statistics (as the
        example and the pipeline), and unpatchified back onto the H/8 grid."""
        from diffusers import Flux2KleinPipeline as Pipe

        patches = Pipe._patchify_latents(latents)
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(patches)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(patches)
        return Pipe._unpatchify_latents((patches - mean) / std)

    def predict(self, transformer, inputs):
        """Patchify (B, C, h, w) to (B, 4C, h/2, w/2), pack to tokens with 4-axis ids, run the transformer, scatter
        the tokens back by their ids and unpatchify onto the H/8 grid."""
        from diffusers import Flux2KleinPipeline as Pipe

        patches = Pipe._patchify_latents(inputs.model_input)
        img_ids = Pipe._prepare_latent_ids(patches).to(patches.device)
        text = inputs.conditioning["encoder_hidden_states"]
        txt_ids = Pipe._prepare_text_ids(text).to(text.device)
        config = getattr(transformer, "config", None) or transformer.module.config
        b = patches.shape[0]
        guidance = torch.full((b,), self.args.guidance_scale, device=patches.device) if config.guidance_embeds else None
        pred = transformer(hidden_states=Pipe._pack_latents(patches), encoder_hidden_states=text,
                           timestep=inputs.timesteps / 1000, img_ids=img_ids, txt_ids=txt_ids, guidance=guidance,
                           return_dict=False)[0]
        return Pipe._unpatchify_latents(Pipe._unpack_latents_with_ids(pred, img_ids, *patches.shape[-2:]))

    def native_resolution(self, vae_config, vae_factor):
        return 1024  # the klein models' native size (the VAE config's sample_size is not it)

    def embeds_call_kwargs(self, embeds, negative):
        """The negative only where it samples with CFG (the distilled klein: none stored)."""
        return dict(prompt_embeds=embeds["encoder_hidden_states"],
                    negative_prompt_embeds=negative and negative["encoder_hidden_states"])

    def modelspec_architecture(self):
        return f"flux-2-klein-{self.size_label()}"

    def negative_prompt_kwargs(self, negative_prompt, count):
        """Flux2KleinPipeline's call takes no negative prompt (its CFG uses the empty prompt)."""
        if negative_prompt:
            raise UsageError(f"--negative_prompt: {self.pipeline_class_name} takes no negative prompt; leave it out")
        return {}

    @property
    def cfg_sampling(self) -> bool:  # memory model: the distilled klein samples at guidance 1 (one row per image)
        return not self.distilled()

    def inference_advice(self):
        if self.distilled():
            return dict(scale=0.5, steps=4, guidance=1.0, sampler="Euler (flow matching)", comfy_sampler="euler")
        return dict(scale=0.5, steps=50, guidance=4.0, sampler="Euler (flow matching)", comfy_sampler="euler")


class ChromaFamily(FluxFamily):
    """Chroma (8.9B, FLUX.1-schnell-derived): FLUX.1's VAE latents and 2x2 packing, T5 only (no CLIP, no pooled
    embedding), no guidance input (a distilled guidance approximator sits inside), and T5's attention mask, as
    the pipeline builds it (every token up to the first padding token), extended with ones over the image tokens.
    diffusers has no Chroma example; it trains as the FLUX.1 example (its targets, weighting and noising)."""

    name = "chroma"
    label = "Chroma"
    pipeline_class_names = ("ChromaPipeline",)
    pipeline_class_name = "ChromaPipeline"
    denoiser_class_name = "ChromaTransformer2DModel"
    tags = ("chroma", "flux-diffusers")

    def family_flags(self):
        return FlowMatchingFamily.family_flags(self)  # no guidance embedding: --guidance_scale is refused

    def training_settings(self):
        return FlowMatchingFamily.training_settings(self)  # no guidance input

    def caption_token_limits(self):
        return [(self.tokenizers[0], self.args.max_sequence_length, "T5 text encoder", "--max_sequence_length")]

    def load_text_models(self, device, weight_dtype):
        """T5 only and its tokenizer."""
        from transformers import T5EncoderModel

        self.load_one_large_text_encoder(T5EncoderModel, device, weight_dtype)

    def text_pipeline(self):
        from diffusers import ChromaPipeline

        return ChromaPipeline(scheduler=None, vae=None, text_encoder=self.text_encoders[0], tokenizer=self.tokenizers[0],
                              transformer=None)

    def encode_captions(self, captions, device):
        embeds, _, mask, *_ = self.text_pipeline().encode_prompt(
            captions, negative_prompt=None, device=device, do_classifier_free_guidance=False,
            max_sequence_length=self.args.max_sequence_length)
        return {"encoder_hidden_states": embeds, "attention_mask": mask}

    def predict(self, transformer, inputs):
        """Pack to 2x2 tokens, the text mask extended with ones over the image tokens, no guidance, no pooled
        embedding; the prediction unpacked onto the latent grid."""
        from diffusers import ChromaPipeline as Pipe

        x = inputs.model_input
        b, c, h, w = x.shape
        packed = Pipe._pack_latents(x, b, c, h, w)
        img_ids = Pipe._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
        text, mask = inputs.conditioning["encoder_hidden_states"], inputs.conditioning["attention_mask"]
        txt_ids = torch.zeros(text.shape[1], 3, device=x.device, dtype=x.dtype)
        mask = torch.cat([mask.bool(), torch.ones(b, packed.shape[1], device=mask.device, dtype=torch.bool)], dim=1)
        pred = transformer(hidden_states=packed, timestep=inputs.timesteps / 1000, encoder_hidden_states=text,
                           txt_ids=txt_ids, img_ids=img_ids, attention_mask=mask, return_dict=False)[0]
        factor = self.vae_factor()
        return Pipe._unpack_latents(pred, height=h * factor, width=w * factor, vae_scale_factor=factor)

    def embeds_call_kwargs(self, embeds, negative):
        return dict(prompt_embeds=embeds["encoder_hidden_states"], prompt_attention_mask=embeds["attention_mask"],
                    negative_prompt_embeds=negative["encoder_hidden_states"],
                    negative_prompt_attention_mask=negative["attention_mask"])

    def schnell(self):
        return False

    def modelspec_architecture(self):
        return "chroma"

    def inference_advice(self):
        return dict(scale=0.5, steps=26, guidance=4.0, sampler="Euler (flow matching)", comfy_sampler="euler")

    def comfyui_guidance(self):
        return ModelFamily.comfyui_guidance(self)  # real classifier-free guidance, no FluxGuidance node
    # ---- memory model (memory_estimate.py) ------------------------------------------------------------------
    cfg_sampling = True  # classifier-free guidance: the transformer sees 2 rows per image


class SD3Family(FlowMatchingFamily):
    """SD3 / SD3.5: CLIP-L + CLIP-G + T5, patchified inside the transformer, logit-normal timesteps and
    ``--precondition_outputs`` as diffusers' SD3 example (prediction * (-sigma) + noisy, target x0)."""

    name = "sd3"
    label = "SD3"
    pipeline_class_names = ("StableDiffusion3Pipeline",)
    pipeline_class_name = "StableDiffusion3Pipeline"
    denoiser_class_name = "SD3Transformer2DModel"
    default_weighting_scheme = "logit_normal"  # train_dreambooth_lora_sd3.py's default
    default_max_sequence_length = 77  # train_dreambooth_lora_sd3.py's default
    diffusers_reads_kohya_file = False  # StableDiffusion3Pipeline.load_lora_weights finds no key in lora_transformer_*
    tags = ("sd3", "sd3-diffusers")

    def family_flags(self):
        return {**super().family_flags(), "precondition_outputs": 1}

    def training_settings(self) -> dict:
        return {**super().training_settings(), "precondition_outputs": self.args.precondition_outputs}

    def max_image_side(self):
        """SD3's position embedding covers ``pos_embed_max_size`` patches per side."""
        config = self.denoiser_config()
        vae_factor = self.geometry()[0]
        return config["pos_embed_max_size"] * config["patch_size"] * vae_factor, "pos_embed_max_size"
    def patch_size(self):
        return int(self.denoiser_config().get("patch_size", 2))

    def native_resolution(self, vae_config, vae_factor):
        return int(self.denoiser_config()["sample_size"]) * vae_factor

    def preconditioned(self):
        return bool(self.args.precondition_outputs)

    def load_text_models(self, device, weight_dtype):
        from transformers import CLIPTextModelWithProjection, T5EncoderModel

        self.tokenizers = [self.auto_tokenizer(f"tokenizer{s}") for s in ("", "_2", "_3")]
        self.text_encoders = [self.text_encoder_from_pretrained(CLIPTextModelWithProjection, f"text_encoder{s}", device,
                                                                weight_dtype) for s in ("", "_2")]
        self.text_encoders.append(self.text_encoder_from_pretrained(T5EncoderModel, "text_encoder_3", device,
                                                                    weight_dtype, large=True))

    def text_pipeline(self):
        from diffusers import StableDiffusion3Pipeline

        te, tok = self.text_encoders, self.tokenizers
        return StableDiffusion3Pipeline(scheduler=None, vae=None, transformer=None, text_encoder=te[0], tokenizer=tok[0],
                                        text_encoder_2=te[1], tokenizer_2=tok[1], text_encoder_3=te[2],
                                        tokenizer_3=tok[2])

    def encode_captions(self, captions, device):
        embeds, _, pooled, _ = self.text_pipeline().encode_prompt(
            captions, prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=False,
            max_sequence_length=self.args.max_sequence_length)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def predict(self, transformer, inputs):
        pred = transformer(hidden_states=inputs.model_input, timestep=inputs.timesteps,
                           encoder_hidden_states=inputs.conditioning["encoder_hidden_states"],
                           pooled_projections=inputs.conditioning["pooled_projections"], return_dict=False)[0]
        if self.preconditioned():
            pred = pred * (-inputs.extras["sigmas"]) + inputs.model_input
        return pred

    def embeds_call_kwargs(self, embeds, negative):
        return dict(prompt_embeds=embeds["encoder_hidden_states"], pooled_prompt_embeds=embeds["pooled_projections"],
                    negative_prompt_embeds=negative["encoder_hidden_states"],
                    negative_pooled_prompt_embeds=negative["pooled_projections"])

    def modelspec_architecture(self):
        return "stable-diffusion-3"

    def network_module(self):
        return "networks.lora_sd3"

    def inference_advice(self):
        return dict(scale=0.5, steps=28, guidance=4.5, sampler="Euler (flow matching)", comfy_sampler="euler")


# =================================================================================================
# Z-Image and Qwen-Image (as diffusers' train_dreambooth_lora_{z_image,qwen_image}.py): Qwen text encoders whose
# caption embeddings keep only the caption's own tokens (each its own length: padded per batch, with a mask)
# =================================================================================================


class QwenTextFamily(FlowMatchingFamily):
    """What Z-Image and Qwen-Image share: one Qwen text encoder behind a chat template, caption embeddings of
    the caption's own length (``encoder_hidden_states`` zero-padded per batch, ``encoder_hidden_states_mask``
    marking the real tokens; the per-row cache keeps each caption at its own length), no kohya file (ComfyUI
    reads these families' diffusers file, ``transformer.{module}`` keys, and not ``lora_transformer_*``:
    the card points ComfyUI at the diffusers file), the example's default weighting ``none``."""

    kohya_prefix = None
    default_weighting_scheme = "none"
    text_encoder_class_name = ""  # the transformers class of text_encoder/
    text_encoder_label = ""

    def check_args(self, args):
        if args.save_lora_format == "kohya":
            raise UsageError(f"--save_lora_format kohya: {self.label} has no kohya-format file (ComfyUI reads its "
                             "diffusers file, pytorch_lora_weights.safetensors, and not lora_transformer_* keys); use "
                             "--save_lora_format diffusers")
        super().check_args(args)

    def load_text_models(self, device, weight_dtype):
        """The Qwen LLM (:attr:`text_encoder_class_name`) and its tokenizer."""
        import transformers

        self.load_one_large_text_encoder(getattr(transformers, self.text_encoder_class_name), device, weight_dtype)

    def template_tokens(self) -> int:
        """Tokens the prompt template adds around a caption (they count against --max_sequence_length)."""
        return 0

    def caption_token_limits(self) -> list[tuple]:
        """The text encoder's ``--max_sequence_length`` tokens, less the template's own tokens."""
        limit = self.args.max_sequence_length - self.template_tokens()
        return [(self.tokenizers[0], max(limit, 1), f"{self.text_encoder_label} text encoder", "--max_sequence_length")]

    def text_pipeline(self):
        return self.pipeline_class()(scheduler=None, vae=None, text_encoder=self.text_encoders[0],
                                     tokenizer=self.tokenizers[0], transformer=None)

    @staticmethod
    def padded(embeds: list) -> dict[str, torch.Tensor]:
        """Per-caption embeddings ``(L_i, D)`` -> ``encoder_hidden_states`` (B, L, D) and its mask (B, L)."""
        mask = fh.pad_stack([torch.ones(len(e), dtype=torch.bool, device=e.device) for e in embeds])
        return {"encoder_hidden_states": fh.pad_stack(embeds), "encoder_hidden_states_mask": mask}

    def inference_advice(self):
        return dict(scale=0.5, steps=28, guidance=4.0, sampler="Euler (flow matching)", comfy_sampler="euler")

    def diffusers_file_readers(self):
        return (f"diffusers `load_lora_weights`; ComfyUI: `models/loras/` (ComfyUI's {self.label} key map reads these "
                "`transformer.*` keys and not `lora_transformer_*`, so no kohya file is written)")


class ZImageFamily(QwenTextFamily):
    """Z-Image (Base; Turbo is its distilled 8-step checkpoint): a Qwen3 encoder read at ``hidden_states[-2]``
    behind its chat template (``enable_thinking=True``), FLUX.1's VAE, a transformer that takes and returns lists
    of per-image ``(C, 1, h, w)`` tensors at the reversed time ``(1000 - t) / 1000`` and predicts ``x0 - noise``
    (negated here: the target is ``noise - x0``, as diffusers' example)."""

    name = "zimage"
    label = "Z-Image"
    pipeline_class_names = ("ZImagePipeline",)
    pipeline_class_name = "ZImagePipeline"
    denoiser_class_name = "ZImageTransformer2DModel"
    text_encoder_class_name = "Qwen3Model"
    text_encoder_label = "Qwen3"
    # the example's to_q/to_k/to_v/to_out.0, under the attention of the main layers and both refiners
    default_lora_targets = "attention.to_q,attention.to_k,attention.to_v,attention.to_out.0"
    attention_prefixes = ("attention.",)
    tags = ("z-image", "z-image-diffusers")
    base_checkpoint = "Tongyi-MAI/Z-Image"

    def distilled(self) -> bool:
        """Z-Image Turbo's configs equal the base model's: the checkpoint's name is what tells them apart."""
        return "turbo" in str(self.path).lower()

    def distilled_warning(self):
        if not self.distilled():
            return ""
        return (f"{self.path!r} looks like Z-Image Turbo, the few-step DISTILLED checkpoint: a LoRA trained on it "
                f"trains against the distillation (its few-step images drift as the LoRA learns). Train on the base "
                f"checkpoint {self.base_checkpoint} and apply the LoRA to either.")

    def patch_size(self):
        return int(self.denoiser_config()["all_patch_size"][0])

    def template_tokens(self):
        tokenizer = self.tokenizers[0]
        text = tokenizer.apply_chat_template([{"role": "user", "content": ""}], tokenize=False,
                                             add_generation_prompt=True, enable_thinking=True)
        return len(tokenizer(text).input_ids)

    def encode_captions(self, captions, device):
        """The pipeline's own ``encode_prompt``: each caption's unmasked tokens, padded here with a mask."""
        embeds, _ = self.text_pipeline().encode_prompt(list(captions), device=device, do_classifier_free_guidance=False,
                                                       max_sequence_length=self.args.max_sequence_length)
        return self.padded(embeds)

    @staticmethod
    def caption_list(cond) -> list:
        return [e[m] for e, m in zip(cond["encoder_hidden_states"], cond["encoder_hidden_states_mask"].bool())]

    def predict(self, transformer, inputs):
        x = inputs.model_input
        out = transformer(list(x.unsqueeze(2).unbind(0)), (1000 - inputs.timesteps) / 1000,
                          self.caption_list(inputs.conditioning), return_dict=False)[0]
        return -torch.stack(out).squeeze(2)

    def embeds_call_kwargs(self, embeds, negative):
        """Per-image lists of the captions' own tokens; the negative only where it samples with CFG (not Turbo)."""
        return dict(prompt_embeds=self.caption_list(embeds),
                    negative_prompt_embeds=negative and self.caption_list(negative))

    def modelspec_architecture(self):
        return "z-image-turbo" if self.distilled() else "z-image"

    @property
    def cfg_sampling(self) -> bool:  # memory model: Turbo samples without guidance (one row per image)
        return not self.distilled()

    def inference_advice(self):
        if self.distilled():
            return dict(scale=0.5, steps=9, guidance=0.0, sampler="Euler (flow matching)", comfy_sampler="euler")
        return super().inference_advice()


class QwenImageFamily(QwenTextFamily):
    """Qwen-Image: a Qwen2.5-VL encoder behind a system-prompt template (its first tokens dropped), the last
    hidden states with the prompt mask; AutoencoderKLQwenImage (5-D latents of one frame, normalised per channel
    by the config's ``latents_mean`` / ``latents_std``), latents packed 2x2 into tokens with ``img_shapes``."""

    name = "qwen_image"
    label = "Qwen-Image"
    pipeline_class_names = ("QwenImagePipeline",)
    pipeline_class_name = "QwenImagePipeline"
    denoiser_class_name = "QwenImageTransformer2DModel"
    vae_class_name = "AutoencoderKLQwenImage"
    text_encoder_class_name = "Qwen2_5_VLForConditionalGeneration"
    text_encoder_label = "Qwen2.5-VL"
    default_lora_targets = "to_k,to_q,to_v,to_out.0"  # train_dreambooth_lora_qwen_image.py's
    max_sequence_length_limit = (1024, "QwenImagePipeline")
    tags = ("qwen-image", "qwen-image-diffusers")

    def geometry(self):
        """The VAE's spatial factor is 2 ** (its downsamplings, ``len(temperal_downsample)``), x 2 for the packing."""
        vae_factor = 2 ** len(self.vae_config()["temperal_downsample"])
        step = vae_factor * int(self.denoiser_config().get("patch_size", 2))
        return vae_factor, step, step, 1024

    def patch_size(self):
        return int(self.denoiser_config().get("patch_size", 2))

    def latent_distribution(self, pixel_values):
        """The video VAE on one frame: ``(B, 3, 1, H, W)`` in, the frame axis dropped from the posterior."""
        latent_dist = self.vae.encode(pixel_values.unsqueeze(2)).latent_dist
        return latent_dist.mean.squeeze(2), latent_dist.std.squeeze(2)

    def latent_channels(self):
        return int(self.vae.config.z_dim)

    def memory_captions(self, device):
        """QwenImagePipeline.encode_prompt splits its hidden states by the mask's lengths (values fake tensors lack):
        the encoder's last hidden states at the template's full length instead, the template's tokens dropped."""
        drop = self.text_pipeline().prompt_template_encode_start_idx
        ids = torch.zeros(1, self.args.max_sequence_length + drop, dtype=torch.long, device=device)
        hidden = self.text_encoders[0](input_ids=ids, attention_mask=torch.ones_like(ids),
                                       output_hidden_states=True).hidden_states[-1]
        return self.padded([hidden[0, drop:]])

    def decode_latents(self, latents):
        return self.vae.decode(latents.unsqueeze(2)).sample.squeeze(2)  # one frame of the video VAE

    def normalize_latents(self, latents):
        config = self.vae.config
        mean = torch.tensor(config.latents_mean, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
        std = torch.tensor(config.latents_std, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
        return (latents - mean) / std

    def encode_captions(self, captions, device):
        """The pipeline's own ``encode_prompt`` (template, the dropped template tokens, ``hidden_states[-1]``);
        its mask (None when every token is real) made explicit, and each caption cut to its own tokens."""
        embeds, mask = self.text_pipeline().encode_prompt(list(captions), device=device,
                                                          max_sequence_length=self.args.max_sequence_length)
        mask = torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device) if mask is None else mask.bool()
        return self.padded([e[m] for e, m in zip(embeds, mask)])

    def predict(self, transformer, inputs):
        from diffusers import QwenImagePipeline

        x = inputs.model_input
        b, c, h, w = x.shape
        cond = inputs.conditioning
        pred = transformer(hidden_states=QwenImagePipeline._pack_latents(x, b, c, h, w),
                           timestep=inputs.timesteps / 1000, guidance=None,
                           encoder_hidden_states=cond["encoder_hidden_states"],
                           encoder_hidden_states_mask=cond["encoder_hidden_states_mask"],
                           img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]
        factor = 2 ** len(self.vae.config.temperal_downsample)
        return QwenImagePipeline._unpack_latents(pred, h * factor, w * factor, factor).squeeze(2)

    def embeds_call_kwargs(self, embeds, negative):
        return dict(prompt_embeds=embeds["encoder_hidden_states"],
                    prompt_embeds_mask=embeds["encoder_hidden_states_mask"],
                    negative_prompt_embeds=negative["encoder_hidden_states"],
                    negative_prompt_embeds_mask=negative["encoder_hidden_states_mask"])

    def guidance_call_kwargs(self, guidance):
        """QwenImagePipeline's classifier-free guidance is ``true_cfg_scale`` (its ``guidance_scale`` is for
        guidance-distilled transformers only)."""
        return {"true_cfg_scale": guidance}

    def card_call_kwargs(self, guidance):
        return {"negative_prompt": " ", **self.guidance_call_kwargs(guidance)}

    def negative_prompt_kwargs(self, negative_prompt, count):
        """True CFG runs only with a negative prompt: " " when none is given (diffusers' Qwen-Image example's)."""
        return {"negative_prompt": [negative_prompt or " "] * count}

    def modelspec_architecture(self):
        return "qwen-image"

    def template_tokens(self):
        pipeline = self.text_pipeline()
        template = pipeline.prompt_template_encode
        return max(len(self.tokenizers[0](template.format("")).input_ids) - pipeline.prompt_template_encode_start_idx, 0)


FAMILIES = [StableDiffusionFamily, StableDiffusionXLFamily, FluxFamily, SD3Family, ZImageFamily, QwenImageFamily,
            Flux2KleinFamily, ChromaFamily]


def family_for_model(args) -> ModelFamily:
    """The family of ``--pretrained_model_name_or_path`` from its ``model_index.json`` ``_class_name`` (no weights
    read). An unknown class is a :class:`UsageError` naming it and the known ones."""
    config = _model_index(args.pretrained_model_name_or_path, args.revision, args.cache_dir)
    class_name = config.get("_class_name")
    family_class = next((f for f in FAMILIES if class_name in f.pipeline_class_names), None)
    if family_class is None and class_name is None and "unet" in config:  # an older SD folder without _class_name
        family_class = StableDiffusionXLFamily if "text_encoder_2" in config else StableDiffusionFamily
    if family_class is None:
        known = ", ".join(f"{f.label} ({', '.join(f.pipeline_class_names)})" for f in FAMILIES)
        raise UsageError(f"--pretrained_model_name_or_path: {args.pretrained_model_name_or_path!r} is a {class_name!r} "
                         f"model (model_index.json _class_name); this script trains {known}")
    family = family_class(args)
    family.model_index = config  # read once
    return family


def family_for_pipeline(pipeline, args) -> ModelFamily | None:
    """The family of a loaded diffusers pipeline (by its class), or None for a pipeline this script does not
    train; ``args`` as for :func:`family_for_model`."""
    name = type(pipeline).__name__
    return next((family(args) for family in FAMILIES if name in family.pipeline_class_names), None)


def _bnb_config(config_class, mode: str | None, compute_dtype):
    if mode in (None, "none"):
        return None
    if mode == "nf4":
        return config_class(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    return config_class(load_in_8bit=True)  # LLM.int8 computes in its input's dtype


def quantization_config(mode: str | None, compute_dtype=torch.float32):
    """diffusers' ``BitsAndBytesConfig`` for ``--quantize_base`` (the denoiser's linear layers; the LoRA on top
    stays in full precision), or None. NF4 computes in ``compute_dtype``: the run's precision (fp32 without mixed
    precision, fp16 / bf16 under fp16 / bf16)."""
    from diffusers import BitsAndBytesConfig

    return _bnb_config(BitsAndBytesConfig, mode, compute_dtype)


def text_quantization_config(mode: str | None, compute_dtype=torch.float32):
    """transformers' ``BitsAndBytesConfig`` for ``--quantize_text_encoders`` (the large text encoders), or None."""
    from transformers import BitsAndBytesConfig

    return _bnb_config(BitsAndBytesConfig, mode, compute_dtype)


def keep_4bit_layers_trainable_on_cpu(model) -> int:
    """Turn off bitsandbytes' AVX512-BF16 CPU inference path on every ``Linear4bit`` of ``model``: it repacks the
    NF4 weights in place on an eval/no-grad forward (validation images, a quantized text encoder's caption pass),
    which fails for layers whose sizes are not multiples of 64/32 and breaks every later training forward. No
    effect on a GPU. Returns the count."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def check_quantize_available(args) -> None:
    """``--quantize_base`` / ``--quantize_text_encoders`` need bitsandbytes and a device the library that loads
    the model quantizes on: asked of that library's own bitsandbytes quantizer (diffusers': a CUDA or XPU GPU;
    transformers': any bitsandbytes backend, its CPU one included), before any weight loads."""
    for flag, library, make_config in (("quantize_base", "diffusers", quantization_config),
                                       ("quantize_text_encoders", "transformers", text_quantization_config)):
        mode = getattr(args, flag, None)
        if mode in (None, "none"):
            continue
        try:
            import bitsandbytes  # noqa: F401 - only whether it imports
        except ImportError:
            raise UsageError(f"--{flag} {mode} needs bitsandbytes: pip install bitsandbytes") from None
        if library == "diffusers":
            from diffusers.quantizers import DiffusersAutoQuantizer as AutoQuantizer
        else:
            from transformers.quantizers import AutoHfQuantizer as AutoQuantizer
        try:
            AutoQuantizer.from_config(make_config(mode)).validate_environment(device_map=None)
        except Exception as error:  # noqa: BLE001 - ImportError / RuntimeError / ValueError: it cannot quantize here
            raise UsageError(f"--{flag} {mode}: {library}' bitsandbytes quantization cannot run here ({error}); "
                             f"train without it (--{flag} none)") from None
