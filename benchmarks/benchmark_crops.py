#!/usr/bin/env python
"""How many training examples keep their face and hands in view: aspect-ratio buckets vs square crops.

The user scenario of issue 10: 60 portraits of 300x900 (and 60 of 400x600) with the face near the top
and one or two hands near the bottom. Each mode writes the training script's mask previews of all 60
examples of epoch 0 (``--save_mask_previews 60`` at ``--resolution`` 512 and 1024 with 64 px bucket
steps = SD 1.5's and SDXL's geometry; the script's own data check, buckets, dataset and order, no model);
the counts are read off the previews: a region is "kept" when at least half of its box area is in the
example (``--mask_dilation 0``, so a mask is exactly its boxes).

    python benchmarks/benchmark_crops.py            # prints the tables pasted into RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train_fairhuman_lora as train  # noqa: E402

MODES = {
    "buckets (default)": [],
    "buckets --center_crop": ["--center_crop"],
    "--square_crop (random)": ["--square_crop"],
    "--square_crop --center_crop": ["--square_crop", "--center_crop"],
}


def build_portraits(folder: str, size: tuple[int, int], n: int = 60, seed: int = 0) -> list[dict]:
    """Drawn portraits: the face in the top 20 % of the picture, one or two hands in the bottom 15 %."""
    rng = random.Random(seed)
    os.makedirs(folder, exist_ok=True)
    w, h = size
    rows = []
    for i in range(n):
        image = Image.new("RGB", size, tuple(rng.randint(60, 200) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        fw = rng.randint(w // 4, w // 3)
        fx, fy = rng.randint(0, w - fw), rng.randint(0, h // 20)
        face = [fx, fy, fx + fw, fy + int(fw * 1.3)]
        hands = []
        for _ in range(rng.randint(1, 2)):
            hw = rng.randint(w // 7, w // 5)
            hx, hy = rng.randint(0, w - hw), rng.randint(h - h // 7, h - hw)
            hands.append([hx, hy, hx + hw, hy + hw])
        for box in [face, *hands]:
            draw.ellipse(box, fill=(225, 170, 130))
        name = f"p{i:03d}.png"
        image.save(os.path.join(folder, name))
        rows.append({"file_name": name, "text": "a photo of a person", "face_boxes": [face], "hand_boxes": hands})
    with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


def write_previews(argv: list[str], out: str, step: int) -> list[int]:
    """Write the script's mask previews (``--save_mask_previews``) the way ``main`` does -- the same data
    check, buckets, dataset and epoch-0 order -- without loading a model (at 512 px a training step of the
    tiny model is needlessly slow on a CPU). Returns the rows the previews show, in order."""
    args = train.parse_args(argv)
    train.check_args(args)
    checked = train.check_dataset(train.load_training_dataset(args), args)
    _, example_sizes, bucket_rows = train.plan_buckets(checked, args, step)
    loss = train.crop_statistics(checked, args, example_sizes, args.seed)
    dataset = train.FairHumanDataset(checked, args, args.seed, example_sizes, keep_regions=not args.square_crop)
    sampler = train.BucketBatchSampler(bucket_rows, args.train_batch_size, args.gradient_accumulation_steps, args.seed)
    keys = [key for batch in sampler.global_batches(0) for key in batch][: args.save_mask_previews]
    train.save_mask_previews(dataset, keys, os.path.join(out, "mask_previews"))
    return [row for _, row, _ in keys], loss


def measure(data: str, rows: list[dict], size, out: str, flags: list[str], resolution: int) -> dict:
    argv = ["--pretrained_model_name_or_path", "unused", "--train_data_dir", data, "--output_dir", out,
            "--resolution", str(resolution), "--mask_dilation", "0", "--save_mask_previews", str(len(rows)), "--seed", "0",
            *flags]
    order, loss = write_previews(argv, out, step=64)  # 64 px: SD's and SDXL's granularity (VAE 8 x UNet 8)
    counts = {"both": 0, "face only": 0, "hands only": 0, "neither": 0}
    kept_area = total_area = 0.0
    for i, row in enumerate(order):
        previews = os.path.join(out, "mask_previews")
        face = np.asarray(Image.open(os.path.join(previews, f"{i}_face.png")), np.float64) / 255
        hand = np.asarray(Image.open(os.path.join(previews, f"{i}_hand.png")), np.float64) / 255
        scale2 = max(face.shape[1] / size[0], face.shape[0] / size[1]) ** 2  # the resize that covers the example
        face_area = sum((b[2] - b[0]) * (b[3] - b[1]) for b in rows[row]["face_boxes"]) * scale2
        hand_area = sum((b[2] - b[0]) * (b[3] - b[1]) for b in rows[row]["hand_boxes"]) * scale2
        face_kept, hand_kept = face.sum() >= 0.5 * face_area, hand.sum() >= 0.5 * hand_area
        counts["both" if face_kept and hand_kept else "face only" if face_kept else
               "hands only" if hand_kept else "neither"] += 1
        kept_area += min(face.sum(), face_area) + min(hand.sum(), hand_area)
        total_area += face_area + hand_area
    counts["box area kept"] = f"{100 * kept_area / total_area:.0f} %"
    counts["example"] = f"{face.shape[1]}x{face.shape[0]}"
    counts["logged"] = f"{loss['lose_some']} lose area, {loss['lose_region']} a whole region"
    return counts


def main(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_images", type=int, default=60)
    args = parser.parse_args(input_args)
    with tempfile.TemporaryDirectory() as tmp:
        for size in [(300, 900), (400, 600)]:
            data = os.path.join(tmp, f"data{size[0]}x{size[1]}")
            rows = build_portraits(data, size, args.num_images)
            for resolution, model in ((512, "SD 1.5"), (1024, "SDXL")):
                print(f"\n{args.num_images} portraits of {size[0]}x{size[1]}, face near the top, hands near the bottom, "
                      f"{model} geometry ({resolution} px, 64 px steps)")
                print("| mode | example | face and a hand | face only | hands only | neither | box area kept | "
                      "the script's log (epoch 0) |")
                print("| --- | --- | --- | --- | --- | --- | --- | --- |")
                for name, flags in MODES.items():
                    out = os.path.join(tmp, "out", f"{resolution}_{name.replace(' ', '_')}")
                    c = measure(data, rows, size, out, flags, resolution)
                    print(f"| {name} | {c['example']} | {c['both']} | {c['face only']} | {c['hands only']} | "
                          f"{c['neither']} | {c['box area kept']} | {c['logged']} |", flush=True)


if __name__ == "__main__":
    main()
