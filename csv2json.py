"""Turn the image/text CSV into train and val conversation JSON files.

Reads:  latex_ocr_train.csv (written by data2csv.py) and the images it lists
Writes: latex_ocr_train.json, latex_ocr_val.json; latex_ocr_rejects.csv listing any row left out and why
Run:    python csv2json.py
Rows whose image is missing or unreadable, or whose text is empty, are skipped and recorded in the rejects
file (never dropped silently). The split is seeded; train and val never share a formula.
"""

import random
from pathlib import Path

from latexocr.config import apply_overrides

# -----------------------------------------------------------------------------
CSV_PATH = "latex_ocr_train.csv"  # from data2csv.py
TRAIN_JSON_PATH = "latex_ocr_train.json"
VAL_JSON_PATH = "latex_ocr_val.json"
REJECTS_PATH = "latex_ocr_rejects.csv"  # rows left out, with the reason
VAL_SIZE = 100  # samples held out for scoring; capped at a tenth of the rows for small data
SEED = 42  # shuffles rows before the split
# -----------------------------------------------------------------------------
config = apply_overrides(globals())

# --- setup -------------------------------------------------------------------
from tqdm.auto import tqdm  # noqa: E402

from latexocr.data import image_problem, read_csv, write_conversations, write_csv  # noqa: E402
from latexocr.metrics import normalize  # noqa: E402

# --- data --------------------------------------------------------------------
rows = read_csv(CSV_PATH)
good, rejects = [], []
for line, image, text in tqdm(rows, desc="checking rows", unit="row"):
    problem = "empty text" if not text.strip() else image_problem(image)
    if problem:
        rejects.append((line, image, problem))
    else:
        good.append((image, text.strip()))
for line, image, problem in rejects[:5]:
    print(f"skipped {CSV_PATH} line {line}: {problem}: {image}")
if not good:
    raise SystemExit(f"{CSV_PATH}: none of its {len(rows)} rows is usable (see above). Rerun data2csv.py.")

# --- split -------------------------------------------------------------------
random.Random(SEED).shuffle(good)
val_size = VAL_SIZE
if val_size > len(good) // 10:
    val_size = max(1, len(good) // 10)
    print(f"val_size={VAL_SIZE} would leave too little to train on with {len(good)} rows: "
          f"holding out {val_size} (a tenth). Set --val_size to choose.")
val, train = good[:val_size], good[val_size:]
val_formulas = {normalize(text) for _, text in val}
overlap = [(image, text) for image, text in train if normalize(text) in val_formulas]
train = [(image, text) for image, text in train if normalize(text) not in val_formulas]
if overlap:
    print(f"left out of train: {len(overlap)} row(s) whose formula is also in val (recorded in {REJECTS_PATH})")
if not train:
    raise SystemExit(f"{CSV_PATH}: no rows left for training after holding out {val_size} for val.")

# --- save --------------------------------------------------------------------
write_conversations(TRAIN_JSON_PATH, train)
write_conversations(VAL_JSON_PATH, val)
reject_rows = [(image, f"line {line}: {problem}") for line, image, problem in rejects]
reject_rows += [(image, "formula also in val") for image, _ in overlap]
if reject_rows:
    write_csv(REJECTS_PATH, reject_rows, header=("image_path", "reason"))
else:
    Path(REJECTS_PATH).unlink(missing_ok=True)

# --- summary -----------------------------------------------------------------
print(f"done: {len(train)} train -> {TRAIN_JSON_PATH}, {len(val)} val -> {VAL_JSON_PATH}, "
      f"{len(reject_rows)} left out" + (f" -> {REJECTS_PATH}" if reject_rows else ""))
