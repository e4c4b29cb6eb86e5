"""fairhuman_demo: the drawn people (plain and detailed) and the demo VAE whose latents carry the image."""

import random

import numpy as np
import pytest
import torch

import fairhuman_demo


@pytest.mark.parametrize("person", [{}, {"person_scale": 1.6, "hand_scale": 0.75}])  # demo / effect benchmark
def test_detailed_people_are_the_plain_people_with_detail_inside_the_boxes(person):
    for seed in range(6):
        plain, faces, hands = fairhuman_demo.draw_person(64, 64, random.Random(seed), **person)
        detailed, faces_d, hands_d = fairhuman_demo.draw_person(64, 64, random.Random(seed), detailed=True, **person)
        assert (faces, hands) == (faces_d, hands_d)  # the same person, the same boxes
        differs = np.any(np.asarray(plain) != np.asarray(detailed), axis=-1)
        inside = np.zeros_like(differs)
        for x0, y0, x1, y1 in faces + hands:
            inside[y0 : y1 + 1, x0 : x1 + 1] = True
        assert differs[inside].any() and not differs[~inside].any()  # detail only in the hand/face boxes


def test_person_and_hand_scale_size_the_boxes():
    def widths(seed, **person):
        _, faces, hands = fairhuman_demo.draw_person(64, 64, random.Random(seed), **person)
        return faces[0][2] - faces[0][0], [h[2] - h[0] for h in hands]

    for seed in range(20):
        face, hands = widths(seed)
        assert 64 // 6 <= face <= 64 // 3 and all(h == max(4, face // 2) for h in hands)  # the demo's people
        face, hands = widths(seed, person_scale=1.6, hand_scale=0.75)
        assert 17 <= face <= 34 and all(h == int(face * 0.75) for h in hands)


def test_demo_dataset_size_and_detail(tmp_path):
    folder = fairhuman_demo.build_demo_dataset(str(tmp_path / "d"), num_images=3, detailed=True, size=48)
    from PIL import Image

    assert Image.open(f"{folder}/person_000.png").size == (48, 48)


@pytest.mark.parametrize("size", ["tiny", "tiny-vae4"])
def test_demo_vae_latents_carry_the_image(size):
    from diffusers import AutoencoderKL

    spec = fairhuman_demo.MODEL_SIZES[size]
    levels = len(spec["vae_channels"])
    resolution = 16 * 2 ** (levels - 1)
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=spec["vae_channels"], down_block_types=("DownEncoderBlock2D",) * levels,
                        up_block_types=("UpDecoderBlock2D",) * levels, latent_channels=4, norm_num_groups=32)
    stats = fairhuman_demo.make_latents_carry_the_image(vae, resolution, num_images=8)
    assert stats["sample_std_before"] > 2 * stats["mean_spread_before"]  # the random VAE: mostly noise
    assert stats["sample_std_after"] < 0.01  # now: ~1e-3 of the spread
    pixels = torch.tensor(np.stack([np.asarray(fairhuman_demo.draw_person(resolution, resolution, random.Random(i))[0])
                                    for i in range(8)])).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
    centred = latents - latents.mean(dim=(0, 2, 3), keepdim=True)
    assert float(centred.std()) == pytest.approx(1.0, rel=0.05)  # unit spread (other images than the calibration)
