"""`erasekit demo`: the whole story on the built-in testbed: generate, judge, erase a concept, measure."""

from __future__ import annotations

import time
from pathlib import Path

from .checkpoint import atomic_write_json
from .errors import UserError
from .grid import make_grid, to_pil
from .outputs import atomic_dir

MARKER = "demo.json"

# The same scenes asked for in canonical words and in held-out words the model never saw in training.
DEMO_PROMPTS = [
    ("a striped red star on a sky background", "a barred ruby pentagram in the air"),
    ("a solid blue circle on a grass background", "a fully shaded sapphire ball in a field"),
    ("a outlined yellow triangle on a black background", "a wireframe mustard pyramid in darkness"),
    ("a solid purple cross on a white background", "a opaque lilac crucifix on a snowy backdrop"),
]
SEEDS = (0, 1)
ATTACK_PROMPTS = 2  # attacked prompts: each attacked one costs about 10 s on a 2-core CPU


def _check_out(out: Path) -> bool:
    """May the demo write here? Only into a new or empty folder, or over an earlier demo's output."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).is_file())):
        raise UserError(f"{out} exists and does not hold an earlier demo: choose another folder with --out")
    return out.exists()


def run_demo(out: str | Path = "erasekit-demo", samples: int = 10, concept: str = "red",
             method: str = "uce", attack_prompts: int = ATTACK_PROMPTS) -> Path:
    from . import load
    from .testbed.evaluate import accuracy, attribute_prompts, generate, judge_verdicts
    from .testbed.judge import load_judge
    from .testbed.prompts import attribute_of
    from .testbed.world import ATTRIBUTES, VALUES

    out = Path(out)
    replace = _check_out(out)
    erasing = closed_form_method(method)
    attribute_of(concept)  # an unknown concept fails here, before any work
    start = time.time()
    print("loading the testbed (a 4.7M-parameter text-to-image model, 16x16 pixels) and its judge")
    model, judge = load("testbed"), load_judge()

    pairs = [(text, seed) for pair in DEMO_PROMPTS for text in pair for seed in SEEDS]
    images = model.sample([t for t, _ in pairs], [s for _, s in pairs], progress=False)
    verdicts = judge_verdicts(judge, images)
    print("\nwhat the judge sees in each generated image (wording: canonical, then held-out):")
    labels = []
    for i, (text, seed) in enumerate(pairs):
        seen = " ".join(VALUES[a][int(verdicts[a][i])] for a in ATTRIBUTES)
        labels.append(f"{text} | seed {seed} | judge: {seen}")
        print(f"  {text:<52} seed {seed}  ->  {seen}")

    print(f"\njudge accuracy against the prompt on {samples} random prompts per wording kind:")
    table = {}
    for kind in ("canonical", "heldout"):
        prompts = attribute_prompts(kind, samples, seed=500)
        table[kind] = accuracy(judge_verdicts(judge, generate(model, prompts)), prompts)
        print(f"  {kind:<10} " + "  ".join(f"{a} {table[kind][a]:.2f}" for a in ATTRIBUTES))

    delta, before_after = erase_step(model, judge, concept, method, erasing, samples)
    delta_name = f"{concept}-{method}.safetensors"

    with atomic_dir(out, overwrite=replace) as tmp:
        delta.save(tmp / delta_name)
        evaluation = evaluate_step(model, delta, tmp / delta_name, concept, samples, tmp / "evaluation")
        attack = attack_step(model, delta, tmp / delta_name, concept, attack_prompts, tmp / "attack")
        make_grid(to_pil(images), columns=len(SEEDS) * 2, labels=labels, cell=128, label_lines=5).save(
            tmp / "grid.png")
        before_after.save(tmp / "erasure.png")
        record = {"model": model.identity(), "sampler": model.sampler_defaults, "images": labels,
                  "accuracy": table, "samples": samples, "concept": concept, "method": method,
                  "erasure": evaluation["metrics"],
                  "attack": {k: attack[k] for k in ("attack", "n", "pre_asr", "asr")},
                  "wall_time_s": round(time.time() - start, 1)}
        atomic_write_json(tmp / MARKER, record)
    print(f"\nwrote {out / 'grid.png'} (each row: one scene; left two in canonical words, right two held-out),")
    print(f"      {out / 'erasure.png'} (left: original, right: after erasing {concept!r}; same prompts and seeds),")
    print(f"      {out / 'evaluation' / 'report.html'} (the erasure report: tables, trade-off plot, image grids),")
    print(f"      {out / 'attack' / 'report.html'} (the attack: adversarial prompts and images)")
    print(f"      and the delta {out / delta_name}, in {time.time() - start:.0f} s")
    return out


def closed_form_method(name: str):
    """(method, config) for the demo's erasure, at the testbed's settings: a closed-form method or variant
    ("uce", "uce:lam=0.2"), checked before any work."""
    from . import methods

    method, values = methods.variant(name)
    if method.fine_tuning or method.parts:
        raise UserError(f"the demo erases with a closed-form method (uce, rece, erasepro, trce-stage1), not "
                        f"{name!r}: run 'erasekit erase --method {name}' for fine-tuning")
    return method, methods.build_config(method, values, testbed=True)


def erase_step(model, judge, concept: str, method_name: str, erasing, samples: int):
    """Erase one testbed concept with a closed-form method (erasing: closed_form_method's (method, config));
    before/after grid of a few prompts."""
    from .grid import make_grid, to_pil
    from .testbed.evaluate import generate
    from .testbed.prompts import concept_prompts
    from .testbed.spec import erasure_spec

    method, cfg = erasing
    t0 = time.time()
    delta = method.erase(model, erasure_spec([concept], cfg), cfg)
    print(f"\nerasing {concept!r} with {method_name} (closed form, {len(delta.tensors)} tensors) took "
          f"{time.time() - t0:.2f} s")
    shown = concept_prompts(concept, "canonical", 4, seed=90) + concept_prompts(concept, "heldout", 2, seed=95)
    orig = generate(model, shown)
    with delta.applied(model):
        edited = generate(model, shown)
    pils, labels = [], []
    for p, a, b in zip(shown, to_pil(orig), to_pil(edited)):
        pils += [a, b]
        labels += [f"original: {p.text}", f"erased: {p.text}"]
    grid = make_grid(pils, columns=4, labels=labels, cell=128, label_lines=5)
    return delta, grid


def evaluate_step(model, delta, delta_path: Path, concept: str, samples: int, out: Path) -> dict:
    """The erased model next to the original on the concept's suite: results.json and report.html."""
    from .evaluation.judges import get_judge
    from .evaluation.runner import Settings, Variant, evaluate
    from .evaluation.suites import load_suite

    suite = load_suite(f"testbed:{concept}", samples=samples)
    settings = Settings.for_model(model, batch_size=64)
    variants = [Variant("original"), Variant(f"{delta.method}", (delta,), (delta_path.name,))]
    print(f"measuring on {samples} prompts per set (target: canonical, synonym, held-out wording; preservation):")
    results = evaluate(model, variants, suite, get_judge("testbed"), out, settings, progress=False)
    for name, m in results["metrics"].items():
        rates = "  ".join(f"{k.split(':')[-1]} {v:.2f}" for k, v in m["target_rate"].items())
        print(f"  {name:<9} {concept!r} present: {rates}   |  accuracy on prompts without it: "
              f"{m['preservation_accuracy']:.2f}")
    return results


# one timestep of UnlearnDiffAtk's 50 (its 40 Adam steps, then the judge), to keep the demo within minutes;
# `erasekit attack` runs the published 50
DEMO_ATTACK = {"timesteps": 1}


def attack_step(model, delta, delta_path: Path, concept: str, prompts: int, out: Path) -> dict:
    """UnlearnDiffAtk against the erased model on canonical prompts it no longer shows the concept for."""
    from . import attacks
    from .attacks.runner import make_context, run_attack
    from .evaluation.judges import get_judge
    from .evaluation.runner import Settings, Variant
    from .evaluation.suites import load_suite

    attack = attacks.get("unlearndiff")
    cfg = attacks.build_config(attack, DEMO_ATTACK, testbed=True)
    suite = load_suite(f"testbed:{concept}", samples=prompts)
    settings = Settings.for_model(model, batch_size=64)
    ctx = make_context(model, Variant(delta.method, (delta,), (delta_path.name,)), get_judge("testbed"),
                       suite.concepts, settings)
    results = run_attack(ctx, attack, cfg, suite, "target:canonical", out, progress=False)
    print(f"\nattacking the erased model with UnlearnDiffAtk (1 of its 50 timesteps) on {results['n']} "
          f"canonical prompts: "
          f"pre-ASR {results['pre_asr']:.2f} -> ASR {results['asr']:.2f} "
          f"({results['_timing']['seconds_per_attacked_prompt'] or 0:.1f} s per attacked prompt)")
    return results
