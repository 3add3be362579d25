"""`fedspec predict`: a finished classifier run labels new texts with its own class names, exactly as it scored
its held-out data, and bad input gets one clear line."""

from __future__ import annotations

import json

import pytest

from fedspec.cli import main
from fedspec.rundir import MetricsLog

REVIEWS = [("a warm , funny and moving film", "positive"), ("dull , flat and far too long", "negative"),
           ("the best thing i saw this year", "positive"), ("a tedious mess of a movie", "negative")]


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
    """A centralized tiny-bert run on a file with string labels, scored on every row of its evaluation file."""
    root = tmp_path_factory.mktemp("predict")
    train, held_out = root / "train.jsonl", root / "eval.jsonl"
    train.write_text("".join(json.dumps({"text": f"{text} {i}", "label": label}) + "\n"
                             for i in range(24) for text, label in REVIEWS))
    held_out.write_text("".join(json.dumps({"text": text, "label": label}) + "\n" for text, label in REVIEWS * 3))
    assert main(["train", "model=tiny-bert", "data.source=file", f"data.path={train}", f"data.eval_path={held_out}",
                 "data.eval_examples=0", "privacy=none", "train.batch_size=16", "run.name=reviews",
                 f"run.output_dir={root}", "run.progress=false"]) == 0
    return root / "reviews", held_out


def test_predict_names_the_runs_classes_and_reproduces_its_held_out_accuracy(classifier_run, capsys):
    run, held_out = classifier_run
    capsys.readouterr()
    assert main(["predict", str(run), "--file", str(held_out)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = [json.loads(line) for line in held_out.read_text().splitlines()]
    assert [line["text"] for line in lines] == [record["text"] for record in expected]
    assert all(set(line["probabilities"]) == {"negative", "positive"} for line in lines)
    assert all(line["probabilities"][line["label"]] == max(line["probabilities"].values()) for line in lines)
    accuracy = sum(line["label"] == record["label"] for line, record in zip(lines, expected)) / len(lines)
    epochs = [r for r in MetricsLog(run / "metrics.jsonl").read() if r["kind"] == "epoch"]
    assert accuracy == pytest.approx(epochs[-1]["eval_accuracy"], abs=1e-6)


def test_predict_prints_a_label_for_each_text_and_reads_plain_text_files(classifier_run, tmp_path, capsys):
    run, _ = classifier_run
    capsys.readouterr()
    assert main(["predict", str(run), "--text", "a moving film", "--text", "a tedious mess"]) == 0
    printed = capsys.readouterr().err.splitlines()
    assert len(printed) == 2 and printed[0].endswith("a moving film") and printed[1].endswith("a tedious mess")
    assert all(line.split()[0] in ("negative", "positive") for line in printed)
    texts = tmp_path / "texts.txt"
    texts.write_text("a moving film\n\na tedious mess\n")
    assert main(["predict", str(run), "--file", str(texts)]) == 0
    assert [json.loads(line)["text"] for line in capsys.readouterr().out.splitlines()] == ["a moving film",
                                                                                         "a tedious mess"]


def test_a_run_saved_without_class_names_is_labelled_by_class_id(classifier_run, tmp_path, capsys):
    import shutil

    run, _ = classifier_run
    old = tmp_path / "old"
    shutil.copytree(run, old)
    config = old / "adapter" / "adapter_config.json"
    raw = json.loads(config.read_text())
    del raw["metadata"]["labels"]
    config.write_text(json.dumps(raw))
    capsys.readouterr()
    assert main(["predict", str(old), "--text", "a moving film"]) == 0
    assert capsys.readouterr().err.split()[0] in ("0", "1")


@pytest.mark.parametrize(("arguments", "message"), [
    ([], "give --text TEXT"),
    (["--file", "{missing}"], "nope.txt' does not exist"),
    (["--file", "{numbers}"], "has no text in 'text' (its fields: text, review); name the text field with --field"),
])
def test_bad_predict_input_gets_one_line(classifier_run, tmp_path, capsys, arguments, message):
    run, _ = classifier_run
    numbers = tmp_path / "numbers.jsonl"
    numbers.write_text(json.dumps({"text": 5, "review": "a fine film"}) + "\n")
    capsys.readouterr()
    assert main(["predict", str(run), *(a.format(missing=tmp_path / "nope.txt", numbers=numbers) for a in arguments)]) == 2
    assert message in capsys.readouterr().err.replace("\n", "")
    assert main(["predict", str(run), "--file", str(numbers), "--field", "review"]) == 0


def test_predict_needs_a_finished_run_folder(classifier_run, tmp_path, capsys):
    run, _ = classifier_run
    assert main(["predict", str(tmp_path), "--text", "x"]) == 2
    assert "config.yaml does not exist: give a run folder" in capsys.readouterr().err.replace("\n", "")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text((run / "config.yaml").read_text())
    assert main(["predict", str(unfinished), "--text", "x"]) == 2
    assert "has no adapter/ yet (is the run finished?)" in capsys.readouterr().err.replace("\n", "")


def test_predict_prints_the_text_as_given(classifier_run, capsys):
    """rich used to read a text's [words] as markup (dropped) and :x: as an emoji code."""
    run, _ = classifier_run
    text = "a [bold] moving [neg,pos] film :x:"
    assert main(["predict", str(run), "--text", text]) == 0
    assert text in capsys.readouterr().err


def test_predict_takes_the_runs_adapter_folder_too(classifier_run, capsys):
    """The error for a wrong folder says "give a run folder (runs/NAME) or its adapter/ folder": both work."""
    run, _ = classifier_run
    assert main(["predict", str(run), "--text", "a moving film"]) == 0
    from_run = capsys.readouterr().err  # the label of a --text goes to the console (stderr)
    assert "a moving film" in from_run
    assert main(["predict", str(run / "adapter"), "--text", "a moving film"]) == 0
    assert capsys.readouterr().err == from_run


@pytest.mark.parametrize("tokens", ["0", "-5"])
def test_generate_refuses_an_answer_length_below_one_token(tmp_path, capsys, tokens):
    """--max-new-tokens 0 silently answered at the run's data.max_new_tokens; a negative count reached the decoder."""
    assert main(["generate", str(tmp_path), "--prompt", "hello", "--max-new-tokens", tokens]) == 2
    assert f"--max-new-tokens {tokens}: the longest answer must be at least 1 token" in capsys.readouterr().err


def test_generate_on_a_classifier_run_points_to_predict(classifier_run, capsys):
    run, _ = classifier_run
    assert main(["generate", str(run), "--prompt", "hello"]) == 2
    assert "fedspec predict" in capsys.readouterr().err


@pytest.mark.parametrize("side", ["right", "left"])
def test_last_token_pooling_reads_the_last_real_token_whichever_side_the_tokenizer_pads(side):
    """A decoder classifier pools its last real token: a tokenizer that pads on the left (many decoders' do) must
    give a text the logits it gets alone, not a padding token's."""
    import torch

    from fedspec.models import tokenize

    from helpers import tiny_classifier

    model, tokenizer = tiny_classifier("tiny-llama")
    model.eval()
    texts = ["a short one", "a much longer text with many more words in it than the other"]
    tokenizer.padding_side = side
    batch = tokenize(tokenizer, texts, 24)
    assert not bool(batch.attention_mask[0].all())  # the short text is padded
    with torch.no_grad():
        together = model(batch.input_ids, batch.attention_mask)
        for row, text in enumerate(texts):
            alone = tokenize(tokenizer, [text], int(batch.attention_mask[row].sum()))
            assert torch.allclose(together[row], model(alone.input_ids, alone.attention_mask)[0], atol=1e-5)


def test_a_run_with_a_frozen_head_predicts_and_exports_with_the_head_it_was_scored_with(classifier_run, tmp_path,
                                                                                         capsys):
    """adapter.train_head=false saves no head: the run scored with the head its seed initializes, which predict
    and export-peft rebuild (they refused the run: "holds no classification head")."""
    run, held_out = classifier_run
    train = held_out.parent / "train.jsonl"  # the fixture's training file
    assert main(["train", "model=tiny-bert", "data.source=file", f"data.path={train}", f"data.eval_path={held_out}",
                 "data.eval_examples=0", "privacy=none", "train.batch_size=16", "adapter.train_head=false",
                 "run.name=frozen", f"run.output_dir={tmp_path}", "run.progress=false"]) == 0
    frozen = tmp_path / "frozen"
    capsys.readouterr()
    assert main(["predict", str(frozen), "--file", str(held_out)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = [json.loads(line)["label"] for line in held_out.read_text().splitlines()]
    accuracy = sum(line["label"] == label for line, label in zip(lines, expected)) / len(lines)
    epochs = [r for r in MetricsLog(frozen / "metrics.jsonl").read() if r["kind"] == "epoch"]
    assert accuracy == pytest.approx(epochs[-1]["eval_accuracy"], abs=1e-6)
    assert main(["export-peft", str(frozen / "adapter"), str(tmp_path / "peft")]) == 0


def test_export_peft_takes_the_run_folder_as_well_as_its_adapter_folder(classifier_run, tmp_path, capsys):
    """A missing config.yaml says "give a run folder (runs/NAME) or its adapter/ folder": export-peft took only
    the second, and answered a run folder with that same line."""
    run, _ = classifier_run
    assert main(["export-peft", str(run), str(tmp_path / "from-run")]) == 0
    assert main(["export-peft", str(run / "adapter"), str(tmp_path / "from-adapter")]) == 0
    for name in ("adapter_model.safetensors", "classifier_head.safetensors"):
        assert (tmp_path / "from-run" / name).read_bytes() == (tmp_path / "from-adapter" / name).read_bytes()
