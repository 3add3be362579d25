"""Distributed client-level noise under secure aggregation (fedspec.privacy.skellam): the RDP bound the ledger
composes is a true bound, the clients' integer encodings sum to the clipped updates plus exactly the planned noise,
and the accountant refuses what it cannot certify."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from fedspec.errors import ConfigError
from fedspec.privacy.accounting import SKELLAM, epsilon, plan_noise
from fedspec.privacy.skellam import MIN_UNITS, SkellamNoise, noise_multiplier_for, skellam, units
from fedspec.secagg import MODULUS_BITS

MODULUS = 2**MODULUS_BITS


def skellam_rdp(alpha: int, l2: float, l1: float, mu: float) -> float:
    """Agarwal, Kairouz & Liu 2021, the multi-dimensional Skellam mechanism at integer order α (variance μ)."""
    return alpha * l2**2 / (2 * mu) + min(((2 * alpha - 1) * l2**2 + 6 * l1) / (4 * mu**2), 3 * l1 / (2 * mu))


def exact_renyi(alpha: int, shift: int, mu: float) -> float:
    """D_α(Sk + shift ‖ Sk) of one coordinate, summed over the support numerically."""
    x = np.arange(-4000, 4001)
    p = stats.skellam.pmf(x - shift, mu / 2, mu / 2)
    q = stats.skellam.pmf(x, mu / 2, mu / 2)
    keep = (p > 0) & (q > 0)
    log_terms = alpha * np.log(p[keep]) + (1 - alpha) * np.log(q[keep])
    return float(np.logaddexp.reduce(log_terms) / (alpha - 1))


@pytest.mark.parametrize("shift,mu", [(1, 4.0), (3, 20.0), (5, 80.0)])
def test_the_transcribed_skellam_bound_holds_for_the_exact_divergence(shift, mu):
    for alpha in range(2, 9):
        assert exact_renyi(alpha, shift, mu) <= skellam_rdp(alpha, shift, shift, mu) + 1e-12


@pytest.mark.parametrize("z", [0.3, 0.8, 2.0, 10.0])
@pytest.mark.parametrize("dimension", [1, 400, 75_000, 10**7])
def test_the_accounted_multiplier_bounds_the_skellam_rdp_at_every_integer_order(z, dimension):
    noise = SkellamNoise(z, 1.0)
    assert units(dimension) >= max(MIN_UNITS, 64 * math.sqrt(dimension))
    l2 = noise.sensitivity(dimension)
    l1 = math.sqrt(dimension) * l2
    sigma = noise.accounted_multiplier
    for alpha in range(2, 513):
        assert skellam_rdp(alpha, l2, l1, noise.summed_variance(dimension)) <= alpha / (2 * sigma**2) * (1 + 1e-12)
    assert sigma < z and noise_multiplier_for(sigma) == pytest.approx(z, rel=1e-12)


def test_the_skellam_accountant_composes_at_integer_orders_without_amplification():
    one = epsilon([(1.0, 1.0, 10)], 1e-5, SKELLAM)
    assert one == epsilon([(1.0, 1.0, 4), (1.0, 1.0, 6)], 1e-5, SKELLAM)
    assert epsilon([(1.0, 1.0, 11)], 1e-5, SKELLAM) > one
    # At integer orders only, never below what the Gaussian accountant certifies at the same σ and q = 1
    assert one >= epsilon([(1.0, 1.0, 10)], 1e-5, "rdp") - 0.02
    with pytest.raises(ValueError, match="no amplification by sampling"):
        epsilon([(1.0, 0.5, 10)], 1e-5, SKELLAM)
    sigma = plan_noise(3.0, 1e-5, 1.0, 10, SKELLAM)
    assert epsilon([(sigma, 1.0, 10)], 1e-5, SKELLAM) <= 3.0 < epsilon([(sigma * 0.999, 1.0, 10)], 1e-5, SKELLAM)


def _updates(clients: int, dimension: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"b": torch.randn(dimension - 3, generator=g) * 0.01, "a": torch.randn(3, generator=g)}
            for _ in range(clients)]


def _masked_sum(vectors: list[torch.Tensor]) -> torch.Tensor:
    total = torch.zeros_like(vectors[0])
    for vector in vectors:
        assert bool(((vector >= 0) & (vector < MODULUS)).all())  # residues, ready for ClientSession.mask
        total = (total + vector).bitwise_and_(MODULUS - 1)
    return total


def test_without_noise_the_decoded_sum_is_the_clipped_sum_within_the_rounding():
    noise = SkellamNoise(1e-9, 0.5)
    updates = _updates(4, 50)
    g = torch.Generator().manual_seed(1)
    encoded = [noise.encode(u, 4, g) for u in updates]
    sums, clients = noise.decode(_masked_sum([v for v, _ in encoded]), updates[0])
    assert clients == 4
    for key in ("a", "b"):
        clipped = sum(u[key].double() * min(1.0, 0.5 / norm) for u, (_, norm) in zip(updates, encoded))
        # each client's coordinate moves by less than one integer unit, C/S in update units
        assert (sums[key] - clipped).abs().max() < 4 * 0.5 / units(50)
    assert all(norm == pytest.approx(float(torch.cat([u["a"], u["b"]]).norm())) for (_, norm), u in zip(encoded, updates))


def test_the_shares_add_up_to_the_planned_noise_and_negative_values_survive_the_modulus():
    noise = SkellamNoise(0.5, 1.0)
    dimension, clients = 20_000, 5
    zero = [{"x": torch.zeros(dimension)} for _ in range(clients)]
    g = torch.Generator().manual_seed(2)
    sums, count = noise.decode(_masked_sum([noise.encode(u, clients, g)[0] for u in zero]), zero[0])
    assert count == clients
    values = sums["x"]
    assert bool((values < 0).any())  # the noise is symmetric: negative sums came back from the residues
    expected_std = noise.std_of_mean(1, dimension)  # of the sum: the mean of one
    assert float(values.std()) == pytest.approx(expected_std, rel=0.03)
    assert abs(float(values.mean())) < 4 * expected_std / math.sqrt(dimension)


def test_skellam_draws_have_the_asked_variance_even_above_exact_float_poisson_rates():
    g = torch.Generator().manual_seed(3)
    for variance in (3.0, 2.0**45):  # the second is drawn as sums of 16 Poisson variables on each side
        draws = skellam(variance, 200_000, g).double()
        assert float(draws.var()) == pytest.approx(variance, rel=0.02)
        assert abs(float(draws.mean())) < 5 * math.sqrt(variance / 200_000)


def test_settings_that_would_wrap_or_carry_bad_input_are_refused():
    with pytest.raises(ConfigError, match="wrap the masked sum"):
        SkellamNoise(1e14, 1.0).check_headroom(1000, 10, 10)
    SkellamNoise(50.0, 1.0).check_headroom(10**7, 10_000, 10)
    with pytest.raises(ValueError, match="noise shares"):
        SkellamNoise(1.0, 1.0).encode({"x": torch.zeros(3)}, 0, torch.Generator())
    with pytest.raises(ValueError, match="non-finite"):
        SkellamNoise(1.0, 1.0).encode({"x": torch.tensor([float("nan")])}, 2, torch.Generator())
    with pytest.raises(ValueError, match="lower the noise"):
        skellam(2.0**60, 10, torch.Generator())


def _client_dp_config(*overrides: str):
    from fedspec.config import compose_config

    return compose_config(["federation.secure_aggregation.enabled=true", "privacy=client-dp",
                           "federation.weighting=uniform", *overrides])


# 4 clients: at fraction 0.5 the server samples a cohort of 2 (federation.min_clients is 2), at 1.0 all 4
@pytest.mark.parametrize("fraction,fixed,told,ok", [
    (0.5, None, 2, True), (0.5, None, 3, False), (0.5, None, 4, False),  # m = N: the cohort's shares make 2/4
    (1.0, None, 4, True), (1.0, None, 3, True),  # fewer sampled (nodes missing): a larger share each, still safe
    (1.0, None, 5, False), (1.0, None, 1, False), (1.0, None, True, False), (1.0, None, "3", False),
    (0.5, 3, 3, True), (0.5, 3, 4, False), (0.5, 3, 2, False)])
def test_a_client_adds_noise_only_for_a_share_count_its_config_plans(fraction, fixed, told, ok, flower_task):
    """Too large an m would make every client add too little noise: a client refuses an m above the one its own
    config plans (privacy.client_level.min_survivors, else the cohort the server samples), before training."""
    from flwr.app import ConfigRecord, Message, RecordDict

    from fedspec.client.secure_aggregation import noise_shares
    from fedspec.protocol import CONFIG, NOISE_SHARES
    from fedspec.secagg import SecAggError

    cfg = _client_dp_config("federation.clients=4", f"federation.fraction={fraction}",
                            f"privacy.client_level.min_survivors={fixed or 'null'}")
    msg = Message(RecordDict({CONFIG: ConfigRecord({NOISE_SHARES: told})}), dst_node_id=1, message_type="train")
    if ok:
        assert noise_shares(cfg, msg) == told
    else:
        with pytest.raises(SecAggError, match="noise") as refused:
            noise_shares(cfg, msg)
        planned = fixed or (2 if fraction == 0.5 else 4)
        if isinstance(told, int) and told >= 2:  # the message names both numbers
            assert f"1/{told} of the noise" in str(refused.value) and f"{planned}" in str(refused.value)


def test_a_client_refuses_to_unmask_for_fewer_survivors_than_its_noise_shares(flower_task):
    """A server that names fewer survivors than m would unmask a sum with only part of the noise (k/m of its
    variance): every client refuses to send its shares, whatever the server checked itself."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from fedspec.client.secure_aggregation import answer_query, masked_reply, round_session
    from fedspec.protocol import (
        ADVERTISE,
        ARRAYS,
        CONFIG,
        DROPPED,
        MASKED,
        NOISE_SHARES,
        SECAGG,
        SECAGG_STAGE,
        SERVER_ROUND,
        SHARE,
        SURVIVORS,
        UNMASK,
        reply_tensors,
    )
    from fedspec.secagg import Advertisement, SecAggError, ServerSession

    cfg = _client_dp_config("federation.clients=3", "federation.fraction=1.0")  # m = the cohort = 3
    nodes = [11, 22, 33]
    contexts = {u: Context(run_id=1, node_id=u, node_config={}, state=RecordDict(), run_config={}) for u in nodes}

    def query(node: int, stage: str, payload: dict) -> dict:
        config = ConfigRecord({SERVER_ROUND: 1, SECAGG_STAGE: stage})
        msg = Message(RecordDict({CONFIG: config, SECAGG: ConfigRecord(payload)}), dst_node_id=node,
                      message_type="query")
        return dict(answer_query(cfg, msg, contexts[node])[SECAGG])

    server = ServerSession(round=1, fraction=cfg.federation.secure_aggregation.threshold)
    adverts = {u: query(u, ADVERTISE, {}) for u in nodes}
    peers = server.peers({u: Advertisement.from_bytes(a["key"]) for u, a in adverts.items()})
    shared = {u: query(u, SHARE, {str(v): ad.to_bytes() for v, ad in peers[u].items()}) for u in nodes}
    inbox = server.route({u: {int(v): c for v, c in out.items()} for u, out in shared.items()})
    masked = {}
    for u in nodes:
        content = RecordDict({CONFIG: ConfigRecord({SERVER_ROUND: 1, NOISE_SHARES: 3}),
                              SECAGG: ConfigRecord({str(v): c for v, c in inbox[u].items()})})
        reply = masked_reply(cfg, Message(content, dst_node_id=u, message_type="train"), contexts[u],
                             round_session(contexts[u], 1), {"x": torch.zeros(8)}, {})
        masked[u] = reply_tensors(reply.array_records, ARRAYS)[MASKED]

    survivors, dropped = server.unmask_request(masked)
    short = {SURVIVORS: [str(u) for u in survivors[:2]], DROPPED: [str(u) for u in survivors[2:]]}
    for u in survivors[:2]:
        with pytest.raises(SecAggError, match="names 2 survivors, fewer than the 3"):
            query(u, UNMASK, short)
    # Refusing revealed nothing: the full request is still answered, and the sum is the noised sum of all three
    full = {SURVIVORS: [str(u) for u in survivors], DROPPED: [str(u) for u in dropped]}
    total = server.total({u: {int(v): s for v, s in query(u, UNMASK, full).items()} for u in survivors})
    assert int(total[-1]) == 3  # the count slot: all three clients, each with its 1/3 noise share


def test_a_masked_sum_of_the_wrong_size_skips_the_round_instead_of_ending_the_run():
    """Every client can agree on a vector of the wrong size (another release, a hostile cohort): the server's
    decoding must fail the way the secure round survives, never with an error that ends the federation."""
    from types import SimpleNamespace

    from fedspec.secagg import SecAggError
    from fedspec.server.secure_round import SecureRound

    secure = SecureRound.__new__(SecureRound)  # only what _mean reads
    secure.noise, secure.quantizer = SkellamNoise(1.0, 1.0), None
    secure.strategy = SimpleNamespace(trained_template=lambda: {"x": torch.zeros(4)})
    with pytest.raises(SecAggError, match="coordinates"):
        secure._mean(torch.zeros(7, dtype=torch.int64), survivors=2, shares=2)
    mean, clients = secure._mean(torch.tensor([0, 0, 0, 0, 2], dtype=torch.int64), survivors=2, shares=2)
    assert clients == 2 and torch.equal(mean["x"], torch.zeros(4, dtype=torch.float64))
