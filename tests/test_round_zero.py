"""Federated round 0 of the data-driven initializers on Flower's simulation runtime (one EVA federation): the
server's global adapter is initialized from the exact sum of the clients' statistics, a privatized statistic is
counted in every client's ε (as the Gaussian mechanism (σ₀, q = 1, 1 step), before any DP-SGD step), the privacy
report says it was privatized, and EVA's per-layer ranks reach the clients. (The residual methods' init factors
travel like PiSSA's, see test_simulation.py; that the sum of statistics is the pooled statistic, see
test_calibration.py.)"""

from __future__ import annotations

import json
import math

import pytest
import torch

import fedspec
from fedspec.adapters import adapter_layers, load_adapter, sum_calibrations
from fedspec.adapters.calibration import COUNT_KEY
from fedspec.builders import build_task, client_partitions, encode
from fedspec.models import build_classifier
from fedspec.privacy import PrivacyLedger, load_ledgers
from fedspec.rundir import MetricsLog
from fedspec.simulations.driver import simulate

SIGMA0 = 4.0


def _config(tmp_path, *overrides):
    from fedspec.config import compose_config

    return compose_config([
        "model=tiny-bert", "data.num_examples=240", "data.partition=iid", "data.eval_examples=32",
        "data.min_client_examples=8",
        "federation.clients=3", "federation.rounds=1", "federation.fraction=1.0", "train.local_steps=1",
        "train.batch_size=16", "adapter.rank=4", "adapter.calibration_examples=24", "privacy.seed_noise=true",
        f"run.output_dir={tmp_path}", "run.progress=false", *overrides,
    ])


def _expected_calibration(cfg):
    """Every client's statistic as the client computes it, summed: what the server must initialize from."""
    from fedspec.client.statistics import local_calibration

    task = build_task(cfg.data, cfg.run.seed)
    model, tokenizer = build_classifier(cfg.model, task.num_classes, seed=cfg.run.seed)
    parts = []
    for client, indices in enumerate(client_partitions(task.train.labels, cfg.data, clients=cfg.federation.clients, seed=cfg.run.seed)):
        inputs, labels = encode(tokenizer, task.train.subset(indices), cfg.model.max_length)
        parts.append(local_calibration(cfg, client, model, inputs, labels))
    return task, sum_calibrations(parts)


@pytest.fixture(scope="module")
def eva_run(tmp_path_factory):
    """EVA under FFA-LoRA: A stays at its round-0 value, so the final adapter shows the init the server computed."""
    cfg = _config(tmp_path_factory.mktemp("runs"), "adapter=eva", "strategy=ffa", "run.name=eva",
                  "adapter.targets=[query,value,attention.output.dense]", "adapter.options.rho=8.0",
                  "privacy.private_init_stats=true", f"privacy.init_noise_multiplier={SIGMA0}",
                  "privacy.init_max_norm.inputs=1.0")
    return cfg, simulate(cfg)


def test_the_global_init_is_computed_from_the_sum_of_the_clients_privatized_statistics(eva_run):
    """The server's round-0 init equals EVA computed from the sum of the clients' (seeded, privatized)
    statistics — including the per-layer ranks, which the clients rebuild from the state they receive."""
    cfg, result = eva_run
    task, calibration = _expected_calibration(cfg)
    assert calibration.privatized and calibration.count == 3 * 24
    model, _ = build_classifier(cfg.model, task.num_classes, seed=cfg.run.seed)
    fedspec.adapt(model, "eva", 4, list(cfg.adapter.targets), calibration=calibration, rho=8.0)
    trained, _ = build_classifier(cfg.model, task.num_classes, seed=cfg.run.seed)
    load_adapter(trained, result.paths.adapter)
    expected, got = adapter_layers(model), adapter_layers(trained)
    assert {n: layer.rank for n, layer in got.items()} == {n: layer.rank for n, layer in expected.items()}
    assert len({layer.rank for layer in got.values()}) > 1  # the budget was redistributed: ranks differ per layer
    for name, layer in expected.items():
        assert torch.allclose(got[name].lora_A.weight, layer.lora_A.weight, atol=1e-6), name
    clients = [r for r in MetricsLog(result.paths.metrics).read() if r["kind"] == "client" and r["round"] == 1]
    assert len(clients) == 3  # every client loaded the state into its EVA-shaped model and trained
    peft_config = json.loads((result.paths.adapter_peft / "adapter_config.json").read_text())
    assert peft_config["rank_pattern"]  # EVA's ranks travel to PEFT too


def test_the_privatized_statistic_is_round_0_of_every_clients_ledger(eva_run):
    cfg, result = eva_run
    mirror = load_ledgers(result.paths.ledgers)
    assert set(mirror) == {"0", "1", "2"}
    for client, ledger in mirror.items():
        own = PrivacyLedger.load(result.paths.clients / f"client-{client}" / "ledger.json")
        assert own.history() == ledger.history()
        assert own.entries[0].round == 0 and own.history()[0] == (SIGMA0, 1.0, 1)
        assert [e.round for e in own.entries] == [0, 1]
        assert own.epsilon() <= cfg.privacy.target_epsilon + 1e-9  # planned with room for round 0
        without_round_0 = PrivacyLedger.from_dict({**own.to_dict(), "entries": own.to_dict()["entries"][1:]})
        assert own.epsilon() > without_round_0.epsilon()
    rows = [r for r in MetricsLog(result.paths.metrics).read() if r["kind"] == "init"]
    assert rows and rows[0]["statistics_privatized"] and rows[0]["clients"] == 3


def test_the_privacy_report_says_the_init_statistic_was_privatized(eva_run):
    _, result = eva_run
    report = json.loads((result.paths.privacy / "report.json").read_text())
    section = report["extra"]["init_statistics"]
    assert section["privatized"] and section["noise_multiplier"] == SIGMA0 and section["statistics"] == ["inputs"]
    assert "Initialization statistic (round 0): privatized." in (result.paths.privacy / "report.md").read_text()


class _StatisticsGrid:
    """Nodes that answer round 0's query with the replies given: {node: (metrics, statistic tensors or None)}."""

    def __init__(self, replies):
        self.replies, self.sent = replies, []

    def push_messages(self, messages):
        self.sent = list(messages)
        return [f"m{i}" for i in range(len(self.sent))]

    def pull_messages(self, ids):
        from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

        answers = []
        for m in self.sent:
            metrics, flat = self.replies[m.metadata.dst_node_id]
            content = RecordDict({"metrics": MetricRecord(metrics)})
            if flat is not None:
                content["statistics"] = ArrayRecord(flat)
            answers.append(Message(content, reply_to=m))
        self.sent = []
        return answers


def test_round_zero_quarantines_every_reply_that_does_not_match_and_sums_the_rest(tmp_path, flower_task):
    """Before: a reply without its statistics record raised KeyError and ended the run, and a NaN of shape (1,)
    with a count of -5 was broadcast into the sum, poisoning the global initialization."""
    from fedspec.adapters import calibration_layout
    from fedspec.adapters.calibration import COUNT_KEY
    from fedspec.builders import AdapterSettings, calibration_layers
    from fedspec.server.mirror import check_claim
    from fedspec.server.round_zero import collect_statistics

    cfg = _config(tmp_path, "adapter=corda", "federation.round_timeout=0.5")
    plan = fedspec.privacy.planning.PlanSettings.of(cfg)
    adapter = AdapterSettings.of(cfg.adapter)
    model, _ = build_classifier(cfg.model, 2, seed=0)
    layout = calibration_layout(model, calibration_layers(adapter, model), adapter.calibration_kinds)
    generator = torch.Generator().manual_seed(0)

    def statistics(count=24, **changes):
        flat = {key: torch.randn(shape, generator=generator, dtype=torch.float64) for key, shape in layout.items()
                if key != COUNT_KEY}
        return {**flat, COUNT_KEY: torch.tensor(count), **changes}

    def metrics(client, count=24, **extra):
        return {"client-id": client, "calibration-examples": count, "privatized": 0, **extra}

    xx = next(key for key in layout if key.endswith("::xx"))
    honest = statistics()
    replies = {
        1: (metrics(0), honest),
        2: (metrics(1), None),
        3: (metrics(0), statistics()),
        4: (metrics(3), statistics(**{xx: torch.tensor([math.nan], dtype=torch.float64)})),
        5: (metrics(4, count=-5), statistics(count=-5)),
        6: (metrics(5), statistics(count=10**6)),
        7: (metrics(6, **{"noise-multiplier": -1.0, "sample-rate": 1.0, "steps": 1}), statistics()),
        8: (metrics(7, count=25), statistics(count=25)),  # more than adapter.calibration_examples=24
    }
    log = MetricsLog(tmp_path / "metrics.jsonl")
    client_ids = {node: node - 1 for node in replies}
    total, read = collect_statistics(_StatisticsGrid(replies), client_ids, cfg, log, layout=layout,
                                     check_claim=lambda reply: check_claim({}, reply, 0, plan))
    assert [reply.client_id for reply in read] == [0] and total.count == 24
    assert all(torch.equal(total.to_tensors()[key], honest[key].double()) for key in layout if key != COUNT_KEY)
    reasons = {line["node"]: line["reason"] for line in log.read() if line["kind"] == "client-quarantined"}
    assert sorted(reasons) == [2, 3, 4, 5, 6, 7, 8]
    for node, words in {2: "no 'statistics' record", 3: "claims client 0", 4: "has shape (1,)",
                        5: "must be >= 0", 6: "count 1000000 examples",
                        7: "the run does not use", 8: "got 25"}.items():
        assert words in reasons[node], (node, reasons[node])


@pytest.mark.parametrize("weighting", ["examples", "uniform", "secure"])
def test_a_client_that_keeps_its_record_count_private_reports_the_public_cap(tmp_path, weighting):
    """A privatized round-0 sum covers min(n, calibration_examples) records; that count would tell the server n
    for a client with fewer records, so where the run keeps n private (uniform weighting; secure aggregation, where
    the server sees only the sum of the counts) it reports the cap."""
    from flwr.app import Context, RecordDict

    from fedspec.adapters.calibration import COUNT_KEY
    from fedspec.client.statistics import client_statistics
    from fedspec.protocol import CALIBRATION_EXAMPLES, NUM_EXAMPLES

    how = (["federation.weighting=examples", "federation.secure_aggregation.enabled=true"] if weighting == "secure"
           else [f"federation.weighting={weighting}"])
    cfg = _config(tmp_path, "adapter=eva", "privacy.private_init_stats=true", "adapter.calibration_examples=200",
                  *how, "run.name=count")
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    tensors, metrics = client_statistics(cfg, context)
    held = 240 // 3  # every record of this client's share is in its sums
    expected = held if weighting == "examples" else 200
    assert metrics[CALIBRATION_EXAMPLES] == expected == int(tensors[COUNT_KEY])
    assert (NUM_EXAMPLES in metrics) == (weighting == "examples")


@pytest.mark.parametrize("sigma", [0.5, 4.0])
def test_a_privatized_reply_larger_than_clipping_and_noise_allow_is_refused(sigma):
    """Honest privatized sums (any σ) pass the norm bound; the same sums scaled up by a client, still finite,
    do not: an enormous statistic would make the global initialization non-finite."""
    from fedspec.adapters import StatisticsPrivacy, collect_calibration
    from fedspec.adapters.targets import match_targets
    from fedspec.models import tokenize
    from fedspec.protocol import ProtocolError
    from fedspec.server.round_zero import check_privatized_norm

    from helpers import tiny_classifier

    model, tokenizer = tiny_classifier()
    batch = tokenize(tokenizer, ["the team won", "stocks fell", "a new chip", "rain again"], 8)
    C = 0.5
    for seed in range(5):
        calibration = collect_calibration(
            model, [(batch.input_ids, batch.attention_mask, torch.tensor([0, 1, 2, 0]))],
            match_targets(model, ["query", "value"]), ("inputs",),
            privacy=StatisticsPrivacy.subset_of(sigma, C, torch.Generator().manual_seed(seed)))
        flat = calibration.to_tensors()
        check_privatized_norm(flat, 4, sigma, C)
    scaled = {key: (value if key == COUNT_KEY else value * 1e6) for key, value in flat.items()}
    with pytest.raises(ProtocolError, match="exceeds what 4 records clipped to C = 0.5 plus their noise can reach"):
        check_privatized_norm(scaled, 4, sigma, C)


def test_a_client_never_releases_a_round_0_statistic_that_would_exceed_its_budget(tmp_path):
    """Clients enforce privacy.budget_epsilon before every DP-SGD round, but round 0's privatized statistic was
    released unchecked: at σ₀ = 5 its ε alone is about 1, and a node with budget 0.5 sent it and recorded ε ≈ 1 (in a
    deployment nothing preflights the plan; only `fedspec simulate` refused such a config before starting)."""
    from flwr.app import Context, RecordDict

    from fedspec.client.runtime import ledger_path
    from fedspec.client.statistics import client_statistics
    from fedspec.errors import FedspecError

    cfg = _config(tmp_path, "adapter=eva", "privacy.private_init_stats=true", "privacy.init_noise_multiplier=5.0",
                  "privacy.noise_multiplier=2.0", "privacy.budget_epsilon=0.5", "run.name=budget0")
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    with pytest.raises(FedspecError, match=r"round-0 statistic .* privacy.budget_epsilon=0.5"):
        client_statistics(cfg, context)
    path = ledger_path(cfg, context)
    assert not path.exists() or PrivacyLedger.load(path).epsilon() <= 0.5
    assert not (path.parent / "released-statistics.safetensors").exists()

    roomy = _config(tmp_path, "adapter=eva", "privacy.private_init_stats=true", "privacy.init_noise_multiplier=5.0",
                    "privacy.noise_multiplier=2.0", "privacy.budget_epsilon=2", "run.name=budget2")
    _, metrics = client_statistics(roomy, context)  # within its budget: released and counted as before
    assert 0.5 < metrics["epsilon"] <= 2


def test_a_client_never_releases_a_round_0_statistic_at_a_delta_not_below_one_over_its_record_count(tmp_path):
    """A node checked δ < 1/n on its own data before its first DP-SGD round, but not before round 0: with 80 records
    and δ = 0.05 it released its privatized statistic (and recorded an ε at that δ, which allows leaking a whole
    record) before the check in round 1 refused to go on."""
    from flwr.app import Context, RecordDict

    from fedspec.client.runtime import ledger_path
    from fedspec.client.statistics import client_statistics
    from fedspec.errors import ConfigError

    cfg = _config(tmp_path, "adapter=eva", "privacy.private_init_stats=true", "privacy.target_epsilon=50",
                  "privacy.delta=0.05", "run.name=delta0")
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    with pytest.raises(ConfigError, match=r"privacy.delta=0.05 is not below 1/n for client 0"):
        client_statistics(cfg, context)
    assert not ledger_path(cfg, context).exists()
