"""Generate images for prompts x seeds into a folder: per-image PNGs, a labelled grid, a record."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import atomic_write_json
from .grid import check_finite, make_grid, to_pil
from .model import Model
from .outputs import atomic_dir


def generate_to_folder(model: Model, prompts: list[str], seeds: list[int], out: Path, steps: int | None = None,
                       guidance: float | None = None, batch_size: int = 16, overwrite: bool = False,
                       deltas: list[str] = (), height: int | None = None, width: int | None = None) -> Path:
    """One image per prompt x seed, height x width pixels (each default: the model's own)."""
    from .image_size import resolve

    size = resolve(model, height, width)
    pairs = [(p, s) for p in prompts for s in seeds]
    steps = steps or model.sampler_defaults["steps"]
    guidance = model.sampler_defaults["guidance"] if guidance is None else guidance
    protected = [Path(model.source)] if Path(model.source).is_dir() else []
    with atomic_dir(out, overwrite=overwrite, protected=protected) as tmp:
        images = model.sample([p for p, _ in pairs], [s for _, s in pairs], steps=steps, guidance=guidance,
                              batch_size=batch_size, size=size)
        check_finite(images, [f"prompt {p!r} seed {s}" for p, s in pairs])
        pils = to_pil(images)
        (tmp / "images").mkdir()
        records = []
        for i, ((prompt, seed), img) in enumerate(zip(pairs, pils)):
            name = f"{i:04d}_seed{seed}.png"
            img.save(tmp / "images" / name)
            records.append({"file": f"images/{name}", "prompt": prompt, "seed": seed, "height": img.height,
                            "width": img.width})
        labels = [f"{p} (seed {s})" for p, s in pairs]
        make_grid(pils, columns=len(seeds) if len(seeds) > 1 else min(8, len(pils)), labels=labels).save(
            tmp / "grid.png")
        record = {"model": model.identity(), "deltas": [str(d) for d in deltas], "steps": steps,
                  "guidance": guidance, "height": size[0], "width": size[1],
                  "scheduler": "DDIM (eta 0)", "dtype": str(model.dtype), "images": records}
        atomic_write_json(tmp / "generation.json", record)
    return Path(out)
