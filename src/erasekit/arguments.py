"""Command-line argument checking: a parser whose errors are one line, and the value types every command
shares (counts, seeds, finite numbers, fractions). A bad value is refused while parsing, before any work."""

from __future__ import annotations

import argparse
import math

from .errors import UserError

MAX_SEED = 2**64 - 1  # the largest seed torch.Generator.manual_seed takes (suites' seed columns allow the same)


class Parser(argparse.ArgumentParser):
    """argparse, but a parse error is a UserError (one `erasekit: error:` line, exit 2) that names the help."""

    def error(self, message: str):
        raise UserError(f"{message} (see `{self.prog} --help`)")


def _number(text: str, kind, what: str):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number: give {what}")
    return value


def count(text: str) -> int:
    """An integer of at least 1 (steps, samples, batch sizes, limits)."""
    value = _number(text, int, "a whole number of at least 1")
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def whole(text: str) -> int:
    """An integer of at least 0 (a step to start something at)."""
    value = _number(text, int, "a whole number")
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must not be negative")
    return value


def seed(text: str) -> int:
    value = _number(text, int, "a whole number")
    check_seed(value)
    return value


def check_seed(value: int) -> int:
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"seed {value} is out of range: seeds are whole numbers from 0 to {MAX_SEED}")
    return value


def finite(text: str) -> float:
    """Any finite number (guidance scales, learning rates)."""
    return _number(text, float, "a number")


def non_negative(text: str) -> float:
    value = finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must not be negative")
    return value


def fraction(text: str) -> float:
    """A number in [0, 1) (judge thresholds)."""
    value = finite(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be in [0, 1)")
    return value


def pixels(text: str) -> int:
    """An image side in pixels: a positive multiple of 8 (the model refines this to 8 x its VAE scale)."""
    value = count(text)
    if value % 8:
        raise argparse.ArgumentTypeError(f"{value} is not a multiple of 8 pixels: give e.g. 512")
    return value


def add_size_args(p) -> None:
    """--height/--width: the generated images' size, each side defaulting to the model's own."""
    for side in ("height", "width"):
        p.add_argument(f"--{side}", type=pixels, help=f"image {side} in pixels, a multiple of 8 x the VAE scale "
                       "(Stable Diffusion: 64, the testbed: 8; default: the model's own, 512 for SD1.4, 16 for the "
                       "testbed)")


def parse_seeds(text: str) -> list[int]:
    """'0-7', '1,5,9' or '3' -> a list of seeds, each in range."""
    seeds: list[int] = []
    hint = "use a range like 0-7 or a list like 1,5,9"
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part[1:]:
                lo, hi = (int(x) for x in part.split("-", 1))
                if hi < lo:
                    raise UserError(f"seed range {part!r} runs backwards: {hint}")
                if hi - lo >= 100_000:
                    raise UserError(f"seed range {part!r} has {hi - lo + 1} seeds: give at most 100000")
                seeds.extend(range(lo, hi + 1))
            elif part:
                seeds.append(int(part))
        for value in seeds:
            check_seed(value)
    except ValueError:
        raise UserError(f"cannot read seeds {text!r}: {hint}") from None
    except argparse.ArgumentTypeError as exc:
        raise UserError(f"--seeds {text!r}: {exc}") from None
    if not seeds:
        raise UserError(f"no seeds in {text!r}: {hint}")
    return seeds
