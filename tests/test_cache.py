"""--cache_latents / --cache_text_embeddings (issue 19): keyed by dataset row, the masks cached with the latents,
flipped latents cached for --random_flip, and with augmentation off the same LoRA as an uncached run."""

import pytest
import torch
from conftest import lora_tensors, run_main

import latent_cache


def args_for(model, data, out, *extra):
    return [str(a) for a in ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--output_dir", out,
            "--learning_rate", "1e-3", "--seed", "5", "--report_to", "none", "--checkpointing_steps", "100",
            "--fair_update_interval", "1", "--save_precision", "fp32", "--train_batch_size", "2",
            "--max_train_steps", "3", "--center_crop", *extra]]


def test_cached_run_gives_the_same_lora_as_uncached(tiny_sdxl, demo_dataset, tmp_path):
    run_main(*args_for(tiny_sdxl, demo_dataset, tmp_path / "plain"))
    run_main(*args_for(tiny_sdxl, demo_dataset, tmp_path / "cached", "--cache_latents", "--cache_text_embeddings"))
    a, b = lora_tensors(tmp_path / "plain"), lora_tensors(tmp_path / "cached")
    assert a.keys() == b.keys() and a
    difference = max(float((a[k] - b[k]).abs().max()) for k in a)
    scale = max(float(a[k].abs().max()) for k in a)
    # the VAE encodes one image at a time when caching, a batch uncached: float32 rounding only (1.8e-5 of the
    # scale on the tiny SDXL whose CLIP pools at its end token (issue 18); main's code gives the same number)
    assert difference <= 3e-5 * scale, (difference, scale)


def test_cache_is_keyed_by_row_and_flips_latents_with_masks(tiny_sd, demo_dataset, tmp_path):
    import train_fairhuman_lora as train

    args = train.parse_args(args_for(tiny_sd, demo_dataset, tmp_path / "o", "--random_flip", "--cache_latents"))
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae")
    checked = train.check_dataset(train.load_training_dataset(args), args)
    dataset = train.FairHumanDataset(checked, args, 5, 64)
    family = train.mf.family_for_model(args)  # the cache encodes through the model family (issue 18)
    family.vae = vae
    cache = latent_cache.build_cache(dataset, args, family, "cpu", family.caption_conditioning(checked.captions, "cpu"))
    assert sorted(cache) == list(range(len(dataset)))
    for entry in cache.values():
        plain, flipped = entry["latents"]
        torch.testing.assert_close(flipped["latent_masks"], plain["latent_masks"].flip(-1))
        assert not torch.equal(flipped["latent_mean"], plain["latent_mean"])
    dataset.cache = cache
    # every epoch draws among the two cached orientations; the example's seed does not depend on the step
    drawn = {bool(torch.equal(dataset[(epoch, 0)]["latent_mean"], cache[0]["latents"][1]["latent_mean"]))
             for epoch in range(12)}
    assert drawn == {False, True}
    assert dataset[(3, 0)]["seed"] == dataset[(3, 0)]["seed"] and "pixel_values" not in dataset[(3, 0)]


def test_disk_cache_is_reused_rebuilt_for_another_configuration_and_a_full_disk_stops_cleanly(
        tiny_sd, demo_dataset, tmp_path, caplog, monkeypatch):
    import errno
    import logging
    import os

    from conftest import assert_same_lora

    import train_fairhuman_lora as train

    cache_dir = tmp_path / "cache"
    folder = cache_dir / "fairhuman-cache"
    flags = ["--cache_dir", cache_dir, "--cache_latents", "--cache_text_embeddings"]
    caplog.set_level(logging.INFO)
    run_main(*args_for(tiny_sd, demo_dataset, tmp_path / "first", *flags))
    written = sorted(n for n in os.listdir(folder) if n.endswith(".pt"))
    assert len(written) == 1 and not [n for n in os.listdir(folder) if ".tmp-" in n]
    caplog.clear()
    run_main(*args_for(tiny_sd, demo_dataset, tmp_path / "second", *flags))
    assert "Reading the latent/text cache" in caplog.text
    assert_same_lora(str(tmp_path / "first"), str(tmp_path / "second"), atol=0)
    # another configuration: a new cache, the old one named with the reason, never read
    caplog.clear()
    run_main(*args_for(tiny_sd, demo_dataset, tmp_path / "third", *flags, "--mask_dilation", "0"))
    assert "Reading the latent/text cache" not in caplog.text
    assert "differs in mask_dilation" in caplog.text
    assert len([n for n in os.listdir(folder) if n.endswith(".pt")]) == 2
    # a full disk while writing: the run stops naming the path, nothing half-written is left to be read
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(train.torch, "save", full_disk)
    with pytest.raises(train.UsageError, match=r"cannot write .*fairhuman-cache.*\.pt \(No space left on device"):
        run_main(*args_for(tiny_sd, demo_dataset, tmp_path / "fourth", *flags, "--mask_dilation", "1"))
    assert len([n for n in os.listdir(folder) if n.endswith(".pt")]) == 2
    assert not [n for n in os.listdir(folder) if ".tmp-" in n]


def test_cache_latents_with_a_random_square_crop_is_named(demo_dataset, tmp_path):
    """A random square crop changes every epoch: one cached latent per image cannot hold it (kohya refuses the
    same). Named before any model loads (the model path does not exist)."""
    import train_fairhuman_lora as train

    argv = ["--pretrained_model_name_or_path", tmp_path / "no-model", "--train_data_dir", demo_dataset,
            "--output_dir", tmp_path / "out", "--cache_latents", "--square_crop"]
    with pytest.raises(train.UsageError, match="--cache_latents holds one crop per image, but --square_crop"):
        train.main(train.parse_args([str(a) for a in argv]))
    train.check_args(train.parse_args([str(a) for a in argv + ["--center_crop"]]))  # a fixed crop: fine
