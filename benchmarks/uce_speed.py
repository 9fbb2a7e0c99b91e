"""UCE edit time: erasekit's batched solver against the public code's structure, 1/10/100 concepts.

Usage: python benchmarks/uce_speed.py [--models testbed sd14] [--counts 1 10 100] [--out FILE]

"sd14" is a denoiser with Stable Diffusion 1.4's exact architecture (32 K/V matrices, d = 768) and a
CLIP text encoder of SD1.4's size, built from configs with random weights (nothing is downloaded). The
ratio is public-structure time / erasekit time in the same run. Beside it, the floor: the edit's batched
encode and its solve timed alone (`floor`, best of 3), what erasekit's time would be with no other cost. The baseline is
`naive_uce.public_uce`: the public code's structure as written (each distinct prompt encoded once, one per
call; guide outputs per module; per-module outer products and a float32 explicit inverse; it cites the lines
it mirrors). Its inverse alone
differs from an exact solve by ~1e-5 (d = 384) to ~1e-4 (d = 768), so weight equality is checked against the
same loop run in float64. (`naive_uce.naive_uce`, which re-encodes every prompt inside the layer loop, is
slower than the public code and no longer the baseline.)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from architectures import flux_folder, sd14_folder, sdxl_folder  # noqa: E402
from naive_uce import public_uce  # noqa: E402

WORDS = ("apple ball cat dog egg fig goat hat ink jam kite lamp moon nest owl pig queen rose sun tree umbrella "
         "vase whale box yak zebra").split()


def concepts(n: int) -> list[str]:
    """n distinct two-word concepts (up to 26 x 25)."""
    k = len(WORDS)
    return [f"{WORDS[i % k]} {WORDS[(i % k + 1 + i // k) % k]}" for i in range(n)]


def max_rel_diff(delta, ref) -> float:
    return max(float((delta.tensors[k].double() - v.double()).norm() / v.double().norm()) for k, v in ref.items())


def floor(model, spec, repeats: int = 3) -> dict:
    """The edit's unavoidable work timed alone, the best of `repeats` runs (a floor is a lower bound, and the
    machine is shared): one batched encode of its distinct prompts (through [EoT] where the family allows)
    and the solve on keys already in hand (the layers listed beforehand, untimed)."""
    from erasekit.linalg import uce_guided
    from erasekit.methods import uce
    from erasekit.methods.common import THROUGH_EOT, Encodings, KVStack

    cfg = uce.UCEConfig()
    kv = KVStack(model, stacked=False)
    encode_s = solve_s = float("inf")
    for _ in range(repeats):
        encodings = Encodings(model, through_eot=cfg.positions in THROUGH_EOT)
        t0 = time.perf_counter()
        prompts = uce.edit_prompts(spec, cfg.synonyms, encodings)
        encode_s = min(encode_s, time.perf_counter() - t0)
        keys, guides, preserve_keys = uce.group_keys(encodings, kv.reads, prompts, cfg.positions)
        t0 = time.perf_counter()
        uce_guided(kv.weights, keys, guides, preserve_keys, lam=cfg.lam)
        solve_s = min(solve_s, time.perf_counter() - t0)
    return {"floor_s": round(encode_s + solve_s, 4), "floor_encode_s": round(encode_s, 4),
            "floor_solve_s": round(solve_s, 4)}


def run(model, counts, naive_up_to: int, preserve_n=10, save=lambda rows: None, repeats: int = 3,
        warm_up: bool = True) -> list[dict]:
    """erasekit's UCE for each count; the public-structure float32 baseline (timed) and a float64 run of the
    same loop (for weight equality) for counts up to naive_up_to."""
    from erasekit.concepts import ConceptSpec
    from erasekit.methods import uce

    if warm_up:  # first-call costs (allocator, tokenizer) are not the method's
        uce.erase(model, ConceptSpec(["warm up"]))
    rows = []
    preserve = [f"a photo of a {w}" for w in WORDS[-preserve_n:]]
    for n in counts:
        spec = ConceptSpec(concepts(n), preserve=preserve)
        t0 = time.perf_counter()
        delta = uce.erase(model, spec)
        row = {"concepts": n, "erasekit_s": round(time.perf_counter() - t0, 4),
               "erasekit_solve_s": delta.stats["seconds"], **floor(model, spec, repeats)}
        if n <= naive_up_to:
            edit, guides = [p.target for p in spec.pairs()], [p.anchor for p in spec.pairs()]
            t0 = time.perf_counter()
            ref32 = public_uce(model, edit, guides, spec.preserve_prompts())
            row["public_float32_s"] = round(time.perf_counter() - t0, 3)
            row["ratio"] = round(row["public_float32_s"] / row["erasekit_s"], 2)
            row["max_rel_diff_vs_public_float32"] = max_rel_diff(delta, ref32)
            row["max_rel_diff_vs_public_float64"] = max_rel_diff(
                delta, public_uce(model, edit, guides, spec.preserve_prompts(), dtype=torch.float64))
        rows.append(row)
        save(rows)
        print(json.dumps(rows[-1]), flush=True)
    return rows


@dataclass(frozen=True)
class Setup:
    """How the benchmark builds and runs one model."""
    folder: Callable[[Path], Path] | None  # workdir -> a pipeline folder; None: the testbed
    dtype: torch.dtype = torch.float32
    public_baseline: bool = True  # the public UCE script is written for SD1.x/2.x: elsewhere only erasekit's time
    warm_up: bool = True
    info: dict = field(default_factory=dict)


def model_setups(args) -> dict[str, Setup]:
    t5 = args.flux_t5_layers
    return {"testbed": Setup(None), "sd14": Setup(lambda w: sd14_folder(w / "sd14")),
            "sdxl": Setup(lambda w: sdxl_folder(w / "sdxl"), public_baseline=False),
            # FLUX.1 in bfloat16, as shipped and as its users load it (float32 does not fit here); no warm-up
            # run, whose T5-XXL encoding would cost as much as the row (its first-call costs are a small part)
            "flux": Setup(lambda w: flux_folder(w / f"flux-t5x{t5}", t5_layers=t5), dtype=torch.bfloat16,
                          public_baseline=False, warm_up=False, info={"t5_layers": t5})}


def main() -> None:
    import erasekit

    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["testbed", "sd14"], choices=["testbed", "sd14", "sdxl", "flux"])
    parser.add_argument("--counts", nargs="+", type=int, default=[1, 10, 100])
    parser.add_argument("--naive-up-to", type=int, default=100,
                        help="run the public-structure baseline only up to this many concepts")
    parser.add_argument("--workdir", default="/tmp/erasekit-bench")
    parser.add_argument("--flux-t5-layers", type=int, default=24,
                        help="T5 encoder layers of the flux model (24: T5-XXL; fewer for a quick check of the path)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of the floor, the best kept")
    parser.add_argument("--out", default=str(HERE / "results" / "uce_speed.json"))
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else f"cpu x{torch.get_num_threads()}",
              "torch": torch.__version__, "models": {}}
    setups = model_setups(args)
    for name in args.models:
        setup = setups[name]
        source = "testbed" if setup.folder is None else setup.folder(Path(args.workdir))
        model = erasekit.load(source, device=device, dtype=setup.dtype)
        layers = model.cross_attention_layers()
        info = {"kv_matrices": len(layers), "shapes": sorted({str(tuple(la.weight.shape)) for la in layers}),
                "dtype": str(setup.dtype).removeprefix("torch."), "text_tokens": model.max_length, **setup.info}
        print(f"{name}: {info}", flush=True)
        def save(rows, name=name, info=info):
            result["models"][name] = {**info, "rows": rows}
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

        run(model, args.counts, args.naive_up_to if setup.public_baseline else 0, save=save, repeats=args.repeats,
            warm_up=setup.warm_up)
        del model
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
