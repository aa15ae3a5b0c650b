"""Offline synthetic training data: random formulas in the LaTeX_OCR token style, rendered with mathtext.

The formulas come from a small depth-limited grammar over the constructs the dataset uses most (scripts,
fractions, roots, big operators, brackets, Greek letters, named functions) and are written the way the
dataset writes them: tokens separated by single spaces, every script and argument braced (`x ^ { 2 }`).
Sample i is drawn from its own generator seeded by (seed, i): it depends on the samples before it (which it
must not repeat) but not on how many are asked for, so 64 samples are the start of 128 with the same seed.
"""

import itertools
import random
from collections.abc import Iterator

from PIL import Image

from latexocr.render import render_mathtext

MAX_DEPTH = 3  # nesting of fractions, roots, brackets, sums and integrals inside one another
MAX_TOKENS = 150  # the longest formula in the dataset; longer draws are redrawn
MAX_REDRAWS = 1000  # attempts to find a formula not yet produced in this call

LATIN = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
GREEK = (
    r"\alpha \beta \gamma \delta \epsilon \varepsilon \zeta \eta \theta \kappa \lambda \mu \nu \xi \pi \rho"
    r" \sigma \tau \phi \varphi \chi \psi \omega \Gamma \Delta \Theta \Lambda \Xi \Pi \Sigma \Phi \Psi \Omega"
).split()
INDICES = r"i j k l m n a b \mu \nu \alpha \beta 0 1 2".split()
VARIABLES = r"x y z t r s k \tau \theta \phi".split()  # what is integrated over or differentiated by
SYMBOLS = r"\partial \hbar \ell \nabla".split()
FUNCTIONS = "exp ln sin cos log tanh sinh cosh tan det".split()
ACCENTS = r"\bar \hat \tilde \vec \dot \overline \widetilde".split()
BINARY = r"+ - + - + - \cdot \times \pm".split()  # repeated entries weight + and - like the dataset
RELATIONS = r"= = = = \equiv \approx \sim \leq \geq \neq \to \propto <".split()
BRACKETS = [
    ("(", ")"), (r"\left(", r"\right)"), ("[", "]"), (r"\left[", r"\right]"), (r"\left\{", r"\right\}"),
]


def random_formula(rng: random.Random) -> str:
    """One to three sides joined by relations, sometimes a second clause, often a final full stop or comma."""
    while True:
        tokens = _expression(rng, 0)
        for _ in range(rng.choices([0, 1, 2], weights=[1, 7, 2])[0]):
            tokens += [rng.choice(RELATIONS), *_expression(rng, 0)]
        if rng.random() < 0.1:
            tokens += [",", rng.choice([r"\quad", r"\qquad"]), *_scripted(rng), "=", *_expression(rng, 1)]
        tokens += rng.choices([[], ["."], [","]], weights=[4, 4, 2])[0]
        if len(tokens) <= MAX_TOKENS:
            return " ".join(tokens)


def _expression(rng: random.Random, depth: int) -> list[str]:
    """Terms joined by binary operators; fewer terms deeper down so that nesting stays readable."""
    tokens = ["-"] if rng.random() < 0.1 else []
    for k in range(1 + min(int(rng.expovariate(1.0 + depth)), 3)):
        if k:
            tokens.append(rng.choice(BINARY))
        tokens += _term(rng, depth)
    return tokens


def _term(rng: random.Random, depth: int) -> list[str]:
    """A product written by juxtaposition, e.g. `2 \\pi r ^ { 2 }`."""
    tokens = _number(rng) if rng.random() < 0.1 else []
    for _ in range(rng.choices([1, 2, 3], weights=[8, 3, 1])[0]):
        tokens += _factor(rng, depth)
    return tokens


def _factor(rng: random.Random, depth: int) -> list[str]:
    """A scripted atom, or (less often the deeper it sits) a fraction, root, bracket, sum, integral..."""
    if depth >= MAX_DEPTH or rng.random() > 0.3 / (1 + depth):
        return _scripted(rng)
    inner = depth + 1
    kinds = ["frac", "bracket", "sqrt", "bigop", "function", "derivative"]
    kind = rng.choices(kinds, weights=[4, 3, 1, 1, 1, 1])[0]
    if kind == "frac":
        numerator = _number(rng) if rng.random() < 0.3 else _expression(rng, inner)
        return [r"\frac", "{", *numerator, "}", "{", *_expression(rng, inner), "}"]
    if kind == "bracket":
        left, right = rng.choice(BRACKETS)
        tokens = [left, *_expression(rng, inner), right]
        return tokens + _script(rng, "^") if rng.random() < 0.3 else tokens
    if kind == "sqrt":
        return [r"\sqrt", "{", *_expression(rng, inner), "}"]
    if kind == "bigop":
        return _big_operator(rng, inner)
    if kind == "function":
        name = rng.choice(FUNCTIONS)
        return [r"\operatorname", "{", *name, "}", r"\left(", *_expression(rng, inner), r"\right)"]
    if rng.random() < 0.5:
        return [r"\partial", "_", "{", rng.choice(INDICES), "}", *_scripted(rng)]
    d = rng.choice(["d", r"\partial"])
    return [r"\frac", "{", d, *_atom(rng), "}", "{", d, rng.choice(VARIABLES), "}"]


def _big_operator(rng: random.Random, depth: int) -> list[str]:
    """`\\sum _ { i = 1 } ^ { N } a _ { i }` or `\\int _ { 0 } ^ { \\infty } f ( x ) d x`."""
    if rng.random() < 0.5:
        index = rng.choice("ijkn")
        limits = ["_", "{", index, "=", rng.choice("01"), "}", "^", "{", rng.choice(["N", "M", r"\infty"]), "}"]
        return [rng.choice([r"\sum", r"\sum", r"\prod"]), *limits, *_term(rng, depth)]
    tokens = [r"\int"]
    if rng.random() < 0.7:
        lower = rng.choice([["0"], ["-", r"\infty"], ["a"], ["1"], [r"\Sigma"]])
        upper = rng.choice([[r"\infty"], ["1"], ["b"], ["t"], [r"\Lambda"]])
        tokens += ["_", "{", *lower, "}", "^", "{", *upper, "}"]
    return tokens + _term(rng, depth) + ["d", rng.choice(VARIABLES)]


def _scripted(rng: random.Random) -> list[str]:
    """An atom with an optional subscript and superscript (`\\phi _ { \\mu } ^ { 2 }`)."""
    tokens = _atom(rng)
    if rng.random() < 0.35:
        tokens += _script(rng, "_")
    if rng.random() < 0.25 and "^" not in tokens:  # a primed atom already has its superscript
        tokens += _script(rng, "^")
    return tokens


def _script(rng: random.Random, mark: str) -> list[str]:
    if mark == "^":
        body = rng.choice([["2"], ["2"], ["3"], ["n"], [r"\prime"], [r"\dagger"], ["*"], ["-", "1"], [r"\mu"]])
    else:
        body = [rng.choice(INDICES) for _ in range(rng.choice([1, 1, 1, 2]))]
        if rng.random() < 0.1:
            body += [rng.choice(["+", "-"]), rng.choice(["1", "2", "n"])]
    return [mark, "{", *body, "}"]


def _atom(rng: random.Random) -> list[str]:
    kinds = ["latin", "greek", "symbol", "accent", "prime", "cal"]
    kind = rng.choices(kinds, weights=[10, 6, 1, 2, 1, 1])[0]
    if kind == "greek":
        return [rng.choice(GREEK)]
    if kind == "symbol":
        return [rng.choice(SYMBOLS)]
    if kind == "accent":
        return [rng.choice(ACCENTS), "{", rng.choice(LATIN + GREEK), "}"]
    if kind == "prime":
        return [rng.choice(LATIN), "^", "{", r"\prime", "}"]
    if kind == "cal":
        return ["{", r"\cal", rng.choice(LATIN[26:]), "}"]
    return [rng.choice(LATIN)]


def _number(rng: random.Random) -> list[str]:
    """Digits are separate tokens in the dataset: `1 2 8`, `0 . 5`."""
    more = rng.choice([0, 0, 0, 1, 2])
    digits = [rng.choice("123456789")] + [rng.choice("0123456789") for _ in range(more)]
    return digits + [".", rng.choice("0123456789")] if rng.random() < 0.1 else digits


def synthetic_texts(seed: int | str) -> Iterator[str]:
    """Distinct formulas without end; the same seed gives the same sequence."""
    seen: set[str] = set()
    for i in itertools.count():
        # A string seed is hashed the same way in every process, unlike a tuple's hash.
        rng = random.Random(f"synth-{seed}-{i}")
        for _ in range(MAX_REDRAWS):
            text = random_formula(rng)
            if text not in seen:
                break
        else:
            raise RuntimeError(f"no unseen formula after {MAX_REDRAWS} draws for sample {i}")
        seen.add(text)
        yield text


def synthetic_samples(n: int, seed: int) -> Iterator[tuple[Image.Image, str]]:
    """n distinct (image, formula) pairs; the same seed gives the same texts and pixels."""
    for text in itertools.islice(synthetic_texts(seed), n):
        yield render_mathtext(text), text
