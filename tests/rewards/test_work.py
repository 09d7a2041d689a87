"""The work meter of the linear-work tests (tests/rewards/work.py) counts what it claims to."""
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vrft_jax.rewards import parse

from .strategies import any_text, examples, tag_soup
from .work import Meter, Metered, RegexModel, _reward_modules, measure

PATTERNS = sorted(
    {value.pattern: value for module in _reward_modules() for value in vars(module).values()
     if isinstance(value, re.Pattern)}.values(),
    key=lambda p: p.pattern,
)


def test_the_reward_modules_have_patterns_to_meter():
    assert len(PATTERNS) >= 5


@examples(200)
@given(st.one_of(tag_soup, any_text, st.text("(){}[],.: 0123456789NnoObjects'\"Position", max_size=60)))
def test_the_regex_model_finds_what_re_finds(text):
    for pattern in PATTERNS:
        model = RegexModel(pattern)
        assert list(model.spans(text, 0, len(text))) == [m.span() for m in pattern.finditer(text)], pattern
        for kind, full in (("match", False), ("fullmatch", True)):
            real = getattr(pattern, kind)(text)
            assert model.match(text, 0, len(text), full) == (real and real.span()), (pattern, kind)


def test_metered_patterns_return_res_results_and_count_steps():
    text = "x [{'Position': [1, 2, 3, 4], 'Confidence': 0.5}] (1,2),(3,4)"
    with Meter() as meter:
        found = parse.strict_predictions(Metered(text), max_boxes=5)
    assert found.xyxy == [1, 2, 3, 4] and meter.work.regex_steps > len(text)
    assert type(parse._OBJECT) is re.Pattern  # restored on exit


@pytest.mark.parametrize(
    "call, chars",
    [
        (lambda t: t.find("c"), 3),  # scanned up to and through the match
        (lambda t: t.find("z"), 10),  # the whole text
        (lambda t: t.find("c", 5), 5),
        (lambda t: t.count("a"), 10),
        (lambda t: t[2:6], 4),  # a copy of 4
        (lambda t: t.strip("a"), 1 + 1 + 9),  # one stripped, one look, the copy of 9
        (lambda t: t[1:].find("c"), 9 + 2),  # slices stay metered
        (lambda t: "<" + t, 11),
    ],
)
def test_metered_strings_charge_what_they_scan_and_copy(call, chars):
    assert measure(lambda: call(Metered("abcdefghij"))).chars == chars
