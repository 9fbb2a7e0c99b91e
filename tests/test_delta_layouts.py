"""--delta in the layouts the field publishes (erasekit.delta_sources), each built offline from a tiny SD: an erased
pipeline folder, a text-encoder checkpoint (CLIPTextModel folder or safetensors of bare names), LoRA weights in
PEFT and diffusers layout. apply accepts each and names its layout; evaluate's record says it is foreign."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import erasekit
import erasekit.cli
from cli_helpers import one_line_error, run
from erasekit import Delta, UserError
from erasekit.delta import FOREIGN
from erasekit.evaluation.runner import load_variants
from erasekit.export import export


@pytest.fixture(scope="module")
def model(tiny_sd):
    return erasekit.load(tiny_sd)


@pytest.fixture(scope="module")
def edits(model):
    """Two K/V matrices and one text-encoder MLP weight changed."""
    kv = model.cross_attention_layers()[:2]
    text_key, text_module = model.text_mlp_layers()[0]
    new = {la.name: la.weight.detach() * 0.5 for la in kv}
    new[text_key] = text_module.weight.detach() * 1.5
    return new


def test_an_erased_pipeline_folder_is_compared_with_the_base(model, edits, tiny_sd, tmp_path, capsys):
    folder = export(model, tmp_path / "erased", [Delta.from_changes(model, edits, "someone else's")])
    (folder / "erasekit_export.json").unlink()  # as a folder from another tool would be
    delta = Delta.load(folder, base=model)
    assert delta.is_foreign and delta.config["layout"] == "erased pipeline folder"
    assert delta.config["identity"]["name"] == "erased" and "unet/diffusion_pytorch_model.safetensors" in \
        delta.config["files"]
    assert sorted(delta.tensors) == sorted(edits)  # only what changed
    for name, value in edits.items():
        assert torch.equal(delta.tensors[name], value.float())
    code, out, err = run(capsys, "apply", tiny_sd, "--delta", folder)
    assert code == 0, err
    assert "(foreign delta, provenance unknown) applies cleanly" in out and "erased pipeline folder" in out
    assert "UNet cross-attention K/V: 2 tensors" in out and "text encoder: 1 tensors" in out


def test_a_pipeline_of_another_architecture_or_the_base_itself_is_refused(model, tiny_sd, tiny_sd_wide, tmp_path,
                                                                          capsys):
    code, _, err = run(capsys, "apply", tiny_sd, "--delta", tiny_sd_wide)
    assert code == 2 and "not the base's architecture" in one_line_error(err)
    code, _, err = run(capsys, "apply", tiny_sd, "--delta", tiny_sd)
    assert code == 2 and "same weights" in one_line_error(err)
    (tmp_path / "notes").mkdir()
    code, _, err = run(capsys, "apply", tiny_sd, "--delta", tmp_path / "notes")
    assert code == 2 and "is a folder but not an erased model" in one_line_error(err)


def test_a_text_encoder_checkpoint_as_advunlearn_publishes_it(model, tiny_sd, tmp_path, capsys):
    """A CLIPTextModel folder (save_pretrained) and a safetensors of its bare 'text_model.' names."""
    import copy

    text = copy.deepcopy(model.text_encoder)
    key = "encoder.layers.1.self_attn.q_proj.weight"
    with torch.no_grad():
        dict(text.named_parameters())[key].mul_(-1.0)
    text.save_pretrained(tmp_path / "te", safe_serialization=True)
    state = {k: v.contiguous() for k, v in text.state_dict().items()}
    save_file({"text_model." + k: v for k, v in state.items()}, str(tmp_path / "old.safetensors"))  # older names
    save_file(state, str(tmp_path / "new.safetensors"))  # as this transformers version names them
    for given, layout in ((tmp_path / "te", "text-encoder folder"), (tmp_path / "old.safetensors",
                          "text-encoder safetensors"), (tmp_path / "new.safetensors", "text-encoder safetensors")):
        delta = Delta.load(given, base=model)
        assert delta.is_foreign and delta.config["layout"].startswith(layout)
        assert [model.parameter(k).data_ptr() for k in delta.tensors] == [model.parameter("text_encoder." +
                                                                                           key).data_ptr()]
        code, out, err = run(capsys, "apply", tiny_sd, "--delta", given)
        assert code == 0 and "text encoder: 1 tensors, relative change mean 2" in out, err


def lora_pair(weight: torch.Tensor, rank: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rank, weight.shape[1], generator=g), torch.randn(weight.shape[0], rank, generator=g))


def test_lora_weights_are_merged_into_the_base(model, tiny_sd, tmp_path, capsys):
    kv = model.cross_attention_layers()[:2]
    text_key, text_module = model.text_mlp_layers()[0]
    peft, kohya, expected = {}, {}, {}
    for i, (name, weight) in enumerate([(la.name, la.weight) for la in kv] + [(text_key, text_module.weight)]):
        down, up = lora_pair(weight.detach(), seed=i)
        module = name.removesuffix(".weight")
        peft[f"base_model.model.{module}.lora_A.weight"] = down
        peft[f"base_model.model.{module}.lora_B.weight"] = up
        kohya[f"unet.{module}.lora.down.weight" if not name.startswith("text_encoder.") else
              f"{module}.lora.down.weight"] = down
        kohya[f"unet.{module}.lora.up.weight" if not name.startswith("text_encoder.") else
              f"{module}.lora.up.weight"] = up
        kohya[("unet." if not name.startswith("text_encoder.") else "") + f"{module}.alpha"] = torch.tensor(1.0)
        expected[name] = weight.detach().double() + (up.double() @ down.double())
    (tmp_path / "peft").mkdir()
    save_file(peft, str(tmp_path / "peft" / "adapter_model.safetensors"))
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4}))
    save_file(kohya, str(tmp_path / "lora.safetensors"))
    for path, scale in ((tmp_path / "peft" / "adapter_model.safetensors", 2.0), (tmp_path / "lora.safetensors", 0.5)):
        delta = Delta.load(path, base=model)
        assert delta.is_foreign and delta.config["layout"].startswith("LoRA")
        assert sorted(delta.tensors) == sorted(expected)
        for name, value in expected.items():
            base = model.parameter(name).detach().double()
            want = base + scale * (value - base)  # alpha / rank: 4 / 2 from adapter_config, 1 / 2 from alpha
            assert torch.allclose(delta.tensors[name].double(), want, atol=1e-5), name
        code, out, err = run(capsys, "apply", tiny_sd, "--delta", path)
        assert code == 0 and "LoRA (PEFT/diffusers), merged into the base" in out, err
    with pytest.raises(UserError, match="read against the base model"):
        Delta.load(tmp_path / "lora.safetensors")
    save_file({k: v for k, v in peft.items() if "lora_B" not in k}, str(tmp_path / "half.safetensors"))
    with pytest.raises(UserError, match="needs its up"):
        Delta.load(tmp_path / "half.safetensors", base=model)


def test_evaluate_records_every_layout_as_foreign(model, edits, tmp_path):
    """evaluate and compare read deltas with load_variants against the loaded model; each record is foreign."""
    folder = export(model, tmp_path / "erased", [Delta.from_changes(model, edits, "x")])
    save_file({k: v.contiguous() for k, v in edits.items()}, str(tmp_path / "plain.safetensors"))
    variants = load_variants([folder, tmp_path / "plain.safetensors"], stacked=False, base=model)
    records = [v.record()["deltas"][0] for v in variants[1:]]
    assert [r["method"] for r in records] == [FOREIGN, FOREIGN]
    assert [r["config"]["layout"] for r in records] == ["erased pipeline folder", "changed tensors (state dict)"]
    assert all(r["config"]["provenance"] == "unknown" and len(r["config"]["file_sha256"]) == 64 for r in records)


def test_evaluate_runs_on_an_erased_testbed_folder(tmp_path, capsys):
    """The whole command: a UCE edit of the testbed exported as a pipeline folder and evaluated as --delta."""
    testbed = erasekit.load("testbed")
    from erasekit.concepts import ConceptSpec
    from erasekit.methods import uce

    folder = export(testbed, tmp_path / "erased", [uce.erase(testbed, ConceptSpec(["red"], anchors=["blue"]))])
    code, out, err = run(capsys, "evaluate", "--delta", folder, "--suite", "testbed:red", "--steps", "2",
                         "--samples", "2", "--limit", "1", "--out", tmp_path / "run")
    assert code == 0, err
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    record = json.dumps(results)
    assert FOREIGN in record and "erased pipeline folder" in record


SMALL_RUN = ["--suite", "testbed:circle", "--limit", "1", "--samples", "2", "--steps", "2"]


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """The public UCE code's output format: the changed tensors, no erasekit metadata."""
    folder = tmp_path_factory.mktemp("plain")
    made = folder / "uce.safetensors"
    assert erasekit.cli.main(["erase", "--method", "uce", "--concept", "circle", "--out", str(made)]) == 0
    save_file({k: v.contiguous() for k, v in Delta.load(made).tensors.items()}, str(folder / "public.safetensors"))
    return folder / "public.safetensors"


def test_a_plain_state_dict_is_attacked_as_foreign(plain, tmp_path, capsys):
    small = SMALL_RUN
    code, _, err = run(capsys, "attack", "--delta", plain, "--attack", "unlearndiff", *small,
                       "--set", "iterations=1", "--set", "timesteps=1", "--out", tmp_path / "atk")
    assert code == 0, err
    erased = json.loads((tmp_path / "atk" / "results.json").read_text())["protocol"]["erased"]
    assert erased["deltas"][0]["method"] == FOREIGN


@pytest.mark.slow
def test_a_plain_state_dict_is_audited_as_foreign(plain, tmp_path, capsys):
    small = SMALL_RUN
    code, _, err = run(capsys, "audit", "--delta", plain, *small, "--random-prompts", "2",
                       "--set", "unlearndiff.iterations=1", "--set", "unlearndiff.timesteps=1",
                       "--set", "p4d.iterations=1", "--set", "ringabell.population=4",
                       "--set", "ringabell.generations=1", "--set", "ringabell.tokens=4", "--set", "ringabell.pairs=4",
                       "--out", tmp_path / "audit")
    assert code == 0, err
    audit = json.loads((tmp_path / "audit" / "results.json").read_text())
    assert FOREIGN in json.dumps(audit["protocol"]) and "mean_asr" in audit
