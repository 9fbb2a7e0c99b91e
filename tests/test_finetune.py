"""Fine-tuning: parameter sets, the frozen teacher, resume to the same delta, composition, TRCE stage 2."""

from __future__ import annotations

import json

import pytest
import torch

import erasekit
from erasekit import methods
from erasekit.concepts import Concept, ConceptSpec
from erasekit.delta import Delta
from erasekit.errors import UserError
from erasekit.finetune import esd, params, trce2

SMALL = {"steps": "6", "sampler_steps": "4", "checkpoint_every": "3", "progress": "false"}


@pytest.fixture(scope="module")
def model():
    from erasekit import load

    return load("testbed")


def spec(name="red"):
    return ConceptSpec([Concept(name)])


def test_parameter_sets_select_what_their_names_say(model):
    x = params.select(model, "esd-x")
    strict = params.select(model, "esd-x-strict")
    u = params.select(model, "esd-u")
    trce = params.select(model, "trce")
    assert x and all("attn2." in n for n in x)
    assert strict and all(n.split("attn2.")[1].startswith(("to_k.", "to_v.")) for n in strict)
    assert set(strict) < set(x)
    assert u and not any("attn2." in n for n in u)
    assert len(params.select(model, "esd-all")) == len(x) + len(u)
    assert trce and all("attn1." in n or "attn2.to_q." in n for n in trce)
    with pytest.raises(UserError, match="unknown parameter set"):
        params.select(model, "esd-q")


def test_frozen_teacher_keeps_the_starting_weights(model):
    named = params.select(model, "esd-x-strict")
    frozen = params.Frozen(model, named)
    x = torch.randn(2, *model.latent_shape)
    t = torch.tensor([500, 500])
    emb = model.encode(["a solid red star on a black background"] * 2).embeddings
    before = model.raw(x, t, emb).detach()
    assert torch.allclose(frozen.raw(x, t, emb), before, atol=1e-6)
    with torch.no_grad():
        saved = {k: v.clone() for k, v in named.items()}
        for p in named.values():
            p.mul_(1.5)
    try:
        assert not torch.allclose(model.raw(x, t, emb), before, atol=1e-4)
        assert torch.allclose(frozen.raw(x, t, emb), before, atol=1e-6)
    finally:
        with torch.no_grad():
            for k, p in named.items():
                p.copy_(saved[k])


def _esd(model, run_dir, **extra):
    method = methods.get("esd")
    cfg = methods.build_config(method, {**SMALL, "run_dir": str(run_dir), **extra}, testbed=True)
    return method.erase(model, spec(), cfg)


def test_esd_changes_only_its_parameter_set_and_leaves_the_model_as_it_was(model, tmp_path):
    before = {k: v.detach().clone() for k, v in model.unet.state_dict().items()}
    delta = _esd(model, tmp_path / "run", parameters="esd-x-strict")
    assert delta.method == "esd" and delta.tensors
    assert all(n.split("attn2.")[1].startswith(("to_k.", "to_v.")) for n in delta.tensors)
    assert max(delta.relative_change(model).values()) > 0
    after = model.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    delta.check(model)  # made against the unedited base
    log = (tmp_path / "run" / "train.log.jsonl").read_text().splitlines()
    assert len(log) == 6 and (tmp_path / "run" / "checkpoint.safetensors").is_file()


def test_esd_anchor_guide_pulls_toward_the_paired_prompt(model):
    """guide='anchor', eta=0: at the starting weights the loss is the distance between the model's own
    outputs for the target prompt and its paired anchor prompt on the rollout's x_t; guide='empty' compares
    with the empty prompt. The spec form follows: captions for 'anchor', phrases for 'empty'."""
    from erasekit.testbed.spec import erasure_spec, takes_phrases_only

    pairs = [ConceptSpec([Concept("red")], anchors=["green"], templates=["a solid {} star on grass"]).pairs()[0]]
    named = params.select(model, "esd-x")
    frozen = params.Frozen(model, named)
    for guide, reference in (("anchor", pairs[0].anchor), ("empty", "")):
        cfg = esd.ESDConfig(guide=guide, eta=0.0, sampler_steps=4)
        loss, logs = esd.ESDLoss(model, pairs, frozen, cfg)(0, torch.Generator().manual_seed(3))
        gen = torch.Generator().manual_seed(3)  # the same draws as the loss made: pair, step, noise
        torch.randint(0, 1, (1,), generator=gen)
        k = int(torch.randint(0, 4, (1,), generator=gen))
        noise = torch.randn(model.latent_shape, generator=gen)[None] * model.scheduler.init_noise_sigma
        c, r, u = (model.encode([p]).embeddings for p in (pairs[0].target, reference, ""))
        x_t, t = frozen.rollout(c, u, noise, 4, k, cfg.guidance)
        expected = torch.nn.functional.mse_loss(model.raw(x_t, t, c), frozen.raw(x_t, t, r))
        assert logs["k"] == k and torch.allclose(loss, expected, rtol=1e-4), guide
    assert not takes_phrases_only(esd.ESDConfig(guide="anchor")) and takes_phrases_only(esd.ESDConfig())
    assert erasure_spec(["red"], esd.ESDConfig(guide="anchor")).expand
    assert erasure_spec(["red"], [None, esd.ESDConfig()]).templates == erasure_spec(["red"], esd.ESDConfig()).templates
    with pytest.raises(UserError, match="guide"):
        esd.ESDConfig(guide="anchors")


def test_resume_after_a_kill_gives_the_same_delta(model, tmp_path, monkeypatch):
    whole = _esd(model, tmp_path / "whole")
    calls = {"n": 0}
    original = esd.ESDLoss.__call__

    def dying(self, step, gen):
        calls["n"] += 1
        if calls["n"] == 5:  # after the checkpoint at step 3, inside step 5
            raise KeyboardInterrupt
        return original(self, step, gen)

    monkeypatch.setattr(esd.ESDLoss, "__call__", dying)
    with pytest.raises(KeyboardInterrupt):
        _esd(model, tmp_path / "killed")
    monkeypatch.setattr(esd.ESDLoss, "__call__", original)
    log = tmp_path / "killed" / "train.log.jsonl"
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3, 4]
    with open(log, "a") as f:
        f.write('{"step": 5, "lo')  # torn by the kill
    resumed = _esd(model, tmp_path / "killed")
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    assert set(resumed.tensors) == set(whole.tensors)
    worst = max(float((resumed.tensors[k] - whole.tensors[k]).abs().max()) for k in whole.tensors)
    assert worst <= 1e-6, worst
    moved = max(float((whole.tensors[k] - model.parameter(k).detach()).abs().max()) for k in whole.tensors)
    assert moved > 1e-6  # the comparison means something: training moved the weights


def test_resume_jsonl_truncates_a_torn_line_and_refuses_damage_before_it(tmp_path):
    from erasekit.checkpoint import append_jsonl, resume_jsonl

    log = tmp_path / "log.jsonl"
    for step in (1, 2, 3):
        append_jsonl(log, {"step": step, "loss": float("nan") if step == 2 else 0.5})
    assert json.loads(log.read_text().splitlines()[1])["loss"] is None  # strict JSON: NaN written as null
    with open(log, "a") as f:
        f.write('{"step": 4, "lo')
    assert [r["step"] for r in resume_jsonl(log, keep=lambda r: r["step"] <= 2)] == [1, 2]
    assert log.read_text() == '{"step": 1, "loss": 0.5}\n{"step": 2, "loss": null}\n'
    unchanged = log.stat().st_mtime_ns
    assert len(resume_jsonl(log)) == 2 and log.stat().st_mtime_ns == unchanged  # nothing to repair: not rewritten
    log.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(UserError, match="line 2 is not a JSON record"):
        resume_jsonl(log)
    assert resume_jsonl(tmp_path / "missing.jsonl") == []


def test_a_checkpoint_of_another_run_is_refused(model, tmp_path):
    _esd(model, tmp_path / "run")
    with pytest.raises(UserError, match="belongs to another run"):
        _esd(model, tmp_path / "run", eta="2.0")


def test_composition_gives_one_delta_with_both_stages(model, tmp_path):
    composed = methods.get("uce+esd")
    cfgs = methods.build_config(composed, {"esd.steps": "3", "sampler_steps": "4", "progress": "false",
                                           "esd.parameters": "esd-u"}, testbed=True)
    delta = composed.erase(model, spec(), cfgs)
    uce = methods.get("uce")
    alone = uce.erase(model, spec(), methods.build_config(uce, {}, testbed=True))  # the part's settings
    assert set(alone.tensors) <= set(delta.tensors)
    for k in alone.tensors:  # esd-u does not touch the K/V UCE edited
        assert torch.allclose(delta.tensors[k], alone.tensors[k], atol=1e-6)
    assert any("attn2." not in k for k in delta.tensors)
    delta.check(model)
    assert delta.method == "uce+esd" and set(delta.config) == {"uce", "esd"}


def test_full_trce_trains_attn1_and_to_q_on_top_of_stage1(model):
    method = methods.get("trce")
    cfgs = methods.build_config(method, {"steps": "3", "trajectory_steps": "6", "progress": "false"}, testbed=True)
    delta = method.erase(model, spec(), cfgs)
    names = set(delta.tensors)
    assert any("attn2.to_k" in n for n in names) and any("attn1." in n for n in names)
    assert any("attn2.to_q" in n for n in names)
    assert delta.method == "trce"


@pytest.fixture(scope="module")
def stage1(model):
    s1 = methods.get("trce-stage1")
    return s1.erase(model, spec(), methods.build_config(s1, {}, testbed=True))


def test_stage2_reference_holds_the_original_k_v_unless_asked_for_stage1(model, stage1):
    x, t = torch.randn(1, *model.latent_shape), torch.tensor([700])
    emb = model.encode(["a solid red star on a black background"]).embeddings
    original = model.raw(x, t, emb).detach()
    base = stage1.apply(model, check=False)
    try:
        edited = model.raw(x, t, emb).detach()
        named = params.select(model, "trce")
        assert not torch.allclose(edited, original, atol=1e-3)  # stage 1 changes this output
        assert torch.allclose(params.Frozen(model, named, fixed=base).raw(x, t, emb), original, atol=1e-5)
        assert torch.allclose(params.Frozen(model, named).raw(x, t, emb), edited, atol=1e-5)
    finally:
        Delta.revert(model, base)
    with pytest.raises(UserError, match="reference"):
        trce2.TRCEStage2Config(reference="stage-one")


def test_stage2_contrast_is_stronger_against_the_original_model(model, stage1, tmp_path):
    """f_safe - f_unsafe (logged as 'signal', same draws in both runs): the stage-1 model has mapped the
    malicious prompts onto the safe ones, so against it the contrast shrinks."""
    import json

    method = methods.get("trce-stage2")
    signal = {}
    for ref in ("original", "stage1"):
        folder = tmp_path / ref
        cfg = methods.build_config(method, {"steps": "2", "trajectory_steps": "6", "progress": "false",
                                            "reference": ref, "run_dir": str(folder)}, testbed=True)
        base = stage1.apply(model, check=False)
        try:
            trce2.erase(model, spec(), cfg, base_values=base)
        finally:
            Delta.revert(model, base)
        logs = [json.loads(line) for line in (folder / "train.log.jsonl").read_text().splitlines()]
        signal[ref] = sum(r["signal"] for r in logs)
    assert signal["original"] > 3 * signal["stage1"] > 0


def test_trajectory_cache_keeps_early_steps_in_half_precision(model):
    cfg = trce2.TRCEStage2Config(trajectory_steps=10)
    from contextlib import nullcontext

    cache = trce2.TrajectoryCache(model, cfg, nullcontext)
    latents, times = cache.get("a solid red star on a black background", 0)
    assert latents.dtype == torch.float16 and len(latents) == len(times) == 5
    assert times[0] > times[-1]  # the noisy early part, in sampling order
    assert torch.allclose(latents[0].float(), model.initial_noise([0])[0], atol=1e-2)


def test_bad_compositions_and_keys_are_named():
    with pytest.raises(UserError, match="closed form"):
        methods.get("esd+uce")
    with pytest.raises(UserError, match="unknown method 'nope'"):
        methods.get("uce+nope")
    with pytest.raises(UserError, match="no part has it"):
        methods.build_config(methods.get("uce+esd"), {"banana": "1"})


def test_zero_steps_are_refused_when_the_settings_are_read():
    method = methods.get("esd")
    with pytest.raises(UserError, match="steps: 0 must be at least 1"):
        methods.build_config(method, {"steps": "0", "progress": "false"}, testbed=True)


def test_score_changes_only_salient_entries_and_resumes_with_its_discriminator(model, tmp_path, monkeypatch):
    from erasekit.finetune import score

    method = methods.get("score")
    values = {"steps": "4", "sampler_steps": "4", "checkpoint_every": "2", "progress": "false",
              "saliency_prompts": "2", "saliency": "0.05"}

    def run(folder):
        return method.erase(model, spec(), methods.build_config(method, {**values, "run_dir": str(folder)},
                                                                testbed=True))

    whole = run(tmp_path / "whole")
    for name, value in whole.tensors.items():
        changed = (value != model.parameter(name).detach()).float().mean()
        assert changed <= 0.05 + 1e-3, (name, float(changed))
    assert 0.0 <= whole.stats["disc_heldout_accuracy"] <= 1.0
    log = [line for line in (tmp_path / "whole" / "train.log.jsonl").read_text().splitlines()]
    assert all('"disc_accuracy"' in line for line in log)

    calls = {"n": 0}
    original = score.SCORELoss.__call__

    def dying(self, step, gen):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, step, gen)

    monkeypatch.setattr(score.SCORELoss, "__call__", dying)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed")
    monkeypatch.setattr(score.SCORELoss, "__call__", original)
    resumed = run(tmp_path / "killed")
    assert set(resumed.tensors) == set(whole.tensors)
    assert max(float((resumed.tensors[k] - whole.tensors[k]).abs().max()) for k in whole.tensors) <= 1e-6


def test_co_erasing_refines_image_tokens_into_word_states_and_trains_text_only(model, monkeypatch):
    from erasekit.finetune import coerasing

    asked = []
    sample = type(model).sample

    def recording(self, *args, **kwargs):
        asked.append(kwargs.get("steps"))
        return sample(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "sample", recording)

    words = torch.randn(3, 8)
    tokens = torch.randn(5, 4, 8)
    refined = coerasing.refine(tokens, words)
    weights = torch.linalg.lstsq(words.T, refined.reshape(-1, 8).T).solution  # each row mixes the words
    assert torch.allclose(weights.sum(0), torch.ones(20), atol=1e-4) and (weights > -1e-4).all()
    method = methods.get("co-erasing")
    cfg = methods.build_config(method, {"steps": "2", "images": "3", "sampler_steps": "4", "progress": "false"},
                               testbed=True)
    delta = method.erase(model, spec(), cfg)
    assert delta.method == "co-erasing" and delta.stats["images"] == 3
    assert asked == [4] and delta.stats["image_steps"] == 4  # the concept images follow sampler_steps
    assert all("attn2." in k for k in delta.tensors)  # the saved model is a text-conditioned UNet
    delta.check(model)


def test_ip_adapter_image_tokens_follow_the_release_layouts(tiny_sd, tmp_path):
    from erasekit.finetune.image_tokens import image_encoder
    from erasekit.testing import make_tiny_ip_adapter

    sd = erasekit.load(tiny_sd)
    images = torch.rand(3, 3, 16, 16)
    flat = image_encoder(str(make_tiny_ip_adapter(tmp_path / "a")), sd)(images)
    pickled = make_tiny_ip_adapter(tmp_path / "b", layout="bin")
    with pytest.raises(UserError, match="ip-adapter_sd15.bin is a pickle file .*erasekit loads no pickle by default"):
        image_encoder(str(pickled), sd)
    nested = image_encoder(str(pickled), sd, allow_pickle=True)(images)
    assert flat.shape == (3, 4, 32) and torch.allclose(flat, nested, atol=1e-5)  # same seed, either file layout
    torch.save({"image_proj": {}}, tmp_path / "a" / "ip-adapter_sd15.bin")  # beside the safetensors: never read
    assert torch.allclose(image_encoder(str(tmp_path / "a"), sd)(images), flat)
    assert torch.allclose(flat.mean(-1), torch.zeros(3, 4), atol=1e-4)  # the projection's LayerNorm ran
    assert not torch.allclose(flat[0], flat[1])  # the tokens depend on the image


@pytest.mark.parametrize("make, message", [
    (lambda p: p.mkdir(), "no ip-adapter"),
    (lambda p: make_adapter(p, cross_attention_dim=48), "width 48"),
    (lambda p: (p.mkdir(), (p / "ip-adapter_plus.bin").write_bytes(b"junk")), "is a pickle file"),
    (lambda p: (p.mkdir(), (p / "ip-adapter_plus.safetensors").write_bytes(b"junk")), "cannot read"),
    (lambda p: None, "neither 'testbed' nor a folder"),
])
def test_ip_adapter_folder_errors(tiny_sd, tmp_path, make, message):
    from erasekit.finetune.image_tokens import image_encoder

    make(tmp_path / "adapter")
    with pytest.raises(UserError, match=message):
        image_encoder(str(tmp_path / "adapter"), erasekit.load(tiny_sd))


def make_adapter(path, **kwargs):
    from erasekit.testing import make_tiny_ip_adapter

    return make_tiny_ip_adapter(path, **kwargs)


def test_two_accelerate_processes_train_what_one_process_with_accumulation_two_trains(tmp_path):
    """Gradients are averaged across processes and each process draws the micro-batch a single process
    with accumulation would draw, so both runs must give the same delta."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from erasekit.cli import main

    argv = ["erase", "--method", "esd", "--concept", "red", "--set", "steps=2", "--set", "sampler_steps=4",
            "--set", "progress=false"]
    assert main([*argv, "--set", "grad_accum=2", "--out", str(tmp_path / "one.safetensors")]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HOME": str(tmp_path / "hf")}
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(port), "-m", "erasekit", *argv, "--out", str(tmp_path / "two.safetensors")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = Delta.load(tmp_path / "one.safetensors"), Delta.load(tmp_path / "two.safetensors")
    assert set(one.tensors) == set(two.tensors)
    assert max(float((one.tensors[k] - two.tensors[k]).abs().max()) for k in one.tensors) <= 1e-5


def _float_storage_bytes(model, shapes: set) -> int:
    """Bytes of the distinct float storages, outside the text encoder and VAE, of live tensors shaped like a
    trained parameter: the trained tensors and every copy of their size the run holds."""
    import gc

    others = {p.data_ptr() for m in (model.text_encoder, model.vae) for p in m.parameters()}
    seen = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.dtype == torch.float32 and tuple(obj.shape) in shapes:
            ptr = obj.untyped_storage().data_ptr()
            if ptr not in others:
                seen[ptr] = obj.untyped_storage().nbytes()
    return sum(seen.values())


# SCORE has backpropagated its terms when the loop sees its loss (backward_now): its gradient is made by then
@pytest.mark.parametrize("name, extra, grads", [("esd", {}, 0), ("score", {"saliency_prompts": "1"}, 1)])
def test_training_holds_one_frozen_copy_beside_the_trained_tensors_and_adams_moments(model, monkeypatch, name,
                                                                                    extra, grads):
    """At the second step's loss the loop holds the trained tensors, one frozen copy of their starting values
    and Adam's two moments (and the gradient, where the loss has made it): 4x (5x) their size in float32,
    nothing more (SCORE's masks are bool)."""
    from erasekit.finetune import loop

    named = params.select(model, "esd-all")
    shapes = {tuple(p.shape) for p in named.values()}
    trained = sum(p.numel() * 4 for p in named.values())
    seen = []
    add = loop.ZeroTerms.add

    def measuring(self, loss, logs):
        if self.steps == 1:
            seen.append(_float_storage_bytes(model, shapes) / trained)
        add(self, loss, logs)

    monkeypatch.setattr(loop.ZeroTerms, "add", measuring)
    method = methods.get(name)
    cfg = methods.build_config(method, {"steps": "2", "sampler_steps": "2", "progress": "false",
                                        "parameters": "esd-all", **extra}, testbed=True)
    before = _float_storage_bytes(model, shapes) / trained  # the parameters (1x) and whatever earlier tests left
    method.erase(model, spec(), cfg)
    extra_copies = 3 + grads  # frozen copy + Adam's two moments (+ the gradient)
    assert len(seen) == 1 and extra_copies - 0.01 < seen[0] - before < extra_copies + 0.05, (seen, before)


def test_score_bool_masks_train_what_float_gradient_masks_trained(model, monkeypatch):
    """SCORE's masks are bool and zero the accumulated gradient in place; the delta is bit for bit the one
    the earlier float masks, multiplied into each gradient by a tensor hook, gave."""
    from erasekit.finetune import score

    method = methods.get("score")
    values = {"steps": "3", "sampler_steps": "4", "progress": "false", "saliency_prompts": "2", "grad_accum": "2"}
    new = method.erase(model, spec(), methods.build_config(method, values, testbed=True))

    def float_hooks(named, masks):
        assert all(m.dtype == torch.bool for m in masks.values())
        floats = {k: m.float() for k, m in masks.items()}
        return [p.register_hook(lambda g, mk=floats[k]: g * mk) for k, p in named.items()]

    monkeypatch.setattr(score, "mask_gradients", float_hooks)
    old = method.erase(model, spec(), methods.build_config(method, values, testbed=True))
    assert set(new.tensors) == set(old.tensors) and new.tensors
    assert all(torch.equal(new.tensors[k], old.tensors[k]) for k in new.tensors)


@pytest.mark.parametrize("name, module, values", [
    ("score", "score", {"saliency_prompts": "2", "sampler_steps": "4"}),
    ("trce", "trce2", {"trajectory_steps": "4"})])  # stage 2 on stage 1 (alone its hinge is 0 here)
def test_terms_backpropagated_at_once_give_the_delta_of_one_summed_backward(model, monkeypatch, name, module, values):
    """SCORE and TRCE stage 2 free each term's graph by backpropagating it as soon as it is made (three
    trained-model forwards a step each); the delta equals the one a single backward of the summed loss gives
    (gradients add: equal up to float32 summation order)."""
    import importlib

    from erasekit.finetune import loop

    mod = importlib.import_module(f"erasekit.finetune.{module}")
    method = methods.get(name)
    values = {"steps": "3", "progress": "false", **values}
    calls = []

    def counting(term, cfg):
        calls.append(term.requires_grad)
        return loop.backward_now(term, cfg)

    monkeypatch.setattr(mod, "backward_now", counting)
    early = method.erase(model, spec(), methods.build_config(method, values, testbed=True))
    assert calls and all(calls) and len(calls) == 3 * 3  # three terms a step, each with a graph
    monkeypatch.setattr(mod, "backward_now", lambda term, cfg: term)  # the summed loss, one backward
    summed = method.erase(model, spec(), methods.build_config(method, values, testbed=True))
    assert set(early.tensors) == set(summed.tensors) and early.tensors
    base = {k: model.parameter(k).detach() for k in early.tensors}
    assert any(not torch.equal(early.tensors[k], base[k]) for k in base)
    for k in early.tensors:
        torch.testing.assert_close(early.tensors[k], summed.tensors[k], rtol=1e-5, atol=1e-6)


def test_backward_now_adds_the_gradient_the_loop_would_have(model):
    from erasekit.finetune.loop import LoopConfig, backward_now

    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    cfg = LoopConfig(grad_accum=2)
    out = backward_now((w ** 2).sum(), cfg) + backward_now((3 * w).sum(), cfg)
    assert not out.requires_grad and float(out) == pytest.approx(5.0 + -3.0)
    torch.testing.assert_close(w.grad, (2 * w.detach() + 3) / 2)  # the loop's 1/grad_accum scale


def test_a_teacher_with_fixed_values_shares_the_starting_values(model):
    named = params.select(model, "trce")
    stage1 = params.Frozen(model, named)
    kv = {n: p.detach() * 0.5 for n, p in params.select(model, "esd-x-strict").items()}
    ref = stage1.with_fixed(kv)
    assert all(ref.values[k] is stage1.start[k] for k in named)
    assert all(torch.equal(ref.values[k], kv[k]) for k in kv) and not set(kv) & set(stage1.values)


def test_a_run_that_changes_nothing_warns_and_names_the_zero_terms(model):
    import dataclasses

    method = methods.get("trce-stage2")
    cfg = methods.build_config(method, {"steps": "2", "trajectory_steps": "4", "progress": "false"}, testbed=True)
    cfg = dataclasses.replace(cfg, margin=-1e9)  # no settings file allows it: the hinge is 0 whatever the model
    with pytest.warns(UserWarning, match=r"trce-stage2 changed none of its \d+ trained tensors in 2 steps, so its "
                                         r"delta equals the base model: the loss was 0.0 on every one of 2 "
                                         r"micro-batches; zero on every step: erase, preserve"):
        delta = method.erase(model, spec(), cfg)
    assert all(torch.equal(v, model.parameter(k).detach()) for k, v in delta.tensors.items())


def test_a_run_that_changes_its_tensors_does_not_warn(model, tmp_path):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        delta = _esd(model, tmp_path / "run", parameters="esd-x-strict", steps="2")
    assert max(delta.relative_change(model).values()) > 0
    assert not [w for w in caught if "changed none" in str(w.message)]
