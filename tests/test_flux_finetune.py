"""ESD-family fine-tuning on tiny FLUX.1 (dev, guidance-distilled, and schnell): EraseAnything's negative-guidance
target in velocity, FLUX's parameter sets, only the chosen set changing, the model restored after a run, SCORE's
saliency mask and discriminator on FLUX latents, AdvUnlearn on both text encoders, and the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import erasekit
from cli_helpers import one_line_error, run
from erasekit.concepts import Concept, ConceptSpec
from erasekit.errors import UserError
from erasekit.finetune import advunlearn, esd, params, score
from erasekit.finetune.loop import trainable
from erasekit.testing import make_tiny_flux

SPEC = ConceptSpec([Concept("cat")], anchors=["a dog"], preserve=["a red star"])
SMALL = {"steps": 3, "sampler_steps": 4, "progress": False, "lr": 1e-2}


@pytest.fixture(scope="module", params=["dev", "schnell"])
def flux_folder(request, tmp_path_factory) -> Path:
    return make_tiny_flux(tmp_path_factory.mktemp(f"ft_{request.param}") / "flux", guidance=request.param == "dev",
                          blocks=2)


@pytest.fixture(scope="module")
def flux(flux_folder):
    return erasekit.load(flux_folder, device="cpu")


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.unet.state_dict().items()}


def test_esd_target_is_the_frozen_velocity_pushed_away_from_the_concept(flux):
    """At the start (student = teacher) ESD's loss MSE(v_c, v_0 - eta (v_c - v_0)) is (1 + eta)^2 MSE(v_c, v_0);
    the sign flipped would give (1 - eta)^2. Both teacher calls read the run's guidance input (3), not the
    sampler's default (3.5), on dev."""
    cfg = esd.ESDConfig(eta=2.0, guidance=3.0, **SMALL)
    named, frozen = trainable(flux, cfg)
    loss = esd.ESDLoss(flux, SPEC.pairs(), frozen, cfg)
    seen = {}
    rollout = frozen.rollout

    def keep(*args):
        seen["x_t"], seen["t"] = rollout(*args)
        return seen["x_t"], seen["t"]

    frozen.rollout = keep
    with torch.no_grad(), flux.distilled_guidance(cfg.guidance):
        value, logs = loss(0, torch.Generator().manual_seed(3))
    x_t, t = seen["x_t"], seen["t"]
    with torch.no_grad():
        v0 = flux.raw(x_t, t, loss.uncond, guidance=3.0).float()
        vc = flux.raw(x_t, t, loss.cond[:1], guidance=3.0).float()
        other = flux.raw(x_t, t, loss.cond[:1], guidance=3.5).float()
    expected = 9.0 * torch.mean((vc - v0) ** 2)
    assert expected > 0 and torch.allclose(value, expected, rtol=1e-4)
    with torch.no_grad(), flux.distilled_guidance(cfg.guidance):
        ref, con = frozen.pair(x_t, t, loss.cond[:1], loss.uncond)
        student = flux.raw(x_t, t, loss.cond[:1])
    assert torch.allclose(ref, v0, atol=1e-5) and torch.allclose(con, vc, atol=1e-5)
    assert torch.allclose(student, vc, atol=1e-5)
    if flux.unet.config.guidance_embeds:  # dev reads the guidance value: 3.5 would give another output
        assert not torch.allclose(other, vc, atol=1e-3)
    assert flux._guidance_input is None  # the run's guidance input is gone after the block


def test_flux_parameter_sets_name_the_joint_attentions_roles(flux):
    x = params.select(flux, "esd-x")
    strict = params.select(flux, "esd-x-strict")
    u = params.select(flux, "esd-u")
    attention = params.select(flux, "attention")
    ea = params.select(flux, "eraseanything")
    assert x and all(n.startswith("transformer_blocks.") and ".attn.add_" in n or ".attn.to_add_out." in n for n in x)
    assert strict and set(strict) < set(x) and all(".add_k_proj." in n or ".add_v_proj." in n for n in strict)
    assert set(u).isdisjoint(x) and len(params.select(flux, "esd-all")) == len(x) + len(u)
    assert any(n.startswith("single_transformer_blocks.") for n in attention) and set(x) <= set(attention)
    assert ea and all(".add_k_proj." in n or ".add_q_proj." in n for n in ea)
    text = params.select(flux, "text-encoder")
    assert any(k.startswith("text_encoder_2.encoder.block.") for k in text)  # T5's blocks
    assert any(k.startswith("text_encoder.") for k in text)  # and CLIP's layers
    assert not any("layer_norm" in k or "relative_attention_bias" in k for k in text)
    with pytest.raises(UserError, match="unknown parameter set 'trce'"):
        params.select(flux, "trce")  # a UNet set: FLUX's table has no self/cross attention split


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_esd_changes_only_its_set_and_restores_the_model(flux, lora_rank):
    before = state(flux)
    x = torch.randn(1, *flux.latent_shape)
    cond = flux.encode(["a cat"]).cond
    with torch.no_grad():
        out = flux.raw(x, 500, cond)
    delta = esd.erase(flux, SPEC, esd.ESDConfig(parameters="esd-x-strict", lora_rank=lora_rank, **SMALL))
    after = state(flux)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the model is as it was
    assert not any(m._forward_hooks for m in flux.unet.modules())  # LoRA's hooks are gone
    with torch.no_grad():
        assert torch.equal(flux.raw(x, 500, cond), out)
    values = delta.values(flux)
    assert values and all(".add_k_proj." in k or ".add_v_proj." in k for k in values)
    if lora_rank:
        assert delta.is_lora and all(k.startswith("transformer.") for k in delta.tensors)
        assert all(k.endswith(".weight") for k in values)  # LoRA adapts weights, not biases
    changed = [k for k, v in values.items() if not torch.equal(v, before[k])]
    assert changed
    with torch.no_grad(), delta.applied(flux):
        erased = flux.raw(x, 500, cond)
    assert not torch.allclose(erased, out, atol=1e-6)


def test_score_on_flux_masks_its_updates_and_reads_unpacked_latents(flux):
    cfg = score.SCOREConfig(parameters="esd-x-strict", saliency=0.1, saliency_prompts=2, **SMALL)
    before = state(flux)
    delta = score.erase(flux, SPEC, cfg)
    assert all(torch.equal(before[k], v) for k, v in state(flux).items())
    for name, value in delta.tensors.items():
        moved = (value != before[name]).float().mean()
        assert 0 < moved <= 0.1 + 1e-6, name  # only the salient tenth of each tensor may move
    channels = flux.spatial(torch.zeros(1, *flux.latent_shape)).shape[1]
    assert channels == flux.vae.config.latent_channels  # the discriminator reads the VAE's latent image


def test_advunlearn_on_flux_trains_both_text_encoders(flux):
    cfg = advunlearn.AdvUnlearnConfig(steps=3, warmup_steps=1, attack_steps=1, sampler_steps=4, progress=False,
                                      lr=1e-3)
    delta = advunlearn.erase(flux, SPEC, cfg)
    keys = list(delta.tensors)
    assert any(k.startswith("text_encoder_2.") for k in keys) and all(k.startswith("text_encoder") for k in keys)


def test_erase_cli_fine_tunes_tiny_flux(flux_folder, flux, tmp_path, capsys):
    out = tmp_path / "d.safetensors"
    code, text, err = run(capsys, "erase", flux_folder, "--method", "esd", "--concept", "cat", "--out", out,
                          "--set", "steps=2", "--set", "sampler_steps=3", "--set", "progress=false",
                          "--set", "lora_rank=0")  # 0: full tensors (the default)
    assert code == 0, err
    delta = erasekit.Delta.load(out, base=flux)
    assert delta.method == "esd" and all(".attn.add_" in k or ".attn.to_add_out." in k for k in delta.tensors)
    lora = tmp_path / "l.safetensors"
    code, _, err = run(capsys, "erase", flux_folder, "--method", "esd", "--concept", "cat", "--out", lora,
                       "--set", "steps=2", "--set", "sampler_steps=3", "--set", "lora_rank=2",
                       "--set", "progress=false")
    assert code == 0, err
    code, _, err = run(capsys, "generate", flux_folder, "--delta", lora, "-p", "a cat", "--seeds", "0", "--steps", "2",
                       "--out", tmp_path / "g")
    assert code == 0, err
    code, _, err = run(capsys, "export", flux_folder, "--delta", lora, "--out", tmp_path / "ex")
    assert code == 0, err
    from diffusers import FluxTransformer2DModel

    exported = dict(FluxTransformer2DModel.from_pretrained(tmp_path / "ex" / "transformer").named_parameters())
    merged = erasekit.Delta.load(lora, base=flux).values(flux)
    assert all(torch.allclose(exported[k].detach(), v, atol=1e-6) for k, v in merged.items())
    code, _, err = run(capsys, "erase", flux_folder, "--method", "uce+esd", "--concept", "cat", "--out",
                       tmp_path / "c.safetensors", "--set", "lora_rank=2", "--set", "steps=1")
    assert code == 2 and "drop lora_rank" in one_line_error(err)


def test_lora_settings_a_method_cannot_take_are_one_line(flux_folder, tiny_sd, tmp_path, capsys):
    for model, method, setting, why in ((tiny_sd, "trce-stage2", "lora_rank=2", "trains full tensors only"),
                                        (flux_folder, "esd", "lora_rank=-1", "must not be negative"),
                                        (flux_folder, "esd", "parameters=trce", "unknown parameter set")):
        out = tmp_path / f"{method}.safetensors"
        code, _, err = run(capsys, "erase", model, "--method", method, "--concept", "cat", "--out", out,
                           "--set", setting, "--set", "steps=1")
        assert code == 2 and why in one_line_error(err) and not out.exists(), (method, setting)
