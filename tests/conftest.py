"""Shared fixtures: tiny models and datasets built offline, once per test session."""

import contextlib
import io
import json
import os
import re
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


def parse_error(parse_args, argv):
    """argparse's error line for ``argv`` (``...: error: argument --flag: ...``, a flag's own value refused while
    the arguments are parsed), or ``None`` when they parse."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            parse_args([str(a) for a in argv])
        except SystemExit as stop:
            assert stop.code == 2, stderr.getvalue()
            return stderr.getvalue().strip().splitlines()[-1]
    return None


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


# EXIF orientation -> the transpose that stores an upright picture so that a viewer (and
# PIL.ImageOps.exif_transpose) shows it upright again: 6 = "rotate 90 degrees clockwise to display".
STORE_SIDEWAYS = {1: None, 3: "ROTATE_180", 6: "ROTATE_90", 8: "ROTATE_270"}


def marked_photo(path, size, face, hands, orientation=1):
    """Write a JPEG whose UPRIGHT view is grey with the face box filled red and the hand boxes green.

    ``size``, ``face`` and ``hands`` (xyxy pixels) are in the upright frame; the pixels are stored
    sideways (or upside down) with the EXIF ``orientation`` tag that turns them upright, as phones do.
    Returns the upright image.
    """
    from PIL import Image, ImageDraw

    upright = Image.new("RGB", size, (128, 128, 128))
    draw = ImageDraw.Draw(upright)
    draw.rectangle((face[0], face[1], face[2] - 1, face[3] - 1), fill=(230, 20, 20))
    for hand in hands:
        draw.rectangle((hand[0], hand[1], hand[2] - 1, hand[3] - 1), fill=(20, 200, 20))
    stored = upright if STORE_SIDEWAYS[orientation] is None else upright.transpose(
        getattr(Image.Transpose, STORE_SIDEWAYS[orientation]))
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(path, format="JPEG", quality=95, exif=exif.tobytes())
    return upright


def preview_ious(preview_dir, i):
    """(face IoU, hand IoU) of mask preview ``i``: red pixels of ``{i}_image.png`` against ``{i}_face.png`` and
    green pixels against ``{i}_hand.png`` (1.0 where the masks sit exactly on the drawn regions)."""
    import numpy as np
    from PIL import Image

    image = np.asarray(Image.open(os.path.join(preview_dir, f"{i}_image.png")), dtype=np.int32)
    red = (image[..., 0] > 170) & (image[..., 1] < 90)
    green = (image[..., 1] > 150) & (image[..., 0] < 90)
    ious = []
    for drawn, name in ((red, "face"), (green, "hand")):
        mask = np.asarray(Image.open(os.path.join(preview_dir, f"{i}_{name}.png"))) > 127
        union = (drawn | mask).sum()
        ious.append(float((drawn & mask).sum() / union) if union else 1.0)
    return tuple(ious)


def edge_photos(folder, orientations=(1,)):
    """A 2:3 portrait (face at the top edge, hands at the bottom edge) and a 3:2 landscape (face at the
    left edge, hand at the right edge), boxes in the upright frame. (A square crop keeps one end only.)"""
    os.makedirs(folder, exist_ok=True)
    layouts = {"portrait.jpg": ((64, 96), [22, 0, 42, 16], [[4, 80, 18, 96], [44, 80, 58, 96]]),
               "landscape.jpg": ((96, 64), [0, 20, 16, 40], [[80, 24, 96, 40]])}
    rows = []
    for orientation in orientations:  # one portrait and one landscape per EXIF orientation
        for name, (size, face, hands) in layouts.items():
            name = f"o{orientation}_{name}"
            marked_photo(os.path.join(folder, name), size, face, hands, orientation=orientation)
            rows.append({"file_name": name, "text": "a person", "face_boxes": [face], "hand_boxes": hands})
    with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return str(folder), {size: (face, hands) for size, face, hands in layouts.values()}


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory):
    return fairhuman_demo.build_tiny_flux(str(tmp_path_factory.mktemp("models") / "tiny-flux"))


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory):
    return fairhuman_demo.build_tiny_sd3(str(tmp_path_factory.mktemp("models") / "tiny-sd3"))


# the 2026 families (issue 27), one build per session for every test file
@pytest.fixture(scope="session")
def tiny_zimage(tmp_path_factory):
    return fairhuman_demo.build_tiny_zimage(str(tmp_path_factory.mktemp("models") / "tiny-zimage"))


@pytest.fixture(scope="session")
def tiny_qwenimage(tmp_path_factory):
    return fairhuman_demo.build_tiny_qwenimage(str(tmp_path_factory.mktemp("models") / "tiny-qwenimage"))


@pytest.fixture(scope="session")
def tiny_flux2klein(tmp_path_factory):
    return fairhuman_demo.build_tiny_flux2klein(str(tmp_path_factory.mktemp("models") / "tiny-flux2klein"))


@pytest.fixture(scope="session")
def tiny_chroma(tmp_path_factory):
    return fairhuman_demo.build_tiny_chroma(str(tmp_path_factory.mktemp("models") / "tiny-chroma"))


KOHYA_KEY = re.compile(r"(lora_unet|lora_transformer|lora_te1|lora_te2|lora_te)_([A-Za-z0-9_]+)\.(lora_down\.weight|lora_up\.weight|alpha)")
"""A kohya-format LoRA key: ``{prefix}_{module path with '.' -> '_'}.{lora_down.weight | lora_up.weight | alpha}``."""


def objective_rows(grads):
    """An ``ObjectiveGradients``' rows as one ``(K, P)`` float32 tensor (zeros where nothing is held)."""
    import torch

    return torch.stack([grads._flat(i) for i in range(grads.num_objectives)])
