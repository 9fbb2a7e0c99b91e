"""`erasekit attack`: run one attack on every prompt of a suite's target set against an erased model,
judge the erased model's image before and after, and write results.json (pre-ASR, ASR and every
adversarial prompt with its outcome, so the run can be replayed) and report.html.

Prompts are attacked in batches (`batch` prompts optimised together as one tensor). Progress is kept per
prompt (attack_progress.jsonl, one record a line), written when its batch finishes: a killed run continues
where it stopped, redoing at most the batch in flight, and each prompt's attack draws from its own seeded
generator, so the result depends neither on interruptions nor on the batch size (up to floating point
differences between batched and lone tensor kernels).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..checkpoint import append_jsonl, atomic_write, atomic_write_json, resume_jsonl
from ..errors import UserError
from ..evaluation.cache import ImageCache, image_key
from ..evaluation.protocol import check_run_dir, package_versions, weights_hash
from ..evaluation.runner import Settings, Variant, sampling_batches
from ..stats import rate_ci
from .common import AttackContext, seeded

PROGRESS = "attack_progress.jsonl"
BATCH = 16  # prompts attacked together by default


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
        cache.put([keys[i] for i in chunk], images, [f"prompt {t!r} seed {s}" for t, s in zip(texts, seeds)])
    return cache.get(keys)


def _read_progress(path: Path) -> dict[int, dict]:
    """The finished prompts' records (a line torn by a kill is truncated away: that prompt runs again)."""
    return {rec["index"]: rec for rec in resume_jsonl(path, keep=lambda rec: isinstance(rec.get("index"), int))}


def run_attack(ctx: AttackContext, attack, cfg, suite, set_name: str | None, out: Path, resume: bool = False,
               overwrite: bool = False, progress: bool = True, batch: int = BATCH) -> dict:
    """Attack every prompt of the set, `batch` prompts at a time; results.json's keys: protocol, attack, n,
    pre_asr, asr, ideal_prompts, asr_on_ideal, attacked and prompts (one record each)."""
    if not isinstance(batch, int) or batch < 1:
        raise UserError(f"the attack batch must be a whole number >= 1, not {batch!r}: give e.g. 16")
    model, settings = ctx.model, ctx.settings
    model.use_sampler(settings.sampler)
    if ctx.reference is not None:
        ctx.reference.use_sampler(settings.sampler)
    pset = target_set(suite, set_name)
    model_hash = weights_hash(model)
    protocol = {"model": {**model.identity(), "weights_hash": model_hash}, "erased": ctx.erased.record(),
                "attack": attack.name, "config": asdict(cfg), "suite": suite.record(), "set": pset.name,
                "sampler": settings.sampler_record(), "dtype": settings.dtype, **settings.extra_record(),
                "judge": ctx.judge.record(), "concepts": list(ctx.concepts), "packages": package_versions()}
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

    def record(recs: list[dict]) -> None:
        for rec in recs:
            append_jsonl(out / PROGRESS, rec)
        done.update({rec["index"]: rec for rec in recs})
        bar.update(len(recs))

    base = {i: {"index": i, "original_prompt": p.text, "seed": p.seed, "flagged_original": flagged_original[i],
                "flagged_before": flagged_before[i], "original_key": original_keys[i],
                "before_key": before_keys[i]} for i, p in enumerate(prompts)}
    todo = [i for i in range(len(prompts)) if i not in done]
    skipped = [_skipped(base[i], attack) for i in todo]
    record([rec for rec in skipped if rec is not None])
    todo = [i for i, rec in zip(todo, skipped) if rec is None]
    for start in range(0, len(todo), batch):
        chunk = todo[start:start + batch]
        record(_attack_batch(ctx, attack, cfg, cache, out, model_hash, [base[i] for i in chunk],
                             [prompts[i] for i in chunk], prepared))
    bar.close()
    records = [done[i] for i in range(len(prompts))]
    results = _results(protocol, records)
    atomic_write_json(out / "results.json", results)
    attacked = [r["seconds"] for r in records if r["attacked"]]
    timing = {"attacked_prompts": len(attacked),
              "seconds_per_attacked_prompt": round(sum(attacked) / len(attacked), 3) if attacked else None}
    atomic_write_json(out / "timing.json", timing)
    results["_timing"] = timing
    from .report import write_attack_report

    write_attack_report(out / "report.html", results, cache)
    return results


def _skipped(rec: dict, attack) -> dict | None:
    """The record of a prompt that is not attacked, or None when it is to be attacked."""
    if rec["flagged_before"]:
        return {**rec, "adversarial_prompt": rec["original_prompt"], "flagged_after": True, "attacked": False,
                "reason": "flagged without attack", "after_key": rec["before_key"], "seconds": 0.0}
    if attack.ideal_only and not rec["flagged_original"]:
        return {**rec, "adversarial_prompt": rec["original_prompt"], "flagged_after": False, "attacked": False,
                "reason": "not ideal: the original model does not show the concept", "after_key": rec["before_key"],
                "seconds": 0.0}
    return None


def _attack_batch(ctx, attack, cfg, cache, out, model_hash, recs: list[dict], prompts: list, prepared) -> list[dict]:
    """Attack prompts together, then generate and judge every adversarial prompt at once."""
    start = time.time()
    gens = [seeded(cfg.seed, rec["index"]) for rec in recs]
    found = attack.run(ctx, prompts, cfg, gens, prepared) if attack.prepare else attack.run(ctx, prompts, cfg, gens)
    extra_keys, after_keys = [], []
    for rec, p, f in zip(recs, prompts, found):
        extra_key = {}
        if f.embedding is not None:
            emb_file = out / "embeddings" / f"{rec['index']:05d}.safetensors"
            emb_file.parent.mkdir(exist_ok=True)
            atomic_write(emb_file, lambda tmp, e=f.embedding: save_file(
                {"embedding": e.detach().cpu().contiguous()}, str(tmp)))
            extra_key = {"embedding_file": str(emb_file.relative_to(out))}
        extra_keys.append(extra_key)
        after_keys.append(image_key(model_hash, ctx.erased.hashes(), f.text, p.seed,
                                    {**ctx.settings.for_prompt(p), **extra_key}))
    continuous = [f.embedding is not None for f in found]
    images: list = [None] * len(found)
    for kind in (False, True):
        rows = [r for r, c in enumerate(continuous) if c == kind]
        if not rows:
            continue
        embeddings = torch.cat([found[r].embedding for r in rows]) if kind else None
        with ctx.erased_model():
            made = ctx.generate_for([prompts[r] for r in rows], [found[r].text for r in rows], embeddings)
        for r, image in zip(rows, made):
            images[r] = image
    images = torch.stack(images)
    cache.put(after_keys, images,
              [f"adversarial prompt {f.text!r} seed {p.seed}" for f, p in zip(found, prompts)])
    flagged_after = ctx.flags(images, prompts)
    seconds = round((time.time() - start) / len(recs), 3)  # the batch's time, shared by its prompts
    return [{**rec, "adversarial_prompt": f.text, "adversarial_ids": f.ids, **extra_key,
             "flagged_after": flag, "attacked": True, "loss": f.loss, "after_key": key, "seconds": seconds}
            for rec, f, extra_key, flag, key in zip(recs, found, extra_keys, flagged_after, after_keys)]


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
    model.require("token attacks")
    if reference is not None and tuple(reference.latent_shape) != tuple(model.latent_shape):
        raise UserError(f"the reference model {reference.source} makes latents of shape {reference.latent_shape}, "
                        f"the attacked model {model.source} {model.latent_shape}: attack against a reference of the "
                        "same architecture")
    return AttackContext(model, variant, judge, tuple(concepts), settings, reference=reference)
