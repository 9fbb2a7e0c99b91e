"""Published defaults and prompt building (UCE, RECE, ESD, Co-Erasing, TRCE), fixed so that a change to them is
deliberate; the public setting names as aliases; one encode per distinct prompt. docs/METHODS.md, "Defaults beside the
public code"."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

import erasekit
from erasekit import methods
from erasekit.concepts import ConceptSpec
from erasekit.methods import rece, uce

ART = ("painting by {}", "art by {}", "artwork by {}", "picture by {}", "style of {}")
OBJECT = ("image of {}", "photo of {}", "portrait of {}", "picture of {}", "painting of {}")


def public_prompt_lists(concepts, guides, preserve, templates):
    """The lists trainscripts/uce_sd_erase.py builds with --expand_prompts true (read, not copied): every concept
    bare, then each concept's templated prompts; the guides the same way; preserve concepts as given."""
    edit, guide = list(concepts), list(guides)
    for c, g in zip(concepts, guides):
        edit += [t.format(c) for t in templates]
        guide += [" ".join(t.format(g).split()) for t in templates]
    return edit, guide, list(preserve)


def defaults(config) -> dict:
    return {f.name: f.default for f in dataclasses.fields(config)}


def test_uce_defaults_are_the_public_codes():
    """--lamb 0.5, --erase_scale 1, --preserve_scale 1 (argparse defaults), the key at attention_mask.sum() - 2; the
    family's default layers (uce_flux_edit.py's two text projections on FLUX)."""
    assert defaults(uce.UCEConfig) == {"lam": 0.5, "erase_scale": 1.0, "preserve_scale": 1.0, "positions": "key",
                                       "synonyms": True, "layers": "default", "feature_steps": 4}
    assert methods.get("uce").aliases == {"lamb": "lam", "guided_concepts": "anchor"}


def test_rece_defaults_are_fixed():
    """RECE's README nudity command: --lamb 0.1, --epochs 3, --erase_scale 1; erasekit's mu is train_artists.py's
    --regular_scale 1e-3 and its preserve_scale 1 differs from the README's 0.1 (named in METHODS)."""
    assert defaults(rece.RECEConfig) == {"lam": 0.1, "erase_scale": 1.0, "preserve_scale": 1.0, "positions": "key",
                                         "synonyms": True, "epochs": 3, "mu": 1e-3, "toward_concept": False,
                                         "layers": "default", "feature_steps": 4}
    assert methods.get("rece").aliases == {"lamb": "lam", "regular_scale": "mu", "guided_concepts": "anchor"}


@pytest.mark.parametrize("templates, guide, set_name", [(ART, "art", "art"), (OBJECT, "", "object")])
def test_expand_builds_the_public_prompt_lists(templates, guide, set_name):
    concepts, preserve = ["Van Gogh", "Kelly McKernan"], ["Monet", "Picasso"]
    spec = ConceptSpec(concepts, preserve=preserve, templates=set_name, expand=True)
    assert spec.anchors == [guide]  # the public default guide for the concept type
    edit, guides, keep = public_prompt_lists(concepts, [guide] * 2, preserve, templates)
    pairs = spec.pairs()
    assert sorted((p.target, p.anchor) for p in pairs) == sorted(zip(edit, guides))  # the solve is a sum: order-free
    assert spec.preserve_prompts() == keep
    assert [p.target for p in pairs[:6]] == ["Van Gogh", *(t.format("Van Gogh") for t in templates)]


def test_key_position_is_the_public_codes(tiny_sd):
    """The public code reads the row at attention_mask.sum() - 2: the last content token (the start token for '')."""
    model = erasekit.load(tiny_sd)
    prompts = ["Van Gogh", "painting by Van Gogh", "", "a photo of a red car"]
    enc = model.encode(prompts)
    assert enc.key.tolist() == (enc.attention_mask.sum(1) - 2).clamp(min=0).tolist()


def count_encoded(model):
    """Wrap the text encoder's forward: the list of batch sizes it was called with."""
    calls, forward = [], model.text_encoder.forward

    def counting(input_ids, *args, **kwargs):
        calls.append(int(input_ids.shape[0]))
        return forward(input_ids, *args, **kwargs)

    model.text_encoder.forward = counting
    return calls, forward


def test_a_100_concept_uce_edit_encodes_each_distinct_prompt_once():
    """100 targets, one shared anchor '' and 5 preserve concepts: 106 distinct prompts (205 were encoded before),
    in one batched call per 64 prompts."""
    model = erasekit.load("testbed")
    words = "apple ball cat dog egg fig goat hat ink jam kite lamp moon nest owl pig queen rose sun tree".split()
    concepts = [f"{a} {b}" for a in words for b in words if a != b][:100]
    preserve = ["a photo of a vase", "a whale", "a box", "a yak", "a zebra"]
    spec = ConceptSpec(concepts, preserve=preserve)
    calls, forward = count_encoded(model)
    try:
        delta = uce.erase(model, spec)
    finally:
        model.text_encoder.forward = forward
    assert sum(calls) == 106 == len(set(concepts) | {""} | set(preserve)) and len(calls) == 2  # 64 + 42
    assert delta.stats["erase_keys"] == 100 and delta.stats["preserve_keys"] == 5


def test_rece_encodes_its_concept_names_with_the_uce_prompts(tiny_sd):
    """RECE reads each target name's rows again after the UCE solve: those come from the same encodings."""
    model = erasekit.load(tiny_sd)
    spec = ConceptSpec(["cat", "dog"], anchors=["car"], preserve=["star"], expand=True)
    calls, forward = count_encoded(model)
    try:
        rece.erase(model, spec, rece.RECEConfig(epochs=1))
    finally:
        model.text_encoder.forward = forward
    distinct = {p.target for p in spec.pairs()} | {p.anchor for p in spec.pairs()} | {"star"}
    assert sum(calls) == len(distinct) == 2 * 6 + 6 + 1 and len(calls) == 1


def test_the_encoded_rows_equal_separate_encodes(tiny_sd):
    """Sharing encodings changes no number: the keys equal those of encoding each list on its own."""
    model = erasekit.load(tiny_sd)
    spec = ConceptSpec(["cat", "dog"], preserve=["star", "cat toy"], expand=True)
    keys, guides, keep = uce.erase_keys(model, spec, "key")
    t = model.encode([p.target for p in spec.pairs()])
    a = model.encode([p.anchor for p in spec.pairs()])
    assert torch.allclose(keys, t.rows(t.key), atol=1e-6) and torch.allclose(guides, a.rows(a.key), atol=1e-6)
    p = model.encode(spec.preserve_prompts())
    assert torch.allclose(keep, p.rows(p.key), atol=1e-6)


def test_public_setting_names_are_aliases_with_a_note():
    method = methods.get("uce")
    with pytest.warns(UserWarning, match="'lamb' is the public UCE code's name for 'lam'"):
        cfg = methods.build_config(method, {"lamb": "0.25", "erase_scale": "2"}, source="--set")
    assert cfg.lam == 0.25 and cfg.erase_scale == 2.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert methods.build_config(method, {"lam": "0.3"}).lam == 0.3  # the own name: no note
    with pytest.raises(erasekit.UserError, match="both 'lamb' and its erasekit name 'lam'"):
        methods.build_config(method, {"lamb": "0.2", "lam": "0.3"}, source="--set")
    with pytest.warns(UserWarning, match="'regular_scale' is the public RECE code's name for 'mu'"):
        assert methods.build_config(methods.get("rece"), {"regular_scale": "0.1"}).mu == 0.1


def test_a_command_line_copied_from_the_public_readme_works(capsys, tiny_sd, tmp_path):
    """erasekit erase --method uce --concept "Van Gogh" --set lamb=0.5: a note, and the delta records lam 0.5;
    guided_concepts becomes the spec's anchors (';'-separated, as the public code reads them)."""
    from cli_helpers import one_line_error, run

    code, out, err = run(capsys, "erase", tiny_sd, "--method", "uce", "--concept", "Van Gogh", "--set", "lamb=0.4",
                         "--set", "guided_concepts=art", "--out", tmp_path / "u.safetensors")
    assert code == 0, err
    assert "erasekit: warning: --set: 'lamb' is the public UCE code's name for 'lam': read as lam=0.4" in err
    assert "erasekit: warning: --set: 'guided_concepts' is the public UCE code's name for the spec's anchor" in err
    delta = erasekit.Delta.load(tmp_path / "u.safetensors")
    assert delta.config["lam"] == 0.4 and delta.config["spec"]["anchors"] == ["art"]
    code, _, err = run(capsys, "erase", tiny_sd, "--method", "uce", "--concept", "a;b", "--concept", "c", "--set",
                       "guided_concepts=x", "--anchor", "y", "--out", tmp_path / "v.safetensors")
    assert code == 2 and "guided_concepts sets the anchor" in one_line_error(err)
    assert not (tmp_path / "v.safetensors").exists()


def test_the_benchmark_baseline_is_the_public_structure_and_agrees(tiny_sd):
    """benchmarks/naive_uce.public_uce (the public code's structure as written) equals erasekit's UCE in float64
    on the published prompt lists."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from naive_uce import public_uce

    model = erasekit.load(tiny_sd)
    spec = ConceptSpec(["Van Gogh", "cat"], preserve=["Monet"], templates="art", expand=True)
    edit, guides, keep = public_prompt_lists(["Van Gogh", "cat"], ["art", "art"], ["Monet"], ART)
    ref = public_uce(model, edit, guides, keep, dtype=torch.float64)
    delta = uce.erase(model, spec)
    assert max(float((delta.tensors[k].double() - v).norm() / v.norm()) for k, v in ref.items()) < 1e-5


def test_esd_defaults_are_fixed():
    """esd_sd.py (rohitgandikota/erasing at 25613d2): --iterations 200, --lr 5e-5, Adam, --guidance_scale 3,
    --num_inference_steps 50, the empty prompt as the negative guidance's reference; eta 1 in the paper's target
    f("") - eta (f(c) - f("")) is esd_sd.py's --negative_guidance 2 in its f(c) - g (f(c) - f("")): the same target
    2 f("") - f(c) (METHODS)."""
    from erasekit.finetune import esd

    d = defaults(esd.ESDConfig)
    assert {k: d[k] for k in ("parameters", "steps", "lr", "optimizer", "eta", "guidance", "sampler_steps", "guide",
                              "preserve_weight", "height", "width")} == {
        "parameters": "esd-x", "steps": 200, "lr": 5e-5, "optimizer": "adam", "eta": 1.0, "guidance": 3.0,
        "sampler_steps": 50, "guide": "empty", "preserve_weight": 0.0, "height": 0, "width": 0}


def public_esd_parameters(unet, train_method: str) -> set[str]:
    """The names esd_sd.py's get_esd_trainable_parameters (lines 24-50) picks, by its rule (read, not copied):
    the parameters of Linear and Conv2d modules (and diffusers' LoRA-compatible ones), chosen by module name."""
    chosen = set()
    for name, module in unet.named_modules():
        if type(module).__name__ not in ("Linear", "Conv2d", "LoRACompatibleLinear", "LoRACompatibleConv"):
            continue
        if {"esd-x": "attn2" in name, "esd-u": "attn2" not in name, "esd-all": True,
                "esd-x-strict": "attn2.to_k" in name or "attn2.to_v" in name}[train_method]:
            chosen |= {f"{name}.{p}" for p, _ in module.named_parameters()}
    return chosen


@pytest.mark.parametrize("train_method", ["esd-x", "esd-x-strict", "esd-u", "esd-all"])
def test_esd_parameter_sets_are_the_public_codes(tiny_sd, train_method):
    """No norm layer is trained: esd-u and esd-all hold the Linear and Conv2d weights and biases only."""
    from erasekit.finetune import params

    model = erasekit.load(tiny_sd)
    chosen = set(params.select(model, train_method))
    assert chosen == public_esd_parameters(model.unet, train_method)
    norms = {n for n, m in model.unet.named_modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))}
    assert norms and not any(name.rsplit(".", 1)[0] in norms for name in chosen)


def test_co_erasing_defaults_are_fixed():
    """Co-Erasing (Ferry-Li/Co-Erasing at f9b06b0) runs on ESD's settings in erasekit; what it adds: 200 images
    (README step 3, --image_number 200), text guidance on (--text_guide), the stage-1 steps those of stage 2;
    --negative_guidance 1.0 = eta. The differences (lr 1e-5, 1000/1500 iterations, noxattn/full, blur, the IP-Adapter's
    own K/V) are named in METHODS."""
    from erasekit.finetune import coerasing, esd

    d, e = defaults(coerasing.CoErasingConfig), defaults(esd.ESDConfig)
    assert {k: d[k] for k in e} == e  # ESD's settings, unchanged
    assert {k: d[k] for k in set(d) - set(e)} == {"images": 200, "text_guided": True, "image_encoder": "testbed",
                                                  "allow_pickle_weights": False, "stage1_steps": 0}
    assert d["eta"] == 1.0 and d["sampler_steps"] == 50


def test_trce_defaults_are_fixed():
    """TRCE (ddgoodgood/TRCE at 0da9b71, config/stage1/stage1_sexual_default.yaml and stage2_sexual_default.yaml):
    stage 1 preserve_scale 0.01 (eta), 15 templates (augment_num), the [EoT] row (token_weight_scale [0,1,0,0]);
    stage 2 learning_rate 1e-6 with AdamW, guidance 15 (erasekit's beta), margin 0.01, preserve_scale 100,
    max_early_timestep 25 (26 of 50 steps), attn1 and attn2.to_q trained."""
    from erasekit.finetune import params, trce2
    from erasekit.methods import trce

    s1 = defaults(trce.TRCEStage1Config)
    assert (s1["eta"], s1["positions"], s1["templates"], len(trce.TRCE_TEMPLATES)) == (0.01, "eot", "trce", 15)
    s2 = defaults(trce2.TRCEStage2Config)
    assert {k: s2[k] for k in ("lr", "optimizer", "beta", "margin", "preserve_weight", "trajectory_steps",
                               "early_fraction", "reference", "preserve", "steps")} == {
        "lr": 1e-6, "optimizer": "adamw", "beta": 15.0, "margin": 0.01, "preserve_weight": 100.0,
        "trajectory_steps": 50, "early_fraction": 0.52, "reference": "original", "preserve": "empty", "steps": 300}
    assert round(s2["early_fraction"] * s2["trajectory_steps"]) == 25 + 1
    assert params.PARAMETER_SETS["trce"] == (r"attn1\.", r"attn2\.to_q\.")
