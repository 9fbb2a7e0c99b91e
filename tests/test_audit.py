"""erasekit audit on the testbed: results.json keys and their consistency with the parts' own results (rates
inside their intervals, mean ASR the attacks' mean), the oracle part, reuse of finished parts on --resume and
after a kill, the report, the Wilson interval itself, and bad input refused in one line before any work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import erasekit
from cli_helpers import one_line_error, run
from erasekit.audit import runner as audit_runner
from erasekit.audit.runner import ATTACKS, PROGRESS, oracle_name
from erasekit.cli import main
from erasekit.evaluation.protocol import weights_hash
from erasekit.evaluation.suites import load_suite
from erasekit.stats import rate_ci, wilson
from erasekit.testbed import oracle_names

CONCEPT = "circle"
ORACLE = f"testbed:no-{CONCEPT}"
LIMIT = 2
SMALL = ["--suite", f"testbed:{CONCEPT}", "--limit", str(LIMIT), "--samples", "2", "--steps", "2",
         "--random-prompts", "3", "--set", "unlearndiff.iterations=1", "--set", "p4d.iterations=1",
         "--set", "ringabell.population=4", "--set", "ringabell.generations=1",
         "--set", "ringabell.tokens=4", "--set", "ringabell.pairs=4"]
PARTS = ["evaluate", "random", *(f"attacks/{a}" for a in ATTACKS), "oracle/evaluate", "oracle/random",
         *(f"oracle/attacks/{a}" for a in ATTACKS)]
needs_oracle = pytest.mark.skipif(ORACLE not in oracle_names(), reason=f"{ORACLE} is not installed")


def read(folder: Path, name: str = "results.json") -> dict:
    return json.loads((folder / name).read_text())


def audit_argv(delta: Path, out: Path, *extra) -> list[str]:
    return ["audit", "--delta", str(delta), *SMALL, "--out", str(out), *extra]


@pytest.fixture(scope="module")
def delta(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("delta") / f"{CONCEPT}.safetensors"
    assert main(["erase", "--method", "uce", "--concept", CONCEPT, "--testbed-spec", "--out", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def audited(delta, tmp_path_factory) -> Path:
    """One audit through the command line (with the oracle, which is installed for circle)."""
    out = tmp_path_factory.mktemp("audit") / "run"
    assert main(audit_argv(delta, out)) == 0
    return out


def _contains(ci, rate) -> bool:
    return ci is not None and 0.0 <= ci[0] <= rate <= ci[1] <= 1.0


# --- the Wilson interval --------------------------------------------------------------------------


def test_wilson_matches_known_intervals():
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson(0, 0) == (0.0, 1.0)  # no evidence: every rate possible, not a crash
    assert rate_ci(None, 5) is None and rate_ci(0.0, 0) == [0.0, 1.0]
    with pytest.raises(ValueError):
        wilson(3, 2)


# --- results.json ---------------------------------------------------------------------------------


@needs_oracle
def test_audit_results_hold_every_key_consistent_with_its_parts(audited):
    r = read(audited)
    assert r["parts"] == PARTS and json.loads((audited / PROGRESS).read_text())["done"] == PARTS
    for who in (r, r["oracle"]):
        attacks = who["attacks"]
        assert list(attacks) == list(ATTACKS)
        for a in attacks.values():
            part = read(audited / a["folder"])
            assert {k: part[k] for k in ("asr", "asr_ci", "pre_asr", "pre_asr_ci", "n")} == \
                {k: a[k] for k in ("asr", "asr_ci", "pre_asr", "pre_asr_ci", "n")}
            assert a["n"] == LIMIT and _contains(a["asr_ci"], a["asr"]) and _contains(a["pre_asr_ci"], a["pre_asr"])
            assert a["pre_asr"] <= a["asr"]
        assert who["mean_asr"] == round(sum(a["asr"] for a in attacks.values()) / 3, 4)
        assert _contains(who["mean_asr_ci"], who["mean_asr"]) and who["mean_asr_n"] == LIMIT
        assert _contains(who["preservation_accuracy_ci"], who["preservation_accuracy"])
        assert _contains(who["base_rate_ci"], who["base_rate"]) and who["base_rate_n"] == LIMIT  # --limit applies
        for s, rate in who["target_rate"].items():
            assert _contains(who["target_rate_ci"][s], rate) and who["target_rate_n"][s] == LIMIT
    metrics = read(audited / "evaluate")["metrics"]
    assert r["preservation_accuracy"] == metrics["edited"]["preservation_accuracy"]
    assert r["unedited_preservation_accuracy"] == metrics["original"]["preservation_accuracy"]
    assert _contains(r["unedited_preservation_accuracy_ci"], r["unedited_preservation_accuracy"])
    assert r["base_rate"] == read(audited / "random")["metrics"]["edited"]["target_rate"]["random"]
    assert r["unedited_target_rate"]["target:canonical"] == 1.0 and r["attacked_set"] == "target:canonical"
    for name in ("original", "edited"):  # evaluate's own results carry the intervals too
        m = metrics[name]
        assert all(_contains(m["target_rate_ci"][s], v) for s, v in m["target_rate"].items())
        assert _contains(m["preservation_accuracy_ci"], m["preservation_accuracy"])
    protocol = r["protocol"]
    assert {"model", "variants", "sampler", "suite", "seeds", "judge", "packages", "attacks", "oracle"} <= set(protocol)
    assert protocol["attacks"]["p4d"]["config"]["iterations"] == 1


@needs_oracle
def test_the_oracle_is_audited_as_it_is_against_the_unedited_testbed(audited):
    oracle, testbed = erasekit.load(ORACLE), erasekit.load("testbed")
    r = read(audited)
    assert r["oracle"]["model"] == ORACLE and r["protocol"]["oracle"]["weights_hash"] == weights_hash(oracle)
    evaluated = read(audited / "oracle/evaluate")["protocol"]
    assert evaluated["model"]["weights_hash"] == weights_hash(oracle) != weights_hash(testbed)
    assert [v["deltas"] for v in evaluated["variants"]] == [[]]  # no delta
    for name in ATTACKS:
        p = read(audited / f"oracle/attacks/{name}")["protocol"]
        assert p["erased"]["deltas"] == [] and p["model"]["source"] == ORACLE
        assert p["reference"]["weights_hash"] == weights_hash(testbed)  # the original is the unedited testbed
    prompts = read(audited / "oracle/attacks/unlearndiff")["prompts"]
    assert all(p["flagged_original"] for p in prompts)  # the testbed draws circle here; the oracle never learnt it


def test_an_oracle_is_found_by_name_or_not_at_all():
    testbed = erasekit.load("testbed")
    missing = next(f"testbed:{v}" for v in ("striped", "star", "blue", "square", "red")
                   if f"testbed:no-{v}" not in oracle_names())
    assert oracle_name(testbed, load_suite(missing, samples=1)) is None
    for name in oracle_names():
        assert oracle_name(testbed, load_suite(name.replace("no-", ""), samples=1)) == name
        assert oracle_name(erasekit.load(name), load_suite(name.replace("no-", ""), samples=1)) is None


@needs_oracle
def test_the_report_shows_intervals_plot_and_adversarial_prompts(audited):
    html = (audited / "report.html").read_text()
    r = read(audited)
    a = r["attacks"]["ringabell"]
    assert f"{a['asr']:.2f} [{a['asr_ci'][0]:.2f}, {a['asr_ci'][1]:.2f}], n={LIMIT}" in html
    assert "<svg" in html and all(label in html for label in (">delta<", ">unedited<", f">oracle ({ORACLE})<"))
    assert html.count("<h3>") == 6 and "data:image/png;base64," in html
    attacked = [p for name in ATTACKS for p in read(audited / f"attacks/{name}")["prompts"] if p["attacked"]]
    assert all(p["adversarial_prompt"] in html for p in attacked)


# --- resuming -------------------------------------------------------------------------------------


@needs_oracle
def test_resume_reuses_every_finished_part(audited, delta, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    shutil.copytree(audited, out)

    def refuse(*args, **kwargs):
        raise AssertionError("a finished part was run again")

    monkeypatch.setattr(audit_runner, "evaluate", refuse)
    monkeypatch.setattr("erasekit.attacks.runner.run_attack", refuse)
    code, stdout, _ = run(capsys, *audit_argv(delta, out, "--resume"))
    assert code == 0 and stdout.count(": reused") == len(PARTS)
    assert read(out) == read(audited)


@pytest.mark.slow  # a second whole audit
@needs_oracle
def test_a_killed_audit_resumes_where_it_stopped(audited, delta, tmp_path, monkeypatch, capsys):
    import erasekit.attacks.runner as attack_runner

    real = attack_runner.run_attack
    calls = []

    def dies_at_p4d(ctx, attack, *args, **kwargs):
        calls.append(attack.name)
        if attack.name == "p4d":
            raise KeyboardInterrupt
        return real(ctx, attack, *args, **kwargs)

    monkeypatch.setattr(attack_runner, "run_attack", dies_at_p4d)
    out = tmp_path / "run"
    code, _, _ = run(capsys, *audit_argv(delta, out))
    assert code == 130 and calls == ["unlearndiff", "p4d"]
    assert json.loads((out / PROGRESS).read_text())["done"] == ["evaluate", "random", "attacks/unlearndiff"]

    calls.clear()
    monkeypatch.setattr(attack_runner, "run_attack", lambda ctx, attack, *a, **k: calls.append(attack.name) or
                        real(ctx, attack, *a, **k))
    code, stdout, _ = run(capsys, *audit_argv(delta, out, "--resume"))
    assert code == 0 and calls == ["p4d", "ringabell", "unlearndiff", "p4d", "ringabell"]  # then the oracle's
    assert stdout.count(": reused") == 3
    assert read(out) == read(audited)  # the same numbers as the run that was never stopped


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


@pytest.mark.slow  # a second delta's audit
@needs_oracle
def test_reuse_copies_the_oracle_parts_and_attacks_only_the_new_delta(audited, tmp_path, monkeypatch, capsys):
    import erasekit.attacks.runner as attack_runner

    other = tmp_path / "rece.safetensors"
    assert main(["erase", "--method", "rece", "--concept", CONCEPT, "--testbed-spec", "--out", str(other)]) == 0
    before = _tree(audited)
    real, attacked_in = attack_runner._attack_batch, []

    def spy(ctx, attack, cfg, cache, out, *args, **kwargs):
        attacked_in.append(Path(out).relative_to(tmp_path / "run").as_posix())
        return real(ctx, attack, cfg, cache, out, *args, **kwargs)

    monkeypatch.setattr(attack_runner, "_attack_batch", spy)
    out = tmp_path / "run"
    code, stdout, _ = run(capsys, *audit_argv(other, out, "--reuse", str(audited)))
    assert code == 0 and f"copied from {audited}: " in stdout
    assert attacked_in and not [f for f in attacked_in if f.startswith("oracle/")]  # only the delta is attacked
    mine, earlier = read(out), read(audited)
    assert mine["oracle"] == earlier["oracle"]  # the same numbers, none computed again
    assert mine["protocol"]["variants"] != earlier["protocol"]["variants"]
    assert _tree(audited) == before  # the earlier audit is only read


@pytest.mark.parametrize("case, message", [("missing", "no such folder"), ("not-audit", "holds no audit"),
                                           ("itself", "is the output folder itself")])
def test_reuse_names_an_earlier_audit_or_is_one_line(delta, tmp_path, capsys, case, message):
    out = tmp_path / "o"
    source = {"missing": tmp_path / "nosuch", "not-audit": tmp_path, "itself": out}[case]
    if case == "itself":
        out.mkdir()
        (out / PROGRESS).write_text('{"done": []}\n')
    code, _, err = run(capsys, *audit_argv(delta, out, "--reuse", str(source)))
    assert code == 2 and message in one_line_error(err)
    assert case == "itself" or not out.exists()


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, message", [
    (["--limit", "0"], "--limit: 0 must be at least 1"),
    (["--suite", "testbed:nosuch"], "nosuch"),
    (["--random-prompts", "0"], "--random-prompts: 0 must be at least 1"),
    (["--set", "iterations=3"], "ATTACK.KEY=VALUE"),
    (["--set", "p4d.nosuch=3"], "nosuch"),
])
def test_bad_input_is_one_line_before_any_work(delta, tmp_path, capsys, change, message):
    argv = audit_argv(delta, tmp_path / "o")
    flag = change[0]
    if flag in argv and flag != "--set":
        argv[argv.index(flag) + 1] = change[1]
    else:
        argv += change
    code, _, err = run(capsys, *argv)
    assert code == 2 and message in one_line_error(err)
    assert not (tmp_path / "o").exists()


def test_a_missing_delta_is_one_line(tmp_path, capsys):
    code, _, err = run(capsys, *audit_argv(tmp_path / "nosuch.safetensors", tmp_path / "o"))
    assert code == 2 and "does not exist" in one_line_error(err) and not (tmp_path / "o").exists()


def test_a_folder_that_is_no_run_is_kept(delta, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me\n")
    code, _, err = run(capsys, *audit_argv(delta, out))
    assert code == 2 and "holds no erasekit run" in one_line_error(err)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
