"""The shipped testbed judge and testbed CLIP: load, read rendered images correctly, stay consistent."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from erasekit.testbed.clip import TestbedCLIP, canonical_caption, caption_values, load_clip
from erasekit.testbed.judge import TestbedJudge, as_model_input, augment, judge_accuracy, load_judge, render_batch
from erasekit.testbed.train import render_dataset, to_model_space
from erasekit.testbed.world import ATTRIBUTES, VALUES, caption, random_scene

# Seeds the shipped weights never trained on (training draws from default_rng([seed, k]) streams).
SEED = 987_654


@pytest.fixture(scope="module")
def judge() -> TestbedJudge:
    torch.set_num_threads(1)
    return load_judge()


@pytest.fixture(scope="module")
def clip() -> TestbedCLIP:
    torch.set_num_threads(1)
    return load_clip()


@pytest.fixture(scope="module")
def data():
    return render_dataset(SEED, 600)


def test_shipped_judge_is_accurate_on_every_attribute(judge, data):
    images, scenes = data
    assert not judge.training
    acc = judge_accuracy(judge, images, scenes)
    assert set(acc) == set(ATTRIBUTES)
    for attr, value in acc.items():
        assert value >= 0.98, f"{attr}: {value:.3f}"


def test_shipped_judge_reads_augmented_images(judge, data):
    images, scenes = data
    x = augment(to_model_space(images), torch.Generator().manual_seed(SEED))
    acc = judge_accuracy(judge, x, scenes)
    for attr, value in acc.items():
        assert value >= 0.95, f"{attr}: {value:.3f}"


def test_judge_outputs_have_documented_shapes(judge, data):
    x = to_model_space(data[0][:12])
    with torch.no_grad():
        logits, probs = judge.logits(x), judge.probs(x)
    pred = judge.predict(x)
    for attr in ATTRIBUTES:
        assert logits[attr].shape == (12, len(VALUES[attr]))
        assert torch.allclose(probs[attr].sum(-1), torch.ones(12), atol=1e-5)
        assert pred[attr].dtype == torch.long and pred[attr].shape == (12,)
        assert torch.equal(pred[attr], probs[attr].argmax(-1))
    names = judge.predict_values(x)
    assert len(names) == 12 and all(names[i][a] in VALUES[a] for i in range(12) for a in ATTRIBUTES)


def test_judge_features_shape_and_determinism(judge, data):
    x = to_model_space(data[0][:10])
    with torch.no_grad():
        f1, f2 = judge.features(x), judge.features(x)
        alone = judge.features(x[:3])
    assert f1.shape == (10, judge.feature_dim) and f1.dtype == torch.float32
    assert torch.equal(f1, f2)
    assert torch.allclose(alone, f1[:3], atol=1e-5)  # eval mode: no batch dependence
    assert torch.isfinite(f1).all() and f1.abs().sum() > 0
    assert torch.allclose(load_judge().features(x), f1, atol=1e-6)  # loading is deterministic too


def test_uint8_input_path(judge, data):
    images = data[0][:20]
    assert images.dtype == np.uint8 and images.shape == (20, 16, 16, 3)
    x = as_model_input(images)
    assert x.shape == (20, 3, 16, 16) and x.dtype == torch.float32
    assert torch.equal(x, to_model_space(images))
    with torch.no_grad():
        ref = judge.logits(to_model_space(images))
        for other in (images, torch.from_numpy(images), [Image.fromarray(im) for im in images]):
            got = judge.logits(other)
            assert all(torch.allclose(got[a], ref[a], atol=1e-5) for a in ATTRIBUTES)
        single = judge.predict(images[0])
    assert all(single[a].shape == (1,) and single[a][0] == ref[a][0].argmax() for a in ATTRIBUTES)
    with pytest.raises(ValueError):
        as_model_input(np.zeros((2, 16, 16, 4), dtype=np.uint8))


def test_augment_is_deterministic_and_in_range(data):
    x = to_model_space(data[0][:32])
    a = augment(x, torch.Generator().manual_seed(3))
    b = augment(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == x.shape
    assert a.min() >= -1 and a.max() <= 1
    assert not torch.equal(a, augment(x, torch.Generator().manual_seed(4)))


def test_caption_values_names_what_captions_say():
    rng = np.random.default_rng(SEED)
    for _ in range(300):
        scene = random_scene(rng)
        truth = {a: scene.value(a) for a in ATTRIBUTES}
        assert caption_values(caption(scene, rng, "train")) == truth
        assert caption_values(caption(scene, rng, "heldout")) == truth
        named = caption_values(caption(scene, rng, "train", drop_prob=0.5))
        assert named["shape"] == scene.shape and all(truth[a] == v for a, v in named.items())


def test_shipped_clip_prefers_the_right_shape(clip):
    rng = np.random.default_rng(SEED + 1)
    scenes = [random_scene(rng) for _ in range(200)]
    x = render_batch(scenes)
    right, wrong = [], []
    for s in scenes:
        values = {a: s.value(a) for a in ATTRIBUTES}
        right.append(canonical_caption(values))
        shapes = VALUES["shape"]
        other = shapes[(shapes.index(s.shape) + 1 + int(rng.integers(len(shapes) - 1))) % len(shapes)]
        wrong.append(canonical_caption({**values, "shape": other}))
    with torch.no_grad():
        s_right, s_wrong = clip.score(x, right), clip.score(x, wrong)
    assert s_right.shape == (200,)
    frac = (s_right > s_wrong).float().mean().item()
    assert frac >= 0.9, frac


def test_clip_embeddings_and_tokens(clip):
    x = render_batch([random_scene(np.random.default_rng(SEED + 2)) for _ in range(4)])
    with torch.no_grad():
        img = clip.embed_images(x)
        txt = clip.embed_texts(["a solid red circle on a black background", "a star"])
        tokens = clip.image_tokens(x)
        sim = clip.similarity(x, ["a circle", "a star", "a cross"])
    assert img.shape == (4, clip.embed_dim) and txt.shape == (2, clip.embed_dim)
    assert torch.allclose(img.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert tokens.shape == (4, 16, clip.embed_dim)
    assert torch.allclose(torch.nn.functional.normalize(tokens.mean(1), dim=-1), img, atol=1e-5)
    assert sim.shape == (4, 3)
    with pytest.raises(ValueError):
        clip.score(x, ["a circle", "a star"])
