"""The page app.py serves: a formula image in, its LaTeX out, rendered beside the image to compare at a glance.

It predicts through the run that predictor.load returned, so the prompt, the image sizing and the precision are
the run's own. One prediction runs at a time (the model is not shared between threads); other visitors wait in
Gradio's queue and see their place in it. A file that is not an image, a huge image or an empty submission gets a
message on the page, and the server goes on serving.
"""

import html
import itertools
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from latexocr import data, render

# A local demo never reports to Gradio's servers: no usage analytics, no version check (both read this variable).
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
try:
    import gradio as gr
    from gradio.data_classes import ImageData
except ImportError:
    raise SystemExit("app.py needs Gradio, which requirements.txt pins: pip install -r requirements.txt") from None

MAX_UPLOAD = "50mb"  # a formula picture is tens of KB; the cap keeps uploads from filling the server's temp folder
READABLE = "a PNG, JPEG or WebP picture of a formula"


def refusal(message: str) -> gr.Error:
    """A message on the page for input the model cannot take: the user's to fix, so no traceback in the log."""
    return gr.Error(html.escape(message), print_exception=False)


def uploaded_image(component: gr.Image, payload: dict | None) -> Image.Image | None:
    """The upload as `component` hands it over (a file Gradio has checked lies in its upload folder), or a refusal
    that says why it is not an image. Gradio's own preprocessing would answer a bare "Error" and log a traceback."""
    if payload is None:
        return None
    upload = ImageData.model_validate(payload)
    try:
        return component.preprocess(upload)
    except Image.DecompressionBombError as error:
        raise refusal(f"{upload.orig_name or 'the file'} is too large to open ({error}): "
                      "crop it to the formula or scale it down.") from None
    except (OSError, ValueError) as error:
        # The error's own text names the upload's path on the server; the user knows the file by its own name.
        raise refusal(f"{upload.orig_name or 'the file'} is not an image ({type(error).__name__}): "
                      f"upload {READABLE}.") from None


def example_images(train_config: dict, count: int) -> list[Path]:
    """Up to `count` readable images of the val set the run recorded (first ones first); none if it had none here."""
    recorded = [train_config.get("val_json_abspath", ""), train_config.get("val_json_path", "")]
    json_path = next((Path(p) for p in recorded if p and Path(p).is_file()), None)
    if json_path is None or count == 0:
        return []
    readable = (s.image for s in data.read_conversations(json_path) if data.image_problem(s.image) is None)
    return list(itertools.islice(readable, count))


def read_formula(image: Image.Image | None, predict: Callable[[Image.Image], str],
                 max_image_pixels: int) -> tuple[str, Image.Image | None, str]:
    """The LaTeX for one uploaded image, that LaTeX rendered (None when it does not render), and a status line.
    Input the model cannot take raises refusal()."""
    if image is None:
        raise refusal(f"No image yet: upload, drag or paste {READABLE}, then press Read formula.")
    width, height = image.size  # from the file's header: nothing is decoded yet
    if width * height > max_image_pixels:
        raise refusal(f"The image is {width} x {height} px ({width * height:,} px), more than the "
                      f"{max_image_pixels:,} px this page takes (app.py --max_image_pixels): "
                      "crop it to the formula or scale it down.")
    try:
        image.load()
    except (OSError, ValueError) as error:  # cut short or corrupt after a valid header
        raise refusal(f"The image cannot be decoded ({error}): upload {READABLE}.") from None
    started = time.perf_counter()
    latex = predict(image)
    predicted = time.perf_counter()
    if not latex:
        return latex, None, f"<p>The model wrote no LaTeX for this image ({predicted - started:.2f} s).</p>"
    try:
        rendered, note = render.render(latex), ""
    except ValueError as error:
        rendered, note = None, f" The LaTeX does not render: {error}"
    took = f"Read in {predicted - started:.2f} s, rendered in {time.perf_counter() - predicted:.2f} s."
    return latex, rendered, f"<p>{html.escape(took + note)}</p>"


def build(run, examples: list[Path], max_new_tokens: int, max_image_pixels: int) -> gr.Blocks:
    """The page for `run` (predictor.Predictor: .predict and .description), offering `examples` to try."""
    def read(payload):
        return read_formula(uploaded_image(image, payload),
                            lambda im: run.predict([im], 1, max_new_tokens, show_progress=False)[0], max_image_pixels)

    with gr.Blocks(title="LaTeX OCR", analytics_enabled=False) as page:
        gr.Markdown("# LaTeX OCR\nUpload, drag or paste a picture of a formula. The model writes its LaTeX, and the "
                    "LaTeX is rendered beside the picture: if the two look alike, the LaTeX is right.\n\n"
                    f"Model: `{run.description}`")
        with gr.Row(equal_height=True):
            # image_mode=None hands the image over as uploaded: load_image flattens transparency onto white.
            # format: the examples reach the browser, and come back, as lossless PNG rather than Gradio's WebP.
            image = gr.Image(label="Formula image", type="pil", image_mode=None, format="png",
                             sources=["upload", "clipboard"], elem_id="formula-image")
            rendered = gr.Image(label="The LaTeX, rendered", type="pil", format="png", interactive=False,
                                buttons=["download", "fullscreen"], elem_id="rendered")
        button = gr.Button("Read formula", variant="primary", elem_id="read")
        latex = gr.Textbox(label="LaTeX", buttons=["copy"], interactive=False, lines=2, elem_id="latex")
        status = gr.HTML(elem_id="status")
        if examples:
            gr.Examples([[Image.open(path)] for path in examples], inputs=[image], label="Examples from the val set")
        # preprocess=False: read opens the upload itself, to answer a file that is no image with a message.
        button.click(read, inputs=[image], outputs=[latex, rendered, status], preprocess=False, concurrency_limit=1)
    return page


def check_address(host: str, port: int) -> None:
    """Stop now, not after the model has loaded for minutes, when nothing can listen on host:port."""
    try:
        with socket.create_server((host, port)):
            pass
    except OSError:
        raise SystemExit(_cannot_serve(host, port)) from None


def serve(page: gr.Blocks, host: str, port: int) -> None:
    """Serve the page at host:port until Ctrl+C; print its address once it answers."""
    try:
        page.queue(default_concurrency_limit=1).launch(server_name=host, server_port=port, quiet=True,
                                                       prevent_thread_lock=True, ssr_mode=False,
                                                       max_file_size=MAX_UPLOAD)
    except OSError:  # taken since check_address looked
        raise SystemExit(_cannot_serve(host, port)) from None
    print(f"page: {page.local_url} (Ctrl+C stops it)", flush=True)
    page.block_thread()


def _cannot_serve(host: str, port: int) -> str:
    return (f"cannot serve on {host}:{port}: the port is in use, or {host} is not an address of this machine. "
            "Pass another --port, or --host=127.0.0.1.")
