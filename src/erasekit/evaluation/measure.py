"""Metrics over a finished run's cached images: target rates, preservation, Fréchet distances, alignment.

Names are kept distinct on purpose: `target_rate` is the share of images the judge flags for the
suite's concept; `exposed_parts` (NudeNet) counts detections over a prompt set; `fid_gen` compares with
the original model's images for the same prompts and seeds, `fid_real` with a folder of real images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import UserError
from ..metrics import frechet_distance
from ..model import Model
from ..stats import rate_ci
from .cache import ImageCache
from .labels import label_key


def _r(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(float(x), digits)


def _concepts_of(prompt, concepts: tuple[str, ...]) -> tuple[str, ...]:
    """The concepts a prompt asks for (testbed prompts know their values), else all of the suite's."""
    if prompt.values:
        asked = tuple(c for c in concepts if c in prompt.values.values())
        if asked:
            return asked
    return concepts


def _flags(scores: dict[str, torch.Tensor], prompts, concepts, threshold: float) -> list[tuple[bool, float]]:
    out = []
    for i, p in enumerate(prompts):
        best = max(float(scores[c][i]) for c in _concepts_of(p, concepts))
        out.append((best > threshold, best))
    return out


def _accuracy(details: list[dict], prompts) -> dict[str, float] | None:
    """Judge accuracy against what each prompt asked for, per attribute (testbed prompts only)."""
    if not prompts or not all(p.values for p in prompts):
        return None
    attrs = list(prompts[0].values)
    if not all(a in d.get("values", d) for d in details for a in attrs):
        return None  # the judge predicts no such attribute (a detector, CLIP)
    hits = {a: 0 for a in attrs}
    for d, p in zip(details, prompts):
        predicted = d.get("values", d)
        for a in attrs:
            hits[a] += int(label_key(predicted.get(a, "")) == label_key(p.values[a]))
    return {a: hits[a] / len(prompts) for a in attrs}


@dataclass
class Quality:
    """The image-quality measurements a run makes besides its judge: a CLIP scorer (a `vision.ClipScorer`;
    the testbed's own CLIP when None on the testbed) and FID features (a `vision.ImageFeatures` or an
    `inception.InceptionFeatures`; the judge's own features when None)."""

    clip: object | None = None
    fid_features: object | None = None

    def clip_scorer(self, model: Model):
        if self.clip is not None:
            return self.clip
        return model.world.clip_scorer() if model.world is not None else None

    def features(self, judge, verdict, images) -> torch.Tensor | None:
        return self.fid_features(images) if self.fid_features is not None else verdict.features

    def real_features(self, judge, images) -> torch.Tensor | None:
        return self.fid_features(images) if self.fid_features is not None else judge.features(images)

    def record(self, model: Model, judge) -> dict:
        """{"clip_score": what scores image-text alignment (None: nothing), "fid_features": what FID uses}."""
        if self.clip is not None:
            clip = self.clip.record()
        else:
            clip = model.world.clip_record if model.world is not None else None
        if self.fid_features is not None:
            features = self.fid_features.record()
        else:
            features = {"source": "judge", "judge": judge.name}
        return {"clip_score": clip, "fid_features": features}


def read_real_images(folder: Path, size: tuple[int, int]) -> torch.Tensor:
    """Every PNG/JPEG/WebP image in folder, resized to size (H, W), as floats in [0, 1]."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"real-image folder {folder} does not exist: give a folder of PNG or JPEG images")
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if len(files) < 2:
        raise UserError(f"real-image folder {folder} holds {len(files)} images: FID_real needs at least 2")
    arrays = [np.asarray(Image.open(f).convert("RGB").resize((size[1], size[0]), Image.Resampling.BILINEAR))
              for f in files]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(255.0)


def measure(model: Model, plan, cache: ImageCache, suite, judge, real_images: Path | None = None,
            quality: Quality | None = None, settings=None) -> dict:
    """{"metrics": per variant, "images": one record per image (with the seed, steps and guidance it was made
    with: a suite's per-row guidance differs from the default) for a run whose images are all cached."""
    quality = quality or Quality()
    clip_score = quality.clip_scorer(model)
    features: dict[str, list[torch.Tensor]] = {}
    metrics, records = {}, []
    size = None
    for variant in plan.variants:
        per_set, feats = {}, []
        for pset in suite.sets:
            items = plan.of(variant.name, pset.name)
            images = cache.get([i.key for i in items])
            size = tuple(images.shape[-2:])
            prompts = [i.prompt for i in items]
            verdict = judge.assess(images)
            flags = _flags(verdict.scores, prompts, suite.concepts, judge.threshold)
            entry = {"role": pset.role, "n": len(items), "flagged_rate": _r(np.mean([f for f, _ in flags]))}
            entry["flagged_rate_ci"] = rate_ci(entry["flagged_rate"], len(items))
            if pset.role == "target":
                entry["target_rate"] = entry["flagged_rate"]
            acc = _accuracy(verdict.details, prompts)
            if acc is not None:
                entry["accuracy_per_attribute"] = {a: _r(v) for a, v in acc.items()}
                entry["accuracy"] = _r(np.mean(list(acc.values())))
                entry["accuracy_ci"] = rate_ci(entry["accuracy"], len(items))
            if any("exposed_parts" in d for d in verdict.details):  # a detector judge counts parts per image
                entry["exposed_parts"] = int(sum(d.get("exposed_parts", 0) for d in verdict.details))
                entry["exposed_by_class"] = _sum_counts(d.get("exposed_by_class", {}) for d in verdict.details)
            if clip_score is not None:
                entry["clip_score"] = _r(clip_score(images, [p.text for p in prompts]), 3)
            # FID on the preservation sets (on every set when there is none)
            if pset.role == "preservation" or not any(s.role == "preservation" for s in suite.sets):
                f = quality.features(judge, verdict, images)
                if f is not None:
                    feats.append(f.detach().float().cpu())
            per_set[pset.name] = entry
            for item, (flag, score) in zip(items, flags):
                made = {} if settings is None else {k: v for k, v in settings.for_prompt(item.prompt).items()
                                                    if k in ("steps", "guidance")}
                records.append({"variant": variant.name, "set": pset.name, "index": item.index,
                                "prompt": item.prompt.text, "seed": item.prompt.seed, **made, "key": item.key,
                                "flagged": bool(flag), "score": _r(score)})
        features[variant.name] = feats
        metrics[variant.name] = _summary(per_set)
    _add_frechet(metrics, features, plan.variants[0].name, real_images, size, judge, quality)
    return {"metrics": metrics, "images": records}


def _sum_counts(counts) -> dict[str, int]:
    """Per-image {name: count} dicts added up, the largest count first."""
    total: dict[str, int] = {}
    for c in counts:
        for name, n in c.items():
            total[name] = total.get(name, 0) + int(n)
    return dict(sorted(total.items(), key=lambda kv: (-kv[1], kv[0])))


def _summary(per_set: dict) -> dict:
    """A variant's headline numbers, each rate with its Wilson 95% interval (`_ci`) and image count (`_n`).
    Pooled rates (the mean over target sets, preservation over several sets) take the images of every set."""
    targets = {n: e for n, e in per_set.items() if e["role"] == "target"}
    keep = [e for e in per_set.values() if e["role"] == "preservation" and "accuracy" in e]
    mean = _r(np.mean([e["target_rate"] for e in targets.values()])) if targets else None
    preservation = _r(np.mean([e["accuracy"] for e in keep])) if keep else None
    target_n, keep_n = sum(e["n"] for e in targets.values()), sum(e["n"] for e in keep)
    out = {"target_rate": {n: e["target_rate"] for n, e in targets.items()},
           "target_rate_ci": {n: e["flagged_rate_ci"] for n, e in targets.items()},
           "target_rate_n": {n: e["n"] for n, e in targets.items()},
           "target_rate_mean": mean, "target_rate_mean_ci": rate_ci(mean, target_n), "target_rate_mean_n": target_n,
           "preservation_accuracy": preservation, "preservation_accuracy_ci": rate_ci(preservation, keep_n),
           "preservation_accuracy_n": keep_n}
    clip = [e["clip_score"] for e in per_set.values() if "clip_score" in e]
    if clip:
        out["clip_score"] = _r(np.mean(clip), 3)
    if any("exposed_parts" in e for e in per_set.values()):
        out["exposed_parts"] = {n: e["exposed_parts"] for n, e in per_set.items()}
        out["exposed_by_class"] = {n: e.get("exposed_by_class", {}) for n, e in per_set.items()}
    out["sets"] = per_set
    return out


def _add_frechet(metrics: dict, features: dict, reference: str, real_images, size, judge, quality) -> None:
    ref = torch.cat(features[reference]) if features.get(reference) else None
    real = None
    if real_images is not None and ref is not None:
        real = quality.real_features(judge, read_real_images(Path(real_images), size)).detach().float().cpu()
    for name, feats in features.items():
        if not feats or ref is None:
            metrics[name]["fid_gen"] = None
            continue
        mine = torch.cat(feats)
        ok = mine.shape[0] >= 2
        metrics[name]["fid_gen"] = None if name == reference or not ok else _r(frechet_distance(ref, mine))
        if real is not None:
            metrics[name]["fid_real"] = _r(frechet_distance(real, mine)) if ok else None
