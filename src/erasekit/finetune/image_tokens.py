"""Image encoders for Co-Erasing: images (N, 3, H, W) in [0, 1] -> tokens (N, T, d) in the space the denoiser's
cross-attention reads (the text encoder's output space).

- `testbed`: the testbed's aligned image encoder; its text projection is inverted to reach the text space.
- an IP-Adapter folder (Stable Diffusion): a CLIP vision model with projection (`image_encoder/`) and the
  IP-Adapter weight file whose `image_proj` (Linear then LayerNorm) turns the image embedding into T tokens of
  the cross-attention width; the layout of the public SD 1.5 IP-Adapter release. Only that image projection is
  used: Co-Erasing concatenates the tokens to the text tokens, so the adapter's own K/V layers are not needed.
  Weights are read from safetensors; the release's pickled `.bin` layout only with allow_pickle (the
  Co-Erasing option allow_pickle_weights=true), for a source the user trusts.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError
from ..files import read_mapping
from ..model import Model

PICKLE_FIX = ("convert it to safetensors in an environment you trust with it, or pass --set allow_pickle_weights=true "
              "if you trust its source")
# CLIP's image normalisation, used when the folder has no preprocessor_config.json.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class IPAdapterImageTokens:
    """(N, T, cross_attention_dim) tokens from an IP-Adapter folder (see the module docstring)."""

    def __init__(self, folder: Path, model: Model, allow_pickle: bool = False):
        from transformers import CLIPVisionModelWithProjection

        weights = _adapter_file(folder, allow_pickle)
        proj = _image_proj(weights)
        if "proj.weight" not in proj or "norm.weight" not in proj:
            raise UserError(f"{weights} has no plain image projection (proj, norm): IP-Adapter Plus and FaceID "
                            "resamplers are not supported; use the base IP-Adapter (ip-adapter_sd15)")
        width = int(model.unet.config.cross_attention_dim)
        if proj["norm.weight"].shape[0] != width:
            raise UserError(f"{weights} makes tokens of width {proj['norm.weight'].shape[0]} but the model's "
                            f"cross-attention reads {width}: use the IP-Adapter made for this model family")
        encoder_dir = folder / "image_encoder"
        if not (encoder_dir / "config.json").is_file():
            raise UserError(f"{folder} has no image_encoder/config.json: give the IP-Adapter folder holding "
                            "image_encoder/ (a CLIP vision model with projection) next to the weight file")
        if not allow_pickle and not any(encoder_dir.glob("*.safetensors")):
            raise UserError(f"{encoder_dir} has no safetensors weights: erasekit loads no pickle by default "
                            f"(unpickling can run code); {PICKLE_FIX}")
        self.encoder = CLIPVisionModelWithProjection.from_pretrained(
            encoder_dir, use_safetensors=None if allow_pickle else True).eval().to(model.device)
        self.proj = {k: v.float().to(model.device) for k, v in proj.items()}
        self.width, self.size = width, int(self.encoder.config.image_size)
        mean, std = _normalisation(folder)
        self.mean = torch.tensor(mean, device=model.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=model.device).view(1, 3, 1, 1)

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP's preprocessing: shorter side resized to the encoder's size (bicubic), centre crop, normalised."""
        images = images.float().to(self.mean.device)
        h, w = images.shape[-2:]
        scale = self.size / min(h, w)
        size = (max(self.size, round(h * scale)), max(self.size, round(w * scale)))
        images = torch.nn.functional.interpolate(images, size=size, mode="bicubic", align_corners=False)
        top, left = (size[0] - self.size) // 2, (size[1] - self.size) // 2
        images = images[..., top:top + self.size, left:left + self.size].clamp(0, 1)
        return (images - self.mean) / self.std

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        embeds = self.encoder(pixel_values=self.pixels(images).to(self.encoder.dtype)).image_embeds.float()
        p = self.proj
        tokens = (embeds @ p["proj.weight"].T + p["proj.bias"]).reshape(len(embeds), -1, self.width)
        return torch.nn.functional.layer_norm(tokens, (self.width,), p["norm.weight"], p["norm.bias"])


def _adapter_file(folder: Path, allow_pickle: bool = False) -> Path:
    """The folder's one IP-Adapter weight file: a safetensors one, else (only with allow_pickle) a pickled .bin."""
    for ext in ("safetensors", "bin"):
        found = sorted(folder.glob(f"ip-adapter*.{ext}"))
        if len(found) > 1:
            raise UserError(f"{folder} has {len(found)} ip-adapter*.{ext} weight files: give a folder with exactly "
                            "one IP-Adapter weight file and its image_encoder/")
        if found and ext == "bin" and not allow_pickle:
            raise UserError(f"{found[0]} is a pickle file and {folder} has no ip-adapter*.safetensors: erasekit loads "
                            f"no pickle by default (unpickling can run code); {PICKLE_FIX}")
        if found:
            return found[0]
    raise UserError(f"{folder} has no ip-adapter*.safetensors (or .bin): give a folder with exactly one IP-Adapter "
                    "weight file and its image_encoder/")


def _image_proj(path: Path) -> dict[str, torch.Tensor]:
    """The image projection's tensors, from either release layout: flat safetensors keys 'image_proj.*', or a
    torch file holding {'image_proj': {...}, 'ip_adapter': {...}}."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            flat = load_file(str(path))
            return {k[len("image_proj."):]: v for k, v in flat.items() if k.startswith("image_proj.")}
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged or foreign file: say which
        raise UserError(f"cannot read the IP-Adapter weights {path}: {exc.__class__.__name__}") from None
    return dict(state.get("image_proj", {})) if isinstance(state, dict) else {}


def _normalisation(folder: Path) -> tuple[tuple, tuple]:
    for candidate in (folder / "image_encoder" / "preprocessor_config.json", folder / "preprocessor_config.json"):
        if candidate.is_file():
            cfg = read_mapping(candidate, "IP-Adapter preprocessor config")
            return tuple(cfg.get("image_mean", CLIP_MEAN)), tuple(cfg.get("image_std", CLIP_STD))
    return CLIP_MEAN, CLIP_STD


def image_encoder(name: str, model: Model, allow_pickle: bool = False):
    """The encoder a Co-Erasing config names: 'testbed' or an IP-Adapter folder (pickled weights only with
    allow_pickle)."""
    if name == "testbed":
        if model.world is None:
            raise UserError("the testbed image encoder only fits the testbed: for Stable Diffusion give an "
                            "IP-Adapter folder with --set image_encoder=PATH")
        return model.world.image_tokens(model.device)
    folder = Path(name).expanduser()
    if not folder.is_dir():
        raise UserError(f"image encoder {name!r} is neither 'testbed' nor a folder: give an IP-Adapter folder "
                        "(image_encoder/ and ip-adapter*.safetensors)")
    return IPAdapterImageTokens(folder, model, allow_pickle)
