"""ESD (erased stable diffusion). Each step: a random k of n sampler steps; the frozen original model is
rolled out to x_t with a target prompt (guidance g); the trained model's output for the prompt is pulled
toward the frozen model's negatively guided output:
    target = f(x_t, empty) - eta * (f(x_t, c) - f(x_t, empty))
The loss is taken in the model's own output type (epsilon for SD; x0 for the testbed): guidance is linear
in that output, so the target is the same prediction, and x0 models avoid epsilon's blow-up at small t.
The rollout uses the frozen model, and only k steps of it (not a full pipeline call per iteration).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..concepts import ConceptSpec
from ..delta import Delta
from ..model import Model
from .loop import LoopConfig, record, run, split_config
from .params import Frozen, only_these_trainable, select

TESTBED = {"steps": 150, "lr": 1e-3, "sampler_steps": 20}


@dataclass
class ESDConfig(LoopConfig):
    parameters: str = "esd-x"  # esd-x, esd-x-strict, esd-u, esd-all
    eta: float = 1.0  # negative guidance
    guidance: float = 3.0  # CFG of the rollout
    sampler_steps: int = 50  # n: the rollout's schedule length
    lr: float = 5e-5  # the newer public script: 5e-5 for 200 iterations (the original: 1e-5, 1000)


class ESDLoss:
    """The ESD objective over the spec's target prompts (one drawn per step)."""

    def __init__(self, model: Model, prompts: list[str], frozen: Frozen, cfg: ESDConfig):
        self.model, self.frozen, self.cfg = model, frozen, cfg
        self.cond = model.encode(prompts).embeddings.detach()
        self.uncond = model.encode([""]).embeddings.detach()

    def __call__(self, step: int, gen: torch.Generator):
        m, cfg = self.model, self.cfg
        i = int(torch.randint(0, len(self.cond), (1,), generator=gen))
        k = int(torch.randint(0, cfg.sampler_steps, (1,), generator=gen))
        noise = torch.randn(m.latent_shape, generator=gen)[None].to(m.device, m.dtype) * m.scheduler.init_noise_sigma
        c = self.cond[i:i + 1]
        x_t, t = self.frozen.rollout(c, self.uncond, noise, cfg.sampler_steps, k, cfg.guidance)
        e0, ec = self.frozen.pair(x_t, t, c, self.uncond)
        target = e0 - cfg.eta * (ec - e0)
        loss = torch.nn.functional.mse_loss(m.raw(x_t, t, c).float(), target.float())
        return loss, {"k": k}


def train_and_restore(model: Model, named: dict, loss_fn, cfg, describe: dict, extra=None) -> dict[str, torch.Tensor]:
    """Run the loop, then put the starting values back so a Delta can be made against them."""
    start = {k: v.detach().clone() for k, v in named.items()}
    try:
        with only_these_trainable(model, named):
            return run(model, named, loss_fn, split_config(cfg), describe, extra)
    finally:
        with torch.no_grad():
            for k, p in named.items():
                p.copy_(start[k])


def erase(model: Model, spec: ConceptSpec, cfg: ESDConfig | None = None, base_values: dict | None = None) -> Delta:
    """ESD on the model as it is now (after an earlier stage, when composed: base_values is unused)."""
    cfg = cfg or ESDConfig()
    named = select(model, cfg.parameters)
    prompts = [p.target for p in spec.pairs()]
    loss = ESDLoss(model, prompts, Frozen(model, named), cfg)
    config = {**{k: v for k, v in asdict(cfg).items() if k not in record(cfg)}, "loop": record(cfg),
              "spec": spec.to_dict()}
    new = train_and_restore(model, named, loss, cfg, {"method": "esd", "config": config})
    return Delta.from_changes(model, new, "esd", config, {"prompts": len(prompts), "tensors": len(new)})
