"""Pipeline folders with real model families' architectures and random weights, built from configs (nothing
is downloaded), for the benchmarks: SD1.4 (its UNet's widths scaled by `width`), SDXL base 1.0 and FLUX.1-dev's
text side."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch


def _vae():
    from diffusers import AutoencoderKL

    # a small VAE: the benchmarks time text encoding, edits and denoiser steps, not decoding
    return AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=32)


def _clip_text(tokenizer, hidden: int, layers: int, heads: int, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                            num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=projection or hidden)
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _save(pipe, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.save_pretrained(path)
    return path


def sd14_folder(path: Path, width: float = 1.0, sample_size: int = 64) -> Path:
    """SD1.4's UNet (block_out_channels scaled by width) and CLIP ViT-L text encoder, random weights."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from erasekit.testing import make_tokenizer

    if (path / "model_index.json").is_file():
        return path
    torch.manual_seed(0)
    tokenizer = make_tokenizer()
    channels = tuple(int(round(c * width / 32)) * 32 for c in (320, 640, 1280, 1280))
    unet = UNet2DConditionModel(sample_size=sample_size, cross_attention_dim=768, attention_head_dim=8,
                                layers_per_block=2, block_out_channels=channels)  # SD1.4's UNet config
    sched = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True)
    return _save(StableDiffusionPipeline(vae=_vae(), text_encoder=_clip_text(tokenizer, 768, 12, 12),
                                         tokenizer=tokenizer, unet=unet, scheduler=sched, safety_checker=None,
                                         feature_extractor=None, requires_safety_checker=False), path)


def sdxl_folder(path: Path) -> Path:
    """SDXL base 1.0's UNet (2.6B parameters, 70 cross-attention blocks over 2048-wide states) and both text
    encoders at their real sizes (CLIP ViT-L, 768 wide; OpenCLIP ViT-bigG, 1280 wide, 32 layers, pooled
    projection 1280), random weights."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    from erasekit.testing import make_tokenizer

    if (path / "model_index.json").is_file():
        return path
    torch.manual_seed(0)
    tokenizer, tokenizer_2 = make_tokenizer(), make_tokenizer()
    tokenizer_2.pad_token = "!"
    unet = UNet2DConditionModel(  # stabilityai/stable-diffusion-xl-base-1.0's unet/config.json
        sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2, attention_head_dim=(5, 10, 20),
        transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   steps_offset=1, timestep_spacing="leading")
    return _save(StableDiffusionXLPipeline(vae=_vae(), text_encoder=_clip_text(tokenizer, 768, 12, 12),
                                           text_encoder_2=_clip_text(tokenizer_2, 1280, 32, 20, projection=1280),
                                           tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
                                           scheduler=sched), path)


def flux_folder(path: Path, t5_layers: int = 24, double_blocks: int = 1, single_blocks: int = 1,
                max_length: int = 512, dtype: torch.dtype = torch.bfloat16) -> Path:
    """FLUX.1-dev's text side at its real size: T5-XXL's encoder (d_model 4096, 64 heads, d_ff 10240, gated GELU,
    24 layers, 512 tokens) and CLIP ViT-L (768 wide, 12 layers) for the pooled embedding, and a transformer at
    FLUX.1's real widths (24 heads x 128 = 3072, joint_attention_dim 4096, pooled_projection_dim 768, guidance
    embeddings) with `double_blocks` dual-stream and `single_blocks` single-stream blocks instead of 19 and 38:
    the default closed-form edit ("text": context_embedder and the pooled text embedder) reads no block, and
    the 48 GB of all 57 blocks in float32 do not fit this machine. Built in `dtype` (bfloat16: this T5-XXL encoder,
    4.63B parameters, is 9.3 GB there, 18.5 GB in float32); random weights. The tokenizers have the test vocabularies
    (`erasekit.testing`), so the T5 embedding table is smaller than the real 32,128 rows."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from erasekit.testing import make_t5_tokenizer, make_tokenizer

    if (path / "model_index.json").is_file():
        return path
    torch.manual_seed(0)
    tokenizer, tokenizer_2 = make_tokenizer(), make_t5_tokenizer(max_length=max_length)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in dtype: a float32 T5-XXL would not fit beside anything else
    try:
        text_encoder_2 = T5EncoderModel(T5Config(  # google/t5-v1_1-xxl's encoder, as FLUX.1 ships it
            vocab_size=len(tokenizer_2), d_model=4096, d_kv=64, d_ff=10240, num_layers=t5_layers, num_heads=64,
            feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1))
        transformer = FluxTransformer2DModel(  # black-forest-labs/FLUX.1-dev's transformer/config.json widths
            patch_size=1, in_channels=64, num_layers=double_blocks, num_single_layers=single_blocks,
            attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
            guidance_embeds=True, axes_dims_rope=(16, 56, 56))
        text_encoder = _clip_text(tokenizer, 768, 12, 12)
        vae = _vae_flux()
    finally:
        torch.set_default_dtype(previous)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    return _save(FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer), path)


def _vae_flux():
    from diffusers import AutoencoderKL

    # small, with FLUX.1's 16 latent channels: the benchmarks time text encoding and edits, not decoding
    return AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=16, norm_num_groups=32,
                         scaling_factor=0.3611, shift_factor=0.1159)
