"""FLUX.1 closed-form edits and attacks on tiny pipelines: UCE's two text projections (each solved with its own
inputs), the dual-stream blocks' add_k/add_v option, RECE, deltas in a stock transformer, and UnlearnDiffAtk,
P4D and Ring-A-Bell in FLUX's flow convention."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import erasekit
from cli_helpers import run
from erasekit.attacks.common import frozen
from erasekit.attacks.tokens import attack_vocabulary, content_ids, embedding_table, encode_ids, slot_prompt
from erasekit.concepts import Concept, ConceptSpec
from erasekit.methods import rece, uce
from erasekit.testing import make_tiny_flux

JUDGES = '''
import torch
from erasekit.evaluation.judges import Judge

class Never(Judge):
    """Flags nothing, so every prompt is attacked."""
    def __init__(self):
        self.name, self.threshold, self.concepts, self.calls = "never", 0.5, ("cat",), 0
    def record(self):
        return {"name": self.name}
    def scores(self, images):
        return {"cat": torch.zeros(images.shape[0])}

class FirstCall(Never):
    """Flags the images of its first call (the original model's) only, so every prompt is ideal for P4D."""
    def scores(self, images):
        self.calls += 1
        return {"cat": torch.full((images.shape[0],), float(self.calls == 1))}
'''

SPEC = ConceptSpec([Concept("cat")], anchors=["a dog"], preserve=["a red star"])
TEXT = ("context_embedder.weight", "time_text_embed.text_embedder.linear_1.weight")


@pytest.fixture(scope="module", params=["dev", "schnell"])
def flux_folder(request, tmp_path_factory) -> Path:
    return make_tiny_flux(tmp_path_factory.mktemp(f"flux_{request.param}") / "flux", guidance=request.param == "dev",
                          blocks=2)


@pytest.fixture(scope="module")
def flux(flux_folder):
    return erasekit.load(flux_folder, device="cpu")


@pytest.fixture
def judges(tmp_path, monkeypatch) -> str:
    (tmp_path / "erasekit_flux_judges.py").write_text(JUDGES)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "erasekit_flux_judges"


def uce_gradient(w, w0, keys, values, preserve, lam):
    """The gradient of UCE's objective lam ||W - W0||^2 + sum ||W c - v*||^2 + sum ||W p - W0 p||^2 (halved)."""
    return lam * (w - w0) + (keys @ w.T - values).T @ keys + (preserve @ (w - w0).T).T @ preserve


def test_uce_edits_both_text_projections_each_at_the_minimum_of_its_own_objective(flux):
    delta = uce.erase(flux, SPEC)
    assert sorted(delta.tensors) == sorted(TEXT)
    assert delta.stats["erase_keys_per_input"] == {"context": 1, "pooled": 1}
    enc = flux.encode(["cat", "a dog", "a red star"])
    pooled = flux.pooled(enc.cond).double()
    key = enc.rows(enc.key).double()  # [KEY]: the last content token (T5 has no begin token)
    for name, rows in zip(TEXT, (key, pooled)):
        w0, w = flux.parameter(name).detach().double(), delta.tensors[name].double()
        grad = uce_gradient(w, w0, rows[:1], rows[1:2] @ w0.T, rows[2:], lam=0.5)
        assert not torch.allclose(w, w0) and grad.norm() < 1e-5 * (w - w0).norm(), name


def test_uce_maps_the_concepts_pooled_embedding_to_the_anchors_output(flux):
    delta = uce.erase(flux, ConceptSpec([Concept("cat")], anchors=["a dog"]), uce.UCEConfig(lam=1e-6))
    enc = flux.encode(["cat", "a dog"])
    linear, embedder = flux.unet.time_text_embed.text_embedder.linear_1, flux.unet.context_embedder
    pooled = flux.pooled(enc.cond)
    with torch.no_grad():
        before, context_before = linear(pooled), embedder(enc.embeddings)
        with delta.applied(flux):
            after, context_after = linear(pooled), embedder(enc.embeddings)
    key = enc.key.tolist()
    assert (before[0] - before[1]).norm() > 0.1 * before[1].norm()  # the two prompts' outputs differ to start with
    assert torch.allclose(after[0], before[1], atol=1e-4)  # the layer's output, bias included, is the anchor's
    assert torch.allclose(context_after[0, key[0]], context_before[1, key[1]], atol=1e-4)


def test_a_flux_delta_in_a_stock_transformer_makes_erasekits_image(flux, flux_folder):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    delta = uce.erase(flux, SPEC, uce.UCEConfig(layers="text+blocks"))
    assert len(delta.tensors) == 2 + 4
    stock = FluxTransformer2DModel.from_pretrained(flux_folder / "transformer")
    loaded = stock.load_state_dict(delta.tensors, strict=False)
    assert not loaded.unexpected_keys
    pipe = FluxPipeline.from_pretrained(flux_folder, transformer=stock, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    with delta.applied(flux):
        mine = flux.sample(["a cat"], [3], steps=3, progress=False)
    size = mine.shape[-1]
    theirs = pipe(["a cat"], num_inference_steps=3, guidance_scale=flux.sampler_defaults["guidance"],
                  latents=flux.initial_noise([3]), output_type="pt", height=size, width=size,
                  max_sequence_length=flux.max_length).images
    unedited = flux.sample(["a cat"], [3], steps=3, progress=False)
    assert torch.allclose(mine, theirs, atol=1e-5) and not torch.allclose(mine, unedited, atol=1e-3)


def test_the_block_option_edits_every_add_k_and_add_v_from_the_inputs_they_read(flux):
    blocks = [f"transformer_blocks.{i}.attn.add_{k}_proj.weight" for i in (0, 1) for k in "kv"]
    spec = ConceptSpec([Concept("cat")], anchors=["a dog"])
    delta = uce.erase(flux, spec, uce.UCEConfig(layers="blocks", lam=1e-6))
    assert sorted(delta.tensors) == sorted(blocks)
    assert not set(blocks) & set(uce.erase(flux, spec).tensors)  # not in the default set
    assert delta.stats["erase_keys_per_input"] == {"stream:0": 4, "stream:1": 4}  # [KEY] at each of 4 steps
    attn = flux.unet.transformer_blocks[0].attn
    enc = flux.encode(["cat", "a dog"])

    def first_step_kv(cond):  # block 0's K and V of the text stream at the first of the 4 sampling steps
        seen = []
        hooks = [m.register_forward_hook(lambda m, i, o: seen.append(o.detach())) for m in (attn.add_k_proj,
                                                                                           attn.add_v_proj)]
        try:
            flux.denoise(flux.initial_noise([0]), cond, None, 4, flux.sampler_defaults["guidance"], stop=1)
        finally:
            for hook in hooks:
                hook.remove()
        return seen

    anchor = first_step_kv(enc.cond[1:2])
    with delta.applied(flux):
        target = first_step_kv(enc.cond[:1])
    key = enc.key.tolist()
    for got, wanted in zip(target, anchor):  # block 0 reads no edited layer: the target's [KEY] gives the anchor's
        assert torch.allclose(got[0, key[0]], wanted[0, key[1]], atol=1e-4)
    assert not torch.allclose(target[0][0, key[0] + 1], anchor[0][0, key[1] + 1], atol=1e-3)  # [EoT] not edited


def test_rece_solves_each_input_of_flux_with_its_own_derived_embeddings(flux):
    cfg = rece.RECEConfig(epochs=2)
    delta = rece.erase(flux, SPEC, cfg)
    plain = uce.erase(flux, SPEC, uce.UCEConfig(lam=cfg.lam))
    assert sorted(delta.tensors) == sorted(TEXT)
    assert set(delta.stats["rounds_per_input"]) == {"context", "pooled"}
    for name in TEXT:  # the derived embeddings are extra keys: the solve is not UCE's
        assert not torch.allclose(delta.tensors[name], plain.tensors[name], atol=1e-6), name
    blocks = rece.erase(flux, SPEC, rece.RECEConfig(epochs=1, layers="blocks"))
    assert len(blocks.tensors) == 4 and set(blocks.stats["rounds_per_input"]) == {"stream:0", "stream:1"}


def test_an_unknown_layer_set_is_one_line(flux):
    with pytest.raises(erasekit.errors.UserError, match="no layer set 'kv'.*default, text, blocks"):
        uce.erase(flux, SPEC, uce.UCEConfig(layers="text+kv"))


# --- attacks ------------------------------------------------------------------------------------------


def test_flux_losses_are_the_flow_at_the_samplers_noise_levels(flux):
    torch.manual_seed(0)
    x0, noise = torch.randn(2, *flux.latent_shape), torch.randn(2, *flux.latent_shape)
    t = torch.tensor([250.0, 750.0])
    x_t = flux.add_noise(x0, noise, t)
    assert torch.allclose(x_t[0], 0.75 * x0[0] + 0.25 * noise[0], atol=1e-6)
    p = flux.convert(x_t, t, flux.target(x0, noise, t))  # the target is the velocity that inverts the flow
    assert torch.allclose(p.x0, x0, atol=1e-5) and torch.allclose(p.eps, noise, atol=1e-5)
    steps = 5
    unshifted = (1000 * np.linspace(1.0, 1 / steps, steps)).tolist()
    got = torch.tensor(flux.loss_timesteps(unshifted[::-1], x0))  # any order in, the same order out
    assert torch.allclose(got.flip(0), flux.timesteps(steps), atol=1e-3)
    assert abs(flux.loss_timesteps([500], x0)[0] - 500) > 10  # the resolution shift moves the level


def test_t5_prompts_take_substituted_tokens_and_whole_word_pieces(flux):
    ids, mask, _ = flux.tokenize(["a red star on a white background"])
    table = embedding_table(flux)
    with frozen(flux):
        embeds = table(ids).detach().clone().requires_grad_()
        states = encode_ids(flux, ids, mask, lambda table, k: embeds)
        assert torch.allclose(states, flux.encode(["a red star on a white background"]).cond, atol=1e-5)
        states.pow(2).sum().backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0  # T5's tied embed_tokens reads the substitutes
    tok = flux.tokenizer
    vocab = attack_vocabulary(flux).tolist()
    pieces = tok.convert_ids_to_tokens(vocab)
    assert "\u2581cat" in pieces and all(p.startswith("\u2581") and p[1:].isalpha() and len(p) > 2 for p in pieces)
    assert content_ids(flux, tok.decode(vocab)) == vocab  # they decode and tokenize back, as one prompt too
    sp = slot_prompt(flux, [None, *content_ids(flux, "a cat")])
    assert sp.slots.tolist() == [0] and sp.ids[3] == tok.eos_token_id and sp.mask.sum() == 4  # no begin token


def attack_cli(capsys, folder, tmp_path, judge, attack, *settings, suite=None):
    delta = tmp_path / "uce.safetensors"
    if not delta.exists():
        assert run(capsys, "erase", folder, "--method", "uce", "--concept", "cat", "--out", delta)[0] == 0
    if suite is None:
        suite = tmp_path / "cats.txt"
        suite.write_text("a cat\na photo of a cat\n")
    out = tmp_path / attack
    code, _, err = run(capsys, "attack", folder, "--delta", delta, "--attack", attack, "--suite", suite, "--concept",
                       "cat", "--judge", judge, "--steps", "2", *settings, "--out", out)
    assert code == 0, err
    return json.loads((out / "results.json").read_text())


def test_unlearndiff_p4d_and_ringabell_run_on_flux(flux, flux_folder, tmp_path, capsys, judges):
    found = attack_cli(capsys, flux_folder, tmp_path, f"{judges}:Never", "unlearndiff", "--set", "iterations=2",
                       "--set", "timesteps=2")
    p4d = attack_cli(capsys, flux_folder, tmp_path, f"{judges}:FirstCall", "p4d-n", "--set", "iterations=3",
                     "--set", "n_tokens=4")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("sensitive prompt,normal prompt\na cat on a car,a dog on a car\n"
                     "a photo of a cat,a photo of a dog\n")
    ring = attack_cli(capsys, flux_folder, tmp_path, f"{judges}:Never", "ringabell", "--set", "generations=2",
                      "--set", "population=8", suite=pairs)
    assert found["protocol"]["model"]["family"] == "flux"
    for results in (found, p4d, ring):
        assert results["attacked"] == 2
        for record in results["prompts"]:  # every answer is a T5 prompt that tokenizes back to what was found
            ids = flux.tokenizer(record["adversarial_prompt"]).input_ids
            assert ids == [i for i in record["adversarial_ids"] if i != flux.tokenizer.pad_token_id], record
    assert all(r["adversarial_prompt"].endswith("cat") for r in found["prompts"])  # a prefix before the prompt
    assert all(len(r["adversarial_ids"]) - r["adversarial_ids"].count(0) == 4 + 1 for r in p4d["prompts"])
