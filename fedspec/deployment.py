"""Credentials for Flower's deployment runtime: TLS for the SuperLink, one key pair per SuperNode.

``create_credentials`` writes, into one folder:

- ``ca.crt`` / ``ca.key``: a self-signed certificate authority. Clients (``flower-supernode
  --root-certificates``, the ``root-certificates`` of a ``flwr`` connection) trust the SuperLink through
  ``ca.crt``. ``ca.key`` signs server certificates only: keep it offline, it is needed again only to renew
  the server certificate (``renew_server_certificate``, ``fedspec credentials DIR --renew-server``). The CA is
  valid for ``ca_days`` (default 10 years), the server certificate for ``days`` (default 365): a renewal before
  the server certificate expires keeps every node's ``ca.crt`` and keys.
- ``server.pem`` / ``server.key``: the SuperLink's certificate, signed by the CA, valid for ``localhost``,
  ``127.0.0.1``, ``::1`` and every host name or IP address given (the address SuperNodes dial must be among
  them, or TLS verification fails).
- ``supernodes/node-<i>`` / ``node-<i>.pub``: one ECDSA P-384 key pair per SuperNode, in OpenSSH format —
  what ``flower-supernode --auth-supernode-private-key`` loads and ``flwr supernode register`` reads.

Private keys are created with mode 0600, and nothing is ever overwritten: credentials that exist are
refused as a whole before any file is written. Plain ``cryptography``; no Flower import.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import ConfigError

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
CURVE = ec.SECP384R1  # the curve Flower's SuperNode-authentication example uses; also signs the certificates
PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644
FOLDER_MODE = 0o700
CA_DAYS = 3650  # the CA outlives many server certificates: renewing one keeps every node's ca.crt


@dataclass(frozen=True)
class Credentials:
    """Where ``create_credentials`` puts each file, for a folder and a number of SuperNodes."""

    root: Path
    nodes: int

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    def node_key(self, index: int) -> Path:
        return self.root / "supernodes" / f"node-{index}"

    def node_public_key(self, index: int) -> Path:
        return self.root / "supernodes" / f"node-{index}.pub"

    def files(self) -> list[Path]:
        nodes = [p for i in range(self.nodes) for p in (self.node_key(i), self.node_public_key(i))]
        return [self.ca_cert, self.ca_key, self.server_cert, self.server_key, *nodes]


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _check_host(host: str) -> str:
    host = host.strip()
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*", host):
        raise ConfigError(
            f"--host {host!r} is not a host name or IP address (e.g. superlink.example.org, 10.0.0.5)"
        )
    return host


def _certificate(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    signing_key: ec.EllipticCurvePrivateKey,
    days: int,
    *,
    ca: bool,
    hosts: list[str] | None = None,
    issuer_key: ec.EllipticCurvePrivateKey | None = None,
) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate small clock skew between machines
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
    else:
        builder = (
            builder.add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts or []]), critical=False)
            .add_extension(
                x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False, content_commitment=False,
                              key_encipherment=False, data_encipherment=False, key_agreement=True,
                              encipher_only=False, decipher_only=False),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),  # type: ignore[union-attr]
                critical=False,
            )
        )
    return builder.sign(signing_key, hashes.SHA384())


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _private_folder(folder: Path) -> None:
    """A folder only its owner can enter: created so (with every folder above it that fedspec creates) whatever
    the umask, refused if it already exists writable by others (anyone could then swap a key or a certificate
    in it)."""
    for created in reversed([f for f in (folder, *folder.parents) if not f.exists()]):
        created.mkdir()
        os.chmod(created, FOLDER_MODE)
    if stat.S_IMODE(folder.stat().st_mode) & 0o022:
        raise ConfigError(f"{folder} is writable by other users; keep credentials in a folder only you can write "
                          f"to (chmod go-w {folder})")


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` from the start (a private key is never readable by others, not even
    briefly); fails if it exists."""
    _private_folder(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)  # the umask may have removed bits from the mode asked for


def create_credentials(
    out_dir: str | os.PathLike[str], nodes: int, hosts: list[str] | tuple[str, ...] = (), days: int = 365,
    ca_days: int = CA_DAYS,
) -> Credentials:
    """Write a CA, a SuperLink certificate for ``localhost``/loopback plus ``hosts``, and ``nodes`` SuperNode
    key pairs into ``out_dir``. Refuses (before writing anything) if any of these files exists."""
    if nodes < 0:
        raise ConfigError(f"--nodes {nodes} is negative; give the number of SuperNodes (0 or more)")
    if not 1 <= days <= ca_days:
        raise ConfigError(f"--days {days} must be at least 1 and at most the CA's {ca_days} days")
    creds = Credentials(Path(out_dir).expanduser().resolve(), nodes)
    existing = [p for p in creds.files() if p.exists()]
    if existing:
        raise ConfigError(
            f"{existing[0]} already exists; credentials are never overwritten: choose a new folder "
            "(or delete the old credentials yourself)"
        )
    given = [_check_host(h) for h in hosts]
    all_hosts = list(dict.fromkeys([*DEFAULT_HOSTS, *given]))

    ca_key = ec.generate_private_key(CURVE())
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedspec"),
                         x509.NameAttribute(NameOID.COMMON_NAME, "fedspec federation CA")])
    ca_cert = _certificate(ca_name, ca_name, ca_key.public_key(), ca_key, ca_days, ca=True)
    server_key, server_cert = _server_certificate(ca_name, ca_key, all_hosts, days)

    _private_folder(creds.root)
    _write_new(creds.ca_key, _pem_private(ca_key), PRIVATE_MODE)
    _write_new(creds.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE)
    _write_new(creds.server_key, _pem_private(server_key), PRIVATE_MODE)
    _write_new(creds.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE)
    for i in range(nodes):
        key = ec.generate_private_key(CURVE())
        private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                    serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        _write_new(creds.node_key(i), private, PRIVATE_MODE)
        _write_new(creds.node_public_key(i), public + f" fedspec-node-{i}\n".encode(), PUBLIC_MODE)
    return creds


def _server_certificate(ca_name: x509.Name, ca_key: ec.EllipticCurvePrivateKey, hosts: list[str], days: int,
                        ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new SuperLink key and its certificate for ``hosts`` (the first one not on loopback names it)."""
    key = ec.generate_private_key(CURVE())
    named = [h for h in hosts if h not in DEFAULT_HOSTS]
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedspec"),
                      x509.NameAttribute(NameOID.COMMON_NAME, named[0] if named else "localhost")])
    return key, _certificate(name, ca_name, key.public_key(), ca_key, days, ca=False, hosts=hosts, issuer_key=ca_key)


def _read(path: Path, load, what: str):
    """``load(path's bytes)``; a file that is not ``what`` (a passphrase-protected key, a damaged or foreign file)
    is one line naming it, not a traceback."""
    try:
        return load(path.read_bytes())
    except (TypeError, ValueError, UnsupportedAlgorithm) as error:
        hint = ("; decrypt it first (openssl pkey -in ca.key -out ca.key.plain, then move it in place, mode 0600)"
                if "encrypted" in str(error) else "")
        raise ConfigError(f"{path} is not {what} that --renew-server can read ({error}){hint}") from None


def renew_server_certificate(folder: str | os.PathLike[str], hosts: list[str] | tuple[str, ...] = (),
                             days: int = 365) -> Credentials:
    """A new SuperLink key and certificate, signed by the folder's CA (``ca.key``), for the hosts of the old
    certificate plus ``hosts``: every node keeps its ``ca.crt`` and keys. The old pair is kept as
    ``server.pem.old`` / ``server.key.old``. Refused when the CA would expire before the new certificate."""
    creds = Credentials(Path(folder).expanduser().resolve(), 0)
    missing = [p for p in (creds.ca_cert, creds.ca_key, creds.server_cert) if not p.is_file()]
    if missing:
        raise ConfigError(f"{missing[0]} does not exist; --renew-server needs the folder `fedspec credentials` wrote")
    if days < 1:
        raise ConfigError(f"--days {days} must be at least 1")
    ca_cert = _read(creds.ca_cert, x509.load_pem_x509_certificate, "a PEM certificate")
    ca_key = _read(creds.ca_key, lambda data: serialization.load_pem_private_key(data, password=None),
                   "an unencrypted PEM private key")
    if ca_cert.public_key().public_numbers() != ca_key.public_key().public_numbers():
        raise ConfigError(f"{creds.ca_key} is not the key of {creds.ca_cert}")
    expires = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=days)
    if ca_cert.not_valid_after_utc < expires:
        raise ConfigError(f"the CA in {creds.ca_cert} expires on {ca_cert.not_valid_after_utc:%Y-%m-%d}, before a "
                          f"{days}-day certificate would; lower --days, or create new credentials (every node then "
                          "needs the new ca.crt)")
    old = _read(creds.server_cert, x509.load_pem_x509_certificate, "a PEM certificate")
    old_hosts = [str(name.value) for name in old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value]
    all_hosts = list(dict.fromkeys([*DEFAULT_HOSTS, *old_hosts, *(_check_host(h) for h in hosts)]))
    key, cert = _server_certificate(ca_cert.subject, ca_key, all_hosts, days)
    _private_folder(creds.root)  # refused before the old pair moves aside, never after: the SuperLink keeps a pair
    for path in (creds.server_cert, creds.server_key):
        if path.exists():
            os.replace(path, path.with_name(path.name + ".old"))
    _write_new(creds.server_key, _pem_private(key), PRIVATE_MODE)
    _write_new(creds.server_cert, cert.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE)
    return creds
