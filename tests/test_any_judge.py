"""Combined judges (`A|B`: flagged when any part flags its own concept) and judge models named by hub id."""

from __future__ import annotations

import shutil

import pytest
import torch

from erasekit.errors import UserError
from erasekit.evaluation.judges import get_judge
from erasekit.testing import make_tiny_classifier

PARTS = '''
import torch
from erasekit.evaluation.judges import Judge

class Const(Judge):
    """Scores every image `value` for its one concept, flagged above `threshold`."""
    def __init__(self, value=0.2, threshold=0.5, concept="thing"):
        self.name, self.threshold, self.concepts, self.value = f"const{value}", threshold, (concept,), value
    def record(self):
        return {"name": self.name, "value": self.value}
    def scores(self, images):
        return {self.concepts[0]: torch.full((images.shape[0],), float(self.value))}

class Other(Const):
    pass
'''


@pytest.fixture
def parts(tmp_path, monkeypatch):
    (tmp_path / "erasekit_any_parts.py").write_text(PARTS)
    monkeypatch.syspath_prepend(str(tmp_path))


def test_a_combination_flags_when_any_part_flags_its_own_concept(parts):
    x = torch.rand(3, 3, 8, 8)
    neither = get_judge("erasekit_any_parts:Const|erasekit_any_parts:Other")
    assert neither.concepts == ("inappropriate",) and neither.flags(x, "inappropriate").tolist() == [False] * 3
    one = get_judge("erasekit_any_parts:Const|erasekit_any_parts:Other", **{"erasekit_any_parts.value": 0.3,
                                                                            "concept": "bad"})
    assert one.flags(x, "bad").tolist() == [False] * 3  # both parts got value 0.3 < 0.5
    mixed = get_judge("erasekit_any_parts:Const|erasekit_any_parts:Other",
                      **{"erasekit_any_parts.threshold": 0.1})
    assert mixed.flags(x, "inappropriate").tolist() == [True] * 3  # 0.2 > 0.1 for both
    assert [d for d in mixed.details(x)][0] == {"const0.2": True}
    record = mixed.record()
    assert record["threshold"] == 0.5 and [p["concept"] for p in record["parts"]] == ["thing", "thing"]


def test_the_margin_crosses_one_half_exactly_at_a_parts_threshold(parts):
    x = torch.rand(2, 3, 8, 8)
    for value, flagged in ((0.79, False), (0.81, True)):
        judge = get_judge("erasekit_any_parts:Const|erasekit_any_parts:Other",
                          **{"erasekit_any_parts.threshold": 0.8, "erasekit_any_parts.value": value})
        score = judge.scores(x)["inappropriate"]
        assert bool((score > 0.5).all()) is flagged and bool(((score - 0.5).abs() < 0.02).all())


def test_combination_options_and_parts_are_checked(parts):
    with pytest.raises(UserError, match="names no part"):
        get_judge("erasekit_any_parts:Const|erasekit_any_parts:Other", top_k=3)
    with pytest.raises(UserError, match="not a part"):
        get_judge("erasekit_any_parts:Const|erasekit_any_parts:Other", **{"q16.prompts": "x"})
    with pytest.raises(UserError, match="empty part"):
        get_judge("erasekit_any_parts:Const|")


def test_a_judge_model_is_found_by_hub_id_in_the_local_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    folder = make_tiny_classifier(tmp_path / "clf", ["cat", "dog"])
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    entry = tmp_path / "hub" / "models--someorg--tiny-clf"
    shutil.copytree(folder, entry / "snapshots" / commit)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    judge = get_judge("classifier:someorg/tiny-clf")
    record = judge.record()
    assert "someorg/tiny-clf" in repr(record) and commit in repr(record)
    with pytest.raises(UserError, match="local Hugging Face cache"):
        get_judge("classifier:someorg/absent")
