"""Secure aggregation: the server learns only the sum of the clients' updates (SecAgg+, Bell et al. 2020).

``primitives`` wraps the vetted libraries (X25519, HKDF, AES-GCM, ChaCha20 from ``cryptography``; Shamir from
``pycryptodome``); ``quantize`` turns a weighted float update into integers for the masked sum and back;
``protocol`` runs one round's four exchanges on each side, without Flower (the federation carries the messages).
"""

from .primitives import SecAggError
from .protocol import Advertisement, ClientSession, ServerSession, neighbourhoods, threshold
from .quantize import MODULUS_BITS, Quantizer

__all__ = [
    "Advertisement",
    "ClientSession",
    "MODULUS_BITS",
    "Quantizer",
    "SecAggError",
    "ServerSession",
    "neighbourhoods",
    "threshold",
]
