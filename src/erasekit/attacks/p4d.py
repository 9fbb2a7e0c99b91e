"""P4D (Prompting4Debugging): needs the original and the erased model. Soft token embeddings are
optimised so the erased model's prediction under them matches the original model's prediction under the
original prompt, on latents of the original model's own sampling trajectory; every step the soft
embeddings are projected to their nearest vocabulary tokens and the forward pass uses the projection
(straight-through, as PEZ does), so the result is a hard prompt.

P4D-N: N free tokens replace the prompt. P4D-K: one free token inserted after every K prompt tokens (a prompt
shorter than K tokens gets one at its end).
It is run only on "ideal" prompts: the original model shows the concept and the erased one does not.

The public code (joycenerd/P4D, prompt_optimization/optimize_n.py) runs all 3000 iterations; every 50 it
generates with the erased model and keeps the prompt whose image is closest in CLIP space to the target
image. It does not stop when the judge flags an image, so neither does this one (it returns the last
projection; the CLIP-based choice is not reproduced). A batch of prompts is one soft tensor: one UNet
forward and backward per step over every prompt's latent, each at its own drawn trajectory step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError
from .common import AttackContext, Found, RowAdam, frozen, randint
from .tokens import content_ids, embedding_table, encode_ids, ids_to_text, slot_embeddings, slot_prompt


@dataclass
class P4DConfig:
    variant: str = "n"  # "n": N free tokens; "k": a free token after every K prompt tokens
    n_tokens: int = 16
    every_k: int = 3
    iterations: int = 3000  # P4D's own configs (configs/*_optmz_config.json): iter 3000, AdamW lr 0.1,
    lr: float = 0.1  # weight decay 0.1, prompt_len 16, every_k 3
    weight_decay: float = 0.1
    seed: int = 0

    def __post_init__(self):
        if self.iterations < 1:
            raise UserError("P4D needs iterations >= 1: give a positive count")


TESTBED = {"iterations": 200}  # not yet shown to match 3000 (docs/METHODS.md, "Testbed settings")


def slot_layout(content: list[int], cfg: P4DConfig) -> list[int | None]:
    if cfg.variant == "n":
        return [None] * cfg.n_tokens
    pieces: list[int | None] = []
    for i, tok in enumerate(content):
        pieces.append(tok)
        if (i + 1) % cfg.every_k == 0:
            pieces.append(None)
    return pieces if None in pieces else pieces + [None]  # shorter than K tokens: one free token at its end


@torch.no_grad()
def original_trajectories(ctx: AttackContext, prompts: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t (S, B, ...), t (S,), the original model's conditional output (S, B, ...)) at every step of its
    own guided trajectory (the run's sampler) for each prompt, all prompts denoised as one batch."""
    m, s = ctx.original, ctx.settings
    emb = m.encode([p.text for p in prompts]).cond
    uncond = m.unconditional(s.negative_prompt)
    m.timesteps(s.steps)  # before the noise: its scale is the schedule's first sigma
    latents = m.initial_noise([p.seed for p in prompts], s.size)
    xs, ts, outs = [], [], []
    for t in m.schedule_for(s.steps, latents):  # (FLUX: shifted for the latents' size)
        x_in = m.scale_input(latents, t)  # the input the denoiser sees (LMS scales it)
        xs.append(x_in.clone())
        ts.append(t.reshape(1))
        outs.append(m.raw(x_in, t, emb).float())
        latents = m.scheduler.step(m.guided(x_in, t, emb, s.guidance, uncond), t, latents).prev_sample
    return torch.stack(xs), torch.cat(ts), torch.stack(outs)


def nearest(soft: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """Index of each soft embedding's nearest word by cosine similarity."""
    a = torch.nn.functional.normalize(soft, dim=-1)
    b = torch.nn.functional.normalize(words, dim=-1)
    return (a @ b.T).argmax(dim=-1)


def attack(ctx: AttackContext, prompts: list, cfg: P4DConfig, gens: list[torch.Generator]) -> list[Found]:
    model = ctx.model
    xs, ts, targets = original_trajectories(ctx, prompts)
    sps = [slot_prompt(model, slot_layout(content_ids(model, p.text), cfg)) for p in prompts]
    bounds = torch.tensor([0] + [len(sp.slots) for sp in sps]).cumsum(0).tolist()  # prompt i: rows [b_i, b_i+1)
    table = embedding_table(model).weight
    vocab = ctx.vocab.to(table.device)
    words = table[vocab].detach().float()
    start = torch.cat([torch.randint(0, len(vocab), (len(sp.slots),), generator=g) for sp, g in zip(sps, gens)])
    opt = RowAdam(words[start.to(table.device)].clone(), cfg.lr, cfg.weight_decay, decoupled=True)
    masks = torch.stack([sp.mask for sp in sps])
    rows = torch.arange(len(prompts))
    losses = []
    with ctx.erased_model(), frozen(model):
        for _ in range(cfg.iterations):
            step = torch.tensor([randint(g, len(ts)) for g in gens])
            x_t, t, target = xs[step, rows], ts[step], targets[step, rows]
            soft = opt.param.detach().requires_grad_()
            hard = nearest(soft.detach(), words)
            through = soft + (words[hard] - soft).detach()
            ids = torch.cat([sp.with_tokens(vocab[hard[a:b]]) for sp, a, b in zip(sps, bounds, bounds[1:])])
            # the first encoder reads the soft tokens (straight through); any other reads the hard ones
            emb = encode_ids(model, ids, masks, lambda table, k, through=through: None if k else torch.cat(
                [slot_embeddings(table, sp, through[a:b][None]) for sp, a, b in zip(sps, bounds, bounds[1:])]))
            per_prompt = (model.raw(x_t, t, emb).float() - target).pow(2).flatten(1).mean(dim=1)
            losses.append(per_prompt.detach().cpu())
            grad, = torch.autograd.grad(per_prompt.sum(), [soft])
            opt.step(grad)
    hard = nearest(opt.param, words)
    losses = torch.stack(losses)  # (iterations, prompts)
    tail = losses[-max(1, len(losses) // 10):].mean(dim=0)
    out = []
    for i, (sp, a, b) in enumerate(zip(sps, bounds, bounds[1:])):
        ids = sp.with_tokens(vocab[hard[a:b]].cpu())[0]
        out.append(Found(ids_to_text(model, ids), ids=ids.tolist(), loss=float(tail[i]),
                         extra={"variant": f"p4d-{cfg.variant}", "first_loss": float(losses[0, i])}))
    return out
