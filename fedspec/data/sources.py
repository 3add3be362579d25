"""Loaders for a user's own labelled text: local TSV / CSV / JSON lines files, or a Hugging Face dataset.

Every loader returns ``TextExamples`` and fails with a one-line ``DataError`` that names the path or the
config key and says what to change, because a data mistake is the most common reason a run stops.

Labels
    Integers are kept as class ids (``label_names`` default to "0".."K-1"). Strings are mapped to ids in
    sorted order ("Business" < "Sci/Tech" < "Sports" < "World"), so the mapping does not depend on row
    order. Passing ``label_names`` fixes the order instead (and lets an eval file reuse the train mapping).
    With ``label_names``, a label may be a class name or a class id (its position in the list), unless
    ``allow_ids=False``: names taken from another file's labels in sorted order say nothing about which id is which
    class (a file of ids from another source would have every class read as another one).

Header rows (TSV / CSV)
    ``has_header=True`` / ``False`` says it outright. With ``None`` (auto) the first row is a header when
    (1) it contains ``text_field`` or ``label_field`` by name, or else (2) its value in the label column
    (``label_field`` when that is a column index, otherwise the last column) is not a label while the next
    rows' values (up to 200 of them) are. "Is a label" means: one of ``label_names`` when given; otherwise
    an integer when the next rows all hold integers; otherwise a value that repeats among the next rows
    (string labels repeat, a header name does not) and that the first row's value is not (it occurs nowhere
    further down the column, as a header name would not). Set ``has_header`` when a small file defeats the rule.
    Without a header, fields are column positions: ``text_field``/``label_field`` are indices (int or digit
    strings); the default names "text" and "label" mean columns 0 and 1 of a two-column file.

Quoting follows the csv module's defaults (RFC 4180 style ``"..."`` with doubled quotes), which is how
pandas and the csv writer save TSV files too, parsed strictly: a field that opens with ``"`` must close it right
before the next delimiter or the line end. Every row must have as many fields as the first (the header, if any):
a stray delimiter would otherwise shift a text into the label column and make a class of it. A quoted field may
span lines (a review with paragraphs), but in a TSV not lines that hold tabs: that is what rows swallowed by an
unclosed ``"`` look like. Blank lines, CRLF line ends and a UTF-8 byte order mark are fine.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedspec.data.examples import DataError, DataFileNotFoundError, TextExamples

Field = str | int

FORMATS: tuple[str, ...] = ("tsv", "csv", "jsonl")
_FORMAT_BY_EXTENSION = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}
_DELIMITERS = {"tsv": "\t", "csv": ","}
_DEFAULT_POSITIONS = {"text": 0, "label": 1}
_HEADER_SAMPLE_ROWS = 200
_INTEGER = re.compile(r"[+-]?\d+")


# --------------------------------------------------------------------------------------------------
# Public loaders
# --------------------------------------------------------------------------------------------------


def load_examples(
    path: str | Path,
    *,
    text_field: Field = "text",
    label_field: Field = "label",
    format: str = "auto",
    has_header: bool | None = None,
    label_names: Sequence[str] | None = None,
    allow_ids: bool = True,
    path_key: str = "data.path",
) -> TextExamples:
    """Load a local TSV, CSV or JSON lines file of labelled texts.

    ``format="auto"`` picks the format from the extension (.tsv, .csv, .jsonl/.ndjson/.json).
    ``path_key`` is only the config key that error messages name (e.g. "data.eval_path").
    """
    file = existing_file(path, path_key)
    resolved_format = _resolve_format(file, format, path_key)
    if resolved_format == "jsonl":
        texts, raw_labels, line_numbers = _fields_from_json(file, text_field, label_field)
    else:
        texts, raw_labels, line_numbers = _fields_from_delimited(
            file, _DELIMITERS[resolved_format], text_field, label_field, has_header, label_names
        )
    if not texts:
        raise DataError(
            f"{file} is empty: it holds no examples; add rows or point {path_key} at another file"
        )
    empty = [line for text, line in zip(texts, line_numbers) if not text.strip()]
    if empty:
        raise DataError(
            f"{len(empty)} of {len(texts)} examples in {file} have an empty text (first at line {empty[0]}; "
            f"data.text_field={text_field!r}); remove those rows or point data.text_field at the text column"
        )
    label_ids, names = _label_ids(raw_labels, line_numbers, label_names, file, label_field, allow_ids)
    return TextExamples(texts=texts, labels=label_ids, label_names=names)


def load_hf_dataset(
    name: str,
    split: str = "train",
    text_field: str = "text",
    label_field: str = "label",
    *,
    label_names: Sequence[str] | None = None,
) -> TextExamples:
    """Load one split of a Hugging Face dataset through the optional ``datasets`` package.

    ``datasets`` is not a fedspec dependency: without it, or without network access or a local cache,
    this raises a DataError that says so (fedspec never falls back to another dataset silently).
    A ``ClassLabel`` label column supplies the label names.
    """
    try:
        import datasets  # noqa: PLC0415 - optional dependency, imported only when asked for
    except ImportError as error:
        raise DataError(
            "data.source='hf' needs the optional `datasets` package, which is not installed; "
            "run `pip install datasets`, or save the data as .tsv/.csv/.jsonl and use data.source=file"
        ) from error
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as error:  # network, cache and name errors come in many types; all end here
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(
            f"could not load Hugging Face dataset {name!r} (split {split!r}): {reason}; it needs network "
            "access or a local cache (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE block downloads); download it "
            "beforehand, or save it as .tsv/.csv/.jsonl and use data.source=file"
        ) from error
    columns = list(dataset.column_names)
    for key, field in (("data.text_field", text_field), ("data.label_field", label_field)):
        if field not in columns:
            raise DataError(
                f"{key}={field!r} is not a column of Hugging Face dataset {name!r}; "
                f"available fields: {', '.join(columns)}"
            )
    if label_names is None:
        label_names = getattr(dataset.features.get(label_field), "names", None)
    origin = f"Hugging Face dataset {name!r} split {split!r}"
    raw_texts = list(dataset[text_field])
    raw_labels = list(dataset[label_field])
    if not raw_texts:
        raise DataError(f"{origin} is empty: it holds no examples")
    rows = list(range(1, len(raw_texts) + 1))
    texts = [_text_value(value, row, origin, text_field) for value, row in zip(raw_texts, rows)]
    label_ids, names = _label_ids(raw_labels, rows, label_names, origin, label_field)
    return TextExamples(texts=texts, labels=label_ids, label_names=names)


# --------------------------------------------------------------------------------------------------
# Files and formats
# --------------------------------------------------------------------------------------------------


def existing_file(path: str | Path, path_key: str) -> Path:
    file = Path(path).expanduser()
    if not file.exists():
        raise DataFileNotFoundError(
            f"{path_key}={str(path)!r} does not exist (looked in {file.resolve()}); "
            f"point {path_key} at a .tsv, .csv or .jsonl file"
        )
    if not file.is_file():
        raise DataError(
            f"{path_key}={str(path)!r} is a directory, not a file; point it at a .tsv, .csv or .jsonl file"
        )
    return file


def _resolve_format(file: Path, format: str, path_key: str) -> str:
    if format != "auto":
        if format not in FORMATS:
            raise DataError(
                f"data.format={format!r} is not supported; use one of: auto, {', '.join(FORMATS)}"
            )
        return format
    detected = _FORMAT_BY_EXTENSION.get(file.suffix.lower())
    if detected is None:
        raise DataError(
            f"cannot tell the format of {path_key}={str(file)!r} from its extension {file.suffix!r}; "
            f"set data.format to one of: {', '.join(FORMATS)}"
        )
    return detected


def _is_index(field: Field) -> bool:
    if isinstance(field, bool):
        return False
    return isinstance(field, int) or (isinstance(field, str) and field.isdigit())


def _text_value(value: Any, line: int, origin: object, field: Field) -> str:
    if isinstance(value, str):
        return value
    raise DataError(
        f"data.text_field={field!r} at line {line} of {origin} is {type(value).__name__} {value!r}, "
        "not text; every example needs a text string"
    )


# --------------------------------------------------------------------------------------------------
# JSON lines
# --------------------------------------------------------------------------------------------------


def read_json_records(file: Path) -> list[tuple[int, dict[str, Any]]]:
    """Records with their line numbers; a file whose content is one JSON array is accepted too."""
    content = _read_text(file)
    if content.lstrip().startswith("["):
        try:
            items = json.loads(content)
        except json.JSONDecodeError as error:
            raise DataError(f"{file} is not valid JSON ({error.msg} at line {error.lineno})") from error
        numbered = list(enumerate(items, start=1))
    else:
        numbered = []
        # JSON lines end at "\n" only: str.splitlines() also splits at U+2028, U+2029 and U+0085, which JSON
        # (and json.dumps with ensure_ascii=False) leaves raw inside strings.
        for line_number, line in enumerate(content.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                numbered.append((line_number, json.loads(line)))
            except json.JSONDecodeError as error:
                raise DataError(
                    f"line {line_number} of {file} is not valid JSON ({error.msg}); "
                    "a .jsonl file holds one JSON object per line"
                ) from error
    for line_number, record in numbered:
        if not isinstance(record, dict):
            raise DataError(
                f"line {line_number} of {file} is a JSON {type(record).__name__}, not an object; "
                "each example must be an object such as {\"text\": ..., \"label\": ...}"
            )
    return numbered


def load_texts(path: str | Path, field: str = "text", *, path_key: str = "--file") -> list[str]:
    """Unlabelled texts to score: JSON lines (.jsonl, .ndjson, .json) with a ``field``, else one text per
    non-blank line."""
    file = existing_file(path, path_key)
    if _FORMAT_BY_EXTENSION.get(file.suffix.lower()) == "jsonl":
        texts = []
        for line_number, record in read_json_records(file):
            if not isinstance(record.get(field), str):
                raise DataError(f"line {line_number} of {file} has no text in {field!r} (its fields: "
                                f"{', '.join(map(str, record))}); name the text field with --field")
            texts.append(record[field])
    else:
        # "\n" (or "\r\n") ends a line; str.splitlines() would also cut a text at U+2028, U+2029 or U+0085
        texts = [line.removesuffix("\r") for line in _read_text(file).split("\n") if line.strip()]
    if not texts:
        raise DataError(f"{path_key}={str(path)!r} holds no texts")
    return texts


def _fields_from_json(
    file: Path, text_field: Field, label_field: Field
) -> tuple[list[str], list[Any], list[int]]:
    records = read_json_records(file)
    texts: list[str] = []
    raw_labels: list[Any] = []
    line_numbers: list[int] = []
    for line_number, record in records:
        for key, field in (("data.text_field", text_field), ("data.label_field", label_field)):
            if str(field) not in record:
                raise DataError(
                    f"{key}={field!r} is missing at line {line_number} of {file}; "
                    f"available fields: {', '.join(map(str, record))}"
                )
        texts.append(_text_value(record[str(text_field)], line_number, file, text_field))
        raw_labels.append(record[str(label_field)])
        line_numbers.append(line_number)
    return texts, raw_labels, line_numbers


# --------------------------------------------------------------------------------------------------
# TSV / CSV
# --------------------------------------------------------------------------------------------------


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise _not_utf8(file) from error


def _not_utf8(file: Path) -> DataError:
    """Where the file stops being UTF-8. Found by decoding its bytes once more: a reader that decodes in chunks (the
    csv module's) reports the offset inside its chunk, not in the file."""
    data = file.read_bytes()
    try:
        data.decode("utf-8")  # a byte order mark is UTF-8 too, so offsets count from the file's first byte
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        return DataError(f"line {line} of {file} is not UTF-8 text ({error.reason} at byte {error.start}); "
                         "save the file as UTF-8")
    return DataError(f"{file} is not UTF-8 text; save it as UTF-8")


def _read_rows(file: Path, delimiter: str) -> list[tuple[int, list[str]]]:
    """Non-blank rows with the file line each ends on (quoted fields may span lines), each checked by
    :func:`_check_row`. The csv module's default, lenient mode would take an unclosed quote as the start of a
    field that swallows the rows after it; strict mode refuses it."""
    rows: list[tuple[int, list[str]]] = []
    start = 1  # the line the row being parsed starts on
    try:
        with file.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle, delimiter=delimiter, strict=True)
            for row in reader:
                if any(cell.strip() for cell in row):
                    first = rows[0] if rows else None
                    _check_row(file, delimiter, row, (start, reader.line_num), first)
                    rows.append((reader.line_num, row))
                start = reader.line_num + 1
    except UnicodeDecodeError as error:
        raise _not_utf8(file) from error
    except csv.Error as error:
        reason = str(error).replace("\t", "\\t")  # csv names the tab it expected as a raw tab
        raise DataError(
            f"line {start} of {file} could not be parsed as {_format_name(delimiter)} ({reason}, read up to line "
            f"{reader.line_num}); a field that opens with a quote must close it right before the next "
            f"{_delimiter_name(delimiter)} or the line end, and quotes inside it are doubled (\"\")"
        ) from error
    return rows


def _check_row(
    file: Path, delimiter: str, row: list[str], lines: tuple[int, int], first: tuple[int, list[str]] | None
) -> None:
    """Refuse a row whose fields do not line up with the first row's, or (TSV) rows swallowed by a quote."""
    start, end = lines
    if first is not None and len(row) != len(first[1]):
        shown = _shorten(repr(row))
        raise DataError(
            f"line {start} of {file} has {len(row)} fields {shown}, but the first row (line {first[0]}) has "
            f"{len(first[1])}; every row needs the same columns: check for a stray "
            f"{_delimiter_name(delimiter)} or quote on that line"
        )
    # Only a quoted field holds a line break; lines that hold tabs inside one are rows it swallowed
    swallowed = delimiter == "\t" and any(("\n" in cell or "\r" in cell) and "\t" in cell for cell in row)
    if swallowed:
        raise DataError(
            f"lines {start}-{end} of {file} were read as one quoted field that spans tab-separated lines: "
            f"the quote that opens it at line {start} is probably never closed, so the rows after it became its "
            "text; remove that quote, double it (\"\"), or close the field before its tab"
        )


def _shorten(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _format_name(delimiter: str) -> str:
    return "TSV" if delimiter == "\t" else "CSV"


def _delimiter_name(delimiter: str) -> str:
    return "tab" if delimiter == "\t" else "comma"


def _fields_from_delimited(
    file: Path,
    delimiter: str,
    text_field: Field,
    label_field: Field,
    has_header: bool | None,
    label_names: Sequence[str] | None,
) -> tuple[list[str], list[str], list[int]]:
    rows = _read_rows(file, delimiter)
    if not rows:
        return [], [], []
    if has_header is None:
        has_header = _first_row_is_header(rows, text_field, label_field, label_names)
    if has_header:
        header = [cell.strip() for cell in rows[0][1]]
        text_column = _named_column(header, text_field, "data.text_field", file)
        label_column = _named_column(header, label_field, "data.label_field", file)
        data_rows = rows[1:]
        if not data_rows:
            raise DataError(f"{file} is empty: it has a header row but no examples")
    else:
        width = len(rows[0][1])
        text_column = _positional_column(text_field, "data.text_field", width, file)
        label_column = _positional_column(label_field, "data.label_field", width, file)
        data_rows = rows
    if text_column == label_column:
        raise DataError(
            f"data.text_field and data.label_field both name column {text_column} of {file}; "
            "they must be different columns"
        )
    texts: list[str] = []
    raw_labels: list[str] = []
    line_numbers: list[int] = []
    for line_number, row in data_rows:  # every row as wide as the first (_read_rows): both columns are there
        texts.append(row[text_column])
        raw_labels.append(row[label_column])
        line_numbers.append(line_number)
    return texts, raw_labels, line_numbers


def _named_column(header: list[str], field: Field, key: str, file: Path) -> int:
    """Column of ``field`` in a header row: its name first, else a column index."""
    if str(field) in header:
        return header.index(str(field))
    if _is_index(field) and int(field) < len(header):
        return int(field)
    raise DataError(f"{key}={field!r} not found in {file}; available fields: {', '.join(header)}")


def _positional_column(field: Field, key: str, width: int, file: Path) -> int:
    """Column of ``field`` in a headerless file: an index, or a default name of a two-column file."""
    if _is_index(field):
        column = int(field)
        if column >= width:
            raise DataError(f"{key}={field!r} is out of range: {file} has {width} column(s) (0..{width - 1})")
        return column
    if width == 2 and field in _DEFAULT_POSITIONS:
        return _DEFAULT_POSITIONS[str(field)]
    raise DataError(
        f"{file} has no header row, so {key} must be a column index (0..{width - 1}), not {field!r}; "
        "set data.text_field=0 data.label_field=1 (for example), or data.has_header=true if the first row "
        "names the columns"
    )


def _first_row_is_header(
    rows: list[tuple[int, list[str]]],
    text_field: Field,
    label_field: Field,
    label_names: Sequence[str] | None,
) -> bool:
    """Auto-detect a header row; the rule is spelled out in the module docstring."""
    first = [cell.strip() for cell in rows[0][1]]
    named_fields = [str(field) for field in (text_field, label_field) if not _is_index(field)]
    if any(field in first for field in named_fields):
        return True
    label_column = int(label_field) if _is_index(label_field) else len(first) - 1
    if label_column >= len(first):
        return False
    sample = rows[1 : 1 + _HEADER_SAMPLE_ROWS]
    following = [row[label_column].strip() for _, row in sample if len(row) > label_column]
    if not following:
        return False
    candidate = first[label_column]
    if label_names is not None:
        known = set(label_names) | {str(index) for index in range(len(label_names))}
        return candidate not in known and all(value in known for value in following)
    if all(_INTEGER.fullmatch(value) for value in following):
        return not _INTEGER.fullmatch(candidate)
    labels_repeat = len(set(following)) <= len(following) // 2
    # A header name never recurs in its own column; a label can, past the sample too (a rare class): a first value
    # found anywhere further down is a label, and taking its row for a header would drop a record without a word.
    further_down = {row[label_column].strip() for _, row in rows[1:]}  # rows are all as wide as the first
    return labels_repeat and candidate not in further_down


# --------------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------------


class _Unparseable:
    """Marker for a label value that is neither a class id nor a class name."""


def _normalize_label(value: Any) -> int | str | _Unparseable:
    if isinstance(value, bool) or value is None:
        return _Unparseable()
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else _Unparseable()
    if isinstance(value, str):
        stripped = value.strip()
        if not stripped:
            return _Unparseable()
        return int(stripped) if _INTEGER.fullmatch(stripped) else stripped
    return _Unparseable()


def _label_ids(
    raw_labels: list[Any],
    line_numbers: list[int],
    label_names: Sequence[str] | None,
    origin: object,
    label_field: Field,
    allow_ids: bool = True,
) -> tuple[list[int], list[str]]:
    """Map raw label values to class ids and return (ids, label_names)."""
    normalized = [_normalize_label(value) for value in raw_labels]
    for value, raw, line in zip(normalized, raw_labels, line_numbers):
        if isinstance(value, _Unparseable):
            raise DataError(
                f"unparseable label {raw!r} at line {line} of {origin} (data.label_field={label_field!r}); "
                "labels must be integer class ids or class names"
            )
    if label_names is not None:
        names = list(label_names)
        return _ids_from_names(normalized, raw_labels, line_numbers, names, origin, allow_ids), names
    first_kind = type(normalized[0])
    for value, raw, line in zip(normalized, raw_labels, line_numbers):
        if type(value) is not first_kind:
            raise DataError(
                f"unparseable label {raw!r} at line {line} of {origin}: labels mix integers and names "
                f"(line {line_numbers[0]} has {raw_labels[0]!r}); use one kind, or pass data.label_names"
            )
    if first_kind is int:
        return _ids_from_integers(normalized, raw_labels, line_numbers, origin)
    names = sorted(set(normalized))  # type: ignore[arg-type]  # all str here
    name_to_id = {name: index for index, name in enumerate(names)}
    return [name_to_id[value] for value in normalized], names  # type: ignore[index]


def _ids_from_integers(
    values: list[Any], raw_labels: list[Any], line_numbers: list[int], origin: object
) -> tuple[list[int], list[str]]:
    for value, raw, line in zip(values, raw_labels, line_numbers):
        if value < 0:
            raise DataError(
                f"unparseable label {raw!r} at line {line} of {origin}: integer labels are class ids "
                "and must be 0 or more"
            )
    num_classes, distinct = max(values) + 1, len(set(values))
    if num_classes > 2 * distinct + 1:  # e.g. one stray id of 99,999 would ask for a 100,000-class head
        line = line_numbers[values.index(max(values))]
        raise DataError(
            f"label {max(values)} at line {line} of {origin} makes {num_classes} classes, but only {distinct} ids "
            "occur: integer labels are class ids 0..K-1; fix that row, or use label names"
        )
    return list(values), [str(index) for index in range(num_classes)]


def _ids_from_names(
    values: list[Any], raw_labels: list[Any], line_numbers: list[int], names: list[str], origin: object,
    allow_ids: bool = True,
) -> list[int]:
    name_to_id = {name: index for index, name in enumerate(names)}
    ids: list[int] = []
    for value, raw, line in zip(values, raw_labels, line_numbers):
        if str(value) in name_to_id:
            ids.append(name_to_id[str(value)])
        elif isinstance(value, int) and 0 <= value < len(names) and allow_ids:
            ids.append(value)
        elif isinstance(value, int) and 0 <= value < len(names):
            raise DataError(
                f"label {raw!r} at line {line} of {origin} is a class id, but the classes {names} are named by the "
                "training file's labels (in sorted order), and nothing says which id is which of them; write the "
                "class names in this file, or set data.label_names to the classes in id order"
            )
        else:
            raise DataError(
                f"unparseable label {raw!r} at line {line} of {origin}: not one of the label names "
                f"{names} (or an id 0..{len(names) - 1})"
            )
    return ids
