"""Z-Image and Qwen-Image behind the model-family seam (issue 27): tiny pipelines built offline, trained end to end
on the CPU through train_fairhuman_lora.main, their LoRA read by the family's own diffusers pipeline, and the
trained module names checked against ComfyUI's LoRA key map."""

import json
import logging
import os
import shutil

import pytest
import torch
from conftest import (
    assert_comfyui_reads,
    assert_lora_loads_whole_and_changes_the_image,
    assert_same_lora,
    run_main,
    run_two_processes,
    step_on_a_non_square_bucket,
)
from safetensors.torch import load_file

import fairhuman_demo
import fairhuman_utils as fh
import model_families as mf
import train_fairhuman_lora as train

PIPELINES = {"zimage": "ZImagePipeline", "qwenimage": "QwenImagePipeline"}


@pytest.fixture(scope="session")
def varied_dataset(tmp_path_factory):
    """The demo people with captions of six different lengths (so caption embeddings differ in length within
    every batch, whichever aspect-ratio bucket it comes from) and a third box column (``torso_boxes``, between face
    and hands) for ``--region``."""
    folder = fairhuman_demo.build_demo_dataset(str(tmp_path_factory.mktemp("data") / "varied"), num_images=6)
    path = os.path.join(folder, "metadata.jsonl")
    rows = [json.loads(line) for line in open(path)]
    for i, row in enumerate(rows):
        row["text"] = "a person" + ", outdoors" * i
        (x0, y0, x1, y1) = row["face_boxes"][0]
        row["torso_boxes"] = [[x0, y1, x1, min(y1 + (y1 - y0), 95)]]
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return folder


def family_args(model, data, out, steps, *extra):
    return ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--output_dir", out,
            "--max_train_steps", steps, "--learning_rate", "1e-3", "--seed", "3", "--report_to", "none",
            "--resolution", "32", "--mask_dilation", "1", "--max_sequence_length", "256", "--train_batch_size", "2",
            "--save_precision", "fp32", *extra]


def _error(argv) -> str:
    with pytest.raises(fh.UsageError) as info:
        run_main(*argv)
    return str(info.value)


def comfyui_names(family: str, config: dict) -> set[str]:
    """The diffusers module names ComfyUI's LoRA key map reads with a ``transformer.`` prefix, written from
    ComfyUI's comfy/lora.py ``model_lora_keys_unet`` (January 2026): Z-Image (its Lumina2 branch) maps the keys of
    comfy/utils.py ``z_image_to_diffusers`` -- per main layer and per refiner layer (``n_refiner_layers`` of each)
    ``attention.to_q/to_k/to_v`` (onto the fused qkv), ``attention.to_out.0``, ``feed_forward.w1/w2/w3``,
    ``adaLN_modulation.0`` -- and the embedders; Qwen-Image (its QwenImage branch) maps ``transformer.{name}`` for
    every weight of its own model, whose names are diffusers' (comfy/ldm/qwen_image/model.py); only the names
    read there are listed. Neither branch reads ``lora_transformer_*``."""
    if family == "zimage":
        block = ["attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0", "feed_forward.w1",
                 "feed_forward.w2", "feed_forward.w3", "adaLN_modulation.0"]
        refiners = config["n_refiner_layers"]
        prefixes = ([f"layers.{i}" for i in range(config["n_layers"])] + [f"noise_refiner.{i}" for i in range(refiners)]
                    + [f"context_refiner.{i}" for i in range(refiners)])
        names = {f"{p}.{m}" for p in prefixes for m in block}
        return names | {"all_x_embedder.2-1", "all_final_layer.2-1.linear", "all_final_layer.2-1.adaLN_modulation.1",
                        "cap_embedder.1", "t_embedder.mlp.0", "t_embedder.mlp.2"}
    block = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
             "attn.to_out.0", "attn.to_add_out", "img_mod.1", "txt_mod.1"]
    return ({f"transformer_blocks.{i}.{m}" for i in range(config["num_layers"]) for m in block}
            | {"img_in", "txt_in", "norm_out.linear", "proj_out"})


# ---- each family trains end to end; its file loads whole into its pipeline and changes the image -------------


@pytest.mark.parametrize("family", ["zimage", "qwenimage"])
def test_family_trains_and_its_lora_loads_whole_into_its_pipeline(family, request, varied_dataset, tmp_path):
    model = request.getfixturevalue(f"tiny_{family}")
    out = str(tmp_path / family)
    run_main(*family_args(model, varied_dataset, out, 2, "--validation_prompt", "a person",
                          "--num_validation_images", "1", "--validation_inference_steps", "2"))
    assert os.path.isfile(os.path.join(out, "image_0.png"))  # validation ran through the family's pipeline
    assert sorted(f for f in os.listdir(out) if f.endswith(".safetensors")) == ["pytorch_lora_weights.safetensors"]
    lora_file = os.path.join(out, "pytorch_lora_weights.safetensors")
    state = load_file(lora_file)
    assert state and all(k.startswith("transformer.") and torch.isfinite(v).all() for k, v in state.items())
    assert any(v.abs().max() > 0 for k, v in state.items() if "lora_B" in k)  # trained (B starts at zero)
    config = json.load(open(os.path.join(model, "transformer", "config.json")))
    # ComfyUI reads every module under its transformer. name (and no lora_transformer_ names here)
    trained = {m[len("transformer."):] for m in assert_comfyui_reads(lora_file, comfyui_names(family, config),
                                                                      kohya=False)}
    if family == "zimage":  # the example's targets: the attention of the main layers and of both refiners
        assert {"layers.0.attention.to_q", "noise_refiner.0.attention.to_out.0",
                "context_refiner.0.attention.to_v"} <= trained
    else:
        assert "transformer_blocks.1.attn.to_out.0" in trained and not any("add_q_proj" in m for m in trained)
    card = open(os.path.join(out, "README.md")).read()
    assert PIPELINES[family] in card and "ComfyUI: put `pytorch_lora_weights.safetensors`" in card
    # which file goes where: the diffusers file, for diffusers and ComfyUI; no kohya file offered
    assert "| `pytorch_lora_weights.safetensors` | diffusers format | diffusers `load_lora_weights`; ComfyUI:" in card
    assert "kohya format" not in card
    if family == "qwenimage":  # QwenImagePipeline's CFG is true_cfg_scale, and runs only with a negative prompt
        assert "negative_prompt=' ', true_cfg_scale=4.0" in card
    # no kohya file: the ss_* / modelspec metadata naming the family are in the diffusers file's header
    from safetensors import safe_open

    with safe_open(os.path.join(out, "pytorch_lora_weights.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == {"zimage": "zimage", "qwenimage": "qwen_image"}[family]
    assert meta["modelspec.architecture"] == {"zimage": "z-image/lora", "qwenimage": "qwen-image/lora"}[family]
    assert "lora_adapter_metadata" in meta  # diffusers' own key is kept
    assert_lora_loads_whole_and_changes_the_image(model, lora_file, PIPELINES[family])


# ---- the step: masks on the latent cells of a non-square bucket, captions of their own length ----------------


@pytest.mark.parametrize("family_name", ["zimage", "qwenimage"])
def test_step_masks_on_the_latent_cells_and_per_objective_gradients_differ(family_name, request):
    long_caption, short_caption = "a person waving both hands at the camera", "a face"
    args, family, batch, conditioning, inputs, pred = step_on_a_non_square_bucket(
        request.getfixturevalue(f"tiny_{family_name}"), 256, [long_caption, short_caption])
    lengths = inputs.conditioning["encoder_hidden_states_mask"].sum(1).tolist()
    assert lengths[0] - lengths[1] == len(long_caption) - len(short_caption)  # byte tokens
    # the padded short caption predicts as it does alone (its padding is masked out)
    alone = train.prepare_inputs({k: (v[1:] if isinstance(v, (list, torch.Tensor)) else v) for k, v in batch.items()},
                                 args, family, conditioning, torch.float32, "cpu")
    torch.testing.assert_close(family.predict(family.denoiser, alone), pred[1:], rtol=1e-4, atol=1e-5)


def test_qwenimage_latents_are_the_one_frame_posterior_normalised_per_channel(tiny_qwenimage):
    args = train.parse_args(["--pretrained_model_name_or_path", tiny_qwenimage, "--train_data_dir", "x"])
    family = mf.family_for_model(args)
    family.check_args(args)
    family.load("cpu", torch.float32)
    pixels = torch.rand(1, 3, 16, 24) * 2 - 1
    mean, _ = family.latent_distribution(pixels)
    direct = family.vae.encode(pixels[:, :, None]).latent_dist.mean[:, :, 0]
    assert mean.shape == (1, 16, 8, 12) and torch.equal(mean, direct)
    config = family.vae.config
    expected = (mean - torch.tensor(config.latents_mean).view(1, -1, 1, 1)) / torch.tensor(config.latents_std).view(1, -1, 1, 1)
    torch.testing.assert_close(family.normalize_latents(mean), expected)


# ---- exactness: per-row cache, resume; --region with a third region ------------------------------------------


@pytest.mark.parametrize("family", ["zimage", "qwenimage"])
def test_cache_and_resume_equal_the_straight_run_with_a_third_region(family, request, varied_dataset, tmp_path):
    model = request.getfixturevalue(f"tiny_{family}")
    regions = ["--region", "hand=hand_boxes", "--region", "face=face_boxes", "--region", "torso=torso_boxes"]

    def run(name, steps, *extra):
        out = str(tmp_path / name)
        run_main(*family_args(model, varied_dataset, out, steps, *regions, "--checkpointing_steps", "1", *extra))
        return out

    straight = run("straight", 2)
    cached = run("cached", 2, "--cache_latents", "--cache_text_embeddings")
    assert_same_lora(straight, cached, atol=1e-5)  # captions of different lengths in one batch, cached per row
    run("resumed", 1)
    resumed = run("resumed", 2, "--resume_from_checkpoint", "latest")
    assert_same_lora(straight, resumed, atol=0)
    card = open(os.path.join(straight, "README.md")).read()
    assert "torso" in card


# ---- bad input: named before weights load --------------------------------------------------------------------


def test_distilled_zimage_turbo_warns_and_names_the_base_checkpoint(tiny_zimage, tmp_path, caplog):
    turbo = str(tmp_path / "Z-Image-Turbo-tiny")
    shutil.copytree(tiny_zimage, turbo)
    for path, warns in ((turbo, True), (tiny_zimage, False)):
        args = train.parse_args(["--pretrained_model_name_or_path", path, "--train_data_dir", "x"])
        family = mf.family_for_model(args)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            family.check_args(args)  # a warning, not a refusal
        text = caplog.text
        assert ("DISTILLED" in text and "Tongyi-MAI/Z-Image " in text) == warns, text
        assert family.inference_advice()["steps"] == (9 if warns else 28)
        # the card says it too, with the base checkpoint to train on
        assert ("Trained on a distilled checkpoint" in family.card_sampling_note()
                and "Tongyi-MAI/Z-Image " in family.card_sampling_note()) == warns


@pytest.mark.parametrize("family, names", [("zimage", ("attention.to_q", "attention.to_out.0")),
                                           ("qwenimage", ("attn.to_q", "attn.add_q_proj"))])
def test_bad_input_names_the_familys_modules_before_weights_load(family, names, request, varied_dataset, tmp_path):
    model = request.getfixturevalue(f"tiny_{family}")
    argv = family_args(model, varied_dataset, str(tmp_path / "o"), 1)
    message = _error([*argv, "--lora_target_modules", "to_q,attn.to_qq"])
    assert message.startswith("--lora_target_modules: attn.to_qq match no module of the transformer")
    assert all(name in message for name in names), message
    message = _error([*argv, "--save_lora_format", "kohya"])
    assert message.startswith("--save_lora_format kohya") and "ComfyUI reads its diffusers file" in message
    assert "multiple of 4" in _error([*argv, "--bucket_reso_steps", "6"])  # 2x2 patches x VAE factor 2
    assert not os.path.exists(os.path.join(str(tmp_path / "o"), "pytorch_lora_weights.safetensors"))


# ---- gaps of round 1 ------------------------------------------------------------------------------------------


def test_zimage_prediction_is_the_pipelines_velocity_at_its_own_timestep(tiny_zimage):
    """The training prediction equals what ZImagePipeline hands its Euler scheduler at the same latents and
    scheduler timestep: the sign (the transformer predicts ``x0 - noise``, negated) and the time reversal
    (``(1000 - t) / 1000``) both checked against diffusers' own sampling loop, so either one flipped fails."""
    import types

    import diffusers

    pipe = diffusers.ZImagePipeline.from_pretrained(tiny_zimage)
    pipe.set_progress_bar_config(disable=True)
    seen = []
    step = pipe.scheduler.step

    def spy(model_output, timestep, sample, **kwargs):
        seen.append((model_output.clone(), timestep.clone(), sample.clone()))
        return step(model_output, timestep, sample, **kwargs)

    pipe.scheduler.step = spy
    pipe(prompt="a person waving", height=32, width=32, num_inference_steps=3, guidance_scale=0.0,
         generator=torch.Generator().manual_seed(0), output_type="latent")
    args = train.parse_args(["--pretrained_model_name_or_path", tiny_zimage, "--train_data_dir", "x"])
    family = mf.family_for_model(args)
    embeds, _ = pipe.encode_prompt("a person waving", device="cpu", do_classifier_free_guidance=False)
    cond = family.padded(embeds)
    assert len(seen) == 3 and len({float(t) for _, t, _ in seen}) == 3
    for output, timestep, sample in seen:
        inputs = types.SimpleNamespace(model_input=sample, timesteps=timestep.reshape(1), conditioning=cond)
        with torch.no_grad():
            prediction = family.predict(pipe.transformer, inputs)
        torch.testing.assert_close(prediction.float(), output.float(), rtol=1e-4, atol=1e-5)
        assert output.abs().max() > 1e-3  # a real check: not a zero output


def test_zimage_accumulation_equals_the_larger_batch_with_captions_of_their_own_lengths(tiny_zimage, varied_dataset,
                                                                                       tmp_path):
    """Batch 2 (the short caption padded, its padding masked) == batch 1 with 2 accumulation steps (no padding)."""
    one = str(tmp_path / "batch2")
    run_main(*family_args(tiny_zimage, varied_dataset, one, 3))
    accumulated = str(tmp_path / "accum")
    run_main(*family_args(tiny_zimage, varied_dataset, accumulated, 3, "--train_batch_size", "1",
                          "--gradient_accumulation_steps", "2"))
    assert_same_lora(one, accumulated)


def test_zimage_two_processes_equal_one_process(tiny_zimage, varied_dataset, tmp_path):
    """Two CPU processes (gloo) of batch 1 == one process of batch 2: each process embeds its own caption at its
    own length (no padding), the single process pads the short one and masks it; the LoRA gradients are averaged
    across processes before the fair update."""
    run_main(*family_args(tiny_zimage, varied_dataset, tmp_path / "one", 3, "--fair_update_interval", "1"))
    proc = run_two_processes(family_args(tiny_zimage, varied_dataset, tmp_path / "two", 3, "--fair_update_interval", "1",
                                         "--train_batch_size", "1"), OMP_NUM_THREADS="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "total batch = 2" in proc.stderr  # really two processes of batch 1
    assert_same_lora(str(tmp_path / "one"), str(tmp_path / "two"), atol=1e-5)
