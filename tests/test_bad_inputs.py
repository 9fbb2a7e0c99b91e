"""Every bad input ends in one line: exit 2, one `erasekit: error:` line, no traceback, no new file in the
working folder or beside the inputs, and the source model folder byte-identical. Adding a case is one line:
(argv with {sd} the tiny SD folder, {in} the folder of prepared bad files, {delta} a testbed delta,
{weights} the testbed's shipped weights; a fragment the error line must contain)."""

from __future__ import annotations

import argparse
import hashlib
import os
import struct
import warnings
from pathlib import Path

import pytest
import torch

from cli_helpers import one_line_error
from erasekit.cli import main
from erasekit.testbed import WEIGHTS_DIR

CASES = [
    # -- every command: the command line itself
    ([], "required"),
    (["nonsense"], "invalid choice"),
    (["info", "--bogus"], "unrecognized arguments"),
    (["testbed"], "required"),
    # -- models and deltas
    (["info", "{in}/no-such-model"], "does not exist"),
    (["info", "{in}/afile"], "not a diffusers pipeline folder"),
    (["info", "testbed:no-dragon"], "unknown testbed model"),
    (["info", "--delta", "{in}/missing.safetensors"], "--delta {in}/missing.safetensors does not exist"),
    (["info", "--delta", "{in}/full"], "is a folder"),
    (["info", "--delta", "{in}/random.safetensors"], "random.safetensors"),
    (["info", "--delta", "{in}/delta.bin"], "pickle"),
    (["apply"], "--delta"),
    (["apply", "--delta", "{in}/missing.safetensors"], "does not exist"),
    (["apply", "{sd}", "--delta", "{delta}"], "another architecture"),
    (["apply", "testbed:no-circle", "--delta", "{delta}"], "base"),
    # -- generate: prompts, seeds, sampler settings
    (["generate", "--out", "o"], "no prompts"),
    (["generate", "-p", "x", "--seeds", "99999999999999999999999", "--out", "o"], "out of range"),
    (["generate", "-p", "x", "--seeds", "-5", "--out", "o"], "out of range"),
    (["generate", "-p", "x", "--seeds", "abc", "--out", "o"], "cannot read seeds"),
    (["generate", "-p", "x", "--seeds", "5-1", "--out", "o"], "backwards"),
    (["generate", "-p", "x", "--seeds", "0-9999999", "--out", "o"], "at most"),
    (["generate", "-p", "x", "--steps", "0", "--out", "o"], "at least 1"),
    (["generate", "-p", "x", "--steps", "-3", "--out", "o"], "at least 1"),
    (["generate", "-p", "x", "--steps", "2.5", "--out", "o"], "whole number"),
    (["generate", "-p", "x", "--batch-size", "0", "--out", "o"], "at least 1"),
    (["generate", "-p", "x", "--batch-size", "-1", "--out", "o"], "at least 1"),
    (["generate", "-p", "x", "--guidance", "nan", "--out", "o"], "finite"),
    (["generate", "-p", "x", "--guidance", "inf", "--out", "o"], "finite"),
    (["generate", "--prompts-file", "{in}/missing.txt", "--out", "o"], "does not exist"),
    (["generate", "--prompts-file", "{in}/latin1.txt", "--out", "o"], "UTF-8"),
    (["generate", "--prompts-file", "{in}/utf16.txt", "--out", "o"], "UTF-8"),
    (["generate", "--prompts-file", "{in}/nul.txt", "--out", "o"], "NUL"),
    (["generate", "--prompts-file", "{in}/blank.txt", "--out", "o"], "no prompts"),
    (["generate", "--prompts-file", "{in}/unclosed.csv", "--out", "o"], "line"),
    (["generate", "{sd}", "--delta", "{delta}", "-p", "x", "--out", "o"], "another architecture"),
    # -- output paths: never inside a source model, never under a file, never clobbered
    (["generate", "{sd}", "-p", "x", "--out", "{sd}/out"], "source model folder"),
    (["generate", "{sd}", "-p", "x", "--out", "{sd}"], "source model folder"),
    (["generate", "-p", "x", "--out", "{weights}/images"], "source model folder"),
    (["generate", "-p", "x", "--out", "{in}/afile/sub"], "is a file, not a folder"),
    (["generate", "-p", "x", "--out", "{in}/afile"], "is a file"),
    (["generate", "-p", "x", "--out", "{in}/full"], "not empty"),
    (["export", "{sd}", "--out", "{sd}/exported"], "source model folder"),
    (["export", "--out", "{in}/full"], "not empty"),
    (["export", "--delta", "{in}/missing.safetensors", "--out", "o"], "does not exist"),
    (["erase", "{sd}", "--method", "uce", "--concept", "cat", "--out", "{sd}/unet/x.safetensors"], "source model"),
    (["erase", "{sd}", "--method", "esd", "--concept", "cat", "--set", "steps=2", "--set", "run_dir={sd}/run",
      "--out", "d.safetensors"], "source model folder"),
    (["erase", "--method", "uce", "--concept", "circle", "--out", "{weights}/d.safetensors"], "source model"),
    (["erase", "--method", "uce", "--concept", "circle", "--out", "{in}/existing.safetensors"], "--overwrite"),
    (["erase", "--method", "uce", "--concept", "circle", "--overwrite", "--out", "{in}/full"], "is a folder"),
    (["erase", "--method", "uce", "--concept", "circle", "--out", "{in}/afile/d.safetensors"], "is a file"),
    (["testbed", "train-judge", "--out", "{in}/existing.safetensors"], "--overwrite"),
    (["testbed", "evaluate", "--json", "{in}/full"], "is a folder"),
    (["testbed", "evaluate", "--json", "{in}/existing.safetensors"], "--overwrite"),
    # -- erase: methods, concepts, settings
    (["erase", "--method", "nope", "--concept", "circle", "--out", "d.safetensors"], "unknown method"),
    (["erase", "{sd}", "--method", "uce", "--concept", "cat", "--set", "layers=blocks", "--out", "d.safetensors"],
     "no layer set 'blocks'"),
    (["erase", "--method", "uce+uce", "--concept", "circle", "--out", "d.safetensors"], "closed form"),
    (["erase", "--method", "uce", "--out", "d.safetensors"], "no target concept"),
    (["erase", "--method", "uce", "--concept", "", "--out", "d.safetensors"], "no target concept"),
    (["erase", "--method", "uce", "--concept", "circle", "--testbed-spec", "--anchor", "x", "--out", "d.safetensors"],
     "drop"),
    (["erase", "--method", "uce", "--concept", "cat", "--expand", "--templates", "nope", "--out", "d.safetensors"],
     "unknown template set"),
    (["erase", "--method", "uce", "--concept", "circle", "--set", "lam=inf", "--out", "d.safetensors"], "finite"),
    (["erase", "--method", "uce", "--concept", "circle", "--set", "lam=nan", "--out", "d.safetensors"], "finite"),
    (["erase", "--method", "uce", "--concept", "circle", "--set", "lam=-1", "--out", "d.safetensors"], "negative"),
    (["erase", "--method", "uce", "--concept", "circle", "--set", "lam", "--out", "d.safetensors"], "KEY=VALUE"),
    (["erase", "--method", "uce", "--concept", "circle", "--set", "lambda=1", "--out", "d.safetensors"],
     "unknown keys"),
    (["erase", "--method", "uce", "--concept", "circle", "--set", "synonyms=maybe", "--out", "d.safetensors"],
     "cannot read"),
    (["erase", "--method", "esd", "--concept", "circle", "--set", "steps=0", "--out", "d.safetensors"], "at least 1"),
    (["erase", "--method", "esd", "--concept", "circle", "--set", "steps=-3", "--out", "d.safetensors"], "at least 1"),
    (["erase", "--method", "esd", "--concept", "circle", "--set", "lr=inf", "--out", "d.safetensors"], "finite"),
    (["erase", "--method", "esd", "--concept", "circle", "--set", "lr=nan", "--out", "d.safetensors"], "finite"),
    (["erase", "--method", "esd", "--concept", "circle", "--set", "seed=-5", "--out", "d.safetensors"],
     "out of range"),
    (["erase", "--method", "esd", "--concept", "circle", "--set", "mixed_precision=fp16", "--out", "d.safetensors"],
     "mixed_precision"),
    (["erase", "--method", "esd", "--concept", "circle", "--set", "optimizer=sgd", "--out", "d.safetensors"],
     "optimizer"),
    (["erase", "--method", "esd", "--concept", "circle", "--set", "guide=nope", "--out", "d.safetensors"], "guide"),
    (["erase", "--method", "score", "--concept", "circle", "--set", "saliency=2", "--out", "d.safetensors"],
     "between 0 and 1"),
    (["erase", "--method", "trce", "--concept", "circle", "--set", "trce-stage2.steps=0", "--out", "d.safetensors"],
     "at least 1"),
    (["erase", "--method", "uce", "--config", "{in}/nan.yaml", "--concept", "circle", "--out", "d.safetensors"],
     "finite"),
    (["erase", "--method", "uce", "--config", "{in}/python.yaml", "--concept", "circle", "--out", "d.safetensors"],
     "cannot read"),
    (["erase", "--method", "uce", "--config", "{in}/latin1.yaml", "--concept", "circle", "--out", "d.safetensors"],
     "UTF-8"),
    (["erase", "--method", "uce", "--config", "{in}/options.ini", "--concept", "circle", "--out", "d.safetensors"],
     ".yaml"),
    (["erase", "--method", "uce", "--config", "{in}/missing.yaml", "--concept", "circle", "--out", "d.safetensors"],
     "does not exist"),
    (["erase", "--method", "uce", "--spec", "{in}/wrongtype.yaml", "--out", "d.safetensors"], "preserve"),
    (["erase", "--method", "uce", "--spec", "{in}/spec.yaml", "--concept", "x", "--out", "d.safetensors"],
     "not both"),
    (["erase", "--method", "trce-stage1", "--concept", "circle", "--set", "prior_prompts={in}/missing.txt",
      "--out", "d.safetensors"], "does not exist"),
    # -- evaluate and compare: suites, judges, limits
    (["evaluate", "--suite", "testbed:dragon", "--out", "o"], "dragon"),
    (["evaluate", "--suite", "{in}/missing.csv", "--out", "o"], "does not exist"),
    (["evaluate", "--suite", "{in}/nocolumn.csv", "--out", "o"], "column"),
    (["evaluate", "--suite", "{in}/badseed.csv", "--out", "o"], "seed"),
    (["evaluate", "--suite", "{in}/badguidance.csv", "--out", "o"], "guidance"),
    (["evaluate", "--suite", "{in}/headeronly.csv", "--out", "o"], "no prompts"),
    (["evaluate", "--suite", "{in}/unclosed.csv", "--out", "o"], "line"),
    (["evaluate", "--suite", "{in}/ragged.csv", "--out", "o"], "line"),
    (["evaluate", "--suite", "testbed:circle", "--limit", "0", "--out", "o"], "at least 1"),
    (["evaluate", "--suite", "testbed:circle", "--limit", "-2", "--out", "o"], "at least 1"),
    (["evaluate", "--suite", "testbed:circle", "--samples", "0", "--out", "o"], "at least 1"),
    (["evaluate", "--suite", "testbed:circle", "--threshold", "1.5", "--out", "o"], "[0, 1)"),
    (["evaluate", "--suite", "testbed:circle", "--threshold", "-0.1", "--out", "o"], "[0, 1)"),
    (["evaluate", "--suite", "testbed:circle", "--threshold", "nan", "--out", "o"], "finite"),
    (["evaluate", "--suite", "testbed:circle", "--judge", "nope", "--out", "o"], "judge"),
    (["evaluate", "--suite", "testbed:circle", "--judge", "os:system", "--out", "o"], "Judge"),
    (["evaluate", "--suite", "testbed:circle", "--judge", "json:dumps", "--out", "o"], "Judge"),
    (["evaluate", "--suite", "testbed:circle", "--judge", "no_such_module_here:x", "--out", "o"], "no_such_module"),
    (["evaluate", "--suite", "testbed:circle", "--real-images", "{in}/missing", "--out", "o"], "does not exist"),
    (["evaluate", "--suite", "testbed:circle", "--out", "{in}/afile"], "is a file"),
    (["evaluate", "{sd}", "--suite", "testbed:circle", "--out", "{sd}/eval"], "source model folder"),
    (["compare", "--suite", "testbed:circle", "--out", "o"], "--delta"),
    (["evaluate", "--suite", "testbed:circle", "--judge", "classifier:{in}/missing", "--out", "o"], "missing"),
    (["evaluate", "--suite", "testbed:circle", "--judge", "clip:{in}/afile", "--out", "o"], "afile"),
    (["evaluate", "--suite", "testbed:circle", "--clip", "{in}/missing", "--out", "o"], "does not exist"),
    (["evaluate", "--suite", "testbed:circle", "--fid-features", "{in}/afile", "--out", "o"], "is a file"),
    (["evaluate", "--suite", "testbed:circle", "--fid-features", "inception:{in}/missing.pth", "--out", "o"],
     "--fid-features {in}/missing.pth does not exist"),
    (["evaluate", "--suite", "testbed:circle", "--fid-features", "inception:{in}/full", "--out", "o"], "is a folder"),
    (["evaluate", "--suite", "testbed:circle", "--fid-features", "inception:{in}/wrong.pth", "--out", "o"],
     "wrong.pth is not the FID Inception-v3: it lacks 472 of its 472 tensors"),
    (["evaluate", "--suite", "testbed:circle", "--fid-features", "inception:{in}/cut.pth", "--out", "o"],
     "cut.pth is not a complete PyTorch weight file (cut short or another format"),
    (["evaluate", "--suite", "testbed:circle", "--fid-features", "inception:{in}/object.pth", "--out", "o"],
     "holds a Python object (argparse.Namespace), which erasekit does not unpickle"),
    (["evaluate", "--suite", "testbed:circle", "--fid-features", "inception:{in}/torchscript.pt", "--out", "o"],
     "is a TorchScript archive"),
    (["evaluate", "--suite", "testbed:circle", "--fid-features", "inception:{in}/random.safetensors", "--out", "o"],
     "not a complete safetensors weight file"),
    (["compare", "--delta", "{delta}", "--suite", "testbed:circle", "--fid-features", "inception:{in}/delta.bin",
      "--out", "o"], "pt_inception-2015-12-05-6726825d.pth"),
    (["evaluate", "--suite", "testbed:circle", "--judge-option", "threshold", "--out", "o"], "KEY=VALUE"),
    (["evaluate", "--suite", "testbed:circle", "--delta", "{in}/full", "--out", "o"], "full"),
    (["evaluate", "--out", "o"], "--suite is required"),
    # -- evaluate: protocol presets, samplers, dtype, seed
    (["evaluate", "--suite", "testbed:circle", "--protocol", "nope", "--out", "o"],
     "unknown protocol 'nope': use one of unlearndiff-nudity, advunlearn-coco, trce, mace-coco, ringabell-nudity"),
    (["evaluate", "--protocol", "p4d-nudity", "--out", "o"],
     "--protocol p4d-nudity runs on nudity-p4d.csv (151 prompts): pass --suite PATH"),
    (["evaluate", "--protocol", "trce", "--out", "o"], "runs on one of nudity-unlearndiff.csv (142 prompts)"),
    (["evaluate", "--suite", "testbed:circle", "--scheduler", "euler", "--out", "o"], "unknown sampler 'euler'"),
    (["evaluate", "--suite", "testbed:circle", "--scheduler", "pndm", "--out", "o"],
     "cannot step a model that predicts 'sample'"),
    (["evaluate", "--suite", "testbed:circle", "--dtype", "fp8", "--out", "o"], "unknown dtype 'fp8'"),
    (["evaluate", "--suite", "testbed:circle", "--seed", "-1", "--out", "o"], "out of range"),
    (["compare", "--delta", "{delta}", "--suite", "testbed:circle", "--protocol", "mace", "--out", "o"],
     "unknown protocol 'mace'"),
    # -- attack
    (["attack", "--delta", "{delta}", "--attack", "nope", "--suite", "testbed:circle", "--out", "o"],
     "unknown attack"),
    (["attack", "--attack", "p4d", "--suite", "testbed:circle", "--out", "o"], "--delta"),
    (["attack", "--delta", "{delta}", "--attack", "p4d", "--set", "iterations=0", "--suite", "testbed:circle",
      "--out", "o"], "at least 1"),
    (["attack", "--delta", "{delta}", "--attack", "unlearndiff", "--set", "iterations=-4", "--suite",
      "testbed:circle", "--out", "o"], "at least 1"),
    (["attack", "--delta", "{delta}", "--attack", "ringabell", "--set", "population=0", "--suite", "testbed:circle",
      "--out", "o"], "at least 1"),
    (["attack", "--delta", "{delta}", "--attack", "ringabell", "--set", "crossover=2", "--suite", "testbed:circle",
      "--out", "o"], "between 0 and 1"),
    (["attack", "--delta", "{delta}", "--attack", "p4d", "--set", "lr=nan", "--suite", "testbed:circle",
      "--out", "o"], "finite"),
    (["attack", "--delta", "{delta}", "--attack", "p4d", "--set", "preservation", "--suite", "testbed:circle",
      "--out", "o"], "--prompt-set"),
    (["attack", "--delta", "{delta}", "--attack", "p4d-k", "--set", "variant=n", "--suite", "testbed:circle",
      "--out", "o"], "fixes"),
    (["attack", "--delta", "{delta}", "--attack", "p4d", "--suite", "testbed:circle", "--batch-size", "0",
      "--out", "o"], "at least 1"),
    (["attack", "--delta", "{delta}", "--attack", "p4d", "--suite", "testbed:circle", "--protocol", "nope",
      "--out", "o"], "unknown protocol"),
    (["attack", "--delta", "{delta}", "--attack", "p4d", "--protocol", "ringabell-nudity", "--out", "o"],
     "nudity-ring-a-bell.csv (79 prompts)"),
    # -- audit
    (["audit", "--delta", "{delta}", "--suite", "testbed:circle", "--protocol", "nope", "--out", "o"],
     "unknown protocol"),
    (["audit", "--suite", "testbed:circle", "--out", "o"], "--delta"),
    (["audit", "--delta", "{delta}", "--suite", "testbed:circle", "--random-prompts", "0", "--out", "o"],
     "at least 1"),
    (["audit", "--delta", "{delta}", "--suite", "testbed:circle", "--set", "iterations=3", "--out", "o"],
     "ATTACK.KEY=VALUE"),
    (["audit", "--delta", "{delta}", "--suite", "testbed:circle", "--set", "p4d.iterations=0", "--out", "o"],
     "at least 1"),
    (["audit", "--delta", "{delta}", "--suite", "testbed:dragon", "--out", "o"], "dragon"),
    (["audit", "--delta", "{delta}", "--suite", "testbed:circle", "--out", "{weights}/audit"], "source model folder"),
    # -- harden
    (["harden", "--method", "uce", "--concept", "circle", "--concept", "red", "--out", "d.safetensors"],
     "one concept at a time"),
    (["harden", "--method", "uce", "--concept", "circle", "--attack", "nope", "--out", "d.safetensors"], "nope"),
    (["harden", "--method", "uce", "--concept", "circle", "--rounds", "0", "--out", "d.safetensors"], "at least 1"),
    (["harden", "--method", "uce", "--concept", "circle", "--attack-set", "iterations=-1", "--out", "d.safetensors"],
     "iterations"),
    (["harden", "{sd}", "--method", "uce", "--concept", "cat", "--out", "d.safetensors"], "--suite FILE"),
    (["harden", "{sd}", "--method", "uce", "--concept", "cat", "--out", "{sd}/d.safetensors"], "source model folder"),
    (["harden", "{sd}", "--method", "uce", "--concept", "cat", "--run-dir", "{sd}/rounds", "--out", "d.safetensors"],
     "source model folder"),
    # -- hub ids
    (["info", "nosuchorg/nosuchmodel", "--offline"], "not in the local Hugging Face cache"),
    # -- demo and testbed commands
    (["demo", "--samples", "0"], "at least 1"),
    (["demo", "--concept", "dragon"], "unknown testbed concept"),
    (["demo", "--method", "esd"], "closed-form"),
    (["demo", "--out", "{in}/afile"], "is a file"),
    (["testbed", "train", "--steps", "0", "--out", "o"], "at least 1"),
    (["testbed", "train", "--lr", "nan", "--out", "o"], "finite"),
    (["testbed", "train", "--init-from", "{in}/missing", "--out", "o"], "does not exist"),
    (["testbed", "train", "--exclude", "dragon", "--out", "o"], "not a testbed value"),
    (["testbed", "train", "--out", "{weights}"], "source model folder"),
    (["testbed", "evaluate", "--samples", "0"], "at least 1"),
    (["testbed", "evaluate", "--weights", "{in}/missing"], "does not exist"),
]


def folder_sha256(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        h.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()


def listing(folder: Path) -> set[tuple]:
    """Every path under folder with its size and modification time: a new, removed or rewritten file shows."""
    return {(str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, tiny_sd) -> dict[str, Path]:
    """The prepared inputs: bad files of every kind, a testbed delta, the tiny SD folder."""
    d = tmp_path_factory.mktemp("inputs")
    (d / "afile").write_text("not a folder\n")
    (d / "full").mkdir()
    (d / "full" / "keep.txt").write_text("the user's file\n")
    (d / "existing.safetensors").write_bytes(b"the user's earlier output")
    (d / "latin1.txt").write_bytes("a caf\xe9 on a table\n".encode("latin-1"))
    (d / "utf16.txt").write_bytes("a red circle\n".encode("utf-16"))
    (d / "nul.txt").write_bytes(b"a red circle\n\x00a blue square\n")
    (d / "blank.txt").write_text("\n  \n")
    (d / "unclosed.csv").write_text('prompt,seed\n"a red circle,1\na blue square,2\na star,3\n')
    (d / "ragged.csv").write_text("prompt,seed\na red circle,1\na blue square,2,7,8\n")
    (d / "nocolumn.csv").write_text("text,seed\na red circle,1\n")
    (d / "badseed.csv").write_text("prompt,evaluation_seed\na red circle,abc\n")
    (d / "badguidance.csv").write_text("prompt,evaluation_guidance\na red circle,strong\n")
    (d / "headeronly.csv").write_text("prompt,seed\n")
    (d / "nan.yaml").write_text("lam: .nan\n")
    (d / "python.yaml").write_text("lam: !!python/object/apply:os.system ['echo hi']\n")
    (d / "latin1.yaml").write_bytes("lam: 0.5  # \xe9\n".encode("latin-1"))
    (d / "options.ini").write_text("[uce]\nlam = 0.5\n")
    (d / "wrongtype.yaml").write_text("targets: [circle]\npreserve: 5\n")
    (d / "spec.yaml").write_text("targets: [circle]\npreserve: [square]\n")
    header = b'{"__metadata__": {}}'
    (d / "random.safetensors").write_bytes(struct.pack("<Q", 10**9) + header + os.urandom(64))
    (d / "delta.bin").write_bytes(b"\x80\x04\x95pickled")
    torch.save({"conv.weight": torch.zeros(2)}, d / "wrong.pth")  # not the FID Inception's tensors
    torch.save({"a": torch.zeros(256)}, d / "cut.pth")
    (d / "cut.pth").write_bytes((d / "cut.pth").read_bytes()[:700])  # a download cut short
    torch.save({"a": argparse.Namespace(x=1)}, d / "object.pth")  # a pickled object, refused unread
    with warnings.catch_warnings():  # torch.jit.script is deprecated; its archives are still what users hold
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(torch.nn.Linear(2, 2)).save(str(d / "torchscript.pt"))  # clean-fid's kind of file
    delta = d / "circle.safetensors"
    assert main(["erase", "--method", "uce", "--concept", "circle", "--out", str(delta)]) == 0
    return {"in": d, "delta": delta, "sd": tiny_sd, "weights": WEIGHTS_DIR}


@pytest.mark.parametrize("argv, message", CASES, ids=[" ".join(c[0])[:70] for c in CASES])
def test_bad_input_ends_in_one_line_and_writes_nothing(argv, message, bad_files, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    fill = {k: str(v) for k, v in bad_files.items()}
    argv = [a.format(**fill) for a in argv]
    watched = [tmp_path, bad_files["in"], bad_files["sd"], WEIGHTS_DIR]
    before = {str(f): listing(f) for f in watched}
    source_sha256 = folder_sha256(bad_files["sd"])
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (argv, out, err)
    line = one_line_error(err)
    assert message.format(**fill) in line, line
    for folder in watched:
        assert listing(folder) == before[str(folder)], f"{folder} changed: {line}"
    assert folder_sha256(bad_files["sd"]) == source_sha256


def test_the_table_covers_every_command():
    commands = {c[0][0] for c in CASES if c[0]} | {" ".join(c[0][:2]) for c in CASES if c[0][:1] == ["testbed"]}
    assert {"info", "generate", "apply", "export", "erase", "evaluate", "compare", "attack", "audit", "demo",
            "testbed train", "testbed evaluate", "testbed train-judge"} <= commands
    assert len(CASES) >= 80
