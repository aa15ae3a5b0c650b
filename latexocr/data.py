"""The files handed from one stage to the next: the image/text CSV and the conversation JSON.

Paths inside both are stored relative to the file that lists them, so a data folder can move.
"""

import csv
import hashlib
import io
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

CSV_COLUMNS = ("image_path", "text")


@dataclass(frozen=True)
class Sample:
    id: str
    image: Path  # absolute
    text: str


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write through a temporary file and a rename, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256(path: str | Path) -> str:
    """The file's content as a short fingerprint: the same data under another name is the same data."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def relative_to_file(path: Path, listing_file: Path) -> str:
    """`path` as stored in `listing_file`: relative to its folder where possible, with forward slashes."""
    try:
        return Path(os.path.relpath(Path(path).resolve(), Path(listing_file).resolve().parent)).as_posix()
    except ValueError:  # another drive on Windows
        return Path(path).resolve().as_posix()


def resolve_from_file(stored: str, listing_file: Path) -> Path:
    return (Path(listing_file).resolve().parent / stored).resolve()


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
    with open(csv_path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != list(CSV_COLUMNS):
            raise SystemExit(f"{csv_path}: expected the header 'image_path,text', found {header!r}. "
                             "Write the CSV with data2csv.py, or rename its columns.")
        rows = []
        for record in reader:
            line = reader.line_num
            if len(record) != 2:
                raise SystemExit(f"{csv_path}, line {line}: expected 2 fields (image_path,text), found "
                                 f"{len(record)}: {record!r}. Quote fields that contain commas.")
            rows.append((line, resolve_from_file(record[0], csv_path), record[1]))
    return rows


def image_problem(path: Path) -> str | None:
    """Why this image cannot be used, or None when it opens and decodes."""
    if not path.is_file():
        return "image file not found"
    if path.stat().st_size == 0:
        return "image file is empty (0 bytes)"
    try:
        with Image.open(path) as im:
            im.load()
    except Image.DecompressionBombError as e:
        return f"image too large: {e}"
    except Exception as e:  # PIL raises many types for corrupt files
        return f"not a readable image ({type(e).__name__}: {e})"
    return None


def write_conversations(json_path: str | Path, samples: list[tuple[Path, str]]) -> None:
    """The conversation format of the tutorial: one user turn (the image path), one assistant turn."""
    records = [{"id": f"identity_{i}",
                "conversations": [{"role": "user", "value": relative_to_file(image, json_path)},
                                  {"role": "assistant", "value": text}]}
               for i, (image, text) in enumerate(samples, start=1)]
    atomic_write_text(json_path, json.dumps(records, ensure_ascii=False, indent=1) + "\n")


def read_conversations(json_path: str | Path) -> list[Sample]:
    """Read and check a conversation JSON; errors name the file and the record."""
    json_path = Path(json_path)
    if not json_path.is_file():
        raise SystemExit(f"{json_path}: no such file. Run csv2json.py first, or pass the right path.")
    try:
        records = json.loads(json_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SystemExit(f"{json_path}: not valid JSON ({e}).") from None
    if not isinstance(records, list):
        raise SystemExit(f"{json_path}: expected a list of conversation records, found {type(records).__name__}.")
    samples, seen = [], set()
    for i, record in enumerate(records):
        where = f"{json_path}, record {i}"
        turns = record.get("conversations") if isinstance(record, dict) else None
        if not isinstance(turns, list) or len(turns) != 2 or not all(isinstance(t, dict) for t in turns):
            raise SystemExit(f"{where}: expected {{'id': ..., 'conversations': [user turn, assistant turn]}}, "
                             f"found {str(record)[:200]}")
        roles = [t.get("role", t.get("from")) for t in turns]
        values = [t.get("value") for t in turns]
        if roles != ["user", "assistant"] or not all(isinstance(v, str) for v in values):
            raise SystemExit(f"{where}: turns must be a user turn with the image path, then an assistant "
                             f"turn with the LaTeX, both with a string 'value'; found roles {roles}.")
        sample_id = str(record.get("id", f"record_{i}"))
        if sample_id in seen:
            raise SystemExit(f"{where}: duplicate id {sample_id!r}. Ids must be unique.")
        seen.add(sample_id)
        samples.append(Sample(sample_id, resolve_from_file(values[0], json_path), values[1]))
    return samples
