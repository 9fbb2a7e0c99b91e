"""Tiny pipelines of each family built from configs (SD1.x, SDXL, FLUX.1) (random weights, nothing downloaded),
for tests and benchmarks: erasekit's own and its users'."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

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


def make_tiny_sdxl(path: Path, seed: int = 0, text_dim: int = 16, pooled_dim: int = 24) -> Path:
    """A tiny StableDiffusionXLPipeline folder: two CLIP encoders (the second with a projection) sharing one
    vocabulary, a UNet with "text_time" added conditioning and cross-attention over both encoders' states."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = make_tokenizer(), make_tokenizer()
    tokenizer_2.pad_token = "!"  # SDXL's second tokenizer pads with "!", the first with <|endoftext|>

    def text_config(**extra):
        return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=text_dim, intermediate_size=32,
                              num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                              bos_token_id=0, eos_token_id=1, pad_token_id=1, **extra)

    text_encoder = CLIPTextModel(text_config())
    text_encoder_2 = CLIPTextModelWithProjection(text_config(projection_dim=pooled_dim))
    time_dim = 4
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=2 * text_dim,
                                attention_head_dim=(2, 4), norm_num_groups=4, use_linear_projection=True,
                                addition_embed_type="text_time", addition_time_embed_dim=time_dim,
                                projection_class_embeddings_input_dim=6 * time_dim + pooled_dim)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=16, scaling_factor=0.13025)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler)
        pipe.save_pretrained(path)
    return path


def make_t5_tokenizer(max_length: int = 32):
    """A T5 (Unigram, SentencePiece-style) tokenizer over a few whole words and single characters: no begin
    token, "</s>" after the text, "<pad>" padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    words = "a an the of photo red star cat dog car circle on black white background striped painting by".split()
    chars = sorted(set("".join(words)) | set("bcdefghijklmnopqrstuvwxyz"))
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -1.0) for w in words] + [("\u2581", -2.0)] + [(c, -5.0) for c in chars]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           extra_ids=0, model_max_length=max_length)


def make_tiny_flux(path: Path, seed: int = 0, guidance: bool = True, t5_dim: int = 32, clip_dim: int = 16,
                   blocks: int = 1) -> Path:
    """A tiny FluxPipeline folder (dev-like with guidance embeddings, schnell-like without): a CLIP encoder for
    the pooled embedding, a T5 encoder for the sequence, a flow-matching transformer (`blocks` dual-stream
    blocks, one single-stream block) and a 16-channel VAE."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = make_tokenizer(), make_t5_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=clip_dim, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=t5_dim, d_kv=8, d_ff=48,
                                             num_layers=2, num_heads=4, pad_token_id=0, eos_token_id=1))
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=blocks, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=t5_dim,
                                         pooled_projection_dim=clip_dim, guidance_embeds=guidance,
                                         axes_dims_rope=(2, 2, 4))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=16, scaling_factor=0.3611, shift_factor=0.1159)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                            text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)
        pipe.save_pretrained(path)
    return path


def make_tiny_ip_adapter(path: Path, cross_attention_dim: int = 32, tokens: int = 4, seed: int = 0,
                         layout: str = "safetensors") -> Path:
    """An IP-Adapter folder in the public release's layout, tiny and random: image_encoder/ (a CLIP vision model
    with projection) and ip-adapter_sd15.safetensors (or .bin) with the image projection and adapter K/V."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    embed = 24
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
        patch_size=8, projection_dim=embed))
    encoder.save_pretrained(path / "image_encoder")
    image_proj = {"proj.weight": torch.randn(tokens * cross_attention_dim, embed) * 0.1,
                  "proj.bias": torch.zeros(tokens * cross_attention_dim),
                  "norm.weight": torch.ones(cross_attention_dim), "norm.bias": torch.zeros(cross_attention_dim)}
    adapter = {"1.to_k_ip.weight": torch.randn(cross_attention_dim, cross_attention_dim) * 0.1}
    if layout == "safetensors":
        flat = {**{f"image_proj.{k}": v for k, v in image_proj.items()},
                **{f"ip_adapter.{k}": v for k, v in adapter.items()}}
        save_file(flat, str(path / "ip-adapter_sd15.safetensors"))
    else:
        torch.save({"image_proj": image_proj, "ip_adapter": adapter}, path / "ip-adapter_sd15.bin")
    return path


# --- tiny vision models for judges and metrics ------------------------------------------------------------------


def _pixel_values(processor, images: torch.Tensor) -> torch.Tensor:
    """Float images (N, 3, H, W) in [0, 1] through an image processor, as the judges give them (8-bit arrays)."""
    arrays = list(images.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return processor(images=arrays, return_tensors="pt")["pixel_values"]


def _fit(model, loss_of, steps: int, lr: float) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss_of().backward()
        optimizer.step()
    model.eval()


def make_tiny_classifier(path: Path, labels: list[str], kind: str = "resnet", examples=None, steps: int = 60,
                         seed: int = 0, image_size: int = 32) -> Path:
    """A tiny image classifier folder (ResNet or ViT, random), with id2label from labels and a 32-pixel image
    processor; examples [(images (N, 3, H, W) in [0, 1], label index)] fit it to them in `steps` Adam steps."""
    from transformers import (
        ResNetConfig,
        ResNetForImageClassification,
        ViTConfig,
        ViTForImageClassification,
        ViTImageProcessor,
    )

    torch.manual_seed(seed)
    id2label = dict(enumerate(labels))
    label2id = {v: k for k, v in id2label.items()}
    if kind == "resnet":
        model = ResNetForImageClassification(ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", id2label=id2label,
            label2id=label2id))
    elif kind == "vit":
        model = ViTForImageClassification(ViTConfig(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=image_size,
            patch_size=8, id2label=id2label, label2id=label2id))
    else:
        raise ValueError(f"kind must be resnet or vit, not {kind!r}")
    processor = ViTImageProcessor(size={"height": image_size, "width": image_size})
    if examples:
        pixels = torch.cat([_pixel_values(processor, x) for x, _ in examples])
        targets = torch.cat([torch.full((x.shape[0],), int(i)) for x, i in examples])
        _fit(model, lambda: torch.nn.functional.cross_entropy(model(pixel_values=pixels).logits, targets), steps, 1e-2)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def make_tiny_clip(path: Path, pairs=None, steps: int = 80, seed: int = 0, image_size: int = 32) -> Path:
    """A tiny CLIP folder (model, tokenizer, image processor; random); pairs [(images (N, 3, H, W), text)] fit it
    contrastively so that each image's own text scores highest among the pairs' texts."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(seed)
    tokenizer = make_tokenizer()
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=image_size, patch_size=8),
        projection_dim=16)
    model = CLIPModel(config)
    processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                   crop_size={"height": image_size, "width": image_size})
    if pairs:
        pixels = torch.cat([_pixel_values(processor, x) for x, _ in pairs])
        targets = torch.cat([torch.full((x.shape[0],), i) for i, (x, _) in enumerate(pairs)])
        tokens = tokenizer([t for _, t in pairs], padding=True, return_tensors="pt")

        def loss():
            out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels)
            return torch.nn.functional.cross_entropy(out.logits_per_image, targets)

        _fit(model, loss, steps, 3e-3)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def make_tiny_dinov2(path: Path, seed: int = 0, image_size: int = 32) -> Path:
    """A tiny random DINOv2 folder (model and image processor) for Fréchet-distance features."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    model = Dinov2Model(Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2,
                                     image_size=image_size, patch_size=8))
    model.save_pretrained(path)
    BitImageProcessor(size={"shortest_edge": image_size},
                      crop_size={"height": image_size, "width": image_size}).save_pretrained(path)
    return path


def make_random_inception(path: Path, seed: int = 0, counters: bool = False) -> Path:
    """A weight file with the FID Inception-v3's tensor names and shapes (pytorch-fid's
    pt_inception-2015-12-05-6726825d.pth layout) and random values, written with torch.save: convolutions
    He-scaled, batch-norm statistics near identity, so activations stay finite through the network. With
    counters, each batch norm also carries the num_batches_tracked buffer newer state dicts hold."""
    from .evaluation.inception import expected_shapes

    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in expected_shapes().items():
        if name.endswith("conv.weight"):
            fan_in = shape[1] * shape[2] * shape[3]
            value = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
        elif name.endswith("running_var"):
            value = 0.5 + torch.rand(shape, generator=g)
        elif name.endswith("bn.weight"):
            value = 0.8 + 0.4 * torch.rand(shape, generator=g)
        else:  # batch-norm bias and mean, the classifier
            value = 0.05 * torch.randn(shape, generator=g)
        state[name] = value
        if counters and name.endswith("running_var"):
            state[name[:-len("running_var")] + "num_batches_tracked"] = torch.tensor(0)
    torch.save(state, path)
    return Path(path)
