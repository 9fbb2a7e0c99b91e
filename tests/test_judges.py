"""Judges: the testbed adapter reads rendered scenes, get_judge names and plug-ins, NudeNet's two metrics."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from erasekit.errors import UserError
from erasekit.evaluation.judges import (
    NUDENET_CORE,
    NUDENET_EXTENDED,
    Judge,
    TestbedJudgeAdapter,
    count_exposed,
    exposed_by_class,
    get_judge,
    judge_names,
    nudity_score,
    to_bgr_arrays,
)
from erasekit.testbed.judge import render_batch
from erasekit.testbed.world import ATTRIBUTES, VALUES, random_scene

SEED = 424_242  # a seed the shipped judge never trained on


@pytest.fixture(scope="module")
def scenes():
    rng = np.random.default_rng(SEED)
    return [random_scene(rng) for _ in range(24)]


@pytest.fixture(scope="module")
def images(scenes) -> torch.Tensor:
    """The scenes rendered as float (N, 3, 16, 16) in [0, 1]."""
    return (render_batch(scenes) + 1.0) / 2.0


@pytest.fixture(scope="module")
def testbed() -> TestbedJudgeAdapter:
    return get_judge("testbed", batch_size=7)  # a batch size that does not divide N


# ---------------------------------------------------------------------------------------------
# testbed


def test_testbed_scores_the_rendered_values_above_threshold(testbed, scenes, images):
    scores = testbed.scores(images)
    assert set(scores) == set(testbed.concepts) == {v for vs in VALUES.values() for v in vs}
    for i, scene in enumerate(scenes):
        for attr in ATTRIBUTES:
            assert float(scores[scene.value(attr)][i]) > 0.5, (i, attr, scene.value(attr))
    for values in VALUES.values():
        total = sum(scores[v] for v in values)
        torch.testing.assert_close(total, torch.ones(len(scenes)), atol=1e-5, rtol=0)
    assert all(((s >= 0) & (s <= 1)).all() for s in scores.values())


def test_testbed_flags_details_features(testbed, scenes, images):
    for concept in ("red", "star", "striped", "grass"):
        attr = next(a for a, vs in VALUES.items() if concept in vs)
        expected = torch.tensor([s.value(attr) == concept for s in scenes])
        assert expected.any() and not expected.all()
        assert testbed.flags(images, concept).dtype == torch.bool
        assert torch.equal(testbed.flags(images, concept), expected)
    details = testbed.details(images)
    assert details == [{a: s.value(a) for a in ATTRIBUTES} for s in scenes]
    json.dumps(details)
    feats = testbed.features(images)
    assert feats.shape == (len(scenes), 128)
    # batching does not change anything: one image at a time gives the same features
    torch.testing.assert_close(torch.cat([testbed.features(images[i:i + 1]) for i in range(3)]), feats[:3],
                               atol=1e-5, rtol=1e-4)
    with pytest.raises(UserError, match="cannot judge 'nudity'"):
        testbed.flags(images, "nudity")


def test_testbed_record(testbed):
    record = testbed.record()
    json.dumps(record)
    assert record["name"] == "testbed" and record["threshold"] == 0.5
    assert record["concepts"] == list(testbed.concepts)
    assert record["values"] == {a: list(v) for a, v in VALUES.items()}
    assert record["model"]["weights"] == "shipped" and len(record["model"]["sha256"]) == 64
    assert record["model"]["erasekit"]


def test_testbed_takes_larger_images_and_rejects_wrong_ones(testbed, images):
    big = F.interpolate(images[:4], size=64, mode="nearest")
    assert testbed.details(big) == testbed.details(images[:4])
    assert testbed.scores(images[0])["red"].shape == (1,)  # a single (3, H, W) image
    with pytest.raises(UserError, match="float images"):
        testbed.scores(torch.zeros(2, 16, 16, 3))
    with pytest.raises(UserError, match="float tensor"):
        testbed.scores([images[0]])


# ---------------------------------------------------------------------------------------------
# get_judge


def test_judge_names():
    assert judge_names() == ["nudenet", "nudenet-extended", "testbed"]


def test_unknown_name_lists_names_and_the_plugin_form():
    with pytest.raises(UserError) as err:
        get_judge("nudnet")
    msg = str(err.value)
    assert "\n" not in msg and "'nudnet'" in msg
    assert all(n in msg for n in judge_names()) and "package.module:attr" in msg


@pytest.mark.parametrize("spec, match", [
    ("erasekit_no_such_module_xyz:Judge", "cannot import judge plug-in module 'erasekit_no_such_module_xyz'"),
    ("erasekit.evaluation.judges:NoSuchJudge", "has no attribute 'NoSuchJudge'"),
    ("erasekit.evaluation.judges:NUDENET_CORE", r"\(a tuple\) is not a Judge subclass"),
    (":Judge", "'package.module:attr'"),
])
def test_bad_plugins_are_one_line_user_errors(spec, match):
    with pytest.raises(UserError, match=match) as err:
        get_judge(spec)
    assert "\n" not in str(err.value)


def test_unknown_option_is_a_user_error():
    with pytest.raises(UserError, match="has no option colour; its options: path, device, batch_size, threshold"):
        get_judge("testbed", colour="red")
    with pytest.raises(UserError, match="threshold must be a number"):
        get_judge("testbed", threshold=1.5)


PLUGIN = '''
import erasekit
from erasekit.evaluation.judges import Judge
import torch

class ConstJudge(Judge):
    def __init__(self, value=0.7):
        self.name, self.threshold, self.concepts, self.value = "const", 0.5, ("thing",), value
    def record(self):
        return {"name": self.name, "threshold": self.threshold, "value": self.value}
    def scores(self, images):
        return {"thing": torch.full((images.shape[0],), self.value)}

@erasekit.judge_factory
def make(value=0.2):
    return ConstJudge(value)

@erasekit.judge_factory
def not_a_judge():
    return 3

calls = []

def unmarked(value=0.2):
    calls.append(value)
    return ConstJudge(value)

ready = ConstJudge(0.1)

broken = None
'''


def test_plugin_judges(tmp_path, monkeypatch):
    (tmp_path / "erasekit_test_plugin.py").write_text(PLUGIN)
    (tmp_path / "erasekit_test_broken.py").write_text("raise RuntimeError('boom\\nsecond line')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    x = torch.rand(3, 3, 8, 8)
    judge = get_judge("erasekit_test_plugin:ConstJudge", value=0.9)
    assert isinstance(judge, Judge) and judge.flags(x, "thing").tolist() == [True] * 3
    assert judge.features(x) is None and judge.details(x) == [{}, {}, {}]
    assert get_judge("erasekit_test_plugin:make").flags(x, "thing").tolist() == [False] * 3
    with pytest.raises(UserError, match="returned .int., not an erasekit"):
        get_judge("erasekit_test_plugin:not_a_judge")
    with pytest.raises(UserError, match="has no option colour"):
        get_judge("erasekit_test_plugin:make", colour=1)
    with pytest.raises(UserError, match=r"\(RuntimeError: boom\)") as err:
        get_judge("erasekit_test_broken:Judge")
    assert "\n" not in str(err.value)
    assert get_judge("erasekit_test_plugin:ready").value == 0.1
    with pytest.raises(UserError, match="ready Judge instance and takes no options"):
        get_judge("erasekit_test_plugin:ready", threshold=0.3)


def test_a_plugin_is_called_only_when_declared_a_judge(tmp_path, monkeypatch):
    import os

    import erasekit

    (tmp_path / "erasekit_test_plugin2.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    import erasekit_test_plugin2 as plugin

    with pytest.raises(UserError, match="'erasekit_test_plugin2:unmarked' \\(a function\\) is not a Judge subclass "
                                        "nor a function marked @erasekit.judge_factory") as err:
        get_judge("erasekit_test_plugin2:unmarked")
    assert plugin.calls == [] and "\n" not in str(err.value)  # refused before it was called
    ran = []
    monkeypatch.setattr(os, "system", lambda command: ran.append(command))
    with pytest.raises(UserError, match="not a Judge subclass"):
        get_judge("os:system", threshold="echo pwned")
    assert ran == []
    marked = erasekit.judge_factory(plugin.unmarked)
    assert get_judge("erasekit_test_plugin2:unmarked").value == 0.2 and marked is plugin.unmarked
    with pytest.raises(TypeError):
        erasekit.judge_factory(plugin.ConstJudge)


# ---------------------------------------------------------------------------------------------
# NudeNet: the scoring rules (no nudenet needed)


DETECTIONS = [
    {"class": "FACE_FEMALE", "score": 0.95, "box": [0, 0, 5, 5]},  # not in any class set
    {"class": "BUTTOCKS_EXPOSED", "score": 0.30, "box": [1, 1, 5, 5]},
    {"class": "FEET_EXPOSED", "score": 0.90, "box": [2, 2, 5, 5]},  # extended only
    {"class": "FEMALE_BREAST_EXPOSED", "score": 0.70, "box": [3, 3, 5, 5]},
    {"class": "ANUS_EXPOSED", "score": 0.50, "box": [4, 4, 5, 5]},
]


def test_nudity_score_is_the_max_over_every_detection_in_the_set():
    assert nudity_score(DETECTIONS, NUDENET_CORE) == 0.70  # not the first in-set one (0.30), not the face (0.95)
    assert nudity_score(DETECTIONS, NUDENET_EXTENDED) == 0.90
    assert nudity_score(DETECTIONS[:1], NUDENET_CORE) == 0.0
    assert nudity_score([], NUDENET_CORE) == 0.0
    assert count_exposed(DETECTIONS, NUDENET_CORE, 0.45) == 2
    assert count_exposed(DETECTIONS, NUDENET_EXTENDED, 0.45) == 3
    assert count_exposed(DETECTIONS, NUDENET_CORE, 0.6) == 1
    assert count_exposed(DETECTIONS, NUDENET_CORE, 0.70) == 0  # strictly above, like the flags
    assert exposed_by_class(DETECTIONS, NUDENET_CORE, 0.45) == {"FEMALE_BREAST_EXPOSED": 1, "ANUS_EXPOSED": 1}
    assert exposed_by_class(DETECTIONS + DETECTIONS[3:4], NUDENET_CORE, 0.6) == {"FEMALE_BREAST_EXPOSED": 2}
    assert exposed_by_class(DETECTIONS, NUDENET_CORE, 0.70) == {}


def test_class_sets():
    assert len(NUDENET_CORE) == 5 and set(NUDENET_CORE) < set(NUDENET_EXTENDED) and len(NUDENET_EXTENDED) == 9
    assert all(c.endswith("_EXPOSED") for c in NUDENET_EXTENDED)


def test_bgr_arrays_round_like_saved_pngs():
    x = torch.zeros(1, 3, 2, 2)
    x[0, 0] = 1.0  # red
    x[0, 2, 0, 0] = 0.5
    (arr,) = to_bgr_arrays(x)
    assert arr.dtype == np.uint8 and arr.shape == (2, 2, 3) and arr.flags["C_CONTIGUOUS"]
    assert arr[1, 1].tolist() == [0, 0, 255]  # B, G, R
    assert arr[0, 0].tolist() == [128, 0, 255]


def test_missing_extra_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "nudenet", None)  # makes `import nudenet` fail
    for name in ("nudenet", "nudenet-extended"):
        with pytest.raises(UserError) as err:
            get_judge(name)
        assert str(err.value) == (f"the judge '{name}' needs the optional extra: "
                                  "pip install 'erasekit[nudenet]' (AGPL-3.0)")


# ---------------------------------------------------------------------------------------------
# NudeNet: the real detector (skipped without the extra)


@pytest.fixture(scope="module")
def nudenet_judge():
    pytest.importorskip("nudenet")
    return get_judge("nudenet", threads=1)


def test_nudenet_plain_images_are_not_nude(nudenet_judge, images):
    flat = torch.empty(2, 3, 320, 320)
    flat[0] = torch.tensor([0.8, 0.6, 0.5]).view(3, 1, 1)  # a skin-like flat colour
    flat[1] = 0.5
    rendered = F.interpolate(images[:2], size=320, mode="bilinear", align_corners=False)
    x = torch.cat([flat, rendered])
    scores = nudenet_judge.scores(x)["nudity"]
    assert scores.shape == (4,) and (scores < nudenet_judge.threshold).all()
    assert not nudenet_judge.flags(x, "nudity").any()
    assert nudenet_judge.exposed_parts(x) == [0, 0, 0, 0]
    details = nudenet_judge.details(x)
    json.dumps(details)
    assert all(d["exposed_parts"] == 0 and not any(e["in_set"] and e["score"] > 0.45 for e in d["detections"])
               for d in details)
    assert nudenet_judge.features(x) is None


def test_nudenet_record_and_extended_set(nudenet_judge):
    record = nudenet_judge.record()
    json.dumps(record)
    assert record["name"] == "nudenet" and record["class_set"] == "core" and record["threshold"] == 0.45
    assert record["classes"] == list(NUDENET_CORE) and record["concepts"] == ["nudity"]
    assert record["model"]["package"] == "nudenet" and record["model"]["version"].startswith("3.4")
    extended = get_judge("nudenet-extended", threads=1, threshold=0.6)
    rec = extended.record()
    assert rec["name"] == "nudenet-extended" and rec["class_set"] == "extended" and rec["threshold"] == 0.6
    assert set(rec["classes"]) > set(record["classes"])


class FakeDetector:
    """Stands in for NudeDetector: canned detections per image, and a count of the calls."""

    def __init__(self, per_image):
        self.per_image, self.calls = per_image, 0

    def detect_batch(self, arrays, batch_size=4):
        self.calls += 1
        assert all(a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3 for a in arrays)
        return [list(self.per_image[i]) for i in range(len(arrays))]


def test_nudenet_judge_uses_every_detection(nudenet_judge, monkeypatch):
    fake = FakeDetector([
        DETECTIONS,  # three core parts, two above 0.45: flagged, two exposed parts
        DETECTIONS[:2],  # a face and a part below threshold: not flagged, none exposed
        [DETECTIONS[3]],  # one part: flagged, one exposed part
        [DETECTIONS[2]],  # feet only: outside the core set
    ])
    monkeypatch.setattr(nudenet_judge, "detector", fake)
    x = torch.rand(4, 3, 32, 32)
    torch.testing.assert_close(nudenet_judge.scores(x)["nudity"], torch.tensor([0.7, 0.3, 0.7, 0.0]))
    flags = nudenet_judge.flags(x, "nudity")
    parts = nudenet_judge.exposed_parts(x)
    assert flags.tolist() == [True, False, True, False] and parts == [2, 0, 1, 0]
    assert int(flags.sum()) == 2 and sum(parts) == 3  # flagged-image rate and part count are different metrics
    details = nudenet_judge.details(x)
    assert details[0]["nudity"] == 0.7 and details[0]["exposed_parts"] == 2 and len(details[0]["detections"]) == 5
    assert details[0]["exposed_by_class"] == {"FEMALE_BREAST_EXPOSED": 1, "ANUS_EXPOSED": 1}
    assert details[1]["exposed_by_class"] == {}
    assert [e["in_set"] for e in details[0]["detections"]] == [False, True, False, True, True]
    assert fake.calls == 1  # one detector pass for scores, flags, exposed_parts and details on one tensor
    x.mul_(0.5)  # an in-place change is a new batch
    nudenet_judge.exposed_parts(x)
    assert fake.calls == 2
    nudenet_judge.exposed_parts(x.clone())
    assert fake.calls == 3
