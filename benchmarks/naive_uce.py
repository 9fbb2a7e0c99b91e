"""UCE written the way the public reference code is structured, as a baseline for benchmarks and tests:
a Python loop over layers, the prompts encoded one by one inside it, and an explicit inverse per layer."""

from __future__ import annotations

import torch


def naive_uce(model, pairs, preserve, lam=0.5, erase_scale=1.0, preserve_scale=1.0,
              dtype=torch.float32) -> dict[str, torch.Tensor]:
    """pairs: [(target prompt, guide prompt)], preserve: [prompt]; keys at [KEY]. Returns new weights by name.
    dtype float32 is the public code's precision (its explicit inverse alone errs by ~1e-5 relative)."""

    def key_row(prompt):
        enc = model.encode([prompt])
        return enc.embeddings[0, enc.key[0]].to(dtype).cpu()

    new = {}
    for layer in model.cross_attention_layers():
        w0 = layer.weight.detach().to(dtype).cpu()
        d = w0.shape[1]
        mat1 = lam * w0.clone()
        mat2 = lam * torch.eye(d, dtype=dtype)
        for target, guide in pairs:
            c, g = key_row(target), key_row(guide)
            v = w0 @ g
            mat1 += erase_scale * torch.outer(v, c)
            mat2 += erase_scale * torch.outer(c, c)
        for prompt in preserve:
            c = key_row(prompt)
            mat1 += preserve_scale * torch.outer(w0 @ c, c)
            mat2 += preserve_scale * torch.outer(c, c)
        new[layer.name] = mat1 @ torch.inverse(mat2)
    return new


def public_uce(model, edit, guides, preserve, lam=0.5, erase_scale=1.0, preserve_scale=1.0,
               dtype=torch.float32) -> dict[str, torch.Tensor]:
    """UCE with the structure of the public code as written (rohitgandikota/unified-concept-editing,
    trainscripts/uce_sd_erase.py at 28c81ed), the baseline of benchmarks/uce_speed.py:
    - lines 24-42: every distinct prompt of edit + guides + preserve encoded once, one prompt per text-encoder
      call, padded to the tokenizer's length, the row at attention_mask.sum() - 2 kept;
    - lines 44-53: each distinct guide and preserve row passed through every original K/V module;
    - lines 55-82: per module, lam W0 and lam I, plus one outer product per erase pair and per preserve prompt,
      then mat1 @ inverse(mat2) in float32.
    edit and guides are the public code's parallel lists (after its --expand_prompts), preserve its list."""
    rows = {}
    for prompt in list(edit) + list(guides) + list(preserve):
        if prompt not in rows:
            enc = model.encode([prompt])
            rows[prompt] = enc.embeddings[0, enc.key[0]].to(dtype).cpu()
    layers = model.cross_attention_layers()
    w0s = [layer.weight.detach().to(dtype).cpu() for layer in layers]
    outputs = {p: [w0 @ rows[p] for w0 in w0s] for p in dict.fromkeys(list(guides) + list(preserve))}
    new = {}
    for i, (layer, w0) in enumerate(zip(layers, w0s)):
        mat1 = lam * w0.clone()
        mat2 = lam * torch.eye(w0.shape[1], dtype=dtype)
        for target, guide in zip(edit, guides):
            c = rows[target]
            mat1 += erase_scale * torch.outer(outputs[guide][i], c)
            mat2 += erase_scale * torch.outer(c, c)
        for prompt in preserve:
            c = rows[prompt]
            mat1 += preserve_scale * torch.outer(outputs[prompt][i], c)
            mat2 += preserve_scale * torch.outer(c, c)
        new[layer.name] = mat1 @ torch.inverse(mat2)
    return new
