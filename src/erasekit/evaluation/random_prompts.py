"""The random-prompt base rate: how often the judge sees the concept in images of prompts made of random
words (whole words of the attack vocabulary, seeded). A free-token attack (P4D-N: 16 free tokens) starts
from this rate before any optimisation, so an ASR is worth as much as it rises above it.

The prompts form a suite (one target set, no testbed values, so the judge looks for every concept of the
suite) that `evaluation.runner.evaluate` generates, caches and judges like any other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import UserError

if TYPE_CHECKING:  # torch and the suites load on first use: `audit --help` reads PROMPTS without them
    from ..model import Model
    from .suites import Suite

WORDS = 16  # P4D-N's free-token count
PROMPTS = 64
FIRST_SEED = 5000  # the images' seeds: FIRST_SEED, FIRST_SEED + 1, ...
SET = "random"


def random_prompts(model: Model, n: int = PROMPTS, words: int = WORDS, seed: int = 0) -> list[str]:
    """n prompts of `words` whole words each, drawn uniformly from the model's attack vocabulary."""
    import torch

    from ..attacks.tokens import attack_vocabulary

    vocab = attack_vocabulary(model)
    gen = torch.Generator().manual_seed(seed)
    return [model.tokenizer.decode(vocab[torch.randint(0, len(vocab), (words,), generator=gen)].tolist())
            for _ in range(n)]


def random_suite(model: Model, suite: Suite, n: int = PROMPTS, words: int = WORDS) -> Suite:
    """Random-word prompts judged for the concepts of suite (the same judge), seeds from FIRST_SEED."""
    from .suites import PromptSet, Suite, SuitePrompt

    for name, value in (("random prompts", n), ("words per random prompt", words)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{name} must be a whole number of at least 1, got {value!r}: give a positive count")
    prompts = tuple(SuitePrompt(text, FIRST_SEED + i) for i, text in enumerate(random_prompts(model, n, words)))
    return Suite(f"random:{words}-words", suite.concepts, suite.judge, (PromptSet(SET, "target", prompts),),
                 "random", "random")


def base_rate(metrics: dict) -> tuple[float, list[float], int]:
    """(rate, its Wilson 95% interval, n) of one variant's metrics in a random-prompt run."""
    return metrics["target_rate"][SET], metrics["target_rate_ci"][SET], metrics["target_rate_n"][SET]
