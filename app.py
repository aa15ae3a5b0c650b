"""Serve a web page that reads a picture of a formula into LaTeX with the model train.py trained.

The page takes an uploaded, dragged or pasted image, shows the predicted LaTeX (with a copy button) and that LaTeX
rendered next to the image, so a glance says whether they match, and offers a few val images as examples.
It predicts as infer.py does (latexocr.predictor): the prompt, image sizing and precision are the run's own.
Reads:  output/Qwen2-VL-2B-LatexOCR/ (adapter + train_config.json), or the merged model folder export.py wrote;
        the val JSON recorded in train_config.json, for the examples
Writes: nothing of its own; Gradio keeps uploads in its temporary folder (GRADIO_TEMP_DIR) while it serves
Run:    python app.py                          then open http://127.0.0.1:7860
        python app.py --output_dir=demo/output/Qwen2-VL-2B-LatexOCR     (after bash run.sh demo)
        python app.py --host=0.0.0.0 --port=8080   (reachable from other machines, on port 8080)
        python app.py --adapter=none           (the base model alone, to see what fine-tuning bought)
"""

from latexocr import settings
from latexocr.config import apply_overrides

# -----------------------------------------------------------------------------
OUTPUT_DIR = "output/Qwen2-VL-2B-LatexOCR"  # train.py's output folder, or export.py's merged model folder
ADAPTER = ""  # adapter folder; "" = OUTPUT_DIR; none = the base model alone
MODEL_ID = ""  # base model; "" = the one recorded in OUTPUT_DIR/train_config.json
HOST = "127.0.0.1"  # address to listen on: 127.0.0.1 = this machine only | 0.0.0.0 = every network
PORT = 7860  # TCP port of the page
PRECISION = ""  # "" = the run's own (train_config.json's eval_precision, else float32) | auto | float32 | bfloat16
MAX_NEW_TOKENS = 256  # generation cap per formula
DEVICE = "auto"  # auto (CUDA if present) | cuda | cpu
EXAMPLES = 4  # val images offered as examples; 0 = none
MAX_IMAGE_PIXELS = 20_000_000  # px (width x height); a larger upload gets a message, not a prediction
COMPILE_GENERATION = "false"  # true | false | auto (never here: one image a request): static KV cache, CUDA graphs
# -----------------------------------------------------------------------------
config = apply_overrides(globals(), rules=settings.APP)

# --- setup -------------------------------------------------------------------
from latexocr import app_page, predictor  # noqa: E402

app_page.check_address(HOST, PORT)
train_config = predictor.read_train_config(OUTPUT_DIR)
precision = PRECISION or train_config.get("eval_precision", "float32")

# --- data --------------------------------------------------------------------
examples = app_page.example_images(train_config, EXAMPLES)
print(f"examples: {len(examples)} val image(s)")

# --- model -------------------------------------------------------------------
# COMPILE_GENERATION is false by default: the page reads one image per request, and a request whose image needs a
# longer cache than any before would wait half a minute while its CUDA graphs compile
run = predictor.load(OUTPUT_DIR, ADAPTER, MODEL_ID, precision, DEVICE, COMPILE_GENERATION)
print(f"model: {run.description}")

# --- serve -------------------------------------------------------------------
app_page.serve(app_page.build(run, examples, MAX_NEW_TOKENS, MAX_IMAGE_PIXELS), HOST, PORT)
