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


def tiny_family_fixture(family: str):
    """The session fixture ``tiny_{family}``: the family's tiny pipeline (``fairhuman_demo.FAMILY_BUILDERS``), built
    once per test session in its own folder, for every test file."""

    @pytest.fixture(scope="session", name=f"tiny_{family}")
    def build(tmp_path_factory):
        return fairhuman_demo.FAMILY_BUILDERS[family](str(tmp_path_factory.mktemp("models") / f"tiny-{family}"))

    return build


tiny_sd = tiny_family_fixture("sd")
tiny_sdxl = tiny_family_fixture("sdxl")
tiny_flux = tiny_family_fixture("flux")
tiny_sd3 = tiny_family_fixture("sd3")
tiny_zimage = tiny_family_fixture("zimage")  # the 2026 families (issue 27)
tiny_qwenimage = tiny_family_fixture("qwenimage")
tiny_flux2klein = tiny_family_fixture("flux2klein")
tiny_chroma = tiny_family_fixture("chroma")


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


KOHYA_KEY = re.compile(r"(lora_unet|lora_transformer|lora_te1|lora_te2|lora_te)_([A-Za-z0-9_]+)\.(lora_down\.weight|lora_up\.weight|alpha)")
"""A kohya-format LoRA key: ``{prefix}_{module path with '.' -> '_'}.{lora_down.weight | lora_up.weight | alpha}``."""


def objective_rows(grads):
    """An ``ObjectiveGradients``' rows as one ``(K, P)`` float32 tensor (zeros where nothing is held)."""
    import torch

    return torch.stack([grads._flat(i) for i in range(grads.num_objectives)])


# ---- where people generate: diffusers' own loader, ComfyUI's key map -----------------------------------------


def assert_lora_loads_whole_and_changes_the_image(model, lora_file, pipeline_class_name=None,
                                                  prompt="a photo of a person", **call_kwargs):
    """The diffusers LoRA file loads whole into the model's own UNQUANTIZED pipeline (``pipeline_class_name``, or
    the one its model_index.json names) through diffusers' ``load_lora_weights`` -- every trained module, bit for
    bit -- and changes its image (32 px, 2 steps, seed 0; ``call_kwargs`` go to the pipeline call)."""
    import diffusers
    import numpy as np
    import torch
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(lora_file)
    pipe = getattr(diffusers, pipeline_class_name or "DiffusionPipeline").from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)

    def image():
        return pipe(prompt=prompt, height=32, width=32, num_inference_steps=2, output_type="np",
                    generator=torch.Generator().manual_seed(0), **call_kwargs).images[0]

    base = image()
    pipe.load_lora_weights(lora_file, adapter_name="fh")
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name="fh")
    assert {f"transformer.{k}" for k in loaded} == set(state)  # every module, whole
    for key, value in loaded.items():
        assert torch.equal(value, state[f"transformer.{key}"]), key
    assert np.abs(image() - base).max() > 0
    return pipe


def lora_modules(keys) -> set[str]:
    """The module names of a LoRA file's keys, with the file's prefix: ``transformer.{name}`` (diffusers) or
    ``lora_transformer_{name, '.' -> '_'}`` (kohya)."""
    return ({k.rsplit(".lora_", 1)[0] for k in keys if ".lora_" in k}
            | {k.rsplit(".", 1)[0] for k in keys if k.endswith(".alpha")})


def assert_comfyui_reads(lora_file, names, kohya=True) -> set[str]:
    """Every module of the LoRA file is in ComfyUI's key map, which ``comfy/lora.py model_lora_keys_unet`` offers for
    the diffusers module ``names`` as ``transformer.{name}`` and (``kohya``: where it reads them)
    ``lora_transformer_{name, '.' -> '_'}``. Returns the file's (prefixed) module names."""
    from safetensors.torch import load_file

    known = {f"transformer.{n}" for n in names}
    if kohya:
        known |= {f"lora_transformer_{n.replace('.', '_')}" for n in names}
    trained = lora_modules(load_file(lora_file))
    assert trained and trained <= known, sorted(trained - known)
    return trained


def comfyui_transformer_names(family: str, double: int, single: int = 0) -> set[str]:
    """The diffusers module names ComfyUI's LoRA key map knows for a FLUX.1, SD3, Chroma or FLUX.2 klein transformer
    of ``double`` joint and ``single`` single blocks: every weight of ``comfy.utils.mmdit_to_diffusers`` (SD3) or
    ``flux_to_diffusers`` (the Flux branch), as comfy/lora.py ``model_lora_keys_unet`` reads them (ComfyUI at
    41444b5236c613ee5ff7d09aa620f94b702f30eb / 2ba5cc8b867bc1aabe59fdaf0a8489e65012d603; for Chroma and FLUX.2 a
    January 2026 ComfyUI, whose ``flux_to_diffusers`` adds FLUX.2's ``ff.linear_in/out``, and
    ``attn.to_qkv_mlp_proj`` / ``attn.to_out`` -> ``linear1`` / ``linear2``)."""
    flux2 = family in ("chroma", "flux2klein")
    joint = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
             "attn.to_out.0", "attn.to_add_out", "norm1.linear", "norm1_context.linear", "ff.net.0.proj", "ff.net.2",
             "ff_context.net.0.proj", "ff_context.net.2"]
    joint += ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"] if family == "sd3" else []
    joint += ["ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out"] if flux2 else []
    single_block = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out", "norm.linear"]
    single_block += ["attn.to_qkv_mlp_proj", "attn.to_out"] if flux2 else []
    names = {f"transformer_blocks.{i}.{m}" for i in range(double) for m in joint}
    names |= {f"single_transformer_blocks.{i}.{m}" for i in range(single) for m in single_block}
    return names | {"proj_out", "context_embedder", "norm_out.linear"} | ({"x_embedder"} if family != "sd3" else set())


def run_two_processes(argv, **env):
    """The training script with ``argv`` in two CPU processes (``accelerate launch --multi_gpu``: gloo), offline,
    ``env`` added to the environment; returns the finished ``subprocess.CompletedProcess``."""
    import subprocess

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           os.path.join(REPO, "train_fairhuman_lora.py"), *[str(a) for a in argv]]
    return subprocess.run(cmd, cwd=REPO, env={**OFFLINE_ENV, "ACCELERATE_USE_CPU": "true", **env},
                          capture_output=True, text=True, timeout=600)


def step_on_a_non_square_bucket(model, max_sequence_length, captions):
    """One training step's inputs and prediction of the family of ``model`` on a 40 x 24 px (w x h) bucket,
    with a gaussian-initialised LoRA on the family's default targets, checked as every family must be: the hand
    and face masks on their latent cells (20 x 12 cells at the tiny models' VAE factor 2), the prediction of the
    target's shape, and three per-objective gradients that are finite, non-zero and pointing different ways.
    Returns ``(args, family, batch, conditioning, inputs, prediction)`` for the family's own checks."""
    import torch
    from peft import LoraConfig

    import fairhuman_utils as fh
    import model_families as mf
    import train_fairhuman_lora as train

    args = train.parse_args(["--pretrained_model_name_or_path", model, "--train_data_dir", "x",
                             "--max_sequence_length", str(max_sequence_length)])
    family = mf.family_for_model(args)
    family.check_args(args)
    family.load("cpu", torch.float32)
    torch.manual_seed(0)
    family.denoiser.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                           target_modules=family.default_lora_targets.split(",")))
    params = [p for p in family.denoiser.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1)  # B != 0, so every LoRA matrix gets gradient
    masks = torch.zeros(2, 2, 24, 40)
    masks[:, 0, 4:12, 28:36] = 1  # hand: latent rows 2-5, columns 14-17
    masks[:, 1, 0:8, 0:8] = 1  # face: latent rows 0-3, columns 0-3
    batch = {"pixel_values": torch.rand(2, 3, 24, 40) * 2 - 1, "masks": masks, "seeds": [1, 2], "rows": [0, 1],
             "captions": list(captions), "original_sizes": [(24, 40)] * 2,
             "crop_top_lefts": [(0, 0)] * 2, "target_sizes": [(24, 40)] * 2}
    conditioning = family.caption_conditioning([[caption] for caption in captions], "cpu")
    inputs = train.prepare_inputs(batch, args, family, conditioning, torch.float32, "cpu")
    assert inputs.region_masks[0].shape == (2, 1, 12, 20) and inputs.target.shape == (2, 16, 12, 20)
    assert inputs.region_masks[0][0, 0].nonzero().min(0).values.tolist() == [2, 14]
    assert inputs.region_masks[0][0, 0].nonzero().max(0).values.tolist() == [5, 17]
    assert inputs.region_masks[1][0, 0].sum() == 16 and inputs.region_masks[1][0, 0, :4, :4].all()
    prediction = family.predict(family.denoiser, inputs)
    assert prediction.shape == inputs.target.shape
    losses = fh.fairhuman_losses(prediction, inputs.target, inputs.region_masks[0], inputs.region_masks[1],
                                 sample_weights=inputs.sample_weights)
    grads = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(losses[i], params, retain_graph=True)])
                         for i in range(3)])
    assert torch.isfinite(grads).all() and (grads.norm(dim=1) > 0).all()
    cosine = torch.nn.functional.normalize(grads, dim=1) @ torch.nn.functional.normalize(grads, dim=1).T
    assert cosine[0, 1] < 0.99 and cosine[0, 2] < 0.99 and cosine[1, 2] < 0.99
    return args, family, batch, conditioning, inputs, prediction
