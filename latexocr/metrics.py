"""Scores for predicted LaTeX against reference LaTeX, im2latex style.

All text scores compare normalized token sequences, so `x^{2}` and `x ^ { 2 }` are the same answer:

    exact_match    share of samples whose token sequences are identical (0..1, higher is better)
    edit_distance  mean token Levenshtein distance divided by the longer length (0..1, lower is better)
    bleu           corpus BLEU-4 on the tokens (0..1, higher is better)
    render_match   share of samples whose prediction and reference render to the same picture (optional)

The tokenizer follows the LaTeX_OCR dataset's normalized formulas (space-separated tokens such as
`\\frac { a } { b }`): commands, `\\left(`-style delimiters and `\\begin{array}`-style environment
markers are single tokens; letters and digits are one token per character. Unlike the dataset,
`--` is two `-` tokens: in math mode it draws two minus signs, the same as `- -`.

    from latexocr.metrics import score, format_table
    print(format_table(score(predictions, references)))
"""

import re
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image
from rapidfuzz.distance import Levenshtein
from sacrebleu.metrics import BLEU

_TOKEN = re.compile(
    r"""\\(?:begin|end)\s*\{\s*[a-zA-Z]+\*?\s*\}                      # \begin{array}
      | \\(?:left|right)(?![a-zA-Z])\s*(?:\\[a-zA-Z]+|\\.|[^\s\\])  # \left( \right\} \left.
      | \\operatorname(?![a-zA-Z])\s*\*                               # \operatorname*
      | \\[a-zA-Z]+                                                   # \alpha \frac
      | \\(?:.|\s|$)                                                  # \\ \{ \, and control space
      | \S                                                            # anything else, one character
    """,
    re.VERBOSE,
)

# BLEU over the normalized tokens, already split. effective_order only drops n-gram orders the
# prediction has none of (formulas shorter than 4 tokens), so a corpus with 4-grams gets standard
# BLEU-4 and an identical 3-token formula still scores 1. Orders present but unmatched get sacrebleu's
# default "exp" (NIST) smoothing. force=True: the text is tokenized on purpose, so sacrebleu's
# warning about tokenized periods does not apply.
_BLEU = BLEU(tokenize="none", effective_order=True, force=True)


def tokenize(latex: str) -> list[str]:
    """Split LaTeX into normalized tokens; whitespace between tokens does not matter."""
    tokens = []
    for match in _TOKEN.finditer(latex):
        # Dropping inner whitespace also writes a control space (`\ `) as "\" followed by the
        # separating space, as in the dataset.
        tokens.append("".join(match.group().split()))
    return tokens


def normalize(latex: str) -> str:
    """The canonical spelling of a formula: its tokens joined by single spaces."""
    return " ".join(tokenize(latex))


def edit_distance(pred_tokens: Sequence[str], ref_tokens: Sequence[str]) -> float:
    """Token Levenshtein distance divided by the longer length: 0 identical, 1 nothing shared."""
    return Levenshtein.normalized_distance(pred_tokens, ref_tokens)


def sample_scores(prediction: str, reference: str) -> dict:
    """Scores of one prediction, for per-sample output such as predictions.jsonl."""
    pred_tokens, ref_tokens = tokenize(prediction), tokenize(reference)
    return {
        "exact_match": int(pred_tokens == ref_tokens),
        "edit_distance": edit_distance(pred_tokens, ref_tokens),
        "bleu": _BLEU.sentence_score(" ".join(pred_tokens), [" ".join(ref_tokens)]).score / 100,
    }


def score(predictions: list[str], references: list[str], render: bool = False) -> dict:
    """Corpus scores; with render=True also render_match, render_rate and renderer."""
    if len(predictions) != len(references):
        raise ValueError(
            f"score() needs one prediction per reference, got {len(predictions)} predictions "
            f"and {len(references)} references"
        )
    preds = [normalize(p) for p in predictions]
    refs = [normalize(r) for r in references]
    n = len(refs)
    metrics = {
        "n": n,
        "exact_match": sum(p == r for p, r in zip(preds, refs)) / n if n else 0.0,
        "edit_distance": (
            sum(edit_distance(p.split(), r.split()) for p, r in zip(preds, refs)) / n if n else 0.0
        ),
        "bleu": _BLEU.corpus_score(preds, [refs]).score / 100 if n else 0.0,
    }
    if render:
        from latexocr.render import available_backend
        from latexocr.render import render as render_latex

        backend = available_backend()
        metrics.update(
            render_scores(predictions, references, lambda latex: render_latex(latex, backend=backend))
        )
        metrics["renderer"] = backend
    return metrics


def render_matches(
    predictions: list[str], references: list[str], render: Callable[[str], Image.Image]
) -> list[bool | None]:
    """Per sample: True when the prediction renders like the reference, False when not (or when the
    prediction does not render), None when the reference itself cannot be rendered.
    `render` raises ValueError when it cannot render."""
    results: list[bool | None] = []
    for prediction, reference in zip(predictions, references, strict=True):
        # Render the normalized spelling: it is valid LaTeX and what the mathtext backend expects.
        prediction, reference = normalize(prediction), normalize(reference)
        try:
            ref_image = render(reference)
        except ValueError:
            results.append(None)
            continue
        if prediction == reference:
            results.append(True)  # same tokens draw the same picture; skip the second render
            continue
        try:
            results.append(images_match(render(prediction), ref_image))
        except ValueError:
            results.append(False)  # a prediction that does not render is a miss
    return results


def render_scores(
    predictions: list[str], references: list[str], render: Callable[[str], Image.Image]
) -> dict:
    """render_match (share of all samples rendering like their reference, so at most render_rate)
    and render_rate (share of references that render)."""
    return summarize_render_matches(render_matches(predictions, references, render))


def summarize_render_matches(matches: list[bool | None]) -> dict:
    n = len(matches)
    return {"render_match": sum(m is True for m in matches) / n if n else 0.0,
            "render_rate": sum(m is not None for m in matches) / n if n else 0.0}


def _ink(image: Image.Image) -> np.ndarray:
    """Dark pixels as a boolean array, cropped to their bounding box (white margins ignored)."""
    ink = np.asarray(image.convert("L")) < 128
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    if rows.size == 0:
        return ink[:0, :0]
    return ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def images_match(a: Image.Image, b: Image.Image, tolerance: float = 0.01) -> bool:
    """True when both show the same ink: equal cropped size and at most `tolerance` of the inked
    pixels differing (anti-aliasing can flip a few pixels at the binarization threshold)."""
    ink_a, ink_b = _ink(a), _ink(b)
    if ink_a.shape != ink_b.shape:
        return False
    differing = np.count_nonzero(ink_a != ink_b)
    return bool(differing <= tolerance * max(np.count_nonzero(ink_a | ink_b), 1))


def format_table(metrics: dict) -> str:
    """Metrics as an aligned two-column text table, one per line."""
    width = max(len(name) for name in metrics)
    lines = []
    for name, value in metrics.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"{name:<{width}}  {shown:>10}")
    return "\n".join(lines)
