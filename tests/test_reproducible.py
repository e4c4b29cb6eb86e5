"""Byte-reproducible outputs: the same data, flags and seed write the same LoRA files and model card, also
from two processes with different hash seeds (set orders) and safetensors' per-process HashMap order."""

import json
import os
import subprocess
import sys

import torch
from conftest import OFFLINE_ENV, REPO
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import fairhuman_utils as fh

SAVE_IN_A_FRESH_PROCESS = """
import sys, torch
from safetensors.torch import save_file
sys.path.insert(0, {repo!r})
import fairhuman_utils as fh
metadata = {{f"key{{i}}": str(i) for i in range(12)}}
metadata["config"] = __import__("json").dumps(fh.json_ready_config({{"target_modules": {{"to_q", "to_k", "to_v", "to_out.0"}}}}))
save_file({{"b": torch.ones(3), "a": torch.zeros(2, 2, dtype=torch.float16)}}, sys.argv[1], metadata=metadata)
if sys.argv[2] == "fix":
    fh.make_safetensors_reproducible(sys.argv[1])
"""


def write_in_processes(tmp_path, fix, hash_seeds=(1, 2)):
    contents = []
    for seed in hash_seeds:
        path = str(tmp_path / f"{fix}{seed}.safetensors")
        env = {**OFFLINE_ENV, "PYTHONHASHSEED": str(seed)}
        subprocess.run([sys.executable, "-c", SAVE_IN_A_FRESH_PROCESS.format(repo=REPO), path, fix], env=env,
                       check=True, capture_output=True)
        contents.append(open(path, "rb").read())
    return contents, path


def test_safetensors_headers_rewritten_in_one_order_read_the_same(tmp_path):
    raw, _ = write_in_processes(tmp_path, "raw")
    assert len(set(raw)) > 1  # the problem: safetensors alone writes its metadata in a random order per process
    fixed, path = write_in_processes(tmp_path, "fix")
    assert len(set(fixed)) == 1
    assert len(fixed[0]) == len(raw[0]) and int.from_bytes(fixed[0][:8], "little") % 8 == 0
    tensors = load_file(path)
    assert torch.equal(tensors["b"], torch.ones(3)) and tensors["a"].dtype == torch.float16
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    assert metadata["key11"] == "11" and json.loads(metadata["config"]) == {
        "target_modules": ["to_k", "to_out.0", "to_q", "to_v"]}
    assert fh.canonical_safetensors_header(fixed[0][8:8 + int.from_bytes(fixed[0][:8], "little")]) == \
        fixed[0][8:8 + int.from_bytes(fixed[0][:8], "little")]  # already canonical: unchanged


def test_make_safetensors_reproducible_keeps_a_file_without_metadata(tmp_path):
    path = str(tmp_path / "plain.safetensors")
    save_file({"x": torch.arange(5.0)}, path)
    before = open(path, "rb").read()
    fh.make_safetensors_reproducible(path)
    assert open(path, "rb").read() == before and torch.equal(load_file(path)["x"], torch.arange(5.0))


def test_json_ready_config_sorts_sets_everywhere():
    config = {"target_modules": {"b", "a"}, "rank_pattern": {"x": {"z", "y"}}, "layers": ({"d", "c"},), "r": 4}
    assert fh.json_ready_config(config) == {"target_modules": ["a", "b"], "rank_pattern": {"x": ["y", "z"]},
                                            "layers": [["c", "d"]], "r": 4}


def test_two_trainings_in_two_processes_write_identical_files(tiny_sd, demo_dataset, tmp_path):
    """Two `accelerate launch` runs with the same data, flags and seed but different PYTHONHASHSEED: every LoRA
    file (diffusers and kohya, final and checkpoint), the model card and its sample are byte-identical."""
    from test_train import common, launch

    outputs = []
    for hash_seed in ("11", "22"):
        out = str(tmp_path / f"run{hash_seed}" / "fairhuman")  # the same folder name: it names the kohya file
        env = {**OFFLINE_ENV, "PYTHONHASHSEED": hash_seed}
        launch(*common(tiny_sd, demo_dataset, out, 2, "--save_lora_format", "both", "--checkpointing_steps", 2,
                       "--lora_target_modules", "to_q,to_k,to_v,to_out.0,conv1,proj_in",
                       "--validation_prompt", "a person", "--num_validation_images", 1,
                       "--validation_inference_steps", 2, "--validation_steps", 100), env=env)
        outputs.append(out)
    files = ["pytorch_lora_weights.safetensors", "fairhuman.safetensors", "README.md", "image_0.png",
             "checkpoint-2/pytorch_lora_weights.safetensors", "checkpoint-2/fairhuman-step2.safetensors"]
    for name in files:
        a, b = (open(os.path.join(out, name), "rb").read() for out in outputs)
        assert a == b, f"{name} differs between two identical runs"
    with safe_open(os.path.join(outputs[0], "pytorch_lora_weights.safetensors"), "pt") as f:
        adapter = json.loads(f.metadata()["lora_adapter_metadata"])
    assert adapter["unet.target_modules"] == ["conv1", "proj_in", "to_k", "to_out.0", "to_q", "to_v"]
