"""ConceptSpec: construction, expansion, validation and spec files."""

from __future__ import annotations

import pytest

from erasekit import UserError
from erasekit.concepts import Concept, ConceptSpec


def test_pairs_expand_every_phrase_with_the_anchor_in_the_same_template():
    spec = ConceptSpec([Concept("star", ["starburst"])], anchors=["circle"], expand=True)
    pairs = spec.pairs()
    assert len(pairs) == 2 * 6  # each phrase bare, then in the 5 templates (the public UCE code's --expand_prompts)
    assert (pairs[0].target, pairs[0].anchor) == ("star", "circle")
    assert pairs[1].target == "image of star" and pairs[1].anchor == "image of circle"
    assert pairs[6].target == "starburst" and pairs[7].target == "image of starburst" and pairs[7].concept == "star"
    assert len(spec.pairs(synonyms=False)) == 6
    assert ConceptSpec(["star"]).pairs()[0].target == "star"  # no expansion: the phrase alone
    old = ConceptSpec([Concept("star", ["starburst"])], anchors=["circle"], expand=True, expansion="templates")
    assert len(old.pairs()) == 10 and old.pairs()[0].target == "image of star"


def test_one_anchor_per_target_and_preserve_prompts():
    spec = ConceptSpec(["star", "red"], anchors=["circle", "blue"], preserve=["square"], templates="art", expand=True)
    assert [p.anchor for p in spec.pairs()][::6] == ["circle", "blue"]
    assert [p.anchor for p in spec.pairs()][1::6] == ["painting by circle", "painting by blue"]
    assert spec.preserve_prompts() == ["square"]  # the public code does not expand preserve concepts
    old = ConceptSpec(["star"], preserve=["square"], templates="art", expand=True, expansion="templates")
    assert old.preserve_prompts()[0] == "painting by square" and len(old.preserve_prompts()) == 5


def test_the_default_guide_is_the_public_codes():
    """'' for object concepts, 'art' for art (the public code's concept_type art); a given anchor wins."""
    assert ConceptSpec(["star"]).anchors == [""]
    assert ConceptSpec(["Van Gogh"], templates="art").anchors == ["art"]
    assert ConceptSpec(["Van Gogh"], anchors=[""], templates="art").anchors == [""]
    with pytest.raises(UserError, match="unknown expansion 'all'"):
        ConceptSpec(["star"], expansion="all")


@pytest.mark.parametrize("kwargs, message", [
    ({"targets": []}, "no target concept"),
    ({"targets": ["star", "Star"]}, "duplicate target"),
    ({"targets": ["star"], "anchors": ["star"]}, "is the target concept"),
    ({"targets": [Concept("star", ["starburst"])], "anchors": ["starburst"]}, "is the target concept"),
    ({"targets": ["star", "red"], "anchors": ["a", "b", "c"]}, "3 anchors for 2 targets"),
    ({"targets": ["star"], "preserve": ["star"]}, "both targets and preserved"),
    ({"targets": ["star"], "templates": ["no placeholder"]}, "exactly one"),
    ({"targets": ["star"], "templates": "poetry"}, "unknown template set"),
    ({"targets": ["star"], "expansion": "both"}, "unknown expansion"),
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
    assert [p.target for p in ConceptSpec.from_file(tmp_path / "s.toml").pairs()] == ["star", "a star here"]
    (tmp_path / "t.toml").write_text('targets = ["star"]\ntemplates = ["a {} here"]\nexpand = true\n'
                                     'expansion = "templates"\n')
    assert [p.target for p in ConceptSpec.from_file(tmp_path / "t.toml").pairs()] == ["a star here"]
    (tmp_path / "bad.yaml").write_text("targets: [star]\nanchor: circle\nstrength: 3\n")
    with pytest.raises(UserError, match=r"unknown keys \['anchor', 'strength'\]"):
        ConceptSpec.from_file(tmp_path / "bad.yaml")
    (tmp_path / "broken.yaml").write_text("targets: [star\n")
    with pytest.raises(UserError, match="cannot read spec file"):
        ConceptSpec.from_file(tmp_path / "broken.yaml")
