"""The SDXL adapter (StableDiffusionXLPipeline): two CLIP text encoders whose penultimate hidden states,
concatenated, are the cross-attention context, plus the second encoder's pooled projection and the size
ids ("text_time" added conditioning).

Conditioning layout: the denoiser's conditioning for N prompts is (N, L + R, D): the L context rows the
cross-attention K/V read, then R rows holding the pooled embedding (P values, zero-padded to R * D). So
a conditioning passes through methods and attacks like SD's (batched, guided, perturbed) and the
cross-attention edits see only the context rows (Encoded.embeddings). The unconditional branch is all
zeros, as the stock pipeline makes it when force_zeros_for_empty_prompt is set (SDXL base's config).
"""

from __future__ import annotations

import torch

from ..errors import UserError
from ..model import Model
from .pooled import PooledRows


class SDXLModel(PooledRows, Model):
    family = "sdxl"
    text_components = ("text_encoder", "text_encoder_2")

    def __init__(self, pipe, source: str, name: str, sampler_defaults: dict | None = None,
                 origin: dict | None = None):
        if pipe.tokenizer.get_vocab() != pipe.tokenizer_2.get_vocab():
            raise UserError(f"{source}: the two SDXL tokenizers have different vocabularies; erasekit needs "
                            "them to share one (as SDXL's do) so that one token sequence drives both encoders")
        super().__init__(pipe, source, name, sampler_defaults or {"steps": 50, "guidance": 5.0}, origin)
        self.set_pooled(pipe.text_encoder_2.config.projection_dim, pipe.unet.config.cross_attention_dim)

    def identity(self) -> dict:
        return {**super().identity(), "text_encoder_2": type(self.pipe.text_encoder_2).__name__}

    # -- text ---------------------------------------------------------------------------------
    def encode_tokens(self, ids: torch.Tensor, mask: torch.Tensor, substitute=None) -> torch.Tensor:
        """Both encoders' penultimate states side by side, then the pooled rows (module docstring)."""
        penultimate = lambda out: out.hidden_states[-2]  # noqa: E731 - the stock pipeline's clip_skip=None
        first = self._encoder_states(self.pipe.text_encoder, 0, ids, mask, substitute, output=penultimate)
        second_ids = self._second_ids(ids)
        pooled: list[torch.Tensor] = []

        def keep_pooled(out):
            pooled.append(out.text_embeds)
            return out.hidden_states[-2]

        second = self._encoder_states(self.pipe.text_encoder_2, 1, second_ids, mask, substitute, output=keep_pooled)
        return self.pack(torch.cat([first, second], dim=-1), pooled[0].to(self.dtype))

    def _second_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """The second tokenizer's ids: the same tokens, padded with its own pad token after the first [EoT]."""
        pad = self.pipe.tokenizer_2.pad_token_id
        if pad is None:
            return ids
        is_end = ids == self.end_token_id
        first_end = torch.where(is_end.any(1), is_end.int().argmax(1), torch.full_like(ids[:, 0], ids.shape[1]))
        after = torch.arange(ids.shape[1], device=ids.device)[None, :] > first_end[:, None]
        return torch.where(after, torch.full_like(ids, pad), ids)


    def unconditional(self, negative_prompt: str = "") -> torch.Tensor:
        if not negative_prompt and self.pipe.config.get("force_zeros_for_empty_prompt", True):
            return torch.zeros(1, self.max_length + self.pooled_rows, self.context_dim, device=self.device,
                               dtype=self.dtype)
        return super().unconditional(negative_prompt)

    # -- denoiser -----------------------------------------------------------------------------
    def denoiser_inputs(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> tuple[tuple, dict]:
        """Context, pooled embedding and the size ids (original size, crop (0, 0), target size) of the
        image x_t decodes to, as the stock pipeline passes them."""
        scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        height, width = x_t.shape[-2] * scale, x_t.shape[-1] * scale
        time_ids = torch.tensor([height, width, 0, 0, height, width], dtype=x_t.dtype, device=x_t.device)
        added = {"text_embeds": self.pooled(cond), "time_ids": time_ids.expand(x_t.shape[0], -1)}
        return (x_t, t, self.context(cond)), {"added_cond_kwargs": added}
