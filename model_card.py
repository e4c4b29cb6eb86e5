"""The model card (README.md) written beside the LoRA: YAML front matter, settings, samples, how to use it."""

from __future__ import annotations

import logging
import os

import fairhuman_utils as fh
from lora_files import LORA_WEIGHT_NAME, training_settings, writes_kohya_file

UsageError = fh.UsageError
logger = logging.getLogger(__name__)


def lora_usage(args, repo_id: str, family) -> str:
    """The model card's "How to use": which file goes where, with the authors' inference setting
    for SD/SDXL (LoRA scale 0.3, 30 UniPC steps, CFG 7.5), the family's usual sampling for FLUX.1/SD3."""
    pipeline_cls = family.pipeline_class_name
    advice = family.inference_advice()
    kohya_file = f"{args.output_name}.safetensors"
    files = []
    diffusers_file = LORA_WEIGHT_NAME if args.save_lora_format in ("diffusers", "both") else None
    kohya = writes_kohya_file(args, family)
    if diffusers_file:
        files.append(f"| `{LORA_WEIGHT_NAME}` | diffusers format | {family.diffusers_file_readers()} |")
    if kohya:
        files.append(f"| `{kohya_file}` | kohya format (`{family.kohya_prefix}_*` keys) | ComfyUI: `models/loras/`; "
                     + f"{family.kohya_file_readers()} |")
    weight_name = "" if args.save_lora_format != "kohya" else f", weight_name={kohya_file!r}"
    # trained with another prediction type than the model's: sampled with it too
    prediction = f", prediction_type={args.prediction_type!r}" if args.prediction_type else ""
    scheduler_import, dtype, scheduler_line = family.card_code(prediction)
    guidance = ", ".join(f"{k}={v!r}" for k, v in family.card_call_kwargs(advice["guidance"]).items())
    text = f"""## How to use

Weights in {args.save_precision}, {family.denoiser_name} only ({family.label}), rank {args.rank}, alpha {args.lora_alpha}:

| file | format | where it goes |
| --- | --- | --- |
""" + "\n".join(files) + f"""

{family.card_sampling_note()}

```python
import torch
from diffusers import {pipeline_cls}{scheduler_import}

pipe = {pipeline_cls}.from_pretrained({args.pretrained_model_name_or_path!r}, torch_dtype=torch.{dtype}).to("cuda")
{scheduler_line}pipe.load_lora_weights({repo_id!r}{weight_name})
pipe.fuse_lora(lora_scale={advice['scale']})
image = pipe("a photo of a person waving", num_inference_steps={advice['steps']}, {guidance}).images[0]
```
"""
    comfyui_file = family.comfyui_file(diffusers_file, kohya_file if kohya else None)
    if comfyui_file:
        text += f"""
- ComfyUI: put `{comfyui_file}` in `ComfyUI/models/loras/`, add a *Load LoRA* node after the checkpoint loader,
  `strength_model` {advice['scale']} (the LoRA has no text-encoder part, `strength_clip` does nothing); KSampler: {advice['steps']} steps,
  {family.comfyui_guidance()}, sampler `{advice['comfy_sampler']}`{"; a *ModelSamplingDiscrete* node set to `v_prediction`" if args.prediction_type == "v_prediction" else ""}.
"""
        text += family.a1111_usage(kohya_file, args.output_name)
    return text


def hub_model_id(name_or_path: str | None) -> str | None:
    """``name_or_path`` when it is a Hub model id (``owner/name`` or ``name``, valid by the Hub's rules, not a
    local path), else ``None``: a model card's ``base_model`` must name a model on the Hub."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not name_or_path or os.path.exists(name_or_path) or name_or_path.count("/") > 1:
        return None
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        return None
    return name_or_path


def card_metadata(args, family) -> str:
    """The model card's YAML front matter, written by huggingface_hub's serializer (``ModelCardData``), so
    no value can add or change keys; ``base_model`` only when the base model is a Hub id."""
    from huggingface_hub import ModelCardData

    fields = dict(library_name="diffusers", license="other", inference=True,
                  tags=[*family.tags, "text-to-image", "diffusers", "lora", "fairhuman"])
    base_model = hub_model_id(args.pretrained_model_name_or_path)
    if base_model is not None:
        fields["base_model"] = base_model
    return ModelCardData(**fields).to_yaml()


def write_model_card(args, folder: str, repo_id: str, family, images, global_step: int, evaluation=None) -> str:
    """README.md for the LoRA: base model, data, every FairHuman setting, samples, how to load it, and
    with ``evaluation`` (the report of ``evaluate_fairhuman.py``) the hand and face scores."""
    for i, image in enumerate(images):
        image.save(os.path.join(folder, f"image_{i}.png"))
    dataset = args.dataset_name or args.train_data_dir
    gallery = "\n".join(f"![sample {i}](./image_{i}.png)" for i in range(len(images)))
    settings = training_settings(args, global_step, family)
    usage = lora_usage(args, repo_id, family)
    table = "\n".join(f"| {k} | {v} |" for k, v in settings.items())
    scores = ""
    if evaluation is not None:
        import evaluate_fairhuman

        settings_used = evaluation["settings"]
        scores = (f"\n## Did it work?\n\nBase model vs this LoRA (scale {settings_used['lora_scale']}) on the prompts of "
                  f"`{args.evaluate_prompts_file}`, {settings_used['num_images_per_prompt']} image(s) per prompt from the "
                  f"same seeds, scored with MediaPipe (`evaluation/` has the images, grids and report.json):\n\n"
                  + evaluate_fairhuman.report_markdown(evaluation))
    fair_note = ""
    if args.weighting == "fair":
        fair_note = ("\nFair weights: exact MPD solved every optimizer step (the authors' method; about 1.3-2.1x the "
                     "cost of plain LoRA training)." if args.fair_update_interval == 1 else
                     f"\nFair weights: exact MPD solved every {args.fair_update_interval} optimizer steps, estimated in "
                     "between (about 1.0-1.2x the cost of plain LoRA training; per-objective weights measured within "
                     "12-20 % of exact MPD; it kept 97 % of exact's hand and 85 % of its face gains on our benchmark).")
    method = ("a global denoising loss plus hand- and face-region losses from box annotations,\n"
              "combined with Minimum Potential Delay (alpha-fair) weights, to improve hands and faces.")
    if args.region_specs:
        regions = args.regions
        method = (f"a global denoising loss plus region losses for {', '.join(name for name, _, _ in regions)}\n"
                  f"(from {', '.join(f'{column!r}' for _, _, column in regions)}), combined with Minimum Potential Delay "
                  "(alpha-fair)\nweights, to improve those regions.")
    card = f"""---
{card_metadata(args, family)}
---

# FairHuman LoRA: {repo_id}

LoRA adapters for `{args.pretrained_model_name_or_path}` trained with FairHuman (ICCV 2025,
arXiv 2507.02714): {method}
{fair_note}

Training data: `{dataset}`.

{gallery}

## Settings

| setting | value |
| --- | --- |
{table}
{scores}
{usage}
"""
    path = os.path.join(folder, "README.md")
    with open(path, "w") as f:
        f.write(card)
    return path
