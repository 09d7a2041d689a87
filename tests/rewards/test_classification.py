"""Classification reward: the original's substring rule in paper mode, exact names in strict mode."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vrft_jax.rewards import get_reward
from vrft_jax.rewards.classification import normalize_class_name

from . import visual_rft_oracle as oracle
from .strategies import FRAGMENTS, examples


def score(mode, content, truth, **options):
    columns = options.pop("columns", {})
    return float(get_reward("classification", mode, **options)([content], [f"<answer>{truth}</answer>"], **columns)[0])


# (behaviour, completion, class name, paper, strict)
TABLE = [
    ("exact", "<think>t</think><answer>737-200</answer>", "737-200", 1.0, 1.0),
    ("case, spaces, underscores", "<answer>PINK_primrose</answer>", "pink primrose", 1.0, 1.0),
    ("wrong class", "<answer>A320</answer>", "737-200", 0.0, 0.0),
    ("surrounding spaces", "<answer>  737-200 </answer>", "737-200", 1.0, 1.0),
    # Substring rule, both ways: partial names and lists of names pass in paper mode.
    ("answer inside the name", "<answer>Boeing</answer>", "Boeing 717", 1.0, 0.0),
    ("name inside the answer", "<answer>Boeing 717 or Boeing 737</answer>", "Boeing 717", 1.0, 0.0),
    ("several names", "<answer>A320, 737-200, MD-11</answer>", "737-200", 1.0, 0.0),
    ("empty answer", "<think>t</think><answer></answer>", "737-200", 1.0, 0.0),
    ("blank answer", "<answer>  </answer>", "737-200", 1.0, 0.0),
    # No tags: the whole completion is the answer in paper mode; strict needs the tags.
    ("no tags, names it", "I think this is a 737-200.", "737-200", 1.0, 0.0),
    # Non-DOTALL: a newline inside the tags makes the whole completion the answer.
    ("newline in answer", "<think>a</think><answer>\nA320 737-200\n</answer>", "737-200", 1.0, 0.0),
    ("newline, right name", "<answer>\n737-200\n</answer>", "737-200", 1.0, 1.0),
    ("first answer counts", "<answer>A320</answer><answer>737-200</answer>", "737-200", 0.0, 0.0),
    # Strict normalisation: punctuation and Unicode forms do not matter.
    ("hyphen vs space", "<answer>737 200</answer>", "737-200", 0.0, 1.0),
    ("slash", "<answer>FA-18</answer>", "F/A-18", 0.0, 1.0),
    ("full-width letters", "<answer>Ａ３２０</answer>", "a320", 0.0, 1.0),
    ("unclosed answer", "<answer>737-200", "737-200", 1.0, 0.0),
]


@pytest.mark.parametrize("name, content, truth, paper, strict", TABLE, ids=[t[0] for t in TABLE])
def test_classification_table(name, content, truth, paper, strict):
    assert score("paper", content, truth) == paper
    assert score("strict", content, truth) == strict


def test_synonyms_option_makes_names_interchangeable():
    synonyms = {"737-200": ["Boeing 737-200", "B732"]}
    assert score("strict", "<answer>B732</answer>", "737-200") == 0.0
    assert score("strict", "<answer>B732</answer>", "737-200", synonyms=synonyms) == 1.0
    assert score("strict", "<answer>737-200</answer>", "Boeing 737-200", synonyms=synonyms) == 1.0
    assert score("strict", "<answer>A320</answer>", "737-200", synonyms=synonyms) == 0.0


def test_synonyms_column_adds_names_per_example():
    reward = get_reward("classification")
    contents = ["<answer>puss</answer>", "<answer>puss</answer>"]
    solutions = ["<answer>cat</answer>", "<answer>dog</answer>"]
    assert reward(contents, solutions).tolist() == [0.0, 0.0]
    assert reward(contents, solutions, synonyms=[["puss", "kitty"], None]).tolist() == [1.0, 0.0]
    assert reward(contents, solutions, synonyms=["puss", ""]).tolist() == [1.0, 0.0]


def test_synonyms_must_be_lists():
    with pytest.raises(ValueError, match="list of names"):
        get_reward("classification", synonyms={"cat": "puss"})


def test_long_answers_score_zero_in_strict_mode():
    padded = "<answer>" + " " * 2000 + "737-200</answer>"
    assert score("strict", padded, "737-200") == 0.0
    assert score("strict", padded, "737-200", max_answer_chars=4096) == 1.0


def test_strict_options_are_refused_in_paper_mode():
    with pytest.raises(ValueError, match="strict mode only"):
        get_reward("classification", "paper", synonyms={"a": ["b"]})


@pytest.mark.parametrize("mode", ["paper", "strict"])
@pytest.mark.parametrize("bad", ["<answer></answer>", "<answer> _ </answer>", ""])
def test_empty_class_name_in_solution_raises(mode, bad):
    with pytest.raises(ValueError, match=r"solutions\[1\]: empty class name"):
        get_reward("classification", mode)(["<answer>a</answer>"] * 2, ["<answer>a</answer>", bad])


@pytest.mark.parametrize(
    "name, key",
    [("F/A-18", "fa18"), ("Black-eyed Susan", "blackeyedsusan"), ("colt's foot", "coltsfoot"), ("Straße", "strasse")],
)
def test_normalize_class_name(name, key):
    assert normalize_class_name(name) == key


_label = st.sampled_from(["737-200", "Boeing 717", "pink primrose", "a", "A_B", "İstanbul", "ß"])
_completion = st.lists(st.one_of(st.sampled_from(FRAGMENTS), _label, st.text(max_size=5)), max_size=12).map("".join)


@examples(1000)
@given(st.lists(st.tuples(_completion, _label), min_size=1, max_size=5))
def test_paper_mode_equals_the_original(pairs):
    contents = [c for c, _ in pairs]
    solutions = [f"<answer>{label}</answer>" for _, label in pairs]
    got = get_reward("classification", "paper")(contents, solutions)
    np.testing.assert_array_equal(got, [oracle.classification(c, s) for c, s in zip(contents, solutions)])
