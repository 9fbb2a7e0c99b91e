"""Fixtures: tiny Stable-Diffusion-1.x-shaped pipelines built from configs (random weights, no download)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

# Small models run fastest on one thread, and a second thread only oversubscribes a busy CPU.
torch.set_num_threads(int(os.environ.get("ERASEKIT_TEST_THREADS", "1")))

# Merges for a handful of words, so some words are one token and others split into several.
_MERGES = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>"), ("s", "t"), ("a", "r</w>"),
           ("st", "ar</w>"), ("r", "e"), ("re", "d</w>"), ("o", "f</w>"), ("p", "h")]


def make_tokenizer(max_length: int = 77):
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in sorted(ByteLevel.alphabet()):
        for token in (ch, ch + "</w>"):
            vocab.setdefault(token, len(vocab))
    for a, b in _MERGES:
        vocab.setdefault(a + b, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=list(_MERGES), model_max_length=max_length)


def make_tiny_sd(path: Path, prediction_type: str = "epsilon", seed: int = 0, cross_attention: bool = True,
                 cross_attention_dim: int = 32) -> Path:
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = make_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cross_attention_dim, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    if cross_attention:
        blocks = dict(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    else:
        blocks = dict(down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                      mid_block_type=None)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), cross_attention_dim=cross_attention_dim,
                                attention_head_dim=4, norm_num_groups=4, **blocks)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=16)
    # SD1.x ships a PNDM scheduler config; erasekit samples with DDIM built from it.
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              prediction_type=prediction_type, set_alpha_to_one=False, steps_offset=1,
                              skip_prk_steps=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    return make_tiny_sd(tmp_path_factory.mktemp("tiny_sd") / "sd", seed=0)


@pytest.fixture(scope="session")
def tiny_sd_other(tmp_path_factory) -> Path:
    """Same architecture, other weights: a different base model."""
    return make_tiny_sd(tmp_path_factory.mktemp("tiny_sd_other") / "sd", seed=1)


@pytest.fixture(scope="session")
def tiny_sd_wide(tmp_path_factory) -> Path:
    """Another architecture: a wider text encoder and cross-attention."""
    return make_tiny_sd(tmp_path_factory.mktemp("tiny_sd_wide") / "sd", seed=0, cross_attention_dim=48)


@pytest.fixture(scope="session", params=["epsilon", "sample", "v_prediction"])
def tiny_sd_any(request, tmp_path_factory) -> Path:
    return make_tiny_sd(tmp_path_factory.mktemp(f"tiny_sd_{request.param}") / "sd",
                        prediction_type=request.param, seed=0)


@pytest.fixture(scope="session")
def tiny_sd_no_xattn(tmp_path_factory) -> Path:
    return make_tiny_sd(tmp_path_factory.mktemp("tiny_sd_noxattn") / "sd", cross_attention=False)
