"""The FLUX.1 adapter (FluxPipeline, schnell and dev): a T5 sequence is the context, a CLIP pooled embedding
the global conditioning, and a flow-matching transformer with joint attention the denoiser.

- Conditioning: (N, L + R, D) as for SDXL: the L T5 rows, then R rows holding the pooled CLIP embedding.
- Prediction: the transformer predicts the flow velocity u = noise - x0 at x_t = (1 - s) x0 + s noise with
  s = t / 1000; `convert` gives eps = x_t + (1 - s) u and x0 = x_t - s u, and Prediction.v is u itself.
- Sampling: FlowMatchEuler with the stock pipeline's sigmas (1 .. 1/steps) and resolution shift mu.
  Guidance: dev is guidance-distilled (the scale is an input of the transformer, one call per step, no
  unconditional branch); schnell takes none. Neither runs classifier-free guidance, as in the stock
  pipeline (true_cfg_scale 1).
- Closed-form edits (`edit_layer_sets`): "text", the default, is what UCE's FLUX script
  (trainscripts/uce_flux_edit.py) edits: `context_embedder`, reading the T5 rows (CONTEXT), and
  `time_text_embed.text_embedder.linear_1`, reading the pooled CLIP embedding (POOLED, one row per prompt);
  each is solved with its own inputs. "blocks" (an option, `--set layers=blocks` or `text+blocks`) is every
  dual-stream block's `attn.add_k_proj` / `attn.add_v_proj`. Their input in block i at a sampler step is
  LN(h_i) * (1 + scale_i) + shift_i: h_i the text stream entering the block (h_0 = context_embedder of the T5
  rows; later blocks add joint attention over the image tokens and an MLP), scale and shift from the timestep,
  the pooled embedding and (dev) the guidance value. No fixed text feature gives it: it depends on the step,
  and from block 1 on on the image latent. So the edit's keys are the inputs themselves, recorded on the
  model's own trajectory for each prompt (seed 0, its default size and guidance, a `feature_steps`-step run of
  its sampler, one key row per step at the chosen positions) from the unedited model. The edit is UCE's exact
  solution for those samples and an approximation elsewhere: other seeds, steps, sizes and guidance values
  give inputs it did not fit; block 0's inputs do not depend on the seed (they read no image token), later
  blocks' do; and an edit of earlier layers in the same run (the text set, block i < j) changes what block j
  then reads, which its keys did not see.
- Losses (attacks): x_t = (1 - s) x0 + s noise, the target is the velocity noise - x0 (`add_noise`, `target`);
  a loss's evenly spread timesteps are taken as sigmas and shifted as the sampler shifts its own
  (`loss_timesteps`), on packed latents.
- Fine-tuning (ESD, SCORE, AdvUnlearn): the loss is in velocity. dev has no unconditional branch in one call,
  so ESD's negative guidance is formed as EraseAnything does (Gao et al. 2024; tomguluson92/EraseAnything,
  utils/calc_loss.py): two calls of the frozen transformer, with the empty prompt and with the concept, each at
  the run's guidance input (`distilled_guidance`: ESD's rollout guidance, 3), give v* = v(x, r) - eta (v(x, c) -
  v(x, r)). Parameter sets: finetune.params' "flux" table (`parameter_table`). TRCE stage 2 and Co-Erasing are
  refused in one line by `require` (`unsupported` says why).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
import torch

from ..errors import UserError
from ..model import CONTEXT, CrossAttentionLayer, Encoded, Model
from .pooled import PooledRows

POOLED = "pooled"  # the pooled CLIP embedding: what time_text_embed.text_embedder.linear_1 reads
STREAM = "stream:"  # + block index: the text stream a dual-stream block's add_k_proj / add_v_proj read


class FluxModel(PooledRows, Model):
    family = "flux"
    text_components = ("text_encoder", "text_encoder_2")
    parameter_table = "flux"
    unsupported = {  # feature -> why it does not run here yet
        "trce-stage2": "its trainable set, a UNet's self-attention and cross-attention queries, has no counterpart "
                       "in FLUX's joint attention, and its guided reference needs classifier-free guidance",
        "co-erasing": "its image tokens come from an IP-Adapter image encoder for a UNet's cross-attention, which "
                      "FLUX has no counterpart of that erasekit reads"}
    _guidance_input: float | None = None  # set by distilled_guidance for a fine-tuning run

    def __init__(self, pipe, source: str, name: str, sampler_defaults: dict | None = None,
                 origin: dict | None = None):
        guided = bool(pipe.transformer.config.guidance_embeds)
        defaults = sampler_defaults or ({"steps": 28, "guidance": 3.5} if guided else {"steps": 4, "guidance": 0.0})
        super().__init__(pipe, source, name, defaults, origin)
        self.set_pooled(pipe.transformer.config.pooled_projection_dim, pipe.transformer.config.joint_attention_dim)

    SAMPLER = "FlowMatchEuler (resolution-shifted)"  # its one sampler, recorded under this name

    def make_scheduler(self, config: dict):
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.sampler = self.SAMPLER
        return FlowMatchEulerDiscreteScheduler.from_config(config)

    def use_sampler(self, name: str) -> None:
        if name != self.SAMPLER:
            raise UserError(f"FLUX.1 samples only with its flow-matching Euler sampler, not {name}: drop "
                            "--scheduler (and --protocol, whose presets are Stable Diffusion 1.x protocols)")

    # -- components: the denoiser is the transformer, the context encoder T5 --------------------------------
    @property
    def unet(self):
        return self.pipe.transformer

    @property
    def text_encoder(self):
        return self.pipe.text_encoder_2

    @property
    def tokenizer(self):
        return self.pipe.tokenizer_2

    @property
    def prediction_type(self) -> str:
        return "flow"

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def image_size(self) -> tuple[int, int]:
        size = int(self.vae.config.sample_size)
        return size, size

    def latent_shape_for(self, size: tuple[int, int]) -> tuple[int, int]:
        """Packed latents: (patches, channels) of 2x2 latent patches. Square sizes only: the patch count alone
        must give the image back."""
        if size[0] != size[1]:
            raise UserError(f"the FLUX adapter makes square images only, not {size[0]}x{size[1]}: give --height "
                            "and --width equal")
        side = size[0] // self.vae_scale
        return (side // 2) ** 2, int(self.unet.config.in_channels)

    @property
    def latent_shape(self) -> tuple[int, int]:
        return self.latent_shape_for(self.image_size())

    @staticmethod
    def latent_hw(latents: torch.Tensor) -> tuple[int, int]:
        """The unpacked latent's height and width of packed latents (B, patches, C): square."""
        side = 2 * math.isqrt(latents.shape[1])
        return side, side

    def identity(self) -> dict:
        cfg = self.unet.config
        return {"name": self.name, "source": self.source, "family": self.family, **self.origin,
                "transformer": type(self.unet).__name__, "joint_attention_dim": cfg.joint_attention_dim,
                "layers": [cfg.num_layers, cfg.num_single_layers], "guidance_embeds": bool(cfg.guidance_embeds),
                "prediction_type": self.prediction_type, "text_encoder": type(self.pipe.text_encoder).__name__,
                "text_encoder_2": type(self.pipe.text_encoder_2).__name__}

    # -- text ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, prompts, batch_size: int = 64, through_eot: bool = False) -> Encoded:
        """T5 rows padded to the tokenizer's length whatever through_eot says (T5 is bidirectional:
        rows_ignore_padding is false), and the pooled CLIP embedding packed in."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        enc = super().encode(prompts, batch_size, through_eot)
        pooled = torch.cat([self._pooled(prompts[i:i + batch_size]) for i in range(0, len(prompts), batch_size)])
        enc.conditioning = self.pack(enc.embeddings, pooled)
        return enc

    def encode_tokens(self, ids: torch.Tensor, mask: torch.Tensor, substitute=None) -> torch.Tensor:
        """T5 states of ids; the pooled CLIP embedding of the text the ids spell (the CLIP tokenizer's own
        tokens: another vocabulary)."""
        context = self._encoder_states(self.pipe.text_encoder_2, 0, ids, mask, substitute)
        texts = self.pipe.tokenizer_2.batch_decode(ids.tolist(), skip_special_tokens=True)
        return self.pack(context, self._pooled(texts))

    def _pooled(self, texts: list[str]) -> torch.Tensor:
        tok = self.pipe.tokenizer
        ids = tok(list(texts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(self.pipe.text_encoder.device)
        return self.pipe.text_encoder(ids, output_hidden_states=False).pooler_output.to(self.dtype)


    # -- closed-form edits ---------------------------------------------------------------------
    def edit_layer_sets(self) -> dict[str, str]:
        return {"text": "the text projections UCE's FLUX script edits: context_embedder (T5 rows) and "
                        "time_text_embed.text_embedder.linear_1 (the pooled CLIP embedding)",
                "blocks": "every dual-stream block's attn.add_k_proj / attn.add_v_proj (the block's text stream, "
                          "sampled on the model's own trajectories: an approximation, see the FLUX adapter)"}

    def layer_set(self, name: str) -> list[CrossAttentionLayer]:
        modules = dict(self.unet.named_modules())
        if name == "text":
            wanted = [("context_embedder", "k", CONTEXT), ("time_text_embed.text_embedder.linear_1", "k", POOLED)]
        else:
            wanted = [(f"transformer_blocks.{i}.attn.add_{kind}_proj", kind, f"{STREAM}{i}")
                      for i in range(len(self.unet.transformer_blocks)) for kind in ("k", "v")]
        return [CrossAttentionLayer(f"{module}.weight", kind, modules[module], reads) for module, kind, reads in wanted
                if isinstance(modules.get(module), torch.nn.Linear)]

    def edit_features(self, enc: Encoded, reads: list[str], steps: int = 4) -> dict:
        """CONTEXT: enc; POOLED: the pooled CLIP embedding (N, P), one row per prompt; "stream:I": the input of
        block I's add_k_proj / add_v_proj (its text stream after norm1_context's modulated LayerNorm) at each of
        a steps-step run of the default sampler from seed 0 (default size and guidance), steps rows per prompt
        (module docstring: what this approximates). Every stream is taken in one sampling run."""
        out = {r: enc for r in reads if r == CONTEXT}
        out.update((r, self.pooled(enc.cond)) for r in reads if r == POOLED)
        streams = [r for r in reads if r.startswith(STREAM)]
        unknown = set(reads) - set(out) - set(streams)
        if unknown:
            raise UserError(f"{self.source}: no FLUX layer reads {sorted(unknown)[0]!r}")
        if streams:
            out.update(self._stream_features(enc, streams, steps))
        return out

    def _stream_features(self, enc: Encoded, streams: list[str], steps: int, batch: int = 8) -> dict[str, Encoded]:
        blocks = self.unet.transformer_blocks
        seen: dict[str, list[torch.Tensor]] = {r: [] for r in streams}

        def keeper(slot: list):
            return lambda module, args: slot.append(args[0].detach().cpu())

        handles = [blocks[int(r[len(STREAM):])].attn.add_k_proj.register_forward_pre_hook(keeper(seen[r]))
                   for r in streams]
        try:
            for a in range(0, len(enc.prompts), batch):
                cond = enc.cond[a:a + batch].to(self.device)
                self.denoise(self.initial_noise([0] * len(cond)), cond, None, steps, self.sampler_defaults["guidance"])
        finally:
            for handle in handles:
                handle.remove()
        k = steps
        repeat = torch.arange(len(enc.prompts)).repeat_interleave(k)  # prompt-major: prompt i, step s -> i * k + s
        out = {}
        for r in streams:
            chunks = [torch.stack(seen[r][c * k:(c + 1) * k], dim=1) for c in range(len(seen[r]) // k)]
            rows = torch.cat(chunks).flatten(0, 1)  # (N * k, L, d)
            out[r] = Encoded([enc.prompts[i] for i in repeat.tolist()], rows, enc.input_ids[repeat],
                             enc.attention_mask[repeat], enc.eot[repeat], [enc.truncated[i] for i in repeat.tolist()])
        return out

    # -- denoiser -----------------------------------------------------------------------------

    def raw(self, x_t, t, emb, params=None, guidance: float | None = None) -> torch.Tensor:
        """The transformer's velocity for packed latents x_t (B, seq, C) at timesteps t (in 0..1000)."""
        t = torch.as_tensor(t, device=x_t.device)
        t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
        emb = emb.to(self.dtype)
        h, w = self.latent_hw(x_t)
        img_ids = _image_ids(h // 2, w // 2).to(x_t.device, self.dtype)
        txt_ids = torch.zeros(emb.shape[1] - self.pooled_rows, 3, device=x_t.device, dtype=self.dtype)
        if guidance is None:
            guidance = self.sampler_defaults["guidance"] if self._guidance_input is None else self._guidance_input
        embed = (torch.full((x_t.shape[0],), float(guidance), device=x_t.device)
                 if self.unet.config.guidance_embeds else None)
        kwargs = {"hidden_states": x_t.to(self.dtype), "timestep": t.to(self.dtype) / 1000, "guidance": embed,
                  "pooled_projections": self.pooled(emb), "encoder_hidden_states": self.context(emb),
                  "txt_ids": txt_ids, "img_ids": img_ids, "return_dict": False}
        if params:
            from torch.func import functional_call

            return functional_call(self.unet, params, (), kwargs)[0]
        return self.unet(**kwargs)[0]

    def guided(self, x_t, t, emb, guidance: float | None = None, uncond: torch.Tensor | None = None, params=None,
               extrapolate: bool = False):
        """One call: dev reads the guidance scale as an input; schnell ignores it; no unconditional branch."""
        return self.raw(x_t, t, emb, params=params, guidance=guidance)

    @contextmanager
    def distilled_guidance(self, scale: float | None):
        before = self._guidance_input
        self._guidance_input = None if scale is None else float(scale)
        try:
            yield
        finally:
            self._guidance_input = before

    def convert(self, x_t, t, out):
        from ..model import Prediction

        t = torch.as_tensor(t, device=x_t.device)
        t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
        s = (t.float() / 1000).view(-1, *([1] * (x_t.ndim - 1)))
        x, u = x_t.float(), out.float()
        return Prediction(eps=x + (1 - s) * u, x0=x - s * u, v=u)

    # -- sampling -----------------------------------------------------------------------------
    def initial_noise(self, seeds: list[int], size: tuple[int, int] | None = None) -> torch.Tensor:
        from ..image_size import latent_shape

        shape = latent_shape(self, size)
        noise = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds]
        return torch.stack(noise).to(self.device, self.dtype)

    def timesteps(self, steps: int, sequence: int | None = None) -> torch.Tensor:
        """The stock schedule for steps, shifted for latents of sequence patches (default: the model's size)."""
        return self._shifted(np.linspace(1.0, 1 / steps, steps), sequence)

    def _shifted(self, sigmas: np.ndarray, sequence: int | None = None) -> torch.Tensor:
        """Timesteps (1000 sigma) of descending sigmas after the scheduler's shift for latents of sequence patches
        (the stock pipeline's resolution shift mu when the scheduler shifts dynamically); the scheduler is left
        set to them."""
        cfg = self.scheduler.config
        seq = sequence or self.latent_shape[0]
        lo, hi = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
        b_lo, b_hi = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15)
        mu = b_lo + (b_hi - b_lo) * (seq - lo) / (hi - lo)
        self.scheduler.set_timesteps(sigmas=sigmas, mu=mu, device=self.device)
        self.scheduler.set_begin_index(0)
        return self.scheduler.timesteps

    def schedule_for(self, steps: int, latents: torch.Tensor) -> torch.Tensor:
        return self.timesteps(steps, latents.shape[1])

    def scale_input(self, latents: torch.Tensor, t) -> torch.Tensor:
        return latents  # FlowMatchEuler does not scale the transformer's input

    def loss_timesteps(self, values: list[int], latents: torch.Tensor) -> list[float]:
        """values / 1000 taken as unshifted sigmas and shifted as the sampler shifts its own for these latents'
        size, so a loss at evenly spread values sees noise levels spread as the sampler's are."""
        sigmas = np.asarray(sorted(values, reverse=True), dtype=np.float64) / self.scheduler.config.num_train_timesteps
        shifted = self._shifted(sigmas, latents.shape[1]).tolist()
        order = sorted(range(len(values)), key=lambda i: -values[i])
        out = [0.0] * len(values)
        for rank, i in enumerate(order):
            out[i] = float(shifted[rank])
        return out

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The flow's x_t = (1 - s) x0 + s noise, s = t / 1000."""
        s = self._sigma(t, x0)
        return ((1 - s) * x0.float() + s * noise.float()).to(self.dtype)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The velocity noise - x0 (the transformer's raw output at add_noise(x0, noise, t))."""
        return noise.float() - x0.float()

    def _sigma(self, t, like: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=like.device, dtype=torch.float32)
        t = t.expand(like.shape[0]) if t.ndim == 0 else t
        return (t / self.scheduler.config.num_train_timesteps).view(-1, *([1] * (like.ndim - 1)))

    def denoise(self, latents, emb, uncond, steps: int, guidance: float, start: int = 0, stop: int | None = None,
                progress: bool = False) -> torch.Tensor:
        timesteps = self.schedule_for(steps, latents)
        self.scheduler.set_begin_index(start)
        stop = len(timesteps) if stop is None else stop
        with torch.no_grad():
            for t in timesteps[start:stop]:
                latents = self.scheduler.step(self.guided(latents, t, emb, guidance), t, latents).prev_sample
        return latents

    def spatial(self, latents: torch.Tensor) -> torch.Tensor:
        """Packed latents (N, patches, C) as the VAE's (N, C / 4, h, w)."""
        h, w = self.latent_hw(latents)
        n, _, c = latents.shape
        return latents.reshape(n, h // 2, w // 2, c // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, c // 4, h, w)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        spatial = self.spatial(latents)
        cfg = self.vae.config
        with torch.no_grad():
            images = self.vae.decode(spatial.to(self.vae.dtype) / cfg.scaling_factor + cfg.shift_factor).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def require(self, feature: str) -> None:
        if feature in self.unsupported:
            raise UserError(f"erasekit cannot run {feature} on FLUX.1 yet ({self.unsupported[feature]}): on "
                            f"{self.source} use esd, score, advunlearn or a closed-form method (uce, rece, erasepro, "
                            "trce-stage1)")


def _image_ids(h: int, w: int) -> torch.Tensor:
    """(h * w, 3) position ids of the packed latent's patches: (0, row, column), as the stock pipeline makes."""
    ids = torch.zeros(h, w, 3)
    ids[..., 1] += torch.arange(h)[:, None]
    ids[..., 2] += torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)
