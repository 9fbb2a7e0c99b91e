"""Attacks on an erased testbed model: the simplex projection, token substitution, each attack through the
command line, replaying what it found, Ring-A-Bell's elitism, batches (a prompt's answer alone and in a
batch, UnlearnDiffAtk's early stop), resuming a killed attack, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import erasekit
from cli_helpers import one_line_error, run
from erasekit import Delta
from erasekit.attacks import build_config, get, names, ringabell, unlearndiff
from erasekit.attacks.common import AttackContext, frozen, seeded
from erasekit.attacks.runner import PROGRESS
from erasekit.attacks.tokens import (
    attack_vocabulary,
    content_ids,
    embedding_table,
    encode_ids,
    ids_to_text,
    slot_embeddings,
    slot_prompt,
)
from erasekit.attacks.unlearndiff import project_simplex
from erasekit.cli import main
from erasekit.evaluation.cache import quantize
from erasekit.evaluation.judges import get_judge
from erasekit.evaluation.runner import Settings, Variant
from erasekit.evaluation.suites import load_suite

STEPS = 4
# UCE erases striped from two of these three prompts at 4 steps (red from none: the attacks need erased prompts)
CONCEPT = "striped"
SMALL = ["--suite", f"testbed:{CONCEPT}", "--limit", "3", "--steps", str(STEPS), "--samples", "4"]
OPTIONS = {
    "unlearndiff": ["timesteps=2", "iterations=3"],
    "p4d-n": ["iterations=3"],
    "p4d-k": ["iterations=3"],
    "ringabell": ["population=8", "generations=2", "tokens=4"],
    "ringabell-continuous": ["population=8", "generations=2", "tokens=4"],
}
HARD = ("unlearndiff", "p4d-n", "p4d-k", "ringabell")  # attacks whose answer is a text prompt
RECORD_KEYS = {"original_prompt", "adversarial_prompt", "seed", "flagged_before", "flagged_after"}


def attack_argv(delta: Path, name: str, out: Path, *extra) -> list[str]:
    options = [a for o in OPTIONS.get(name, []) for a in ("--set", o)]
    return ["attack", "--delta", str(delta), "--attack", name, *SMALL, "--out", str(out), *options, *extra]


def read(folder: Path, name: str = "results.json") -> dict:
    return json.loads((folder / name).read_text())


@pytest.fixture(scope="module")
def model():
    return erasekit.load("testbed", device="cpu")


@pytest.fixture(scope="module")
def delta(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("delta") / f"{CONCEPT}.safetensors"
    assert main(["erase", "--method", "uce", "--concept", CONCEPT, "--out", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def attack_run(delta, tmp_path_factory):
    """The output folder of one attack run through the command line, made once per module."""
    runs: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in runs:
            out = tmp_path_factory.mktemp(name) / "run"
            assert main(attack_argv(delta, name, out)) == 0
            runs[name] = out
        return runs[name]

    return get


# --- the simplex projection -----------------------------------------------------------------------


def test_project_simplex_gives_the_nearest_point_of_the_simplex():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(16, 7, generator=gen) * 2
    p = project_simplex(z)
    assert (p >= 0).all() and torch.allclose(p.sum(dim=1), torch.ones(16), atol=1e-6)
    others = torch.distributions.Dirichlet(torch.ones(7)).sample((200,))  # random points of the simplex
    for row, proj in zip(z, p):
        nearest_random = (others - row).norm(dim=1).min()
        assert (proj - row).norm() <= nearest_random + 1e-6


def test_project_simplex_keeps_points_already_on_it():
    inside = torch.distributions.Dirichlet(torch.ones(5)).sample((10,))
    corners = torch.eye(5)
    for points in (inside, corners):
        assert torch.allclose(project_simplex(points), points, atol=1e-6)


# --- tokens ---------------------------------------------------------------------------------------


def test_encode_ids_with_the_tables_own_embeddings_matches_encode(model):
    text = "a striped red star on a white background"
    ids, mask, _ = model.tokenize([text])
    table = embedding_table(model)
    with frozen(model):
        embeds = table(ids).detach().clone().requires_grad_()
        states = encode_ids(model, ids, mask, lambda table, k: embeds)
        expected = model.encode([text]).cond
        assert torch.allclose(states, expected, atol=1e-5)
        states.pow(2).sum().backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0  # gradients reach the substitutes
    assert not table._forward_hooks  # the hook is gone afterwards
    assert torch.allclose(encode_ids(model, ids, mask), expected, atol=1e-5)


def test_slot_embeddings_of_hard_tokens_equal_the_tokens_in_place(model):
    sp = slot_prompt(model, [None, *content_ids(model, "a red star"), None])
    tokens = torch.tensor([model.tokenizer.convert_tokens_to_ids(w) for w in ("bright", "today")])
    table = embedding_table(model).weight
    with torch.no_grad():
        soft = encode_ids(model, sp.ids[None], sp.mask[None], lambda t, k: slot_embeddings(t, sp, table[tokens][None]))
        hard = encode_ids(model, sp.with_tokens(tokens), sp.mask[None])
    assert torch.allclose(soft, hard, atol=1e-5)


def test_attack_vocabulary_is_whole_alphabetic_words(model):
    tok = model.tokenizer
    vocab = attack_vocabulary(model).tolist()
    words = tok.convert_ids_to_tokens(vocab)
    assert len(vocab) > 1000 and vocab == sorted(set(vocab))
    assert not set(vocab) & set(tok.all_special_ids)
    assert all(w.isascii() and w.isalpha() and not w.startswith("##") for w in words)
    for left_out in ("##s", "##ing", "[unused0]", "[MASK]", "1999", ".", "a"):
        idx = tok.convert_tokens_to_ids(left_out)
        assert idx != tok.unk_token_id and idx not in vocab, left_out
    assert {"red", "star", "background"} <= set(words)


def test_vocabulary_words_decode_and_tokenize_back(model):
    tok = model.tokenizer
    vocab = attack_vocabulary(model)
    picked = vocab[torch.randperm(len(vocab), generator=torch.Generator().manual_seed(0))[:50]].tolist()
    same = sum(content_ids(model, tok.decode([i])) == [i] for i in picked)
    assert same >= 49
    assert content_ids(model, tok.decode(picked)) == picked  # also as one prompt


def test_slot_prompt_puts_tokens_at_the_slots(model):
    tok = model.tokenizer
    content = content_ids(model, "a red star")
    sp = slot_prompt(model, [None, content[0], None, *content[1:], None])
    assert sp.ids.shape == (model.max_length,) and sp.slots.tolist() == [1, 3, 6]
    assert sp.ids[0] == tok.cls_token_id and sp.ids[7] == model.end_token_id
    assert (sp.ids[8:] == tok.pad_token_id).all()
    assert sp.mask.tolist() == [1] * 8 + [0] * (model.max_length - 8)
    words = torch.tensor(tok.convert_tokens_to_ids(["bright", "small", "today"]))
    filled = sp.with_tokens(words)
    assert filled.shape == (1, model.max_length)
    assert filled[0, sp.slots].tolist() == words.tolist()
    keep = torch.ones(model.max_length, dtype=torch.bool)
    keep[sp.slots] = False
    assert (filled[0, keep] == sp.ids[keep]).all()
    assert ids_to_text(model, filled[0]) == "bright a small red star today"
    batch = sp.with_tokens(torch.stack([words, words.flip(0)]))
    assert batch.shape == (2, model.max_length) and batch[1, sp.slots].tolist() == words.flip(0).tolist()

    long = slot_prompt(model, [None] * (model.max_length + 5))  # cut to fit, begin and end kept
    assert long.ids[0] == tok.cls_token_id and long.ids[-1] == model.end_token_id
    assert len(long.slots) == model.max_length - 2 and long.mask.all()


# --- each attack through the command line ---------------------------------------------------------


@pytest.mark.parametrize("name", list(OPTIONS))
def test_attack_writes_results_and_report(attack_run, name):
    out = attack_run(name)
    results = read(out)
    assert results["attack"] == name and results["n"] == 3
    assert 0.0 <= results["pre_asr"] <= results["asr"] <= 1.0
    prompts = results["prompts"]
    assert len(prompts) == 3 and all(RECORD_KEYS <= set(p) for p in prompts)
    assert results["pre_asr"] == round(sum(p["flagged_before"] for p in prompts) / 3, 4)
    assert results["asr"] == round(sum(p["flagged_before"] or p["flagged_after"] for p in prompts) / 3, 4)
    for key in ("pre_asr", "asr"):  # Wilson 95% intervals over the 3 prompts, holding the rate
        lo, hi = results[f"{key}_ci"]
        assert 0.0 <= lo <= results[key] <= hi <= 1.0 and hi - lo > 0.3
    assert [p["seed"] for p in prompts] == [2000, 2001, 2002]
    for p in prompts:
        if p["flagged_before"]:
            assert not p["attacked"] and p["reason"] == "flagged without attack" and p["flagged_after"]
            assert p["adversarial_prompt"] == p["original_prompt"]
        elif p["attacked"]:
            assert p["adversarial_prompt"] != p["original_prompt"]
            if name == "unlearndiff":  # prefix tokens before the prompt
                assert p["adversarial_prompt"].endswith(p["original_prompt"])
            if name == "ringabell-continuous":
                assert (out / p["embedding_file"]).is_file() and p["adversarial_prompt"].startswith("[embedding]")
    assert results["attacked"] == sum(p["attacked"] for p in prompts) >= 1
    config = results["protocol"]["config"]
    if name.startswith("p4d"):
        assert config["variant"] == name[-1] and config["iterations"] == 3
    if name.startswith("ringabell"):
        assert (config["population"], config["generations"], config["tokens"]) == (8, 2, 4)
    html = (out / "report.html").read_text()
    assert html.count("<tr><td class=cap>") == 3 and "<img " in html
    assert read(out, "timing.json")["attacked_prompts"] == results["attacked"]


def test_p4d_skips_prompts_that_are_not_ideal(delta, tmp_path, capsys):
    """Prompts without the concept: the original model does not show it, so there is nothing to recover."""
    out = tmp_path / "p4d"
    code, _, _ = run(capsys, *attack_argv(delta, "p4d-n", out, "--prompt-set", "preservation"))
    assert code == 0
    results = read(out)
    skipped = [p for p in results["prompts"] if not p["flagged_original"] and not p["flagged_before"]]
    assert skipped and results["ideal_prompts"] == 0 and results["asr_on_ideal"] is None
    for p in skipped:
        assert not p["attacked"] and p["reason"].startswith("not ideal") and not p["flagged_after"]
    assert results["attacked"] == 0


def test_hard_prompts_replay_to_the_recorded_verdict(attack_run, delta, model):
    judge = get_judge("testbed")
    erased = Delta.load(delta)
    checked = 0
    for name in HARD:
        for p in read(attack_run(name))["prompts"]:
            if not p["attacked"]:
                continue
            ids, _, _ = model.tokenize([p["adversarial_prompt"]])
            assert ids[0].tolist() == p["adversarial_ids"]  # the text is the prompt that was found
            with erased.applied(model):
                image = quantize(model.sample([p["adversarial_prompt"]], [p["seed"]], steps=STEPS, progress=False))
            flagged = bool(judge.scores(image)[CONCEPT][0] > judge.threshold)
            assert flagged == p["flagged_after"], (name, p["adversarial_prompt"])
            checked += 1
    assert checked >= len(HARD)


def test_continuous_embedding_replays_to_the_recorded_verdict(attack_run, delta, model):
    out = attack_run("ringabell-continuous")
    ctx = AttackContext(model, Variant("erased", (Delta.load(delta),)), get_judge("testbed"), (CONCEPT,),
                        Settings(steps=STEPS, guidance=model.sampler_defaults["guidance"]))
    attacked = [p for p in read(out)["prompts"] if p["attacked"]]
    assert attacked
    for p in attacked:
        embedding = load_file(str(out / p["embedding_file"]))["embedding"]
        with ctx.erased_model():
            image = ctx.generate([p["adversarial_prompt"]], [p["seed"]], embeddings=embedding)
        assert bool(ctx.judge.scores(image)[CONCEPT][0] > ctx.judge.threshold) == p["flagged_after"]


# --- Ring-A-Bell's genetic search -----------------------------------------------------------------


def test_genetic_search_never_gets_worse(model):
    ctx = AttackContext(model, Variant("original"), None, ("red",),
                        Settings(steps=STEPS, guidance=model.sampler_defaults["guidance"]))
    target = model.encode(["a solid red star"]).embeddings[0].float()
    best = []
    for generations in (0, 1, 2, 4, 8):
        cfg = ringabell.RingABellConfig(tokens=4, population=8, generations=generations)
        ids, dist = ringabell.genetic_search(ctx, target, cfg, torch.Generator().manual_seed(3))
        sp = slot_prompt(model, [None] * 4)
        with torch.no_grad():
            again = (encode_ids(model, ids[None], sp.mask[None]).float() - target).pow(2).mean()
        assert abs(float(again) - dist) < 1e-5  # the distance is that of the tokens returned
        best.append(dist)
    assert all(later <= earlier + 1e-7 for earlier, later in zip(best, best[1:])), best  # elitism
    assert best[-1] <= best[0]


# --- batches ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def batch_ctx(model, delta):
    suite = load_suite(f"testbed:{CONCEPT}", samples=4)
    ctx = AttackContext(model, Variant("uce", (Delta.load(delta),)), get_judge("testbed"), suite.concepts,
                        Settings(steps=STEPS, guidance=model.sampler_defaults["guidance"]))
    return ctx, suite, list(suite.set("target:canonical").prompts)[:3]


def _run(ctx, suite, name, prompts, indices, values):
    attack = get(name)
    cfg = build_config(attack, values, testbed=True)
    gens = [seeded(cfg.seed, i) for i in indices]
    prepared = [attack.prepare(ctx, suite, cfg)] if attack.prepare else []
    return attack.run(ctx, prompts, cfg, gens, *prepared)


@pytest.mark.parametrize("name, values", [
    ("unlearndiff", {"timesteps": 2, "iterations": 3}),
    ("unlearndiff", {"timesteps": 1, "iterations": 3, "sampled": False}),
    ("p4d-n", {"iterations": 4}),
    ("p4d-k", {"iterations": 4}),
    ("ringabell", {"population": 8, "generations": 3, "tokens": 4}),
])
def test_a_prompt_gets_the_same_answer_alone_and_in_a_batch(batch_ctx, name, values):
    ctx, suite, prompts = batch_ctx
    together = _run(ctx, suite, name, prompts, range(len(prompts)), values)
    for i, p in enumerate(prompts):
        alone = _run(ctx, suite, name, [p], [i], values)[0]
        assert alone.text == together[i].text and alone.ids == together[i].ids, (name, i)
        assert alone.loss == pytest.approx(together[i].loss, rel=1e-4, abs=1e-6)
    assert len({f.text for f in together}) == len(prompts)  # three prompts, three answers


class _StopJudging(AttackContext):
    """Flags the first prompt at its first judgement, never the others; records each judged batch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.judged = []

    def flags(self, images, prompts):
        self.judged.append([p.text for p in prompts])
        return [p.text == self.stop for p in prompts]


def test_unlearndiff_stops_a_flagged_prompt_and_the_rest_carry_on(batch_ctx):
    ctx, suite, prompts = batch_ctx
    stub = _StopJudging(ctx.model, ctx.erased, ctx.judge, ctx.concepts, ctx.settings, ctx.vocab)
    stub.stop = prompts[0].text
    values = {"timesteps": 3, "iterations": 2}
    found = _run(stub, suite, "unlearndiff", prompts, range(3), values)
    texts = [p.text for p in prompts]
    assert stub.judged == [texts, texts[1:], texts[1:]]  # the flagged prompt left after the first timestep
    first = unlearndiff.schedule(unlearndiff.UnlearnDiffConfig(**values), 1000)[0]
    assert found[0].extra["stopped_at_timestep"] == first
    assert [f.extra["stopped_at_timestep"] for f in found[1:]] == [None, None]
    stub.judged.clear()
    stopped_alone = _run(stub, suite, "unlearndiff", prompts[:1], [0], values)[0]
    assert stub.judged == [texts[:1]] and stopped_alone.text == found[0].text
    for i in (1, 2):  # rows dropped from the batch leave the others' optimisation as it was
        assert _run(stub, suite, "unlearndiff", [prompts[i]], [i], values)[0].text == found[i].text


def test_unlearndiff_schedule_is_the_public_codes():
    assert unlearndiff.schedule(unlearndiff.UnlearnDiffConfig(), 1000) == list(range(10, 1000, 20))
    assert unlearndiff.schedule(unlearndiff.UnlearnDiffConfig(timesteps=1), 1000) == [500]


# --- resuming -------------------------------------------------------------------------------------


def test_a_killed_attack_resumes_to_the_same_results(delta, tmp_path, monkeypatch, capsys):
    argv = attack_argv(delta, "unlearndiff", tmp_path / "killed", "--prompt-set", "target:heldout",
                       "--attack-batch", "1")
    real = unlearndiff.attack
    calls = []

    def die_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(unlearndiff, "attack", die_on_second)
    try:
        code = main(argv)
    except KeyboardInterrupt:
        code = 130
    assert code == 130 and len(calls) == 2
    progress = [json.loads(line) for line in (tmp_path / "killed" / PROGRESS).read_text().splitlines()]
    assert sum(r["attacked"] for r in progress) == 1  # the first attacked prompt was recorded, the second not
    assert not (tmp_path / "killed" / "results.json").exists()
    with open(tmp_path / "killed" / PROGRESS, "a") as f:
        f.write('{"index": 7, "original_prompt": "a str')  # a record torn by the kill

    calls.clear()

    def count(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(unlearndiff, "attack", count)
    code, _, _ = run(capsys, *argv)
    monkeypatch.undo()

    whole = tmp_path / "whole"
    code_whole, _, _ = run(capsys, *attack_argv(delta, "unlearndiff", whole, "--prompt-set", "target:heldout",
                                                "--attack-batch", "1"))
    assert code == 0 and code_whole == 0
    attacked = read(whole)["attacked"]
    assert attacked >= 2 and len(calls) == attacked - 1  # the restart attacked only what was left
    assert (tmp_path / "killed" / "results.json").read_bytes() == (whole / "results.json").read_bytes()
    lines = (tmp_path / "killed" / PROGRESS).read_text().splitlines()
    indexes = [json.loads(line)["index"] for line in lines]  # the torn line is gone, every line a record
    assert sorted(indexes) == list(range(read(whole)["n"]))


def test_resuming_another_runs_folder_attacks_anew(delta, tmp_path, monkeypatch, capsys):
    """--resume on a folder of another run (here: other iterations) reuses its images, never its verdicts."""
    out = tmp_path / "run"
    assert run(capsys, *attack_argv(delta, "unlearndiff", out, "--prompt-set", "target:heldout"))[0] == 0
    attacked = read(out)["attacked"]
    calls = []
    real = unlearndiff.attack

    def count(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(unlearndiff, "attack", count)
    argv = attack_argv(delta, "unlearndiff", out, "--prompt-set", "target:heldout", "--set", "iterations=4", "--resume",
                       "--attack-batch", "1")
    assert run(capsys, *argv)[0] == 0
    assert attacked >= 1 and len(calls) == attacked and read(out)["protocol"]["config"]["iterations"] == 4


def test_a_killed_batched_attack_resumes_batch_by_batch(delta, tmp_path, monkeypatch, capsys):
    """Batches of 2: a kill in the second batch keeps the first batch's records; the restart attacks the
    rest, and the results equal a run in one batch."""
    argv = attack_argv(delta, "unlearndiff", tmp_path / "killed", "--prompt-set", "target:heldout",
                       "--attack-batch", "2", "--limit", "4")
    real = unlearndiff.attack
    sizes = []

    def die_on_second(ctx, prompts, *args):
        sizes.append(len(prompts))
        if len(sizes) == 2:
            raise KeyboardInterrupt
        return real(ctx, prompts, *args)

    monkeypatch.setattr(unlearndiff, "attack", die_on_second)
    try:
        code = main(argv)
    except KeyboardInterrupt:
        code = 130
    assert code == 130 and len(sizes) == 2
    progress = [json.loads(line) for line in (tmp_path / "killed" / PROGRESS).read_text().splitlines()]
    assert sizes[0] == 2 and sum(r["attacked"] for r in progress) == 2  # the whole first batch, nothing after

    sizes.clear()
    monkeypatch.setattr(unlearndiff, "attack", lambda ctx, prompts, *a: sizes.append(len(prompts)) or real(
        ctx, prompts, *a))
    assert run(capsys, *argv, "--resume")[0] == 0
    monkeypatch.undo()
    whole = tmp_path / "whole"
    assert run(capsys, *attack_argv(delta, "unlearndiff", whole, "--prompt-set", "target:heldout",
                                    "--limit", "4"))[0] == 0
    attacked = read(whole)["attacked"]
    assert attacked >= 3 and sum(sizes) == attacked - 2
    killed, once = read(tmp_path / "killed"), read(whole)
    assert [p["adversarial_prompt"] for p in killed["prompts"]] == [p["adversarial_prompt"] for p in once["prompts"]]
    assert (killed["asr"], killed["pre_asr"]) == (once["asr"], once["pre_asr"])
    for a, b in zip(killed["prompts"], once["prompts"]):  # losses: batched kernels differ in the last bits
        assert a["flagged_after"] == b["flagged_after"] and a["attacked"] == b["attacked"]
        if a["attacked"]:
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


def test_attack_batch_must_be_positive(delta, tmp_path, capsys):
    code, _, err = run(capsys, *attack_argv(delta, "unlearndiff", tmp_path / "o", "--attack-batch", "0"))
    assert code == 2 and "--attack-batch: 0 must be at least 1" in one_line_error(err)
    assert not (tmp_path / "o").exists()


# --- bad input ------------------------------------------------------------------------------------


def test_unknown_attack_lists_the_attacks(delta, tmp_path, capsys):
    code, _, err = run(capsys, *attack_argv(delta, "magic", tmp_path / "o"))
    line = one_line_error(err)
    assert code == 2 and "unknown attack 'magic'" in line and all(n in line for n in names())
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name, options, message", [
    ("p4d-k", ["variant=n"], "p4d-k fixes ['variant']"),
    ("unlearndiff", ["steps_per_token=3"], "--set has unknown keys ['steps_per_token']"),
    ("unlearndiff", ["iterations"], "--set 'iterations' is not KEY=VALUE"),
    ("unlearndiff", ["iterations=many"], "cannot read 'many'"),
])
def test_bad_options_are_refused(delta, tmp_path, capsys, name, options, message):
    extra = [a for o in options for a in ("--set", o)]
    code, _, err = run(capsys, "attack", "--delta", delta, "--attack", name, *SMALL, "--out", tmp_path / "o", *extra)
    assert code == 2 and message in one_line_error(err)
    assert not (tmp_path / "o").exists()


def test_ringabell_needs_paired_prompts(delta, tmp_path, capsys):
    csv = tmp_path / "prompts.csv"
    csv.write_text("prompt\na red star\na red square\n")
    out = tmp_path / "o"
    code, _, err = run(capsys, "attack", "--delta", delta, "--attack", "ringabell", "--suite", csv, "--judge",
                       "testbed", "--concept", "red", "--steps", STEPS, "--out", out, *[
                           a for o in OPTIONS["ringabell"] for a in ("--set", o)])
    line = one_line_error(err)
    assert code == 2 and "ringabell needs prompts with and without the concept" in line and "prompts" in line
    assert not out.exists()  # refused before any work
