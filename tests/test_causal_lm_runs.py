"""Causal-LM runs end to end on the tiny random Llama: `fedspec train`, `fedspec simulate` (Flower's simulation
runtime) and `fedspec generate` on an instruction file, with their reports."""

from __future__ import annotations

import json

import pytest

from fedspec.cli import main
from fedspec.config import compose_config
from fedspec.errors import ConfigError
from fedspec.privacy.accounting import epsilon_text
from fedspec.rundir import MetricsLog


@pytest.fixture
def instruction_file(tmp_path):
    path = tmp_path / "sums.jsonl"
    path.write_text("".join(json.dumps({"question": f"what is {a} plus {b}", "answer": f"{a} + {b}\n#### {a + b}"}) + "\n"
                            for a in range(12) for b in range(8)))
    return path


def _overrides(instruction_file, tmp_path, *extra: str) -> list[str]:
    return ["model=tiny-llama", "data=gsm8k", f"data.path={instruction_file}", "data.eval_path=null",
            "data.eval_examples=16", "data.generation_examples=4", "data.max_new_tokens=4", "data.min_client_examples=8",
            "model.max_length=32", "train.batch_size=8", "train.local_steps=2", "privacy.target_epsilon=3",
            f"run.output_dir={tmp_path}", "run.progress=false", *extra]


def test_centralized_causal_lm_run_reports_loss_perplexity_answers_and_generates(instruction_file, tmp_path, capsys):
    assert main(["train", *_overrides(instruction_file, tmp_path, "run.name=central")]) == 0
    run = tmp_path / "central"
    summary = (run / "summary.md").read_text()
    assert "- held-out response loss:" in summary and "perplexity" in summary
    assert "- answer accuracy (`data.answer=gsm8k`, greedy, first 4 held-out records):" in summary
    epochs = [r for r in MetricsLog(run / "metrics.jsonl").read() if r["kind"] == "epoch"]
    assert epochs[0]["answer_accuracy"] is not None and epochs[-1]["answer_accuracy"] is not None
    assert json.loads((run / "privacy" / "report.json").read_text())["clients"]["centralized"]["final_epsilon"] <= 3.0
    assert (run / "adapter-peft" / "adapter_config.json").is_file()
    capsys.readouterr()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"question": "what is 1 plus 2", "answer": "#### 3"}) + "\n")
    assert main(["generate", str(run), "--file", str(prompts), "--max-new-tokens", "3"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["prompt"] == "what is 1 plus 2" and line["reference"] == "#### 3" and isinstance(line["response"], str)


def test_federated_causal_lm_run_trains_and_scores_answers_at_the_end(instruction_file, tmp_path):
    from fedspec.simulations.driver import simulate

    cfg = compose_config([*_overrides(instruction_file, tmp_path, "run.name=fed"), "federation.clients=2",
                          "federation.rounds=2", "federation.fraction=1.0"])
    simulate(cfg)
    rounds = [r for r in MetricsLog(tmp_path / "fed" / "metrics.jsonl").read() if r["kind"] == "round"]
    assert [r["round"] for r in rounds] == [0, 1, 2] and rounds[-1]["clients"] == 2
    assert rounds[0]["answer_accuracy"] is not None and rounds[-1]["answer_accuracy"] is not None
    assert rounds[1]["answer_accuracy"] is None  # greedy decoding only at the start and the end
    assert rounds[-1]["eval_loss"] != rounds[0]["eval_loss"]
    assert "- held-out response loss:" in (tmp_path / "fed" / "summary.md").read_text()


def test_an_encoder_for_a_causal_lm_task_is_refused_early(instruction_file, tmp_path):
    with pytest.raises(ConfigError, match="data.task=causal_lm needs a decoder"):
        compose_config([*_overrides(instruction_file, tmp_path), "model=tiny-bert"])


def test_a_deployed_node_reads_its_own_instruction_or_classification_file_as_the_server_casts_it(
        instruction_file, tmp_path):
    from fedspec.causal_lm import IGNORE
    from fedspec.client.runtime import _cached_own_data, _key

    cfg = compose_config(_overrides(instruction_file, tmp_path))
    own = _cached_own_data(_key(cfg), str(instruction_file), ("-",))
    assert own.labels.dim() == 2 and len(own) == 96 and (own.labels != IGNORE).any(1).all()

    reviews = tmp_path / "reviews.tsv"
    reviews.write_text("sentence\tlabel\na fine film\t1\na dull film\t0\n")
    cfg = compose_config([*_overrides(instruction_file, tmp_path), "data=sst2", "data.task=causal_lm",
                          f"data.path={reviews}", f"data.eval_path={reviews}"])
    own = _cached_own_data(_key(cfg), str(reviews), ("0", "1"))
    from fedspec.models import load_tokenizer

    tokenizer = load_tokenizer("tiny-llama")
    answers = [tokenizer.decode([t for t in row.tolist() if t != IGNORE]) for row in own.labels]
    assert answers == ["positive [SEP]", "negative [SEP]"]


def test_a_federation_the_budgets_stop_early_still_scores_its_final_answers(instruction_file, tmp_path):
    """Answers are scored at the last round; a run whose clients' budgets end it after round 1 of 3 (σ = 1,
    q = 1/5: ε 3.45 after one round's two steps, 4.24 after two) scores its final model's answers there."""
    from fedspec.simulations.driver import simulate

    cfg = compose_config([*_overrides(instruction_file, tmp_path, "run.name=stopped"), "federation.clients=2",
                          "federation.rounds=3", "federation.fraction=1.0", "privacy.target_epsilon=null",
                          "privacy.noise_multiplier=1.0", "privacy.budget_epsilon=4.0"])
    simulate(cfg)
    lines = MetricsLog(tmp_path / "stopped" / "metrics.jsonl").read()
    rounds = [r for r in lines if r["kind"] == "round"]
    assert [r["round"] for r in rounds] == [0, 1]
    answers = [r for r in lines if r["kind"] == "answers"]
    assert len(answers) == 1 and answers[0]["round"] == 1 and answers[0]["answer_accuracy"] is not None
    summary = (tmp_path / "stopped" / "summary.md").read_text()
    assert f"→ {answers[0]['answer_accuracy']:.4f} (round 1)" in summary  # start → end, as a full run says


def test_the_privacy_plan_counts_the_records_a_client_trains_on_not_those_max_length_leaves_out(tmp_path, capsys):
    """A client leaves out records longer than model.max_length and is accounted at the sample rate of those it
    keeps: `fedspec privacy-plan` and the checks before a run must plan for that count, or with a given σ the ε
    they print is below what the run charges (here q = 1/5 planned against 1/4 trained: ε 4.24 against 4.87)."""
    from fedspec.client import runtime
    from fedspec.config import config_to_json
    from fedspec.privacy.planning import PlanSettings, plan_clients
    from fedspec.simulations.driver import client_sizes

    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps({"question": f"what is {a} plus {b}",
                                        "answer": f"{a} + {b}\n#### {a + b}" if (a + b) % 3 else "long " * 40}) + "\n"
                            for a in range(12) for b in range(8)))
    overrides = [*_overrides(path, tmp_path, "run.name=plan"), "federation.clients=2", "federation.rounds=2",
                 "federation.fraction=1.0", "privacy.target_epsilon=null", "privacy.noise_multiplier=1.0"]
    cfg = compose_config(overrides)
    key = config_to_json(cfg)
    trained = [len(runtime._cached_partition(key, client)) for client in range(2)]
    assert trained != [40, 40]  # records were left out
    assert client_sizes(cfg) == trained
    charged = plan_clients(PlanSettings.of(cfg), trained)
    capsys.readouterr()
    assert main(["privacy-plan", *overrides]) == 0
    printed = capsys.readouterr().out
    for plan in charged:
        assert epsilon_text(plan.epsilon) in printed


def test_generate_wraps_each_prompt_in_the_data_prompt_a_cast_classification_run_trained_on(
        instruction_file, tmp_path, monkeypatch, capsys):
    """`data=sst2 data.task=causal_lm` trains on data.prompt around each review: `generate --prompt TEXT` must put
    TEXT in the same place, or the model answers a turn unlike any it learned from; `--file` did not (its prompts
    reached the model bare)."""
    from fedspec import generation

    reviews = tmp_path / "reviews.tsv"
    reviews.write_text("sentence\tlabel\n" + "".join(f"film {i} was {'good' if i % 2 else 'bad'}\t{i % 2}\n"
                                                     for i in range(48)))
    overrides = [*_overrides(instruction_file, tmp_path, "run.name=cast"), "data=sst2", "data.task=causal_lm",
                 f"data.path={reviews}", f"data.eval_path={reviews}", "data.eval_examples=8", "train.max_steps=1"]
    assert main(["train", *overrides]) == 0
    template = compose_config(overrides).data.prompt
    seen = []
    monkeypatch.setattr(generation, "generate_responses",
                        lambda model, tokenizer, records, **_: seen.extend(records.records) or ["-"] * len(records))
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "cast"), "--prompt", "a moving film"]) == 0
    assert seen[0][0] == ("user", template.replace("{text}", "a moving film"))
    # --file's texts too ("messages" records are whole chats, as given)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a dull film"}\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    seen.clear()
    assert main(["generate", str(tmp_path / "cast"), "--file", str(prompts)]) == 0
    assert [record[0] for record in seen] == [("user", template.replace("{text}", "a dull film")), ("user", "hi")]
