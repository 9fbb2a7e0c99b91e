"""Measure the testbed model with its ground-truth judge: how faithfully images follow the text."""

from __future__ import annotations

import time

import torch

from ..model import Model
from .prompts import TestbedPrompt, attribute_prompts
from .world import ATTRIBUTES, VALUES, WORDING_KINDS


def generate(model: Model, prompts: list[TestbedPrompt], steps: int | None = None, guidance: float | None = None,
             batch_size: int = 64, progress: bool = False) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] for testbed prompts, each with its own seed."""
    return model.sample([p.text for p in prompts], [p.seed for p in prompts], steps=steps, guidance=guidance,
                        batch_size=batch_size, progress=progress)


@torch.no_grad()
def judge_verdicts(judge, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-attribute predicted value indices for images in [0, 1]."""
    return judge.predict(images.to(judge.device) * 2 - 1)


def _hits(verdicts: dict[str, torch.Tensor], prompts: list[TestbedPrompt], attr: str):
    """(asked-for value indices, whether the judged value is the asked-for one), per image."""
    wanted = torch.tensor([VALUES[attr].index(p.values[attr]) for p in prompts])
    return wanted, verdicts[attr].cpu() == wanted


def accuracy(verdicts: dict[str, torch.Tensor], prompts: list[TestbedPrompt]) -> dict[str, float]:
    """Per attribute: the share of images whose judged value is the value the prompt asked for."""
    return {attr: round(float(_hits(verdicts, prompts, attr)[1].float().mean()), 4) for attr in ATTRIBUTES}


def value_accuracy(verdicts: dict[str, torch.Tensor], prompts: list[TestbedPrompt]) -> dict[str, dict]:
    """Per attribute and asked-for value: {"accuracy", "n"} (a weak value hides in an attribute's mean)."""
    out = {}
    for attr in ATTRIBUTES:
        wanted, hits = _hits(verdicts, prompts, attr)
        out[attr] = {value: {"accuracy": round(float(hits[wanted == i].float().mean()), 4),
                             "n": int((wanted == i).sum())}
                     for i, value in enumerate(VALUES[attr]) if (wanted == i).any()}
    return out


def attribute_accuracy(model: Model, judge, samples: int = 200, seed: int = 1000, steps: int | None = None,
                       guidance: float | None = None, batch_size: int = 64, progress: bool = True) -> dict:
    """Judge accuracy against the prompt, per attribute and wording kind (the testbed's quality bars)."""
    steps = steps or model.sampler_defaults["steps"]
    guidance = model.sampler_defaults["guidance"] if guidance is None else guidance
    result = {"samples": samples, "accuracy": {}, "sampler": {"steps": steps, "guidance": guidance,
                                                              "scheduler": "DDIM (eta 0)", "seed": seed}}
    start = time.time()
    for kind in WORDING_KINDS:
        prompts = attribute_prompts(kind, samples, seed)
        images = generate(model, prompts, steps, guidance, batch_size, progress)
        verdicts = judge_verdicts(judge, images)
        result["accuracy"][kind] = accuracy(verdicts, prompts)
        result.setdefault("per_value", {})[kind] = value_accuracy(verdicts, prompts)
    result["wall_time_s"] = round(time.time() - start, 1)
    return result


THRESHOLD = 0.5  # a concept is present when the judge's probability for its value exceeds this


@torch.no_grad()
def _judge(judge, images: torch.Tensor):
    x = images.to(judge.device) * 2 - 1
    return judge.probs(x), judge.features(x).cpu()


def public(measurement: dict) -> dict:
    """A measurement without its private entries (features kept for Fréchet distance)."""
    return {k: v for k, v in measurement.items() if not k.startswith("_")}


def measure_concepts(model: Model, judge, concepts: list[str], samples: int, seed: int = 2000,
                     steps: int | None = None, guidance: float | None = None, batch_size: int = 64) -> dict:
    """Target rate per wording kind (mean over concepts, and per concept) and preservation accuracy on
    prompts without any of the concepts; keeps the preservation images' judge features for Fréchet distance."""
    from .prompts import attribute_of, concept_prompts, preservation_prompts

    per_concept: dict[str, dict[str, float]] = {c: {} for c in concepts}
    for kind in WORDING_KINDS:
        for concept in concepts:
            attr = attribute_of(concept)
            prompts = concept_prompts(concept, kind, samples, seed)
            probs, _ = _judge(judge, generate(model, prompts, steps, guidance, batch_size))
            present = probs[attr][:, VALUES[attr].index(concept)] > THRESHOLD
            per_concept[concept][kind] = round(float(present.float().mean()), 4)
    keep = preservation_prompts(concepts, samples, seed + 1000)
    images = generate(model, keep, steps, guidance, batch_size)
    probs, feats = _judge(judge, images)
    verdicts = {a: p.argmax(1) for a, p in probs.items()}
    per_attr = accuracy(verdicts, keep)
    return {
        "target_rate": {k: round(sum(per_concept[c][k] for c in concepts) / len(concepts), 4) for k in WORDING_KINDS},
        "target_rate_per_concept": per_concept,
        "preservation_accuracy": round(sum(per_attr.values()) / len(per_attr), 4),
        "preservation_accuracy_per_attribute": per_attr,
        "_features": feats,
    }


def concept_report(model: Model, judge, concepts: list[str], deltas: list, samples: int = 200, seed: int = 2000,
                   steps: int | None = None, guidance: float | None = None, original: dict | None = None) -> dict:
    """The unedited and the edited model side by side on one concept set (pass `original` to reuse a
    measurement of the unedited model)."""
    from contextlib import ExitStack

    from ..metrics import frechet_distance

    original = original or measure_concepts(model, judge, concepts, samples, seed, steps, guidance)
    with ExitStack() as stack:
        for delta in deltas:
            stack.enter_context(delta.applied(model))
        edited = measure_concepts(model, judge, concepts, samples, seed, steps, guidance)
    fid = frechet_distance(original["_features"], edited["_features"])
    return {
        "concept": ",".join(concepts),
        "samples": samples,
        "threshold": THRESHOLD,
        "sampler": {"steps": steps or model.sampler_defaults["steps"],
                    "guidance": model.sampler_defaults["guidance"] if guidance is None else guidance, "seed": seed},
        "original": public(original),
        "edited": public(edited),
        "fid_gen_preservation": round(fid, 4),
        "fid_note": "Fréchet distance between the judge's penultimate features of the original and the edited "
                    "model's images for the same preservation prompts and seeds",
        "deltas": [{"method": d.method, "config": d.config} for d in deltas],
    }
