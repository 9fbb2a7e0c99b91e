"""UnlearnDiffAtk: white-box on the erased model. A reference image of the concept (the original model's,
same prompt and seed) is noised at random timesteps, and K prefix tokens, relaxed to points of the
probability simplex over the vocabulary, are optimised so the erased model denoises it back; the result
is discretised (argmax per slot) into a hard prompt.

The loss is the denoising error in the model's own prediction type: epsilon for epsilon models (the
published form); x0 or v for models that predict those (eps error of an x0 model explodes at small t).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError
from .common import AttackContext, Found, frozen, native_target, noised, randint
from .tokens import content_ids, embedding_table, encode_ids, ids_to_text, slot_embeddings, slot_prompt


@dataclass
class UnlearnDiffConfig:
    prefix_tokens: int = 5
    iterations: int = 40
    lr: float = 0.01
    seed: int = 0
    # "uniform": every token starts at 1/V and the gradient picks the prefix; "random": a random one-hot,
    # which 40 steps of lr 0.01 rarely move (on the testbed: ASR 0.00 against UCE on circle, 8 prompts)
    init: str = "uniform"

    def __post_init__(self):
        if self.init not in ("uniform", "random"):
            raise UserError(f"unknown UnlearnDiffAtk init {self.init!r}: use 'uniform' or 'random'")


TESTBED: dict = {}  # the published settings are already small


def project_simplex(z: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row onto the probability simplex."""
    u, _ = torch.sort(z, dim=1, descending=True)
    css = u.cumsum(dim=1) - 1
    k = torch.arange(1, z.shape[1] + 1, device=z.device, dtype=z.dtype)
    cond = u - css / k > 0
    rho = cond.float().cumsum(dim=1).argmax(dim=1, keepdim=True)
    theta = css.gather(1, rho) / (rho + 1).to(z.dtype)
    return (z - theta).clamp(min=0)


def attack(ctx: AttackContext, prompt, cfg: UnlearnDiffConfig, gen: torch.Generator) -> Found:
    model = ctx.model
    x0 = ctx.original.sample([prompt.text], [prompt.seed], steps=ctx.settings.steps,
                             guidance=ctx.settings.guidance, progress=False,
                             output="latents").float()  # the original model's image of the concept
    sp = slot_prompt(model, [None] * cfg.prefix_tokens + content_ids(model, prompt.text))
    table = embedding_table(model).weight
    vocab = ctx.vocab.to(table.device)
    words = table[vocab].detach().float()
    if cfg.init == "uniform":
        z = torch.full((cfg.prefix_tokens, len(vocab)), 1.0 / len(vocab), device=table.device).requires_grad_()
    else:
        start = torch.randint(0, len(vocab), (cfg.prefix_tokens,), generator=gen).to(table.device)
        z = torch.nn.functional.one_hot(start, len(vocab)).float().requires_grad_()
    opt = torch.optim.Adam([z], lr=cfg.lr)
    losses = []
    with ctx.erased_model(), frozen(model):
        for _ in range(cfg.iterations):
            t = torch.tensor([randint(gen, model.scheduler.config.num_train_timesteps)], device=model.device)
            noise = torch.randn(x0.shape, generator=gen).to(model.device)
            x_t = noised(model, x0, noise, t)
            emb = encode_ids(model, sp.ids[None], sp.mask[None], slot_embeddings(model, sp, (z @ words)[None]))
            loss = torch.nn.functional.mse_loss(model.raw(x_t, t, emb).float(), native_target(model, x0, noise, t))
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                z.copy_(project_simplex(z))
            losses.append(float(loss.detach()))
    tokens = vocab[z.detach().argmax(dim=1)].cpu()
    ids = sp.with_tokens(tokens)[0]
    return Found(ids_to_text(model, ids), ids=ids.tolist(), loss=losses[-1],
                 extra={"first_loss": losses[0], "prefix": model.tokenizer.decode(tokens.tolist())})
