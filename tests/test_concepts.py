"""ConceptSpec: construction, expansion, validation and spec files."""

from __future__ import annotations

import pytest

from erasekit import UserError
from erasekit.concepts import Concept, ConceptSpec


def test_pairs_expand_every_phrase_with_the_anchor_in_the_same_template():
    spec = ConceptSpec([Concept("star", ["starburst"])], anchors=["circle"], expand=True)
    pairs = spec.pairs()
    assert len(pairs) == 2 * 5
    assert pairs[0].target == "image of star" and pairs[0].anchor == "image of circle"
    assert pairs[5].target == "image of starburst" and pairs[5].concept == "star"
    assert len(spec.pairs(synonyms=False)) == 5
    assert ConceptSpec(["star"]).pairs()[0].target == "star"  # no expansion: the phrase alone


def test_one_anchor_per_target_and_preserve_prompts():
    spec = ConceptSpec(["star", "red"], anchors=["circle", "blue"], preserve=["square"], templates="art", expand=True)
    assert [p.anchor for p in spec.pairs()][::5] == ["painting by circle", "painting by blue"]
    assert spec.preserve_prompts()[0] == "painting by square"


@pytest.mark.parametrize("kwargs, message", [
    ({"targets": []}, "no target concept"),
    ({"targets": ["star", "Star"]}, "duplicate target"),
    ({"targets": ["star"], "anchors": ["star"]}, "is the target concept"),
    ({"targets": [Concept("star", ["starburst"])], "anchors": ["starburst"]}, "is the target concept"),
    ({"targets": ["star", "red"], "anchors": ["a", "b", "c"]}, "3 anchors for 2 targets"),
    ({"targets": ["star"], "preserve": ["star"]}, "both targets and preserved"),
    ({"targets": ["star"], "templates": ["no placeholder"]}, "exactly one"),
    ({"targets": ["star"], "templates": "poetry"}, "unknown template set"),
])
def test_bad_specs_are_named(kwargs, message):
    with pytest.raises(UserError, match=message):
        ConceptSpec(**kwargs)


def test_spec_files(tmp_path):
    (tmp_path / "s.yaml").write_text("targets:\n  - name: star\n    synonyms: [starburst]\nanchors: circle\n"
                                     "preserve: [square]\nexpand: true\n")
    spec = ConceptSpec.from_file(tmp_path / "s.yaml")
    assert spec.targets[0].phrases == ["star", "starburst"] and spec.anchors == ["circle"] and spec.expand
    (tmp_path / "s.toml").write_text('targets = ["star"]\ntemplates = ["a {} here"]\nexpand = true\n')
    assert ConceptSpec.from_file(tmp_path / "s.toml").pairs()[0].target == "a star here"
    (tmp_path / "bad.yaml").write_text("targets: [star]\nanchor: circle\nstrength: 3\n")
    with pytest.raises(UserError, match=r"unknown keys \['anchor', 'strength'\]"):
        ConceptSpec.from_file(tmp_path / "bad.yaml")
    (tmp_path / "broken.yaml").write_text("targets: [star\n")
    with pytest.raises(UserError, match="cannot read spec file"):
        ConceptSpec.from_file(tmp_path / "broken.yaml")
