"""The synthetic source and the renderer: reproducible, well-formed, dataset-like images, clear failures."""

import random
import re
from pathlib import Path

import numpy as np
import pytest

from latexocr import synth
from latexocr.render import MARGIN_PX, available_backend, render, render_latex, render_mathtext
from latexocr.synth import random_formula, synthetic_samples

REAL_FORMULAS = Path(__file__).resolve().parents[2] / "shared" / "data" / "latex_ocr_val_formulas.txt"


def texts(n: int, seed: int) -> list[str]:
    return [text for _, text in synthetic_samples(n, seed)]


def test_same_seed_gives_same_texts_and_pixels():
    first, second = list(synthetic_samples(12, seed=3)), list(synthetic_samples(12, seed=3))
    assert [t for _, t in first] == [t for _, t in second]
    assert [im.tobytes() for im, _ in first] == [im.tobytes() for im, _ in second]


def test_different_seeds_give_different_texts():
    assert not set(texts(12, seed=3)) & set(texts(12, seed=4))


def test_first_samples_do_not_depend_on_how_many_are_asked_for():
    assert texts(8, seed=5) == texts(20, seed=5)[:8]


def test_texts_are_distinct(monkeypatch):
    # The real grammar rarely repeats itself within a few thousand draws; one of ten formulas repeats at once.
    monkeypatch.setattr(synth, "render_mathtext", lambda text: None)
    monkeypatch.setattr(synth, "random_formula", lambda rng: rng.choice("abcdefghij"))
    assert sorted(texts(10, seed=0)) == list("abcdefghij")
    with pytest.raises(RuntimeError, match="no unseen formula"):
        texts(11, seed=0)


def test_texts_are_in_the_dataset_token_style():
    for text in (random_formula(random.Random(i)) for i in range(500)):
        tokens = text.split(" ")
        assert all(tokens), f"empty token (double or edge space) in {text!r}"
        # Braces are tokens of their own; `\{` and `\left\{` are printed braces, not grouping.
        assert all(t in ("{", "}") or not re.search(r"(?<!\\)[{}]", t) for t in tokens), text
        depth = 0
        for token in tokens:
            depth += (token == "{") - (token == "}")
            assert depth >= 0, f"unbalanced braces in {text!r}"
        assert depth == 0, f"unbalanced braces in {text!r}"


def test_formula_lengths_vary_like_the_dataset():
    lengths = sorted(len(random_formula(random.Random(i)).split()) for i in range(1000))
    assert 20 <= lengths[500] <= 45
    assert lengths[50] < 15 and lengths[950] > 70 and lengths[-1] <= synth.MAX_TOKENS


def test_images_are_black_on_white_and_tightly_cropped():
    for image, text in synthetic_samples(24, seed=1):
        assert image.mode == "RGB"
        pixels = np.asarray(image.convert("L"))
        assert (pixels == 255).mean() > 0.5 and pixels.min() < 64, text
        # MARGIN_PX of white on every side, and the ink reaches right up to that margin.
        for axis in (0, 1):
            inked = np.nonzero((pixels < 255).any(axis=1 - axis))[0]
            size = pixels.shape[axis]
            assert MARGIN_PX <= inked[0] <= MARGIN_PX + 1, text
            assert size - MARGIN_PX - 2 <= inked[-1] <= size - MARGIN_PX - 1, text


def test_dataset_spacing_keeps_scripts_and_delimiter_sizes():
    # mathtext ignores a script whose `^` is followed by a space, and shrinks \left( around short content.
    assert render_mathtext("x ^ { 2 }").height > render_mathtext("x 2").height
    assert render_mathtext(r"\left( x \right)").height >= render_mathtext("( x )").height


@pytest.mark.parametrize("formula", [r"\frac { a }", r"\notacommand x", r"x ^ { 2", ""])
def test_bad_formula_raises_value_error_naming_it(formula):
    with pytest.raises(ValueError, match=re.escape(repr(formula))):
        render(formula, backend="mathtext")


@pytest.mark.skipif(available_backend() != "latex", reason="latex and dvipng are not installed")
def test_latex_backend_renders_and_reports_errors():
    pixels = np.asarray(render_latex(r"\frac { a } { b } + x ^ { 2 }").convert("L"))
    assert pixels.min() < 64 and (pixels[:MARGIN_PX] == 255).all() and (pixels[MARGIN_PX] < 255).any()
    with pytest.raises(ValueError, match=re.escape(repr(r"\frac { a"))):
        render_latex(r"\frac { a")


def test_mathtext_renders_most_real_formulas():
    if not REAL_FORMULAS.exists():
        pytest.skip(f"{REAL_FORMULAS} is absent")
    formulas = random.Random(0).sample(REAL_FORMULAS.read_text().splitlines(), 300)
    rendered = 0
    for formula in formulas:
        try:
            render_mathtext(formula)
            rendered += 1
        except ValueError:
            pass
    assert rendered / len(formulas) >= 0.8
