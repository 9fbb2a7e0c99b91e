"""The model interface every family's adapter implements, and its SD1.x/SD2.x implementation.

Methods, attacks and evaluation talk to a Model, never to a specific architecture: it encodes
prompts (with token positions taken from token ids) into the denoiser's conditioning, lists the
cross-attention K/V projections a closed-form edit may change, predicts epsilon, x0 and v in one
convention whatever the model was trained to predict, and samples or rolls out with batched DDIM (or
another sampler erasekit.samplers names) and classifier-free guidance. Other families (erasekit.families:
SDXL; the testbed in erasekit.testbed.adapter) subclass it and override what differs; none of this module knows them.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from . import samplers
from .errors import UserError
from .shared_rows import only_distinct_rows


@dataclass
class Encoded:
    """Text-encoder output for a batch of prompts, with the token positions that matter."""

    prompts: list[str]
    embeddings: torch.Tensor  # (N, L, d) what the cross-attention K/V projections read
    input_ids: torch.Tensor  # (N, L)
    attention_mask: torch.Tensor  # (N, L)
    eot: torch.Tensor  # (N,) first end-of-text ([SEP] for BERT-style encoders) position, from the ids
    truncated: list[bool]
    conditioning: torch.Tensor | None = None  # what the denoiser is called with, when it is more than embeddings
    through_eot: bool = False  # rows after each prompt's [EoT] are not the model's: encoded at the batch's
    # longest prompt's length (Model.encode(through_eot=True)) or filler; a reader takes none of them

    @property
    def cond(self) -> torch.Tensor:
        """The denoiser's conditioning for these prompts (model.raw's third argument): the embeddings
        themselves for SD; for SDXL the embeddings with the pooled text embedding packed in."""
        return self.embeddings if self.conditioning is None else self.conditioning

    @property
    def key(self) -> torch.Tensor:
        """(N,) the last content token: the one just before [EoT] (the start token for an empty prompt)."""
        return (self.eot - 1).clamp(min=0)

    @property
    def padding(self) -> torch.Tensor:
        """(N, L) bool: positions after [EoT] (none of them the model's when through_eot)."""
        positions = torch.arange(self.input_ids.shape[1], device=self.eot.device)
        return positions[None, :] > self.eot[:, None]

    def rows(self, positions: torch.Tensor) -> torch.Tensor:
        """(N, d) embedding rows at one position per prompt (e.g. enc.rows(enc.eot))."""
        return self.embeddings[torch.arange(len(self.prompts)), positions.to(self.embeddings.device)]


@dataclass
class Prediction:
    """A denoiser prediction in all three conventions."""

    eps: torch.Tensor
    x0: torch.Tensor
    v: torch.Tensor


CONTEXT = "context"  # the input of layers that read the context rows (Encoded.embeddings) themselves


@dataclass
class CrossAttentionLayer:
    """A text-conditioning projection a closed-form edit may change, and what it reads: `reads` names its
    input, CONTEXT for the context rows themselves (every SD cross-attention K/V), otherwise a name the
    family's `edit_features` turns into that layer's input features (FLUX: "pooled", "stream:N")."""
    name: str  # diffusers parameter name, e.g. "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    kind: str  # "k" or "v"
    module: torch.nn.Linear
    reads: str = CONTEXT

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight


class Model:
    """A loaded text-to-image model. Build one with erasekit.load(). This class is the SD1.x/SD2.x adapter
    (one CLIP or BERT-style text encoder, a UNet with cross-attention); a family overrides what differs."""

    family = "sd"  # the adapter's family name, recorded in identity()
    world = None  # a prompt world (the testbed's): ground-truth prompt sets, captions and a CLIP scorer
    text_components = ("text_encoder",)  # pipeline components a delta key may name by prefix ("text_encoder.")
    parameter_table = "unet"  # which of erasekit.finetune.params' parameter-set tables names this denoiser's tensors

    def __init__(self, pipe, source: str, name: str, sampler_defaults: dict | None = None,
                 origin: dict | None = None):
        """origin: where the weights came from beyond source (a hub id's repo and revision)."""
        self.pipe = pipe
        self.source = source
        self.name = name
        self.origin = dict(origin or {})
        self.sampler_defaults = dict(sampler_defaults or {"steps": 50, "guidance": 7.5})
        self.sampler = samplers.DEFAULT  # the name of the sampler self.scheduler is (use_sampler changes it)
        self.scheduler = self.make_scheduler(dict(pipe.scheduler.config))
        if not self.cross_attention_layers():
            raise UserError(f"the denoiser of {source} has no cross-attention (attn2.to_k/to_v) layers: "
                            "erasekit needs a text-conditioned UNet with cross-attention")

    def make_scheduler(self, config: dict):
        """The sampler every command uses unless told otherwise, from the folder's scheduler config: DDIM
        (eta 0). Latents are never clipped unless the config asks: DDIM's own default (clip_sample=True) would
        clip SD latents and x0 predictions to [-1, 1]."""
        return samplers.build(samplers.DEFAULT, config)

    def use_sampler(self, name: str) -> None:
        """Sample with the named sampler (erasekit.samplers: ddim, pndm, lms, dpm) from now on, built from the
        folder's scheduler config; one the model's prediction type cannot use is refused in one line."""
        if name != self.sampler:
            self.scheduler = samplers.build(name, dict(self.pipe.scheduler.config))
            self.sampler = name

    def require(self, feature: str) -> None:
        """Refuse in one line what this family cannot run yet ("fine-tuning", "token attacks"); SD runs all."""

    # -- components -------------------------------------------------------------------------
    @property
    def unet(self):
        return self.pipe.unet

    @property
    def text_encoder(self):
        return self.pipe.text_encoder

    @property
    def tokenizer(self):
        return self.pipe.tokenizer

    @property
    def vae(self):
        return self.pipe.vae

    def components(self) -> dict[str, torch.nn.Module]:
        """The pipeline's trainable parts by delta prefix: "unet" (bare keys) and each text encoder."""
        return {"unet": self.unet, **{name: getattr(self.pipe, name) for name in self.text_components}}

    def text_encoders(self) -> list[torch.nn.Module]:
        return [getattr(self.pipe, name) for name in self.text_components]

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    @property
    def max_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = int(self.unet.config.sample_size)
        return (int(self.unet.config.in_channels), size, size)

    def image_size(self) -> tuple[int, int]:
        """(height, width) in pixels of the images the model makes by default."""
        _, height, width = self.latent_shape
        scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return height * scale, width * scale

    def latent_shape_for(self, size: tuple[int, int]) -> tuple[int, ...]:
        """The latent of one image of size (height, width) pixels."""
        scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return self.latent_shape[0], size[0] // scale, size[1] // scale

    @property
    def rows_ignore_padding(self) -> bool:
        """Whether each prompt's context rows up to and including [EoT] are the same whatever padding follows:
        true for causal text encoders (CLIP: SD1.x, SD2.x, SDXL's two), false for bidirectional ones (the
        testbed's MiniLM, BERT-style encoders, FLUX's T5), whose every row reads the padding too. Where it is
        true, encode(through_eot=True) may stop at the longest prompt's [EoT] instead of the tokenizer's length
        (FLUX: its context encoder is T5, so false)."""
        return all(getattr(enc.config, "model_type", "") in CAUSAL_TEXT_ENCODERS for enc in self.text_encoders())

    @property
    def end_token_id(self) -> int:
        tok = self.tokenizer
        return tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id

    def identity(self) -> dict:
        """What a delta records about its base model (the tensor hash is the decisive check)."""
        cfg = self.unet.config
        return {
            "name": self.name,
            "source": self.source,
            "family": self.family,
            **self.origin,
            "unet": type(self.unet).__name__,
            "cross_attention_dim": cfg.cross_attention_dim,
            "block_out_channels": list(cfg.block_out_channels),
            "sample_size": cfg.sample_size,
            "prediction_type": self.prediction_type,
            "text_encoder": type(self.text_encoder).__name__,
        }

    def to(self, device=None, dtype=None) -> Model:
        self.pipe.to(device=device, dtype=dtype)
        return self

    # -- text ---------------------------------------------------------------------------------
    def tokenize(self, prompts: list[str]):
        tok = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length,
                             truncation=True, return_tensors="pt")
        full = self.tokenizer(list(prompts), padding=False, truncation=False)["input_ids"]
        truncated = [len(ids) > self.max_length for ids in full]
        return tok.input_ids, tok.attention_mask, truncated

    @torch.no_grad()
    def encode(self, prompts: list[str] | str, batch_size: int = 64, through_eot: bool = False) -> Encoded:
        """Encode prompts exactly as StableDiffusionPipeline.encode_prompt does, in batches. through_eot: a
        caller that reads no row after a prompt's [EoT] lets a family whose rows_ignore_padding encode the
        prompts in token order, each batch only through its longest prompt's [EoT], its Linear layers computing
        one row per distinct token prefix (erasekit.shared_rows): every prompt's rows up to its [EoT] are the
        padded encoding's, the rows after it filler (the result's through_eot says so) up to the longest
        prompt's [EoT]. Other families pad as ever."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise UserError("the prompt list is empty: give at least one prompt")
        ids, mask, truncated = self.tokenize(prompts)
        for prompt, cut in zip(prompts, truncated):
            if cut:
                warnings.warn(f"prompt truncated to the tokenizer's {self.max_length} tokens: {prompt[:60]!r}",
                              stacklevel=2)
        eot = end_positions(ids, self.end_token_id)
        short = through_eot and self.rows_ignore_padding
        if not short:
            cond = torch.cat([self.encode_tokens(ids[i:i + batch_size], mask[i:i + batch_size])
                              for i in range(0, len(prompts), batch_size)])
        else:  # prompts in token order (shared prefixes side by side), each batch through its longest [EoT]
            length = int(eot.max()) + 1
            ids, mask = ids[:, :length], mask[:, :length]
            listed = ids.tolist()
            order = torch.tensor(sorted(range(len(prompts)), key=lambda i: listed[i][:int(eot[i]) + 1]))
            parts = []
            for i in range(0, len(prompts), batch_size):
                rows = order[i:i + batch_size]
                cut = int(eot[rows].max()) + 1
                with only_distinct_rows(self.text_encoders(), ids[rows, :cut], eot[rows]):
                    part = self.encode_tokens(ids[rows, :cut], mask[rows, :cut])
                rest = self.context(part)
                parts.append(self.extend_context(part, rest.new_zeros(len(rows), length - cut, rest.shape[-1])))
            cond = torch.cat(parts)[torch.argsort(order)]
        emb = self.context(cond)
        return Encoded(prompts, emb, ids, mask, eot, truncated, None if emb is cond else cond, short)

    def encode_tokens(self, ids: torch.Tensor, mask: torch.Tensor, substitute=None) -> torch.Tensor:
        """The denoiser's conditioning (B, L, d) for token ids (B, L) with attention mask (B, L) or (1, L).
        substitute(table, k), when given, returns the token embeddings (B, L, d_tok) text encoder k (0: the
        first) reads instead of looking ids up in its embedding table `table` (differentiably; attacks
        optimize them), or None to look the ids up."""
        return self._encoder_states(self.text_encoder, 0, ids, mask, substitute)

    def _encoder_states(self, encoder, k: int, ids, mask, substitute, output=None):
        """One text encoder's output for ids, with substitute's token embeddings when given; output picks
        a hidden state (default: the last layer's)."""
        use_mask = bool(getattr(encoder.config, "use_attention_mask", False))
        ids, mask = ids.to(encoder.device), mask.to(encoder.device).expand(ids.shape[0], -1)
        table = encoder.get_input_embeddings()
        embeds = substitute(table.weight, k) if substitute is not None else None
        # every embedding module holding the table's weight: T5's encoder looks tokens up in its own
        # embed_tokens, tied to (not the same module as) the `shared` table get_input_embeddings returns
        handles = [] if embeds is None else [
            m.register_forward_hook(lambda m, i, o: embeds.to(o.dtype)) for m in encoder.modules()
            if isinstance(m, torch.nn.Embedding) and m.weight is table.weight]
        try:
            out = encoder(ids, attention_mask=mask if use_mask else None, output_hidden_states=output is not None)
        finally:
            for handle in handles:
                handle.remove()
        return (out[0] if output is None else output(out)).to(self.dtype)

    def extend_context(self, cond: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """A conditioning whose cross-attention context has rows (N, R, d) appended (Co-Erasing's image tokens)."""
        return torch.cat([cond, rows.to(cond.dtype)], dim=1)

    def unconditional(self, negative_prompt: str = "") -> torch.Tensor:
        """(1, L, d) the conditioning classifier-free guidance pairs with: the negative prompt's encoding, as
        the family's stock pipeline makes it."""
        return self.encode([negative_prompt]).cond

    def context(self, cond: torch.Tensor) -> torch.Tensor:
        """The rows of a conditioning that the cross-attention K/V read (all of them for SD)."""
        return cond

    # -- denoiser -----------------------------------------------------------------------------
    def edit_layer_sets(self) -> dict[str, str]:
        """The sets of text-conditioning layers a closed-form edit may change, {name: what it holds}; the
        first is the default. A method's `layers` setting names one, or several joined by '+'."""
        return {"cross-attention": "every cross-attention K/V projection (attn2.to_k, attn2.to_v)"}

    def layer_set(self, name: str) -> list[CrossAttentionLayer]:
        """The layers of one set edit_layer_sets names."""
        layers = []
        for module_name, module in self.unet.named_modules():
            for kind in ("k", "v"):
                if module_name.endswith(f"attn2.to_{kind}") and isinstance(module, torch.nn.Linear):
                    layers.append(CrossAttentionLayer(f"{module_name}.weight", kind, module))
        return layers

    def cross_attention_layers(self, layers: str = "default") -> list[CrossAttentionLayer]:
        """The layers a closed-form edit changes: the family's default set, or the sets `layers` names
        ("A" or "A+B", edit_layer_sets), each layer once."""
        sets = self.edit_layer_sets()
        names = [next(iter(sets))] if layers == "default" else [n.strip() for n in layers.split("+")]
        unknown = [n for n in names if n not in sets]
        if unknown:
            raise UserError(f"{self.source} has no layer set {unknown[0]!r}: use --set layers= one of "
                            f"{', '.join(['default', *sets])} (or several joined by '+')")
        found: dict[str, CrossAttentionLayer] = {}
        for name in names:
            found.update((la.name, la) for la in self.layer_set(name))
        return list(found.values())

    def edit_features(self, enc: Encoded, reads: list[str], steps: int = 4) -> dict[str, Encoded | torch.Tensor]:
        """The input features of the layers that read each of `reads` (CrossAttentionLayer.reads), for enc's
        prompts: an Encoded whose embeddings are token rows (k rows of `prompts` per prompt of enc, in order,
        so the edit's positions apply to them), or (N, d) one row per prompt. CONTEXT is enc itself; steps is
        for families whose layers read the denoiser's own states (FLUX's blocks: see its adapter)."""
        unknown = [r for r in reads if r != CONTEXT]
        if unknown:
            raise UserError(f"{self.source}: no layer of this family reads {unknown[0]!r}")
        return {CONTEXT: enc} if reads else {}

    def text_mlp_layers(self) -> list[tuple[str, torch.nn.Linear]]:
        """Each text encoder's MLP output projections, shallow to deep, as (delta key, module): CLIP's
        mlp.fc2, BERT's output.dense (not the attention's)."""
        layers = []
        for prefix in self.text_components:
            for name, module in getattr(self.pipe, prefix).named_modules():
                if isinstance(module, torch.nn.Linear) and (
                        name.endswith("mlp.fc2") or (name.endswith("output.dense") and "attention" not in name)):
                    layers.append((f"{prefix}.{name}.weight", module))
        return layers

    def residual_sum(self, key: str) -> tuple[torch.nn.Module, str]:
        """Where a text MLP output projection's output joins the residual stream, as (module, 'input' or
        'output'): the hidden state there is that projection's output plus what skips around it. CLIP
        (pre-LN): the encoder layer's output. BERT (post-LN): the input of output.LayerNorm."""
        component, name = split_key(key)
        name = name.removesuffix(".weight")
        modules = dict(getattr(self.pipe, component).named_modules()) if component != "unet" else {}
        if name.endswith("mlp.fc2") and modules:
            return modules[name.removesuffix(".mlp.fc2")], "output"
        if name.endswith("output.dense") and modules:
            return modules[name.removesuffix(".dense") + ".LayerNorm"], "input"
        raise UserError(f"{key} is not a text MLP output projection this adapter knows (CLIP fc2, BERT output.dense)")

    def parameter(self, name: str) -> torch.Tensor:
        """A parameter by delta key: bare names are the UNet's, 'text_encoder.*' the text encoder's (and
        'text_encoder_2.*' the second one's, for a family that has one)."""
        return self.parameters_of([name])[name]

    def parameters_of(self, names) -> dict[str, torch.Tensor]:
        """parameter(name) for each of names, each component's parameters listed once."""
        components, listed, found = self.components(), {}, {}
        for name in names:
            component, key = split_key(name)
            if component not in components:
                raise KeyError(name)
            if component not in listed:
                listed[component] = dict(components[component].named_parameters())
            params = listed[component]
            key = text_model_name(key, params) if component != "unet" else key
            if key not in params:
                raise KeyError(name)
            found[name] = params[key]
        return found

    def _alpha_bar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        a = self.scheduler.alphas_cumprod.to(like.device)[t.to(like.device).long()]
        return a.to(torch.float32).view(-1, *([1] * (like.ndim - 1)))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t for clean latents x0 at timesteps t (B,), in the model's own forward process (DDPM here)."""
        a = self._alpha_bar(torch.as_tensor(t), x0)
        return (a.sqrt() * x0.float() + (1 - a).sqrt() * noise.float()).to(self.dtype)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the denoiser's raw output should be at add_noise(x0, noise, t), in its own prediction type."""
        kind = self.prediction_type
        if kind == "epsilon":
            return noise.float()
        if kind == "sample":
            return x0.float()
        a = self._alpha_bar(torch.as_tensor(t), x0)
        return a.sqrt() * noise.float() - (1 - a).sqrt() * x0.float()

    def loss_timesteps(self, values: list[int], latents: torch.Tensor) -> list:
        """Timesteps to noise latents at for a denoising loss, from values spread over the training range
        [0, num_train_timesteps): a DDPM model takes them as they are (a flow model maps them as its sampler
        spaces its noise levels)."""
        return list(values)

    def scale_input(self, latents: torch.Tensor, t) -> torch.Tensor:
        """The denoiser's input for latents at t as the sampler scales it (LMS divides by sqrt(sigma^2 + 1))."""
        return self.scheduler.scale_model_input(latents, t)

    def schedule_for(self, steps: int, latents: torch.Tensor) -> torch.Tensor:
        """The sampler's timesteps for a steps-long run from latents (their size may shift the schedule)."""
        return self.timesteps(steps)

    def raw(self, x_t: torch.Tensor, t: torch.Tensor | int, emb: torch.Tensor,
            params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The denoiser's own output, in its own prediction type, for conditioning emb (Encoded.cond).
        params: denoiser tensors (bare names) to use instead of the module's own for this call."""
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        args, kwargs = self.denoiser_inputs(x_t.to(self.dtype), t, emb.to(self.dtype))
        if params:
            from torch.func import functional_call

            return functional_call(self.unet, params, args, kwargs).sample
        return self.unet(*args, **kwargs).sample

    def denoiser_inputs(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> tuple[tuple, dict]:
        """The denoiser's call arguments for latents, timesteps (B,) and conditioning."""
        return (x_t, t, cond), {}

    def guided(self, x_t, t, emb, guidance: float | None = None, uncond: torch.Tensor | None = None,
               params: dict[str, torch.Tensor] | None = None, extrapolate: bool = False):
        """Raw output with classifier-free guidance: u + g (c - u); no guidance when g is None or <= 1 unless
        extrapolate (a fine-tuning teacher's rollout takes the formula for every g). params: as for raw."""
        if guidance is None or uncond is None or (guidance <= 1.0 and not extrapolate):
            return self.raw(x_t, t, emb, params=params)
        out_u, out_c = self.raw(*guidance_batch(x_t, t, emb, uncond), params=params).chunk(2)
        return out_u + guidance * (out_c - out_u)

    @contextmanager
    def distilled_guidance(self, scale: float | None):
        """Inside the block a guidance-distilled denoiser (FLUX.1-dev) reads `scale` as its guidance input in every
        call that gives none (a fine-tuning run's teacher and student alike); other families have no such input."""
        yield

    def spatial(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents as (N, C, h, w) images of the latent space (a family with packed latents unpacks them)."""
        return latents

    def convert(self, x_t: torch.Tensor, t, out: torch.Tensor) -> Prediction:
        """Turn a raw output into epsilon, x0 and v, whatever the model predicts."""
        t = torch.as_tensor(t, device=x_t.device)
        t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
        a = self._alpha_bar(t, x_t)
        sa, sb = a.sqrt(), (1 - a).clamp(min=1e-12).sqrt()
        x, out = x_t.float(), out.float()
        if self.prediction_type == "epsilon":
            eps = out
            x0 = (x - sb * eps) / sa
        elif self.prediction_type == "sample":
            x0 = out
            eps = (x - sa * x0) / sb
        elif self.prediction_type == "v_prediction":
            x0 = sa * x - sb * out
            eps = sb * x + sa * out
        else:
            raise UserError(f"unsupported prediction type {self.prediction_type!r}")
        v = sa * eps - sb * x0
        return Prediction(eps=eps, x0=x0, v=v)

    def predict(self, x_t, t, emb, guidance: float | None = None, uncond: torch.Tensor | None = None) -> Prediction:
        """epsilon, x0 and v for latents x_t at timesteps t under text embeddings emb (optionally guided)."""
        return self.convert(x_t, t, self.guided(x_t, t, emb, guidance, uncond))

    # -- sampling -----------------------------------------------------------------------------
    def initial_noise(self, seeds: list[int], size: tuple[int, int] | None = None) -> torch.Tensor:
        """One latent per seed, independent of batch composition: the same seed, the same image. size: the
        image's (height, width) in pixels (default: the model's own, erasekit.image_size)."""
        from .image_size import latent_shape

        shape = latent_shape(self, size)
        noise = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds]
        return torch.stack(noise).to(self.device, self.dtype) * self.scheduler.init_noise_sigma

    def timesteps(self, steps: int) -> torch.Tensor:
        self.scheduler.set_timesteps(steps, device=self.device)
        return self.scheduler.timesteps

    @torch.no_grad()
    def denoise(self, latents, emb, uncond, steps: int, guidance: float, start: int = 0, stop: int | None = None,
                progress: bool = False) -> torch.Tensor:
        """Run the sampler's steps [start, stop) of a steps-long schedule from latents (the model sees its input
        as the sampler scales it: unchanged for DDIM, PNDM and DPM-Solver, divided by sqrt(sigma^2 + 1) for LMS)."""
        timesteps = self.timesteps(steps)
        stop = len(timesteps) if stop is None else stop
        for t in tqdm(timesteps[start:stop], desc="denoising", disable=not progress, leave=False):
            out = self.guided(self.scheduler.scale_model_input(latents, t), t, emb, guidance, uncond)
            latents = self.scheduler.step(out, t, latents).prev_sample
        return latents

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images (N, 3, H, W) in [0, 1]."""
        with torch.no_grad():
            images = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def _batches(self, prompts, seeds, batch_size):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        seeds = list(seeds)
        if not prompts:
            raise UserError("the prompt list is empty: give at least one prompt")
        if len(seeds) != len(prompts):
            raise UserError(f"{len(prompts)} prompts but {len(seeds)} seeds: give one seed per prompt")
        return [(prompts[i:i + batch_size], seeds[i:i + batch_size]) for i in range(0, len(prompts), batch_size)]

    @torch.no_grad()
    def sample(self, prompts, seeds, steps: int | None = None, guidance: float | None = None,
               negative_prompt: str = "", batch_size: int = 32, progress: bool = True,
               output: str = "images", size: tuple[int, int] | None = None) -> torch.Tensor:
        """Generate one image per (prompt, seed): (N, 3, H, W) in [0, 1], or latents with output='latents';
        size: (H, W) in pixels (default: the model's own)."""
        steps = steps or self.sampler_defaults["steps"]
        guidance = self.sampler_defaults["guidance"] if guidance is None else guidance
        batches = self._batches(prompts, seeds, batch_size)
        uncond = self.unconditional(negative_prompt)
        self.timesteps(steps)  # the initial noise's scale is the schedule's first sigma (LMS; 1 for the others)
        results = []
        for chunk, chunk_seeds in tqdm(batches, desc="generating", disable=not progress or len(batches) < 2):
            latents = self.denoise(self.initial_noise(chunk_seeds, size), self.encode(chunk).cond, uncond,
                                   steps, guidance, progress=progress and len(batches) == 1)
            results.append(latents if output == "latents" else self.decode(latents))
        return torch.cat(results)

    @torch.no_grad()
    def rollout(self, prompts, seeds, to_step: int, steps: int | None = None, guidance: float | None = None,
                batch_size: int = 32, size: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents on the model's own trajectory after to_step of steps sampler steps, and the timestep
        they sit at (the one the next sampler step would denoise); size as for sample."""
        steps = steps or self.sampler_defaults["steps"]
        guidance = self.sampler_defaults["guidance"] if guidance is None else guidance
        if not 0 <= to_step < steps:
            raise UserError(f"to_step {to_step} is outside the {steps}-step schedule: use 0..{steps - 1}")
        uncond = self.unconditional()
        self.timesteps(steps)
        latents = [self.denoise(self.initial_noise(s, size), self.encode(p).cond, uncond, steps, guidance,
                                stop=to_step)
                   for p, s in self._batches(prompts, seeds, batch_size)]
        return torch.cat(latents), self.timesteps(steps)[to_step]


CAUSAL_TEXT_ENCODERS = ("clip_text_model",)  # config.model_type of encoders whose rows read no later token


def end_positions(ids: torch.Tensor, end_token: int) -> torch.Tensor:
    """(N,) each row's first end-of-text position (the last position when it has none)."""
    is_end = ids == end_token
    return torch.where(is_end.any(1), is_end.int().argmax(1), torch.full_like(ids[:, 0], ids.shape[1] - 1))


def text_model_name(key: str, names) -> str:
    """A CLIPTextModel parameter name as this transformers version spells it: checkpoints written by older
    versions (AdvUnlearn's, SD1.4's) say "text_model.encoder...", newer ones "encoder..."; either is found."""
    if key in names:
        return key
    other = key.removeprefix("text_model.") if key.startswith("text_model.") else "text_model." + key
    return other if other in names else key


TEXT_PREFIXES = ("text_encoder_2.", "text_encoder.")  # delta key prefixes of text encoders, longest first


def split_key(name: str) -> tuple[str, str]:
    """Delta key -> (pipeline component, parameter name inside it): bare names are the denoiser's."""
    for prefix in TEXT_PREFIXES:
        if name.startswith(prefix):
            return prefix[:-1], name[len(prefix):]
    return "unet", name


def guidance_batch(x_t: torch.Tensor, t, emb: torch.Tensor, uncond: torch.Tensor):
    """(x, t, embeddings) of one batch of 2N whose outputs are the N unconditional then the N conditional
    ones; uncond may hold one row for all."""
    n = x_t.shape[0]
    t = torch.as_tensor(t, device=x_t.device)
    t2 = t.expand(n).repeat(2) if t.ndim == 0 else t.repeat(2)
    return torch.cat([x_t, x_t]), t2, torch.cat([uncond.expand(n, -1, -1), emb.expand(n, -1, -1)])


def quiet_libraries() -> None:
    """Keep diffusers' and transformers' loading bars and notices out of erasekit's output."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
