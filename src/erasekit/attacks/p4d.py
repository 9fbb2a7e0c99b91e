"""P4D (Prompting4Debugging): needs the original and the erased model. Soft token embeddings are
optimised so the erased model's prediction under them matches the original model's prediction under the
original prompt, on latents of the original model's own sampling trajectory; every step the soft
embeddings are projected to their nearest vocabulary tokens and the forward pass uses the projection
(straight-through, as PEZ does), so the result is a hard prompt.

P4D-N: N free tokens replace the prompt. P4D-K: one free token inserted after every K prompt tokens.
It is run only on "ideal" prompts: the original model shows the concept and the erased one does not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .common import AttackContext, Found, frozen, randint
from .tokens import content_ids, embedding_table, encode_ids, ids_to_text, slot_embeddings, slot_prompt


@dataclass
class P4DConfig:
    variant: str = "n"  # "n": N free tokens; "k": a free token after every K prompt tokens
    n_tokens: int = 16
    every_k: int = 3
    iterations: int = 3000  # optimiser settings as in PEZ (hard-prompt projection), which P4D builds on;
    lr: float = 0.1  # the iteration count is erasekit's choice, not checked against P4D's own code
    weight_decay: float = 0.1
    seed: int = 0


TESTBED = {"iterations": 200}


def slot_layout(content: list[int], cfg: P4DConfig) -> list[int | None]:
    if cfg.variant == "n":
        return [None] * cfg.n_tokens
    pieces: list[int | None] = []
    for i, tok in enumerate(content):
        pieces.append(tok)
        if (i + 1) % cfg.every_k == 0:
            pieces.append(None)
    return pieces


@torch.no_grad()
def original_trajectory(ctx: AttackContext, prompt) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(x_t, t, original model's conditional output) at every step of its own guided DDIM trajectory."""
    m, s = ctx.original, ctx.settings
    emb = m.encode([prompt.text]).embeddings
    uncond = m.encode([s.negative_prompt]).embeddings
    latents = m.initial_noise([prompt.seed])
    out = []
    for t in m.timesteps(s.steps):
        out.append((latents.clone(), t.reshape(1), m.raw(latents, t, emb).float()))
        latents = m.scheduler.step(m.guided(latents, t, emb, s.guidance, uncond), t, latents).prev_sample
    return out


def nearest(soft: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """Index of each soft embedding's nearest word by cosine similarity."""
    a = torch.nn.functional.normalize(soft, dim=-1)
    b = torch.nn.functional.normalize(words, dim=-1)
    return (a @ b.T).argmax(dim=-1)


def attack(ctx: AttackContext, prompt, cfg: P4DConfig, gen: torch.Generator) -> Found:
    model = ctx.model
    trajectory = original_trajectory(ctx, prompt)
    sp = slot_prompt(model, slot_layout(content_ids(model, prompt.text), cfg))
    table = embedding_table(model).weight
    vocab = ctx.vocab.to(table.device)
    words = table[vocab].detach().float()
    start = torch.randint(0, len(vocab), (len(sp.slots),), generator=gen).to(table.device)
    soft = words[start].clone().requires_grad_()
    opt = torch.optim.AdamW([soft], lr=cfg.lr, weight_decay=cfg.weight_decay)
    losses = []
    with ctx.erased_model(), frozen(model):
        for _ in range(cfg.iterations):
            x_t, t, target = trajectory[randint(gen, len(trajectory))]
            hard = nearest(soft.detach(), words)
            through = soft + (words[hard] - soft).detach()
            embeds = slot_embeddings(model, sp, through[None])
            emb = encode_ids(model, sp.with_tokens(vocab[hard]), sp.mask[None], embeds)
            loss = torch.nn.functional.mse_loss(model.raw(x_t, t, emb).float(), target)
            losses.append(float(loss.detach()))
            opt.zero_grad()
            loss.backward()
            opt.step()
    hard = nearest(soft.detach(), words)
    ids = sp.with_tokens(vocab[hard].cpu())[0]
    tail = losses[-max(1, len(losses) // 10):]
    return Found(ids_to_text(model, ids), ids=ids.tolist(), loss=sum(tail) / len(tail),
                 extra={"variant": f"p4d-{cfg.variant}", "first_loss": losses[0]})
