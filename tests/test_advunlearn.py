"""AdvUnlearn: the text encoder is trained (nothing else), the inner attack revives the concept, retention
holds unrelated prompts, resume continues the attack state, and the published defaults stay fixed."""

from __future__ import annotations

import json

import pytest
import torch

from erasekit import methods
from erasekit.concepts import Concept, ConceptSpec
from erasekit.errors import UserError
from erasekit.finetune import advunlearn, params

SMALL = {"steps": "6", "warmup_steps": "2", "attack_steps": "2", "sampler_steps": "4", "checkpoint_every": "3",
         "progress": "false", "retain_prompts": "8"}


@pytest.fixture(scope="module")
def model():
    from erasekit import load

    return load("testbed")


def _run(model, run_dir, **extra):
    method = methods.get("advunlearn")
    cfg = methods.build_config(method, {**SMALL, "run_dir": str(run_dir), **extra}, testbed=True)
    return method.erase(model, ConceptSpec([Concept("circle")]), cfg)


def test_the_text_encoder_set_is_the_encoder_layers_without_norms_or_embeddings(model):
    chosen = params.select(model, "text-encoder")
    assert chosen and all(k.startswith("text_encoder.") for k in chosen)
    assert all(".layer." in k or ".layers." in k for k in chosen)
    assert not any("LayerNorm" in k or "layer_norm" in k or "embeddings" in k for k in chosen)
    unet = dict(model.unet.named_parameters())
    assert not any(k in unet for k in chosen)  # denoiser patterns and text patterns do not mix
    assert params.select(model, "esd-all").keys().isdisjoint(chosen)


def test_advunlearn_trains_only_the_text_encoder_and_restores_the_model(model, tmp_path):
    unet_before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    text_before = {k: v.clone() for k, v in model.text_encoder.state_dict().items()}
    delta = _run(model, tmp_path / "run")
    assert delta.method == "advunlearn" and delta.tensors
    assert all(k.startswith("text_encoder.") for k in delta.tensors)
    assert max(delta.relative_change(model).values()) > 0
    assert all(torch.equal(unet_before[k], v) for k, v in model.unet.state_dict().items())
    assert all(torch.equal(text_before[k], v) for k, v in model.text_encoder.state_dict().items())
    delta.check(model)
    logs = [json.loads(x) for x in (tmp_path / "run" / "train.log.jsonl").read_text().splitlines()]
    assert [r["adversarial"] for r in logs] == [False, False, True, True, True, True]  # warmup_steps=2
    assert all(r["retain"] >= 0 for r in logs) and logs[0]["retain"] == 0.0  # nothing has moved at step 1
    assert delta.stats["retain_prompts"] >= 2  # the empty prompt and the world's preservation prompts


def test_the_inner_attack_brings_the_concept_back_toward_the_original_output(model):
    """At the starting weights the prefix is free to move: the attack must lower the distance between the
    prefixed prompt's output and the original model's output for the concept (its own objective)."""
    cfg = advunlearn.AdvUnlearnConfig(**{**advunlearn.TESTBED, "attack_steps": 8, "attack_lr": 0.05,
                                         "prefix_tokens": 2})
    named = params.select(model, "text-encoder")
    spec = ConceptSpec([Concept("circle")], anchors=["square"], templates=["a {} on a black background"])
    loss = advunlearn.AdvUnlearnLoss(model, spec, params.Frozen(model, named), cfg)
    gen = torch.Generator().manual_seed(0)
    x_t = torch.randn(1, *model.latent_shape, generator=gen)
    t = torch.tensor([600])
    square = model.encode(["a square on a black background"]).cond
    # aim the attack at the anchor's output: a target the uniform prefix does not already meet
    target = model.raw(x_t, t, square).detach()
    before = float(torch.nn.functional.mse_loss(
        model.raw(x_t, t, loss.encode(loss.prefixed[0], loss.relaxed[0])).detach(), target))
    start = loss.relaxed.clone()
    loss.attack(0, x_t, t, target)
    after = float(torch.nn.functional.mse_loss(
        model.raw(x_t, t, loss.encode(loss.prefixed[0], loss.relaxed[0])).detach(), target))
    assert after < before
    assert not torch.equal(start, loss.relaxed)
    assert torch.allclose(loss.relaxed.sum(-1), torch.ones(1, 2), atol=1e-5) and loss.relaxed.min() >= 0


def test_resume_after_a_kill_gives_the_same_delta_and_attack_state(model, tmp_path, monkeypatch):
    whole = _run(model, tmp_path / "whole")
    calls = {"n": 0}
    original = advunlearn.AdvUnlearnLoss.__call__

    def dying(self, step, gen):
        calls["n"] += 1
        if calls["n"] == 5:  # inside step 5, after the checkpoint at step 3 (whose attacks are saved)
            raise KeyboardInterrupt
        return original(self, step, gen)

    monkeypatch.setattr(advunlearn.AdvUnlearnLoss, "__call__", dying)
    with pytest.raises(KeyboardInterrupt):
        _run(model, tmp_path / "killed")
    monkeypatch.setattr(advunlearn.AdvUnlearnLoss, "__call__", original)
    resumed = _run(model, tmp_path / "killed")
    worst = max(float((resumed.tensors[k] - whole.tensors[k]).abs().max()) for k in whole.tensors)
    assert worst <= 1e-6, worst


def test_published_defaults_and_public_names(model):
    cfg = advunlearn.AdvUnlearnConfig()
    assert (cfg.parameters, cfg.steps, cfg.lr, cfg.prefix_tokens, cfg.attack_steps, cfg.attack_lr) == \
        ("text-encoder", 1000, 1e-5, 1, 30, 1e-3)
    assert (cfg.attack_every, cfg.warmup_steps, cfg.retain_weight, cfg.retain_batch) == (1, 200, 1.0, 5)
    assert (cfg.eta, cfg.guidance, cfg.sampler_steps, cfg.guide) == (1.0, 3.0, 50, "empty")
    method = methods.get("advunlearn")
    with pytest.warns(UserWarning, match="warmup_iter"):
        built = methods.build_config(method, {"warmup_iter": "10", "iterations": "20"})
    assert (built.warmup_steps, built.steps) == (10, 20)


@pytest.mark.parametrize("settings, message", [
    ({"warmup_steps": "10", "steps": "10"}, "warmup_steps"),
    ({"preserve_weight": "1"}, "retain_weight"),
    ({"attack_steps": "0"}, "attack_steps: 0 must be at least 1"),
    ({"prefix_tokens": "0"}, "prefix_tokens: 0 must be at least 1"),
])
def test_bad_settings_are_named(settings, message):
    with pytest.raises(UserError, match=message):
        methods.build_config(methods.get("advunlearn"), settings)


def test_a_denoiser_parameter_set_is_refused(model):
    with pytest.raises(UserError, match="parameters=text-encoder"):
        _run(model, "", parameters="esd-x", steps="3", warmup_steps="1")


def test_erase_advunlearn_on_the_testbed_needs_no_further_flag(capsys, tmp_path):
    """`erasekit erase --method advunlearn --concept circle` takes the testbed's settings and spec by itself
    (only the step counts are cut here to keep the test short)."""
    from cli_helpers import run
    from erasekit import Delta

    out = tmp_path / "adv.safetensors"
    code, _, _ = run(capsys, "erase", "--method", "advunlearn", "--concept", "circle", "--set", "steps=3",
                     "--set", "warmup_steps=1", "--set", "attack_steps=1", "--set", "progress=false", "--out", out)
    delta = Delta.load(out)
    assert code == 0 and delta.method == "advunlearn"
    assert delta.config["loop"]["guide"] == "anchor" and delta.config["loop"]["lr"] == 3e-4  # the testbed's settings
    assert delta.config["spec"]["anchors"] == ["square"]
    assert all(k.startswith("text_encoder.") for k in delta.tensors)
