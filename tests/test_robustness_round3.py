"""Nothing lost, round 3 (issue 28): caching, flow-matching flags, model folders and the estimate, tried as a
new user would; and tests that fail when the code they guard is wrong.

Messages checked "before any model loads" or "before the data pass" are given with a model folder missing its
weights or a dataset with an undecodable image: had the check come later, the error would name those instead.
"""

import json
import logging
import os
import shutil
import subprocess

import pytest
import torch
from conftest import OFFLINE_ENV, REPO, lora_tensors, run_main
from test_train import _argv, _dataset, _error, common

import checkpoints
import fairhuman_utils as fh
import latent_cache
import train_fairhuman_lora as train
import training_checks

# ---- helpers --------------------------------------------------------------------------------------------


def _cli_error(argv, capsys) -> str:
    """What ``train_fairhuman_lora.py ARGS`` prints when refused (argparse's message or ``error: ...``)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        train.cli([str(a) for a in argv])
    message = str(info.value.code) if not isinstance(info.value.code, int) else capsys.readouterr().err
    assert "Traceback" not in message
    return message


def _copy_model(model, tmp_path, name="model"):
    destination = tmp_path / name
    shutil.copytree(model, destination)
    return destination


def _perturb(path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    save_file({k: v * 1.01 if v.is_floating_point() else v for k, v in tensors.items()}, path)


def _undecodable_dataset(demo_dataset, tmp_path):
    """The demo dataset with its last image replaced by bytes no decoder reads (the data pass names it)."""
    data = tmp_path / "broken-data"
    shutil.copytree(demo_dataset, data)
    last = sorted(n for n in os.listdir(data) if n.endswith(".png"))[-1]
    (data / last).write_bytes(b"not an image at all")
    return data


def _cache_files(cache_dir):
    folder = os.path.join(cache_dir, "fairhuman-cache")
    return sorted(n for n in os.listdir(folder)) if os.path.isdir(folder) else []


def _tmpfs(point, options):
    """Mount a tmpfs with ``options`` at ``point`` for one test (skipped where mounting is not allowed)."""
    point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield point
    subprocess.run(["umount", "-l", str(point)], check=False)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 640 KiB disk: a real full disk for the cache, with room for the datasets cache."""
    yield from _tmpfs(tmp_path / "small-disk", "size=640k")


@pytest.fixture
def read_only_mount(tmp_path):
    yield from _tmpfs(tmp_path / "read-only", "size=64k,ro")


# ---- 1. a disk cache belongs to the weights it was made with ---------------------------------------------


def test_disk_cache_is_rebuilt_when_the_vae_or_text_encoder_weights_change(tiny_sd, demo_dataset, tmp_path):
    model = _copy_model(tiny_sd, tmp_path)
    cache = tmp_path / "cache"
    flags = ["--cache_latents", "--cache_text_embeddings", "--cache_dir", cache]
    run_main(*common(model, demo_dataset, tmp_path / "a", 1, *flags))
    assert len([n for n in _cache_files(cache) if n.endswith(".pt")]) == 1
    _perturb(model / "vae" / "diffusion_pytorch_model.safetensors")
    run_main(*common(model, demo_dataset, tmp_path / "b", 1, *flags))
    assert len([n for n in _cache_files(cache) if n.endswith(".pt")]) == 2  # a new key: the VAE changed
    _perturb(model / "text_encoder" / "model.safetensors")
    run_main(*common(model, demo_dataset, tmp_path / "c", 1, *flags))
    assert len([n for n in _cache_files(cache) if n.endswith(".pt")]) == 3  # a new key: the text encoder changed
    # the denoiser's weights are not in the cache's key: training them again reads the same cache
    _perturb(model / "unet" / "diffusion_pytorch_model.safetensors")
    run_main(*common(model, demo_dataset, tmp_path / "d", 1, *flags))
    assert len([n for n in _cache_files(cache) if n.endswith(".pt")]) == 3


# ---- 2. a full disk under --cache_dir ----------------------------------------------------------------------


def test_full_disk_under_cache_dir_is_one_error_and_leaves_no_temporary_file(tiny_sd, demo_dataset, tmp_path,
                                                                             small_tmpfs):
    argv = common(tiny_sd, demo_dataset, tmp_path / "o", 1, "--cache_latents", "--cache_text_embeddings",
                  "--random_flip", "--resolution", 128, "--cache_dir", small_tmpfs)
    with pytest.raises(fh.UsageError, match=r"--cache_dir: cannot write .*fairhuman-cache.*\.pt"):
        run_main(*argv)
    assert not [n for n in _cache_files(small_tmpfs) if ".tmp-" in n]  # the space is given back
    assert not [n for n in _cache_files(small_tmpfs) if n.endswith(".pt")]


# ---- 3. a read-only --cache_dir is named as --cache_dir ------------------------------------------------------


def test_read_only_cache_dir_is_named_as_cache_dir(tmp_path, read_only_mount):
    data = _dataset(tmp_path, [{"text": "a", "hand_boxes": [], "face_boxes": []}])
    message = _error(_argv(data, tmp_path / "o", "--cache_dir", read_only_mount))
    assert message.startswith("--cache_dir") and "--train_data_dir" not in message


# ---- 4. cache and Hub ------------------------------------------------------------------------------------------


def test_cache_inside_the_output_dir_is_never_uploaded(tiny_sd, demo_dataset, tmp_path, monkeypatch):
    """The latents decode back to the training images: a cache under --output_dir stays out of the upload."""
    import huggingface_hub

    uploaded = {}

    class Repo:
        repo_id = "someone/run"

    def fake_create_repo(repo_id, exist_ok, token):
        return Repo()

    def fake_upload_folder(repo_id, folder_path, commit_message, token, ignore_patterns):
        from huggingface_hub.utils import filter_repo_objects

        files = [os.path.relpath(os.path.join(root, name), folder_path)
                 for root, _, names in os.walk(folder_path) for name in names]
        uploaded.update(dict.fromkeys(filter_repo_objects(files, ignore_patterns=ignore_patterns)))

    monkeypatch.setattr(huggingface_hub, "create_repo", fake_create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", fake_upload_folder)
    out = tmp_path / "run"
    try:
        run_main(*common(tiny_sd, demo_dataset, out, 1, "--cache_latents", "--cache_dir", out / "cache",
                         "--push_to_hub", "--hub_model_id", "someone/run"))
    except fh.UsageError as refusal:  # a refusal (before any training) is the other acceptable answer
        assert "--cache_dir" in str(refusal) and "--push_to_hub" in str(refusal)
        return
    assert uploaded and "pytorch_lora_weights.safetensors" in uploaded
    assert not [rel for rel in uploaded if rel.startswith("cache")], sorted(uploaded)


# ---- 5. --cache_dir is the Hub cache for every from_pretrained ----------------------------------------------


def test_every_from_pretrained_gets_the_cache_dir(tiny_flux, demo_dataset, tmp_path, monkeypatch):
    import diffusers
    import transformers

    seen = []
    for module in (diffusers.ModelMixin, diffusers.SchedulerMixin, diffusers.DiffusionPipeline,
                   transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase):
        for name in ("from_pretrained",):
            original = getattr(module, name)

            def spy(cls, *args, __original=original, **kwargs):
                seen.append((cls.__name__, kwargs.get("cache_dir")))
                return __original.__func__(cls, *args, **kwargs)

            monkeypatch.setattr(module, name, classmethod(spy))
    cache = tmp_path / "hub-cache"
    run_main(*common(tiny_flux, demo_dataset, tmp_path / "o", 1, "--max_sequence_length", 16, "--cache_dir", cache))
    assert seen
    missing = sorted({name for name, cache_dir in seen if cache_dir != str(cache)})
    assert not missing, f"from_pretrained without --cache_dir: {missing}"


# ---- 6. flow-matching flags checked up front; every draw inside the schedule -----------------------------


@pytest.mark.parametrize("extra, expected", [
    (["--weighting_scheme", "mode", "--mode_scale", "10"], "--mode_scale"),
    (["--weighting_scheme", "mode", "--mode_scale", "100"], "--mode_scale"),
    (["--weighting_scheme", "mode", "--mode_scale", "-1.5"], "--mode_scale"),
    (["--weighting_scheme", "logit_normal", "--logit_std", "-1"], "--logit_std"),
    (["--weighting_scheme", "logit_normal", "--logit_std", "0"], "--logit_std"),
])
def test_flow_matching_values_that_cannot_work_are_refused_before_any_model_loads(extra, expected, tmp_path):
    data = _dataset(tmp_path, [{"text": "a", "hand_boxes": [], "face_boxes": []}])
    message = _error(_argv(data, tmp_path / "o", *extra))
    assert f"argument {expected}: must be" in message, message


# ---- 7. a model folder missing a part, named before the data pass and before any weight loads --------------


@pytest.mark.parametrize("family, remove", [("flux", "tokenizer_2"), ("sd3", "text_encoder_3"), ("sd3", "tokenizer_3")])
def test_model_folder_missing_a_part_is_named_before_the_data_pass(family, remove, request, demo_dataset, tmp_path):
    model = _copy_model(request.getfixturevalue(f"tiny_{family}"), tmp_path)
    shutil.rmtree(model / remove)
    data = _undecodable_dataset(demo_dataset, tmp_path)
    message = _error(common(model, data, tmp_path / "o", 1, "--max_sequence_length", 16))
    assert remove in message and "--pretrained_model_name_or_path" in message, message
    assert "row" not in message  # the data pass did not run first


# ---- 8. resolutions the transformer cannot take, from its config ---------------------------------------------


def test_resolution_beyond_sd3s_position_embedding_is_refused_before_weights_load(tiny_sd3, demo_dataset, tmp_path):
    model = _copy_model(tiny_sd3, tmp_path)
    os.remove(model / "transformer" / "diffusion_pytorch_model.safetensors")  # a weight load would fail first
    config = json.loads((model / "transformer" / "config.json").read_text())
    vae_blocks = len(json.loads((model / "vae" / "config.json").read_text())["block_out_channels"])
    largest = config["pos_embed_max_size"] * config["patch_size"] * 2 ** (vae_blocks - 1)
    message = _error(common(model, demo_dataset, tmp_path / "o", 1, "--max_sequence_length", 16,
                                  "--resolution", largest * 2))
    assert "--resolution" in message and "pos_embed_max_size" in message and str(largest) in message, message


# ---- 9. resume names every changed setting ---------------------------------------------------------------------


def test_resume_names_every_changed_flow_matching_setting(tiny_flux, demo_dataset, tmp_path, caplog):
    out = tmp_path / "run"
    base = ["--max_sequence_length", 16, "--checkpointing_steps", 1]
    run_main(*common(tiny_flux, demo_dataset, out, 1, *base))
    changed = ["--max_sequence_length", 24, "--weighting_scheme", "logit_normal", "--logit_mean", "0.5",
               "--logit_std", "1.5", "--guidance_scale", "3.5"]
    with caplog.at_level(logging.WARNING):
        run_main(*common(tiny_flux, demo_dataset, out, 2, "--checkpointing_steps", 1, *changed,
                         "--resume_from_checkpoint", "latest"))
    for flag in ("--max_sequence_length 16 -> 24", "--weighting_scheme none -> logit_normal", "--logit_mean",
                 "--logit_std", "--guidance_scale 1.0 -> 3.5"):
        assert flag in caplog.text, flag


def test_resume_names_a_changed_sd3_preconditioning_and_mode_scale(tiny_sd3, demo_dataset, tmp_path, caplog):
    out = tmp_path / "run"
    base = ["--max_sequence_length", 16, "--checkpointing_steps", 1, "--weighting_scheme", "mode"]
    run_main(*common(tiny_sd3, demo_dataset, out, 1, *base))
    with caplog.at_level(logging.WARNING):
        run_main(*common(tiny_sd3, demo_dataset, out, 2, *base, "--precondition_outputs", 0, "--mode_scale", "1.5",
                         "--resume_from_checkpoint", "latest"))
    assert "--precondition_outputs 1 -> 0" in caplog.text and "--mode_scale 1.29 -> 1.5" in caplog.text


# ---- 10. SDXL: cached mirrored latents carry the mirrored crop offset -------------------------------------------


def test_sdxl_cached_flip_has_the_uncached_flips_size_conditioning(tiny_sdxl, demo_dataset, tmp_path):
    """SDXL's crop conditioning is in the frame of the image the model sees: a mirrored crop starts at
    ``resized_width - left - width``. The cached mirror must say so, as the uncached loader does."""
    from diffusers import AutoencoderKL

    import model_families as mf

    def dataset_for(*extra):
        args = train.parse_args([str(a) for a in common(tiny_sdxl, demo_dataset, tmp_path / "o", 1, "--random_flip",
                                                        *extra)])
        checked = training_checks.check_dataset(train.load_training_dataset(args), args)
        targets = [(48, 48)] * len(checked.captions)  # 120 x 72 -> 80 x 48: 32 pixels of horizontal slack
        return args, train.FairHumanDataset(checked, args, 5, targets)

    row = 3
    _, centered = dataset_for("--center_crop")
    lefts = {centered[(epoch, row)]["crop_top_left"][1] for epoch in range(24)}
    slack = min(lefts) + max(lefts) if len(lefts) == 2 else 2 * lefts.pop()  # resized width - crop width
    assert slack == 32
    args, dataset = dataset_for("--cache_latents")
    family = mf.family_for_model(args)
    family.vae = AutoencoderKL.from_pretrained(tiny_sdxl, subfolder="vae")
    dataset.dataset = dataset.dataset.select(range(row + 1))
    cache = latent_cache.build_cache(dataset, args, family, "cpu", None)
    plain, mirrored = cache[row]["latents"]
    (top, left), (mirrored_top, mirrored_left) = plain["crop_top_left"], mirrored["crop_top_left"]
    assert left != slack // 2  # a region-safe random crop off the centre, or the check below proves nothing
    assert mirrored_top == top and left + mirrored_left == slack


# ---- 11. --estimate_memory checks like a run ------------------------------------------------------------------


@pytest.mark.parametrize("extra, expected", [
    (["--rank", "0"], "--rank"),
    (["--train_batch_size", "0"], "--train_batch_size"),
    (["--resolution", "100"], "--resolution"),
    (["--max_sequence_length", "0"], "--max_sequence_length"),
    (["--snr_gamma", "5"], "--snr_gamma"),
])
def test_estimate_memory_refuses_what_the_run_refuses(extra, expected, tiny_flux, tmp_path, capsys):
    message = _cli_error(["--pretrained_model_name_or_path", tiny_flux, "--output_dir", tmp_path / "o",
                          "--estimate_memory", *extra], capsys)
    assert expected in message, message


def test_estimate_memory_of_a_broken_config_is_one_line(tiny_flux, tmp_path, capsys):
    model = _copy_model(tiny_flux, tmp_path)
    (model / "transformer" / "config.json").write_text("{ not json")
    message = _cli_error(["--pretrained_model_name_or_path", model, "--output_dir", tmp_path / "o",
                          "--estimate_memory"], capsys)
    assert "config.json" in message and len(message.strip().splitlines()) == 1, message


# ---- 12. family flags that do nothing are named --------------------------------------------------------------


@pytest.mark.parametrize("model, extra, expected", [
    ("tiny_sd", ["--guidance_scale", "3.5"], "--guidance_scale"),
    ("tiny_sd3", ["--guidance_scale", "3.5", "--max_sequence_length", "16"], "--guidance_scale"),
    ("tiny_flux", ["--guidance_scale", "-1", "--max_sequence_length", "16"], "--guidance_scale"),
    ("tiny_flux", ["--precondition_outputs", "0", "--max_sequence_length", "16"], "--precondition_outputs"),
    ("tiny_sd", ["--precondition_outputs", "0"], "--precondition_outputs"),
    ("tiny_sd", ["--logit_std", "2"], "--logit_std"),
    ("tiny_sd", ["--mode_scale", "1.5"], "--mode_scale"),
])
def test_family_flags_that_would_do_nothing_are_refused_before_the_data_pass(model, extra, expected, request,
                                                                           demo_dataset, tmp_path):
    data = _undecodable_dataset(demo_dataset, tmp_path)
    message = _error(common(request.getfixturevalue(model), data, tmp_path / "o", 1, *extra))
    assert expected in message and "row" not in message, message


def test_schnell_card_does_not_list_a_guidance_it_never_used(tiny_flux, demo_dataset, tmp_path):
    model = _copy_model(tiny_flux, tmp_path, "tiny-schnell")
    path = model / "transformer" / "config.json"
    config = json.loads(path.read_text())
    config["guidance_embeds"] = False
    path.write_text(json.dumps(config))
    from safetensors.torch import load_file, save_file

    weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if not k.startswith("time_text_embed.guidance_embedder")},
              weights)
    out = tmp_path / "o"
    run_main(*common(model, demo_dataset, out, 1, "--max_sequence_length", 16))
    card = (out / "README.md").read_text()
    assert "| guidance_scale |" not in card  # the settings table lists what trained, not a flag that did nothing
    assert "| max_sequence_length | 16 |" in card


# ---- 13. family checks before the data pass --------------------------------------------------------------------


def test_quantization_without_a_gpu_is_named_before_the_data_pass(tiny_flux, demo_dataset, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    data = _undecodable_dataset(demo_dataset, tmp_path)
    message = _error(common(tiny_flux, data, tmp_path / "o", 1, "--quantize_base", "nf4",
                                  "--max_sequence_length", 16))
    assert "--quantize_base" in message and "row" not in message, message


# ---- 14. the smaller ones ------------------------------------------------------------------------------------


def test_bare_target_suffix_matching_a_top_level_module_is_warned(tiny_flux, demo_dataset, tmp_path, caplog):
    """peft matches a bare suffix anywhere, FLUX.1's final ``proj_out`` included: said, and both files still load
    (the diffusers file into the pipeline, every kohya module into ComfyUI's key map)."""
    from conftest import assert_comfyui_reads, comfyui_transformer_names, lora_modules
    from diffusers import FluxPipeline
    from safetensors.torch import load_file

    out = tmp_path / "o"
    with caplog.at_level(logging.WARNING):
        run_main(*common(tiny_flux, demo_dataset, out, 1, "--max_sequence_length", 16, "--lora_target_modules",
                         "to_q,proj_out"))
    assert "proj_out also matches the top-level module of the transformer" in caplog.text
    assert "to_q" not in caplog.text.split("--lora_target_modules:")[-1].split("\n")[0].split("also")[0]
    diffusers_keys = load_file(out / "pytorch_lora_weights.safetensors")
    assert "transformer.proj_out" in lora_modules(diffusers_keys)  # it did train, as peft matched it
    pipe = FluxPipeline.from_pretrained(tiny_flux)
    pipe.load_lora_weights(str(out), weight_name="pytorch_lora_weights.safetensors")
    assert_comfyui_reads(out / "o.safetensors", comfyui_transformer_names("flux", 1, 1))


def test_empty_validation_prompt_is_refused(tmp_path):
    data = _dataset(tmp_path, [{"text": "a", "hand_boxes": [], "face_boxes": []}])
    assert "--validation_prompt" in _error(_argv(data, tmp_path / "o", "--validation_prompt", ""))


def test_region_mask_on_a_box_column_says_to_use_region(tiny_sd, tmp_path):
    data = _dataset(tmp_path, [{"text": "a", "hand_boxes": [[1, 1, 5, 5]], "face_boxes": []}])
    message = _error(common(tiny_sd, data, tmp_path / "o", 1, "--region_mask", "hand=hand_boxes"))
    assert "--region hand=hand_boxes" in message, message
    assert message.startswith("--region_mask hand=hand_boxes: column 'hand_boxes' holds boxes"), message
    message = _error(common(tiny_sd, data, tmp_path / "o2", 1, "--hand_mask_column", "hand_boxes",
                            "--face_mask_column", "face_boxes"))  # the default regions: their column flags
    assert message.startswith("--hand_mask_column hand_boxes: column 'hand_boxes' holds boxes, not mask images; "
                              "use --hand_box_column hand_boxes"), message


def test_a_refused_run_leaves_no_empty_output_dir(tmp_path):
    data = _dataset(tmp_path, [{"text": "a", "hand_boxes": []}])  # no face_boxes column: refused
    out = tmp_path / "new" / "out"
    _error(_argv(data, out))
    assert not os.path.exists(out) and not os.path.exists(tmp_path / "new")


@pytest.mark.parametrize("model", ["tiny_flux", "tiny_sd3"])
def test_flow_families_under_fp16_are_warned(model, request, demo_dataset, tmp_path, caplog):
    data = _undecodable_dataset(demo_dataset, tmp_path)  # the warning comes with the family checks
    with caplog.at_level(logging.WARNING):
        _error(common(request.getfixturevalue(model), data, tmp_path / "o", 1, "--mixed_precision", "fp16",
                            "--max_sequence_length", 16))
    assert "bf16" in caplog.text and "--mixed_precision fp16" in caplog.text


def test_evaluation_samples_a_flow_lora_at_the_scale_its_card_advises(tiny_flux):
    import evaluate_fairhuman as ev
    import model_families as mf

    args = ev.parse_args(["--pretrained_model_name_or_path", str(tiny_flux), "--lora_paths", "x.safetensors",
                          "--output_dir", "unused", "--device", "cpu", "--mixed_precision", "no"])
    ev.load_pipeline(args)
    family = mf.family_for_model(train.parse_args(["--pretrained_model_name_or_path", str(tiny_flux)]))
    assert args.lora_scale == family.inference_advice()["scale"] != 0.3


def test_evaluation_names_the_file_to_use_for_a_kohya_file_diffusers_cannot_read(tiny_sd3, demo_dataset, tmp_path):
    out = tmp_path / "sd3run"
    run_main(*common(tiny_sd3, demo_dataset, out, 1, "--max_sequence_length", 16))
    done = subprocess.run(
        [os.path.join(REPO, ".venv", "bin", "python") if os.path.exists(os.path.join(REPO, ".venv", "bin", "python"))
         else "python", os.path.join(REPO, "evaluate_fairhuman.py"), "--pretrained_model_name_or_path", tiny_sd3,
         "--lora_paths", out / "sd3run.safetensors", "--num_images_per_prompt", "1", "--output_dir", tmp_path / "eval",
         "--num_inference_steps", "2", "--resolution", "32"],
        capture_output=True, text=True, env=OFFLINE_ENV, cwd=REPO)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "pytorch_lora_weights.safetensors" in done.stderr, done.stderr[-2000:]


# ---- 15. tests that fail when the code is wrong ---------------------------------------------------------------


def test_calibrated_gram_scales_off_diagonal_entries_by_both_roots():
    gram = torch.tensor([[1.0, 0.5], [0.5, 1.0]])
    expected = torch.tensor([[1.0, 1.5], [1.5, 9.0]], dtype=torch.float64)
    torch.testing.assert_close(fh.calibrated_gram(gram, torch.tensor([1.0, 9.0])), expected)


def test_area_normalization_divides_by_the_channels_too():
    residual = torch.zeros(1, 4, 2, 2)
    residual[0, :, 0, 0] = 1.0  # an error of 1 on every channel of one latent cell
    mask = torch.zeros(1, 1, 2, 2)
    mask[0, 0, 0, 0] = 1.0
    losses = fh.fairhuman_losses(residual, torch.zeros_like(residual), mask, local_loss_scale=1.0,
                                 normalization="area")
    assert float(losses[1]) == pytest.approx(1.0)  # the mean squared error over the region's 4 x 1 numbers
    assert float(losses[0]) == pytest.approx(4 / 16)


def test_reuse_keeps_an_objective_absent_at_an_exact_step_at_its_previous_coefficient():
    from test_fair_update import PredictionModel, accelerator

    model, acc = PredictionModel(), accelerator()
    update = fh.FairUpdate(model.params, "fair", update_interval=2, interval_weights="reuse")
    weights = []
    for step in range(4):
        with update.no_sync(acc, model.net):
            pred, loss_fn = model.batch(step)
            face_present = step != 2  # the face is absent at the second exact step
            if not face_present:
                model_face, model.face = model.face, torch.zeros_like(model.face)
                pred, loss_fn = model.batch(step)
            losses = loss_fn(pred)
            update.backward(acc, losses, [True, True, face_present], loss_fn=loss_fn, model_pred=pred)
            logs = update.write_update(acc)
            if not face_present:
                model.face = model_face
        weights.append(logs["weight/face"])
        for p in model.params:
            p.grad = None
    assert weights[0] > 0 and weights[1] == weights[0]  # the interval step reuses step 0's coefficients
    assert weights[2] == 0  # absent at its exact step: nothing to weight
    assert weights[3] == pytest.approx(weights[0])  # ... but the interval after it keeps the previous one


def test_local_loss_scale_reaches_the_loss(tiny_sd, demo_dataset, tmp_path):
    for scale in (2, 5):
        run_main(*common(tiny_sd, demo_dataset, tmp_path / f"s{scale}", 1, "--weighting", "equal",
                         "--local_loss_scale", scale))
    a, b = lora_tensors(tmp_path / "s2"), lora_tensors(tmp_path / "s5")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_flux_guidance_scale_reaches_the_transformer(tiny_flux, demo_dataset, tmp_path):
    for guidance in ("1.0", "3.5"):
        run_main(*common(tiny_flux, demo_dataset, tmp_path / f"g{guidance}", 1, "--max_sequence_length", 16,
                         "--guidance_scale", guidance))
    a, b = lora_tensors(tmp_path / "g1.0"), lora_tensors(tmp_path / "g3.5")
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("change", [["--resolution", "48"], ["--bucket_reso_steps", "16"]])
def test_disk_cache_key_holds_the_resolution_and_the_buckets(change, tiny_sd, demo_dataset, tmp_path):
    cache = tmp_path / "cache"
    flags = ["--cache_latents", "--cache_dir", cache, "--resolution", "64"]
    run_main(*common(tiny_sd, demo_dataset, tmp_path / "a", 1, *flags))
    run_main(*common(tiny_sd, demo_dataset, tmp_path / "b", 1, *flags, *change))
    assert len([n for n in _cache_files(cache) if n.endswith(".pt")]) == 2


def test_hand_boxes_make_the_hand_objective_and_face_boxes_the_face_objective(tiny_sd, tmp_path):
    """Only hand boxes in the data: the face objective is absent (weight 0), the hand one is not."""
    from conftest import write_imagefolder
    from PIL import Image

    rows = [{"file_name": f"{i}.png", "text": "a person", "hand_boxes": [[4, 4, 20, 20]], "face_boxes": []}
            for i in range(2)]
    data = write_imagefolder(tmp_path / "data", rows, {r["file_name"]: Image.new("RGB", (64, 64), (i * 90, 60, 30))
                                                        for i, r in enumerate(rows)})
    out = tmp_path / "o"
    run_main(*common(tiny_sd, data, out, 1, "--checkpointing_steps", 1, "--resolution", 64))
    state = json.loads((out / "checkpoint-1" / checkpoints.FAIR_STATE_FILE).read_text())
    global_, hand, face = state["coefficients"]
    assert hand > 0 and face == 0, state["coefficients"]


def test_rotation_removes_the_oldest_and_keeps_the_newest(tmp_path):
    from test_robustness_round2 import _fake_checkpoint

    for step in (2, 4, 6):
        _fake_checkpoint(tmp_path / f"checkpoint-{step}", step)
    assert checkpoints.rotate_checkpoints(str(tmp_path), 6, 2) == [str(tmp_path / "checkpoint-2")]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-4", "checkpoint-6"]
