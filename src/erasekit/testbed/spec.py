"""The erasure spec the testbed's experiments, demo and attacks share for a set of testbed concepts.

- targets: each concept with its training synonyms (held-out wordings stay unseen: they measure
  generalisation);
- anchors: another value of the same attribute (circle -> square, red -> green, striped -> solid), so the
  edited prompt still asks for a complete scene;
- preserve: the attribute's other values;
- templates: captions in the testbed's own grammar with the other attributes drawn at random (canonical
  words, seed distinct from every evaluation set's), so the edit sees the concept in the sentences it is
  prompted with. The evaluation prompts are drawn from the same grammar, so some captions coincide.

Why: UCE (at [KEY], 32 canonical prompts) left circle at 0.84 with the empty anchor and the object templates
("image of {}"); a sibling anchor alone brought it to 0.125, captions with the empty anchor to 0.53, both to
0.03. With no shape word the testbed draws its default round blob, which the judge calls a circle; and the
bidirectional encoder writes the concept into every token of a caption, which "image of {}" does not show.
"""

from __future__ import annotations

import numpy as np

from ..concepts import Concept, ConceptSpec
from .prompts import attribute_of
from .world import ATTRIBUTES, TEMPLATES, VALUES, canonical, fill_template, wordings

TEMPLATE_SEED = 77


def caption_templates(concepts: list[str], n: int = 24, seed: int = TEMPLATE_SEED) -> list[str]:
    """n captions with '{}' where the concepts go (the testbed's five caption forms in turn). One attribute:
    its own slot. Several (red+striped): their slots are left empty and '{}' stands before the shape noun,
    where a colour or a style word reads naturally."""
    attrs = {attribute_of(c) for c in concepts}
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        words = {a: canonical(a, VALUES[a][rng.integers(len(VALUES[a]))]) for a in ATTRIBUTES}
        if len(attrs) == 1:
            words[next(iter(attrs))] = "{}"
        else:
            for a in attrs:
                words[a] = ""
            words["shape"] = "{}" if "shape" in attrs else "{} " + words["shape"]
        out.append(fill_template(TEMPLATES[k % len(TEMPLATES)], words))
    return out


def sibling(concept: str) -> str:
    """The anchor of a concept: the first other value of its attribute, in its canonical wording."""
    attr = attribute_of(concept)
    return canonical(attr, next(v for v in VALUES[attr] if v != concept))


def takes_phrases_only(cfg) -> bool:
    """Whether a method config (or a composition's list of them) trains on concept phrases alone: ESD's
    negative guidance against the empty prompt removes everything a prompt adds to it, so a whole caption
    would erase its colour, style and background too (the config's phrases_only says so)."""
    return any(getattr(c, "phrases_only", False) for c in (cfg if isinstance(cfg, list) else [cfg]))


def erasure_spec(concepts: list[str], cfg=None, templates: int = 24) -> ConceptSpec:
    """The spec for erasing these testbed concepts with a method configured as cfg (see the module's
    docstring): captions, or the phrases alone for a config that takes phrases only."""
    captions = not takes_phrases_only(cfg)
    targets = []
    for c in concepts:  # every training wording: a background's canonical one is a phrase ("on grass")
        words = wordings(attribute_of(c), c, "canonical") + wordings(attribute_of(c), c, "synonym")
        targets.append(Concept(c, [w for w in words if w != c]))
    preserve = sorted({v for c in concepts for v in VALUES[attribute_of(c)] if v not in concepts})
    return ConceptSpec(targets, anchors=[sibling(c) for c in concepts], preserve=preserve,
                       templates=caption_templates(concepts, templates) if captions else "object", expand=captions,
                       expansion="templates")
