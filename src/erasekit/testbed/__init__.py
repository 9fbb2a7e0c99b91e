"""The built-in testbed: a miniature pixel-space text-to-image model with a ground-truth judge.

`load_pipeline()` assembles a standard StableDiffusionPipeline from the shipped denoiser, the
frozen all-MiniLM-L6-v2 text encoder (from its own package), the pass-through PixelVAE and a
DDIM scheduler; `erasekit.load("testbed")` wraps it in a Model.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from ..errors import UserError
from .architecture import SAMPLER_DEFAULTS, SCHEDULER_CONFIG, UNET_CONFIG

WEIGHTS_DIR = Path(__file__).parent / "weights"

__all__ = ["WEIGHTS_DIR", "SAMPLER_DEFAULTS", "SCHEDULER_CONFIG", "UNET_CONFIG", "load_pipeline"]


def load_pipeline(weights_dir: Path | None = None):
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from .text import load_text_encoder
    from .vae import PixelVAE

    unet_dir = Path(weights_dir or WEIGHTS_DIR) / "unet"
    if not (unet_dir / "config.json").is_file():
        raise UserError(f"the testbed's denoiser weights are missing from {unet_dir}: reinstall erasekit, "
                        "or train them with `erasekit testbed train`")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unet = UNet2DConditionModel.from_pretrained(unet_dir, torch_dtype=torch.float32)
        tokenizer, text_encoder = load_text_encoder()
        pipe = StableDiffusionPipeline(
            vae=PixelVAE(sample_size=UNET_CONFIG["sample_size"]),
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe
