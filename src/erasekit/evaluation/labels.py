"""Label sets: which of a classifier's output classes a concept named in words means.

- "model": the classifier's own labels (its config's id2label). A concept matches a label written the same way
  up to case, '-'/'_' for spaces and repeated spaces ("vincent-van-gogh" is "Vincent van Gogh"), or one of the
  comma-separated names of an ImageNet-style label ("garbage truck" is "garbage truck, dustcart"). A name two
  labels share (ImageNet's two "crane"s) means either.
- "imagenette": the ten Imagenette classes by their ImageNet-1k ids (the object-erasure protocol of ESD, RECE and
  UnlearnDiffAtk: a ResNet-50 trained on ImageNet, top-1). It needs a classifier with 1000 outputs in ImageNet
  order; when the classifier names its labels, each of the ten must name its class.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import UserError

IMAGENETTE = {"tench": 0, "English springer": 217, "cassette player": 482, "chain saw": 491, "church": 497,
              "French horn": 566, "garbage truck": 569, "gas pump": 571, "golf ball": 574, "parachute": 701}
LABEL_SETS = ("model", "imagenette")
_GENERIC = re.compile(r"label_?\d+", re.IGNORECASE)  # what transformers names unnamed classes


def label_key(text: str) -> str:
    """A label or concept as compared: case-folded, '-' and '_' read as spaces, spaces collapsed."""
    return " ".join(re.sub(r"[-_]", " ", str(text)).casefold().split())


def _names(label: str) -> list[str]:
    """The whole label and each of its comma-separated names."""
    return [label] + [part for part in (p.strip() for p in label.split(",")) if part and part != label]


@dataclass(frozen=True)
class LabelSet:
    """name: "model" or "imagenette"; ids: {concept key: class ids}; shown: {class id: the name details show}."""

    name: str
    ids: dict[str, tuple[int, ...]]
    shown: dict[int, str]
    concepts: tuple[str, ...]  # the names listed to a user

    def resolve(self, concept: str) -> tuple[int, ...] | None:
        return self.ids.get(label_key(concept))

    def name_of(self, class_id: int) -> str:
        return self.shown.get(class_id, f"class {class_id}")

    def record(self) -> dict:
        if self.name == "imagenette":
            return {"name": self.name, "classes": {c: self.ids[label_key(c)][0] for c in self.concepts}}
        return {"name": self.name, "classes": len(self.shown),
                "matching": "label text up to case, '-'/'_' and spaces, or one of its comma-separated names"}


def _id2label(id2label: dict) -> dict[int, str]:
    try:
        return {int(k): str(v) for k, v in id2label.items()}
    except (TypeError, ValueError) as e:
        raise UserError(f"the classifier's id2label has a non-integer class id ({e}): fix its config.json") from e


def model_labels(id2label: dict) -> LabelSet:
    labels = _id2label(id2label)
    ids: dict[str, set[int]] = {}
    for class_id, label in labels.items():
        for name in _names(label):
            ids.setdefault(label_key(name), set()).add(class_id)
    shown = {i: _names(label)[1] if "," in label else label for i, label in labels.items()}
    return LabelSet("model", {k: tuple(sorted(v)) for k, v in ids.items()}, shown, tuple(labels.values()))


def imagenette_labels(id2label: dict) -> LabelSet:
    labels = _id2label(id2label)
    if len(labels) != 1000:
        raise UserError(f"the imagenette label set needs an ImageNet-1k classifier (1000 classes); this one has "
                        f"{len(labels)}: use labels=model, or give an ImageNet classifier folder "
                        "(e.g. microsoft/resnet-50)")
    for name, class_id in IMAGENETTE.items():
        label = labels.get(class_id, "")
        if not _GENERIC.fullmatch(label) and label_key(name) not in {label_key(n) for n in _names(label)}:
            raise UserError(f"the classifier's class {class_id} is {label!r}, not Imagenette's {name!r}, so "
                            "its classes are not in ImageNet-1k order: give an ImageNet-1k classifier or labels=model")
    ids = {label_key(name): (class_id,) for name, class_id in IMAGENETTE.items()}
    shown = {i: _names(label)[1] if "," in label else label for i, label in labels.items()}
    shown.update({class_id: name for name, class_id in IMAGENETTE.items()})
    return LabelSet("imagenette", ids, shown, tuple(IMAGENETTE))


def label_set(name: str, id2label: dict) -> LabelSet:
    if name == "model":
        return model_labels(id2label)
    if name == "imagenette":
        return imagenette_labels(id2label)
    raise UserError(f"unknown label set {name!r}: use labels=model (the classifier's own labels) or labels=imagenette")
