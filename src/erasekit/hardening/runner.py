"""Hardening any erasure method against attack: rounds of erase, attack on a training prompt set, and erase
again with every adversarial prompt that brought the concept back added to the target's phrases.

Round r erases with the spec as it stands (the user's phrases plus every adversarial pair found so far),
runs one attack on the training prompts against that delta, and keeps the prompts whose attack revived
the concept (flagged after, not before), each paired with the prompt it should have produced: the same
text with the concept's phrase replaced by the anchor (`anchored`). The pairs enter every method through
ConceptSpec.pairs(), as given (never expanded by templates). After the last round (or a round that revives nothing) the
method erases once more from the base model with everything found; that delta is the result, and it
records each round's ASR and the prompts it added.

The training prompts must not be the prompts an audit attacks: on the testbed they are the concept's
canonical prompts drawn from seeds no suite uses, with every text of the default testbed suite (64
prompts per set; an audit with more --samples may attack some of them) removed; elsewhere they are the
user's own file, and keeping it apart from the audit's is theirs.
Each round's delta and attack live in the run folder, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..checkpoint import atomic_write_json
from ..concepts import ConceptSpec
from ..delta import Delta
from ..errors import UserError
from ..evaluation.suites import PromptSet, Suite, SuitePrompt

TRAINING_SEED = 9000  # the testbed's hardening prompts' first seed (suites use 2000 and 3000)
EXCLUDED_SAMPLES = 64  # texts of a testbed suite of this size (the default) are kept out of the training prompts


def training_suite(model, spec: ConceptSpec, n: int) -> Suite:
    """The testbed's training prompts for the spec's targets: canonical prompts from TRAINING_SEED on, none of
    whose texts appears in the testbed suite of the same concepts (EXCLUDED_SAMPLES prompts per set)."""
    from ..evaluation.suites import load_suite

    if model.world is None:
        raise UserError("hardening needs training prompts: give --suite FILE (prompts of the concept that the audit "
                        "will not attack); only the testbed draws its own")
    names = [t.name for t in spec.targets]
    audited = load_suite("testbed:" + "+".join(names), samples=EXCLUDED_SAMPLES)
    taken = {p.text for s in audited.sets for p in s.prompts}
    prompts, seed = [], TRAINING_SEED
    for name in names:
        found = 0
        while found < n:
            for p in model.world.concept_prompts(name, "canonical", n, seed):
                if found < n and p.text not in taken:
                    prompts.append(SuitePrompt(p.text, int(p.seed), values=dict(p.values)))
                    taken.add(p.text)
                    found += 1
            seed += n
            if seed > TRAINING_SEED + 1000 * n:
                raise UserError(f"could not draw {n} training prompts of {name} outside the testbed suites: "
                                "ask for fewer (--prompts K)")
    target = PromptSet("target:training", "target", tuple(prompts))
    return Suite("testbed-training:" + "+".join(names), tuple(names), "testbed", (target,), "testbed", "testbed")


def spec_with(spec: ConceptSpec, found: list[dict]) -> ConceptSpec:
    """The spec with hardening's adversarial pairs (prompt -> the same prompt anchored) added."""
    data = spec.to_dict()
    data["adversarial"] = [*spec.adversarial, *found]
    return ConceptSpec.from_dict(data, source="hardening")


def anchored(text: str, original: str, phrases: list[str], anchor: str) -> str:
    """The prompt an adversarial one should have produced: the adversarial text with the first target phrase
    in it replaced by the anchor; when it holds none (P4D-N replaces the whole prompt), the original prompt
    with its phrase replaced."""
    import re

    for source in (text, original):
        for phrase in sorted(phrases, key=len, reverse=True):
            pattern = re.compile(rf"(?<!\w){re.escape(phrase)}(?!\w)", re.IGNORECASE)
            if pattern.search(source):
                return " ".join(pattern.sub(anchor, source, count=1).split())
    return anchor


def revived(results: dict, spec: ConceptSpec) -> list[dict]:
    """Adversarial pairs from the prompts whose attack brought the concept back (attacked, flagged after)."""
    target, anchor = spec.targets[0], spec.anchor_per_target()[0]
    return [{"target": p["adversarial_prompt"], "concept": target.name,
             "anchor": anchored(p["adversarial_prompt"], p["original_prompt"], target.phrases, anchor)}
            for p in results["prompts"] if p.get("attacked") and p.get("flagged_after")]


def harden(model, method, spec: ConceptSpec, cfg, attack, attack_cfg, suite: Suite, judge, settings,
           run_dir: Path, rounds: int, resume: bool = False, overwrite: bool = False,
           batch: int | None = None) -> tuple[Delta, dict]:
    """(the hardened delta, its record): see the module docstring."""
    from ..attacks.runner import BATCH, make_context, run_attack
    from ..evaluation.runner import Variant

    if len(spec.targets) != 1:
        raise UserError(f"hardening erases one concept at a time, not {len(spec.targets)}: harden each target "
                        "separately and compose the deltas")
    run_dir = Path(run_dir)
    history, added = [], []
    for r in range(1, rounds + 1):
        here = run_dir / f"round-{r}"
        delta = _erase(model, method, spec_with(spec, added), cfg, here / "delta.safetensors", resume)
        ctx = make_context(model, Variant(f"round-{r}", (delta,), (str(here / "delta.safetensors"),)), judge,
                           suite.concepts, settings)
        results = run_attack(ctx, attack, attack_cfg, suite, None, here / "attack", resume=resume,
                             overwrite=overwrite, batch=BATCH if batch is None else batch)
        seen = {a["target"] for a in added}
        found = [a for a in revived(results, spec) if a["target"] not in seen]
        history.append({"round": r, "asr": results["asr"], "asr_ci": results["asr_ci"], "n": results["n"],
                        "attacked": results["attacked"], "added": found})
        added += found
        if not found:
            break
    final = _erase(model, method, spec_with(spec, added), cfg, run_dir / "final.safetensors", resume)
    record = {"attack": attack.name, "training_suite": suite.name, "training_prompts": len(suite.sets[0].prompts),
              "rounds": history, "adversarial_prompts_added": len(added)}
    final.config["hardening"] = record
    atomic_write_json(run_dir / "hardening.json", record)
    return final, record


def _erase(model, method, spec: ConceptSpec, cfg, path: Path, resume: bool) -> Delta:
    """method's delta for spec, read back from path when a resumed run already made it for the same spec."""
    digest = hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode()).hexdigest()
    if resume and path.is_file():
        delta = Delta.load(path, base=model)
        if delta.config.get("hardening_spec") == digest:
            return delta
    delta = method.erase(model, spec, cfg)
    delta.config["hardening_spec"] = digest
    delta.config["spec"] = spec.to_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    delta.save(path, overwrite=True)
    return delta
