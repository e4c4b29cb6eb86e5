"""FLUX.2 klein and Chroma behind the model-family seam: tiny pipelines built offline (fairhuman_demo), trained end
to end through train_fairhuman_lora.main on the CPU, their LoRA files read by diffusers' own loader and their
module names checked against ComfyUI's key map (at tiny and at full size)."""

import json
import logging
import math
import os
import shutil

import pytest
import torch
from conftest import (
    assert_comfyui_reads,
    assert_lora_loads_whole_and_changes_the_image,
    assert_same_lora,
    comfyui_transformer_names,
    run_main,
)
from safetensors import safe_open
from safetensors.torch import load_file

import fairhuman_demo
import fairhuman_utils as fh
import model_families as mf
import train_fairhuman_lora as train

PIPELINES = {"flux2klein": "Flux2KleinPipeline", "chroma": "ChromaPipeline"}
FAMILIES = list(PIPELINES)


@pytest.fixture(scope="session")
def shoe_dataset(tmp_path_factory):
    return fairhuman_demo.build_demo_dataset(str(tmp_path_factory.mktemp("data") / "shoes"), num_images=4, shoes=True)


def args_for(model, data, out, steps, *extra):
    return ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--output_dir", out,
            "--max_train_steps", steps, "--learning_rate", "1e-3", "--seed", "3", "--report_to", "none",
            "--resolution", "32", "--mask_dilation", "1", "--max_sequence_length", "24", "--save_precision", "fp32",
            *extra]


def family_of(model, *extra):
    args = train.parse_args(["--pretrained_model_name_or_path", model, "--train_data_dir", "x",
                             "--max_sequence_length", "24", *extra])
    family = mf.family_for_model(args)
    family.check_args(args)
    return args, family


# ---- each family trains end to end; its files load where people generate -----------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_family_trains_and_its_lora_loads_whole_and_changes_the_image(name, request, shoe_dataset, tmp_path):
    from fairhuman_demo import read_scalars

    model = request.getfixturevalue(f"tiny_{name}")
    out = str(tmp_path / name)
    run_main(*args_for(model, shoe_dataset, out, 3, "--train_batch_size", "2", "--report_to", "tensorboard",
                       "--validation_prompt", "a person", "--num_validation_images", "1",
                       "--validation_inference_steps", "2", "--validation_steps", "3"))
    assert os.path.isfile(os.path.join(out, "image_0.png"))  # validation ran with the family's pipeline
    scalars = read_scalars(out)
    losses = [scalars[f"loss/{k}"] for k in ("global", "hand", "face")]
    assert all(len(v) == 3 and all(math.isfinite(x) for x in v) for v in losses)
    weights = [scalars[f"weight/{k}"] for k in ("global", "hand", "face")]  # MPD weights, positive and not equal
    assert all(w > 0 for v in weights for w in v) and len({round(v[0], 6) for v in weights}) == 3
    diffusers_path = os.path.join(out, "pytorch_lora_weights.safetensors")
    diffusers_file = load_file(diffusers_path)
    config = json.load(open(os.path.join(model, "transformer", "config.json")))
    names = comfyui_transformer_names(name, config["num_layers"], config["num_single_layers"])
    trained = assert_comfyui_reads(diffusers_path, names)  # ComfyUI's key map knows every module, in both files
    assert trained and all(k.startswith("transformer.") for k in diffusers_file)
    assert any(torch.count_nonzero(v) for k, v in diffusers_file.items() if "lora_B" in k)  # the LoRA changed
    if name == "flux2klein":  # the example's targets: image attention of the double blocks, the single blocks' two
        assert {m.split(".", 3)[-1] for m in trained} == {"attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                                                          "attn.to_qkv_mlp_proj", "attn.to_out"}
    else:
        assert any(".attn.add_q_proj" in m for m in trained) and any("single_transformer_blocks" in m for m in trained)
    kohya_path = os.path.join(out, f"{name}.safetensors")
    assert len(assert_comfyui_reads(kohya_path, names)) == len(trained)
    with safe_open(kohya_path, "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == {"flux2klein": "flux2_klein", "chroma": "chroma"}[name]
    assert meta["modelspec.architecture"].startswith({"flux2klein": "flux-2-klein-", "chroma": "chroma/"}[name])
    # the card: which file goes where (the lora_transformer_ file for ComfyUI, the diffusers file for diffusers)
    card = open(os.path.join(out, "README.md")).read()
    assert f"ComfyUI: put `{name}.safetensors` in `ComfyUI/models/loras/`" in card
    assert "| `pytorch_lora_weights.safetensors` | diffusers format | diffusers `load_lora_weights` |" in card
    assert f"| `{name}.safetensors` | kohya format (`lora_transformer_*` keys) |" in card
    assert "FluxGuidance" not in card and "--guidance_scale" not in card  # no guidance embedding in either
    # diffusers' own loader reads every trained module, bit-identical, and the image changes
    assert_lora_loads_whole_and_changes_the_image(model, diffusers_path, PIPELINES[name], max_sequence_length=24)


@pytest.mark.parametrize("name", FAMILIES)
def test_cache_resume_and_a_third_region(name, request, shoe_dataset, tmp_path):
    model = request.getfixturevalue(f"tiny_{name}")
    regions = ["--region", "hand=hand_boxes", "--region", "face=face_boxes", "--region", "shoe=shoe_boxes"]

    def run(tag, steps, *extra):
        out = str(tmp_path / tag)
        run_main(*args_for(model, shoe_dataset, out, steps, "--train_batch_size", "2", *regions, *extra))
        return out

    # --region: a third named region trains (its loss logged)
    straight = run("straight", 2, "--checkpointing_steps", "1", "--report_to", "tensorboard")
    assert math.isfinite(fairhuman_demo.read_scalars(straight)["loss/shoe"][1])
    # a checkpoint and a resume give the straight run exactly
    run("resumed", 1, "--checkpointing_steps", "1")
    assert_same_lora(straight, run("resumed", 2, "--checkpointing_steps", "1", "--resume_from_checkpoint", "latest"),
                     atol=0)
    # the per-row cache of latents and caption embeddings (with Chroma's mask) gives the uncached LoRA
    assert_same_lora(straight, run("cached", 2, "--cache_latents", "--cache_text_embeddings"), atol=1e-4)


# ---- the pieces: masks on the latent cells, per-objective gradients ----------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_masks_land_on_the_latent_cells_of_a_non_square_bucket(name, request):
    from peft import LoraConfig

    args, family = family_of(request.getfixturevalue(f"tiny_{name}"))
    family.load("cpu", torch.float32)
    torch.manual_seed(0)
    family.denoiser.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=family.default_lora_targets.split(",")))
    params = [p for p in family.denoiser.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1)
    masks = torch.zeros(2, 2, 32, 48)  # a 48 x 32 px (w x h) bucket -> 24 x 16 latent cells (H/2 on the tiny VAE)
    masks[:, 0, 4:12, 36:44] = 1  # hand: latent rows 2-5, columns 18-21
    masks[:, 1, 0:8, 0:8] = 1  # face: latent rows 0-3, columns 0-3
    batch = {"pixel_values": torch.rand(2, 3, 32, 48) * 2 - 1, "masks": masks, "seeds": [1, 2], "rows": [0, 1],
             "captions": ["a person waving", "a face"]}
    conditioning = family.caption_conditioning([["a person waving"], ["a face"]], "cpu")
    inputs = train.prepare_inputs(batch, args, family, conditioning, torch.float32, "cpu")
    channels = family.vae.config.latent_channels
    assert inputs.target.shape == (2, channels, 16, 24) and inputs.region_masks[0].shape == (2, 1, 16, 24)
    assert inputs.region_masks[0][0, 0].nonzero().min(0).values.tolist() == [2, 18]
    assert inputs.region_masks[0][0, 0].nonzero().max(0).values.tolist() == [5, 21]
    assert inputs.region_masks[1][0, 0].sum() == 16 and inputs.region_masks[1][0, 0, :4, :4].all()
    pred = family.predict(family.denoiser, inputs)
    assert pred.shape == inputs.target.shape
    losses = fh.fairhuman_losses(pred, inputs.target, *inputs.region_masks, sample_weights=inputs.sample_weights)
    flat = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(losses[i], params, retain_graph=True)])
                        for i in range(3)])
    assert torch.isfinite(flat).all() and (flat.norm(dim=1) > 0).all()
    cosine = torch.nn.functional.normalize(flat, dim=1) @ torch.nn.functional.normalize(flat, dim=1).T
    assert cosine[0, 1] < 0.99 and cosine[0, 2] < 0.99 and cosine[1, 2] < 0.99


def test_flux2_prediction_is_on_the_h8_grid_cell_for_cell():
    """predict() patchifies, packs, unpacks by ids and unpatchifies: with a transformer that returns its tokens,
    the prediction is the input, cell for cell, on a non-square grid (the region losses see the right cells)."""
    family = mf.Flux2KleinFamily.__new__(mf.Flux2KleinFamily)

    class Identity(torch.nn.Module):
        config = type("C", (), {"guidance_embeds": False})

        def forward(self, hidden_states, **kwargs):
            return (hidden_states,)

    x = torch.randn(2, 8, 6, 10)
    inputs = train.StepInputs(x, torch.tensor([500.0, 500.0]), {"encoder_hidden_states": torch.zeros(2, 3, 48)},
                              {}, x, (), [True], None)
    assert torch.equal(family.predict(Identity(), inputs), x)


def test_chroma_masks_text_padding_and_keeps_the_image_tokens(tiny_chroma):
    """The text mask covers the caption up to its first padding token (Chroma's rule) and goes into the
    transformer with ones over every image token."""
    args, family = family_of(tiny_chroma)
    family.load("cpu", torch.float32)
    cond = family.encode_captions(["a person", "a person waving two hands"], "cpu")
    lengths = [len(family.tokenizers[0](c).input_ids) for c in ("a person", "a person waving two hands")]
    assert cond["attention_mask"].sum(1).tolist() == [n + 1 for n in lengths]  # + the first padding token
    seen = {}

    def spy(**kwargs):
        seen.update(kwargs)
        return (kwargs["hidden_states"],)

    x = torch.randn(2, 16, 4, 6)
    inputs = train.StepInputs(x, torch.tensor([500.0, 500.0]), cond, {}, x, (), [True], None)
    family.predict(spy, inputs)
    mask = seen["attention_mask"]
    assert mask.shape == (2, 24 + 6) and mask[:, 24:].all() and mask[:, :24].sum(1).tolist() == [n + 1 for n in lengths]
    assert "pooled_projections" not in seen and "guidance" not in seen


# ---- bad input and warnings ---------------------------------------------------------------------------------


def test_a_distilled_klein_is_warned_about_naming_the_base_checkpoint(tiny_flux2klein, tmp_path, caplog):
    distilled = str(tmp_path / "distilled")
    shutil.copytree(tiny_flux2klein, distilled)
    index = json.load(open(os.path.join(distilled, "model_index.json")))
    json.dump({**index, "is_distilled": True}, open(os.path.join(distilled, "model_index.json"), "w"))
    config_path = os.path.join(distilled, "transformer", "config.json")
    config = json.load(open(config_path))  # klein 4B's width (24 heads x 128) in the config: the 4B base is named
    json.dump({**config, "num_attention_heads": 24, "attention_head_dim": 128}, open(config_path, "w"))
    with caplog.at_level(logging.WARNING):
        _, family = family_of(distilled)
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "black-forest-labs/FLUX.2-klein-base-4B" in message and "grey images" in message
    assert family.inference_advice()["steps"] == 4
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _, family = family_of(tiny_flux2klein)
    assert "distilled" not in caplog.text and family.inference_advice()["guidance"] == 4.0


@pytest.mark.parametrize("name,example", [("flux2klein", "attn.to_qkv_mlp_proj"), ("chroma", "attn.add_q_proj")])
def test_unmatched_lora_targets_name_the_familys_modules(name, example, request, shoe_dataset, tmp_path):
    model = request.getfixturevalue(f"tiny_{name}")
    with pytest.raises(fh.UsageError) as info:
        run_main(*args_for(model, shoe_dataset, str(tmp_path / "o"), 1, "--lora_target_modules", "to_nothing"))
    assert "to_nothing" in str(info.value) and example in str(info.value)


def test_an_unknown_pipeline_lists_every_family(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "SomePipeline"}))
    with pytest.raises(fh.UsageError) as info:
        mf.family_for_model(train.parse_args(["--pretrained_model_name_or_path", str(tmp_path), "--train_data_dir", "x"]))
    for pipeline in ("FluxPipeline", "StableDiffusion3Pipeline", "Flux2KleinPipeline", "ChromaPipeline"):
        assert pipeline in str(info.value)


# ---- full size: the default targets against ComfyUI's key map ----------------------------------------------

FULL_SIZE = {  # public transformer configs (config.json of the Hub repositories)
    "FLUX.2 klein 4B": ("Flux2Transformer2DModel", dict(num_layers=5, num_single_layers=20, num_attention_heads=24,
                                                        attention_head_dim=128, joint_attention_dim=7680,
                                                        guidance_embeds=False), 5 * 4 + 20 * 2),
    "FLUX.2 klein 9B": ("Flux2Transformer2DModel", dict(num_layers=8, num_single_layers=24, num_attention_heads=32,
                                                        attention_head_dim=128, joint_attention_dim=12288,
                                                        guidance_embeds=False), 8 * 4 + 24 * 2),
    "Chroma": ("ChromaTransformer2DModel", dict(num_layers=19, num_single_layers=38), 19 * 8 + 38 * 3),
}


@pytest.mark.parametrize("label", list(FULL_SIZE))
def test_full_size_default_targets_are_all_in_comfyuis_key_map(label, tmp_path):
    import diffusers
    from accelerate import init_empty_weights

    class_name, config, expected = FULL_SIZE[label]
    name = "flux2klein" if class_name.startswith("Flux2") else "chroma"
    family_class = {"flux2klein": mf.Flux2KleinFamily, "chroma": mf.ChromaFamily}[name]
    with init_empty_weights():
        model = getattr(diffusers, class_name)(**config)
    family = family_class.__new__(family_class)
    family.denoiser_config = lambda: dict(model.config)
    targets = family.default_lora_targets.split(",")
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    trained = {n for n in linear if any(n == t or n.endswith("." + t) for t in targets)}
    assert len(trained) == expected
    assert trained <= comfyui_transformer_names(name, config["num_layers"], config["num_single_layers"])
