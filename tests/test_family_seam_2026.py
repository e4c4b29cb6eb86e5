"""The four 2026 families (issue 27) on the issue-28 seam, from configs alone (no weight loads): the flags each
uses (none has a guidance embedding or SD3's preconditioning), their defaults, and the model folder's parts."""

import json
import shutil

import pytest

import fairhuman_utils as fh
import train_fairhuman_lora as train
from training_checks import check_model

FOUR = {"zimage": "Z-Image", "qwenimage": "Qwen-Image", "flux2klein": "FLUX.2 klein", "chroma": "Chroma"}


def checked(model, *extra):
    args = train.parse_args(["--pretrained_model_name_or_path", str(model), "--train_data_dir", "x", *extra])
    family, _ = check_model(args, None)
    return args, family


@pytest.mark.parametrize("name", FOUR)
@pytest.mark.parametrize("flag", [["--guidance_scale", "3.5"], ["--precondition_outputs", "1"]])
def test_flags_they_do_not_use_are_refused_and_named(name, flag, request):
    with pytest.raises(fh.UsageError) as info:
        checked(request.getfixturevalue(f"tiny_{name}"), *flag)
    message = str(info.value)
    assert flag[0] in message and FOUR[name] in message, message


@pytest.mark.parametrize("name", FOUR)
def test_flow_flags_get_the_examples_defaults(name, request):
    args, family = checked(request.getfixturevalue(f"tiny_{name}"))
    assert family.label == FOUR[name]
    assert (args.logit_mean, args.logit_std, args.mode_scale) == (0.0, 1.0, 1.29)
    assert args.guidance_scale is None and args.precondition_outputs is None  # never set, never used
    assert "guidance_scale" not in family.training_settings()


@pytest.mark.parametrize("name", FOUR)
def test_check_parts_names_the_missing_folder_and_the_broken_config(name, request, tmp_path):
    model = tmp_path / name
    shutil.copytree(request.getfixturevalue(f"tiny_{name}"), model)
    (model / "vae" / "config.json").write_text("{ not json")
    with pytest.raises(fh.UsageError) as info:
        checked(model)
    assert "vae/config.json" in str(info.value)
    (model / "vae" / "config.json").write_text(json.dumps({}))  # readable again; now a part is missing
    shutil.rmtree(model / "text_encoder")
    with pytest.raises(fh.UsageError) as info:
        checked(model)
    assert "text_encoder/" in str(info.value) and "model_index.json" in str(info.value)


# ---- evaluate_fairhuman.py with the family's pipeline (generation only) ------------------------------------


@pytest.mark.parametrize("name", ["flux2klein", "qwenimage"])
def test_evaluation_generates_with_the_familys_pipeline(name, request, tmp_path):
    """FLUX.2 klein's pipeline takes ``prompt=`` by keyword and no negative prompt; Qwen-Image's guidance is
    ``true_cfg_scale`` with a negative prompt."""
    import evaluate_fairhuman as ev

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a person waving\n")
    argv = ["--pretrained_model_name_or_path", request.getfixturevalue(f"tiny_{name}"), "--prompts_file",
            str(prompts), "--num_images_per_prompt", "1", "--batch_size", "1", "--num_inference_steps", "2",
            "--output_dir", str(tmp_path / "eval"), "--disable_progress_bar", "--device", "cpu",
            "--mixed_precision", "no", "--resolution", "32"]
    args = ev.parse_args(argv)
    folders = ev.generate(args, ["a person waving"], [])
    rows = [json.loads(line) for line in open(f"{folders[0]['folder']}/metadata.jsonl")]
    assert [r["file_name"] for r in rows] == ["000_0.png"]
    if name == "flux2klein":
        with pytest.raises(fh.UsageError, match="--negative_prompt"):
            ev.generate(ev.parse_args(argv + ["--negative_prompt", "blurry"]), ["a person waving"], [])


# ---- memory model: the named public configs build the public sizes ---------------------------------------


@pytest.mark.parametrize("model, label, billions", [
    ("zimage-turbo", "Z-Image", 6.15), ("flux2-klein-base-4b", "FLUX.2 klein", 3.88),
    ("flux2-klein-base-9b", "FLUX.2 klein", 9.08), ("qwen-image", "Qwen-Image", 20.43), ("chroma", "Chroma", 8.9)])
def test_named_configs_build_the_released_transformers_sizes(model, label, billions):
    """memory_estimate.MODELS holds config values only: built on fake tensors through the family, each
    transformer has its release's parameter count (Z-Image 6.15B, klein 4B / 9B, Qwen-Image 20.43B, Chroma 8.9B)."""
    import torch

    import memory_estimate as me

    args = me.build_parser().parse_args(["--model", model])
    with me.model_folder(model) as folder:
        family = me.family_for_settings(args, folder)
        with me.make_fake_mode(), me.fake_safe_module_to():
            family.build_from_configs(torch.bfloat16, me.ShapeTokenizer)
    assert family.label == label
    assert round(sum(p.numel() for p in family.denoiser.parameters()) / 1e9, 2) == billions
