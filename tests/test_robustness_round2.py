"""Nothing a user runs is lost, round 2 (issue 20): checkpoints, overwrites, tokens, files, and every
flag's domain checked before any model loads.

Messages checked "before any model loads" are given with a model path that does not exist: had the
check come later, the error would name the model instead.
"""

import json
import logging
import os

import pytest
import torch
from conftest import lora_tensors, parse_error, run_main
from PIL import Image
from test_train import _argv, _dataset, _error, common

import checkpoints
import lora_files
import train_fairhuman_lora as train
from training_checks import CheckedDataset


def _fake_checkpoint(folder, step, *, lora=True, optimizer=True, truncate_lora=False, fair_state=True):
    """A checkpoint folder with the files save_checkpoint writes (tiny contents, no model needed)."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    if lora:
        path = os.path.join(folder, lora_files.LORA_WEIGHT_NAME)
        save_file({"unet.a.lora_A.weight": torch.zeros(4, 8)}, path)
        if truncate_lora:
            payload = open(path, "rb").read()
            open(path, "wb").write(payload[: len(payload) - 40])
    if optimizer:
        torch.save({"state": {}}, os.path.join(folder, "optimizer.bin"))
    torch.save({"last_epoch": step}, os.path.join(folder, "scheduler.bin"))
    if fair_state:
        with open(os.path.join(folder, checkpoints.FAIR_STATE_FILE), "w") as f:
            json.dump({"step": step, "weighting": "fair", "coefficients": [1.0, 2.0, 3.0], "gram_scale": None}, f)
    with open(os.path.join(folder, checkpoints.CHECKPOINT_MARKER), "w") as f:
        json.dump({"global_step": step, "seed": 1}, f)
    return str(folder)


# ---- 1. checkpoint rotation never deletes what was just written; latest never picks another branch -----


def test_resume_from_an_older_checkpoint_moves_later_ones_aside(tiny_sd, demo_dataset, tmp_path, caplog):
    out = tmp_path / "run"
    run_main(*common(tiny_sd, demo_dataset, out, 4, "--checkpointing_steps", 2, "--checkpoints_total_limit", 2))
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint")) == ["checkpoint-2", "checkpoint-4"]
    with caplog.at_level(logging.WARNING):
        run_main(*common(tiny_sd, demo_dataset, out, 3, "--checkpointing_steps", 1, "--checkpoints_total_limit", 1,
                         "--resume_from_checkpoint", out / "checkpoint-2"))
    # the checkpoint just written is kept; the other branch's later one is moved aside, not deleted
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint")) == ["checkpoint-3", "checkpoint-4.superseded"]
    assert "checkpoint-4 -> checkpoint-4.superseded" in caplog.text
    args = train.parse_args(["--pretrained_model_name_or_path", "x", "--output_dir", str(out),
                             "--resume_from_checkpoint", "latest"])
    assert train.resolve_resume(args) == str(out / "checkpoint-3")  # the new work, not the old branch
    assert lora_tensors(out / "checkpoint-4.superseded")  # still whole
    # 7. the LoRA files get the permissions of the user's umask (safetensors alone writes 0600)
    mode = 0o666 & ~lora_files.current_umask()
    for path in [out / "pytorch_lora_weights.safetensors", out / "run.safetensors",
                 out / "checkpoint-3" / "pytorch_lora_weights.safetensors"]:
        assert os.stat(path).st_mode & 0o777 == mode, path


def test_new_run_over_another_runs_checkpoints_is_refused(tmp_path):
    data = _dataset(tmp_path, [{"text": "a", "hand_boxes": [], "face_boxes": []}])
    out = tmp_path / "o"
    _fake_checkpoint(out / "checkpoint-4", 4)
    message = _error(_argv(data, out))
    assert "holds the checkpoints of another run (checkpoint-4)" in message
    assert "--resume_from_checkpoint latest" in message and "another --output_dir" in message


def test_rotation_keeps_the_checkpoint_just_written(tmp_path):
    for step in (2, 4, 6):
        _fake_checkpoint(tmp_path / f"checkpoint-{step}", step)
    removed = checkpoints.rotate_checkpoints(str(tmp_path), 4, 1)  # another run's checkpoint-6 is newer
    assert removed == [str(tmp_path / "checkpoint-2")]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-4", "checkpoint-6"]


# ---- 4. a damaged checkpoint is named before the models load, with the previous complete one -------------


@pytest.mark.parametrize("damage, expected", [
    (dict(optimizer=False), "optimizer.bin is missing"),
    (dict(lora=False), "pytorch_lora_weights.safetensors is missing"),
    (dict(truncate_lora=True), "pytorch_lora_weights.safetensors is damaged"),
])
def test_damaged_checkpoint_named_with_the_previous_one(damage, expected, tmp_path):
    data = _dataset(tmp_path, [{"text": "a", "hand_boxes": [], "face_boxes": []}])
    out = tmp_path / "o"
    _fake_checkpoint(out / "checkpoint-2", 2)
    _fake_checkpoint(out / "checkpoint-4", 4, **damage)
    message = _error(_argv(data, out, "--resume_from_checkpoint", "latest"))
    assert f"checkpoint-4 is damaged: {expected}" in message
    assert f"--resume_from_checkpoint {out / 'checkpoint-2'}" in message


# ---- 8. the fair update's state is JSON, read as JSON; a checkpoint without it is refused by name ------------


def test_fair_update_state_is_read_from_json_and_its_absence_refused(tmp_path):
    import fairhuman_utils as fh

    class FakeAccelerator:
        def load_state(self, folder):
            self.loaded = sorted(os.listdir(folder))

    checkpoint = _fake_checkpoint(tmp_path / "checkpoint-3", 3)
    update = fh.FairUpdate([torch.nn.Parameter(torch.zeros(2))], "fair")
    assert checkpoints.load_checkpoint(FakeAccelerator(), checkpoint, update) == 3
    assert update.step == 3 and update.coefficients.tolist() == [1.0, 2.0, 3.0]
    assert checkpoints.checkpoint_problem(checkpoint) is None
    os.remove(os.path.join(checkpoint, checkpoints.FAIR_STATE_FILE))
    assert checkpoints.checkpoint_problem(checkpoint) == f"{checkpoints.FAIR_STATE_FILE} is missing"
    with pytest.raises(fh.UsageError, match=f"checkpoint-3 is damaged: {checkpoints.FAIR_STATE_FILE} is missing"):
        checkpoints.check_checkpoint(checkpoint, str(tmp_path))


# ---- 2. evaluate_fairhuman.py --overwrite_output_dir removes only its own outputs -----------------------


def test_evaluation_overwrite_removes_only_its_own_files(tmp_path):
    import argparse

    import evaluate_fairhuman as ev

    out = tmp_path / "eval"
    args = argparse.Namespace(num_images_per_prompt=2, seed=7)
    planned = ev.planned_outputs(args, ["a", "b"], ["lora"])
    assert "images/base/000_7.png" in planned and "images/lora/001_10.png" in planned and "grid_1.png" in planned
    ev.claim_outputs(str(out), planned)
    for relative in planned[:5]:  # an interrupted earlier run wrote some of them
        os.makedirs(os.path.dirname(out / relative), exist_ok=True)
        (out / relative).write_text("ours")
    (out / "images" / "mine.png").write_text("the user's")
    (out / "images" / "base" / "notes.txt").write_text("the user's")
    (out / "grid_7.png").write_text("the user's")
    assert ev.clear_outputs(str(out)) == planned[:5]
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert left == ["grid_7.png", "images/base/notes.txt", "images/mine.png"]
    # a file of the user's with an output's name is never overwritten: the run stops naming it
    (out / "report.md").write_text("the user's")
    with pytest.raises(ev.UsageError, match="report.md"):
        ev.claim_outputs(str(out), planned)


def test_scoring_mode_keeps_a_users_grid_0_png(tmp_path):
    pytest.importorskip("mediapipe")
    import evaluate_fairhuman as ev

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("grid_0.png", "a.png"):
        Image.new("RGB", (32, 32), (200, 180, 160)).save(photos / name)
    argv = ["--images_dir", str(photos), "--output_dir", str(photos), "--overwrite_output_dir",
            "--disable_progress_bar", "--num_bootstrap", "10"]
    for _ in range(2):
        report = ev.main(ev.parse_args(argv))
        assert report["models"][0]["images"] == 2
    assert sorted(os.listdir(photos)) == [".fairhuman_evaluation_outputs.json", "a.png", "grid_0.png", "report.json",
                                          "report.md"]


# ---- 3. prepare_fairhuman_dataset.py never writes over (into, around) its input -------------------------


@pytest.mark.parametrize("where, relation", [("same", "is"), ("parent", "contains"), ("child", "is inside")])
def test_prepare_refuses_an_output_over_a_local_dataset(where, relation, tmp_path, capsys):
    from datasets import Dataset

    import prepare_fairhuman_dataset as prep

    source = tmp_path / "src"
    Dataset.from_dict({"image": [Image.new("RGB", (8, 8))], "o": [[]]}).save_to_disk(str(source))
    out = {"same": source, "parent": tmp_path, "child": source / "out"}[where]
    argv = ["--dataset_name", str(source), "--objects_column", "o", "--hand_categories", "h",
            "--output_dir", str(out), "--overwrite_output_dir"]
    with pytest.raises(SystemExit):
        prep.parse_args(argv)
    assert f"--output_dir {out} {relation} --dataset_name {source}" in capsys.readouterr().err
    assert os.path.isfile(source / "dataset_info.json")  # nothing deleted
    photos = tmp_path / "photos"
    photos.mkdir()
    with pytest.raises(SystemExit):  # also an output inside an --input_dir, and --save_to_disk
        prep.parse_args(["--input_dir", str(photos), "--output_dir", str(photos / "o")])
    with pytest.raises(SystemExit):
        prep.parse_args(["--input_dir", str(photos), "--output_dir", str(tmp_path / "x"), "--save_to_disk", str(photos)])
    assert "--save_to_disk" in capsys.readouterr().err


@pytest.mark.parametrize("extra, expected", [
    (["--hand_box_padding", "nan"], "argument --hand_box_padding: must be a finite number, got nan"),
    (["--min_mask_area", "0"], "argument --min_mask_area: must be at least 1, got 0"),
    (["--caption_extension", "txt"], "--caption_extension must be an extension starting with '.'"),
    (["--push_to_hub", "--hub_dataset_id", "my data"], "--hub_dataset_id 'my data' is not a valid Hub repository id"),
])
def test_prepare_checks_every_value(extra, expected, tmp_path, capsys):
    import prepare_fairhuman_dataset as prep

    (tmp_path / "photos").mkdir()
    with pytest.raises(SystemExit):
        prep.parse_args(["--input_dir", str(tmp_path / "photos"), "--output_dir", str(tmp_path / "o"), *extra])
    assert expected in capsys.readouterr().err
    with pytest.raises(SystemExit):
        prep.parse_args(["--dataset_name", "x", "--hand_mask_column", "m", "--face_mask_column", "m",
                         "--output_dir", str(tmp_path / "o")])
    assert "--hand_mask_column and --face_mask_column are the same column 'm'" in capsys.readouterr().err


# ---- 5. the Hub token never reaches a tracker that records the command line ------------------------------


@pytest.mark.parametrize("tracker", ["wandb", "all"])
def test_hub_token_refused_with_trackers_recording_the_command_line(tracker, tmp_path):
    message = _error(_argv(str(tmp_path), tmp_path / "o", "--report_to", tracker, "--hub_token", "hf_secret"))
    assert f"--report_to {tracker} and --hub_token cannot be used together" in message and "hf auth login" in message
    # the flag's help says it too
    import io
    from contextlib import redirect_stdout

    help_text = io.StringIO()
    with redirect_stdout(help_text), pytest.raises(SystemExit):
        train.parse_args(["--help"])
    assert "Prefer `hf auth login`" in " ".join(help_text.getvalue().split())


# ---- 6. the model card's YAML is serialized; only Hub ids are base_model ---------------------------------


def _card(tmp_path, model, *extra):
    import ast

    import yaml

    args = train.parse_args(["--pretrained_model_name_or_path", model, "--train_data_dir", "d", "--output_dir",
                             str(tmp_path / "o"), "--resolution", "64", *extra])
    train.check_args(args)
    os.makedirs(args.output_dir, exist_ok=True)
    family = train.mf.StableDiffusionFamily(args)  # the card of an SD LoRA (model_families: issue 18)
    text = open(train.write_model_card(args, args.output_dir, "me/lora", family, [], 1)).read()
    front = yaml.safe_load(text.split("---\n")[1])
    code = text.split("```python\n")[1].split("```")[0]
    ast.parse(code)  # the usage code stays valid Python whatever the path holds
    return front, code


def test_model_card_front_matter_cannot_be_injected(tmp_path):
    front, code = _card(tmp_path, 'evil"\nlicense: mit\ntags: [x] # "')
    assert set(front) == {"library_name", "license", "inference", "tags"} and front["license"] == "other"
    assert "lora" in front["tags"] and "x" not in front["tags"]
    front, _ = _card(tmp_path, str(tmp_path))  # a local folder: not a Hub base_model
    assert "base_model" not in front
    front, code = _card(tmp_path, "stabilityai/stable-diffusion-xl-base-1.0")
    assert front["base_model"] == "stabilityai/stable-diffusion-xl-base-1.0"
    assert "from_pretrained('stabilityai/stable-diffusion-xl-base-1.0'" in code


# ---- 9. every value flag checked for its domain before any model loads ----------------------------------


@pytest.mark.parametrize("extra, expected", [
    (["--seed", "-5"], "argument --seed: must be in [0, 4294967295], got -5"),
    (["--seed", "99999999999"], "argument --seed: must be in [0, 4294967295], got 99999999999"),
    (["--lr_scheduler", "foo"], "--lr_scheduler must be one of linear, cosine"),
    (["--lr_scheduler", "piecewise_constant"], "--lr_scheduler piecewise_constant needs --lr_step_rules"),
    (["--lr_scheduler", "piecewise_constant", "--lr_step_rules", "1:10,0.1:5,0.01"], "steps must be positive and increasing"),
    (["--lr_scheduler", "piecewise_constant", "--lr_step_rules", "1:10,0.1"], None),
    (["--lr_step_rules", "1:10,0.1"], "--lr_step_rules only applies to --lr_scheduler piecewise_constant"),
    (["--adam_beta1", "1.5"], "argument --adam_beta1: must be in [0, 1), got 1.5"),
    (["--adam_beta2", "1"], "argument --adam_beta2: must be in [0, 1), got 1"),
    (["--adam_epsilon", "-1"], "argument --adam_epsilon: must be positive, got -1"),
    (["--adam_epsilon", "0"], "argument --adam_epsilon: must be positive, got 0"),
    (["--adam_weight_decay", "-1"], "argument --adam_weight_decay: must not be negative, got -1"),
    (["--lora_alpha", "0"], "argument --lora_alpha: must be positive, got 0"),
    (["--lora_alpha", "-2", "--save_lora_format", "diffusers"], "argument --lora_alpha: must be positive, got -2"),
    (["--noise_offset", "-0.1"], "argument --noise_offset: must not be negative, got -0.1"),
    (["--validation_prompt", "a person", "--num_validation_images", "0"], "give at least 1, got 0"),
    (["--hand_box_column", "boxes", "--face_box_column", "boxes"], "read from the same column 'boxes'"),
    (["--hand_mask_column", "m", "--face_mask_column", "m"], "read from the same column 'm'"),
    (["--hand_mask_column", "image"], "--hand_mask_column 'image' is also --image_column"),
    (["--push_to_hub", "--hub_model_id", "my lora"], "--hub_model_id 'my lora' is not a valid Hub repository id"),
    (["--caption_column", ""], "--caption_column is empty"),
    (["--lr_warmup_steps", "10"], "--lr_scheduler constant ignores --lr_warmup_steps"),
])
def test_every_value_is_checked_before_models_load(extra, expected, tmp_path):
    data = _dataset(tmp_path, [{"text": "a", "hand_boxes": [], "face_boxes": []}])
    message = _error(_argv(data, tmp_path / "o", *extra))
    if expected is None:  # accepted: the run goes on to the model's weights, which the config-only folder lacks
        assert message.startswith("--pretrained_model_name_or_path: text encoders: load failed"), message
    else:
        assert expected in message


def test_piecewise_constant_trains_with_its_rules(tiny_sd, demo_dataset, tmp_path):
    from fairhuman_demo import read_scalars

    out = tmp_path / "o"
    run_main(*common(tiny_sd, demo_dataset, out, 3, "--lr_scheduler", "piecewise_constant", "--lr_step_rules",
                     "1:1,0.1:2,0.01", "--report_to", "tensorboard"))
    assert read_scalars(str(out))["lr"] == pytest.approx([1e-4, 1e-5, 1e-5])  # logged after each step


# ---- 10. the right flag or file is named ----------------------------------------------------------------


def test_missing_vae_is_named_as_the_vae_flag(tiny_sd, demo_dataset, tmp_path):
    message = _error(common(tiny_sd, demo_dataset, tmp_path / "o", 1, "--pretrained_vae_model_name_or_path",
                            tmp_path / "no-vae"))
    assert message.startswith("--pretrained_vae_model_name_or_path: cannot read the VAE config.json")


@pytest.mark.parametrize("argv, name", [
    (["--output_dir", "{tmp}/.lora_out"], "lora_out"),
    (["--output_dir", "{tmp}/pytorch_lora_weights"], "pytorch_lora_weights_kohya"),
    (["--output_dir", "{tmp}/pytorch_lora_weights", "--save_lora_format", "diffusers"], "pytorch_lora_weights"),
    (["--output_dir", "{tmp}/o", "--output_name", "x.safetensors"], "x"),
])
def test_output_name_is_derived_or_cleaned_not_refused(argv, name, tmp_path):
    args = train.parse_args(["--pretrained_model_name_or_path", "m", "--train_data_dir", "d",
                             *[a.format(tmp=tmp_path) for a in argv]])
    train.check_args(args)
    assert args.output_name == name


# ---- 14. a v-prediction LoRA is sampled with v-prediction everywhere ------------------------------------


def test_v_prediction_lora_is_sampled_with_v_prediction(tiny_sd, demo_dataset, tmp_path, monkeypatch):
    import evaluate_fairhuman as ev

    _, code = _card(tmp_path, "owner/model", "--prediction_type", "v_prediction")
    assert "UniPCMultistepScheduler.from_config(pipe.scheduler.config, prediction_type='v_prediction')" in code
    out = tmp_path / "v"
    run_main(*common(tiny_sd, demo_dataset, out, 1, "--prediction_type", "v_prediction", "--save_lora_format", "kohya"))
    assert ev.lora_prediction_type([str(out / "v.safetensors")]) == "v_prediction"
    assert ev.lora_prediction_type([str(out)]) == "v_prediction"
    args = ev.parse_args(["--pretrained_model_name_or_path", tiny_sd, "--prediction_type", "v_prediction",
                          "--device", "cpu", "--mixed_precision", "no"])
    assert ev.load_pipeline(args).scheduler.config.prediction_type == "v_prediction"
    # the training script's --evaluate_prompts_file passes its prediction type on
    train_args = train.parse_args(["--pretrained_model_name_or_path", tiny_sd, "--train_data_dir", "d", "--seed", "1",
                                   "--output_dir", str(out), "--prediction_type", "v_prediction",
                                   "--evaluate_prompts_file", "p.txt"])
    seen = {}
    monkeypatch.setattr(ev, "main", lambda parsed, sampler=None: seen.setdefault("args", parsed))
    ev.evaluate_trained_lora(train_args, str(out / "v.safetensors"))
    assert seen["args"].prediction_type == "v_prediction"


# ---- 9. evaluate_fairhuman.py checks its values before generating anything ------------------------------


@pytest.mark.parametrize("extra, expected", [
    (["--seed", "-5"], "argument --seed: must be in [0, 4294967295], got -5"),
    (["--seed", "99999999999"], "argument --seed: must be in [0, 4294967295], got 99999999999"),
    (["--resolution", "100"], "argument --resolution: must be a multiple of 8, got 100"),
    (["--resolution", "0"], "argument --resolution: must be at least 8, got 0"),
    (["--guidance_scale", "-1"], "argument --guidance_scale: must not be negative, got -1"),
    (["--confidence_level", "1"], "argument --confidence_level: must be in (0, 1), got 1"),
    (["--device", "cuda"], "--device cuda: no CUDA device is available"),
    (["--device", "banana"], "--device 'banana' is not a torch device"),
])
def test_evaluation_values_checked_before_generation(extra, expected, tmp_path):
    import torch

    import evaluate_fairhuman as ev

    if extra[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    argv = ["--pretrained_model_name_or_path", "/nonexistent", "--output_dir", str(tmp_path / "o"), *extra]
    message = parse_error(ev.parse_args, argv)  # a number's own range: argparse, as the command line is read
    if message is None:
        with pytest.raises(ev.UsageError) as info:
            ev.check_args(ev.parse_args(argv))
        message = str(info.value)
    assert expected in message


# ---- 11. silent or unreadable data problems -------------------------------------------------------------


def _gray16_face_photo(path):
    """A 16-bit grayscale PNG of a bundled one-face photo (8-bit gray x 257): convert("RGB") clips it to white."""
    import numpy as np
    from test_prepare_dataset import bundled_file

    gray = Image.open(bundled_file("skimage", "data", "camera.png")).convert("L")
    Image.fromarray(np.asarray(gray).astype(np.uint16) * 257).save(path)
    assert Image.open(path).mode == "I;16"
    return path


def test_16_bit_png_faces_are_found_by_prepare_and_evaluate(tmp_path):
    pytest.importorskip("mediapipe")
    import detector as det
    import evaluate_fairhuman as ev
    import prepare_fairhuman_dataset as prep

    photos = tmp_path / "photos"
    photos.mkdir()
    _gray16_face_photo(photos / "camera16.png")
    summary = prep.main(prep.parse_args(["--input_dir", str(photos), "--output_dir", str(tmp_path / "prepared"),
                                         "--disable_progress_bar"]))
    rows = [json.loads(line) for line in open(tmp_path / "prepared" / "metadata.jsonl")]
    assert len(rows[0]["face_boxes"]) == 1, summary
    with det.MediaPipeDetector() as detector:
        records = ev.score_images(ev.read_folder(str(photos)), detector, disable_progress_bar=True)
    assert records[0]["faces"] == 1


def test_coco_category_list_matching_nothing_is_refused(tmp_path):
    import datasets

    import prepare_fairhuman_dataset as prep

    datasets.Dataset.from_dict({
        "image": [Image.new("RGB", (32, 32))],
        "objects": [{"bbox": [[1.0, 1.0, 5.0, 5.0], [10.0, 10.0, 8.0, 8.0]], "category": ["hand", "face"]}],
    }).save_to_disk(str(tmp_path / "src"))
    with pytest.raises(prep.PrepareError, match=r"--face_categories: none of 'faces' occurs in 'objects.category' "
                                                r"\(a typo\?\); the values there are \['face', 'hand'\]"):
        prep.main(prep.parse_args(["--dataset_name", str(tmp_path / "src"), "--objects_column", "objects",
                                   "--hand_categories", "hand", "--face_categories", "faces",
                                   "--output_dir", str(tmp_path / "o"), "--disable_progress_bar"]))


def test_latin1_metadata_is_named_by_line(tmp_path):
    import evaluate_fairhuman as ev
    import prepare_fairhuman_dataset as prep

    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (16, 16)).save(folder / "a.png")
    (folder / "metadata.jsonl").write_bytes(b'{"file_name": "a.png", "text": "a caf\xe9"}\n')
    with pytest.raises(ev.UsageError, match=r"--images_dir: .*metadata.jsonl, line 1 is not UTF-8 text"):
        ev.read_folder(str(folder))
    with pytest.raises(prep.PrepareError, match=r"--input_dir: .*metadata.jsonl, line 1 is not UTF-8 text"):
        prep.read_input_metadata(str(folder), None)
    message = _error(_argv(str(folder), tmp_path / "o"))
    assert "--train_data_dir: " in message and "line 1 is not UTF-8 text" in message


def test_file_name_outside_the_data_folder_names_the_line(tmp_path):
    data = _dataset(tmp_path, [{"text": "a", "hand_boxes": [], "face_boxes": []},
                               {"text": "b", "hand_boxes": [], "face_boxes": [], "file_name": "../x.png"}])
    message = _error(_argv(data, tmp_path / "o"))
    assert "line 2: file_name '../x.png' points outside the data folder" in message
    assert "DatasetGenerationError" not in train.error_with_causes(ValueError("x")) and \
        "caused by ValueError: inner" in train.error_with_causes(_chained())


def _chained():
    try:
        try:
            raise ValueError("inner")
        except ValueError as inner:
            raise RuntimeError("An error occurred while generating the dataset") from inner
    except RuntimeError as outer:
        return outer


# ---- 12. --mask_dilation is in training pixels; 13. buckets stay near resolution^2 ------------------------


def test_mask_dilation_is_in_training_pixels(tmp_path):
    import fairhuman_utils as fh

    assert fh.source_dilation((4000, 3000), (1024, 768), 8) == 31 and fh.source_dilation((512, 512), 1024, 8) == 4
    rows = [{"text": "a", "hand_boxes": [[100, 100, 140, 140]], "face_boxes": []}]
    data = _dataset(tmp_path, rows, sizes={0: (320, 320)})
    args = train.parse_args([str(a) for a in _argv(data, tmp_path / "o", "--resolution", "32", "--square_crop",
                                                   "--mask_dilation", "2")])
    train.check_args(args)
    checked = train.check_dataset(train.load_training_dataset(args), args)
    example = train.FairHumanDataset(checked, args, 0, 32, keep_regions=False)[0]
    # the 40 px box is 4 training pixels wide; grown by 2 on every side: 8 x 8 = 64 pixels of mask
    assert example["masks"][0].sum().item() == pytest.approx(64, abs=6)


def test_buckets_stay_near_the_resolution_area():
    import fairhuman_utils as fh

    for resolution, step in [(1024, 1024), (1024, 512), (1024, 64), (512, 64), (32, 4)]:
        areas = [w * h / resolution**2 for w, h in fh.make_buckets(resolution, step)]
        assert max(areas) <= 1.125, (resolution, step, max(areas))  # was 4.0 at step 1024
    assert fh.make_buckets(1024, 1024) == [(1024, 1024)]
    assert fh.bucket_area_problem(fh.make_buckets(1024, 64), 1024, 64) is None
    problem = fh.bucket_area_problem(fh.make_buckets(1024, 512), 1024, 512)
    assert "range from 0.75x (512x1536) to 1.00x" in problem and "at most 128 px" in problem


# ---- 15. captions past the text encoder's limit are counted; 16. 0/1 label-map masks are named ----------


def test_long_captions_counted_and_warned_once(tiny_sd, caplog):
    from accelerate import PartialState
    from transformers import AutoTokenizer

    PartialState()  # main() has made the module's logger accelerate's, as in a run

    tokenizer = AutoTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer", use_fast=False)
    limit = tokenizer.model_max_length
    long = " ".join(["hand"] * limit)
    lost = len(tokenizer(long).input_ids) - limit
    assert lost > 0 and len(tokenizer("a person").input_ids) <= limit
    checked = CheckedDataset(dataset=None, sizes=[], boxes={}, counts={}, captions=[["a person"], [long, "short"], [long]])
    with caplog.at_level(logging.WARNING):
        counts = train.warn_long_captions(checked, tokenizer)
    assert counts == {"long": 2, "captions": 4, "tokens_lost": 2 * lost, "max_lost": lost, "limit": limit}
    warnings = [r.getMessage() for r in caplog.records if "captions are longer" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].endswith(f"2 of 4 captions are longer than the text encoder's {limit} tokens: {2 * lost} tokens are cut "
                        f"off in all (up to {lost} in one caption), and training never sees them. Put what matters "
                        "first, or shorten the captions")  # after accelerate's "[RANK 0] " prefix, if any


def test_label_map_masks_are_named_as_such(tmp_path, caplog):
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    label = Image.new("L", (48, 32), 0)
    label.paste(1, (4, 4, 20, 20))  # a 0/1 label map: the hand is there, at value 1
    white = Image.new("L", (48, 32), 0)
    white.paste(255, (24, 4, 40, 20))
    features = Features({"image": ImageFeature(), "text": Value("string"), "mask_hand": ImageFeature(),
                         "mask_face": ImageFeature()})
    Dataset.from_dict({"image": [Image.new("RGB", (48, 32))] * 2, "text": ["a", "b"], "mask_hand": [label, label],
                       "mask_face": [white, white]}, features=features).save_to_disk(str(tmp_path / "d"))
    args = train.parse_args(["--pretrained_model_name_or_path", "x", "--dataset_name", str(tmp_path / "d"),
                             "--hand_mask_column", "mask_hand", "--face_mask_column", "mask_face"])
    with caplog.at_level(logging.WARNING):
        _, regions = train.verify_images(train.load_training_dataset(args), args)
    assert regions == {"hand": [False, False], "face": [True, True]}
    assert ("column 'mask_hand': 2 of 2 hand masks have pixels but none above 127 (values up to 1): they look like "
            "0/1 label maps") in caplog.text
    assert "mask_face" not in caplog.text


def test_hub_token_on_the_command_line_is_warned_about(tmp_path, caplog):
    data = _dataset(tmp_path, [{"text": "a", "hand_boxes": [], "face_boxes": []}])
    with caplog.at_level(logging.WARNING):
        _error(_argv(data, tmp_path / "o", "--hub_token", "hf_secret"))
    assert "log in once with `hf auth login` instead" in caplog.text and "hf_secret" not in caplog.text


def test_flag_number_refuses_what_argparse_should_say():
    """The number type every range-checked flag of the training script uses: the value, or argparse's message."""
    import argparse

    from flag_types import flag_number

    rank = flag_number(int, minimum=1)
    assert rank("3") == 3 and isinstance(rank("3"), int)
    for text, message in [("0", "must be at least 1, got 0"), ("2.5", "expected an integer, got '2.5'")]:
        with pytest.raises(argparse.ArgumentTypeError, match=message.replace("(", r"\(")):
            rank(text)
    beta = flag_number(float, minimum=0, exclusive_maximum=1)
    assert beta("0") == 0.0
    for text in ("1", "-0.1", "nan", "inf"):
        with pytest.raises(argparse.ArgumentTypeError, match="must be (in \\[0, 1\\)|a finite number)"):
            beta(text)
    resolution = flag_number(int, minimum=1, multiple_of=8)
    with pytest.raises(argparse.ArgumentTypeError, match="must be a multiple of 8, got 100"):
        resolution("100")
    assert flag_number(float, exclusive_minimum=0)("1e-8") == 1e-8
    with pytest.raises(argparse.ArgumentTypeError, match="must be positive, got 0"):
        flag_number(float, exclusive_minimum=0)("0")
