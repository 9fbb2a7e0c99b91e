"""`erasekit testbed train`: train the testbed's denoiser; seeded, resumable, background-friendly.

Every step draws its batch from a generator seeded by (seed, step), so a run resumed from a
checkpoint takes exactly the batches an uninterrupted run would have taken.
"""

from __future__ import annotations

import json
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import append_jsonl, atomic_write_json, load_checkpoint, resume_jsonl, save_checkpoint
from ..errors import UserError
from ..files import read_mapping
from .architecture import RESOLUTION, SCHEDULER_CONFIG, build_unet
from .text import MAX_LENGTH, load_text_encoder
from .world import VALUES, caption, random_scene, render

ALL_VALUES = tuple(v for values in VALUES.values() for v in values)


@dataclass
class TrainConfig:
    out: str = "runs/testbed"
    seed: int = 0
    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 200
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    dataset_size: int = 40000
    empty_caption_prob: float = 0.1
    drop_attribute_prob: float = 0.15
    checkpoint_every: int = 250
    log_every: int = 25
    resolution: int = RESOLUTION
    # Min-SNR weighting of the x0 loss (weight min(SNR, gamma)) from step min_snr_from on; 0 = off. With a
    # uniform x0 loss the images stayed soft-edged; the weighting sharpens edges (low-noise steps weigh more).
    min_snr_gamma: float = 0.0
    min_snr_from: int = 0
    # Added to the min-SNR weight: min(SNR, gamma) + offset. Min-SNR alone gives the high-noise steps, where
    # the text alone must decide the outline, almost no weight: a model trained so predicted the same blob
    # for every shape word from pure noise, and the seed then chose the outline. An offset of 1 keeps them.
    min_snr_offset: float = 0.0
    # The EMA restarts from the current weights at this step, with a warm-up (decay min(ema_decay,
    # n / (10 + n)) n steps after it), so no early weights linger in it.
    ema_from: int = 0
    # Start from these weights (a folder holding unet/, or the unet folder itself) instead of random ones;
    # their own training record is kept in this run's record.
    init_from: str = ""
    # Values left out of the data entirely (an oracle: a model that never saw them): no scene shows them, so
    # no caption names them in any wording. Empty: the shipped recipe's data, draw for draw.
    exclude: tuple[str, ...] = ()

    def __post_init__(self):
        self.exclude = tuple(self.exclude)
        for value in self.exclude:
            if value not in ALL_VALUES:
                raise UserError(f"--exclude {value}: not a testbed value; use one of {', '.join(ALL_VALUES)}")
        for attribute in VALUES:
            if len([v for v in VALUES[attribute] if v not in self.exclude]) < 2:
                raise UserError(f"--exclude: leave at least two {attribute} values to draw")


# The config fields that decide the training data; a checkpoint resumes only under the same ones.
DATA_FIELDS = ("seed", "dataset_size", "exclude", "batch_size", "resolution", "empty_caption_prob",
               "drop_attribute_prob", "init_from")


def render_dataset(seed: int, n: int, resolution: int = RESOLUTION, exclude: tuple[str, ...] = ()):
    """n scenes drawn from seed (never showing a value in exclude), rendered: (uint8 array (n, H, W, 3),
    list of scenes)."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng, exclude) for _ in range(n)]
    images = np.stack([render(s, resolution) for s in scenes])
    return images, scenes


def to_model_space(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def ema_decay_at(step: int, cfg: TrainConfig) -> float:
    """The EMA decay at a step: 0 at ema_from (the EMA restarts from the weights), then warming up."""
    if cfg.ema_from <= 0 or step < cfg.ema_from:
        return cfg.ema_decay
    n = step - cfg.ema_from
    return min(cfg.ema_decay, n / (10 + n))


def encode_captions(tokenizer, encoder, captions: list[str]) -> torch.Tensor:
    """Exactly what StableDiffusionPipeline.encode_prompt does with the testbed's components."""
    tok = tokenizer(captions, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return encoder(tok.input_ids, attention_mask=tok.attention_mask)[0]


def train(cfg: TrainConfig, resume: bool = True, argv: list[str] | None = None) -> Path:
    from diffusers import DDPMScheduler

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path, log_path = out / "checkpoint.safetensors", out / "train.log.jsonl"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)

    images, scenes = render_dataset(cfg.seed, cfg.dataset_size, cfg.resolution, cfg.exclude)
    data = to_model_space(images)
    tokenizer, encoder = load_text_encoder()
    encoder.to(device)
    unet = build_unet()
    if cfg.init_from:
        unet.load_state_dict(load_initial_weights(Path(cfg.init_from)))
    unet = unet.to(device).train()
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    noise_sched = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items()
                                   if k not in ("set_alpha_to_one", "timestep_spacing")})
    alphas = noise_sched.alphas_cumprod.to(device)

    start, elapsed = 0, 0.0
    if resume and ckpt_path.exists():
        check_same_data(ckpt_path, cfg)
        groups, meta = load_checkpoint(ckpt_path, optimizer=opt)
        unet.load_state_dict(groups["unet"])
        ema = {k: v.to(device) for k, v in groups["ema"].items()}
        start, elapsed = meta["step"], meta["elapsed"]
        print(f"resuming from step {start} ({ckpt_path})", flush=True)
    resume_jsonl(log_path, keep=lambda rec: rec.get("step", 0) <= start)  # no torn line, no step logged twice

    t0 = time.time() - elapsed
    for step in range(start, cfg.steps):
        rng = np.random.default_rng([cfg.seed, step])
        idx = rng.integers(len(scenes), size=cfg.batch_size)
        caps = ["" if rng.random() < cfg.empty_caption_prob
                else caption(scenes[i], rng, "train", cfg.drop_attribute_prob) for i in idx]
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        x0 = data[torch.from_numpy(idx)].to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, 1000, (cfg.batch_size,), generator=gen).to(device)
        a = alphas[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        emb = encode_captions(tokenizer, encoder, caps).to(device)

        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        pred = unet(x_t, t, emb).sample
        per_sample = (pred - x0).pow(2).mean(dim=(1, 2, 3))
        if cfg.min_snr_gamma > 0 and step >= cfg.min_snr_from:
            snr = alphas[t] / (1 - alphas[t])
            per_sample = per_sample * (snr.clamp(max=cfg.min_snr_gamma) + cfg.min_snr_offset)
        loss = per_sample.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = ema_decay_at(step, cfg)
            for k, v in unet.state_dict().items():
                if v.dtype.is_floating_point:
                    ema[k].mul_(decay).add_(v, alpha=1 - decay)
                else:
                    ema[k].copy_(v)

        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            rec = {"step": done, "loss": round(loss.item(), 5), "lr": lr_at(step, cfg),
                   "elapsed_s": round(time.time() - t0, 1)}
            append_jsonl(log_path, rec)
            print(json.dumps(rec), flush=True)
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            save_checkpoint(ckpt_path, {"unet": unet.state_dict(), "ema": ema},
                            {"step": done, "elapsed": time.time() - t0, "config": asdict(cfg)}, optimizer=opt)

    return export_weights(cfg, ema, time.time() - t0, argv)


def check_same_data(ckpt_path: Path, cfg: TrainConfig) -> None:
    """Refuse to resume a checkpoint that was trained on other data (seed, exclusions, ...)."""
    from safetensors import safe_open

    with safe_open(str(ckpt_path), framework="pt") as f:
        saved = json.loads(f.metadata()["meta"]).get("config", {})
    now = asdict(cfg)
    for field in DATA_FIELDS:
        old = saved.get(field, [] if field == "exclude" else now[field])
        old = tuple(old) if field == "exclude" else old
        if old != now[field]:
            raise UserError(f"{ckpt_path} was trained with {field}={old!r}, not {now[field]!r}: pass the same "
                            "settings to resume it, or --restart (or another --out) to train anew")


def unet_folder(path: Path) -> Path:
    """The diffusers unet folder at path or at path/unet."""
    for candidate in (path, path / "unet"):
        if (candidate / "config.json").is_file():
            if not any(candidate.glob("*.safetensors")):
                raise UserError(f"--init-from {path}: {candidate} has no safetensors weights (erasekit loads no "
                                "pickle): pass a folder written by `erasekit testbed train` (its weights/ folder)")
            return candidate
    raise UserError(f"--init-from {path}: no unet weights there (expected {path}/unet/config.json); "
                    "pass a folder written by `erasekit testbed train` (its weights/ folder)")


def load_initial_weights(path: Path) -> dict[str, torch.Tensor]:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(unet_folder(path), torch_dtype=torch.float32, use_safetensors=True)
    return unet.state_dict()


def initial_record(path: str) -> dict:
    """The training record of the weights a run started from, or their path when they have none."""
    record = unet_folder(Path(path)).parent / "unet_training.json"
    return read_mapping(record, "training record") if record.is_file() else {"weights": str(path)}


def export_weights(cfg: TrainConfig, ema: dict[str, torch.Tensor], wall_s: float, argv: list[str] | None) -> Path:
    """Write the EMA denoiser in fp16 as a diffusers folder with the training record beside it."""
    unet = build_unet()
    unet.load_state_dict({k: v.cpu() for k, v in ema.items()})
    target = Path(cfg.out) / "weights"
    unet.to(torch.float16).save_pretrained(target / "unet")
    record = {
        "command": shlex.join(argv if argv is not None else sys.argv),
        "config": asdict(cfg),
        "wall_time_s": round(wall_s, 1),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "parameters": sum(p.numel() for p in unet.parameters()),
    }
    if cfg.init_from:
        record["initialised_from"] = initial_record(cfg.init_from)
    atomic_write_json(target / "unet_training.json", record)
    print(f"wrote {target}", flush=True)
    return target
