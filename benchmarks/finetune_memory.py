"""Peak memory of every fine-tuning method on a denoiser with Stable Diffusion 1.4's architecture.

Usage: python benchmarks/finetune_memory.py [--width 0.5] [--src SRC ...] [--out FILE]

For each method (esd at esd-x and at esd-all, trce-stage2, co-erasing, score, advunlearn) and each source tree
given with --src (e.g. this worktree's src/ and an older checkout's, to compare before and after a change), one
subprocess loads a pipeline folder with SD1.4's UNet and CLIP text encoder built from configs with random
weights (`uce_speed.sd14_folder`; --width scales the UNet's block_out_channels), runs the method for --steps
training steps and reports:
- peak RSS (resource.getrusage ru_maxrss) and the RSS right after loading the model (VmRSS, every weight
  touched first so that weights mapped from the file count);
- bytes per trained parameter: (peak RSS - loaded RSS) / the number of trained parameters. The bound the
  loop aims at is 16 (one frozen fp32 copy, the gradient and Adam's two moments), 17 with SCORE's bool mask,
  plus activations;
- the sha256 of the delta's tensors, so a memory change can be checked to leave the result unchanged.
Latents are 32 x 32 (sample_size 32, 256-pixel images) to keep activations and CPU time small: what is
measured is the memory that grows with the trained parameters. Run one method at a time (they are).
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
    "trce-stage2": ("trce-stage2", {"trajectory_steps": "4"}),
    "co-erasing (esd-x)": ("co-erasing", {"images": "1", "sampler_steps": "2"}),
    "score (esd-all)": ("score", {"saliency_prompts": "1", "sampler_steps": "2"}),
    "advunlearn (text-encoder)": ("advunlearn", {"sampler_steps": "2", "warmup_steps": "1", "attack_steps": "1"}),
}


def folder(path: Path, width: float) -> Path:
    """SD1.4's UNet (block_out_channels scaled by width) and text encoder, random weights, 32 x 32 latents."""
    sys.path.insert(0, str(HERE))
    from architectures import sd14_folder

    return sd14_folder(path, width, sample_size=32)


def vm_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def child(run: str, model_dir: str, adapter: str, steps: int) -> dict:
    """One measurement, in this process: load, erase, report."""
    import warnings

    import torch

    import erasekit
    from erasekit import methods
    from erasekit.concepts import Concept, ConceptSpec
    from erasekit.delta import tensors_sha256
    from erasekit.finetune.params import PARAMETER_SETS, select

    name, settings = RUNS[run]
    model = erasekit.load(model_dir)
    with torch.no_grad():  # weights read lazily from the file count once touched: touch them all first
        for p in list(model.unet.parameters()) + list(model.text_encoder.parameters()) + list(model.vae.parameters()):
            p.sum()
    loaded = vm_rss()
    method = methods.get(name)
    values = {"steps": str(steps), "progress": "false", **settings}
    if name == "co-erasing":
        values["image_encoder"] = adapter
    cfg = methods.build_config(method, values)
    parameters = "trce" if name == "trce-stage2" else cfg.parameters
    trained = sum(p.numel() for p in select(model, PARAMETER_SETS[parameters]).values())
    t0 = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        delta = method.erase(model, ConceptSpec([Concept("cat")]), cfg)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"run": run, "parameters": parameters, "trained_parameters": trained, "loaded_rss": loaded,
            "peak_rss": peak, "bytes_per_trained_parameter": round((peak - loaded) / trained, 2),
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
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.child[2], int(args.child[3]))))
        return
    sys.path.insert(0, args.src[0])
    from erasekit.testing import make_tiny_ip_adapter

    work = Path(args.work)
    model_dir = folder(work / f"sd14-width{args.width}", args.width)
    adapter = work / "ip-adapter-768"
    if not adapter.is_dir():
        make_tiny_ip_adapter(adapter, cross_attention_dim=768)
    rows = []
    for run in args.runs:
        for src in args.src:
            env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
            done = subprocess.run([sys.executable, __file__, "--child", run, str(model_dir), str(adapter),
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
