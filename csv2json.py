"""Turn the image/text CSV into train and val conversation JSON files.

Reads:  latex_ocr_train.csv (written by data2csv.py) and the images it lists; latex_ocr_val.csv too when
        data2csv.py saved a held-out split there (refused when data2csv.py recorded another source for it)
Writes: latex_ocr_train.json, latex_ocr_val.json; latex_ocr_rejects.csv listing any row left out and why
Run:    python csv2json.py
Rows whose image is missing, unreadable or listed twice, or whose text is empty, are skipped and recorded in the
rejects file (never dropped silently). Val comes from the held-out CSV when there is one, else from a seeded split
of the training rows. Train and val never share a formula or an image.
"""

import random
from pathlib import Path

from latexocr import settings
from latexocr.config import apply_overrides

# -----------------------------------------------------------------------------
CSV_PATH = "latex_ocr_train.csv"  # from data2csv.py
VAL_CSV_PATH = "latex_ocr_val.csv"  # held-out rows from data2csv.py --val_split; used for val when it exists
TRAIN_JSON_PATH = "latex_ocr_train.json"
VAL_JSON_PATH = "latex_ocr_val.json"
REJECTS_PATH = "latex_ocr_rejects.csv"  # rows left out, with the reason
VAL_SIZE = 100  # samples scored after training; -1 = all held-out rows; without a held-out CSV, at most a tenth
SEED = 42  # shuffles rows before the split
# -----------------------------------------------------------------------------
config = apply_overrides(globals(), rules=settings.CSV2JSON)

# --- setup -------------------------------------------------------------------
from latexocr import data  # noqa: E402
from latexocr.metrics import normalize  # noqa: E402

data.check_distinct({"csv_path": CSV_PATH, "val_csv_path": VAL_CSV_PATH, "train_json_path": TRAIN_JSON_PATH,
                     "val_json_path": VAL_JSON_PATH, "rejects_path": REJECTS_PATH})
has_held_out = bool(VAL_CSV_PATH) and Path(VAL_CSV_PATH).is_file()
if has_held_out:
    sources = [data.csv_source(path) for path in (CSV_PATH, VAL_CSV_PATH)]
    if all(sources) and not data.same_source(*sources, ignore=("split",)):
        raise SystemExit(f"{VAL_CSV_PATH} holds held-out rows of another source ({data.describe_source(sources[1])}) "
                         f"than {CSV_PATH} ({data.describe_source(sources[0])}). Delete it to split val from the "
                         "training rows, save this source's held-out split with data2csv.py --val_split, or pass "
                         "--val_csv_path=<a held-out CSV of this source>.")
elif VAL_SIZE == -1:
    raise SystemExit(f"--val_size=-1 takes every held-out row, and there is no held-out CSV ({VAL_CSV_PATH}): "
                     "pass a number of training rows to hold out, e.g. --val_size=100.")

# --- data --------------------------------------------------------------------
rejects = []
rows = data.usable_rows(CSV_PATH, rejects)
held_out = data.usable_rows(VAL_CSV_PATH, rejects) if has_held_out else None
for image, reason in rejects[:5]:
    print(f"skipped {reason}: {image}")
if not rows:
    raise SystemExit(f"{CSV_PATH}: none of its rows is usable (see above). Rerun data2csv.py.")

# --- split -------------------------------------------------------------------
rng = random.Random(SEED)
rng.shuffle(rows)
if held_out is not None:
    rng.shuffle(held_out)
    val, train = held_out[:None if VAL_SIZE == -1 else VAL_SIZE], rows
    print(f"val: {len(val)} of {len(held_out)} held-out rows from {VAL_CSV_PATH}")
else:
    val_size = VAL_SIZE
    if val_size > len(rows) // 10:
        val_size = max(1, len(rows) // 10)
        print(f"val_size={VAL_SIZE} would leave too little to train on with {len(rows)} rows: "
              f"holding out {val_size} (a tenth). Set --val_size to choose.")
    val, train = rows[:val_size], rows[val_size:]
if not val:
    raise SystemExit(f"{VAL_CSV_PATH}: no usable held-out rows. Fix or delete it to split val from {CSV_PATH}.")
val_formulas, val_images = {normalize(text) for _, text in val}, {image for image, _ in val}
overlap = [(image, "formula also in val" if normalize(text) in val_formulas else "image also in val")
           for image, text in train if normalize(text) in val_formulas or image in val_images]
train = [(image, text) for image, text in train if normalize(text) not in val_formulas and image not in val_images]
if overlap:
    print(f"left out of train: {len(overlap)} row(s) whose formula or image is also in val "
          f"(recorded in {REJECTS_PATH})")
if not train:
    raise SystemExit(f"{CSV_PATH}: no rows left for training once val formulas are left out.")

# --- save --------------------------------------------------------------------
data.write_conversations(TRAIN_JSON_PATH, train)
data.write_conversations(VAL_JSON_PATH, val)
rejects += overlap
if rejects:
    data.write_csv(REJECTS_PATH, rejects, header=("image_path", "reason"))
else:
    Path(REJECTS_PATH).unlink(missing_ok=True)

# --- summary -----------------------------------------------------------------
print(f"done: {len(train)} train -> {TRAIN_JSON_PATH}, {len(val)} val -> {VAL_JSON_PATH}, "
      f"{len(rejects)} left out" + (f" -> {REJECTS_PATH}" if rejects else ""))
