"""Image size in pixels, (height, width): the model's own and a requested one, checked against the VAE.

A latent pixel is vae_scale image pixels (Stable Diffusion: 8, the testbed's pass-through VAE: 1); a requested
size must be a multiple of 8 latent pixels, so that the UNet's down- and up-sampling stages line up."""

from __future__ import annotations

from .errors import UserError

LATENT_MULTIPLE = 8


def vae_scale(model) -> int:
    """Image pixels per latent pixel: 2 ** (the VAE's blocks - 1), as diffusers' pipelines compute it."""
    return 2 ** (len(model.vae.config.block_out_channels) - 1)


def default_size(model) -> tuple[int, int]:
    return model.image_size()


def resolve(model, height: int | None = None, width: int | None = None) -> tuple[int, int]:
    """(height, width) in pixels, each the model's own where not given; a size the VAE cannot make is refused."""
    own = default_size(model)
    size = (height or own[0], width or own[1])
    check(model, size)
    return size


def check(model, size: tuple[int, int]) -> None:
    step = LATENT_MULTIPLE * vae_scale(model)
    for name, value in zip(("height", "width"), size):
        if isinstance(value, bool) or not isinstance(value, int) or value < step or value % step:
            raise UserError(f"image {name} {value!r} does not fit {model.name}: give a multiple of {step} pixels "
                            f"(8 x its VAE scale {vae_scale(model)}), e.g. --{name} {default_size(model)[0]}")


def latent_shape(model, size: tuple[int, int] | None) -> tuple[int, ...]:
    """The latent of one image of size (pixels; None: the model's own), as the model's family shapes it."""
    if size is None:
        return tuple(model.latent_shape)
    check(model, tuple(size))
    return model.latent_shape_for(tuple(size))
