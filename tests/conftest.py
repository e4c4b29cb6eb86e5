"""Shared fixtures: tiny models and datasets built offline, once per test session."""

import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFFLINE_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
sys.path.insert(0, REPO)

import fairhuman_demo  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    return fairhuman_demo.build_tiny_pipeline(str(tmp_path_factory.mktemp("models") / "tiny-sd"), sdxl=False)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    return fairhuman_demo.build_tiny_pipeline(str(tmp_path_factory.mktemp("models") / "tiny-sdxl"), sdxl=True)


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory):
    return fairhuman_demo.build_demo_dataset(str(tmp_path_factory.mktemp("data") / "demo"), num_images=8)


def reset_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """main() may run in-process several times in one session: forget accelerate's singletons."""
    yield
    reset_accelerate_state()


def run_main(*argv):
    """Run the training script's main() in this process (accelerate state reset around it)."""
    import train_fairhuman_lora as train

    args = train.parse_args([str(a) for a in argv])
    reset_accelerate_state()
    try:
        train.main(args)
    finally:
        reset_accelerate_state()
    return args


def lora_tensors(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "pytorch_lora_weights.safetensors"))


def assert_same_lora(folder_a, folder_b, atol=1e-4):
    import torch

    a, b = lora_tensors(folder_a), lora_tensors(folder_b)
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=atol, msg=lambda m: f"{key}: {m}")


def three_objective_model(seed=0):
    """A small network and a function returning three losses of it, for the gradient-combination tests."""
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    x = torch.randn(6, 5)

    def losses():
        y = model(x)
        return torch.stack([y.pow(2).mean(), (y[:, 0] - 1).pow(2).mean(), (y[:, 1:] * 3).abs().mean()])

    return list(model.parameters()), losses


def write_imagefolder(folder, rows, images):
    """Write images (name -> PIL image) and metadata rows into an imagefolder."""
    os.makedirs(folder, exist_ok=True)
    for name, image in images.items():
        image.save(os.path.join(folder, name))
    with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(folder)
