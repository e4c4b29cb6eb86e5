"""The training script end to end: through `accelerate launch` on tiny SD and SDXL, and in-process."""

import functools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import (
    KOHYA_KEY,
    OFFLINE_ENV,
    REPO,
    edge_photos,
    lora_tensors,
    parse_error,
    preview_ious,
    run_main,
    write_imagefolder,
)
from PIL import Image

import checkpoints
import fairhuman_utils as fh
import model_families as mf
import train_fairhuman_lora as train
from fairhuman_demo import read_scalars


def launch(*args, expect_ok=True, env=None):
    """`accelerate launch --config_file accelerate_config.yaml train_fairhuman_lora.py ARGS`."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           os.path.join(REPO, "accelerate_config.yaml"), os.path.join(REPO, "train_fairhuman_lora.py"), *map(str, args)]
    proc = subprocess.run(cmd, cwd=REPO, env=env or OFFLINE_ENV, capture_output=True, text=True, timeout=600)
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def common(model, data, out, steps, *extra):
    return ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--output_dir", out,
            "--max_train_steps", steps, "--learning_rate", "1e-3", "--seed", "3", "--report_to", "none", *extra]


def sample(pipe, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return pipe("a photo of a person waving", num_inference_steps=2, generator=generator, output_type="np",
                height=32, width=32).images


# ---- the saved LoRA files, read as a user's tools read them ------------------------------------------


def lora_modules(unet):
    """Names of the modules that carry a LoRA adapter."""
    return {name for name, module in unet.named_modules() if hasattr(module, "lora_A") and len(module.lora_A)}


def trained_lora_modules(model, targets):
    """The LoRA modules of the UNet as the script trains it: the base UNet with the same target modules."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    unet.add_adapter(LoraConfig(r=4, target_modules=targets.split(",")))
    return lora_modules(unet)


def read_kohya_file(path, modules, alpha):
    """The kohya file's tensors, after checking: every key follows the pattern, every LoRA module of the
    trained UNet appears exactly once with lora_down, lora_up and alpha (= --lora_alpha), nothing else."""
    from safetensors.torch import load_file

    tensors = load_file(path)
    parts = {}
    for key in tensors:
        match = KOHYA_KEY.fullmatch(key)
        assert match and match.group(1) == "lora_unet", f"key off the pattern: {key}"
        parts.setdefault(key.rpartition(".lora_")[0] if ".lora_" in key else key[: -len(".alpha")], []).append(key)
    expected = {"lora_unet_" + name.replace(".", "_"): name for name in modules}
    assert len(expected) == len(modules)  # one kohya name per module
    assert set(parts) - set(expected) == set(), "keys that match no module"
    assert set(expected) - set(parts) == set(), "modules missing from the file"
    for name, keys in parts.items():
        assert sorted(keys) == sorted(f"{name}.{k}" for k in ("alpha", "lora_down.weight", "lora_up.weight"))
        assert tensors[f"{name}.alpha"].item() == alpha
    return tensors


def merge_by_hand(unet, kohya):
    """W <- W + (alpha / rank) * up @ down for every module of a kohya file (no LoRA library involved)."""
    by_name = {"lora_unet_" + name.replace(".", "_"): module for name, module in unet.named_modules()}
    with torch.no_grad():
        for key in [k for k in kohya if k.endswith(".alpha")]:
            name = key[: -len(".alpha")]
            down, up = kohya[f"{name}.lora_down.weight"].float(), kohya[f"{name}.lora_up.weight"].float()
            weight = by_name[name].weight
            weight += kohya[key].item() / down.shape[0] * (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
    return unet


def module_inputs(module):
    generator = torch.Generator().manual_seed(0)
    if isinstance(module, torch.nn.Conv2d):
        return torch.randn(1, module.in_channels, 8, 8, generator=generator)
    return torch.randn(2, module.in_features, generator=generator)


def load_pipeline(cls, model, lora=None, weight_name=None):
    pipe = cls.from_pretrained(model) if cls.__name__.endswith("XLPipeline") else cls.from_pretrained(model, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(lora, weight_name=weight_name)
    return pipe


def test_sd_lora_loads_changes_output_rotates_checkpoints_and_resumes(tiny_sd, demo_dataset, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    targets = "to_q,to_k,to_v,to_out.0,conv1,conv2"  # attention AND resnet convs, alpha != rank
    lora = ["--lora_target_modules", targets, "--rank", 4, "--lora_alpha", 2]
    launch(*common(tiny_sd, demo_dataset, straight, 6, "--checkpointing_steps", 2, "--checkpoints_total_limit", 2,
                   "--random_flip", "--save_mask_previews", 3, "--use_8bit_adam", "--train_batch_size", 2,
                   "--validation_prompt", "a person", "--num_validation_images", 1,
                   "--validation_inference_steps", 2, "--validation_steps", 100, *lora))
    # rotation: only the two newest complete checkpoints remain
    names = sorted(n for n in os.listdir(straight) if "checkpoint" in n)
    assert names == ["checkpoint-4", "checkpoint-6"]
    # mask previews, model card with the FairHuman settings and the sample
    previews = os.listdir(os.path.join(straight, "mask_previews"))
    assert {f"{i}_{k}.png" for i in range(3) for k in ("image", "hand", "face", "overlay")} <= set(previews)
    # at the example's real shape: one of the aspect-ratio buckets of the tiny model (32^2 pixels, 4 px steps)
    assert Image.open(os.path.join(straight, "mask_previews", "0_hand.png")).size in fh.make_buckets(32, 4)
    card = open(os.path.join(straight, "README.md")).read()
    assert "base_model" not in card.split("---")[1]  # a local folder is not a Hub id (issue 20)
    assert "| weighting | fair |" in card and "image_0.png" in card
    assert "`straight.safetensors`" in card and "models/loras/" in card and "<lora:straight:0.3>" in card
    assert os.path.exists(os.path.join(straight, "image_0.png"))

    # the files: final ones in fp16 (the default --save_precision), the checkpoint's diffusers file in fp32
    checkpoint = os.path.join(straight, "checkpoint-6")
    assert os.path.exists(os.path.join(checkpoint, "straight-step6.safetensors"))
    final, trained = lora_tensors(straight), lora_tensors(checkpoint)
    assert final.keys() == trained.keys() and all(k.startswith("unet.") for k in final)
    assert {v.dtype for v in final.values()} == {torch.float16} and {v.dtype for v in trained.values()} == {torch.float32}
    modules = trained_lora_modules(tiny_sd, targets)
    assert len(modules) == 48 and len(final) == 2 * 48
    kohya = read_kohya_file(os.path.join(straight, "straight.safetensors"), modules, alpha=2.0)
    assert {v.dtype for k, v in kohya.items() if not k.endswith(".alpha")} == {torch.float16}
    with safe_open(os.path.join(straight, "straight.safetensors"), "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "2.0"
    assert metadata["ss_base_model_version"] == "sd_v1" and json.loads(metadata["fairhuman_settings"])["weighting"] == "fair"

    # the model as trained: the checkpoint's fp32 LoRA merged into the weights by hand
    before = sample(load_pipeline(StableDiffusionPipeline, tiny_sd))
    as_trained_pipe = load_pipeline(StableDiffusionPipeline, tiny_sd)
    merge_by_hand(as_trained_pipe.unet, fh.lora_to_kohya({k[len("unet."):]: v for k, v in trained.items()}, 2.0))
    as_trained = sample(as_trained_pipe)
    assert np.abs(as_trained - before).max() > 1e-2  # the LoRA changes the output
    images, pipes = {}, {}
    for label, folder, weight_name in [("checkpoint fp32", checkpoint, None), ("diffusers fp16", straight, None),
                                       ("kohya fp16", straight, "straight.safetensors")]:
        pipes[label] = load_pipeline(StableDiffusionPipeline, tiny_sd, folder, weight_name)
        assert lora_modules(pipes[label].unet) == modules, label  # every LoRA module, attention and conv, is loaded
        images[label] = sample(pipes[label])
    np.testing.assert_allclose(images["checkpoint fp32"], as_trained, rtol=0, atol=1e-5)
    np.testing.assert_allclose(images["kohya fp16"], images["diffusers fp16"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(images["kohya fp16"], as_trained, rtol=0, atol=1e-4)  # fp16 weights (measured 1.4e-5)
    # merging the kohya file by hand reproduces every LoRA-loaded module's output
    merged = merge_by_hand(load_pipeline(StableDiffusionPipeline, tiny_sd).unet, kohya)
    loaded = dict(pipes["kohya fp16"].unet.named_modules())
    with torch.no_grad():
        for name, module in merged.named_modules():
            if name in modules:
                x = module_inputs(module)
                torch.testing.assert_close(loaded[name](x), module(x), rtol=1e-4, atol=1e-5, msg=name)

    # interrupted at 4 and resumed to 6 gives the same LoRA as 6 straight (the checkpoints' fp32 files)
    launch(*common(tiny_sd, demo_dataset, resumed, 4, "--checkpointing_steps", 2, "--random_flip",
                   "--use_8bit_adam", "--train_batch_size", 2, *lora))
    launch(*common(tiny_sd, demo_dataset, resumed, 6, "--checkpointing_steps", 2, "--random_flip",
                   "--use_8bit_adam", "--train_batch_size", 2, "--resume_from_checkpoint", "latest", *lora))
    other = lora_tensors(os.path.join(resumed, "checkpoint-6"))
    assert trained.keys() == other.keys()
    for key in trained:
        torch.testing.assert_close(other[key], trained[key], rtol=1e-5, atol=1e-6)


def test_sdxl_trains_and_lora_loads(tiny_sdxl, demo_dataset, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from safetensors import safe_open

    out = str(tmp_path / "xl")
    proc = launch(*common(tiny_sdxl, demo_dataset, out, 3, "--weighting", "fair", "--rank", 8, "--lora_alpha", 4,
                          "--gradient_accumulation_steps", 2, "--snr_gamma", 5.0, "--center_crop",
                          "--save_precision", "fp32", "--output_name", "fh-xl", "--learning_rate", "1e-2"))
    assert "Model = SDXL" in proc.stdout + proc.stderr
    before = sample(load_pipeline(StableDiffusionXLPipeline, tiny_sdxl))
    pipe = load_pipeline(StableDiffusionXLPipeline, tiny_sdxl, out)
    after = sample(pipe)
    assert np.abs(after - before).max() > 1e-2
    # rank 8, alpha 4 survives the round trip (the LoRA config is stored with the weights)
    assert pipe.unet.peft_config["default_0"].r == 8 and pipe.unet.peft_config["default_0"].lora_alpha == 4
    modules = trained_lora_modules(tiny_sdxl, "to_q,to_k,to_v,to_out.0")
    assert lora_modules(pipe.unet) == modules

    # the kohya file: every module once, alpha 4 (not the rank), fp32 as asked; diffusers reads it to the same images
    kohya = read_kohya_file(os.path.join(out, "fh-xl.safetensors"), modules, alpha=4.0)
    assert {v.dtype for v in kohya.values()} == {torch.float32}
    with safe_open(os.path.join(out, "fh-xl.safetensors"), "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
    from_kohya = load_pipeline(StableDiffusionXLPipeline, tiny_sdxl, os.path.join(out, "fh-xl.safetensors"))
    assert lora_modules(from_kohya.unet) == modules
    np.testing.assert_allclose(sample(from_kohya), after, rtol=0, atol=1e-5)
    merged = load_pipeline(StableDiffusionXLPipeline, tiny_sdxl)
    merge_by_hand(merged.unet, kohya)
    np.testing.assert_allclose(sample(merged), after, rtol=0, atol=1e-5)


def test_sdxl_time_ids_use_real_sizes_crops_and_bucket():
    ids = mf.sdxl_time_ids([(480, 640), (100, 50)], [(0, 80), (7, 0)], [(56, 72), (64, 64)], "cpu", torch.float32)
    assert ids.tolist() == [[480, 640, 0, 80, 56, 72], [100, 50, 7, 0, 64, 64]]


# ---- in-process runs: logging, push, weighting modes -------------------------------------------------


@pytest.mark.parametrize("weighting, save_format", [("global", "kohya"), ("equal", "diffusers"), ("fair", "both")])
def test_every_mode_logs_losses_and_weights(weighting, save_format, tiny_sd, demo_dataset, tmp_path):
    out = str(tmp_path / weighting)
    run_main("--pretrained_model_name_or_path", tiny_sd, "--train_data_dir", demo_dataset, "--output_dir", out,
             "--max_train_steps", 3, "--weighting", weighting, "--seed", 0, "--report_to", "tensorboard",
             "--save_lora_format", save_format, *(["--hand_loss_weight", 0.5] if weighting == "equal" else []))
    files = {f for f in os.listdir(out) if f.endswith(".safetensors")}
    assert files == {"diffusers": {"pytorch_lora_weights.safetensors"}, "kohya": {f"{weighting}.safetensors"},
                     "both": {"pytorch_lora_weights.safetensors", f"{weighting}.safetensors"}}[save_format]
    scalars = read_scalars(out)
    for tag in ["loss/global", "loss/hand", "loss/face", "weight/global", "weight/hand", "weight/face", "lr"]:
        assert len(scalars[tag]) == 3, tag
    if weighting == "global":
        assert scalars["weight/hand"] == [0.0] * 3 and scalars["weight/global"] == [1.0] * 3
    elif weighting == "equal":
        assert scalars["weight/face"] == [1.0] * 3 and scalars["weight/hand"] == [0.5] * 3  # static region weights
        assert "(0.5, 1.0)" in open(os.path.join(out, "README.md")).read()  # and the model card says so
    else:  # the fair weights are solved each step: positive, not the equal ones, and not the same every step
        assert all(w > 0 for w in scalars["weight/global"]) and all(w > 0 for w in scalars["weight/face"])
        assert any(abs(w - 1.0) > 1e-3 for tag in ("weight/hand", "weight/face") for w in scalars[tag])
        assert len({round(w, 9) for w in scalars["weight/hand"]}) > 1
    assert all(v > 0 for v in scalars["loss/global"])


def test_push_to_hub_with_only_network_calls_mocked(tiny_sd, demo_dataset, tmp_path, monkeypatch):
    import huggingface_hub

    calls = {}

    class Repo:
        repo_id = "someone/fairhuman-test"

    def fake_create_repo(repo_id, exist_ok, token):
        calls["create"] = (repo_id, exist_ok, token)
        return Repo()

    def fake_upload_folder(repo_id, folder_path, commit_message, token, ignore_patterns):
        calls["upload"] = (repo_id, sorted(os.listdir(folder_path)), ignore_patterns)

    monkeypatch.setattr(huggingface_hub, "create_repo", fake_create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", fake_upload_folder)
    out = str(tmp_path / "fairhuman-test")
    run_main("--pretrained_model_name_or_path", tiny_sd, "--train_data_dir", demo_dataset, "--output_dir", out,
             "--max_train_steps", 1, "--push_to_hub", "--hub_token", "tok", "--report_to", "none")
    assert calls["create"] == ("fairhuman-test", True, "tok")
    repo_id, files, ignore = calls["upload"]
    assert repo_id == "someone/fairhuman-test"
    assert {"pytorch_lora_weights.safetensors", "fairhuman-test.safetensors", "README.md"} <= set(files)
    assert "checkpoint-*" in ignore
    assert "someone/fairhuman-test" in open(os.path.join(out, "README.md")).read()


# ---- bad input: a clear error naming the flag, column or row, before any model is loaded -------------


def _error(argv):
    """The one-line error the run stops with: argparse's for a flag's own value, else main()'s UsageError."""
    refused = parse_error(train.parse_args, argv)
    if refused is not None:
        return refused
    args = train.parse_args(list(map(str, argv)))
    with pytest.raises(train.UsageError) as info:
        train.main(args)
    return str(info.value)


def _dataset(tmp_path, rows, sizes=None):
    images = {}
    for i, row in enumerate(rows):
        row.setdefault("file_name", f"im{i}.png")
        images[row["file_name"]] = Image.new("RGB", (sizes or {}).get(i, (40, 30)), (120, 90, 60))
    return write_imagefolder(tmp_path / "data", rows, images)


@functools.lru_cache(maxsize=None)
def config_only_model() -> str:
    """A tiny SD folder with its config files and NO weights: the family's config checks pass, and an error that
    came after the data pass would name the missing weights. Errors checked "before any weight loads" use it."""
    import tempfile

    import fairhuman_demo

    folder = fairhuman_demo.build_tiny_pipeline(os.path.join(tempfile.mkdtemp(prefix="config-only-"), "tiny-sd"),
                                                sdxl=False)
    for root, _, files in os.walk(folder):
        for name in files:
            if name.endswith((".safetensors", ".bin")):
                os.remove(os.path.join(root, name))
    return folder


def _argv(data, out, *extra):
    return ["--pretrained_model_name_or_path", config_only_model(), "--train_data_dir", data, "--output_dir", out,
            "--report_to", "none", *extra]


def test_missing_columns_named(tmp_path):
    data = _dataset(tmp_path, [{"text": "a", "hand_boxes": []}])
    message = _error(_argv(data, tmp_path / "o"))
    assert "--face_box_column: column 'face_boxes' not found" in message and "hand_boxes" in message
    message = _error(_argv(data, tmp_path / "o", "--caption_column", "caption"))  # checked before the box columns
    assert "--caption_column: column 'caption' not found" in message


def test_malformed_box_names_column_and_row(tmp_path):
    rows = [{"text": "a", "hand_boxes": [[1, 1, 5, 5]], "face_boxes": [[1, 1, 5, 5]]},
            {"text": "b", "hand_boxes": [[1, 1, 5, 5]], "face_boxes": [[9, 9, 5, 5]]}]
    message = _error(_argv(_dataset(tmp_path, rows), tmp_path / "o"))
    assert "column 'face_boxes', row 1" in message and "x1 < x0" in message


def test_out_of_range_boxes_are_clipped_or_dropped(tmp_path):
    rows = [{"text": "a", "hand_boxes": [[30, 20, 90, 90], [100, 100, 120, 120]], "face_boxes": [], "notes": "x"}]
    args = train.parse_args(_argv(_dataset(tmp_path, rows), str(tmp_path / "o")))
    checked = train.check_dataset(train.load_training_dataset(args), args)
    assert checked.boxes["hand"] == [[(30.0, 20.0, 40.0, 30.0)]] and checked.boxes["face"] == [[]]
    assert sorted(checked.dataset.column_names) == ["face_boxes", "hand_boxes", "image", "text"]  # "notes" unread


def test_unreadable_image_names_row(tmp_path):
    rows = [{"text": "a", "hand_boxes": [], "face_boxes": []}, {"text": "b", "hand_boxes": [], "face_boxes": []}]
    data = _dataset(tmp_path, rows)
    with open(os.path.join(data, "im1.png"), "wb") as f:
        f.write(b"not a png at all")
    message = _error(_argv(data, tmp_path / "o"))
    assert "column 'image', row 1: cannot read the image" in message


def test_empty_dataset(tmp_path):
    from datasets import Dataset, Features, Sequence, Value
    from datasets import Image as ImageFeature

    features = Features({"image": ImageFeature(), "text": Value("string"),
                         "hand_boxes": Sequence(Sequence(Value("float32"))),
                         "face_boxes": Sequence(Sequence(Value("float32")))})
    empty = Dataset.from_dict({"image": [], "text": [], "hand_boxes": [], "face_boxes": []}, features=features)
    empty.save_to_disk(str(tmp_path / "saved"))
    os.makedirs(tmp_path / "parquet")
    empty.to_parquet(str(tmp_path / "parquet" / "train.parquet"))
    for folder in ("saved", "parquet"):
        message = _error(["--pretrained_model_name_or_path", config_only_model(), "--dataset_name", tmp_path / folder,
                          "--output_dir", tmp_path / "o", "--report_to", "none"])
        assert message.startswith("--dataset_name: cannot load") and "the dataset is empty" in message


def test_mask_columns_checked_and_used(tmp_path, tiny_sd):
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    image = Image.new("RGB", (48, 32), (10, 10, 10))
    hand = Image.new("L", (48, 32), 0)
    hand.paste(255, (4, 4, 20, 20))
    good = {"image": [image], "text": ["a"], "mask_hand": [hand], "mask_face": [Image.new("RGB", (48, 32))]}
    features = Features({"image": ImageFeature(), "text": Value("string"), "mask_hand": ImageFeature(),
                         "mask_face": ImageFeature()})
    Dataset.from_dict(good, features=features).save_to_disk(str(tmp_path / "good"))
    args = train.parse_args(["--pretrained_model_name_or_path", tiny_sd, "--dataset_name", str(tmp_path / "good"),
                             "--hand_mask_column", "mask_hand", "--face_mask_column", "mask_face",
                             "--resolution", "32", "--center_crop", "--mask_dilation", "0"])
    checked = train.check_dataset(train.load_training_dataset(args), args)
    example = train.FairHumanDataset(checked, args, 0, 32, keep_regions=False)[0]  # a 32x32 square crop
    # 48x32 -> 48x32 (shorter side 32), centre crop x 8..40: the hand square 4..20 shows at 0..12
    hand_mask = example["masks"][0]
    assert hand_mask[4:20, 0:12].min() == 1 and hand_mask[:, 14:].max() == 0 and example["masks"][1].max() == 0

    bad = dict(good, mask_hand=[Image.new("L", (40, 32))])
    Dataset.from_dict(bad, features=features).save_to_disk(str(tmp_path / "bad"))
    message = _error(["--pretrained_model_name_or_path", config_only_model(), "--dataset_name", tmp_path / "bad",
                      "--hand_mask_column", "mask_hand", "--face_mask_column", "mask_face",
                      "--output_dir", tmp_path / "o", "--report_to", "none"])
    assert "column 'mask_hand', row 0: mask size 40x32 differs from the image size 48x32" in message


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--dataset_name", "x"], "--dataset_name and --train_data_dir are exclusive"),
        (["--report_to", "wandb", "--hub_token", "t"], "--report_to wandb and --hub_token"),
        (["--gradient_accumulation_steps", "0"], "argument --gradient_accumulation_steps: must be at least 1, got 0"),
        (["--resolution", "100"], "argument --resolution: must be a multiple of 8, got 100"),
        (["--fair_alpha", "0"], "argument --fair_alpha: must be positive, got 0"),
        (["--resume_from_checkpoint", "/no/such/ckpt"], "--resume_from_checkpoint: no such folder"),
        (["--lora_target_modules", " , "], "--lora_target_modules is empty"),
        (["--noise_offset", "nan"], "argument --noise_offset: must be a finite number, got nan"),
        (["--weighting", "equal", "--fair_update_interval", "4"], "need --weighting fair"),
        (["--fair_fidelity_check", "--fair_update_interval", "1"], "--fair_fidelity_check compares a --fair_update_interval"),
        (["--fair_update_interval", "0"], "argument --fair_update_interval: must be at least 1, got 0"),
        (["--weighting", "global", "--fair_batched_backward"], "need --weighting fair"),
        (["--output_name", "loras/mine"], "--output_name must be a plain file name"),
        (["--hand_loss_weight", "0.5"], "--hand_loss_weight is the static weight of --weighting equal"),
        (["--weighting", "equal", "--face_loss_weight", "-1"], "argument --face_loss_weight: must not be negative, got -1"),
    ],
)
def test_impossible_flag_combinations(extra, expected, tmp_path):
    assert expected in _error(_argv(str(tmp_path), tmp_path / "o", *extra))


def test_no_dataset_and_bad_model_path(tmp_path, demo_dataset):
    assert "give a dataset" in _error(["--pretrained_model_name_or_path", "x", "--output_dir", tmp_path])
    assert "--pretrained_model_name_or_path: cannot read model_index.json" in _error(
        ["--pretrained_model_name_or_path", "/nonexistent/model", "--train_data_dir", demo_dataset, "--output_dir",
         tmp_path / "o", "--report_to", "none"])


def test_cli_prints_error_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "train_fairhuman_lora.py"),
                           "--pretrained_model_name_or_path", "x", "--output_dir", str(tmp_path)],
                          env=OFFLINE_ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "error: give a dataset" in proc.stderr and "Traceback" not in proc.stderr


def test_checkpoint_latest_ignores_partial_and_foreign_folders(tmp_path):
    out = tmp_path / "run"
    for name, marker in [("checkpoint-2", True), ("checkpoint-10", False), (".checkpoint-12.partial", True),
                         ("checkpoint-5", True), ("checkpoint-x", True)]:
        os.makedirs(out / name)
        if marker:
            (out / name / checkpoints.CHECKPOINT_MARKER).write_text(json.dumps({"global_step": 0, "seed": 0}))
    args = train.parse_args(["--pretrained_model_name_or_path", "x", "--output_dir", str(out),
                             "--resume_from_checkpoint", "latest"])
    assert train.resolve_resume(args) == str(out / "checkpoint-5")


# ---- aspect-ratio buckets and EXIF orientation (issue 10) -------------------------------------------


def _mask_fractions(preview_dir, i):
    """(shape (w, h), face mask area / image area, hand mask area / image area) of mask preview i."""
    face = np.asarray(Image.open(os.path.join(preview_dir, f"{i}_face.png")), dtype=np.float64) / 255
    hand = np.asarray(Image.open(os.path.join(preview_dir, f"{i}_hand.png")), dtype=np.float64) / 255
    return (face.shape[1], face.shape[0]), face.mean(), hand.mean()


def _area(boxes):
    return sum((b[2] - b[0]) * (b[3] - b[1]) for b in boxes)


def test_buckets_keep_edge_boxes_and_square_crop_reports_its_loss(tiny_sd, tmp_path, caplog):
    data, layouts = edge_photos(tmp_path / "data")
    common = ["--pretrained_model_name_or_path", tiny_sd, "--train_data_dir", data, "--resolution", 64,
              "--mask_dilation", 0, "--save_mask_previews", 2, "--max_train_steps", 1, "--report_to", "none",
              "--seed", 0, "--weighting", "global"]  # the previews are the point: one cheap step
    with caplog.at_level("INFO"):
        run_main(*common, "--output_dir", tmp_path / "buckets")
    log = caplog.text
    assert "Aspect-ratio buckets: 2 of" in log and "52 x 80" in log and "80 x 52" in log
    assert "0 of 2 images with boxes lose hand/face box area" in log
    previews = str(tmp_path / "buckets" / "mask_previews")
    for i in range(2):
        shape, face, hand = _mask_fractions(previews, i)
        assert shape in {(52, 80), (80, 52)}  # at their real (bucket) shape
        (w, h), (face_box, hands) = next((s, v) for s, v in layouts.items() if (s[0] > s[1]) == (shape[0] > shape[1]))
        # every box whole: the mask covers the same fraction of the example as the box of the photo
        assert face == pytest.approx(_area([face_box]) / (w * h), rel=0.1)
        assert hand == pytest.approx(_area(hands) / (w * h), rel=0.1)
        assert min(preview_ious(previews, i)) > 0.8

    caplog.clear()
    with caplog.at_level("INFO"):
        run_main(*common, "--output_dir", tmp_path / "square", "--square_crop")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("2 of 2 images with boxes lose hand/face box area to the crop" in m and "drop --square_crop" in m
               for m in warnings)
    previews = str(tmp_path / "square" / "mask_previews")
    for i in range(2):
        shape, face, hand = _mask_fractions(previews, i)
        assert shape == (64, 64)
        (w, h), (face_box, hands) = next((s, v) for s, v in layouts.items() if s != (64, 64))
        whole = (_area([face_box]) + _area(hands)) / (w * h) * (w * h) / (min(w, h) ** 2)  # as if nothing were cut
        assert face + hand < 0.8 * whole  # the square cuts the top or the bottom (left or right) away


def test_exif_rotated_photos_train_upright(tiny_sd, tmp_path):
    """JPEGs stored sideways with EXIF orientation 6 and 8, boxes drawn on the upright photo."""
    data, _ = edge_photos(tmp_path / "data", orientations=(6, 8))
    out = tmp_path / "out"
    run_main("--pretrained_model_name_or_path", tiny_sd, "--train_data_dir", data, "--output_dir", out,
             "--resolution", 64, "--mask_dilation", 0, "--save_mask_previews", 4, "--max_train_steps", 1,
             "--report_to", "none", "--random_flip", "--weighting", "global")
    previews = str(out / "mask_previews")
    shapes = sorted(_mask_fractions(previews, i)[0] for i in range(4))
    assert shapes == [(52, 80), (52, 80), (80, 52), (80, 52)]  # the upright shapes, not the stored ones
    for i in range(4):
        assert min(preview_ious(previews, i)) > 0.8  # the masks sit on the drawn face and hands


@pytest.mark.parametrize("relative, boxes, expected", [
    (True, [[10, 20, 300, 400]], "column 'face_boxes': --relative_boxes is set but the boxes hold numbers up to 400"),
    (False, [[0.1, 0.2, 0.5, 0.6]], "column 'face_boxes': every box lies within [0, 1]"),
])
def test_boxes_in_the_wrong_unit_stop_the_run(relative, boxes, expected, tmp_path):
    rows = [{"text": "a", "hand_boxes": [], "face_boxes": boxes}, {"text": "b", "hand_boxes": [], "face_boxes": []}]
    message = _error(_argv(_dataset(tmp_path, rows), tmp_path / "o", *(["--relative_boxes"] if relative else [])))
    assert expected in message


def test_bucket_flags_checked(tmp_path):
    assert "argument --max_bucket_aspect_ratio: must be at least 1, got 0.5" in _error(_argv(str(tmp_path), tmp_path / "o",
                                                               "--max_bucket_aspect_ratio", "0.5"))
    assert "--square_crop" in _error(_argv(str(tmp_path), tmp_path / "o", "--square_crop", "--bucket_reso_steps", 32))
