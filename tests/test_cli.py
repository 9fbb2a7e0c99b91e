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


HEAVY = ("torch", "diffusers", "transformers", "safetensors", "accelerate")
LIGHT_CHECK = """
import contextlib, io, sys
from erasekit.cli import main
for argv in {argvs!r}:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's --help
            code = exc.code
    print(code, repr(err.getvalue().strip()))
print(sorted(m for m in {heavy!r} if m in sys.modules))
"""


def test_help_and_argument_errors_import_no_torch():
    """`--help`, a command's --help and an argument error answer without importing the model stack (which
    takes seconds to import): the commands import it themselves."""
    argvs = [["--help"], ["erase", "--help"], ["evaluate", "--help"], ["attack", "--help"], ["audit", "--help"],
             ["generate", "--steps", "0", "--out", "x"], ["nonsense"], ["erase", "--out", "x.safetensors"]]
    done = subprocess.run([sys.executable, "-c", LIGHT_CHECK.format(argvs=argvs, heavy=HEAVY)], capture_output=True,
                          text=True, check=True)
    *runs, imported = done.stdout.strip().splitlines()
    assert [r.split(" ", 1)[0] for r in runs] == ["0"] * 5 + ["2"] * 3, done.stdout
    assert all("erasekit: error:" in r for r in runs[5:]), done.stdout
    assert imported == "[]", f"imported {imported} for --help and argument errors"


def test_the_public_names_still_import_from_the_package():
    assert erasekit.load is erasekit.families.load and erasekit.Delta is erasekit.delta.Delta
    assert callable(erasekit.judge_factory) and "Model" in dir(erasekit)
    with pytest.raises(AttributeError):
        erasekit.no_such_name  # noqa: B018


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


def test_apply_lists_the_components_a_delta_touches(capsys, tiny_sd, tmp_path):
    """An ErasePro-like delta edits the UNet's K/V and the text encoder: a stock unet.load_state_dict(strict=False)
    would drop the text-encoder part silently, so apply names it."""
    from safetensors.torch import save_file

    model = erasekit.load(tiny_sd)
    kv = model.cross_attention_layers()[:3]
    text_key, text_module = model.text_mlp_layers()[0]
    new = {la.name: la.weight * 0.5 for la in kv}
    new[text_key] = text_module.weight * 1.25
    path = Delta.from_changes(model, new, method="erasepro").save(tmp_path / "ep.safetensors")
    code, out, _ = run(capsys, "apply", tiny_sd, "--delta", path)
    assert code == 0
    assert "UNet cross-attention K/V: 3 tensors, relative change mean 0.5, max 0.5" in out
    assert "text encoder: 1 tensors, relative change mean 0.25" in out and "other UNet" not in out
    assert "silently ignores the text encoder's tensors" in out
    save_file({la.name: (la.weight * 0.5).detach().contiguous() for la in kv}, str(tmp_path / "uce.safetensors"))
    code, out, _ = run(capsys, "apply", tiny_sd, "--delta", tmp_path / "uce.safetensors")
    assert code == 0 and "(foreign delta, provenance unknown) applies cleanly" in out
    assert "file sha256 " in out and "text encoder" not in out


@pytest.fixture(scope="module")
def pickled_sd(tmp_path_factory, tiny_sd):
    """The tiny SD folder saved with pickled .bin weights (safe_serialization=False)."""
    import warnings

    from diffusers import StableDiffusionPipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    out = tmp_path_factory.mktemp("pickled") / "sd"
    pipe.save_pretrained(out, safe_serialization=False)
    assert (out / "unet" / "diffusion_pytorch_model.bin").is_file()
    return out


def test_a_folder_of_pickled_weights_loads_only_with_the_explicit_flag(capsys, pickled_sd, tiny_sd):
    code, _, err = run(capsys, "info", pickled_sd)
    line = one_line_error(err)
    assert code == 2 and "erasekit loads no pickle by default" in line and "diffusion_pytorch_model.bin" in line
    assert "safe_serialization=True" in line and "--allow-pickle-weights" in line
    with pytest.raises(erasekit.UserError, match="loads no pickle"):
        erasekit.load(pickled_sd)
    code, out, _ = run(capsys, "info", pickled_sd, "--allow-pickle-weights")
    assert code == 0 and json.loads(out)["cross_attention_matrices"] == 8
    loaded = erasekit.load(pickled_sd, allow_pickle=True)
    name = loaded.cross_attention_layers()[0].name
    assert torch.equal(loaded.parameter(name), erasekit.load(tiny_sd).parameter(name))


@pytest.mark.parametrize("name, data, message", [
    ("latin1.txt", "a café\n".encode("latin-1"), "is not UTF-8 (byte 0xe9 on line 1"),
    ("utf16.txt", "a cat\n".encode("utf-16"), "is UTF-16 text: save it as UTF-8"),
    ("nul.txt", b"a cat\na d\x00og\n", "holds a NUL byte on line 2"),
    ("quote.csv", b'prompt,seed\na cat,0\n"a dog,1\na star,2\na tree,3\n', "line 3: a quote that is never closed"),
    ("fields.csv", b"prompt,seed\na cat,0\na dog,1,extra\n", "line 3 has 3 fields but the header has 2"),
    ("latin1.csv", "prompt\na café\n".encode("latin-1"), "is not UTF-8"),
])
def test_bad_prompt_files_are_one_line(capsys, tiny_sd, tmp_path, name, data, message):
    (tmp_path / name).write_bytes(data)
    code, _, err = run(capsys, "generate", tiny_sd, "--prompts-file", tmp_path / name, "--out", tmp_path / "o")
    line = one_line_error(err)
    assert code == 2 and message in line and name in line
    assert not (tmp_path / "o").exists()


def test_prompt_files_with_a_byte_order_mark_are_read(tmp_path):
    from erasekit.files import read_mapping, read_prompt_list

    (tmp_path / "p.csv").write_bytes("prompt,seed\na cat,0\n\"a dog, sitting\",1\n".encode("utf-8-sig"))
    assert read_prompt_list(tmp_path / "p.csv") == ["a cat", "a dog, sitting"]
    (tmp_path / "p.txt").write_bytes("a cat\n\na star\n".encode("utf-8-sig"))
    assert read_prompt_list(tmp_path / "p.txt") == ["a cat", "a star"]
    (tmp_path / "c.yaml").write_bytes("lam: 0.5\n".encode("utf-8-sig"))
    assert read_mapping(tmp_path / "c.yaml") == {"lam": 0.5}
    (tmp_path / "c.json").write_bytes('{"lam": 1}'.encode("utf-16"))
    with pytest.raises(erasekit.UserError, match="config file .*c.json is UTF-16"):
        read_mapping(tmp_path / "c.json")


def test_erase_refuses_a_latin1_config_and_spec(capsys, tiny_sd, tmp_path):
    (tmp_path / "c.yaml").write_bytes("lam: 0.5 # café\n".encode("latin-1"))
    code, _, err = run(capsys, "erase", tiny_sd, "--method", "uce", "--concept", "cat", "--config",
                       tmp_path / "c.yaml", "--out", tmp_path / "d.safetensors")
    assert code == 2 and "config file" in one_line_error(err) and "is not UTF-8" in err
    (tmp_path / "s.yaml").write_bytes("targets: [caf\xe9]\n".encode("latin-1"))
    code, _, err = run(capsys, "erase", tiny_sd, "--method", "uce", "--spec", tmp_path / "s.yaml",
                       "--out", tmp_path / "d.safetensors")
    assert code == 2 and "spec file" in one_line_error(err) and not (tmp_path / "d.safetensors").exists()


def test_a_diverged_erasure_writes_nothing_and_says_what_to_lower(capsys, tiny_sd, tmp_path):
    out = tmp_path / "d.safetensors"
    code, _, err = run(capsys, "erase", tiny_sd, "--method", "esd", "--concept", "cat", "--set", "lr=1e20",
                       "--set", "steps=2", "--set", "sampler_steps=2", "--set", "progress=false", "--out", out)
    line = one_line_error(err)
    assert code == 2 and "esd diverged" in line and "hold NaN or inf" in line and "lower lr (it was 1e+20)" in line
    assert not out.exists() and not list(tmp_path.iterdir())


def test_every_flag_an_error_or_help_names_exists():
    """A message that tells the user to pass --something names a flag the parser has."""
    import argparse
    import re
    from pathlib import Path

    from erasekit.cli import build_parser

    def flags(parser) -> set[str]:
        found = {o for a in parser._actions for o in a.option_strings}
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    found |= flags(sub)
        return found

    known = flags(build_parser())
    src = Path(__file__).resolve().parents[1] / "src" / "erasekit"
    code = ["\n".join(line for line in f.read_text().splitlines() if not line.strip().startswith("#"))
            for f in src.rglob("*.py")]  # comments may name other tools' flags; accelerate's have _ (--multi_gpu)
    named = {m for text in code for m in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+(?!\w)", text)}
    assert named - known == set(), f"messages name flags no command has: {sorted(named - known)}"
