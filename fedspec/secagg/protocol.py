"""SecAgg+ (Bell et al. 2020; SecAgg, Bonawitz et al. 2017, when every client neighbours every other): the server
learns the sum of the clients' vectors and nothing else, even when some clients drop out mid-round.

One round, four exchanges (the server relays every message; clients never talk directly):

1. **advertise** — each client makes two X25519 key pairs (one to encrypt shares, one to agree masks) and a random
   self-mask seed ``b``, and sends the public keys and a SHA-256 commitment to ``b``.
2. **share** — the server sends each client its neighbours' public keys (a ring over the clients that advertised;
   every other client when ``neighbours`` is None). The client splits ``b`` and its mask private key into Shamir
   shares, ``t`` of its ``k`` neighbours needed to rebuild either, and sends each neighbour its pair of shares
   encrypted (AES-GCM) under their agreed key.
3. **mask** — the server forwards each client the shares addressed to it. The client (after training) sends
   ``y = x + PRG(b) + Σ_v ±PRG(s_uv) mod 2^62`` over the neighbours ``v`` whose shares it received; ``s_uv`` is the
   mask key it agrees with ``v``; the sign makes each pair's masks cancel in the sum.
4. **unmask** — the server names the clients whose ``y`` arrived (survivors) and those that shared but sent no ``y``
   (dropped). Each survivor returns, for every neighbour, the share of ``b`` (a survivor) or of the mask private key
   (a dropped client) — never both for one client, so the server can never strip a survivor's masks alone. With
   ``t`` shares per client the server removes every survivor's ``PRG(b)`` and the dropped clients' pairwise masks.

Threat model: an honest-but-curious server and clients; a client also refuses requests that would unmask a
survivor, and requests that name fewer survivors than it masked its vector for (``min_survivors``). The server
checks every reconstructed secret against the client's own commitment or public key, so a wrong share is caught,
never silently summed: a share must carry its holder's index, and when a combination of ``t`` shares fails the
check the server tries others (the earliest shares first, a few dozen per round at most), so a wrong share among
spare ones does not cost the round. Fewer than ``t`` shares for any client, or no combination that checks out: the
round cannot be summed and is skipped.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch

from .primitives import (
    KEY_BYTES,
    KeyPair,
    SecAggError,
    agree,
    check_public_key,
    combine_shares,
    commitment,
    decrypt,
    encrypt,
    mask,
    public_key_of,
    split_secret,
)
from .quantize import MODULUS_BITS

MODULUS = 1 << MODULUS_BITS
SHARE_PURPOSE = b"share-encryption"
MASK_PURPOSE = b"pairwise-mask"
_SHARE_BYTES = 2 + KEY_BYTES  # a Shamir share of a 32-byte secret: 2-byte index + two 16-byte blocks
# Combinations of shares a round may try beyond the first per secret, when a wrong share spoils one: each costs a
# Shamir combination (~0.4 s at t = 51 in pure Python), so hostile shares cannot hold the server up for long
SPARE_COMBINATIONS = 64


def threshold(neighbours: int, fraction: float) -> int:
    """Shares needed to rebuild a secret shared among ``neighbours``: more than ``fraction`` of them (fraction ≥ ½:
    a majority, so two disjoint groups can never both rebuild; a dropped client needs ``neighbours − t`` spares)."""
    return min(neighbours, int(fraction * neighbours) + 1)


def neighbourhoods(nodes: Iterable[int], neighbours: int | None) -> dict[int, list[int]]:
    """A symmetric ring graph over ``nodes``: each has the ``neighbours // 2`` nearest on either side in sorted
    order (every other node when ``neighbours`` is None or at least len(nodes) − 1)."""
    ring = sorted(set(nodes))
    n = len(ring)
    if neighbours is None or neighbours >= n - 1:
        return {u: [v for v in ring if v != u] for u in ring}
    half = max(1, neighbours // 2)
    graph = {u: set() for u in ring}
    for i, u in enumerate(ring):
        for offset in range(1, half + 1):
            graph[u].add(ring[(i + offset) % n])
            graph[u].add(ring[(i - offset) % n])
    return {u: sorted(peers) for u, peers in graph.items()}


@dataclass(frozen=True)
class Advertisement:
    share_key: bytes  # X25519 public key for share encryption
    mask_key: bytes  # X25519 public key for pairwise masks
    seed_commitment: bytes  # SHA-256 commitment to the self-mask seed

    def to_bytes(self) -> bytes:
        return self.share_key + self.mask_key + self.seed_commitment

    @classmethod
    def from_bytes(cls, blob: bytes) -> Advertisement:
        """The advertisement in ``blob``; a SecAggError for anything its neighbours could not use: not bytes (a
        string or list of the right length passed the length check, then failed in every neighbour's key
        agreement, which dropped them all from the round), the wrong length, or a key no one can agree with."""
        if not isinstance(blob, bytes) or len(blob) != 3 * KEY_BYTES:
            raise SecAggError(f"an advertisement is {3 * KEY_BYTES} bytes, got {type(blob).__name__} of length "
                              f"{len(blob) if hasattr(blob, '__len__') else '?'}")
        advertisement = cls(blob[:KEY_BYTES], blob[KEY_BYTES:2 * KEY_BYTES], blob[2 * KEY_BYTES:])
        check_public_key(advertisement.share_key)
        check_public_key(advertisement.mask_key)
        return advertisement


def _associated(round_: int, sender: int, receiver: int) -> bytes:
    return b"fedspec-secagg share" + b"".join(x.to_bytes(8, "little", signed=False) for x in (round_, sender, receiver))


def _signed_sum(terms: Iterable[tuple[int, torch.Tensor]], size: int) -> torch.Tensor:
    """Σ ±term mod 2^62. The modulus is a power of two, so a bitwise AND with 2^62 − 1 reduces any int64 (negative
    ones too, in two's complement) — far faster than ``%``; operands below 2^62 never overflow int64."""
    total = torch.zeros(size, dtype=torch.int64)
    for sign, term in terms:
        total = total.add_(term) if sign > 0 else total.sub_(term)
        total.bitwise_and_(MODULUS - 1)
    return total


@dataclass
class ClientSession:
    """A client's side of one round. Holds its secrets between the exchanges (``to_record`` / ``from_record`` keep it
    in the node's state); make a new one every round: keys and seeds are never reused."""

    node: int
    round: int
    fraction: float
    share_keys: KeyPair = field(default_factory=KeyPair.generate)
    mask_keys: KeyPair = field(default_factory=KeyPair.generate)
    seed: bytes = field(default_factory=lambda: os.urandom(KEY_BYTES))
    peers: dict[int, Advertisement] = field(default_factory=dict)
    inbox: dict[int, bytes] = field(default_factory=dict)  # sender → its encrypted shares for this client
    masked_with: tuple[int, ...] = ()
    # The secret already revealed for each neighbour: True its seed's share (a survivor), False its mask key's (a
    # dropout). The other one is never revealed after it: with both, the server could unmask that one update.
    revealed: dict[int, bool] = field(default_factory=dict)
    # The fewest survivors this client unmasks for (0: no floor). Under distributed client-level noise it is m:
    # each client adds 1/m of the noise, so a sum of fewer than m updates would carry too little of it
    min_survivors: int = 0

    def advertise(self) -> Advertisement:
        return Advertisement(self.share_keys.public, self.mask_keys.public, commitment(self.seed))

    def share(self, peers: Mapping[int, Advertisement]) -> dict[int, bytes]:
        """Encrypted share pairs (of the seed and of the mask private key) for each neighbour."""
        if self.node in peers:
            raise SecAggError(f"the server listed client {self.node} as its own neighbour")
        if not peers:
            raise SecAggError(f"client {self.node} has no neighbours: its masked vector would be its update")
        self.peers = dict(peers)
        order = sorted(self.peers)
        t = threshold(len(order), self.fraction)
        seed_shares = split_secret(self.seed, t, len(order))
        key_shares = split_secret(self.mask_keys.private, t, len(order))
        out = {}
        for peer, seed_share, key_share in zip(order, seed_shares, key_shares):
            key = agree(self.share_keys.private, self.peers[peer].share_key, SHARE_PURPOSE)
            out[peer] = encrypt(key, seed_share + key_share, _associated(self.round, self.node, peer))
        return out

    def mask(self, vector: torch.Tensor, inbox: Mapping[int, bytes]) -> torch.Tensor:
        """``vector`` (int64 residues) masked with the self-mask and a pairwise mask per neighbour that shared."""
        unknown = set(inbox) - set(self.peers)
        if unknown:
            raise SecAggError(f"client {self.node} received shares from non-neighbours {sorted(unknown)}")
        if not inbox:
            raise SecAggError(f"client {self.node} received no shares: it would mask with no one")
        if vector.dtype != torch.int64 or bool(((vector < 0) | (vector >= MODULUS)).any()):
            raise SecAggError("the vector to mask must be int64 residues in [0, 2^62)")
        self.inbox, self.masked_with = dict(inbox), tuple(sorted(inbox))
        size = vector.numel()
        terms = [(1, vector.to(torch.int64)), (1, mask(self.seed, size, MODULUS_BITS, self.round))]
        for peer in self.masked_with:
            seed = agree(self.mask_keys.private, self.peers[peer].mask_key, MASK_PURPOSE)
            terms.append((1 if self.node < peer else -1, mask(seed, size, MODULUS_BITS, self.round)))
        return _signed_sum(terms, size)

    def unmask(self, survivors: Iterable[int], dropped: Iterable[int]) -> dict[int, bytes]:
        """For each listed neighbour, the share the server needs: of its seed (a survivor) or of its mask private
        key (dropped). Refuses a request that names fewer than ``min_survivors`` survivors, a client in both lists
        or this client as dropped, and one that asks for the other secret of a client than an earlier request of
        this round did (keep the session between requests: ``to_record``)."""
        survivors, dropped = set(survivors), set(dropped)
        if len(survivors) < self.min_survivors:
            raise SecAggError(f"the server names {len(survivors)} survivors, fewer than the {self.min_survivors} "
                              f"client {self.node} masked its update for (min_survivors): refused")
        if survivors & dropped:
            raise SecAggError(f"the server asked for both secrets of clients {sorted(survivors & dropped)}: refused")
        if self.node in dropped:
            raise SecAggError(f"the server listed client {self.node} itself as dropped: refused")
        if dropped - set(self.masked_with):
            # a client that never shared with this one cannot have masked with it: nothing to remove
            dropped &= set(self.masked_with)
        out = {}
        for peer in sorted((survivors | dropped) & set(self.inbox)):
            key = agree(self.share_keys.private, self.peers[peer].share_key, SHARE_PURPOSE)
            plain = decrypt(key, self.inbox[peer], _associated(self.round, peer, self.node))
            if len(plain) != 2 * _SHARE_BYTES:
                raise SecAggError(f"client {peer}'s shares have the wrong length")
            out[peer] = plain[:_SHARE_BYTES] if peer in survivors else plain[_SHARE_BYTES:]
        switched = sorted(peer for peer in out if self.revealed.get(peer, peer in survivors) != (peer in survivors))
        if switched:  # a second unmask request that lists a survivor of the first as dropped, or the reverse
            raise SecAggError(f"the server asked for the other secret of clients {switched} after an earlier unmask "
                              "request: refused")
        self.revealed.update((peer, peer in survivors) for peer in out)
        return out

    def to_record(self) -> dict[str, bytes | str | float | list[str]]:
        """Flat values for a Flower ``ConfigRecord`` in the node's state (node ids as strings: they are uint64)."""
        record: dict = {
            "node": str(self.node), "round": str(self.round), "fraction": self.fraction,
            "share-private": self.share_keys.private, "share-public": self.share_keys.public,
            "mask-private": self.mask_keys.private, "mask-public": self.mask_keys.public, "seed": self.seed,
            "masked-with": [str(p) for p in self.masked_with], "peers": [str(p) for p in sorted(self.peers)],
            "inbox": [str(p) for p in sorted(self.inbox)],
            "revealed-seed": [str(p) for p, seed in sorted(self.revealed.items()) if seed],
            "revealed-key": [str(p) for p, seed in sorted(self.revealed.items()) if not seed],
            "min-survivors": self.min_survivors,
        }
        for peer, ad in self.peers.items():
            record[f"peer-{peer}"] = ad.to_bytes()
        for peer, ciphertext in self.inbox.items():
            record[f"inbox-{peer}"] = ciphertext
        return record

    @classmethod
    def from_record(cls, record: Mapping) -> ClientSession:
        peers = {int(peer): Advertisement.from_bytes(record[f"peer-{peer}"]) for peer in record["peers"]}
        return cls(
            node=int(record["node"]), round=int(record["round"]), fraction=float(record["fraction"]),
            share_keys=KeyPair(record["share-private"], record["share-public"]),
            mask_keys=KeyPair(record["mask-private"], record["mask-public"]), seed=record["seed"], peers=peers,
            inbox={int(p): record[f"inbox-{p}"] for p in record["inbox"]},
            masked_with=tuple(int(p) for p in record["masked-with"]),
            revealed={**{int(p): True for p in record.get("revealed-seed", [])},
                      **{int(p): False for p in record.get("revealed-key", [])}},
            min_survivors=int(record.get("min-survivors", 0)),
        )


@dataclass
class ServerSession:
    """The server's side of one round: routes keys and shares, then turns the survivors' masked vectors and their
    shares into the plain sum. Raises :class:`SecAggError` when the round cannot be summed (the caller skips it)."""

    round: int
    fraction: float
    neighbours: int | None = None
    advertised: dict[int, Advertisement] = field(default_factory=dict)
    graph: dict[int, list[int]] = field(default_factory=dict)
    shared: set[int] = field(default_factory=set)  # clients whose shares went out (U2)
    masked: dict[int, torch.Tensor] = field(default_factory=dict)  # survivors' masked vectors (U3)
    spare_combinations: int = SPARE_COMBINATIONS  # what is left of the round's spare tries (``_rebuild``)

    def peers(self, advertised: Mapping[int, Advertisement]) -> dict[int, dict[int, Advertisement]]:
        """Each advertising client's neighbours and their public keys (the message of exchange 2)."""
        if len(advertised) < 2:
            raise SecAggError(f"only {len(advertised)} client(s) advertised keys: a sum of fewer than 2 is not secret")
        self.advertised = dict(advertised)
        self.graph = neighbourhoods(self.advertised, self.neighbours)
        return {u: {v: self.advertised[v] for v in peers} for u, peers in self.graph.items()}

    def route(self, shares: Mapping[int, Mapping[int, bytes]]) -> dict[int, dict[int, bytes]]:
        """Sender → receiver → ciphertext in; receiver → sender → ciphertext out (exchange 3's inbox). A sender
        must address exactly its neighbours; one that does not is left out (as dropped before sharing)."""
        self.shared = {u for u, out in shares.items() if u in self.graph and set(out) == set(self.graph[u])}
        inbox: dict[int, dict[int, bytes]] = {u: {} for u in self.shared}
        for sender in self.shared:
            for receiver, ciphertext in shares[sender].items():
                if receiver in self.shared:
                    inbox[receiver][sender] = ciphertext
        return inbox

    def unmask_request(self, masked: Mapping[int, torch.Tensor]) -> tuple[list[int], list[int]]:
        """Record the masked vectors; (survivors, dropped) to send every survivor in exchange 4."""
        self.masked = {u: y for u, y in masked.items() if u in self.shared}
        sizes = {y.numel() for y in self.masked.values()}
        if len(sizes) > 1:
            raise SecAggError(f"masked vectors of different lengths {sorted(sizes)}: the clients disagree on the update")
        if len(self.masked) < 2:
            raise SecAggError(f"only {len(self.masked)} masked vector(s) arrived: a sum of fewer than 2 is not secret")
        return sorted(self.masked), sorted(self.shared - set(self.masked))

    def total(self, responses: Mapping[int, Mapping[int, bytes]]) -> torch.Tensor:
        """The sum of the survivors' vectors (int64 residues) from their unmask responses."""
        survivors = set(self.masked)
        dropped = self.shared - survivors
        holders: dict[int, list[bytes]] = {u: [] for u in self.shared}
        for responder, shares in responses.items():
            if responder not in survivors:
                continue
            for owner, share in shares.items():
                if owner in holders and self._is_share_of(owner, responder, share):
                    holders[owner].append(share)
        size = next(iter(self.masked.values())).numel()
        terms = [(1, y) for y in self.masked.values()]
        for owner in sorted(survivors):
            seed = self._rebuild(owner, holders[owner], check=lambda s, o=owner: commitment(s) == self.advertised[o].seed_commitment)
            terms.append((-1, mask(seed, size, MODULUS_BITS, self.round)))
        for owner in sorted(dropped):
            private = self._rebuild(owner, holders[owner], check=lambda s, o=owner: public_key_of(s) == self.advertised[o].mask_key)
            for peer in self.graph[owner]:
                if peer in survivors:  # the survivor added sign(peer, owner)·PRG(s): take it out
                    seed = agree(private, self.advertised[peer].mask_key, MASK_PURPOSE)
                    terms.append((-1 if peer < owner else 1, mask(seed, size, MODULUS_BITS, self.round)))
        return _signed_sum(terms, size)

    def _is_share_of(self, owner: int, responder: int, share: bytes) -> bool:
        """Whether ``share`` can be the one ``owner`` gave ``responder``: a neighbour's, of the right length, with
        the index of the responder's place among the owner's neighbours (``split_secret`` numbers them in sorted
        order, as ``graph`` lists them). A share under another index is left out, so no two carry the same."""
        neighbours = self.graph[owner]
        return (responder in neighbours and len(share) == _SHARE_BYTES
                and int.from_bytes(share[:2], "little") == neighbours.index(responder) + 1)

    def _rebuild(self, owner: int, shares: list[bytes], check) -> bytes:
        t = threshold(len(self.graph[owner]), self.fraction)
        if len(shares) < t:
            raise SecAggError(f"client {owner}'s secret needs {t} shares, {len(shares)} arrived: too many dropouts")
        # A wrong share spoils every combination that holds it, and only the check tells: the first t shares, then
        # other combinations while the round's spare tries last (any t good shares give the secret)
        for tried, subset in enumerate(_earliest_first(len(shares), t)):
            if tried:
                if self.spare_combinations == 0:
                    break
                self.spare_combinations -= 1
            secret = combine_shares([shares[i] for i in subset])
            if check(secret):
                return secret
        raise SecAggError(f"client {owner}'s secret does not match its commitment: a share was altered")


def _earliest_first(count: int, size: int) -> Iterator[tuple[int, ...]]:
    """Every ``size``-subset of ``range(count)``, by its largest member: those within the first ``size + j``
    positions come before any that reaches further, so one wrong share costs at most ``size`` more tries
    (consecutive windows would never skip a wrong share in the middle)."""
    for last in range(size - 1, count):
        for head in itertools.combinations(range(last), size - 1):
            yield (*head, last)
