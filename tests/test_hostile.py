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

from conftest import run_script, trained_briefly
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


# --- files written: the modes a plain open() gives ---------------------------------------------------------------

def test_files_written_through_a_temporary_file_get_the_umask_mode_not_a_private_one(tmp_path, umask_022):
    data.atomic_write_text(tmp_path / "train_config.json", "{}")
    write_csv(tmp_path / "data.csv", [(png(tmp_path / "0.png"), "x")])
    write_conversations(tmp_path / "data.json", [(tmp_path / "0.png", "x")])
    evaluate.write_report(tmp_path / "report.html", [], {})
    for name in ("train_config.json", "data.csv", "data.json", "report.html"):
        assert mode_of(tmp_path / name) == 0o644, name
    os.umask(0o077)
    data.atomic_write_text(tmp_path / "private.json", "{}")
    assert mode_of(tmp_path / "private.json") == 0o600  # the umask is the user's choice, both ways
    (tmp_path / "shared.json").write_text("")
    (tmp_path / "shared.json").chmod(0o664)
    data.atomic_write_text(tmp_path / "shared.json", "{}")
    assert mode_of(tmp_path / "shared.json") == 0o664  # as open() on an existing file: its mode is kept


@slow
def test_data_steps_write_files_that_others_can_read(tmp_path, umask_022):
    run_script("data2csv.py", "--source=synthetic", "--max_data_number=12", cwd=tmp_path)
    run_script("csv2json.py", cwd=tmp_path)
    written = [tmp_path / "latex_ocr_train.csv", tmp_path / "latex_ocr_train.source.json",
               tmp_path / "LaTeX_OCR" / "source.json", *(tmp_path / "LaTeX_OCR").glob("*.png"),
               tmp_path / "latex_ocr_train.json", tmp_path / "latex_ocr_val.json"]
    assert len(written) == 17 and {mode_of(p) for p in written} == {0o644}


# --- settings -------------------------------------------------------------------------------------------------------

def test_each_script_checks_its_settings_before_work_starts(tmp_path):
    from latexocr import settings
    from latexocr.config import apply_overrides

    def resolved(rules, **namespace):
        args = [f"--{k.lower()}={v}" for k, v in namespace.items()]
        defaults = {k: type(v)() if not isinstance(v, str) else "" for k, v in namespace.items()}
        return apply_overrides(defaults, args, rules={k.lower(): rules[k.lower()] for k in namespace})

    assert resolved(settings.DATA2CSV, SOURCE="Synthetic", MAX_DATA_NUMBER=-1, MAX_VAL_NUMBER=-1) == \
        {"source": "synthetic", "max_data_number": -1, "max_val_number": -1}
    assert resolved(settings.DATA2CSV, SOURCE="My_Data.parquet")["source"] == "My_Data.parquet"  # a path as typed
    assert resolved(settings.CSV2JSON, VAL_SIZE=-1)["val_size"] == -1
    assert resolved(settings.INFER, DEVICE="CPU", PRECISION="BFloat16") == {"device": "cpu", "precision": "bfloat16"}
    assert resolved(settings.EXPORT, DTYPE="Float32", MAX_SHARD_SIZE="500mb")["dtype"] == "float32"
    (tmp_path / "taken").write_text("a file")
    for rules, namespace, message in [
        (settings.DATA2CSV, {"MAX_VAL_NUMBER": 0}, "--max_val_number=0: must be more than 0, or -1"),
        (settings.DATA2CSV, {"VAL_CSV_PATH": str(tmp_path)}, "is a folder; pass a file name"),
        (settings.CSV2JSON, {"TRAIN_JSON_PATH": f"{tmp_path / 'taken'}/train.json"}, "is a file, not a folder"),
        (settings.EXPORT, {"DTYPE": "int8"}, "--dtype=int8: expected auto, bfloat16, float16 or float32"),
        (settings.EXPORT, {"DEVICE": "tpu"}, "--device=tpu: expected auto, cuda or cpu"),
        (settings.EXPORT, {"MAX_SHARD_SIZE": "big"}, "--max_shard_size=big: expected a size such as 5GB"),
        (settings.EXPORT, {"EXPORT_DIR": str(tmp_path / "taken")}, "is a file, not a folder"),
    ]:
        with pytest.raises(SystemExit, match=re.escape(message)):
            resolved(rules, **namespace)


# --- CSV files -----------------------------------------------------------------------------------------------------

def test_a_csv_saved_on_windows_is_read_as_written(tmp_path):
    """CRLF line endings, a byte-order mark (Excel's "CSV UTF-8"), backslashes in the image paths, a header in
    another case, a blank line at the end."""
    (tmp_path / "images").mkdir()
    png(tmp_path / "images" / "0.png")
    png(tmp_path / "images" / "1.png")
    (tmp_path / "data.csv").write_bytes("\ufeffImage_Path,Text\r\nimages\\0.png,x ^ { 2 }\r\n"
                                        "images\\1.png,\"a\r\nb\"\r\n\r\n".encode())
    rows = read_csv(tmp_path / "data.csv")
    assert [(line, image, text) for line, image, text in rows] == [
        (2, (tmp_path / "images" / "0.png").resolve(), "x ^ { 2 }"), (4, (tmp_path / "images" / "1.png").resolve(),
                                                                      "a\r\nb")]


@pytest.mark.parametrize("separator", ["\t", ";"])  # a TSV named .csv; a European Excel export
def test_a_csv_separated_by_tabs_or_semicolons_is_read(tmp_path, separator):
    png(tmp_path / "0.png")
    (tmp_path / "data.csv").write_text(f"image_path{separator}text\n0.png{separator}\\frac {{ a , b }} {{ c }}\n")
    assert [text for _, _, text in read_csv(tmp_path / "data.csv")] == [r"\frac { a , b } { c }"]


@pytest.mark.parametrize("content, message", [
    (b"image_path,text\n0.png,x\n1.png,caf\xe9\n", "data.csv, line 3: not UTF-8 (byte 0xe9)"),  # Latin-1
    ("image_path,text\n0.png,x\n".encode("utf-16"), "data.csv: UTF-16 text, but UTF-8 is expected"),
    (b"image_path,text\n0.png,x\n1.png,a,b\n", "data.csv, line 3: 3 fields where the header has 2"),
    (b"image_path,text\n0.png\n", "data.csv, line 2: 1 fields where the header has 2"),
    (b"image_path,text\n", "data.csv: a header and no rows"),
    (b"", "data.csv: empty, not even a header"),
])
def test_a_csv_that_cannot_be_read_names_the_file_and_line_and_what_to_do(tmp_path, content, message):
    (tmp_path / "data.csv").write_bytes(content)
    with pytest.raises(SystemExit, match=re.escape(message)) as error:
        read_csv(tmp_path / "data.csv")
    if b"\xe9" in content:
        assert "iconv -f WINDOWS-1252 -t UTF-8" in str(error.value)


def test_paths_with_spaces_and_unicode_survive_the_csv(tmp_path):
    folder = tmp_path / "mes données" / "formules 1"
    folder.mkdir(parents=True)
    rows = [(png(folder / "équation n°1.png"), "x"), (png(folder / "公式 2.png"), "y")]
    write_csv(tmp_path / "mes données" / "data.csv", rows)
    assert [image for _, image, _ in read_csv(tmp_path / "mes données" / "data.csv")] == [p for p, _ in rows]


def test_rows_listing_an_image_twice_are_recorded_not_trained_on_twice(tmp_path):
    image = png(tmp_path / "0.png")
    write_csv(tmp_path / "data.csv", [(image, "x"), (png(tmp_path / "1.png"), "y"), (image, "z")])
    rejects = []
    assert data.usable_rows(tmp_path / "data.csv", rejects, show_progress=False) == [
        (image.resolve(), "x"), ((tmp_path / "1.png").resolve(), "y")]
    assert rejects == [(image.resolve(), f"{tmp_path / 'data.csv'} line 4: the same image as line 2")]


# --- conversation JSON --------------------------------------------------------------------------------------------

def test_formulas_and_ids_json_reads_as_numbers_are_kept_as_the_text_they_are(tmp_path):
    png(tmp_path / "0.png")
    png(tmp_path / "1.png")
    (tmp_path / "data.json").write_text('[{"id": 7, "conversations": [{"role": "user", "value": "0.png"}, '
                                        '{"role": "assistant", "value": 12}]}, {"id": 8, "conversations": [{"role": '
                                        '"user", "value": "1.png"}, {"role": "assistant", "value": 1.50}]}]')
    samples = read_conversations(tmp_path / "data.json")
    assert [(s.id, s.text) for s in samples] == [("7", "12"), ("8", "1.50")]  # 1.50, not 1.5


def test_a_json_with_a_byte_order_mark_or_in_sharegpt_style_is_read(tmp_path):
    png(tmp_path / "0.png")
    record = {"id": "a", "conversations": [{"from": "human", "value": "0.png"}, {"from": "gpt", "value": "x"}]}
    (tmp_path / "data.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([record]).encode())
    assert [(s.id, s.text) for s in read_conversations(tmp_path / "data.json")] == [("a", "x")]


@pytest.mark.parametrize("content, message", [
    ('[\n {"id": 1,\n  "conversations": [}\n]', "data.json, line 3 column 21: not valid JSON"),
    ("[]", "data.json: an empty list, no records"),
    ('[{"id": 1, "conversations": [{"role": "user", "value": "0.png"}, {"role": "assistant", "value": " "}]}]',
     "data.json, record 0: the assistant turn (the formula) is empty"),
    ('[{"id": 1, "conversations": [{"role": "user", "value": "0.png"}, {"role": "assistant", "value": "x"}]}, '
     '{"id": "1", "conversations": [{"role": "user", "value": "1.png"}, {"role": "assistant", "value": "y"}]}]',
     "data.json, record 1: duplicate id '1'"),
])
def test_a_conversation_json_that_cannot_be_used_names_the_line_or_record(tmp_path, content, message):
    (tmp_path / "data.json").write_text(content)
    with pytest.raises(SystemExit, match=re.escape(message)):
        read_conversations(tmp_path / "data.json")


def test_jsonl_lines_that_are_not_json_name_the_line(tmp_path):
    (tmp_path / "rows.jsonl").write_text('{"image_path": "0.png", "text": 12}\n\n{"image_path": "1.png", "text": "x"\n')
    with pytest.raises(SystemExit, match=r"rows.jsonl, line 3: not valid JSON"):
        data.read_json_lines(tmp_path / "rows.jsonl")
    (tmp_path / "rows.jsonl").write_text('{"image_path": "0.png", "text": 12}\n')
    assert data.read_json_lines(tmp_path / "rows.jsonl") == [(1, {"image_path": "0.png", "text": "12"})]


# --- images -------------------------------------------------------------------------------------------------------

def test_what_is_not_a_bitmap_image_says_what_it_is(tmp_path):
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "formula.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"/>')
    (tmp_path / "formula.pdf").write_bytes(b"%PDF-1.4\n")
    png(tmp_path / "strip.png", (50_000, 100), "L")
    assert data.image_problem(tmp_path / "folder.png") == "a folder, not an image file"
    assert data.image_problem(tmp_path / "formula.svg").startswith("an SVG drawing, not a bitmap image: convert it "
                                                                   "to PNG")
    assert data.image_problem(tmp_path / "formula.pdf").startswith("a PDF document, not a bitmap image")
    assert data.image_problem(tmp_path / "strip.png").startswith("50000x100 px, an aspect ratio of 500:1, more than "
                                                                 "the 200:1")


def test_the_aspect_ratio_limit_is_the_one_qwen_vl_utils_enforces(tmp_path):
    from qwen_vl_utils.vision_process import MAX_RATIO
    assert data.MAX_ASPECT_RATIO == MAX_RATIO
    png(tmp_path / "edge.png", (200 * 20, 20), "L")  # exactly 200:1: accepted by both
    assert data.image_problem(tmp_path / "edge.png") is None
    chat.load_image(tmp_path / "edge.png", chat.sizing())


def test_unusual_but_valid_images_are_used_as_training_and_inference_see_them(tmp_path):
    import numpy as np
    ramp = (np.linspace(0, 65535, 200 * 50).reshape(50, 200)).astype(">u2")
    Image.fromarray(ramp).save(tmp_path / "big_endian_16bit.tif")  # mode I;16B: load_image used to crash on it
    png(tmp_path / "one_pixel.png", (1, 1))
    frames = [Image.new("P", (120, 40), i) for i in (0, 1)]
    frames[0].save(tmp_path / "animated.gif", save_all=True, append_images=frames[1:])
    Image.new("CMYK", (120, 40), (0, 0, 0, 0)).save(tmp_path / "cmyk.jpg")
    for name in ("big_endian_16bit.tif", "one_pixel.png", "animated.gif", "cmyk.jpg"):
        assert data.image_problem(tmp_path / name) is None, name
        sized = chat.load_image(tmp_path / name, chat.sizing())
        assert sized.mode == "RGB" and sized.size[0] * sized.size[1] >= chat.MIN_PIXELS, name
    grey = data.open_image(tmp_path / "big_endian_16bit.tif").convert("L")
    assert grey.getextrema() == (0, 255)  # scaled to 8 bits, not clipped


def test_exif_orientation_is_applied_alike_in_the_checks_training_and_inference(tmp_path):
    sideways = Image.new("RGB", (300, 60), "white")
    sideways.paste((0, 0, 0), (0, 0, 30, 60))  # ink at the stored image's left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": a phone photo of a formula
    sideways.save(tmp_path / "photo.jpg", exif=exif)
    upright = data.open_image(tmp_path / "photo.jpg")
    assert upright.size == (60, 300) and upright.getpixel((30, 5))[0] < 64  # the ink is at the top now
    sized = chat.load_image(tmp_path / "photo.jpg", chat.sizing())
    assert sized.size[1] > sized.size[0]  # tall, as displayed
    with Image.open(tmp_path / "photo.jpg") as stored:  # what train.py's pre-flight counts tokens from
        counted = chat.image_tokens(*stored.size, chat.sizing())
    assert counted == (sized.size[0] // 28) * (sized.size[1] // 28)
    assert data.image_problem(tmp_path / "photo.jpg") is None


# --- where a CSV's rows came from ------------------------------------------------------------------------------------

def test_a_source_record_of_the_first_format_still_reads(tmp_path):
    (tmp_path / "source.json").write_text(json.dumps({"source": "synthetic", "dataset_id": "AI-ModelScope/LaTeX_OCR",
                                                      "hf_dataset_id": "linxy/LaTeX_OCR", "subset_name": "default",
                                                      "split": "train", "seed": 0}))
    assert data.read_source(tmp_path / "source.json") == {"source": "synthetic", "seed": 0, "split": "train"}
    (tmp_path / "source.json").write_text('{"source": "synth')
    with pytest.raises(SystemExit, match="source.json: not readable JSON"):
        data.read_source(tmp_path / "source.json")


# --- inference inputs ----------------------------------------------------------------------------------------------

def test_infer_finds_the_val_json_training_used_from_any_folder(tmp_path, monkeypatch):
    run = tmp_path / "run"
    (run / "output" / "model").mkdir(parents=True)
    (run / "val.json").write_text("[]")
    recorded = {"val_json_path": "val.json", "output_dir": "output/model"}
    monkeypatch.chdir(tmp_path)  # not the folder train.py ran in
    assert predictor.val_json(dict(recorded, val_json_abspath=str(run / "val.json")), run / "output" / "model") == \
        run / "val.json"
    # A config from before the absolute path was recorded: found from where the output folder lies.
    assert predictor.val_json(recorded, run / "output" / "model").resolve() == (run / "val.json").resolve()
    with pytest.raises(SystemExit, match=r"the val JSON training used is not at .*Pass --image="):
        predictor.val_json(dict(recorded, val_json_path="gone.json"), run / "output" / "model")
    with pytest.raises(SystemExit, match="training had no val set"):
        predictor.val_json(dict(recorded, val_json_path=""), run / "output" / "model")


def test_only_scores_this_project_wrote_are_cleared(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"exact_match": 1.0}))
    evaluate.write_report(tmp_path / "report.html", [], {})
    assert evaluate.clear_scores(tmp_path) == [tmp_path / "metrics.json", tmp_path / "report.html"]
    (tmp_path / "metrics.json").write_text('{"loss": 0.1}')  # someone else's
    (tmp_path / "report.html").write_text("<html>mine</html>")
    assert evaluate.clear_scores(tmp_path) == [] and (tmp_path / "metrics.json").is_file()


# --- export folders -------------------------------------------------------------------------------------------------

def test_an_export_folder_is_replaced_only_when_export_py_wrote_it_and_nothing_was_added(tmp_path):
    target, keep = tmp_path / "merged", {"the training output folder": tmp_path / "run"}
    assert predictor.check_export_dir(target, keep) is False  # nothing there yet
    staging, removed = predictor.start_export(target)
    (staging / "model.safetensors").write_bytes(b"weights")
    predictor.finish_export(staging, target, {"model_id": "tiny-random"})
    assert predictor.check_export_dir(target, keep) is True
    (target / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match=r"files added to it since \(notes.txt\)"):
        predictor.check_export_dir(target, keep)
    (target / "notes.txt").unlink()
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(SystemExit, match="is a file or a link"):
        predictor.check_export_dir(tmp_path / "link", keep)
    with pytest.raises(SystemExit, match="is or holds the training output folder"):
        predictor.check_export_dir(tmp_path, keep)


def test_a_killed_export_leaves_nothing_the_next_one_does_not_clear(tmp_path):
    target = tmp_path / "merged"
    left, _ = predictor.start_export(target)  # killed before it finished: a hidden folder with its record
    backup = tmp_path / ".merged.backup"
    shutil.copytree(left, backup)  # a user's own hidden copy, not a name export.py gives
    staging, removed = predictor.start_export(target)
    assert removed == 1 and not left.exists() and backup.is_dir() and staging.is_dir()
    assert mode_of(staging) == 0o777 & ~current_umask()


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


# --- data2csv.py ----------------------------------------------------------------------------------------------------

@slow
def test_data2csv_refuses_a_local_source_changed_in_place(tmp_path):
    png(tmp_path / "a.png", (200, 50))
    png(tmp_path / "b.png", (400, 50))
    (tmp_path / "source.csv").write_text("image_path,text\na.png,a\nb.png,b\n")
    run_script("data2csv.py", "--source=source.csv", "--csv_path=train.csv", cwd=tmp_path)
    saved = (tmp_path / "train.csv").read_text()
    (tmp_path / "source.csv").write_text("image_path,text\nb.png,b\na.png,a\n")  # same name, rows swapped

    result = run_script("data2csv.py", "--source=source.csv", "--csv_path=train.csv", cwd=tmp_path, check=False)

    refused(result, "LaTeX_OCR holds images saved from")
    assert "the file has changed since" in result.stderr
    assert (tmp_path / "train.csv").read_text() == saved  # images and text still pair as they did
    assert [Image.open(tmp_path / "LaTeX_OCR" / f"{i}.png").size for i in (0, 1)] == [(200, 50), (400, 50)]
    record = json.loads((tmp_path / "train.source.json").read_text())
    assert record["source"] == "local" and record["sha256"] != data.sha256(tmp_path / "source.csv")


@slow
def test_a_held_out_csv_of_another_source_is_refused_not_taken_for_val(tmp_path):
    run_script("data2csv.py", "--source=synthetic", "--max_data_number=20", "--val_split=validation",
               "--max_val_number=5", cwd=tmp_path)
    result = run_script("data2csv.py", "--source=synthetic", "--seed=3", "--max_data_number=20",
                        "--dataset_dir=other", cwd=tmp_path)
    assert "latex_ocr_val.csv holds held-out rows of another source" in result.stdout

    result = run_script("csv2json.py", cwd=tmp_path, check=False)

    refused(result, "latex_ocr_val.csv holds held-out rows of another source (source=synthetic, seed=0")
    assert not (tmp_path / "latex_ocr_train.json").exists() and not (tmp_path / "latex_ocr_val.json").exists()


@slow
@pytest.mark.parametrize("args, message", [
    (["--max_data_number=0"], "--max_data_number=0: must be more than 0, or -1 for no limit"),
    (["--max_data_number=-1"], "--source=synthetic has no end"),
    (["--dataset_dir=taken"], "--dataset_dir=taken: is a file, not a folder"),
    (["--csv_path=taken/train.csv"], "--csv_path=taken/train.csv: cannot be written"),
    (["--source=nowhere.parquet"], "--source=nowhere.parquet: not modelscope, huggingface or synthetic"),
    (["--source=empty"], "empty: no .parquet files in this folder"),
    (["--source=rows.txt"], "expected a .parquet file or folder, a .csv, .tsv, .json or .jsonl file"),
    (["--source=rows.csv", "--csv_path=rows.csv"], "--source=rows.csv and --csv_path=rows.csv are the same file"),
    (["--val_split=train"], "--val_split=train is the training split itself"),
    (["--source=broken.parquet"], "broken.parquet: not a readable parquet file"),
    (["--source=bad.jsonl"], "bad.jsonl, line 2: not valid JSON"),
])
def test_data2csv_refuses_settings_and_sources_it_cannot_use_before_saving_anything(tmp_path, args, message):
    (tmp_path / "taken").write_text("a file")
    (tmp_path / "empty").mkdir()
    (tmp_path / "rows.txt").write_text("0.png x\n")
    (tmp_path / "rows.csv").write_text("image_path,text\n0.png,x\n")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    (tmp_path / "bad.jsonl").write_text('{"image_path": "0.png", "text": "x"}\n{"image_path": \n')
    result = run_script("data2csv.py", "--source=synthetic", "--max_data_number=4", *args, cwd=tmp_path, check=False)
    refused(result, message)
    assert not (tmp_path / "LaTeX_OCR").exists() or not list((tmp_path / "LaTeX_OCR").glob("*.png"))


@slow
def test_data2csv_reads_local_files_as_users_write_them(tmp_path):
    """A source CSV with absolute paths, paths with spaces and unicode, a CMYK JPEG, an EXIF-rotated photo and a
    formula that is a number; a parquet whose image column holds paths; a JSONL file; upper-case names."""
    (tmp_path / "my images").mkdir()
    png(tmp_path / "my images" / "équation 1.png")
    Image.new("CMYK", (120, 40), (0, 0, 0, 0)).save(tmp_path / "my images" / "cmyk.jpg")  # PNG cannot hold CMYK
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (300, 60), "white").save(tmp_path / "my images" / "photo.jpg", exif=exif)
    (tmp_path / "Source.CSV").write_text(f"image_path,text,notes\n{tmp_path / 'my images' / 'équation 1.png'},x,\n"
                                         "my images/cmyk.jpg,y,from a scanner\nmy images/photo.jpg,z,\n")
    result = run_script("data2csv.py", "--source=Source.CSV", "--dataset_dir=from_csv", "--csv_path=csv.csv",
                        cwd=tmp_path)
    assert "3 train rows -> csv.csv" in result.stdout and "0 skipped" in result.stdout
    sizes = [Image.open(image).size for _, image, _ in read_csv(tmp_path / "csv.csv")]
    assert sizes == [(200, 50), (120, 40), (60, 300)]  # the photo upright

    pd.DataFrame({"image": ["my images/cmyk.jpg", "my images/équation 1.png"], "text": [12, 3]}).to_parquet(
        tmp_path / "paths.parquet")
    run_script("data2csv.py", "--source=paths.parquet", "--dataset_dir=from_parquet", "--csv_path=parquet.csv",
               "--max_data_number=-1", cwd=tmp_path)  # -1: all rows
    assert [text for _, _, text in read_csv(tmp_path / "parquet.csv")] == ["12", "3"]

    (tmp_path / "rows.jsonl").write_text('{"image_path": "my images/photo.jpg", "text": 12}\n\n'
                                         '{"image_path": "missing.png", "text": "y"}\n')
    result = run_script("data2csv.py", "--source=rows.jsonl", "--dataset_dir=from_jsonl", "--csv_path=jsonl.csv",
                        "--max_data_number=10", cwd=tmp_path)
    assert [text for _, _, text in read_csv(tmp_path / "jsonl.csv")] == ["12"]
    assert "the source's train split has 2 rows, fewer than the 10 asked for" in result.stdout
    assert list(pd.read_csv(tmp_path / "jsonl.rejects.csv")["reason"]) == ["row 1: image file not found"]


@slow
def test_data2csv_leaves_a_folder_of_images_it_did_not_save_alone(tmp_path):
    (tmp_path / "LaTeX_OCR").mkdir()
    png(tmp_path / "LaTeX_OCR" / "0.png", (300, 50))  # e.g. the source's own images
    (tmp_path / "source.csv").write_text("image_path,text\nLaTeX_OCR/0.png,x\n")
    result = run_script("data2csv.py", "--source=source.csv", "--csv_path=train.csv", cwd=tmp_path, check=False)
    refused(result, "LaTeX_OCR holds numbered images that data2csv.py has no record of saving")
    assert sorted(p.name for p in (tmp_path / "LaTeX_OCR").iterdir()) == ["0.png"]


@slow
def test_data2csv_with_every_row_unusable_says_so(tmp_path):
    (tmp_path / "source.csv").write_text("image_path,text\ngone.png,x\n")
    result = run_script("data2csv.py", "--source=source.csv", "--csv_path=train.csv", cwd=tmp_path, check=False)
    refused(result, "train: none of the 1 rows could be saved (reasons in train.rejects.csv)")


@slow
def test_data2csv_and_csv2json_through_a_symlinked_image_folder(tmp_path):
    (tmp_path / "disk").mkdir()
    (tmp_path / "LaTeX_OCR").symlink_to(tmp_path / "disk")
    run_script("data2csv.py", "--source=synthetic", "--max_data_number=12", cwd=tmp_path)
    run_script("csv2json.py", cwd=tmp_path)
    assert len(list((tmp_path / "disk").glob("*.png"))) == 12
    assert all(s.image.is_file() for s in read_conversations(tmp_path / "latex_ocr_train.json"))


# --- csv2json.py ----------------------------------------------------------------------------------------------------

@slow
@pytest.mark.parametrize("args, message", [
    (["--val_json_path=latex_ocr_train.json"], "--train_json_path=latex_ocr_train.json and "
                                               "--val_json_path=latex_ocr_train.json are the same file"),
    (["--train_json_path=latex_ocr_train.csv"], "--csv_path=latex_ocr_train.csv and "
                                                "--train_json_path=latex_ocr_train.csv are the same file"),
    (["--rejects_path=./latex_ocr_val.json"], "are the same file"),
    (["--val_size=-1"], "--val_size=-1 takes every held-out row, and there is no held-out CSV"),
    (["--val_size=0"], "--val_size=0: must be more than 0, or -1"),
])
def test_csv2json_refuses_outputs_that_would_overwrite_its_inputs_or_each_other(tmp_path, args, message):
    write_csv(tmp_path / "latex_ocr_train.csv", [(png(tmp_path / f"{i}.png"), f"x _ {i}") for i in range(20)])
    before = (tmp_path / "latex_ocr_train.csv").read_text()
    result = run_script("csv2json.py", *args, cwd=tmp_path, check=False)
    refused(result, message)
    assert (tmp_path / "latex_ocr_train.csv").read_text() == before and not list(tmp_path.glob("*.json"))


@slow
def test_csv2json_skips_strips_and_images_in_both_csvs(tmp_path):
    rows = [(png(tmp_path / f"{i}.png"), f"x _ {i}") for i in range(20)]
    write_csv(tmp_path / "latex_ocr_train.csv", rows + [(png(tmp_path / "strip.png", (50_000, 100), "L"), "y")])
    write_csv(tmp_path / "latex_ocr_val.csv", [(rows[0][0], "another label"), (png(tmp_path / "v.png"), "v")])

    result = run_script("csv2json.py", "--val_size=-1", cwd=tmp_path)

    reasons = dict(zip(pd.read_csv(tmp_path / "latex_ocr_rejects.csv")["image_path"],
                       pd.read_csv(tmp_path / "latex_ocr_rejects.csv")["reason"]))
    assert "line 22: 50000x100 px, an aspect ratio of 500:1" in reasons["strip.png"]
    assert reasons["0.png"] == "image also in val"
    assert len(read_conversations(tmp_path / "latex_ocr_val.json")) == 2  # -1: every held-out row
    assert len(read_conversations(tmp_path / "latex_ocr_train.json")) == 19
    assert "val: 2 of 2 held-out rows" in result.stdout


# --- a trained run: train.py, infer.py and export.py ----------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Data and an adapter trained for one step on the tiny model, with a val JSON recorded."""
    return trained_briefly(tmp_path_factory.mktemp("trained"), "--eval_max_new_tokens=2", "--num_workers=0")


ADAPTER_DIR = "output/Qwen2-VL-2B-LatexOCR"
FAST = ("--max_new_tokens=2", "--render_formulas=false")


@slow
def test_train_preflight_catches_an_aspect_ratio_qwen_vl_utils_would_refuse(tmp_path):
    write_conversations(tmp_path / "strip.json", [(png(tmp_path / "strip.png", (50_000, 100), "L"), "x"),
                                                  (png(tmp_path / "ok.png"), "y")])
    result = run_script("train.py", "--model_id=tiny-random", "--train_json_path=strip.json", "--val_json_path=",
                        "--swanlab_mode=disabled", cwd=tmp_path, check=False)
    refused(result, "record identity_1: 50000x100 px, an aspect ratio of 500:1")
    assert "model:" not in result.stdout


@slow
def test_infer_from_another_folder_scores_the_val_json_training_used(trained, umask_022):
    elsewhere = trained / "elsewhere"
    elsewhere.mkdir()
    run_script("infer.py", f"--output_dir=../{ADAPTER_DIR}", *FAST, cwd=elsewhere)
    results = trained / ADAPTER_DIR / "infer"
    assert json.loads((results / "metrics.json").read_text())["n"] == 2
    assert {mode_of(p) for p in results.iterdir()} == {0o644}


@slow
def test_infer_predicts_the_images_of_a_mixed_folder_and_records_the_rest(trained, tmp_path):
    folder = tmp_path / "mixed"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(trained / "LaTeX_OCR" / "0.png", folder / "0.png")
    shutil.copy(trained / "LaTeX_OCR" / "1.png", folder / "formula")  # an image without a suffix
    (folder / "readme.txt").write_text("notes")
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (folder / "source.json").write_text("{}")  # data2csv.py's record of where its images came from
    png(folder / "strip.png", (50_000, 100), "L")
    results = tmp_path / "results"

    result = run_script("infer.py", f"--output_dir={ADAPTER_DIR}", f"--image={folder}", f"--results_dir={results}",
                        *FAST, cwd=trained)

    no_traceback(result)
    predicted = [json.loads(line)["id"] for line in (results / "predictions.jsonl").open()]
    assert predicted == ["0.png", "formula"]
    reasons = list(pd.read_csv(results / "rejects.csv")["reason"])
    assert reasons[0].startswith("readme.txt: not a readable image") and reasons[1].startswith("strip.png: 50000x100")
    assert f"skipped 2 file(s) that cannot be read as images -> {results / 'rejects.csv'}" in result.stdout


@slow
def test_infer_with_empty_references_predicts_without_a_score_and_clears_older_scores(trained, tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "metrics.json").write_text(json.dumps({"exact_match": 1.0, "n": 9}))  # an earlier run's
    evaluate.write_report(results / "report.html", [], {"exact_match": 1.0})
    images = sorted((trained / "LaTeX_OCR").glob("*.png"))[:2]
    (tmp_path / "unlabelled.json").write_text(json.dumps([
        {"id": i, "conversations": [{"role": "user", "value": str(image)}, {"role": "assistant", "value": text}]}
        for i, image, text in [("a", images[0], ""), ("b", images[1], "x")]]))

    result = run_script("infer.py", f"--output_dir={ADAPTER_DIR}", f"--image={tmp_path / 'unlabelled.json'}",
                        f"--results_dir={results}", *FAST, cwd=trained)

    assert "1 of 2 records in" in result.stdout and "have an empty reference (first: a)" in result.stdout
    assert sorted(p.name for p in results.iterdir()) == ["predictions.jsonl"]


@slow
@pytest.mark.parametrize("args, message", [
    (["--image=empty"], "--image=empty: no files in this folder"),
    (["--image=only_sub"], "images in its subfolders are not read: pass --image=<a subfolder>"),
    (["--image=notes.txt"], "notes.txt: nothing to predict, none of its 1 file(s) is a readable image"),
    (["--image=empty.json"], "empty.json: an empty list, no records"),
    (["--image=object.json"], "object.json: expected a list of conversation records, found dict"),
    (["--results_dir=latex_ocr_train.csv/infer"], "--results_dir=latex_ocr_train.csv/infer: cannot be written"),
    (["--max_new_tokens=0"], "--max_new_tokens=0: must be more than 0"),
    (["--batch_size=-1"], "--batch_size=-1: must be more than 0"),
    (["--dtype=int8"], "unknown setting --dtype. Valid settings: output_dir"),
    (["--precision=INT8"], "--precision=INT8: expected auto, float32 or bfloat16"),
    (["--output_dir=cut_short"], "cut_short/train_config.json: not readable JSON"),
])
def test_infer_refuses_what_it_cannot_predict_before_loading_the_model(trained, args, message):
    (trained / "empty").mkdir(exist_ok=True)
    (trained / "only_sub" / "sub").mkdir(parents=True, exist_ok=True)
    (trained / "notes.txt").write_text("not an image")
    (trained / "empty.json").write_text("[]")
    (trained / "object.json").write_text('{"data": []}')
    (trained / "cut_short").mkdir(exist_ok=True)
    whole_config = (trained / ADAPTER_DIR / "train_config.json").read_text()
    (trained / "cut_short" / "train_config.json").write_text(whole_config[:40])
    result = run_script("infer.py", *args, cwd=trained, check=False)
    refused(result, message)
    assert "model:" not in result.stdout


@slow
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CUDA GPU is here")
def test_infer_asked_for_cuda_without_a_gpu_says_what_to_pass(trained):
    refused(run_script("infer.py", "--device=cuda", cwd=trained, check=False),
            "--device=cuda: no CUDA GPU is visible here (torch.cuda.is_available() is False). Pass --device=cpu")


@slow
@pytest.mark.parametrize("export_dir", ["output", ".", ADAPTER_DIR, "mine", "latex_ocr_train.csv"])
def test_export_never_replaces_what_it_did_not_write(trained, export_dir):
    (trained / "mine").mkdir(exist_ok=True)
    (trained / "mine" / "notes.txt").write_text("keep me")
    before = sorted(str(p.relative_to(trained)) for p in trained.rglob("*"))

    result = run_script("export.py", f"--export_dir={export_dir}", cwd=trained, check=False)

    assert result.returncode != 0 and ("is or holds the training output folder" in result.stderr or
                                       "did not write" in result.stderr or "is a file" in result.stderr), result.stderr
    no_traceback(result)
    assert sorted(str(p.relative_to(trained)) for p in trained.rglob("*")) == before  # nothing moved or deleted
    assert (trained / ADAPTER_DIR / "adapter_model.safetensors").is_file()


@slow
def test_export_replaces_its_own_earlier_export_and_says_so(trained, tmp_path, umask_022):
    target = tmp_path / "merged"
    run_script("export.py", f"--export_dir={target}", "--adapter=output/Qwen2-VL-2B-LatexOCR/checkpoint-1",
               cwd=trained)  # a checkpoint holds no processor: the run's is used
    assert json.loads((target / "export.json").read_text())["written_by"] == "export.py"
    assert mode_of(target) == 0o755 and {mode_of(p) for p in target.iterdir()} == {0o644}  # a server can read it

    result = run_script("export.py", f"--export_dir={target}", cwd=trained)
    assert f"replaced the earlier export in {target}" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no staging or old folder beside it

    (target / "README.md").write_text("my notes on this model")
    refused(run_script("export.py", f"--export_dir={target}", cwd=trained, check=False),
            "holds an earlier export and files added to it since (README.md)")
    assert (target / "README.md").read_text() == "my notes on this model"


@slow
def test_export_explains_a_moved_base_model_a_whole_model_and_a_cut_short_config(trained, tmp_path, tiny_model_dir):
    moved = tmp_path / "run"
    shutil.copytree(trained / ADAPTER_DIR, moved, ignore=shutil.ignore_patterns("checkpoint-*", "eval", "infer"))
    config = json.loads((moved / "train_config.json").read_text())
    gone = tmp_path / "base-was-here"
    (moved / "train_config.json").write_text(json.dumps(dict(config, model_id=str(gone), model_dir=str(gone))))
    refused(run_script("export.py", f"--output_dir={moved}", cwd=tmp_path, check=False),
            f"training's base model was the folder {gone}, which is no longer there. Pass --model_id=")

    whole = tmp_path / "whole"
    shutil.copytree(tiny_model_dir, whole)
    (whole / "train_config.json").write_text(json.dumps(config))
    refused(run_script("export.py", f"--output_dir={whole}", cwd=tmp_path, check=False),
            "It holds a whole model already")

    (moved / "train_config.json").write_text(json.dumps(config)[:50])
    refused(run_script("export.py", f"--output_dir={moved}", cwd=tmp_path, check=False),
            "train_config.json: not readable JSON")
