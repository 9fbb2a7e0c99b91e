"""The FID Inception-v3 on torch alone (no torchvision): TensorFlow's 2015-12-05 Inception graph, the network
FID is defined in, with the module and tensor names of its PyTorch port (pytorch-fid's `fid_inception_v3`,
torch-fidelity's `FeatureExtractorInceptionV3`), so that the port's weight file loads as it is.

Weights: `pt_inception-2015-12-05-6726825d.pth`, the file both projects download, which the user has locally.
A .pth is read with `torch.load(path, weights_only=True, map_location="cpu")`, PyTorch's restricted unpickler,
which builds tensors and plain containers and refuses any other object; a .safetensors file holding the same
tensors is read with safetensors. Every tensor name and shape is checked before anything is loaded.

Features (`--fid-features inception:FILE`): pool3, the 2048-d average over space of the last block, computed as
pytorch-fid computes them: the 8-bit image (the pixels a saved PNG holds) as floats in [0, 1], resized to
299 x 299 by bilinear interpolation (`F.interpolate`, align_corners=False, no antialiasing), scaled to [-1, 1]
by 2x - 1. The graph differs from torchvision's ImageNet Inception-v3 where the port keeps it: the pooling towers
of the A, C and first E blocks average over their 3 x 3 window without counting the zero padding, the second E
block (Mixed_7c) takes the maximum there instead, and the classifier has 1008 outputs (checked, not used).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.torch_version import TorchVersion

from ..errors import UserError
from .cache import to_uint8
from .judges import as_images, file_sha256

SIZE = 299
PREFIX = "inception:"
FILE_NAME = "pt_inception-2015-12-05-6726825d.pth"
KIND = "inception-v3 (pytorch-fid weights, pool3 2048-d)"
INPUT = ("8-bit image as [0, 1] floats, bilinear resize to 299x299 (F.interpolate, align_corners=False, "
         "no antialias), 2x - 1")
_BN_COUNTER = "num_batches_tracked"  # a BatchNorm buffer some saved state dicts carry; it has no effect in eval


class Unit(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3, the graph's), ReLU."""

    def __init__(self, cin: int, cout: int, kernel, stride: int = 1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class Block(nn.Module):
    """An Inception block: towers over the same input, concatenated on channels, the pooling tower last. A
    tower is a chain of steps; a step is one unit or a pair side by side (concatenated: the E blocks' 1x3 and
    3x1). The pooling tower pools the input, 'avg' (3x3, stride 1, padding not counted), 'max' (3x3, stride 1)
    or 'max2' (3x3, stride 2, unpadded), then applies its unit `branch_pool` if it has one."""

    def __init__(self, towers, pool: str, pool_unit: Unit | None = None):
        super().__init__()
        self.plan = []
        for tower in towers:
            chain = []
            for step in tower:
                pairs = step if isinstance(step, list) else [step]
                for name, unit in pairs:
                    self.add_module(name, unit)
                chain.append(tuple(name for name, _ in pairs))
            self.plan.append(chain)
        self.pool = pool
        if pool_unit is not None:
            self.branch_pool = pool_unit

    def pooled(self, x):
        if self.pool == "avg":
            return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        if self.pool == "max":
            return F.max_pool2d(x, 3, stride=1, padding=1)
        return F.max_pool2d(x, 3, stride=2)

    def forward(self, x):
        outs = []
        for chain in self.plan:
            y = x
            for names in chain:
                y = torch.cat([self.get_submodule(n)(y) for n in names], 1)
            outs.append(y)
        pooled = self.pooled(x)
        outs.append(self.branch_pool(pooled) if hasattr(self, "branch_pool") else pooled)
        return torch.cat(outs, 1)


ROW3, COL3 = {"kernel": (1, 3), "padding": (0, 1)}, {"kernel": (3, 1), "padding": (1, 0)}
ROW7, COL7 = {"kernel": (1, 7), "padding": (0, 3)}, {"kernel": (7, 1), "padding": (3, 0)}


def block_a(cin: int, pool_features: int) -> Block:
    return Block([[("branch1x1", Unit(cin, 64, 1))],
                  [("branch5x5_1", Unit(cin, 48, 1)), ("branch5x5_2", Unit(48, 64, 5, padding=2))],
                  [("branch3x3dbl_1", Unit(cin, 64, 1)), ("branch3x3dbl_2", Unit(64, 96, 3, padding=1)),
                   ("branch3x3dbl_3", Unit(96, 96, 3, padding=1))]], "avg", Unit(cin, pool_features, 1))


def block_b(cin: int) -> Block:
    return Block([[("branch3x3", Unit(cin, 384, 3, stride=2))],
                  [("branch3x3dbl_1", Unit(cin, 64, 1)), ("branch3x3dbl_2", Unit(64, 96, 3, padding=1)),
                   ("branch3x3dbl_3", Unit(96, 96, 3, stride=2))]], "max2")


def block_c(c7: int) -> Block:
    return Block([[("branch1x1", Unit(768, 192, 1))],
                  [("branch7x7_1", Unit(768, c7, 1)), ("branch7x7_2", Unit(c7, c7, **ROW7)),
                   ("branch7x7_3", Unit(c7, 192, **COL7))],
                  [("branch7x7dbl_1", Unit(768, c7, 1)), ("branch7x7dbl_2", Unit(c7, c7, **COL7)),
                   ("branch7x7dbl_3", Unit(c7, c7, **ROW7)), ("branch7x7dbl_4", Unit(c7, c7, **COL7)),
                   ("branch7x7dbl_5", Unit(c7, 192, **ROW7))]], "avg", Unit(768, 192, 1))


def block_d(cin: int) -> Block:
    return Block([[("branch3x3_1", Unit(cin, 192, 1)), ("branch3x3_2", Unit(192, 320, 3, stride=2))],
                  [("branch7x7x3_1", Unit(cin, 192, 1)), ("branch7x7x3_2", Unit(192, 192, **ROW7)),
                   ("branch7x7x3_3", Unit(192, 192, **COL7)), ("branch7x7x3_4", Unit(192, 192, 3, stride=2))]],
                 "max2")


def block_e(cin: int, pool: str) -> Block:
    def pair(name):
        return [(name + "a", Unit(384, 384, **ROW3)), (name + "b", Unit(384, 384, **COL3))]

    return Block([[("branch1x1", Unit(cin, 320, 1))],
                  [("branch3x3_1", Unit(cin, 384, 1)), pair("branch3x3_2")],
                  [("branch3x3dbl_1", Unit(cin, 448, 1)), ("branch3x3dbl_2", Unit(448, 384, 3, padding=1)),
                   pair("branch3x3dbl_3")]], pool, Unit(cin, 192, 1))


class FIDInception(nn.Module):
    """The network, from its [-1, 1] input at 299 x 299 to the (N, 2048) pool3 features."""

    def __init__(self):
        super().__init__()
        stem = {"Conv2d_1a_3x3": Unit(3, 32, 3, stride=2), "Conv2d_2a_3x3": Unit(32, 32, 3),
                "Conv2d_2b_3x3": Unit(32, 64, 3, padding=1), "MaxPool_1": None,
                "Conv2d_3b_1x1": Unit(64, 80, 1), "Conv2d_4a_3x3": Unit(80, 192, 3), "MaxPool_2": None}
        mixed = {"Mixed_5b": block_a(192, 32), "Mixed_5c": block_a(256, 64), "Mixed_5d": block_a(288, 64),
                 "Mixed_6a": block_b(288), "Mixed_6b": block_c(128), "Mixed_6c": block_c(160),
                 "Mixed_6d": block_c(160), "Mixed_6e": block_c(192), "Mixed_7a": block_d(768),
                 "Mixed_7b": block_e(1280, "avg"), "Mixed_7c": block_e(2048, "max")}
        self.order = list(stem) + list(mixed)
        for name, module in {**stem, **mixed}.items():
            if module is not None:
                self.add_module(name, module)
        self.add_module("fc", nn.Linear(2048, 1008))  # the graph's classifier: in the file, not in the features

    def forward(self, x):
        for name in self.order:
            x = F.max_pool2d(x, 3, stride=2) if name.startswith("MaxPool") else self.get_submodule(name)(x)
        return x.mean((2, 3))


def network_input(images, size: int = SIZE, device=None) -> torch.Tensor:
    """Float images (N, 3, H, W) in [0, 1] -> the network's input on device: quantised to 8 bits, resized to
    size x size (bilinear, align_corners=False, no antialias), scaled to [-1, 1]."""
    x = to_uint8(as_images(images)).to(device).float().div(255.0)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return 2.0 * x - 1.0


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Every tensor name of the weight file and its shape (the BatchNorm counters left out)."""
    with torch.device("meta"):
        net = FIDInception()
    return {k: tuple(v.shape) for k, v in net.state_dict().items() if not k.endswith(_BN_COUNTER)}


def weights_path(value: str) -> Path | None:
    """The weight file an `inception:FILE` value of --fid-features names, else None (a model folder)."""
    return Path(value[len(PREFIX):]).expanduser() if str(value).startswith(PREFIX) else None


def _fix() -> str:
    return f"give {FILE_NAME}, the file pytorch-fid and torch-fidelity download (or a safetensors copy of it)"


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors, read without running any code, checked name by name and shape by shape."""
    import re
    import warnings

    what = f"Inception weights {path}"
    if not path.is_file():
        raise UserError(f"{what} {'is a folder' if path.is_dir() else 'does not exist'}: {_fix()}")
    if path.suffix != ".safetensors" and TorchVersion(torch.__version__) < (2, 6):
        raise UserError(f"{what}: reading a .pth needs torch >= 2.6 (before it, torch.load(weights_only=True) "
                        "could be made to run code, CVE-2025-32434): upgrade torch, or read the file into a "
                        ".safetensors copy where you trust it")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            with warnings.catch_warnings():  # torch warns before refusing a TorchScript archive
                warnings.simplefilter("ignore")
                state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - a truncated, foreign or pickled-object file: one line
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found:
            raise UserError(f"{what} holds a Python object ({found.group(1)}), which erasekit does not unpickle "
                            f"(it reads tensors only, with torch.load(weights_only=True)): {_fix()}") from e
        if "TorchScript" in str(e):
            raise UserError(f"{what} is a TorchScript archive (as StyleGAN2-ADA's and clean-fid's "
                            f"inception-2015-12-05.pt is), which erasekit does not load: {_fix()}") from e
        kind = "safetensors" if path.suffix == ".safetensors" else "PyTorch"
        raise UserError(f"{what} is not a complete {kind} weight file (cut short or another format; "
                        f"{type(e).__name__}): {_fix()}") from e
    check_weights(state, what)
    return {k: v for k, v in state.items() if not k.endswith(_BN_COUNTER)}


def check_weights(state, what: str) -> None:
    """Refuse, in one line, anything but exactly the FID Inception's tensors with their shapes."""
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise UserError(f"{what} is not a state dict of named tensors (it holds a {type(state).__name__}): {_fix()}")
    shapes = expected_shapes()
    counters = {k for k in state if k.endswith(_BN_COUNTER) and k[:-len(_BN_COUNTER)] + "running_mean" in shapes}
    missing = sorted(set(shapes) - set(state))
    extra = sorted(set(state) - set(shapes) - counters)
    if missing or extra:
        parts = ([f"lacks {len(missing)} of its {len(shapes)} tensors (first {missing[0]})"] if missing else []) + (
            [f"holds {len(extra)} other tensor{'s' if len(extra) > 1 else ''} (first {extra[0]})"] if extra else [])
        raise UserError(f"{what} is not the FID Inception-v3: it {' and '.join(parts)}: {_fix()}")
    for name, shape in shapes.items():
        if tuple(state[name].shape) != shape or not state[name].is_floating_point():
            raise UserError(f"{what} is not the FID Inception-v3: {name} is {state[name].dtype} "
                            f"{tuple(state[name].shape)}, the network's is a float {shape}: {_fix()}")


class InceptionFeatures:
    """`--fid-features inception:FILE`: the (N, 2048) pool3 features of the FID Inception-v3."""

    def __init__(self, path, device=None, batch_size: int = 32):
        from .vision import pick_device

        self.path = Path(path).expanduser()
        state = read_weights(self.path)
        self.sha256 = file_sha256(self.path)
        self.device = pick_device(device)
        self.batch_size = max(1, int(batch_size))
        self.net = FIDInception()
        self.net.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)  # checked above
        self.net.requires_grad_(False).eval().to(self.device)

    @torch.no_grad()
    def __call__(self, images) -> torch.Tensor:
        """(N, 2048) float features on the CPU."""
        images = as_images(images)
        out = [self.net(network_input(images[i:i + self.batch_size], device=self.device)).float().cpu()
               for i in range(0, images.shape[0], self.batch_size)]
        return torch.cat(out) if out else torch.zeros(0, 2048)

    def record(self) -> dict:
        return {"source": "inception", "features": KIND, "weights": str(self.path), "weights_sha256": self.sha256,
                "reader": "safetensors" if self.path.suffix == ".safetensors" else "torch.load(weights_only=True)",
                "input": INPUT}


def feature_model(value: str, device=None, batch_size: int = 32):
    """What --fid-features names: `inception:FILE`, else a CLIP or DINOv2 model folder (vision.ImageFeatures)."""
    path = weights_path(value)
    if path is not None:
        return InceptionFeatures(path, device, batch_size)
    from .vision import ImageFeatures

    return ImageFeatures(value, device, batch_size)
