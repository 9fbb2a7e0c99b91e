"""Encoding through [EoT]: a causal text encoder's rows up to [EoT] do not read the padding after it, so the
closed-form methods encode at the longest prompt's length instead of the tokenizer's (Model.encode's
through_eot, Model.rows_ignore_padding); the edits are the same, and bidirectional encoders still pad."""

from __future__ import annotations

import pytest
import torch

import erasekit
from erasekit.concepts import ConceptSpec
from erasekit.methods import rece, uce
from erasekit.methods.common import Encodings, aligned_rows, paired_rows
from erasekit.testing import make_tiny_flux, make_tiny_sdxl

PROMPTS = ["cat", "a photo of a red car on a black background", "", "painting by Van Gogh"]


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    return make_tiny_sdxl(tmp_path_factory.mktemp("short_sdxl") / "sdxl")


def assert_prefix_rows(model):
    full, short = model.encode(PROMPTS), model.encode(PROMPTS, through_eot=True)
    assert model.rows_ignore_padding and short.through_eot and not full.through_eot
    length = int(full.eot.max()) + 1
    assert short.embeddings.shape[1] == length < model.max_length  # the longest prompt's [EoT], not 77
    assert torch.equal(short.eot, full.eot) and torch.equal(short.input_ids, full.input_ids[:, :length])
    sorted_batches = model.encode(PROMPTS, batch_size=2, through_eot=True)  # batches of their own lengths
    for enc in (short, sorted_batches):
        for i, e in enumerate(full.eot.tolist()):  # every row up to [EoT], each prompt
            assert torch.allclose(enc.embeddings[i, :e + 1], full.embeddings[i, :e + 1], atol=1e-5)
    return full, sorted_batches


def test_sd_rows_through_eot_equal_the_padded_encodings(tiny_sd):
    assert_prefix_rows(erasekit.load(tiny_sd))


def test_sdxl_rows_and_pooled_embedding_through_eot_equal_the_padded_ones(tiny_sdxl):
    model = erasekit.load(tiny_sdxl)
    full, short = assert_prefix_rows(model)
    assert torch.allclose(model.pooled(short.cond), model.pooled(full.cond), atol=1e-5)  # read at [EoT]


def test_uce_and_rece_weights_are_those_of_padded_encodings(tiny_sd, monkeypatch):
    model = erasekit.load(tiny_sd)
    spec = ConceptSpec(["cat", "Van Gogh"], preserve=["star", "a photo of a red car"], templates="art", expand=True)
    lengths, encode = [], model.encode

    def recording(prompts, batch_size=64, through_eot=False):
        enc = encode(prompts, batch_size, through_eot)
        lengths.append(enc.embeddings.shape[1])
        return enc

    monkeypatch.setattr(model, "encode", recording)
    short = {"uce": uce.erase(model, spec), "rece": rece.erase(model, spec, rece.RECEConfig(epochs=2))}
    assert lengths and max(lengths) < model.max_length  # both edits encoded through [EoT]
    lengths.clear()
    monkeypatch.setattr(type(model), "rows_ignore_padding", property(lambda self: False))
    padded = {"uce": uce.erase(model, spec), "rece": rece.erase(model, spec, rece.RECEConfig(epochs=2))}
    assert lengths and set(lengths) == {model.max_length}
    for name in short:
        for key, value in padded[name].tensors.items():
            diff = float((short[name].tensors[key] - value).norm() / value.norm())
            assert diff < 1e-5, (name, key, diff)


def test_positions_reading_padding_encode_the_full_length(tiny_sd):
    """eot+padding and aligned read rows after [EoT]: the edit pads, and a through_eot encoding refuses them."""
    model = erasekit.load(tiny_sd)
    spec = ConceptSpec(["cat"])
    for positions in ("eot+padding", "all", "aligned"):
        keys, _, _ = uce.erase_keys(model, spec, positions)
        assert len(keys) > 1
    short = model.encode(["cat"], through_eot=True)
    with pytest.raises(ValueError, match="after \\[EoT\\]"):
        paired_rows(short, short, "eot+padding")
    with pytest.raises(ValueError, match="after \\[EoT\\]"):
        paired_rows(short, short, "aligned")
    with pytest.raises(ValueError, match="padding rows"):
        aligned_rows(short, short)


def test_bidirectional_encoders_still_pad(tmp_path):
    """The testbed's MiniLM (BERT) and FLUX's T5 read every row: through_eot changes nothing there."""
    testbed = erasekit.load("testbed")
    flux = erasekit.load(make_tiny_flux(tmp_path / "flux"))
    for model in (testbed, flux):
        assert not model.rows_ignore_padding
        enc = model.encode(PROMPTS[:2], through_eot=True)
        assert not enc.through_eot and enc.embeddings.shape[1] == model.max_length
        assert torch.equal(enc.embeddings, model.encode(PROMPTS[:2]).embeddings)


def test_encodings_join_batches_of_different_lengths(tiny_sd):
    """A prompt asked for after the first batch is encoded at its own length; rows of both batches read back
    as the padded encoding's, the filler after [EoT] marked through_eot."""
    model = erasekit.load(tiny_sd)
    enc = Encodings(model, through_eot=True)
    enc.prefetch(["cat"])
    enc.prefetch(["a photo of a red car on a black background"])
    both = enc(["a photo of a red car on a black background", "cat"])
    full = model.encode(["a photo of a red car on a black background", "cat"])
    assert both.through_eot and len(enc.batches) == 2
    assert torch.allclose(both.rows(both.key), full.rows(full.key), atol=1e-5)
    assert torch.allclose(both.rows(both.eot), full.rows(full.eot), atol=1e-5)


def test_shared_prefixes_are_computed_once_and_equal_the_full_rows(tiny_sd):
    """Prompts that begin alike share their prefix rows: the Linear layers run one row per distinct prefix up
    to each [EoT], and every row up to [EoT] is still the padded encoding's."""
    from erasekit.shared_rows import distinct_rows

    model = erasekit.load(tiny_sd)
    prompts = ["a photo of a cat", "a photo of a dog", "a photo of a", "cat"]
    full, short = model.encode(prompts), model.encode(prompts, through_eot=True)
    ids = short.input_ids
    first, where = distinct_rows(ids, short.eot)
    assert len(first) < int((short.eot + 1).sum())  # fewer rows computed than read
    assert int((where >= 0).sum()) == int((short.eot + 1).sum()) and int(where.max()) == len(first) - 1
    for i, e in enumerate(full.eot.tolist()):
        assert torch.allclose(short.embeddings[i, :e + 1], full.embeddings[i, :e + 1], atol=1e-5)
    before = {id(m): m.__dict__.get("forward") for m in model.text_encoder.modules()}
    assert all(v is None for v in before.values())  # the Linear layers are themselves again afterwards
