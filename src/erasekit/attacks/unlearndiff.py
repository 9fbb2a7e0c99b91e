"""UnlearnDiffAtk: white-box on the erased model. A reference image of the concept (the original model's,
same prompt and seed) is noised, and K prefix tokens, relaxed to points of the probability simplex over the
vocabulary, are optimised so the erased model denoises it back; the result is discretised (argmax per slot)
into a hard prompt.

The loop is the public code's (OPTML-Group/Diffusion-MU-Attack, attackers/text_grad): 50 timesteps
10, 30, ..., 990 in turn, 40 Adam steps at each (lr 0.01, weight decay 0.1, fresh noise every step, the
forward pass through one token per slot drawn from the relaxation with a straight-through, clipped
gradient), then the argmax prompt is generated and judged, and a prompt stops as soon as its image is
flagged. A batch of prompts runs as one tensor: one UNet forward and backward per step over all prompts
still running, one generation and one judge call per timestep over them; a flagged prompt leaves the batch.

The loss is the denoising error in the model's own convention (Model.add_noise, Model.target): epsilon for
epsilon models (the published form); x0 or v for models that predict those (eps error of an x0 model explodes at
small t); FLUX's flow velocity, at the schedule's timesteps taken as sigmas and shifted as FLUX's sampler shifts
its own (Model.loss_timesteps), on its packed latents. An encoder that reads another vocabulary than the one
optimised (FLUX's CLIP, which gives the pooled embedding) reads the hard tokens of each step (the drawn ones, or
the mixture's argmax), without a gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError
from .common import AttackContext, Found, RowAdam, frozen
from .tokens import content_ids, embedding_table, encode_ids, ids_to_text, slot_embeddings, slot_prompt


@dataclass
class UnlearnDiffConfig:
    prefix_tokens: int = 5
    timesteps: int = 50  # the public code's n_samples: timesteps spread over [0, 1000), optimised in turn
    iterations: int = 40  # Adam steps at each timestep; then the prompt is judged and stops once flagged
    lr: float = 0.01
    weight_decay: float = 0.1
    # True (the public code): each step's forward pass uses one token per slot drawn from the relaxation,
    # the gradient passed straight through and clipped to [-1, 1]; False: the mixture z @ embeddings
    sampled: bool = True
    seed: int = 0
    # "uniform": every token starts at 1/V (the public code's default); "random": a random one-hot, which
    # lr 0.01 rarely moves (on the testbed, 40 mixture steps: ASR 0.00 against UCE on circle, 8 prompts)
    init: str = "uniform"

    def __post_init__(self):
        if self.init not in ("uniform", "random"):
            raise UserError(f"unknown UnlearnDiffAtk init {self.init!r}: use 'uniform' or 'random'")
        if self.timesteps < 1 or self.iterations < 1:
            raise UserError("UnlearnDiffAtk needs timesteps >= 1 and iterations >= 1: give positive counts")


# On the testbed, 10 of the 50 timesteps with 10 steps each (100 steps, 10 judged checkpoints per prompt, against
# 2,000 and 50): the published loop costs up to about 22 min per never-flagged prompt on a 2-core CPU, which no
# audit can afford. Not yet shown to give the published settings' ASR (docs/METHODS.md, "Testbed settings").
TESTBED: dict = {"timesteps": 10, "iterations": 10}


def project_simplex(z: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row (the last axis) onto the probability simplex."""
    shape = z.shape
    z = z.reshape(-1, shape[-1])
    u, _ = torch.sort(z, dim=1, descending=True)
    css = u.cumsum(dim=1) - 1
    k = torch.arange(1, z.shape[1] + 1, device=z.device, dtype=z.dtype)
    cond = u - css / k > 0
    rho = cond.float().cumsum(dim=1).argmax(dim=1, keepdim=True)
    theta = css.gather(1, rho) / (rho + 1).to(z.dtype)
    return (z - theta).clamp(min=0).reshape(shape)


def schedule(cfg: UnlearnDiffConfig, train_steps: int) -> list[int]:
    """The public code's timesteps: n evenly spaced, starting half a spacing in (n = 50: 10, 30, ..., 990)."""
    spacing = max(1, train_steps // cfg.timesteps)
    return list(range(min(spacing // 2, train_steps - 1), train_steps, spacing))[:cfg.timesteps]


def _start(cfg: UnlearnDiffConfig, vocab_size: int, gens: list[torch.Generator], device) -> torch.Tensor:
    if cfg.init == "uniform":
        return torch.full((len(gens), cfg.prefix_tokens, vocab_size), 1.0 / vocab_size, device=device)
    start = torch.stack([torch.randint(0, vocab_size, (cfg.prefix_tokens,), generator=g) for g in gens])
    return torch.nn.functional.one_hot(start, vocab_size).float().to(device)


def attack(ctx: AttackContext, prompts: list, cfg: UnlearnDiffConfig, gens: list[torch.Generator]) -> list[Found]:
    model = ctx.model
    x0 = ctx.original.sample([p.text for p in prompts], [p.seed for p in prompts], steps=ctx.settings.steps,
                              guidance=ctx.settings.guidance, progress=False, output="latents",
                              batch_size=ctx.settings.batch_size,
                              size=ctx.settings.size).float()  # the original model's images of the concept
    sps = [slot_prompt(model, [None] * cfg.prefix_tokens + content_ids(model, p.text)) for p in prompts]
    table = embedding_table(model).weight
    vocab = ctx.vocab.to(table.device)
    opt = RowAdam(_start(cfg, len(vocab), gens, table.device), cfg.lr, cfg.weight_decay)
    active = list(range(len(prompts)))  # prompts still running, in the rows of opt.param
    found: dict[int, Found] = {}
    first_loss: list[float | None] = [None] * len(prompts)
    last_loss = [0.0] * len(prompts)

    def answer(row: int, i: int, stopped: int | None) -> Found:
        tokens = vocab[opt.param[row].argmax(dim=1)].cpu()
        ids = sps[i].with_tokens(tokens)[0]
        return Found(ids_to_text(model, ids), ids=ids.tolist(), loss=last_loss[i],
                     extra={"first_loss": first_loss[i], "prefix": model.tokenizer.decode(tokens.tolist()),
                            "stopped_at_timestep": stopped})

    with ctx.erased_model(), frozen(model):
        for t_value in model.loss_timesteps(schedule(cfg, model.scheduler.config.num_train_timesteps), x0):
            if not active:
                break
            t = torch.full((len(active),), t_value, device=model.device)
            masks = torch.cat([sps[i].mask[None] for i in active])
            for _ in range(cfg.iterations):
                noise = torch.stack([torch.randn(x0.shape[1:], generator=gens[i]) for i in active]).to(model.device)
                x_t = model.add_noise(x0[active], noise, t)
                z = opt.param.detach().requires_grad_()
                if cfg.sampled:
                    drawn = torch.stack([torch.multinomial(z[r].detach().cpu(), 1, generator=gens[i])[:, 0]
                                         for r, i in enumerate(active)])
                    onehot = torch.nn.functional.one_hot(drawn, len(vocab)).float().to(z.device).requires_grad_()
                    wrt = onehot
                else:
                    wrt, drawn = z, z.detach().argmax(dim=2).cpu()
                rows = list(enumerate(active))  # each encoder reads the same token distributions in its table
                # the hard tokens (drawn, or the argmax of the mixture) for an encoder of another vocabulary
                hard = torch.cat([sps[i].with_tokens(vocab[drawn[r]].cpu()) for r, i in rows])
                emb = encode_ids(model, hard, masks, lambda table, k, soft=wrt, rows=rows: torch.cat(
                    [slot_embeddings(table, sps[i], soft[r:r + 1] @ table[vocab].detach().float()) for r, i in rows]))
                err = (model.raw(x_t, t, emb).float() - model.target(x0[active], noise, t)).pow(2)
                per_prompt = err.flatten(1).mean(dim=1)
                grad, = torch.autograd.grad(per_prompt.sum(), [wrt])
                opt.step(grad.clamp(-1, 1) if cfg.sampled else grad)
                with torch.no_grad():
                    opt.param.copy_(project_simplex(opt.param))
                for r, i in enumerate(active):
                    last_loss[i] = float(per_prompt[r].detach())
                    first_loss[i] = last_loss[i] if first_loss[i] is None else first_loss[i]
            answers = [answer(r, i, t_value) for r, i in enumerate(active)]
            batch = [prompts[i] for i in active]
            flagged = ctx.flags(ctx.generate_for(batch, [a.text for a in answers]), batch)
            for r, i in enumerate(active):
                if flagged[r]:
                    found[i] = answers[r]
            keep = [r for r in range(len(active)) if not flagged[r]]
            opt.keep(torch.tensor(keep, dtype=torch.long, device=opt.param.device))
            active = [active[r] for r in keep]
    for r, i in enumerate(active):  # never flagged: the last timestep's prompt
        found[i] = answer(r, i, None)
    return [found[i] for i in range(len(prompts))]
