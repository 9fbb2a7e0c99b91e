"""One-off parity check of erasekit's FID Inception-v3 (erasekit.evaluation.inception) against the reference
implementations, on one random-weight file with the reference's tensor names (no real weights needed).

The references need torchvision, which cannot be installed beside erasekit's torch; so they are installed
without dependencies into a scratch folder and torchvision is replaced, in this process only, by a stub:
torch-fidelity's Inception module imports nothing from it, and pytorch-fid takes from it only the __init__ of
its A, C and E blocks (their forward is pytorch-fid's own) and the stem, B and D blocks of torchvision's
Inception3, which are given torch-fidelity's identical blocks. Nothing here is part of erasekit.

    pip install --no-deps --target /tmp/ref torch-fidelity==0.4.0 pytorch-fid==0.3.0
    python -c "from erasekit.testing import make_random_inception as m; m('/tmp/rand_incep.pth')"
    OMP_NUM_THREADS=1 PYTHONPATH=src python experiments/inception_parity.py /tmp/rand_incep.pth [/tmp/ref]

Prints the tensor-name fingerprint of each module and the largest feature difference per comparison.
"""

from __future__ import annotations

import hashlib
import sys
from unittest import mock

import torch

WEIGHTS = sys.argv[1]
sys.path.insert(0, sys.argv[2] if len(sys.argv) > 2 else "/tmp/ref")
stub = mock.MagicMock(name="torchvision")
stub.__version__ = "0.20.0"
sys.modules["torchvision"] = stub
for sub in ("datasets", "transforms", "transforms.functional", "models", "models.utils", "models.inception", "io"):
    sys.modules["torchvision." + sub] = stub

import torch_fidelity.feature_extractor_inceptionv3 as fidelity  # noqa: E402

stub.models.inception.InceptionA = fidelity.InceptionA
stub.models.inception.InceptionC = fidelity.InceptionC
stub.models.inception.InceptionE = fidelity.InceptionE_1
stub.models.inception_v3 = lambda **_: fidelity.FeatureExtractorInceptionV3(
    "stem", ["2048"], feature_extractor_weights_path=WEIGHTS)
import pytorch_fid.inception as pytorch_fid  # noqa: E402

pytorch_fid.load_state_dict_from_url = lambda url, progress=True: torch.load(WEIGHTS, weights_only=True)

from erasekit.evaluation.inception import InceptionFeatures, network_input  # noqa: E402

FIDELITY_ORDER = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                  "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                  "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "AvgPool"]


def fingerprint(state) -> tuple[str, int]:
    lines = [f"{k} {tuple(v.shape)}" for k, v in sorted(state.items()) if not k.endswith("num_batches_tracked")]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest(), len(lines)


def report(label: str, mine: torch.Tensor, ref: torch.Tensor) -> None:
    diff = float((mine - ref).abs().max())
    print(f"{label}: max |diff| {diff:.3e} (features up to {float(ref.abs().max()):.3f})")


def main() -> None:
    ref_fidelity = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                        feature_extractor_weights_path=WEIGHTS).eval()
    ref_pytorch_fid = pytorch_fid.InceptionV3([3]).eval()
    mine = InceptionFeatures(WEIGHTS, device="cpu")
    print("tensor names: torch-fidelity", fingerprint(ref_fidelity.state_dict()))
    print("tensor names: erasekit      ", fingerprint(mine.net.state_dict()))

    def fidelity_network(x):
        for name in FIDELITY_ORDER:
            x = getattr(ref_fidelity, name)(x)
        return x.flatten(1)

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for size in (64, 299, 512):
            images = torch.rand(4, 3, size, size, generator=g).mul(255).round().div(255)  # 8-bit pixels
            x = network_input(images)
            report(f"{size}px, network on the same input, vs torch-fidelity's layers", mine.net(x), fidelity_network(x))
            report(f"{size}px, end to end vs pytorch-fid InceptionV3([3])", mine(images),
                   ref_pytorch_fid(images)[0].flatten(1))
            as_bytes = images.mul(255).round().to(torch.uint8)
            report(f"{size}px, end to end vs torch-fidelity (its TF1 resize, (x - 128) / 128)", mine(images),
                   ref_fidelity(as_bytes)[0])


if __name__ == "__main__":
    main()
