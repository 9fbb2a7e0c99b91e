"""The Model adapter on tiny SD1.x-shaped pipelines."""

from __future__ import annotations

import warnings

import pytest
import torch

import erasekit
from erasekit import UserError


@pytest.fixture(scope="module")
def model(tiny_sd):
    return erasekit.load(tiny_sd)


def test_encode_matches_the_pipeline(model):
    prompts = ["a cat", "a red star photograph of a dog"]
    enc = model.encode(prompts)
    ref, _ = model.pipe.encode_prompt(prompts, model.device, 1, False)
    assert torch.allclose(enc.embeddings, ref, atol=1e-6)
    assert enc.embeddings.shape == (2, model.max_length, model.text_encoder.config.hidden_size)


def test_eot_and_key_positions_come_from_token_ids(model):
    # "photograph" splits into many byte tokens: a word count would put [EoT] far too early.
    prompts = ["a cat", "photograph", "a red star photograph of a dog", ""]
    enc = model.encode(prompts)
    eos = model.end_token_id
    for i, prompt in enumerate(prompts):
        unpadded = model.tokenizer(prompt).input_ids
        assert enc.eot[i] == len(unpadded) - 1
        assert enc.input_ids[i, enc.eot[i]] == eos
        assert (enc.input_ids[i, : enc.eot[i]] != eos).all()
    assert len(model.tokenizer("photograph").input_ids) - 2 > 1  # really split into several tokens
    assert enc.key.tolist() == (enc.eot - 1).tolist()
    assert enc.input_ids[3, enc.key[3]] == model.tokenizer.bos_token_id  # empty prompt: key is the start token
    assert enc.padding[0].sum() == model.max_length - 1 - enc.eot[0]
    assert torch.equal(enc.rows(enc.eot)[1], enc.embeddings[1, enc.eot[1]])


def test_cross_attention_layers_are_every_attn2_k_and_v(model):
    layers = model.cross_attention_layers()
    names = {name for name, _ in model.unet.named_parameters()}
    blocks = [n for n, m in model.unet.named_modules() if n.endswith("attn2")]
    assert len(layers) == 2 * len(blocks) > 0
    assert {la.kind for la in layers} == {"k", "v"}
    for layer in layers:
        assert layer.name in names
        assert layer.weight.shape[1] == model.unet.config.cross_attention_dim
        assert model.parameter(layer.name) is layer.weight


def test_predictions_agree_with_the_scheduler_for_every_prediction_type(tiny_sd_any):
    model = erasekit.load(tiny_sd_any)
    torch.manual_seed(0)
    x0_true, eps_true = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([10, 500, 900])
    x_t = model.scheduler.add_noise(x0_true, eps_true, t)
    emb = model.encode(["a cat", "a dog", "a star"]).embeddings
    pred = model.predict(x_t, t, emb)
    a = model.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    # The three conventions describe one consistent prediction.
    assert torch.allclose(a.sqrt() * pred.x0 + (1 - a).sqrt() * pred.eps, x_t, atol=1e-4)
    assert torch.allclose(pred.v, model.scheduler.get_velocity(pred.x0, pred.eps, t), atol=1e-4)
    # The native field is the UNet's raw output.
    raw = model.raw(x_t, t, emb)
    native = {"epsilon": pred.eps, "sample": pred.x0, "v_prediction": pred.v}[model.prediction_type]
    assert torch.allclose(native, raw, atol=1e-5)
    # DDIM's own x0 estimate agrees.
    model.scheduler.set_timesteps(1000)
    for i in range(3):
        step = model.scheduler.step(raw[i:i + 1], int(t[i]), x_t[i:i + 1])
        assert torch.allclose(step.pred_original_sample, pred.x0[i:i + 1], atol=1e-4)


def test_sampling_is_deterministic_per_seed_and_batch_independent(model):
    both = model.sample(["a cat", "a red star"], [0, 1], steps=4, guidance=3.0, progress=False)
    alone = model.sample(["a red star"], [1], steps=4, guidance=3.0, progress=False)
    again = model.sample(["a cat", "a red star"], [0, 1], steps=4, guidance=3.0, progress=False, batch_size=1)
    assert both.shape == (2, 3, 16, 16) and both.min() >= 0 and both.max() <= 1
    assert torch.allclose(both[1], alone[0], atol=1e-5)
    assert torch.allclose(both, again, atol=1e-5)
    assert not torch.allclose(both[0], model.sample(["a cat"], [7], steps=4, progress=False)[0], atol=1e-3)


def test_sampling_matches_a_stock_pipeline_call(model):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler.from_config(model.pipe.scheduler.config, clip_sample=False)
    pipe = StableDiffusionPipeline(**{**model.pipe.components, "scheduler": scheduler})
    pipe.set_progress_bar_config(disable=True)
    noise = model.initial_noise([3])
    ref = pipe("a red star", latents=noise.clone(), num_inference_steps=5, guidance_scale=4.0, output_type="pt",
               height=16, width=16).images
    ours = model.sample(["a red star"], [3], steps=5, guidance=4.0, progress=False)
    assert torch.allclose(ref, ours, atol=1e-4)


def test_rollout_is_the_sampler_trajectory(model):
    steps = 6
    noise = model.initial_noise([5])
    lat0, t0 = model.rollout(["a cat"], [5], to_step=0, steps=steps)
    assert torch.equal(lat0, noise) and t0 == model.timesteps(steps)[0]
    lat3, t3 = model.rollout(["a cat"], [5], to_step=3, steps=steps)
    assert t3 == model.timesteps(steps)[3]
    emb, uncond = model.encode(["a cat"]).embeddings, model.encode([""]).embeddings
    guidance = model.sampler_defaults["guidance"]
    finished = model.denoise(lat3, emb, uncond, steps, guidance, start=3)
    full = model.sample(["a cat"], [5], steps=steps, progress=False, output="latents")
    assert torch.allclose(finished, full, atol=1e-5)
    with pytest.raises(UserError, match="outside"):
        model.rollout(["a cat"], [5], to_step=steps, steps=steps)


def test_bad_model_sources_give_one_line_errors(tmp_path, tiny_sd_no_xattn):
    with pytest.raises(UserError, match="does not exist"):
        erasekit.load(tmp_path / "nope")
    (tmp_path / "notsd").mkdir()
    (tmp_path / "notsd" / "readme.txt").write_text("hi")
    with pytest.raises(UserError, match="not a diffusers pipeline folder"):
        erasekit.load(tmp_path / "notsd")
    with pytest.raises(UserError, match="no cross-attention"):
        erasekit.load(tiny_sd_no_xattn)


def test_empty_prompts_and_long_prompts(model):
    with pytest.raises(UserError, match="empty"):
        model.encode([])
    with pytest.raises(UserError, match="empty"):
        model.sample([], [])
    with pytest.raises(UserError, match="seeds"):
        model.sample(["a cat"], [0, 1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        enc = model.encode(["a very long prompt " * 20])
    assert enc.truncated == [True]
    assert any("truncated" in str(w.message) for w in caught)
    assert enc.eot[0] == model.max_length - 1
