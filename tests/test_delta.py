"""Delta: save/load, apply/revert, stock-pipeline compatibility, export, and mismatches."""

from __future__ import annotations

import hashlib
import warnings

import pytest
import torch
from safetensors.torch import load_file

import erasekit
from erasekit import Delta, UserError
from erasekit.export import export


@pytest.fixture(scope="module")
def model(tiny_sd):
    return erasekit.load(tiny_sd)


def random_edit(model, scale: float = 0.5, seed: int = 0) -> Delta:
    gen = torch.Generator().manual_seed(seed)
    new = {la.name: la.weight.detach() + scale * torch.randn(la.weight.shape, generator=gen)
           for la in model.cross_attention_layers()}
    return Delta.from_changes(model, new, method="test", config={"scale": scale}, stats={"note": "random"})


def folder_digest(path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def test_apply_changes_output_and_revert_restores_exactly(model):
    delta = random_edit(model)
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    base_img = model.sample(["a cat"], [0], steps=4, progress=False)
    with delta.applied(model):
        edited = model.sample(["a cat"], [0], steps=4, progress=False)
        for name, value in delta.tensors.items():
            assert torch.equal(model.parameter(name).detach(), value)
    assert not torch.allclose(base_img, edited, atol=1e-3)
    for k, v in model.unet.state_dict().items():
        assert torch.equal(v, before[k])


def test_saved_delta_loads_into_a_stock_pipeline_with_identical_images(model, tiny_sd, tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    delta = random_edit(model)
    path = delta.save(tmp_path / "edit.safetensors")
    loaded = Delta.load(path)
    assert loaded.method == "test" and loaded.config == {"scale": 0.5} and loaded.base_hash == delta.base_hash
    assert loaded.base["name"] == model.name and loaded.version == erasekit.__version__

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    pipe.set_progress_bar_config(disable=True)
    result = pipe.unet.load_state_dict(load_file(path), strict=False)
    assert not result.unexpected_keys
    stock = pipe("a red star", latents=model.initial_noise([2]), num_inference_steps=4, guidance_scale=3.0,
                 output_type="pt", height=16, width=16).images
    with loaded.applied(model):
        ours = model.sample(["a red star"], [2], steps=4, guidance=3.0, progress=False)
    assert torch.allclose(stock, ours, atol=1e-5)


def test_delta_for_another_base_or_architecture_fails_with_one_line(model, tiny_sd_other, tiny_sd_wide):
    delta = random_edit(model)
    other = erasekit.load(tiny_sd_other)
    with pytest.raises(UserError, match="made for base model") as err:
        delta.apply(other)
    assert "\n" not in str(err.value)
    wide = erasekit.load(tiny_sd_wide)
    with pytest.raises(UserError, match="another architecture"):
        delta.apply(wide)
    renamed = Delta({"no.such.weight": torch.zeros(2)}, method="test")
    with pytest.raises(UserError, match="does not exist"):
        renamed.apply(model)


def test_corrupt_truncated_and_missing_files(model, tmp_path):
    path = random_edit(model).save(tmp_path / "d.safetensors")
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    (tmp_path / "random.safetensors").write_bytes(torch.randint(1, 127, (4096,), dtype=torch.uint8).numpy().tobytes())
    for name in ("trunc", "junk", "random"):
        with pytest.raises(UserError, match="corrupt, truncated or not safetensors") as err:
            Delta.load(tmp_path / f"{name}.safetensors")
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="does not exist"):
        Delta.load(tmp_path / "missing.safetensors")
    with pytest.raises(UserError, match="already exists"):
        random_edit(model).save(path)


def test_a_delta_records_the_sha256_of_its_tensors_and_refuses_a_damaged_one(model, tmp_path):
    import json

    from safetensors import safe_open

    from erasekit.delta import tensors_sha256

    path = random_edit(model).save(tmp_path / "d.safetensors")
    with safe_open(str(path), framework="pt") as f:
        recorded = json.loads(f.metadata()["erasekit"])["tensors_sha256"]
    assert recorded == tensors_sha256(load_file(path))
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40  # one bit of the last tensor's last value: the file still parses
    (tmp_path / "flipped.safetensors").write_bytes(bytes(data))
    with pytest.raises(UserError, match="is damaged: its tensors do not match the sha256 recorded") as err:
        Delta.load(tmp_path / "flipped.safetensors")
    assert "\n" not in str(err.value)
    assert tensors_sha256({"a": torch.zeros(2)}) != tensors_sha256({"a": torch.zeros(2, dtype=torch.float16)})
    assert tensors_sha256({"a": torch.zeros(2)}) != tensors_sha256({"a": torch.zeros(1, 2)})


def test_nan_tensors_are_never_saved_nor_loaded(model, tmp_path):
    from safetensors.torch import save_file

    delta = random_edit(model)
    first = next(iter(delta.tensors))
    delta.tensors[first] = torch.full_like(delta.tensors[first], float("nan"))
    delta.config["lr"] = float("inf")
    with pytest.raises(UserError, match=r"test diverged: 1 of 8 edited tensors hold NaN or inf .*lower lr \(it was "
                                         r"inf\)") as err:
        delta.save(tmp_path / "nan.safetensors")
    assert "\n" not in str(err.value) and not (tmp_path / "nan.safetensors").exists()
    good = random_edit(model)
    tensors = dict(good.tensors, **{first: torch.full_like(good.tensors[first], float("inf"))})
    save_file(tensors, str(tmp_path / "inf.safetensors"), metadata={"erasekit": json_meta(good)})
    with pytest.raises(UserError, match="holds NaN or inf values in 1 of 8 tensors"):
        Delta.load(tmp_path / "inf.safetensors")


def json_meta(delta) -> str:
    import json

    return json.dumps(delta.metadata())


@pytest.mark.parametrize("name", ["unet.pt", "weights.ckpt", "model.bin", "x.pth", "pickled.safetensors"])
def test_pickle_files_given_as_a_delta_are_refused_unread(model, tmp_path, name):
    import pickle

    target = tmp_path / name
    if name.endswith(".pt"):
        torch.save({"w": torch.zeros(2)}, target)  # torch's zip format
    else:
        target.write_bytes(pickle.dumps({"w": [0.0, 1.0]}))
    with pytest.raises(UserError, match="is a pickle checkpoint, not safetensors: erasekit loads no pickle") as err:
        Delta.load(target)
    assert "save_file(torch.load(" in str(err.value) and "\n" not in str(err.value)


def test_a_foreign_delta_is_matched_by_names_and_shapes(model, tmp_path):
    """A safetensors file without erasekit metadata, as the public UCE code writes: attn2.to_k/to_v weights under
    diffusers UNet names, plus a text-encoder tensor under a 'text_encoder.' prefix."""
    from safetensors.torch import save_file

    layers = model.cross_attention_layers()[:2]
    text_key, text_module = model.text_mlp_layers()[0]
    tensors = {la.name: la.weight.detach() * 0.5 for la in layers}
    tensors[text_key] = text_module.weight.detach() * 2.0
    path = tmp_path / "uce.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    delta = Delta.load(path)
    assert delta.is_foreign and delta.method == "foreign delta, provenance unknown"
    assert delta.config["file_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    parts = delta.components(model)
    assert {k: v["tensors"] for k, v in parts.items()} == {"UNet cross-attention K/V": 2, "text encoder": 1}
    assert parts["UNet cross-attention K/V"]["max"] == pytest.approx(0.5, rel=1e-5)
    assert parts["text encoder"]["mean"] == pytest.approx(1.0, rel=1e-5)
    with delta.applied(model):
        assert torch.equal(model.parameter(text_key).detach(), tensors[text_key])
    assert not torch.equal(model.parameter(text_key).detach(), tensors[text_key])

    save_file({"model.diffusion_model.input_blocks.1.1.attn2.to_k.weight": torch.zeros(32, 32)},
              str(tmp_path / "ldm.safetensors"))
    with pytest.raises(UserError, match="'model.diffusion_model.input_blocks.1.1.attn2.to_k.weight' does not exist"
                                        ".*diffusers UNet parameter names") as err:
        Delta.load(tmp_path / "ldm.safetensors").check(model)
    assert "\n" not in str(err.value)
    save_file({layers[0].name: torch.zeros(3, 3)}, str(tmp_path / "shape.safetensors"))
    with pytest.raises(UserError, match=f"{layers[0].name}' has shape \\(3, 3\\)"):
        Delta.load(tmp_path / "shape.safetensors").apply(model)


def test_components_tell_unet_kv_other_unet_and_text_encoder_apart(model):
    kv = model.cross_attention_layers()[0]
    other = "conv_in.weight"
    text_key, text_module = model.text_mlp_layers()[-1]
    delta = Delta.from_changes(model, {kv.name: kv.weight * 1.1, other: model.parameter(other) * 0.0,
                                       text_key: text_module.weight * 1.3}, method="test")
    parts = delta.components(model)
    assert list(parts) == ["UNet cross-attention K/V", "other UNet tensors", "text encoder"]
    assert [round(p["max"], 4) for p in parts.values()] == [0.1, 1.0, 0.3]


def test_export_writes_a_loadable_folder_and_leaves_the_source_alone(model, tiny_sd, tmp_path):
    from diffusers import StableDiffusionPipeline

    source_before = folder_digest(tiny_sd)
    delta = random_edit(model)
    out = export(model, tmp_path / "exported", [delta])
    assert folder_digest(tiny_sd) == source_before
    merged = erasekit.load(out)
    with delta.applied(model):
        expected = model.sample(["a cat"], [4], steps=4, progress=False)
    assert torch.allclose(merged.sample(["a cat"], [4], steps=4, progress=False), expected, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert StableDiffusionPipeline.from_pretrained(out, safety_checker=None) is not None
    # the model itself is unchanged after export
    for name in delta.tensors:
        assert not torch.equal(model.parameter(name).detach(), delta.tensors[name])
    with pytest.raises(UserError, match="not empty"):
        export(model, out, [delta])
    with pytest.raises(UserError, match="source model folder"):
        export(model, tiny_sd / "inside", [delta])
