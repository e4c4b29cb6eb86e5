"""The FairHuman pieces of the recipe, importable on their own.

FairHuman (ICCV 2025) trains a diffusion model on three objectives computed from ONE denoising
prediction -- the plain global loss, a hand-region loss and a face-region loss -- and combines
their gradients with alpha-fair (alpha = 2: Minimum Potential Delay) weights.

This module holds everything method-specific, as small functions without global state:

* boxes -> pixel masks: :func:`parse_box`, :func:`parse_boxes`, :func:`boxes_to_mask`, :func:`binarize_mask_image`
* the transform that moves image and masks together: :func:`paired_transform`
* pixel masks -> latent masks: :func:`masks_to_latent`
* the three objectives: :func:`fairhuman_losses`
* the alpha-fair solver: :func:`solve_fair_weights`
* per-objective gradients and their combination: :class:`ObjectiveGradients`
* the LoRA in the kohya format that ComfyUI / A1111 / Forge load: :func:`lora_to_kohya`

The training script ``train_fairhuman_lora.py`` wires them into a diffusers-style loop.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

OBJECTIVES = ("global", "hand", "face")
"""The objectives in the order used everywhere: losses, gradient rows, weights and logs."""


class AnnotationError(ValueError):
    """A dataset cell that cannot be turned into a region mask; the message names column and row."""


# ---------------------------------------------------------------------------------------------
# Boxes and masks in pixel space
# ---------------------------------------------------------------------------------------------


def parse_box(
    box, *, width: int, height: int, box_format: str = "xyxy", relative: bool = False
) -> tuple[float, float, float, float] | None:
    """One box as clipped pixel ``(x0, y0, x1, y1)``, or ``None`` when no area is left after clipping.

    ``box`` is 4 numbers, ``xyxy`` = ``(x0, y0, x1, y1)`` or ``xywh`` = ``(x0, y0, w, h)``; with
    ``relative=True`` they are fractions of the image width (x, w) and height (y, h). Raises
    ``ValueError`` (with the reason only) for anything that is not 4 finite numbers of a box with a
    non-negative width and height.
    """
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise ValueError(f"expected 4 numbers ({box_format}), got {box!r}")
    try:
        a, b, c, d = (float(v) for v in box)
    except (TypeError, ValueError):
        raise ValueError(f"expected 4 numbers ({box_format}), got {box!r}") from None
    if not all(math.isfinite(v) for v in (a, b, c, d)):
        raise ValueError(f"non-finite coordinate in {box!r}")
    if box_format == "xywh":
        if c < 0 or d < 0:
            raise ValueError(f"negative width or height in xywh box {box!r}")
        c, d = a + c, b + d
    elif box_format == "xyxy":
        if c < a or d < b:
            raise ValueError(f"x1 < x0 or y1 < y0 in xyxy box {box!r}")
    else:
        raise ValueError(f"unknown box_format {box_format!r}; expected 'xyxy' or 'xywh'")
    if relative:
        a, c = a * width, c * width
        b, d = b * height, d * height
    x0, x1 = min(max(a, 0.0), width), min(max(c, 0.0), width)
    y0, y1 = min(max(b, 0.0), height), min(max(d, 0.0), height)
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def parse_boxes(
    cell,
    *,
    width: int,
    height: int,
    box_format: str = "xyxy",
    relative: bool = False,
    column: str = "boxes",
    row: int | None = None,
) -> list[tuple[float, float, float, float]]:
    """Validate one dataset cell of boxes and return them as clipped pixel ``(x0, y0, x1, y1)``.

    ``cell`` is a list of boxes (possibly empty or ``None``), each read by :func:`parse_box`. A box
    partly outside the image is clipped to ``[0, width] x [0, height]``; a box with no area left after
    clipping (including a zero-width one) is dropped. Anything else -- not a list, not 4 finite
    numbers, a negative width or height -- raises :class:`AnnotationError` naming ``column``, ``row``
    and the box.
    """
    where = f"column '{column}'" + (f", row {row}" if row is not None else "")
    if cell is None:
        return []
    if not isinstance(cell, (list, tuple)):
        raise AnnotationError(f"{where}: expected a list of boxes, got {type(cell).__name__} {cell!r}")
    boxes = []
    for j, box in enumerate(cell):
        try:
            parsed = parse_box(box, width=width, height=height, box_format=box_format, relative=relative)
        except ValueError as error:
            raise AnnotationError(f"{where}, box {j}: {error}") from None
        if parsed is not None:
            boxes.append(parsed)
    return boxes


def boxes_to_mask(boxes: Iterable[Sequence[float]], width: int, height: int, dilation: int = 0) -> Image.Image:
    """Fill pixel boxes into a white-on-black ``L`` mask of size ``(width, height)``.

    Each box ``(x0, y0, x1, y1)`` (pixel edges, x1/y1 exclusive) covers the pixels whose centres lie
    inside it, then grows by ``dilation`` pixels on every side: the same as dilating the filled box
    with a square kernel of side ``2 * dilation`` (the authors used a 16 x 16 kernel, i.e. 8).
    """
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    for x0, y0, x1, y1 in boxes:
        left = max(int(round(x0)) - dilation, 0)
        top = max(int(round(y0)) - dilation, 0)
        right = min(int(round(x1)) + dilation, width)  # exclusive
        bottom = min(int(round(y1)) + dilation, height)
        if right > left and bottom > top:
            draw.rectangle((left, top, right - 1, bottom - 1), fill=255)
    return mask


def binarize_mask_image(mask: Image.Image, size: tuple[int, int], *, column: str, row: int | None) -> Image.Image:
    """Turn a white-on-black mask image (any PIL mode) into a 0/255 ``L`` mask of the image's ``size``.

    Pixels brighter than 127 count as inside the region. A mask whose size differs from the image's
    raises :class:`AnnotationError` naming column and row, since it cannot sit on the same pixels.
    """
    if mask.size != tuple(size):
        raise AnnotationError(
            f"column '{column}', row {row}: mask size {mask.size[0]}x{mask.size[1]} differs from the "
            f"image size {size[0]}x{size[1]}"
        )
    if mask.mode in ("RGBA", "LA", "P", "PA"):
        mask = mask.convert("RGBA").convert("RGB")
    return mask.convert("L").point(lambda v: 255 if v > 127 else 0)


# ---------------------------------------------------------------------------------------------
# One geometric transform for the image and its masks
# ---------------------------------------------------------------------------------------------


@dataclass
class TransformedExample:
    pixel_values: torch.Tensor  # (3, R, R) in [-1, 1]
    masks: torch.Tensor  # (M, R, R) in [0, 1], same geometry as pixel_values
    original_size: tuple[int, int]  # (height, width) before any transform (SDXL micro-conditioning)
    crop_top_left: tuple[int, int]  # (top, left) of the crop in the resized (and flipped) image


def paired_transform(
    image: Image.Image,
    masks: Sequence[Image.Image],
    resolution: int,
    *,
    center_crop: bool = False,
    random_flip: bool = False,
    rng: random.Random | None = None,
) -> TransformedExample:
    """Resize, crop and flip an image and its masks with ONE draw of the random parameters.

    1. resize so the shorter side is ``resolution`` (bilinear, image and masks alike);
    2. crop a ``resolution x resolution`` square: centred, or at offsets drawn once from ``rng``;
    3. with ``random_flip``, mirror left-right with probability 1/2, drawn once from ``rng``.

    The same offsets and the same flip are applied to every mask (the authors' code drew them
    separately, so masks could land on the wrong side). ``crop_top_left`` is reported in the frame of
    the returned image, so after a flip ``left = resized_width - left - resolution``.
    """
    rng = rng if rng is not None else random.Random()
    if image.mode != "RGB":
        # RGBA, LA, P (with transparency), L, CMYK, I;16 ... all become RGB; transparency onto white.
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, rgba).convert("RGB")
        elif image.mode.startswith("I"):
            array = np.asarray(image, dtype=np.float64)
            peak = max(float(array.max()), 1.0)
            image = Image.fromarray((array * (255.0 / peak)).astype(np.uint8)).convert("RGB")
        else:
            image = image.convert("RGB")
    for m in masks:
        if m.size != image.size:
            raise ValueError(f"mask size {m.size} differs from image size {image.size}")
    width, height = image.size
    scale = resolution / min(width, height)
    new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    image = image.resize((new_w, new_h), Image.BILINEAR)
    masks = [m.convert("L").resize((new_w, new_h), Image.BILINEAR) for m in masks]

    if center_crop:
        top, left = (new_h - resolution) // 2, (new_w - resolution) // 2
    else:
        top, left = rng.randint(0, new_h - resolution), rng.randint(0, new_w - resolution)
    crop = (left, top, left + resolution, top + resolution)
    image = image.crop(crop)
    masks = [m.crop(crop) for m in masks]
    if random_flip and rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
        masks = [m.transpose(Image.FLIP_LEFT_RIGHT) for m in masks]
        left = new_w - left - resolution

    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0
    if masks:
        mask_tensor = torch.from_numpy(np.stack([np.asarray(m, dtype=np.float32) / 255.0 for m in masks]))
    else:
        mask_tensor = torch.zeros(0, resolution, resolution)
    return TransformedExample(pixels, mask_tensor, (height, width), (top, left))


def masks_to_latent(masks: torch.Tensor, latent_size: tuple[int, int], mode: str = "hard") -> torch.Tensor:
    """Reduce pixel masks ``(B, M, H, W)`` in [0, 1] to the latent grid ``(B, M, h, w)``.

    Each latent cell takes the area average of the pixels it covers (``H/h`` x ``W/w`` pixels, 8 x 8
    for the Stable Diffusion VAEs). ``mode="hard"`` then thresholds at 0.5 (a cell is in the region
    when at least half of its pixels are), giving the 0/1 masks of the authors' runs;
    ``mode="soft"`` keeps the covered fraction.
    """
    reduced = F.adaptive_avg_pool2d(masks.float(), latent_size)
    if mode == "hard":
        return (reduced >= 0.5).to(reduced.dtype)
    if mode == "soft":
        return reduced
    raise ValueError(f"unknown latent mask mode {mode!r}; expected 'hard' or 'soft'")


def item_seed(seed: int, epoch: int, index: int, stream: int = 0) -> int:
    """A 63-bit seed that depends only on (run seed, epoch, dataset index, stream).

    Every random draw that belongs to one training example (crop, flip, VAE sample, noise,
    timestep) is made from generators seeded with it, so the result does not depend on how examples
    are grouped into batches, micro-batches or processes, nor on where a run was resumed. ``stream``
    separates independent uses (0: examples, 1: the epoch's shuffling order).
    """
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, index, stream]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


# ---------------------------------------------------------------------------------------------
# The three objectives
# ---------------------------------------------------------------------------------------------


def fairhuman_losses(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    hand_mask: torch.Tensor,
    face_mask: torch.Tensor,
    *,
    local_loss_scale: float = 5.0,
    normalization: str = "latent",
    sample_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The three FairHuman objectives on one prediction, as a tensor ``[L_g, L_h, L_f]``.

    With the residual ``r = model_pred - target`` (computed in fp32), masks ``M`` of shape
    ``(B, 1, h, w)`` broadcast over the latent channels, ``s = local_loss_scale`` and optional
    per-example weights ``a_b`` (Min-SNR; 1 when ``None``)::

        L_g = mean_b a_b * mean_{c,y,x} r^2

        normalization="latent" (the authors'):  L_R = mean_b a_b * mean_{c,y,x} (s * M_R * r)^2
        normalization="area":                   L_R = sum_b a_b * sum_{c,y,x} (s * M_R * r)^2
                                                      / (C * sum_b sum_{y,x} M_R)

    i.e. "latent" averages the masked error over the whole latent (a small region gives a small
    loss), "area" over the region only. An empty region gives ``L_R = 0`` and a zero gradient.
    """
    residual = model_pred.float() - target.float()
    batch, channels = residual.shape[:2]
    weights = torch.ones(batch, device=residual.device) if sample_weights is None else sample_weights.float()
    losses = [(residual.pow(2).mean(dim=(1, 2, 3)) * weights).mean()]
    for mask in (hand_mask, face_mask):
        mask = mask.to(residual.device, torch.float32)
        squared = (local_loss_scale * mask * residual).pow(2)
        if normalization == "latent":
            losses.append((squared.mean(dim=(1, 2, 3)) * weights).mean())
        elif normalization == "area":
            area = mask.sum() * channels
            total = (squared.sum(dim=(1, 2, 3)) * weights).sum()
            losses.append(total / area.clamp_min(1e-12))
        else:
            raise ValueError(f"unknown normalization {normalization!r}; expected 'latent' or 'area'")
    return torch.stack(losses)


# ---------------------------------------------------------------------------------------------
# The alpha-fair (MPD) weights
# ---------------------------------------------------------------------------------------------


def solve_fair_weights(
    gram: torch.Tensor,
    alpha: float = 2.0,
    *,
    max_iter: int = 100,
    tol: float = 1e-13,
    ridge: float = 1e-12,
) -> torch.Tensor:
    """Alpha-fair weights ``w`` for the Gram matrix ``gram = G^T G`` of K objective gradients.

    Solves, for every objective ``i`` with a non-zero gradient,

        (gram @ w)_i * w_i ** (1 / alpha) == 1,      w_i > 0

    which is the optimality condition of ``max_d sum_i u_i^(1-alpha) / (1-alpha)`` over update
    directions ``d = G w`` with ``||d|| <= eps`` and ``u_i = g_i . d`` (alpha = 2 is Minimum Potential
    Delay fairness, alpha = 1 proportional fairness). An objective whose gradient is zero
    (``gram[i, i] == 0``: no hand or no face in the batch) is left out of the solve and gets
    ``w_i = 0``.

    Method: the equation is the stationarity condition of the strictly convex

        phi(w) = 1/2 w^T H w - sum_i h(w_i),   h'(w) = w^(-1/alpha),   H = gram + ridge * diag(gram)

    so damped Newton's method (backtracking, staying inside w > 0) from the orthogonal-gradient
    solution ``w_i = H_ii^(-alpha/(alpha+1))`` converges to the unique solution in a handful of
    iterations. It is affine invariant, so badly scaled gradients cost nothing extra. The tiny
    relative ``ridge`` only matters when the gradients conflict so much that no direction improves
    all objectives (then no exact solution exists and the weights grow large instead of diverging).
    Runs in float64 on the CPU (a K x K problem); returns float64 weights on ``gram``'s device.
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    k = gram.shape[0]
    if gram.shape != (k, k):
        raise ValueError(f"gram must be a square K x K matrix, got shape {tuple(gram.shape)}")
    g = gram.detach().to("cpu", torch.float64)
    if not torch.isfinite(g).all():
        raise ValueError("gram contains non-finite values")
    g = 0.5 * (g + g.T)
    weights = torch.zeros(k, dtype=torch.float64)
    active = torch.diagonal(g) > 0
    if not active.any():
        return weights.to(gram.device)
    h = g[active][:, active]
    h = h + ridge * torch.diag(torch.diagonal(h))
    p = 1.0 / alpha

    def utility(w):  # sum_i h(w_i) with h' = w^(-p)
        return torch.log(w).sum() if p == 1.0 else (w.pow(1.0 - p) / (1.0 - p)).sum()

    def phi(w):
        return 0.5 * w @ h @ w - utility(w)

    def residual(w):  # the equation's relative error, scale free
        return torch.abs((h @ w) * w.pow(p) - 1.0).max()

    w = torch.diagonal(h).pow(-alpha / (alpha + 1.0))
    scale = w.clone()
    for _ in range(max_iter):
        grad = h @ w - w.pow(-p)
        current_residual = residual(w)
        if current_residual < tol:
            break
        hess = h + torch.diag(p * w.pow(-p - 1.0))
        # Solve in the variables w_i / w0_i: same Newton step, but a well-conditioned linear system
        # even when the weights span many orders of magnitude.
        step = -scale * torch.linalg.solve(scale[:, None] * hess * scale[None, :], scale * grad)
        # Largest step that keeps w > 0 (fraction to the boundary), then backtrack on phi.
        shrinking = step < 0
        t = 1.0
        if shrinking.any():
            t = min(1.0, 0.99 * float((-w[shrinking] / step[shrinking]).min()))
        current = phi(w)
        slope = float(grad @ step)
        # Accept a sufficient decrease of phi, or of the residual once phi's change is below its
        # rounding error (weights many orders of magnitude apart).
        while t > 1e-12:
            candidate = w + t * step
            if phi(candidate) <= current + 1e-4 * t * slope or residual(candidate) < current_residual:
                break
            t *= 0.5
        w = w + t * step
    weights[active] = w
    return weights.to(gram.device)


def fair_equation_residual(gram: torch.Tensor, weights: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    """``max_i |(gram @ w)_i * w_i^(1/alpha) - 1|`` over the objectives with ``w_i > 0``."""
    g = gram.to(torch.float64)
    w = weights.to(torch.float64)
    active = w > 0
    lhs = (g @ w)[active] * w[active].pow(1.0 / alpha)
    return (lhs - 1.0).abs().max()


# ---------------------------------------------------------------------------------------------
# Per-objective gradients and the fair combination
# ---------------------------------------------------------------------------------------------


class ObjectiveGradients:
    """K per-objective gradients of a set of parameters, held as one ``(K, P)`` fp32 buffer.

    ``accumulate(losses, ...)`` adds ``d losses[i] / d params`` to row ``i`` (one backward pass per
    objective that is present; rows of absent objectives stay zero), so the gradients of all
    micro-batches of one optimizer step are summed before the solve. ``gram()`` is ``G^T G``;
    ``write_combination(c)`` writes ``sum_i c_i g_i`` into each parameter's ``.grad``. Memory: K
    copies of the trainable parameters' gradient, nothing more.
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], num_objectives: int = len(OBJECTIVES)):
        self.params = list(params)
        sizes = [p.numel() for p in self.params]
        device = self.params[0].device
        self.buffer = torch.zeros(num_objectives, sum(sizes), dtype=torch.float32, device=device)
        self._views = []
        for row in self.buffer:
            views, offset = [], 0
            for p, n in zip(self.params, sizes):
                views.append(row[offset : offset + n].view_as(p))
                offset += n
            self._views.append(views)

    @property
    def num_objectives(self) -> int:
        return self.buffer.shape[0]

    def zero_(self) -> None:
        self.buffer.zero_()

    def accumulate(self, losses: torch.Tensor, present: Sequence[bool] | None = None, batched: bool = False) -> None:
        """Add the gradient of each ``losses[i]`` to row ``i``; skip the objectives not ``present``.

        One vector-Jacobian product per present objective. By default, separate backward passes
        (``retain_graph`` between them) that accumulate straight into row ``i``: each parameter's
        ``.grad`` is pointed at its slice of the row, so autograd adds in place and no gradient is
        copied (memory: the K rows and nothing else). With ``batched=True``, one vmapped backward
        pass (``torch.autograd.grad(..., is_grads_batched=True)``): the same numbers and one graph
        traversal, but K gradient-sized temporaries.
        """
        present = [True] * len(losses) if present is None else list(present)
        todo = [i for i, keep in enumerate(present) if keep]
        if batched and len(todo) > 1:
            rows = torch.eye(len(todo), dtype=losses.dtype, device=losses.device)
            grads = torch.autograd.grad(losses[todo], self.params, grad_outputs=rows, is_grads_batched=True,
                                        allow_unused=True)
            for n, i in enumerate(todo):
                for view, grad in zip(self._views[i], grads):
                    if grad is not None:
                        view.add_(grad[n].to(view.dtype))
            return
        saved = [p.grad for p in self.params]
        try:
            for n, i in enumerate(todo):
                for p, view in zip(self.params, self._views[i]):
                    p.grad = view
                torch.autograd.backward(losses[i], inputs=self.params, retain_graph=n < len(todo) - 1)
                for p, view in zip(self.params, self._views[i]):
                    if p.grad is not view:  # autograd replaced instead of adding in place: add it ourselves
                        view.add_(p.grad)
        finally:
            for p, grad in zip(self.params, saved):
                p.grad = grad

    def gram(self, chunk: int = 1 << 20) -> torch.Tensor:
        """``G^T G`` (K x K, float64) with ``g_i`` the rows of the buffer.

        Accumulated in float64 over column chunks of ``chunk`` elements: exact to float64 rounding
        (no TF32, no float32 accumulation over millions of terms) with only ``K * chunk`` extra numbers
        in memory, never a float64 copy of the whole buffer.
        """
        k, total = self.buffer.shape
        gram = torch.zeros(k, k, dtype=torch.float64, device=self.buffer.device)
        for start in range(0, total, chunk):
            block = self.buffer[:, start : start + chunk].to(torch.float64)
            gram += block @ block.T
        return gram

    def average_across_processes(self) -> None:
        """Average the rows over all processes (``torch.distributed``), so every process solves the same
        weights from the gradient of the global batch. A no-op in a single process."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            if world > 1:
                torch.distributed.all_reduce(self.buffer)
                self.buffer /= world

    def fair_update(self, alpha: float = 2.0, grad_scale: float = 1.0, stale: torch.Tensor | None = None) -> "FairStep":
        """Average over processes, solve the weights, write the update into ``.grad``, zero the buffer.

        The rows hold gradients of losses multiplied by ``grad_scale`` (the fp16 loss scale, 1 otherwise):
        the weights are solved on the unscaled Gram matrix (:func:`fair_coefficients`) and the update
        ``grad_scale * K * G_unscaled w`` is written, so a ``GradScaler`` unscales, checks and skips it
        exactly as it would a plain backward pass. Non-finite gradients (an overflow) give NaN
        coefficients and NaN gradients: the scaler then skips the step and lowers its scale, and
        without a scaler the caller sees a non-finite gradient norm and skips the step.

        With ``stale`` coefficients (``--fair_update_interval`` > 1, fidelity check) the update written
        is ``sum_i stale_i g_i`` and the exact solution is still returned, to compare the two.
        """
        self.average_across_processes()
        gram = self.gram() / (grad_scale**2)
        if torch.isfinite(gram).all():
            _, exact = fair_coefficients(gram, alpha)
        else:
            exact = torch.full((self.num_objectives,), float("nan"), dtype=torch.float64)
        applied = exact if stale is None else stale.to(exact)
        self.write_combination(applied)
        self.zero_()
        return FairStep(applied, exact, gram)

    def write_combination(self, coefficients: torch.Tensor) -> None:
        """Set ``param.grad = sum_i coefficients[i] * g_i`` for every parameter."""
        # row by row: one gradient-sized result and no temporary (a (1,K) @ (K,P) matmul may copy the buffer)
        coefficients = [float(c) for c in coefficients]
        combined = self.buffer[0] * coefficients[0]
        for row, c in zip(self.buffer[1:], coefficients[1:]):
            if c != 0:
                combined.add_(row, alpha=c)
        offset = 0
        for p in self.params:
            n = p.numel()
            p.grad = combined[offset : offset + n].view_as(p).to(p.dtype)  # a view: no extra copy
            offset += n


def prediction_space_gram(losses_fn, model_pred: torch.Tensor) -> torch.Tensor:
    """The Gram matrix of the objectives' gradients with respect to the PREDICTION, ``V V^T``.

    ``v_i = d losses_fn(p)_i / d p`` at ``p = model_pred`` (in fp32, on a detached copy, so no graph of
    the model is touched). The parameter gradients are ``g_i = J^T v_i`` with ``J = dp/dtheta``, so
    ``G^T G = V J J^T V^T``; where ``J J^T`` is close to a multiple ``c I`` of the identity,
    ``G^T G ~ c V V^T``. The alpha-fair solution for ``c V V^T`` has the same update DIRECTION for
    every ``c`` (scaling the Gram by ``c`` scales ``w`` by ``c^(-2 alpha/(alpha+1))`` and ``G w`` by a
    constant), and costs no backward pass through the model: ``--fair_interval_weights
    prediction`` uses it between exact solves, with ``c`` taken from the last exact solve.
    """
    pred = model_pred.detach().float().requires_grad_(True)
    with torch.enable_grad():
        losses = losses_fn(pred)
        rows = [torch.autograd.grad(losses[i], pred, retain_graph=i < len(losses) - 1)[0].flatten()
                for i in range(len(losses))]
    v = torch.stack(rows).double()
    return v @ v.T


def fair_scale(gram: torch.Tensor, approx_gram: torch.Tensor) -> float:
    """``c = trace(gram) / trace(approx_gram)``: the scalar that maps an approximate Gram onto an exact one."""
    denominator = float(torch.trace(approx_gram))
    return float(torch.trace(gram)) / denominator if denominator > 0 else 1.0


@dataclass
class FairStep:
    """One fair update: the coefficients applied to the objective gradients, the exact ones
    (``K w`` solved this step) and the unscaled Gram matrix they were solved on."""

    applied: torch.Tensor
    exact: torch.Tensor
    gram: torch.Tensor

    def fidelity(self) -> tuple[float, float]:
        """``(cosine, relative error)`` of the applied update and weights against the exact ones:
        ``cos = a^T Gram e / sqrt(a^T Gram a * e^T Gram e)`` (the cosine of ``G a`` and ``G e``) and
        ``||a - e|| / ||e||``. Both are 1 and 0 when the applied coefficients are the exact ones."""
        a, e, g = self.applied.double(), self.exact.double(), self.gram.double()
        cosine = float(a @ g @ e / torch.sqrt((a @ g @ a) * (e @ g @ e)).clamp_min(1e-300))
        return cosine, float((a - e).norm() / e.norm().clamp_min(1e-300))


def fair_coefficients(gram: torch.Tensor, alpha: float = 2.0, grad_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The fair update's coefficients on the (possibly loss-scaled) objective gradients.

    ``gram`` may come from gradients multiplied by a loss scale ``grad_scale`` (fp16 training); the
    weights are solved on the UNSCALED Gram ``gram / grad_scale^2`` because the solution is not
    scale invariant (scaling every gradient by c scales w by c^(-2 alpha / (alpha + 1))). Returns
    ``(w, K * w)``: the weights, and the coefficients of the update ``K * G w`` ("to match the sum of
    the losses", as the authors write it). ``K`` counts the objectives, present or not.
    """
    weights = solve_fair_weights(gram / (grad_scale**2), alpha=alpha)
    return weights, weights * gram.shape[0]


# ---------------------------------------------------------------------------------------------
# The LoRA file for ComfyUI / AUTOMATIC1111 / Forge (kohya format)
# ---------------------------------------------------------------------------------------------

KOHYA_KEY = re.compile(r"(lora_unet|lora_te1|lora_te2|lora_te)_([A-Za-z0-9_]+)\.(lora_down\.weight|lora_up\.weight|alpha)")
"""A kohya-format LoRA key: ``{prefix}_{module path with '.' -> '_'}.{lora_down.weight | lora_up.weight | alpha}``."""


def lora_to_kohya(
    state_dict: dict[str, torch.Tensor], alpha: float, *, prefix: str = "lora_unet", dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """One model's peft LoRA state dict in the kohya format (what ComfyUI, A1111 and Forge load).

    ``state_dict`` is what ``peft.get_peft_model_state_dict(model)`` returns: per LoRA module
    ``{path}.lora_A.weight`` (down: ``(r, in)``, or ``(r, in, k, k)`` for a conv) and
    ``{path}.lora_B.weight`` (up: ``(out, r)`` or ``(out, r, 1, 1)``). Each module becomes

        {prefix}_{path with '.' -> '_'}.lora_down.weight = lora_A
        {prefix}_{path with '.' -> '_'}.lora_up.weight   = lora_B
        {prefix}_{path with '.' -> '_'}.alpha            = alpha   (0-d float32)

    and a loader computes ``W + (alpha / r) * up @ down`` with ``r`` = the rows of ``down``: peft's
    own scale ``lora_alpha / r``, so ``alpha`` must be the LoRA alpha, not the rank (diffusers'
    ``convert_state_dict_to_kohya`` writes the rank, wrong whenever they differ). ``dtype`` casts
    the weights (the ``.alpha`` scalars stay float32, so ``alpha / r`` is exact; every loader reads
    them with ``.item()``). Raises ``ValueError`` for a key that is not a LoRA A/B weight, a module
    with only one of the two, or two module paths that give the same kohya name.
    """
    if not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a positive number, got {alpha}")
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        path, dot, kind = key.rpartition(".lora_")
        if not dot or kind not in ("A.weight", "B.weight"):
            raise ValueError(f"not a LoRA A/B weight of a peft state dict: {key!r}")
        modules.setdefault(path, {})[kind[0]] = tensor
    out: dict[str, torch.Tensor] = {}
    names: dict[str, str] = {}
    for path, pair in modules.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"module {path!r} has lora_{''.join(pair)} but not lora_{'B' if 'A' in pair else 'A'}")
        name = f"{prefix}_{path.replace('.', '_')}"
        if name in names:
            raise ValueError(f"modules {names[name]!r} and {path!r} both become {name!r}")
        names[name] = path
        down, up = pair["A"], pair["B"]
        if up.shape[1] != down.shape[0]:
            raise ValueError(f"module {path!r}: lora_B has {up.shape[1]} columns but lora_A {down.shape[0]} rows")
        out[f"{name}.lora_down.weight"] = down.detach().to(dtype or down.dtype).contiguous()
        out[f"{name}.lora_up.weight"] = up.detach().to(dtype or up.dtype).contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return out
