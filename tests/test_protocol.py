"""The wire protocol: a reply that does not match what the server sent is quarantined with a reason that names
what is wrong — never aggregated, never fatal — and the round goes on with the honest replies."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from omegaconf import OmegaConf

from fedspec.protocol import ProtocolError, TrainReply, check_update
from fedspec.strategies import get_rule
from fedspec.strategies.flower import AdapterStrategy

from helpers import train_reply

SHAPES = {"l0.lora_A.weight": (4, 6), "l0.lora_B.weight": (5, 4), "head.weight": (2, 5)}
TRAINED = ["l0.lora_B.weight", "head.weight"]  # FedSVD: clients train B (and the head), A is the server's


def _state():
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(shape, generator=g) for k, shape in SHAPES.items()}


def _update(scale: float = 0.01, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(SHAPES[k], generator=g) for k in TRAINED}


def _metrics(client: int, **changes):
    metrics = {"client-id": client, "train-loss": 0.5, "steps": 4, "num-examples": 100,
               "noise-multiplier": 1.1, "sample-rate": 0.25, "epsilon": 1.5}
    for key, value in changes.items():
        if value is _DROP:
            metrics.pop(key.replace("_", "-"))
        else:
            metrics[key.replace("_", "-")] = value
    return metrics


_DROP = object()


def _bad_update(change):
    update = _update(seed=9)
    change(update)
    return update


def _forged(key, **header):
    """An honest update as Flower Arrays, with tensor ``key``'s header (dtype, shape) or bytes replaced by the
    client's own: Flower passes them on unchecked, from the wire as from a ClientApp."""
    from flwr.app import Array

    arrays = {k: Array(v.numpy()) for k, v in _update(seed=9).items()}
    for field, value in header.items():
        setattr(arrays[key], field, value)
    return arrays


# (what is wrong, its metrics, its update, a word the reason must contain)
BAD_REPLIES = [
    ("missing tensor", _metrics(2), {"l0.lora_B.weight": _update()["l0.lora_B.weight"]}, "missing"),
    ("extra tensor (A under FedSVD)", _metrics(2), {**_update(), "l0.lora_A.weight": torch.zeros(4, 6)}, "extra"),
    ("wrong shape", _metrics(2), _bad_update(lambda u: u.update({"head.weight": torch.zeros(3, 5)})), "shape"),
    ("a (1, r) row to broadcast", _metrics(2), _bad_update(lambda u: u.update({"l0.lora_B.weight": torch.ones(1, 4)})),
     "shape"),
    ("a scalar to broadcast", _metrics(2), _bad_update(lambda u: u.update({"l0.lora_B.weight": torch.tensor(3.0)})),
     "shape"),
    ("int64 tensor", _metrics(2), _bad_update(lambda u: u.update({"head.weight": torch.ones(2, 5, dtype=torch.int64)})),
     "floating"),
    ("bool tensor", _metrics(2), _bad_update(lambda u: u.update({"head.weight": torch.ones(2, 5, dtype=torch.bool)})),
     "floating"),
    ("NaN", _metrics(2), _bad_update(lambda u: u["head.weight"].__setitem__((0, 0), math.nan)), "NaN"),
    ("Inf", _metrics(2), _bad_update(lambda u: u["l0.lora_B.weight"].__setitem__((1, 1), math.inf)), "NaN or Inf"),
    ("negative num-examples", _metrics(2, num_examples=-5), _update(seed=9), "num-examples"),
    ("missing num-examples", _metrics(2, num_examples=_DROP), _update(seed=9), "num-examples"),
    ("list-valued num-examples", _metrics(2, num_examples=[1, 2]), _update(seed=9), "num-examples"),
    ("num-examples = 1e12 (takes over the mean)", _metrics(2, num_examples=10**12), _update(seed=9), "num-examples"),
    ("NaN weight", _metrics(2, num_examples=math.nan), _update(seed=9), "num-examples"),
    ("list-valued train-loss", _metrics(2, train_loss=[0.1, 0.2]), _update(seed=9), "train-loss"),
    ("list-valued epsilon", _metrics(2, epsilon=[1.0, 2.0]), _update(seed=9), "epsilon"),
    ("missing metrics record", None, _update(seed=9), "metrics"),
    ("missing arrays record", _metrics(2), None, "arrays"),
    ("claims another client's identity", _metrics(0), _update(seed=9), "claims client 0"),
    ("a non-DP setting (σ = 0)", _metrics(2, noise_multiplier=0.0), _update(seed=9), "DP-SGD"),
    ("zero steps", _metrics(2, steps=0), _update(seed=9), "steps"),
    ("a billion attempts at the round", _metrics(2, attempt=10**9), _update(seed=9), "attempt"),
    ("zero num-examples (an all-zero weight)", _metrics(2, num_examples=0), _update(seed=9), "num-examples"),
    ("negative peak memory", {**_metrics(2), "peak-memory-mib": -1.0}, _update(seed=9), "peak-memory-mib"),
    ("negative step time", {**_metrics(2), "step-seconds": -0.5}, _update(seed=9), "step-seconds"),
    ("a device flag of 2", {**_metrics(2), "cuda": 2}, _update(seed=9), "cuda"),
    ("a decline in another client's name", {"client-id": 0, "declined": 1, "epsilon": 7.9, "budget-epsilon": 8.0},
     None, "claims client 0"),
    # privacy claims, checked against the run's config before the update counts (server/mirror.py)
    ("σ so small that σ² underflows (Opacus divides by zero)", _metrics(2, noise_multiplier=1e-300), _update(seed=9),
     "no ε can be computed"),
    ("another number of local steps", _metrics(2, steps=5), _update(seed=9), "take 4 a round"),
    ("no DP in a private run", _metrics(2, noise_multiplier=_DROP, sample_rate=_DROP), _update(seed=9),
     "no DP mechanism"),
    # a tensor's header and bytes, as the client wrote them: the reason names the tensor
    ("a dtype string numpy does not know", _metrics(2), _forged("head.weight", dtype="bogus"),
     "tensor 'head.weight' of the 'arrays' record declares dtype 'bogus'"),
    ("a negative size", _metrics(2), _forged("head.weight", shape=(-2, 5)), "tensor 'head.weight'"),
    ("a header that hides the data's shape", _metrics(2), _forged("l0.lora_B.weight", shape=(1, 4)),
     "tensor 'l0.lora_B.weight'"),
    ("bytes that are no numpy array", _metrics(2), _forged("head.weight", data=b"\0" * 40),
     "tensor 'head.weight' of the 'arrays' record cannot be read"),
]


@functools.cache
def _plan(*overrides: str):
    """The privacy settings the server checks claims against: DP-SGD, 4 local steps (as ``_metrics`` says)."""
    from fedspec.config import compose_config
    from fedspec.privacy.planning import PlanSettings

    return PlanSettings.of(compose_config(["train.local_steps=4", *overrides]))


def _strategy(rule="fedsvd"):
    from fedspec.server.mirror import check_claim

    mirror = {}
    strategy = AdapterStrategy(get_rule(rule), client_ids={10: 0, 11: 1, 12: 2},
                               check_claim=lambda reply, round_: check_claim(mirror, reply, round_, _plan()))
    strategy._sent_state = _state()
    return strategy


def _honest():
    return [train_reply(10, _metrics(0), _update(seed=1)), train_reply(11, _metrics(1, num_examples=300), _update(seed=2))]


@pytest.mark.parametrize("rule", ["fedsvd", "ffa"])
@pytest.mark.parametrize(("what", "metrics", "update", "reason"), BAD_REPLIES, ids=[b[0] for b in BAD_REPLIES])
def test_a_bad_reply_is_quarantined_and_the_round_equals_the_honest_one(what, metrics, update, reason, rule):
    honest_only, _ = _strategy(rule).aggregate_train(1, _honest())
    strategy = _strategy(rule)
    arrays, summary = strategy.aggregate_train(1, [*_honest(), train_reply(12, metrics, update)])
    (node, why), = strategy.last_replies.quarantined
    assert node == 12 and reason in why, why
    assert summary["clients"] == 2 and summary["quarantined"] == 1
    expected, got = honest_only, arrays
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)


def test_under_client_level_dp_a_scalar_in_place_of_B_is_quarantined_before_the_clipping():
    """A scalar broadcast over B would pass the per-client clipping (its norm is one number's): it never gets there."""
    from fedspec.strategies.client_dp import ClientDP

    def strategy():
        s = AdapterStrategy(get_rule("fedsvd"), client_ids={10: 0, 11: 1, 12: 2},
                            weighting="uniform", client_dp=ClientDP(1.0, 0.1, 1.0, 3, seed=0))
        s._sent_state = _state()
        return s

    honest_only, _ = strategy().aggregate_train(1, _honest())
    hostile = strategy()
    scalar = _bad_update(lambda u: u.update({"l0.lora_B.weight": torch.tensor(3.0)}))
    arrays, summary = hostile.aggregate_train(1, [*_honest(), train_reply(12, _metrics(2), scalar)])
    (node, why), = hostile.last_replies.quarantined
    assert node == 12 and "shape" in why and summary["quarantined"] == 1
    for key in honest_only:  # seeded noise: the same noised mean as without the hostile reply
        torch.testing.assert_close(arrays[key], honest_only[key], rtol=0, atol=0)


def test_every_rejected_reply_is_logged_with_its_node_client_and_reason(tmp_path):
    from fedspec.rundir import MetricsLog
    from fedspec.server.federation import _log_replies
    from fedspec.server.messaging import Traffic

    strategy = _strategy()
    strategy.aggregate_train(1, [*_honest(), train_reply(12, _metrics(2, num_examples=-5), _update(seed=9))])
    log = MetricsLog(tmp_path / "metrics.jsonl")
    cfg = OmegaConf.create({"federation": {"round_timeout": 60}, "privacy": {"delta": 1e-5, "accountant": "rdp"}})
    replies = [*_honest(), train_reply(12, _metrics(2, num_examples=-5), _update(seed=9))]
    _log_replies(log, 1, strategy.last_replies, replies, None, {}, cfg, strategy.client_ids, Traffic(), _plan())
    kinds = [line["kind"] for line in log.read()]
    assert kinds == ["client", "client", "client-quarantined"]
    (line,) = [line for line in log.read() if line["kind"] == "client-quarantined"]
    assert (line["round"], line["node"], line["client"]) == (1, 12, 2) and "num-examples" in line["reason"]


def test_a_round_of_only_bad_replies_leaves_the_model_as_it_was():
    strategy = _strategy("ffa")
    arrays, summary = strategy.aggregate_train(1, [train_reply(12, m, u) for _, m, u, _ in BAD_REPLIES])
    assert summary["clients"] == 0 and summary["quarantined"] == len(BAD_REPLIES)
    for key, value in arrays.items():
        assert torch.equal(value, _state()[key])


def test_declined_and_uniform_replies_are_read_as_sent():
    declined = TrainReply.from_metrics({"client-id": 3, "declined": 1, "epsilon": 7.9, "budget-epsilon": 8.0},
                                       needs_examples=True)
    assert declined.declined and declined.epsilon == 7.9 and declined.budget_epsilon == 8.0
    assert TrainReply.from_metrics(declined.to_metrics(), needs_examples=True) == declined
    uniform = TrainReply(4, train_loss=0.3, steps=8)  # federation.weighting=uniform: no count is sent
    assert "num-examples" not in uniform.to_metrics()
    assert TrainReply.from_metrics(uniform.to_metrics(), needs_examples=False) == uniform
    with pytest.raises(ProtocolError, match="num-examples"):
        TrainReply.from_metrics(uniform.to_metrics(), needs_examples=True)


def test_check_update_accepts_an_honest_update_of_any_float_dtype():
    check_update(_update(), _state(), TRAINED)
    check_update({k: v.to(torch.float64) for k, v in _update().items()}, _state(), TRAINED)


# --- bounded influence ---------------------------------------------------------------------------------------------

def _cohort(n=6):
    return [train_reply(10 + i, _metrics(i, num_examples=100 + 10 * i), _update(seed=i + 1)) for i in range(n)]


def _bounded_strategy(update_clip=3.0, weight_cap=5.0):
    from fedspec.strategies.influence import InfluenceBound

    strategy = AdapterStrategy(get_rule("fedsvd"), client_ids={10 + i: i for i in range(7)},
                               influence=InfluenceBound(update_clip, weight_cap))
    strategy._sent_state = _state()
    return strategy


def _move(state) -> float:
    return float(sum((state[k] - _state()[k]).norm() ** 2 for k in TRAINED) ** 0.5)


def test_a_huge_update_moves_the_model_like_a_few_honest_ones():
    attacker = train_reply(16, _metrics(6, num_examples=100), _update(scale=1e4, seed=99))  # 1e6 × the others
    honest_move = _move(_bounded_strategy().aggregate_train(1, _cohort())[0])
    unbounded = _move(_bounded_strategy(0, 0).aggregate_train(1, [*_cohort(), attacker])[0])
    strategy = _bounded_strategy()
    arrays, summary = strategy.aggregate_train(1, [*_cohort(), attacker])
    assert summary["norm-clipped"] == 1 and summary["weight-capped"] == 0
    assert unbounded > 1000 * honest_move
    assert _move(arrays) < 2 * honest_move


def test_in_a_round_of_two_the_attacker_cannot_set_its_own_bound():
    """With two replies the bound follows the smaller update and the smaller weight (the lower median): the
    attacker's update counts at most 3× the honest one's norm, its weight at most 5× the honest weight."""
    honest = _cohort(1)
    attacker = train_reply(16, _metrics(6, num_examples=10**9), _update(scale=1e4, seed=99))
    honest_move = _move(_bounded_strategy().aggregate_train(1, honest)[0])
    arrays, summary = _bounded_strategy().aggregate_train(1, [*honest, attacker])
    assert summary["norm-clipped"] == 1 and summary["weight-capped"] == 1
    assert _move(arrays) < 3 * honest_move + 1e-9  # a weighted mean of updates of norm ≤ 3× the honest one


def test_a_claimed_record_count_is_capped_at_a_few_medians():
    greedy = train_reply(16, _metrics(6, num_examples=10**9), _update(seed=99))
    strategy = _bounded_strategy()
    _, summary = strategy.aggregate_train(1, [*_cohort(), greedy])
    assert summary["weight-capped"] == 1
    from fedspec.strategies.influence import InfluenceBound, bound_influence

    bounded = bound_influence([_update()] * 4, [100.0, 120.0, 110.0, 1e9], InfluenceBound(3.0, 5.0))
    assert bounded.weights == [100.0, 120.0, 110.0, 5 * 110.0]  # 5 × the lower median of the four


def test_an_honest_cohort_aggregates_exactly_as_without_bounds():
    """Nothing is clipped or capped: the new state is bit for bit the plain weighted mean (FedSVD's exactness
    tests hold unchanged)."""
    bounded, summary = _bounded_strategy().aggregate_train(1, _cohort())
    plain, _ = _bounded_strategy(0, 0).aggregate_train(1, _cohort())
    assert summary["norm-clipped"] == summary["weight-capped"] == 0
    for key, value in plain.items():
        assert torch.equal(bounded[key], value)


def test_a_lone_update_is_clipped_against_the_last_cohort_with_peers():
    """A round with one accepted reply has no peers to bound it by: the median norm of the last round that had
    peers does (the strategy keeps it, and the checkpoint carries it)."""
    from fedspec.strategies.influence import update_norm

    strategy = _bounded_strategy()
    strategy.aggregate_train(1, _cohort())
    reference = strategy.reference_norm
    assert reference is not None and reference == pytest.approx(sorted(update_norm(_update(seed=i + 1)) for i in range(6))[2])
    strategy._sent_state = _state()
    lone = train_reply(10, _metrics(0), _update(scale=1e6, seed=5))
    _, summary = strategy.aggregate_train(2, [lone])
    assert summary["norm-clipped"] == 1 and "rejected" not in summary
    assert strategy.reference_norm == reference  # a lone update sets no new reference


@pytest.mark.parametrize("rule", ["fedsvd", "ffa"])
def test_an_aggregate_that_cannot_be_applied_leaves_the_state_and_the_federation_goes_on(rule):
    """A finite update far beyond float range (no peers to clip it, no reference yet) used to crash FedSVD's
    re-factorization or turn the global state to Inf: the round is rejected and the state stays."""
    strategy = AdapterStrategy(get_rule(rule), client_ids={10: 0}, influence=None)
    strategy._sent_state = _state()
    huge = {key: value.double() * 1e300 for key, value in _update(seed=3).items()}
    state, summary = strategy.aggregate_train(1, [train_reply(10, _metrics(0), huge)])
    assert "could not be applied" in summary["rejected"]
    assert all(torch.equal(state[key], value) for key, value in _state().items())


@pytest.mark.parametrize("factor", [0.5, -1.0])
def test_a_bound_below_the_median_is_refused(factor):
    from fedspec.strategies.influence import InfluenceBound

    with pytest.raises(ValueError, match="federation.update_clip"):
        InfluenceBound(factor, 5.0)


# --- dropouts ------------------------------------------------------------------------------------------------------

def test_a_node_that_failed_gets_the_fixed_tensors_again():
    """The fixed tensors (e.g. PiSSA's init factors) count as delivered only once the node has answered: a node
    whose ClientApp failed may have lost its state, so it is sent them again and can take part later."""
    from types import SimpleNamespace

    strategy = AdapterStrategy(get_rule("fedsvd"), client_ids={10: 0, 11: 1, 12: 2}, fraction_train=1.0,
                               base_init={"l0.base_B": torch.ones(5, 4)})
    first = strategy.train_contents(1, _state())
    assert all("base-init" in content for content in first.values())
    failed = SimpleNamespace(metadata=SimpleNamespace(src_node_id=11), has_error=lambda: True,
                             error=SimpleNamespace(reason="ClientApp raised: out of memory"))
    strategy.aggregate_train(1, [train_reply(10, _metrics(0), _update()), failed,
                                 train_reply(12, _metrics(1), _update())])  # 12 quarantined: it claims client 1
    assert strategy.last_replies.errors == [(11, "ClientApp raised: out of memory")]
    second = strategy.train_contents(2, _state())
    assert "base-init" in second[11]
    assert "base-init" not in second[10] and "base-init" not in second[12]


class _SilentGrid:
    """A grid of three connected nodes of which only ``answering`` reply to the discovery query."""

    def __init__(self, answering):
        self.answering, self.sent = answering, []

    def get_node_ids(self):
        return [1, 2, 3]

    def push_messages(self, messages):
        self.sent = list(messages)
        return [f"m{i}" for i in range(len(self.sent))]

    def pull_messages(self, ids):
        from flwr.app import Message, MetricRecord, RecordDict

        replies = [Message(RecordDict({"metrics": MetricRecord({"client-id": m.metadata.dst_node_id})}), reply_to=m)
                   for m in self.sent if m.metadata.dst_node_id in self.answering]
        self.sent = []
        return replies


def test_discovery_fails_clearly_when_too_few_nodes_answer(flower_task):
    from fedspec.errors import FedspecError
    from fedspec.server.federation import discover_clients

    with pytest.raises(FedspecError, match="only 1 of 3 nodes answered.*federation.min_clients=2"):
        discover_clients(_SilentGrid({2}), 3, 0.3, ["a", "b"], min_clients=2)
    assert discover_clients(_SilentGrid({2, 3}), 3, 0.3, ["a", "b"], min_clients=2) == {2: {"client-id": 2},
                                                                                          3: {"client-id": 3}}


def test_discovery_of_a_federation_smaller_than_min_clients_needs_every_node_not_more(flower_task):
    """`fedspec simulate --clients 1` (min_clients 2 by default) failed after every node answered: "only 1 of 1
    nodes answered ... fewer than federation.min_clients=2". Sampling, planning and the budget stop all cap
    min_clients at the federation's size; discovery does too."""
    from fedspec.errors import FedspecError
    from fedspec.server.federation import discover_clients

    assert list(discover_clients(_SilentGrid({1, 2, 3}), 3, 0.3, ["a", "b"], min_clients=5)) == [1, 2, 3]
    with pytest.raises(FedspecError, match="only 2 of 3 nodes answered"):
        discover_clients(_SilentGrid({1, 2}), 3, 0.3, ["a", "b"], min_clients=5)


class _MixedGrid(_SilentGrid):
    """Node 1 answers who it is, node 2's ClientApp fails to start, node 3 answers without a client id."""

    def pull_messages(self, ids):
        from flwr.app import Error, Message, MetricRecord, RecordDict

        replies = []
        for m in self.sent:
            node = m.metadata.dst_node_id
            if node == 2:
                replies.append(Message(Error(code=0, reason="ClientApp raised: no data file"), reply_to=m))
            else:
                metrics = {"client-id": 0} if node == 1 else {"train-loss": 0.5}
                replies.append(Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=m))
        self.sent = []
        return replies


def test_discovery_leaves_out_nodes_that_fail_or_answer_nonsense_and_logs_them(flower_task, tmp_path):
    from fedspec.errors import FedspecError
    from fedspec.rundir import MetricsLog
    from fedspec.server.federation import discover_clients

    log = MetricsLog(tmp_path / "metrics.jsonl")
    assert discover_clients(_MixedGrid(set()), 3, 0.3, ["a", "b"], min_clients=1, log=log) == {1: {"client-id": 0}}
    errors = {line["node"]: line["reason"] for line in log.read() if line["kind"] == "client-error"}
    assert errors == {2: "failed to start: ClientApp raised: no data file",
                      3: "its reply states no client id (metric 'client-id': None)"}
    with pytest.raises(FedspecError, match=r"only 1 of 3 nodes.*node 2: failed to start.*node 3: its reply states"):
        discover_clients(_MixedGrid(set()), 3, 0.3, ["a", "b"], min_clients=2)


class _TwinGrid(_SilentGrid):
    """Nodes 1 and 2 answer as clients 0 and 1; node 3 claims client 0 too (an impostor, or a SuperNode started with
    node 1's partition-id by mistake)."""

    def pull_messages(self, ids):
        from flwr.app import Message, MetricRecord, RecordDict

        claims = {1: 0, 2: 1, 3: 0}
        replies = [Message(RecordDict({"metrics": MetricRecord({"client-id": claims[m.metadata.dst_node_id]})}),
                           reply_to=m) for m in self.sent]
        self.sent = []
        return replies


def test_discovery_leaves_out_both_nodes_that_claim_one_client_id_and_names_them(flower_task, tmp_path, caplog):
    from fedspec.errors import FedspecError
    from fedspec.rundir import MetricsLog
    from fedspec.server.federation import discover_clients

    log = MetricsLog(tmp_path / "metrics.jsonl")
    assert discover_clients(_TwinGrid(set()), 3, 0.3, ["a", "b"], min_clients=1, log=log) == {2: {"client-id": 1}}
    clash = ("nodes 1 and 3 both claim client id 0 (partition-id=0), so neither takes part; start every SuperNode "
             "with its own --node-config 'partition-id=<i>'")
    errors = {line["node"]: line["reason"] for line in log.read() if line["kind"] == "client-error"}
    assert errors == {1: clash, 3: clash} and all(line["round"] == 0 for line in log.read())
    assert f"Discovery: {clash}" in caplog.text  # on the server's console too: a misconfiguration is not silent
    with pytest.raises(FedspecError, match=r"only 1 of 3 nodes answered.*min_clients=2 \(nodes 1 and 3 both claim"):
        discover_clients(_TwinGrid(set()), 3, 0.3, ["a", "b"], min_clients=2)

    from fedspec.server.federation import _client_id_clashes

    triplets = _client_id_clashes({5: {"client-id": 4}, 1: {"client-id": 4}, 2: {"client-id": 0}, 3: {"client-id": 4}})
    assert [(nodes, reason.split(" (")[0]) for nodes, reason in triplets] == [
        ([5, 1, 3], "nodes 1, 3 and 5 all claim client id 4")]


class _CountingGrid(_SilentGrid):
    """Every node answers with a tensor of 10 float32 values, except node 3, which never answers."""

    def pull_messages(self, ids):
        import numpy as np
        from flwr.app import Array, ArrayRecord, Message, RecordDict

        replies = [Message(RecordDict({"arrays": ArrayRecord({"x": Array(np.zeros(10, dtype=np.float32))})}),
                           reply_to=m) for m in self.sent if m.metadata.dst_node_id != 3]
        self.sent = []
        return replies


def test_exchange_counts_the_payload_both_ways_and_a_silent_node_is_logged(flower_task, tmp_path):
    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

    from fedspec.rundir import MetricsLog
    from fedspec.server.budget import BudgetTracker
    from fedspec.server.federation import _log_replies
    from fedspec.server.messaging import Traffic, exchange
    from fedspec.strategies.flower import RoundReplies

    content = RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros((4, 8), dtype=np.float64))}),
                          "config": ConfigRecord({"note": "abc", "share": b"12345"})})
    messages = [Message(content, message_type=MessageType.TRAIN, dst_node_id=n) for n in (1, 2, 3)]
    traffic = Traffic()
    replies = exchange(_CountingGrid({1, 2, 3}), messages, timeout=0.3, traffic=traffic)
    assert len(replies) == 2
    assert traffic.sent == {1: 4 * 8 * 8 + 3 + 5, 2: 264, 3: 264} and traffic.received == {1: 40, 2: 40}
    log = MetricsLog(tmp_path / "metrics.jsonl")
    cfg = OmegaConf.create({"federation": {"round_timeout": 0.3}})
    _log_replies(log, 4, RoundReplies(), replies, BudgetTracker.__new__(BudgetTracker), {}, cfg, {3: 7}, traffic,
                 _plan())
    (line,) = log.read()
    assert (line["kind"], line["round"], line["node"], line["client"]) == ("client-error", 4, 3, 7)
    assert line["reason"] == "no reply within federation.round_timeout=0.3s"


def test_traffic_counts_a_tensor_header_it_cannot_read_as_the_bytes_that_arrived(flower_task):
    from flwr.app import ArrayRecord, Message, MessageType, RecordDict

    from fedspec.server.messaging import payload_bytes

    def carrying(record):
        return Message(RecordDict({"arrays": record}), dst_node_id=1, message_type=MessageType.TRAIN)

    honest = payload_bytes(carrying(ArrayRecord(_forged("head.weight"))))
    assert honest == (20 + 10) * 4  # dtype × shape of B and the head, as declared
    for header in ({"dtype": "bogus"}, {"shape": ("2", 5.5)}, {"shape": (-2, 5)}):
        record = ArrayRecord(_forged("head.weight"))
        for field, value in header.items():  # after the record's constructor, which would refuse a shape of strings
            setattr(record["head.weight"], field, value)
        raw = len(record["head.weight"].data)  # numpy's file header and the 10 float32 values
        assert payload_bytes(carrying(record)) == 20 * 4 + raw


class _ForgedHeaderGrid(_SilentGrid):
    """Nodes 10 and 11 (clients 0 and 1) train honestly; node 12 (client 2) sends a tensor whose header names a dtype
    numpy does not know. Every reply goes through Flower's wire format, which checks none of it."""

    def get_node_ids(self):
        return [10, 11, 12]

    def pull_messages(self, ids):
        from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
        from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

        honest = {reply.metadata.src_node_id: reply.content for reply in _honest()}
        replies = []
        for m in self.sent:
            node = m.metadata.dst_node_id
            if node == 12:
                arrays, metrics = ArrayRecord(_forged("head.weight", dtype="bogus")), _metrics(2)
            else:
                arrays, metrics = honest[node].array_records["arrays"], honest[node].metric_records["metrics"]
            content = RecordDict({"arrays": arrays, "metrics": MetricRecord(dict(metrics))})
            replies.append(Message(recorddict_from_proto(recorddict_to_proto(content)), reply_to=m))
        self.sent = []
        return replies


def test_a_tensor_header_numpy_cannot_read_is_quarantined_not_a_server_crash(flower_task, tmp_path):
    """The server's round as it runs: exchange (which counts the bytes), aggregate, log."""
    from fedspec.rundir import MetricsLog
    from fedspec.server.federation import _log_replies
    from fedspec.server.messaging import Traffic, exchange

    honest_only, _ = _strategy().aggregate_train(1, _honest())
    strategy, traffic = _strategy(), Traffic()
    replies = exchange(_ForgedHeaderGrid(set()), strategy.train_messages(1, _state()), timeout=0.3, traffic=traffic)
    arrays, summary = strategy.aggregate_train(1, replies)
    assert summary["clients"] == 2 and summary["quarantined"] == 1
    for key in honest_only:
        torch.testing.assert_close(arrays[key], honest_only[key], rtol=0, atol=0)
    log = MetricsLog(tmp_path / "metrics.jsonl")
    cfg = OmegaConf.create({"federation": {"round_timeout": 0.3}})
    _log_replies(log, 1, strategy.last_replies, replies, None, {}, cfg, strategy.client_ids, traffic, _plan())
    (line,) = [line for line in log.read() if line["kind"] == "client-quarantined"]
    assert (line["node"], line["client"]) == (12, 2)
    assert line["reason"].startswith("tensor 'head.weight' of the 'arrays' record declares dtype 'bogus'")
    assert traffic.received[10] == traffic.received[11] == 120 < traffic.received[12]


class _OfflineNodeGrid(_SilentGrid):
    """Node 3 went offline: the SuperLink answers for it with an error sent from its own id (1234)."""

    def pull_messages(self, ids):
        from flwr.app import Error, Metadata
        from flwr.app.message.message import make_message

        replies = []
        for i, m in enumerate(self.sent):  # push_messages gave the i-th message the id "m{i}"
            metadata = Metadata(run_id=m.metadata.run_id, message_id=f"r{i}", src_node_id=1234,
                                dst_node_id=m.metadata.src_node_id, reply_to_message_id=f"m{i}",
                                group_id="", created_at=0.0, ttl=60.0, message_type=m.metadata.message_type)
            replies.append(make_message(metadata, error=Error(code=1, reason="NODE_UNAVAILABLE")))
        self.sent = []
        return replies


def test_an_error_the_superlink_sends_for_an_offline_node_names_that_node(flower_task):
    from flwr.app import Message, MessageType, RecordDict

    from fedspec.server.messaging import exchange

    messages = [Message(RecordDict(), message_type=MessageType.TRAIN, dst_node_id=3)]
    (reply,) = exchange(_OfflineNodeGrid({3}), messages, timeout=0.3)
    assert reply.has_error() and reply.error.reason == "NODE_UNAVAILABLE"
    assert reply.metadata.src_node_id == 3  # not the SuperLink's 1234: logs and the strategy name the client


def test_the_mirror_ledger_counts_every_attempt_a_client_reports():
    """A client trained round 3 before the server crashed (the mirror, reloaded from round 2's checkpoint, does
    not know) and trains it again after the resume: it reports attempt 2, and the mirror records both."""
    from fedspec.privacy import PrivacyLedger
    from fedspec.server.mirror import record_claim

    client_ledger = PrivacyLedger(client_id="2", delta=1e-5)
    for round_, attempt in ((1, 1), (2, 1), (3, 1), (3, 2)):
        client_ledger.record(round_, 1.1, 0.25, 4, attempt=attempt)
    mirror = {"2": PrivacyLedger(client_id="2", delta=1e-5)}
    for round_ in (1, 2):
        record_claim(mirror, TrainReply.from_metrics(_metrics(2, attempt=1), needs_examples=True), round_, _plan())
    record_claim(mirror, TrainReply.from_metrics(_metrics(2, attempt=2), needs_examples=True), 3, _plan())
    assert [(e.round, e.attempt) for e in mirror["2"].entries] == [(1, 1), (2, 1), (3, 1), (3, 2)]
    assert mirror["2"].epsilon() == pytest.approx(client_ledger.epsilon(), rel=1e-12)
    # A client that lost its own ledger and reports attempt 1 again: the server keeps the larger count.
    record_claim(mirror, TrainReply.from_metrics(_metrics(2, attempt=1), needs_examples=True), 3, _plan())
    assert [(e.round, e.attempt) for e in mirror["2"].entries][-1] == (3, 3)


@pytest.mark.parametrize(("overrides", "metrics", "reason"), [
    (["privacy.noise_multiplier=0.8"], _metrics(2), "noise-multiplier 1.1; this run sets 0.8"),
    (["privacy.sample_rate=0.5"], _metrics(2), "sample-rate 0.25; this run sets 0.5"),
    (["privacy=none"], _metrics(2), "a DP mechanism .* the run does not use"),
    (["privacy.accountant=prv"], _metrics(2, noise_multiplier=1e-3), "no ε can be computed"),  # a PRV grid of 10^10
])
def test_a_claim_that_contradicts_the_runs_privacy_config_is_refused(overrides, metrics, reason):
    from fedspec.server.mirror import check_claim

    reply = TrainReply.from_metrics(metrics, needs_examples=True)
    with pytest.raises(ProtocolError, match=reason):
        check_claim({}, reply, 1, _plan(*overrides))
    check_claim({}, TrainReply.from_metrics(_metrics(2), needs_examples=True), 1, _plan())  # the honest claim


def test_after_a_refused_claim_the_budget_check_and_the_report_still_compute():
    """The crash this prevents: one reply claiming σ = 1e-300 recorded in the mirror made every later ε computation
    (the next round's budget check, the final report) divide by zero, for good: the checkpoint kept it."""
    from fedspec.config import compose_config
    from fedspec.server.budget import BudgetTracker
    from fedspec.server.mirror import check_claim, record_claim

    mirror, plan = {}, _plan()
    for client, sigma in ((0, 1.1), (2, 1e-300)):
        reply = TrainReply.from_metrics(_metrics(client, noise_multiplier=sigma), needs_examples=True)
        try:
            check_claim(mirror, reply, 1, plan)
        except ProtocolError:
            continue
        record_claim(mirror, reply, 1, plan)
    assert sorted(mirror) == ["0"]
    budget = BudgetTracker(compose_config(["train.local_steps=4", "privacy.target_epsilon=8"]))
    assert budget.stop_reason(["0", "2"], mirror) is None
    assert 0 < mirror["0"].epsilon() < 8


def test_round_zero_claims_follow_the_statistic_mechanism_the_run_sets():
    from fedspec.protocol import StatisticsReply
    from fedspec.server.mirror import check_claim

    private = _plan("adapter=corda", "privacy.private_init_stats=true", "privacy.init_noise_multiplier=5")
    released = {"client-id": 1, "calibration-examples": 64, "privatized": 1}
    honest = StatisticsReply.from_metrics({**released, "noise-multiplier": 5.0, "sample-rate": 1.0, "steps": 1})
    check_claim({}, honest, 0, private)
    for claim, reason in (({"noise-multiplier": 0.5, "sample-rate": 1.0, "steps": 1}, "this run sets 5.0"),
                          ({"noise-multiplier": 5.0, "sample-rate": 1.0, "steps": 3}, "reports 3 DP steps"),
                          ({}, "no DP mechanism")):
        with pytest.raises(ProtocolError, match=reason):
            check_claim({}, StatisticsReply.from_metrics({**released, **claim}), 0, private)
    with pytest.raises(ProtocolError, match="the run does not use"):  # statistics released raw are not privatized
        check_claim({}, honest, 0, _plan("adapter=corda"))


def test_a_failing_client_app_reaches_the_server_as_one_line_with_its_traceback_in_the_node_log(tmp_path):
    from types import SimpleNamespace

    from fedspec.client.app import _one_line_failures
    from fedspec.errors import FedspecError
    from fedspec.protocol import error_reason

    def train(msg, context):
        raise ValueError("the local data file is gone\nsecond line of detail")

    context = SimpleNamespace(node_config={"partition-id": 7, "state-dir": str(tmp_path)}, run_config={},
                              run_id=1, state=None)
    with pytest.raises(FedspecError) as failure:
        _one_line_failures(train, None)(None, context)
    message = str(failure.value)
    assert message.startswith("client 7: ValueError: the local data file is gone (traceback in ")
    assert "\n" not in message
    (log,) = tmp_path.rglob("errors.log")
    assert "Traceback (most recent call last)" in log.read_text() and "second line of detail" in log.read_text()
    # What the server logs: Flower's runtimes wrap the ClientApp's exception; the one line comes back out.
    wrapped = f"<class 'flwr.clientapp.client_app.ClientAppException'>:<'\nException ClientAppException occurred. Message: {message}'>"
    assert error_reason(wrapped) == message


def test_a_reply_reports_its_device_peak_memory_and_step_time():
    reply = TrainReply(3, train_loss=0.5, steps=4, num_examples=10, train_seconds=2.0, step_seconds=0.5, cuda=True,
                       peak_memory_mib=7912.5)
    read = TrainReply.from_metrics(reply.to_metrics(), needs_examples=True)
    assert (read.cuda, read.peak_memory_mib, read.step_seconds) == (True, 7912.5, 0.5)
    assert reply.to_metrics()["cuda"] == 1  # metrics are numbers: the flag travels as 0 / 1


def test_a_reply_without_a_training_loss_counts_and_the_round_loss_is_the_others_mean():
    """Under distributed client-level noise a client keeps its loss to itself (data outside the noised sum's
    guarantee): its reply is valid, and the round's loss is the mean of the losses the others sent (None if none)."""
    from fedspec.protocol import TrainReply
    from fedspec.strategies.flower import summarize_train_metrics

    silent = TrainReply.from_metrics(_metrics(1, train_loss=_DROP), needs_examples=True)
    told = TrainReply.from_metrics(_metrics(2, train_loss=0.25), needs_examples=True)
    assert silent.train_loss is None and "train-loss" not in silent.to_metrics()
    assert summarize_train_metrics([silent, told], [1.0, 3.0])["train-loss"] == 0.25
    assert "train-loss" not in summarize_train_metrics([silent], [1.0])


# --- the round's summary: what the round table and summary.md show -------------------------------------------------

def test_the_rounds_train_loss_weighs_a_greedy_client_as_the_aggregate_does():
    """A client that claims 10⁹ records has its weight capped in the aggregate; the round's train loss must not
    weigh its claimed loss by the uncapped count (it used to be ~1000, all the liar's)."""
    greedy = train_reply(16, _metrics(6, num_examples=10**9, train_loss=1000.0), _update(seed=99))
    _, summary = _bounded_strategy().aggregate_train(1, [*_cohort(), greedy])
    assert summary["weight-capped"] == 1
    weights = [100.0 + 10 * i for i in range(6)]
    cap = 5 * sorted([*weights, 1e9])[3]  # 5 × the lower median, as bound_influence caps it
    expected = (0.5 * sum(weights) + 1000.0 * cap) / (sum(weights) + cap)
    assert summary["train-loss"] == pytest.approx(expected)


def test_the_rounds_train_loss_of_huge_finite_claims_is_finite():
    """Finite losses near float's range with large weights overflowed the weighted sum to inf."""
    replies = [train_reply(10 + i, _metrics(i, num_examples=10**9, train_loss=1e308), _update(seed=i + 1))
               for i in range(2)]
    _, summary = _bounded_strategy(0, 0).aggregate_train(1, replies)
    assert summary["train-loss"] == pytest.approx(1e308)


def test_the_rounds_max_epsilon_is_the_accountants_not_a_clients_claim():
    """The round table's max client ε used to be the largest ε the round's clients *stated*: a client reporting
    ε = 0.01 (or none) showed a far smaller ε than the server's own accountant computes from its σ, q and steps,
    and than the privacy report states. The row takes the larger of the two per client, as the report does."""
    from fedspec.server.federation import _round_max_epsilon
    from fedspec.server.mirror import record_claim

    plan, ledgers = _plan(), {}
    liar = train_reply(10, _metrics(0, epsilon=0.01), _update(seed=1))
    silent = train_reply(11, _metrics(1, epsilon=_DROP), _update(seed=2))
    strategy = _strategy()
    _, summary = strategy.aggregate_train(1, [liar, silent])
    for _, reply, _ in strategy.last_replies.accepted:
        record_claim(ledgers, reply, 1, plan)
    accounted = max(ledger.epsilon() for ledger in ledgers.values())
    assert accounted > 1.0 and summary["max-epsilon"] == 0.01
    assert _round_max_epsilon(None, summary, strategy.last_replies, ledgers) == pytest.approx(accounted)
    # a client that states more than the mirror holds (a round the server missed) still counts in full
    assert _round_max_epsilon(None, {"max-epsilon": 50.0}, strategy.last_replies, ledgers) == 50.0
    assert _round_max_epsilon(60.0, summary, strategy.last_replies, ledgers) == 60.0  # ε never shrinks
    assert _round_max_epsilon(None, {}, strategy.last_replies, {}) is None  # no DP: no ε
