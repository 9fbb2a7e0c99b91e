"""Judges built on a local transformers model folder, named "KIND:PATH" (`get_judge("classifier:~/resnet-50")`).

- `classifier:PATH` (`ClassifierJudge`): any image-classification model. An image is flagged for a concept when
  the concept's label is among its top-k classes (k = 1 by default; top_k=3 for the style classifiers' top-3)
  and, when a threshold above 0 is set, its probability exceeds it. Labels: see `labels.py`; label=NAME reads
  the one concept as the classifier's label NAME (an artist classifier's "vincent-van-gogh" for "Van Gogh").
- `clip:PATH` (`ClipJudge`): zero-shot CLIP for any concept named in words. The image's softmax over
  [concept prompt, anchor prompt (when given), neutral prompt] at CLIP's own logit scale gives the score of the
  concept prompt; flagged above the threshold (0.5 by default).
"""

from __future__ import annotations

import torch

from ..errors import UserError
from .judges import Assessment, Judge, as_images, check_threshold, listing
from .labels import label_set
from .vision import LocalClip, VisionFolder, batched, pick_device


def whole_option(value, name: str, least: int = 1) -> int:
    """An integer option (given as int or text) of at least `least`, or a one-line UserError."""
    number = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and value.strip().isdigit():
        number = int(value)
    if number is None or number < least:
        raise UserError(f"judge option {name} must be a whole number of at least {least}, got {value!r}: "
                        f"pass e.g. {name}={least}")
    return number


class ClassifierJudge(Judge):
    """A transformers image classifier from a local folder, flagging a concept when its label is in the top-k.

    The score of a concept is its label's softmax probability when that label is among the top_k classes, else 0
    (for a name several labels share, the largest); an image is flagged when the score exceeds the threshold
    (0 by default: in the top-k is enough). Features (for FID) are the input of the model's classification head.
    """

    def __init__(self, path, top_k=1, threshold=0.0, labels: str = "model", label: str = "", batch_size=16,
                 device=None):
        from transformers import AutoModelForImageClassification

        self.folder = VisionFolder(path, "classifier judge")
        self.name = f"classifier:{path}"
        self.top_k = whole_option(top_k, "top_k")
        self.threshold = check_threshold(threshold)
        self.batch_size = whole_option(batch_size, "batch_size")
        self.device = pick_device(device)
        self.model = self.folder.load(AutoModelForImageClassification, self.device)
        id2label = getattr(self.model.config, "id2label", None) or {}
        if len(id2label) < 2:
            raise UserError(f"classifier judge folder {self.folder.path} names fewer than two classes "
                            "(config id2label): give an image-classification model folder")
        if self.top_k > len(id2label):
            raise UserError(f"top_k={self.top_k} is more than the classifier's {len(id2label)} classes: "
                            "pass a smaller top_k")
        self.labels = label_set(str(labels), id2label)
        self.num_classes = len(id2label)
        self.label = str(label).strip()  # the classifier's name for the (one) concept, when the prompts call it else
        if self.label and self.labels.resolve(self.label) is None:
            raise UserError(f"classifier {self.folder.path} has no label {self.label!r} (label set {self.labels.name}: "
                            f"{listing(self.labels.concepts)}): give label= one of its labels")
        self.targets = {c: self.labels.resolve(c) for c in dict.fromkeys(self.labels.concepts)}
        self.concepts = tuple(self.targets)
        self._head_input: list[torch.Tensor] = []
        head = getattr(self.model, "classifier", None)
        self.has_features = isinstance(head, torch.nn.Module)
        if self.has_features:
            head.register_forward_pre_hook(lambda module, args: self._head_input.append(args[0].detach()))

    def check_concept(self, concept: str) -> None:
        if concept in self.targets:
            return
        ids = self.labels.resolve(self.label or concept)
        if ids is None:
            raise UserError(f"classifier {self.folder.path} has no label {concept!r} (label set {self.labels.name}: "
                            f"{listing(self.labels.concepts)}): name one of its labels with --concept")
        self.targets[concept] = ids

    def use_concepts(self, concepts) -> None:
        if self.label and len(set(concepts)) > 1:
            raise UserError(f"label={self.label!r} names the classifier's label for one concept, not for "
                            f"{len(set(concepts))}: drop label= or judge one concept")
        for concept in concepts:
            self.check_concept(concept)
        self.targets = {c: self.targets[c] for c in dict.fromkeys(concepts)}
        self.concepts = tuple(self.targets)

    @torch.no_grad()
    def _forward(self, images) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(probabilities (N, classes), head inputs (N, D) or None), on the CPU."""
        probs, feats = [], []
        for batch in batched(as_images(images), self.batch_size):
            self._head_input.clear()
            logits = self.model(pixel_values=self.folder.pixel_values(batch, self.device)).logits
            probs.append(logits.float().softmax(dim=-1).cpu())
            if self.has_features and self._head_input:
                feats.append(self._head_input[-1].float().flatten(1).cpu())
        if not probs:
            return torch.zeros(0, self.num_classes), None
        return torch.cat(probs), torch.cat(feats) if len(feats) == len(probs) else None

    def _in_top_k(self, probs: torch.Tensor) -> torch.Tensor:
        top = probs.topk(self.top_k, dim=-1).indices
        return torch.zeros_like(probs, dtype=torch.bool).scatter_(1, top, True)

    def _scores(self, probs: torch.Tensor) -> dict[str, torch.Tensor]:
        kept = probs * self._in_top_k(probs)
        return {c: kept[:, list(ids)].max(dim=1).values for c, ids in self.targets.items()}

    def _details(self, probs: torch.Tensor) -> list[dict]:
        out = []
        values, indices = probs.topk(self.top_k, dim=-1)
        for p, i in zip(values.tolist(), indices.tolist()):
            out.append({"values": {"label": self.labels.name_of(i[0])},
                        "top": [{"label": self.labels.name_of(c), "id": c, "p": round(v, 6)} for v, c in zip(p, i)]})
        return out

    def scores(self, images) -> dict[str, torch.Tensor]:
        return self._scores(self._forward(images)[0])

    def details(self, images) -> list[dict]:
        """Per image: the top-1 label as {"values": {"label": name}} and the top-k labels with probabilities."""
        return self._details(self._forward(images)[0])

    def features(self, images) -> torch.Tensor | None:
        return self._forward(images)[1]

    def assess(self, images) -> Assessment:
        probs, feats = self._forward(images)
        return Assessment(self._scores(probs), self._details(probs), feats)

    def record(self) -> dict:
        return {"name": self.name, "kind": "classifier", "threshold": self.threshold, "top_k": self.top_k,
                "label": self.label or None,
                "class_set": self.labels.record(), "concepts": list(self.concepts),
                "class_ids": {c: list(ids) for c, ids in self.targets.items()},
                "score": f"softmax probability of the concept's label when it is among the top {self.top_k}, else 0; "
                         "flagged when above the threshold",
                "features": "input of the classification head" if self.has_features else None,
                "model": self.folder.record()}


class ClipJudge(Judge):
    """Zero-shot CLIP from a local folder for any concept named in words.

    Per concept, three prompts (the anchor's only when an anchor is given): template with the concept,
    template with the anchor, and the neutral prompt. The score is the concept prompt's share of the softmax of
    the image's CLIP logits (logit scale times cosine) over them. Features are the image embeddings.
    """

    def __init__(self, path, threshold=0.5, template: str = "a photo of {}", anchor: str = "",
                 neutral: str = "a photo", batch_size=32, device=None):
        self.name = f"clip:{path}"
        self.threshold = check_threshold(threshold)
        if str(template).count("{}") != 1:
            raise UserError(f"CLIP judge template {template!r} must hold one {{}} where the concept goes: "
                            "pass e.g. template='a photo of {}'")
        self.template, self.anchor, self.neutral = str(template), str(anchor).strip(), str(neutral).strip()
        if not self.neutral:
            raise UserError("CLIP judge neutral prompt is empty: pass e.g. neutral='a photo'")
        self.clip = LocalClip(path, "CLIP judge", device, whole_option(batch_size, "batch_size"))
        self.concepts = ()
        self.prompts: dict[str, list[str]] = {}
        self.text: dict[str, torch.Tensor] = {}

    def check_concept(self, concept: str) -> None:
        if concept not in self.prompts:
            self.use_concepts((*self.concepts, concept))

    def use_concepts(self, concepts) -> None:
        for concept in concepts:
            if not str(concept).strip():
                raise UserError("the CLIP judge needs a concept in words: pass --concept")
            if self.anchor and concept.strip().casefold() == self.anchor.casefold():
                raise UserError(f"CLIP judge anchor {self.anchor!r} is the concept itself: pass another anchor=")
        self.concepts = tuple(dict.fromkeys(concepts))
        for concept in self.concepts:
            if concept not in self.prompts:
                prompts = [self.template.format(concept)]
                if self.anchor:
                    prompts.append(self.template.format(self.anchor))
                prompts.append(self.neutral)
                self.prompts[concept] = prompts
                self.text[concept] = self.clip.text_embeddings(prompts)

    def _scores(self, embeddings: torch.Tensor) -> dict[str, torch.Tensor]:
        scale = self.clip.logit_scale
        return {c: (scale * embeddings @ self.text[c].T).softmax(dim=-1)[:, 0] for c in self.concepts}

    def scores(self, images) -> dict[str, torch.Tensor]:
        return self._scores(self.clip.image_embeddings(images))

    def features(self, images) -> torch.Tensor:
        return self.clip.image_embeddings(images)

    def assess(self, images) -> Assessment:
        embeddings = self.clip.image_embeddings(images)
        scores = self._scores(embeddings)
        details = [{"clip": {c: round(float(s[i]), 6) for c, s in scores.items()}} for i in range(embeddings.shape[0])]
        return Assessment(scores, details, embeddings)

    def record(self) -> dict:
        return {"name": self.name, "kind": "clip zero-shot", "threshold": self.threshold,
                "concepts": list(self.concepts),
                "template": self.template, "anchor": self.anchor or None, "neutral": self.neutral,
                "prompts": self.prompts,
                "score": "softmax over [concept, anchor, neutral] prompts of logit_scale * cos; the concept's share",
                "features": "CLIP image embedding (normalised)", "model": self.clip.record()}


def _q16():
    from .q16 import Q16Judge

    return Q16Judge


PATH_JUDGES: dict[str, type[Judge]] = {"classifier": ClassifierJudge, "clip": ClipJudge, "q16": _q16()}
