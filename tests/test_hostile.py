"""Inputs an ordinary user will one day give the data and inference side: each gets a clear message that names the
file, row or value and says what to do, or a recorded skip; none loses data or ends in a traceback.

The in-process tests call what a script calls; the slow ones run the scripts as a user does, from a tmp folder.
"""

import json
import os
import re
import shutil
import stat
import subprocess

import pandas as pd
import pytest
from PIL import Image

from conftest import run_script
from latexocr import chat, data, evaluate, predictor, render
from latexocr.data import read_conversations, read_csv, write_conversations, write_csv

slow = pytest.mark.slow  # runs the scripts as a user does


def png(path, size=(200, 50), mode="RGB"):
    Image.new(mode, size, "white").save(path)
    return path


def no_traceback(result):
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


def refused(result, message):
    assert result.returncode != 0 and message in result.stderr, result.stdout[-2000:] + result.stderr[-3000:]
    no_traceback(result)


def mode_of(path):
    return stat.S_IMODE(path.stat().st_mode)


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


# --- rendering untrusted formulas ------------------------------------------------------------------------------------

def test_tex_runs_without_a_shell_and_may_open_files_only_in_its_own_folder(monkeypatch, tmp_path):
    calls = []

    def fake_run(command, cwd, env, **kwargs):
        calls.append((command, env))
        if command[0] == "dvipng":
            picture = Image.new("RGB", (20, 10), "white")
            picture.putpixel((5, 5), (0, 0, 0))
            picture.save(os.path.join(cwd, "formula.png"))
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(render.subprocess, "run", fake_run)
    monkeypatch.setattr(render, "_tex_trees", lambda: ())
    render.render_latex("x")
    (latex, latex_env), (dvipng, dvipng_env) = calls
    assert latex[0] == "latex" and "-no-shell-escape" in latex and "-recorder" in latex
    assert "-shell-escape" not in latex and "--shell-escape" not in latex
    for env in (latex_env, dvipng_env):
        assert env["openin_any"] == "p" and env["openout_any"] == "p" and env["shell_escape"] == "f"
    assert dvipng[0] == "dvipng" and "--noghostscript" in dvipng


def test_what_tex_read_outside_its_own_files_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(render, "_tex_trees", lambda: (tmp_path / "texmf",))
    (tmp_path / "formula.fls").write_text(f"PWD {tmp_path}\nINPUT {tmp_path / 'texmf' / 'article.cls'}\n"
                                          "INPUT formula.tex\nINPUT /nowhere/secret.tex\n")
    with pytest.raises(ValueError, match="it reads /nowhere/secret.tex, which is not one of TeX's files"):
        render._check_inputs(tmp_path, r"\input{$SELFAUTOPARENT/nowhere/secret}")


@pytest.mark.skipif(render.available_backend() != "latex", reason="latex, dvipng and kpsewhich are not installed")
def test_a_formula_cannot_read_a_file_into_its_picture(tmp_path, monkeypatch):
    secret = tmp_path / "secret.tex"
    secret.write_text("\\rule{80pt}{80pt}\\mathrm{SECRETWORD}\n")  # a box far taller than any formula here
    monkeypatch.setenv("HOME", str(tmp_path))
    for formula in [f"\\input{{{secret}}}", f"\\input{{{tmp_path}/../{tmp_path.name}/secret}}", r"\input{~/secret}",
                    r"\input{$HOME/secret}", f"\\openin5={secret} \\read5 to \\x \\x"]:
        try:
            picture = render.render_latex(formula)
        except ValueError as e:
            assert "SECRETWORD" not in str(e)
        else:
            assert picture.size[1] < 80, (formula, picture.size)
    # Without the guards the first one does read the file: the test above means something.
    monkeypatch.setattr(render, "SAFE_TEX_ENVIRONMENT", {})
    monkeypatch.setattr(render, "_check_inputs", lambda folder, latex: None)
    assert render.render_latex(f"\\input{{{secret}}}").size[1] > 150


ADAPTER_DIR = "output/Qwen2-VL-2B-LatexOCR"
FAST = ("--max_new_tokens=2", "--render_formulas=false")
