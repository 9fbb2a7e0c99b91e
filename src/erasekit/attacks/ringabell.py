"""Ring-A-Bell: model-agnostic, it uses only the text encoder. The concept vector v is the mean
difference of the encoder's states between prompts with and without the concept; the target of a prompt
p is T = E(p) + eta * v, and a genetic search over K hard tokens minimises ||E(tokens) - T||^2.

`ringabell` is that faithful discrete search. `ringabell-continuous` skips the search and conditions the
model on T directly: a stronger, embedding-level attack that no text prompt can replay, reported under
its own name.

A batch of prompts is one population tensor (prompts x population x tokens): each generation's children of
every prompt are encoded in one text-encoder call; each prompt's selection, crossover and mutation draw
from its own generator, in the order a lone search would.
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


TESTBED = {"population": 32, "generations": 60}  # not yet shown to match 200 x 3000 (docs/METHODS.md)


def concept_pairs(ctx: AttackContext, suite, n: int) -> tuple[list[str], list[str]]:
    """Prompts with and without the concept, pair by pair: from a testbed suite (the same scene with
    the concept swapped for another value of its attribute) or a suite whose target and preservation
    sets are paired row by row (Ring-A-Bell's own CSV)."""
    if suite.layout == "testbed" and ctx.model.world is not None:
        return ctx.model.world.concept_pairs(suite.concepts, n)
    names = {s.name: s for s in suite.sets}
    if suite.layout == "ringabell" and "target" in names and "preservation" in names:
        return [p.text for p in names["target"].prompts], [p.text for p in names["preservation"].prompts]
    raise UserError(f"ringabell needs prompts with and without the concept: use a testbed suite or a Ring-A-Bell "
                    f"CSV (columns 'sensitive prompt' and 'normal prompt'), not {suite.name}")


@torch.no_grad()
def concept_vector(ctx: AttackContext, suite, cfg: RingABellConfig) -> torch.Tensor:
    with_c, without = concept_pairs(ctx, suite, cfg.pairs)
    return (ctx.model.encode(with_c).cond.float() - ctx.model.encode(without).cond.float()).mean(0)


def _tournament(dist: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    a = torch.randint(0, len(dist), (n,), generator=gen)
    b = torch.randint(0, len(dist), (n,), generator=gen)
    return torch.where(dist[a] <= dist[b], a, b)


def _children(pop: torch.Tensor, dist: torch.Tensor, n_child: int, vocab_size: int, cfg: RingABellConfig,
              gen: torch.Generator) -> torch.Tensor:
    """One prompt's n_child children: tournament parents, one-point crossover, one token resampled."""
    child = pop[_tournament(dist, n_child, gen)].clone()
    other = pop[_tournament(dist, n_child, gen)]
    cut = torch.randint(1, cfg.tokens, (n_child, 1), generator=gen) if cfg.tokens > 1 else torch.ones(n_child, 1)
    crossed = (torch.rand(n_child, 1, generator=gen) < cfg.crossover) & (torch.arange(cfg.tokens)[None] >= cut)
    child = torch.where(crossed, other, child)
    mutate = torch.rand(n_child, generator=gen) < cfg.mutation
    pos = torch.randint(0, cfg.tokens, (n_child,), generator=gen)
    new = torch.randint(0, vocab_size, (n_child,), generator=gen)
    child[mutate, pos[mutate]] = new[mutate]
    return child


@torch.no_grad()
def genetic_search_batch(ctx: AttackContext, targets: torch.Tensor, cfg: RingABellConfig,
                         gens: list[torch.Generator], chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(best token ids (B, L), their distances (B,)): for each target (B, L, d), K vocabulary tokens whose
    encoding is closest to it; the whole population of every prompt is encoded together."""
    model, vocab = ctx.model, ctx.vocab
    sp = slot_prompt(model, [None] * cfg.tokens)
    targets = targets.to(model.device).float()
    n = len(gens)

    def distance(pop: torch.Tensor) -> torch.Tensor:  # (B, P, K) -> (B, P)
        flat = sp.with_tokens(vocab[pop.reshape(-1, cfg.tokens)])
        owner = torch.arange(n).repeat_interleave(pop.shape[1]).to(model.device)
        out = []
        for a in range(0, len(flat), chunk):
            emb = encode_ids(model, flat[a:a + chunk], sp.mask[None]).float()
            out.append((emb - targets[owner[a:a + chunk]]).pow(2).mean(dim=(1, 2)).cpu())
        return torch.cat(out).view(n, -1)

    pop = torch.stack([torch.randint(0, len(vocab), (cfg.population, cfg.tokens), generator=g) for g in gens])
    dist = distance(pop)
    n_elite = max(1, int(cfg.elite * cfg.population))
    n_child = cfg.population - n_elite
    for _ in range(cfg.generations):
        order = dist.argsort(dim=1, stable=True)[:, :n_elite]
        elite, elite_dist = pop.gather(1, order[..., None].expand(-1, -1, cfg.tokens)), dist.gather(1, order)
        child = torch.stack([_children(pop[i], dist[i], n_child, len(vocab), cfg, g) for i, g in enumerate(gens)])
        pop = torch.cat([elite, child], dim=1)
        dist = torch.cat([elite_dist, distance(child)], dim=1)
    best = dist.argmin(dim=1)
    rows = torch.arange(n)
    return sp.with_tokens(vocab[pop[rows, best]]), dist[rows, best]


def genetic_search(ctx: AttackContext, target: torch.Tensor, cfg: RingABellConfig, gen: torch.Generator):
    """(best token ids (L,), its distance): the search for one target (L, d)."""
    ids, dist = genetic_search_batch(ctx, target[None], cfg, [gen])
    return ids[0], float(dist[0])


def _targets(ctx: AttackContext, prompts: list, cfg: RingABellConfig, vector: torch.Tensor) -> torch.Tensor:
    return ctx.model.encode([p.text for p in prompts]).cond.float() + cfg.eta * vector


def attack(ctx: AttackContext, prompts: list, cfg: RingABellConfig, gens: list[torch.Generator],
           vector: torch.Tensor) -> list[Found]:
    ids, dist = genetic_search_batch(ctx, _targets(ctx, prompts, cfg, vector), cfg, gens)
    return [Found(ids_to_text(ctx.model, row), ids=row.tolist(), loss=float(d)) for row, d in zip(ids, dist)]


def attack_continuous(ctx: AttackContext, prompts: list, cfg: RingABellConfig, gens: list[torch.Generator],
                      vector: torch.Tensor) -> list[Found]:
    targets = _targets(ctx, prompts, cfg, vector)
    return [Found(f"[embedding] E({p.text!r}) + {cfg.eta} * v", embedding=target[None], loss=0.0)
            for p, target in zip(prompts, targets)]
