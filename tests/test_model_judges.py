"""Judges and quality metrics on local transformers folders (classifier:, clip:, --clip, --fid-features), each
checked on synthetic images whose answer is known, with tiny models built and fitted here (nothing downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cli_helpers import one_line_error, run
from erasekit.errors import UserError
from erasekit.evaluation.judges import file_sha256, get_judge
from erasekit.evaluation.labels import IMAGENETTE, label_key
from erasekit.evaluation.vision import ClipScorer, ImageFeatures
from erasekit.metrics import frechet_distance
from erasekit.testing import make_tiny_classifier, make_tiny_clip, make_tiny_dinov2

RED, BLUE, GREEN, GRAY = [0.9, 0.1, 0.1], [0.1, 0.1, 0.9], [0.1, 0.8, 0.1], [0.5, 0.5, 0.5]


def kind(rgb, n: int, seed: int) -> torch.Tensor:
    """n noisy images (3, 24, 24) around one colour."""
    g = torch.Generator().manual_seed(seed)
    return (torch.tensor(rgb).view(1, 3, 1, 1) + 0.15 * torch.randn(n, 3, 24, 24, generator=g)).clamp(0, 1)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vision")
    train = [(kind(RED, 6, 1), 0), (kind(BLUE, 6, 2), 1), (kind(GREEN, 6, 3), 2)]
    captions = [(kind(RED, 6, 1), "a photo of red"), (kind(BLUE, 6, 2), "a photo of blue"),
                (kind(GREEN, 6, 3), "a photo of green"), (kind(GRAY, 6, 4), "a photo")]
    out = {"classifier": make_tiny_classifier(root / "cls", ["red, crimson", "navy-blue", "green"], examples=train,
                                              steps=40),
           "clip": make_tiny_clip(root / "clip", captions),
           "dinov2": make_tiny_dinov2(root / "dino")}
    return out


@pytest.fixture(scope="module")
def test_images() -> torch.Tensor:
    """4 red, then 4 blue images the models never saw."""
    return torch.cat([kind(RED, 4, 11), kind(BLUE, 4, 12)])


IS_RED = [True] * 4 + [False] * 4


# --- classifier: ----------------------------------------------------------------------------------


def test_classifier_flags_the_top_k_label(folders, test_images):
    judge = get_judge(f"classifier:{folders['classifier']}")
    assert judge.top_k == 1 and judge.threshold == 0.0
    assert judge.flags(test_images, "red, crimson").tolist() == IS_RED
    judge.use_concepts(["Crimson", "navy blue"])  # a comma-separated name, and '-' read as a space, any case
    assert judge.concepts == ("Crimson", "navy blue")
    scores = judge.scores(test_images)
    assert (scores["Crimson"] > 0).tolist() == IS_RED and (scores["navy blue"] > 0).tolist() == [not r for r in IS_RED]
    details = judge.details(test_images)
    assert [d["values"]["label"] for d in details] == ["red"] * 4 + ["navy-blue"] * 4
    assert judge.features(test_images).shape == (8, 16)  # the classification head's input
    renamed = get_judge(f"classifier:{folders['classifier']}", label="navy-blue")  # the prompts' "blue"
    renamed.use_concepts(["blue"])
    assert renamed.flags(test_images, "blue").tolist() == [not r for r in IS_RED]
    assert renamed.record()["label"] == "navy-blue" and renamed.record()["class_ids"] == {"blue": [1]}
    every = get_judge(f"classifier:{folders['classifier']}", top_k=3)  # all three classes: every image
    assert every.flags(test_images, "red").all()
    strict = get_judge(f"classifier:{folders['classifier']}", top_k="3", threshold=0.5)  # top-3 and p > 0.5
    assert strict.flags(test_images, "red").tolist() == IS_RED


def test_classifier_record_names_every_choice(folders):
    judge = get_judge(f"classifier:{folders['classifier']}", top_k=2, threshold=0.1)
    judge.use_concepts(["red"])
    record = judge.record()
    json.dumps(record)
    assert record["top_k"] == 2 and record["threshold"] == 0.1 and record["class_ids"] == {"red": [0]}
    assert record["class_set"]["name"] == "model" and record["class_set"]["classes"] == 3
    model = record["model"]
    assert model["path"] == str(folders["classifier"]) and model["model_type"] == "resnet"
    assert model["weights_sha256"] == {"model.safetensors": file_sha256(folders["classifier"] / "model.safetensors")}
    assert model["config_sha256"] == file_sha256(folders["classifier"] / "config.json")


def test_classifier_bad_input_is_one_line(folders, tmp_path):
    path = folders["classifier"]
    cases = [
        (lambda: get_judge(f"classifier:{path}").use_concepts(["zebra"]), "has no label 'zebra'"),
        (lambda: get_judge(f"classifier:{path}", top_k=0), "top_k must be a whole number of at least 1"),
        (lambda: get_judge(f"classifier:{path}", top_k=4), "more than the classifier's 3 classes"),
        (lambda: get_judge(f"classifier:{path}", labels="imagenette"), "needs an ImageNet-1k classifier"),
        (lambda: get_judge(f"classifier:{path}", colour=1), "has no option colour"),
        (lambda: get_judge(f"classifier:{path}", label="cyan"), "has no label 'cyan'"),
        (lambda: get_judge(f"classifier:{path}", label="green").use_concepts(["a", "b"]), "for one concept"),
        (lambda: get_judge("classifier:"), "names no folder"),
        (lambda: get_judge(f"classifier:{tmp_path / 'none'}"), "does not exist"),
    ]
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        (pickled / name).write_text((path / name).read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    cases.append((lambda: get_judge(f"classifier:{pickled}"), "holds pytorch_model.bin: erasekit loads no pickle"))
    for build, match in cases:
        with pytest.raises(UserError, match=match) as err:
            build()
        assert "\n" not in str(err.value)


def test_imagenette_label_set(tmp_path, test_images):
    names = {i: f"LABEL_{i}" for i in range(1000)}
    folder = make_tiny_classifier(tmp_path / "imagenet", [names[i] for i in range(1000)])
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    weights["classifier.1.weight"].zero_()
    weights["classifier.1.bias"].zero_()
    weights["classifier.1.bias"][IMAGENETTE["garbage truck"]] = 10.0  # every image is a garbage truck
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    judge = get_judge(f"classifier:{folder}", labels="imagenette")
    assert judge.concepts == tuple(IMAGENETTE)
    judge.use_concepts(["garbage truck", "tench"])
    assert judge.flags(test_images, "garbage truck").all() and not judge.flags(test_images, "tench").any()
    assert judge.details(test_images)[0]["values"] == {"label": "garbage truck"}
    assert judge.record()["class_set"] == {"name": "imagenette", "classes": IMAGENETTE}
    with pytest.raises(UserError, match="has no label 'zebra'"):
        judge.use_concepts(["zebra"])
    # a 1000-class model whose named classes are not in ImageNet order is refused
    config = json.loads((folder / "config.json").read_text())
    config["id2label"]["569"] = "tabby cat"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="class 569 is 'tabby cat', not Imagenette's 'garbage truck'"):
        get_judge(f"classifier:{folder}", labels="imagenette")
    assert label_key("Garbage_Truck ") == "garbage truck"


# --- clip: and CLIP score ---------------------------------------------------------------------------


def test_clip_judge_any_concept_in_words(folders, test_images):
    judge = get_judge(f"clip:{folders['clip']}")
    assert judge.concepts == ()
    assert judge.flags(test_images, "red").tolist() == IS_RED  # red vs the neutral "a photo"
    assert judge.flags(test_images, "blue").tolist() == [not r for r in IS_RED]
    anchored = get_judge(f"clip:{folders['clip']}", anchor="blue", threshold=0.6)
    anchored.use_concepts(["red"])
    verdict = anchored.assess(test_images)
    assert (verdict.scores["red"] > 0.6).tolist() == IS_RED and verdict.features.shape == (8, 16)
    record = anchored.record()
    json.dumps(record)
    assert record["threshold"] == 0.6 and record["prompts"] == {"red": ["a photo of red", "a photo of blue", "a photo"]}
    assert len(record["model"]["weights_sha256"]["model.safetensors"]) == 64
    with pytest.raises(UserError, match="must hold one"):
        get_judge(f"clip:{folders['clip']}", template="a photo")
    with pytest.raises(UserError, match="holds a 'resnet' model, not CLIP"):
        get_judge(f"clip:{folders['classifier']}")


def test_clip_score_is_higher_for_matching_prompts(folders, test_images):
    scorer = ClipScorer(folders["clip"])
    matching = ["a photo of red"] * 4 + ["a photo of blue"] * 4
    shuffled = matching[4:] + matching[:4]
    assert scorer(test_images, matching) > scorer(test_images, shuffled) + 10
    per_image = scorer.per_image(test_images, matching)
    assert per_image.shape == (8,) and ((per_image >= 0) & (per_image <= 100)).all()
    record = scorer.record()
    assert record["scale"] == 100.0 and record["model"]["model_type"] == "clip"


def test_fid_features_separate_image_kinds(folders):
    red_a, red_b, blue = kind(RED, 12, 21), kind(RED, 12, 22), kind(BLUE, 12, 23)
    for name in ("dinov2", "clip"):
        features = ImageFeatures(folders[name])
        a, b, c = features(red_a), features(red_b), features(blue)
        assert a.shape[0] == 12 and a.ndim == 2
        assert frechet_distance(a, b) < frechet_distance(a, c) / 2, name
        assert features.record()["model"]["model_type"] == name


# --- evaluate with them ----------------------------------------------------------------------------


def test_evaluate_with_a_classifier_clip_and_fid_features(folders, tmp_path, capsys):
    suite = tmp_path / "colours.csv"
    suite.write_text("prompt,class,evaluation_seed\n" + "".join(
        f"a {c} square,{c},{i}\n" for i, c in enumerate(["red", "red", "blue", "blue", "green", "green"])))
    delta = tmp_path / "red.safetensors"
    assert run(capsys, "erase", "--method", "uce", "--concept", "red", "--out", delta)[0] == 0
    out = tmp_path / "eval"
    code, stdout, err = run(capsys, "evaluate", "--delta", delta, "--suite", suite, "--concept", "red", "--steps", "4",
                            "--judge", f"classifier:{folders['classifier']}", "--judge-option", "top_k=2",
                            "--clip", folders["clip"], "--fid-features", folders["dinov2"], "--out", out)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    protocol = results["protocol"]
    assert protocol["judge"]["top_k"] == 2 and protocol["judge"]["class_ids"] == {"red": [0]}
    assert protocol["suite"]["sets"] == {"target": 2, "preservation": 4}
    assert protocol["clip_score"]["model"]["path"] == str(folders["clip"])
    assert protocol["fid_features"]["model"]["model_type"] == "dinov2"
    for name in ("original", "edited"):
        metrics = results["metrics"][name]
        assert 0 <= metrics["clip_score"] <= 100 and "accuracy" in metrics["sets"]["preservation"]
    assert results["metrics"]["edited"]["fid_gen"] >= 0 and "CLIP score" in stdout
    for extra, match in [(["--judge-option", "top_k"], "is not KEY=VALUE"),
                         (["--concept", "purple"], "has no label 'purple'"),
                         (["--clip", folders["dinov2"]], "not CLIP")]:
        args = ["evaluate", "--delta", delta, "--suite", suite, "--judge", f"classifier:{folders['classifier']}",
                "--out", tmp_path / "bad", *extra]
        if "--concept" not in extra:
            args += ["--concept", "red"]
        code, _, err = run(capsys, *args)
        assert code == 2 and match in one_line_error(err), err
        assert not (tmp_path / "bad").exists()


# --- q16: ---------------------------------------------------------------------------------------------


def test_q16_prompts_convert_without_running_the_pickle_and_judge(folders, test_images, tmp_path, monkeypatch):
    import os
    import pickle

    from erasekit.evaluation.q16 import convert_prompts
    from erasekit.evaluation.vision import LocalClip

    clip = LocalClip(folders["clip"])
    prompts = clip.text_embeddings(["a photo of blue", "a photo of red"]).numpy()  # red is "inappropriate"
    (tmp_path / "prompts.p").write_bytes(pickle.dumps(prompts))
    converted = convert_prompts(tmp_path / "prompts.p", tmp_path / "q16.safetensors")
    judge = get_judge(f"q16:{folders['clip']}", prompts=str(converted))
    assert judge.flags(test_images, "inappropriate").tolist() == IS_RED
    record = judge.record()
    assert record["threshold"] == 0.5 and record["prompts"]["sha256"] == file_sha256(converted)

    class Evil:
        def __reduce__(self):
            return os.system, ("echo pwned",)

    (tmp_path / "evil.p").write_bytes(pickle.dumps(Evil()))
    ran = []
    monkeypatch.setattr(os, "system", lambda command: ran.append(command))
    with pytest.raises(UserError, match="not a pickled numpy array .*nothing in it was run"):
        convert_prompts(tmp_path / "evil.p", tmp_path / "evil.safetensors")
    assert ran == [] and not (tmp_path / "evil.safetensors").exists()
    with pytest.raises(UserError, match="needs its prompt embeddings"):
        get_judge(f"q16:{folders['clip']}")
    (tmp_path / "wide.p").write_bytes(pickle.dumps(prompts[:, :8].copy()))
    with pytest.raises(UserError, match=r"not the \(2, 16\) this CLIP needs"):
        get_judge(f"q16:{folders['clip']}", prompts=str(convert_prompts(tmp_path / "wide.p", tmp_path / "w.st")))
