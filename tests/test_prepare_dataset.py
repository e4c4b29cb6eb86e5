"""Tests of prepare_fairhuman_dataset.py.

The core tests use made-up images and a stand-in detector, so they run without the optional extra.
The MediaPipe tests run the real detector on photographs that ship inside PyPI wheels
(scikit-image's astronaut.png and camera.png, matplotlib's grace_hopper.jpg; one face each); they
need ``pip install --no-deps -r requirements-prepare.txt`` and are skipped only when it is missing.
"""

import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import detector as det  # noqa: E402
import prepare_fairhuman_dataset as prep  # noqa: E402

FLOAT_BOXES = datasets.List(datasets.List(datasets.Value("float64")))
EXTRA_HINT = "needs the optional extra: pip install --no-deps -r requirements-prepare.txt"


def run(argv, detector=None):
    return prep.main(prep.parse_args([str(a) for a in argv] + ["--disable_progress_bar"]), detector=detector)


def read_metadata(folder):
    with open(Path(folder) / "metadata.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def load_imagefolder(folder):
    return datasets.load_dataset("imagefolder", data_dir=str(folder), split="train")


class FakeDetector:
    """Returns fixed detections chosen by image size; remembers the sizes it was shown."""

    def __init__(self, by_size):
        self.by_size = by_size
        self.seen = []
        self.closed = False

    def __call__(self, image):
        self.seen.append(image.size)
        return self.by_size.get(image.size, det.Detections())

    def close(self):
        self.closed = True


# ---------------------------------------------------------------------------------------------
# Boxes from masks and landmarks
# ---------------------------------------------------------------------------------------------


def flood_fill_boxes(mask):
    """Reference: 8-connected components by breadth-first search, as sorted xyxy boxes."""
    mask = np.asarray(mask, bool)
    seen = np.zeros_like(mask)
    boxes = []
    for y, x in zip(*np.nonzero(mask), strict=True):
        if seen[y, x]:
            continue
        queue, seen[y, x] = [(y, x)], True
        ys, xs = [], []
        while queue:
            cy, cx = queue.pop()
            ys.append(cy)
            xs.append(cx)
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = cy + dy, cx + dx
                    if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        boxes.append([float(min(xs)), float(min(ys)), float(max(xs) + 1), float(max(ys) + 1)])
    return sorted(boxes)


def test_mask_to_boxes_shapes():
    mask = np.zeros((20, 30), bool)
    mask[2:5, 3:6] = True  # a 3x3 square
    mask[10:12, 20:29] = True  # a bar
    mask[12, 29] = True  # touches the bar diagonally: same region
    mask[18, 0] = True  # a single pixel
    boxes, areas = prep.mask_to_boxes(mask)
    assert boxes == [[3.0, 2.0, 6.0, 5.0], [20.0, 10.0, 30.0, 13.0], [0.0, 18.0, 1.0, 19.0]]
    assert areas == [9, 19, 1]
    boxes, _ = prep.mask_to_boxes(mask, min_area=2)
    assert [0.0, 18.0, 1.0, 19.0] not in boxes and len(boxes) == 2
    assert prep.mask_to_boxes(np.zeros((5, 5), bool)) == ([], [])
    full, _ = prep.mask_to_boxes(np.ones((4, 7), bool))
    assert full == [[0.0, 0.0, 7.0, 4.0]]


def test_mask_to_boxes_matches_flood_fill_on_random_masks():
    rng = np.random.default_rng(0)
    for trial in range(40):
        shape = (int(rng.integers(1, 40)), int(rng.integers(1, 40)))
        mask = rng.random(shape) < rng.uniform(0.05, 0.6)
        boxes, areas = prep.mask_to_boxes(mask)
        assert sorted(boxes) == flood_fill_boxes(mask), f"trial {trial}"
        assert sum(areas) == mask.sum()


def test_mask_image_to_boxes_scales_thresholds_and_shrinks():
    mask = Image.new("L", (50, 40), 0)
    mask.paste(200, (10, 10, 20, 30))  # white enough
    mask.paste(100, (30, 5, 40, 15))  # below the default threshold 127
    assert prep.mask_image_to_boxes(mask, 100, 80) == [[20.0, 20.0, 40.0, 60.0]]  # scaled x2
    assert len(prep.mask_image_to_boxes(mask, 100, 80, threshold=50)) == 2
    assert prep.mask_image_to_boxes(mask, 50, 40, shrink=2) == [[12.0, 12.0, 18.0, 28.0]]
    assert prep.mask_image_to_boxes(mask, 50, 40, min_area=201) == []
    rgb = Image.merge("RGB", [mask] * 3)  # any mode is accepted
    assert prep.mask_image_to_boxes(rgb, 50, 40) == [[10.0, 10.0, 20.0, 30.0]]


def test_landmarks_to_box_pads_and_clips():
    box = det.landmarks_to_box([0.1, 0.3], [0.2, 0.6], 100, 50, padding=0.1)
    # extent x 10..30 (20 px), y 10..30 (20 px): 2 px margin on every side
    assert box == pytest.approx([8.0, 8.0, 32.0, 32.0])
    cut = det.landmarks_to_box([-0.2, 0.1], [0.5, 1.3], 100, 50, padding=0.0)
    assert cut == pytest.approx([0.0, 25.0, 10.0, 50.0])
    assert det.landmarks_to_box([1.2, 1.5], [0.1, 0.2], 100, 50, padding=0.0) is None


# ---------------------------------------------------------------------------------------------
# Command-line checks
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def dirs(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (16, 16)).save(photos / "a.png")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x.txt").write_text("x")
    return photos, tmp_path / "out", busy


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "one of the arguments --input_dir --dataset_name --preview_dataset is required"),
        (["--input_dir", "{photos}", "--dataset_name", "x", "--output_dir", "{out}"], "not allowed with argument"),
        (
            ["--input_dir", "{photos}", "--output_dir", "{out}", "--hand_mask_column", "m"],
            "--hand_mask_column only applies to --dataset_name",
        ),
        (
            ["--input_dir", "{photos}", "--output_dir", "{out}", "--objects_column", "o"],
            "--objects_column only applies to --dataset_name",
        ),
        (
            ["--dataset_name", "x", "--output_dir", "{out}"],
            "needs --hand_mask_column and/or --face_mask_column, or --objects_column",
        ),
        (
            [
                "--dataset_name",
                "x",
                "--output_dir",
                "{out}",
                "--face_mask_column",
                "m",
                "--objects_column",
                "o",
                "--hand_categories",
                "h",
            ],
            "not both",
        ),
        (
            ["--dataset_name", "x", "--output_dir", "{out}", "--objects_column", "o"],
            "--objects_column needs --hand_categories",
        ),
        (["--input_dir", "{photos}"], "--output_dir is required"),
        (["--input_dir", "{photos}", "--output_dir", "{busy}"], "exists and is not empty"),
        (["--input_dir", "{photos}", "--output_dir", "{photos}"], "is --input_dir"),
        (["--input_dir", "{out}/missing", "--output_dir", "{out}"], "is not a folder"),
        (
            ["--input_dir", "{photos}", "--output_dir", "{out}", "--min_confidence", "1.5"],
            "argument --min_confidence: must be in [0, 1], got 1.5",
        ),
        (
            ["--input_dir", "{photos}", "--output_dir", "{out}", "--preview_dir", "{out}/p"],
            "--preview_dir must not be inside",
        ),
        (["--preview_dataset", "{photos}", "--output_dir", "{out}"], "--preview_dataset only writes a preview"),
    ],
)
def test_parse_args_rejects_bad_combinations(argv, message, dirs, capsys):
    photos, out, busy = dirs
    argv = [a.format(photos=photos, out=out, busy=busy) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        prep.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_parse_args_defaults(dirs):
    photos, out, _ = dirs
    args = prep.parse_args(["--input_dir", str(photos), "--output_dir", str(out) + "/", "--push_to_hub"])
    assert args.min_confidence == 0.5 and args.face_model == "full" and args.caption_extension == ".txt"
    assert args.preview_dir == str(out) + "_preview"
    assert args.hub_dataset_id == "out"


def test_script_help_and_error_exit(tmp_path):
    script = str(ROOT / "prepare_fairhuman_dataset.py")
    help_text = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, check=True).stdout
    for group in ("Source", "Detector", "Masks", "COCO-style objects", "Output", "Preview"):
        assert group in help_text
    failed = subprocess.run([sys.executable, script, "--dataset_name", "x"], capture_output=True, text=True)
    assert failed.returncode == 2 and "needs --hand_mask_column" in failed.stderr


# ---------------------------------------------------------------------------------------------
# Folder + detector (stand-in detector: runs without the extra)
# ---------------------------------------------------------------------------------------------


def make_photo_folder(folder):
    """Made-up images: plain ones, one with an EXIF rotation, a broken one, captions, other files."""
    folder.mkdir()
    Image.new("RGB", (64, 48), (200, 120, 90)).save(folder / "a.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 60x40, shown rotated by 90 degrees: upright 40x60
    Image.new("RGB", (60, 40), (10, 200, 10)).save(folder / "b.jpg", exif=exif.tobytes())
    Image.new("L", (30, 30), 128).save(folder / "c.png")
    (folder / "broken.jpg").write_bytes(b"this is not a jpeg")
    (folder / "truncated.png").write_bytes((folder / "a.png").read_bytes()[:60])
    (folder / "notes.md").write_text("not an image")
    (folder / "a.txt").write_text("  caption from a.txt \n")
    lines = [
        {"file_name": "a.png", "text": "caption from metadata (the .txt file wins)"},
        {"file_name": "b.jpg", "text": "caption of b"},
        {"file_name": "gone.jpg", "text": "no such file"},
    ]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")


FAKE = {
    (64, 48): det.Detections(
        hand_boxes=[[1.0, 2.0, 30.0, 40.0], [40.0, 5.0, 64.0, 20.0]],
        hand_scores=[0.9, 0.8],
        face_boxes=[[10.0, 0.0, 20.0, 12.5]],
        face_scores=[0.7],
    ),
    (40, 60): det.Detections(face_boxes=[[5.0, 5.0, 35.0, 40.0]], face_scores=[0.95]),
}


def test_folder_with_stand_in_detector(tmp_path):
    photos, out = tmp_path / "photos", tmp_path / "dataset"
    make_photo_folder(photos)
    detector = FakeDetector(FAKE)
    summary = run(
        [
            "--input_dir",
            photos,
            "--output_dir",
            out,
            "--default_caption",
            "a photo",
            "--preview",
            "--save_to_disk",
            tmp_path / "saved",
        ],
        detector,
    )

    assert detector.closed
    assert sorted(detector.seen) == sorted([(64, 48), (40, 60), (30, 30)])  # b.jpg seen upright
    rows = {row["file_name"]: row for row in read_metadata(out)}
    assert set(rows) == {"a.png", "b.jpg", "c.png"}
    assert rows["a.png"] == {
        "file_name": "a.png",
        "text": "caption from a.txt",
        "hand_boxes": [[1.0, 2.0, 30.0, 40.0], [40.0, 5.0, 64.0, 20.0]],
        "face_boxes": [[10.0, 0.0, 20.0, 12.5]],
        "hand_scores": [0.9, 0.8],
        "face_scores": [0.7],
    }
    assert rows["b.jpg"]["text"] == "caption of b" and rows["b.jpg"]["face_boxes"] == [[5.0, 5.0, 35.0, 40.0]]
    assert rows["c.png"] == {
        "file_name": "c.png",
        "text": "a photo",
        "hand_boxes": [],
        "face_boxes": [],
        "hand_scores": [],
        "face_scores": [],
    }

    # Unchanged files are copied byte for byte; the rotated one is written upright without the tag.
    assert (out / "a.png").read_bytes() == (photos / "a.png").read_bytes()
    with Image.open(out / "b.jpg") as upright:
        assert upright.size == (40, 60) and upright.getexif().get(0x0112) in (None, 1)
    assert not (out / "notes.md").exists() and not (out / "a.txt").exists()

    # Unreadable images are listed, not silently dropped.
    skipped = (out / "skipped_images.txt").read_text()
    assert "broken.jpg" in skipped and "truncated.png" in skipped
    assert [Path(p).name for p, _ in summary["skipped"]] == ["broken.jpg", "truncated.png"]

    # The contract: the imagefolder loader reads it, boxes are float lists, in the image frame.
    loaded = load_imagefolder(out)
    assert len(loaded) == 3
    assert loaded.features["face_boxes"] == FLOAT_BOXES and loaded.features["hand_boxes"] == FLOAT_BOXES
    assert loaded.features["text"] == datasets.Value("string") and isinstance(loaded.features["image"], datasets.Image)
    for row in loaded:
        for x0, y0, x1, y1 in row["hand_boxes"] + row["face_boxes"]:
            assert 0 <= x0 < x1 <= row["image"].width and 0 <= y0 < y1 <= row["image"].height

    # save_to_disk: same columns, typed, images embedded (still readable without the folder).
    saved = datasets.load_from_disk(str(tmp_path / "saved"))
    assert saved.features == prep.dataset_features()
    for path in out.iterdir():
        path.unlink()
    assert saved[0]["image"].size == (64, 48) and saved[0]["hand_boxes"] == rows["a.png"]["hand_boxes"]

    assert summary["images"] == 3 and summary["images_with_hands"] == 1 and summary["images_with_faces"] == 2
    assert summary["images_with_neither"] == 1 and summary["images_with_neither_examples"] == ["c.png"]
    assert summary["hand_boxes"]["total"] == 2 and summary["hand_boxes"]["per_image_histogram"] == {
        "0": 2,
        "1": 0,
        "2": 1,
        "3+": 0,
    }
    assert summary["face_boxes"]["relative_area"]["max"] == pytest.approx(30 * 35 / (40 * 60), abs=1e-4)


def test_preview_contact_sheet_and_preview_dataset_mode(tmp_path):
    photos, out = tmp_path / "photos", tmp_path / "dataset"
    make_photo_folder(photos)
    run(["--input_dir", photos, "--output_dir", out, "--preview", "--preview_thumb_size", "128"], FakeDetector(FAKE))
    preview = tmp_path / "dataset_preview"
    sheet = np.asarray(Image.open(preview / "contact_sheet.png").convert("RGB"))
    assert sheet.shape[1] == 3 * (128 + 8)  # three images, one row
    for color in (prep.HAND_COLOR, prep.FACE_COLOR):
        assert (sheet == color).all(axis=-1).sum() > 50, f"no box drawn in {color}"
    summary = json.loads((preview / "summary.json").read_text())
    assert summary["images_with_hands"] == 1

    # --preview_dataset: reads the prepared folder back, writes nothing into it.
    before = sorted(p.name for p in out.iterdir())
    again = run(["--preview_dataset", out, "--preview_dir", tmp_path / "look"])
    assert sorted(p.name for p in out.iterdir()) == before
    assert (tmp_path / "look" / "contact_sheet.png").is_file()
    assert again == summary


def test_dataset_without_any_hand_still_has_float_box_columns(tmp_path):
    photos, out = tmp_path / "photos", tmp_path / "dataset"
    photos.mkdir()
    for index in range(3):
        Image.new("RGB", (40 + index, 30)).save(photos / f"{index}.png")
    faces = {(40, 30): det.Detections(face_boxes=[[1.0, 1.0, 9.0, 9.0]], face_scores=[0.6])}
    run(["--input_dir", photos, "--output_dir", out, "--save_to_disk", tmp_path / "saved"], FakeDetector(faces))
    assert all(row["hand_boxes"] == [] and row["hand_scores"] == [] for row in read_metadata(out))

    loaded = load_imagefolder(out)
    assert [row["hand_boxes"] for row in loaded] == [[], [], []]
    # JSON carries no type for a list that is empty in every row: the loader may give it a null
    # type; cast_box_columns restores the declared float types without touching the values.
    assert loaded.features["hand_boxes"] in (FLOAT_BOXES, datasets.List(datasets.Value("null")))
    typed = prep.cast_box_columns(loaded)
    assert typed.features["hand_boxes"] == FLOAT_BOXES
    assert typed.features["hand_scores"] == datasets.List(datasets.Value("float64"))
    assert typed.features["face_boxes"] == FLOAT_BOXES and typed[0]["face_boxes"] == [[1.0, 1.0, 9.0, 9.0]]
    assert prep.cast_box_columns(datasets.DatasetDict(train=loaded))["train"].features["hand_boxes"] == FLOAT_BOXES
    saved = datasets.load_from_disk(str(tmp_path / "saved"))
    assert saved.features["hand_boxes"] == FLOAT_BOXES  # save_to_disk / push_to_hub are typed as written


def test_push_to_hub_sends_the_typed_dataset(tmp_path, monkeypatch):
    photos, out = tmp_path / "photos", tmp_path / "my_dataset"
    make_photo_folder(photos)
    calls = []

    def fake_push(self, repo_id, **kwargs):  # stands in for the network calls
        calls.append((self, repo_id, kwargs))

    monkeypatch.setattr(datasets.Dataset, "push_to_hub", fake_push)
    run(
        [
            "--input_dir",
            photos,
            "--output_dir",
            out,
            "--push_to_hub",
            "--hub_dataset_id",
            "someone/fairhuman",
            "--hub_token",
            "hf_test",
            "--private",
        ],
        FakeDetector(FAKE),
    )
    ((dataset, repo_id, kwargs),) = calls
    assert repo_id == "someone/fairhuman" and kwargs == {"private": True, "token": "hf_test"}
    assert dataset.features == prep.dataset_features() and len(dataset) == 3
    first = dataset[0]
    assert (
        first["text"] == "caption from a.txt"
        and first["hand_scores"] == [0.9, 0.8]
        and first["image"].size == (64, 48)
    )

    calls.clear()
    run(["--input_dir", photos, "--output_dir", out, "--overwrite_output_dir", "--push_to_hub"], FakeDetector(FAKE))
    assert calls[0][1] == "my_dataset" and calls[0][2] == {"private": False, "token": None}


def test_missing_mediapipe_gives_the_install_hint(tmp_path, monkeypatch):
    for name in [n for n in sys.modules if n == "mediapipe" or n.startswith("mediapipe.")] + ["mediapipe"]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match="pip install --no-deps -r requirements-prepare.txt"):
        det.MediaPipeDetector()
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (8, 8)).save(photos / "a.png")
    with pytest.raises(ImportError, match="requirements-prepare.txt"):
        run(["--input_dir", photos, "--output_dir", tmp_path / "out"])
    assert not (tmp_path / "out").exists()  # failed before writing anything


def test_input_metadata_errors_name_the_line(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (8, 8)).save(photos / "a.png")
    (photos / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "ok"}\n{"file_name": \n')
    with pytest.raises(prep.PrepareError, match="metadata.jsonl, line 2: not valid JSON"):
        run(["--input_dir", photos, "--output_dir", tmp_path / "out"], FakeDetector({}))
    (photos / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "ok"}\n')
    with pytest.raises(prep.PrepareError, match="--caption_column 'prompt'"):
        run(["--input_dir", photos, "--output_dir", tmp_path / "out2", "--caption_column", "prompt"], FakeDetector({}))


# ---------------------------------------------------------------------------------------------
# Converters: masks and COCO-style objects
# ---------------------------------------------------------------------------------------------


def image_bytes(image, format="PNG"):
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def test_mask_columns_to_boxes(tmp_path):
    hand_mask = Image.new("L", (80, 60), 0)
    hand_mask.paste(255, (5, 10, 15, 30))
    hand_mask.paste(255, (50, 40, 70, 55))
    face_mask = Image.new("L", (40, 30), 0)  # half resolution: boxes are scaled up
    face_mask.paste(255, (10, 5, 20, 15))
    source = datasets.Dataset.from_dict(
        {
            "image": [Image.new("RGB", (80, 60), (90, 90, 200)), Image.new("RGB", (32, 32))],
            "mask_hand": [hand_mask, None],
            "mask_face": [face_mask, Image.new("L", (32, 32), 0)],
            "prompt": ["two hands and a face", None],
        },
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "mask_hand": datasets.Image(),
                "mask_face": datasets.Image(),
                "prompt": datasets.Value("string"),
            }
        ),
    )
    source.save_to_disk(str(tmp_path / "source"))
    out = tmp_path / "dataset"
    run(
        [
            "--dataset_name",
            tmp_path / "source",
            "--hand_mask_column",
            "mask_hand",
            "--face_mask_column",
            "mask_face",
            "--caption_column",
            "prompt",
            "--output_dir",
            out,
        ]
    )
    rows = read_metadata(out)
    assert rows[0] == {
        "file_name": "000000.png",
        "text": "two hands and a face",
        "hand_boxes": [[5.0, 10.0, 15.0, 30.0], [50.0, 40.0, 70.0, 55.0]],
        "face_boxes": [[20.0, 10.0, 40.0, 30.0]],
        "hand_scores": [1.0, 1.0],
        "face_scores": [1.0],
    }
    assert rows[1]["hand_boxes"] == [] and rows[1]["face_boxes"] == [] and rows[1]["text"] == ""
    loaded = load_imagefolder(out)
    assert loaded.features["hand_boxes"] == FLOAT_BOXES and loaded[0]["image"].size == (80, 60)
    assert "mask_hand" not in loaded.column_names


def test_mask_files_named_in_a_local_metadata_jsonl(tmp_path):
    """A local folder whose metadata.jsonl names mask files (`mask_hand_file_name`) loads as Image columns."""
    source = tmp_path / "source"
    (source / "masks").mkdir(parents=True)
    rows = []
    for index in range(3):
        Image.new("RGB", (64, 48), (index * 40, 90, 90)).save(source / f"p{index}.jpg")
        mask = Image.new("L", (64, 48), 0)
        mask.paste(255, (4 + index, 4, 20, 30))
        mask.save(source / "masks" / f"p{index}_hand.png")
        rows.append(
            {"file_name": f"p{index}.jpg", "mask_hand_file_name": f"masks/p{index}_hand.png", "text": f"photo {index}"}
        )
    (source / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "dataset"
    run(["--dataset_name", source, "--hand_mask_column", "mask_hand", "--output_dir", out, "--max_samples", "2"])
    written = read_metadata(out)
    assert len(written) == 2
    assert {row["text"]: row["hand_boxes"] for row in written} == {
        "photo 0": [[4.0, 4.0, 20.0, 30.0]],
        "photo 1": [[5.0, 4.0, 20.0, 30.0]],
    }
    assert all(row["face_boxes"] == [] and row["file_name"].endswith(".jpg") for row in written)


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--hand_mask_column", "mask_hands"],
            "--hand_mask_column 'mask_hands' is not a column of the dataset; its columns are ['image', 'mask_hand', 'label']",
        ),
        (["--face_mask_column", "label"], "--face_mask_column 'label' is Value('int64'), not an Image feature"),
        (["--hand_mask_column", "mask_hand", "--image_column", "picture"], "--image_column 'picture' is not a column"),
        (
            ["--hand_mask_column", "mask_hand", "--caption_column", "caption"],
            "--caption_column 'caption' is not a column",
        ),
        (["--hand_mask_column", "mask_hand", "--split", "validation"], "--split 'validation' not in"),
    ],
)
def test_converter_errors_name_the_flag_and_column(tmp_path, extra, message):
    source = datasets.Dataset.from_dict(
        {"image": [Image.new("RGB", (8, 8))], "mask_hand": [Image.new("L", (8, 8))], "label": [1]}
    )
    if "--split" in extra:
        datasets.DatasetDict(train=source).save_to_disk(str(tmp_path / "source"))
    else:
        source.save_to_disk(str(tmp_path / "source"))
    with pytest.raises(prep.PrepareError) as error:
        run(["--dataset_name", tmp_path / "source", "--output_dir", tmp_path / "out"] + extra)
    assert message in str(error.value)
    assert not (tmp_path / "out" / "metadata.jsonl").exists()


def coco_source(tmp_path):
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "text": datasets.Value("string"),
            "objects": {
                "bbox": datasets.List(datasets.List(datasets.Value("float32"))),
                "category": datasets.List(datasets.ClassLabel(names=["person", "hand", "face"])),
            },
        }
    )
    source = datasets.Dataset.from_dict(
        {
            "image": [Image.new("RGB", (100, 80)), Image.new("RGB", (50, 50))],
            "text": ["a person waving", "empty"],
            "objects": [
                {
                    "bbox": [[0, 0, 100, 80], [10, 20, 15, 10], [90, 70, 20, 20], [30, 5, 20, 25]],
                    "category": [0, 1, 1, 2],
                },
                {"bbox": [], "category": []},
            ],
        },
        features=features,
    )
    source.save_to_disk(str(tmp_path / "coco"))
    return tmp_path / "coco"


def test_coco_objects_with_class_names_and_ids(tmp_path):
    source, out = coco_source(tmp_path), tmp_path / "dataset"
    run(
        [
            "--dataset_name",
            source,
            "--objects_column",
            "objects",
            "--hand_categories",
            "hand",
            "--face_categories",
            "2",
            "--output_dir",
            out,
            "--preview",
        ]
    )
    rows = read_metadata(out)
    # xywh -> xyxy; the hand box that runs past the border is clipped to the 100x80 image
    assert rows[0]["hand_boxes"] == [[10.0, 20.0, 25.0, 30.0], [90.0, 70.0, 100.0, 80.0]]
    assert rows[0]["face_boxes"] == [[30.0, 5.0, 50.0, 30.0]] and rows[0]["text"] == "a person waving"
    assert rows[1]["hand_boxes"] == [] and rows[1]["face_boxes"] == []
    assert load_imagefolder(out).features["hand_boxes"] == FLOAT_BOXES

    with pytest.raises(
        prep.PrepareError,
        match=r"--hand_categories: 'hands' is not a class of 'objects.category'; the classes are \['person', 'hand', 'face'\]",
    ):
        run(
            [
                "--dataset_name",
                source,
                "--objects_column",
                "objects",
                "--hand_categories",
                "hands",
                "--output_dir",
                tmp_path / "o2",
            ]
        )
    with pytest.raises(prep.PrepareError, match="--objects_bbox_key 'box' is not a field of column 'objects'"):
        run(
            [
                "--dataset_name",
                source,
                "--objects_column",
                "objects",
                "--objects_bbox_key",
                "box",
                "--hand_categories",
                "hand",
                "--output_dir",
                tmp_path / "o3",
            ]
        )


def test_coco_objects_as_list_of_dicts_with_string_categories(tmp_path):
    source = datasets.Dataset.from_dict(
        {
            "image": [image_bytes(Image.new("RGB", (64, 64)), "JPEG"), image_bytes(Image.new("RGB", (64, 64)))],
            "objects": [
                [
                    {"bbox": [1.0, 2.0, 11.0, 12.0], "category": "left_hand"},
                    {"bbox": [20.0, 20.0, 40.0, 50.0], "category": "face"},
                ],
                [{"bbox": [5.0, 5.0, 6.0, 6.0], "category": "cat"}],
            ],
        },
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "objects": datasets.List(
                    {"bbox": datasets.List(datasets.Value("float64")), "category": datasets.Value("string")}
                ),
            }
        ),
    )
    source.save_to_disk(str(tmp_path / "source"))
    out = tmp_path / "dataset"
    run(
        [
            "--dataset_name",
            tmp_path / "source",
            "--objects_column",
            "objects",
            "--hand_categories",
            "left_hand",
            "right_hand",
            "--face_categories",
            "face",
            "--bbox_format",
            "xyxy",
            "--default_caption",
            "a person",
            "--output_dir",
            out,
        ]
    )
    rows = read_metadata(out)
    assert [row["file_name"] for row in rows] == ["000000.jpg", "000001.png"]  # format kept, bytes copied
    assert rows[0]["hand_boxes"] == [[1.0, 2.0, 11.0, 12.0]] and rows[0]["face_boxes"] == [[20.0, 20.0, 40.0, 50.0]]
    assert rows[1]["hand_boxes"] == [] and rows[1]["text"] == "a person"


def test_coco_bad_box_names_row_and_object(tmp_path):
    source = datasets.Dataset.from_dict(
        {
            "image": [Image.new("RGB", (20, 20))] * 2,
            "objects": [{"bbox": [[1, 1, 2, 2]], "category": [1]}, {"bbox": [[1, 1, -2, 2]], "category": [1]}],
        }
    )
    source.save_to_disk(str(tmp_path / "source"))
    with pytest.raises(
        prep.PrepareError, match=r"column 'objects', row 1, object 0: 'bbox': negative width or height in xywh box"
    ):
        run(
            [
                "--dataset_name",
                tmp_path / "source",
                "--objects_column",
                "objects",
                "--hand_categories",
                "1",
                "--output_dir",
                tmp_path / "out",
            ]
        )
    with pytest.raises(prep.PrepareError, match="holds integer ids without class names; pass ids, not 'hand'"):
        run(
            [
                "--dataset_name",
                tmp_path / "source",
                "--objects_column",
                "objects",
                "--hand_categories",
                "hand",
                "--output_dir",
                tmp_path / "out2",
            ]
        )


# ---------------------------------------------------------------------------------------------
# The real MediaPipe detector on photographs shipped inside wheels (optional extra)
# ---------------------------------------------------------------------------------------------


def bundled_file(package, *parts):
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{package} is not installed; {EXTRA_HINT}")
    path = Path(list(spec.submodule_search_locations)[0], *parts)
    assert path.is_file(), f"{path} is missing from the installed {package}"
    return path


# (package, path inside it, a point inside the face: (x, y) in pixels)
PHOTOS = {
    "astronaut.png": ("skimage", ("data", "astronaut.png"), (225, 120)),
    "camera.png": ("skimage", ("data", "camera.png"), (235, 160)),
    "grace_hopper.jpg": ("matplotlib", ("mpl-data", "sample_data", "grace_hopper.jpg"), (265, 230)),
}

mediapipe_missing = importlib.util.find_spec("mediapipe") is None
needs_mediapipe = pytest.mark.skipif(mediapipe_missing, reason=f"mediapipe is not installed; {EXTRA_HINT}")


@pytest.fixture(scope="module")
def detector():
    if mediapipe_missing:
        pytest.skip(f"mediapipe is not installed; {EXTRA_HINT}")
    with det.MediaPipeDetector() as real:
        yield real


@needs_mediapipe
def test_models_ship_inside_the_wheel():
    for parts in (
        ("modules", "face_detection", "face_detection_full_range_sparse.tflite"),
        ("modules", "palm_detection", "palm_detection_full.tflite"),
        ("modules", "hand_landmark", "hand_landmark_full.tflite"),
    ):
        bundled_file("mediapipe", *parts)


@needs_mediapipe
@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_one_face_and_no_hand_on_bundled_photos(name, detector):
    package, parts, (fx, fy) = PHOTOS[name]
    image = Image.open(bundled_file(package, *parts))
    found = detector(image)
    assert len(found.face_boxes) == 1, found
    (x0, y0, x1, y1), score = found.face_boxes[0], found.face_scores[0]
    assert x0 < fx < x1 and y0 < fy < y1
    assert 0.01 * image.width * image.height < (x1 - x0) * (y1 - y0) < 0.3 * image.width * image.height
    assert 0.5 <= score <= 1.0
    assert found.hand_boxes == [] and found.hand_scores == []  # none of these photos shows a bare hand

    mirrored = detector(image.transpose(Image.FLIP_LEFT_RIGHT))
    assert len(mirrored.face_boxes) == 1
    mx0, my0, mx1, my1 = mirrored.face_boxes[0]
    assert mx0 == pytest.approx(image.width - x1, abs=0.05 * image.width)
    assert my0 == pytest.approx(y0, abs=0.05 * image.height)


@needs_mediapipe
def test_min_confidence_is_applied():
    image = Image.open(bundled_file("skimage", "data", "astronaut.png"))
    with det.MediaPipeDetector(min_confidence=0.99, face_model="short", hand_model_complexity=0) as strict:
        assert strict(image).face_boxes == []


@needs_mediapipe
def test_hand_thresholds_reach_the_graph(monkeypatch):
    """min_confidence lands in the palm detector and hand-presence nodes (protobuf-7-safe path)."""
    original, seen = det._set_calculator_options, {}

    def spy(graph, params, options_types):
        original(graph, params, options_types)
        for node in graph.node:
            if node.name in (
                "palmdetectioncpu__TensorsToDetectionsCalculator",
                "handlandmarkcpu__ThresholdingCalculator",
            ):
                options = node.options.Extensions[options_types[node.calculator].ext]
                seen[node.name] = options.min_score_thresh if "Detections" in node.name else options.threshold
        with pytest.raises(ValueError, match="no node"):
            original(graph, {"nosuchnode.threshold": 1.0}, options_types)

    monkeypatch.setattr(det, "_set_calculator_options", spy)
    with det.MediaPipeDetector(min_confidence=0.3, hand_model_complexity=0):
        pass
    assert seen == {
        "palmdetectioncpu__TensorsToDetectionsCalculator": pytest.approx(0.3),
        "handlandmarkcpu__ThresholdingCalculator": pytest.approx(0.3),
    }


@needs_mediapipe
def test_end_to_end_on_bundled_photos_and_made_up_images(tmp_path):
    photos, out = tmp_path / "photos", tmp_path / "dataset"
    photos.mkdir()
    for name, (package, parts, _) in PHOTOS.items():
        (photos / name).write_bytes(bundled_file(package, *parts).read_bytes())
    (photos / "astronaut.txt").write_text("an astronaut in an orange suit")
    Image.new("RGB", (300, 200), (240, 240, 240)).save(photos / "blank.png")
    noise = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(noise).save(photos / "noise.png")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 not really")

    summary = run(["--input_dir", photos, "--output_dir", out, "--preview", "--save_to_disk", tmp_path / "saved"])
    rows = {row["file_name"]: row for row in read_metadata(out)}
    assert set(rows) == set(PHOTOS) | {"blank.png", "noise.png"}
    for name in PHOTOS:
        assert len(rows[name]["face_boxes"]) == 1 and len(rows[name]["face_scores"]) == 1
    assert rows["blank.png"]["face_boxes"] == [] and rows["noise.png"]["face_boxes"] == []
    assert rows["astronaut.png"]["text"] == "an astronaut in an orange suit"
    assert summary["images_with_faces"] == 3 and summary["images_with_hands"] == 0
    assert [Path(p).name for p, _ in summary["skipped"]] == ["broken.jpg"]

    loaded = prep.cast_box_columns(load_imagefolder(out))
    assert loaded.features["face_boxes"] == FLOAT_BOXES and loaded.features["hand_boxes"] == FLOAT_BOXES
    assert (tmp_path / "dataset_preview" / "contact_sheet.png").is_file()
    assert datasets.load_from_disk(str(tmp_path / "saved")).features == prep.dataset_features()


# ---------------------------------------------------------------------------------------------
# EXIF-rotated photos: prepared images and boxes agree with what the training script reads (issue 10)
# ---------------------------------------------------------------------------------------------


class ColourDetector:
    """Stand-in detector for ``conftest.marked_photo`` pictures: red regions are faces, green ones hands.
    Like the real detector it sees the image it is given (the upright one) and answers in its frame."""

    def __call__(self, image):
        pixels = np.asarray(image.convert("RGB"), dtype=np.int32)
        red = (pixels[..., 0] > 170) & (pixels[..., 1] < 90)
        green = (pixels[..., 1] > 150) & (pixels[..., 0] < 90)
        faces, _ = prep.mask_to_boxes(red, min_area=4)
        hands, _ = prep.mask_to_boxes(green, min_area=4)
        return det.Detections(face_boxes=[list(map(float, b)) for b in faces], face_scores=[1.0] * len(faces),
                               hand_boxes=[list(map(float, b)) for b in hands], hand_scores=[1.0] * len(hands))

    def close(self):
        pass


def test_exif_rotated_photos_prepared_then_trained_keep_masks_on_hands_and_faces(tmp_path, tiny_sd):
    from conftest import edge_photos, preview_ious, run_main

    photos, layouts = edge_photos(tmp_path / "photos", orientations=(6, 8))
    out = tmp_path / "prepared"
    run(["--input_dir", photos, "--output_dir", out], ColourDetector())
    rows = read_metadata(out)
    assert len(rows) == 4
    for row in rows:
        with Image.open(out / row["file_name"]) as written:  # written upright, without the tag
            assert written.getexif().get(0x0112) in (None, 1)
            face, hands = layouts[written.size]
        assert row["face_boxes"] == [pytest.approx(face, abs=1)]  # the boxes of the upright photo
        assert sorted(row["hand_boxes"]) == [pytest.approx(h, abs=1) for h in sorted(hands)]

    train_out = tmp_path / "trained"
    run_main("--pretrained_model_name_or_path", tiny_sd, "--train_data_dir", out, "--output_dir", train_out,
             "--resolution", 64, "--mask_dilation", 0, "--save_mask_previews", 4, "--max_train_steps", 1,
             "--report_to", "none", "--weighting", "global")
    for i in range(4):
        assert min(preview_ious(train_out / "mask_previews", i)) > 0.8
