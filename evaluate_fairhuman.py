#!/usr/bin/env python
"""Did the FairHuman LoRA work? Score the hands and faces of generated images, the paper's way and honestly.

Two modes:

* generation: ``--pretrained_model_name_or_path`` and one or more ``--lora_paths``. Every prompt is
  sampled with the base model and with each LoRA from the SAME seeds (UniPC, as the authors
  sampled), so image ``j`` of prompt ``i`` pairs up across models. Writes the images, one
  comparison grid per prompt and the report.
* scoring: ``--images_dir A [B ...]`` scores folders of existing images (made in ComfyUI, say);
  with two or more folders the first is the reference and images pair by file name.

Each image is scored with MediaPipe's face detector and hand landmark model (the optional extra of
``requirements-prepare.txt``, through ``detector.py``, the detector ``prepare_fairhuman_dataset.py`` uses), and
optionally with CLIP score. For each model the report gives, with ``d_i`` = 1 when image ``i`` has
at least one detection and ``c_i`` = the mean confidence of its detections (0 when it has none):

    detection_rate       = mean_i d_i
    confidence_mean      = mean_i c_i                      (a miss counts as 0: the honest number)
    confidence_detected  = sum_i c_i / sum_i d_i           (over images with a detection: the authors')

so ``confidence_mean = detection_rate * confidence_detected``. The authors reported only the last
one, which rises when a model draws FEWER but cleaner hands. Each LoRA's difference to the
reference is paired (same prompt and seed, or same file name) with a bootstrap interval.

    python evaluate_fairhuman.py --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \\
      --lora_paths fairhuman-sdxl --output_dir eval
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import os
import re
import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

import fairhuman_utils as fh
from detector import IMAGE_EXTENSIONS, REQUIREMENTS_HINT, MediaPipeDetector, filtered_stderr, utf8_lines
from fairhuman_utils import UsageError
from flag_types import FINITE, NON_NEGATIVE, POSITIVE_INT, flag_number

logger = logging.getLogger(__name__)

DEFAULT_PROMPTS = (
    "a photo of a woman waving at the camera with her right hand, face in view",
    "a photo of a man giving a thumbs up, smiling, upper body",
    "a close-up photo of a person holding a cup of coffee with both hands, looking at the camera",
    "a photo of a young girl clapping her hands, full face visible",
    "a portrait of an old man with his hands folded under his chin",
    "a photo of a chef holding a knife and cutting vegetables, face and hands visible",
    "a photo of a woman typing on a laptop keyboard, looking at the camera",
    "a photo of two friends shaking hands and smiling",
    "a photo of a man playing the guitar, fingers on the strings, face visible",
    "a photo of a teacher pointing at a blackboard, turned towards the camera",
    "a photo of a woman holding a smartphone in front of her face",
    "a photo of a boy showing five fingers, open palm towards the camera",
    "a photo of a businessman adjusting his tie, upper body, front view",
    "a photo of a woman with her hands on her cheeks, surprised face",
    "a photo of a man holding a book open with both hands, reading, face visible",
    "a photo of a person making a peace sign next to the face",
)
"""The prompts used without ``--prompts_file``: one person, face and hands in view, varied hand poses."""

REPORT_METRICS = (
    "face_detection_rate",
    "face_confidence_mean",
    "face_confidence_detected",
    "hand_detection_rate",
    "hand_confidence_mean",
    "hand_confidence_detected",
    "hands_per_image",
)
"""The per-model metrics of ``report.json`` / ``report.md`` (plus ``clip_score`` with a CLIP model)."""

REPORT_HEADINGS = {
    "face_detection_rate": "face rate",
    "face_confidence_mean": "face conf. (miss = 0)",
    "face_confidence_detected": "face conf. (detected)",
    "hand_detection_rate": "hand rate",
    "hand_confidence_mean": "hand conf. (miss = 0)",
    "hand_confidence_detected": "hand conf. (detected)",
    "hands_per_image": "hands / image",
    "clip_score": "CLIP score",
}

GRID_PAD, GRID_LABEL, GRID_HEADER = 4, 30, 40  # pixels around a cell, under it (scores), above the grid


# ---------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------


def image_record(detections, clip_score: float | None = None) -> dict:
    """The per-image scores of one image from its :class:`detector.Detections`.

    ``face_confidence`` / ``hand_confidence`` are the mean score of the image's detections, 0 when
    there is none (a hand's score is MediaPipe's handedness confidence, as in the authors' scripts).
    """
    faces, hands = list(detections.face_scores), list(detections.hand_scores)
    return {
        "faces": len(faces),
        "face_scores": [round(float(s), 6) for s in faces],
        "face_confidence": float(np.mean(faces)) if faces else 0.0,
        "hands": len(hands),
        "hand_scores": [round(float(s), 6) for s in hands],
        "hand_confidence": float(np.mean(hands)) if hands else 0.0,
        "clip_score": clip_score,
    }


def score_arrays(records) -> dict[str, np.ndarray]:
    """Per-image arrays of a list of image records (what :func:`metric_values` reads)."""
    arrays = {
        "face_found": np.array([r["faces"] > 0 for r in records], dtype=np.float64),
        "face_confidence": np.array([r["face_confidence"] for r in records], dtype=np.float64),
        "hand_found": np.array([r["hands"] > 0 for r in records], dtype=np.float64),
        "hand_confidence": np.array([r["hand_confidence"] for r in records], dtype=np.float64),
        "hands": np.array([r["hands"] for r in records], dtype=np.float64),
    }
    if records and all(r.get("clip_score") is not None for r in records):
        arrays["clip_score"] = np.array([r["clip_score"] for r in records], dtype=np.float64)
    return arrays


def metric_values(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The report's metrics from per-image arrays (the last axis is the image; leading axes are kept).

    With ``d`` = 1 if the image has a detection, ``c`` = its mean confidence (0 without one):
    ``*_detection_rate = mean(d)``, ``*_confidence_mean = mean(c)``, ``*_confidence_detected =
    sum(c) / sum(d)`` (NaN when nothing was detected), ``hands_per_image = mean(number of hands)``,
    ``clip_score = mean(CLIP score)``.
    """
    out = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        for kind in ("face", "hand"):
            found, confidence = arrays[f"{kind}_found"], arrays[f"{kind}_confidence"]
            detected = found.sum(axis=-1)
            out[f"{kind}_detection_rate"] = found.mean(axis=-1)
            out[f"{kind}_confidence_mean"] = confidence.mean(axis=-1)
            out[f"{kind}_confidence_detected"] = np.where(detected > 0, confidence.sum(axis=-1) / detected, np.nan)
    out["hands_per_image"] = arrays["hands"].mean(axis=-1)
    if "clip_score" in arrays:
        out["clip_score"] = arrays["clip_score"].mean(axis=-1)
    return out


def _number(value):
    value = float(value)
    return None if math.isnan(value) else round(value, 6)


def paired_bootstrap(reference: dict, other: dict, num_samples: int = 2000, confidence: float = 0.95, seed: int = 0):
    """Paired difference ``metric(other) - metric(reference)`` with a percentile bootstrap interval.

    ``reference`` and ``other`` are :func:`score_arrays` of the SAME images in the same order (same
    prompt and seed, or same file name). Pairs are resampled with replacement ``num_samples`` times;
    the interval is the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of the
    resampled differences (resamples where a conditional mean is undefined are left out). Returns
    ``{metric: {"difference", "ci_low", "ci_high"}}``; ``None`` where undefined.
    """
    n = len(reference["hands"])
    if n != len(other["hands"]):
        raise ValueError(f"paired samples differ in length: {n} and {len(other['hands'])}")
    reference_values = metric_values(reference)
    point = {k: v - reference_values[k] for k, v in metric_values(other).items() if k in reference_values}
    index = np.random.default_rng(seed).integers(0, n, size=(num_samples, n))
    resampled_other = metric_values({k: v[index] for k, v in other.items()})
    resampled_reference = metric_values({k: v[index] for k, v in reference.items()})
    tail = 100 * (1 - confidence) / 2
    out = {}
    for metric, difference in point.items():
        samples = resampled_other[metric] - resampled_reference[metric]
        samples = samples[~np.isnan(samples)]
        low, high = np.percentile(samples, [tail, 100 - tail]) if len(samples) else (np.nan, np.nan)
        out[metric] = {"difference": _number(difference), "ci_low": _number(low), "ci_high": _number(high)}
    return out


class ClipScorer:
    """CLIP score of an image and its prompt: ``100 * max(cos(image embedding, text embedding), 0)``.

    The model is read from a LOCAL folder (``CLIPModel`` + ``CLIPProcessor`` files, e.g. a copy of
    openai/clip-vit-large-patch14); nothing is downloaded.
    """

    def __init__(self, path: str, device: str = "cpu"):
        from transformers import CLIPModel, CLIPProcessor

        try:
            self.model = CLIPModel.from_pretrained(path, local_files_only=True).to(device).eval()
            self.processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError) as error:
            raise UsageError(f"--clip_model_name_or_path {path!r}: cannot load a CLIP model and processor ({error})") from None
        self.device = device

    def __call__(self, image: Image.Image, text: str) -> float:
        import torch

        inputs = self.processor(text=[text], images=[fh.to_rgb(image)], return_tensors="pt", padding=True,
                                truncation=True).to(self.device)
        with torch.no_grad():
            out = self.model(**inputs)
        cosine = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds).item()
        return 100.0 * max(cosine, 0.0)


def make_detector(args):
    """The MediaPipe detector of ``detector.py``; a clear error when the extra is missing."""
    try:
        return MediaPipeDetector(min_confidence=args.min_confidence, max_num_hands=args.max_num_hands,
                                 face_model=args.face_model)
    except ImportError as error:
        raise UsageError(f"scoring needs the MediaPipe detector: {error}") from None


def check_detector_available() -> None:
    """Raise :class:`UsageError` naming requirements-prepare.txt when MediaPipe cannot be imported."""
    try:
        with filtered_stderr():  # the import prints protobuf's GetPrototype message
            for module in ("mediapipe.python.solutions.face_detection", "mediapipe.python.solutions.hands"):
                importlib.import_module(module)
    except ImportError as error:
        raise UsageError(f"scoring needs the MediaPipe detector ({error}).\n{REQUIREMENTS_HINT}") from None


# ---------------------------------------------------------------------------------------------
# Folders of images
# ---------------------------------------------------------------------------------------------


def read_folder(folder: str) -> list[dict]:
    """The images at the top level of ``folder`` (sorted by name), with their prompt and seed when a
    ``metadata.jsonl`` (``file_name``, ``text``, optional ``seed`` and ``prompt_index``) names them."""
    metadata = {}
    path = os.path.join(folder, "metadata.jsonl")
    if os.path.isfile(path):
        lines = list(utf8_lines(path, "--images_dir", UsageError))
        for number, line in lines:
            if line.strip():
                try:
                    row = json.loads(line)
                    metadata[row["file_name"]] = row
                except (ValueError, KeyError, TypeError) as error:
                    raise UsageError(f"{path}, line {number}: expected a JSON object with 'file_name' ({error})") from None
    names = sorted(n for n in os.listdir(folder) if not n.startswith(".") and os.path.isfile(os.path.join(folder, n))
                   and os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS)
    return [{"file": name, "path": os.path.join(folder, name), "prompt": metadata.get(name, {}).get("text"),
             "prompt_index": metadata.get(name, {}).get("prompt_index"), "seed": metadata.get(name, {}).get("seed")}
            for name in names]


def score_images(entries, detector, clip=None, desc="Scoring", disable_progress_bar=False) -> list[dict]:
    """Score every image entry of :func:`read_folder`; unreadable files stop the run naming the file."""
    from tqdm.auto import tqdm

    records = []
    for entry in tqdm(entries, desc=desc, disable=disable_progress_bar):
        try:
            image = fh.to_rgb(fh.open_image(entry["path"]))  # the one reader of every script: 16-bit images scaled, not clipped
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            raise UsageError(f"cannot read the image {entry['path']} ({error})") from None
        clip_score = clip(image, entry["prompt"]) if clip is not None and entry["prompt"] is not None else None
        records.append({**entry, **image_record(detector(image), clip_score)})
    return records


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def build_report(models, settings: dict, num_bootstrap: int = 2000, confidence: float = 0.95, seed: int = 0) -> dict:
    """``report.json``: one row per model (``models`` = ``[{"name", "source", "records"}]``, the first
    is the reference) with :data:`REPORT_METRICS`, and for every other model ``paired_difference``
    to the reference over the images both have (paired by file name)."""
    rows = []
    reference = models[0]
    for position, model in enumerate(models):
        arrays = score_arrays(model["records"])
        row = {"model": model["name"], "source": model["source"], "images": len(model["records"])}
        row.update({k: _number(v) for k, v in metric_values(arrays).items()})
        if position == 0 or not model["records"]:
            row["paired_difference"] = None
        else:
            by_file = {r["file"]: r for r in reference["records"]}
            paired = [r for r in model["records"] if r["file"] in by_file]
            if not paired:
                raise UsageError(f"no image of {model['source']} has the file name of an image of {reference['source']}: "
                                 "nothing to pair")
            ref_arrays = score_arrays([by_file[r["file"]] for r in paired])
            row["paired_pairs"] = len(paired)
            row["paired_difference"] = paired_bootstrap(ref_arrays, score_arrays(paired), num_bootstrap, confidence, seed)
        rows.append(row)
    images = [{"model": m["name"], **{k: v for k, v in r.items() if k != "path"}} for m in models for r in m["records"]]
    return {"reference": reference["name"], "settings": settings, "metrics": list(REPORT_METRICS), "models": rows,
            "images": images}


def _format(value, signed=False):
    if value is None:
        return "-"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def report_markdown(report: dict) -> str:
    """The report as Markdown tables: the scores of every model, then the paired differences."""
    metrics = [m for m in list(REPORT_METRICS) + ["clip_score"] if any(m in row for row in report["models"])]
    head = "| model | images | " + " | ".join(REPORT_HEADINGS[m] for m in metrics) + " |"
    rule = "| --- " * (len(metrics) + 2) + "|"
    lines = [head, rule]
    for row in report["models"]:
        lines.append(f"| {row['model']} | {row['images']} | " + " | ".join(_format(row.get(m)) for m in metrics) + " |")
    others = [row for row in report["models"] if row.get("paired_difference")]
    if others:
        level = report["settings"].get("confidence_level", 0.95)
        lines += ["", f"Paired difference to `{report['reference']}` (same prompt and seed / file name), "
                      f"with a {100 * level:.0f} % bootstrap interval:", "",
                  "| model | pairs | " + " | ".join(REPORT_HEADINGS[m] for m in metrics) + " |",
                  "| --- " * (len(metrics) + 2) + "|"]
        for row in others:
            cells = []
            for m in metrics:
                d = row["paired_difference"].get(m)
                cells.append("-" if d is None or d["difference"] is None else
                             f"{_format(d['difference'], True)} [{_format(d['ci_low'], True)}, {_format(d['ci_high'], True)}]")
            lines.append(f"| {row['model']} | {row['paired_pairs']} | " + " | ".join(cells) + " |")
    lines += ["", "rate: share of images with at least one detection; conf. (miss = 0): mean detection confidence "
                  "per image, 0 without a detection; conf. (detected): the same over images with a detection only "
                  "(what the FairHuman authors reported; it rewards drawing fewer hands)."]
    return "\n".join(lines) + "\n"


def write_report(report: dict, output_dir: str) -> tuple[str, str]:
    json_path, md_path = os.path.join(output_dir, "report.json"), os.path.join(output_dir, "report.md")
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    with open(md_path, "w", encoding="utf-8") as f:
        f.write("# FairHuman evaluation\n\n" + report_markdown(report))
    return json_path, md_path


def grid_cell_box(row: int, column: int, cell_size: int) -> tuple[int, int]:
    """Top-left pixel of the image of ``row`` (seed) and ``column`` (model) in a grid."""
    return column * (cell_size + 2 * GRID_PAD) + GRID_PAD, GRID_HEADER + row * (cell_size + GRID_LABEL + 2 * GRID_PAD) + GRID_PAD


def cell_label(record: dict) -> str:
    """The scores written under an image in a grid: face confidence, hands found (their confidence), CLIP."""
    label = f"face {record['face_confidence']:.2f}" if record["faces"] else "no face"
    label += f"  hands {record['hands']}"
    if record["hands"]:
        label += f" ({record['hand_confidence']:.2f})"
    if record.get("clip_score") is not None:
        label += f"  CLIP {record['clip_score']:.1f}"
    return label


def draw_grid(prompt: str, columns, cell_size: int, path: str) -> str:
    """Save a comparison grid: one column per model (``columns`` = ``[(name, records)]``, records in
    seed order), one row per seed, each image resized to ``cell_size`` pixels wide with its scores under it."""
    rows = max(len(records) for _, records in columns)
    width = len(columns) * (cell_size + 2 * GRID_PAD)
    height = GRID_HEADER + rows * (cell_size + GRID_LABEL + 2 * GRID_PAD)
    sheet = Image.new("RGB", (width, height), (32, 32, 32))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    draw.text((GRID_PAD, 4), textwrap.shorten(prompt, max(20, width // 6)), fill=(230, 230, 230), font=font)
    for column, (name, records) in enumerate(columns):
        x, _ = grid_cell_box(0, column, cell_size)
        faces, hands = sum(r["faces"] > 0 for r in records), sum(r["hands"] > 0 for r in records)
        title = f"{name}: faces {faces}/{len(records)}, hands {hands}/{len(records)}"
        draw.text((x, 22), title[: max(12, cell_size // 6)], fill=(255, 200, 80), font=font)
        for row, record in enumerate(records):
            x, y = grid_cell_box(row, column, cell_size)
            image = fh.open_image(record["path"])
            scale = cell_size / image.width
            sheet.paste(fh.to_rgb(image).resize((cell_size, max(1, round(image.height * scale))), Image.BICUBIC), (x, y))
            label_y = y + min(cell_size, round(image.height * scale)) + 2
            draw.text((x, label_y), cell_label(record), fill=(230, 230, 230), font=font)
            if record.get("seed") is not None:
                draw.text((x, label_y + 12), f"seed {record['seed']}", fill=(150, 150, 150), font=font)
    sheet.save(path)
    return path


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------


def read_prompts(path: str | None, flag: str = "--prompts_file") -> list[str]:
    """One prompt per non-empty line of ``path`` (``#`` lines are comments); the default list without a file."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"{flag}: cannot read {path!r} ({error})") from None
    if not prompts:
        raise UsageError(f"{flag}: {path!r} holds no prompt (one per line)")
    return prompts


def model_names(paths, taken=("base",)) -> list[str]:
    """Short unique names for LoRA paths: the file's stem, or the folder's name for a folder or for
    the default file name ``pytorch_lora_weights.safetensors``; ``-2``, ``-3`` ... on clashes."""
    from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE

    used, names = set(taken), []
    for path in paths:
        path = os.path.normpath(os.path.abspath(path))
        stem = os.path.splitext(os.path.basename(path))[0]
        if os.path.isdir(path) or os.path.basename(path) == LORA_WEIGHT_NAME_SAFE:
            stem = os.path.basename(path if os.path.isdir(path) else os.path.dirname(path))
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", stem) or "lora"
        name, k = base, 2
        while name in used:
            name, k = f"{base}-{k}", k + 1
        used.add(name)
        names.append(name)
    return names


def load_pipeline(args):
    """The base pipeline with a UniPC scheduler on ``args.device`` in ``args.dtype``."""
    import torch
    from diffusers import AutoencoderKL, DiffusionPipeline

    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
    kwargs = {"dtype": dtype, "revision": args.revision, "variant": args.variant, "cache_dir": args.cache_dir}
    try:
        if args.pretrained_vae_model_name_or_path:
            kwargs["vae"] = AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path, dtype=dtype,
                                                          cache_dir=args.cache_dir)
        pipe = DiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path, **kwargs)
    except (OSError, ValueError, EnvironmentError) as error:
        raise UsageError(f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path!r}: cannot load "
                         f"the pipeline ({error})") from None
    if not hasattr(pipe, "load_lora_weights"):
        raise UsageError(f"--pretrained_model_name_or_path: {type(pipe).__name__} cannot load LoRAs")
    family = sampling_family(pipe, args)
    pipe.scheduler = family.sampling_scheduler(pipe.scheduler, args.prediction_type)  # UniPC; FLUX.1 / SD3: their own
    apply_sampling_advice(args, family)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(args.device)


def apply_sampling_advice(args, family) -> None:
    """The family's LoRA scale, steps and guidance (:meth:`~model_families.ModelFamily.inference_advice`) where not
    given."""
    advice = family.inference_advice()
    if args.guidance_scale is None:
        args.guidance_scale = advice["guidance"]
    if args.num_inference_steps is None:
        args.num_inference_steps = advice["steps"]
    if args.lora_scale is None:
        args.lora_scale = advice["scale"]


class PipelineSampler:
    """Generation's sampler: the base pipeline (:func:`load_pipeline`) with every LoRA loaded as a named adapter."""

    def __init__(self, args, lora_names):
        self.pipe, self.args = load_pipeline(args), args
        self.family = sampling_family(self.pipe, args)
        load_loras(self.pipe, args.lora_paths, lora_names)
        self.lora_names = lora_names
        if args.resolution is None:  # the model's own: the UNet's sample size, or the family's native resolution
            unet = getattr(self.pipe, "unet", None)
            args.resolution = (unet.config.sample_size * self.pipe.vae_scale_factor if unet is not None
                               else self.family.geometry()[3])
        if args.resolution % self.pipe.vae_scale_factor:
            raise UsageError(f"--resolution must be a multiple of {self.pipe.vae_scale_factor}, got {args.resolution}")

    def select(self, name, scale) -> None:
        """The base model (``scale`` None) or LoRA ``name`` at ``scale``."""
        if scale is None:
            if self.lora_names:
                self.pipe.disable_lora()
        else:
            self.pipe.enable_lora()
            self.pipe.set_adapters([name], adapter_weights=[scale])

    def __call__(self, prompt, count, generators, **kwargs):
        return self.pipe(prompt=[prompt] * count, **self.family.negative_prompt_kwargs(self.args.negative_prompt, count),
                         generator=generators, **kwargs).images

    def close(self) -> None:
        self.pipe = None


def sampling_family(pipe, args):
    """The model family of ``pipe``, whose :meth:`~model_families.ModelFamily.inference_advice` gives the default
    steps and guidance (SD/SDXL: the authors' 30 UniPC steps, CFG 7.5; FLUX.1-dev 28 steps, distilled guidance 3.5,
    schnell 4 steps, 0; SD3 28 steps, 4.5) and whose sampler is used; the base family's for other pipelines."""
    import model_families as mf

    return mf.family_for_pipeline(pipe, args) or mf.ModelFamily(args)


def lora_prediction_type(paths) -> str | None:
    """The prediction type the LoRAs were trained with, from kohya-format metadata (``ss_v_parameterization``,
    which the training script writes): ``"v_prediction"``, ``"epsilon"`` or ``None`` when no file says.
    LoRAs that disagree raise :class:`UsageError`."""
    from safetensors import safe_open

    found = {}
    for path in paths:
        files = [path] if os.path.isfile(path) else sorted(
            os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
        for file in files:
            try:
                with safe_open(file, "pt") as f:
                    metadata = f.metadata() or {}
            except Exception:  # noqa: BLE001 - unreadable here: load_loras names it
                continue
            if "ss_v_parameterization" in metadata:
                found[path] = "v_prediction" if metadata["ss_v_parameterization"] == "True" else "epsilon"
                break
    if len(set(found.values())) > 1:
        raise UsageError(f"--lora_paths: the LoRAs were trained with different prediction types ({found}); "
                         "evaluate them in separate runs")
    return next(iter(found.values()), None)


def load_loras(pipe, paths, names) -> None:
    """Load every LoRA (diffusers or kohya format; a folder or a file) as a named adapter, checking each matches."""
    for path, name in zip(paths, names):
        try:
            pipe.load_lora_weights(path, adapter_name=name)
        except Exception as error:  # noqa: BLE001 - diffusers/peft raise many kinds for a file that does not fit
            detail = " ".join(str(error).split())
            detail = detail if len(detail) < 400 else detail[:400] + " ..."
            raise UsageError(f"--lora_paths {path!r}: cannot load it into {args_model(pipe)} (a LoRA for another base "
                             f"model?): {type(error).__name__}: {detail}") from None
        if not any(name in adapters for adapters in pipe.get_list_adapters().values()):
            beside = os.path.join(os.path.dirname(os.path.abspath(path)), "pytorch_lora_weights.safetensors")
            if os.path.isfile(path) and os.path.isfile(beside) and os.path.abspath(path) != beside:
                raise UsageError(f"--lora_paths {path!r}: diffusers reads no key of this file (the kohya/ComfyUI "
                                 f"format, which {type(pipe).__name__} cannot load); evaluate the diffusers file "
                                 f"written beside it: --lora_paths {beside}")
            raise UsageError(f"--lora_paths {path!r}: no LoRA key of this file matches the model "
                             f"{args_model(pipe)} (a LoRA for another base model?)")


def args_model(pipe) -> str:
    return getattr(pipe, "name_or_path", None) or type(pipe).__name__


def image_seed(seed: int, prompt_index: int, image_index: int, num_images_per_prompt: int) -> int:
    """The seed of image ``image_index`` of prompt ``prompt_index``: the same for every model."""
    return seed + prompt_index * num_images_per_prompt + image_index


def generate(args, prompts, lora_names, sampler=None) -> list[dict]:
    """Sample every prompt with the base model and each LoRA from the same seeds; return the model folders.
    ``sampler``: a :class:`PipelineSampler` (the default) or the training script's sampler of its trained denoiser."""
    import torch
    from tqdm.auto import tqdm

    sampler = sampler or PipelineSampler(args, lora_names)
    models = [("base", args.pretrained_model_name_or_path, None)]
    models += [(name, path, args.lora_scale) for name, path in zip(lora_names, args.lora_paths)]
    n = args.num_images_per_prompt
    progress = tqdm(total=len(models) * len(prompts) * n, desc="Generating", disable=args.disable_progress_bar)
    folders = []
    for name, source, scale in models:
        sampler.select(name, scale)
        folder = os.path.join(args.output_dir, "images", name)
        os.makedirs(folder, exist_ok=True)
        rows = []
        for i, prompt in enumerate(prompts):
            seeds = [image_seed(args.seed, i, j, n) for j in range(n)]
            for start in range(0, n, args.batch_size):
                chunk = seeds[start:start + args.batch_size]
                generators = [torch.Generator("cpu").manual_seed(s) for s in chunk]
                with torch.no_grad():
                    images = sampler(prompt, len(chunk), generators, num_inference_steps=args.num_inference_steps,
                                     height=args.resolution, width=args.resolution,
                                     **sampler.family.guidance_call_kwargs(args.guidance_scale))
                for s, image in zip(chunk, images):
                    file_name = image_file_name(i, s)
                    image.save(os.path.join(folder, file_name))
                    rows.append({"file_name": file_name, "text": prompt, "prompt_index": i, "seed": s})
                progress.update(len(chunk))
        with open(os.path.join(folder, "metadata.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        folders.append({"name": name, "source": source, "folder": folder, "lora_scale": scale})
    progress.close()
    sampler.close()
    return folders


# ---------------------------------------------------------------------------------------------
# Arguments and main
# ---------------------------------------------------------------------------------------------


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(
        description="Score hands and faces of a FairHuman LoRA against its base model (MediaPipe detection rate and "
                    "confidence, paired by seed), or of existing folders of images.")

    g = parser.add_argument_group("Generation mode: the base model and the LoRAs")
    g.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                   help="Hub id or local folder of the diffusers base model the LoRAs were trained on (SD 1.x/2.x, SDXL, FLUX.1, SD3/3.5).")
    g.add_argument("--pretrained_vae_model_name_or_path", type=str, default=None,
                   help="A separate VAE, e.g. madebyollin/sdxl-vae-fp16-fix for SDXL in fp16.")
    g.add_argument("--revision", type=str, default=None, help="Revision of the base model on the Hub.")
    g.add_argument("--variant", type=str, default=None, help="Variant of the model files, e.g. fp16.")
    g.add_argument("--cache_dir", type=str, default=None, help="Where downloaded models are cached.")
    g.add_argument("--lora_paths", type=str, nargs="+", default=[],
                   help="One or more LoRAs: a folder with pytorch_lora_weights.safetensors or a .safetensors file, in "
                        "diffusers or kohya format (A1111/ComfyUI files). Each becomes a column next to the base model.")
    g.add_argument("--lora_scale", type=FINITE, default=None,
                   help="Strength of every LoRA. Default: what the model family's card advises (SD/SDXL 0.3, what the "
                        "FairHuman authors sampled with; FLUX.1/SD3 0.5); 1 = full strength.")

    g = parser.add_argument_group("Generation mode: sampling")
    g.add_argument("--prompts_file", type=str, default=None,
                   help="A text file, one prompt per line ('#' lines ignored). Default: a built-in list of 16 prompts of "
                        "one person with face and hands in view.")
    g.add_argument("--negative_prompt", type=str, default=None, help="Negative prompt for every image.")
    g.add_argument("--num_images_per_prompt", type=POSITIVE_INT, default=4,
                   help="Images per prompt and model; image j of prompt i has the same seed for every model.")
    g.add_argument("--seed", type=flag_number(int, minimum=0, maximum=fh.SEED_MAX), default=0,
                   help="Image j of prompt i is drawn from seed + i * num_images_per_prompt + j (a CPU generator, so "
                        "the seeds give the same noise on any device).")
    g.add_argument("--resolution", type=flag_number(int, minimum=8, multiple_of=8), default=None, help="Image size; default: the model's own (512 SD 1.5, 1024 SDXL).")
    g.add_argument("--num_inference_steps", type=POSITIVE_INT, default=None,
                   help="Sampling steps; default: the model family's advice: 30 UniPC steps for SD/SDXL (the "
                        "authors'), 28 for FLUX.1-dev and SD3, 4 for FLUX.1-schnell.")
    g.add_argument("--guidance_scale", type=NON_NEGATIVE, default=None,
                   help="Guidance scale; default: the model family's advice: 7.5 for SD/SDXL (the authors'), 3.5 for "
                        "FLUX.1-dev (distilled guidance), 0 for FLUX.1-schnell, 4.5 for SD3.")
    g.add_argument("--batch_size", type=POSITIVE_INT, default=4, help="Images generated per pipeline call.")
    g.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                   help="Model weights dtype; default fp16 on a GPU, fp32 ('no') on the CPU.")
    g.add_argument("--device", type=str, default=None, help="Torch device; default cuda when available, else cpu.")
    g.add_argument("--prediction_type", type=str, default=None, choices=["epsilon", "v_prediction"],
                   help="Sample with this prediction type (a LoRA trained with --prediction_type v_prediction needs "
                        "v_prediction). Default: what a kohya-format LoRA's metadata says (ss_v_parameterization), "
                        "else the model's own.")

    g = parser.add_argument_group("Scoring mode: existing images")
    g.add_argument("--images_dir", type=str, nargs="+", default=None,
                   help="Score the images at the top level of these folders instead of generating. With two or more, "
                        "the FIRST is the reference (e.g. the base model's images) and images pair by file name. A "
                        "metadata.jsonl with file_name and text (the prompt) enables the CLIP score.")

    g = parser.add_argument_group("Scores")
    g.add_argument("--min_confidence", type=flag_number(float, minimum=0, maximum=1), default=0.5,
                   help="A face or hand counts as detected at this MediaPipe confidence or above.")
    g.add_argument("--max_num_hands", type=POSITIVE_INT, default=4, help="At most this many hands per image.")
    g.add_argument("--face_model", type=str, default="full", choices=["full", "short"],
                   help="MediaPipe face detector: 'full' range (small faces too) or 'short' range (faces within ~2 m).")
    g.add_argument("--clip_model_name_or_path", type=str, default=None,
                   help="A LOCAL folder with a CLIP model (CLIPModel + CLIPProcessor) for the CLIP score of image and "
                        "prompt; never downloaded. Without it no CLIP score is computed.")
    g.add_argument("--num_bootstrap", type=POSITIVE_INT, default=2000, help="Bootstrap resamples for the paired intervals.")
    g.add_argument("--confidence_level", type=flag_number(float, exclusive_minimum=0, exclusive_maximum=1), default=0.95, help="Coverage of the bootstrap intervals.")

    g = parser.add_argument_group("Output")
    g.add_argument("--output_dir", type=str, default="fairhuman-evaluation",
                   help="Where images/<model>/, grid_<prompt index>.png, report.json and report.md go.")
    g.add_argument("--overwrite_output_dir", action="store_true",
                   help="Write into a non-empty --output_dir: the files an earlier run of this script wrote there "
                        "(listed in its .fairhuman_evaluation_outputs.json) are replaced; nothing else is touched, "
                        "and a file of yours with the name of an output stops the run.")
    g.add_argument("--grid_cell_size", type=flag_number(int, minimum=8), default=256, help="Width in pixels of each image in the grids.")
    g.add_argument("--disable_progress_bar", action="store_true", help="Do not show progress bars.")

    return parser.parse_args(input_args)


def check_args(args) -> None:
    """Refuse impossible flags before any model is loaded, naming the flag."""
    generation = args.pretrained_model_name_or_path is not None
    if generation == (args.images_dir is not None):
        raise UsageError("give --pretrained_model_name_or_path (generation mode) or --images_dir (scoring mode), one of them")
    if generation:
        for path in args.lora_paths:
            if not os.path.exists(path):
                raise UsageError(f"--lora_paths: no such file or folder {path!r}")
            if os.path.isdir(path) and not any(f.endswith(".safetensors") for f in os.listdir(path)):
                raise UsageError(f"--lora_paths: the folder {path!r} holds no .safetensors file")
        check_device(args.device)
    elif args.prediction_type is not None:
        raise UsageError("--prediction_type only applies to generation mode (--pretrained_model_name_or_path)")
    else:
        ignored = [f"--{n}" for n in ("lora_paths", "prompts_file") if getattr(args, n)]
        if ignored:
            raise UsageError(f"{', '.join(ignored)} only apply to generation mode (--pretrained_model_name_or_path)")
        for folder in args.images_dir:
            if not os.path.isdir(folder):
                raise UsageError(f"--images_dir: no such folder {folder!r}")
            if not read_folder(folder):
                raise UsageError(f"--images_dir: {folder!r} holds no image file")
    clip = args.clip_model_name_or_path
    if clip is not None and not os.path.isfile(os.path.join(clip, "config.json")):
        raise UsageError(f"--clip_model_name_or_path {clip!r} is not a local model folder (with config.json); "
                         "the CLIP score only uses a local copy and never downloads one")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise UsageError(f"--output_dir {args.output_dir!r} is a file")
    if os.path.isdir(args.output_dir) and os.listdir(args.output_dir) and not args.overwrite_output_dir:
        raise UsageError(f"--output_dir {args.output_dir!r} exists and is not empty (pass --overwrite_output_dir)")


OUTPUTS_MANIFEST = ".fairhuman_evaluation_outputs.json"
"""In --output_dir: every file this script writes there (relative paths), listed BEFORE they are written,
so that --overwrite_output_dir removes those and nothing else, even after a run that was interrupted."""


def image_file_name(prompt_index: int, seed: int) -> str:
    """The file name of a generated image: ``{prompt index:03d}_{seed}.png``."""
    return f"{prompt_index:03d}_{seed}.png"


def planned_outputs(args, prompts, lora_names) -> list[str]:
    """The files (relative to --output_dir) this run will write: the report, and in generation mode every
    image and metadata.jsonl under images/<model>/ and one grid per prompt."""
    files = ["report.json", "report.md"]
    if prompts is not None:
        n = args.num_images_per_prompt
        for name in ["base", *lora_names]:
            files.append(f"images/{name}/metadata.jsonl")
            files += [f"images/{name}/{image_file_name(i, image_seed(args.seed, i, j, n))}"
                      for i in range(len(prompts)) for j in range(n)]
        files += [f"grid_{i}.png" for i in range(len(prompts))]
    return files


def _read_manifest(output_dir: str) -> list[str]:
    path = os.path.join(output_dir, OUTPUTS_MANIFEST)
    if not os.path.isfile(path):
        return []
    try:
        with open(path, encoding="utf-8") as f:
            files = json.load(f)["files"]
    except (ValueError, KeyError, TypeError):
        return []
    return [f for f in files if isinstance(f, str)]


def check_device(device: str | None) -> None:
    """``--device`` must name a torch device this machine has (checked before any model loads)."""
    if device is None:
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as error:
        raise UsageError(f"--device {device!r} is not a torch device ({error})") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (parsed.index or 0) >= count:
            raise UsageError(f"--device {device}: {'no CUDA device is available' if count == 0 else f'only {count} CUDA device(s)'} "
                             "on this machine; use --device cpu or leave --device out")
    elif parsed.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UsageError(f"--device {device}: MPS is not available on this machine; use --device cpu")
    elif parsed.type not in ("cpu", "cuda", "mps", "xpu"):
        raise UsageError(f"--device {device!r}: use cpu, cuda[:N] or mps")


def clear_outputs(output_dir: str) -> list[str]:
    """Remove what an earlier run of this script wrote into ``output_dir`` and nothing else: the files its
    manifest (:data:`OUTPUTS_MANIFEST`) lists, then the folders that leaves empty. Returns the removed."""
    root = os.path.realpath(output_dir)
    removed = []
    for relative in _read_manifest(output_dir):
        path = os.path.realpath(os.path.join(root, relative))
        if os.path.commonpath([root, path]) != root or not os.path.isfile(path):
            continue  # never outside the output folder, never a folder
        os.remove(path)
        removed.append(relative)
        folder = os.path.dirname(path)
        while folder != root and os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)
            folder = os.path.dirname(folder)
    manifest = os.path.join(output_dir, OUTPUTS_MANIFEST)
    if os.path.isfile(manifest):
        os.remove(manifest)
    return removed


def claim_outputs(output_dir: str, files: list[str]) -> None:
    """Refuse when a file this run would write is already there and is not this script's (a user's file of
    the same name); otherwise list ``files`` in the manifest before writing any of them."""
    taken = [f for f in files if os.path.lexists(os.path.join(output_dir, f))]
    if taken:
        raise UsageError(f"--output_dir {output_dir!r}: {len(taken)} file(s) this run would write are already there "
                         f"and were not written by this script, e.g. {', '.join(taken[:3])}; they are left alone: "
                         "choose another --output_dir")
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, OUTPUTS_MANIFEST), "w", encoding="utf-8") as f:
        json.dump({"files": files}, f, indent=0)


def main(args, sampler=None) -> dict:
    """Run the evaluation; returns the report (also written to ``--output_dir``). ``sampler``: see :func:`generate`."""
    import torch

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S",
                        level=logging.INFO)
    check_args(args)
    generation = args.pretrained_model_name_or_path is not None
    prompts = read_prompts(args.prompts_file) if generation else None
    lora_names = model_names(args.lora_paths) if generation else []
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.mixed_precision is None:
        args.mixed_precision = "fp16" if args.device.startswith("cuda") else "no"
    if args.mixed_precision == "fp16" and args.device == "cpu":
        logger.warning("fp16 on the CPU is slow and imprecise; generating in fp32")
        args.mixed_precision = "no"
    if generation and args.prediction_type is None:
        args.prediction_type = lora_prediction_type(args.lora_paths)
        if args.prediction_type is not None:
            logger.info(f"Sampling with prediction type {args.prediction_type} (the LoRAs' metadata)")
    check_detector_available()  # the optional extra, before any model is loaded
    clip = ClipScorer(args.clip_model_name_or_path, args.device) if args.clip_model_name_or_path else None
    if args.overwrite_output_dir:
        clear_outputs(args.output_dir)
    claim_outputs(args.output_dir, planned_outputs(args, prompts, lora_names))

    if generation:
        folders = generate(args, prompts, lora_names, sampler)
    else:
        names = model_names(args.images_dir, taken=())
        folders = [{"name": name, "source": folder, "folder": folder, "lora_scale": None}
                   for name, folder in zip(names, args.images_dir)]
        if clip is not None and not all(e["prompt"] for f in folders for e in read_folder(f["folder"])):
            logger.warning("--clip_model_name_or_path: some images have no prompt (metadata.jsonl 'text'); no CLIP score")
            clip = None

    with make_detector(args) as detector:
        for folder in folders:
            folder["records"] = score_images(read_folder(folder["folder"]), detector, clip, f"Scoring {folder['name']}",
                                             args.disable_progress_bar)
    settings = {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, list, type(None)))}
    report = build_report(folders, settings, args.num_bootstrap, args.confidence_level, args.seed if generation else 0)
    for row, folder in zip(report["models"], folders):
        row["lora_scale"] = folder["lora_scale"]
    if generation:
        for i, prompt in enumerate(prompts):
            columns = [(f["name"], sorted((r for r in f["records"] if r["prompt_index"] == i), key=lambda r: r["seed"]))
                       for f in folders]
            draw_grid(prompt, columns, args.grid_cell_size, os.path.join(args.output_dir, f"grid_{i}.png"))
    json_path, md_path = write_report(report, args.output_dir)
    logger.info("Scores:\n" + report_markdown(report))
    logger.info(f"Wrote {json_path} and {md_path}" + (f" and {len(prompts)} grid(s)" if generation else ""))
    return report


def evaluate_trained_lora(train_args, lora_file: str, sampler=None) -> dict:
    """Run the evaluation for ``train_fairhuman_lora.py --evaluate_prompts_file``: its base model and
    sampling settings, the LoRA just saved, ``--num_validation_images`` per prompt, into OUTPUT_DIR/evaluation.
    ``sampler``: the training script's sampler of the trained denoiser (its family gives steps and guidance)."""
    argv = ["--pretrained_model_name_or_path", train_args.pretrained_model_name_or_path,
            "--lora_paths", lora_file, "--prompts_file", train_args.evaluate_prompts_file,
            "--output_dir", os.path.join(train_args.output_dir, "evaluation"), "--overwrite_output_dir",
            "--num_images_per_prompt", str(max(1, train_args.num_validation_images)),
            "--seed", str(train_args.seed)]
    for flag in ("pretrained_vae_model_name_or_path", "revision", "variant", "cache_dir", "resolution",
                 "prediction_type", "validation_inference_steps"):
        if getattr(train_args, flag, None) is not None:
            argv += [f"--{flag.replace('validation_', 'num_')}", str(getattr(train_args, flag))]
    if train_args.mixed_precision in ("no", "fp16", "bf16"):  # the precision the run resolved to
        argv += ["--mixed_precision", train_args.mixed_precision]
    args = parse_args(argv)
    if sampler is not None:
        apply_sampling_advice(args, sampler.family)
    return main(args, sampler)


def cli(input_args=None):
    args = parse_args(input_args)
    try:
        main(args)
    except UsageError as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    cli()
