"""Flower's deployment runtime: credentials (fast) and a real SuperLink + SuperNodes run over TLS with
SuperNode authentication (slow).

The slow test starts the same processes a user starts on separate machines (docs/deployment.md), each with
its own FLWR_HOME, on free loopback ports: `flower-superlink` with TLS and --enable-supernode-auth, the node
keys registered with `flwr supernode register`, two authenticated `flower-supernode`s (one on its own data
file), one SuperNode with an unregistered key, and `flwr run`.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from fedspec.cli import main as cli_main
from fedspec.deployment import create_credentials, renew_server_certificate
from fedspec.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


# --- credentials --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def creds(tmp_path_factory):
    return create_credentials(tmp_path_factory.mktemp("creds") / "fed", nodes=3,
                              hosts=["superlink.example.org", "10.0.0.5"])


def _load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.mark.parametrize("name", [
    x509.DNSName("localhost"),
    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    x509.IPAddress(ipaddress.ip_address("::1")),
    x509.DNSName("superlink.example.org"),
    x509.IPAddress(ipaddress.ip_address("10.0.0.5")),
])
def test_server_certificate_chains_to_the_ca_for_every_host(creds, name):
    verifier = PolicyBuilder().store(Store([_load_cert(creds.ca_cert)])).build_server_verifier(name)
    chain = verifier.verify(_load_cert(creds.server_cert), [])
    assert [c.subject for c in chain] == [_load_cert(creds.server_cert).subject, _load_cert(creds.ca_cert).subject]


def test_server_certificate_is_refused_for_a_host_it_does_not_name_and_by_another_ca(creds, tmp_path):
    store = Store([_load_cert(creds.ca_cert)])
    with pytest.raises(VerificationError, match="subjectAltName"):
        PolicyBuilder().store(store).build_server_verifier(x509.DNSName("evil.example.org")).verify(
            _load_cert(creds.server_cert), [])
    other = create_credentials(tmp_path / "other", nodes=0)
    with pytest.raises(VerificationError):
        PolicyBuilder().store(Store([_load_cert(other.ca_cert)])).build_server_verifier(
            x509.DNSName("localhost")).verify(_load_cert(creds.server_cert), [])


def test_a_renewed_server_certificate_chains_to_the_same_ca_for_the_old_and_new_hosts(tmp_path, capsys):
    """The CA outlives the server certificate (10 years against 365 days); --renew-server signs a new one with
    ca.key, so every node keeps its ca.crt. It keeps the old certificate's hosts, adds new ones, keeps the old
    pair as *.old, and refuses a certificate that would outlive the CA."""
    creds = create_credentials(tmp_path / "creds", nodes=1, hosts=["superlink.example.org"], days=30)
    ca = _load_cert(creds.ca_cert)
    assert ca.not_valid_after_utc - ca.not_valid_before_utc > datetime.timedelta(days=3000)
    old = creds.server_cert.read_bytes()
    node_key = creds.node_key(0).read_bytes()
    assert cli_main(["credentials", str(creds.root), "--renew-server", "--host", "10.0.0.9"]) == 0
    assert "the nodes keep their ca.crt" in capsys.readouterr().out
    renewed = _load_cert(creds.server_cert)
    assert creds.server_cert.read_bytes() != old and (creds.root / "server.pem.old").read_bytes() == old
    assert creds.ca_cert.read_bytes() == ca.public_bytes(serialization.Encoding.PEM)
    assert creds.node_key(0).read_bytes() == node_key
    for name in (x509.DNSName("superlink.example.org"), x509.IPAddress(ipaddress.ip_address("10.0.0.9"))):
        verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(name)
        assert verifier.verify(renewed, [])[0] == renewed
    key = serialization.load_pem_private_key(creds.server_key.read_bytes(), password=None)
    assert key.public_key() == renewed.public_key() and stat.S_IMODE(creds.server_key.stat().st_mode) == 0o600
    with pytest.raises(ConfigError, match="expires on .* before a 5000-day certificate would"):
        renew_server_certificate(creds.root, days=5000)


def test_a_renewal_refuses_unreadable_files_in_one_line_and_keeps_the_old_pair(tmp_path, capsys):
    """A passphrase-protected ca.key (the docs say: keep it offline), or a damaged certificate, made --renew-server
    end in a traceback; --nodes was silently ignored. Each is one line now, and the server pair stays in place."""
    creds = create_credentials(tmp_path / "creds", nodes=1)
    server, ca_cert = creds.server_cert.read_bytes(), creds.ca_cert.read_bytes()
    ca_key = serialization.load_pem_private_key(creds.ca_key.read_bytes(), password=None)
    creds.ca_key.write_bytes(ca_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.BestAvailableEncryption(b"passphrase")))
    assert cli_main(["credentials", str(creds.root), "--renew-server"]) == 2
    err = capsys.readouterr().err
    assert "ca.key is not an unencrypted PEM private key" in err and "decrypt it first" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    creds.ca_key.write_bytes(ca_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    creds.ca_cert.write_bytes(b"not a certificate")
    with pytest.raises(ConfigError, match="ca.crt is not a PEM certificate"):
        renew_server_certificate(creds.root)
    assert cli_main(["credentials", str(creds.root), "--renew-server", "--nodes", "3"]) == 2
    assert "--nodes does not go with --renew-server" in capsys.readouterr().err
    creds.ca_cert.write_bytes(ca_cert)
    os.chmod(creds.root, 0o770)  # a folder others may write to: refused before the old pair is moved aside
    with pytest.raises(ConfigError, match="writable by other users"):
        renew_server_certificate(creds.root)
    assert creds.server_key.exists()
    assert creds.server_cert.read_bytes() == server and not (creds.root / "server.pem.old").exists()


def test_server_key_matches_its_certificate_and_the_ca_is_a_ca(creds):
    key = serialization.load_pem_private_key(creds.server_key.read_bytes(), password=None)
    assert key.public_key() == _load_cert(creds.server_cert).public_key()
    basic = _load_cert(creds.ca_cert).extensions.get_extension_for_class(x509.BasicConstraints).value
    assert basic.ca
    assert not _load_cert(creds.server_cert).extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_supernode_keys_load_the_way_flower_loads_them(creds):
    """flower-supernode: load_ssh_private_key → EC key; flwr supernode register: load_ssh_public_key → EC
    key on a NIST curve. Every node has its own key, and the .pub file belongs to the private key."""
    publics = []
    for i in range(creds.nodes):
        private = serialization.load_ssh_private_key(creds.node_key(i).read_bytes(), password=None)
        public = serialization.load_ssh_public_key(creds.node_public_key(i).read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(public, ec.EllipticCurvePublicKey)
        assert public.curve.name == "secp384r1"
        assert private.public_key() == public
        publics.append(public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    assert len(set(publics)) == creds.nodes


def test_private_keys_are_readable_by_their_owner_only(creds):
    private = [creds.ca_key, creds.server_key, *(creds.node_key(i) for i in range(creds.nodes))]
    for path in private:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for path in [creds.ca_cert, creds.server_cert, creds.node_public_key(0)]:
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0o044, path


def test_existing_credentials_are_never_overwritten(tmp_path):
    first = create_credentials(tmp_path / "fed", nodes=1)
    before = {p: p.read_bytes() for p in first.files()}
    with pytest.raises(ConfigError, match="already exists"):
        create_credentials(tmp_path / "fed", nodes=2)  # even one that would only add a node
    assert {p: p.read_bytes() for p in first.files()} == before
    assert not (tmp_path / "fed" / "supernodes" / "node-1").exists()


def test_cli_writes_credentials_and_refuses_bad_input_in_one_line(tmp_path, capsys):
    assert cli_main(["credentials", str(tmp_path / "ok"), "--nodes", "2", "--host", "fed.example.org"]) == 0
    assert (tmp_path / "ok" / "supernodes" / "node-1.pub").is_file()
    assert cli_main(["credentials", str(tmp_path / "ok"), "--nodes", "2"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli_main(["credentials", str(tmp_path / "bad"), "--nodes", "1", "--host", "no such host"]) == 2
    err = capsys.readouterr().err
    assert "--host" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()
    assert cli_main(["credentials", str(tmp_path / "none")]) == 2
    assert "--nodes N is required" in capsys.readouterr().err
    assert cli_main(["credentials", str(tmp_path / "none"), "--renew-server"]) == 2
    assert "ca.crt does not exist; --renew-server needs the folder" in capsys.readouterr().err


def test_app_bundle_carries_no_code_that_could_shadow_the_installed_package(tmp_path):
    """`flwr run` ships a FAB that the SuperLink and SuperNodes put first on sys.path. A bare `fedspec/` folder
    in it would hide the installed `fedspec.server` / `fedspec.client` (mapped from server/, client/)."""
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr")}
    app = tmp_path / "app"
    shutil.copytree(ROOT, app, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "__pycache__", "*.fab"))
    subprocess.run([str(BIN / "flwr"), "build", "--app", str(app)], cwd=tmp_path, env=env, check=True,
                   capture_output=True)
    (fab,) = tmp_path.glob("*.fab")
    names = zipfile.ZipFile(fab).namelist()
    assert "pyproject.toml" in names
    assert not [n for n in names if n.endswith(".py")], names


# --- the deployment runtime, for real -----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], check=True, capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        child, parent = map(int, line.split())
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class Processes:
    """Every process the test starts, each in its own session; on exit the whole tree of each one is ended
    (SuperLink and SuperNodes spawn SuperExec, which spawns the apps, some in sessions of their own)."""

    def __init__(self, logs: Path, env: dict[str, str]) -> None:
        self.logs, self.env, self.started = logs, env, []

    def start(self, name: str, args: list[str], flwr_home: Path) -> subprocess.Popen:
        flwr_home.mkdir(parents=True, exist_ok=True)
        log = (self.logs / f"{name}.log").open("w")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**self.env, "FLWR_HOME": str(flwr_home)}, cwd=flwr_home)
        self.started.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text()

    def stop_all(self) -> None:
        tree = [pid for proc in self.started for pid in (proc.pid, *_descendants(proc.pid))]
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            for pid in tree:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            for proc in self.started:
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            tree = [pid for pid in tree if _alive(pid)]
            if not tree:
                return


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child is dead, it only waits to be reaped
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


def _flwr(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "flwr"), *args], check=False, env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def _register_when_up(public_key: Path, env: dict[str, str], timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while True:
        done = _flwr(["supernode", "register", str(public_key), "fedlink", "--format", "json"], env, 60)
        try:  # with --format json a failure (e.g. the SuperLink is still starting) also exits 0
            return int(json.loads(done.stdout)["node-id"])
        except (ValueError, KeyError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"could not register {public_key}: {done.stdout}{done.stderr}")
        time.sleep(1)


def _runtime_env() -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("FLWR_")},
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # SuperLink/SuperNode spawn flower-superexec
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def _cli_env(tmp_path: Path, link_port: int, creds, env: dict[str, str]) -> dict[str, str]:
    """The flwr CLI's connection "fedlink" to the test's SuperLink, over TLS."""
    cli_home = tmp_path / "cli-flwr"
    cli_home.mkdir()
    (cli_home / "config.toml").write_text(
        '[superlink]\ndefault = "fedlink"\n\n'
        f'[superlink.fedlink]\naddress = "127.0.0.1:{link_port}"\nroot-certificates = "{creds.ca_cert}"\n'
    )
    return {**env, "FLWR_HOME": str(cli_home)}


def _labelled_file(path: Path, seed: int, count: int) -> None:
    """Labelled news-topic records (fedspec's generator, one seed per owner), as a JSONL file with string
    labels: what a user's own data looks like."""
    from fedspec.builders import build_task
    from fedspec.config import compose_config

    cfg = compose_config(["data.num_examples=400", "data.eval_examples=64", f"run.seed={seed}"])
    examples = build_task(cfg.data, cfg.run.seed).train
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for text, label in list(zip(examples.texts, examples.labels))[:count]:
            f.write(json.dumps({"text": text, "label": examples.label_names[label]}) + "\n")


NEEDS_CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["plain", "secure-aggregation", "warm", "warm-no-launcher",
                                  pytest.param("warm-gpu-node", marks=NEEDS_CUDA)])
def test_real_superlink_and_supernodes_with_tls_and_node_auth(tmp_path, mode):
    secure, warm, launcher = mode == "secure-aggregation", mode.startswith("warm"), mode != "warm-no-launcher"
    gpu_node = mode == "warm-gpu-node"  # an edge fleet: node 0 trains on its GPU, node 1 on its CPU
    started = time.monotonic()
    creds = create_credentials(tmp_path / "creds", nodes=3)
    link_port, node_ports = _free_port(), [_free_port() for _ in range(3)]
    env = _runtime_env()
    cli_env = _cli_env(tmp_path, link_port, creds, env)
    # The server's task files sit in the SuperLink's working folder, named by relative paths that mean
    # nothing on the SuperNodes (other working folders): a node that read them would fail. Each node trains
    # on its own file only.
    link_home = tmp_path / "superlink-home"
    _labelled_file(link_home / "task" / "train.jsonl", seed=0, count=200)
    _labelled_file(link_home / "task" / "eval.jsonl", seed=1, count=64)
    own_data = [tmp_path / f"node-{i}-data.jsonl" for i in range(2)]
    sizes = [40, 56]
    for i, (path, size) in enumerate(zip(own_data, sizes)):
        _labelled_file(path, seed=10 + i, count=size)
    overrides = ["model=tiny-bert", "federation.clients=2", "federation.rounds=2", "federation.round_timeout=240",
                 "data.source=file", "data.path=task/train.jsonl", "data.eval_path=task/eval.jsonl",
                 "data.min_client_examples=8", "train.local_steps=2", "train.batch_size=16", "run.name=deployed",
                 f"run.output_dir={tmp_path / 'runs'}", "run.progress=false"]
    if secure:  # SecAgg+'s exchanges need the node's state (its keys) to persist between messages; client-level DP
        # under it: the nodes add the noise (distributed Skellam noise)
        overrides += ["federation.secure_aggregation.enabled=true", "privacy=client-dp", "federation.weighting=uniform"]

    procs = Processes(tmp_path, env)
    try:
        if warm:  # fedspec's own launcher: the same SuperLink, with its safe defaults
            link = procs.start("superlink", [
                str(BIN / "fedspec"), "superlink", "--credentials", str(creds.root), "--host", "127.0.0.1",
                "--port", str(link_port), "--state-dir", str(tmp_path / "superlink-state"),
            ], link_home)
        else:
            link = procs.start("superlink", [
                str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(creds.ca_cert),
                "--ssl-certfile", str(creds.server_cert), "--ssl-keyfile", str(creds.server_key),
                "--enable-supernode-auth", "--host", "127.0.0.1", "--port", str(link_port),
                "--disable-runtime-dependency-installation",
            ], link_home)
        registered = [_register_when_up(creds.node_public_key(i), cli_env) for i in range(2)]
        listed = _flwr(["supernode", "list", "fedlink", "--format", "json"], cli_env, 60)
        assert listed.returncode == 0 and all(str(n) in listed.stdout for n in registered), listed.stdout

        def supernode(i: int, node_config: str, *extra: str) -> subprocess.Popen:
            return procs.start(f"supernode-{i}", [
                str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{link_port}",
                "--root-certificates", str(creds.ca_cert), "--auth-supernode-private-key", str(creds.node_key(i)),
                "--host", "127.0.0.1", "--port", str(node_ports[i]), "--node-config", node_config, *extra,
            ], tmp_path / f"supernode-{i}-home")

        # node-2's key was never registered: the SuperLink must refuse it.
        intruder = supernode(2, "partition-id=0", "--max-retries", "1", "--max-wait-time", "30")
        states = [tmp_path / f"node-{i}-state" for i in range(2)]
        for i in range(2):
            if warm:  # `fedspec node`: the warm worker first, then the SuperNode pointed at its socket
                procs.start(f"node-{i}", [
                    str(BIN / "fedspec"), "node", "--superlink", f"127.0.0.1:{link_port}", "--id", str(i),
                    "--ca", str(creds.ca_cert), "--key", str(creds.node_key(i)), "--data-path", str(own_data[i]),
                    "--num-partitions", "2", "--state-dir", str(states[i]), "--port", str(node_ports[i]),
                    *([] if launcher else ["--no-launcher"]), *(["--device", ("cuda", "cpu")[i]] if gpu_node else []),
                ], tmp_path / f"supernode-{i}-home")
            else:
                supernode(i, f'partition-id={i} num-partitions=2 state-dir="{states[i]}" data-path="{own_data[i]}"')

        run_started = time.monotonic()
        ran = _flwr(["run", str(ROOT), "fedlink", "--stream",
                     "--run-config", f'overrides="{" ".join(overrides)}"'], cli_env, timeout=480)
        run_seconds = time.monotonic() - run_started
        assert ran.returncode == 0, ran.stdout + ran.stderr
        assert f"fedspec: run folder {tmp_path / 'runs' / 'deployed'}" in ran.stdout  # the user learns where

        assert intruder.wait(timeout=60) != 0
        assert "Failed to activate SuperNode" in procs.log("supernode-2")
        assert "No SuperNode found with the given public key" in procs.log("superlink")
        assert link.poll() is None, "the SuperLink died"
        runs = _flwr(["list", "fedlink", "--format", "json"], cli_env, 60)
        assert [r["status"] for r in json.loads(runs.stdout)["runs"]] == ["finished:completed"], runs.stdout
    finally:
        procs.stop_all()
    leftovers = [p.pid for p in procs.started if _alive(p.pid)]
    assert not leftovers, f"processes still running: {leftovers}"

    run_dir = tmp_path / "runs" / "deployed"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records if r["kind"] == "round"] == [0, 1, 2]
    fits = [r for r in records if r["kind"] == "client"]
    assert sorted((r["round"], r["client_id"]) for r in fits) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    for i, size in enumerate(sizes):  # each node trained on all of its own file
        if secure:  # no count, and each node clipped its whole update itself
            assert all("num_examples" not in r and "norm_clipped" not in r for r in fits)
        else:
            assert {r["num_examples"] for r in fits if r["client_id"] == i} == {size}
    assert all(r["kind"] not in ("client-error", "secagg-failed") for r in records)
    rounds = [r for r in records if r["kind"] == "round" and r["round"] > 0]
    assert all(r["clients"] == 2 for r in rounds)

    report = json.loads((run_dir / "privacy" / "report.json").read_text())
    assert (run_dir / "privacy" / "report.md").is_file() and (run_dir / "adapter").is_dir()
    for i, state in enumerate(states):  # each node's ledger lives in its own state-dir, and matches the server's
        ledger = json.loads((state / "deployed" / f"client-{i}" / "ledger.json").read_text())
        mirror = json.loads((run_dir / "privacy" / "ledgers" / f"client-{i}.json").read_text())
        assert [e["round"] for e in ledger["entries"]] == [1, 2]
        assert ledger["entries"] == mirror["entries"]
    assert set(report["clients"]) == {"0", "1"}
    if secure:  # both summed rounds charged to the client-level ledger, under the Skellam accountant
        level = json.loads((run_dir / "privacy" / "client-level-ledger.json").read_text())
        assert level["accountant"] == "skellam" and [e["round"] for e in level["entries"]] == [1, 2]
        assert report["client_level"]["distributed"] is True
    assert all(c["rounds_taken_part"] == 2 for c in report["clients"].values())
    assert not (tmp_path / "runs" / "deployed" / "clients").exists()  # real clients keep no state on the server

    if warm:  # every message ran in the workers, none cold; with the launcher, no flwr-clientapp was spawned
        for i in range(2):
            assert procs.log(f"node-{i}").count("fedspec worker: train of run") == 2
            assert "running this message here (cold)" not in procs.log(f"node-{i}")
            assert (procs.log(f"node-{i}").count("fedspec launcher: flwr-clientapp forked") >= 2) == launcher
    if gpu_node:  # each node says where it trained, and the summary sums it up
        assert {(r["client_id"], r["cuda"]) for r in fits} == {(0, 1), (1, 0)}
        assert all(r["peak_memory_mib"] > 0 and r["step_seconds"] > 0 for r in fits)
        gpu_peaks = [r["peak_memory_mib"] for r in fits if r["cuda"]]
        assert "clients trained 1 on CUDA, 1 on their CPU" in (run_dir / "summary.md").read_text()
        print(f"\nGPU node: peak GPU memory {max(gpu_peaks):.1f} MiB, step "
              + ", ".join(f"{r['step_seconds'] * 1000:.1f} ms" for r in fits if r["cuda"]) + "; CPU node: step "
              + ", ".join(f"{r['step_seconds'] * 1000:.1f} ms" for r in fits if not r["cuda"]))
    # Round overhead beyond compute: the server's round time minus the slowest client's own training time
    overheads = [r["seconds"] - max(c["train_seconds"] for c in fits if c["round"] == r["round"]) for r in rounds]
    total = time.monotonic() - started
    print(f"\ndeployment runtime ({mode}): flwr run {run_seconds:.1f}s, whole test {total:.1f}s, round overhead "
          + ", ".join(f"{o:.1f}s" for o in overheads))


def test_a_client_refuses_a_server_running_another_fedspec_release():
    from fedspec import __version__
    from fedspec.client.app import check_same_version
    from fedspec.errors import FedspecError

    check_same_version(__version__)
    with pytest.raises(FedspecError, match=f"fedspec {__version__} but the server runs fedspec 0.0.0-other"):
        check_same_version("0.0.0-other")


def test_an_unnamed_flwr_run_is_named_after_its_run_id_on_server_and_clients():
    from fedspec.config import config_from_run_config

    unnamed = {"overrides": "model=tiny-bert"}
    assert config_from_run_config(unnamed, run_id=42).run.name == "flwr-run-42"
    assert config_from_run_config({"overrides": "run.name=mine"}, run_id=42).run.name == "mine"


def test_credential_folders_are_not_writable_by_others_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        creds = create_credentials(tmp_path / "fresh" / "creds", nodes=1)
    finally:
        os.umask(old)
    for folder in {tmp_path / "fresh", creds.root, creds.ca_key.parent, creds.node_key(0).parent}:
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(ConfigError, match="writable by other users"):
        create_credentials(shared, nodes=1)
    assert not any(shared.iterdir())  # refused before writing anything


@pytest.mark.slow
def test_three_warm_secure_nodes_survive_one_killed_mid_run(tmp_path):
    """Issue 17's acceptance run: 3 nodes on loopback (TLS, node authentication, secure aggregation, warm workers,
    all through `fedspec superlink` / `fedspec node`); node 2 is killed once round 1 is done. The run completes,
    the rounds after it aggregate the survivors, and nothing is misreported."""
    creds = create_credentials(tmp_path / "creds", nodes=3)
    link_port, node_ports = _free_port(), [_free_port() for _ in range(3)]
    env = _runtime_env()
    cli_env = _cli_env(tmp_path, link_port, creds, env)
    link_home = tmp_path / "superlink-home"
    _labelled_file(link_home / "task" / "train.jsonl", seed=0, count=200)
    _labelled_file(link_home / "task" / "eval.jsonl", seed=1, count=64)
    run_dir = tmp_path / "runs" / "killed"
    overrides = ["model=tiny-bert", "federation.clients=3", "federation.rounds=3", "federation.fraction=1.0",
                 "federation.round_timeout=240", "data.source=file", "data.path=task/train.jsonl",
                 "data.eval_path=task/eval.jsonl", "data.min_client_examples=8", "train.local_steps=2",
                 "train.batch_size=16", "federation.secure_aggregation.enabled=true", "run.name=killed",
                 f"run.output_dir={tmp_path / 'runs'}", "run.progress=false"]
    procs = Processes(tmp_path, env)
    try:
        procs.start("superlink", [str(BIN / "fedspec"), "superlink", "--credentials", str(creds.root), "--host",
                                  "127.0.0.1", "--port", str(link_port), "--state-dir", str(tmp_path / "link-state")],
                    link_home)
        for i in range(3):
            _register_when_up(creds.node_public_key(i), cli_env)
        nodes = []
        for i in range(3):
            data = tmp_path / f"node-{i}-data.jsonl"
            _labelled_file(data, seed=10 + i, count=48)
            nodes.append(procs.start(f"node-{i}", [
                str(BIN / "fedspec"), "node", "--superlink", f"127.0.0.1:{link_port}", "--id", str(i), "--ca",
                str(creds.ca_cert), "--key", str(creds.node_key(i)), "--data-path", str(data),
                "--state-dir", str(tmp_path / f"node-{i}-state"), "--port", str(node_ports[i]),
            ], tmp_path / f"node-{i}-home"))
        run = subprocess.Popen([str(BIN / "flwr"), "run", str(ROOT), "fedlink", "--stream", "--run-config",
                                f'overrides="{" ".join(overrides)}"'], env=cli_env, cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 600
        while not _round_logged(run_dir, 1):
            assert time.monotonic() < deadline and run.poll() is None, "round 1 never finished"
            time.sleep(0.5)
        for pid in (nodes[2].pid, *_descendants(nodes[2].pid)):  # node 2 dies: SuperNode, worker, apps
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        out, _ = run.communicate(timeout=900)
        runs = _flwr(["list", "fedlink", "--format", "json"], cli_env, 60)
        assert [r["status"] for r in json.loads(runs.stdout)["runs"]] == ["finished:completed"], out
    finally:
        procs.stop_all()

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = {r["round"]: r for r in records if r["kind"] == "round"}
    assert sorted(rounds) == [0, 1, 2, 3] and rounds[1]["clients"] == 3
    assert rounds[3]["clients"] == 2 and rounds[3]["secagg_failed"] == 0  # the survivors aggregate without node 2
    trained = {(r["round"], r["client_id"]) for r in records if r["kind"] == "client"}
    assert {(3, 0), (3, 1)} <= trained and (3, 2) not in trained
    errors = [r for r in records if r["kind"] == "client-error"]
    assert errors and all(r["client"] == 2 and r["reason"].startswith("secure aggregation, ") for r in errors)
    for i in (0, 1, 2):  # every node's own ledger (the killed one's too) matches the server's mirror of it
        ledger = json.loads((tmp_path / f"node-{i}-state" / "killed" / f"client-{i}" / "ledger.json").read_text())
        mirror = json.loads((run_dir / "privacy" / "ledgers" / f"client-{i}.json").read_text())
        assert ledger["entries"] == mirror["entries"]
        assert [e["round"] for e in ledger["entries"]] == ([1] if i == 2 else [1, 2, 3])
    report = json.loads((run_dir / "privacy" / "report.json").read_text())
    assert report["secure_aggregation"] is True and report["clients"]["2"]["rounds_taken_part"] >= 1


def _round_logged(run_dir: Path, round_: int) -> bool:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return False
    return any(json.loads(line).get("kind") == "round" and json.loads(line).get("round") == round_
               for line in path.read_text().splitlines() if line.strip())
