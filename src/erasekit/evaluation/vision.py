"""Local transformers vision models for judges and metrics: a folder's config, safetensors weights and image
processor, the record that identifies it, and the three uses erasekit makes of one: class probabilities, CLIP
image and text embeddings, and image features for a Fréchet distance.

A folder is what `save_pretrained` writes (config.json, model.safetensors or shards, preprocessor_config.json;
for CLIP also the tokenizer files). Weights are read only from safetensors (a pickled .bin can run code when
loaded). Images are given to the folder's own image processor (transformers' PIL backend, no torchvision) as
8-bit arrays, the pixels a saved PNG holds.
"""

from __future__ import annotations

import json
import warnings
from functools import cached_property

import torch

from ..errors import UserError
from .cache import to_uint8
from .judges import as_images, file_sha256


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__


def pick_device(device) -> torch.device:
    """The device asked for, else CUDA when present, else the CPU."""
    return torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")


class VisionFolder:
    """A local transformers model folder, checked before anything is loaded from it."""

    def __init__(self, path, what: str):
        from ..families.hub import local_model_folder

        self.path, self.origin = local_model_folder(str(path))
        self.what = what  # "classifier judge", "CLIP model", ... for messages
        if not self.path.is_dir():
            state = "is a file" if self.path.exists() else "does not exist"
            raise UserError(f"{what} folder {self.path} {state}: give a local transformers model folder "
                            "(what save_pretrained writes: config.json, model.safetensors, preprocessor_config.json)")
        for name in ("config.json", "preprocessor_config.json"):
            if not (self.path / name).is_file():
                raise UserError(f"{what} folder {self.path} has no {name}: give the folder save_pretrained wrote for "
                                "the model and its image processor")
        self.weights = sorted(self.path.glob("*.safetensors"))
        if not self.weights:
            pickled = sorted(f.name for f in self.path.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".ckpt"))
            hint = (f" (it holds {pickled[0]}: erasekit loads no pickle; convert it with "
                    "from_pretrained(folder).save_pretrained(new_folder, safe_serialization=True) where you trust it)"
                    if pickled else "")
            raise UserError(f"{what} folder {self.path} has no .safetensors weights{hint}: give a folder with "
                            "model.safetensors")
        try:
            self.config_dict = json.loads((self.path / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{what} folder {self.path}: config.json is not readable JSON ({_first_line(e)}): "
                            "fix or replace the folder") from e
        self.model_type = str(self.config_dict.get("model_type", ""))

    def load(self, cls, device) -> torch.nn.Module:
        """cls.from_pretrained on this folder (safetensors only, local files only), in eval mode on device."""
        from ..model import quiet_libraries

        quiet_libraries()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = cls.from_pretrained(self.path, local_files_only=True, use_safetensors=True)
        except Exception as e:  # noqa: BLE001 - any loader failure is one line for the user
            raise UserError(f"could not load {self.what} folder {self.path} as {cls.__name__}: "
                            f"{_first_line(e)}") from e
        return model.eval().to(pick_device(device))

    @cached_property
    def processor(self):
        from transformers import AutoImageProcessor

        from ..model import quiet_libraries

        quiet_libraries()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return AutoImageProcessor.from_pretrained(self.path, local_files_only=True)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"could not load the image processor of {self.what} folder {self.path}: "
                            f"{_first_line(e)}") from e

    def pixel_values(self, images, device) -> torch.Tensor:
        """Float images (N, 3, H, W) in [0, 1] -> the model's input, through its own image processor."""
        arrays = list(to_uint8(as_images(images)).permute(0, 2, 3, 1).numpy())
        return self.processor(images=arrays, return_tensors="pt")["pixel_values"].to(device)

    def record(self) -> dict:
        """Path, model type, architectures, and the SHA-256 of config.json and of every weight file."""
        return {"path": str(self.path), **self.origin, "model_type": self.model_type,
                "architectures": list(self.config_dict.get("architectures") or []),
                "config_sha256": file_sha256(self.path / "config.json"),
                "preprocessor_sha256": file_sha256(self.path / "preprocessor_config.json"),
                "weights_sha256": {f.name: file_sha256(f) for f in self.weights}}


def batched(x: torch.Tensor, size: int):
    for i in range(0, x.shape[0], size):
        yield x[i:i + size]


def _tensor(output) -> torch.Tensor:
    """A model method's result as a tensor (some transformers versions wrap embeddings in an output object)."""
    if torch.is_tensor(output):
        return output
    for name in ("image_embeds", "text_embeds", "pooler_output"):
        value = getattr(output, name, None)
        if torch.is_tensor(value):
            return value
    raise TypeError(f"no embedding tensor in {type(output).__name__}")


class LocalClip:
    """A CLIP model folder (CLIPModel, its tokenizer and image processor): normalised image and text embeddings."""

    def __init__(self, path, what: str = "CLIP model", device=None, batch_size: int = 32):
        from transformers import AutoTokenizer, CLIPModel

        self.folder = VisionFolder(path, what)
        if self.folder.model_type != "clip":
            raise UserError(f"{what} folder {self.folder.path} holds a {self.folder.model_type or 'unknown'!r} model, "
                            "not CLIP: give a CLIPModel folder (e.g. openai/clip-vit-large-patch14 saved locally)")
        self.device = pick_device(device)
        self.batch_size = max(1, int(batch_size))
        self.model = self.folder.load(CLIPModel, self.device)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.folder.path, local_files_only=True)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"{what} folder {self.folder.path} has no usable tokenizer ({_first_line(e)}): save the "
                            "CLIP processor (tokenizer files) into the folder too") from e
        self.max_length = int(self.model.config.text_config.max_position_embeddings)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp())

    @torch.no_grad()
    def image_embeddings(self, images) -> torch.Tensor:
        """(N, D) L2-normalised image embeddings, on the CPU."""
        out = [_tensor(self.model.get_image_features(pixel_values=self.folder.pixel_values(b, self.device)))
               for b in batched(as_images(images), self.batch_size)]
        if not out:
            return torch.zeros(0, int(self.model.config.projection_dim))
        return torch.nn.functional.normalize(torch.cat(out).float(), dim=-1).cpu()

    @torch.no_grad()
    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        """(N, D) L2-normalised text embeddings, on the CPU (texts cut at the model's token limit)."""
        out = []
        for i in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[i:i + self.batch_size]), padding=True, truncation=True,
                                    max_length=self.max_length, return_tensors="pt").to(self.device)
            out.append(_tensor(self.model.get_text_features(input_ids=tokens["input_ids"],
                                                            attention_mask=tokens["attention_mask"])))
        return torch.nn.functional.normalize(torch.cat(out).float(), dim=-1).cpu()

    def record(self) -> dict:
        return {**self.folder.record(), "logit_scale": round(self.logit_scale, 4)}


class ClipScorer:
    """CLIP score of images against their prompts with a local CLIP folder: per image 100 * max(cos, 0) of the
    image and text embeddings, averaged (the torchmetrics CLIPScore convention; papers using CLIP's logits / 100
    report the same cosine on a scale 100 times smaller)."""

    SCALE = 100.0

    def __init__(self, path, device=None, batch_size: int = 32):
        self.clip = LocalClip(path, "CLIP score model", device, batch_size)

    def per_image(self, images, texts: list[str]) -> torch.Tensor:
        cos = (self.clip.image_embeddings(images) * self.clip.text_embeddings(texts)).sum(-1)
        return self.SCALE * cos.clamp(min=0)

    def __call__(self, images, texts: list[str]) -> float:
        return float(self.per_image(images, texts).mean())

    def record(self) -> dict:
        return {"model": self.clip.record(), "score": "mean over images of 100 * max(cos(image, prompt), 0)",
                "scale": self.SCALE}


class ImageFeatures:
    """Image features for a Fréchet distance from a local folder: CLIP's projected image embedding, or the
    pooled output of any other vision backbone (DINOv2: the final-norm CLS token)."""

    def __init__(self, path, device=None, batch_size: int = 32):
        self.folder = VisionFolder(path, "FID feature model")
        self.device = pick_device(device)
        self.batch_size = max(1, int(batch_size))
        if self.folder.model_type == "clip":
            self.clip = LocalClip(path, "FID feature model", device, batch_size)
            self.kind = "CLIP image embedding (projected, not normalised)"
        else:
            from transformers import AutoModel

            self.clip = None
            self.model = self.folder.load(AutoModel, self.device)
            self.kind = f"{self.folder.model_type} pooler_output"

    @torch.no_grad()
    def __call__(self, images) -> torch.Tensor:
        """(N, D) float features on the CPU."""
        out = []
        for b in batched(as_images(images), self.batch_size):
            if self.clip is not None:
                pixels = self.clip.folder.pixel_values(b, self.clip.device)
                out.append(_tensor(self.clip.model.get_image_features(pixel_values=pixels)))
            else:
                result = self.model(pixel_values=self.folder.pixel_values(b, self.device))
                pooled = getattr(result, "pooler_output", None)
                if pooled is None:
                    raise UserError(f"FID feature model {self.folder.path} ({self.folder.model_type}) gives no pooled "
                                    "output: give a CLIP or DINOv2 folder")
                out.append(pooled.flatten(1))
        return torch.cat(out).float().cpu() if out else torch.zeros(0, 1)

    def record(self) -> dict:
        return {"source": "model folder", "features": self.kind, "model": self.folder.record()}
