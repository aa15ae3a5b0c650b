"""The demo page's pieces in memory: what it answers for an image, what it refuses and why, its examples."""

import io
import socket
from types import SimpleNamespace

import gradio as gr
import pytest
from PIL import Image

from latexocr import app_page
from latexocr.data import write_conversations
from latexocr.synth import synthetic_samples

LIMIT = 20_000_000


def never_called(image):
    raise AssertionError("the model ran on input the page should have refused")


@pytest.fixture(scope="module")
def formula():
    image, text = next(iter(synthetic_samples(1, seed=3)))
    return image, text


def test_an_image_gets_its_latex_rendered_and_the_time_taken(formula):
    image, text = formula
    seen = []
    latex, rendered, status = app_page.read_formula(image, lambda im: seen.append(im) or text, LIMIT)
    assert latex == text and seen == [image]
    assert isinstance(rendered, Image.Image) and rendered.width > 10 and rendered.height > 10
    assert "Read in " in status and "does not render" not in status


def test_latex_that_does_not_render_is_shown_with_a_note_and_no_picture(formula):
    latex, rendered, status = app_page.read_formula(formula[0], lambda im: r"\frac { a < b", LIMIT)
    assert latex == r"\frac { a < b" and rendered is None
    assert "The LaTeX does not render" in status
    assert "<" not in status.removeprefix("<p>").removesuffix("</p>")  # the error's text is escaped, not HTML


def test_an_empty_prediction_says_so(formula):
    latex, rendered, status = app_page.read_formula(formula[0], lambda im: "", LIMIT)
    assert latex == "" and rendered is None and "The model wrote no LaTeX for this image" in status
    assert "render" not in status


def test_an_empty_submission_is_refused_with_what_to_do():
    with pytest.raises(gr.Error, match="No image yet: upload, drag or paste"):
        app_page.read_formula(None, never_called, LIMIT)


def test_a_huge_image_is_refused_by_its_size(tmp_path):
    Image.new("1", (5000, 4001)).save(tmp_path / "huge.png")
    with Image.open(tmp_path / "huge.png") as huge, pytest.raises(gr.Error) as refused:
        app_page.read_formula(huge, never_called, LIMIT)
    assert "5000 x 4001 px (20,005,000 px)" in refused.value.message
    assert "20,000,000 px this page takes (app.py --max_image_pixels)" in refused.value.message


def test_an_image_cut_short_is_refused(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (400, 100), "white").save(buffer, format="PNG")
    cut = Image.open(io.BytesIO(buffer.getvalue()[:len(buffer.getvalue()) // 2]))  # its header is intact
    with pytest.raises(gr.Error, match="The image cannot be decoded"):
        app_page.read_formula(cut, never_called, LIMIT)


def uploaded(path, name):
    """An upload as the page's button hands it over: a file in Gradio's upload folder, with the user's file name."""
    component = gr.Image(type="pil", image_mode=None)
    return app_page.uploaded_image(component, dict(path=str(path), orig_name=name, meta={"_type": "gradio.FileData"}))


def test_an_upload_that_is_not_an_image_is_named_by_the_users_file_name(tmp_path):
    (tmp_path / "cached.png").write_text("not an image")
    with pytest.raises(gr.Error) as refused:
        uploaded(tmp_path / "cached.png", "notes.png")
    assert "notes.png is not an image (UnidentifiedImageError): upload a PNG" in refused.value.message
    assert str(tmp_path) not in refused.value.message  # where the server keeps uploads is none of the user's business


def test_a_decompression_bomb_is_refused_as_too_large(tmp_path, monkeypatch):
    Image.new("1", (100, 100)).save(tmp_path / "cached.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow refuses twice this: the bomb is 10,000 px
    with pytest.raises(gr.Error, match="big.png is too large to open"):
        uploaded(tmp_path / "cached.png", "big.png")


def test_an_upload_reaches_the_model_as_it_was_with_its_transparency(tmp_path):
    Image.new("RGBA", (120, 40), (0, 0, 0, 0)).save(tmp_path / "cached.png")
    image = uploaded(tmp_path / "cached.png", "a.png")
    assert image.mode == "RGBA" and image.size == (120, 40)  # load_image puts it on white; Gradio's RGB makes black
    assert app_page.uploaded_image(gr.Image(type="pil"), None) is None  # nothing uploaded: read_formula says so


def val_set(folder, n):
    images = []
    for i, (image, text) in enumerate(synthetic_samples(n, seed=1)):
        image.save(folder / f"{i}.png")
        images.append((folder / f"{i}.png", text))
    write_conversations(folder / "val.json", images)
    return [path for path, _ in images]


def test_examples_are_the_first_readable_val_images(tmp_path):
    images = val_set(tmp_path, 4)
    images[1].write_text("no longer an image")
    recorded = dict(val_json_path="elsewhere/val.json", val_json_abspath=str(tmp_path / "val.json"))
    assert app_page.example_images(recorded, 2) == [images[0], images[2]]
    assert app_page.example_images(recorded, 10) == [images[0], images[2], images[3]]
    assert app_page.example_images(recorded, 0) == []


def test_examples_fall_back_to_the_relative_val_path_and_to_none(tmp_path, monkeypatch):
    images = val_set(tmp_path, 2)
    monkeypatch.chdir(tmp_path)
    moved = dict(val_json_path="val.json", val_json_abspath="/nowhere/val.json")  # trained on another machine
    assert app_page.example_images(moved, 4) == images
    assert app_page.example_images(dict(val_json_path="", val_json_abspath=""), 4) == []
    assert app_page.example_images(dict(val_json_path="gone.json"), 4) == []


def test_a_port_in_use_is_refused_with_what_to_do(tmp_path):
    run = SimpleNamespace(description="a fake run", predict=never_called)
    page = app_page.build(run, val_set(tmp_path, 1), max_new_tokens=8, max_image_pixels=LIMIT)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        message = f"cannot serve on 127.0.0.1:{port}: the port is in use"
        with pytest.raises(SystemExit, match=message):
            app_page.check_address("127.0.0.1", port)  # before the model loads
        with pytest.raises(SystemExit, match=message):
            app_page.serve(page, "127.0.0.1", port)  # taken after that look
    app_page.check_address("127.0.0.1", port)  # free again: the look itself leaves nothing behind
