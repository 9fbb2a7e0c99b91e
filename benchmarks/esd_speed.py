"""ESD per-iteration time and peak memory: erasekit's loop against a straightforward loop with the public
ESD code's structure, on the same model, seeds and settings, each in its own process.

The straightforward loop, per iteration: encodes the prompts again, keeps a deep copy of the denoiser as the
frozen model, and rolls x_t out with a full pipeline call (all n sampler steps, the latent at step k taken
from the step callback). erasekit's loop: prompts encoded once, the frozen model is the trained tensors'
starting values swapped in (`torch.func.functional_call`), the rollout stops after k steps.
Both roll out with the frozen model and draw the same k and noise, so their loss curves must agree.

Usage: python benchmarks/esd_speed.py [--iterations 12] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
PROMPT = "a solid red star on a black background"


def draws(i: int, n: int, shape) -> tuple[int, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + i)
    k = int(torch.randint(0, n, (1,), generator=gen))
    return k, torch.randn(shape, generator=gen)[None]


def erasekit_loop(model, iterations: int, n: int) -> list[float]:
    from erasekit.finetune.params import Frozen, only_these_trainable, select

    named = select(model, "esd-x")
    frozen = Frozen(model, named)
    cond, uncond = model.encode([PROMPT]).embeddings, model.encode([""]).embeddings
    opt = torch.optim.Adam(named.values(), lr=1e-5)
    losses = []
    with only_these_trainable(model, named):
        for p in named.values():
            p.requires_grad_(True)
        for i in range(iterations):
            k, noise = draws(i, n, model.latent_shape)
            x_t, t = frozen.rollout(cond, uncond, noise * model.scheduler.init_noise_sigma, n, k, 3.0)
            e0, ec = frozen.pair(x_t, t, cond, uncond)
            loss = torch.nn.functional.mse_loss(model.raw(x_t, t, cond), e0 - (ec - e0))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    return losses


def straightforward_loop(model, iterations: int, n: int) -> list[float]:
    import copy

    from diffusers import StableDiffusionPipeline

    frozen_unet = copy.deepcopy(model.unet).requires_grad_(False)
    pipe = StableDiffusionPipeline(**{**model.pipe.components, "unet": frozen_unet, "scheduler": model.scheduler})
    pipe.set_progress_bar_config(disable=True)
    params = [p for name, p in model.unet.named_parameters() if "attn2." in name]
    for name, p in model.unet.named_parameters():
        p.requires_grad_("attn2." in name)
    opt = torch.optim.Adam(params, lr=1e-5)
    losses = []
    for i in range(iterations):
        k, noise = draws(i, n, model.latent_shape)
        kept = {}

        def keep(pipeline, step, timestep, tensors, k=k, kept=kept):
            if step == k - 1:
                kept["x"] = tensors["latents"].clone()
            return tensors

        pipe(PROMPT, latents=noise * model.scheduler.init_noise_sigma, num_inference_steps=n, guidance_scale=3.0,
             output_type="latent", callback_on_step_end=keep)
        x_t = kept.get("x", noise * model.scheduler.init_noise_sigma)
        model.scheduler.set_timesteps(n)
        t = model.scheduler.timesteps[k]
        cond = pipe.encode_prompt(PROMPT, "cpu", 1, False)[0]  # prompts encoded again, as the public code does
        uncond = pipe.encode_prompt("", "cpu", 1, False)[0]
        with torch.no_grad():
            e0 = frozen_unet(x_t, t, uncond).sample
            ec = frozen_unet(x_t, t, cond).sample
        loss = torch.nn.functional.mse_loss(model.unet(x_t, t, cond).sample, e0 - (ec - e0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def one(kind: str, iterations: int, n: int) -> dict:
    import erasekit

    torch.manual_seed(0)
    model = erasekit.load("testbed")
    run = erasekit_loop if kind == "erasekit" else straightforward_loop
    run(model, 1, n)  # warm-up
    start = time.perf_counter()
    losses = run(model, iterations, n)
    seconds = (time.perf_counter() - start) / iterations
    return {"seconds_per_iteration": round(seconds, 4), "losses": losses,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--sampler-steps", type=int, default=20)
    parser.add_argument("--one", choices=["erasekit", "straightforward"], help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(HERE / "results" / "esd_speed.json"))
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.iterations, args.sampler_steps)))
        return
    rows = {}
    for kind in ("erasekit", "straightforward"):
        out = subprocess.run([sys.executable, __file__, "--one", kind, "--iterations", str(args.iterations),
                              "--sampler-steps", str(args.sampler_steps)], capture_output=True, text=True, check=True)
        rows[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    a, b = rows["erasekit"], rows["straightforward"]
    gap = max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a["losses"], b["losses"]))
    result = {"device": f"cpu x{torch.get_num_threads()}" if not torch.cuda.is_available()
              else torch.cuda.get_device_name(), "model": "testbed", "parameters": "esd-x",
              "iterations": args.iterations, "sampler_steps": args.sampler_steps,
              "erasekit": {k: v for k, v in a.items() if k != "losses"},
              "straightforward": {k: v for k, v in b.items() if k != "losses"},
              "speed_ratio": round(b["seconds_per_iteration"] / a["seconds_per_iteration"], 2),
              "peak_rss_ratio": round(b["peak_rss_mb"] / a["peak_rss_mb"], 3),
              "max_relative_loss_difference": gap}
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
