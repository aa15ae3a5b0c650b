"""Metrics on hand-checked examples and on the real validation formulas when they are present."""

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latexocr.metrics import (
    edit_distance,
    format_table,
    images_match,
    normalize,
    render_scores,
    sample_scores,
    score,
    tokenize,
)

REAL_FORMULAS = Path(__file__).resolve().parents[2] / "shared" / "data" / "latex_ocr_val_formulas.txt"


def test_tokens_follow_dataset_style():
    assert tokenize(r"\frac{a}{b}+x^{2}") == r"\frac { a } { b } + x ^ { 2 }".split()
    assert tokenize("xy12") == ["x", "y", "1", "2"]
    assert tokenize(r"\alpha\beta") == [r"\alpha", r"\beta"]
    assert tokenize(r"a \\ b") == ["a", "\\\\", "b"]
    assert tokenize(r"\operatorname*{max}")[0] == r"\operatorname*"


def test_delimiters_and_environments_are_single_tokens():
    assert tokenize(r"\left(x\right)") == [r"\left(", "x", r"\right)"]
    assert tokenize(r"\left \{ x \right.") == [r"\left\{", "x", r"\right."]
    assert tokenize(r"\left\langle x\right\rangle") == [r"\left\langle", "x", r"\right\rangle"]
    assert tokenize(r"\leftarrow") == [r"\leftarrow"]
    assert tokenize(r"\begin{array}{cc}a\end{array}") == [
        r"\begin{array}", "{", "c", "c", "}", "a", r"\end{array}"
    ]
    assert tokenize(r"\begin {matrix*}") == [r"\begin{matrix*}"]
    # The dataset writes \big( as two tokens, `\big (`.
    assert tokenize(r"\big(") == [r"\big", "("]


def test_control_space_matches_dataset_spelling():
    # The dataset writes `\ ` as "\" plus the separating space.
    assert tokenize(r"a \ b") == ["a", "\\", "b"]
    assert tokenize("a \\") == ["a", "\\"]


def test_whitespace_insensitive_and_idempotent():
    assert normalize("x^{2}") == normalize("x ^ { 2 }") == normalize(" x\t^ {\n2 } ")
    assert normalize(r"\left( \frac{1}{2} \right)") == normalize(r"\left(\frac{1}{2}\right)")
    for latex in [r"\left(\begin{array}{c}x\\y\end{array}\right)", r"a\ b\,c\;d", r"\sqrt[3]{x}", "x--y"]:
        once = tokenize(latex)
        assert tokenize(" ".join(once)) == once


def test_identical_is_perfect():
    formula = r"\frac { a } { b } + x ^ { 2 }"
    metrics = score([formula, "x"], [r"\frac{a}{b}+x^{2}", "x"])
    assert metrics == {"n": 2, "exact_match": 1.0, "edit_distance": 0.0, "bleu": pytest.approx(1.0)}
    assert sample_scores("x", "x") == {"exact_match": 1, "edit_distance": 0.0, "bleu": pytest.approx(1.0)}


def test_one_substitution_in_ten_tokens():
    reference = r"\alpha+\beta=\gamma-\delta+12"
    prediction = r"\alpha+\beta=\gamma-\epsilon+12"
    assert len(tokenize(reference)) == 10
    assert edit_distance(tokenize(prediction), tokenize(reference)) == pytest.approx(0.1)
    assert score([prediction], [reference])["edit_distance"] == pytest.approx(0.1)
    assert sample_scores(prediction, reference)["exact_match"] == 0


def test_bleu_by_hand():
    # Against `a + b = c`: `a + b = d` matches 4/5 unigrams, 3/4 bigrams, 2/3 trigrams, 1/2 4-grams.
    assert sample_scores("a+b=d", "a+b=c")["bleu"] == pytest.approx((4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25)
    # `a + b =` matches every n-gram but is one token short: brevity penalty exp(1 - 5/4).
    assert sample_scores("a+b=", "a+b=c")["bleu"] == pytest.approx(math.exp(1 - 5 / 4))
    # The corpus pools the n-gram counts of both before taking precisions: 8/9, 6/7, 4/5, 2/3.
    corpus = score(["a+b=d", "a+b="], ["a+b=c", "a+b=c"])["bleu"]
    assert corpus == pytest.approx(math.exp(1 - 10 / 9) * (8 / 9 * 6 / 7 * 4 / 5 * 2 / 3) ** 0.25)


def test_empty_prediction_is_a_miss_not_a_crash():
    assert sample_scores("", r"x ^ { 2 }") == {"exact_match": 0, "edit_distance": 1.0, "bleu": 0.0}
    metrics = score(["", "x"], ["y", "x"])
    assert metrics["edit_distance"] == pytest.approx(0.5)
    assert metrics["exact_match"] == pytest.approx(0.5)
    assert score([], [])["n"] == 0


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="one prediction per reference"):
        score(["x"], ["x", "y"])


def test_format_table_aligns_values():
    table = format_table({"n": 3, "exact_match": 0.5, "renderer": "mathtext"})
    assert table.splitlines() == [
        "n                     3",
        "exact_match      0.5000",
        "renderer       mathtext",
    ]


def _canvas(block: tuple[int, int], at: tuple[int, int], size=(40, 60)) -> np.ndarray:
    """White canvas with a black rectangle of `block` (rows, cols) at `at` (row, col)."""
    pixels = np.full(size, 255, dtype=np.uint8)
    pixels[at[0] : at[0] + block[0], at[1] : at[1] + block[1]] = 0
    return pixels


def test_images_match_ignores_margins_and_a_stray_pixel():
    glyph = Image.fromarray(_canvas((20, 20), (5, 5)))
    assert images_match(glyph, Image.fromarray(_canvas((20, 20), (15, 30), size=(50, 80)))) is True
    flipped = _canvas((20, 20), (5, 5))
    flipped[10, 10] = 255
    assert images_match(glyph, Image.fromarray(flipped))
    assert not images_match(glyph, Image.fromarray(_canvas((20, 21), (5, 5))))
    half = _canvas((20, 20), (5, 5))
    half[5:15, 5:15] = 255
    assert not images_match(glyph, Image.fromarray(half))
    blank = Image.fromarray(np.full((10, 10), 255, dtype=np.uint8))
    assert images_match(blank, blank.convert("RGB"))


def test_render_scores_with_stub_renderer():
    pictures = {
        "a": _canvas((10, 10), (0, 0)),
        "b": _canvas((10, 30), (0, 0)),
        "c": _canvas((10, 30), (20, 20)),  # same ink as "b", other margins
    }

    def render(latex: str) -> Image.Image:
        if latex not in pictures:
            raise ValueError(f"cannot render {latex!r}")
        return Image.fromarray(pictures[latex])

    predictions = ["a", "c", "broken", "a"]
    references = ["a", "b", "b", "unrenderable"]
    assert render_scores(predictions, references, render) == {"render_match": 0.5, "render_rate": 0.75}


def test_score_renders_with_the_real_renderer():
    pytest.importorskip("latexocr.render")
    metrics = score(["x^{2}", "x^{3}"], [r"x ^ { 2 }", r"x ^ { 2 }"], render=True)
    assert metrics["render_match"] == 0.5
    assert metrics["render_rate"] == 1.0
    assert metrics["renderer"] in ("latex", "mathtext")


@pytest.fixture(scope="module")
def real_formulas() -> list[str]:
    if not REAL_FORMULAS.exists():
        pytest.skip(f"{REAL_FORMULAS} not present")
    return REAL_FORMULAS.read_text().splitlines()


def test_real_formulas_normalize_idempotently(real_formulas):
    for formula in real_formulas:
        once = normalize(formula)
        assert normalize(once) == once, formula


def test_real_formulas_keep_their_tokens(real_formulas):
    # The misses are `--` (split on purpose) and `[object Object]`, a preprocessing artifact.
    kept = sum(tokenize(formula) == formula.split() for formula in real_formulas)
    assert kept / len(real_formulas) >= 0.99


def test_real_formulas_score_perfectly_against_themselves(real_formulas):
    metrics = score(real_formulas, real_formulas)
    assert metrics["n"] == len(real_formulas)
    assert metrics["exact_match"] == 1.0
    assert metrics["edit_distance"] == 0.0
    assert metrics["bleu"] == pytest.approx(1.0)
