"""LoRA-factor deltas (lora_rank): PEFT's layout read by stock diffusers' load_lora_weights with the same denoiser
output as erasekit's own delta loading, the factors' merge W + B A, and training that holds the base once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import erasekit
from erasekit.concepts import Concept, ConceptSpec
from erasekit.delta import Delta
from erasekit.finetune import esd
from erasekit.finetune.loop import trainable
from erasekit.testing import make_tiny_flux

pytest.importorskip("peft")  # stock diffusers reads LoRA through PEFT

SPEC = ConceptSpec([Concept("cat")])
SMALL = {"steps": 3, "sampler_steps": 4, "progress": False, "lr": 1e-2, "lora_rank": 4}


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory) -> Path:
    return make_tiny_flux(tmp_path_factory.mktemp("lora_flux") / "flux", blocks=2)


@pytest.fixture(scope="module")
def lora_delta(flux_folder, tmp_path_factory) -> Path:
    model = erasekit.load(flux_folder, device="cpu")
    path = tmp_path_factory.mktemp("lora_delta") / "esd-lora.safetensors"
    esd.erase(model, SPEC, esd.ESDConfig(parameters="esd-x", **SMALL)).save(path)
    return path


def inputs(model):
    torch.manual_seed(0)
    return torch.randn(2, *model.latent_shape), torch.tensor([700.0, 300.0]), model.encode(["a cat", "a dog"]).cond


def test_stock_flux_pipeline_loads_the_delta_and_gives_erasekits_output(flux_folder, lora_delta):
    ours = erasekit.load(flux_folder, device="cpu")
    x, t, cond = inputs(ours)
    with torch.no_grad():
        base = ours.raw(x, t, cond)
        with Delta.load(lora_delta, base=ours).applied(ours):
            erased = ours.raw(x, t, cond)
    stock = erasekit.load(flux_folder, device="cpu")  # its .pipe is a stock FluxPipeline
    stock.pipe.load_lora_weights(str(lora_delta))
    assert any("lora_A" in n for n, _ in stock.pipe.transformer.named_parameters())
    with torch.no_grad():
        theirs = stock.raw(x, t, cond)
    assert not torch.allclose(base, erased, atol=1e-5)
    assert torch.allclose(theirs, erased, atol=1e-5)


def test_the_delta_merges_as_w_plus_b_a_and_reads_as_foreign_lora_too(flux_folder, lora_delta, tmp_path):
    model = erasekit.load(flux_folder, device="cpu")
    delta = Delta.load(lora_delta, base=model)
    factors = load_file(str(lora_delta))
    assert delta.is_lora and set(delta.tensors) == set(factors)
    assert all(k.startswith("transformer.transformer_blocks.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
               for k in factors)
    name = "transformer_blocks.1.attn.add_k_proj"
    down, up = factors[f"transformer.{name}.lora_A.weight"], factors[f"transformer.{name}.lora_B.weight"]
    assert down.shape[0] == up.shape[1] == 4 and up.abs().max() > 0
    expected = model.parameter(f"{name}.weight").detach() + up @ down
    assert torch.allclose(delta.values(model)[f"{name}.weight"], expected, atol=1e-6)
    plain = tmp_path / "peft.safetensors"  # the same factors without erasekit's metadata: a foreign LoRA
    save_file(factors, str(plain))
    foreign = Delta.load(plain, base=model)
    assert foreign.is_foreign and torch.allclose(foreign.tensors[f"{name}.weight"], expected, atol=1e-6)
    other = erasekit.load(make_tiny_flux(tmp_path / "other", seed=1, blocks=2), device="cpu")
    with pytest.raises(erasekit.UserError, match="made for base model"):
        delta.check(other)


def test_lora_training_holds_the_base_once(flux_folder):
    """The trained tensors are the factors alone: the teacher keeps their starting values, not the weights'."""
    model = erasekit.load(flux_folder, device="cpu")
    cfg = esd.ESDConfig(parameters="esd-x", **SMALL)
    named, frozen = trainable(model, cfg)
    try:
        adapted = [model.parameter(k) for k in frozen.lora.targets]
        factor_numel = sum(v.numel() for v in named.values())
        assert factor_numel == sum(4 * (w.shape[0] + w.shape[1]) for w in adapted)
        assert set(frozen.start) == set(named) and frozen.values == {}
        x, t, cond = inputs(model)
        with torch.no_grad():
            named[next(k for k in named if k.endswith("lora_B.weight"))].fill_(0.1)
            student, teacher = model.raw(x, t, cond), frozen.raw(x, t, cond)
        assert not torch.allclose(student, teacher, atol=1e-5)  # the hooks act; the teacher switches them off
    finally:
        frozen.release()
    with torch.no_grad():
        assert torch.equal(model.raw(x, t, cond), teacher)


def test_stock_sd_pipeline_loads_an_sd_lora_delta(tiny_sd, tmp_path):
    model = erasekit.load(tiny_sd, device="cpu")
    path = tmp_path / "sd-lora.safetensors"
    delta = esd.erase(model, SPEC, esd.ESDConfig(parameters="esd-x-strict", **SMALL))
    delta.save(path)
    assert all(k.startswith("unet.") for k in delta.tensors)
    x = torch.randn(1, *model.latent_shape)
    cond = model.encode(["a cat"]).cond
    with torch.no_grad(), Delta.load(path, base=model).applied(model):
        erased = model.raw(x, 500, cond)
    stock = erasekit.load(tiny_sd, device="cpu")
    stock.pipe.load_lora_weights(str(path))
    with torch.no_grad():
        assert torch.allclose(stock.raw(x, 500, cond), erased, atol=1e-5)


def test_apply_names_the_stock_lora_loader_for_a_lora_delta(flux_folder, lora_delta, capsys):
    from erasekit.cli import main

    main(["apply", str(flux_folder), "--delta", str(lora_delta)])
    out = capsys.readouterr().out
    assert "applies cleanly" in out and "pipe.load_lora_weights(PATH)" in out
    assert "load_state_dict" not in out  # the full-tensor note does not apply to factors
