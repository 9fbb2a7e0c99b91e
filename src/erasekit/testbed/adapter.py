"""The testbed as one more model family: an SD-shaped pipeline (erasekit.model.Model) whose `world` gives
what only a world with ground truth has: prompt sets by concept and wording, its training captions,
prompt pairs with and without a concept, its own CLIP scorer, and the oracle trained without a concept.
Methods, attacks and evaluation ask `model.world` for these, never the model's name."""

from __future__ import annotations

from pathlib import Path

import torch

from ..model import Model, quiet_libraries
from . import is_testbed, oracle_names, weights_for

__all__ = ["TestbedModel", "TestbedWorld", "is_testbed", "load_testbed", "weights_for"]

CLIP_RECORD = {"model": "the testbed's CLIP (erasekit.testbed.clip)",
               "score": "mean over images of 100 * max(cos(image, prompt), 0)", "scale": 100.0}


class ImageTokens:
    """(N, 16, 384) tokens in the text encoder's space from the testbed's aligned image encoder."""

    def __init__(self, device):
        from .clip import load_clip

        self.clip = load_clip(device=device)
        w, b = self.clip.text_proj.weight.detach().float(), self.clip.text_proj.bias.detach().float()
        self.inverse, self.bias = torch.linalg.pinv(w.T), b

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.clip.image_tokens(images.to(self.clip.device) * 2 - 1).float()
        return (tokens - self.bias) @ self.inverse


class TestbedWorld:
    """Ground-truth prompt sets and scorers of the testbed's world."""

    __test__ = False
    clip_record = CLIP_RECORD

    def concept_prompts(self, concept: str, wording: str, n: int, seed: int) -> list:
        """n prompts asking for concept in one wording ("canonical", "synonym", "heldout"), each with its seed."""
        from .prompts import concept_prompts

        return concept_prompts(concept, wording, n, seed=seed)

    def preservation_prompts(self, concepts: list[str], n: int, seed: int) -> list:
        """n prompts that ask for no value of the concepts' attributes that is one of the concepts."""
        from .prompts import preservation_prompts

        return preservation_prompts(concepts, n, seed=seed)

    def training_captions(self, n: int) -> list[str]:
        from .prompts import training_captions

        return training_captions(n)

    def concept_pairs(self, concepts, n: int) -> tuple[list[str], list[str]]:
        """Prompts with a concept and the same scene with another value of its attribute, pair by pair."""
        import numpy as np

        from .prompts import attribute_of, concept_prompts
        from .world import TEMPLATES, VALUES, canonical, fill_template

        with_c, without = [], []
        rng = np.random.default_rng(7)
        for concept in concepts:
            attr = attribute_of(concept)
            others = [v for v in VALUES[attr] if v != concept]
            for p in concept_prompts(concept, "canonical", n, seed=5000):
                swapped = dict(p.values, **{attr: others[rng.integers(len(others))]})
                with_c.append(p.text)
                without.append(fill_template(TEMPLATES[0], {a: canonical(a, v) for a, v in swapped.items()}))
        return with_c, without

    def clip_scorer(self):
        """score(images in [0, 1], texts) -> the mean CLIP score (CLIP_RECORD says how)."""
        from .clip import load_clip

        clip = load_clip()

        def score(images: torch.Tensor, texts: list[str]) -> float:
            with torch.no_grad():
                cos = clip.score(images.to(clip.device) * 2 - 1, texts)
            return float(100.0 * cos.clamp(min=0).mean())

        return score

    def image_tokens(self, device) -> ImageTokens:
        """Co-Erasing's image encoder for the testbed: its CLIP's image tokens mapped into the text space."""
        return ImageTokens(device)

    def oracle_for(self, concepts) -> str | None:
        """The installed oracle's model name trained without these concepts ("testbed:no-circle"), or None."""
        name = f"testbed:no-{'+'.join(concepts)}"
        return name if name in oracle_names() else None


class TestbedModel(Model):
    """The testbed's pipeline with its world. Every testbed model (the shipped one, an oracle, a `testbed
    train` run) is named "testbed": same world, judge and settings; source tells them apart."""

    __test__ = False
    family = "testbed"
    world = TestbedWorld()


def load_testbed(weights: str | Path | None = None, device: str | torch.device | None = None,
                 dtype: torch.dtype = torch.float32, source: str = "testbed") -> TestbedModel:
    """The testbed with its shipped denoiser, or with the one in weights (a `testbed train` run's weights/)."""
    from ..families import _device
    from . import SAMPLER_DEFAULTS, load_pipeline

    quiet_libraries()
    pipe = load_pipeline(Path(weights) if weights else None)
    return TestbedModel(pipe.to(_device(device), dtype), source, "testbed", SAMPLER_DEFAULTS)
