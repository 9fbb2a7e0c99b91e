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
