"""Prompt sets of the testbed, each prompt paired with the attribute values it asks for and a seed.

- attribute prompts: every attribute worded the same way (canonical, synonym, held-out), for
  measuring how faithfully the model follows text;
- concept prompts: one attribute value (the concept, e.g. "star") in a chosen wording, the other
  attributes random and canonical: the target set of an erasure;
- preservation prompts: the concept's attribute set to any other value: what must not change.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from .world import ATTRIBUTES, TEMPLATES, VALUES, WORDING_KINDS, caption, fill_template, random_scene, wordings


@dataclass(frozen=True)
class TestbedPrompt:
    text: str
    values: dict[str, str]  # what the prompt asks for, per attribute
    seed: int


def attribute_of(concept: str) -> str:
    """The attribute a concept value belongs to: 'star' -> 'shape'."""
    for attr in ATTRIBUTES:
        if concept in VALUES[attr]:
            return attr
    known = ", ".join(v for attr in ATTRIBUTES for v in VALUES[attr])
    raise UserError(f"unknown testbed concept {concept!r}: choose one of {known}")


def _prompt(values: dict[str, str], kinds: dict[str, str], rng: np.random.Generator, seed: int) -> TestbedPrompt:
    words = {}
    for attr in ATTRIBUTES:
        pool = wordings(attr, values[attr], kinds[attr])
        words[attr] = pool[rng.integers(len(pool))]
    return TestbedPrompt(fill_template(TEMPLATES[0], words), dict(values), seed)


def _random_values(rng: np.random.Generator, **fixed: str) -> dict[str, str]:
    return {a: fixed.get(a) or VALUES[a][rng.integers(len(VALUES[a]))] for a in ATTRIBUTES}


def attribute_prompts(kind: str, n: int, seed: int = 1000) -> list[TestbedPrompt]:
    """n prompts with random values, every attribute worded as `kind`; seeds seed, seed+1, ..."""
    if kind not in WORDING_KINDS:
        raise UserError(f"unknown wording kind {kind!r}: use one of {', '.join(WORDING_KINDS)}")
    rng = np.random.default_rng([seed, WORDING_KINDS.index(kind)])
    return [_prompt(_random_values(rng), dict.fromkeys(ATTRIBUTES, kind), rng, seed + i) for i in range(n)]


def concept_prompts(concept: str, kind: str, n: int, seed: int = 2000) -> list[TestbedPrompt]:
    """n prompts asking for the concept in wording `kind`; other attributes random, canonical."""
    attr = attribute_of(concept)
    rng = np.random.default_rng([seed, WORDING_KINDS.index(kind), VALUES[attr].index(concept)])
    kinds = {a: (kind if a == attr else "canonical") for a in ATTRIBUTES}
    return [_prompt(_random_values(rng, **{attr: concept}), kinds, rng, seed + i) for i in range(n)]


def preservation_prompts(concepts: list[str], n: int, seed: int = 3000) -> list[TestbedPrompt]:
    """n canonical prompts whose attributes avoid every given concept value."""
    rng = np.random.default_rng([seed, len(concepts)])
    avoid = set(concepts)
    for concept in concepts:
        attribute_of(concept)
    out = []
    while len(out) < n:
        values = _random_values(rng)
        if avoid.isdisjoint(values.values()):
            out.append(_prompt(values, dict.fromkeys(ATTRIBUTES, "canonical"), rng, seed + len(out)))
    return out


def training_captions(n: int, seed: int = 4000) -> list[str]:
    """n captions drawn as in training (training wordings only): a prior for preservation."""
    rng = np.random.default_rng(seed)
    return [caption(random_scene(rng), rng, "train", drop_prob=0.15) for _ in range(n)]
