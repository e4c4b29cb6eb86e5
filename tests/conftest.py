"""Shared fixtures: tiny models and datasets built offline, once per test session."""

import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """main() may run in-process several times in one session: forget accelerate's singletons."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def write_imagefolder(folder, rows, images):
    """Write images (name -> PIL image) and metadata rows into an imagefolder."""
    os.makedirs(folder, exist_ok=True)
    for name, image in images.items():
        image.save(os.path.join(folder, name))
    with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(folder)
