"""Testbed generation speed: erasekit's Model.sample and `erasekit evaluate`'s generation (the same
sampling plus the content-hash image cache: key, PNG write) against a stock StableDiffusionPipeline call
(same model, batch, steps, guidance, initial latents) in the same run, and the 64-images target.

Usage: python benchmarks/generation_speed.py [--images 64] [--steps 20] [--repeats 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    from diffusers import StableDiffusionPipeline

    import erasekit
    from erasekit.testbed.prompts import attribute_prompts

    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(HERE / "results" / "generation_speed.json"))
    args = parser.parse_args()

    model = erasekit.load("testbed")
    guidance = model.sampler_defaults["guidance"]
    prompts = attribute_prompts("canonical", args.images)
    texts, seeds = [p.text for p in prompts], [p.seed for p in prompts]
    pipe = StableDiffusionPipeline(**{**model.pipe.components, "scheduler": model.scheduler})
    pipe.set_progress_bar_config(disable=True)

    def ours():
        return model.sample(texts, seeds, steps=args.steps, guidance=guidance, batch_size=args.images,
                            progress=False)

    def stock():
        return pipe(texts, latents=model.initial_noise(seeds), num_inference_steps=args.steps,
                    guidance_scale=guidance, output_type="pt").images

    def evaluate_path():
        import tempfile

        from erasekit.evaluation.cache import ImageCache
        from erasekit.evaluation.runner import Settings, Variant, generate_missing, make_plan
        from erasekit.evaluation.suites import PromptSet, Suite, SuitePrompt

        sp = tuple(SuitePrompt(t, s) for t, s in zip(texts, seeds))
        suite = Suite("speed", (), "", (PromptSet("prompts", "target", sp),), "benchmark", "generic")
        settings = Settings(steps=args.steps, guidance=guidance, batch_size=args.images)
        plan = make_plan("benchmark", [Variant("original")], suite, settings)
        with tempfile.TemporaryDirectory() as tmp:
            generate_missing(model, plan, ImageCache(tmp), settings, progress=False)

    same = float((ours() - stock()).abs().max())
    t_ours, t_stock = best_of(ours, args.repeats), best_of(stock, args.repeats)
    t_eval = best_of(evaluate_path, args.repeats)
    result = {
        "device": f"cpu x{torch.get_num_threads()}" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
        "images": args.images, "steps": args.steps, "guidance": guidance,
        "erasekit_s": round(t_ours, 3), "stock_pipeline_s": round(t_stock, 3),
        "erasekit_images_per_s": round(args.images / t_ours, 2),
        "stock_images_per_s": round(args.images / t_stock, 2),
        "speed_ratio_erasekit_over_stock": round(t_stock / t_ours, 3),
        "evaluate_generation_s": round(t_eval, 3),
        "evaluate_images_per_s": round(args.images / t_eval, 2),
        "speed_ratio_evaluate_over_stock": round(t_stock / t_eval, 3),
        "max_pixel_difference": same,
    }
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
