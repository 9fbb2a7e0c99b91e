"""Writers that cannot lose data: a second writer to the same output is refused while the first runs, a lock
left by a killed run is taken over, and `kill -9` in the middle of evaluate and attack, then --resume,
gives the results of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_helpers import one_line_error, run
from erasekit.cli import main
from erasekit.outputs import output_lock

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def delta(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("delta") / "striped.safetensors"
    assert main(["erase", "--method", "uce", "--concept", "striped", "--out", str(path)]) == 0
    return path


# every command that writes: (argv, the output it writes)
WRITERS = {
    "generate": (["generate", "-p", "a red circle", "--seeds", "0", "--steps", "2", "--out", "{out}"], "folder"),
    "erase": (["erase", "--method", "uce", "--concept", "red", "--out", "{out}.safetensors"], "file"),
    "export": (["export", "--delta", "{delta}", "--out", "{out}"], "folder"),
    "evaluate": (["evaluate", "--delta", "{delta}", "--suite", "testbed:red", "--limit", "1", "--samples", "2",
                  "--steps", "2", "--out", "{out}"], "folder"),
    "compare": (["compare", "--delta", "{delta}", "--suite", "testbed:red", "--limit", "1", "--samples", "2",
                 "--steps", "2", "--out", "{out}"], "folder"),
    "attack": (["attack", "--delta", "{delta}", "--attack", "unlearndiff", "--suite", "testbed:striped", "--limit",
                "1", "--samples", "2", "--steps", "2", "--set", "iterations=1", "--out", "{out}"], "folder"),
    "audit": (["audit", "--delta", "{delta}", "--suite", "testbed:striped", "--limit", "1", "--out", "{out}"],
              "folder"),
    "demo": (["demo", "--samples", "1", "--out", "{out}"], "folder"),
    "testbed train": (["testbed", "train", "--steps", "1", "--out", "{out}"], "folder"),
    "testbed train-judge": (["testbed", "train-judge", "--steps", "1", "--out", "{out}.safetensors"], "file"),
    "testbed train-clip": (["testbed", "train-clip", "--steps", "1", "--out", "{out}.safetensors"], "file"),
    "testbed evaluate": (["testbed", "evaluate", "--samples", "1", "--json", "{out}.json"], "file"),
}


@pytest.mark.parametrize("command", list(WRITERS))
def test_a_second_writer_is_refused_and_the_first_keeps_its_files(command, delta, tmp_path, capsys):
    template, kind = WRITERS[command]
    argv = [a.format(out=tmp_path / "out", delta=delta) for a in template]
    target = Path(next(a for a in argv if str(tmp_path / "out") in a))
    if kind == "folder":
        target.mkdir()
        (target / "first.txt").write_text("the first writer's file\n")
    with output_lock([target]):  # the first writer, still running
        code, _, err = run(capsys, *argv)
    assert code == 2 and "another erasekit run is writing" in one_line_error(err)
    if kind == "folder":
        assert sorted(p.name for p in target.iterdir()) == ["first.txt"]
    else:
        assert not target.exists()


def test_two_generate_processes_on_one_folder(tmp_path, capsys):
    """The case that lost data: two `generate` runs with different prompts started together on one folder."""
    out = tmp_path / "same"
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "erasekit", "generate", "-p", "a red circle", "--seeds", "0-1",
                              "--steps", "5", "--out", str(out)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    lock = tmp_path / ".same.lock"
    deadline = time.time() + 120
    while not lock.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert lock.exists(), first.communicate()
    code, _, err = run(capsys, "generate", "-p", "a blue square", "--seeds", "0-1", "--steps", "5", "--out", out)
    stdout, stderr = first.communicate(timeout=300)
    assert code == 2 and "another erasekit run is writing" in one_line_error(err)
    assert first.returncode == 0, stderr
    assert "a red circle" in (out / "generation.json").read_text() and not lock.exists()


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".o.lock").write_text(f"{socket.gethostname()} {dead.pid}\n")
    code, _, err = run(capsys, "generate", "-p", "a red circle", "--seeds", "0", "--steps", "2",
                       "--out", tmp_path / "o")
    assert code == 0, err
    assert (tmp_path / "o" / "grid.png").is_file() and not (tmp_path / ".o.lock").exists()


def _kill_when(argv: list[str], ready) -> None:
    """Run the CLI in a process and kill -9 it once ready() holds (or it finished on its own)."""
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "erasekit", *argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while proc.poll() is None and not ready() and time.time() < deadline:
        time.sleep(0.02)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def test_kill_9_in_evaluate_then_resume_equals_an_uninterrupted_run(delta, tmp_path, capsys):
    argv = ["evaluate", "--delta", str(delta), "--suite", "testbed:striped", "--limit", "3", "--samples", "4",
            "--steps", "4", "--batch-size", "1"]
    killed = tmp_path / "killed"
    _kill_when([*argv, "--out", str(killed)], lambda: len(list(killed.glob("cache/*/*.png"))) >= 3)
    assert not (killed / "results.json").exists()
    code, stdout, err = run(capsys, *argv, "--out", killed, "--resume")
    assert code == 0, err
    assert "reused" in stdout and " 0 reused" not in stdout
    assert run(capsys, *argv, "--out", tmp_path / "whole")[0] == 0
    assert (killed / "results.json").read_bytes() == (tmp_path / "whole" / "results.json").read_bytes()


def test_kill_9_in_attack_then_resume_equals_an_uninterrupted_run(delta, tmp_path, capsys):
    from erasekit.attacks.runner import PROGRESS

    argv = ["attack", "--delta", str(delta), "--attack", "unlearndiff", "--suite", "testbed:striped", "--limit", "3",
            "--samples", "4", "--steps", "4", "--set", "iterations=3"]
    killed = tmp_path / "killed"

    def one_prompt_recorded() -> bool:
        progress = killed / PROGRESS
        return progress.is_file() and progress.read_text().count("\n") >= 1

    _kill_when([*argv, "--out", str(killed)], one_prompt_recorded)
    code, _, err = run(capsys, *argv, "--out", killed, "--resume")
    assert code == 0, err
    assert run(capsys, *argv, "--out", tmp_path / "whole")[0] == 0
    assert (killed / "results.json").read_bytes() == (tmp_path / "whole" / "results.json").read_bytes()
