"""LoRA factors in place of full tensors: a fine-tuning run with `lora_rank=R` trains, for each Linear weight W
of its parameter set, A (R x in) and B (out x R) and leaves W as it is; the layer computes W x + (alpha / R) B A x
(alpha = R, so the scale is 1, as EraseAnything's LoraConfig sets it) through a forward hook, so no weight-size
tensor is made: the run holds the one base model plus the factors (and their gradients and Adam moments).
The frozen teacher is the same model with the hooks switched off (`disabled`). Biases, norms and other
non-Linear tensors of the set are not trained (a set with no Linear weight is refused).

The delta keeps the factors in PEFT's layout under the pipeline component's prefix
("transformer.<module>.lora_A.weight" / "...lora_B.weight" for FLUX, "unet." for a UNet, "text_encoder." for a
text encoder), which stock diffusers' `pipe.load_lora_weights(path)` reads (alpha defaults to the rank there);
erasekit merges them into the base weights when it applies the delta (erasekit.delta_sources.merge_lora).
Init as EraseAnything's (`init_lora_weights="gaussian"`): A ~ N(0, 1/R^2), B = 0, so training starts at the base.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..errors import UserError
from ..model import Model, split_key

DOWN, UP = ".lora_A.weight", ".lora_B.weight"


def denoiser_prefix(model: Model) -> str:
    """The pipeline component name of the denoiser ("transformer" for FLUX, "unet" for a UNet)."""
    components = getattr(model.pipe, "components", None) or {}
    return next((name for name, part in components.items() if part is model.unet), "unet")


def linear_of(model: Model, key: str) -> tuple[str, nn.Linear] | None:
    """(file key stem, module) of the Linear layer whose weight has delta key `key`, or None."""
    if not key.endswith(".weight"):
        return None
    component, name = split_key(key)
    part = model.components()[component]
    module = dict(part.named_modules()).get(name.removesuffix(".weight"))
    if not isinstance(module, nn.Linear) or module.weight is not model.parameter(key):
        return None
    prefix = denoiser_prefix(model) if component == "unet" else component
    return f"{prefix}.{name.removesuffix('.weight')}", module


class LoRA:
    """Trainable factors on the Linear weights among `named`, hooked into their layers until `remove`."""

    def __init__(self, model: Model, named: dict[str, torch.Tensor], rank: int, seed: int = 0):
        if rank < 1:
            raise UserError(f"lora_rank {rank} must be at least 1 (or 0 to train full tensors)")
        self.rank, self.scale, self.enabled = int(rank), 1.0, True
        self.factors: dict[str, nn.Parameter] = {}
        self.targets: list[str] = []  # the delta keys of the adapted weights
        self.handles = []
        gen = torch.Generator().manual_seed(int(seed) * 7_919 + 17)
        for key in named:
            found = linear_of(model, key)
            if found is None:
                continue
            stem, module = found
            out_dim, in_dim = module.weight.shape
            r = min(self.rank, out_dim, in_dim)
            down = nn.Parameter((torch.randn(r, in_dim, generator=gen) / self.rank).to(module.weight.device))
            up = nn.Parameter(torch.zeros(out_dim, r, device=module.weight.device))
            self.factors[stem + DOWN], self.factors[stem + UP] = down, up
            self.targets.append(key)
            self.handles.append(module.register_forward_hook(self._hook(down, up)))
        if not self.targets:
            raise UserError(f"lora_rank={rank}: the parameter set holds no Linear weight to put LoRA factors on: "
                            "choose another set (--set parameters=...) or lora_rank=0 for full tensors")

    def _hook(self, down: nn.Parameter, up: nn.Parameter):
        def add(module, args, output):
            if not self.enabled:
                return output
            x = args[0]  # the factors are cast to the input's dtype (small), not the input to theirs (a copy)
            low = nn.functional.linear(nn.functional.linear(x, down.to(x.dtype)), up.to(x.dtype))
            return output + (self.scale * low).to(output.dtype)
        return add

    @contextmanager
    def disabled(self):
        """The base model inside the block (the frozen teacher's calls)."""
        before, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = before

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
