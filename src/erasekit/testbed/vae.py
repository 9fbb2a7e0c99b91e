"""A pass-through "VAE" so that a pixel-space denoiser fits the StableDiffusionPipeline layout.

Latents are the image itself in [-1, 1]; encode and decode are identities. The config mimics
AutoencoderKL's fields that pipelines read (scaling_factor, block_out_channels for the
latent-to-pixel scale factor of 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput


@dataclass
class _LatentDist:
    mean: torch.Tensor

    def sample(self, generator=None) -> torch.Tensor:
        return self.mean

    def mode(self) -> torch.Tensor:
        return self.mean


@dataclass
class PixelEncoderOutput(BaseOutput):
    latent_dist: _LatentDist


@dataclass
class PixelDecoderOutput(BaseOutput):
    sample: torch.Tensor


class PixelVAE(ModelMixin, ConfigMixin):
    """Identity autoencoder: latent space is pixel space."""

    @register_to_config
    def __init__(self, in_channels: int = 3, latent_channels: int = 3, sample_size: int = 16,
                 scaling_factor: float = 1.0, block_out_channels: tuple[int, ...] = (3,)):
        super().__init__()
        # A (frozen) parameter so that .dtype and .device work like any diffusers model.
        self._dummy = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        dist = _LatentDist(x)
        return PixelEncoderOutput(latent_dist=dist) if return_dict else (dist,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None):
        return PixelDecoderOutput(sample=z) if return_dict else (z,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x
