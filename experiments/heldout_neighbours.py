"""How well the frozen text encoder alone separates the held-out wordings: for each held-out wording, is the
nearest training wording (mean-pooled all-MiniLM-L6-v2 sentence embedding, cosine) one of the same value?
This bounds what any denoiser trained on the training wordings can do with held-out words.

Usage: python experiments/heldout_neighbours.py [--out FILE]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def sentence_embeddings(tokenizer, encoder, texts: list[str]) -> torch.Tensor:
    """Mean-pooled, unit-length token states: the sentence-transformer's own pooling."""
    tok = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        states = encoder(**tok)[0]
    mask = tok.attention_mask[..., None].float()
    return torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)


def main() -> None:
    from erasekit.checkpoint import atomic_write_text
    from erasekit.testbed.text import load_text_encoder
    from erasekit.testbed.world import VALUES, wordings

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "heldout_neighbours.json"))
    args = parser.parse_args()
    tokenizer, encoder = load_text_encoder()
    result = {}
    for attr, values in VALUES.items():
        train = list(dict.fromkeys((v, w) for v in values for w in (v, *wordings(attr, v, "synonym"))))
        held = [(v, w) for v in values for w in wordings(attr, v, "heldout")]
        sims = sentence_embeddings(tokenizer, encoder, [w for _, w in held]) @ \
            sentence_embeddings(tokenizer, encoder, [w for _, w in train]).T
        nearest = [train[j] for j in sims.argmax(1).tolist()]
        rows = [{"value": v, "heldout": w, "nearest": n, "nearest_value": nv, "right": nv == v}
                for (v, w), (nv, n) in zip(held, nearest)]
        result[attr] = {"accuracy": round(sum(r["right"] for r in rows) / len(rows), 3), "chance":
                        round(1 / len(values), 3), "wordings": rows}
        print(f"{attr:<11} {result[attr]['accuracy']:.2f} (chance {result[attr]['chance']:.2f})  misses: " +
              ", ".join(f"{r['heldout']} -> {r['nearest']}" for r in rows if not r["right"]))
    atomic_write_text(Path(args.out), json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
