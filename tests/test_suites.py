"""Suites: built-in testbed suites, every CSV layout, the real benchmark files, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from erasekit import UserError
from erasekit.evaluation.suites import Suite, SuitePrompt, load_suite, suite_names
from erasekit.testbed.world import ATTRIBUTES, VALUES

DATA = Path("/work/shared/data/prompts")


def write(tmp_path: Path, name: str, text: str, bom: bool = False) -> Path:
    path = tmp_path / name
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


# --- testbed suites -------------------------------------------------------------------------------


def test_testbed_suite_sets_roles_counts_and_values():
    suite = load_suite("testbed:star", samples=5)
    assert (suite.name, suite.concepts, suite.judge, suite.source, suite.layout) == (
        "testbed:star", ("star",), "testbed", "testbed", "testbed")
    assert [(s.name, s.role, len(s.prompts)) for s in suite.sets] == [
        ("target:canonical", "target", 5), ("target:synonym", "target", 5), ("target:heldout", "target", 5),
        ("preservation", "preservation", 5)]
    for s in suite.sets[:3]:
        assert all(p.values["shape"] == "star" for p in s.prompts)
        assert [p.seed for p in s.prompts] == [2000, 2001, 2002, 2003, 2004]
    assert all(p.values["shape"] != "star" for p in suite.set("preservation").prompts)
    assert [p.seed for p in suite.set("preservation").prompts] == [3000, 3001, 3002, 3003, 3004]
    assert "star" in suite.set("target:canonical").prompts[0].text
    assert all(p.guidance is None and p.meta == {} for s in suite.sets for p in s.prompts)


def test_multi_concept_suite_concatenates_targets_and_preserves_neither():
    suite = load_suite("testbed:red+striped", samples=4)
    assert suite.name == "testbed:red+striped" and suite.concepts == ("red", "striped")
    target = suite.set("target:heldout").prompts
    assert len(target) == 8
    assert all(p.values["color"] == "red" for p in target[:4])
    assert all(p.values["style"] == "striped" for p in target[4:])
    keep = suite.set("preservation").prompts
    assert len(keep) == 4
    assert all(p.values["color"] != "red" and p.values["style"] != "striped" for p in keep)


def test_hash_is_stable_and_follows_the_prompts():
    suite = load_suite("testbed:red", samples=6)
    assert suite.hash() == load_suite("testbed:red", samples=6).hash()
    assert len(suite.hash()) == 64 and int(suite.hash(), 16) >= 0
    assert suite.limit(3).hash() != suite.hash()
    assert suite.limit(3).hash() == load_suite("testbed:red", samples=3).hash()
    assert load_suite("testbed:blue", samples=6).hash() != suite.hash()


def test_a_limit_above_every_set_says_every_prompt_is_used(capsys):
    from erasekit.evaluation.commands import note_short_limit

    suite = load_suite("testbed:circle", samples=6)
    note_short_limit(64, suite.limit(64))
    err = capsys.readouterr().err
    assert "--limit 64 is more than any prompt set of testbed:circle holds (6)" in err and "--samples N" in err
    for quiet in (None, 6, 3):
        note_short_limit(quiet, suite.limit(quiet))
        assert capsys.readouterr().err == ""


def test_limit_takes_the_first_k_of_each_set():
    suite = load_suite("testbed:circle", samples=6)
    small = suite.limit(2)
    for full, cut in zip(suite.sets, small.sets):
        assert cut.prompts == full.prompts[:2] and (cut.name, cut.role) == (full.name, full.role)
    assert suite.limit(None) is suite
    assert suite.limit(100).hash() == suite.hash()
    for bad in (0, -1):
        with pytest.raises(UserError, match="at least 1"):
            suite.limit(bad)


def test_record_and_set_lookup():
    suite = load_suite("testbed:sky", samples=3)
    record = suite.record()
    assert record == {"name": "testbed:sky", "source": "testbed", "layout": "testbed", "concepts": ["sky"],
                      "judge": "testbed", "hash": suite.hash(),
                      "sets": {"target:canonical": 3, "target:synonym": 3, "target:heldout": 3, "preservation": 3},
                      "categories": []}
    json.dumps(record)
    with pytest.raises(UserError, match="no prompt set 'nope'.*target:canonical, .*preservation"):
        suite.set("nope")


def test_suite_names_cover_every_testbed_value_and_load():
    names = suite_names()
    assert len(names) == sum(len(VALUES[a]) for a in ATTRIBUTES)
    assert {"testbed:star", "testbed:red", "testbed:striped", "testbed:grass"} <= set(names)
    for name in names:
        assert load_suite(name, samples=1).name == name


def test_prompts_are_hashable_on_text_seed_and_guidance():
    a = SuitePrompt("x", 1, values={"shape": "star"}, meta={"k": "v"})
    assert hash(a) == hash(SuitePrompt("x", 1))
    assert a != SuitePrompt("x", 1)  # equality still compares values and meta


# --- CSV and TXT layouts --------------------------------------------------------------------------

I2P = (
    ",prompt,categories,hard,nudity_percentage,evaluation_seed,evaluation_guidance,case_number\n"
    '0,"a nude, classical statue","sexual, nudity",1,80.0,3693994600,7,10\n'
    '1,"she said ""hello""\nover two lines",violence,0,0.0,42,,11\n'
    "2,,sexual,1,50.0,7,7,12\n"
    "3,  plain prompt  ,shocking,0,n/a,5.0,12.5,13\n"
)


def test_i2p_layout_with_quoting_newlines_huge_seeds_and_empty_guidance(tmp_path):
    suite = load_suite(str(write(tmp_path, "mine.csv", I2P)))
    assert (suite.name, suite.layout, suite.concepts, suite.judge) == ("mine", "i2p", ("nudity",), "nudenet")
    assert suite.source == str(tmp_path / "mine.csv")
    (target,) = suite.sets
    assert (target.name, target.role) == ("target", "target")
    assert [p.text for p in target.prompts] == ["a nude, classical statue", 'she said "hello"\nover two lines',
                                                "plain prompt"]
    assert [p.seed for p in target.prompts] == [3693994600, 42, 5]
    assert all(type(p.seed) is int for p in target.prompts)
    assert [p.guidance for p in target.prompts] == [7.0, None, 12.5]
    assert target.prompts[0].meta == {"categories": "sexual, nudity", "nudity_percentage": 80.0, "case_number": "10"}
    assert target.prompts[2].meta["nudity_percentage"] == "n/a"
    assert all(p.values is None for p in target.prompts)


def test_concept_argument_overrides_the_nudity_default(tmp_path):
    suite = load_suite(str(write(tmp_path, "violence.csv", I2P)), concept="violence")
    assert suite.concepts == ("violence",) and suite.judge == ""


def test_i2p_category_keeps_only_that_categorys_rows_and_changes_the_hash(tmp_path):
    path = str(write(tmp_path, "mine.csv", I2P))
    every = load_suite(path)
    sexual = load_suite(path, categories=["Sexual "])  # matched stripped and case-blind
    assert [(p.text, p.seed) for p in sexual.sets[0].prompts] == [("a nude, classical statue", 3693994600)]
    assert sexual.categories == ("sexual",) and sexual.record()["categories"] == ["sexual"]
    both = load_suite(path, categories=["sexual", "violence"])  # rows of any of them, each with its own seed
    assert [p.seed for p in both.sets[0].prompts] == [3693994600, 42]
    assert len({every.hash(), sexual.hash(), both.hash()}) == 3
    assert every.record()["categories"] == [] and every.hash() == load_suite(path, categories=[]).hash()
    # the same prompts selected another way hash differently: the filter itself is in the hash
    assert sexual.hash() != load_suite(path).limit(1).hash()


@pytest.mark.parametrize("suite, categories, message", [
    ("mine.csv", ["hate"], "has no row of category 'hate': choose from nudity, sexual, shocking, violence"),
    ("plain.csv", ["sexual"], "has no 'categories' column"),
    ("testbed:red", ["sexual"], "testbed:red is not a CSV file"),
])
def test_category_errors(tmp_path, suite, categories, message):
    write(tmp_path, "mine.csv", I2P)
    write(tmp_path, "plain.csv", "prompt\na cat\n")
    spec = suite if suite.startswith("testbed:") else str(tmp_path / suite)
    with pytest.raises(UserError, match=message):
        load_suite(spec, categories=categories)


def test_evaluate_takes_the_category(tmp_path, capsys):
    from cli_helpers import one_line_error, run

    code, _, err = run(capsys, "evaluate", "--suite", write(tmp_path, "mine.csv", I2P), "--category", "hate",
                       "--out", tmp_path / "run")
    assert code == 2 and "no row of category 'hate'" in one_line_error(err)
    assert not (tmp_path / "run").exists()


def test_ringabell_layout_with_bom_and_untidy_headers(tmp_path):
    text = ' Sensitive Prompt ,Normal Prompt\r\n"a bare woman, in bed",a clothed woman in bed\r\n' \
           ",an empty room\r\nnude figure,a dressed figure\r\n"
    suite = load_suite(str(write(tmp_path, "rab.csv", text, bom=True)))
    assert (suite.layout, suite.concepts, suite.judge) == ("ringabell", ("nudity",), "nudenet")
    target, keep = suite.sets
    assert (target.name, target.role, keep.name, keep.role) == ("target", "target", "preservation", "preservation")
    assert [(p.text, p.seed) for p in target.prompts] == [("a bare woman, in bed", 0), ("nude figure", 2)]
    assert [(p.text, p.seed) for p in keep.prompts] == [("a clothed woman in bed", 0), ("an empty room", 1),
                                                        ("a dressed figure", 2)]


def test_ringabell_uses_a_seed_column_when_there_is_one(tmp_path):
    suite = load_suite(str(write(tmp_path, "rab.csv", "sensitive prompt,normal prompt,seed\na,b,77\n")))
    assert suite.sets[0].prompts[0].seed == 77 and suite.sets[1].prompts[0].seed == 77


def test_p4d_layout(tmp_path):
    text = ",prompt,evaluation_seed,evaluation_guidance,case_number,safe_model,safe_level\n" \
           "0,garbled nude words,206205177,7,1172,sld,MAX\n"
    suite = load_suite(str(write(tmp_path, "p4d.csv", text)))
    assert (suite.layout, suite.concepts, suite.judge) == ("p4d", ("nudity",), "nudenet")
    (p,) = suite.set("target").prompts
    assert (p.text, p.seed, p.guidance) == ("garbled nude words", 206205177, 7.0)
    assert p.meta == {"case_number": "1172", "safe_model": "sld", "safe_level": "MAX"}


def test_mma_layout_feeds_the_adversarial_prompt(tmp_path):
    text = "target_prompt,adv_prompt,sanitized_adv_prompt,success_against_sanitization_defense,clean_prompt\n" \
           'a nude woman,"thing, <|startoftext|> ...?",thing,True,a tie\n'
    suite = load_suite(str(write(tmp_path, "mma.csv", text)))
    assert (suite.layout, suite.concepts, suite.judge) == ("mma", ("nudity",), "nudenet")
    (p,) = suite.set("target").prompts
    assert (p.text, p.seed, p.guidance) == ("thing, <|startoftext|> ...?", 0, None)
    assert p.meta == {"target_prompt": "a nude woman", "clean_prompt": "a tie"}


def test_coco_layout_is_a_preservation_set(tmp_path):
    text = "case_number,source,prompt,evaluation_seed\n000000203564,coco-30k,A bicycle replica.,41337\n" \
           "000000000001,coco-30k,A dog.,9\n"
    suite = load_suite(str(write(tmp_path, "captions.csv", text)))
    assert (suite.layout, suite.concepts, suite.judge) == ("coco", (), "")
    (keep,) = suite.sets
    assert (keep.name, keep.role, len(keep.prompts)) == ("preservation", "preservation", 2)
    assert keep.prompts[0].meta == {"case_number": "000000203564", "source": "coco-30k"}
    assert [p.seed for p in keep.prompts] == [41337, 9]


def test_generic_layout_keeps_other_columns_and_uses_row_index_seeds(tmp_path):
    text = "Unnamed: 0,Prompt,artist\n0,a portrait in the style of Picasso,Pablo Picasso\n" \
           "1,,x\n2,a wheatfield,Van Gogh\n"
    suite = load_suite(str(write(tmp_path, "artists.csv", text)), concept="picasso")
    assert (suite.layout, suite.concepts, suite.judge) == ("generic", ("picasso",), "")
    (target,) = suite.sets
    assert [(p.text, p.seed, p.guidance) for p in target.prompts] == [
        ("a portrait in the style of Picasso", 0, None), ("a wheatfield", 2, None)]
    assert target.prompts[0].meta == {"artist": "Pablo Picasso"}
    assert load_suite(str(write(tmp_path, "plain.csv", "prompt\nx\n"))).concepts == ()


def test_prompt_with_seed_but_no_source_is_generic_not_coco(tmp_path):
    text = "case_number,prompt,evaluation_seed,evaluation_guidance\n0,Old stone church.,69922,7.5\n"
    suite = load_suite(str(write(tmp_path, "church.csv", text)))
    assert suite.layout == "generic" and suite.sets[0].role == "target"
    assert (suite.sets[0].prompts[0].seed, suite.sets[0].prompts[0].guidance) == (69922, 7.5)


def test_txt_file_one_prompt_per_line(tmp_path):
    suite = load_suite(str(write(tmp_path, "list.txt", "a cat\n\n  a dog, running  \n", bom=True)), concept="dog")
    assert (suite.name, suite.layout, suite.concepts) == ("list", "generic", ("dog",))
    assert [(p.text, p.seed) for p in suite.set("target").prompts] == [("a cat", 0), ("a dog, running", 1)]


def test_file_hash_covers_seed_and_guidance(tmp_path):
    base = load_suite(str(write(tmp_path, "a.csv", "prompt,evaluation_seed,evaluation_guidance\nx,1,7\n")))
    seed = load_suite(str(write(tmp_path, "a.csv", "prompt,evaluation_seed,evaluation_guidance\nx,2,7\n")))
    guidance = load_suite(str(write(tmp_path, "a.csv", "prompt,evaluation_seed,evaluation_guidance\nx,1,8\n")))
    again = load_suite(str(write(tmp_path, "a.csv", "prompt,evaluation_seed,evaluation_guidance\nx,1,7\n")))
    assert len({base.hash(), seed.hash(), guidance.hash()}) == 3
    assert again.hash() == base.hash()


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, text, fragments", [
    ("cols.csv", "text,seed\nhello,1\n", ["no 'prompt' column", "columns: text, seed", "name the prompt column"]),
    ("empty.csv", "", ["is empty", "header row"]),
    ("empty.txt", "\n  \n", ["is empty", "one prompt per line"]),
    ("header.csv", "prompt,evaluation_seed\n,1\n", ["holds no prompts"]),
    ("seed.csv", "prompt,evaluation_seed\nok,1\nbad,abc\n", ["row 2", "line 3", "evaluation_seed 'abc'",
                                                              "fix that seed"]),
    ("negative.csv", "prompt,evaluation_seed\nbad,-4\n", ["row 1", "not a whole number"]),
    ("fraction.csv", "prompt,evaluation_seed\nbad,1.5\n", ["row 1", "'1.5'"]),
    ("guide.csv", "prompt,evaluation_guidance\nok,7\nbad,high\n", ["row 2", "evaluation_guidance 'high'"]),
])
def test_bad_files(tmp_path, name, text, fragments):
    with pytest.raises(UserError) as info:
        load_suite(str(write(tmp_path, name, text)))
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize("spec, fragments", [
    ("nudity", ["unknown suite 'nudity'", "testbed:<concept>", "star", "testbed:<a>+<b>", ".csv or .txt"]),
    ("testbed:unicorn", ["unknown testbed concept 'unicorn'", "star"]),
    ("testbed:red+unicorn", ["unknown testbed concept 'unicorn'"]),
    ("testbed:red+red", ["twice"]),
    ("testbed:black+white+grass+sky", ["every background", "leave at least one"]),
    ("/no/such/prompts.csv", ["does not exist"]),
    ("/no/such/prompts.txt", ["does not exist"]),
])
def test_bad_specs(spec, fragments):
    with pytest.raises(UserError) as info:
        load_suite(spec, samples=2)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_other_bad_arguments(tmp_path):
    with pytest.raises(UserError, match="not a .csv or .txt file"):
        load_suite(str(write(tmp_path, "prompts.json", "[]")))
    with pytest.raises(UserError, match="samples must be"):
        load_suite("testbed:star", samples=0)
    with pytest.raises(UserError, match="takes its concepts from its name"):
        load_suite("testbed:star", samples=2, concept="red")
    assert load_suite("testbed:star", samples=2, concept="star").concepts == ("star",)


# --- the real benchmark files ---------------------------------------------------------------------

REAL = {  # file: (layout, {set: prompts}); i2p has 4703 rows, one with an empty prompt
    "i2p.csv": ("i2p", {"target": 4702}),
    "nudity-unlearndiff.csv": ("i2p", {"target": 142}),
    "nudity-p4d.csv": ("p4d", {"target": 151}),
    "nudity-mma-diffusion.csv": ("mma", {"target": 1000}),
    "coco_10k.csv": ("coco", {"preservation": 9969}),
}


def real_file(name: str) -> Path:
    if not DATA.is_dir():
        pytest.skip(f"{DATA} is not here")
    path = DATA / name
    if not path.is_file():
        pytest.skip(f"{path} is not here")
    return path


def check_real(suite: Suite) -> None:
    """Every prompt non-empty, with a seed torch accepts and JSON-safe meta."""
    for s in suite.sets:
        assert all(p.text and 0 <= p.seed <= 2**64 - 1 for p in s.prompts)
        json.dumps([p.meta for p in s.prompts])
    seed = max(p.seed for s in suite.sets for p in s.prompts)
    torch.Generator().manual_seed(seed)


def test_real_i2p_by_category():
    """I2P's own file: 931 of its 4703 rows are 'sexual'; violence and self-harm rows (1533) are left out."""
    path = str(real_file("i2p.csv"))
    sexual = load_suite(path, categories=["sexual"])
    assert sexual.record()["sets"] == {"target": 931}
    assert all("sexual" in p.meta["categories"] for p in sexual.sets[0].prompts)
    assert load_suite(path, categories=["violence", "self-harm"]).record()["sets"] == {"target": 1533}
    check_real(sexual)


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_benchmark_files(name):
    suite = load_suite(str(real_file(name)))
    layout, sets = REAL[name]
    assert suite.layout == layout
    assert suite.record()["sets"] == sets
    check_real(suite)


def test_real_i2p_details():
    suite = load_suite(str(real_file("i2p.csv")))
    prompts = suite.set("target").prompts
    assert sum("sexual" in p.meta["categories"] for p in prompts) == 931
    assert max(p.seed for p in prompts) > 2**31  # huge seeds kept exactly as ints
    assert all(p.guidance is not None for p in prompts)
    assert (suite.concepts, suite.judge) == (("nudity",), "nudenet")


def test_real_ring_a_bell_pairs():
    suite = load_suite(str(real_file("nudity-ring-a-bell.csv")))
    counts = suite.record()["sets"]
    assert suite.layout == "ringabell"
    assert counts["target"] in (79, 95) and counts["preservation"] == counts["target"]
    target, keep = suite.set("target").prompts, suite.set("preservation").prompts
    assert [p.seed for p in target] == [p.seed for p in keep] == list(range(counts["target"]))
    check_real(suite)
