"""The testbed's CLIP: a small CNN image encoder aligned with the frozen testbed text encoder.

Text side: the testbed text encoder (all-MiniLM-L6-v2, frozen) mean-pooled over the attention
mask and L2-normalised (a sentence-transformers sentence embedding), then a trainable linear
projection. Image side: a CNN whose 4x4 feature map is projected, position by position, into
the joint space (`image_tokens`, 16 tokens); the image embedding is the normalised mean of
those tokens. Trained with a symmetric InfoNCE loss and a learnable temperature; batches of
this small world hold many pairs that fit each other, so every caption an image fits (same
values on the attributes the caption names) counts as a positive.

Uses: a "CLIP score" of generated images against prompts, retrieval checks, and the image
encoder of image-conditioned erasure (`image_tokens`).
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .judge import DEFAULT_CHANNELS, Trunk, as_model_input, augment, render_batch
from .small_models import load_small_model, save_small_model
from .text import MAX_LENGTH
from .world import ATTRIBUTES, TEMPLATES, VALUES, WORDINGS, canonical, caption, fill_template, random_scene

DEFAULT_PATH = Path(__file__).parent / "weights" / "clip.safetensors"
TEXT_DIM = 384  # all-MiniLM-L6-v2 hidden size
DEFAULT_EMBED_DIM = 384
DEFAULT_HIDDEN = 256
TEST_SEED = 31_415_926


# ---------------------------------------------------------------------------------------------
# text side (frozen)


class _FrozenText:
    """Tokenizer + frozen BERT, loaded on first use and shared by every TestbedCLIP."""

    _cache: tuple | None = None

    @classmethod
    def get(cls):
        if cls._cache is None:
            from .text import load_text_encoder

            cls._cache = load_text_encoder()
        return cls._cache


@torch.no_grad()
def sentence_embeddings(prompts: list[str], batch_size: int = 256, device=None) -> torch.Tensor:
    """Frozen sentence embeddings (N, 384): masked mean of the text encoder's token states,
    L2-normalised. Prompts are encoded in batches sorted by length (padding does not change
    the result: padded positions are masked out of both attention and the mean)."""
    tokenizer, encoder = _FrozenText.get()
    if device is not None:
        encoder.to(device)
    dev = next(encoder.parameters()).device
    prompts = list(prompts)
    out = torch.empty(len(prompts), TEXT_DIM)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        tok = tokenizer([prompts[i] for i in idx], padding=True, truncation=True, max_length=MAX_LENGTH,
                        return_tensors="pt")
        mask = tok.attention_mask.to(dev)
        states = encoder(tok.input_ids.to(dev), attention_mask=mask)[0]
        m = mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * m).sum(1) / m.sum(1).clamp_min(1e-9)
        out[torch.tensor(idx)] = F.normalize(pooled.float(), dim=-1).cpu()
    return out


# ---------------------------------------------------------------------------------------------
# the model


class TestbedCLIP(nn.Module):
    """Image encoder + text projection into a shared, L2-normalised embedding space."""

    __test__ = False  # not a pytest class despite the name

    def __init__(self, channels=DEFAULT_CHANNELS, embed_dim: int = DEFAULT_EMBED_DIM,
                 hidden: int = DEFAULT_HIDDEN, text_dim: int = TEXT_DIM):
        super().__init__()
        self.channels = tuple(int(c) for c in channels)
        self.embed_dim, self.hidden, self.text_dim = int(embed_dim), int(hidden), int(text_dim)
        self.trunk = Trunk(self.channels)
        # per-position MLP from the trunk's 4x4 map into the joint space
        self.token_mlp = nn.Sequential(nn.Conv2d(self.trunk.out_channels, self.hidden, 1), nn.ReLU(),
                                       nn.Conv2d(self.hidden, self.embed_dim, 1))
        self.text_proj = nn.Linear(self.text_dim, self.embed_dim)
        with torch.no_grad():  # start from the sentence embedding itself (or a slice of it)
            self.text_proj.weight.copy_(torch.eye(self.embed_dim, self.text_dim))
            self.text_proj.bias.zero_()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def config(self) -> dict:
        return {"channels": list(self.channels), "embed_dim": self.embed_dim, "hidden": self.hidden,
                "text_dim": self.text_dim}

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # images
    def image_tokens(self, x) -> torch.Tensor:
        """(N, 16, D): the trunk's 4x4 feature map, row-major, projected into the joint space
        (not normalised). Their mean, normalised, is `embed_images`."""
        h = self.token_mlp(self.trunk(as_model_input(x, self.device)))
        return h.flatten(2).transpose(1, 2)

    def embed_images(self, x) -> torch.Tensor:
        """(N, D) L2-normalised image embeddings; x as `judge.as_model_input` takes it."""
        return F.normalize(self.image_tokens(x).mean(dim=1), dim=-1)

    # texts
    def project_text(self, sentence_emb: torch.Tensor) -> torch.Tensor:
        """Frozen sentence embeddings (N, 384) -> (N, D) L2-normalised joint embeddings."""
        return F.normalize(self.text_proj(sentence_emb.to(self.device)), dim=-1)

    def embed_texts(self, prompts) -> torch.Tensor:
        """(N, D) L2-normalised text embeddings (loads the frozen text encoder on first use)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        return self.project_text(sentence_embeddings(list(prompts)))

    # scores
    def similarity(self, images, prompts) -> torch.Tensor:
        """(N_images, N_prompts) cosine similarities."""
        return self.embed_images(images) @ self.embed_texts(prompts).T

    def score(self, images, prompts) -> torch.Tensor:
        """(N,) cosine similarity of each image with its own prompt (a "CLIP score")."""
        if isinstance(prompts, str):
            prompts = [prompts]
        img = self.embed_images(images)
        txt = self.embed_texts(prompts)
        if txt.shape[0] == 1 and img.shape[0] > 1:
            txt = txt.expand(img.shape[0], -1)
        if txt.shape[0] != img.shape[0]:
            raise ValueError(f"{img.shape[0]} images but {txt.shape[0]} prompts")
        return (img * txt).sum(dim=-1)


# ---------------------------------------------------------------------------------------------
# saving and loading


def save_clip(model: TestbedCLIP, path, extra_meta: dict | None = None, dtype=torch.float16) -> Path:
    return save_small_model(model, path, "clip", keep_fp32=lambda k: k == "logit_scale", extra_meta=extra_meta,
                            dtype=dtype)


def load_clip(path=None, device: torch.device | str = "cpu") -> TestbedCLIP:
    """The testbed CLIP at path (default: the shipped weights), eval mode, fp32, frozen."""
    return load_small_model(Path(path) if path is not None else DEFAULT_PATH, TestbedCLIP, "CLIP",
                            "erasekit testbed train-clip", device)


# ---------------------------------------------------------------------------------------------
# what a caption says: used to find every caption an image fits


def _wording_patterns():
    pats = []
    for attr in ("background", "style", "shape", "color"):  # phrases that contain other words first
        entries = [(w, value) for value, e in WORDINGS[attr].items() for w in e["train"] + e["heldout"]]
        entries.sort(key=lambda e: -len(e[0]))
        pats.append((attr, [(re.compile(r"(?<![\w-])" + re.escape(w) + r"(?![\w-])"), v) for w, v in entries]))
    return pats


_PATTERNS = None


def caption_values(text: str) -> dict[str, str]:
    """The attribute values a testbed caption names, e.g. {"shape": "circle", "color": "red"};
    attributes it leaves out are absent. Raises ValueError when a caption names two values of
    one attribute."""
    global _PATTERNS
    if _PATTERNS is None:
        _PATTERNS = _wording_patterns()
    rest = " " + text.lower() + " "
    found: dict[str, str] = {}
    for attr, pats in _PATTERNS:
        for pat, value in pats:
            m = pat.search(rest)
            if m is None:
                continue
            if attr in found and found[attr] != value:
                raise ValueError(f"caption {text!r} names two values of {attr}")
            found[attr] = value
            rest = rest[:m.start()] + " | " + rest[m.end():]
    return found


def _fits(image_values: list[dict[str, str]], caption_named: list[dict[str, str]]) -> torch.Tensor:
    """(N_images, N_captions) bool: the image has every value the caption names."""
    iv = {a: torch.tensor([VALUES[a].index(v[a]) for v in image_values]) for a in ATTRIBUTES}
    ok = torch.ones(len(image_values), len(caption_named), dtype=torch.bool)
    for a in ATTRIBUTES:
        cv = torch.tensor([VALUES[a].index(c[a]) if a in c else -1 for c in caption_named])
        ok &= (cv[None, :] == -1) | (iv[a][:, None] == cv[None, :])
    return ok


def _values(scene) -> dict[str, str]:
    return {a: scene.value(a) for a in ATTRIBUTES}


# ---------------------------------------------------------------------------------------------
# evaluation


def canonical_caption(values: dict[str, str]) -> str:
    """The canonical caption of a full set of values: "a solid red circle on a black background"."""
    return fill_template(TEMPLATES[0], {a: canonical(a, values[a]) for a in ATTRIBUTES})


def _embed_unique(model: TestbedCLIP, prompts: list[str]) -> torch.Tensor:
    """embed_texts, encoding each distinct prompt once."""
    unique = sorted(set(prompts))
    row = {p: i for i, p in enumerate(unique)}
    return model.embed_texts(unique)[torch.tensor([row[p] for p in prompts])]


@torch.no_grad()
def evaluate_clip(model: TestbedCLIP, n: int = 500, seed: int = TEST_SEED) -> dict:
    """Retrieval on n held-out rendered images.

    retrieval: image->text and text->image top-1 among the n matched captions; a hit is a
    caption the image fits (captions of images with the same values are the same string, so
    "fits" is the only fair criterion), for canonical, training-style (with dropped attributes)
    and held-out wordings. per_attribute: for each attribute, the fraction of images whose
    canonical caption beats the canonical captions with every other value of that attribute
    (the other attributes at their true values); "all" requires it for all four at once.
    """
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    values = [_values(s) for s in scenes]
    img = model.embed_images(render_batch(scenes))
    out: dict = {"images": n, "seed": seed, "retrieval": {}}
    for kind, drop in (("canonical", 0.0), ("train", 0.15), ("heldout", 0.0)):
        caps = [caption(s, rng, kind, drop) for s in scenes]
        txt = _embed_unique(model, caps)
        fits = _fits(values, [caption_values(c) for c in caps])
        sim = img @ txt.T
        i2t = fits[torch.arange(n), sim.argmax(dim=1)].float().mean().item()
        t2i = fits[sim.argmax(dim=0), torch.arange(n)].float().mean().item()
        out["retrieval"][kind] = {"image_to_text_top1": round(i2t, 4), "text_to_image_top1": round(t2i, 4)}
    per_attr, all_ok = {}, torch.ones(n, dtype=torch.bool)
    for a in ATTRIBUTES:
        prompts = [canonical_caption({**v, a: val}) for v in values for val in VALUES[a]]
        k = len(VALUES[a])
        sims = (img[:, None, :] * _embed_unique(model, prompts).view(n, k, -1)).sum(-1)  # (n, k)
        true = torch.tensor([VALUES[a].index(v[a]) for v in values])
        true_sim = sims[torch.arange(n), true]
        others = sims.clone()
        others[torch.arange(n), true] = -math.inf
        ok = true_sim > others.max(dim=1).values
        per_attr[a] = round(ok.float().mean().item(), 4)
        all_ok &= ok
    per_attr["all"] = round(all_ok.float().mean().item(), 4)
    out["per_attribute"] = per_attr
    # the same with the attribute named by a held-out wording (the others canonical): how far
    # the alignment generalises through the frozen text encoder to words it never saw
    heldout = {}
    for a in ATTRIBUTES:
        k = len(VALUES[a])
        wins = torch.zeros(n)
        for j in range(2):
            prompts = [fill_template(TEMPLATES[0], {**{b: canonical(b, v[b]) for b in ATTRIBUTES},
                                                    a: WORDINGS[a][val]["heldout"][j]})
                       for v in values for val in VALUES[a]]
            sims = (img[:, None, :] * _embed_unique(model, prompts).view(n, k, -1)).sum(-1)
            true = torch.tensor([VALUES[a].index(v[a]) for v in values])
            wins += (sims.argmax(dim=1) == true).float()
        heldout[a] = round((wins / 2).mean().item(), 4)
    out["per_attribute_heldout_wording"] = heldout
    return out


# ---------------------------------------------------------------------------------------------
# training


def train_clip(out_path=DEFAULT_PATH, seed: int = 0, steps: int = 800, batch_size: int = 256,
               lr: float = 2e-3, text_lr: float = 5e-4, weight_decay: float = 1e-4, warmup: int = 100,
               captions: int = 10000, per_combo: int = 64, refresh_per_step: int = 32,
               clean_fraction: float = 0.3, drop_prob: float = 0.15, eval_images: int = 500,
               threads: int | None = 1, log_every: int = 50) -> dict:
    """Train the testbed CLIP, write it to out_path (safetensors, fp16), return the final metrics.

    A pool of `captions` training captions (world.caption, kind "train", drop_prob) is encoded
    once by the frozen text encoder; every step pairs a batch of them with rendered images of
    their scenes' values (fresh jitter; a pool of per_combo renders for each of the 360 value
    combinations, refresh_per_step of them re-rendered every step), augmented like generated
    images except for clean_fraction of them. threads: torch.set_num_threads (None: leave it).
    """
    if threads is not None:
        torch.set_num_threads(threads)
    t0 = time.time()
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 1])
    gen = torch.Generator().manual_seed(seed)

    # captions and their frozen embeddings
    cap_scenes = [random_scene(rng) for _ in range(captions)]
    cap_text = [caption(s, rng, "train", drop_prob) for s in cap_scenes]
    unique = sorted(set(cap_text))
    emb_unique = sentence_embeddings(unique)
    row = {c: i for i, c in enumerate(unique)}
    cap_emb = emb_unique[torch.tensor([row[c] for c in cap_text])]
    named_unique = [caption_values(c) for c in unique]
    cap_named = [named_unique[row[c]] for c in cap_text]
    print(f"encoded {len(unique)} unique captions of {captions} in {time.time() - t0:.1f}s", flush=True)

    # images: per_combo renders for every value combination
    combos = [dict(zip(ATTRIBUTES, vals)) for vals in np.array(np.meshgrid(
        *[np.arange(len(VALUES[a])) for a in ATTRIBUTES], indexing="ij")).reshape(len(ATTRIBUTES), -1).T.tolist()]
    combos = [{a: VALUES[a][i] for a, i in c.items()} for c in combos]
    combo_index = {tuple(c[a] for a in ATTRIBUTES): i for i, c in enumerate(combos)}
    t1 = time.time()
    pool = render_batch([random_scene(rng, **c) for c in combos for _ in range(per_combo)])
    pool = pool.view(len(combos), per_combo, *pool.shape[1:])
    cap_combo = torch.tensor([combo_index[tuple(s.value(a) for a in ATTRIBUTES)] for s in cap_scenes])
    print(f"rendered {pool.shape[0] * per_combo} images in {time.time() - t1:.1f}s", flush=True)

    model = TestbedCLIP().train()
    opt = torch.optim.AdamW([
        {"params": list(model.trunk.parameters()) + list(model.token_mlp.parameters()), "lr": lr,
         "weight_decay": weight_decay, "base": lr},
        {"params": list(model.text_proj.parameters()), "lr": text_lr, "weight_decay": 0.0, "base": text_lr},
        {"params": [model.logit_scale], "lr": lr, "weight_decay": 0.0, "base": lr},
    ])

    def sched(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    running = None
    for step in range(steps):
        if refresh_per_step:
            ci = rng.integers(len(combos), size=refresh_per_step)
            si = rng.integers(per_combo, size=refresh_per_step)
            pool[torch.from_numpy(ci), torch.from_numpy(si)] = render_batch(
                [random_scene(rng, **combos[c]) for c in ci])
        idx = torch.from_numpy(rng.integers(captions, size=batch_size))
        slot = torch.from_numpy(rng.integers(per_combo, size=batch_size))
        x = pool[cap_combo[idx], slot]
        keep = (torch.rand(batch_size, generator=gen) < clean_fraction).view(-1, 1, 1, 1)
        x = torch.where(keep, x, augment(x, gen))
        batch_values = [combos[int(c)] for c in cap_combo[idx]]
        fits = _fits(batch_values, [cap_named[int(i)] for i in idx]).float()

        for group in opt.param_groups:
            group["lr"] = group["base"] * sched(step)
        img = model.embed_images(x)
        txt = model.project_text(cap_emb[idx])
        scale = model.logit_scale.clamp(max=math.log(100.0)).exp()
        logits = scale * img @ txt.T
        loss_i = -(fits / fits.sum(1, keepdim=True) * logits.log_softmax(dim=1)).sum(1).mean()
        loss_t = -(fits / fits.sum(0, keepdim=True) * logits.log_softmax(dim=0)).sum(0).mean()
        loss = 0.5 * (loss_i + loss_t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(max=math.log(100.0))
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        done = step + 1
        if done % log_every == 0 or done == steps:
            print(json.dumps({"step": done, "loss": round(running, 4), "scale": round(scale.item(), 2),
                              "lr": round(opt.param_groups[0]["lr"], 6),
                              "elapsed_s": round(time.time() - t0, 1)}), flush=True)

    model.eval()
    train_s = time.time() - t0
    meta = {"seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr, "text_lr": text_lr,
            "captions": captions, "unique_captions": len(unique), "drop_prob": drop_prob,
            "per_combo": per_combo, "train_s": round(train_s, 1)}
    out_path = Path(out_path)
    save_clip(model, out_path, meta)
    metrics = evaluate_clip(load_clip(out_path), n=eval_images)  # the weights as shipped (fp16)
    meta["eval"] = metrics
    save_clip(model, out_path, meta)
    result = {"path": str(out_path), "train_s": round(train_s, 1), "wall_s": round(time.time() - t0, 1),
              "bytes": out_path.stat().st_size, **metrics}
    print(json.dumps(result), flush=True)
    return result
