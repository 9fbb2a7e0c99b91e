"""Model families: SDXL and FLUX.1 end to end on tiny pipelines, hub ids from the local cache, and the testbed as an
adapter (no import cycle, no name test outside it)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import erasekit
from cli_helpers import one_line_error, run
from erasekit.testing import make_tiny_flux, make_tiny_sdxl

SRC = Path(__file__).resolve().parents[1] / "src" / "erasekit"

JUDGE = '''
import torch
from erasekit.evaluation.judges import Judge

class Never(Judge):
    """Flags nothing, so every prompt is attacked."""
    def __init__(self):
        self.name, self.threshold, self.concepts = "never", 0.5, ("cat",)
    def record(self):
        return {"name": self.name}
    def scores(self, images):
        return {"cat": torch.zeros(images.shape[0])}
'''


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    return make_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl") / "sdxl")


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl):
    return erasekit.load(tiny_sdxl, device="cpu")


@pytest.fixture
def never_judge(tmp_path, monkeypatch) -> str:
    (tmp_path / "erasekit_never_judge.py").write_text(JUDGE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "erasekit_never_judge:Never"


def test_sdxl_encodes_as_the_stock_pipeline(sdxl):
    prompts = ["a red star", "a cat"]
    enc = sdxl.encode(prompts)
    context, uncond, pooled, _ = sdxl.pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=True)
    assert sdxl.family == "sdxl" and enc.embeddings.shape == context.shape
    assert torch.allclose(enc.embeddings, context, atol=1e-6)
    assert torch.allclose(sdxl.pooled(enc.cond), pooled, atol=1e-6)
    assert enc.cond.shape[1] == context.shape[1] + sdxl.pooled_rows
    assert torch.count_nonzero(sdxl.unconditional()) == 0 and torch.count_nonzero(uncond) == 0  # zeroed, as stock


def test_sdxl_samples_the_stock_pipelines_image(sdxl):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    mine = sdxl.sample(["a red star"], [3], steps=4, guidance=5.0, progress=False)
    stock = StableDiffusionXLPipeline(**sdxl.pipe.components)
    stock.scheduler = DDIMScheduler.from_config(stock.scheduler.config, clip_sample=False)
    stock.set_progress_bar_config(disable=True)
    size = mine.shape[-1]
    theirs = stock(["a red star"], num_inference_steps=4, guidance_scale=5.0, latents=sdxl.initial_noise([3]),
                   output_type="pt", height=size, width=size).images
    assert torch.allclose(mine, theirs, atol=1e-5)


def test_info_names_the_family(tiny_sdxl, capsys):
    code, out, _ = run(capsys, "info", tiny_sdxl)
    assert code == 0 and json.loads(out)["model"]["family"] == "sdxl"


def test_uce_on_sdxl_loads_into_a_stock_unet_and_generates(tiny_sdxl, sdxl, tmp_path, capsys):
    from diffusers import UNet2DConditionModel

    delta = tmp_path / "uce.safetensors"
    code, _, err = run(capsys, "erase", tiny_sdxl, "--method", "uce", "--concept", "cat", "--out", delta)
    assert code == 0, err
    tensors = load_file(delta)
    assert tensors and all(re.search(r"attn2\.to_[kv]\.weight$", k) for k in tensors)
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl / "unet")
    missing, unexpected = unet.load_state_dict(tensors, strict=False)
    assert not unexpected and len(missing) == len(unet.state_dict()) - len(tensors)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    cond = sdxl.encode(["a cat"]).cond
    args, kwargs = sdxl.denoiser_inputs(x, t, cond)
    with torch.no_grad(), erasekit.Delta.load(delta).applied(sdxl):
        erased = sdxl.raw(x, t, cond)
    assert torch.allclose(unet(*args, **kwargs).sample, erased, atol=1e-5)
    code, _, err = run(capsys, "generate", tiny_sdxl, "--delta", delta, "-p", "a cat", "--seeds", "0-1",
                       "--steps", "3", "--out", tmp_path / "g")
    assert code == 0 and len(list((tmp_path / "g" / "images").glob("*.png"))) == 2, err


@pytest.mark.parametrize("method", ["rece", "erasepro", "trce-stage1", "esd", "trce-stage2", "score"])
def test_every_method_erases_on_sdxl(tiny_sdxl, sdxl, tmp_path, capsys, method):
    prior = tmp_path / "prior.txt"
    prior.write_text("a dog\na red star\na photo of a car\n")
    settings = {"trce-stage1": ["--set", f"prior_prompts={prior}"]}.get(method, [])
    if method in ("esd", "trce-stage2", "score"):
        settings = ["--set", "steps=2"]
    out = tmp_path / f"{method}.safetensors"
    code, _, err = run(capsys, "erase", tiny_sdxl, "--method", method, "--concept", "cat", "--out", out, *settings)
    assert code == 0, err
    delta = erasekit.Delta.load(out, base=sdxl)
    changed = [k for k, v in delta.tensors.items() if not torch.equal(v, sdxl.parameter(k).detach())]
    assert changed
    if method == "erasepro":  # both text encoders' MLPs, not only the first's
        assert any(k.startswith("text_encoder_2.") for k in delta.tensors)


def test_evaluate_and_unlearndiff_on_sdxl(tiny_sdxl, tmp_path, capsys, never_judge):
    delta = tmp_path / "uce.safetensors"
    assert run(capsys, "erase", tiny_sdxl, "--method", "uce", "--concept", "cat", "--out", delta)[0] == 0
    suite = tmp_path / "cats.txt"
    suite.write_text("a cat\na photo of a cat\n")
    common = ["--delta", delta, "--suite", suite, "--concept", "cat", "--judge", never_judge, "--steps", "3"]
    code, _, err = run(capsys, "evaluate", tiny_sdxl, *common, "--out", tmp_path / "ev")
    assert code == 0, err
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert results["protocol"]["model"]["family"] == "sdxl"
    code, _, err = run(capsys, "attack", tiny_sdxl, *common, "--attack", "unlearndiff", "--set", "iterations=2",
                       "--set", "timesteps=2", "--out", tmp_path / "at")
    assert code == 0, err
    attacked = json.loads((tmp_path / "at" / "results.json").read_text())
    assert sum(p["attacked"] for p in attacked["prompts"]) == 2 and all(p["adversarial_prompt"]
                                                                       for p in attacked["prompts"])
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("sensitive prompt,normal prompt\na cat on a mat,a dog on a mat\n"
                     "a photo of a cat,a photo of a dog\n")
    code, _, err = run(capsys, "attack", tiny_sdxl, *common[:2], "--suite", pairs, *common[4:], "--attack", "ringabell",
                       "--set", "generations=2", "--set", "population=8", "--out", tmp_path / "rab")
    assert code == 0, err
    assert sum(p["attacked"] for p in json.loads((tmp_path / "rab" / "results.json").read_text())["prompts"]) == 2


def test_export_on_sdxl_loads_with_the_stock_pipeline(tiny_sdxl, sdxl, tmp_path, capsys):
    from diffusers import StableDiffusionXLPipeline

    delta = tmp_path / "uce.safetensors"
    assert run(capsys, "erase", tiny_sdxl, "--method", "uce", "--concept", "cat", "--out", delta)[0] == 0
    code, _, err = run(capsys, "export", tiny_sdxl, "--delta", delta, "--out", tmp_path / "ex")
    assert code == 0, err
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "ex", local_files_only=True)
    tensors = load_file(delta)
    exported = dict(pipe.unet.named_parameters())
    assert all(torch.allclose(exported[k], v) for k, v in tensors.items())


def cache_layout(cache: Path, folder: Path, repo: str, commit: str = "0123456789abcdef0123456789abcdef01234567"):
    """A Hugging Face hub cache entry for repo holding the pipeline folder, as huggingface_hub writes one."""
    entry = cache / ("models--" + repo.replace("/", "--"))
    shutil.copytree(folder, entry / "snapshots" / commit)
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(commit)
    return commit


def test_a_hub_id_resolves_from_the_local_cache(tiny_sdxl, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    commit = cache_layout(cache, tiny_sdxl, "someorg/tiny-sdxl")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    code, out, err = run(capsys, "info", "someorg/tiny-sdxl", "--offline")
    assert code == 0, err
    model = json.loads(out)["model"]
    assert (model["family"], model["hub_id"], model["revision"]) == ("sdxl", "someorg/tiny-sdxl", commit)
    code, _, err = run(capsys, "info", "someorg/absent", "--offline")
    assert code == 2 and "not in the local Hugging Face cache" in one_line_error(err)
    # the cached snapshot is a source folder: nothing may be written into it
    snapshot = cache / "models--someorg--tiny-sdxl" / "snapshots" / commit
    code, _, err = run(capsys, "erase", "someorg/tiny-sdxl", "--offline", "--method", "uce", "--concept", "cat",
                       "--out", snapshot / "d.safetensors")
    assert code == 2 and "inside the source model folder" in one_line_error(err)


def test_a_family_erasekit_has_no_adapter_for_is_one_line(tiny_sd, tmp_path, capsys):
    folder = tmp_path / "flux"
    shutil.copytree(tiny_sd, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusion3Pipeline"}))
    code, _, err = run(capsys, "info", folder)
    assert code == 2 and "no Stable Diffusion 3 adapter yet" in one_line_error(err)


@pytest.fixture(scope="session", params=["dev", "schnell"])
def tiny_flux(request, tmp_path_factory) -> Path:
    """dev-like (guidance embeddings) and schnell-like (none) tiny FLUX folders."""
    return make_tiny_flux(tmp_path_factory.mktemp(f"tiny_flux_{request.param}") / "flux",
                          guidance=request.param == "dev")


def test_flux_encodes_and_samples_as_the_stock_pipeline(tiny_flux):
    flux = erasekit.load(tiny_flux, device="cpu")
    prompts = ["a red star", "a cat"]
    enc = flux.encode(prompts)
    context, pooled, _ = flux.pipe.encode_prompt(prompts, prompt_2=None, device="cpu",
                                                 max_sequence_length=flux.max_length)
    assert flux.family == "flux" and torch.allclose(enc.embeddings, context, atol=1e-6)
    assert torch.allclose(flux.pooled(enc.cond), pooled, atol=1e-6)
    mine = flux.sample(["a red star"], [5], steps=4, guidance=3.5, progress=False)
    flux.pipe.set_progress_bar_config(disable=True)
    size = mine.shape[-1]
    theirs = flux.pipe(["a red star"], num_inference_steps=4, guidance_scale=3.5, latents=flux.initial_noise([5]),
                       output_type="pt", height=size, width=size, max_sequence_length=flux.max_length).images
    assert torch.allclose(mine, theirs, atol=1e-5)


def test_a_bfloat16_load_reads_the_weights_straight_into_bfloat16(tiny_flux, monkeypatch):
    """No float32 copy on the way to bfloat16 (a FLUX.1-dev one would be 67 GB): every component comes out of
    the loader in bfloat16, before the adapter's own `.to`."""
    import erasekit.families as families

    dtypes = set()
    real = families.load_folder

    def spy(*args, **kwargs):
        pipe = real(*args, **kwargs)
        dtypes.update(p.dtype for name in ("transformer", "text_encoder", "text_encoder_2", "vae")
                      for p in getattr(pipe, name).parameters())
        return pipe

    monkeypatch.setattr(families, "load_folder", spy)
    flux = erasekit.load(tiny_flux, device="cpu", dtype=torch.bfloat16)
    assert dtypes == {torch.bfloat16} and flux.dtype == torch.bfloat16


def test_flux_prediction_conventions_invert_the_flow(tiny_flux):
    flux = erasekit.load(tiny_flux, device="cpu")
    x0, noise = torch.randn(2, *flux.latent_shape), torch.randn(2, *flux.latent_shape)
    t = torch.tensor([250.0, 750.0])
    s = (t / 1000).view(-1, 1, 1)
    x_t = (1 - s) * x0 + s * noise
    p = flux.convert(x_t, t, noise - x0)  # the exact velocity gives back x0 and the noise
    assert torch.allclose(p.x0, x0, atol=1e-5) and torch.allclose(p.eps, noise, atol=1e-5)


def test_flux_closed_form_erasure_generate_evaluate_and_export(tiny_flux, tmp_path, capsys, never_judge):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    code, out, _ = run(capsys, "info", tiny_flux)
    assert code == 0 and json.loads(out)["model"]["family"] == "flux"
    delta = tmp_path / "uce.safetensors"
    for method in ("uce", "rece", "erasepro"):
        out_file = delta if method == "uce" else tmp_path / f"{method}.safetensors"
        code, _, err = run(capsys, "erase", tiny_flux, "--method", method, "--concept", "cat", "--out", out_file)
        assert code == 0, err
    tensors = load_file(delta)
    # the text projections UCE's FLUX script edits: T5 rows and the pooled CLIP embedding
    assert sorted(tensors) == ["context_embedder.weight", "time_text_embed.text_embedder.linear_1.weight"]
    transformer = FluxTransformer2DModel.from_pretrained(tiny_flux / "transformer")
    assert not transformer.load_state_dict(tensors, strict=False).unexpected_keys
    code, _, err = run(capsys, "generate", tiny_flux, "--delta", delta, "-p", "a cat", "--seeds", "0-1", "--steps",
                       "3", "--out", tmp_path / "g")
    assert code == 0 and len(list((tmp_path / "g" / "images").glob("*.png"))) == 2, err
    suite = tmp_path / "cats.txt"
    suite.write_text("a cat\na photo of a cat\n")
    code, _, err = run(capsys, "evaluate", tiny_flux, "--delta", delta, "--suite", suite, "--concept", "cat",
                       "--judge", never_judge, "--steps", "3", "--out", tmp_path / "ev")
    assert code == 0, err
    assert json.loads((tmp_path / "ev" / "results.json").read_text())["protocol"]["model"]["family"] == "flux"
    code, _, err = run(capsys, "export", tiny_flux, "--delta", delta, "--out", tmp_path / "ex")
    assert code == 0, err
    pipe = FluxPipeline.from_pretrained(tmp_path / "ex", local_files_only=True)
    assert torch.equal(pipe.transformer.context_embedder.weight.detach(), tensors["context_embedder.weight"])


@pytest.mark.parametrize("method", ["trce-stage2", "trce", "co-erasing"])
def test_what_flux_cannot_run_yet_is_one_line(tiny_flux, tmp_path, capsys, never_judge, method):
    code, _, err = run(capsys, "erase", tiny_flux, "--method", method, "--concept", "cat", "--out", tmp_path / "e.st")
    part = "co-erasing" if method == "co-erasing" else "trce-stage2"
    assert code == 2 and f"cannot run {part} on FLUX.1 yet" in one_line_error(err)
    assert not (tmp_path / "e.st").exists()


def test_family_neutral_code_neither_imports_the_testbed_nor_asks_for_it_by_name():
    """The model interface, the SDXL adapter, methods, attacks and fine-tuning reach the testbed only
    through model.world; nothing outside the testbed tests a model's name for "testbed"."""
    import ast

    neutral = [SRC / "model.py", SRC / "families" / "sdxl.py", SRC / "families" / "flux.py",
               *(SRC / "methods").glob("*.py"), *(SRC / "attacks").glob("*.py"), *(SRC / "finetune").glob("*.py")]
    for path in neutral:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert "testbed" not in (node.module or ""), f"{path.name} imports {node.module}"
    for path in SRC.rglob("*.py"):
        if "testbed" not in path.relative_to(SRC).parts:
            assert not re.search(r"\.name\s*[!=]=\s*[\"']testbed[\"']", path.read_text()), f"{path} asks by name"


def test_flux_makes_square_images_of_a_requested_size(tiny_flux, tmp_path, capsys):
    flux = erasekit.load(tiny_flux, device="cpu")
    image = flux.sample(["a cat"], [0], steps=2, progress=False, size=(32, 32))
    assert image.shape[-2:] == (32, 32)
    code, _, err = run(capsys, "generate", tiny_flux, "-p", "a cat", "--seeds", "0", "--steps", "2", "--height", "32",
                       "--width", "64", "--out", tmp_path / "g")
    assert code == 2 and "square images only" in one_line_error(err) and not (tmp_path / "g").exists()
