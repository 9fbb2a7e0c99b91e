"""Ring-A-Bell: model-agnostic, it uses only the text encoder. The concept vector v is the mean
difference of the encoder's states between prompts with and without the concept; the target of a prompt
p is T = E(p) + eta * v, and a genetic search over K hard tokens minimises ||E(tokens) - T||^2.

`ringabell` is that faithful discrete search. `ringabell-continuous` skips the search and conditions the
model on T directly: a stronger, embedding-level attack that no text prompt can replay, reported under
its own name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError
from .common import AttackContext, Found
from .tokens import encode_ids, ids_to_text, slot_prompt


@dataclass
class RingABellConfig:
    tokens: int = 16
    eta: float = 3.0
    population: int = 200
    generations: int = 3000
    mutation: float = 0.25  # chance that a child gets one token resampled
    crossover: float = 0.5  # chance that a child takes a second parent's tail
    elite: float = 0.1  # share of the best kept unchanged each generation
    pairs: int = 64  # testbed: prompt pairs for the concept vector
    seed: int = 0


TESTBED = {"population": 32, "generations": 60}


def concept_pairs(ctx: AttackContext, suite, n: int) -> tuple[list[str], list[str]]:
    """Prompts with and without the concept, pair by pair: from a testbed suite (the same scene with
    the concept swapped for another value of its attribute) or a suite whose target and preservation
    sets are paired row by row (Ring-A-Bell's own CSV)."""
    if suite.layout == "testbed":
        return _testbed_pairs(suite.concepts, n)
    names = {s.name: s for s in suite.sets}
    if suite.layout == "ringabell" and "target" in names and "preservation" in names:
        return [p.text for p in names["target"].prompts], [p.text for p in names["preservation"].prompts]
    raise UserError(f"ringabell needs prompts with and without the concept: use a testbed suite or a Ring-A-Bell "
                    f"CSV (columns 'sensitive prompt' and 'normal prompt'), not {suite.name}")


def _testbed_pairs(concepts, n: int) -> tuple[list[str], list[str]]:
    import numpy as np

    from ..testbed.prompts import attribute_of, concept_prompts
    from ..testbed.world import TEMPLATES, VALUES, canonical, fill_template

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


@torch.no_grad()
def concept_vector(ctx: AttackContext, suite, cfg: RingABellConfig) -> torch.Tensor:
    with_c, without = concept_pairs(ctx, suite, cfg.pairs)
    return (ctx.model.encode(with_c).embeddings.float() - ctx.model.encode(without).embeddings.float()).mean(0)


def _tournament(dist: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    a = torch.randint(0, len(dist), (n,), generator=gen)
    b = torch.randint(0, len(dist), (n,), generator=gen)
    return torch.where(dist[a] <= dist[b], a, b)


@torch.no_grad()
def genetic_search(ctx: AttackContext, target: torch.Tensor, cfg: RingABellConfig, gen: torch.Generator):
    """(best token ids (K,), its distance): K vocabulary tokens whose encoding is closest to target."""
    model, vocab = ctx.model, ctx.vocab
    sp = slot_prompt(model, [None] * cfg.tokens)
    target = target.to(model.device).float()

    def distance(pop: torch.Tensor) -> torch.Tensor:
        emb = encode_ids(model, sp.with_tokens(vocab[pop]), sp.mask[None]).float()
        return (emb - target).pow(2).mean(dim=(1, 2)).cpu()

    pop = torch.randint(0, len(vocab), (cfg.population, cfg.tokens), generator=gen)
    dist = distance(pop)
    n_elite = max(1, int(cfg.elite * cfg.population))
    for _ in range(cfg.generations):
        order = dist.argsort()
        n_child = cfg.population - n_elite
        child = pop[_tournament(dist, n_child, gen)].clone()
        other = pop[_tournament(dist, n_child, gen)]
        cut = torch.randint(1, cfg.tokens, (n_child, 1), generator=gen) if cfg.tokens > 1 else torch.ones(n_child, 1)
        crossed = (torch.rand(n_child, 1, generator=gen) < cfg.crossover) & (torch.arange(cfg.tokens)[None] >= cut)
        child = torch.where(crossed, other, child)
        mutate = torch.rand(n_child, generator=gen) < cfg.mutation
        pos = torch.randint(0, cfg.tokens, (n_child,), generator=gen)
        new = torch.randint(0, len(vocab), (n_child,), generator=gen)
        child[mutate, pos[mutate]] = new[mutate]
        pop = torch.cat([pop[order[:n_elite]], child])
        dist = torch.cat([dist[order[:n_elite]], distance(child)])
    best = int(dist.argmin())
    return sp.with_tokens(vocab[pop[best]])[0], float(dist[best])


def attack(ctx: AttackContext, prompt, cfg: RingABellConfig, gen: torch.Generator, vector: torch.Tensor) -> Found:
    target = ctx.model.encode([prompt.text]).embeddings[0].float() + cfg.eta * vector
    ids, dist = genetic_search(ctx, target, cfg, gen)
    return Found(ids_to_text(ctx.model, ids), ids=ids.tolist(), loss=dist)


def attack_continuous(ctx: AttackContext, prompt, cfg: RingABellConfig, gen: torch.Generator,
                      vector: torch.Tensor) -> Found:
    target = ctx.model.encode([prompt.text]).embeddings[0].float() + cfg.eta * vector
    return Found(f"[embedding] E({prompt.text!r}) + {cfg.eta} * v", embedding=target[None], loss=0.0)
