"""The audit's parts, each an existing runner's run in a subfolder of the audit folder, and the summary of
them in results.json and report.html.

Parts, in order: evaluate/ (the unedited model and the delta on the suite), random/ (the same on random-word
prompts: the base rate), attacks/NAME/ (each attack on the delta), then on the testbed, when an oracle trained
without the suite's concept is installed, oracle/evaluate/, oracle/random/ and oracle/attacks/NAME/ (the oracle
has no delta; attacks on it are measured against the unedited testbed as the original model).

A part finished is listed in audit_progress.json and reused from its folder; a part cut off continues through
its own runner's resume (cached images, per-prompt attack progress). A folder of another audit, resumed, keeps
only what the runners can reuse by content (images); every part is run again.

Auditing several deltas of one suite: `reuse` names an earlier audit folder whose part folders are copied into
a new audit folder before its parts run. Each part's runner then keeps what its own protocol check allows: a
part whose run is the same (the oracle's parts, which no delta changes) continues from its finished progress
and its images; any other part is run again, reusing the unedited model's images by content. The earlier
folder is only read.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..attacks import Attack
from ..checkpoint import atomic_write_text
from ..errors import UserError
from ..evaluation.protocol import check_run_dir, weights_hash
from ..evaluation.random_prompts import base_rate
from ..evaluation.runner import Settings, Variant, distributed_state, evaluate, protocol_record
from ..evaluation.suites import Suite
from ..model import Model
from ..stats import rate_ci
from . import ATTACKS  # noqa: F401  (its home is the package, so `audit --help` needs no runner)

PROGRESS = "audit_progress.json"
RESULTS, REPORT = "results.json", "report.html"
ATTACK_KEYS = ("n", "pre_asr", "pre_asr_ci", "asr", "asr_ci", "ideal_prompts", "asr_on_ideal", "asr_on_ideal_ci",
               "attacked")


@dataclass
class Audit:
    """Everything an audit runs, checked before any work: variants are the unedited model and the delta."""
    model: Model
    variants: list[Variant]
    suite: Suite
    random: Suite  # the random-word prompts of the base rate
    judge: object
    settings: Settings
    attacks: dict[str, tuple[Attack, object]]  # name -> (attack, its config)
    oracle: Model | None = None  # a model trained without the concept (testbed:no-CONCEPT), attacked as it is

    def protocol(self) -> dict:
        """What the other commands record, plus each attack's config, the random prompts and the oracle."""
        record = protocol_record(self.model, weights_hash(self.model), self.variants, self.suite, self.judge,
                                 self.settings)
        oracle = None if self.oracle is None else {**self.oracle.identity(), "weights_hash": weights_hash(self.oracle)}
        return {**record, "attacks": {n: {"attack": a.name, "config": asdict(c)} for n, (a, c) in self.attacks.items()},
                "random_prompts": self.random.record(), "oracle": oracle}


def oracle_name(model: Model, suite: Suite) -> str | None:
    """The installed oracle trained without the suite's concept ("testbed:no-circle"), when the audited model
    is the shipped testbed; else None."""
    if model.world is None or str(model.source) != "testbed" or suite.layout != "testbed":
        return None
    return model.world.oracle_for(suite.concepts)


def check(audit: Audit) -> None:
    """The checks the attack runner makes only when it starts (a target set, Ring-A-Bell's prompt pairs), made
    before the first part runs."""
    from ..attacks.runner import make_context, target_set

    if distributed_state() is not None:
        raise UserError("audit runs in one process: start it without accelerate launch (evaluate and compare shard)")
    target_set(audit.suite, None)
    ctx = make_context(audit.model, audit.variants[-1], audit.judge, audit.suite.concepts, audit.settings)
    for attack, cfg in audit.attacks.values():
        if attack.prepare is not None:
            attack.prepare(ctx, audit.suite, cfg)


def run_audit(audit: Audit, out: Path, resume: bool = False, overwrite: bool = False, progress: bool = True,
              log=print, reuse: Path | None = None) -> dict:
    """Run every part not yet finished into out (after copying in the parts of the audit folder reuse that out
    lacks); write results.json, report.html and timing.json."""
    from .report import write_report

    out, began = Path(out), time.time()
    check(audit)
    protected = [Path(m.source) for m in (audit.model, audit.oracle) if m is not None and Path(m.source).is_dir()]
    if reuse is not None:
        check_reuse(Path(reuse), out)
        protected.append(Path(reuse))
    protocol = audit.protocol()
    if not check_run_dir(out, protocol, resume=resume, overwrite=overwrite, protected=protected):
        (out / PROGRESS).unlink(missing_ok=True)  # another audit's parts: each runs again, reusing images by content
    done = _read_progress(out / PROGRESS)
    if reuse is not None:
        copied = copy_parts(Path(reuse), out, [name for name, _ in _parts(audit, progress)])
        log(f"copied from {reuse}: {', '.join(copied) if copied else 'nothing (every part is here already)'}")
    parts, seconds = {}, {}
    for name, run in _parts(audit, progress):
        folder = out / name
        start = time.time()
        if name in done and (folder / RESULTS).is_file():
            parts[name] = json.loads((folder / RESULTS).read_text())
            seconds[name] = 0.0
            log(f"{name}: reused")
            continue
        parts[name] = run(folder)
        parts[name].pop("_timing", None)
        seconds[name] = round(time.time() - start, 1)
        done.append(name)
        atomic_write_text(out / PROGRESS, json.dumps({"done": done}, indent=2) + "\n")
        log(f"{name}: done in {seconds[name]} s")
    results = summarize(audit, protocol, parts)
    atomic_write_text(out / RESULTS, json.dumps(results, indent=2) + "\n")
    write_report(out / REPORT, results, out)
    timing = {"seconds_per_part": seconds, "wall_time_s": round(time.time() - began, 1)}  # reused parts: 0 s
    atomic_write_text(out / "timing.json", json.dumps(timing, indent=2) + "\n")
    results["_timing"] = timing
    return results


def check_reuse(source: Path, out: Path) -> None:
    """source must be an audit folder other than out (its results or progress file says so)."""
    if not source.is_dir():
        raise UserError(f"--reuse {source}: no such folder: name the output folder of an earlier audit")
    if not ((source / PROGRESS).is_file() or (source / RESULTS).is_file()):
        raise UserError(f"--reuse {source} holds no audit (no {PROGRESS} or {RESULTS}): name the output folder "
                        "of an earlier audit")
    if out.exists() and source.resolve() == out.resolve():
        raise UserError(f"--reuse {source} is the output folder itself: pass --resume to continue it instead")


def copy_parts(source: Path, out: Path, names: list[str]) -> list[str]:
    """Copy each part folder of source that out lacks (through a temporary name, so a copy cut off leaves
    nothing half-made under the part's name); the names copied."""
    copied = []
    for name in names:
        src, dst = source / name, out / name
        if not src.is_dir() or dst.exists():
            continue
        partial = dst.with_name(f".{dst.name}.copying")
        shutil.rmtree(partial, ignore_errors=True)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src, partial)
        partial.rename(dst)
        copied.append(name)
    return copied


def _read_progress(path: Path) -> list[str]:
    try:
        return list(json.loads(path.read_text())["done"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _parts(audit: Audit, progress: bool):
    """(subfolder name, run(folder) -> that runner's results) for every part, in order."""
    from ..attacks.runner import make_context, run_attack

    def evaluation(model, variants, suite):
        return lambda folder: evaluate(model, variants, suite, audit.judge, folder, audit.settings, resume=True,
                                       progress=progress)

    def attacking(model, variant, attack, cfg, reference=None):
        def run(folder):
            ctx = make_context(model, variant, audit.judge, audit.suite.concepts, audit.settings, reference=reference)
            return run_attack(ctx, attack, cfg, audit.suite, None, folder, resume=True, progress=progress)
        return run

    m = audit.model
    yield "evaluate", evaluation(m, audit.variants, audit.suite)
    yield "random", evaluation(m, audit.variants, audit.random)
    for name, (attack, cfg) in audit.attacks.items():
        yield f"attacks/{name}", attacking(m, audit.variants[-1], attack, cfg)
    if audit.oracle is not None:
        oracle = [Variant("oracle")]  # the oracle as it is: no delta
        yield "oracle/evaluate", evaluation(audit.oracle, oracle, audit.suite)
        yield "oracle/random", evaluation(audit.oracle, oracle, audit.random)
        for name, (attack, cfg) in audit.attacks.items():
            yield f"oracle/attacks/{name}", attacking(audit.oracle, oracle[0], attack, cfg, reference=m)


# --- results.json ---------------------------------------------------------------------------------


def _no_attack(metrics: dict, prefix: str = "") -> dict:
    """Target rates per set, their mean and preservation accuracy of one variant, each with _ci and _n."""
    keys = ("target_rate", "target_rate_mean", "preservation_accuracy")
    return {f"{prefix}{k}{s}": metrics.get(f"{k}{s}") for k in keys for s in ("", "_ci", "_n")}


def _base_rate(metrics: dict, prefix: str = "") -> dict:
    rate, ci, n = base_rate(metrics)
    return {f"{prefix}base_rate": rate, f"{prefix}base_rate_ci": ci, f"{prefix}base_rate_n": n}


def _attacks(parts: dict, folder: str, names) -> dict:
    """Per attack its rates (with intervals and n) and the folder of its run; mean_asr over the attacks with the
    interval of a mean of per-prompt scores in [0, 1] over the n prompts (conservative)."""
    attacks = {name: {"attack": parts[f"{folder}{name}"]["attack"],
                      **{k: parts[f"{folder}{name}"][k] for k in ATTACK_KEYS}, "folder": f"{folder}{name}"}
               for name in names}
    n = min(a["n"] for a in attacks.values())
    mean = round(sum(a["asr"] for a in attacks.values()) / len(attacks), 4)
    return {"attacks": attacks, "mean_asr": mean, "mean_asr_ci": rate_ci(mean, n), "mean_asr_n": n}


def summarize(audit: Audit, protocol: dict, parts: dict) -> dict:
    """results.json: the delta's numbers at the top level, the unedited model's with prefix unedited_, the
    oracle's under oracle (None without one), and where each part's own results are."""
    names = list(audit.attacks)
    edited, unedited = audit.variants[-1].name, audit.variants[0].name
    evaluated, randoms = parts["evaluate"]["metrics"], parts["random"]["metrics"]
    attacked_set = parts[f"attacks/{names[0]}"]["protocol"]["set"]
    results = {"protocol": protocol, "suite": audit.suite.name, "concepts": list(audit.suite.concepts),
               "attacked_set": attacked_set,
               **_no_attack(evaluated[edited]), **_base_rate(randoms[edited]),
               **_no_attack(evaluated[unedited], "unedited_"), **_base_rate(randoms[unedited], "unedited_"),
               **_attacks(parts, "attacks/", names), "oracle": None}
    if audit.oracle is not None:
        results["oracle"] = {"model": audit.oracle.source, **_no_attack(parts["oracle/evaluate"]["metrics"]["oracle"]),
                             **_base_rate(parts["oracle/random"]["metrics"]["oracle"]),
                             **_attacks(parts, "oracle/attacks/", names)}
    results["parts"] = list(parts)
    return results
