"""--cache_latents / --cache_text_embeddings (issue 19): keyed by dataset row, the masks cached with the latents,
flipped latents cached for --random_flip, and with augmentation off the same LoRA as an uncached run."""

import random

import pytest
import torch

from conftest import lora_tensors, run_main


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
    # the VAE encodes one image at a time when caching, a batch uncached: float32 rounding only
    assert difference <= 1e-5 * scale, (difference, scale)


def test_cache_is_keyed_by_row_and_flips_latents_with_masks(tiny_sd, demo_dataset, tmp_path):
    import train_fairhuman_lora as train

    args = train.parse_args(args_for(tiny_sd, demo_dataset, tmp_path / "o", "--random_flip", "--cache_latents"))
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae")
    checked = train.check_dataset(train.load_training_dataset(args), args)
    dataset = train.FairHumanDataset(checked, args, 5, 64)
    cache = train.build_cache(dataset, args, vae, [], [], False, "cpu")
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
