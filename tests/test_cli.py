"""The command line: each command on a tiny SD folder, and bad input as one line with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import erasekit
from cli_helpers import one_line_error, run
from erasekit import Delta
from erasekit.cli import parse_seeds


def test_help_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "erasekit", "--help"], capture_output=True, text=True, check=True)
    for command in ("info", "generate", "apply", "export", "testbed"):
        assert command in out.stdout


def test_seed_parsing():
    assert parse_seeds("0-3") == [0, 1, 2, 3]
    assert parse_seeds("5,9, 11") == [5, 9, 11]
    with pytest.raises(erasekit.UserError):
        parse_seeds("a-b")


def test_info_describes_the_model(capsys, tiny_sd):
    code, out, _ = run(capsys, "info", tiny_sd)
    info = json.loads(out)
    assert code == 0 and info["cross_attention_matrices"] == 8 and info["token_length"] == 77


def test_generate_writes_grid_images_and_record(capsys, tiny_sd, tmp_path):
    out_dir = tmp_path / "gen"
    code, out, _ = run(capsys, "generate", tiny_sd, "-p", "a cat", "-p", "a red star", "--seeds", "0-2",
                       "--steps", "3", "--out", out_dir)
    assert code == 0 and "grid.png" in out
    record = json.loads((out_dir / "generation.json").read_text())
    assert len(record["images"]) == 6 and (out_dir / "grid.png").is_file()
    assert len(list((out_dir / "images").glob("*.png"))) == 6
    code, _, err = run(capsys, "generate", tiny_sd, "-p", "a cat", "--out", out_dir)
    assert code == 2 and "not empty" in one_line_error(err)
    assert len(json.loads((out_dir / "generation.json").read_text())["images"]) == 6  # untouched


def test_bad_input_is_one_line_and_exit_2(capsys, tiny_sd, tmp_path):
    code, _, err = run(capsys, "info", tmp_path / "missing")
    assert code == 2 and "does not exist" in one_line_error(err)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    code, _, err = run(capsys, "generate", tiny_sd, "--prompts-file", empty, "--out", tmp_path / "o")
    assert code == 2 and "no prompts" in one_line_error(err)
    assert not (tmp_path / "o").exists()


def test_long_prompt_warns_that_it_was_truncated(capsys, tiny_sd, tmp_path):
    code, _, err = run(capsys, "generate", tiny_sd, "-p", "a cat " * 60, "--seeds", "0", "--steps", "2",
                       "--out", tmp_path / "long")
    assert code == 0 and "truncated" in err


def test_apply_and_export_commands(capsys, tiny_sd, tiny_sd_other, tmp_path):
    model = erasekit.load(tiny_sd)
    layer = model.cross_attention_layers()[0]
    delta = Delta.from_changes(model, {layer.name: layer.weight * 0.5}, method="test")
    path = delta.save(tmp_path / "d.safetensors")
    code, out, _ = run(capsys, "apply", tiny_sd, "--delta", path)
    assert code == 0 and "applies cleanly" in out and "0.5" in out
    code, _, err = run(capsys, "apply", tiny_sd_other, "--delta", path)
    assert code == 2 and "made for base model" in one_line_error(err)
    code, out, _ = run(capsys, "export", tiny_sd, "--delta", path, "--out", tmp_path / "merged")
    assert code == 0
    merged = erasekit.load(tmp_path / "merged")
    assert torch.allclose(merged.parameter(layer.name), layer.weight * 0.5)
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 10)
    code, _, err = run(capsys, "export", tiny_sd, "--delta", tmp_path / "bad.safetensors", "--out", tmp_path / "x")
    assert code == 2 and "corrupt" in one_line_error(err)


def test_erase_command_writes_a_delta_and_reports(capsys, tiny_sd, tmp_path):
    out = tmp_path / "cat.safetensors"
    code, stdout, _ = run(capsys, "erase", tiny_sd, "--method", "uce", "--concept", "cat:kitten", "--anchor", "dog",
                          "--preserve", "star", "--expand", "--set", "lam=0.2", "--out", out)
    assert code == 0 and "edited 8 tensors" in stdout and out.is_file()
    delta = Delta.load(out)
    assert delta.method == "uce" and delta.config["lam"] == 0.2
    assert delta.config["spec"]["targets"] == [{"name": "cat", "synonyms": ["kitten"]}]
    code, _, err = run(capsys, "erase", tiny_sd, "--method", "uce", "--concept", "cat", "--out", out)
    assert code == 2 and "already exists" in one_line_error(err)


@pytest.mark.parametrize("argv, message", [
    (["--method", "magic", "--concept", "cat"], "unknown method 'magic'"),
    (["--method", "uce", "--concept", ""], "no target concept"),
    (["--method", "uce"], "no target concept"),
    (["--method", "uce", "--concept", "cat", "--concept", "cat"], "duplicate target"),
    (["--method", "uce", "--concept", "cat", "--anchor", "cat"], "is the target concept"),
    (["--method", "uce", "--concept", "cat", "--set", "lambda=1"], "unknown keys"),
    (["--method", "uce", "--concept", "cat", "--set", "lam"], "not KEY=VALUE"),
    (["--method", "uce", "--concept", "circle", "--anchor", "dot", "--testbed-spec"], "drop --anchor"),
    (["--method", "uce", "--concept", "cat", "--testbed-spec"], "unknown testbed concept 'cat'"),
])
def test_erase_bad_input(capsys, tiny_sd, tmp_path, argv, message):
    code, _, err = run(capsys, "erase", tiny_sd, *argv, "--out", tmp_path / "d.safetensors")
    assert code == 2 and message in one_line_error(err)
    assert not (tmp_path / "d.safetensors").exists()


def test_erase_with_a_spec_file_and_warnings(capsys, tiny_sd, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("targets: [{name: cat, synonyms: [kitten, kitty, tomcat]}]\nanchors: [dog]\nexpand: true\n")
    code, stdout, err = run(capsys, "erase", tiny_sd, "--method", "erasepro", "--spec", spec, "--set", "layers=kv",
                            "--out", tmp_path / "d.safetensors")
    assert code == 0 and "residual cannot be zero" in err and "residual" in stdout
    spec.write_text("targets: [cat]\ncolour: red\n")
    code, _, err = run(capsys, "erase", tiny_sd, "--method", "uce", "--spec", spec, "--out", tmp_path / "e.st")
    assert code == 2 and "unknown keys ['colour']" in one_line_error(err)


def test_erase_with_the_testbed_spec(capsys, tmp_path):
    out = tmp_path / "circle.safetensors"
    code, _, _ = run(capsys, "erase", "--method", "uce", "--concept", "circle", "--testbed-spec",
                     "--set", "positions=aligned", "--out", out)
    spec = Delta.load(out).config["spec"]
    assert code == 0 and spec["anchors"] == ["square"] and len(spec["templates"]) == 24
    assert spec["targets"][0]["synonyms"] == ["disc", "round shape", "dot"]


def test_erase_warns_about_a_concept_the_tokenizer_does_not_know(capsys, tmp_path):
    code, _, err = run(capsys, "erase", "--method", "uce", "--concept", "\U00013000", "--out", tmp_path / "u.st")
    assert code == 0 and "unknown to the tokenizer" in err
