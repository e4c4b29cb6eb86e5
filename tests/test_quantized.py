"""The consumer-card path on this CPU (issue 26): staged loading, --quantize_base nf4/int8, --quantize_text_encoders.

The 4-bit / 8-bit base runs here with only the GPU-presence probes answered yes (``bnb_on_cpu``): diffusers'
bitsandbytes quantizers' ``validate_environment`` / ``update_device_map`` (the script's own check asks the first).
Everything else runs as on a GPU: diffusers' module replacement and weight loading, bitsandbytes quantizing on its
CPU backend, peft's LoRA over ``Linear4bit`` / ``Linear8bitLt``, the fair per-objective passes, checkpoints, resume,
validation through the pipeline, the LoRA files. The CUDA kernels themselves are not what runs.
"""

import gc
import os
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_lora_loads_whole_and_changes_the_image, lora_tensors, run_main
from PIL import Image

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")

import model_families as mf  # noqa: E402
import train_fairhuman_lora as train  # noqa: E402

QUANTIZED = {"nf4": "Linear4bit", "int8": "Linear8bitLt"}
QUANT_WORDS = ("base_layer", "absmax", "quant_map", "quant_state", "nested_", "SCB", "weight_format", "bitsandbytes")
PROMPT = "a photo of a person waving"


@pytest.fixture
def bnb_on_cpu(monkeypatch):
    """diffusers' bitsandbytes quantizers accept this CPU-only machine: the GPU probes answer yes, nothing else."""
    if torch.cuda.is_available():
        return
    from diffusers.quantizers.bitsandbytes import bnb_quantizer as quantizers

    for cls in (quantizers.BnB4BitDiffusersQuantizer, quantizers.BnB8BitDiffusersQuantizer):
        def validate_environment(self, *args, _original=cls.validate_environment, **kwargs):
            with monkeypatch.context() as m:  # its version checks still run
                m.setattr(torch.cuda, "is_available", lambda: True)
                return _original(self, *args, **{**kwargs, "device_map": None})

        def update_device_map(self, device_map, _original=cls.update_device_map):
            return {"": "cpu"} if device_map is None else _original(self, device_map)

        monkeypatch.setattr(cls, "validate_environment", validate_environment)
        monkeypatch.setattr(cls, "update_device_map", update_device_map)


@pytest.fixture
def seen(monkeypatch):
    """What the run trained, at its first LoRA save: module classes, dtypes, NF4 compute dtypes."""
    seen = {}
    original = train.save_run_lora

    def spy(args, family, denoiser, *rest, **kwargs):
        if not seen:
            seen["classes"] = [f"{type(m).__module__}.{type(m).__name__}" for m in denoiser.modules()]
            seen["plain_linear"] = [n for n, m in denoiser.named_modules()
                                    if type(m) is torch.nn.Linear and ".lora_" not in n]
            seen["trainable"] = {p.dtype for p in denoiser.parameters() if p.requires_grad}
            seen["frozen"] = {p.dtype for p in denoiser.parameters() if not p.requires_grad}
            seen["compute"] = {m.compute_dtype for m in denoiser.modules() if isinstance(m, bnb.nn.Linear4bit)}
        return original(args, family, denoiser, *rest, **kwargs)

    monkeypatch.setattr(train, "save_run_lora", spy)
    return seen


def quant_args(model, data, out, steps, *extra):
    return ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--output_dir", out,
            "--max_train_steps", steps, "--learning_rate", "1e-3", "--seed", "3", "--report_to", "none",
            "--resolution", "32", "--mask_dilation", "1", "--max_sequence_length", "16", "--save_precision", "fp32",
            "--checkpointing_steps", "2", "--max_train_samples", "4", *extra]


@pytest.mark.parametrize("family,mode", [("flux", "nf4"), ("flux", "int8"), ("sd3", "nf4"), ("sd3", "int8"),
                                         ("chroma", "nf4")])  # Chroma: a 2026 family (issue 27), T5 only, no guidance
def test_quantized_base_trains_resumes_and_its_lora_loads_unquantized(family, mode, request, demo_dataset, tmp_path,
                                                                      bnb_on_cpu, seen):
    from safetensors.torch import load_file

    model = request.getfixturevalue(f"tiny_{family}")
    run = ["--quantize_base", mode, "--mixed_precision", "bf16", "--validation_prompt", PROMPT,
           "--validation_steps", "2", "--num_validation_images", "1", "--validation_inference_steps", "2"]
    straight = str(tmp_path / "straight")
    run_main(*quant_args(model, demo_dataset, straight, 4, *run))

    # diffusers quantized every nn.Linear of the transformer; the LoRA wraps bitsandbytes layers and trains in fp32
    assert seen["classes"].count(f"bitsandbytes.nn.modules.{QUANTIZED[mode]}") > 0 and not seen["plain_linear"]
    wrapped = seen["classes"].count(f"peft.tuners.lora.bnb.{QUANTIZED[mode]}")
    assert wrapped > 0 and seen["trainable"] == {torch.float32}
    assert {torch.uint8 if mode == "nf4" else torch.int8} <= seen["frozen"]
    assert seen["compute"] <= {torch.bfloat16}  # NF4 computes in the run's precision (bf16 here)
    assert os.path.exists(os.path.join(straight, "image_0.png"))  # validation under bf16 sampled the quantized model

    # the files: LoRA tensors only, fp32, finite, trained (the last SD3 block's add_q_proj gets no gradient)
    lora = lora_tensors(straight)
    assert len(lora) == 2 * wrapped and not [k for k in lora if any(w in k for w in QUANT_WORDS)]
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in lora.values())
    zero_b = {k for k, v in lora.items() if "lora_B" in k and not v.abs().max() > 0}
    assert len(zero_b) <= (1 if family == "sd3" else 0) and all("add_q_proj" in k for k in zero_b)
    kohya = load_file(os.path.join(straight, "straight.safetensors"))
    assert kohya and not [k for k in kohya if any(w in k for w in QUANT_WORDS)]
    assert all(v.dtype == torch.float32 for v in kohya.values())
    step2 = load_file(os.path.join(straight, "checkpoint-2", "pytorch_lora_weights.safetensors"))
    assert any(not torch.equal(step2[k], lora[k]) for k in lora)

    # checkpoint at step 2 + resume to 4 == the straight run, exactly
    resumed, quantized = str(tmp_path / "resumed"), run[:4]  # (no validation: it does not change the LoRA)
    run_main(*quant_args(model, demo_dataset, resumed, 2, *quantized))
    run_main(*quant_args(model, demo_dataset, resumed, 4, *quantized, "--resume_from_checkpoint", "latest"))
    again = lora_tensors(resumed)
    assert again.keys() == lora.keys() and all(torch.equal(again[k], lora[k]) for k in lora)

    # the LoRA trained on the quantized base loads bit-exactly into the UNQUANTIZED pipeline and changes its image
    assert_lora_loads_whole_and_changes_the_image(model, os.path.join(straight, "pytorch_lora_weights.safetensors"),
                                                  prompt=PROMPT, max_sequence_length=16)


def test_fair_gradients_on_a_quantized_base_separate_equal_batched(tiny_flux, demo_dataset, tmp_path, bnb_on_cpu,
                                                                   seen):
    """The per-objective backward passes through Linear4bit: one vmapped pass with gradient checkpointing gives the
    separate passes' LoRA; without mixed precision the NF4 base computes in fp32."""
    plain, batched = str(tmp_path / "plain"), str(tmp_path / "batched")
    run_main(*quant_args(tiny_flux, demo_dataset, plain, 2, "--quantize_base", "nf4"))
    assert seen["compute"] == {torch.float32}
    run_main(*quant_args(tiny_flux, demo_dataset, batched, 2, "--quantize_base", "nf4", "--fair_batched_backward",
                         "--gradient_checkpointing"))
    a, b = lora_tensors(plain), lora_tensors(batched)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_quantize_text_encoders_embeds_with_a_quantized_t5(mode, tiny_flux, demo_dataset, tmp_path, monkeypatch):
    """--quantize_text_encoders: T5 (the large encoder) loads in 4 / 8 bits through transformers' BitsAndBytesConfig
    (its CPU backend: no probe answered), CLIP does not; the embeddings stay close to the unquantized ones; the run
    trains on them."""
    from transformers import T5EncoderModel

    embeddings = {}
    original = T5EncoderModel.forward

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        layers = {type(m).__name__ for m in self.modules()}
        embeddings.setdefault("quantized" if QUANTIZED[mode] in layers else "plain", out.last_hidden_state.detach())
        return out

    monkeypatch.setattr(T5EncoderModel, "forward", forward)
    run_main(*quant_args(tiny_flux, demo_dataset, str(tmp_path / "plain"), 1))
    out = str(tmp_path / "quantized")
    run_main(*quant_args(tiny_flux, demo_dataset, out, 2, "--quantize_text_encoders", mode))
    quantized, plain = embeddings["quantized"], embeddings["plain"]
    error = float((quantized - plain).norm() / plain.norm())
    assert 0 < error < (0.5 if mode == "nf4" else 0.05), error  # tiny random T5: NF4 31 %, int8 under 1 %
    assert all(torch.isfinite(v).all() for v in lora_tensors(out).values())


def test_quantize_flags_refused_where_they_cannot_run(tiny_flux, tiny_sd, demo_dataset, tmp_path):
    """No GPU and no probe answered: --quantize_base is refused naming the flag, before any weight loads;
    --quantize_text_encoders is refused for SD (CLIP only)."""
    loads = []
    with pytest.MonkeyPatch.context() as m:
        from diffusers import ModelMixin

        original = ModelMixin.from_pretrained.__func__
        m.setattr(ModelMixin, "from_pretrained", classmethod(lambda cls, *a, **k: loads.append(cls) or original(cls, *a, **k)))
        if not torch.cuda.is_available():
            with pytest.raises(mf.UsageError, match=r"^--quantize_base nf4: diffusers' bitsandbytes quantization "
                                                    r"cannot run here .*No GPU found.*--quantize_base none"):
                run_main(*quant_args(tiny_flux, demo_dataset, str(tmp_path / "a"), 1, "--quantize_base", "nf4"))
        with pytest.raises(mf.UsageError, match="--quantize_text_encoders is for FLUX.1/SD3"):
            run_main("--pretrained_model_name_or_path", tiny_sd, "--train_data_dir", demo_dataset, "--output_dir",
                     str(tmp_path / "b"), "--max_train_steps", "1", "--report_to", "none",
                     "--quantize_text_encoders", "int8")
    assert loads == []


# ---- staged loading (Must 1), seen from outside: the order of loads and encoder forwards -------------------------


@pytest.fixture
def events(monkeypatch):
    """A log of ('encode', class), ('vae_encode',), ('denoiser_load', class, live text encoders) events."""
    import diffusers
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

    log, live = [], weakref.WeakSet()
    for cls in (CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel):
        def forward(self, *args, _original=cls.forward, **kwargs):
            live.add(self)
            log.append(("encode", type(self).__name__))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "forward", forward)
    for name in ("UNet2DConditionModel", "FluxTransformer2DModel", "SD3Transformer2DModel"):
        cls = getattr(diffusers, name)

        def from_pretrained(cls, *args, _original=cls.from_pretrained.__func__, **kwargs):
            log.append(("denoiser_load", cls.__name__, len(live)))
            return _original(cls, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(from_pretrained))
    encode = diffusers.AutoencoderKL.encode

    def vae_encode(self, *args, **kwargs):
        log.append(("vae_encode",))
        return encode(self, *args, **kwargs)

    monkeypatch.setattr(diffusers.AutoencoderKL, "encode", vae_encode)
    return log


@pytest.mark.parametrize("family,cache", [("flux", ()), ("sd3", ("--cache_latents",)),
                                          ("sd", ("--cache_text_embeddings", "--cache_latents"))])
def test_staged_loading_text_encoders_gone_before_the_denoiser_loads(family, cache, request, demo_dataset, tmp_path,
                                                                     events):
    """Every text-encoder forward (captions, the validation prompt) happens before the denoiser's weights load, the
    text encoders are freed by then, the latent cache is encoded before it too; validation and the evaluation's
    sampler (the trained denoiser, LoRA off for "base") make no encoder forward and load no second model."""
    import evaluate_fairhuman as ev

    model = request.getfixturevalue(f"tiny_{family}")
    families = []
    monkey = pytest.MonkeyPatch()
    original = mf.family_for_model
    monkey.setattr(mf, "family_for_model", lambda args: families.append(original(args)) or families[-1])
    out = str(tmp_path / "out")
    flags = quant_args(model, demo_dataset, out, 2, *cache, "--validation_prompt", PROMPT, "--validation_steps", "1",
                       "--num_validation_images", "1", "--validation_inference_steps", "1")
    if family == "sd":
        flags = [f for f in flags if f not in ("--max_sequence_length", "16")]
    try:
        run_main(*flags)
    finally:
        monkey.undo()
    loads = [i for i, e in enumerate(events) if e[0] == "denoiser_load"]
    assert len(loads) == 1 and events[loads[0]][2] == 0  # one load, no text encoder alive at that moment
    encodes = [i for i, e in enumerate(events) if e[0] == "encode"]
    assert encodes and max(encodes) < loads[0]
    if "--cache_latents" in cache:
        assert [e for e in events[: loads[0]] if e[0] == "vae_encode"]
        assert not [e for e in events[loads[0]:] if e[0] == "vae_encode"]
    assert os.path.exists(os.path.join(out, "image_0.png"))

    # the evaluation's sampler at the end of a run: the trained denoiser itself, stored embeddings only
    family_object = families[0]
    assert family_object.text_encoders == []
    del events[:]
    gc.collect()
    args = ev.parse_args(["--pretrained_model_name_or_path", model, "--lora_paths", out, "--prompts_file", "unused",
                          "--output_dir", str(tmp_path / "eval"), "--resolution", "32", "--num_inference_steps", "2",
                          "--num_images_per_prompt", "1", "--lora_scale", "1", "--disable_progress_bar"])
    sampler = train.TrainedDenoiserSampler(family_object, family_object.denoiser, torch.device("cpu"), torch.float32)
    ev.apply_sampling_advice(args, family_object)
    folders = ev.generate(args, [PROMPT], ["lora"], sampler)
    assert events == []  # no encoder forward, no denoiser load
    base, lora = (np.asarray(Image.open(next(Path(f["folder"]).glob("*.png"))), dtype=np.int16) for f in folders)
    assert np.abs(base - lora).max() > 0
