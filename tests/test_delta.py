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


def test_corrupt_truncated_and_foreign_files(model, tmp_path):
    path = random_edit(model).save(tmp_path / "d.safetensors")
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    for name in ("trunc", "junk"):
        with pytest.raises(UserError, match="corrupt or truncated"):
            Delta.load(tmp_path / f"{name}.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(UserError, match="not an erasekit delta"):
        Delta.load(tmp_path / "plain.safetensors")
    with pytest.raises(UserError, match="does not exist"):
        Delta.load(tmp_path / "missing.safetensors")
    with pytest.raises(UserError, match="already exists"):
        random_edit(model).save(path)


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
