"""Closed-form methods on a tiny SD pipeline and the testbed: each edit does what its objective says."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

import erasekit
from erasekit import UserError, methods
from erasekit.concepts import Concept, ConceptSpec
from erasekit.methods import erasepro, rece, trce, uce
from erasekit.methods.common import KVStack, paired_rows, single_rows
from erasekit.testbed.world import VALUES
from erasekit.testing import make_tiny_ip_adapter

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from naive_uce import naive_uce  # noqa: E402


@pytest.fixture(scope="module")
def model(tiny_sd):
    return erasekit.load(tiny_sd)


@pytest.fixture(scope="module")
def spec():
    return ConceptSpec([Concept("cat", ["kitten"])], anchors=["dog"], preserve=["star", "red car"], expand=True)


def stacked(delta, kv):
    return torch.cat([delta.tensors[n].double() for n in kv.names])


def test_uce_matches_the_public_code_structure(model, spec):
    delta = uce.erase(model, spec)
    pairs = [(p.target, p.anchor) for p in spec.pairs()]
    ref = naive_uce(model, pairs, spec.preserve_prompts(), dtype=torch.float64)
    for name, value in ref.items():
        rel = (delta.tensors[name] - value).norm() / value.norm()
        assert rel < 1e-5, (name, float(rel))
    assert delta.method == "uce" and delta.stats["erase_keys"] == 12 and delta.stats["layers"] == 8  # 2 x (bare + 5)


def test_uce_maps_targets_to_guides_and_keeps_preserved(model, spec):
    delta = uce.erase(model, spec, uce.UCEConfig(lam=0.05))
    kv = KVStack(model)
    keys, guides, keep = uce.erase_keys(model, spec, "key")
    w = stacked(delta, kv)
    before = (kv.values(keys) - kv.values(guides)).norm()
    after = (kv.values(keys, w) - kv.values(guides)).norm()
    drift = (kv.values(keep, w) - kv.values(keep)).norm() / kv.values(keep).norm()
    assert after < 0.2 * before and drift < 0.1


def test_rece_adds_derived_keys_and_stops_them_regenerating(model, spec):
    delta = rece.erase(model, spec, rece.RECEConfig(epochs=2))
    rounds = delta.stats["rounds"]
    assert len(rounds) == 2 and delta.stats["erase_keys"] > 10
    assert all(r["regeneration_error_after"] > r["regeneration_error_before"] for r in rounds)
    assert not torch.allclose(delta.tensors[KVStack(model).names[0]], uce.erase(model, spec).tensors[
        KVStack(model).names[0]])


def test_erasepro_zero_residual_and_per_layer_record(model):
    spec = ConceptSpec([Concept("cat", ["kitten"])], anchors=["dog"], expand=True)  # 24 rows <= d = 32
    delta = erasepro.erase(model, spec)
    rows = delta.stats["per_layer"]
    assert len(rows) == len(model.text_mlp_layers()) + 1
    assert all(r["residual"] < 1e-4 for r in rows)
    # the final K/V edit maps the (text-edited) target rows exactly onto the original outputs for the anchors
    with delta.applied(model):
        t = model.encode([p.target for p in spec.pairs()])
        a = model.encode([p.anchor for p in spec.pairs()])
        x, y = paired_rows(t, a, "key+eot")
        kv_now = KVStack(model)
    kv0 = KVStack(model)
    assert torch.allclose(kv_now.values(x), kv0.values(y), atol=1e-3 * kv0.values(y).abs().max())
    kv_only = erasepro.erase(model, spec, erasepro.EraseProConfig(layers="kv"))
    assert len(kv_only.stats["per_layer"]) == 1 and not any(k.startswith("text_encoder") for k in kv_only.tensors)


@pytest.mark.parametrize("positions", ["key+eot", "phrase"])
def test_erasepro_stream_match_makes_the_first_layers_hidden_state_the_anchors(model, positions):
    """match='stream': after the first text layer the target rows hold what the anchor's held in the
    original model (the projection's output and what skips around it); match='output' leaves the skip's
    difference in place."""
    spec = ConceptSpec([Concept("cat", ["kitten"])], anchors=["dog"], expand=True)
    pairs = spec.pairs()
    layer0 = next(m for n, m in model.text_encoder.named_modules() if n.endswith("encoder.layers.0"))

    def first_layer_rows(prompts_t, prompts_a):
        out = {}
        for name, prompts in (("t", prompts_t), ("a", prompts_a)):
            seen = []
            handle = layer0.register_forward_hook(
                lambda m, args, o, seen=seen: seen.append((o[0] if isinstance(o, tuple) else o).detach()))
            try:
                enc = model.encode(prompts)
            finally:
                handle.remove()
            out[name] = enc.__class__(**{**enc.__dict__, "embeddings": seen[0]})
        return paired_rows(out["t"], out["a"], positions)

    _, wanted = first_layer_rows([p.target for p in pairs], [p.anchor for p in pairs])
    for match, close in (("stream", True), ("output", False)):
        delta = erasepro.erase(model, spec, erasepro.EraseProConfig(layers="text", positions=positions, match=match))
        assert all(r["residual"] < 1e-4 for r in delta.stats["per_layer"])
        with delta.applied(model):
            got, _ = first_layer_rows([p.target for p in pairs], [p.anchor for p in pairs])
        err = float((got - wanted).norm() / wanted.norm())
        assert (err < 1e-4) if close else (err > 1e-2), (match, err)
    with pytest.raises(UserError, match="match"):
        erasepro.EraseProConfig(match="hidden")


def test_erasepro_warns_when_targets_exceed_the_feature_dimension(model):
    spec = ConceptSpec([Concept("cat", ["kitten", "kitty", "tomcat"])], anchors=["dog"], expand=True)  # 40 > 32
    with pytest.warns(UserWarning, match="residual cannot be zero"):
        delta = erasepro.erase(model, spec, erasepro.EraseProConfig(layers="kv"))
    assert delta.stats["per_layer"][0]["residual"] > 1e-4


def test_trce_stage1_maps_eot_rows_and_caches_its_prior(model, spec, tmp_path):
    captions = ["a red car", "a dog on grass", "a photo of a star", "a cat"] * 10
    cfg = trce.TRCEStage1Config(prior_cache=str(tmp_path / "prior.safetensors"))
    delta = trce.erase_stage1(model, spec, captions, cfg)
    assert delta.stats["prior"]["cached"] is False and delta.stats["pairs"] == 2 * 15
    again = trce.erase_stage1(model, spec, captions, cfg)
    assert again.stats["prior"]["cached"] is True
    kv = KVStack(model)
    malicious, safe = trce.stage1_pairs(spec, "trce")
    m, s = paired_rows(model.encode(malicious), model.encode(safe), "eot")
    w = stacked(delta, kv)
    assert (kv.values(m, w) - kv.values(s)).norm() < 0.5 * (kv.values(m) - kv.values(s)).norm()
    for name in delta.tensors:
        assert torch.equal(delta.tensors[name], again.tensors[name])
    with pytest.raises(UserError, match="preservation caption list"):
        trce.erase(model, spec)  # a real model has no default caption list


FAST = {"steps": "2", "progress": "false", "sampler_steps": "3", "trajectory_steps": "4", "saliency_prompts": "2",
        "warmup_steps": "1", "attack_steps": "2"}


def fast_values(method, extra: dict) -> dict:
    """Small fine-tuning settings, keeping only the keys the method (or its parts) has."""
    import dataclasses

    names = {f.name for part in (method.parts or (method,)) for f in dataclasses.fields(part.config)}
    return {k: v for k, v in {**FAST, **extra}.items() if k in names}


def test_every_method_erases_several_concepts_at_once(model, tmp_path):
    spec = ConceptSpec(["cat", "star"], anchors=["dog", "circle"])
    captions = tmp_path / "captions.txt"
    captions.write_text("a red car\na dog\n" * 5)
    for name in methods.names():
        method = methods.get(name)
        if name == "trce-stage1":
            delta = trce.erase_stage1(model, spec, ["a red car", "a dog"] * 5, method.config(prior_prompts=None))
        elif name == "co-erasing":  # on Stable Diffusion its image tokens come from an IP-Adapter folder
            adapter = make_tiny_ip_adapter(tmp_path / "ip-adapter")
            delta = method.erase(model, spec, methods.build_config(method, fast_values(
                method, {"image_encoder": str(adapter), "images": "2"})))
        elif method.fine_tuning or method.parts:
            cfg = methods.build_config(method, fast_values(method, {"prior_prompts": str(captions)}))
            delta = method.erase(model, spec, cfg)
        else:
            delta = method.erase(model, spec, method.config())
        config = delta.config[method.parts[-1].name] if method.parts else delta.config
        assert len(delta.tensors) >= 8 and config["spec"]["targets"][1]["name"] == "star", name


def test_methods_on_the_testbed_find_its_layers():
    testbed = erasekit.load("testbed")
    spec = ConceptSpec(["star"], preserve=["circle"])
    delta = uce.erase(testbed, spec)
    assert len(delta.tensors) == 20  # K and V of 10 cross-attention blocks (16x16, 8x8, 4x4 and the middle)
    assert len(testbed.text_mlp_layers()) == 6
    rows = single_rows(testbed.encode(["a star"]), "key")
    assert rows.shape == (1, 384)


def test_method_registry_and_config_errors():
    with pytest.raises(UserError, match="unknown method 'esd-magic'"):
        methods.get("esd-magic")
    method = methods.get("uce")
    cfg = methods.build_config(method, {"lam": "0.25", "synonyms": "false"})
    assert cfg.lam == 0.25 and cfg.synonyms is False
    with pytest.raises(UserError, match=r"unknown keys \['lambda'\]"):
        methods.build_config(method, {"lambda": 1})
    with pytest.raises(UserError, match="cannot read"):
        methods.build_config(method, {"lam": "big"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        methods.build_config(methods.get("trce-stage1"), {"prior_cache": "none"})


def test_method_variants_carry_their_settings():
    method, values = methods.variant("uce:positions=all, lam=0.1")
    assert method.name == "uce" and values == {"positions": "all", "lam": "0.1"}
    assert methods.build_config(method, values).positions == "all"
    assert methods.variant("rece")[1] == {}
    for name in ("uce", "rece"):  # the testbed's bidirectional encoder: every aligned row; elsewhere [KEY]
        assert methods.build_config(methods.get(name), {}, testbed=True).positions == "aligned"
        assert methods.build_config(methods.get(name), {}).positions == "key"
        assert methods.build_config(methods.get(name), {"positions": "key"}, testbed=True).positions == "key"
    assert methods.build_config(methods.get("erasepro"), {}, testbed=True).positions == "phrase"
    assert methods.build_config(methods.get("erasepro"), {}).positions == "key+eot"
    # TRCE: caption templates and every aligned row on the testbed, both stages; [EoT] of its own templates elsewhere
    s1, s2 = methods.build_config(methods.get("trce"), {}, testbed=True)
    assert (s1.templates, s1.positions, s2.templates, s2.reference, s2.preserve) == (
        "spec", "aligned", "spec", "original", "spec")
    s1, s2 = methods.build_config(methods.get("trce"), {})
    assert (s1.templates, s1.positions, s2.templates, s2.preserve) == ("trce", "eot", "trce", "empty")
    with pytest.raises(UserError, match="preserve set"):
        methods.build_config(methods.get("trce-stage2"), {"preserve": "all"})
    # the ESD family trains on captions against their anchors there; SCORE keeps its own preservation term
    esd_cfg, score_cfg = (methods.build_config(methods.get(n), {}, testbed=True) for n in ("esd", "score"))
    assert (esd_cfg.guide, esd_cfg.preserve_weight, score_cfg.guide, score_cfg.preserve_weight) == (
        "anchor", 1.0, "anchor", 0.0)
    assert methods.build_config(methods.get("esd"), {}).guide == "empty"
    with pytest.raises(UserError, match="traj_weight"):
        methods.build_config(methods.get("score"), {"preserve_weight": "1"})
    with pytest.raises(UserError, match="KEY=VALUE"):
        methods.variant("uce:positions")


def test_aligned_positions_pair_every_row_around_the_differing_phrase():
    from erasekit.model import Encoded

    def encoded(ids, length=8):
        n = len(ids)
        padded = torch.zeros(n, length, dtype=torch.long)
        for i, row in enumerate(ids):
            padded[i, :len(row)] = torch.tensor(row)
        # each row's embedding says where it came from: (prompt, position)
        emb = torch.stack([torch.stack([torch.tensor([float(i), float(k)]) for k in range(length)]) for i in range(n)])
        eot = torch.tensor([len(row) - 1 for row in ids])
        return Encoded([str(r) for r in ids], emb, padded, padded != 0, eot, [False] * n)

    # [CLS] a red <circle circle> on black [SEP] vs [CLS] a red <square> on black [SEP]
    target = encoded([[101, 1, 2, 7, 7, 3, 4, 102]], length=10)
    anchor = encoded([[101, 1, 2, 9, 3, 4, 102]], length=10)
    t, a = paired_rows(target, anchor, "aligned")
    pairs = [(int(x[1]), int(y[1])) for x, y in zip(t, a)]
    assert pairs[:3] == [(0, 0), (1, 1), (2, 2)]  # shared prefix, one to one
    assert pairs[3:5] == [(3, 3), (4, 3)]  # both phrase rows -> the anchor phrase's row
    assert pairs[5:8] == [(5, 4), (6, 5), (7, 6)]  # shared suffix through [SEP], aligned from the end
    assert pairs[8:] == [(8, 7), (9, 8)]  # padding by offset from [SEP]
    empty = encoded([[101, 1, 2, 3, 4, 102]], length=10)  # the empty anchor: the phrase maps to the last prefix row
    assert [(int(x[1]), int(y[1])) for x, y in zip(*paired_rows(target, empty, "aligned"))][3:5] == [(3, 2), (4, 2)]
    # the phrase modes keep the differing phrase's rows (and [SEP]) out of the same pairing
    assert [(int(x[1]), int(y[1])) for x, y in zip(*paired_rows(target, anchor, "phrase"))] == [(3, 3), (4, 3)]
    assert [(int(x[1]), int(y[1])) for x, y in zip(*paired_rows(target, anchor, "phrase+eot"))] == [
        (3, 3), (4, 3), (7, 6)]
    # a prompt with no anchor has no phrase: its every row through [SEP] stands for it
    assert [int(x[1]) for x in single_rows(target, "phrase")] == list(range(8))


def test_the_testbed_erasure_spec_writes_captions_with_a_sibling_anchor():
    from erasekit.testbed.spec import erasure_spec

    spec = erasure_spec(["circle"])
    pair = spec.pairs()[0]
    assert spec.anchors == ["square"] and "circle" not in spec.preserve and len(spec.preserve) == 4
    assert pair.target.replace("circle", "square") == pair.anchor and pair.target.count(" ") >= 4
    multi = erasure_spec(["red", "striped"])
    assert multi.anchors == ["green", "solid"] and all(",," not in t for t in multi.templates)
    assert erasure_spec(["grass"]).anchors == ["on a black background"]


def test_uce_on_every_aligned_row_erases_a_testbed_shape():
    """The testbed's encoder spreads the shape word over the caption: the aligned edit removes circle
    from canonical prompts and keeps the other shapes (0.03 and preservation 1.000 on 32 prompts,
    docs/results/closed_form.md)."""
    from erasekit.testbed.evaluate import generate, judge_verdicts
    from erasekit.testbed.judge import load_judge
    from erasekit.testbed.prompts import concept_prompts, preservation_prompts
    from erasekit.testbed.spec import erasure_spec

    testbed, judge = erasekit.load("testbed"), load_judge()
    target, keep = concept_prompts("circle", "canonical", 8), preservation_prompts(["circle"], 8)
    delta = uce.erase(testbed, erasure_spec(["circle"]), uce.UCEConfig(positions="aligned"))
    with delta.applied(testbed):
        verdicts = judge_verdicts(judge, generate(testbed, target + keep))["shape"]
    circle = VALUES["shape"].index("circle")
    assert float((verdicts[:8] == circle).float().mean()) <= 0.25
    kept = torch.tensor([VALUES["shape"].index(p.values["shape"]) for p in keep])
    assert float((verdicts[8:] == kept).float().mean()) >= 0.75


def test_erase_help_lists_every_method_and_composition(capsys):
    """The light name table `erase --help` reads agrees with the registry, and the help names every method."""
    registry = {name: methods.get(name) for name in methods.names()}
    assert [n for n, m in registry.items() if not m.parts and not m.fine_tuning] == list(methods.CLOSED_FORM)
    assert [n for n, m in registry.items() if not m.parts and m.fine_tuning] == list(methods.FINE_TUNING)
    assert {n: "+".join(p.name for p in m.parts) for n, m in registry.items() if m.parts} == methods.COMPOSED
    from erasekit.cli import main

    with pytest.raises(SystemExit):
        main(["erase", "--help"])
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps the help
    for name in registry:
        assert name in shown, name
    assert "A+B" in shown and "uce+esd" in shown
    assert methods.get("uce+esd").parts == (registry["uce"], registry["esd"])  # the example given is valid
