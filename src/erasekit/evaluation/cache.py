"""A content-addressed image cache: a killed evaluation resumes without regenerating a finished image.

An image's key is the sha256 of everything that decides its pixels: the base model's weights, the
deltas applied, the prompt, the seed and the sampler settings. Images are stored as 8-bit PNGs, each
written atomically, and every metric is computed from the stored 8-bit pixels, so an image generated
now and one read back after a restart give the same numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..grid import check_finite


def image_key(model_hash: str, delta_hashes: list[str], prompt: str, seed: int, settings: dict) -> str:
    """The cache key of one image (settings: steps, guidance, negative prompt, scheduler, dtype, ...)."""
    blob = json.dumps({"model": model_hash, "deltas": list(delta_hashes), "prompt": prompt, "seed": int(seed),
                       "settings": settings}, sort_keys=True, ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] (N, 3, H, W) -> the same images after an 8-bit round trip."""
    return to_uint8(images).float().div(255.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return images.detach().float().clamp(0, 1).mul(255.0).round().to(torch.uint8).cpu()


class ImageCache:
    """PNG files under root/<key[:2]>/<key>.png."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.png"

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def missing(self, keys: list[str]) -> list[str]:
        return [k for k in keys if not self.has(k)]

    def put(self, keys: list[str], images: torch.Tensor, labels: list[str] | None = None) -> None:
        """Store float images in [0, 1]; each file appears whole or not at all. Images holding NaN/inf are
        refused (labels, e.g. "prompt 'x' seed 3", name them; the key otherwise)."""
        check_finite(images, labels or [f"image {k[:12]}" for k in keys])
        for key, arr in zip(keys, to_uint8(images).permute(0, 2, 3, 1).numpy()):
            target = self.path(key)
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{key[:8]}.", suffix=".png")
            os.close(fd)
            try:
                Image.fromarray(arr).save(tmp, format="PNG")
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)

    def get(self, keys: list[str]) -> torch.Tensor:
        """Float images in [0, 1] (N, 3, H, W) for keys that are all present."""
        arrays = [np.asarray(Image.open(self.path(k)).convert("RGB")) for k in keys]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(255.0)
