"""Samplers by name: the diffusers scheduler a run denoises with, built from the model folder's own scheduler
config (its betas, timestep spacing and prediction type), so a sampler named here matches the one a stock
pipeline would build from the same folder.

`ddim` (eta 0) is every command's default. The others exist because published protocols sample with them:
PNDM is what an SD1.x pipeline folder ships (TRCE's evaluation), LMS what UnlearnDiffAtk's and AdvUnlearn's
scripts build, DPM-Solver++ what P4D's does (docs/METHODS.md, "Protocol presets").
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError


@dataclass(frozen=True)
class Sampler:
    name: str  # the command-line name
    title: str  # what a results file records as the scheduler
    cls: str  # the diffusers scheduler class
    predicts: tuple[str, ...]  # the prediction types it can step with


SAMPLERS = {s.name: s for s in (
    Sampler("ddim", "DDIM (eta 0)", "DDIMScheduler", ("epsilon", "sample", "v_prediction")),
    Sampler("pndm", "PNDM (PLMS)", "PNDMScheduler", ("epsilon", "v_prediction")),
    Sampler("lms", "LMS (LMSDiscrete)", "LMSDiscreteScheduler", ("epsilon", "sample", "v_prediction")),
    Sampler("dpm", "DPM-Solver++ (multistep)", "DPMSolverMultistepScheduler", ("epsilon", "sample", "v_prediction")),
)}
DEFAULT = "ddim"


def names() -> str:
    return ", ".join(SAMPLERS)


def title(name: str) -> str:
    """What results record for a sampler name (a family's own sampler is recorded by its own name)."""
    return SAMPLERS[name].title if name in SAMPLERS else name


def check_name(text: str) -> str:
    """argparse type for --scheduler: a known sampler name."""
    import argparse

    name = text.strip().lower()
    if name not in SAMPLERS:
        raise argparse.ArgumentTypeError(f"unknown sampler {text!r}: use one of {names()}")
    return name


def build(name: str, config: dict):
    """The named scheduler from a folder's scheduler config. DDIM never clips latents unless the config asks
    (its own default, clip_sample=True, would clip SD latents to [-1, 1]); a sampler that cannot step with the
    model's prediction type is refused in one line."""
    import diffusers

    sampler = SAMPLERS[name]
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in sampler.predicts:
        usable = ", ".join(n for n, s in SAMPLERS.items() if prediction in s.predicts)
        raise UserError(f"the {sampler.title} sampler cannot step a model that predicts {prediction!r}: pass "
                        f"--scheduler with one of {usable}")
    extra = {"clip_sample": bool(config.get("clip_sample", False))} if name == "ddim" else {}
    return getattr(diffusers, sampler.cls).from_config(config, **extra)
