"""One training loop for every fine-tuning erasure method.

A method supplies its parameter set (name patterns), its setup (embeddings, caches) and its loss; the
loop does the rest: the optimizer, gradient accumulation, mixed precision on GPU, one generator per step
seeded by (seed, step, process) so a resumed run draws exactly what an uninterrupted one would,
checkpoints with optimizer state every N steps, a progress bar with the loss, and gradient averaging
across processes when launched with accelerate. The result is a Delta of the trained tensors.

Memory: the trained tensors, their gradients, the optimizer's two moments and one frozen copy of their
starting values (`params.Frozen`, which is also what the model is restored from); nothing else of their size.
With `lora_rank` the trained tensors are LoRA factors (finetune/lora.py) and the base weights are not copied.
On a guidance-distilled model (FLUX.1-dev) every denoiser call of the run reads the method's `guidance` as its
guidance input (`Model.distilled_guidance`).
A run whose trained tensors end where they started is reported with the loss terms that were zero.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..checkpoint import append_jsonl, atomic_write_json, load_checkpoint, resume_jsonl, save_checkpoint
from ..errors import UserError
from ..model import Model
from .params import Frozen, only_these_trainable

LOG = "train.log.jsonl"


@dataclass
class LoopConfig:
    steps: int = 200
    lr: float = 5e-5
    optimizer: str = "adam"  # adam or adamw
    weight_decay: float = 0.0
    grad_accum: int = 1
    max_grad_norm: float = 0.0  # 0: no clipping
    seed: int = 0
    mixed_precision: str = "no"  # no or bf16 (GPU only)
    checkpoint_every: int = 50
    run_dir: str = ""  # where checkpoints and the log go ("" = no checkpoints)
    resume: bool = True  # continue from run_dir's checkpoint when there is one
    progress: bool = True
    # the rollouts' image size in pixels (0: the model's own); a multiple of 8 x the VAE scale (erasekit.image_size)
    height: int = 0
    width: int = 0
    # > 0: train LoRA factors of this rank on the set's Linear weights instead of the tensors themselves
    # (finetune/lora.py); the delta then holds the factors in PEFT's layout
    lora_rank: int = 0

    def __post_init__(self):
        """The loop's own choices, checked when the config is built (before any work)."""
        if self.lora_rank < 0:
            raise UserError(f"lora_rank {self.lora_rank} must be 0 (full tensors) or a rank of at least 1")
        if min(self.height, self.width) < 0:
            raise UserError(f"height {self.height} / width {self.width}: give pixels, or 0 for the model's own")
        if self.mixed_precision not in ("no", "bf16"):
            raise UserError(f"mixed_precision {self.mixed_precision!r} is not supported: use no, or bf16 on a GPU")
        if self.optimizer not in ("adam", "adamw"):
            raise UserError(f"unknown optimizer {self.optimizer!r}: use adam or adamw")


def loop_fields() -> set[str]:
    return set(LoopConfig.__dataclass_fields__)


def split_config(cfg) -> LoopConfig:
    """The loop settings carried by a method config (which holds the LoopConfig fields too)."""
    return LoopConfig(**{k: getattr(cfg, k) for k in loop_fields()})


def rollout_size(model: Model, cfg: LoopConfig) -> tuple[int, int]:
    """The (height, width) in pixels that the method's rollouts and trajectories are sampled at."""
    from ..image_size import resolve

    return resolve(model, cfg.height or None, cfg.width or None)


def rollout_noise(model: Model, cfg: LoopConfig, gen: torch.Generator) -> torch.Tensor:
    """One rollout's starting noise, (1, C, h, w) at rollout_size, drawn from the step's generator."""
    from ..image_size import latent_shape

    noise = torch.randn(latent_shape(model, rollout_size(model, cfg)), generator=gen)[None]
    scale = getattr(model.scheduler, "init_noise_sigma", 1.0)  # a flow sampler (FLUX's) starts at unit noise
    return noise.to(model.device, model.dtype) * scale


def step_generator(seed: int, index: int) -> torch.Generator:
    """The generator of one micro-batch. index = (step * processes + rank) * grad_accum + micro, so two
    processes with accumulation 1 draw exactly what one process with accumulation 2 draws."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(index))


def make_optimizer(params: list[torch.Tensor], cfg: LoopConfig) -> torch.optim.Optimizer:
    """Adam(W) updating one tensor at a time: the multi-tensor path (torch's default on a GPU) makes
    temporaries the size of every trained tensor at once. On a CPU this is torch's default path anyway."""
    if cfg.optimizer not in ("adam", "adamw"):
        raise UserError(f"unknown optimizer {cfg.optimizer!r}: use adam or adamw")
    kind = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return kind(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False)


def _autocast(model: Model, cfg: LoopConfig):
    if cfg.mixed_precision == "no":
        return nullcontext()
    if model.device.type != "cuda":
        return nullcontext()  # mixed precision is a GPU feature; CPU runs in the model's dtype
    return torch.autocast("cuda", dtype=torch.bfloat16)


def backward_now(term: torch.Tensor, cfg: LoopConfig) -> torch.Tensor:
    """Backpropagate one term of a step's loss at once, scaled as the loop scales the whole loss, and return
    it detached. A loss of several terms, each with its own forward through the trained model, calls this on
    each as it is made, so one term's graph is freed before the next is built (peak activations are the
    largest term's, not the sum of all); gradients add, so the step's gradient is the same."""
    if term.requires_grad:
        with torch.autocast(term.device.type, enabled=False):
            (term / cfg.grad_accum).backward()
    return term.detach()


def _distributed():
    from ..evaluation.runner import distributed_state

    return distributed_state()


def run(model: Model, named: dict[str, torch.nn.Parameter], loss_fn: Callable, cfg: LoopConfig,
        describe: dict | None = None, extra=None, zero: ZeroTerms | None = None) -> dict[str, torch.Tensor]:
    """Train the named parameters with loss_fn(step, generator) -> (loss, logs); returns their new values (the
    parameters' own tensors, detached: no copy). The parameters are trained in place; the caller restores them
    (see `train_and_restore`). extra, when given, is more training state (a discriminator and its optimizer)
    with checkpoint() -> (tensors, meta) and restore(tensors, meta), saved and restored with the checkpoint.
    zero, when given, is told every micro-batch's loss and logs (see `ZeroTerms`)."""
    model.require("fine-tuning")
    if cfg.steps < 1 or cfg.grad_accum < 1:
        raise UserError(f"steps ({cfg.steps}) and grad_accum ({cfg.grad_accum}) must be at least 1")
    rollout_size(model, cfg)  # a size the model cannot make is refused before training
    state = _distributed()
    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    main = rank == 0
    params = list(named.values())
    for p in params:
        p.grad = None
        p.requires_grad_(True)
    opt = make_optimizer(params, cfg)
    run_dir = Path(cfg.run_dir) if cfg.run_dir else None
    ckpt = run_dir / "checkpoint.safetensors" if run_dir else None
    start = 0
    if ckpt is not None and cfg.resume and ckpt.is_file():
        groups, meta = load_checkpoint(ckpt, optimizer=opt)
        _check_same_run(meta, describe)
        with torch.no_grad():
            for name, p in named.items():
                p.copy_(groups["params"].pop(name).to(p.device, p.dtype))
        start = meta["step"]
        if extra is not None:
            extra.restore(groups.get("extra", {}), meta.get("extra", {}))
        del groups  # the checkpoint's copy of the trained tensors is not kept beside them
    if main and run_dir is not None:  # the log continues from the checkpoint: no torn line, no step twice
        resume_jsonl(run_dir / LOG, keep=lambda rec: rec.get("step", 0) <= start)
    zero = zero if zero is not None else ZeroTerms()
    bar = tqdm(total=cfg.steps, initial=start, desc="fine-tuning", unit="step", disable=not (cfg.progress and main))
    t0 = time.time()
    for step in range(start, cfg.steps):
        opt.zero_grad(set_to_none=True)
        logs: dict = {}
        for micro in range(cfg.grad_accum):
            gen = step_generator(cfg.seed, (step * world + rank) * cfg.grad_accum + micro)
            with _autocast(model, cfg):
                loss, logs = loss_fn(step, gen)
            zero.add(loss, logs)
            if loss.requires_grad:  # a loss that backpropagated its terms itself (backward_now) returns none
                (loss / cfg.grad_accum).backward()
        if world > 1:
            _average_gradients(params, world)
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        done = step + 1
        bar.set_postfix(loss=f"{float(loss.detach()):.4g}")
        bar.update(1)
        if main and run_dir is not None:
            _log(run_dir, {"step": done, "loss": round(float(loss.detach()), 6), **logs,
                           "elapsed_s": round(time.time() - t0, 2)})
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                groups = {"params": {k: v.detach() for k, v in named.items()}}
                meta = {"step": done, "describe": describe or {}}
                if extra is not None:
                    groups["extra"], meta["extra"] = extra.checkpoint()
                save_checkpoint(ckpt, groups, meta, optimizer=opt)
                del groups
    bar.close()
    del opt  # Adam's moments go before the caller builds its delta
    for p in params:
        p.grad = None
        p.requires_grad_(False)
    return {k: v.detach() for k, v in named.items()}


class ZeroTerms:
    """Whether the loss, and each named term of it (keys of the logs loss_fn returns; a loss names them in
    its `terms` attribute), was zero on every micro-batch of a run."""

    def __init__(self, terms=()):
        self.terms = tuple(terms)
        self.steps = 0
        self.loss_zero = True
        self.zero = dict.fromkeys(self.terms, True)
        self.last_loss = 0.0

    def add(self, loss, logs: dict) -> None:
        self.steps += 1
        self.last_loss = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        self.loss_zero = self.loss_zero and self.last_loss == 0.0
        for term in self.terms:
            self.zero[term] = self.zero[term] and float(logs.get(term, 0.0)) == 0.0

    def describe(self) -> str:
        if self.steps == 0:
            return "no step ran in this process (resumed from a finished checkpoint)"
        zero = [t for t, z in self.zero.items() if z]
        nonzero = [t for t, z in self.zero.items() if not z]
        if self.loss_zero:
            out = f"the loss was 0.0 on every one of {self.steps} micro-batches"
        else:
            out = f"the loss was not zero (last {self.last_loss:.4g}): lr or the gradient's mask may be zero"
        if zero:
            out += f"; zero on every step: {', '.join(zero)}"
        if nonzero and self.loss_zero:
            out += f"; not always zero: {', '.join(nonzero)}"
        return out


def trainable(model: Model, cfg, parameters: str | None = None) -> tuple[dict[str, torch.nn.Parameter], Frozen]:
    """What a run trains and its frozen teacher: the tensors of the parameter set (cfg.parameters unless given),
    or, with cfg.lora_rank, LoRA factors on its Linear weights (hooked into the model until the run ends)."""
    from .lora import LoRA
    from .params import select

    named = select(model, parameters or cfg.parameters)
    if not getattr(cfg, "lora_rank", 0):
        return named, Frozen(model, named)
    lora = LoRA(model, named, cfg.lora_rank, cfg.seed)
    return lora.factors, Frozen(model, lora.factors, lora=lora)


def make_delta(model: Model, new: dict[str, torch.Tensor], frozen: Frozen, method: str, config: dict,
               stats: dict):
    """The run's delta: the trained tensors, or the LoRA factors (PEFT layout) when it trained factors."""
    from ..delta import Delta

    if frozen.lora is None:
        return Delta.from_changes(model, new, method, config, stats)
    return Delta.from_factors(model, new, frozen.lora.targets, method, config,
                              {**stats, "lora_rank": frozen.lora.rank})


def no_lora(cfg, method: str) -> None:
    """One line for a method that trains full tensors only."""
    if getattr(cfg, "lora_rank", 0):
        raise UserError(f"{method} trains full tensors only: drop lora_rank (LoRA factors run with esd, score and "
                        "advunlearn)")


def train_and_restore(model: Model, named: dict[str, torch.nn.Parameter], frozen: Frozen, loss_fn, cfg,
                      describe: dict, extra=None) -> dict[str, torch.Tensor]:
    """Run the loop with only `named` trainable, then put the starting values back so a Delta can be made
    against them; returns the trained values. frozen holds those starting values (frozen.start): the trained
    tensors are handed out as they are and the parameters take frozen's tensors again, so no copy of either
    is made. Warns when nothing changed: such a delta equals its base."""
    loop_cfg = split_config(cfg)
    zero = ZeroTerms(getattr(loss_fn, "terms", ()))
    try:
        with only_these_trainable(model, named), model.distilled_guidance(getattr(cfg, "guidance", None)):
            new = run(model, named, loss_fn, loop_cfg, describe, extra, zero)
    finally:
        with torch.no_grad():
            for k, p in named.items():
                p.data = frozen.start[k]
        frozen.release()
    unchanged = [k for k, v in new.items() if torch.equal(v, frozen.start[k])]
    if len(unchanged) == len(new):
        method = (describe or {}).get("method", "fine-tuning")
        warnings.warn(f"{method} changed none of its {len(new)} trained tensors in {loop_cfg.steps} steps, so its "
                      f"delta equals the base model: {zero.describe()}; nothing is erased by it: change "
                      "the settings that make the loss or its gradient zero (lr, margin, the concept's prompts)",
                      stacklevel=2)
    return new


def _average_gradients(params, world: int) -> None:
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad.div_(world)


def _check_same_run(meta: dict, describe: dict | None) -> None:
    before = meta.get("describe") or {}
    if describe is not None and before and before != json.loads(json.dumps(describe)):
        raise UserError("the checkpoint in the run folder belongs to another run (method, concepts or settings "
                        "differ): choose another --set run_dir=DIR or pass --set resume=false to start over")


def _log(run_dir: Path, record: dict) -> None:
    append_jsonl(run_dir / LOG, record)


def record(cfg: LoopConfig) -> dict:
    out = asdict(cfg)
    out.pop("progress", None)
    return out


def write_summary(run_dir: str, summary: dict) -> None:
    if run_dir:
        atomic_write_json(Path(run_dir) / "summary.json", summary)
