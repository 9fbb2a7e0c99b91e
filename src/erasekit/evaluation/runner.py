"""`erasekit evaluate` / `erasekit compare`: generate a suite's images per model variant (cached by
content hash, sharded over accelerate processes), judge them and write results.json and report.html.

A variant is the base model with zero or more deltas applied together ("original" has none).
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import samplers
from ..checkpoint import atomic_write_json
from ..delta import Delta, tensor_hash
from ..errors import UserError
from ..model import Model
from .cache import ImageCache, image_key
from .protocol import check_run_dir, package_versions, weights_hash
from .suites import Suite, SuitePrompt

RESULTS, REPORT, MARKER = "results.json", "report.html", "run.json"


@dataclass
class Variant:
    name: str
    deltas: tuple[Delta, ...] = ()
    paths: tuple[str, ...] = ()

    def hashes(self) -> list[str]:
        return [tensor_hash(d.tensors) for d in self.deltas]

    def record(self) -> dict:
        return {"name": self.name, "deltas": [{"path": p, "method": d.method, "config": d.config, "hash": h}
                                              for p, d, h in zip(self.paths, self.deltas, self.hashes())]}

    def applied(self, model: Model) -> ExitStack:
        stack = ExitStack()
        for delta in self.deltas:
            stack.enter_context(delta.applied(model))
        return stack


@dataclass
class Settings:
    steps: int
    guidance: float  # the default; a prompt may carry its own
    negative_prompt: str = ""
    batch_size: int = 32
    dtype: str = "torch.float32"
    height: int | None = None  # image size in pixels; None: the model's own
    width: int | None = None
    sampler: str = samplers.DEFAULT  # erasekit.samplers name (a family's own sampler: its title)
    preset: dict | None = None  # the --protocol preset's record (evaluation.presets), None without one
    deviations: tuple[str, ...] = ()  # where the run departs from what was asked (dtype on the CPU, ...)

    @classmethod
    def for_model(cls, model: Model, batch_size: int = 32, height: int | None = None, width: int | None = None,
                  **overrides) -> Settings:
        """The model's own sampler defaults (steps, guidance), image size and dtype, with any field overridden;
        a size the model's VAE cannot make is refused here, before any work."""
        from ..image_size import resolve

        height, width = resolve(model, height, width)
        values = {"steps": model.sampler_defaults["steps"], "guidance": model.sampler_defaults["guidance"],
                  "batch_size": batch_size, "dtype": str(model.dtype), "height": height, "width": width,
                  "sampler": model.sampler}
        return cls(**{**values, **overrides})

    @property
    def size(self) -> tuple[int, int] | None:
        return None if self.height is None else (self.height, self.width)

    def for_prompt(self, prompt: SuitePrompt) -> dict:
        """One image's sampler settings: its cache key and its record."""
        guidance = self.guidance if prompt.guidance is None else float(prompt.guidance)
        return {"steps": self.steps, "guidance": guidance, "negative_prompt": self.negative_prompt,
                "scheduler": samplers.title(self.sampler), "dtype": self.dtype, "height": self.height,
                "width": self.width}

    def sampler_record(self) -> dict:
        """The sampler part of a results file's protocol record."""
        return {"scheduler": samplers.title(self.sampler), "steps": self.steps, "guidance": self.guidance,
                "negative_prompt": self.negative_prompt, "height": self.height, "width": self.width}

    def extra_record(self) -> dict:
        """The preset and deviations, recorded only when there are any (so other runs' records are unchanged)."""
        return {**({"preset": self.preset} if self.preset else {}),
                **({"deviations": list(self.deviations)} if self.deviations else {})}


@dataclass(frozen=True)
class Item:
    """One image of the run: a variant, a prompt of a set, and its cache key."""
    variant: str
    set_name: str
    index: int
    prompt: SuitePrompt
    key: str


@dataclass
class Plan:
    variants: list[Variant]
    items: list[Item] = field(default_factory=list)

    def of(self, variant: str, set_name: str) -> list[Item]:
        return [i for i in self.items if i.variant == variant and i.set_name == set_name]


def make_plan(model_hash: str, variants: list[Variant], suite: Suite, settings: Settings) -> Plan:
    plan = Plan(variants)
    for variant in variants:
        hashes = variant.hashes()
        for pset in suite.sets:
            for i, p in enumerate(pset.prompts):
                key = image_key(model_hash, hashes, p.text, p.seed, settings.for_prompt(p))
                plan.items.append(Item(variant.name, pset.name, i, p, key))
    return plan


def warn_if_one_of_several() -> None:
    """`accelerate launch --num_processes 2` without --multi_gpu runs one process (accelerate sets MASTER_ADDR
    for the processes asked for, but no WORLD_SIZE): say so once instead of running alone in silence."""
    global _WARNED_ONE
    if "ACCELERATE_MIXED_PRECISION" in os.environ and "MASTER_ADDR" in os.environ and not _WARNED_ONE:
        _WARNED_ONE = True
        warnings.warn("accelerate launch asked for several processes but only one runs: pass --multi_gpu (on a "
                      "CPU machine too: accelerate launch --multi_gpu --num_processes 2 -m erasekit ...)", stacklevel=2)


_WARNED_ONE = False


def distributed_state():
    """accelerate's process state when launched with several processes, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        warn_if_one_of_several()
        return None
    from accelerate import PartialState

    # without cpu=True, accelerate on a machine with no GPU sets up no process group (each process then
    # believes it is alone and generates everything); `accelerate launch --cpu` sets ACCELERATE_USE_CPU
    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not torch.cuda.is_available()
    return PartialState(cpu=cpu)


def sampling_batches(prompts: list[SuitePrompt], settings: Settings) -> list[tuple[float, list[int]]]:
    """(guidance, indices of prompts) per sampling batch: prompts sharing a guidance scale (their own or
    the default) together, at most settings.batch_size at a time."""
    guidance_of = [settings.for_prompt(p)["guidance"] for p in prompts]
    out = []
    for guidance in sorted(set(guidance_of)):
        group = [i for i, g in enumerate(guidance_of) if g == guidance]
        out += [(guidance, group[s:s + settings.batch_size]) for s in range(0, len(group), settings.batch_size)]
    return out


def generate_missing(model: Model, plan: Plan, cache: ImageCache, settings: Settings, state=None,
                     progress: bool = True) -> int:
    """Generate every planned image not in the cache (this process's share of them); returns how many."""
    todo = [i for i in plan.items if not cache.has(i.key)]
    todo = list({i.key: i for i in todo}.values())  # the same image planned twice is generated once
    if state is not None:
        state.wait_for_everyone()  # every process lists what is missing before any of them writes to the cache
        todo = todo[state.process_index::state.num_processes]
    bar = tqdm(total=len(todo), desc="generating", unit="img", disable=not progress or not todo)
    for variant in plan.variants:
        mine = [i for i in todo if i.variant == variant.name]
        if not mine:
            continue
        with variant.applied(model):
            for guidance, batch in sampling_batches([i.prompt for i in mine], settings):
                chunk = [mine[j] for j in batch]
                images = model.sample([i.prompt.text for i in chunk], [i.prompt.seed for i in chunk],
                                      steps=settings.steps, guidance=guidance,
                                      negative_prompt=settings.negative_prompt,
                                      batch_size=settings.batch_size, progress=False, size=settings.size)
                cache.put([i.key for i in chunk], images,
                          [f"{variant.name}: prompt {i.prompt.text!r} seed {i.prompt.seed}" for i in chunk])
                bar.update(len(chunk))
    bar.close()
    return len(todo)


def protocol_record(model: Model, model_hash: str, variants: list[Variant], suite: Suite, judge,
                    settings: Settings, quality=None) -> dict:
    from .measure import Quality

    quality = quality or Quality()
    return {
        "model": {**model.identity(), "weights_hash": model_hash},
        "variants": [v.record() for v in variants],
        "sampler": {**settings.sampler_record(),
                    "guidance_note": "a prompt's own guidance (from its file) overrides this default"},
        "dtype": settings.dtype,
        **settings.extra_record(),
        "suite": suite.record(),
        "seeds": {s.name: [p.seed for p in s.prompts] for s in suite.sets},
        "judge": judge.record(),
        **quality.record(model, judge),
        "packages": package_versions(),
    }


def evaluate(model: Model, variants: list[Variant], suite: Suite, judge, out: Path, settings: Settings,
             resume: bool = False, overwrite: bool = False, real_images: Path | None = None,
             progress: bool = True, quality=None) -> dict | None:
    """Run the evaluation into out; returns the results on the main process (None on the others)."""
    from .measure import measure
    from .report import write_report

    state = distributed_state()
    main = state is None or state.is_main_process
    start = time.time()
    model.use_sampler(settings.sampler)
    model_hash = weights_hash(model)
    protocol = protocol_record(model, model_hash, variants, suite, judge, settings, quality)
    if main:
        check_run_dir(out, protocol, resume=resume, overwrite=overwrite, protected=_protected(model))
    if state is not None:
        state.wait_for_everyone()
    cache = ImageCache(out / "cache")
    plan = make_plan(model_hash, variants, suite, settings)
    before = len({i.key for i in plan.items if cache.has(i.key)})
    generated = generate_missing(model, plan, cache, settings, state, progress)
    if state is not None:
        state.wait_for_everyone()
    if not main:
        return None
    results = {"protocol": protocol, **measure(model, plan, cache, suite, judge, real_images, quality, settings)}
    atomic_write_json(out / RESULTS, results)
    write_report(out / REPORT, results, cache)
    timing = {"wall_time_s": round(time.time() - start, 1), "images_planned": len(plan.items),
              "images_cached_before": before, "images_generated_here": generated,
              "processes": 1 if state is None else state.num_processes}
    atomic_write_json(out / "timing.json", timing)
    results["_timing"] = timing
    return results


def _protected(model: Model) -> list[Path]:
    return [Path(model.source)] if Path(model.source).is_dir() else []


def load_variants(delta_paths: list[str], stacked: bool, base: Model | None = None) -> list[Variant]:
    """evaluate: the original and one variant with every delta applied together (stacked);
    compare: the original and one variant per delta. base: the model they are read against (an erased model
    folder or LoRA weights need it)."""
    variants = [Variant("original")]
    deltas = [(str(p), Delta.load(p, base=base)) for p in delta_paths]
    if not deltas:
        return variants
    if stacked:
        return variants + [Variant("edited", tuple(d for _, d in deltas), tuple(p for p, _ in deltas))]
    names: set[str] = {"original"}
    for path, delta in deltas:
        name = _unique(Path(path).stem, names)
        variants.append(Variant(name, (delta,), (path,)))
    return variants


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 2
    while candidate in taken:
        candidate, n = f"{name}-{n}", n + 1
    taken.add(candidate)
    return candidate


def require_suite_judge(suite: Suite, judge) -> Suite:
    """The suite with the concepts the judge looks for: a prompt file that names none takes the judge's one
    concept (nudenet: nudity); a judge with several, or one that reads concepts in words, needs --concept."""
    from .judges import listing

    if not suite.concepts:
        if len(judge.concepts) != 1:
            known = f"one of {listing(judge.concepts)}" if judge.concepts else "the concept in words"
            raise UserError(f"suite {suite.name} names no concept and judge {judge.name!r} knows "
                            f"{'several' if judge.concepts else 'any named one'}: pass --concept ({known})")
        return dataclasses.replace(suite, concepts=tuple(judge.concepts))
    judge.use_concepts(suite.concepts)
    return suite


def default_dtype_name(model: Model) -> str:
    return str(model.dtype) if hasattr(model, "dtype") else str(torch.float32)
