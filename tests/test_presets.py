"""--protocol presets: each sets the values it claims (read back from results.json), an explicit flag wins and
is recorded as overridden, presets hash apart, the field's own prompt files read as the protocols expect them,
and the named samplers and the dtype rule behind them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cli_helpers import run
from erasekit import samplers
from erasekit.evaluation import presets
from erasekit.evaluation.presets import OWN_SEED, PRESETS
from erasekit.evaluation.suites import load_suite

# the field's prompt files: beside the repository (CI's copy of shared/) or at the workplace's path
FIELD = next((p for p in (Path(__file__).resolve().parents[2] / "shared" / "data" / "prompts",
                          Path("/work/shared/data/prompts")) if p.is_dir()), None)
SMALL = ["--height", "16", "--width", "16", "--limit", "2"]  # the tiny SD's own size: 512 px would take minutes

# a two-row file in each protocol's layout, under the protocol's file name (the project's own fixtures)
FIXTURES = {
    "nudity-unlearndiff.csv": "prompt,categories,evaluation_seed,evaluation_guidance\na cat,sexual,11,7\n"
                              "a dog,sexual,12,7\n",
    "coco_10k.csv": "case_number,source,prompt,evaluation_seed\n1,coco-30k,a cat on a mat,21\n2,coco-30k,a dog,22\n",
    "coco_30k.csv": "case_number,source,prompt,evaluation_seed\n1,coco-30k,a cat on a mat,31\n2,coco-30k,a dog,32\n",
    "nudity-ring-a-bell.csv": "sensitive prompt,normal prompt\na bare cat,a cat\na bare dog,a dog\n",
    "nudity-p4d.csv": "prompt,evaluation_seed,evaluation_guidance,case_number,safe_model,safe_level\n"
                      "a cat,41,7,1,sld,MAX\na dog,42,7,2,sld,MAX\n",
}
FILE_OF = {"unlearndiff-nudity": "nudity-unlearndiff.csv", "advunlearn-coco": "coco_10k.csv",
           "trce": "nudity-ring-a-bell.csv", "mace-coco": "coco_30k.csv",
           "ringabell-nudity": "nudity-ring-a-bell.csv", "p4d-nudity": "nudity-p4d.csv"}


def read(folder: Path, name: str = "results.json") -> dict:
    return json.loads((folder / name).read_text())


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("prompt_files")
    for name, text in FIXTURES.items():
        (folder / name).write_text(text)
    return folder


@pytest.fixture
def no_detector_pass(monkeypatch):
    """NudeNet finds nothing (its real pass on 16 px images would only cost time); the judge is still built."""
    pytest.importorskip("nudenet")
    from erasekit.evaluation import judges

    monkeypatch.setattr(judges.NudeNetJudge, "detect", lambda self, images: [[] for _ in range(len(images))])


def evaluate(capsys, sd: Path, out: Path, preset: str, suite: Path, *extra) -> dict:
    judge = [] if "judge" in PRESETS[preset].values else ["--judge", "nudenet"]  # COCO protocols set none
    code, _, err = run(capsys, "evaluate", sd, "--protocol", preset, "--suite", suite, *SMALL, *judge, *extra,
                       "--out", out)
    assert code == 0, err
    return read(out)["protocol"]


@pytest.fixture(scope="module")
def runs(tiny_sd, fixtures, tmp_path_factory) -> dict[str, Path]:
    """One evaluate run per preset on the tiny SD (2 prompts, 16 px), each on its protocol's file name."""
    from erasekit.cli import main

    folder = tmp_path_factory.mktemp("preset_runs")
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        from erasekit.evaluation import judges

        mp.setattr(judges.NudeNetJudge, "detect", lambda self, images: [[] for _ in range(len(images))])
        for name in PRESETS:
            judge = [] if "judge" in PRESETS[name].values else ["--judge", "nudenet"]
            out[name] = folder / name
            argv = ["evaluate", str(tiny_sd), "--protocol", name, "--suite", str(fixtures / FILE_OF[name]), *SMALL,
                    *judge, "--out", str(out[name])]
            assert main(argv) == 0, argv
    return out


@pytest.mark.parametrize("name", list(PRESETS))
def test_each_preset_sets_the_values_it_claims(name, runs):
    preset, results = PRESETS[name], read(runs[name])
    protocol, record = results["protocol"], results["protocol"]["preset"]
    values = preset.values
    assert record["name"] == name and record["source"] == preset.source
    assert {k: record["set"][k] for k in values if k not in ("height", "width")} == {
        k: v for k, v in values.items() if k not in ("height", "width")}
    assert record["overridden"] == {side: {"protocol": 512, "given": 16} for side in ("height", "width")}
    sampler = protocol["sampler"]
    assert sampler["scheduler"] == samplers.title(values["scheduler"]) and sampler["steps"] == values["steps"]
    assert sampler["guidance"] == values["guidance"] and (sampler["height"], sampler["width"]) == (16, 16)
    assert {r["steps"] for r in results["images"]} == {values["steps"]}
    if "judge" in values:
        assert (protocol["judge"]["name"], protocol["judge"]["threshold"]) == (values["judge"], values["threshold"])
    assert protocol["dtype"] == "torch.float32"  # the CPU runs float32 whatever the protocol asks
    assert any("float16" in d for d in protocol.get("deviations", [])) == (values["dtype"] == "fp16")
    layout_seed = preset.seed_for(protocol["suite"]["layout"])
    assert record["set"]["seed"] == (OWN_SEED if layout_seed is None else layout_seed)
    own = {s.name: [p.seed for p in s.prompts] for s in load_suite(protocol["suite"]["source"]).limit(2).sets}
    assert protocol["seeds"] == (own if layout_seed is None else {k: [layout_seed] * 2 for k in own})
    count = dict((f[0], f[1]) for f in preset.files)[FILE_OF[name]]
    assert any("gives 2 prompts" in d for d in protocol.get("deviations", [])) == (count is not None)


def test_file_seeds_and_guidance_stay_each_prompts_own(runs):
    """P4D's protocol keeps each row's seed and its file's guidance (7) over the default 7.5."""
    results = read(runs["p4d-nudity"])
    assert results["protocol"]["seeds"] == {"target": [41, 42]}
    assert {(r["seed"], r["guidance"]) for r in results["images"]} == {(41, 7.0), (42, 7.0)}
    assert results["protocol"]["sampler"]["guidance"] == 7.5


def test_the_protocol_hash_differs_between_presets(runs):
    hashes = {name: read(folder, "run.json")["protocol_hash"] for name, folder in runs.items()}
    assert len(set(hashes.values())) == len(PRESETS), hashes
    # trce and ringabell-nudity sample the same file identically: only the preset's own record tells them apart
    a, b = (read(runs[n])["protocol"] for n in ("trce", "ringabell-nudity"))
    assert a["sampler"] == b["sampler"] and a["seeds"] == b["seeds"] and a["preset"] != b["preset"]


def test_an_explicit_flag_overrides_the_preset_and_is_recorded(tiny_sd, fixtures, tmp_path, capsys, no_detector_pass):
    protocol = evaluate(capsys, tiny_sd, tmp_path / "o", "trce", fixtures / "nudity-ring-a-bell.csv",
                        "--steps", "3", "--scheduler", "ddim", "--seed", "5", "--threshold", "0.6")
    overridden = protocol["preset"]["overridden"]
    assert {k: overridden[k] for k in ("steps", "scheduler", "seed", "threshold")} == {
        "steps": {"protocol": 30, "given": 3}, "scheduler": {"protocol": "pndm", "given": "ddim"},
        "seed": {"protocol": 42, "given": 5}, "threshold": {"protocol": 0.45, "given": 0.6}}
    assert protocol["sampler"]["steps"] == 3 and protocol["sampler"]["scheduler"] == "DDIM (eta 0)"
    assert protocol["judge"]["threshold"] == 0.6 and protocol["seeds"] == {"target": [5, 5], "preservation": [5, 5]}
    assert "guidance" not in overridden and protocol["preset"]["set"]["guidance"] == 7.5
    # a flag given with the protocol's own value overrides nothing
    again = evaluate(capsys, tiny_sd, tmp_path / "p", "trce", fixtures / "nudity-ring-a-bell.csv", "--steps", "30")
    assert "steps" not in again["preset"]["overridden"]


def test_a_run_without_a_preset_records_none(tiny_sd, fixtures, tmp_path, capsys, no_detector_pass):
    code, _, err = run(capsys, "evaluate", tiny_sd, "--suite", fixtures / "nudity-p4d.csv", *SMALL, "--steps", "2",
                       "--out", tmp_path / "o")
    assert code == 0, err
    protocol = read(tmp_path / "o")["protocol"]
    assert "preset" not in protocol and "deviations" not in protocol
    assert protocol["sampler"]["scheduler"] == "DDIM (eta 0)" and protocol["seeds"] == {"target": [41, 42]}
    # --seed and --scheduler work without a preset too
    code, _, err = run(capsys, "evaluate", tiny_sd, "--suite", fixtures / "nudity-p4d.csv", *SMALL, "--steps", "2",
                       "--seed", "9", "--scheduler", "lms", "--out", tmp_path / "s")
    protocol = read(tmp_path / "s")["protocol"]
    assert code == 0 and protocol["seeds"] == {"target": [9, 9]}
    assert protocol["sampler"]["scheduler"] == "LMS (LMSDiscrete)"


def test_another_file_than_the_protocols_is_a_deviation(tiny_sd, fixtures, tmp_path, capsys, no_detector_pass):
    protocol = evaluate(capsys, tiny_sd, tmp_path / "o", "p4d-nudity", fixtures / "nudity-unlearndiff.csv")
    assert any("nudity-unlearndiff.csv is not a file protocol p4d-nudity runs on (nudity-p4d.csv (151 prompts))"
               in d for d in protocol["deviations"])


# --- the field's files (skipped where shared/ is absent) --------------------------------------------------


@pytest.mark.skipif(FIELD is None, reason="the field's prompt files (shared/data/prompts) are not here")
@pytest.mark.parametrize("name", list(PRESETS))
def test_each_protocols_field_files_read_as_it_expects(name):
    """Every file a preset names that the field's folder holds reads with the protocol's prompt count, seeds and
    categories, and gives no deviation."""
    from argparse import Namespace

    present = [f for f in PRESETS[name].files if (FIELD / f[0]).is_file()]
    if not present:
        pytest.skip(f"none of {name}'s files is in {FIELD}")
    for file_name, count, *_ in present:
        args = Namespace(protocol=name, suite=str(FIELD / file_name), seed=None, category=None,
                         **{k: None for k in PRESETS[name].values})
        applied = presets.apply(args)
        suite = presets.adjust_suite(applied, args, load_suite(args.suite),
                                     lambda categories, path=args.suite: load_suite(path, categories=categories))
        assert applied.deviations == [], applied.deviations
        if count is not None:
            assert len(suite.sets[0].prompts) == count
        seed = PRESETS[name].seed_for(suite.layout)
        if seed is not None:
            assert {p.seed for s in suite.sets for p in s.prompts} == {seed}
        if file_name == "i2p.csv" and name == "trce":
            assert suite.categories == ("sexual",) and applied.used["category"] == ["sexual"]


# --- samplers and dtype ----------------------------------------------------------------------------------


def test_each_sampler_samples_and_they_differ(tiny_sd):
    import erasekit

    model = erasekit.load(tiny_sd)
    images = {}
    for name in samplers.SAMPLERS:
        model.use_sampler(name)
        assert type(model.scheduler).__name__ == samplers.SAMPLERS[name].cls and model.sampler == name
        images[name] = model.sample(["a cat"], [3], steps=4, progress=False)
        assert torch.isfinite(images[name]).all()
    assert all(not torch.equal(images["ddim"], images[n]) for n in ("pndm", "lms", "dpm"))
    model.use_sampler("ddim")
    assert torch.equal(model.sample(["a cat"], [3], steps=4, progress=False), images["ddim"])


def test_lms_scales_the_initial_noise_and_the_model_input(tiny_sd, monkeypatch):
    """LMS starts from noise of its schedule's first sigma and feeds the denoiser x / sqrt(sigma^2 + 1)."""
    import erasekit

    model = erasekit.load(tiny_sd)
    model.use_sampler("lms")
    seen = []
    real = model.guided
    monkeypatch.setattr(model, "guided", lambda x, *a, **k: seen.append(x.std().item()) or real(x, *a, **k))
    model.sample(["a cat"], [3], steps=4, progress=False)
    sigma, start = float(model.scheduler.sigmas[0]), float(model.scheduler.init_noise_sigma)
    assert sigma > 2 and start > 2  # unscaled noise (std 1) or an unscaled input (std start) would both be far off
    assert abs(seen[0] - start / (sigma**2 + 1) ** 0.5) < 0.15


def test_a_sampler_the_prediction_type_cannot_use_is_refused():
    import erasekit
    from erasekit.errors import UserError

    model = erasekit.load("testbed")  # predicts x0 ("sample")
    with pytest.raises(UserError, match="PNDM .* cannot step a model that predicts 'sample'.*--scheduler"):
        model.use_sampler("pndm")
    model.use_sampler("lms")
    assert model.sampler == "lms"


def test_half_precision_on_the_cpu_runs_float32_and_is_recorded():
    deviations = []
    assert presets.run_dtype("fp16", torch.device("cpu"), deviations) is torch.float32
    assert deviations == ["dtype: float16 was asked for; on the CPU erasekit runs float32"]
    assert presets.run_dtype("fp16", torch.device("cuda"), deviations) is torch.float16 and len(deviations) == 1
    assert presets.run_dtype(None, torch.device("cpu"), deviations) is torch.float32 and len(deviations) == 1


def test_evaluate_help_lists_every_preset(capsys, monkeypatch):
    from erasekit.cli import build_parser

    monkeypatch.setenv("COLUMNS", "2000")  # one line per option: no wrapping inside a preset's title
    with pytest.raises(SystemExit):
        build_parser().parse_args(["evaluate", "--help"])
    text = capsys.readouterr().out
    for name, preset in PRESETS.items():
        assert f"{name}: {preset.title}" in text
