"""What every attack shares: the attacked model in its two states, generation and judging, the
result of one attack on one prompt, frozen weights while an attack optimises its tokens, and an Adam whose
rows are prompts (a batch of prompts optimised as one tensor, each row moving as it would alone).

Attacks take a batch of prompts and one seeded generator per prompt: every random draw of a prompt's attack
comes from its own generator, so what it finds does not depend on the batch it sits in."""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..evaluation.cache import quantize
from ..evaluation.runner import Settings, Variant
from ..evaluation.suites import SuitePrompt
from ..model import Model
from .tokens import attack_vocabulary


@dataclass
class Found:
    """An attack's answer for one prompt: the adversarial prompt text (replayable), its token ids when it
    is a hard prompt, and the embedding when the attack is continuous (then text only describes it)."""
    text: str
    ids: list[int] | None = None
    embedding: torch.Tensor | None = None
    loss: float | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class AttackContext:
    """The attacked model (model with the erased variant's deltas; a model trained without the concept has
    none) and the original it is measured against: reference when given (an oracle is attacked against the
    unedited testbed), else the same model without the deltas."""
    model: Model
    erased: Variant
    judge: object
    concepts: tuple[str, ...]
    settings: Settings
    vocab: torch.Tensor = None
    reference: Model | None = None

    def __post_init__(self):
        if self.vocab is None:
            self.vocab = attack_vocabulary(self.model)

    @property
    def original(self) -> Model:
        """The model whose images show the concept: the reference, else the attacked model without deltas
        (use it outside erased_model())."""
        return self.model if self.reference is None else self.reference

    @contextmanager
    def erased_model(self):
        with self.erased.applied(self.model):
            yield self.model

    @torch.no_grad()
    def generate(self, texts: list[str], seeds: list[int], embeddings: torch.Tensor | None = None,
                 guidance: float | None = None, model: Model | None = None) -> torch.Tensor:
        """Images (8-bit round-tripped, as they would be stored) from the model's current weights (the
        attacked model unless another is given)."""
        m, s = model or self.model, self.settings
        guidance = s.guidance if guidance is None else guidance
        if embeddings is None:
            images = m.sample(texts, seeds, steps=s.steps, guidance=guidance, negative_prompt=s.negative_prompt,
                              batch_size=s.batch_size, progress=False, size=s.size)
            return quantize(images)
        uncond = m.unconditional(s.negative_prompt)
        m.timesteps(s.steps)  # the initial noise's scale is the schedule's first sigma
        latents = m.denoise(m.initial_noise(seeds, s.size), embeddings.to(m.device, m.dtype), uncond, s.steps, guidance)
        return quantize(m.decode(latents))

    def generate_for(self, prompts: list[SuitePrompt], texts: list[str],
                     embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """Images of texts (or embeddings, one row each) at each prompt's seed and guidance, batched by
        guidance scale, in the order given."""
        images: list = [None] * len(prompts)
        guidance_of = [self.settings.for_prompt(p)["guidance"] for p in prompts]
        for guidance in sorted(set(guidance_of)):
            rows = [i for i, g in enumerate(guidance_of) if g == guidance]
            emb = None if embeddings is None else embeddings[rows]
            out = self.generate([texts[i] for i in rows], [prompts[i].seed for i in rows], emb, guidance)
            for i, image in zip(rows, out):
                images[i] = image
        return torch.stack(images)

    def flags(self, images: torch.Tensor, prompts: list[SuitePrompt]) -> list[bool]:
        scores = self.judge.scores(images)
        out = []
        for i, p in enumerate(prompts):
            wanted = [c for c in self.concepts if p.values and c in p.values.values()] or list(self.concepts)
            out.append(any(float(scores[c][i]) > self.judge.threshold for c in wanted))
        return out


@contextmanager
def frozen(model: Model):
    """No parameter gradients while attacks optimise their own tensors (restored afterwards): the denoiser's
    and every text encoder's."""
    params = [p for part in model.components().values() for p in part.parameters()]
    before = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, before):
            p.requires_grad_(flag)


def seeded(seed: int, index: int) -> torch.Generator:
    """The generator of one prompt's attack: the same prompt index, the same attack, resumed or not."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(index))


def randint(gen: torch.Generator, high: int) -> int:
    return int(torch.randint(0, high, (1,), generator=gen))


class RowAdam:
    """Adam (weight decay added to the gradient, as torch.optim.Adam) or AdamW (decoupled weight decay) on
    a tensor whose first axis is the prompt. Every operation is elementwise, so a prompt's rows follow the
    same path in any batch; keep(rows) drops the rows of prompts that finished."""

    def __init__(self, param: torch.Tensor, lr: float, weight_decay: float = 0.0, decoupled: bool = False,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.param, self.lr, self.weight_decay, self.decoupled = param, lr, weight_decay, decoupled
        self.betas, self.eps, self.steps = betas, eps, 0
        self.m, self.v = torch.zeros_like(param), torch.zeros_like(param)

    @torch.no_grad()
    def step(self, grad: torch.Tensor) -> None:
        self.steps += 1
        b1, b2 = self.betas
        p = self.param
        if self.weight_decay and self.decoupled:
            p.mul_(1 - self.lr * self.weight_decay)
        elif self.weight_decay:
            grad = grad + self.weight_decay * p
        self.m.mul_(b1).add_(grad, alpha=1 - b1)
        self.v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (self.v.sqrt() / math.sqrt(1 - b2 ** self.steps)).add_(self.eps)
        p.addcdiv_(self.m, denom, value=-self.lr / (1 - b1 ** self.steps))

    def keep(self, rows: torch.Tensor) -> None:
        self.param, self.m, self.v = self.param[rows], self.m[rows], self.v[rows]
