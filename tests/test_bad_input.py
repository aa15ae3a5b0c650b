"""Bad input gets a clear answer naming the file, row or value, or a recorded skip; never a deep traceback."""

import json

import pandas as pd
import pytest
from PIL import Image

from conftest import run_script, trained_briefly
from latexocr import tiny
from latexocr.data import write_conversations, write_csv

pytestmark = pytest.mark.slow  # runs the scripts as a user does


def png(path, size=(200, 50)):
    Image.new("RGB", size, "white").save(path)
    return path


def no_traceback(result):
    assert "Traceback" not in result.stderr, result.stderr[-2000:]


def test_csv2json_records_each_bad_row_with_its_reason(tmp_path):
    good = [(png(tmp_path / f"{i}.png"), f"x _ {{ {i} }}") for i in range(20)]
    (tmp_path / "zero.png").write_bytes(b"")
    truncated = png(tmp_path / "full.png", (400, 100)).read_bytes()
    (tmp_path / "truncated.png").write_bytes(truncated[:len(truncated) // 2])
    (tmp_path / "text.png").write_text("this is not an image")
    Image.new("1", (15000, 15000)).save(tmp_path / "bomb.png")  # 225 Mpx: past Pillow's bomb limit
    Image.new("RGB", (400, 100), "white").save(tmp_path / "full.jpg")
    (tmp_path / "truncated.jpg").write_bytes((tmp_path / "full.jpg").read_bytes()[:-200])
    bad = [(tmp_path / "zero.png", "a"), (tmp_path / "truncated.png", "b"), (tmp_path / "text.png", "c"),
           (tmp_path / "bomb.png", "d"), (png(tmp_path / "blank_text.png"), " \t "),
           (png(tmp_path / "nan.png"), "NaN"), (tmp_path / "truncated.jpg", "e"), (png(tmp_path / "no_text.png"), "")]
    write_csv(tmp_path / "latex_ocr_train.csv", good + bad)

    result = run_script("csv2json.py", "--val_size=2", cwd=tmp_path)

    no_traceback(result)
    reasons = dict(zip(pd.read_csv(tmp_path / "latex_ocr_rejects.csv")["image_path"].map(lambda p: p.split("/")[-1]),
                       pd.read_csv(tmp_path / "latex_ocr_rejects.csv")["reason"]))
    assert "line 22: image file is empty (0 bytes)" in reasons["zero.png"]
    assert "line 23: not a readable image" in reasons["truncated.png"]
    assert "line 24: not a readable image" in reasons["text.png"]
    assert "line 25: image too large" in reasons["bomb.png"]
    assert "line 26: empty text" in reasons["blank_text.png"]
    assert "nan.png" not in reasons  # "NaN" is text like any other, not a missing value
    assert "line 28: not a readable image (OSError: image file is truncated" in reasons["truncated.jpg"]
    assert "line 29: empty text" in reasons["no_text.png"]
    assert "7 left out" in result.stdout


@pytest.mark.parametrize("content", ["path,latex\n0.png,x\n", "image_path\n0.png\n"])  # renamed, missing
def test_a_csv_with_renamed_or_missing_columns_is_refused_by_name(tmp_path, content):
    png(tmp_path / "0.png")
    (tmp_path / "latex_ocr_train.csv").write_text(content)
    found = str(content.splitlines()[0].split(","))
    for script, args, message in [
        ("data2csv.py", ["--source=latex_ocr_train.csv", "--csv_path=out.csv"],
         f"latex_ocr_train.csv: expected columns 'image' (or 'image_path') and 'text', found {found}"),
        ("csv2json.py", [], f"latex_ocr_train.csv: expected the header 'image_path,text', found {found}")]:
        result = run_script(script, *args, cwd=tmp_path, check=False)
        assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
        no_traceback(result)


def test_data2csv_records_source_images_it_cannot_read(tmp_path):
    png(tmp_path / "ok.png")
    (tmp_path / "text.png").write_text("this is not an image")
    rows = "image_path,text\nok.png,x\nmissing.png,y\ntext.png,z\n"
    (tmp_path / "source.csv").write_text(rows)

    result = run_script("data2csv.py", "--source=source.csv", cwd=tmp_path)

    no_traceback(result)
    reasons = list(pd.read_csv(tmp_path / "latex_ocr_train.rejects.csv")["reason"])
    assert reasons[0] == "row 1: image file not found"
    assert reasons[1].startswith("row 2: not a readable image (UnidentifiedImageError")
    assert "1 train rows -> latex_ocr_train.csv" in result.stdout
    assert "2 skipped -> latex_ocr_train.rejects.csv" in result.stdout
    (tmp_path / "source.csv").write_text(rows.replace("missing.png,y\ntext.png,z\n", ""))  # the bad rows removed
    run_script("data2csv.py", "--source=source.csv", "--dataset_dir=LaTeX_OCR_fixed", cwd=tmp_path)  # a new source
    assert not (tmp_path / "latex_ocr_train.rejects.csv").exists()  # the old list would name rows no longer there


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A folder with data and an adapter trained for one step on the tiny model."""
    return trained_briefly(tmp_path_factory.mktemp("trained"), "--val_json_path=")


def test_train_preflight_stops_before_loading_weights(trained, tmp_path):
    (tmp_path / "ok.png").write_bytes((trained / "LaTeX_OCR" / "0.png").read_bytes())
    write_conversations(tmp_path / "missing.json", [(tmp_path / "ok.png", "x"), (tmp_path / "gone.png", "y")])
    write_conversations(tmp_path / "long.json", [(tmp_path / "ok.png", "x + " * 3000)])
    for name, message in [("missing.json", "record identity_2: image file not found"),
                          ("long.json", "tokens, more than max_length=2048 (answer of 6001 tokens")]:
        result = run_script("train.py", "--model_id=tiny-random", f"--train_json_path={name}", "--val_json_path=",
                            "--swanlab_mode=disabled", cwd=tmp_path, check=False)
        assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
        assert "model:" not in result.stdout  # stopped before the weights were loaded
        no_traceback(result)


def test_a_vision_cache_over_its_ram_limit_is_left_off_and_training_goes_on(trained, tmp_path):
    run_script("train.py", "--model_id=tiny-random", "--val_json_path=", "--max_steps=1",
               "--vision_cache_gib=0.0001", f"--output_dir={tmp_path / 'out'}", "--swanlab_mode=disabled",
               cwd=trained)
    results = json.loads((tmp_path / "out" / "train_results.json").read_text())
    assert not results["vision_cache"] and "more than vision_cache_gib=0.0001" in results["plan"][0]
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("model_id, message", [
    ("/no/such/folder", "no such folder"),
    ("empty_folder", "has no config.json"),
])
def test_a_wrong_model_id_says_what_to_pass(trained, model_id, message):
    (trained / "empty_folder").mkdir(exist_ok=True)
    result = run_script("train.py", f"--model_id={model_id}", "--device=cpu", "--swanlab_mode=disabled",
                        cwd=trained, check=False)
    assert result.returncode != 0 and message in result.stderr
    no_traceback(result)


def test_infer_explains_a_missing_or_mismatched_adapter(trained, tmp_path):
    result = run_script("infer.py", f"--output_dir={tmp_path}", cwd=trained, check=False)
    assert result.returncode != 0 and "is not a folder written by train.py" in result.stderr

    no_adapter = tmp_path / "no_adapter"
    no_adapter.mkdir()
    adapter_dir = trained / "output" / "Qwen2-VL-2B-LatexOCR"
    (no_adapter / "train_config.json").write_text((adapter_dir / "train_config.json").read_text())
    result = run_script("infer.py", f"--output_dir={no_adapter}", "--image=latex_ocr_val.json", cwd=trained,
                        check=False)
    assert result.returncode != 0 and "no adapter_model.safetensors" in result.stderr

    other_base = tiny.build_model_folder(tmp_path / "other", dict(tiny.TINY_DIMENSIONS, hidden_size=32,
                                                                  mrope_section=[1, 2, 1]))
    result = run_script("infer.py", f"--model_id={other_base}", "--image=latex_ocr_val.json", cwd=trained,
                        check=False)
    assert result.returncode != 0 and "does not fit" in result.stderr and "it was trained on" in result.stderr
    no_traceback(result)
    assert json.loads((adapter_dir / "train_config.json").read_text())["model_id"] == "tiny-random"
