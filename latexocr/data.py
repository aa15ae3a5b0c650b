"""The files handed from one stage to the next: the image/text CSV, the conversation JSON, and the images they list.

Paths inside both are stored relative to the file that lists them, so a data folder can move. Every reader names
the file and the line or record it cannot use, and says what to do; every writer writes through a temporary file.
"""

import codecs
import csv
import hashlib
import io
import json
import math
import numbers
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath

from PIL import Image, ImageOps
from tqdm.auto import tqdm

CSV_COLUMNS = ("image_path", "text")
SOURCE_RECORD = "source.json"  # in a folder of images data2csv.py saved: where they came from
# qwen-vl-utils (smart_resize) refuses an image whose long side is more than this many times its short side.
MAX_ASPECT_RATIO = 200
# Files named like images that Pillow cannot read as pixels.
VECTOR_FORMATS = {".svg": "an SVG drawing", ".svgz": "an SVG drawing", ".pdf": "a PDF document",
                  ".eps": "an EPS drawing", ".ps": "a PostScript document"}
# Roles as other tools spell them (ShareGPT's "from": "human" / "gpt").
ROLE_NAMES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}


@dataclass(frozen=True)
class Sample:
    id: str
    image: Path  # absolute
    text: str


# --- writing -----------------------------------------------------------------

def plain_mode(folder: bool = False) -> int:
    """The mode open() or mkdir() gives under the current umask; mkstemp and mkdtemp give one only the owner can read,
    and the images, JSON and reports are for other users and web servers too."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if folder else 0o666) & ~umask


def make_readable(folder: str | Path) -> None:
    """Every file and folder under folder with the mode open() and mkdir() would have given it (safetensors writes
    weights for their owner alone, mkdtemp makes private folders)."""
    for path in Path(folder).rglob("*"):
        path.chmod(plain_mode(folder=path.is_dir()))


def staging_folder(target: str | Path) -> Path:
    """A new hidden folder beside target, readable as a plain mkdir() makes it, to write a folder into before it is
    renamed to target whole."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    folder.chmod(plain_mode(folder=True))
    return folder


def atomic_write(path: str | Path, write, suffix: str = ".tmp") -> None:
    """write(temporary path) beside path, then rename it into place, so a crash never leaves half a file. The file gets
    the mode a plain open() would: the earlier file's when it replaces one, else the umask's."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777 if path.is_file() else plain_mode()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8", newline=""))


def sha256(path: str | Path) -> str:
    """The file's content as a short fingerprint: the same data under another name is the same data."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(files: list[Path]) -> str:
    """One file's sha256, or for several the sha256 of their names and sha256s: the content, wherever it lies."""
    if len(files) == 1:
        return sha256(files[0])
    lines = "".join(f"{sha256(f)}  {f.name}\n" for f in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def check_distinct(paths: dict[str, str]) -> None:
    """Stop when two settings (name -> path) name the same file: one output would overwrite another, or an input."""
    seen = {}
    for name, value in paths.items():
        if not value:
            continue
        key = Path(value).expanduser().resolve()
        if key in seen:
            raise SystemExit(f"--{seen[key]}={paths[seen[key]]} and --{name}={value} are the same file: writing one "
                             f"would overwrite the other. Pass another --{name}.")
        seen[key] = name


# --- reading text files ------------------------------------------------------

def read_text(path: str | Path) -> str:
    """A text file as UTF-8 (a byte-order mark dropped); other encodings stop with the line and how to convert."""
    raw = Path(path).read_bytes()
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise SystemExit(f"{path}: UTF-16 text, but UTF-8 is expected. Save it as UTF-8 (Excel: 'CSV UTF-8'), or "
                         f"convert it: iconv -f UTF-16 -t UTF-8 '{path}' > utf8_{Path(path).name}")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise SystemExit(f"{path}, line {line}: not UTF-8 (byte 0x{raw[e.start]:02x}), but UTF-8 is expected. Save it "
                         f"as UTF-8, or convert it, e.g. from Windows-1252: iconv -f WINDOWS-1252 -t UTF-8 '{path}' > "
                         f"utf8_{Path(path).name}") from None


def read_json(path: str | Path):
    """A JSON file, numbers kept as the text they are written as (a formula `12` or `1.50` is text)."""
    try:
        return json.loads(read_text(path), parse_int=str, parse_float=str, parse_constant=str)
    except json.JSONDecodeError as e:
        raise SystemExit(f"{path}, line {e.lineno} column {e.colno}: not valid JSON ({e.msg}). It was cut short or "
                         "edited by hand: write it again, or fix that line.") from None


def read_json_lines(path: str | Path) -> list[tuple[int, object]]:
    """(line number, value) for each non-blank line of a JSONL file, numbers kept as text."""
    values = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            values.append((number, json.loads(line, parse_int=str, parse_float=str, parse_constant=str)))
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}, line {number}: not valid JSON ({e.msg} at column {e.colno}). Each line must "
                             "be one JSON object; fix or remove that line.") from None
    return values


def read_table(path: str | Path) -> tuple[list[str], list[tuple[int, dict]]]:
    """The header and the rows (CSV line, {lower-case column: value}) of a CSV; tab- and semicolon-separated files
    (a TSV, a European Excel export) are read too, told apart by their header line."""
    text = read_text(path)
    first_line = text.split("\n", 1)[0]
    delimiter = next((d for d in (",", "\t", ";") if d in first_line), ",")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = [name.strip() for name in next(reader, [])]
    if not header:
        raise SystemExit(f"{path}: empty, not even a header. Expected the header 'image_path,text', then a row "
                         "per image.")
    columns = [name.lower() for name in header]
    rows = []
    for record in reader:
        if not record:  # a blank line, e.g. at the end
            continue
        if len(record) != len(columns):
            hint = ("quote a text that contains a comma" if len(record) > len(columns) else "a field is missing")
            raise SystemExit(f"{path}, line {reader.line_num}: {len(record)} fields where the header has "
                             f"{len(columns)} ({delimiter.join(header)}): {record!r}; {hint}.")
        rows.append((reader.line_num, dict(zip(columns, record))))
    if not rows:
        raise SystemExit(f"{path}: a header and no rows. Write the rows, or rerun data2csv.py.")
    return header, rows


# --- the image/text CSV --------------------------------------------------------

def relative_to_file(path: Path, listing_file: Path) -> str:
    """`path` as stored in `listing_file`: relative to its folder where possible, with forward slashes."""
    try:
        return Path(os.path.relpath(Path(path).resolve(), Path(listing_file).resolve().parent)).as_posix()
    except ValueError:  # another drive on Windows
        return Path(path).resolve().as_posix()


def resolve_from_file(stored: str, listing_file: Path) -> Path:
    """A path as stored in listing_file, made absolute; a Windows path (backslashes) is read as one where no file has
    the name with the backslashes in it."""
    folder = Path(listing_file).resolve().parent
    path = folder / Path(stored).expanduser()
    if "\\" in stored and not path.exists():
        path = folder / PureWindowsPath(stored).as_posix()
    return path.resolve()


def write_csv(csv_path: str | Path, rows: list[tuple[Path, str]], header: tuple[str, str] = CSV_COLUMNS) -> None:
    """rows: (image path, text). Quoting is csv's, so commas, quotes and newlines in LaTeX survive."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for image, text in rows:
        writer.writerow([relative_to_file(image, csv_path), text])
    atomic_write_text(csv_path, buffer.getvalue())


def read_csv(csv_path: str | Path) -> list[tuple[int, Path, str]]:
    """(CSV line number, absolute image path, text) per row; text is kept verbatim (no NaN guessing)."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise SystemExit(f"{csv_path}: no such CSV. Run data2csv.py first, or pass --csv_path=...")
    header, rows = read_table(csv_path)
    if not set(CSV_COLUMNS) <= {name.lower() for name in header}:
        raise SystemExit(f"{csv_path}: expected the header 'image_path,text', found {header!r}. "
                         "Write the CSV with data2csv.py, or rename its columns.")
    return [(line, resolve_from_file(row["image_path"], csv_path), row["text"]) for line, row in rows]


def formula_text(value) -> str | None:
    """A formula read from a table as text: a number is a formula too ("12"); a missing value is an empty formula;
    None for anything else (a list, a dict)."""
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, numbers.Number) and not isinstance(value, bool):
        return str(value)
    return None


def usable_rows(csv_path: str | Path, rejects: list, show_progress: bool = True) -> list[tuple[Path, str]]:
    """(image, text) of the CSV's rows that can be trained on; the others go to `rejects` as (image, reason): an empty
    text, an image that cannot be used, or an image already listed on an earlier line."""
    good, first_line = [], {}
    for line, image, text in tqdm(read_csv(csv_path), desc=f"checking {csv_path}", unit="row",
                                  disable=not show_progress):
        problem = ("empty text" if not text.strip() else f"the same image as line {first_line[image]}"
                   if image in first_line else image_problem(image))
        if problem:
            rejects.append((image, f"{csv_path} line {line}: {problem}"))
            continue
        first_line[image] = line
        good.append((image, text.strip()))
    return good


# --- where a CSV's rows came from ----------------------------------------------------

def source_record_path(csv_path: str | Path) -> Path:
    """Where data2csv.py records the source of a CSV's rows: latex_ocr_train.csv -> latex_ocr_train.source.json."""
    return Path(csv_path).with_suffix(".source.json")


def read_source(path: str | Path) -> dict | None:
    """The source a CSV or an image folder was saved from, or None when nothing records it. A record of the first
    format (every id of both hubs, no content fingerprint) is read as what it said."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise SystemExit(f"{path}: not readable JSON; it was cut short or edited. Delete it and the folder or CSV it "
                         "describes, and run data2csv.py again.") from None
    if "hf_dataset_id" in record:
        kind = record["source"]
        record = {"source": kind, "split": record["split"],
                  **({"seed": record["seed"]} if kind == "synthetic" else
                     {"dataset_id": record["dataset_id" if kind == "modelscope" else "hf_dataset_id"],
                      "subset_name": record["subset_name"]} if kind in ("modelscope", "huggingface") else
                     {"path": kind, "sha256": "not recorded"})}
    return record


def csv_source(csv_path: str | Path) -> dict | None:
    """The source data2csv.py recorded for a CSV's rows: beside the CSV, or (for a CSV written before it did so) in
    the folder of the images it lists."""
    record = read_source(source_record_path(csv_path))
    if record is None:
        record = read_source(read_csv(csv_path)[0][1].parent / SOURCE_RECORD)
    return record


def same_source(a: dict, b: dict, ignore: tuple[str, ...] = ()) -> bool:
    """Whether two source records name the same data; where a local file lies ("path") is not part of it."""
    def key(record):
        return {k: v for k, v in record.items() if k not in ("path", *ignore)}
    return key(a) == key(b)


def describe_source(record: dict) -> str:
    if record["source"] == "local":
        return f"{record['path']} (sha256 {record['sha256'][:12]})"
    return ", ".join(f"{k}={v}" for k, v in record.items())


# --- images ----------------------------------------------------------------------

def open_image(source: str | Path | Image.Image) -> Image.Image:
    """An image as training and inference both see it: turned upright by its EXIF orientation, 16-bit and palette
    modes converted, transparency flattened on white, RGB."""
    if not isinstance(source, Image.Image):
        with Image.open(source) as image:
            return open_image(image)
    image = ImageOps.exif_transpose(source)  # a phone photo is stored sideways with a tag saying so
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit greyscale: scale to 8 bits
        image = image.convert("I").point(lambda v: v / 256).convert("L")
    if image.mode in ("P", "LA", "PA", "La"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, "white")
        background.paste(image, mask=image.getchannel("A"))
        image = background
    return image.convert("RGB")


def image_problem(path: Path) -> str | None:
    """Why this image cannot be used, or None when it opens, decodes and sizes as training and inference will."""
    path = Path(path)
    if path.is_dir():
        return "a folder, not an image file"
    if not path.is_file():
        return "image file not found"
    if path.stat().st_size == 0:
        return "image file is empty (0 bytes)"
    if path.suffix.lower() in VECTOR_FORMATS:
        return (f"{VECTOR_FORMATS[path.suffix.lower()]}, not a bitmap image: convert it to PNG first "
                "(e.g. magick -density 300 in.pdf out.png)")
    try:
        width, height = open_image(path).size
    except Image.DecompressionBombError as e:
        return f"image too large: {e}"
    except Exception as e:  # PIL raises many types for corrupt files
        return f"not a readable image ({type(e).__name__}: {e})"
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        return (f"{width}x{height} px, an aspect ratio of {max(width, height) / min(width, height):.0f}:1, more than "
                f"the {MAX_ASPECT_RATIO}:1 Qwen-VL's image sizing takes: crop it to the formula, or split it")
    return None


# --- the conversation JSON -------------------------------------------------------

def write_conversations(json_path: str | Path, samples: list[tuple[Path, str]]) -> None:
    """The conversation format of the tutorial: one user turn (the image path), one assistant turn."""
    records = [{"id": f"identity_{i}",
                "conversations": [{"role": "user", "value": relative_to_file(image, json_path)},
                                  {"role": "assistant", "value": text}]}
               for i, (image, text) in enumerate(samples, start=1)]
    atomic_write_text(json_path, json.dumps(records, ensure_ascii=False, indent=1) + "\n")


def read_conversations(json_path: str | Path, require_text: bool = True) -> list[Sample]:
    """Read and check a conversation JSON; errors name the file and the record. require_text=False lets a record's
    formula be empty (images to predict, not to train on or score)."""
    json_path = Path(json_path)
    if not json_path.is_file():
        raise SystemExit(f"{json_path}: no such file. Run csv2json.py first, or pass the right path.")
    records = read_json(json_path)
    if not isinstance(records, list):
        raise SystemExit(f"{json_path}: expected a list of conversation records, found {type(records).__name__}.")
    if not records:
        raise SystemExit(f"{json_path}: an empty list, no records. Run csv2json.py again, or pass another file.")
    samples, seen = [], set()
    for i, record in enumerate(records):
        where = f"{json_path}, record {i}"
        turns = record.get("conversations") if isinstance(record, dict) else None
        if not isinstance(turns, list) or len(turns) != 2 or not all(isinstance(t, dict) for t in turns):
            raise SystemExit(f"{where}: expected {{'id': ..., 'conversations': [user turn, assistant turn]}}, "
                             f"found {str(record)[:200]}")
        roles = [t.get("role", t.get("from")) for t in turns]
        values = [t.get("value") for t in turns]
        if ([ROLE_NAMES.get(str(r).lower()) for r in roles] != ["user", "assistant"]
                or not all(isinstance(v, str) for v in values)):
            raise SystemExit(f"{where}: turns must be a user turn with the image path, then an assistant "
                             f"turn with the LaTeX, both with a string 'value'; found roles {roles}.")
        if require_text and not values[1].strip():
            raise SystemExit(f"{where}: the assistant turn (the formula) is empty. Remove the record, or write the "
                             "JSON with csv2json.py, which leaves such rows out.")
        sample_id = str(record.get("id", f"record_{i}"))
        if sample_id in seen:
            raise SystemExit(f"{where}: duplicate id {sample_id!r}. Ids must be unique.")
        seen.add(sample_id)
        samples.append(Sample(sample_id, resolve_from_file(values[0], json_path), values[1]))
    return samples
