"""Render a LaTeX formula to an image like a LaTeX_OCR sample: black on white, RGB, tightly cropped.

Two backends. Real LaTeX (`latex` + `dvipng` on PATH) renders nearly every dataset formula, arrays included;
matplotlib's mathtext needs no TeX installation but knows only a subset of LaTeX (no arrays, ~95% of the
dataset's formulas), so `mathtext_source` first maps the dataset's normalized token style
(`\\frac { a } { b } + x ^ { 2 }`) onto that subset and onto LaTeX's display-style look.
Both raise ValueError, naming the formula, when they cannot render it.
"""

import functools
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from matplotlib.font_manager import FontProperties
from matplotlib.mathtext import MathTextParser
from PIL import Image

MARGIN_PX = 3  # white border kept around the ink on every side
FONTSIZE_PT = 12  # the im2latex formulas were typeset in a 12pt article
DPI = 160  # 12pt at 160 dpi: one-line formulas ~35 px high, display fractions ~60-80 px
LATEX_TIMEOUT_S = 30  # per latex/dvipng call; a runaway macro must not hang a data step
# The formula is untrusted text (a model's prediction, a dataset's label): kpathsea's paranoid mode lets TeX open
# no file by an absolute path, through `..` or starting with a dot, for reading (\input{/etc/passwd} would print it
# into the report) or writing; and no shell is ever run. kpathsea expands `~` and `$VAR` in a name after that check
# (\input{$SELFAUTOPARENT/etc/passwd} gets through), so render_latex also checks what TeX read (_check_inputs).
SAFE_TEX_ENVIRONMENT = {"openin_any": "p", "openout_any": "p", "shell_escape": "f"}

# Commands mathtext does not know and whose absence barely changes the picture.
_MATHTEXT_DROP = {
    r"\displaystyle", r"\textstyle", r"\scriptstyle", r"\scriptscriptstyle",
    r"\tiny", r"\scriptsize", r"\footnotesize", r"\small", r"\boldmath", r"\nonumber",
    r"\big", r"\Big", r"\bigg", r"\Bigg", r"\bigl", r"\Bigl", r"\biggl", r"\Biggl",
    r"\bigr", r"\Bigr", r"\biggr", r"\Biggr", r"\large", r"\Large", r"\LARGE", r"\normalsize",
    r"\fbox", r"\smash", r"\smallskip", r"\protect", r"\*",
}
# Commands dropped together with their braced argument (a length, a label, an invisible box).
_MATHTEXT_DROP_WITH_ARG = {
    r"\hspace", r"\vspace", r"\label", r"\phantom", r"\hphantom", r"\vphantom",
}
# Spellings mathtext lacks, mapped to its own for the same symbol or style.
_MATHTEXT_RENAME = {
    r"\operatorname*": r"\operatorname", r"\textrm": r"\mathrm", r"\textup": r"\mathrm",
    r"\stackrel": r"\overset", r"\ge": r"\geq", r"\le": r"\leq", r"\ne": r"\neq",
    r"\sp": "^", r"\sb": "_", r"\lbrack": "[", r"\rbrack": "]",
    r"\mit": r"\it", r"\sl": r"\it",
}
# mathtext insists on braces around these arguments, LaTeX (and the dataset) does not: `\frac 1 2`.
_MATHTEXT_ARGS = {
    "^": 1, "_": 1, r"\frac": 2, r"\binom": 2, r"\overset": 2, r"\underset": 2, r"\sqrt": 1,
    r"\mathrm": 1, r"\mathcal": 1, r"\mathbf": 1, r"\mathit": 1, r"\mathsf": 1, r"\operatorname": 1,
}
# Arguments set in a smaller style than their surroundings, where fractions are no longer display-sized.
_SMALLER_ARGS = {"^", "_", r"\frac", r"\binom"}
# A zero-width strut as tall as "(": mathtext sizes \left...\right to their content alone and so
# shrinks them below normal size around short content, where LaTeX keeps the normal size.
_STRUT = r"\rlap{\phantom{(}}"
_LEFT_DELIMITER = re.compile(r"\\left[^A-Za-z]")  # `\left(`, `\left\{`, not `\leftarrow`

_parser = MathTextParser("agg")


def mathtext_source(latex: str) -> str:
    """The formula rewritten into what mathtext accepts; the tables above say what changes."""
    tokens = [_MATHTEXT_RENAME.get(t, t) for t in latex.split() if t not in _MATHTEXT_DROP]
    # Unlike TeX, mathtext drops a script whose `^`/`_` is followed by a space: `x ^ { 2 }` prints "x 2".
    return "".join(t if t in ("^", "_") else t + " " for t in _mathtext_tokens(tokens))


def _mathtext_tokens(tokens: list[str], display: bool = True) -> list[str]:
    """The tokens with mathtext's gaps filled; `display` is false inside scripts and fractions, as in TeX."""
    out: list[str] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if token in _MATHTEXT_DROP_WITH_ARG:
            i = _skip_argument(tokens, i)
            continue
        # mathtext sets every \frac in text style; LaTeX's displaymath sets the outer ones large.
        out.append(r"\dfrac" if token == r"\frac" and display else token)
        if _LEFT_DELIMITER.match(token):
            out.append(_STRUT)
        if token in (r"\int", r"\oint") and tokens[i:i + 1] not in (["_"], ["^"]):
            out.append(r"\hspace{0.6}")  # mathtext packs a bare integral sign against the integrand
        for _ in range(_MATHTEXT_ARGS.get(token, 0)):
            if i >= len(tokens):
                break
            end = _skip_argument(tokens, i)
            argument = _mathtext_tokens(tokens[i:end], display and token not in _SMALLER_ARGS)
            out += argument if tokens[i] in ("{", "[") else ["{", *argument, "}"]
            i = end
    return out


def _skip_argument(tokens: list[str], i: int) -> int:
    """Index just past the argument starting at tokens[i]: a balanced {...} or [...] group, else one token."""
    if i >= len(tokens) or tokens[i] not in ("{", "["):
        return i + 1
    close = "}" if tokens[i] == "{" else "]"
    depth = 0
    for j in range(i, len(tokens)):
        depth += tokens[j] == tokens[i]
        depth -= tokens[j] == close
        if depth == 0:
            return j + 1
    return len(tokens)


def render_mathtext(latex: str, fontsize_pt: float = FONTSIZE_PT, dpi: int = DPI) -> Image.Image:
    """Render with matplotlib mathtext in Computer Modern (the dataset's look), no TeX needed."""
    prop = FontProperties(size=fontsize_pt, math_fontfamily="cm")
    try:
        ink = _parser.parse(f"${mathtext_source(latex)}$", dpi=dpi, prop=prop, antialiased=True).image
    # mathtext reports unknown commands, bad nesting and missing glyphs through several exception types.
    except Exception as err:
        raise ValueError(f"mathtext cannot render {latex!r}: {str(err).splitlines()[-1]}") from err
    return _crop_to_ink(np.asarray(ink), latex)


def render_latex(latex: str, fontsize_pt: float = FONTSIZE_PT, dpi: int = DPI) -> Image.Image:
    """Render with real LaTeX + dvipng, as the im2latex images were made (12pt article, displaymath)."""
    document = (
        "\\documentclass[12pt]{article}\n\\usepackage{amsmath,amssymb}\n\\pagestyle{empty}\n"
        f"\\begin{{document}}\n\\begin{{displaymath}}\n{latex}\n\\end{{displaymath}}\n\\end{{document}}\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "formula.tex").write_text(document)
        # No shell escapes, stop at the first error instead of prompting, and list each file read (formula.fls).
        _run(["latex", "-no-shell-escape", "-recorder", "-interaction=nonstopmode", "-halt-on-error", "formula.tex"],
             tmp, latex)
        resolution = round(dpi * fontsize_pt / 12)  # the document is 12pt; other sizes scale the resolution
        # --noghostscript: a PostScript \special in the formula is not handed to Ghostscript to run.
        _run(["dvipng", "-q", "--noghostscript", "-T", "tight", "-D", str(resolution), "-bg", "rgb 1 1 1",
              "-fg", "rgb 0 0 0", "-o", "formula.png", "formula.dvi"], tmp, latex)
        with Image.open(Path(tmp) / "formula.png") as png:
            gray = np.asarray(png.convert("L"))
    return _crop_to_ink(255 - gray, latex)


def _run(command: list[str], cwd: str, latex: str) -> None:
    try:
        result = subprocess.run(command, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=LATEX_TIMEOUT_S, env={**os.environ, **SAFE_TEX_ENVIRONMENT})
    except subprocess.TimeoutExpired as err:
        raise ValueError(f"{command[0]} timed out after {LATEX_TIMEOUT_S} s on {latex!r}") from err
    if "-recorder" in command:  # before the log's messages, which could quote what was read
        _check_inputs(Path(cwd), latex)
    if result.returncode != 0:
        # LaTeX prints its complaint on a line starting with "!"; the rest of the log is noise.
        errors = " ".join(line for line in result.stdout.splitlines() if line.startswith("!"))
        raise ValueError(f"{command[0]} cannot render {latex!r}: {errors or result.stderr.strip()}")


@functools.lru_cache(maxsize=1)
def _tex_trees() -> tuple[Path, ...]:
    """The folders of TeX's own files: packages, fonts, formats and configuration, as kpathsea finds them."""
    result = subprocess.run(["kpsewhich", "--expand-path=$TEXMF:$TEXFORMATS:$TEXMFCNF"], capture_output=True,
                            text=True, timeout=LATEX_TIMEOUT_S)
    return tuple(Path(folder).resolve() for folder in result.stdout.strip().split(os.pathsep) if folder)


def _check_inputs(folder: Path, latex: str) -> None:
    """Refuse the rendering when TeX read a file from outside its own folders and the one it ran in."""
    record = folder / "formula.fls"
    lines = record.read_text(errors="replace").splitlines() if record.is_file() else []
    allowed = (folder.resolve(), *_tex_trees())
    for line in lines:
        if line.startswith("INPUT "):
            path = (folder / line[len("INPUT "):]).resolve()
            if not any(path.is_relative_to(root) for root in allowed):
                raise ValueError(f"latex does not render {latex!r}: it reads {path}, which is not one of TeX's files")


def _crop_to_ink(ink: np.ndarray, latex: str) -> Image.Image:
    """Black-on-white RGB image of the inked box (ink: 0 = paper, 255 = full ink) plus MARGIN_PX of white."""
    rows, cols = np.nonzero(ink.any(axis=1))[0], np.nonzero(ink.any(axis=0))[0]
    if rows.size == 0:
        raise ValueError(f"formula renders no ink: {latex!r}")
    ink = ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    gray = np.pad(255 - ink, MARGIN_PX, constant_values=255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


def available_backend() -> str:
    """"latex" when latex, dvipng and kpsewhich are on PATH, else "mathtext"."""
    return "latex" if all(shutil.which(tool) for tool in ("latex", "dvipng", "kpsewhich")) else "mathtext"


def render(latex: str, backend: str = "auto") -> Image.Image:
    """Render with `backend` ("latex", "mathtext", or "auto" for the best one installed)."""
    backend = available_backend() if backend == "auto" else backend
    if backend == "latex":
        return render_latex(latex)
    if backend == "mathtext":
        return render_mathtext(latex)
    raise ValueError(f"unknown backend {backend!r}: use 'auto', 'latex' or 'mathtext'")
