"""Hypothesis strategies for model output: tag soup, ViRFT box lists, LISA boxes, adversarial text.

Every test runs derandomized without a database, so CI sees the same examples on every run.
"""
from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st


def examples(n: int) -> settings:
    """Reproducible settings for a property test of `n` examples."""
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


TAGS = ["<answer>", "</answer>", "<think>", "</think>"]
FRAGMENTS = TAGS + [
    "\n", " ", "\t", "a", "<", ">", "/", "answer", "[", "]", "{", "}", "},", "(", ")", ",", "'", '"', "1", "No Objects",
]

# Strings made of tags and the characters that trip tag and list readers.
tag_soup = st.lists(st.sampled_from(FRAGMENTS), max_size=24).map("".join)

# Numbers as a model (or an adversary) writes them; ints stay below 2**53, where float64 is exact.
number_text = st.one_of(
    st.integers(-5, 1100).map(str),
    st.floats(-5, 1100, allow_nan=False).map(lambda v: f"{v:.2f}"),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-0", "0.5", "1", "0", "true", "null", '"0.9"', "1.0"]),
    st.integers(-(2**53), 2**53).map(str),
)

_CONFIDENCES = ["0.9", "0.5", "0.3", "1", "0", "0.9", "0.75", "NaN", "1.5", "-0.2", "Infinity", "true"]
_quote = st.sampled_from(["'", '"'])


@st.composite
def box_entry(draw) -> str:
    """One `{'Position': [...], 'Confidence': c}`, sometimes malformed."""
    q = draw(_quote)
    coords = draw(st.lists(number_text, min_size=3, max_size=5))
    if draw(st.integers(0, 9)) > 1:
        coords = (coords + ["0", "0", "0", "0"])[:4]
    position = f"{q}Position{q}: [{', '.join(coords)}]"
    confidence = f"{q}Confidence{q}: {draw(number_text)}"
    fields = [position, confidence]
    if draw(st.integers(0, 9)) == 0:
        fields.reverse()
    if draw(st.integers(0, 19)) == 0:
        fields.pop(draw(st.integers(0, 1)))
    return "{" + ", ".join(fields) + "}"


@st.composite
def realistic_entry(draw) -> str:
    """A well-formed box near a small grid, so predictions often match ground truth."""
    x1 = draw(st.sampled_from([0, 10, 100, 400]))
    y1 = draw(st.sampled_from([0, 20, 100, 500]))
    x2 = x1 + draw(st.sampled_from([0, 50, 90, 100, 300, 600]))
    y2 = y1 + draw(st.sampled_from([0, 50, 90, 100, 300, 500]))
    conf = draw(st.sampled_from(_CONFIDENCES))
    return f"{{'Position': [{x1}, {y1}, {x2}, {y2}], 'Confidence': {conf}}}"


@st.composite
def gt_positions(draw) -> list[tuple[int, int, int, int]]:
    positions = []
    for _ in range(draw(st.integers(0, 3))):
        x1 = draw(st.sampled_from([0, 10, 100, 400]))
        y1 = draw(st.sampled_from([0, 20, 100, 500]))
        x2 = x1 + draw(st.sampled_from([50, 100, 300, 600]))
        y2 = y1 + draw(st.sampled_from([50, 100, 300, 500]))
        positions.append((x1, y1, x2, y2))
    return positions


@st.composite
def near_entry(draw, positions) -> str:
    """A prediction close to one of the gt boxes: matches, or nearly, at IoU around 0.5."""
    x1, y1, x2, y2 = draw(st.sampled_from(positions))
    jitter = st.sampled_from([0, 0, 1, -1, 5, 20, -20, 0.5, 40])
    x1, y1, x2, y2 = x1 + draw(jitter), y1 + draw(jitter), x2 + draw(jitter), y2 + draw(jitter)
    return f"{{'Position': [{x1}, {y1}, {x2}, {y2}], 'Confidence': {draw(st.sampled_from(_CONFIDENCES))}}}"


@st.composite
def box_list_text(draw, positions=()) -> str:
    kinds = [realistic_entry(), box_entry()] + ([near_entry(positions)] * 3 if positions else [])
    entries = draw(st.lists(st.one_of(*kinds), max_size=6))
    if entries and draw(st.booleans()):
        entries.append(entries[draw(st.integers(0, len(entries) - 1))])  # an exact duplicate
    body = "[" + ", ".join(entries) + "]"
    variant = draw(st.integers(0, 9))
    if variant == 0:
        body = body[: draw(st.integers(0, len(body)))]  # truncated
    elif variant == 1:
        body = "[" + body + "]"
    elif variant == 2:
        body = body.replace(", ", ",\n")
    return body


@st.composite
def detection_completion(draw, positions=()) -> str:
    body = draw(box_list_text(positions))
    head = draw(st.sampled_from(
        ["<think> boxes </think> <answer>", "<answer>", "<think>\n</think><answer>\n", "", "<answer> "]))
    tail = draw(st.sampled_from(["</answer>", "</answer>\n", "", " </answer>", "</answer><answer>[]</answer>"]))
    return draw(st.sampled_from(["", "", "\n", "x"])) + head + body + tail


def solution_text(positions) -> str:
    boxes = [f"{{'Position': [{x1}, {y1}, {x2}, {y2}], 'Confidence': 1}}" for x1, y1, x2, y2 in positions]
    return "<answer>[" + ", ".join(boxes) + "]</answer>"


@st.composite
def detection_pair(draw) -> tuple[str, str]:
    """(completion, solution), the completion often predicting boxes near the solution's."""
    positions = draw(gt_positions())
    return draw(detection_completion(positions)), solution_text(positions)


_digits = st.one_of(
    st.integers(0, 1100).map(str),
    st.sampled_from(["٣", "0010", "9" * 320, "1" * 4400]),
)


@st.composite
def point_pair(draw) -> str:
    a, b, c, d = (draw(_digits) for _ in range(4))
    sep = draw(st.sampled_from(["", " ", "\n"]))
    return f"({a},{sep}{b}),{sep}({c},{d})"


@st.composite
def grounding_completion(draw) -> str:
    parts = draw(st.lists(st.one_of(point_pair(), st.sampled_from(["", " and ", "\n", "(1,2)", "box"])), max_size=4))
    head = draw(st.sampled_from(["<think>t</think><answer>", "<answer>", "", "<answer>\n"]))
    tail = draw(st.sampled_from(["</answer>", "", "\n</answer>"]))
    return head + "".join(parts) + tail


# Anything at all: unicode, control characters, tags, long numbers.
any_text = st.one_of(
    st.text(max_size=200),
    tag_soup,
    detection_completion(),
    grounding_completion(),
    st.lists(st.one_of(st.text(max_size=8), st.sampled_from(FRAGMENTS), number_text), max_size=30).map("".join),
)
