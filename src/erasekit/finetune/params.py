"""Choosing the denoiser's trainable parameters by name, and a frozen copy of them for the teacher."""

from __future__ import annotations

import re
from contextlib import contextmanager, nullcontext

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
# The same roles on FLUX's transformer (joint attention, no separate cross-attention): the dual-stream blocks'
# text-stream attention projections read the prompt as ESD-x's attn2 does (add_q/k/v_proj, to_add_out; strict:
# the text K/V add_k_proj/add_v_proj); esd-u is everything else, attention every attention projection of the
# dual-stream and single-stream blocks, eraseanything EraseAnything's LoRA targets (train_flux_lora.py:
# attn.add_k_proj, attn.add_q_proj). text-encoder: the CLIP encoder's layers and T5's blocks (T5's layer norms and
# relative position bias left out), for AdvUnlearn.
FLUX_TEXT_STREAM = r"^transformer_blocks\.\d+\.attn\.(add_[qkv]_proj|to_add_out)\."
FLUX_PARAMETER_SETS = {
    "esd-x": (FLUX_TEXT_STREAM,),
    "esd-x-strict": (r"^transformer_blocks\.\d+\.attn\.add_[kv]_proj\.",),
    "esd-u": (r"^(?!transformer_blocks\.\d+\.attn\.(add_[qkv]_proj|to_add_out)\.)",),
    "esd-all": (r".",),
    "attention": (r"^(single_)?transformer_blocks\.\d+\.attn\.(to_[qkv]|to_out\.0|add_[qkv]_proj|to_add_out)\.",),
    "eraseanything": (r"^transformer_blocks\.\d+\.attn\.add_[kq]_proj\.",),
    "text-encoder": (TEXT + r"(_2)?\.(.*\.)?encoder\.(layers?|block)\.\d+\."
                     r"(?!.*(layer_norm|LayerNorm|relative_attention_bias))",),
}
TABLES = {"unet": PARAMETER_SETS, "flux": FLUX_PARAMETER_SETS}  # Model.parameter_table -> its sets


def parameter_sets(model: Model) -> dict[str, tuple[str, ...]]:
    """The named parameter sets of model's denoiser (its family's table)."""
    return TABLES[model.parameter_table]


def select(model: Model, patterns: tuple[str, ...] | str) -> dict[str, torch.nn.Parameter]:
    """Parameters whose names match any pattern (a set name of the model's table, or regexes): the denoiser's
    by bare name, and the text encoders' by delta key for patterns that start with TEXT."""
    layers_only = isinstance(patterns, str) and patterns in LAYERS_ONLY
    if isinstance(patterns, str):
        sets = parameter_sets(model)
        if patterns not in sets:
            raise UserError(f"unknown parameter set {patterns!r} for {model.name}: choose one of {', '.join(sets)}")
        patterns = sets[patterns]
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
    another teacher built with `with_fixed` shares them. With LoRA factors (`lora`) the base weights are never
    changed: the teacher is the model with the factors' hooks switched off, and `start` holds the factors'
    starting values only."""

    def __init__(self, model: Model, named: dict[str, torch.nn.Parameter],
                 fixed: dict[str, torch.Tensor] | None = None, lora=None):
        """fixed: other denoiser tensors (bare UNet names) to hold other values than the model's in the
        call, e.g. the original K/V an earlier closed-form stage replaced."""
        self.model, self.lora = model, lora
        self.start = {k: v.detach().clone() for k, v in named.items()}
        self.values = {} if lora is not None else _denoiser_only(self.start)
        for k, v in (fixed or {}).items():
            self.values[k] = v.detach().to(model.device, model.dtype)

    def with_fixed(self, fixed: dict[str, torch.Tensor]) -> Frozen:
        """Another teacher with the same starting values (shared, not copied) and fixed tensors on top."""
        other = Frozen.__new__(Frozen)
        other.model, other.start, other.lora = self.model, self.start, self.lora
        other.values = {**({} if self.lora is not None else _denoiser_only(self.start)),
                        **{k: v.detach().to(self.model.device, self.model.dtype) for k, v in fixed.items()}}
        return other

    def release(self) -> None:
        """Take the LoRA factors' hooks out of the model (a no-op for full tensors, and when done already)."""
        if self.lora is not None:
            self.lora.remove()

    def _base(self):
        return self.lora.disabled() if self.lora is not None else nullcontext()

    @torch.no_grad()
    def raw(self, x_t: torch.Tensor, t, emb: torch.Tensor) -> torch.Tensor:
        with self._base():
            return self.model.raw(x_t, t, emb, params=self.values)

    @torch.no_grad()
    def pair(self, x_t, t, emb, uncond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reference, conditional) raw outputs from one batched call, as a pipeline's guidance does; on a
        guidance-distilled model both read the run's guidance input (EraseAnything's e_0 and e_p)."""
        return self.raw(*guidance_batch(x_t, t, emb, uncond)).chunk(2)

    @torch.no_grad()
    def guided(self, x_t, t, emb, guidance: float, uncond: torch.Tensor) -> torch.Tensor:
        """The frozen model's sampling output as its family guides it (classifier-free guidance u + g (c - u);
        one call at guidance input g on FLUX.1-dev)."""
        with self._base():
            return self.model.guided(x_t, t, emb, guidance, uncond, params=self.values, extrapolate=True)

    @torch.no_grad()
    def rollout(self, emb: torch.Tensor, uncond: torch.Tensor, seeds_noise: torch.Tensor, steps: int, to_step: int,
                guidance: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen model's own trajectory (the model's sampler) from seeds_noise for to_step of steps steps:
        (x_t, t) where t is the timestep the next step would denoise."""
        m = self.model
        timesteps = m.schedule_for(steps, seeds_noise)
        latents = seeds_noise
        for t in timesteps[:to_step]:
            latents = m.scheduler.step(self.guided(latents, t, emb, guidance, uncond), t, latents).prev_sample
        return latents, timesteps[to_step]


def _denoiser_only(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The denoiser's tensors of a name -> tensor map: a text encoder's starting values are the caller's to use
    (it encodes the teacher's prompts before training), the denoiser call takes only its own."""
    return {k: v for k, v in values.items() if split_key(k)[0] == "unet"}
