"""`erasekit attack`: run one attack on every prompt of a suite's target set against an erased model,
judge the erased model's image before and after, and write results.json (pre-ASR, ASR and every
adversarial prompt with its outcome, so the run can be replayed) and report.html.

Progress is kept per prompt (attack_progress.jsonl): a killed run continues where it stopped, and each
prompt's attack draws from its own seeded generator, so the result does not depend on interruptions.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..checkpoint import atomic_write, atomic_write_text
from ..errors import UserError
from ..evaluation.cache import ImageCache, image_key
from ..evaluation.protocol import check_run_dir, package_versions, weights_hash
from ..evaluation.runner import Settings, Variant, sampling_batches
from ..stats import rate_ci
from .common import AttackContext, seeded

PROGRESS = "attack_progress.jsonl"


def target_set(suite, name: str | None):
    if name:
        return suite.set(name)
    for pset in suite.sets:
        if pset.role == "target":
            return pset
    raise UserError(f"suite {suite.name} has no target prompts to attack: choose a suite with target prompts")


def _generate(ctx: AttackContext, cache: ImageCache, prompts, keys, erased: bool) -> torch.Tensor:
    """Images for prompts (cached by key), from the erased model when erased else the original."""
    todo = [i for i, k in enumerate(keys) if not cache.has(k)]
    for guidance, batch in sampling_batches([prompts[i] for i in todo], ctx.settings):
        chunk = [todo[j] for j in batch]
        texts, seeds = [prompts[i].text for i in chunk], [prompts[i].seed for i in chunk]
        with ctx.erased_model() if erased else nullcontext():
            images = ctx.generate(texts, seeds, guidance=guidance, model=None if erased else ctx.original)
        cache.put([keys[i] for i in chunk], images)
    return cache.get(keys)


def _read_progress(path: Path) -> dict[int, dict]:
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut off by a kill
            done[rec["index"]] = rec
    return done


def run_attack(ctx: AttackContext, attack, cfg, suite, set_name: str | None, out: Path, resume: bool = False,
               overwrite: bool = False, progress: bool = True) -> dict:
    model, settings = ctx.model, ctx.settings
    pset = target_set(suite, set_name)
    model_hash = weights_hash(model)
    protocol = {"model": {**model.identity(), "weights_hash": model_hash}, "erased": ctx.erased.record(),
                "attack": attack.name, "config": asdict(cfg), "suite": suite.record(), "set": pset.name,
                "sampler": {"scheduler": "DDIM (eta 0)", "steps": settings.steps, "guidance": settings.guidance,
                            "negative_prompt": settings.negative_prompt},
                "dtype": settings.dtype, "judge": ctx.judge.record(), "concepts": list(ctx.concepts),
                "packages": package_versions()}
    original_hash = model_hash
    if ctx.reference is not None:  # recorded only then, so other runs' protocols (and folders) are unchanged
        original_hash = weights_hash(ctx.reference)
        protocol["reference"] = {**ctx.reference.identity(), "weights_hash": original_hash}
    protected = [Path(model.source)] if Path(model.source).is_dir() else []
    prepared = attack.prepare(ctx, suite, cfg) if attack.prepare else None  # its errors before any folder
    if not check_run_dir(out, protocol, resume=resume, overwrite=overwrite, protected=protected):
        (out / PROGRESS).unlink(missing_ok=True)  # another run's verdicts (another delta or config): attack anew
    cache = ImageCache(out / "cache")
    prompts = list(pset.prompts)
    key = {"original": (original_hash, []), "erased": (model_hash, ctx.erased.hashes())}

    def keys(kind):
        return [image_key(*key[kind], p.text, p.seed, settings.for_prompt(p)) for p in prompts]

    original_keys, before_keys = keys("original"), keys("erased")
    flagged_original = ctx.flags(_generate(ctx, cache, prompts, original_keys, False), prompts)
    flagged_before = ctx.flags(_generate(ctx, cache, prompts, before_keys, True), prompts)
    done = _read_progress(out / PROGRESS)
    bar = tqdm(total=len(prompts), initial=len(done), desc=attack.name, unit="prompt", disable=not progress)
    for i, p in enumerate(prompts):
        if i in done:
            continue
        rec = _attack_one(ctx, attack, cfg, cache, out, model_hash, i, p, flagged_original[i], flagged_before[i],
                          prepared, original_keys[i], before_keys[i])
        with open(out / PROGRESS, "a") as f:
            f.write(json.dumps(rec) + "\n")
        done[i] = rec
        bar.update(1)
    bar.close()
    records = [done[i] for i in range(len(prompts))]
    results = _results(protocol, records)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    attacked = [r["seconds"] for r in records if r["attacked"]]
    timing = {"attacked_prompts": len(attacked),
              "seconds_per_attacked_prompt": round(sum(attacked) / len(attacked), 3) if attacked else None}
    atomic_write_text(out / "timing.json", json.dumps(timing, indent=2) + "\n")
    results["_timing"] = timing
    from .report import write_attack_report

    write_attack_report(out / "report.html", results, cache)
    return results


def _attack_one(ctx, attack, cfg, cache, out, model_hash, i, p, flagged_original, flagged_before, prepared,
                original_key, before_key) -> dict:
    rec = {"index": i, "original_prompt": p.text, "seed": p.seed, "flagged_original": flagged_original,
           "flagged_before": flagged_before, "original_key": original_key, "before_key": before_key}
    if flagged_before:
        return {**rec, "adversarial_prompt": p.text, "flagged_after": True, "attacked": False,
                "reason": "flagged without attack", "after_key": before_key, "seconds": 0.0}
    if attack.ideal_only and not flagged_original:
        return {**rec, "adversarial_prompt": p.text, "flagged_after": False, "attacked": False,
                "reason": "not ideal: the original model does not show the concept", "after_key": before_key,
                "seconds": 0.0}
    start = time.time()
    gen = seeded(cfg.seed, i)
    found = attack.run(ctx, p, cfg, gen, prepared) if attack.prepare else attack.run(ctx, p, cfg, gen)
    guidance = ctx.settings.for_prompt(p)["guidance"]
    extra_key = {}
    if found.embedding is not None:
        emb_file = out / "embeddings" / f"{i:05d}.safetensors"
        emb_file.parent.mkdir(exist_ok=True)
        atomic_write(emb_file, lambda tmp: save_file({"embedding": found.embedding.detach().cpu().contiguous()},
                                                     str(tmp)))
        extra_key = {"embedding_file": str(emb_file.relative_to(out))}
    after_key = image_key(model_hash, ctx.erased.hashes(), found.text, p.seed,
                          {**ctx.settings.for_prompt(p), **extra_key})
    with ctx.erased_model():
        image = ctx.generate([found.text], [p.seed], embeddings=found.embedding, guidance=guidance)
    cache.put([after_key], image)
    flagged_after = ctx.flags(image, [p])[0]
    return {**rec, "adversarial_prompt": found.text, "adversarial_ids": found.ids, **extra_key,
            "flagged_after": flagged_after, "attacked": True, "loss": found.loss, "after_key": after_key,
            "seconds": round(time.time() - start, 3)}


def _results(protocol: dict, records: list[dict]) -> dict:
    n = len(records)
    before = sum(r["flagged_before"] for r in records)
    after = sum(r["flagged_before"] or r["flagged_after"] for r in records)
    attacked = [r for r in records if r["attacked"]]
    ideal = [r for r in records if r["flagged_original"] and not r["flagged_before"]]
    public = [{k: v for k, v in r.items() if k != "seconds"} for r in records]
    pre_asr, asr = round(before / n, 4), round(after / n, 4)
    on_ideal = round(sum(r["flagged_after"] for r in ideal) / len(ideal), 4) if ideal else None
    return {"protocol": protocol, "attack": protocol["attack"], "n": n,
            "pre_asr": pre_asr, "pre_asr_ci": rate_ci(pre_asr, n), "asr": asr, "asr_ci": rate_ci(asr, n),
            "ideal_prompts": len(ideal), "asr_on_ideal": on_ideal, "asr_on_ideal_ci": rate_ci(on_ideal, len(ideal)),
            "attacked": len(attacked), "prompts": public}


def make_context(model, variant: Variant, judge, concepts, settings: Settings, reference=None) -> AttackContext:
    """The context of attacks on model with variant's deltas (none for a model trained without the concept),
    against reference as the original when given (else the model without the deltas)."""
    if reference is not None and tuple(reference.latent_shape) != tuple(model.latent_shape):
        raise UserError(f"the reference model {reference.source} makes latents of shape {reference.latent_shape}, "
                        f"the attacked model {model.source} {model.latent_shape}: attack against a reference of the "
                        "same architecture")
    return AttackContext(model, variant, judge, tuple(concepts), settings, reference=reference)
