"""Image grids, optionally labelled, for generated images of any size."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .errors import UserError


def check_finite(images: torch.Tensor, labels: list[str]) -> None:
    """UserError naming the first image (by its label, e.g. its prompt and seed) whose pixels hold NaN or inf,
    before anything is written: such an image would be saved as silently black."""
    bad = (~torch.isfinite(images.detach().reshape(images.shape[0], -1))).any(dim=1).nonzero().flatten().tolist()
    if bad:
        raise UserError(f"{labels[bad[0]]} produced non-finite (NaN or inf) pixel values ({len(bad)} of "
                        f"{len(images)} images): the model or a delta applied to it is broken (a diverged erasure?); "
                        "nothing was written for them")


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(N, 3, H, W) in [0, 1] -> PIL images."""
    arr = (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def make_grid(images: list[Image.Image], columns: int = 8, labels: list[str] | None = None,
              cell: int | None = None, label_lines: int = 3) -> Image.Image:
    """Tile images into a grid; small images are enlarged (nearest neighbour) to at least 96 px; labels
    are wrapped under each cell."""
    if not images:
        raise ValueError("no images to put in a grid")
    w, h = images[0].size
    scale = max(1, (cell or 96) // max(w, h))
    cw, ch = w * scale, h * scale
    font = ImageFont.load_default()
    chars = max(8, cw // 6)
    text_h = (12 * label_lines + 4) if labels else 0
    columns = min(columns, len(images))
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * (cw + 4) + 4, rows * (ch + text_h + 4) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, img in enumerate(images):
        x, y = 4 + (i % columns) * (cw + 4), 4 + (i // columns) * (ch + text_h + 4)
        grid.paste(img.resize((cw, ch), Image.Resampling.NEAREST), (x, y))
        if labels:
            text = labels[i]
            lines = [text[j:j + chars] for j in range(0, len(text), chars)][:label_lines]
            for k, line in enumerate(lines):
                draw.text((x, y + ch + 2 + 12 * k), line, fill=(0, 0, 0), font=font)
    return grid
