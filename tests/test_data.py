"""The files between stages: CSV and conversation JSON, their checks, and the two data scripts."""

import io
import json
import shutil

import pandas as pd
import pytest
from PIL import Image

from conftest import run_script
from latexocr.data import read_conversations, read_csv, write_conversations, write_csv

AWKWARD_TEXTS = [r"\frac { a , b } { c }", 'say "x"', "a\nb", r"\\ \alpha", "∑ é", "NaN", "null"]


def png(path, size=(120, 40)):
    Image.new("RGB", size, "white").save(path)
    return path


def test_csv_round_trip_keeps_awkward_latex_verbatim(tmp_path):
    rows = [(png(tmp_path / f"{i}.png"), text) for i, text in enumerate(AWKWARD_TEXTS)]
    write_csv(tmp_path / "data.csv", rows)
    back = read_csv(tmp_path / "data.csv")
    assert [text for _, _, text in back] == AWKWARD_TEXTS
    assert [image for _, image, _ in back] == [p.resolve() for p, _ in rows]
    assert "image_path,text" == (tmp_path / "data.csv").read_text().splitlines()[0]


def test_csv_paths_are_relative_so_the_folder_can_move(tmp_path):
    folder = tmp_path / "a"
    folder.mkdir()
    write_csv(folder / "data.csv", [(png(folder / "0.png"), "x")])
    shutil.move(folder, tmp_path / "b")
    (_, image, _), = read_csv(tmp_path / "b" / "data.csv")
    assert image == (tmp_path / "b" / "0.png").resolve() and image.is_file()


def test_csv_with_renamed_columns_names_the_file(tmp_path):
    (tmp_path / "data.csv").write_text("path,latex\n0.png,x\n")
    with pytest.raises(SystemExit, match=r"data.csv: expected the header 'image_path,text'"):
        read_csv(tmp_path / "data.csv")


def test_conversation_json_round_trip_and_format(tmp_path):
    rows = [(png(tmp_path / "0.png"), "x ^ { 2 }"), (png(tmp_path / "1.png"), "y")]
    write_conversations(tmp_path / "train.json", rows)
    records = json.loads((tmp_path / "train.json").read_text())
    assert records[0] == {"id": "identity_1", "conversations": [{"role": "user", "value": "0.png"},
                                                                {"role": "assistant", "value": "x ^ { 2 }"}]}
    samples = read_conversations(tmp_path / "train.json")
    assert [(s.id, s.image, s.text) for s in samples] == [("identity_1", (tmp_path / "0.png").resolve(), "x ^ { 2 }"),
                                                          ("identity_2", (tmp_path / "1.png").resolve(), "y")]


@pytest.mark.parametrize("content, message", [
    ('{"id": 1}', "expected a list of conversation records"),
    ('[{"id": "a", "conversations": [{"role": "user", "value": "0.png"}]}]', "record 0: expected"),
    ('[{"id": "a", "conversations": [{"role": "assistant", "value": "x"}, {"role": "user", "value": "0.png"}]}]',
     "record 0: turns must be a user turn"),
    ('[{"id": "a", "conversations": [{"role": "user", "value": "0.png"}, {"role": "assistant", "value": "x"}]},'
     ' {"id": "a", "conversations": [{"role": "user", "value": "1.png"}, {"role": "assistant", "value": "y"}]}]',
     "record 1: duplicate id 'a'"),
    ("[{", "not valid JSON"),
])
def test_bad_conversation_json_names_file_and_record(tmp_path, content, message):
    (tmp_path / "bad.json").write_text(content)
    with pytest.raises(SystemExit, match=message) as error:
        read_conversations(tmp_path / "bad.json")
    assert "bad.json" in str(error.value)


@pytest.mark.slow  # runs the scripts as a user does
def test_csv2json_skips_bad_rows_records_them_and_keeps_val_formulas_out_of_train(tmp_path):
    rows = [(png(tmp_path / f"{i}.png"), f"x ^ {{ {i} }}") for i in range(40)]
    rows += [(png(tmp_path / "dup.png"), "x ^ { 0 }")]  # the same formula as row 0
    rows += [(tmp_path / "missing.png", "y"), (png(tmp_path / "empty_text.png"), "  ")]
    (tmp_path / "broken.png").write_bytes(b"not an image")
    rows += [(tmp_path / "broken.png", "z")]
    write_csv(tmp_path / "latex_ocr_train.csv", rows)

    result = run_script("csv2json.py", "--val_size=10", cwd=tmp_path)

    train = read_conversations(tmp_path / "latex_ocr_train.json")
    val = read_conversations(tmp_path / "latex_ocr_val.json")
    assert len(val) == 4  # a tenth of the 41 usable rows, with a note saying so
    assert "holding out 4" in result.stdout
    assert not {s.text for s in train} & {s.text for s in val}
    rejects = pd.read_csv(tmp_path / "latex_ocr_rejects.csv")
    reasons = " | ".join(rejects["reason"])
    assert "latex_ocr_train.csv line 43: image file not found" in reasons
    assert "latex_ocr_train.csv line 44: empty text" in reasons
    assert "latex_ocr_train.csv line 45: not a readable image" in reasons
    # Every usable row is in train or val, or recorded as a val duplicate: nothing disappears.
    assert len(train) + len(val) + reasons.count("formula also in val") == 41
    assert "done:" in result.stdout and "left out -> latex_ocr_rejects.csv" in result.stdout


@pytest.mark.slow  # runs the scripts as a user does
def test_data2csv_reads_a_local_parquet_in_the_latex_ocr_schema(tmp_path):
    images = []
    for width in (200, 260, 320):
        buffer = io.BytesIO()
        Image.new("RGB", (width, 50), "white").save(buffer, format="PNG")
        images.append({"bytes": buffer.getvalue(), "path": None})
    texts = [r"\alpha , \beta", 'a "quoted" b', r"\frac { 1 } { 2 }"]
    pd.DataFrame({"image": images, "text": texts}).to_parquet(tmp_path / "train.parquet")

    result = run_script("data2csv.py", "--source=train.parquet", "--max_data_number=2", cwd=tmp_path)

    rows = read_csv(tmp_path / "latex_ocr_train.csv")
    assert [text for _, _, text in rows] == texts[:2]
    assert [Image.open(image).size for _, image, _ in rows] == [(200, 50), (260, 50)]
    assert "done: 2 train rows -> latex_ocr_train.csv" in result.stdout


@pytest.mark.slow  # runs the scripts as a user does
def test_data2csv_resumes_and_refuses_a_folder_from_another_source(tmp_path):
    run_script("data2csv.py", "--source=synthetic", "--max_data_number=6", cwd=tmp_path)
    first = (tmp_path / "latex_ocr_train.csv").read_text()
    (tmp_path / "latex_ocr_train.csv").unlink()  # the tutorial skipped everything when the folder existed
    (tmp_path / "LaTeX_OCR" / "5.png").unlink()
    result = run_script("data2csv.py", "--source=synthetic", "--max_data_number=6", cwd=tmp_path)
    assert "(1 new, 5 already there)" in result.stdout
    assert (tmp_path / "latex_ocr_train.csv").read_text() == first

    other = run_script("data2csv.py", "--source=synthetic", "--seed=7", cwd=tmp_path, check=False)
    assert other.returncode != 0 and "holds images from another source" in other.stderr


@pytest.mark.slow  # runs the scripts as a user does
def test_a_held_out_split_becomes_val_and_never_shares_a_formula_with_train(tmp_path):
    result = run_script("data2csv.py", "--source=synthetic", "--max_data_number=30", "--val_split=validation",
                        "--max_val_number=12", cwd=tmp_path)
    assert "12 validation rows -> latex_ocr_val.csv, images in LaTeX_OCR/validation/" in result.stdout
    held_out = read_csv(tmp_path / "latex_ocr_val.csv")
    # Put one held-out formula into the training CSV: csv2json must keep it out of train and say so.
    train_rows = [(image, text) for _, image, text in read_csv(tmp_path / "latex_ocr_train.csv")]
    write_csv(tmp_path / "latex_ocr_train.csv", train_rows + [(held_out[0][1], held_out[0][2])])

    result = run_script("csv2json.py", "--val_size=10", cwd=tmp_path)

    val = read_conversations(tmp_path / "latex_ocr_val.json")
    train = read_conversations(tmp_path / "latex_ocr_train.json")
    assert len(val) == 10 and {s.image for s in val} <= {image for _, image, _ in held_out}
    assert all(s.image.parent.name == "validation" for s in val)
    assert not {s.text for s in train} & {s.text for s in val}
    assert "val: 10 of 12 held-out rows from latex_ocr_val.csv" in result.stdout
    if held_out[0][2] in {s.text for s in val}:
        assert "1 row(s) whose formula or image is also in val" in result.stdout and len(train) == 30
    else:
        assert len(train) == 31
