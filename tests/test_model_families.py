"""FLUX.1 and SD3 behind the model-family seam (model_families.py): tiny pipelines built offline, trained end to
end on the CPU, their LoRA files read by diffusers and checked against ComfyUI's key map."""

import importlib.util
import json
import os
import types

import numpy as np
import pytest
import torch
from conftest import (
    assert_comfyui_reads,
    assert_lora_loads_whole_and_changes_the_image,
    assert_same_lora,
    comfyui_transformer_names,
    run_main,
    run_two_processes,
    step_on_a_non_square_bucket,
)
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import fairhuman_utils as fh
import model_families as mf
import train_fairhuman_lora as train
from training_checks import CheckedDataset

FAMILY_CLASSES = {"flux": "FluxPipeline", "sd3": "StableDiffusion3Pipeline"}


def flow_args(model, data, out, steps, *extra):
    return ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--output_dir", out,
            "--max_train_steps", steps, "--learning_rate", "1e-3", "--seed", "3", "--report_to", "none",
            "--resolution", "32", "--mask_dilation", "1", "--max_sequence_length", "16", *extra]


def _error(argv) -> str:
    with pytest.raises(fh.UsageError) as info:
        run_main(*argv)
    return str(info.value)


# ---- each family trains end to end; its files load where people generate -----------------------------------


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_flow_family_trains_saves_and_its_lora_loads_and_changes_the_image(family, request, demo_dataset, tmp_path):
    model = request.getfixturevalue(f"tiny_{family}")
    out = str(tmp_path / family)
    run_main(*flow_args(model, demo_dataset, out, 3, "--train_batch_size", "2", "--save_lora_format", "both",
                        "--save_precision", "fp32", "--save_mask_previews", "2", "--validation_prompt", "a person",
                        "--num_validation_images", "1", "--validation_inference_steps", "2"))
    assert os.path.isfile(os.path.join(out, "image_0.png")) and os.path.isfile(os.path.join(out, "mask_previews", "1_face.png"))
    diffusers_path = os.path.join(out, "pytorch_lora_weights.safetensors")
    diffusers_file = load_file(diffusers_path)
    # ComfyUI's key map knows every trained module, in both files
    config = json.load(open(os.path.join(model, "transformer", "config.json")))
    names = comfyui_transformer_names(family, config["num_layers"], config.get("num_single_layers", 0))
    trained = assert_comfyui_reads(diffusers_path, names)
    # the default targets: both streams' attention of every joint block (+ FLUX's single blocks' q/k/v)
    assert trained and all(k.startswith("transformer.") for k in diffusers_file)
    assert any(".attn.add_q_proj" in m for m in trained) and any(".attn.to_out.0" in m for m in trained)
    kohya_path = os.path.join(out, f"{family}.safetensors")
    kohya_modules = assert_comfyui_reads(kohya_path, names)
    assert len(kohya_modules) == len(trained)
    with safe_open(kohya_path, "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == {"flux": "flux1", "sd3": "sd3"}[family]
    assert meta["modelspec.architecture"] == {"flux": "flux-1-dev/lora", "sd3": "stable-diffusion-3/lora"}[family]
    card = open(os.path.join(out, "README.md")).read()
    assert FAMILY_CLASSES[family] in card and "UniPC" not in card.split("## How to use")[1].split("authors'")[0]
    if importlib.util.find_spec("mediapipe") is not None:  # evaluate_fairhuman generates with the family's pipeline
        import evaluate_fairhuman as ev

        prompts = tmp_path / "prompts.txt"
        prompts.write_text("a photo of a person waving\n")
        # diffusers reads FLUX's lora_transformer_* file too; for SD3 it is ComfyUI's file only
        loras = [os.path.join(out, "pytorch_lora_weights.safetensors")] + ([kohya_path] if family == "flux" else [])
        report = ev.main(ev.parse_args([
            "--pretrained_model_name_or_path", model, "--lora_paths", *loras, "--lora_scale", "1", "--prompts_file", str(prompts), "--resolution", "32",
            "--num_inference_steps", "2", "--seed", "1", "--output_dir", str(tmp_path / "eval"), "--disable_progress_bar"]))
        assert report["settings"]["guidance_scale"] == {"flux": 3.5, "sd3": 4.5}[family]
        columns = [row["model"] for row in report["models"]]
        images = [np.asarray(Image.open(tmp_path / "eval" / "images" / c / "000_1.png"), dtype=np.int16) for c in columns]
        assert len(images) == len(loras) + 1
        if family == "flux":
            assert np.abs(images[2] - images[1]).max() <= 1  # the kohya file = the diffusers file
    # diffusers' own loader reads every trained module, and the image changes
    assert_lora_loads_whole_and_changes_the_image(model, diffusers_path, FAMILY_CLASSES[family], max_sequence_length=16)


def test_unknown_model_family_is_named_with_the_known_ones(demo_dataset, tmp_path):
    folder = tmp_path / "cogview"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "CogView4Pipeline"}))
    message = _error(flow_args(str(folder), demo_dataset, tmp_path / "o", 1))
    assert "'CogView4Pipeline'" in message
    for family in mf.FAMILIES:  # every family known now is listed
        assert all(name in message for name in family.pipeline_class_names), family.label


def test_flow_bad_input_is_named_before_weights_load(tiny_flux, tiny_sd3, demo_dataset, tmp_path):
    argv = flow_args(tiny_flux, demo_dataset, tmp_path / "o", 1)
    message = _error([*argv, "--lora_target_modules", "attn.to_q,to_qq"])
    assert message.startswith("--lora_target_modules: to_qq match no module of the transformer")
    assert "attn.add_q_proj" in message and "attn.to_q" in message
    assert "multiple of 4 for FLUX.1" in _error([*argv, "--bucket_reso_steps", "6"])  # 2x2 packing x VAE factor 2
    assert "--snr_gamma is for SD/SDXL" in _error([*argv, "--snr_gamma", "5"])
    if not torch.cuda.is_available():
        message = _error([*argv, "--quantize_base", "nf4"])
        assert message.startswith("--quantize_base nf4") and "GPU" in message
    sd3_argv = flow_args(tiny_sd3, demo_dataset, tmp_path / "o3", 1)
    assert "multiple of 4 for SD3" in _error([*sd3_argv, "--bucket_reso_steps", "6"])


# ---- exactness: resume, accumulation; refused resume across families -----------------------------------------


def test_flux_resume_and_accumulation_equal_the_straight_run(tiny_flux, tiny_sd3, demo_dataset, tmp_path):
    def run(name, steps, *extra):
        out = str(tmp_path / name)
        run_main(*flow_args(tiny_flux, demo_dataset, out, steps, "--save_precision", "fp32", *extra))
        return out

    interval = ["--fair_update_interval", "2", "--train_batch_size", "2", "--checkpointing_steps", "2"]
    straight = run("straight", 4, *interval)
    run("resumed", 2, *interval)
    resumed = run("resumed", 4, *interval, "--resume_from_checkpoint", "latest")
    assert_same_lora(straight, resumed, atol=0)  # the fair update's state and the data order come back exactly
    exact = run("exact", 3, "--train_batch_size", "2")
    accumulated = run("accumulated", 3, "--train_batch_size", "1", "--gradient_accumulation_steps", "2")
    assert_same_lora(exact, accumulated, atol=1e-5)
    message = _error(flow_args(tiny_sd3, demo_dataset, resumed, 6, "--resume_from_checkpoint", "latest"))
    assert "FLUX.1" in message and "SD3" in message and "model famil" in message


# ---- the pieces: packing keeps cells, masks on the latent grid, per-objective gradients ---------------------


def test_flux_packing_keeps_every_latent_cell_on_a_non_square_grid():
    family = mf.FluxFamily(types.SimpleNamespace(pretrained_model_name_or_path="x", revision=None, variant=None,
                                                 guidance_scale=1.0))
    family.vae = types.SimpleNamespace(config=types.SimpleNamespace(block_out_channels=(32, 32, 32, 32)))
    seen = {}

    def identity_transformer(hidden_states, img_ids, **kwargs):
        seen["tokens"], seen["img_ids"] = hidden_states, img_ids
        return (hidden_states,)

    identity_transformer.config = types.SimpleNamespace(guidance_embeds=True)
    x = torch.randn(2, 16, 6, 10)  # a 48 x 80 px bucket at VAE factor 8
    inputs = types.SimpleNamespace(model_input=x, timesteps=torch.tensor([500.0, 20.0]),
                                   conditioning={"encoder_hidden_states": torch.zeros(2, 3, 8),
                                                 "pooled_projections": torch.zeros(2, 8)})
    assert torch.equal(family.predict(identity_transformer, inputs), x)
    assert seen["tokens"].shape == (2, 15, 64)  # (6/2) x (10/2) tokens of 2x2x16
    # token k is latent cells (2r..2r+1, 2c..2c+1) with its position id (r, c): row-major
    assert seen["img_ids"][7].tolist() == [0, 1, 2] and torch.equal(seen["tokens"][0, 7, :4], x[0, 0, 2:4, 4:6].flatten())


@pytest.mark.parametrize("family_name", ["flux", "sd3"])
def test_flow_step_masks_on_the_latent_cells_and_per_objective_gradients_differ(family_name, request):
    step_on_a_non_square_bucket(request.getfixturevalue(f"tiny_{family_name}"), 16, ["a person waving", "a face"])


def test_lora_trains_on_an_nf4_flux_transformer_on_the_cpu(tiny_flux):
    """The peft-on-NF4 part of --quantize_base nf4 in isolation: the base's block Linears swapped for bitsandbytes
    Linear4bit by hand, as diffusers' quantizer would (tests/test_quantized.py runs diffusers' own quantizer)."""
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    from peft import LoraConfig

    args = train.parse_args(["--pretrained_model_name_or_path", tiny_flux, "--train_data_dir", "x",
                             "--max_sequence_length", "16"])
    family = mf.family_for_model(args)
    family.check_args(args)
    family.load("cpu", torch.float32)
    transformer = family.denoiser
    swapped = 0
    for name, module in list(transformer.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and "blocks" in f"{name}.{child_name}":
                quantized = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                              compute_dtype=torch.float32, quant_type="nf4")
                quantized.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4")
                if child.bias is not None:
                    quantized.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                try:
                    quantized.to("cpu")  # quantizes on the CPU
                except Exception as error:  # noqa: BLE001 - a bitsandbytes build without a CPU backend
                    pytest.skip(f"bitsandbytes cannot quantize on this CPU: {error}")
                setattr(module, child_name, quantized)
                swapped += 1
    transformer.is_loaded_in_4bit = True
    assert swapped and mf.keep_4bit_layers_trainable_on_cpu(transformer) == swapped
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                       target_modules=family.default_lora_targets.split(",")))
    assert any(type(m).__module__ == "peft.tuners.lora.bnb" for m in transformer.modules())  # LoRA over Linear4bit
    params = [p for p in transformer.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params)  # the LoRA stays full precision
    frozen = {n: p.detach().clone() for n, p in transformer.named_parameters() if p.dtype == torch.uint8}
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    initial = [p.detach().clone() for p in params]
    batch = {"pixel_values": torch.rand(2, 3, 32, 32) * 2 - 1, "masks": torch.ones(2, 2, 32, 32), "seeds": [1, 2],
             "rows": [0, 0], "captions": ["a person"] * 2}
    conditioning = family.caption_conditioning([["a person"]], "cpu")
    for step in range(2):  # after one step lora_B != 0 and every LoRA matrix gets gradient
        transformer.train()
        inputs = train.prepare_inputs(batch, args, family, conditioning, torch.float32, "cpu")
        losses = fh.fairhuman_losses(family.predict(transformer, inputs), inputs.target, inputs.region_masks[0],
                                     inputs.region_masks[1])
        losses.sum().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
        optimizer.step()
        optimizer.zero_grad()
        transformer.eval()
        with torch.no_grad():  # a validation-style forward between steps must not break the next training step
            family.predict(transformer, inputs)
    assert all(torch.equal(p, frozen[n]) for n, p in transformer.named_parameters() if n in frozen)
    assert all(not torch.equal(p, p0) for p, p0 in zip(params, initial))  # every LoRA matrix trained


def test_flux_two_processes_equal_one_process(tiny_flux, demo_dataset, tmp_path):
    common = flow_args(tiny_flux, demo_dataset, tmp_path / "one", 3, "--save_precision", "fp32",
                       "--fair_update_interval", "1")
    run_main(*common, "--train_batch_size", "2")
    proc = run_two_processes(flow_args(tiny_flux, demo_dataset, tmp_path / "two", 3, "--save_precision", "fp32",
                                       "--fair_update_interval", "1", "--train_batch_size", "1"), OMP_NUM_THREADS="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_lora(str(tmp_path / "one"), str(tmp_path / "two"), atol=1e-5)


def test_tiny_clip_pools_at_the_end_token_so_prompts_differ(tiny_sdxl):
    """The tiny CLIP's eos_token_id is its tokenizer's <|endoftext|> (513): the pooled embedding (SDXL's text_embeds,
    FLUX.1's only CLIP input) depends on the prompt. With the old 515, CLIP pooled the BOS position: all equal."""
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_sdxl, subfolder="tokenizer_2")
    encoder = CLIPTextModelWithProjection.from_pretrained(tiny_sdxl, subfolder="text_encoder_2")
    assert encoder.config.eos_token_id == tokenizer.eos_token_id == 513
    ids = tokenizer(["a photo of a person", "a close-up of a hand"], padding="max_length", max_length=77,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        pooled = encoder(ids).text_embeds
    assert (pooled[0] - pooled[1]).abs().max() > 1e-3


@pytest.mark.parametrize("family_name, scheme, precondition", [("flux", "sigma_sqrt", None), ("sd3", "logit_normal", 1),
                                                               ("sd3", "mode", 0)])
def test_flow_noising_target_and_weights_are_the_diffusers_examples(family_name, scheme, precondition, request):
    """noisy = (1 - s) x0 + s noise with s = scheduler.sigmas[int(u * 1000)], u from
    compute_density_for_timestep_sampling; target noise - x0 (FLUX) or x0 with the prediction preconditioned to
    pred * (-s) + noisy (SD3); weights compute_loss_weighting_for_sd3. Every draw from the example's generator."""
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    model = request.getfixturevalue(f"tiny_{family_name}")
    args = train.parse_args(["--pretrained_model_name_or_path", model, "--train_data_dir", "x",
                             "--max_sequence_length", "16", "--weighting_scheme", scheme]
                            + ([] if precondition is None else ["--precondition_outputs", str(precondition)]))
    family = mf.family_for_model(args)
    family.check_args(args)
    family.load("cpu", torch.float32)
    batch = {"pixel_values": torch.rand(2, 3, 16, 24) * 2 - 1, "seeds": [11, 12]}
    got = family.noisy_inputs(batch, {}, "cpu", torch.float32)
    for i, seed in enumerate(batch["seeds"]):
        g = torch.Generator().manual_seed(seed)
        latents = family.latents({"pixel_values": batch["pixel_values"][i:i + 1]}, [g], "cpu", torch.float32)[0]
        noise = torch.randn(latents.shape, generator=g)
        u = compute_density_for_timestep_sampling(scheme, 1, logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
                                                  generator=g)
        index = int(u * 1000)
        sigma = family.noise_scheduler.sigmas[index]
        assert got.timesteps[i] == family.noise_scheduler.timesteps[index]
        torch.testing.assert_close(got.model_input[i], (1 - sigma) * latents + sigma * noise)
        expected_target = latents if precondition else noise - latents
        torch.testing.assert_close(got.target[i], expected_target)
        weight = compute_loss_weighting_for_sd3(scheme, sigmas=sigma.view(1, 1, 1, 1)).view(-1)
        torch.testing.assert_close(got.sample_weights[i:i + 1], weight.float())
    if family_name == "sd3":  # the SD3 scheduler's static shift 3 is in the training sigmas
        assert family.noise_scheduler.sigmas[500] == pytest.approx(3 * 0.5 / (1 + 2 * 0.5), abs=2e-3)
        velocity = torch.randn_like(got.model_input)
        got.conditioning = {"encoder_hidden_states": None, "pooled_projections": None}
        pred = family.predict(lambda **kwargs: (velocity,), got)  # preconditioned: x0 estimate = noisy - s v
        expected = got.model_input - got.extras["sigmas"] * velocity if precondition else velocity
        torch.testing.assert_close(pred, expected)


def test_captions_past_t5s_max_sequence_length_are_counted(tiny_flux, caplog):
    """FLUX.1 / SD3 cut captions at --max_sequence_length T5 tokens as well as CLIP's 77: both limits are checked."""
    import logging

    from accelerate import PartialState

    PartialState()  # main() has made the module's logger accelerate's, as in a run
    args = train.parse_args(["--pretrained_model_name_or_path", tiny_flux, "--train_data_dir", "x",
                             "--max_sequence_length", "16"])
    family = mf.family_for_model(args)
    family.check_args(args)
    family.load("cpu", torch.float32)
    limits = family.caption_token_limits()
    assert [entry[1:] for entry in limits] == [(77, "text encoder", None), (16, "T5 text encoder", "--max_sequence_length")]
    checked = CheckedDataset(dataset=None, sizes=[], boxes={}, counts={},  # > 16 T5 tokens, < 77 CLIP
                             captions=[["a person waving both hands at the camera"], ["a face"]])
    with caplog.at_level(logging.WARNING):
        counts = [train.warn_long_captions(checked, *entry) for entry in limits]
    assert counts[0]["long"] == 0 and counts[1]["long"] == 1 and counts[1]["limit"] == 16
    assert any("longer than the T5 text encoder's 16 tokens" in r.getMessage()
               and r.getMessage().endswith("(or raise --max_sequence_length)") for r in caplog.records)


def test_flux_cached_text_embeddings_are_the_ones_it_encodes_once(tiny_flux, demo_dataset, tmp_path, monkeypatch):
    """--cache_text_embeddings with FLUX.1: the cache holds the per-row embeddings the family computes anyway
    (every caption encoded as often as without the flag, not twice), and trains the same LoRA."""
    calls = []
    encode = mf.FluxFamily.encode_captions

    def counting(self, captions, device):
        calls.append(len(captions))
        return encode(self, captions, device)

    monkeypatch.setattr(mf.FluxFamily, "encode_captions", counting)

    def run(name, *extra):
        calls.clear()
        out = str(tmp_path / name)
        run_main(*flow_args(tiny_flux, demo_dataset, out, 3, "--save_precision", "fp32", "--train_batch_size", "2",
                            *extra))
        return out, sum(calls)

    plain, plain_calls = run("plain")
    cached, cached_calls = run("cached", "--cache_text_embeddings", "--cache_dir", tmp_path / "cache")
    assert cached_calls == plain_calls > 0
    assert_same_lora(plain, cached, atol=0)
