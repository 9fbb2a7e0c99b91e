"""Peak memory of every fine-tuning method on a denoiser with Stable Diffusion 1.4's architecture, and of ESD and
SCORE on FLUX.1-dev's transformer (full tensors and LoRA factors).

Usage: python benchmarks/finetune_memory.py [--width 0.5] [--src SRC ...] [--runs RUN ...] [--out FILE]

For each method (esd at esd-x and at esd-all, trce-stage2, co-erasing, score, advunlearn) and each source tree
given with --src (e.g. this worktree's src/ and an older checkout's, to compare before and after a change), one
subprocess loads a pipeline folder with SD1.4's UNet and CLIP text encoder built from configs with random
weights (`architectures.sd14_folder`; --width scales the UNet's block_out_channels), runs the method for --steps
training steps and reports:
- peak RSS of the run (the kernel's VmHWM, reset after loading; ru_maxrss, loading included, beside it) and
  the RSS right after loading the model (VmRSS, every weight touched first so that weights mapped from the file
  count);
- bytes per trained parameter: (peak RSS - loaded RSS) / the number of trained parameters. The bound the
  loop aims at is 16 (one frozen fp32 copy, the gradient and Adam's two moments), 17 with SCORE's bool mask,
  plus activations;
- the sha256 of the delta's tensors, so a memory change can be checked to leave the result unchanged.
Latents are 32 x 32 (sample_size 32, 256-pixel images) to keep activations and CPU time small: what is
measured is the memory that grows with the trained parameters. Run one method at a time (they are).
The "sdxl ..." runs use SDXL base 1.0 at its real size (architectures.sdxl_folder); with the benchmarks' small
VAE (scale 2) their 256-px rollouts are 128 x 128 latents, SDXL's own training size, so activations dominate.
The "flux ..." runs use FLUX.1-dev's transformer config (19 dual-stream and 38 single-stream blocks, head dim 128,
guidance embeddings) with round(24 x --width) heads, tiny T5 and CLIP encoders (d_model 256, hidden 64: the
text encoders are not trained there) and 32 x 32 latents (256 patches); a LoRA row's trained parameters are its
factors (lora_rank 8), its B/param is against them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = {  # name -> (method, settings)
    "esd (esd-x)": ("esd", {"parameters": "esd-x", "sampler_steps": "2"}),
    "esd (esd-all)": ("esd", {"parameters": "esd-all", "sampler_steps": "2"}),
    "esd (esd-x, lora 8)": ("esd", {"parameters": "esd-x", "sampler_steps": "2", "lora_rank": "8"}),
    "trce-stage2": ("trce-stage2", {"trajectory_steps": "4"}),
    "co-erasing (esd-x)": ("co-erasing", {"images": "1", "sampler_steps": "2"}),
    "score (esd-all)": ("score", {"saliency_prompts": "1", "sampler_steps": "2"}),
    "advunlearn (text-encoder)": ("advunlearn", {"sampler_steps": "2", "warmup_steps": "1", "attack_steps": "1"}),
    # SDXL base 1.0 at its real size (architectures.sdxl_folder), rollouts at 256 px (32 x 32 latents)
    "sdxl esd (esd-x, lora 8)": ("esd", {"parameters": "esd-x", "sampler_steps": "2", "lora_rank": "8",
                                         "height": "256", "width": "256"}),
    "sdxl esd (esd-all, lora 8)": ("esd", {"parameters": "esd-all", "sampler_steps": "2", "lora_rank": "8",
                                           "height": "256", "width": "256"}),
    "flux esd (esd-x)": ("esd", {"parameters": "esd-x", "sampler_steps": "2"}),
    "flux esd (esd-x, lora 8)": ("esd", {"parameters": "esd-x", "sampler_steps": "2", "lora_rank": "8"}),
    "flux esd (esd-all, lora 8)": ("esd", {"parameters": "esd-all", "sampler_steps": "2", "lora_rank": "8"}),
    "flux score (esd-x)": ("score", {"parameters": "esd-x", "saliency_prompts": "1", "sampler_steps": "2"}),
    "flux score (esd-x, lora 8)": ("score", {"parameters": "esd-x", "saliency_prompts": "1", "sampler_steps": "2",
                                             "lora_rank": "8"}),
}


def folder(path: Path, width: float) -> Path:
    """SD1.4's UNet (block_out_channels scaled by width) and text encoder, random weights, 32 x 32 latents."""
    sys.path.insert(0, str(HERE))
    from architectures import sd14_folder

    return sd14_folder(path, width, sample_size=32)


def flux_folder(path: Path, width: float) -> Path:
    """FLUX.1-dev's transformer config with round(24 x width) heads of 128, tiny text encoders, random weights."""
    import warnings

    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from erasekit.testing import make_t5_tokenizer, make_tokenizer

    if (path / "model_index.json").is_file():
        return path
    torch.manual_seed(0)
    tokenizer, tokenizer_2 = make_tokenizer(), make_t5_tokenizer()
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=256, d_kv=32, d_ff=512, num_layers=2,
                                 num_heads=4, pad_token_id=0, eos_token_id=1))
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                         attention_head_dim=128, num_attention_heads=max(1, round(24 * width)),
                                         joint_attention_dim=256, pooled_projection_dim=64, guidance_embeds=True,
                                         axes_dims_rope=(16, 56, 56))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32, 64),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=32, sample_size=64, scaling_factor=0.3611, shift_factor=0.1159)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        FluxPipeline(scheduler=sched, vae=vae, text_encoder=clip, tokenizer=tokenizer, text_encoder_2=t5,
                     tokenizer_2=tokenizer_2, transformer=transformer).save_pretrained(path)
    return path


def flux_counts(rank: int = 8) -> list[dict]:
    """Trained entries of ESD's FLUX sets at FLUX.1-dev's real config (diffusers' defaults, built on the meta
    device: no memory), as full tensors and as LoRA factors of `rank`, and what 16 B an entry (fp32 frozen copy,
    gradient, Adam's two moments) makes of them."""
    import re

    import torch
    from diffusers import FluxTransformer2DModel

    from erasekit.finetune.params import FLUX_PARAMETER_SETS

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(guidance_embeds=True)
    modules = dict(transformer.named_modules())
    rows = []
    for name in ("esd-x", "esd-x-strict", "esd-all"):
        patterns = [re.compile(p) for p in FLUX_PARAMETER_SETS[name]]
        chosen = {n: p for n, p in transformer.named_parameters() if any(c.search(n) for c in patterns)}
        linear = [modules[n.removesuffix(".weight")] for n in chosen
                  if n.endswith(".weight") and isinstance(modules.get(n.removesuffix(".weight")), torch.nn.Linear)]
        full = sum(p.numel() for p in chosen.values())
        lora = sum(rank * (m.in_features + m.out_features) for m in linear)
        rows.append({"set": name, "tensor_entries": full, "full_gib_at_16B": round(16 * full / 2**30, 2),
                     f"lora{rank}_entries": lora, "lora_gib_at_16B": round(16 * lora / 2**30, 3)})
    return rows


def vm_rss(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> bool:
    """Start the kernel's peak-RSS count (VmHWM) afresh, so the run's peak excludes loading's (a model's file
    mapped beside its tensors while it loads); False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child(run: str, model_dir: str, adapter: str, steps: int) -> dict:
    """One measurement, in this process: load, erase, report."""
    import warnings

    import torch

    import erasekit
    from erasekit import methods
    from erasekit.concepts import Concept, ConceptSpec
    from erasekit.delta import tensors_sha256
    from erasekit.finetune.loop import trainable

    name, settings = RUNS[run]
    model = erasekit.load(model_dir)
    with torch.no_grad():  # weights read lazily from the file count once touched: touch them all first
        for part in model.components().values():
            for p in part.parameters():
                p.sum()
        for p in model.vae.parameters():
            p.sum()
    loaded = vm_rss()
    peak_of_run = reset_peak()
    method = methods.get(name)
    values = {"steps": str(steps), "progress": "false", **settings}
    if name == "co-erasing":
        values["image_encoder"] = adapter
    cfg = methods.build_config(method, values)
    parameters = "trce" if name == "trce-stage2" else cfg.parameters
    named, frozen = trainable(model, cfg, parameters)  # the set's tensors, or its LoRA factors
    trained = sum(p.numel() for p in named.values())
    frozen.release()
    del named, frozen
    t0 = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        delta = method.erase(model, ConceptSpec([Concept("cat")]), cfg)
    with_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak = vm_rss("VmHWM") if peak_of_run else with_load
    return {"run": run, "parameters": parameters, "trained_parameters": trained, "loaded_rss": loaded,
            "peak_rss": peak, "peak_rss_with_loading": with_load,
            "bytes_per_trained_parameter": round((peak - loaded) / trained, 2),
            "seconds": round(time.time() - t0, 1), "delta_sha256": tensors_sha256(delta.tensors)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=float, default=1.0, help="UNet channel scale (1 = SD1.4)")
    ap.add_argument("--src", nargs="+", default=[str(HERE.parent / "src")], help="erasekit source trees to compare")
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--work", default="/tmp/erasekit-finetune-memory")
    ap.add_argument("--out", default=str(HERE / "results" / "finetune_memory.json"))
    ap.add_argument("--child", nargs=4, metavar=("RUN", "MODEL", "ADAPTER", "STEPS"), help=argparse.SUPPRESS)
    ap.add_argument("--flux-counts", action="store_true", help="print the trained entries at FLUX.1-dev's real size")
    args = ap.parse_args()
    if args.flux_counts:
        for row in flux_counts():
            print(json.dumps(row))
        return
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.child[2], int(args.child[3]))))
        return
    sys.path.insert(0, args.src[0])
    from erasekit.testing import make_tiny_ip_adapter

    work = Path(args.work)
    model_dir = folder(work / f"sd14-width{args.width}", args.width)
    if any(run.startswith("flux ") for run in args.runs):
        flux_dir = flux_folder(work / f"flux1-dev-width{args.width}", args.width)
    if any(run.startswith("sdxl ") for run in args.runs):
        sys.path.insert(0, str(HERE))
        from architectures import sdxl_folder

        sdxl_dir = sdxl_folder(work / "sdxl")  # always the real size: --width scales SD1.4's and FLUX's only
    adapter = work / "ip-adapter-768"
    if not adapter.is_dir():
        make_tiny_ip_adapter(adapter, cross_attention_dim=768)
    rows = []
    for run in args.runs:
        for src in args.src:
            env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
            source = flux_dir if run.startswith("flux ") else sdxl_dir if run.startswith("sdxl ") else model_dir
            done = subprocess.run([sys.executable, __file__, "--child", run, str(source), str(adapter),
                                   str(args.steps)], env=env, capture_output=True, text=True)
            if done.returncode != 0:
                row = {"run": run, "src": src, "error": (done.stderr.strip().splitlines() or ["killed"])[-1],
                       "returncode": done.returncode}
            else:
                row = {**json.loads(done.stdout.strip().splitlines()[-1]), "src": src}
            print(json.dumps(row), flush=True)
            rows.append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"width": args.width, "steps": args.steps, "latents": "32x32",
                                          "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
