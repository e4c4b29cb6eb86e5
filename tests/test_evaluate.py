"""Tests of evaluate_fairhuman.py.

Detection correctness is checked on real photographs shipped inside wheels (one face each) and blank
images, with the real MediaPipe detector. The generation tests use the tiny random SD/SDXL models,
whose images hold no face or hand (all scores 0): they check the pairing by seed, the grid, the
report's keys, kohya vs diffusers files and the training script's --evaluate_prompts_file.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import OFFLINE_ENV, REPO, parse_error, run_main
from PIL import Image
from test_prepare_dataset import PHOTOS, bundled_file, needs_mediapipe  # noqa: E402

import detector as det  # noqa: E402
import evaluate_fairhuman as ev  # noqa: E402
import fairhuman_utils as fh  # noqa: E402

NOISE = ("inference_feedback_manager", "GetPrototype", "XNNPACK", "absl::InitializeLog", "W0000")


def record(faces=(), hands=(), clip=None, file="x.png"):
    return {"file": file, **ev.image_record(det.Detections(face_scores=list(faces), hand_scores=list(hands)), clip)}


# ---------------------------------------------------------------------------------------------
# Metrics and the paired bootstrap
# ---------------------------------------------------------------------------------------------


def test_metrics_count_a_miss_as_zero_and_give_the_authors_conditional_mean():
    records = [record([0.9], [0.8, 0.6]), record([0.7]), record(), record([], [0.5])]
    values = {k: float(v) for k, v in ev.metric_values(ev.score_arrays(records)).items()}
    assert values["face_detection_rate"] == pytest.approx(0.5)
    assert values["face_confidence_mean"] == pytest.approx((0.9 + 0.7) / 4)
    assert values["face_confidence_detected"] == pytest.approx((0.9 + 0.7) / 2)
    assert values["hand_detection_rate"] == pytest.approx(0.5)
    assert values["hand_confidence_mean"] == pytest.approx((0.7 + 0.5) / 4)  # per image: mean of its hands
    assert values["hand_confidence_detected"] == pytest.approx((0.7 + 0.5) / 2)
    assert values["hands_per_image"] == pytest.approx(3 / 4)
    for kind in ("face", "hand"):  # mean = rate x conditional mean
        assert values[f"{kind}_confidence_mean"] == pytest.approx(
            values[f"{kind}_detection_rate"] * values[f"{kind}_confidence_detected"])
    assert "clip_score" not in values
    none = ev.metric_values(ev.score_arrays([record(), record()]))
    assert np.isnan(none["face_confidence_detected"]) and none["face_detection_rate"] == 0
    with_clip = ev.metric_values(ev.score_arrays([record(clip=20.0), record(clip=30.0)]))
    assert with_clip["clip_score"] == pytest.approx(25.0)


def test_paired_bootstrap():
    rng = np.random.default_rng(1)
    base = [record([float(s)] if s > 0.4 else [], [0.6] * int(k)) for s, k in zip(rng.random(40), rng.integers(0, 3, 40))]
    same = ev.paired_bootstrap(ev.score_arrays(base), ev.score_arrays(base), 500)
    assert all(d == {"difference": 0.0, "ci_low": 0.0, "ci_high": 0.0} for d in same.values())

    better = [record([min(1.0, r["face_confidence"] + 0.1)] if r["faces"] else [0.5], [0.6] * r["hands"]) for r in base]
    diff = ev.paired_bootstrap(ev.score_arrays(base), ev.score_arrays(better), 1000)
    misses = sum(r["faces"] == 0 for r in base)
    assert diff["face_detection_rate"]["difference"] == pytest.approx(misses / 40)
    for metric, d in diff.items():
        assert d["ci_low"] <= d["difference"] <= d["ci_high"], metric
    assert diff["face_detection_rate"]["ci_low"] > 0  # every pair moved the same way
    assert diff["hands_per_image"] == {"difference": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    assert diff == ev.paired_bootstrap(ev.score_arrays(base), ev.score_arrays(better), 1000)  # seeded
    narrow = ev.paired_bootstrap(ev.score_arrays(base), ev.score_arrays(better), 1000, confidence=0.5)
    wide = diff["face_confidence_mean"]
    assert wide["ci_low"] < narrow["face_confidence_mean"]["ci_low"] < narrow["face_confidence_mean"]["ci_high"] < wide["ci_high"]
    undefined = ev.paired_bootstrap(ev.score_arrays([record()] * 3), ev.score_arrays([record([0.9])] * 3), 100)
    assert undefined["face_confidence_detected"] == {"difference": None, "ci_low": None, "ci_high": None}


# ---------------------------------------------------------------------------------------------
# Scoring mode on real photographs
# ---------------------------------------------------------------------------------------------


def run_eval(*argv):
    return ev.main(ev.parse_args([str(a) for a in argv] + ["--disable_progress_bar"]))


@pytest.fixture(scope="module")
def photo_folders(tmp_path_factory):
    """``photos``: the three one-face photographs and two blank images; ``blanks``: the same file names, all blank."""
    root = tmp_path_factory.mktemp("photos")
    photos, blanks = root / "photos", root / "blanks"
    photos.mkdir()
    blanks.mkdir()
    for name, (package, parts, _) in PHOTOS.items():
        (photos / name).write_bytes(bundled_file(package, *parts).read_bytes())
        Image.new("RGB", (96, 80), (128, 128, 128)).save(blanks / name, format="PNG")
    for folder in (photos, blanks):
        Image.new("RGB", (64, 64), (255, 255, 255)).save(folder / "white.png")
        Image.new("RGB", (48, 64), (0, 0, 0)).save(folder / "black.png")
    return photos, blanks


@needs_mediapipe
def test_scoring_mode_on_photographs(photo_folders, tmp_path):
    photos, blanks = photo_folders
    report = run_eval("--images_dir", photos, blanks, "--output_dir", tmp_path / "out")
    per_image = {(r["model"], r["file"]): r for r in report["images"]}
    for name in PHOTOS:
        assert per_image["photos", name]["faces"] == 1 and per_image["photos", name]["hands"] == 0
        assert per_image["blanks", name]["faces"] == 0
    for name in ("white.png", "black.png"):
        assert per_image["photos", name]["faces"] == 0 and per_image["photos", name]["hands"] == 0

    photos_row, blanks_row = report["models"]
    assert (photos_row["model"], photos_row["images"], blanks_row["images"]) == ("photos", 5, 5)
    assert photos_row["face_detection_rate"] == 0.6 and blanks_row["face_detection_rate"] == 0.0
    assert photos_row["hand_detection_rate"] == 0.0 and photos_row["hands_per_image"] == 0.0
    with det.MediaPipeDetector() as detector:  # the same detector, called directly
        scores = [detector(Image.open(photos / name)).face_scores[0] for name in sorted(PHOTOS)]
    assert photos_row["face_confidence_detected"] == pytest.approx(np.mean(scores), abs=1e-5)
    assert photos_row["face_confidence_mean"] == pytest.approx(np.sum(scores) / 5, abs=1e-5)
    assert photos_row["hand_confidence_detected"] is None and blanks_row["face_confidence_detected"] is None

    assert photos_row["paired_difference"] is None  # the reference
    diff = blanks_row["paired_difference"]
    assert blanks_row["paired_pairs"] == 5
    assert diff["face_detection_rate"]["difference"] == pytest.approx(-0.6)
    assert diff["face_detection_rate"]["ci_high"] < 0 <= diff["hand_detection_rate"]["ci_high"]
    assert diff["face_confidence_detected"]["difference"] is None  # undefined: no face among the blanks

    written = json.loads((tmp_path / "out" / "report.json").read_text())
    assert written["models"] == report["models"]
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "| photos | 5 | 0.600 |" in markdown and "| blanks | 5 | -0.600 [" in markdown

    alone = run_eval("--images_dir", photos, "--output_dir", tmp_path / "alone")
    assert len(alone["models"]) == 1 and alone["models"][0]["face_detection_rate"] == 0.6


# ---------------------------------------------------------------------------------------------
# Generation mode on the tiny models, with LoRAs trained by the training script
# ---------------------------------------------------------------------------------------------


def write_prompts(folder, prompts=("a person waving", "a man with 2 hands")):
    path = Path(folder) / "prompts.txt"
    path.write_text("# comment\n" + "\n".join(prompts) + "\n\n")
    return path


def train_lora(model, dataset, out, *extra):
    run_main("--pretrained_model_name_or_path", model, "--train_data_dir", dataset, "--output_dir", out,
             "--max_train_steps", 1, "--learning_rate", 0.05, "--seed", 0, "--report_to", "none",
             "--resolution", 32, *extra)
    return out


def kohya_copy(folder, path):
    """The diffusers-format LoRA of ``folder`` in kohya format, made with diffusers' own converter."""
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import load_file, save_file

    diffusers_format = load_file(os.path.join(folder, "pytorch_lora_weights.safetensors"))
    peft_format = {k.replace(".lora.down.", ".lora_A.").replace(".lora.up.", ".lora_B."): v
                   for k, v in diffusers_format.items()}
    kohya = convert_state_dict_to_kohya(peft_format)
    assert all(k.startswith("lora_unet_") for k in kohya)
    save_file(kohya, str(path))
    return path


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def sd_lora(tiny_sd, demo_dataset, tmp_path_factory):
    """A LoRA trained by the training script, which evaluates it at the end (--evaluate_prompts_file)."""
    if importlib.util.find_spec("mediapipe") is None:
        pytest.skip("mediapipe is not installed")
    folder = tmp_path_factory.mktemp("sd_lora")
    return train_lora(tiny_sd, demo_dataset, folder / "lora", "--evaluate_prompts_file", write_prompts(folder),
                      "--num_validation_images", 1, "--validation_inference_steps", 1)


@needs_mediapipe
def test_training_script_evaluates_its_lora(sd_lora):
    report = json.loads((sd_lora / "evaluation" / "report.json").read_text())
    assert [row["model"] for row in report["models"]] == ["base", "lora"]
    assert report["settings"]["lora_scale"] == 0.3 and report["settings"]["num_inference_steps"] == 1
    assert all(row["images"] == 2 for row in report["models"])
    card = (sd_lora / "README.md").read_text()
    assert "## Did it work?" in card and "| base | 2 |" in card and "| lora | 2 | " in card
    assert sorted(p.name for p in (sd_lora / "evaluation").glob("grid_*.png")) == ["grid_0.png", "grid_1.png"]


@needs_mediapipe
def test_generation_pairs_seeds_and_kohya_equals_diffusers(tiny_sd, sd_lora, tmp_path, capsys):
    lora = tmp_path / "fairhuman"  # a folder's name becomes its column's name
    lora.mkdir()
    shutil.copy(sd_lora / "pytorch_lora_weights.safetensors", lora)
    kohya = kohya_copy(lora, tmp_path / "kohya_export.safetensors")
    out = tmp_path / "eval"
    report = ev.main(ev.parse_args([
        "--pretrained_model_name_or_path", str(tiny_sd), "--lora_paths", str(lora), str(kohya), "--lora_scale", "1",
        "--prompts_file", str(write_prompts(tmp_path)), "--num_images_per_prompt", "2", "--batch_size", "2",
        "--resolution", "32", "--num_inference_steps", "1", "--seed", "7", "--output_dir", str(out),
        "--grid_cell_size", "64"]))
    assert "Generating" in capsys.readouterr().err  # the progress bar

    names = ["base", "fairhuman", "kohya_export"]
    assert [row["model"] for row in report["models"]] == names
    expected_files = ["000_7.png", "000_8.png", "001_9.png", "001_10.png"]
    for name in names:
        rows = [json.loads(line) for line in (out / "images" / name / "metadata.jsonl").read_text().splitlines()]
        assert [r["file_name"] for r in rows] == expected_files
        assert [r["seed"] for r in rows] == [7, 8, 9, 10] and [r["prompt_index"] for r in rows] == [0, 0, 1, 1]
    for file_name in expected_files:  # same seeds: kohya = diffusers file, and the LoRA changes the image
        base, diffusers_lora, kohya_lora = (pixels(out / "images" / n / file_name) for n in names)
        assert np.abs(kohya_lora - diffusers_lora).max() <= 1, file_name
        assert np.abs(diffusers_lora - base).max() > 3, file_name
    again = ev.main(ev.parse_args([  # the base column does not depend on the LoRAs loaded next to it
        "--pretrained_model_name_or_path", str(tiny_sd), "--prompts_file", str(write_prompts(tmp_path)),
        "--num_images_per_prompt", "2", "--batch_size", "2", "--resolution", "32", "--num_inference_steps", "1",
        "--seed", "7", "--output_dir", str(tmp_path / "base_only"), "--disable_progress_bar"]))
    assert [row["model"] for row in again["models"]] == ["base"]
    for file_name in expected_files:
        assert np.array_equal(pixels(tmp_path / "base_only" / "images" / "base" / file_name),
                              pixels(out / "images" / "base" / file_name))

    for row in report["models"]:
        assert set(ev.REPORT_METRICS) <= set(row) and row["images"] == 4
    for row in report["models"][1:]:
        assert set(row["paired_difference"]) >= set(ev.REPORT_METRICS) and row["paired_pairs"] == 4
        assert set(row["paired_difference"]["face_detection_rate"]) == {"difference", "ci_low", "ci_high"}
    assert json.loads((out / "report.json").read_text())["models"] == report["models"]

    for prompt_index in (0, 1):  # one column per model, one row per seed, each cell the model's image
        grid = Image.open(out / f"grid_{prompt_index}.png").convert("RGB")
        assert grid.width == 3 * (64 + 2 * ev.GRID_PAD)
        for column, name in enumerate(names):
            for row, file_name in enumerate(expected_files[2 * prompt_index:2 * prompt_index + 2]):
                x, y = ev.grid_cell_box(row, column, 64)
                cell = np.asarray(grid.crop((x, y, x + 64, y + 64)), dtype=np.int16)
                expected = np.asarray(Image.open(out / "images" / name / file_name).convert("RGB")
                                      .resize((64, 64), Image.BICUBIC), dtype=np.int16)
                assert np.array_equal(cell, expected), (prompt_index, name, file_name)

    rescored = run_eval("--images_dir", *(out / "images" / n for n in names), "--output_dir", tmp_path / "rescored")
    for row, rerow in zip(report["models"], rescored["models"]):  # scoring mode on the same folders: same numbers
        assert {k: row[k] for k in ev.REPORT_METRICS} == {k: rerow[k] for k in ev.REPORT_METRICS}


def build_tiny_clip(folder):
    """A CLIP model from a small config, with the hand-made tokenizer; saved to ``folder``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    import fairhuman_demo

    fairhuman_demo.write_tiny_tokenizer(str(folder))
    tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    layers = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
    config = CLIPConfig(text_config=dict(**layers, vocab_size=len(tokenizer), max_position_embeddings=77,
                                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id),
                        vision_config=dict(**layers, image_size=32, patch_size=8), projection_dim=16)
    import torch

    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(str(folder))
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(str(folder))
    return folder


@needs_mediapipe
def test_sdxl_generation_with_clip_score(tiny_sdxl, tiny_sd, demo_dataset, tmp_path):
    lora = train_lora(tiny_sdxl, demo_dataset, tmp_path / "xl")
    clip_dir = build_tiny_clip(tmp_path / "clip")
    out = tmp_path / "eval"
    report = run_eval("--pretrained_model_name_or_path", tiny_sdxl, "--lora_paths", lora / "pytorch_lora_weights.safetensors",
                      "--prompts_file", write_prompts(tmp_path, ["a woman clapping"]), "--num_images_per_prompt", 2,
                      "--resolution", 32, "--num_inference_steps", 1, "--output_dir", out,
                      "--clip_model_name_or_path", clip_dir, "--grid_cell_size", 32)
    assert [row["model"] for row in report["models"]] == ["base", "xl"]
    assert Image.open(out / "grid_0.png").width == 2 * (32 + 2 * ev.GRID_PAD)
    assert sorted(os.listdir(out / "images" / "xl")) == ["000_0.png", "000_1.png", "metadata.jsonl"]

    import torch
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(str(clip_dir)), CLIPProcessor.from_pretrained(str(clip_dir))
    for image in report["images"]:
        inputs = processor(text=["a woman clapping"], images=[Image.open(out / "images" / image["model"] / image["file"])],
                           return_tensors="pt", padding=True)
        with torch.no_grad():
            img, txt = model.get_image_features(pixel_values=inputs["pixel_values"]), model.get_text_features(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        img = getattr(img, "pooler_output", img)
        txt = getattr(txt, "pooler_output", txt)
        expected = 100 * max(torch.nn.functional.cosine_similarity(img, txt).item(), 0.0)
        assert image["clip_score"] == pytest.approx(expected, abs=1e-4)
    base, xl = report["models"]
    assert base["clip_score"] == pytest.approx(np.mean([i["clip_score"] for i in report["images"] if i["model"] == "base"]))
    assert xl["paired_difference"]["clip_score"]["difference"] == pytest.approx(xl["clip_score"] - base["clip_score"], abs=1e-5)
    assert "CLIP score" in (out / "report.md").read_text()

    with pytest.raises(fh.UsageError, match="--lora_paths .*xl"):  # an SDXL LoRA on an SD model
        run_eval("--pretrained_model_name_or_path", tiny_sd, "--lora_paths", lora, "--output_dir", tmp_path / "wrong")


# ---------------------------------------------------------------------------------------------
# Errors before any long work
# ---------------------------------------------------------------------------------------------


def test_missing_extra_names_the_requirements_file(tiny_sd, demo_dataset, tmp_path, monkeypatch):
    for name in [n for n in sys.modules if n == "mediapipe" or n.startswith("mediapipe.")] + ["mediapipe"]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(fh.UsageError, match="requirements-prepare.txt"):
        run_eval("--pretrained_model_name_or_path", tiny_sd, "--output_dir", tmp_path / "eval")
    assert not (tmp_path / "eval").exists()  # stopped before writing or generating anything
    with pytest.raises(fh.UsageError, match="requirements-prepare.txt"):  # the training script checks before training
        train_lora(tiny_sd, demo_dataset, tmp_path / "lora", "--evaluate_prompts_file", write_prompts(tmp_path))
    assert not (tmp_path / "lora" / "pytorch_lora_weights.safetensors").exists()


def test_bad_input_is_refused_naming_the_flag(tiny_sd, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    model = ["--pretrained_model_name_or_path", tiny_sd]
    cases = [
        ([], "--pretrained_model_name_or_path .* or --images_dir"),
        ([*model, "--images_dir", tmp_path], "one of them"),
        ([*model, "--lora_paths", tmp_path / "nope.safetensors"], "--lora_paths: no such file"),
        ([*model, "--lora_paths", tmp_path], "--lora_paths: the folder .* holds no .safetensors"),
        ([*model, "--prompts_file", empty], "--prompts_file: .* holds no prompt"),
        (["--images_dir", tmp_path / "missing"], "--images_dir: no such folder"),
        (["--images_dir", tmp_path], "holds no image file"),
        ([*model, "--clip_model_name_or_path", "openai/clip-vit-large-patch14"], "never downloads"),
    ]
    for argv, message in cases:
        with pytest.raises(fh.UsageError, match=message):
            run_eval(*argv, "--output_dir", tmp_path / "out")
        assert not (tmp_path / "out").exists(), argv
    refused = parse_error(ev.parse_args, [*model, "--num_images_per_prompt", 0, "--output_dir", tmp_path / "out"])
    assert "argument --num_images_per_prompt: must be at least 1, got 0" in refused  # argparse, before anything
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    with pytest.raises(fh.UsageError, match="not empty"):
        run_eval(*model, "--output_dir", tmp_path / "out")
    result = subprocess.run([sys.executable, "evaluate_fairhuman.py", "--images_dir", str(tmp_path / "missing")],
                            cwd=REPO, env=OFFLINE_ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stderr.strip().endswith("--images_dir: no such folder " + repr(str(tmp_path / "missing")))
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------
# MediaPipe's native log lines stay out of the console
# ---------------------------------------------------------------------------------------------


@needs_mediapipe
def test_console_is_free_of_mediapipe_log_lines(photo_folders, tmp_path):
    photos, _ = photo_folders
    commands = [
        ["evaluate_fairhuman.py", "--images_dir", str(photos), "--output_dir", str(tmp_path / "eval")],
        ["prepare_fairhuman_dataset.py", "--input_dir", str(photos), "--output_dir", str(tmp_path / "data")],
    ]
    for command in commands:
        result = subprocess.run([sys.executable, *command], cwd=REPO, env=OFFLINE_ENV, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        console = result.stdout + result.stderr
        assert not [n for n in NOISE if n in console], console
        assert "Summary" in console or "Scores" in console


def test_filtered_stderr_keeps_real_messages(capfd):
    with det.filtered_stderr():  # file descriptor 2 itself is redirected, so this runs in-process
        os.write(2, b"W0000 00:00 123 inference_feedback_manager.cc:114] Feedback manager ...\n")
        os.write(2, b"E0000 a real native error\n")
        print("AttributeError: 'MessageFactory' object has no attribute 'GetPrototype'", file=sys.stderr)
        print("a real python warning", file=sys.stderr)
    print("after", file=sys.stderr)
    assert capfd.readouterr().err.splitlines() == ["E0000 a real native error", "a real python warning", "after"]


def test_default_guidance_is_the_model_familys_advice(tiny_flux, tmp_path):
    """Without --guidance_scale the evaluation samples with the guidance the family's model card advises:
    FLUX.1-dev 3.5, FLUX.1-schnell (no guidance embedding) 0, another pipeline the authors' 7.5."""
    import types

    schnell = tmp_path / "tiny-flux-schnell"
    shutil.copytree(tiny_flux, schnell)
    config_path = schnell / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config["guidance_embeds"] = False
    config_path.write_text(json.dumps(config))

    def default(model, pipeline_class):
        args = types.SimpleNamespace(pretrained_model_name_or_path=str(model), revision=None, variant=None,
                                     cache_dir=None, pretrained_vae_model_name_or_path=None)
        return ev.sampling_family(type(pipeline_class, (), {})(), args).inference_advice()["guidance"]

    assert default(tiny_flux, "FluxPipeline") == 3.5
    assert default(schnell, "FluxPipeline") == 0.0
    assert default(tiny_flux, "SomeOtherPipeline") == 7.5


def test_training_does_not_import_the_dataset_preparation_cli():
    """Training imports evaluation (for --evaluate_prompts_file), evaluation the detector module: never the
    dataset-preparation CLI (issue 25). A fresh interpreter, so no other test's imports count."""
    code = ("import sys; import train_fairhuman_lora, training_checks, evaluate_fairhuman; "
            "print(sorted(m for m in ('detector', 'evaluate_fairhuman', 'prepare_fairhuman_dataset') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=OFFLINE_ENV, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[-2] == "['detector', 'evaluate_fairhuman']"
