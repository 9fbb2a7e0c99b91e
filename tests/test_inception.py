"""The FID Inception-v3 (`--fid-features inception:FILE`) on a weight file with the reference's tensor names and
shapes and random values (nothing downloaded): features, the input's resize and scale, the file checks."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from PIL import Image

from cli_helpers import one_line_error, run
from erasekit.errors import UserError
from erasekit.evaluation.inception import KIND, InceptionFeatures, expected_shapes, network_input
from erasekit.evaluation.judges import file_sha256
from erasekit.testing import make_random_inception

# sha256 of the sorted "name (shape)" lines of torch-fidelity 0.4.0's FeatureExtractorInceptionV3 state dict, the
# module that loads pt_inception-2015-12-05-6726825d.pth (experiments/inception_parity.py printed it)
REFERENCE_KEYS = "d84f693f2abd7fea61cb31c87d3b2f268bf707c1bae1db219afdad3363959cb0"


def images(n: int, seed: int, size: int = 32, base: float = 0.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (base + 0.2 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return make_random_inception(tmp_path_factory.mktemp("inception") / "pt_inception-random.pth", seed=3)


@pytest.fixture(scope="module")
def features(weights):
    return InceptionFeatures(weights, device="cpu", batch_size=2)


def test_the_tensor_names_and_shapes_are_the_reference_ones():
    shapes = expected_shapes()
    lines = "\n".join(f"{k} {shape}" for k, shape in sorted(shapes.items()))
    assert len(shapes) == 472 and hashlib.sha256(lines.encode()).hexdigest() == REFERENCE_KEYS
    assert shapes["fc.weight"] == (1008, 2048)
    assert shapes["Mixed_7c.branch3x3dbl_3b.conv.weight"] == (384, 384, 3, 1)


def test_features_are_pool3_2048_d_and_deterministic(weights, features):
    x = images(3, 1)
    a = features(x)
    assert a.shape == (3, 2048) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, features(x))
    again = InceptionFeatures(weights, device="cpu", batch_size=3)(x)  # loaded anew, batched otherwise
    assert torch.allclose(a, again, atol=1e-5)
    assert (a >= 0).all()  # an average of ReLU outputs
    assert not torch.allclose(a[0], a[1])
    assert features(torch.zeros(0, 3, 8, 8)).shape == (0, 2048)


def test_features_tell_two_image_kinds_apart(features):
    dark_a, dark_b, light = images(4, 2, base=0.2), images(4, 3, base=0.2), images(4, 4, base=0.8)
    fa, fb, fc = (features(x).mean(0) for x in (dark_a, dark_b, light))
    assert (fa - fb).norm() < (fa - fc).norm() / 2


def test_the_input_is_8_bit_resized_bilinearly_without_antialias_and_scaled_to_plus_minus_one():
    up = network_input(torch.tensor([0.0, 1.0]).view(1, 1, 1, 2).expand(1, 3, 1, 2), size=4)
    # align_corners=False: output pixel j samples the input at (j + 0.5) / 2 - 0.5, clamped to the edge
    assert up.shape == (1, 3, 4, 4)
    assert torch.allclose(up[0, 0], torch.tensor([-1.0, -0.5, 0.5, 1.0]).expand(4, 4))
    down = network_input(torch.tensor([0, 51, 153, 255]).div(255).view(1, 1, 1, 4).expand(1, 3, 1, 4), size=2)
    # output pixel j samples at 2j + 0.5, the mean of two neighbours (an antialiased resize would spread wider)
    assert torch.allclose(down[0, 1], torch.tensor([25.5 / 255 * 2 - 1, 204 / 255 * 2 - 1]).expand(2, 2))
    grey = network_input(torch.full((1, 3, 5, 7), 0.5))
    assert grey.shape == (1, 3, 299, 299)
    assert torch.allclose(grey, torch.full_like(grey, 128 / 255 * 2 - 1), atol=1e-6)  # 0.5 is stored as 128


def test_counters_and_a_safetensors_copy_give_the_same_features(weights, features, tmp_path):
    from safetensors.torch import save_file

    with_counters = make_random_inception(tmp_path / "counters.pth", seed=3, counters=True)
    x = images(2, 5)
    assert torch.allclose(InceptionFeatures(with_counters, device="cpu")(x), features(x), atol=1e-5)
    state = torch.load(weights, weights_only=True)
    save_file(state, tmp_path / "inception.safetensors")
    copy = InceptionFeatures(tmp_path / "inception.safetensors", device="cpu")
    assert torch.allclose(copy(x), features(x), atol=1e-5)
    assert copy.record()["reader"] == "safetensors"


def test_a_file_with_another_shape_or_a_missing_tensor_is_refused(weights, tmp_path):
    state = torch.load(weights, weights_only=True)
    state["fc.weight"] = torch.zeros(1000, 2048)  # torchvision's ImageNet head
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(UserError, match=r"fc.weight is torch.float32 \(1000, 2048\), the network's is a float "
                                        r"\(1008, 2048\)"):
        InceptionFeatures(tmp_path / "shape.pth")
    del state["fc.weight"]
    state["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
    torch.save(state, tmp_path / "aux.pth")
    with pytest.raises(UserError, match="lacks 1 of its 472 tensors .first fc.weight. and holds 1 other tensor "
                                        ".first AuxLogits.fc.weight."):
        InceptionFeatures(tmp_path / "aux.pth")


def test_evaluate_records_the_inception_features_and_measures_fid_real(weights, tmp_path, capsys):
    real = tmp_path / "real"
    real.mkdir()
    for i, x in enumerate(images(3, 9, size=16)):
        Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(real / f"{i}.png")
    out = tmp_path / "eval"
    code, _, err = run(capsys, "evaluate", "--suite", "testbed:red", "--steps", "2", "--samples", "3",
                       "--fid-features", f"inception:{weights}", "--real-images", real, "--out", out)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    record = results["protocol"]["fid_features"]
    assert record["features"] == KIND == "inception-v3 (pytorch-fid weights, pool3 2048-d)"
    assert record["weights_sha256"] == file_sha256(weights) and record["reader"] == "torch.load(weights_only=True)"
    original = results["metrics"]["original"]
    assert original["fid_gen"] is None and original["fid_real"] > 0  # one Fréchet distance in 2048-d: seconds
    code, _, err = run(capsys, "evaluate", "--suite", "testbed:red", "--fid-features",
                       f"inception:{tmp_path / 'missing.pth'}", "--out", tmp_path / "bad")
    assert code == 2 and "missing.pth does not exist" in one_line_error(err)


def test_a_pth_is_not_unpickled_with_a_torch_whose_restricted_unpickler_could_run_code(weights, monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.5.1")
    with pytest.raises(UserError, match="needs torch >= 2.6"):
        InceptionFeatures(weights)
