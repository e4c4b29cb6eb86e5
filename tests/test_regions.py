"""Named region objectives (issue 21): ``--region NAME=COLUMN`` / ``--region_mask NAME=COLUMN``, K = 1 + regions.

The pieces at K up to 8 (solver, FairUpdate, losses), the flags' errors, and end-to-end runs of the training
script with one region (K = 2) and three (K = 4, the demo people with shoes).
"""

import json
import os

import numpy as np
import pytest
import torch
from conftest import parse_error, run_main
from PIL import Image

import checkpoints
import fairhuman_demo
import fairhuman_utils as fh
import mask_previews
import train_fairhuman_lora as train

# ---- the pieces at K objectives -----------------------------------------------------------------


def random_gradients(k, p=40, seed=0):
    """K gradients with a common part (the global one is large) and conflicting region parts."""
    generator = torch.Generator().manual_seed(seed)
    common = torch.randn(p, generator=generator, dtype=torch.float64)
    rows = [3.0 * common + 0.3 * torch.randn(p, generator=generator, dtype=torch.float64)]
    for i in range(1, k):
        rows.append(0.5 * common + torch.randn(p, generator=generator, dtype=torch.float64) / (i + 1))
    return torch.stack(rows)


@pytest.mark.parametrize("k", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_solver_solves_the_alpha_fair_equation_at_k_objectives(k, alpha):
    g = random_gradients(k, seed=k)
    gram = g @ g.T
    w = fh.solve_fair_weights(gram, alpha)
    assert w.shape == (k,) and bool((w > 0).all())
    assert float(fh.fair_equation_residual(gram, w, alpha)) < 1e-9
    # an absent objective (zero gradient) gets weight 0 and the others solve the smaller problem
    g[k - 1] = 0
    gram = g @ g.T
    w_absent = fh.solve_fair_weights(gram, alpha)
    assert w_absent[k - 1] == 0
    if k > 2:
        torch.testing.assert_close(w_absent[: k - 1], fh.solve_fair_weights(gram[: k - 1, : k - 1], alpha))


class KModel:
    """A small network whose prediction goes through the global loss and K - 1 region losses."""

    def __init__(self, k, seed=0):
        torch.manual_seed(seed)
        self.k = k
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2 * 4 * 4 * 4))
        self.params = list(self.net.parameters())
        generator = torch.Generator().manual_seed(7)
        self.masks = [(torch.rand(2, 1, 4, 4, generator=generator) > 0.6).float() for _ in range(k - 1)]

    def batch(self, step):
        generator = torch.Generator().manual_seed(100 + step)
        x = torch.randn(4, 6, generator=generator)
        target = torch.randn(2, 4, 4, 4, generator=generator)
        pred = self.net(x).mean(0).view(2, 4, 4, 4)
        return pred, lambda p: fh.fairhuman_losses(p, target, *self.masks, local_loss_scale=5.0)


def drive(update, model, steps, accumulation=1):
    from accelerate import Accelerator

    acc = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    history = []
    for step in range(steps):
        logs = None
        for micro in range(accumulation):
            acc.gradient_state._set_sync_gradients(micro == accumulation - 1)
            pred, loss_fn = model.batch(step * accumulation + micro)
            losses = loss_fn(pred)
            update.backward(acc, losses, [True] * model.k, loss_fn=loss_fn, model_pred=pred)
            if micro == accumulation - 1:
                logs = update.write_update(acc)
        history.append((logs, [p.grad.detach().clone() for p in model.params]))
        for p in model.params:
            p.grad = None
    return history


@pytest.mark.parametrize("k", [2, 4, 8])
def test_fair_update_at_k_objectives_writes_k_g_w(k):
    names = ("global", *[f"r{i}" for i in range(1, k)])
    model = KModel(k)
    update = fh.FairUpdate(model.params, "fair", objectives=names)
    (logs, written), = drive(update, model, 1)
    pred, loss_fn = model.batch(0)
    losses = loss_fn(pred)
    rows = [torch.cat([g.flatten() for g in torch.autograd.grad(losses[i], model.params, retain_graph=True)])
            for i in range(k)]
    g = torch.stack(rows).double()
    w = fh.solve_fair_weights(g @ g.T)
    expected = (k * w) @ g
    torch.testing.assert_close(torch.cat([t.flatten() for t in written]).double(), expected, rtol=1e-5, atol=1e-9)
    assert sorted(k_ for k_ in logs if k_.startswith("weight/")) == sorted(f"weight/{n}" for n in names)
    assert [logs[f"weight/{n}"] for n in names] == pytest.approx((k * w).tolist(), rel=1e-6)


@pytest.mark.parametrize("k", [2, 5, 8])
def test_fair_update_interval_mode_calibration_and_resume_at_k(k):
    names = ("global", *[f"r{i}" for i in range(1, k)])
    model = KModel(k)
    update = fh.FairUpdate(model.params, "fair", update_interval=3, fidelity_check=True, objectives=names)
    history = drive(update, model, 4, accumulation=2)
    assert update.gram_scale.shape == (k,) and update.coefficients.shape == (k,)
    between = history[1][0]  # a step between exact solves: fidelity logs per objective
    assert {f"fidelity/weight_ratio_{n}" for n in names} <= set(between)
    assert between["fidelity/update_cosine"] > 0.5
    # the state of a K-objective update resumes into one with the same objectives only
    state = update.state_dict()
    same = fh.FairUpdate(KModel(k).params, "fair", update_interval=3, objectives=names)
    same.load_state_dict(state)
    torch.testing.assert_close(same.gram_scale, update.gram_scale)
    other = fh.FairUpdate(KModel(3).params, "fair", update_interval=3, objectives=("global", "a", "b"))
    if k != 3:
        with pytest.raises(ValueError, match=f"saved fair update has {k} objectives"):
            other.load_state_dict(state)


def test_equal_region_weights_one_per_region_and_hand_face_default_unchanged():
    model = KModel(4)
    names = ("global", "hand", "face", "shoe")
    update = fh.FairUpdate(model.params, "equal", region_weights=(0.5, 2.0, 0.25), objectives=names)
    (logs, written), = drive(update, model, 1)
    pred, loss_fn = model.batch(0)
    losses = loss_fn(pred)
    plain = torch.autograd.grad(losses @ torch.tensor([1.0, 0.5, 2.0, 0.25]), model.params)
    for a, b in zip(written, plain):
        torch.testing.assert_close(a, b)
    assert [logs[f"weight/{n}"] for n in names] == [1.0, 0.5, 2.0, 0.25]
    assert fh.fixed_coefficients("global", (1.0, 1.0, 1.0)).tolist() == [1.0, 0.0, 0.0, 0.0]
    # the default objectives are FairHuman's three, with the same coefficients as before named regions
    default = fh.FairUpdate(KModel(3).params, "equal", region_weights=(0.07, 0.012))
    assert default.objectives == fh.OBJECTIVES == ("global", "hand", "face")
    assert default.coefficients.tolist() == [1.0, 0.07, 0.012]
    with pytest.raises(ValueError, match="2 given for 3 regions"):
        fh.FairUpdate(model.params, "equal", region_weights=(1.0, 1.0), objectives=names)


def test_losses_take_any_number_of_region_masks():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    masks = [(torch.rand(2, 1, 4, 4) > 0.5).float() for _ in range(7)]
    losses = fh.fairhuman_losses(pred, target, *masks, local_loss_scale=2.0)
    assert losses.shape == (8,)
    for i, mask in enumerate(masks):
        assert float(losses[i + 1]) == pytest.approx(float(((2.0 * mask * (pred - target)) ** 2).mean()))
    # the hand/face call is a prefix of the same computation, bit for bit
    assert torch.equal(fh.fairhuman_losses(pred, target, masks[0], masks[1]),
                       fh.fairhuman_losses(pred, target, *masks, local_loss_scale=5.0)[:3])


def test_objective_names_refuse_duplicates_global_and_odd_names():
    assert fh.objective_names(["text", "logo"]) == ("global", "text", "logo")
    with pytest.raises(ValueError, match="given twice: text"):
        fh.objective_names(["text", "logo", "text"])
    with pytest.raises(ValueError, match="clashes with the global objective"):
        fh.objective_names(["global"])
    with pytest.raises(ValueError, match="not a plain name"):
        fh.objective_names(["a b"])
    with pytest.raises(ValueError, match="at least one"):
        fh.objective_names([])


# ---- the flags ------------------------------------------------------------------------------------


def parsed(*extra):
    args = train.parse_args(["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--output_dir", "o",
                             *extra])
    return args


@pytest.mark.parametrize("extra, message", [
    (["--region", "text"], "--region 'text': expected NAME=COLUMN"),
    (["--region", "=text_boxes"], "--region '=text_boxes': expected NAME=COLUMN"),
    (["--region_mask", "logo="], "--region_mask 'logo=': expected NAME=COLUMN"),
    (["--region", "text=a", "--region_mask", "text=b"], "--region_mask 'text=b': region name 'text' is given twice"),
    (["--region", "global=g"], "--region 'global=g': the region name 'global' clashes with the global objective"),
    (["--region", "my text=t"], "the region name 'my text' must be letters"),
    (["--region", "image=t"], "the region name 'image' is taken by the mask previews"),
    (["--region", "text=t", "--hand_box_column", "h"], "--hand_box_column describe the default hand/face regions"),
    (["--region", "text=t", "--weighting", "equal", "--region_loss_weight", "logo=2"],
     "--region_loss_weight 'logo=2': no region named 'logo' (the regions: text)"),
    (["--region", "text=t", "--weighting", "equal", "--region_loss_weight", "text=x"], "expected NAME=W"),
    (["--region", "text=t", "--weighting", "equal", "--region_loss_weight", "text=-1"], "not negative"),
    (["--region", "text=t", "--region_loss_weight", "text=2"], "--region_loss_weight sets the static weights of "
                                                                "--weighting equal; --weighting fair"),
    (["--region", "text=t", "--weighting", "equal", "--hand_loss_weight", "2"],
     "--hand_loss_weight: this run has no region named hand"),
    (["--region", "hand=h", "--weighting", "equal", "--hand_loss_weight", "2", "--region_loss_weight", "hand=3"],
     "both weight the hand region"),
    (["--region_mask", "text=t", "--relative_boxes"], "--relative_boxes has no effect when every region"),
    (["--region", "a=boxes", "--region", "b=boxes"], "--region a=boxes and --region b=boxes read the same column"),
    (["--region_mask", "a=image"], "--region_mask a=image: 'image' is also --image_column"),
])
def test_region_flag_errors_name_the_flag(extra, message):
    """A spec's own form is refused while the arguments are parsed; the rest by check_args, before anything loads."""
    error = parse_error(train.parse_args, ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d", *extra])
    if error is None:
        with pytest.raises(train.UsageError) as refused:
            train.check_args(parsed(*extra))
        error = str(refused.value)
    assert message in error


def test_region_order_and_weights():
    args = parsed("--region", "text=text_boxes", "--region_mask", "logo=logo_masks", "--region", "hand=hand_boxes",
                  "--weighting", "equal", "--region_loss_weight", "logo=0.5", "--hand_loss_weight", "0.25")
    train.check_args(args)
    assert train.region_sources(args) == [("text", "boxes", "text_boxes"), ("logo", "mask", "logo_masks"),
                                          ("hand", "boxes", "hand_boxes")]
    assert train.run_objectives(args) == ("global", "text", "logo", "hand")
    assert train.region_loss_weights(args) == (1.0, 0.5, 0.25)
    default = parsed("--weighting", "equal", "--face_loss_weight", "3")
    assert train.run_objectives(default) == ("global", "hand", "face")
    assert train.region_loss_weights(default) == (1.0, 3.0)


# ---- end to end ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shoes_dataset(tmp_path_factory):
    """The demo people with shoes (a third region column, shoe_boxes); the shoes of rows 1 and 3 removed
    (a region present in some images only), and a mask-image column for the faces."""
    folder = str(tmp_path_factory.mktemp("data") / "shoes")
    fairhuman_demo.build_demo_dataset(folder, num_images=4, shoes=True)
    with open(os.path.join(folder, "metadata.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    for i, row in enumerate(rows):
        if i % 2:
            row["shoe_boxes"] = []
        size = Image.open(os.path.join(folder, row["file_name"])).size
        mask = Image.new("L", size, 0)
        for x0, y0, x1, y1 in row["face_boxes"]:
            mask.paste(255, (int(x0), int(y0), int(x1), int(y1)))
        row["face_mask_file_name"] = f"face_{i}.png"
        mask.save(os.path.join(folder, row["face_mask_file_name"]))
    with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return folder


def common(model, data, out, *extra):
    return ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--output_dir", out,
            "--resolution", "32", "--train_batch_size", "1", "--max_train_steps", "4", "--seed", "1",
            "--report_to", "tensorboard", "--checkpointing_steps", "2", "--save_lora_format", "both", *extra]


def test_three_regions_end_to_end_k4(tiny_sd, shoes_dataset, tmp_path, caplog):
    out = tmp_path / "k4"
    caplog.set_level("WARNING")
    run_main(*common(tiny_sd, shoes_dataset, out, "--region", "hand=hand_boxes", "--region", "face=face_boxes",
                     "--region", "shoe=shoe_boxes", "--save_mask_previews", "2", "--fair_update_interval", "2",
                     "--fair_fidelity_check"))
    logs = fairhuman_demo.read_scalars(str(out / "logs"))
    for name in ("global", "hand", "face", "shoe"):
        assert len(logs[f"loss/{name}"]) == 4 and len(logs[f"weight/{name}"]) == 4
    assert "fidelity/weight_ratio_shoe" in logs
    # batch 1: rows 1 and 3 have no shoes, so the shoe loss is zero on half of the steps and positive on the others
    assert sum(v == 0 for v in logs["loss/shoe"]) == 2 and sum(v > 0 for v in logs["loss/shoe"]) == 2
    # mask previews: a mask per region and the overlay with its legend strip below the image
    previews = out / "mask_previews"
    for name in ("hand", "face", "shoe"):
        assert (previews / f"0_{name}.png").exists()
    image, overlay = Image.open(previews / "0_image.png"), Image.open(previews / "0_overlay.png")
    assert overlay.height == image.height + 3 * 11 + 2
    legend = np.asarray(overlay.convert("RGB"))[image.height:]
    for colour in mask_previews.REGION_COLOURS[:3]:
        assert (legend == colour).all(axis=-1).any()
    # the card, the kohya metadata and fairhuman_settings name the regions
    card = (out / "README.md").read_text()
    assert "region losses for hand, face, shoe" in card and "shoe=shoe_boxes (boxes)" in card
    from safetensors import safe_open

    with safe_open(str(out / "k4.safetensors"), "pt") as f:
        metadata = f.metadata()
    settings = json.loads(metadata["fairhuman_settings"])
    assert settings["regions"] == "hand=hand_boxes (boxes), face=face_boxes (boxes), shoe=shoe_boxes (boxes)"
    assert "global + hand + face + shoe objectives" in metadata["ss_training_comment"]
    with open(out / "checkpoint-4" / checkpoints.RUN_SETTINGS_FILE) as f:
        assert json.load(f)["objectives"] == ["global", "hand", "face", "shoe"]

    # resuming with another region set is refused, naming both
    with pytest.raises(train.UsageError) as error:
        run_main(*common(tiny_sd, shoes_dataset, out, "--region", "hand=hand_boxes", "--region", "shoe=shoe_boxes",
                         "--max_train_steps", "6", "--resume_from_checkpoint", "latest"))
    message = str(error.value)
    assert "objectives global, hand, face, shoe; this run has global, hand, shoe" in message
    # and the default hand/face set is another set too
    with pytest.raises(train.UsageError, match="objectives global, hand, face, shoe; this run has global, hand, face"):
        run_main(*common(tiny_sd, shoes_dataset, out, "--max_train_steps", "6", "--resume_from_checkpoint", "latest"))


def test_one_region_from_mask_images_k2_with_static_weight(tiny_sd, shoes_dataset, tmp_path):
    out = tmp_path / "k2"
    run_main(*common(tiny_sd, shoes_dataset, out, "--region_mask", "face=face_mask", "--weighting", "equal",
                     "--region_loss_weight", "face=0.5"))
    logs = fairhuman_demo.read_scalars(str(out / "logs"))
    assert {tag for tag in logs if tag.startswith(("loss/", "weight/"))} == {
        "loss/global", "loss/face", "weight/global", "weight/face"}
    assert logs["weight/face"] == [0.5] * 4
    card = (out / "README.md").read_text()
    assert "| region loss weights (face) | (0.5,) |" in card and "| regions | face=face_mask (mask images) |" in card


def test_missing_region_column_is_named(tiny_sd, shoes_dataset, tmp_path):
    with pytest.raises(train.UsageError) as error:
        run_main(*common(tiny_sd, shoes_dataset, tmp_path / "x", "--region", "text=text_boxes"))
    assert "--region text=text_boxes: column 'text_boxes' not found in the dataset" in str(error.value)
    with pytest.raises(train.UsageError, match="--region_mask logo=logo_masks: column 'logo_masks' not found"):
        run_main(*common(tiny_sd, shoes_dataset, tmp_path / "y", "--region", "hand=hand_boxes",
                         "--region_mask", "logo=logo_masks"))


def test_region_boxes_get_the_same_unit_checks_and_row_named_errors(tiny_sd, shoes_dataset, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    with open(os.path.join(shoes_dataset, "metadata.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    rows[2]["shoe_boxes"] = [[1, 2, 3]]
    for row in rows:
        Image.open(os.path.join(shoes_dataset, row["file_name"])).save(bad / row["file_name"])
        row.pop("face_mask_file_name")
    with open(bad / "metadata.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    with pytest.raises(train.UsageError, match="column 'shoe_boxes', row 2"):
        run_main(*common(tiny_sd, str(bad), tmp_path / "x", "--region", "shoe=shoe_boxes"))
    for row in rows:  # fractions of the image in a pixel run: the unit check names the column
        row["shoe_boxes"] = [[0.1, 0.5, 0.3, 0.7]]
    with open(bad / "metadata.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    with pytest.raises(train.UsageError, match="column 'shoe_boxes'"):
        run_main(*common(tiny_sd, str(bad), tmp_path / "y", "--region", "shoe=shoe_boxes"))


# ---- preparing named region columns from COCO-style objects -------------------------------------


def test_prepare_imports_coco_categories_into_named_region_columns(tmp_path):
    import datasets

    import prepare_fairhuman_dataset as prep

    features = datasets.Features({
        "image": datasets.Image(),
        "objects": {"bbox": datasets.List(datasets.List(datasets.Value("float32"))),
                    "category": datasets.List(datasets.ClassLabel(names=["person", "hand", "logo", "sign", "cup"]))},
    })
    datasets.Dataset.from_dict({
        "image": [Image.new("RGB", (100, 80)), Image.new("RGB", (50, 50))],
        "objects": [{"bbox": [[10, 20, 15, 10], [30, 5, 20, 25], [60, 40, 10, 10], [0, 0, 5, 5]],
                     "category": [1, 2, 3, 4]},
                    {"bbox": [[1, 1, 4, 4]], "category": [4]}],
    }, features=features).save_to_disk(str(tmp_path / "coco"))

    def run(*extra):
        return prep.main(prep.parse_args(["--dataset_name", str(tmp_path / "coco"), "--objects_column", "objects",
                                          "--disable_progress_bar", *[str(a) for a in extra]]))

    out = tmp_path / "out"
    run("--hand_categories", "hand", "--coco_region", "logo=logo,sign", "--coco_region", "cup=4", "--output_dir", out,
        "--preview")
    with open(str(out) + "_preview/summary.json") as f:
        assert json.load(f)["regions"] == {"logo": {"images": 1, "boxes": 2}, "cup": {"images": 2, "boxes": 2}}
    sheet = np.asarray(Image.open(str(out) + "_preview/contact_sheet.png").convert("RGB"))
    for color in prep.REGION_COLORS[:2]:  # the logo and cup boxes are drawn in their own colours
        assert (sheet == color).all(axis=-1).sum() > 20
    with open(out / "metadata.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert rows[0]["hand_boxes"] == [[10.0, 20.0, 25.0, 30.0]]
    assert rows[0]["logo_boxes"] == [[30.0, 5.0, 50.0, 30.0], [60.0, 40.0, 70.0, 50.0]]
    assert rows[0]["cup_boxes"] == [[0.0, 0.0, 5.0, 5.0]] and rows[1]["cup_boxes"] == [[1.0, 1.0, 5.0, 5.0]]
    assert rows[1]["logo_boxes"] == []
    for extra, message in [
        (["--coco_region", "logo"], "--coco_region 'logo': expected NAME=ID"),
        (["--coco_region", "hand=2"], "use --hand_categories for hands"),
        (["--coco_region", "global=2"], "the global objective's name"),
        (["--coco_region", "a=2", "--coco_region", "a=3"], "the name 'a' is given twice"),
        (["--hand_categories", "hand", "--coco_region", "x=hand"], "--coco_region x=... and --hand_categories share"),
        (["--coco_region", "x=mug"], "'mug' is not a class of 'objects.category'"),
    ]:
        with pytest.raises(prep.PrepareError, match=message):
            run(*extra, "--output_dir", tmp_path / f"o{len(message)}")
