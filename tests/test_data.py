"""Tests of fedspec.data: the generated default task, file/HF loaders, load_task and the partitioners.

No model is loaded here (probing the task with an encoder belongs to the training tests).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import types
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from fedspec.data import (
    TOPIC_LABEL_NAMES,
    DataError,
    DataFileNotFoundError,
    TextExamples,
    generate_topics,
    load_examples,
    load_hf_dataset,
    load_task,
    partition,
    partition_summary,
    split_holdout,
)
from fedspec.data.partition import MAX_DIRICHLET_DRAWS
from fedspec.data.synthetic import MAX_WORDS

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def write(path: Path, content: str) -> Path:
    path.write_text(content, encoding="utf-8")
    return path


def error_of(call, *args, **kwargs) -> str:
    """The DataError message of ``call``; data errors must fit on one line."""
    with pytest.raises(DataError) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


def fingerprint(examples: TextExamples) -> str:
    payload = json.dumps([examples.texts, examples.labels, examples.label_names])
    return hashlib.sha256(payload.encode()).hexdigest()


# --------------------------------------------------------------------------------------------------
# TextExamples
# --------------------------------------------------------------------------------------------------


def test_text_examples_subset_keeps_label_set_and_order():
    examples = TextExamples(["a", "b", "c"], [0, 2, 1], ["x", "y", "z"])
    part = examples.subset([2, 0])
    assert part.texts == ["c", "a"] and part.labels == [1, 0]
    assert part.num_classes == 3 and len(part) == 2
    assert examples.label_counts() == [1, 1, 1]


def test_text_examples_rejects_inconsistent_data():
    with pytest.raises(ValueError, match="2 texts but 1 labels"):
        TextExamples(["a", "b"], [0], ["x"])
    with pytest.raises(ValueError, match="outside"):
        TextExamples(["a"], [3], ["x", "y"])


# --------------------------------------------------------------------------------------------------
# Synthetic default task
# --------------------------------------------------------------------------------------------------


def test_generate_topics_is_deterministic_for_a_seed():
    assert generate_topics(300, seed=5) == generate_topics(300, seed=5)
    assert generate_topics(300, seed=5).texts != generate_topics(300, seed=6).texts


def test_generate_topics_is_identical_across_processes_with_different_hash_seeds():
    code = (
        "import hashlib, json; from fedspec.data import generate_topics; e = generate_topics(200, 11); "
        "print(hashlib.sha256(json.dumps([e.texts, e.labels, e.label_names]).encode()).hexdigest())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == fingerprint(generate_topics(200, 11))


def test_generate_topics_has_four_balanced_classes():
    examples = generate_topics(1001, seed=0)
    assert examples.label_names == list(TOPIC_LABEL_NAMES) == ["world", "sports", "business", "science/tech"]
    counts = examples.label_counts()
    assert len(counts) == 4 and sum(counts) == 1001
    assert max(counts) - min(counts) <= 1


def test_generate_topics_is_diverse_and_short():
    examples = generate_topics(8000, seed=1)
    assert len(set(examples.texts)) == 8000  # distinct within one call
    assert max(len(text.split()) for text in examples.texts) <= MAX_WORDS
    vocabulary = {word for text in examples.texts for word in text.lower().split()}
    assert len(vocabulary) > 400
    # Many different sentence shapes per class, not a handful of fixed sentences with a swapped word.
    for label in range(4):
        class_texts = [t for t, y in zip(examples.texts, examples.labels) if y == label]
        shapes = {" ".join(t.split(" - ")[-1].split()[:2]) for t in class_texts}
        assert len(shapes) >= 20


def test_generate_topics_shares_noise_vocabulary_across_classes():
    """Countries, people and stock phrases occur in every class: no entity type decides the topic."""
    examples = generate_topics(4000, seed=2)
    words_by_class = [
        {w.strip(",.") for t, y in zip(examples.texts, examples.labels) if y == label for w in t.split()}
        for label in range(4)
    ]
    shared = set.intersection(*words_by_class)
    assert len(shared) >= 60
    assert {"Brazil", "LAGOS", "Okafor", "reported", "Monday"} <= shared


def test_generate_topics_rejects_non_positive_size():
    assert "num_examples" in error_of(generate_topics, 0)


# --------------------------------------------------------------------------------------------------
# File loaders
# --------------------------------------------------------------------------------------------------


def test_tsv_with_header_and_string_labels_maps_names_in_sorted_order(tmp_path):
    path = write(tmp_path / "d.tsv", "text\tlabel\ngood film\tpos\nbad film\tneg\nfine\tpos\n")
    examples = load_examples(path)
    assert examples.texts == ["good film", "bad film", "fine"]
    assert examples.label_names == ["neg", "pos"] and examples.labels == [1, 0, 1]
    fixed = load_examples(path, label_names=["pos", "neg"])
    assert fixed.labels == [0, 1, 0] and fixed.label_names == ["pos", "neg"]


def test_headerless_tsv_is_detected_and_default_names_are_columns_0_and_1(tmp_path):
    rows = ["markets rally\tBusiness", "cup final\tSports", "new chip\tSci/Tech", "summit\tWorld"] * 3
    path = write(tmp_path / "news.tsv", "\n".join(rows) + "\n")
    examples = load_examples(path)
    assert len(examples) == 12 and examples.texts[0] == "markets rally"
    assert examples.label_names == ["Business", "Sci/Tech", "Sports", "World"]
    assert examples.labels[:4] == [0, 2, 1, 3]


def test_headerless_file_with_int_labels_and_index_fields(tmp_path):
    path = write(tmp_path / "d.tsv", "7\tfirst text\t1\n8\tsecond text\t0\n9\tthird text\t2\n")
    examples = load_examples(path, text_field="1", label_field=2)
    assert examples.texts == ["first text", "second text", "third text"]
    assert examples.labels == [1, 0, 2] and examples.label_names == ["0", "1", "2"]


def test_header_detected_from_label_column_when_fields_are_indices(tmp_path):
    path = write(tmp_path / "d.tsv", "review\tstars\ngreat\t1\nawful\t0\nok\t1\n")
    examples = load_examples(path, text_field=0, label_field=1)
    assert examples.texts == ["great", "awful", "ok"] and examples.labels == [1, 0, 1]


def test_a_headerless_first_record_of_a_rare_class_is_kept_not_taken_for_a_header(tmp_path):
    """Header detection looked at the next 200 rows only: a first record whose (string) class does not recur among
    them was read as a header, and silently dropped. A header name never recurs in its own column further down."""
    rows = ["first text of a rare class\trare"] + [f"text {i}\t{'a' if i % 2 else 'b'}" for i in range(300)]
    path = write(tmp_path / "d.tsv", "\n".join([*rows, "another rare one\trare"]) + "\n")
    examples = load_examples(path, text_field="0", label_field="1")
    assert len(examples) == 302 and examples.texts[0] == "first text of a rare class"
    assert examples.label_counts()[examples.label_names.index("rare")] == 2
    header = write(tmp_path / "h.tsv", "\n".join(["review\tstars", *rows[1:]]) + "\n")  # a real header: still one
    assert len(load_examples(header, text_field="0", label_field="1")) == 300


def test_explicit_has_header_overrides_detection(tmp_path):
    path = write(tmp_path / "d.tsv", "a\t0\nb\t1\n")
    assert load_examples(path, has_header=True, text_field="a", label_field="0").texts == ["b"]
    assert load_examples(path, has_header=False, text_field=0, label_field=1).texts == ["a", "b"]


def test_csv_with_quoted_fields(tmp_path):
    path = write(tmp_path / "d.csv", 'id,text,label\n1,"hello, world",1\n2,"say ""hi""",0\n')
    examples = load_examples(path)
    assert examples.texts == ["hello, world", 'say "hi"'] and examples.labels == [1, 0]


def test_jsonl_with_int_and_string_labels(tmp_path):
    ints = write(tmp_path / "i.jsonl", '{"text": "a", "label": 1}\n\n{"text": "b", "label": 0}\n')
    assert load_examples(ints).labels == [1, 0]
    named = write(tmp_path / "s.jsonl", '{"q": "a", "y": "World"}\n{"q": "b", "y": "Sports"}\n')
    examples = load_examples(named, text_field="q", label_field="y")
    assert examples.label_names == ["Sports", "World"] and examples.labels == [1, 0]


def test_json_array_file(tmp_path):
    path = write(tmp_path / "d.json", json.dumps([{"text": "a", "label": 2}, {"text": "b", "label": 0}]))
    assert load_examples(path).label_names == ["0", "1", "2"]


def test_data_errors_are_fedspec_errors():
    from fedspec.errors import FedspecError

    assert issubclass(DataError, FedspecError) and issubclass(DataError, ValueError)
    assert issubclass(DataFileNotFoundError, DataError)


def test_error_missing_file(tmp_path):
    missing = tmp_path / "nope.tsv"
    with pytest.raises(DataFileNotFoundError) as caught:
        load_examples(missing)
    assert f"data.path='{missing}' does not exist" in str(caught.value)
    assert isinstance(caught.value, FileNotFoundError)


def test_error_missing_field_lists_available_fields(tmp_path):
    path = write(tmp_path / "d.tsv", "sentence\tlabel\nhi\t1\n")
    message = error_of(load_examples, path)
    assert "data.text_field='text'" in message and "available fields: sentence, label" in message
    jsonl = write(tmp_path / "d.jsonl", '{"sentence": "hi", "label": 1}\n')
    assert "available fields: sentence, label" in error_of(load_examples, jsonl)


def test_error_empty_and_header_only_files(tmp_path):
    assert "is empty" in error_of(load_examples, write(tmp_path / "e.tsv", "\n\n"))
    assert "is empty" in error_of(load_examples, write(tmp_path / "e.jsonl", ""))
    assert "header row but no examples" in error_of(load_examples, write(tmp_path / "h.tsv", "text\tlabel\n"))


def test_error_unparseable_labels(tmp_path):
    empty_label = write(tmp_path / "a.tsv", "text\tlabel\nx\t1\ny\t\n")
    assert "unparseable label '' at line 3" in error_of(load_examples, empty_label)
    fractional = write(tmp_path / "b.jsonl", '{"text": "x", "label": 0.5}\n')
    assert "unparseable label 0.5 at line 1" in error_of(load_examples, fractional)
    mixed = write(tmp_path / "c.tsv", "text\tlabel\nx\t1\ny\tWorld\n")
    assert "mix integers and names" in error_of(load_examples, mixed)
    unknown = write(tmp_path / "d.tsv", "text\tlabel\nx\tWorld\ny\tMars\n")
    assert "'Mars'" in error_of(load_examples, unknown, label_names=["World", "Sports"])
    negative = write(tmp_path / "e.tsv", "text\tlabel\nx\t-1\ny\t0\n")
    assert "0 or more" in error_of(load_examples, negative)


def test_error_format_and_structure(tmp_path):
    assert "set data.format" in error_of(load_examples, write(tmp_path / "d.txt", "x\t1\n"))
    bad_json = write(tmp_path / "d.jsonl", '{"text": "a", "label": 1}\n{oops\n')
    assert "line 2" in error_of(load_examples, bad_json)
    headerless_names = write(tmp_path / "w.tsv", "1\tx\t0\n2\ty\t1\n3\tz\t0\n4\tw\t1\n")
    assert "must be a column index" in error_of(load_examples, headerless_names, text_field="body")
    short_row = write(tmp_path / "s.csv", "text,label\na,1\nb\n")
    assert "line 3" in error_of(load_examples, short_row)


def test_a_file_that_is_not_utf8_is_refused_naming_the_line_and_byte_of_the_bad_byte(tmp_path):
    """The TSV/CSV reader decodes in chunks, and the error named the byte's offset inside its chunk (4,125 for a
    byte at 36,893 of the file) and no line: the user could not find the bad row."""
    tsv = "".join(f"text number {i}\t{i % 2}\n" for i in range(2000)) + "caf\xe9 au lait\t1\n"
    jsonl = "".join(f'{{"text": "text number {i}", "label": {i % 2}}}\n' for i in range(2000))
    for name, content in (("d.tsv", tsv), ("d.jsonl", jsonl + '{"text": "caf\xe9", "label": 1}\n')):
        path = tmp_path / name
        path.write_bytes(content.encode("latin-1"))
        bad = path.read_bytes().index(b"\xe9")
        message = error_of(load_examples, path)
        assert f"line 2001 of {path} is not UTF-8 text" in message and f"at byte {bad})" in message


def test_a_row_with_a_stray_tab_is_refused_not_made_a_class(tmp_path):
    """The lenient reader took the extra field as the label: 'stray' became a third class."""
    path = write(tmp_path / "d.tsv", "text\tlabel\ngood\tpos\nbad\tstray\tneg\nfine\tpos\n")
    message = error_of(load_examples, path)
    assert f"line 3 of {path} has 3 fields ['bad', 'stray', 'neg'], but the first row (line 1) has 2" in message
    headerless = write(tmp_path / "h.tsv", "a\tWorld\nb\tSports\nc\tWorld\n\nd\n")  # too few: blank lines count
    assert f"line 5 of {headerless} has 1 fields ['d']" in error_of(load_examples, headerless)


def test_an_unclosed_quote_is_refused_instead_of_swallowing_the_rows_after_it(tmp_path):
    # the lenient reader read lines 2-4 as one record (text 'oops\t1\nfine\t0\nquoted"'), losing two rows
    later_quote = write(tmp_path / "a.tsv", 'text\tlabel\n"oops\t1\nfine\t0\n"quoted"\t1\nlast\t0\n')
    message = error_of(load_examples, later_quote)
    assert f"line 2 of {later_quote} could not be parsed as TSV" in message and "read up to line 4" in message
    never_closed = write(tmp_path / "b.tsv", 'text\tlabel\na\t1\n"oops\t1\nfine\t0\n')
    assert f"line 3 of {never_closed} could not be parsed as TSV (unexpected end of data" in error_of(
        load_examples, never_closed)
    # closed right before a tab, the swallowed rows make a field of the right count: its tabs give it away
    closed_late = write(tmp_path / "c.tsv", 'text\tlabel\n"oops\t1\nfine\t0\nends here"\t1\nnext\t0\n')
    assert f"lines 2-4 of {closed_late} were read as one quoted field" in error_of(load_examples, closed_late)


def test_properly_quoted_files_with_crlf_bom_and_blank_lines_still_load(tmp_path):
    # AG News as its CSV ships: every field quoted, commas and doubled quotes inside, the label first
    agnews = write(tmp_path / "agnews.csv", '\ufeff"3","Wall St. Bears Claw Back","Short-sellers, Wall Street\'s '
                   'dwindling band, see ""green"" again."\r\n\r\n"4","Tech","A chip, faster."\r\n')
    examples = load_examples(agnews, has_header=False, text_field=2, label_field=0)
    assert examples.texts == ['Short-sellers, Wall Street\'s dwindling band, see "green" again.', "A chip, faster."]
    assert examples.labels == [3, 4] and examples.label_names == ["0", "1", "2", "3", "4"]
    # pandas' to_csv(sep="\t") quotes a text that holds a tab, a quote or a line break: all are kept
    tsv = write(tmp_path / "d.tsv", 'text\tlabel\r\n"tab\there"\t1\r\n"first line\r\nsecond line"\t0\r\n'
                '"say ""hi"""\t1\r\n\r\n')
    examples = load_examples(tsv)
    assert examples.texts == ["tab\there", "first line\r\nsecond line", 'say "hi"'] and examples.labels == [1, 0, 1]


def test_load_hf_dataset_without_datasets_says_it_is_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    assert "not installed" in error_of(load_hf_dataset, "ag_news", "train")


def _fake_datasets(load_dataset) -> types.ModuleType:
    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    return module


def test_load_hf_dataset_maps_columns_and_class_names(monkeypatch):
    class FakeDataset:
        column_names = ["text", "label"]
        features = {"label": types.SimpleNamespace(names=["neg", "pos"])}

        def __getitem__(self, column):
            return {"text": ["bad", "good"], "label": [0, 1]}[column]

    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(lambda name, split: FakeDataset()))
    examples = load_hf_dataset("imdb", "train")
    assert examples.label_names == ["neg", "pos"] and examples.labels == [0, 1]
    assert "available fields: text, label" in error_of(load_hf_dataset, "imdb", "train", "sentence")


def test_a_hugging_face_task_takes_its_splits_from_the_command_line_and_caps_the_eval_split(monkeypatch):
    """data.split and data.eval_split were read by the task builder but missing from the config schema, so no
    override could set them; and eval_examples did not cap an eval split as it caps an eval file."""
    from fedspec.builders import build_task
    from fedspec.config import compose_config

    class FakeDataset:
        column_names = ["text", "label"]
        features = {"label": types.SimpleNamespace(names=["neg", "pos"])}

        def __init__(self, split):
            self.rows = {"train[:50%]": 40, "test": 30}[split]

        def __getitem__(self, column):
            return {"text": [f"t{i}" for i in range(self.rows)], "label": [i % 2 for i in range(self.rows)]}[column]

    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(lambda name, split: FakeDataset(split)))
    cfg = compose_config(["data.source=hf", "data.path=imdb", "data.split='train[:50%]'", "data.eval_split=test",
                          "data.eval_examples=10"])
    task = build_task(cfg.data, seed=0)
    assert len(task.train) == 40 and len(task.eval) == 10
    carved = build_task(compose_config(["data.source=hf", "data.path=imdb", "data.split='train[:50%]'",
                                        "data.eval_examples=10"]).data, 0)
    assert (len(carved.train), len(carved.eval)) == (30, 10)  # no eval split: carved from the training split


def test_load_hf_dataset_offline_error_is_explicit(monkeypatch):
    def offline(name, split):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(offline))
    message = error_of(load_hf_dataset, "ag_news", "train")
    assert "'ag_news'" in message and "network" in message


# --------------------------------------------------------------------------------------------------
# Shared real data (skipped when ../shared/data is absent)
# --------------------------------------------------------------------------------------------------


def shared_file(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.is_file():
        pytest.skip(f"shared data not available: {path}")
    return path


def test_sst2_loads_with_readme_row_counts():
    train = load_examples(shared_file("sst2/train.tsv"), text_field="sentence")
    validation = load_examples(shared_file("sst2/validation.tsv"), text_field="sentence")
    assert len(train) == 60_614 and len(validation) == 6_735
    assert train.label_names == ["0", "1"] and set(train.labels) == {0, 1}


def test_agnews_headerless_loads_with_readme_row_count_and_sorted_names():
    examples = load_examples(shared_file("agnews/train.tsv"))
    assert len(examples) == 10_001
    assert examples.label_names == ["Business", "Sci/Tech", "Sports", "World"]
    assert all(count > 2000 for count in examples.label_counts())


def test_load_task_on_sst2_with_eval_path_and_cap():
    cfg = {
        "source": "file",
        "path": str(shared_file("sst2/train.tsv")),
        "eval_path": str(shared_file("sst2/validation.tsv")),
        "text_field": "sentence",
        "max_examples": 500,
    }
    train, evaluation = load_task(cfg)
    assert len(train) == 500 and len(evaluation) == 6_735
    assert train.label_names == evaluation.label_names == ["0", "1"]


# --------------------------------------------------------------------------------------------------
# load_task
# --------------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    source: str = "synthetic"
    path: str | None = None
    eval_path: str | None = None
    text_field: str = "text"
    label_field: str = "label"
    format: str = "auto"
    num_examples: int = 400
    eval_examples: int | None = 100
    max_examples: int | None = None
    validation: bool = False
    seed: int = 0
    holdout_seed: int = 0
    label_names: list[str] | None = None


def test_load_task_synthetic_splits_are_balanced_disjoint_and_deterministic():
    train, evaluation = load_task(DataConfig(seed=4))
    assert len(train) == 400 and len(evaluation) == 100
    assert train.label_counts() == [100] * 4 and evaluation.label_counts() == [25] * 4
    assert not set(train.texts) & set(evaluation.texts)
    again = load_task({"source": "synthetic", "num_examples": 400, "eval_examples": 100, "seed": 4})
    assert again == (train, evaluation)


def test_load_task_accepts_omegaconf():
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.structured(DataConfig(num_examples=40, eval_examples=8, max_examples=20))
    train, evaluation = load_task(cfg)
    assert len(train) == 20 and len(evaluation) == 8


def test_load_task_file_carves_a_stratified_holdout(tmp_path):
    lines = ["text\tlabel"] + [f"example {i}\t{'ab'[i % 4 == 0]}" for i in range(200)]
    path = write(tmp_path / "d.tsv", "\n".join(lines) + "\n")
    train, evaluation = load_task(DataConfig(source="file", path=str(path), eval_examples=40))
    assert len(train) == 160 and len(evaluation) == 40
    assert evaluation.label_counts() == [30, 10]  # same 3:1 class ratio as the file
    assert sorted(train.texts + evaluation.texts) == sorted(f"example {i}" for i in range(200))


@pytest.mark.parametrize("with_eval_file", [False, True])
def test_validation_mode_scores_on_training_records_only(tmp_path, with_eval_file):
    """data.validation=true (learning-rate sweeps): the validation split is carved from the training records,
    the model trains on the rest, and no held-out record is in either."""
    lines = ["text\tlabel"] + [f"example {i}\t{'ab'[i % 4 == 0]}" for i in range(200)]
    path = write(tmp_path / "d.tsv", "\n".join(lines) + "\n")
    eval_path = write(tmp_path / "e.tsv", "text\tlabel\n" + "".join(f"held {i}\t{'ab'[i % 2]}\n" for i in range(30)))
    options = {"eval_path": str(eval_path)} if with_eval_file else {"eval_examples": 30}
    train, held_out = load_task(DataConfig(source="file", path=str(path), **options))
    tune_train, validation = load_task(DataConfig(source="file", path=str(path), validation=True, **options))
    assert len(validation) == len(held_out) == 30
    assert sorted(tune_train.texts + validation.texts) == sorted(train.texts)  # a split of the training records
    assert not set(validation.texts) & set(held_out.texts)
    share = train.label_counts()[0] / len(train)
    assert abs(validation.label_counts()[0] - share * 30) < 1  # stratified like the training records


def test_every_run_seed_is_scored_on_the_same_held_out_rows_and_tunes_on_none_of_them(tmp_path):
    """The held-out carve follows data.holdout_seed, not the run's seed: otherwise seed 1's held-out rows could sit
    in the validation split that seed 0's learning-rate sweep tuned on (a tenth of AG News' did)."""
    lines = ["text\tlabel"] + [f"example {i}\t{'ab'[i % 4 == 0]}" for i in range(400)]
    path = write(tmp_path / "d.tsv", "\n".join(lines) + "\n")
    held_out = [load_task(DataConfig(source="file", path=str(path), eval_examples=80, seed=seed))[1]
                for seed in range(3)]
    assert held_out[0] == held_out[1] == held_out[2]
    for seed in range(3):
        _, validation = load_task(DataConfig(source="file", path=str(path), eval_examples=80, seed=seed,
                                             validation=True))
        assert not set(validation.texts) & set(held_out[0].texts)
    other = load_task(DataConfig(source="file", path=str(path), eval_examples=80, holdout_seed=1))[1]
    assert set(other.texts) != set(held_out[0].texts)  # the carve is seeded, by holdout_seed


def test_validation_split_takes_at_most_a_fifth_of_the_training_records(tmp_path):
    lines = ["text\tlabel"] + [f"example {i}\t{'ab'[i % 2]}" for i in range(100)]
    path = write(tmp_path / "d.tsv", "\n".join(lines) + "\n")
    eval_path = write(tmp_path / "e.tsv", "text\tlabel\n" + "".join(f"held {i}\t{'ab'[i % 2]}\n" for i in range(80)))
    tune_train, validation = load_task(DataConfig(source="file", path=str(path), eval_path=str(eval_path),
                                                  validation=True))
    assert (len(tune_train), len(validation)) == (80, 20)  # not 80 validation records out of 100


def test_too_few_training_records_for_a_validation_split_names_data_validation(tmp_path):
    """With fewer than 5 training records (after data.max_examples) the validation split (a fifth of them) is empty:
    the error blamed data.eval_examples=0, a value the user never set."""
    path = write(tmp_path / "d.tsv", "text\tlabel\n" + "".join(f"t{i}\t{i % 2}\n" for i in range(8)))
    message = error_of(load_task, DataConfig(source="file", path=str(path), eval_examples=2, max_examples=4,
                                             validation=True))
    assert "data.validation=true" in message and "4 training records" in message
    assert "data.eval_examples=0" not in message


def test_load_task_eval_file_reuses_train_label_mapping(tmp_path):
    train_path = write(tmp_path / "train.tsv", "text\tlabel\na\tWorld\nb\tSports\nc\tBusiness\n")
    eval_path = write(tmp_path / "eval.tsv", "text\tlabel\nd\tWorld\n")
    train, evaluation = load_task(DataConfig(source="file", path=str(train_path), eval_path=str(eval_path)))
    assert evaluation.label_names == train.label_names == ["Business", "Sports", "World"]
    assert evaluation.labels == [2]


def test_class_ids_in_an_eval_file_are_refused_when_no_list_says_which_id_is_which_class(tmp_path):
    """The training file names its classes (sorted: Business, Sci/Tech, Sports, World); an evaluation file that holds
    class ids instead (a Hugging Face export: 0 World, 1 Sports, 2 Business, 3 Sci/Tech) was read with the ids taken
    as positions in that sorted list: every class scored as another one, without a word."""
    names = ["World", "Sports", "Business", "Sci/Tech"]
    train_path = write(tmp_path / "train.tsv", "text\tlabel\n" + "".join(f"t{i}\t{names[i % 4]}\n" for i in range(8)))
    eval_path = write(tmp_path / "eval.tsv", "text\tlabel\n" + "".join(f"e{i}\t{i % 4}\n" for i in range(4)))
    message = error_of(load_task, DataConfig(source="file", path=str(train_path), eval_path=str(eval_path)))
    assert f"label '0' at line 2 of {eval_path} is a class id" in message and "data.label_names" in message
    # data.label_names says which id is which class: ids and names then agree in both files
    train, evaluation = load_task(DataConfig(source="file", path=str(train_path), eval_path=str(eval_path),
                                             label_names=names))
    assert [train.label_names[label] for label in train.labels[:4]] == names
    assert [evaluation.label_names[label] for label in evaluation.labels] == names
    # ids in both files: the names are the ids themselves, nothing to guess
    ids_path = write(tmp_path / "ids.tsv", "text\tlabel\n" + "".join(f"t{i}\t{i % 4}\n" for i in range(8)))
    assert load_task(DataConfig(source="file", path=str(ids_path), eval_path=str(eval_path)))[1].labels == [0, 1, 2, 3]


def test_load_task_errors_name_the_key(tmp_path):
    assert "data.source='web'" in error_of(load_task, {"source": "web"})
    assert "data.path is required" in error_of(load_task, {"source": "file"})
    missing = {"source": "file", "path": "missing.tsv"}
    assert "data.path='missing.tsv' does not exist" in error_of(load_task, missing)
    path = write(tmp_path / "d.tsv", "text\tlabel\na\t0\nb\t1\n")
    too_large_holdout = {"source": "file", "path": str(path), "eval_examples": 5}
    assert "data.eval_examples=5" in error_of(load_task, too_large_holdout)


def test_the_keys_data_errors_name_can_be_set_on_the_command_line(tmp_path):
    """Error hints say data.has_header and data.label_names: both are config keys a user can override."""
    from fedspec.config import compose_config

    path = write(tmp_path / "d.tsv", "".join(f"review {i}\t{'pos' if i % 2 else 'neg'}\n" for i in range(40)))
    cfg = compose_config(["data.source=file", f"data.path={path}", "data.has_header=false", "data.text_field=0",
                          "data.label_field=1", "data.label_names=[pos,neg]", "data.eval_examples=10"])
    train, evaluation = load_task(cfg.data)
    assert train.label_names == evaluation.label_names == ["pos", "neg"]  # the given order, not sorted
    assert len(train) + len(evaluation) == 40  # the first row is a record, not a header
    assert train.labels[train.texts.index("review 1")] == 0


def test_split_holdout_keeps_every_example_once():
    examples = generate_topics(103, seed=0)
    train, evaluation = split_holdout(examples, 21, seed=3)
    assert len(train) + len(evaluation) == 103 and len(evaluation) == 21
    assert sorted(train.texts + evaluation.texts) == sorted(examples.texts)


def test_a_carved_held_out_set_of_zero_records_is_refused():
    """0 means every row of data.eval_path; carved from the training data it would leave nothing to score (every
    round's accuracy NaN)."""
    from fedspec.data import load_task

    with pytest.raises(DataError, match="data.eval_examples=0 must be at least 1 .* when one is given"):
        load_task({"source": "synthetic", "num_examples": 100, "eval_examples": 0})


# --------------------------------------------------------------------------------------------------
# Partitioners
# --------------------------------------------------------------------------------------------------

LABELS = np.repeat(np.arange(4), 250)  # 1000 examples, 4 balanced classes


def mean_max_class_share(labels, parts) -> float:
    return float(np.mean([client["max_class_share"] for client in partition_summary(labels, parts)]))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_partition_is_an_exact_cover(scheme, seed):
    parts = partition(LABELS, 10, scheme=scheme, seed=seed)
    flat = [index for part in parts for index in part]
    assert len(parts) == 10 and sorted(flat) == list(range(len(LABELS)))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partition_is_deterministic_for_a_seed(scheme):
    assert partition(LABELS, 8, scheme=scheme, seed=7) == partition(LABELS, 8, scheme=scheme, seed=7)
    assert partition(LABELS, 8, scheme=scheme, seed=7) != partition(LABELS, 8, scheme=scheme, seed=8)


def test_iid_sizes_are_balanced_and_label_mix_global():
    parts = partition(list(LABELS), 7, scheme="iid", seed=0)
    sizes = [len(part) for part in parts]
    assert max(sizes) - min(sizes) <= 1
    assert mean_max_class_share(LABELS, parts) < 0.4  # global share is 0.25


def test_dirichlet_small_alpha_is_skewed_and_large_alpha_near_iid():
    iid = mean_max_class_share(LABELS, partition(LABELS, 10, scheme="iid", seed=0))
    skewed = np.mean(
        [mean_max_class_share(LABELS, partition(LABELS, 10, alpha=0.1, seed=seed)) for seed in range(3)]
    )
    near_iid = mean_max_class_share(LABELS, partition(LABELS, 10, alpha=1000.0, seed=0))
    assert skewed > iid + 0.35
    assert abs(near_iid - iid) < 0.05


def test_dirichlet_honours_min_size_by_redrawing():
    first_draw = partition(LABELS, 10, alpha=0.1, seed=0, min_size=0)
    assert min(len(part) for part in first_draw) < 20  # so min_size=20 forces redraws
    parts = partition(LABELS, 10, alpha=0.1, seed=0, min_size=20)
    assert min(len(part) for part in parts) >= 20
    assert sorted(index for part in parts for index in part) == list(range(len(LABELS)))


def test_dirichlet_gives_up_with_a_clear_error():
    # 50 clients share 4 classes; with alpha=0.001 each class lands on about one client, so most stay empty.
    message = error_of(partition, LABELS, 50, alpha=0.001, seed=0)
    assert f"after {MAX_DIRICHLET_DRAWS} Dirichlet draws" in message and "larger alpha" in message


def test_partition_argument_errors():
    assert "at least 1" in error_of(partition, LABELS, 0)
    assert "only 3 examples" in error_of(partition, [0, 1, 0], 4, scheme="iid")
    assert "alpha=0" in error_of(partition, LABELS, 4, alpha=0)
    assert "alpha=-1" in error_of(partition, LABELS, 4, alpha=-1.0)
    message = error_of(partition, LABELS, 4, scheme="shards")
    assert "'shards'" in message and "iid, dirichlet" in message
    assert "min_size=300" in error_of(partition, LABELS, 4, scheme="iid", min_size=300)


def test_partition_summary_reports_sizes_and_histograms():
    labels = [0, 0, 1, 2, 2, 2]
    summary = partition_summary(labels, [[0, 2], [1, 3, 4, 5]])
    assert summary[0] == {"client": 0, "size": 2, "label_counts": [1, 1, 0], "max_class_share": 0.5}
    assert summary[1]["label_counts"] == [1, 0, 3] and summary[1]["size"] == 4
    totals = np.sum([client["label_counts"] for client in summary], axis=0)
    assert totals.tolist() == [Counter(labels)[label] for label in range(3)]


@pytest.mark.parametrize(("rows", "message"), [
    ("a\t0\nb\t0\nc\t0\n", "one class only"),
    ("a\t0\n \t1\nc\t1\n\t0\n", "2 of 4 examples in .* have an empty text \\(first at line 3"),
    ("a\t0\nb\t1\nc\t99999\n", "label 99999 at line 4 .* makes 100000 classes, but only 3 ids occur"),
])
def test_broken_training_files_fail_with_a_clear_error(tmp_path, rows, message):
    path = write(tmp_path / "d.tsv", "text\tlabel\n" + rows)
    with pytest.raises(DataError, match=message):
        load_task(DataConfig(source="file", path=str(path), eval_examples=1))


def test_one_based_integer_labels_are_still_accepted(tmp_path):
    path = write(tmp_path / "d.tsv", "text\tlabel\n" + "".join(f"t{i}\t{1 + i % 2}\n" for i in range(10)))
    train, _ = load_task(DataConfig(source="file", path=str(path), eval_examples=2))
    assert train.label_names == ["0", "1", "2"]


def test_a_dirichlet_split_of_one_class_data_is_refused(tiny_cfg):
    """Instruction data has one "class": a Dirichlet draw over it skews only the clients' sizes (and so their
    sampling rates and noise), which data.partition=dirichlet does not ask for."""
    from fedspec.builders import client_partitions
    from fedspec.errors import ConfigError

    cfg = tiny_cfg()
    with pytest.raises(ConfigError, match="every record has the same one.*set data.partition=iid"):
        client_partitions([0] * 200, cfg.data, clients=4, seed=0)
    iid = tiny_cfg("data.partition=iid")
    assert sorted(i for part in client_partitions([0] * 200, iid.data, clients=4, seed=0) for i in part) == list(range(200))


def test_no_client_is_left_without_records(tiny_cfg):
    """data.min_client_examples=0 was allowed: a skewed Dirichlet draw then gave clients no records, and the run
    stopped in the privacy planning with a bare ZeroDivisionError (1/n for n = 0)."""
    from fedspec.errors import ConfigError

    with pytest.raises(ConfigError, match="data.min_client_examples=0 is not allowed; it must be at least 1"):
        tiny_cfg("data.min_client_examples=0")
    assert tiny_cfg("data.min_client_examples=1").data.min_client_examples == 1
