"""The testbed's judge: a small CNN that reads a 16x16 image back into its four attribute values.

Erasure metrics on the testbed ask "what did the model draw?"; the judge answers with one
softmax head per attribute (shape, color, style, background) on a shared convolutional trunk.
Its penultimate features double as the embedding for a Fréchet distance ("testbed FID").

It is trained on freshly rendered scenes with augmentations that mimic the artefacts of
generated images (blur, noise, mild colour shifts, small geometric distortions), so that it
keeps reading generated images correctly; `train_judge` reproduces the shipped weights.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .small_models import load_small_model, save_small_model
from .world import ATTRIBUTES, VALUES, random_scene, render

RESOLUTION = 16
DEFAULT_PATH = Path(__file__).parent / "weights" / "judge.safetensors"
DEFAULT_CHANNELS = (32, 64, 128)
DEFAULT_FEATURE_DIM = 128
# Test images for the reported accuracy: a seed the training never draws from (training uses
# np.random.default_rng([seed, ...]) streams, this is a plain integer seed).
TEST_SEED = 20_240_917


# ---------------------------------------------------------------------------------------------
# inputs


def as_model_input(images, device: torch.device | str | None = None) -> torch.Tensor:
    """Images in any of the testbed's forms -> float32 (N, 3, 16, 16) in [-1, 1].

    Accepts uint8 arrays or tensors (N, H, W, 3) or (H, W, 3) (values 0..255), float tensors
    or arrays (N, 3, H, W) or (3, H, W) already in [-1, 1], and lists of PIL images or of
    uint8 arrays. Images of another size are resized (area / antialiased bilinear) to 16x16.
    """
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("no images given")
        images = np.stack([np.asarray(im) for im in images])
    if isinstance(images, np.ndarray):
        if images.dtype == np.uint8:
            images = torch.from_numpy(np.ascontiguousarray(images))
        else:
            images = torch.from_numpy(np.asarray(images, dtype=np.float32))
    if not torch.is_tensor(images):
        raise TypeError(f"unsupported image type {type(images).__name__}")
    x = images
    if x.dtype == torch.uint8:
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"uint8 images must be (N, H, W, 3); got {tuple(x.shape)}")
        x = x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    else:
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"float images must be (N, 3, H, W) in [-1, 1]; got {tuple(x.shape)}")
        x = x.float()
    if tuple(x.shape[-2:]) != (RESOLUTION, RESOLUTION):
        h, w = x.shape[-2:]
        if h % RESOLUTION == 0 and w % RESOLUTION == 0:
            x = F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode="area")
        else:
            x = F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode="bilinear", antialias=True,
                              align_corners=False)
    if device is not None:
        x = x.to(device)
    return x.contiguous()


def render_batch(scenes) -> torch.Tensor:
    """Scenes -> float (N, 3, 16, 16) in [-1, 1]."""
    return as_model_input(np.stack([render(s, RESOLUTION) for s in scenes]))


def labels_of(scenes) -> dict[str, torch.Tensor]:
    """Scenes -> {attribute: LongTensor (N,)} of value indices."""
    return {a: torch.tensor([VALUES[a].index(s.value(a)) for s in scenes], dtype=torch.long)
            for a in ATTRIBUTES}


# ---------------------------------------------------------------------------------------------
# augmentation: what generated images look like (used by the judge and the testbed CLIP)


def _uniform(gen: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def _gate(gen: torch.Generator, n: int, p: float) -> torch.Tensor:
    return (torch.rand(n, generator=gen) < p).float()


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image gaussian blur (sigma (N,), 0 = none) with a 5x5 kernel, reflect padding."""
    n, c, h, w = x.shape
    r = torch.arange(-2, 3, dtype=x.dtype)
    s = sigma.clamp_min(1e-3).view(n, 1)
    k1 = torch.exp(-0.5 * (r.view(1, -1) / s) ** 2)
    k1 = k1 / k1.sum(dim=1, keepdim=True)
    k2 = (k1[:, :, None] * k1[:, None, :])  # (n, 5, 5)
    weight = k2[:, None].repeat_interleave(c, dim=0)  # (n*c, 1, 5, 5)
    padded = F.pad(x.reshape(1, n * c, h, w), (2, 2, 2, 2), mode="reflect")
    return F.conv2d(padded, weight, groups=n * c).view(n, c, h, w)


def augment(x: torch.Tensor, gen: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Generation-like artefacts on float (N, 3, H, W) images in [-1, 1]; deterministic for gen.

    Each effect is applied to a random subset of the batch: a small random affine warp plus a
    smooth displacement field (imperfect shapes), gaussian blur, brightness / contrast /
    saturation jitter, a hue rotation of a few degrees and small per-channel gains (mild
    enough never to move a colour into its neighbour: orange stays between red and yellow),
    pixel noise and low-frequency colour blotches.
    """
    n, _, h, w = x.shape
    s = float(strength)
    u = lambda lo, hi: _uniform(gen, n, lo, hi)  # noqa: E731
    x = (x.float() + 1.0) / 2.0

    # geometry: affine (rotation, scale, shear, shift) + a smooth elastic field
    g = _gate(gen, n, 0.75)
    ang = torch.deg2rad(u(-10, 10) * s) * g
    scale = 1.0 + u(-0.08, 0.08) * s * g
    shear = u(-0.08, 0.08) * s * g
    tx, ty = u(-0.12, 0.12) * s * g, u(-0.12, 0.12) * s * g
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack([torch.stack([cos, -sin + shear, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    ge = _gate(gen, n, 0.5) * u(0.0, 0.06) * s  # displacement amplitude, in [-1, 1] units (~0.5 px)
    field = torch.randn(n, 2, 3, 3, generator=gen) * ge.view(n, 1, 1, 1)
    field = F.interpolate(field, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    x = F.grid_sample(x, grid + field, mode="bilinear", padding_mode="border", align_corners=False)

    # blur
    sigma = _gate(gen, n, 0.5) * u(0.3, 0.9) * s
    x = torch.where((sigma > 0).view(n, 1, 1, 1), _gaussian_blur(x, sigma), x)

    # colour
    gc = _gate(gen, n, 0.8)
    v = lambda lo, hi: 1.0 + (u(lo, hi) * s * gc).view(n, 1, 1, 1)  # noqa: E731
    x = x * v(-0.15, 0.15) + (u(-0.06, 0.06) * s * gc).view(n, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * v(-0.2, 0.2) + mean
    gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    x = gray + (x - gray) * v(-0.25, 0.25)
    # hue: rotate about the grey axis by a few degrees (Rodrigues)
    a = torch.deg2rad(u(-4, 4) * s * gc)
    k = torch.full((3,), 1.0 / math.sqrt(3.0))
    kx = torch.tensor([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    eye, kk = torch.eye(3), torch.outer(k, k)
    rot = (torch.cos(a).view(n, 1, 1) * eye + torch.sin(a).view(n, 1, 1) * kx
           + (1 - torch.cos(a)).view(n, 1, 1) * kk)
    x = torch.einsum("nij,njhw->nihw", rot, x)
    x = x * (1.0 + (torch.rand(n, 3, generator=gen) * 2 - 1) * 0.03 * s * gc.view(n, 1)).view(n, 3, 1, 1)

    # noise: per-pixel and low-frequency blotches
    x = x + torch.randn(x.shape, generator=gen) * (_gate(gen, n, 0.6) * u(0.0, 0.06) * s).view(n, 1, 1, 1)
    low = torch.randn(n, 3, 4, 4, generator=gen) * (_gate(gen, n, 0.4) * u(0.0, 0.04) * s).view(n, 1, 1, 1)
    x = x + F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)

    return x.clamp(0.0, 1.0) * 2.0 - 1.0


# ---------------------------------------------------------------------------------------------
# the model


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class Trunk(nn.Module):
    """16x16 -> (C, 4, 4): two conv blocks at 16x16, two at 8x8, one at 4x4."""

    def __init__(self, channels=DEFAULT_CHANNELS):
        super().__init__()
        a, b, c = channels
        self.net = nn.Sequential(*_conv(3, a), *_conv(a, a), nn.MaxPool2d(2),
                                 *_conv(a, b), *_conv(b, b), nn.MaxPool2d(2), *_conv(b, c))
        self.out_channels = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.clamp(-1.0, 1.0))


class TestbedJudge(nn.Module):
    """Shared CNN trunk, a feature layer, one linear head per attribute.

    Input: float (N, 3, 16, 16) in [-1, 1] (anything `as_model_input` takes is accepted by
    `probs`, `features` and `predict`). Values are ordered as in `world.VALUES`.
    """

    __test__ = False  # not a pytest class despite the name

    def __init__(self, channels=DEFAULT_CHANNELS, feature_dim: int = DEFAULT_FEATURE_DIM,
                 values: dict[str, tuple[str, ...]] | None = None):
        super().__init__()
        self.values = {a: tuple(v) for a, v in (values or VALUES).items()}
        self.attributes = tuple(self.values)
        self.channels = tuple(int(c) for c in channels)
        self.feature_dim = int(feature_dim)
        self.trunk = Trunk(self.channels)
        self.feature = nn.Sequential(nn.Linear(self.trunk.out_channels, self.feature_dim), nn.ReLU())
        self.heads = nn.ModuleDict({a: nn.Linear(self.feature_dim, len(v)) for a, v in self.values.items()})

    def config(self) -> dict:
        return {"channels": list(self.channels), "feature_dim": self.feature_dim,
                "values": {a: list(v) for a, v in self.values.items()}}

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _input(self, x) -> torch.Tensor:
        return as_model_input(x, self.device)

    def features(self, x) -> torch.Tensor:
        """Penultimate features (N, feature_dim), post-ReLU; the embedding for Fréchet distance."""
        h = self.trunk(self._input(x))
        return self.feature(h.mean(dim=(2, 3)))

    def logits(self, x) -> dict[str, torch.Tensor]:
        f = self.features(x)
        return {a: head(f) for a, head in self.heads.items()}

    def forward(self, x) -> dict[str, torch.Tensor]:
        return self.logits(x)

    def probs(self, x) -> dict[str, torch.Tensor]:
        return {a: z.softmax(dim=-1) for a, z in self.logits(x).items()}

    @torch.no_grad()
    def predict(self, x) -> dict[str, torch.Tensor]:
        """{attribute: LongTensor (N,)} of value indices (into `self.values[attribute]`)."""
        return {a: z.argmax(dim=-1) for a, z in self.logits(x).items()}

    def predict_values(self, x) -> list[dict[str, str]]:
        """Per image, {attribute: value name}."""
        pred = self.predict(x)
        n = next(iter(pred.values())).shape[0]
        return [{a: self.values[a][int(pred[a][i])] for a in self.attributes} for i in range(n)]


@torch.no_grad()
def judge_accuracy(judge: TestbedJudge, images, scenes, batch_size: int = 1000) -> dict[str, float]:
    """Per-attribute accuracy of the judge on images whose true scenes are known."""
    x = as_model_input(images)
    labels = labels_of(scenes)
    correct = {a: 0 for a in judge.attributes}
    for i in range(0, x.shape[0], batch_size):
        pred = judge.predict(x[i:i + batch_size])
        for a in judge.attributes:
            correct[a] += int((pred[a].cpu() == labels[a][i:i + batch_size]).sum())
    return {a: correct[a] / x.shape[0] for a in judge.attributes}


# ---------------------------------------------------------------------------------------------
# saving and loading


def save_judge(judge: TestbedJudge, path, extra_meta: dict | None = None, dtype=torch.float16) -> Path:
    """BatchNorm statistics stay fp32 (tiny, and fp16 would cost accuracy)."""
    return save_small_model(judge, path, "judge", extra_meta=extra_meta, dtype=dtype)


def load_judge(path=None, device: torch.device | str = "cpu") -> TestbedJudge:
    """The judge at path (default: the shipped weights), in eval mode, fp32."""
    return load_small_model(Path(path) if path is not None else DEFAULT_PATH, TestbedJudge, "judge",
                            "erasekit testbed train-judge", device)


# ---------------------------------------------------------------------------------------------
# training


def _render_pool(rng: np.random.Generator, n: int):
    scenes = [random_scene(rng) for _ in range(n)]
    return render_batch(scenes), labels_of(scenes)


def evaluate_judge(judge: TestbedJudge, n: int = 2000, seed: int = TEST_SEED) -> dict[str, dict[str, float]]:
    """Accuracy per attribute on n fresh rendered images, clean and augmented (fixed seeds)."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    x = render_batch(scenes)
    gen = torch.Generator().manual_seed(seed)
    x_aug = torch.cat([augment(x[i:i + 500], gen) for i in range(0, n, 500)])
    return {"clean": judge_accuracy(judge, x, scenes), "augmented": judge_accuracy(judge, x_aug, scenes)}


def train_judge(out_path=DEFAULT_PATH, seed: int = 0, steps: int = 1600, batch_size: int = 128,
                lr: float = 3e-3, weight_decay: float = 1e-4, warmup: int = 100, pool_size: int = 40000,
                refresh_per_step: int = 16, label_smoothing: float = 0.05, clean_fraction: float = 0.15,
                aug_strength: tuple[float, float] = (0.6, 1.4), eval_images: int = 2000,
                threads: int | None = 1, log_every: int = 100) -> dict:
    """Train the judge on freshly rendered scenes with generation-like augmentation, write it to
    out_path (safetensors, fp16) and return the final metrics.

    The training images come from a pool of pool_size rendered scenes of which refresh_per_step
    are replaced by new renders every step, so the judge sees new scenes all along. Each step's
    augmentation strength is drawn from aug_strength (1.0 is what the reported "augmented"
    accuracy uses); clean_fraction of the images stay unaugmented. threads:
    torch.set_num_threads (None leaves it alone).
    """
    if threads is not None:
        torch.set_num_threads(threads)
    t0 = time.time()
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 0])
    gen = torch.Generator().manual_seed(seed)
    pool, pool_labels = _render_pool(rng, pool_size)
    print(f"rendered {pool_size} training scenes in {time.time() - t0:.1f}s", flush=True)

    judge = TestbedJudge().train()
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=weight_decay)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return lr * (0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))

    running = None
    for step in range(steps):
        if refresh_per_step:
            fresh, fresh_labels = _render_pool(rng, refresh_per_step)
            slots = torch.from_numpy(rng.choice(pool_size, size=refresh_per_step, replace=False))
            pool[slots] = fresh
            for a in ATTRIBUTES:
                pool_labels[a][slots] = fresh_labels[a]
        idx = torch.from_numpy(rng.integers(pool_size, size=batch_size))
        x = pool[idx]
        keep = (torch.rand(batch_size, generator=gen) < clean_fraction).view(-1, 1, 1, 1)
        strength = float(aug_strength[0] + (aug_strength[1] - aug_strength[0]) * rng.random())
        x = torch.where(keep, x, augment(x, gen, strength))
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        out = judge(x)
        loss = sum(F.cross_entropy(out[a], pool_labels[a][idx], label_smoothing=label_smoothing)
                   for a in ATTRIBUTES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        done = step + 1
        if done % log_every == 0 or done == steps:
            print(json.dumps({"step": done, "loss": round(running, 4), "lr": round(lr_at(step), 6),
                              "elapsed_s": round(time.time() - t0, 1)}), flush=True)

    judge.eval()
    train_s = time.time() - t0
    # Evaluate the weights as shipped (fp16 round trip), not the fp32 ones in memory.
    meta = {"seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr, "pool_size": pool_size,
            "refresh_per_step": refresh_per_step, "aug_strength": list(aug_strength), "train_s": round(train_s, 1)}
    out_path = Path(out_path)
    save_judge(judge, out_path, meta)
    shipped = load_judge(out_path)
    metrics = evaluate_judge(shipped, n=eval_images)
    metrics = {"clean": {a: round(v, 4) for a, v in metrics["clean"].items()},
               "augmented": {a: round(v, 4) for a, v in metrics["augmented"].items()}}
    meta["eval"] = {"images": eval_images, "seed": TEST_SEED, **metrics}
    save_judge(judge, out_path, meta)
    result = {"path": str(out_path), "train_s": round(train_s, 1), "wall_s": round(time.time() - t0, 1),
              "bytes": out_path.stat().st_size, **metrics}
    print(json.dumps(result), flush=True)
    return result
