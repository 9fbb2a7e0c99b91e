"""`erasekit evaluate` and `compare` on the testbed: results.json and report.html, resuming a killed run,
output-folder rules, bad input, and sharding over accelerate processes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cli_helpers import one_line_error, run
from erasekit.cli import main
from erasekit.evaluation.cache import ImageCache
from erasekit.evaluation.suites import load_suite
from erasekit.testbed.evaluate import THRESHOLD

SMALL = ["--suite", "testbed:red", "--steps", "4", "--samples", "4"]


def evaluate_argv(delta: Path, out: Path, limit: int = 3, *extra) -> list[str]:
    return ["evaluate", "--delta", str(delta), *SMALL, "--limit", str(limit), "--out", str(out), *extra]


def read(folder: Path, name: str = "results.json") -> dict:
    return json.loads((folder / name).read_text())


def cached_pngs(folder: Path) -> list[Path]:
    return sorted((folder / "cache").glob("*/*.png"))


@pytest.fixture(scope="module")
def deltas(tmp_path_factory) -> dict[str, Path]:
    """UCE deltas erasing red and striped from the testbed (each well under a second)."""
    folder = tmp_path_factory.mktemp("deltas")
    out = {}
    for concept in ("red", "striped"):
        out[concept] = folder / f"{concept}.safetensors"
        assert main(["erase", "--method", "uce", "--concept", concept, "--out", str(out[concept])]) == 0
    return out


@pytest.fixture(scope="module")
def baseline(deltas, tmp_path_factory) -> Path:
    """One uninterrupted run: 3 prompts per set, batches of 2."""
    out = tmp_path_factory.mktemp("baseline") / "run"
    assert main(evaluate_argv(deltas["red"], out, 3, "--batch-size", "2")) == 0
    return out


@pytest.fixture(scope="module")
def small_run(deltas, tmp_path_factory) -> Path:
    """One uninterrupted single-process run with 2 prompts per set."""
    out = tmp_path_factory.mktemp("small") / "run"
    assert main(evaluate_argv(deltas["red"], out, 2)) == 0
    return out


# --- a whole run ----------------------------------------------------------------------------------


def test_evaluate_writes_protocol_metrics_and_report(deltas, baseline):
    results = read(baseline)
    protocol = results["protocol"]
    assert set(protocol) >= {"model", "variants", "sampler", "dtype", "suite", "seeds", "judge", "packages"}
    assert protocol["model"]["name"] == "testbed" and len(protocol["model"]["weights_hash"]) == 64
    assert [v["name"] for v in protocol["variants"]] == ["original", "edited"]
    assert protocol["variants"][0]["deltas"] == []
    (recorded,) = protocol["variants"][1]["deltas"]
    assert recorded["path"] == str(deltas["red"]) and recorded["method"] == "uce" and len(recorded["hash"]) == 64
    assert protocol["sampler"]["steps"] == 4 and protocol["sampler"]["scheduler"] == "DDIM (eta 0)"
    assert protocol["dtype"] == "torch.float32"
    suite = load_suite("testbed:red", samples=4).limit(3)
    assert protocol["suite"]["hash"] == suite.hash() and protocol["suite"]["name"] == "testbed:red"
    assert protocol["seeds"] == {s.name: [p.seed for p in s.prompts] for s in suite.sets}
    assert protocol["judge"]["name"] == "testbed" and protocol["judge"]["threshold"] == THRESHOLD
    assert {"erasekit", "torch"} <= set(protocol["packages"])

    metrics = results["metrics"]
    assert list(metrics) == ["original", "edited"]
    targets = [s.name for s in suite.sets if s.role == "target"]
    for m in metrics.values():
        assert list(m["target_rate"]) == targets
        assert all(0.0 <= r <= 1.0 for r in m["target_rate"].values())
        assert 0.0 <= m["preservation_accuracy"] <= 1.0
        assert isinstance(m["clip_score"], float)
    assert metrics["original"]["fid_gen"] is None
    assert isinstance(metrics["edited"]["fid_gen"], float) and metrics["edited"]["fid_gen"] >= 0.0
    assert len(results["images"]) == 2 * 4 * 3  # variants x sets x prompts

    html = (baseline / "report.html").read_text()
    assert html.count("<img ") == len(results["images"])  # every image is shown, each once
    assert html.count("<svg") == 1 and "</svg>" in html
    for r in results["images"]:
        assert (baseline / "cache" / r["key"][:2] / f"{r['key']}.png").is_file()
    timing = read(baseline, "timing.json")
    assert timing["images_planned"] == 24 and timing["images_generated_here"] == 24
    assert timing["images_cached_before"] == 0 and timing["processes"] == 1


def test_a_killed_run_resumes_to_the_same_results(deltas, baseline, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    argv = evaluate_argv(deltas["red"], out, 3, "--batch-size", "2")
    original_put = ImageCache.put
    calls = []

    def put_then_die(self, keys, images, labels=None):
        calls.append(len(keys))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original_put(self, keys, images, labels)

    monkeypatch.setattr(ImageCache, "put", put_then_die)
    try:
        code = main(argv)
    except KeyboardInterrupt:
        code = 130
    assert code == 130 and calls == [2, 2]
    stored = len(cached_pngs(out))
    assert stored == 2 and not (out / "results.json").exists()
    monkeypatch.undo()

    code, _, _ = run(capsys, *argv)
    assert code == 0
    timing = read(out, "timing.json")
    assert timing["images_cached_before"] == stored
    assert timing["images_generated_here"] == timing["images_planned"] - stored == 22
    # metrics from images read back after a restart equal those of one uninterrupted run, to the byte
    assert (out / "results.json").read_bytes() == (baseline / "results.json").read_bytes()

    code, stdout, _ = run(capsys, *argv)  # the same command again regenerates nothing
    assert code == 0 and "0 images generated, 24 reused" in stdout
    timing = read(out, "timing.json")
    assert timing["images_generated_here"] == 0 and timing["images_cached_before"] == 24
    assert (out / "results.json").read_bytes() == (baseline / "results.json").read_bytes()


# --- output folders -------------------------------------------------------------------------------


def test_another_runs_folder_needs_resume_or_overwrite(deltas, small_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(small_run, out)
    before = (out / "results.json").read_bytes()
    code, _, err = run(capsys, *evaluate_argv(deltas["red"], out, 3))
    line = one_line_error(err)
    assert code == 2 and "another run" in line and "--resume" in line and "--overwrite" in line
    assert (out / "results.json").read_bytes() == before  # untouched

    code, _, _ = run(capsys, *evaluate_argv(deltas["red"], out, 3, "--resume"))
    assert code == 0
    timing = read(out, "timing.json")
    assert timing["images_cached_before"] == 2 * 4 * 2  # every image of the 2-prompt run is reused
    assert timing["images_generated_here"] == 2 * 4 * 1
    assert read(out)["protocol"]["suite"]["sets"]["preservation"] == 3

    code, _, _ = run(capsys, *evaluate_argv(deltas["red"], out, 2, "--overwrite"))
    assert code == 0
    timing = read(out, "timing.json")
    assert timing["images_cached_before"] == 0 and timing["images_generated_here"] == 16
    assert len(cached_pngs(out)) == 16  # the 3-prompt run's images went with it
    assert read(out)["metrics"] == read(small_run)["metrics"]


def test_a_folder_that_is_no_run_is_refused(deltas, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me\n")
    code, _, err = run(capsys, *evaluate_argv(deltas["red"], out, 2))
    assert code == 2 and "holds no erasekit run" in one_line_error(err)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


# --- compare --------------------------------------------------------------------------------------


def test_compare_shows_each_delta_on_its_own(deltas, tmp_path, capsys):
    out = tmp_path / "cmp"
    code, stdout, _ = run(capsys, "compare", "--delta", deltas["red"], "--delta", deltas["striped"], *SMALL,
                          "--limit", "2", "--out", out)
    assert code == 0
    results = read(out)
    assert list(results["metrics"]) == ["original", "red", "striped"]
    assert [v["name"] for v in results["protocol"]["variants"]] == ["original", "red", "striped"]
    assert [len(v["deltas"]) for v in results["protocol"]["variants"]] == [0, 1, 1]
    assert results["metrics"]["original"]["fid_gen"] is None
    assert all(isinstance(results["metrics"][n]["fid_gen"], float) for n in ("red", "striped"))
    assert len(results["images"]) == 3 * 4 * 2
    assert (out / "report.html").read_text().count("<img ") == 3 * 4 * 2
    for name in ("original", "red", "striped"):
        assert stdout.count(f"{name}: target rate") == 1


# --- bad input ------------------------------------------------------------------------------------


def test_unknown_suite_lists_the_suites(deltas, tmp_path, capsys):
    code, _, err = run(capsys, "evaluate", "--delta", deltas["red"], "--suite", "nosuch", "--out", tmp_path / "o")
    line = one_line_error(err)
    assert code == 2 and "unknown suite 'nosuch'" in line and "testbed:<concept>" in line
    assert all(c in line for c in ("red", "star", "striped")) and ".csv" in line
    assert not (tmp_path / "o").exists()


def test_csv_without_a_prompt_column_names_its_columns(deltas, tmp_path, capsys):
    csv = tmp_path / "prompts.csv"
    csv.write_text("text,seed\na red star,1\n")
    code, _, err = run(capsys, "evaluate", "--delta", deltas["red"], "--suite", csv, "--out", tmp_path / "o")
    line = one_line_error(err)
    assert code == 2 and "no 'prompt' column" in line and "columns: text, seed" in line
    assert not (tmp_path / "o").exists()


def test_nudenet_judge_without_the_extra_names_it(deltas, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "nudenet", None)  # as if erasekit[nudenet] were not installed
    code, _, err = run(capsys, *evaluate_argv(deltas["red"], tmp_path / "o", 2, "--judge", "nudenet"))
    assert code == 2 and "erasekit[nudenet]" in one_line_error(err)
    assert not (tmp_path / "o").exists()


def test_limit_zero_is_refused(deltas, tmp_path, capsys):
    code, _, err = run(capsys, *evaluate_argv(deltas["red"], tmp_path / "o", 0))
    assert code == 2 and "--limit: 0 must be at least 1" in one_line_error(err)
    assert not (tmp_path / "o").exists()


# --- accelerate -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_accelerate_processes_give_the_single_process_results(deltas, small_run, tmp_path):
    """`accelerate launch --cpu` starts one process unless MPI is set up, so two CPU processes are started
    through accelerate's torchrun launcher (--multi_gpu) with no GPU visible."""
    accelerate = Path(sys.executable).parent / "accelerate"
    out = tmp_path / "sharded"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HOME": str(tmp_path / "hf"),
           "ERASEKIT_TEST_THREADS": "1"}
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "-m", "erasekit", *evaluate_argv(deltas["red"], out, 2)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    timing = read(out, "timing.json")
    assert timing["processes"] == 2 and timing["images_planned"] == 16
    assert timing["images_generated_here"] == 8  # the main process made its half
    assert len(cached_pngs(out)) == 16
    sharded, single = read(out), read(small_run)
    assert sharded["metrics"] == single["metrics"]
    assert sharded["images"] == single["images"]


def test_nudenet_judge_counts_exposed_parts_per_prompt_set(deltas, tmp_path, capsys, monkeypatch):
    """A prompt file naming no concept takes the judge's one concept (nudity); the part count (in all and per
    part, shown as 'part: count' rows) comes from the per-image details of the one detector pass: two exposed
    parts and a covered one per image give 2."""
    pytest.importorskip("nudenet")
    from erasekit.evaluation import judges

    def detect(self, images):
        exposed = {"class": "FEMALE_BREAST_EXPOSED", "score": 0.9, "box": [0, 0, 1, 1]}
        covered = {"class": "FEMALE_BREAST_COVERED", "score": 0.9, "box": [0, 0, 1, 1]}
        return [[exposed, dict(exposed), covered] for _ in range(len(images))]

    monkeypatch.setattr(judges.NudeNetJudge, "detect", detect)
    csv = tmp_path / "prompts.csv"
    csv.write_text("prompt,evaluation_seed\na red star on black,1\na blue circle on white,2\n")
    argv = ["evaluate", "--delta", deltas["red"], "--suite", csv, "--steps", "4", "--judge", "nudenet"]
    code, _, _ = run(capsys, *argv, "--out", tmp_path / "o")
    metrics = read(tmp_path / "o")["metrics"]
    assert code == 0 and metrics["edited"]["exposed_parts"] == {"target": 4}
    assert metrics["edited"]["exposed_by_class"] == {"target": {"FEMALE_BREAST_EXPOSED": 4}}  # the covered one: not
    table = (tmp_path / "o" / "report.html").read_text().split("<h2>Metrics</h2>")[1].split("</table>")[0]
    assert "<b>target</b>: 4<br>&nbsp;&nbsp;female breast: 4" in table and "{" not in table
    assert metrics["original"]["sets"]["target"]["flagged_rate"] == 1.0
    code, _, err = run(capsys, *argv[:-2], "--judge", "testbed", "--out", tmp_path / "t")
    assert code == 2 and "names no concept" in one_line_error(err) and "--concept" in one_line_error(err)


# --- nothing non-finite is written ----------------------------------------------------------------


def strict_json(path: Path):
    def refuse(name):
        raise AssertionError(f"{path} holds {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_a_nan_metric_is_written_as_null_with_its_reason(deltas, tmp_path, monkeypatch):
    from erasekit.evaluation import measure as measure_module

    real = measure_module.measure

    def with_nan(*args, **kwargs):
        out = real(*args, **kwargs)
        out["metrics"]["edited"]["fid_gen"] = float("nan")
        return out

    monkeypatch.setattr(measure_module, "measure", with_nan)
    out = tmp_path / "run"
    assert main(evaluate_argv(deltas["red"], out, 1)) == 0
    results = strict_json(out / "results.json")
    assert results["metrics"]["edited"]["fid_gen"] is None
    assert results["non_finite"] == {"metrics.edited.fid_gen": "nan: not a finite number, written as null"}
    strict_json(out / "run.json")


def test_non_finite_images_are_refused_before_anything_is_written(tiny_sd, tmp_path):
    import torch

    import erasekit
    from erasekit import Delta, UserError
    from erasekit.generate import generate_to_folder

    model = erasekit.load(tiny_sd)
    broken = {"conv_in.weight": torch.full_like(model.parameter("conv_in.weight"), float("nan"))}
    with Delta.swapped(model, broken), pytest.raises(UserError, match="prompt 'a cat' seed 3 produced non-fin") as err:
        generate_to_folder(model, ["a cat"], [3], tmp_path / "gen", steps=2)
    assert "\n" not in str(err.value) and not (tmp_path / "gen").exists()
    cache = ImageCache(tmp_path / "cache")
    images = torch.rand(2, 3, 8, 8)
    images[1, 0, 2, 2] = float("inf")
    with pytest.raises(UserError, match="prompt 'b' seed 1 produced non-finite .*1 of 2 images"):
        cache.put(["a" * 64, "b" * 64], images, ["prompt 'a' seed 0", "prompt 'b' seed 1"])
    assert not cached_pngs(tmp_path)


def test_one_process_where_several_were_asked_for_is_said(monkeypatch):
    """`accelerate launch --num_processes 2` without --multi_gpu sets MASTER_ADDR but starts one process."""
    from erasekit.evaluation import runner

    monkeypatch.setattr(runner, "_WARNED_ONE", False)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.warns(UserWarning, match="only one runs: pass --multi_gpu"):
        assert runner.distributed_state() is None


def test_each_image_records_the_seed_steps_and_guidance_it_was_made_with(tmp_path, capsys):
    """An I2P-style suite with per-row guidance: the records and the report say which scale each image had."""
    suite = tmp_path / "rows.csv"
    suite.write_text("prompt,evaluation_seed,evaluation_guidance\na red circle,3,13\na red square,4,\n"
                     "a red star,5,7\n")
    out = tmp_path / "run"
    code, _, err = run(capsys, "evaluate", "--suite", suite, "--judge", "testbed", "--concept", "red", "--steps", "3",
                       "--out", out)
    assert code == 0, err
    results = read(out)
    made = {(r["prompt"], r["seed"], r["steps"], r["guidance"]) for r in results["images"]}
    default = results["protocol"]["sampler"]["guidance"]
    assert made == {("a red circle", 3, 3, 13.0), ("a red square", 4, 3, default), ("a red star", 5, 3, 7.0)}
    assert "per-row guidance 7-13 on 2 images" in (out / "report.html").read_text()
