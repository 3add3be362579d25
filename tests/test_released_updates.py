"""A round the server asks for again (it crashed and resumed into it) gets the update the client already released,
at no new privacy cost; a round asked for with another global state is a new, counted attempt."""

from __future__ import annotations

import pytest

pytest.importorskip("flwr")

import torch  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict  # noqa: E402

from fedspec.builders import build_task  # noqa: E402
from fedspec.client.local_round import train_one_round  # noqa: E402
from fedspec.client.released import received_fingerprint  # noqa: E402
from fedspec.client.runtime import ledger_path  # noqa: E402
from fedspec.privacy import PrivacyLedger  # noqa: E402
from fedspec.protocol import ARRAYS, CONFIG, SERVER_ROUND  # noqa: E402
from fedspec.server.global_model import GlobalModel  # noqa: E402


def _message(state: dict[str, torch.Tensor], round_: int) -> Message:
    content = RecordDict({ARRAYS: ArrayRecord(state), CONFIG: ConfigRecord({SERVER_ROUND: round_})})
    return Message(content=content, dst_node_id=100, message_type=MessageType.TRAIN)


def _fresh_process_context() -> Context:
    """A client process started anew: nothing in memory, the ledger on disk."""
    return Context(run_id=1, node_id=100, node_config={"partition-id": 0}, state=RecordDict(), run_config={})


@pytest.fixture
def client_run(tiny_cfg, flower_task):
    # 3 rounds' budget: a second attempt of round 1 fits, so what the client does is not decided by its budget
    cfg = tiny_cfg("adapter=lora", "federation.rounds=3", "privacy.target_epsilon=8")
    state = GlobalModel(cfg, build_task(cfg.data, cfg.run.seed)).state()
    return cfg, state


def test_a_round_asked_for_again_gets_the_same_update_and_costs_nothing(client_run):
    cfg, state = client_run
    first, metrics = train_one_round(cfg, _message(state, 1), _fresh_process_context())
    ledger_file = ledger_path(cfg, _fresh_process_context())
    spent = PrivacyLedger.load(ledger_file).epsilon()

    again, metrics_again = train_one_round(cfg, _message(state, 1), _fresh_process_context())

    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    assert metrics_again == metrics and metrics["attempt"] == 1
    ledger = PrivacyLedger.load(ledger_file)
    assert [(e.round, e.attempt) for e in ledger.entries] == [(1, 1)]
    assert ledger.epsilon() == spent


def test_a_round_asked_for_with_another_global_state_is_a_new_counted_attempt(client_run):
    cfg, state = client_run
    train_one_round(cfg, _message(state, 1), _fresh_process_context())
    other = {k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}
    assert received_fingerprint(1, other) != received_fingerprint(1, state)

    _, metrics = train_one_round(cfg, _message(other, 1), _fresh_process_context())

    assert metrics["attempt"] == 2
    ledger = PrivacyLedger.load(ledger_path(cfg, _fresh_process_context()))
    assert [(e.round, e.attempt) for e in ledger.entries] == [(1, 1), (1, 2)]


def test_the_next_round_trains_anew_and_replaces_the_kept_update(client_run):
    cfg, state = client_run
    first, _ = train_one_round(cfg, _message(state, 1), _fresh_process_context())
    second, metrics = train_one_round(cfg, _message(state, 2), _fresh_process_context())
    assert metrics["attempt"] == 1 and not all(torch.equal(first[k], second[k]) for k in first)
    # round 1's update is no longer kept: asked for again, round 1 is trained (and counted) again
    _, again = train_one_round(cfg, _message(state, 1), _fresh_process_context())
    assert again["attempt"] == 2


def test_an_unreadable_kept_update_means_a_new_counted_attempt_not_a_stuck_client(client_run):
    cfg, state = client_run
    train_one_round(cfg, _message(state, 1), _fresh_process_context())
    (ledger_path(cfg, _fresh_process_context()).parent / "released.safetensors").write_bytes(b"not a safetensors file")
    _, metrics = train_one_round(cfg, _message(state, 1), _fresh_process_context())
    assert metrics["attempt"] == 2


def test_a_node_state_from_before_a_written_round_never_saves_over_it(client_run):
    """A retried message brings back the node state as it was before round 2 (its worker died after writing the
    ledger): round 3 must extend the disk ledger, which holds round 2, not the state's older copy."""
    from fedspec.client.runtime import load_ledger, store_ledger

    cfg, _ = client_run
    before, after = _fresh_process_context(), _fresh_process_context()
    ledger = PrivacyLedger("0", delta=cfg.privacy.delta)
    ledger.record(1, 1.0, 0.1, 4)
    store_ledger(cfg, before, ledger)  # the state and the disk after round 1
    ledger.record(2, 1.0, 0.1, 4)
    store_ledger(cfg, after, ledger)  # round 2 written by the worker that died; `before` still holds round 1
    resumed = load_ledger(cfg, before)
    assert [e.round for e in resumed.entries] == [1, 2]
    resumed.record(3, 1.0, 0.1, 4)
    store_ledger(cfg, before, resumed)
    assert [e.round for e in PrivacyLedger.load(ledger_path(cfg, before)).entries] == [1, 2, 3]


def test_a_new_run_under_a_reused_run_name_trains_anew_and_refuses_a_ledger_of_another_delta(client_run, tiny_cfg):
    """A deployment that reuses run.name under the node's state-dir sends the same first global adapter (same
    seed), but trains with other settings: the kept update of the old run is not replayed. A ledger kept at
    another δ cannot be extended: one history is one guarantee."""
    from fedspec.errors import ConfigError

    cfg, state = client_run
    first, _ = train_one_round(cfg, _message(state, 1), _fresh_process_context())
    changed = tiny_cfg("adapter=lora", "federation.rounds=3", "privacy.target_epsilon=8", "train.lr=0.5")
    again, metrics = train_one_round(changed, _message(state, 1), _fresh_process_context())
    assert metrics["attempt"] == 2 and not all(torch.equal(first[k], again[k]) for k in first)
    other_delta = tiny_cfg("adapter=lora", "federation.rounds=3", "privacy.target_epsilon=8", "privacy.delta=1e-6")
    with pytest.raises(ConfigError, match="another run.name"):
        train_one_round(other_delta, _message(state, 2), _fresh_process_context())


def test_a_client_refuses_to_train_at_a_delta_not_below_one_over_its_record_count(tiny_cfg, flower_task):
    """The server checks δ < 1/n only for data it knows; a node's own file is checked by the node, before any step."""
    from fedspec.errors import ConfigError

    cfg = tiny_cfg("adapter=lora", "privacy.target_epsilon=8", "privacy.delta=0.05")  # clients hold ~100 records
    state = GlobalModel(cfg, build_task(cfg.data, cfg.run.seed)).state()
    with pytest.raises(ConfigError, match=r"privacy.delta=0.05 is not below 1/n for client 0"):
        train_one_round(cfg, _message(state, 1), _fresh_process_context())
    assert not ledger_path(cfg, _fresh_process_context()).exists()
