"""Nothing a user runs is lost, and every mistake is named before the long work starts (issue 12).

One test per case, each running the script as users do (in-process main/cli, tiny model, 1-2 steps).
A message checked "before any model loads" is given with a model path that does not exist: had the
check come later, the error would name the model instead.
"""

import json
import logging
import os
import sys

import pytest
from conftest import lora_tensors, reset_accelerate_state, run_main
from PIL import Image
from test_train import _argv, _dataset, _error, common

import checkpoints
import train_fairhuman_lora as train


def _cli_error(argv):
    """Run ``train.cli`` as ``python train_fairhuman_lora.py ARGV`` does; return what it prints (no traceback)."""
    reset_accelerate_state()
    try:
        with pytest.raises(SystemExit) as info:
            train.cli([str(a) for a in argv])
    finally:
        reset_accelerate_state()
    message = str(info.value.code)
    assert message.startswith("error: ")
    return message


def _people(n=4):
    return [{"text": f"a person {i}", "hand_boxes": [[2, 2, 12, 12]], "face_boxes": [[14, 2, 26, 14]]} for i in range(n)]


# ---- 1. every image decoded before any model loads ------------------------------------------------------


def test_undecodable_images_named_before_models_or_skipped(tmp_path, tiny_sd, caplog):
    import numpy as np

    rows = _people()
    rows[1]["file_name"] = "truncated.jpg"
    rows[3]["file_name"] = "huge.png"
    data = _dataset(tmp_path, rows)
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    noise.save(os.path.join(data, "truncated.jpg"), quality=95)
    with open(os.path.join(data, "truncated.jpg"), "rb") as f:
        payload = f.read()
    with open(os.path.join(data, "truncated.jpg"), "wb") as f:
        f.write(payload[: len(payload) // 2])  # the header is intact: only decoding the pixels fails
    Image.new("1", (20000, 10000)).save(os.path.join(data, "huge.png"))  # 200 M pixels: PIL's decompression bomb
    with Image.open(os.path.join(data, "truncated.jpg")) as im:
        assert im.size == (64, 48)  # what a header-only check sees

    message = _error(common(tiny_sd, data, tmp_path / "o", 1, "--dataloader_num_workers", 1))  # before weights load
    assert message.startswith("2 of 4 rows have an image that cannot be decoded")
    assert "column 'image', row 1: cannot read the image 'truncated.jpg' (OSError: image file is truncated" in message
    assert "row 3: cannot read the image 'huge.png' (DecompressionBombError" in message
    assert "--skip_bad_images" in message

    out = tmp_path / "skipped"
    with caplog.at_level(logging.WARNING):
        run_main(*common(tiny_sd, data, out, 1, "--skip_bad_images", "--dataloader_num_workers", 1))
    assert "--skip_bad_images: leaving out 2 of 4 rows whose image cannot be decoded" in caplog.text
    assert lora_tensors(out)


# ---- 2. every folder the run writes is tested by writing, before any model loads ------------------------


def test_unwritable_or_file_output_paths_named_before_models(tmp_path, demo_dataset):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    message = _cli_error(_argv(demo_dataset, a_file))
    assert message == f"error: --output_dir: '{a_file}' is a file, not a folder"
    assert f"--output_dir: '{a_file}/run' lies under '{a_file}', which is a file" in _error(_argv(demo_dataset, a_file / "run"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mask_previews").write_text("x")
    assert "--save_mask_previews (OUTPUT_DIR/mask_previews)" in _error(
        _argv(demo_dataset, tmp_path / "out", "--save_mask_previews", 2))
    (tmp_path / "out" / "logs").write_text("x")
    assert "--logging_dir" in _error(_argv(demo_dataset, tmp_path / "out", "--report_to", "tensorboard"))

    # a folder that exists and cannot be written, even by root (os.access says yes there as root)
    if os.path.isdir("/sys") and not _writable("/sys"):
        assert _error(_argv(demo_dataset, "/sys")).startswith("--output_dir: cannot write into '/sys'")
        assert _error(_argv(demo_dataset, tmp_path / "out2", "--report_to", "tensorboard", "--logging_dir",
                            "/sys/fairhuman-logs")).startswith("--logging_dir: cannot write into '/sys'")


def _writable(folder):
    try:
        with open(os.path.join(folder, ".fairhuman-probe"), "w"):
            pass
        os.remove(os.path.join(folder, ".fairhuman-probe"))
        return True
    except OSError:
        return False


# ---- 3. resuming a run that is already at --max_train_steps --------------------------------------------


def test_resume_latest_at_max_steps_trains_nothing_and_finishes(tmp_path, tiny_sd, demo_dataset):
    out = tmp_path / "run"
    argv = common(tiny_sd, demo_dataset, out, 2, "--checkpointing_steps", 1, "--checkpoints_total_limit", 2)
    run_main(*argv)
    finished = lora_tensors(out)
    checkpoint_files = {n: os.path.getmtime(out / "checkpoint-2" / n) for n in os.listdir(out / "checkpoint-2")}
    os.remove(out / "pytorch_lora_weights.safetensors")  # as if the run died after its last checkpoint
    os.remove(out / "README.md")

    run_main(*argv, "--resume_from_checkpoint", "latest")
    assert sorted(n for n in os.listdir(out) if "checkpoint" in n) == ["checkpoint-1", "checkpoint-2"]  # no 3, no rotation
    assert {n: os.path.getmtime(out / "checkpoint-2" / n) for n in os.listdir(out / "checkpoint-2")} == checkpoint_files
    again = lora_tensors(out)
    assert again.keys() == finished.keys()
    assert all((again[k] == finished[k]).all() for k in finished)  # no extra step: the same LoRA
    assert "optimizer steps | 2 |" in (out / "README.md").read_text()


# ---- 4. resume refuses settings that change what the checkpoint means, warns about the others -----------


def test_resume_refuses_lora_changes_and_warns_on_others(tmp_path, tiny_sd, demo_dataset, caplog):
    out = tmp_path / "run"
    run_main(*common(tiny_sd, demo_dataset, out, 2, "--checkpointing_steps", 2))
    saved = json.loads((out / "checkpoint-2" / checkpoints.RUN_SETTINGS_FILE).read_text())
    assert saved["rank"] == 4 and saved["dataset_rows"] == 8 and "global_step" not in saved
    assert "rank" not in json.loads((out / "checkpoint-2" / checkpoints.CHECKPOINT_MARKER).read_text())

    resume = common(tiny_sd, demo_dataset, out, 3, "--resume_from_checkpoint", "latest", "--checkpointing_steps", 1)
    message = _error([*resume, "--rank", 8])
    assert message.startswith("--resume_from_checkpoint: checkpoint-2 was trained with other settings")
    assert "--rank 8 (the checkpoint has 4)" in message and "--lora_alpha 8.0 (the checkpoint has 4.0)" in message
    assert "--lora_target_modules to_k,to_q (the checkpoint has to_k,to_out.0,to_q,to_v)" in _error(
        [*resume, "--lora_target_modules", "to_q,to_k"])
    assert "--lora_alpha 1.0 (the checkpoint has 4.0)" in _error([*resume, "--lora_alpha", 1])
    other_model = [*resume[2:], "--pretrained_model_name_or_path", "/another/model"]  # refused before it is loaded
    assert f"--pretrained_model_name_or_path /another/model (the checkpoint has {tiny_sd})" in _error(other_model)
    assert not os.path.exists(out / "checkpoint-3")

    with caplog.at_level(logging.WARNING):
        run_main(*resume, "--weighting", "equal", "--max_train_samples", 6)
    assert "resuming checkpoint-2 with changed settings: --weighting fair -> equal; dataset rows 8 -> 6; " in caplog.text
    assert "dataset fingerprint" in caplog.text

    os.remove(out / "checkpoint-3" / checkpoints.RUN_SETTINGS_FILE)  # a checkpoint written before the settings file
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run_main(*common(tiny_sd, demo_dataset, out, 4, "--resume_from_checkpoint", "latest", "--checkpointing_steps", 4))
    assert f"checkpoint-3 has no {checkpoints.RUN_SETTINGS_FILE} (written by an earlier version" in caplog.text
    assert os.path.exists(out / "checkpoint-4" / checkpoints.RUN_SETTINGS_FILE)


# ---- 5. every --lora_target_modules entry must match a module -------------------------------------------


def test_lora_target_module_matching_nothing_is_named(tmp_path, tiny_sd, demo_dataset):
    message = _error(common(tiny_sd, demo_dataset, tmp_path / "o", 1, "--lora_target_modules", "to_q,to_out0,to_v"))
    assert message.startswith("--lora_target_modules: to_out0 match no module of the UNet")
    assert "to_out.0" in message  # the names that exist are listed
    assert not os.path.exists(tmp_path / "o" / "pytorch_lora_weights.safetensors")


# ---- 6. trackers checked up front ----------------------------------------------------------------------


def test_missing_tracker_named_with_install_line(tmp_path, demo_dataset, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails as if it were not installed
    for report_to in ("wandb", "all"):
        message = _cli_error(_argv(demo_dataset, tmp_path / "o", "--report_to", report_to))
        assert message == (f"error: --report_to {report_to} needs wandb, which is not installed: pip install wandb "
                           "(or choose another --report_to, e.g. none)")


# ---- 7. Hub network failures: one message, the LoRA kept, how to push later -----------------------------


def _connect_error():
    """What huggingface_hub raises when the network is down: its HTTP client's ConnectError."""
    for module in ("httpx2", "httpx"):
        try:
            return __import__(module).ConnectError("[Errno -2] Name or service not known")
        except ImportError:
            pass
    from huggingface_hub.errors import OfflineModeIsEnabled

    return OfflineModeIsEnabled("Cannot reach https://huggingface.co/api/repos/create: offline mode is enabled.")


def test_hub_failures_give_one_message_and_keep_the_lora(tmp_path, tiny_sd, demo_dataset, monkeypatch):
    import huggingface_hub

    def create_fails(**kwargs):
        raise _connect_error()

    monkeypatch.setattr(huggingface_hub, "create_repo", create_fails)
    message = _cli_error(common(tiny_sd, demo_dataset, tmp_path / "early", 1, "--push_to_hub"))
    assert message.startswith("error: --push_to_hub: cannot create the Hub repository 'early' (ConnectError: [Errno -2]")
    assert f"hf upload early {tmp_path / 'early'} --exclude 'checkpoint-*'" in message

    class Repo:
        repo_id = "someone/fh"

    def upload_fails(**kwargs):
        raise _connect_error()

    monkeypatch.setattr(huggingface_hub, "create_repo", lambda **kwargs: Repo())
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_fails)
    out = tmp_path / "fh"
    message = _cli_error(common(tiny_sd, demo_dataset, out, 1, "--push_to_hub"))
    assert message.startswith("error: --push_to_hub: the upload to 'someone/fh' failed (ConnectError: [Errno -2]")
    assert f"Nothing is lost: the LoRA (pytorch_lora_weights.safetensors) and its model card are saved in '{out}'" in message
    assert f"hf upload someone/fh {out} --exclude 'checkpoint-*'" in message
    assert lora_tensors(out) and "someone/fh" in (out / "README.md").read_text()


# ---- 8. regions that vanish are counted ----------------------------------------------------------------


def test_vanishing_regions_are_counted(tmp_path, tiny_sd, caplog):
    rows = [{"text": "a", "hand_boxes": [[100, 100, 120, 120], [-20, 5, -1, 9]], "face_boxes": []},
            {"text": "b", "hand_boxes": [[1, 1, 12, 12]], "face_boxes": []},
            {"text": "c", "hand_boxes": [], "face_boxes": None}]
    data = _dataset(tmp_path, rows)
    with caplog.at_level(logging.WARNING):
        run_main(*common(tiny_sd, data, tmp_path / "o", 1))
    assert ("column 'hand_boxes': 2 of 3 hand boxes were dropped (outside their image or no area left after "
            "clipping)") in caplog.text
    assert "2 of 3 images have no hand or face region: they train the global objective only" in caplog.text
    assert ("no image has a face region (column 'face_boxes'): the face objective is zero for the whole run; "
            "--weighting fair has nothing to balance for it") in caplog.text

    # regions given as mask images count too (all face masks black here)
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    hand = Image.new("L", (48, 32), 0)
    hand.paste(255, (4, 4, 20, 20))
    masks = {"image": [Image.new("RGB", (48, 32))] * 2, "text": ["a", "b"], "mask_hand": [hand, Image.new("L", (48, 32))],
             "mask_face": [Image.new("RGB", (48, 32))] * 2}
    features = Features({"image": ImageFeature(), "text": Value("string"), "mask_hand": ImageFeature(),
                         "mask_face": ImageFeature()})
    Dataset.from_dict(masks, features=features).save_to_disk(str(tmp_path / "masks"))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run_main("--pretrained_model_name_or_path", tiny_sd, "--dataset_name", tmp_path / "masks", "--max_train_steps",
                 1, "--hand_mask_column", "mask_hand", "--face_mask_column", "mask_face", "--output_dir", tmp_path / "m",
                 "--report_to", "none")
    assert "1 of 2 images have no hand or face region" in caplog.text
    assert "no image has a face region (column 'mask_face')" in caplog.text and "hand region" not in caplog.text
