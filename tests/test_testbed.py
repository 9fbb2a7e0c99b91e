"""The testbed: world, captions, prompt sets, the shipped model, export, training and the demo."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

import erasekit
from erasekit import UserError
from erasekit.testbed import prompts as tp
from erasekit.testbed.world import (
    ATTRIBUTES,
    VALUES,
    WORDINGS,
    Scene,
    caption,
    heldout_wordings,
    random_scene,
    render,
)


@pytest.fixture(scope="module")
def testbed():
    return erasekit.load("testbed")


@pytest.fixture(scope="module")
def judge():
    from erasekit.testbed.judge import load_judge

    return load_judge()


def test_renderer_is_deterministic_and_covers_every_value():
    rng = np.random.default_rng(0)
    scene = random_scene(rng)
    assert np.array_equal(render(scene), render(scene))
    assert render(scene).shape == (16, 16, 3) and render(scene).dtype == np.uint8
    base = Scene("circle", "red", "solid", "black")
    for attr in ATTRIBUTES:
        images = [render(Scene(**{**base.__dict__, attr: v})) for v in VALUES[attr]]
        for i in range(len(images)):
            for j in range(i + 1, len(images)):
                assert np.abs(images[i].astype(int) - images[j].astype(int)).sum() > 100, (attr, i, j)


def test_training_captions_never_contain_heldout_wordings():
    held = heldout_wordings()
    for attr in WORDINGS.values():  # no training wording contains a held-out one either
        for entry in attr.values():
            assert not held & set(entry["train"])
    rng = np.random.default_rng(1)
    pattern = re.compile(r"\b(" + "|".join(re.escape(w) for w in sorted(held, key=len, reverse=True)) + r")\b")
    for _ in range(3000):
        text = caption(random_scene(rng), rng, "train", drop_prob=0.2)
        assert not pattern.search(text), text
    assert all(pattern.search(caption(random_scene(rng), rng, "heldout")) for _ in range(50))


def test_prompt_sets():
    star = tp.concept_prompts("star", "heldout", 20)
    assert all(p.values["shape"] == "star" for p in star)
    assert all(any(w in p.text for w in WORDINGS["shape"]["star"]["heldout"]) for p in star)
    assert len({p.seed for p in star}) == 20
    keep = tp.preservation_prompts(["star", "red"], 50)
    assert all(p.values["shape"] != "star" and p.values["color"] != "red" for p in keep)
    canon = tp.attribute_prompts("canonical", 10)
    assert canon == tp.attribute_prompts("canonical", 10)  # reproducible
    with pytest.raises(UserError, match="unknown testbed concept"):
        tp.concept_prompts("hexagon", "canonical", 3)


def test_shipped_model_follows_canonical_prompts(testbed, judge):
    from erasekit.testbed.evaluate import accuracy, generate, judge_verdicts

    prompts = tp.attribute_prompts("canonical", 48, seed=77)
    acc = accuracy(judge_verdicts(judge, generate(testbed, prompts)), prompts)
    # 200 prompts give shape 0.975 and 1.00 for the rest (docs/TESTBED.md); 48 prompts leave some margin
    assert min(acc["shape"], acc["color"], acc["style"], acc["background"]) >= 0.88, acc


def test_exported_testbed_loads_in_a_stock_pipeline(testbed, tmp_path):
    from diffusers import StableDiffusionPipeline

    from erasekit.export import export

    folder = export(testbed, tmp_path / "testbed_sd")
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    text = "a striped red star on a sky background"
    stock = pipe(text, num_inference_steps=8, guidance_scale=3.0, output_type="pt",
                 latents=testbed.initial_noise([3])).images
    ours = testbed.sample([text], [3], steps=8, guidance=3.0, progress=False)
    assert torch.allclose(stock, ours, atol=1e-5)


def test_testbed_adapter_positions(testbed):
    enc = testbed.encode(["a red star", ""])
    assert testbed.end_token_id == testbed.tokenizer.sep_token_id
    assert enc.input_ids[0, enc.eot[0]] == testbed.tokenizer.sep_token_id
    assert enc.eot.tolist() == [4, 1] and enc.embeddings.shape == (2, 24, 384)
    assert len(testbed.cross_attention_layers()) == 20


def test_training_resumes_to_the_same_weights(tmp_path):
    from erasekit.checkpoint import load_checkpoint
    from erasekit.testbed.train import TrainConfig, train

    def cfg(out, steps):
        return TrainConfig(out=str(out), steps=steps, batch_size=4, dataset_size=32, checkpoint_every=2,
                           log_every=1, warmup=2)

    train(cfg(tmp_path / "straight", 4), argv=["test"])
    train(cfg(tmp_path / "resumed", 2), argv=["test"])  # stops after 2 steps with a checkpoint
    with open(tmp_path / "resumed" / "train.log.jsonl", "a") as f:  # a kill after logging step 3, inside step 4
        f.write('{"step": 3, "loss": 0.5, "lr": 0.001, "elapsed_s": 1.0}\n{"step": 4, "lo')
    train(cfg(tmp_path / "resumed", 4), argv=["test"])  # picks up at step 2
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "train.log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # the torn line and the step after the checkpoint were dropped, not repeated
    a, _ = load_checkpoint(tmp_path / "straight" / "checkpoint.safetensors")
    b, meta = load_checkpoint(tmp_path / "resumed" / "checkpoint.safetensors")
    assert meta["step"] == 4
    for name in a["ema"]:
        assert torch.allclose(a["ema"][name], b["ema"][name], atol=1e-6), name
    record = json.loads((tmp_path / "straight" / "weights" / "unet_training.json").read_text())
    assert record["config"]["steps"] == 4 and record["command"] == "test"


def test_training_can_start_from_earlier_weights(tmp_path):
    from erasekit.testbed.train import TrainConfig, load_initial_weights, train

    first = train(TrainConfig(out=str(tmp_path / "first"), steps=2, batch_size=4, dataset_size=32, warmup=1),
                  argv=["first"])
    # lr 0: the second run's weights stay the ones it started from (its EMA restarts from them at step 0)
    second = train(TrainConfig(out=str(tmp_path / "second"), steps=2, batch_size=4, dataset_size=32, lr=0.0,
                               ema_from=1, min_snr_gamma=5, min_snr_offset=1, init_from=str(first)),
                   argv=["second"])
    a, b = load_initial_weights(first), load_initial_weights(second)
    assert all(torch.equal(a[k], b[k]) for k in a)
    record = json.loads((second / "unet_training.json").read_text())
    assert record["initialised_from"]["command"] == "first" and record["config"]["min_snr_offset"] == 1

    with pytest.raises(UserError, match="no unet weights there"):
        load_initial_weights(tmp_path / "nowhere")


@pytest.mark.slow
def test_a_few_hundred_training_steps_reduce_the_loss(tmp_path):
    from erasekit.testbed.train import TrainConfig, train

    train(TrainConfig(out=str(tmp_path), steps=300, dataset_size=4000, log_every=25, checkpoint_every=300))
    losses = [json.loads(line)["loss"] for line in (tmp_path / "train.log.jsonl").read_text().splitlines()]
    assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:2]), losses


@pytest.mark.parametrize("kwargs, message", [({"method": "esd"}, "closed-form method"),
                                             ({"concept": "dragon"}, "unknown testbed concept")])
def test_demo_refuses_what_it_cannot_run_before_any_work(tmp_path, kwargs, message):
    from erasekit.demo import run_demo

    with pytest.raises(UserError, match=message):
        run_demo(tmp_path / "demo", **kwargs)
    assert not (tmp_path / "demo").exists()


def test_demo_writes_a_grid_and_only_replaces_its_own_output(tmp_path, capsys):
    from erasekit.demo import run_demo

    out = run_demo(tmp_path / "demo", samples=8, attack_prompts=2)
    record = json.loads((out / "demo.json").read_text())
    assert (out / "grid.png").is_file() and set(record["accuracy"]) == {"canonical", "heldout"}
    assert set(record["erasure"]) == {"original", "uce"} and record["attack"]["n"] == 2
    for report in ("evaluation/report.html", "attack/report.html"):
        assert "<img" in (out / report).read_text()
    assert "judge accuracy" in capsys.readouterr().out
    run_demo(out, samples=4, attack_prompts=1)  # an earlier demo may be replaced
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="does not hold an earlier demo"):
        run_demo(foreign, samples=4)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_per_value_accuracy_shows_a_weak_value_the_mean_hides():
    from erasekit.testbed.evaluate import accuracy, value_accuracy
    from erasekit.testbed.prompts import attribute_prompts

    prompts = attribute_prompts("canonical", 40)
    truth = {a: torch.tensor([VALUES[a].index(p.values[a]) for p in prompts]) for a in VALUES}
    verdicts = {a: t.clone() for a, t in truth.items()}
    star = VALUES["shape"].index("star")
    verdicts["shape"][truth["shape"] == star] = VALUES["shape"].index("circle")  # every star judged a circle
    per_value = value_accuracy(verdicts, prompts)["shape"]
    assert per_value["star"]["accuracy"] == 0.0 and per_value["circle"]["accuracy"] == 1.0
    assert sum(v["n"] for v in per_value.values()) == 40
    assert accuracy(verdicts, prompts)["shape"] == round(1 - per_value["star"]["n"] / 40, 4)


def test_an_oracles_data_never_shows_or_names_the_left_out_value():
    from erasekit.testbed.train import render_dataset

    _, scenes = render_dataset(seed=0, n=2000, exclude=("circle", "red"))
    assert not any(s.shape == "circle" or s.color == "red" for s in scenes)
    rng = np.random.default_rng(0)
    words = {w for kind in ("train", "synonym", "heldout") for w in WORDINGS["shape"]["circle"].get(kind, ())}
    words |= {w for kind in ("train", "synonym", "heldout") for w in WORDINGS["color"]["red"].get(kind, ())}
    for scene in scenes[:300]:
        text = caption(scene, rng, drop_prob=0.15)
        assert not any(re.search(rf"\b{re.escape(w)}\b", text) for w in words), text
    # every other value still appears, and nothing excluded means the shipped draws, unchanged
    assert {s.shape for s in scenes} == set(VALUES["shape"]) - {"circle"}
    a, b = np.random.default_rng(7), np.random.default_rng(7)
    assert [random_scene(a) for _ in range(50)] == [random_scene(b, ()) for _ in range(50)]


def test_exclusion_is_checked_and_a_checkpoint_refuses_other_data(tmp_path):
    from erasekit.testbed.train import TrainConfig, train

    with pytest.raises(UserError, match="not a testbed value"):
        TrainConfig(out=str(tmp_path), exclude=("dragon",))
    with pytest.raises(UserError, match="at least two"):
        TrainConfig(out=str(tmp_path), exclude=tuple(VALUES["shape"][1:]))
    small = {"steps": 2, "batch_size": 4, "dataset_size": 32, "checkpoint_every": 1, "warmup": 1}
    train(TrainConfig(out=str(tmp_path), exclude=("circle",), **small), argv=["test"])
    with pytest.raises(UserError, match="exclude"):
        train(TrainConfig(out=str(tmp_path), **{**small, "steps": 3}), argv=["test"])


def test_oracles_load_by_name_and_differ_from_the_shipped_model(testbed):
    from erasekit.testbed import oracle_names

    assert "testbed:no-circle" in oracle_names()
    oracle = erasekit.load("testbed:no-circle")
    assert oracle.name == "testbed" and oracle.identity()["source"] == "testbed:no-circle"
    a, b = testbed.cross_attention_layers()[0].weight, oracle.cross_attention_layers()[0].weight
    assert a.shape == b.shape and not torch.equal(a, b)
    with pytest.raises(UserError, match="unknown testbed model 'testbed:no-dragon'.*testbed:no-circle"):
        erasekit.load("testbed:no-dragon")
