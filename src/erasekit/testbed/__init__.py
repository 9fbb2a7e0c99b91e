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
ORACLES_DIR = WEIGHTS_DIR / "oracles"  # denoisers trained by the same recipe with one value left out: no-VALUE/

__all__ = ["WEIGHTS_DIR", "ORACLES_DIR", "SAMPLER_DEFAULTS", "SCHEDULER_CONFIG", "UNET_CONFIG", "is_testbed",
           "load_pipeline", "oracle_names", "weights_for"]


def is_testbed(source) -> bool:
    """True for "testbed" and its variants ("testbed:no-circle")."""
    return str(source) == "testbed" or str(source).startswith("testbed:")


def oracle_names() -> list[str]:
    """The shipped oracles' model names, e.g. ["testbed:no-circle", "testbed:no-red"]."""
    found = sorted(d.name for d in ORACLES_DIR.glob("no-*") if (d / "unet" / "config.json").is_file())
    return [f"testbed:{name}" for name in found]


def weights_for(source: str) -> Path | None:
    """The weights folder of a testbed model name: None for "testbed" (the shipped denoiser), the oracle's
    folder for "testbed:no-VALUE" (trained without VALUE, docs/TESTBED.md)."""
    if str(source) == "testbed":
        return None
    variant = str(source).partition(":")[2]
    if f"testbed:{variant}" not in oracle_names():
        raise UserError(f"unknown testbed model {source!r}: use testbed or one of its oracles "
                        f"({', '.join(oracle_names()) or 'none installed'})")
    return ORACLES_DIR / variant


def load_pipeline(weights_dir: Path | None = None):
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from .text import load_text_encoder
    from .vae import PixelVAE

    unet_dir = Path(weights_dir or WEIGHTS_DIR) / "unet"
    if not (unet_dir / "config.json").is_file():
        raise UserError(f"the testbed's denoiser weights are missing from {unet_dir}: reinstall erasekit, "
                        "or train them with `erasekit testbed train`")
    if not any(unet_dir.glob("*.safetensors")):
        raise UserError(f"{unet_dir} has no safetensors weights: erasekit loads no pickle; give a folder written by "
                        "`erasekit testbed train` (its weights/ folder)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unet = UNet2DConditionModel.from_pretrained(unet_dir, torch_dtype=torch.float32, use_safetensors=True)
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
