"""Hardening: training prompts disjoint from the audited ones, adversarial pairs anchored, and `erasekit harden`
end to end on the testbed (tiny attack settings), resumable."""

from __future__ import annotations

import json

import pytest

import erasekit
from cli_helpers import one_line_error, run
from erasekit.concepts import ConceptSpec
from erasekit.evaluation.suites import load_suite
from erasekit.hardening.runner import anchored, revived, spec_with, training_suite

TINY = ["--attack-set", "iterations=2", "--attack-set", "timesteps=2", "--steps", "8"]


@pytest.fixture(scope="module")
def testbed():
    return erasekit.load("testbed", device="cpu")


def test_training_prompts_are_none_of_the_suites_texts(testbed):
    spec = ConceptSpec(["circle"], anchors=["square"])
    training = training_suite(testbed, spec, 12)
    prompts = training.sets[0].prompts
    audited = {p.text for s in load_suite("testbed:circle").sets for p in s.prompts}
    assert len(prompts) == 12 and len({p.text for p in prompts}) == 12
    assert not {p.text for p in prompts} & audited
    assert all(p.values["shape"] == "circle" for p in prompts)


def test_adversarial_prompts_are_anchored_where_the_concept_is_named():
    assert anchored("xq zt a red Circle on black", "a red circle on black", ["circle", "round disc"], "square") == \
        "xq zt a red square on black"
    # P4D-N replaces the whole prompt: the original prompt, anchored, is what it should have produced
    assert anchored("xq zt vw", "a red circle on black", ["circle"], "square") == "a red square on black"
    assert anchored("a red round disc", "", ["circle", "round disc"], "square") == "a red square"


def test_revived_pairs_enter_every_method_through_the_spec():
    spec = ConceptSpec(["circle"], anchors=["square"])
    results = {"prompts": [
        {"attacked": True, "flagged_after": True, "adversarial_prompt": "zz a circle", "original_prompt": "a circle"},
        {"attacked": True, "flagged_after": False, "adversarial_prompt": "yy a circle", "original_prompt": "a circle"},
        {"attacked": False, "flagged_after": True, "adversarial_prompt": "a circle", "original_prompt": "a circle"}]}
    found = revived(results, spec)
    assert found == [{"target": "zz a circle", "concept": "circle", "anchor": "zz a square"}]
    hardened = spec_with(spec, found)
    assert [(p.target, p.anchor) for p in hardened.pairs()][-1] == ("zz a circle", "zz a square")
    assert ConceptSpec.from_dict(hardened.to_dict()).adversarial == found  # recorded and read back


def test_harden_on_the_testbed_writes_a_hardened_delta_and_resumes(tmp_path, capsys):
    out = tmp_path / "circle.safetensors"
    argv = ["harden", "--method", "uce", "--concept", "circle", "--rounds", "1", "--prompts", "2", *TINY,
            "--out", out]
    code, stdout, err = run(capsys, *argv)
    assert code == 0, err
    delta = erasekit.Delta.load(out)
    record = delta.config["hardening"]
    assert record["attack"] == "unlearndiff" and record["training_prompts"] == 2 and len(record["rounds"]) == 1
    assert record["rounds"][0]["attacked"] == 2 and "round 1: unlearndiff ASR" in stdout
    run_dir = tmp_path / "circle.safetensors.harden"
    assert json.loads((run_dir / "hardening.json").read_text()) == record
    code, _, err = run(capsys, *argv, "--overwrite")
    assert code == 0, err
    attack_results = run_dir / "round-1" / "attack" / "results.json"
    before = attack_results.stat().st_mtime_ns
    code, _, err = run(capsys, *argv, "--resume", "--overwrite")
    assert code == 0 and attack_results.stat().st_mtime_ns >= before, err
    assert erasekit.Delta.load(out).config["hardening"] == record  # the same rounds, read back


def test_harden_bad_inputs_are_one_line(tmp_path, capsys):
    code, _, err = run(capsys, "harden", "--method", "uce", "--concept", "circle", "--concept", "red", *TINY,
                       "--out", tmp_path / "d.safetensors")
    assert code == 2 and "one concept at a time" in one_line_error(err)
    run_dir = tmp_path / "old"
    run_dir.mkdir()
    (run_dir / "x").write_text("kept")
    code, _, err = run(capsys, "harden", "--method", "uce", "--concept", "circle", *TINY, "--run-dir", run_dir,
                       "--out", tmp_path / "d.safetensors")
    assert code == 2 and "--resume" in one_line_error(err) and (run_dir / "x").read_text() == "kept"
    code, _, err = run(capsys, "harden", "--method", "uce", "--concept", "circle", "--attack", "nope",
                       "--out", tmp_path / "d.safetensors")
    assert code == 2 and "nope" in one_line_error(err)
    assert not (tmp_path / "d.safetensors").exists()
