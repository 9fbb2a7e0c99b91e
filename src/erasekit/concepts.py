"""ConceptSpec: what to erase, what to map it to, and what to keep, with prompt expansion.

A spec names target concepts (each with synonyms), anchors (the guide or safe concept each target is
mapped to; one shared anchor or one per target), preserve concepts, and prompt templates. It reads
from CLI flags or a YAML/TOML file:

    targets:
      - name: nudity
        synonyms: [naked, nude, topless]
    anchors: ["a person wearing clothes"]
    preserve: [person, portrait]
    templates: object        # "object", "art", or a list of strings containing {}
    expand: true
    expansion: uce           # "uce" (default) or "templates"

Expansion (`expand: true`) follows the public UCE code (trainscripts/uce_sd_erase.py, --expand_prompts) unless
`expansion: templates`:
- "uce": every target phrase and every anchor is kept bare and also put into each template ("Van Gogh",
  "painting by Van Gogh", ...; the anchor "art", "painting by art", ...); preserve concepts are not expanded.
- "templates" (erasekit's earlier rule, and the testbed's captions): every phrase, anchor and preserve
  concept is replaced by its templated prompts (no bare phrase).
With no anchor given the guide is "" (object templates) or "art" (the art templates), as in the public code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError
from .files import read_mapping

TEMPLATE_SETS = {
    "object": ("image of {}", "photo of {}", "portrait of {}", "picture of {}", "painting of {}"),
    "art": ("painting by {}", "art by {}", "artwork by {}", "picture by {}", "style of {}"),
}
SPEC_KEYS = {"targets", "anchors", "preserve", "templates", "expand", "expansion", "adversarial"}
EXPANSIONS = ("uce", "templates")  # see the module docstring


@dataclass
class Concept:
    name: str
    synonyms: list[str] = field(default_factory=list)

    @property
    def phrases(self) -> list[str]:
        return [self.name, *self.synonyms]


@dataclass
class PromptPair:
    """A target prompt and the same prompt with the anchor phrase in the target's place."""

    target: str
    anchor: str
    concept: str  # the target concept's name


@dataclass
class ConceptSpec:
    targets: list[Concept]
    anchors: list[str] | None = None  # None: the public code's default guide ("" or, with art templates, "art")
    preserve: list[str] = field(default_factory=list)
    templates: list[str] = field(default_factory=lambda: list(TEMPLATE_SETS["object"]))
    expand: bool = False
    expansion: str = "uce"  # see EXPANSIONS
    # hardening's prompt pairs, used as given (never expanded): [{"target": ..., "anchor": ..., "concept": ...}]
    adversarial: list[dict] = field(default_factory=list)

    def __post_init__(self):
        self.targets = [t if isinstance(t, Concept) else Concept(str(t)) for t in self.targets]
        self.templates = _templates(self.templates)
        if self.anchors is None:
            self.anchors = ["art" if self.templates == list(TEMPLATE_SETS["art"]) else ""]
        self.validate()

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict, source: str = "spec") -> ConceptSpec:
        unknown = set(data) - SPEC_KEYS
        if unknown:
            raise UserError(f"{source} has unknown keys {sorted(unknown)}: allowed keys are {sorted(SPEC_KEYS)}")
        targets = []
        for entry in _listed(data.get("targets"), "targets", source):
            if isinstance(entry, str):
                targets.append(Concept(entry))
            elif isinstance(entry, dict):
                extra = set(entry) - {"name", "synonyms"}
                if extra or not isinstance(entry.get("name"), str):
                    raise UserError(f"{source}: each target needs a 'name' (text) and may have 'synonyms' "
                                    f"(got {entry!r})")
                targets.append(Concept(entry["name"], _texts(entry.get("synonyms"), "synonyms", source)))
            else:
                raise UserError(f"{source}: a target is a name or a mapping with name and synonyms (got {entry!r})")
        anchors = data.get("anchors")
        if anchors is not None:
            anchors = [anchors] if isinstance(anchors, str) else _texts(anchors, "anchors", source)
        templates = data.get("templates", "object")
        if not isinstance(templates, str):
            templates = _texts(templates, "templates", source)
        expand = data.get("expand", False)
        if not isinstance(expand, bool):
            raise UserError(f"{source}: expand must be true or false, got {expand!r}")
        adversarial = _listed(data.get("adversarial"), "adversarial", source)
        if not all(isinstance(a, dict) and set(a) == {"target", "anchor", "concept"}
                   and all(isinstance(v, str) for v in a.values()) for a in adversarial):
            raise UserError(f"{source}: each adversarial entry is a mapping of target, anchor and concept texts")
        return cls(targets=targets, anchors=anchors, preserve=_texts(data.get("preserve"), "preserve", source),
                   templates=templates, expand=expand, expansion=data.get("expansion", "uce"),
                   adversarial=[dict(a) for a in adversarial])

    @classmethod
    def from_file(cls, path: str | Path) -> ConceptSpec:
        return cls.from_dict(read_mapping(path, "spec file"), source=str(path))

    # -- checks -----------------------------------------------------------------------------------
    def validate(self) -> None:
        if self.expansion not in EXPANSIONS:
            raise UserError(f"unknown expansion {self.expansion!r}: use uce (the public UCE code's: bare phrase plus "
                            "templates, preserve concepts as given) or templates (templated prompts only, for all)")
        names = [t.name.strip() for t in self.targets]
        if not names or any(not n for n in names):
            raise UserError("no target concept (or an empty one): give at least one non-empty --concept")
        if len(set(n.lower() for n in names)) != len(names):
            dupes = sorted({n for n in names if [m.lower() for m in names].count(n.lower()) > 1})
            raise UserError(f"duplicate target concepts {dupes}: name each concept once")
        if len(self.anchors) not in (1, len(self.targets)):
            raise UserError(f"{len(self.anchors)} anchors for {len(self.targets)} targets: give one anchor, "
                            "or one per target")
        for target, anchor in zip(self.targets, self.anchor_per_target()):
            if anchor.strip().lower() in (p.strip().lower() for p in target.phrases):
                raise UserError(f"the anchor {anchor!r} is the target concept {target.name!r} itself: choose "
                                "a different anchor (e.g. '' or a related safe concept)")
        overlap = {p.lower() for p in self.preserve} & {n.lower() for n in names}
        if overlap:
            raise UserError(f"{sorted(overlap)} are both targets and preserved: a concept cannot be both")

    def anchor_per_target(self) -> list[str]:
        return self.anchors * len(self.targets) if len(self.anchors) == 1 else list(self.anchors)

    # -- prompts ----------------------------------------------------------------------------------
    def _fill(self, phrase: str) -> list[str]:
        """A target phrase or anchor as prompts: itself, or expanded by the spec's expansion rule."""
        if not self.expand:
            return [phrase]
        filled = [" ".join(t.format(phrase).split()) for t in self.templates]
        return [phrase, *filled] if self.expansion == "uce" else filled

    def pairs(self, synonyms: bool = True) -> list[PromptPair]:
        """Target prompts paired with the anchor in the same template (for every phrase if synonyms)."""
        out = []
        for target, anchor in zip(self.targets, self.anchor_per_target()):
            for phrase in target.phrases if synonyms else [target.name]:
                for t_prompt, a_prompt in zip(self._fill(phrase), self._fill(anchor)):
                    out.append(PromptPair(t_prompt, a_prompt, target.name))
        return out + [PromptPair(a["target"], a["anchor"], a["concept"]) for a in self.adversarial]

    def preserve_prompts(self) -> list[str]:
        """The preserve concepts as prompts: as given under the "uce" rule, templated under "templates"."""
        if self.expansion == "uce":
            return list(self.preserve)
        return [p for concept in self.preserve for p in self._fill(concept)]

    def to_dict(self) -> dict:
        return {"targets": [{"name": t.name, "synonyms": t.synonyms} for t in self.targets],
                "anchors": self.anchors, "preserve": self.preserve, "templates": self.templates,
                "expand": self.expand, "expansion": self.expansion,
                **({"adversarial": self.adversarial} if self.adversarial else {})}


def _listed(value, key: str, source: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise UserError(f"{source}: {key} must be a list, got {value!r}")
    return value


def _texts(value, key: str, source: str) -> list[str]:
    """A spec field that is a list of strings, or a UserError naming the field."""
    items = _listed(value, key, source)
    bad = [v for v in items if not isinstance(v, str)]
    if bad:
        raise UserError(f"{source}: {key} must be a list of text, got {bad[0]!r} in it")
    return items


def _templates(value) -> list[str]:
    if isinstance(value, str):
        if value not in TEMPLATE_SETS:
            raise UserError(f"unknown template set {value!r}: use {sorted(TEMPLATE_SETS)} "
                            "or a list of strings with {}")
        return list(TEMPLATE_SETS[value])
    templates = [str(t) for t in value]
    bad = [t for t in templates if t.count("{}") != 1]
    if bad or not templates:
        raise UserError(f"every template needs exactly one {{}} for the concept (bad: {bad[:3]})")
    return templates
