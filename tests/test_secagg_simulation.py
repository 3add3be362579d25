"""Secure aggregation in a real Flower simulation: the same federation with and without it ends at the same
adapter, within the stated quantization bound, and the server never receives an update or a record count."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fedspec.rundir import MetricsLog
from fedspec.secagg import Quantizer
from fedspec.simulations.driver import simulate

BITS, CLIP = 16, 4.0  # a coarse step (1.2e-4), far above float32 rounding, so the bound below is the quantization's


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """One round of the same seeded federation, plain and under secure aggregation. Clients of 100 records in
    batches of 20: under secure aggregation a client divides its noised gradient sum by train.batch_size (⌊n·q⌋
    would reveal n, which the masked sum keeps private), in the clear by ⌊n·q⌋; here both are 20."""
    from fedspec.config import compose_config

    out = tmp_path_factory.mktemp("runs")
    common = ["model=tiny-bert", "data.num_examples=400", "data.eval_examples=64", "data.min_client_examples=8",
              "data.partition=iid", "federation.clients=4", "federation.rounds=1", "federation.fraction=0.75",
              "train.local_steps=2", "train.batch_size=20", "privacy.seed_noise=true", f"run.output_dir={out}", "run.progress=false",
              f"federation.secure_aggregation.bits={BITS}", f"federation.secure_aggregation.clip_range={CLIP}"]
    plain = simulate(compose_config([*common, "run.name=plain"]))
    secure = simulate(compose_config([*common, "run.name=secure", "federation.secure_aggregation.enabled=true"]))
    return plain, secure


def _state(result):
    return load_file(str(result.paths.checkpoints / "round-0001" / "state.safetensors"))


def test_secure_round_matches_the_plain_round_within_the_quantization_bound(two_runs):
    plain, secure = (_state(r) for r in two_runs)
    step = Quantizer(CLIP, BITS, 1).step
    server_lr = 0.5  # the default server step: the first round applies server_lr × the clients' mean update
    # Each coordinate of the unmasked mean is within one step of the exact mean: the head moves by server_lr × that
    for key in ("head.weight", "head.bias"):
        assert (plain[key] - secure[key]).abs().max() <= server_lr * step * 1.01
    # FedSVD re-factorizes B·A, so compare products: ‖E·A‖_F ≤ server_lr · step · √numel(B) · ‖A‖₂ per layer
    layers = [k[: -len(".lora_B.weight")] for k in plain if k.endswith(".lora_B.weight") and "momentum" not in k]
    assert layers
    for layer in layers:
        product = {name: s[f"{layer}.lora_B.weight"].double() @ s[f"{layer}.lora_A.weight"].double()
                   for name, s in (("plain", plain), ("secure", secure))}
        a0 = plain[f"{layer}.init_lora_A"].double()  # round 1's A is PiSSA's initial A
        bound = server_lr * step * plain[f"{layer}.lora_B.weight"].numel() ** 0.5 * torch.linalg.matrix_norm(a0, 2)
        assert torch.linalg.matrix_norm(product["plain"] - product["secure"]) <= bound * 1.01


def test_the_server_receives_only_masked_vectors_and_no_record_counts(two_runs):
    plain, secure = two_runs
    rows = {name: [r for r in MetricsLog(res.paths.metrics).read() if r["kind"] == "client"]
            for name, res in (("plain", plain), ("secure", secure))}
    assert len(rows["secure"]) == len(rows["plain"]) == 3
    assert all("num_examples" in r for r in rows["plain"]) and not any("num_examples" in r for r in rows["secure"])
    # nor any client's training loss (its records' loss, under no DP guarantee), so the round has none
    assert all("train_loss" in r for r in rows["plain"]) and not any("train_loss" in r for r in rows["secure"])
    trained = sum(v.numel() for k, v in _state(plain).items()
                  if not k.startswith("server-momentum.") and (k.endswith("lora_B.weight") or k.startswith("head.")))
    assert all(r["update_bytes"] == 8 * (trained + 1) for r in rows["secure"])  # [w·update, w] as int64
    assert all(r["clipped_coordinates"] == 0 for r in rows["secure"])
    # The ledgers are the clients' own reports: identical with and without secure aggregation
    epsilons = {name: sorted((r["client_id"], r["epsilon"]) for r in rows[name]) for name in rows}
    assert epsilons["secure"] == epsilons["plain"]
    round_row = [r for r in MetricsLog(secure.paths.metrics).read() if r["kind"] == "round"][-1]
    assert round_row["secagg_failed"] == 0 and round_row["secagg_dropped"] == 0 and round_row["clients"] == 3
    assert round_row.get("train_loss") is None


def test_the_privacy_report_says_the_server_saw_only_the_sum(two_runs):
    _, secure = two_runs
    report = (secure.paths.privacy / "report.md").read_text()
    assert "secure aggregation" in report.lower()
    assert "in the clear, before aggregation" not in report
    assert json.loads((secure.paths.privacy / "report.json").read_text())["secure_aggregation"] is True


def test_a_round_too_small_to_sum_securely_is_skipped_logged_and_the_run_goes_on(tmp_path):
    """One client per round: a sum of one is that client's update, so the round is skipped, never a crash."""
    from fedspec.config import compose_config

    cfg = compose_config(["model=tiny-bert", "data.num_examples=200", "data.eval_examples=32",
                          "data.min_client_examples=8", "federation.clients=2", "federation.rounds=2",
                          "federation.fraction=0.5", "federation.min_clients=1", "train.local_steps=1",
                          "train.batch_size=16", "federation.secure_aggregation.enabled=true", "run.name=lonely",
                          f"run.output_dir={tmp_path}", "run.progress=false"])
    result = simulate(cfg)
    records = list(MetricsLog(result.paths.metrics).read())
    failed = [r for r in records if r["kind"] == "secagg-failed"]
    assert [r["round"] for r in failed] == [1, 2]
    assert all("only 1 client(s) advertised keys" in r["reason"] for r in failed)
    rounds = [r for r in records if r["kind"] == "round" and r["round"] > 0]
    assert [(r["secagg_failed"], r["clients"]) for r in rounds] == [(1, 0), (1, 0)]
    start = _state_at(result, 1)
    assert all(torch.equal(start[k], v) for k, v in _state_at(result, 2).items())  # nothing was applied
    assert not [r for r in records if r["kind"] == "client"]  # nobody trained: nobody spent ε


def _state_at(result, round_):
    state = load_file(str(result.paths.checkpoints / f"round-{round_:04d}" / "state.safetensors"))
    return {k: v for k, v in state.items() if not k.startswith("server-momentum.")}


@pytest.fixture(scope="module")
def distributed_runs(tmp_path_factory):
    """One round with uniform weights, plain and under secure aggregation with client-level DP whose noise the
    clients add (tiny z, a clipping norm no update reaches: what is left is the rounding)."""
    from fedspec.config import compose_config

    out = tmp_path_factory.mktemp("distributed")
    common = ["model=tiny-bert", "data.num_examples=400", "data.eval_examples=64", "data.min_client_examples=8",
              "federation.clients=4", "federation.rounds=1", "federation.fraction=0.75", "train.local_steps=2",
              "train.batch_size=16", "privacy.seed_noise=true", f"run.output_dir={out}", "run.progress=false",
              "federation.weighting=uniform"]
    plain = simulate(compose_config([*common, "run.name=plain"]))
    noised = simulate(compose_config([*common, "run.name=distributed", "federation.secure_aggregation.enabled=true",
                                      "privacy=client-dp", "privacy.client_level.target_epsilon=null",
                                      f"privacy.client_level.noise_multiplier={TINY_Z}",
                                      f"privacy.client_level.clipping_norm={LARGE_C}"]))
    return plain, noised


TINY_Z, LARGE_C = 1e-6, 50.0


def test_distributed_noise_rounds_within_the_stated_bound_and_charges_the_summed_round(distributed_runs):
    from fedspec.privacy import PrivacyLedger
    from fedspec.privacy.accounting import SKELLAM, epsilon
    from fedspec.privacy.skellam import SkellamNoise, units

    plain_run, noised_run = distributed_runs
    plain, noised = _state(plain_run), _state(noised_run)
    rows = list(MetricsLog(noised_run.paths.metrics).read())
    # Nothing of one update leaves a client in the clear, so the server cannot count the clipped ones; at this large
    # C none is clipped, which the bound below checks (a clipped update would move the head far more)
    assert all("norm_clipped" not in r and "train_loss" not in r for r in rows if r["kind"] == "client")
    assert all(r["clipped"] is None for r in rows if r["kind"] == "round" and r["round"] > 0)
    trained = sum(v.numel() for k, v in plain.items()
                  if not k.startswith("server-momentum.") and (k.endswith("lora_B.weight") or k.startswith("head.")))
    # Rounding moves each client's coordinate by < C/S; the noise at this z is ≤ one unit on a few coordinates
    resolution = LARGE_C / units(trained)
    for key in ("head.weight", "head.bias"):
        assert (plain[key] - noised[key]).abs().max() <= 0.5 * 2 * resolution * 1.01
    assert not (plain["head.weight"] == noised["head.weight"]).all()  # it did go through the integer encoding
    ledger = PrivacyLedger.load(noised_run.paths.privacy / "client-level-ledger.json")
    sigma = SkellamNoise(TINY_Z, LARGE_C).accounted_multiplier
    assert ledger.accountant == SKELLAM and ledger.history() == [(sigma, 1.0, 1)]
    report = json.loads((noised_run.paths.privacy / "report.json").read_text())
    assert report["client_level"]["distributed"] is True
    assert report["client_level"]["final_epsilon"] == epsilon([(sigma, 1.0, 1)], ledger.delta, SKELLAM)
    assert "noise added by the clients" in (noised_run.paths.privacy / "report.md").read_text()


def test_a_round_with_fewer_clients_than_noise_shares_is_never_summed_and_costs_no_client_level_budget(tmp_path):
    from fedspec.config import compose_config
    from fedspec.privacy import PrivacyLedger

    cfg = compose_config(["model=tiny-bert", "data.num_examples=300", "data.eval_examples=32",
                          "data.min_client_examples=8", "federation.clients=3", "federation.rounds=1",
                          "federation.fraction=0.5", "train.local_steps=1", "train.batch_size=16",
                          "federation.weighting=uniform", "federation.secure_aggregation.enabled=true",
                          "privacy=client-dp", "privacy.client_level.min_survivors=3", "run.name=short",
                          f"run.output_dir={tmp_path}", "run.progress=false"])
    result = simulate(cfg)
    records = list(MetricsLog(result.paths.metrics).read())
    failed = [r for r in records if r["kind"] == "secagg-failed"]
    assert [r["round"] for r in failed] == [1] and "fewer than the 3 whose noise shares" in failed[0]["reason"]
    assert not [r for r in records if r["kind"] == "client"]  # refused before anyone trained
    assert PrivacyLedger.load(result.paths.privacy / "client-level-ledger.json").entries == ()


def test_an_unmasked_sum_the_server_refuses_as_corrupt_still_costs_client_level_budget(tmp_path, monkeypatch):
    """One client can set its weight slot so that the unmasked sum counts no client: the server refuses the sum,
    but it did unmask the honest clients' noised updates, so the round is a release and is charged. (Before, it
    was not: one hostile client could hand the server an unbounded number of uncharged sums.)"""
    from fedspec.config import compose_config
    from fedspec.privacy import PrivacyLedger
    from fedspec.privacy.skellam import SkellamNoise

    decode = SkellamNoise.decode
    monkeypatch.setattr(SkellamNoise, "decode", lambda self, total, template: (decode(self, total, template)[0], 0))
    cfg = compose_config(["model=tiny-bert", "data.num_examples=300", "data.eval_examples=32",
                          "data.min_client_examples=8", "federation.clients=3", "federation.rounds=1",
                          "federation.fraction=1.0", "train.local_steps=1", "train.batch_size=16",
                          "federation.weighting=uniform", "federation.secure_aggregation.enabled=true",
                          "privacy=client-dp", "run.name=corrupt", f"run.output_dir={tmp_path}", "run.progress=false"])
    result = simulate(cfg)
    records = list(MetricsLog(result.paths.metrics).read())
    failed = [r for r in records if r["kind"] == "secagg-failed"]
    assert [r["round"] for r in failed] == [1] and "counts 0 clients: it is corrupt" in failed[0]["reason"]
    assert [e.round for e in PrivacyLedger.load(result.paths.privacy / "client-level-ledger.json").entries] == [1]


def test_a_server_naming_fewer_survivors_than_noise_shares_is_refused_and_the_run_goes_on(tmp_path, monkeypatch):
    """A server that skips its own check and asks the clients to unmask 2 survivors when each added 1/3 of the
    noise: every client refuses (its error is logged), the round is skipped and charged nothing, and the
    federation finishes instead of crashing."""
    from fedspec.config import compose_config
    from fedspec.privacy import PrivacyLedger
    from fedspec.secagg import ServerSession
    from fedspec.server.secure_round import SecureRound

    unmask_request = ServerSession.unmask_request

    def one_survivor_short(self, masked):
        survivors, dropped = unmask_request(self, masked)
        return survivors[:-1], [*dropped, survivors[-1]]

    monkeypatch.setattr(SecureRound, "_check_whole_noise", staticmethod(lambda what, clients, shares: None))
    monkeypatch.setattr(ServerSession, "unmask_request", one_survivor_short)
    cfg = compose_config(["model=tiny-bert", "data.num_examples=300", "data.eval_examples=32",
                          "data.min_client_examples=8", "federation.clients=3", "federation.rounds=1",
                          "federation.fraction=1.0", "train.local_steps=1", "train.batch_size=16",
                          "federation.weighting=uniform", "federation.secure_aggregation.enabled=true",
                          "privacy=client-dp", "run.name=short-list", f"run.output_dir={tmp_path}",
                          "run.progress=false"])
    result = simulate(cfg)
    records = list(MetricsLog(result.paths.metrics).read())
    assert [r["round"] for r in records if r["kind"] == "secagg-failed"] == [1]
    refusals = [r for r in records if r["kind"] == "client-error" and "fewer than the 3" in r["reason"]]
    assert len(refusals) == 2  # both clients the short list names refused to unmask
    assert PrivacyLedger.load(result.paths.privacy / "client-level-ledger.json").entries == ()
