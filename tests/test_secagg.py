"""Secure aggregation's core: the masked sum equals the plain sum (up to the stated quantization bound), survives
dropouts below the threshold, fails loudly above it, and refuses the requests that would unmask a client."""

from __future__ import annotations

import pytest
import torch

from fedspec.secagg import ClientSession, Quantizer, SecAggError, ServerSession, neighbourhoods, threshold
from fedspec.secagg.primitives import combine_shares, mask, split_secret
from fedspec.secagg.protocol import MODULUS, SPARE_COMBINATIONS


def run_round(vectors: dict[int, torch.Tensor], *, fraction=0.5, neighbours=None, drop_before_mask=(),
              drop_before_unmask=(), round_=3, tamper=None, spare_combinations=SPARE_COMBINATIONS):
    """All four exchanges, in process, as the federation carries them; returns (server total, server)."""
    clients = {u: ClientSession(node=u, round=round_, fraction=fraction) for u in vectors}
    server = ServerSession(round=round_, fraction=fraction, neighbours=neighbours,
                           spare_combinations=spare_combinations)
    peers = server.peers({u: c.advertise() for u, c in clients.items()})
    shares = {u: clients[u].share(peers[u]) for u in clients}
    inbox = server.route(shares)
    masked = {u: clients[u].mask(vectors[u], inbox[u]) for u in inbox if u not in drop_before_mask}
    survivors, dropped = server.unmask_request(masked)
    responses = {u: clients[u].unmask(survivors, dropped) for u in survivors if u not in drop_before_unmask}
    if tamper:
        tamper(responses)
    return server.total(responses), server


def residues(n: int, size: int, seed=0) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {100 + 7 * i: torch.randint(0, 2**40, (size,), generator=g) for i in range(n)}


def test_masked_sum_equals_plain_sum():
    vectors = residues(5, 50)
    total, _ = run_round(vectors)
    assert torch.equal(total, sum(vectors.values()) % MODULUS)


def test_a_masked_vector_reveals_nothing_of_its_input():
    # Two clients with the same input send unrelated vectors; a client's vector differs from its input everywhere
    vectors = {1: torch.arange(1000), 2: torch.arange(1000), 3: torch.zeros(1000, dtype=torch.int64)}
    clients = {u: ClientSession(node=u, round=0, fraction=0.5) for u in vectors}
    server = ServerSession(round=0, fraction=0.5)
    peers = server.peers({u: c.advertise() for u, c in clients.items()})
    inbox = server.route({u: clients[u].share(peers[u]) for u in clients})
    y = {u: clients[u].mask(vectors[u], inbox[u]) for u in clients}
    assert (y[1] != vectors[1]).float().mean() > 0.99 and (y[1] != y[2]).float().mean() > 0.99
    assert y[3].float().std() > 2**60  # roughly uniform over [0, 2^62), from an all-zero input


# Every neighbour of a dropped client must still gather t shares: with all 7 others (t = 4) two may drop; on a
# ring of 4 neighbours (t = 3) one may
@pytest.mark.parametrize("neighbours, drops", [(None, 2), (4, 1)])
def test_dropouts_after_sharing_are_recovered(neighbours, drops):
    vectors = residues(8, 30, seed=1)
    dropped = sorted(vectors)[2:2 + drops]  # shared their keys, then never sent a masked vector
    total, _ = run_round(vectors, neighbours=neighbours, drop_before_mask=dropped)
    expected = sum(v for u, v in vectors.items() if u not in dropped) % MODULUS
    assert torch.equal(total, expected)


def test_survivors_silent_at_unmasking_are_tolerated_up_to_the_threshold():
    vectors = residues(7, 20, seed=2)
    t = threshold(6, 0.5)
    assert t == 4
    silent = sorted(vectors)[:2]  # their masked vectors count; 4 of every client's 6 neighbours still answer
    total, _ = run_round(vectors, drop_before_unmask=silent)
    assert torch.equal(total, sum(vectors.values()) % MODULUS)
    with pytest.raises(SecAggError, match="needs 4 shares, 3 arrived: too many dropouts"):
        run_round(vectors, drop_before_unmask=sorted(vectors)[:3])


def test_a_round_with_fewer_than_two_vectors_is_refused():
    vectors = residues(3, 5)
    with pytest.raises(SecAggError, match="only 1 masked vector"):
        run_round(vectors, drop_before_mask=sorted(vectors)[:2])


def test_an_altered_share_is_caught_not_summed():
    vectors = residues(4, 10, seed=3)

    def flip(responses):
        responder = sorted(responses)[0]
        owner = sorted(responses[responder])[0]
        share = bytearray(responses[responder][owner])
        share[5] ^= 1
        responses[responder][owner] = bytes(share)

    with pytest.raises(SecAggError, match="does not match its commitment"):
        run_round(vectors, fraction=0.9, tamper=flip)  # threshold = every neighbour: no spare share


def test_a_client_refuses_to_reveal_both_secrets_of_one_client():
    clients = {u: ClientSession(node=u, round=1, fraction=0.5) for u in (1, 2, 3)}
    server = ServerSession(round=1, fraction=0.5)
    peers = server.peers({u: c.advertise() for u, c in clients.items()})
    inbox = server.route({u: clients[u].share(peers[u]) for u in clients})
    for u in clients:
        clients[u].mask(torch.zeros(4, dtype=torch.int64), inbox[u])
    with pytest.raises(SecAggError, match="both secrets of clients \\[2\\]"):
        clients[1].unmask(survivors=[1, 2], dropped=[2])
    with pytest.raises(SecAggError, match="itself as dropped"):
        clients[1].unmask(survivors=[2], dropped=[1])


def test_a_second_unmask_request_cannot_get_the_other_secret_of_a_client():
    """Asked once with client 2 surviving (its seed's shares) and again with client 2 dropped (its mask key's),
    the clients would hand the server both secrets of client 2, and with them its update in the clear. Every
    client refuses the second request, also after its session went through the node's state."""
    vectors = {u: torch.tensor([11 * u, 22 * u, 33 * u, 44 * u], dtype=torch.int64) for u in (1, 2, 3, 4, 5)}
    clients = {u: ClientSession(node=u, round=1, fraction=0.5) for u in vectors}
    server = ServerSession(round=1, fraction=0.5)
    peers = server.peers({u: c.advertise() for u, c in clients.items()})
    inbox = server.route({u: clients[u].share(peers[u]) for u in clients})
    for u in clients:
        clients[u].mask(vectors[u], inbox[u])
    others = [u for u in clients if u != 2 and 2 in clients[u].inbox]
    for u in others:
        clients[u].unmask(survivors=[2], dropped=[])
        stored = ClientSession.from_record(clients[u].to_record())
        with pytest.raises(SecAggError, match="other secret of clients \\[2\\]"):
            stored.unmask(survivors=[], dropped=[2])
        assert stored.unmask(survivors=[2], dropped=[]).keys() == {2}  # the same request again is answered


def test_a_misrouted_or_altered_share_does_not_decrypt():
    clients = {u: ClientSession(node=u, round=1, fraction=0.5) for u in (1, 2, 3)}
    server = ServerSession(round=1, fraction=0.5)
    peers = server.peers({u: c.advertise() for u, c in clients.items()})
    inbox = server.route({u: clients[u].share(peers[u]) for u in clients})
    misrouted = {1: inbox[2][1], 3: inbox[1][3]}  # "from 3" is really client 3's ciphertext for client 1
    clients[2].mask(torch.zeros(2, dtype=torch.int64), misrouted)
    with pytest.raises(SecAggError, match="does not decrypt"):
        clients[2].unmask(survivors=[1, 3], dropped=[])
    altered = bytearray(inbox[2][1])
    altered[-1] ^= 1
    clients[2].mask(torch.zeros(2, dtype=torch.int64), {1: bytes(altered), 3: inbox[2][3]})
    with pytest.raises(SecAggError, match="does not decrypt"):
        clients[2].unmask(survivors=[1], dropped=[])


def test_client_session_survives_a_round_trip_through_its_stored_form():
    clients = {u: ClientSession(node=u, round=2, fraction=0.5) for u in (4, 5, 6)}
    server = ServerSession(round=2, fraction=0.5)
    peers = server.peers({u: c.advertise() for u, c in clients.items()})
    shares = {}
    for u in clients:  # each exchange runs on a session rebuilt from the previous one's stored form
        shares[u] = clients[u].share(peers[u])
        clients[u] = ClientSession.from_record(clients[u].to_record())
    inbox = server.route(shares)
    vectors = residues(3, 6, seed=4)
    masked = {}
    for u, v in zip(clients, vectors.values()):
        masked[u] = clients[u].mask(v, inbox[u])
        clients[u] = ClientSession.from_record(clients[u].to_record())
    survivors, dropped = server.unmask_request(masked)
    total = server.total({u: clients[u].unmask(survivors, dropped) for u in survivors})
    assert torch.equal(total, sum(vectors.values()) % MODULUS)
    assert ClientSession.from_record(ClientSession(node=1, round=1, fraction=0.5, min_survivors=3).to_record()
                                     ).min_survivors == 3


def test_a_client_refuses_to_unmask_when_fewer_than_its_min_survivors_are_named():
    """Distributed client-level noise: a sum of fewer than m noise shares carries too little noise. Listing
    a survivor twice does not count it twice; refusing reveals nothing, so a correct request still works."""
    vectors = residues(4, 6, seed=5)
    clients = {u: ClientSession(node=u, round=1, fraction=0.5, min_survivors=4) for u in vectors}
    server = ServerSession(round=1, fraction=0.5)
    peers = server.peers({u: c.advertise() for u, c in clients.items()})
    inbox = server.route({u: clients[u].share(peers[u]) for u in clients})
    masked = {u: clients[u].mask(vectors[u], inbox[u]) for u in clients}
    first, *others = sorted(vectors)
    with pytest.raises(SecAggError, match="names 3 survivors, fewer than the 4"):
        clients[first].unmask(survivors=[first, *others[:2], first], dropped=others[2:])
    survivors, dropped = server.unmask_request(masked)
    total = server.total({u: clients[u].unmask(survivors, dropped) for u in survivors})
    assert torch.equal(total, sum(vectors.values()) % MODULUS)


def test_ring_neighbourhoods_are_symmetric_and_sized():
    graph = neighbourhoods(range(10), 4)
    assert all(len(peers) == 4 for peers in graph.values())
    assert all(u in graph[v] for u, peers in graph.items() for v in peers)
    assert neighbourhoods([3, 1, 2], 8) == {1: [2, 3], 2: [1, 3], 3: [1, 2]}


def test_shamir_needs_the_threshold():
    secret = bytes(range(32))
    shares = split_secret(secret, 3, 5)
    assert combine_shares(shares[1:4]) == secret and combine_shares(shares) == secret
    assert combine_shares(shares[:2]) != secret


def test_masks_are_deterministic_per_seed_and_round():
    seed = bytes(32)
    assert torch.equal(mask(seed, 9, 62, 1), mask(seed, 9, 62, 1))
    assert not torch.equal(mask(seed, 9, 62, 1), mask(seed, 9, 62, 2))
    assert int(mask(seed, 10_000, 62, 0).max()) < MODULUS


def test_quantized_weighted_mean_is_within_one_step_of_the_exact_mean():
    quantizer = Quantizer(clip=2.0, bits=16, max_weight=10_000)
    g = torch.Generator().manual_seed(5)
    updates = [{"b": torch.randn(6, 4, generator=g) * 0.5, "head": torch.randn(3, generator=g)} for _ in range(6)]
    weights = [17, 1, 250, 3000, 42, 999]
    encoded = [quantizer.encode(u, w, g)[0] for u, w in zip(updates, weights)]
    sums, weight = quantizer.decode(sum(encoded) % MODULUS, updates[0])
    assert weight == sum(weights)
    for key in ("b", "head"):
        exact = sum(w * u[key].clamp(-2, 2).double() for u, w in zip(updates, weights)) / weight
        assert (sums[key] / weight - exact).abs().max() <= quantizer.step


def test_quantization_counts_clipped_coordinates_and_refuses_bad_input():
    quantizer = Quantizer(clip=1.0, bits=12, max_weight=100)
    g = torch.Generator().manual_seed(0)
    _, clipped = quantizer.encode({"x": torch.tensor([0.5, -3.0, 2.0])}, 1, g)
    assert clipped == 2
    with pytest.raises(SecAggError, match="non-finite"):
        quantizer.encode({"x": torch.tensor([float("nan")])}, 1, g)
    with pytest.raises(SecAggError, match="outside 1..100"):
        quantizer.encode({"x": torch.zeros(1)}, 101, g)
    assert quantizer.max_clients() == 2**62 // (100 * 2**12)


# ------------------------------------------------------------------------ what the server accepts as a sum
# A client masks whatever it likes and the server sees only the sum: it refuses sums no honest survivors could send

def _add(index, amount):
    return lambda vector: vector.index_add_(0, torch.tensor([index]), torch.tensor([amount]))


def _set(index, value):
    return lambda vector: vector.index_fill_(0, torch.tensor([index]), value)


def _encoded(quantizer, updates_and_weights, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {100 + i: quantizer.encode(update, weight, g)[0] for i, (update, weight) in enumerate(updates_and_weights)}


def test_honest_sums_pass_the_servers_check_even_at_the_extremes():
    quantizer = Quantizer(clip=4.0, bits=24, max_weight=1_000_000)
    g = torch.Generator().manual_seed(1)
    random = [({"b": 0.01 * torch.randn(4, generator=g)}, w) for w in (120, 80, 100)]
    top = [({"b": torch.full((4,), 9.0)}, 1_000_000)] * 3  # every level at its highest, every weight at its cap
    bottom = [({"b": torch.full((4,), -9.0)}, 1)] * 3  # the lowest levels, the smallest weights
    for clients in (random, top, bottom):
        total, _ = run_round(_encoded(quantizer, clients))
        quantizer.check_sum(total, clients=3)


@pytest.mark.parametrize("attack, reason", [
    (_add(0, 2**55), "coordinate\\(s\\) of the unmasked sum are outside"),
    (_add(1, -(2**40)), "coordinate\\(s\\) of the unmasked sum are outside"),  # below 0: a residue near 2^62
    (_set(4, 5_000_000), "total weight .* is outside 3..3000000"),  # the weight slot
    (_set(4, -300), "total weight .* is outside 3..3000000"),
])
def test_a_sum_no_honest_clients_could_send_is_refused(attack, reason):
    """The reviewer's case first: one of three clients adds 2^55 to a coordinate of its encoding (and sets its
    weight to 1); unchecked, the decoded mean moved by 8.5e7 with clip_range 4."""
    quantizer = Quantizer(clip=4.0, bits=24, max_weight=1_000_000)
    g = torch.Generator().manual_seed(0)
    vectors = _encoded(quantizer, [({"b": 0.01 * torch.randn(4, generator=g)}, w) for w in (120, 80, 100)])
    hostile = attack(vectors[102].clone())
    if reason.startswith("coordinate"):
        hostile[-1] = 1
    vectors[102] = hostile % MODULUS
    total, _ = run_round(vectors)
    with pytest.raises(SecAggError, match=reason):
        quantizer.check_sum(total, clients=3)


def _skellam_sum(noise, updates, shares, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {100 + i: noise.encode(update, shares, g)[0] for i, update in enumerate(updates)}


@pytest.mark.parametrize("z", [1e-6, 1.0, 5.0])
def test_honest_sums_with_distributed_noise_pass_the_servers_check(z):
    """Noise pushes coordinates past the clipped signal, negative ones wrap to residues near 2^62: both pass, with
    more survivors than noise shares too, and with updates that put their whole norm on one coordinate."""
    from fedspec.privacy.skellam import SkellamNoise

    noise = SkellamNoise(z, 1.0)
    g = torch.Generator().manual_seed(2)
    spiky = [{"x": torch.zeros(1000).index_fill_(0, torch.tensor([7]), sign * 3.0)} for sign in (1, 1, -1, 1)]
    random = [{"x": torch.randn(1000, generator=g)} for _ in range(4)]
    for updates in (spiky, random):
        for shares in (4, 2):
            total, _ = run_round(_skellam_sum(noise, updates, shares))
            noise.check_sum(total, clients=4, shares=shares)


@pytest.mark.parametrize("attack, reason", [
    (_add(0, 2**55), "coordinate\\(s\\) of the unmasked sum are beyond"),
    (_add(3, -(2**20)), "coordinate\\(s\\) of the unmasked sum are beyond"),
    (_set(1000, 0), "counts 3 clients, but 4 masked vectors were summed"),  # the count slot
    (_set(1000, 2), "counts 5 clients, but 4 masked vectors were summed"),
])
def test_a_sum_with_distributed_noise_no_honest_clients_could_send_is_refused(attack, reason):
    from fedspec.privacy.skellam import SkellamNoise

    noise = SkellamNoise(1.0, 1.0)
    g = torch.Generator().manual_seed(3)
    vectors = _skellam_sum(noise, [{"x": torch.randn(1000, generator=g)} for _ in range(4)], 4)
    vectors[101] = attack(vectors[101].clone()) % MODULUS
    total, _ = run_round(vectors)
    with pytest.raises(ValueError, match=reason):
        noise.check_sum(total, clients=4, shares=4)


def test_the_noise_bound_is_a_bernstein_tail_of_the_summed_variance():
    """b solves b²/(2(V + b/3)) = 100: about 14 standard deviations once V is large, a few units when it is tiny."""
    from fedspec.privacy.skellam import SkellamNoise

    for z in (1e-6, 1.0, 10.0):
        noise = SkellamNoise(z, 1.0)
        variance = noise.summed_variance(1000) * 5 / 3
        bound = noise.noise_bound(1000, clients=5, shares=3)
        assert bound**2 / (2 * (variance + bound / 3)) == pytest.approx(100, rel=1e-3, abs=1.0)
        assert bound >= 14 * variance**0.5


def test_the_secure_round_refuses_a_sum_out_of_range_as_a_skipped_round():
    """Where the server decodes the sum (``_mean``): the error is a SecAggError, which ``run`` turns into a skipped,
    logged round; an honest sum gives the weighted mean."""
    from types import SimpleNamespace

    from fedspec.server.secure_round import SecureRound

    quantizer = Quantizer(clip=4.0, bits=24, max_weight=1_000_000)
    secure = SecureRound.__new__(SecureRound)  # only what _mean reads
    secure.noise, secure.quantizer = None, quantizer
    secure.strategy = SimpleNamespace(trained_template=lambda: {"b": torch.zeros(4)})
    updates = [({"b": torch.full((4,), 0.5)}, 3), ({"b": torch.full((4,), -0.5)}, 1)]
    total = sum(_encoded(quantizer, updates).values()) % MODULUS
    mean, weight = secure._mean(total, survivors=2, shares=2)
    assert weight == 4 and (mean["b"] - 0.25).abs().max() <= quantizer.step
    hostile = total.clone()
    hostile[0] += 2**55
    with pytest.raises(SecAggError, match="outside 0.."):
        secure._mean(hostile, survivors=2, shares=2)
    with pytest.raises(SecAggError, match="total weight 4 is outside 5..5000000"):
        secure._mean(total, survivors=5, shares=5)  # five honest survivors weigh at least 5


# ------------------------------------------------------------------------ malformed replies and shares

def test_reply_keys_that_are_not_plain_ascii_node_ids_are_left_out_not_a_crash():
    """"²".isdigit() is True but int("²") raises: a client's reply with such a key ended the server."""
    from fedspec.server.secure_round import _by_node

    replies = {7: {"²": b"x", "٣": b"x", "1" * 5000: b"x", " 12": b"x", "12\n": b"x", "-12": b"x", "13": "text",
                   "101": b"share", "0": b"zero"}}
    assert _by_node(replies) == {7: {101: b"share", 0: b"zero"}}


def _alter_middle_responders_shares(responses):
    responder = sorted(responses)[1]
    for owner, share in responses[responder].items():
        altered = bytearray(share)
        altered[5] ^= 1
        responses[responder][owner] = bytes(altered)


def test_a_wrong_share_between_good_ones_is_skipped():
    """t = 2 of 3 neighbours: with shares [good, wrong, good] both windows of two held the wrong one, though the
    first and last rebuild the secret."""
    vectors = residues(4, 10, seed=3)
    assert threshold(3, 0.5) == 2
    total, _ = run_round(vectors, tamper=_alter_middle_responders_shares)
    assert torch.equal(total, sum(vectors.values()) % MODULUS)


def test_a_share_under_another_holders_index_is_left_out():
    """The first responder relabels its shares with index 2, the next holder's: two shares of one index among the
    first t ended the round, though the two other holders' shares rebuild the secret."""
    vectors = residues(4, 10, seed=3)

    def relabel(responses):
        responder = min(responses)
        for owner, share in responses[responder].items():
            responses[responder][owner] = (2).to_bytes(2, "little") + share[2:]

    total, _ = run_round(vectors, tamper=relabel)
    assert torch.equal(total, sum(vectors.values()) % MODULUS)


def test_the_search_for_good_shares_stops_when_the_rounds_spare_tries_are_spent():
    with pytest.raises(SecAggError, match="does not match its commitment"):
        run_round(residues(4, 10, seed=3), tamper=_alter_middle_responders_shares, spare_combinations=0)


@pytest.mark.parametrize("advert", ["s" * 96, list(range(96)), bytes(96), bytes(32) + bytes([1]) + bytes(63)],
                         ids=["string", "list", "zero-keys", "low-order-mask-key"])
def test_an_advertisement_no_neighbour_could_use_drops_only_its_sender(advert):
    """A string (or list) of 96 passed the server's length check, a low-order X25519 key (0 or 1) any check; each
    then failed in every neighbour's key agreement, which dropped them all: one client's bad advertisement skipped
    the round for everyone. The server now leaves that client out, and the others sum exactly."""
    from fedspec.server.secure_round import _advertisements

    vectors = residues(3, 10, seed=5)
    clients = {u: ClientSession(node=u, round=3, fraction=0.5) for u in vectors}
    replies = {u: {"key": c.advertise().to_bytes()} for u, c in clients.items()}
    replies[999] = {"key": advert}
    adverts = _advertisements(replies)
    assert set(adverts) == set(vectors)
    server = ServerSession(round=3, fraction=0.5)
    peers = server.peers(adverts)
    inbox = server.route({u: clients[u].share(peers[u]) for u in clients})
    survivors, dropped = server.unmask_request({u: clients[u].mask(vectors[u], inbox[u]) for u in inbox})
    total = server.total({u: clients[u].unmask(survivors, dropped) for u in survivors})
    assert torch.equal(total, sum(vectors.values()) % MODULUS)


@pytest.mark.parametrize("client_level", [False, True])
def test_the_privacy_report_lists_the_clipping_counts_each_client_sends_in_the_clear(tiny_cfg, client_level):
    """Under secure aggregation a client's reply carries, beside its masked vector, its own clipped-coordinate count:
    a function of that update alone, which the report's list of what the server sees must name. Under distributed
    client-level noise nothing of one update is sent in the clear (whether it was clipped stays on the client)."""
    from fedspec.privacy.disclosures import server_sees

    overrides = ["federation.secure_aggregation.enabled=true"]
    if client_level:
        overrides += ["privacy=client-dp", "federation.weighting=uniform"]
    cfg = tiny_cfg(*overrides)
    seen = " ".join(server_sees(cfg.privacy, cfg.federation, method="pissa", batch_size=32))
    if client_level:
        assert "clipped" not in seen.replace("clips its whole update", "")
    else:
        assert "`clipped_coordinates`" in seen and "a statistic of each update alone" in seen
