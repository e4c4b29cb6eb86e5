"""Unit tests of the FairHuman pieces in fairhuman_utils.py."""

import os
import random

import numpy as np
import pytest
import torch
from conftest import KOHYA_KEY, objective_rows, three_objective_model
from PIL import Image, ImageDraw

import fairhuman_utils as fh

# ---- boxes ---------------------------------------------------------------------------------------


def test_parse_boxes_formats_clip_and_drop():
    assert fh.parse_boxes([[10, 20, 30, 40]], width=100, height=50) == [(10, 20, 30, 40)]
    assert fh.parse_boxes([[10, 20, 5, 6]], width=100, height=50, box_format="xywh") == [(10, 20, 15, 26)]
    assert fh.parse_boxes([[0.1, 0.2, 0.5, 1.0]], width=200, height=100, relative=True) == [(20, 20, 100, 100)]
    # partly outside: clipped; wholly outside or zero-area: dropped
    assert fh.parse_boxes([[-10, -5, 30, 80]], width=100, height=50) == [(0, 0, 30, 50)]
    assert fh.parse_boxes([[120, 10, 150, 20], [5, 5, 5, 9]], width=100, height=50) == []
    assert fh.parse_boxes([], width=10, height=10) == [] and fh.parse_boxes(None, width=10, height=10) == []


@pytest.mark.parametrize(
    "cell, fmt, expected",
    [
        ("10,20,30,40", "xyxy", "expected a list of boxes"),
        ([[1, 2, 3]], "xyxy", "box 0: expected 4 numbers"),
        ([[1, 2, 3, "a"]], "xyxy", "expected 4 numbers"),
        ([[0, 0, 5, 5], [30, 10, 20, 40]], "xyxy", "box 1: x1 < x0"),
        ([[0, 0, -5, 5]], "xywh", "negative width"),
        ([[0, 0, float("nan"), 5]], "xyxy", "non-finite"),
    ],
)
def test_parse_boxes_malformed_names_column_and_row(cell, fmt, expected):
    with pytest.raises(fh.AnnotationError) as info:
        fh.parse_boxes(cell, width=100, height=100, box_format=fmt, column="hand_boxes", row=7)
    assert "column 'hand_boxes', row 7" in str(info.value) and expected in str(info.value)


def test_boxes_to_mask_fills_and_dilates():
    mask = np.asarray(fh.boxes_to_mask([(10, 20, 30, 25)], 64, 48, dilation=0)) > 0
    assert mask.sum() == 20 * 5 and mask[20:25, 10:30].all()
    dilated = np.asarray(fh.boxes_to_mask([(10, 20, 30, 25)], 64, 48, dilation=8)) > 0
    assert dilated.sum() == (20 + 16) * (5 + 16) and dilated[12:33, 2:38].all()
    edge = np.asarray(fh.boxes_to_mask([(0, 0, 4, 4)], 64, 48, dilation=8)) > 0
    assert edge.sum() == 12 * 12  # clipped at the image border


def test_binarize_mask_image_modes_and_size_check():
    rgba = Image.new("RGBA", (8, 6), (0, 0, 0, 255))
    ImageDraw.Draw(rgba).rectangle((2, 1, 4, 3), fill=(255, 255, 255, 255))
    out = np.asarray(fh.binarize_mask_image(rgba, (8, 6), column="m", row=0))
    assert set(np.unique(out)) == {0, 255} and (out > 0).sum() == 9
    with pytest.raises(fh.AnnotationError, match="column 'm', row 3: mask size 8x6 differs"):
        fh.binarize_mask_image(rgba, (9, 6), column="m", row=3)


# ---- paired transform ------------------------------------------------------------------------------


def _marked_image(width, height, box):
    """Black image with a pure red box, and the box as a mask: the two must stay on the same pixels."""
    image = Image.new("RGB", (width, height), (0, 0, 0))
    ImageDraw.Draw(image).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=(255, 0, 0))
    return image, fh.boxes_to_mask([box], width, height, dilation=0)


@pytest.mark.parametrize("size, box", [((160, 64), (12, 8, 40, 40)), ((64, 160), (8, 100, 40, 150))])
def test_masks_follow_crop_and_flip_on_non_square_images(size, box):
    image, mask = _marked_image(*size, box)
    offsets, visible = set(), 0
    for seed in range(24):
        out = fh.paired_transform(image, [mask], 32, random_flip=True, rng=random.Random(seed))
        red = (out.pixel_values[0] > 0.0) & (out.pixel_values[1] < 0.0)
        inside = out.masks[0] > 0.5
        visible += bool(red.any())
        assert torch.equal(red, inside), f"seed {seed}: mask and image disagree"
        offsets.add(out.crop_top_left)
    assert len(offsets) > 5 and visible > 5  # the crops really vary and the region is often in view
    assert out.original_size == (size[1], size[0])


def test_independent_augmentation_would_be_caught():
    """Guard on the test above: drawing crop/flip separately for the mask misplaces it."""
    image, mask = _marked_image(160, 64, (12, 8, 40, 40))
    mismatches = 0
    for seed in range(24):
        a = fh.paired_transform(image, [], 32, random_flip=True, rng=random.Random(seed))
        b = fh.paired_transform(mask.convert("RGB"), [], 32, random_flip=True, rng=random.Random(seed + 1000))
        red = (a.pixel_values[0] > 0.0) & (a.pixel_values[1] < 0.0)
        mismatches += not torch.equal(red, b.pixel_values[0] > 0.0)
    assert mismatches > 0


def test_paired_transform_center_crop_and_pil_modes():
    image = Image.new("P", (100, 50))
    out = fh.paired_transform(image, [Image.new("L", (100, 50))], 20, center_crop=True)
    assert out.pixel_values.shape == (3, 20, 20) and out.masks.shape == (1, 20, 20)
    assert out.crop_top_left == (0, 10) and out.original_size == (50, 100)  # resized to 40x20, centred
    rgba = Image.new("RGBA", (30, 30), (0, 0, 0, 0))  # transparent -> white
    assert torch.allclose(fh.paired_transform(rgba, [], 16).pixel_values, torch.ones(3, 16, 16))
    gray16 = Image.fromarray(np.full((20, 20), 1000, dtype=np.uint16))
    assert fh.paired_transform(gray16, [], 16).pixel_values.shape == (3, 16, 16)


def test_crop_left_is_reported_in_the_returned_frame():
    ramp = np.zeros((20, 40, 3), dtype=np.uint8)
    ramp[..., 0] = (np.arange(40) * 6)[None, :]  # red encodes the column
    image = Image.fromarray(ramp)
    seen = set()
    for seed in range(30):
        out = fh.paired_transform(image, [], 20, random_flip=True, rng=random.Random(seed))
        first_column_red = round(float((out.pixel_values[0, 0, 0] + 1) * 127.5) / 6)
        top, left = out.crop_top_left
        flipped = first_column_red != left
        seen.add(flipped)
        assert first_column_red == (39 - left if flipped else left)
    assert seen == {True, False}


def test_masks_to_latent_hard_and_soft():
    masks = torch.zeros(1, 1, 16, 16)
    masks[..., 0:8, 0:4] = 1.0  # half of the top-left 8x8 cell
    masks[..., 8:16, 8:16] = 1.0  # a whole cell
    soft = fh.masks_to_latent(masks, (2, 2), "soft")
    assert torch.allclose(soft[0, 0], torch.tensor([[0.5, 0.0], [0.0, 1.0]]))
    hard = fh.masks_to_latent(masks, (2, 2), "hard")
    assert torch.equal(hard[0, 0], torch.tensor([[1.0, 0.0], [0.0, 1.0]]))


def test_item_seed_depends_only_on_its_inputs():
    assert fh.item_seed(1, 2, 3) == fh.item_seed(1, 2, 3)
    assert len({fh.item_seed(1, 2, 3), fh.item_seed(1, 2, 4), fh.item_seed(1, 3, 3), fh.item_seed(2, 2, 3),
                fh.item_seed(1, 2, 3, stream=1)}) == 5


# ---- losses --------------------------------------------------------------------------------------


def test_losses_match_hand_computed_values():
    pred = torch.zeros(2, 1, 2, 2)
    target = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[0.0, 0.0], [0.0, 2.0]]]])
    hand = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    face = torch.tensor([[[[0.0, 0.0], [0.0, 1.0]]], [[[0.0, 0.0], [0.0, 1.0]]]])
    # r = -target. global: (1+4+9+16)/4 = 7.5 and 4/4 = 1 -> 4.25
    latent = fh.fairhuman_losses(pred, target, hand, face, local_loss_scale=5.0, normalization="latent")
    assert torch.allclose(latent, torch.tensor([4.25, (25 * 1 / 4 + 0) / 2, (25 * 16 / 4 + 25 * 4 / 4) / 2]))
    area = fh.fairhuman_losses(pred, target, hand, face, local_loss_scale=5.0, normalization="area")
    assert torch.allclose(area, torch.tensor([4.25, 25 * 1 / 1, (25 * 16 + 25 * 4) / 2]))
    weighted = fh.fairhuman_losses(pred, target, hand, face, sample_weights=torch.tensor([2.0, 0.0]))
    assert torch.allclose(weighted[0], torch.tensor(7.5))
    empty = fh.fairhuman_losses(pred, target, torch.zeros_like(hand), face, normalization="area")
    assert empty[1] == 0


def test_empty_region_gives_zero_gradient():
    pred = torch.randn(2, 4, 3, 3, requires_grad=True)
    losses = fh.fairhuman_losses(pred, torch.randn(2, 4, 3, 3), torch.zeros(2, 1, 3, 3), torch.ones(2, 1, 3, 3))
    (grad,) = torch.autograd.grad(losses[1], pred)
    assert losses[1] == 0 and torch.count_nonzero(grad) == 0


# ---- the alpha-fair solver -----------------------------------------------------------------------


def _gram(rows):
    g = torch.stack(rows).double()
    return g @ g.T


@pytest.mark.parametrize("alpha", [2.0, 1.0, 3.0])
@pytest.mark.parametrize("case", ["random", "badly_scaled", "nearly_parallel"])
def test_solver_meets_its_equation(case, alpha):
    torch.manual_seed(0)
    g = torch.randn(3, 2000, dtype=torch.float64)
    if case == "badly_scaled":
        g = g * torch.tensor([[1e-4], [1.0], [1e4]], dtype=torch.float64)
    if case == "nearly_parallel":
        g = torch.stack([g[0], 3.0 * g[0] + 1e-4 * g[1], 0.2 * g[0] + 1e-4 * g[2]])
    gram = g @ g.T
    w = fh.solve_fair_weights(gram, alpha=alpha)
    assert (w > 0).all()
    lhs = (gram @ w) * w.pow(1.0 / alpha)
    assert torch.allclose(lhs, torch.ones(3, dtype=torch.float64), rtol=1e-8, atol=0)
    assert fh.fair_equation_residual(gram, w, alpha) < 1e-8


def test_solver_orthogonal_closed_form_and_scaling_law():
    gram = torch.diag(torch.tensor([4.0, 1.0, 0.25], dtype=torch.float64))
    w = fh.solve_fair_weights(gram, alpha=2.0)
    assert torch.allclose(w, torch.diagonal(gram).pow(-2.0 / 3.0))  # w_i = |g_i|^(-4/3)
    torch.manual_seed(1)
    g = torch.randn(3, 50, dtype=torch.float64)
    gram = g @ g.T
    c = 7.0
    w1, wc = fh.solve_fair_weights(gram), fh.solve_fair_weights(gram * c**2)
    assert torch.allclose(wc, w1 * c ** (-4.0 / 3.0), rtol=1e-8)  # not scale invariant: METHOD.md section 3


def test_solver_leaves_out_zero_gradient_objectives():
    torch.manual_seed(2)
    g = torch.randn(3, 40, dtype=torch.float64)
    g[1] = 0
    w = fh.solve_fair_weights(g @ g.T)
    assert w[1] == 0 and (w[[0, 2]] > 0).all()
    w2 = fh.solve_fair_weights(_gram([g[0], g[2]]))
    assert torch.allclose(w[[0, 2]], w2)
    assert torch.equal(fh.solve_fair_weights(torch.zeros(3, 3)), torch.zeros(3, dtype=torch.float64))


def test_solver_improves_every_objective_and_favours_the_slow_one():
    torch.manual_seed(3)
    g = torch.randn(3, 100, dtype=torch.float64)
    g[0] *= 10  # a dominant objective
    w = fh.solve_fair_weights(g @ g.T)
    u = g @ (g.T @ w)  # improvement rates u_i = g_i . d
    assert (u > 0).all()
    assert w[0] < w[1] and w[0] < w[2]


def test_fair_coefficients_ignore_the_loss_scale():
    torch.manual_seed(4)
    g = torch.randn(3, 64, dtype=torch.float64)
    gram = g @ g.T
    w, coeffs = fh.fair_coefficients(gram, 2.0)
    for scale in (2.0**10, 2.0**16):
        ws, cs = fh.fair_coefficients(gram * scale**2, 2.0, grad_scale=scale)
        assert torch.allclose(ws, w) and torch.allclose(cs, 3 * w)


# ---- per-objective gradients and their combination ------------------------------------------------


def test_objective_gradients_combination_equals_K_G_w_on_a_small_model():
    params, losses = three_objective_model(5)

    grads = fh.ObjectiveGradients(params)
    grads.accumulate(losses())
    assert all(p.grad is None for p in params)  # accumulated into the rows, .grad left as it was
    expected_rows = []
    for i in range(3):
        gi = torch.autograd.grad(losses()[i], params)
        expected_rows.append(torch.cat([t.reshape(-1) for t in gi]))
    G = torch.stack(expected_rows)
    assert torch.allclose(objective_rows(grads), G)
    assert torch.allclose(grads.gram(), (G @ G.T).double(), rtol=1e-5)
    w, coeffs = fh.fair_coefficients(grads.gram())
    grads.write_combination(coeffs)
    combined = torch.cat([p.grad.reshape(-1) for p in params]).double()
    expected = 3 * (w @ G.double())  # in float64: the float32 combination may differ by rounding only
    assert (combined - expected).abs().max() <= 1e-6 * expected.abs().max()

    # accumulation sums micro-batch gradients; absent objectives cost no backward and stay zero
    grads.zero_()
    grads.accumulate(losses(), present=[True, False, True])
    grads.accumulate(losses(), present=[True, False, True])
    assert torch.allclose(objective_rows(grads)[0], 2 * G[0]) and torch.count_nonzero(objective_rows(grads)[1]) == 0


# ---- cheaper fair modes ----------------------------------------------------------------------------


def test_batched_backward_gives_the_same_rows():
    params, losses = three_objective_model(6)
    separate, batched = fh.ObjectiveGradients(params), fh.ObjectiveGradients(params)
    separate.accumulate(losses(), present=[True, False, True])
    batched.accumulate(losses(), present=[True, False, True], batched=True)
    torch.testing.assert_close(objective_rows(batched), objective_rows(separate))
    assert torch.count_nonzero(objective_rows(batched)[1]) == 0


def test_prediction_space_gram_is_exact_when_the_model_is_the_prediction():
    """With p = theta (J = I) the parameter Gram equals V V^T, so the weights are exact."""
    torch.manual_seed(7)
    theta = torch.nn.Parameter(torch.randn(2, 4, 3, 3))
    target = torch.randn(2, 4, 3, 3)
    hand = (torch.rand(2, 1, 3, 3) > 0.5).float()
    face = (torch.rand(2, 1, 3, 3) > 0.7).float()

    def loss_fn(pred):
        return fh.fairhuman_losses(pred, target, hand, face, local_loss_scale=5.0)

    grads = fh.ObjectiveGradients([theta])
    grads.accumulate(loss_fn(theta))
    exact = grads.gram()
    approx = fh.prediction_space_gram(loss_fn, theta)
    torch.testing.assert_close(approx, exact, rtol=1e-5, atol=1e-12)
    for mode in fh.GRAM_CALIBRATIONS:
        torch.testing.assert_close(fh.prediction_gram_calibration(exact, approx, mode), torch.ones(3, dtype=torch.float64))
        torch.testing.assert_close(fh.prediction_gram_calibration(4 * exact, approx, mode), torch.full((3,), 4.0, dtype=torch.float64))


def test_diagonal_calibration_recovers_per_objective_reach():
    """p = J theta with J J^T = diag(a) reaching the hand pixels 9x more strongly: the diagonal
    calibration gives the exact Gram (and weights) when the objectives live on disjoint pixels;
    the trace calibration gives the region objective the wrong weight."""
    n = 12
    reach = torch.ones(n, dtype=torch.float64)
    reach[:4] = 9.0  # the 'hand' pixels
    v = torch.zeros(2, n, dtype=torch.float64)
    v[0, 4:] = torch.linspace(0.5, 1.5, 8, dtype=torch.float64)  # 'global' objective on the other pixels
    v[1, :4] = 0.3  # 'hand' objective
    exact = v @ torch.diag(reach) @ v.T  # G^T G = V J J^T V^T
    approx = v @ v.T
    diagonal = fh.prediction_gram_calibration(exact, approx, "diagonal")
    torch.testing.assert_close(diagonal, torch.tensor([1.0, 9.0], dtype=torch.float64))
    torch.testing.assert_close(fh.calibrated_gram(approx, diagonal), exact)
    w_exact = fh.solve_fair_weights(exact)
    w_trace = fh.solve_fair_weights(fh.calibrated_gram(approx, fh.prediction_gram_calibration(exact, approx, "trace")))
    # the scalar calibration's bias: the hand/global weight ratio is off by more than 20 %
    assert abs((w_trace[1] / w_trace[0]) / (w_exact[1] / w_exact[0]) - 1) > 0.2
    # an objective absent at the solve keeps its previous scale
    absent = approx.clone()
    absent[1, :] = absent[:, 1] = 0
    kept = fh.prediction_gram_calibration(exact * (absent != 0), absent, "diagonal", previous=diagonal)
    torch.testing.assert_close(kept, diagonal)
    with pytest.raises(ValueError, match="unknown calibration"):
        fh.prediction_gram_calibration(exact, approx, "nope")


def test_fair_step_fidelity():
    gram = torch.diag(torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64))
    exact = torch.tensor([1.0, 0.5, 0.2], dtype=torch.float64)
    same = fh.FairStep(exact, exact, gram)
    assert same.fidelity() == pytest.approx((1.0, 0.0))
    off = fh.FairStep(torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), exact, gram)
    cosine, error = off.fidelity()
    # G a = (1, 0, 0) scaled; G e components sqrt(diag) * e = (1, 1, 0.6): cos = 1 / sqrt(1 + 1 + 0.36)
    assert cosine == pytest.approx(1 / np.sqrt(2.36)) and error == pytest.approx(np.sqrt(0.29) / np.sqrt(1.29))
    assert same.weight_ratios() == pytest.approx([1.0, 1.0, 1.0])
    half = fh.FairStep(torch.tensor([1.0, 0.25, 0.0], dtype=torch.float64), torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64), gram)
    ratios = half.weight_ratios()
    assert ratios[:2] == pytest.approx([1.0, 0.5]) and np.isnan(ratios[2])  # absent objective: no ratio


# ---- images upright, aspect-ratio buckets, region-safe crops (issue 10) --------------------------------


@pytest.mark.parametrize("orientation", [6, 8])
def test_open_image_applies_the_exif_orientation(orientation, tmp_path):
    from conftest import marked_photo

    path = tmp_path / "photo.jpg"
    upright = marked_photo(path, (30, 50), face=(5, 2, 25, 14), hands=[(0, 40, 8, 50)], orientation=orientation)
    with Image.open(path) as raw:
        assert raw.size == (50, 30)  # stored sideways
    image = fh.open_image(str(path))
    assert image.size == (30, 50) and image.info["exif_orientation"] == orientation
    assert np.abs(np.asarray(image, np.int32) - np.asarray(upright, np.int32)).mean() < 4  # JPEG noise only
    assert fh.image_size(str(path)) == (30, 50)
    assert fh.image_size({"path": None, "bytes": path.read_bytes()}) == (30, 50)
    again = fh.open_image(image)  # already upright (as datasets decodes it): not rotated twice
    assert again.size == (30, 50)


def test_bucket_granularity_and_sdxl_buckets():
    assert fh.bucket_granularity((128, 256, 512, 512), (320, 640, 1280, 1280)) == 64  # SD 1.5 / SDXL-like
    assert fh.bucket_granularity((32, 64), (32, 64)) == 4  # the tiny test models
    buckets = fh.make_buckets(1024, 64)
    assert {(1024, 1024), (896, 1152), (1152, 896), (832, 1216), (512, 2048), (2048, 512)} <= set(buckets)
    assert buckets == sorted(buckets, key=lambda b: b[0] / b[1])
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0 and max(w, h) <= 4 * min(w, h)
        assert abs(w * h - 1024**2) <= 64 * max(w, h) / 2 and abs(w * h / 1024**2 - 1) < 0.1  # about 1024^2 pixels
        assert (h, w) in buckets  # portrait and landscape alike
    narrow = fh.make_buckets(1024, 64, max_aspect_ratio=2.0)
    assert max(max(w, h) / min(w, h) for w, h in narrow) <= 2 and (512, 2048) not in narrow


def test_assign_bucket_takes_the_closest_aspect_ratio():
    buckets = fh.make_buckets(1024, 64)
    assert buckets[fh.assign_bucket((300, 900), buckets)] == (576, 1728)  # 1:3
    assert buckets[fh.assign_bucket((900, 300), buckets)] == (1728, 576)
    assert buckets[fh.assign_bucket((3000, 4000), buckets)] == (896, 1152)  # 3:4 photo
    assert buckets[fh.assign_bucket((500, 500), buckets)] == (1024, 1024)
    assert buckets[fh.assign_bucket((100, 1000), buckets)] == (512, 2048)  # beyond 4:1: the extreme bucket


def test_resize_crop_plan_covers_the_target_and_keeps_the_regions_inside():
    # 2:3 portrait into 832x1280: resized 853x1280, 21 columns left over
    plan = fh.resize_crop_plan((400, 600), (832, 1280), rng=random.Random(0))
    assert plan.resized == (853, 1280) and plan.crop_top_left[0] == 0 and 0 <= plan.crop_top_left[1] <= 21
    lefts = {fh.resize_crop_plan((400, 600), (832, 1280), rng=random.Random(seed)).crop_top_left[1] for seed in range(40)}
    assert len(lefts) > 10  # without regions: any offset
    # a region touching the left edge: every draw keeps it (offset 0); touching the right edge: offset 21
    edge_boxes = [(0, 10, 50, 60), (350, 10, 400, 60)]
    for seed in range(20):
        left = fh.resize_crop_plan((400, 600), (832, 1280), keep=edge_boxes[:1], rng=random.Random(seed))
        right = fh.resize_crop_plan((400, 600), (832, 1280), keep=edge_boxes[1:], rng=random.Random(seed))
        assert left.crop_top_left == (0, 0) and right.crop_top_left == (0, 21)
        kept, total = fh.box_area_kept(edge_boxes, (400, 600), left)
        assert kept < total  # one plan cannot keep both edges of this image ...
        assert fh.box_area_kept(edge_boxes[:1], (400, 600), left) == pytest.approx((total / 2, total / 2))  # ... its own
        inner = fh.resize_crop_plan((400, 600), (832, 1280), keep=[(100, 10, 300, 60)], rng=random.Random(seed))
        assert fh.box_area_kept([(100, 10, 300, 60)], (400, 600), inner)[0] == pytest.approx(
            fh.box_area_kept([(100, 10, 300, 60)], (400, 600), inner)[1])
    # when the regions cannot all be kept, as many as possible (each box alike): the small hand at the
    # bottom is kept whole rather than cutting both ends
    face, hand = (100, 0, 200, 130), (150, 840, 190, 900)
    plan = fh.resize_crop_plan((300, 900), (320, 896), keep=[face, hand], rng=random.Random(0))
    assert plan.resized == (320, 960)
    kept_face = fh.box_area_kept([face], (300, 900), plan)
    kept_hand = fh.box_area_kept([hand], (300, 900), plan)
    assert kept_hand[0] == pytest.approx(kept_hand[1]) and kept_face[0] >= 0.5 * kept_face[1]
    # the diffusers square crop of the same portrait ignores the regions: the centre loses both
    centred = fh.resize_crop_plan((300, 900), (512, 512), center_crop=True)
    assert centred.resized == (512, 1536) and centred.crop_top_left == (512, 0)
    assert fh.box_area_kept([face, hand], (300, 900), centred)[0] == 0


def test_paired_transform_into_a_bucket_keeps_edge_boxes_and_their_masks():
    image, mask = _marked_image(64, 96, (0, 0, 20, 12))  # a region in the top-left corner
    other = fh.boxes_to_mask([(50, 84, 64, 96)], 64, 96)  # and one in the bottom-right corner
    for seed in range(10):
        out = fh.paired_transform(image, [mask, other], (52, 80), random_flip=True, rng=random.Random(seed),
                                  keep=[(0, 0, 20, 12), (50, 84, 64, 96)])
        assert out.pixel_values.shape == (3, 80, 52) and out.masks.shape == (2, 80, 52)
        assert out.target_size == (80, 52) and out.original_size == (96, 64)
        red = (out.pixel_values[0] > 0.0) & (out.pixel_values[1] < 0.0)
        assert torch.equal(red, out.masks[0] > 0.5)
        # both corner regions fully in view: their area is the original's times the scale squared
        scale = 80 / 96
        assert float(out.masks[0].sum()) == pytest.approx(20 * 12 * scale**2, rel=0.1)
        assert float(out.masks[1].sum()) == pytest.approx(14 * 12 * scale**2, rel=0.1)


def test_box_units_problem():
    assert fh.box_units_problem(0.0, 0.9, relative=True) is None
    assert fh.box_units_problem(0.1, 1.03, relative=True) is None  # a detector's overshoot
    assert "drop --relative_boxes" in fh.box_units_problem(3.0, 412.0, relative=True)
    assert "pass --relative_boxes" in fh.box_units_problem(0.05, 0.95, relative=False)
    assert fh.box_units_problem(0.0, 88.0, relative=False) is None


# ---- the kohya-format LoRA file -------------------------------------------------------------------


def _peft_toy(rank=2, alpha=5.0):
    """A linear layer and a 3x3 conv with peft LoRA adapters whose up weights are not zero."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"block": torch.nn.ModuleDict({"to_q": torch.nn.Linear(6, 5),
                                                               "conv1": torch.nn.Conv2d(3, 4, 3, padding=1)})})
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=["to_q", "conv1"]), model)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_()
    return model


def test_lora_to_kohya_keys_and_alpha():
    from peft.utils import get_peft_model_state_dict

    model = _peft_toy(rank=2, alpha=5.0)
    state = get_peft_model_state_dict(model)
    kohya = fh.lora_to_kohya(state, 5.0)
    assert sorted(kohya) == sorted(f"lora_unet_block_{m}.{k}" for m in ("to_q", "conv1")
                                   for k in ("lora_down.weight", "lora_up.weight", "alpha"))
    assert all(KOHYA_KEY.fullmatch(k) for k in kohya)
    assert kohya["lora_unet_block_to_q.alpha"].item() == 5.0  # the LoRA alpha, not the rank (2)
    assert torch.equal(kohya["lora_unet_block_conv1.lora_down.weight"], state["block.conv1.lora_A.weight"])
    assert kohya["lora_unet_block_conv1.lora_up.weight"].shape == (4, 2, 1, 1)
    half = fh.lora_to_kohya(state, 5.0, dtype=torch.float16)
    assert half["lora_unet_block_to_q.lora_up.weight"].dtype == torch.float16
    assert half["lora_unet_block_to_q.alpha"].dtype == torch.float32  # alpha / rank stays exact


def test_lora_to_kohya_hand_merge_reproduces_the_lora_module():
    """W + (alpha / rank) * up @ down, from the kohya tensors alone, gives the peft module's output."""
    from peft.utils import get_peft_model_state_dict

    model = _peft_toy(rank=2, alpha=5.0)
    kohya = fh.lora_to_kohya(get_peft_model_state_dict(model), 5.0)
    x_lin, x_conv = torch.randn(7, 6), torch.randn(2, 3, 8, 8)
    for name, x in (("to_q", x_lin), ("conv1", x_conv)):
        layer = model["block"][name]
        down, up = kohya[f"lora_unet_block_{name}.lora_down.weight"], kohya[f"lora_unet_block_{name}.lora_up.weight"]
        scale = kohya[f"lora_unet_block_{name}.alpha"].item() / down.shape[0]
        base = layer.base_layer
        if name == "to_q":
            merged = torch.nn.functional.linear(x, base.weight + scale * up @ down, base.bias)
        else:
            delta = torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
            merged = torch.nn.functional.conv2d(x, base.weight + scale * delta, base.bias, padding=1)
        with torch.no_grad():
            lora_out, base_out = layer(x), base(x)
        assert (lora_out - base_out).abs().max() > 0.1  # the LoRA does something
        torch.testing.assert_close(merged, lora_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "state, message",
    [
        ({"a.lora_A.weight": torch.zeros(2, 3)}, "has lora_A but not lora_B"),
        ({"a.weight": torch.zeros(2, 3)}, "not a LoRA A/B weight"),
        ({"a.lora_A.weight": torch.zeros(2, 3), "a.lora_B.weight": torch.zeros(4, 3)}, "lora_B has 3 columns"),
        ({"a_b.lora_A.weight": torch.zeros(2, 3), "a_b.lora_B.weight": torch.zeros(4, 2),
          "a.b.lora_A.weight": torch.zeros(2, 3), "a.b.lora_B.weight": torch.zeros(4, 2)}, "both become 'lora_unet_a_b'"),
    ],
)
def test_lora_to_kohya_refuses_what_it_cannot_write(state, message):
    with pytest.raises(ValueError, match=message):
        fh.lora_to_kohya(state, 4.0)


@pytest.mark.parametrize("which", ["sd15", "sdxl"])
def test_kohya_names_of_public_size_unets_map_back_through_diffusers(which):
    """Every LoRA module of the real SD 1.5 / SDXL UNet layouts (built on the meta device: no weights) gets a
    kohya name that diffusers' own kohya converter maps back to exactly that module, with alpha intact."""
    import sys

    from conftest import REPO
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from common import PUBLIC_UNETS

    with torch.device("meta"):
        unet = UNet2DConditionModel(**PUBLIC_UNETS[which])
        unet.add_adapter(LoraConfig(r=4, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1",
                                                                       "conv2", "proj_in", "ff.net.2"]))
    modules = {name for name, module in unet.named_modules() if hasattr(module, "lora_A") and len(module.lora_A)}
    kohya = fh.lora_to_kohya({k: torch.zeros(v.shape) for k, v in get_peft_model_state_dict(unet).items()}, 2.0)
    assert len(kohya) == 3 * len(modules) and all(KOHYA_KEY.fullmatch(k) for k in kohya)
    pipeline_cls = StableDiffusionXLPipeline if which == "sdxl" else StableDiffusionPipeline
    state, alphas = pipeline_cls.lora_state_dict(kohya)
    peft_state = convert_unet_state_dict_to_peft({k[len("unet."):]: v for k, v in state.items()})
    assert {k.rsplit(".lora_", 1)[0] for k in peft_state} == modules
    assert len(alphas) == len(modules) and set(alphas.values()) == {2.0}
