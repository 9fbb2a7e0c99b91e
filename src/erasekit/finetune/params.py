"""Choosing the denoiser's trainable parameters by name, and a frozen copy of them for the teacher."""

from __future__ import annotations

import re
from contextlib import contextmanager

import torch

from ..errors import UserError
from ..model import Model, guidance_batch, split_key

# A pattern starting with TEXT chooses among the text encoders' parameters, named by delta key
# ("text_encoder.<name>", "text_encoder_2.<name>"); every other pattern among the denoiser's bare names.
TEXT = r"^text_encoder"
# ESD's parameter sets and TRCE stage 2's, as regular expressions over the UNet's parameter names, and
# AdvUnlearn's: its public code's text_encoder_full, every transformer layer's weights of the text encoder
# (CLIP's encoder.layers.N., BERT's encoder.layer.N.), layer norms and token/position embeddings left out.
PARAMETER_SETS = {
    "esd-x": (r"attn2\.",),
    "esd-x-strict": (r"attn2\.to_[kv]\.",),
    "esd-u": (r"^(?!.*attn2\.)",),
    "esd-all": (r".",),
    "trce": (r"attn1\.", r"attn2\.to_q\."),
    "text-encoder": (TEXT + r"(_2)?\.(.*\.)?encoder\.layers?\.\d+\.(?!.*(layer_norm|LayerNorm))",),
}
# Sets that, as ESD's public code chooses them (rohitgandikota/erasing esd_sd.py get_esd_trainable_parameters),
# take only the weights and biases of the denoiser's Linear and Conv2d modules: no norm layer is trained.
LAYERS_ONLY = frozenset({"esd-x", "esd-x-strict", "esd-u", "esd-all"})
LAYER_KINDS = (torch.nn.Linear, torch.nn.Conv2d)


def select(model: Model, patterns: tuple[str, ...] | str) -> dict[str, torch.nn.Parameter]:
    """Parameters whose names match any pattern (a set name from PARAMETER_SETS or regexes): the denoiser's
    by bare name, and the text encoders' by delta key for patterns that start with TEXT."""
    layers_only = isinstance(patterns, str) and patterns in LAYERS_ONLY
    if isinstance(patterns, str):
        if patterns not in PARAMETER_SETS:
            raise UserError(f"unknown parameter set {patterns!r}: choose one of {', '.join(PARAMETER_SETS)}")
        patterns = PARAMETER_SETS[patterns]
    denoiser = [re.compile(p) for p in patterns if not p.startswith(TEXT)]
    text = [re.compile(p) for p in patterns if p.startswith(TEXT)]
    allowed = layer_parameters(model.unet) if layers_only else None
    chosen = {n: p for n, p in model.unet.named_parameters()
              if any(c.search(n) for c in denoiser) and (allowed is None or n in allowed)}
    for component, module in model.components().items():
        if component != "unet" and text:
            chosen.update({f"{component}.{n}": p for n, p in module.named_parameters()
                           if any(c.search(f"{component}.{n}") for c in text)})
    if not chosen:
        raise UserError(f"no parameter matches {list(patterns)}: check the parameter names")
    return chosen


def layer_parameters(module: torch.nn.Module) -> set[str]:
    """Names of the parameters of module's Linear and Conv2d layers (LAYER_KINDS; diffusers' LoRA-compatible
    variants subclass them)."""
    return {f"{name}.{p}" if name else p for name, m in module.named_modules() if isinstance(m, LAYER_KINDS)
            for p, _ in m.named_parameters(recurse=False)}


@contextmanager
def only_these_trainable(model: Model, named: dict[str, torch.nn.Parameter]):
    """Every other denoiser and text-encoder parameter stops collecting gradients inside the block
    (a full-size gradient for Stable Diffusion's 860M frozen parameters would be 3.4 GB)."""
    keep = {id(p) for p in named.values()}
    others = [p for part in model.components().values() for p in part.parameters() if id(p) not in keep]
    before = [p.requires_grad for p in others]
    for p in others:
        p.requires_grad_(False)
        p.grad = None
    try:
        yield
    finally:
        for p, flag in zip(others, before):
            p.requires_grad_(flag)


class Frozen:
    """The denoiser as it was before training, without a second copy of it: the trained parameters'
    starting values are kept and swapped in for the call (torch.func.functional_call). These values are
    the run's one copy of the starting weights: the loop restores the model from them
    (`loop.train_and_restore`, after which the model's parameters hold these very tensors again), and
    another teacher built with `with_fixed` shares them."""

    def __init__(self, model: Model, named: dict[str, torch.nn.Parameter],
                 fixed: dict[str, torch.Tensor] | None = None):
        """fixed: other denoiser tensors (bare UNet names) to hold other values than the model's in the
        call, e.g. the original K/V an earlier closed-form stage replaced."""
        self.model = model
        self.start = {k: v.detach().clone() for k, v in named.items()}
        self.values = _denoiser_only(self.start)
        for k, v in (fixed or {}).items():
            self.values[k] = v.detach().to(model.device, model.dtype)

    def with_fixed(self, fixed: dict[str, torch.Tensor]) -> Frozen:
        """Another teacher with the same starting values (shared, not copied) and fixed tensors on top."""
        other = Frozen.__new__(Frozen)
        other.model, other.start = self.model, self.start
        other.values = {**_denoiser_only(self.start), **{k: v.detach().to(self.model.device, self.model.dtype)
                                         for k, v in fixed.items()}}
        return other

    @torch.no_grad()
    def raw(self, x_t: torch.Tensor, t, emb: torch.Tensor) -> torch.Tensor:
        return self.model.raw(x_t, t, emb, params=self.values)

    @torch.no_grad()
    def pair(self, x_t, t, emb, uncond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(unconditional, conditional) raw outputs from one batched call, as a pipeline's guidance does."""
        return self.raw(*guidance_batch(x_t, t, emb, uncond)).chunk(2)

    @torch.no_grad()
    def guided(self, x_t, t, emb, guidance: float, uncond: torch.Tensor) -> torch.Tensor:
        u, c = self.pair(x_t, t, emb, uncond)
        return u + guidance * (c - u)

    @torch.no_grad()
    def rollout(self, emb: torch.Tensor, uncond: torch.Tensor, seeds_noise: torch.Tensor, steps: int, to_step: int,
                guidance: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen model's own DDIM trajectory from seeds_noise for to_step of steps steps:
        (x_t, t) where t is the timestep the next step would denoise."""
        m = self.model
        timesteps = m.timesteps(steps)
        latents = seeds_noise
        for t in timesteps[:to_step]:
            latents = m.scheduler.step(self.guided(latents, t, emb, guidance, uncond), t, latents).prev_sample
        return latents, timesteps[to_step]


def _denoiser_only(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The denoiser's tensors of a name -> tensor map: a text encoder's starting values are the caller's to use
    (it encodes the teacher's prompts before training), the denoiser call takes only its own."""
    return {k: v for k, v in values.items() if split_key(k)[0] == "unet"}
