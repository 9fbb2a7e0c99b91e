"""--height/--width and the fine-tuning rollouts' size: a requested size gives images of that size, is recorded,
and a size the model's VAE cannot make is one line."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import erasekit
from cli_helpers import one_line_error, run
from erasekit.image_size import default_size, latent_shape, vae_scale


@pytest.fixture(scope="module")
def sd(tiny_sd):
    return erasekit.load(tiny_sd)


def test_sample_and_rollout_take_a_size(sd):
    assert vae_scale(sd) == 2 and default_size(sd) == (16, 16)  # the tiny folder: 8x8 latents, 2 VAE blocks
    assert sd.sample(["a cat"], [0], steps=2, progress=False).shape == (1, 3, 16, 16)
    images = sd.sample(["a cat", "a dog"], [0, 1], steps=2, progress=False, size=(32, 48))
    assert images.shape == (2, 3, 32, 48)
    latents, _ = sd.rollout(["a cat"], [0], to_step=1, steps=2, size=(48, 32))
    assert latents.shape == (1, 4, 24, 16)
    assert sd.initial_noise([3]).shape == (1, 4, 8, 8)


def test_generate_writes_and_records_the_size(capsys, tiny_sd, tmp_path):
    out = tmp_path / "gen"
    code, _, err = run(capsys, "generate", tiny_sd, "-p", "a cat", "--seeds", "0-1", "--steps", "2",
                       "--height", "32", "--width", "48", "--out", out)
    assert code == 0, err
    record = json.loads((out / "generation.json").read_text())
    assert (record["height"], record["width"]) == (32, 48)
    for image in record["images"]:
        assert Image.open(out / image["file"]).size == (48, 32)  # PIL: (width, height)
        assert (image["height"], image["width"]) == (32, 48)


@pytest.mark.parametrize("argv, message", [
    (["--height", "24"], "image height 24 does not fit .*multiple of 16 pixels"),  # 8 x the tiny VAE's scale 2
    (["--width", "20"], "argument --width: 20 is not a multiple of 8"),
    (["--height", "0"], "argument --height: 0 must be at least 1"),
])
def test_a_size_the_model_cannot_make_is_one_line(capsys, tiny_sd, tmp_path, argv, message):
    code, _, err = run(capsys, "generate", tiny_sd, "-p", "a cat", "--steps", "2", *argv, "--out", tmp_path / "g")
    assert code == 2
    import re

    assert re.search(message, one_line_error(err)), err
    assert not (tmp_path / "g").exists()


def test_evaluate_records_the_size_and_caches_images_of_it(capsys, tmp_path):
    out = tmp_path / "run"
    code, _, err = run(capsys, "evaluate", "--suite", "testbed:red", "--samples", "2", "--limit", "1", "--steps", "2",
                       "--height", "24", "--width", "32", "--out", out)
    assert code == 0, err
    sampler = json.loads((out / "results.json").read_text())["protocol"]["sampler"]
    assert (sampler["height"], sampler["width"]) == (24, 32)
    pngs = list(out.rglob("*.png"))
    assert pngs and {Image.open(p).size for p in pngs} == {(32, 24)}


def test_fine_tuning_rollouts_take_a_size(sd):
    from erasekit.finetune.esd import ESDConfig
    from erasekit.finetune.loop import rollout_noise, rollout_size

    gen = torch.Generator().manual_seed(0)
    assert rollout_noise(sd, ESDConfig(), gen).shape == (1, *sd.latent_shape)  # 0: the model's own
    cfg = ESDConfig(height=32, width=64)
    assert rollout_size(sd, cfg) == (32, 64) and rollout_noise(sd, cfg, gen).shape == (1, 4, 16, 32)
    assert latent_shape(sd, (32, 64)) == (4, 16, 32)
    with pytest.raises(erasekit.UserError, match="image width 40 does not fit"):
        rollout_size(sd, ESDConfig(width=40))


def test_esd_trains_at_a_requested_size(capsys, tiny_sd, tmp_path):
    out = tmp_path / "esd.safetensors"
    code, _, err = run(capsys, "erase", tiny_sd, "--method", "esd", "--concept", "cat", "--set", "steps=1",
                       "--set", "sampler_steps=2", "--set", "height=32", "--set", "width=48", "--out", out)
    assert code == 0, err
    loop = erasekit.Delta.load(out).config["loop"]
    assert (loop["height"], loop["width"]) == (32, 48)
    code, _, err = run(capsys, "erase", tiny_sd, "--method", "esd", "--concept", "cat", "--set", "steps=1",
                       "--set", "height=24", "--out", tmp_path / "bad.safetensors")
    assert code == 2 and "multiple of 16" in one_line_error(err)
