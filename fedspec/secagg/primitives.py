"""The cryptographic building blocks of secure aggregation, each a thin call into a vetted library.

Nothing here is home-made cryptography: key agreement is X25519 and key derivation HKDF-SHA256 (``cryptography``),
share encryption is AES-256-GCM (``cryptography``), the mask generator is the ChaCha20 stream cipher's keystream
(``cryptography``), secret sharing is Shamir's scheme over GF(2^128) (``pycryptodome``, the implementation Flower's
own SecAgg+ uses), and commitments are SHA-256. This module only fixes how they are combined: which bytes go in,
with which context string, so that no key is used for two purposes.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import FedspecError

KEY_BYTES = 32
NONCE_BYTES = 12  # AES-GCM
SHAMIR_BLOCK = 16  # pycryptodome's Shamir shares 16-byte secrets
_RAW = serialization.Encoding.Raw


class SecAggError(FedspecError):
    """Secure aggregation cannot go on: a message does not decrypt, a secret does not reconstruct, too few clients."""


@dataclass(frozen=True)
class KeyPair:
    """An X25519 key pair as raw bytes (32 each): what a client keeps in its state between the protocol's steps."""

    private: bytes
    public: bytes

    @classmethod
    def generate(cls) -> KeyPair:
        key = X25519PrivateKey.generate()
        return cls(key.private_bytes_raw(), key.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw))


def public_key_of(private: bytes) -> bytes:
    """The public key of a raw private key: checks a reconstructed secret key against the one advertised."""
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)


def check_public_key(public: bytes) -> None:
    """Refuse (SecAggError) what no peer could agree a key with: not 32 bytes, or a low-order point, whose shared
    secret is all zeros whatever the private key (``cryptography`` refuses the exchange). Checked against a
    throwaway key, so a client that advertises one is left out before its neighbours' key agreement fails."""
    if not isinstance(public, bytes) or len(public) != KEY_BYTES:
        raise SecAggError(f"a public key must be {KEY_BYTES} bytes")
    agree(X25519PrivateKey.generate().private_bytes_raw(), public, b"check")


def agree(private: bytes, peer_public: bytes, purpose: bytes) -> bytes:
    """A 32-byte key both ends derive alone: X25519(private, peer) through HKDF-SHA256, bound to ``purpose``
    (one key for share encryption, another for masks: never the same bytes for two uses)."""
    try:
        secret = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as err:  # a malformed or low-order public key
        raise SecAggError(f"key agreement failed: {err}") from None
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=b"fedspec-secagg " + purpose).derive(secret)


def encrypt(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """AES-256-GCM with a fresh random nonce, prepended. ``associated`` (sender, receiver, round) is authenticated:
    a ciphertext routed to the wrong client or replayed in another round does not decrypt."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated)


def decrypt(key: bytes, ciphertext: bytes, associated: bytes) -> bytes:
    try:
        return AESGCM(key).decrypt(ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:], associated)
    except (InvalidTag, ValueError):
        raise SecAggError("a share does not decrypt: it was altered, misrouted or replayed") from None


def mask(seed: bytes, size: int, modulus_bits: int, round_: int) -> torch.Tensor:
    """``size`` integers uniform in [0, 2^modulus_bits) from the ChaCha20 keystream of ``seed`` (a 32-byte key).

    The nonce carries the round, so a seed reused by mistake in another round still yields fresh masks."""
    if len(seed) != KEY_BYTES:
        raise SecAggError(f"a mask seed must be {KEY_BYTES} bytes, not {len(seed)}")
    # The 16-byte value starts with the block counter (4 or 8 bytes, by convention): zero it, the round goes last
    nonce = bytes(8) + round_.to_bytes(8, "little")
    stream = Cipher(algorithms.ChaCha20(seed, nonce), mode=None).encryptor().update(bytes(8 * size))
    words = np.frombuffer(stream, dtype="<u8") & np.uint64((1 << modulus_bits) - 1)
    return torch.from_numpy(words.astype(np.int64))


def commitment(secret: bytes) -> bytes:
    """SHA-256 of a 32-byte random secret: binds a client to its self-mask seed before anyone holds shares of it,
    so a wrong share is caught when the seed is reconstructed."""
    return hashlib.sha256(b"fedspec-secagg self-mask " + secret).digest()


def split_secret(secret: bytes, threshold: int, count: int) -> list[bytes]:
    """Shamir shares of a secret of whole 16-byte blocks: any ``threshold`` of the ``count`` shares give it back,
    fewer reveal nothing. Share ``i`` (1-based, in its first byte pair) goes to the ``i``-th receiver."""
    if len(secret) % SHAMIR_BLOCK:
        raise SecAggError(f"a shared secret must be whole {SHAMIR_BLOCK}-byte blocks, not {len(secret)} bytes")
    shares = [bytearray(index.to_bytes(2, "little")) for index in range(1, count + 1)]
    for start in range(0, len(secret), SHAMIR_BLOCK):
        for index, block in Shamir.split(threshold, count, secret[start:start + SHAMIR_BLOCK], ssss=False):
            shares[index - 1] += block
    return [bytes(share) for share in shares]


def combine_shares(shares: list[bytes]) -> bytes:
    """The secret from ``threshold`` shares (more are consistent too; fewer give a wrong secret, not an error —
    callers check it against a commitment or a public key)."""
    blocks = (len(shares[0]) - 2) // SHAMIR_BLOCK
    if any(len(share) != 2 + blocks * SHAMIR_BLOCK for share in shares):
        raise SecAggError("shares of one secret differ in length")
    indexed = [(int.from_bytes(share[:2], "little"), share[2:]) for share in shares]
    if len({index for index, _ in indexed}) != len(indexed):
        raise SecAggError("two shares of one secret carry the same index")
    return b"".join(
        Shamir.combine([(index, body[b * SHAMIR_BLOCK:(b + 1) * SHAMIR_BLOCK]) for index, body in indexed], ssss=False)
        for b in range(blocks)
    )
