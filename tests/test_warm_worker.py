"""The warm worker: a forwarded message gets the reply and the node state the ClientApp would have produced
itself, failures arrive as one line, and a node without a reachable worker runs the message cold."""

from __future__ import annotations

import stat
import threading
import time

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, Metadata, MetricRecord, RecordDict
from flwr.app.message.message import make_message

from fedspec.client.app import build_client_app, local_handlers
from fedspec.client.warm import WorkerUnavailable, forward, serve
from fedspec.errors import FedspecError
from fedspec.protocol import CLIENT_ID, CONFIG, LABELS, METRICS

OVERRIDES = "model=tiny-bert data.num_examples=120 data.eval_examples=16 data.min_client_examples=8 federation.clients=2"


def _start(path, handlers):
    ready = threading.Event()
    thread = threading.Thread(target=serve, args=(path, handlers), kwargs={"ready": ready.set}, daemon=True)
    thread.start()
    assert ready.wait(30)
    return thread


def _message(content: RecordDict, message_type=MessageType.QUERY) -> Message:
    """A message as the SuperNode delivers it (building one from scratch needs a running Flower task)."""
    metadata = Metadata(run_id=3, message_id="m-1", src_node_id=1, dst_node_id=7, reply_to_message_id="",
                        group_id="", created_at=time.time(), ttl=3600, message_type=message_type)
    return make_message(metadata, content)


def _context(tmp_path, worker: str | None = None) -> Context:
    node_config = {"partition-id": 1, "num-partitions": 2, "state-dir": str(tmp_path / "state")}
    if worker:
        node_config["worker"] = worker
    return Context(run_id=3, node_id=7, node_config=node_config, state=RecordDict(),
                   run_config={"overrides": f"{OVERRIDES} run.name=warm run.output_dir={tmp_path / 'runs'}"})


def test_a_forwarded_query_gets_the_replies_and_state_of_a_local_one(tmp_path):
    socket_path = tmp_path / "worker.sock"
    _start(socket_path, local_handlers())
    assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600  # only the SuperNode's user may connect
    content = RecordDict({CONFIG: ConfigRecord({LABELS: ["a", "b", "c", "d"]})})
    local_context, warm_context = _context(tmp_path), _context(tmp_path, str(socket_path))
    local = local_handlers()["query"](_message(content), local_context)
    warm = build_client_app()(_message(content), warm_context)  # the real ClientApp, forwarding
    assert dict(warm.content[METRICS]) == dict(local.content[METRICS])
    assert dict(warm.content[METRICS]) == {CLIENT_ID: 1}  # never its record count (see test_round_zero)
    assert set(warm_context.state) == set(local_context.state) and warm_context.state  # the labels were remembered


def test_a_failing_handler_reaches_the_clientapp_as_one_line(tmp_path):
    def broken(msg, context):
        raise FedspecError("client 1: ValueError: the data file is empty (traceback in /x/errors.log)")

    socket_path = tmp_path / "w.sock"
    _start(socket_path, {"train": broken})
    with pytest.raises(FedspecError, match=r"^client 1: ValueError: the data file is empty"):
        forward(str(socket_path), "train", _message(RecordDict({}), MessageType.TRAIN), _context(tmp_path))


def test_state_written_by_the_worker_comes_back_to_the_node(tmp_path):
    def remember(msg, context):
        context.state["seen"] = ConfigRecord({"count": int(context.state.get("seen", ConfigRecord({"count": 0}))["count"]) + 1})
        return Message(RecordDict({METRICS: MetricRecord({"ok": 1})}), reply_to=msg)

    socket_path = tmp_path / "s.sock"
    _start(socket_path, {"query": remember})
    context = _context(tmp_path)
    for _ in range(3):
        forward(str(socket_path), "query", _message(RecordDict({})), context)
    assert context.state["seen"]["count"] == 3


def test_without_a_worker_the_clientapp_runs_the_message_itself(tmp_path, capfd):
    missing = str(tmp_path / "nobody-listens.sock")
    with pytest.raises(WorkerUnavailable):
        forward(missing, "query", _message(RecordDict({})), _context(tmp_path))
    content = RecordDict({CONFIG: ConfigRecord({LABELS: ["a", "b", "c", "d"]})})
    started = time.monotonic()
    reply = build_client_app()(_message(content), _context(tmp_path, missing))
    assert reply.content[METRICS][CLIENT_ID] == 1 and time.monotonic() - started < 120
    assert "running this message here (cold)" in capfd.readouterr().err


def test_a_worker_that_dies_mid_message_fails_that_message_in_one_line(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    socket_path = tmp_path / "dying.sock"
    # A real worker process that accepts the connection and dies before answering
    script = (f"import socket,os; s=socket.socket(socket.AF_UNIX); s.bind({str(socket_path)!r}); s.listen(1); "
              "c,_=s.accept(); c.recv(16); os._exit(1)")
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 30
        while not socket_path.exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with pytest.raises(FedspecError, match=r"^client 1: the warm worker at .* failed mid-message"):
            build_client_app()(_message(RecordDict({})), _context(tmp_path, str(socket_path)))
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def test_a_socket_path_that_names_another_file_is_refused_never_deleted(tmp_path):
    """`fedspec worker --socket PATH` removed whatever was at PATH when nothing listened there: a mistyped path
    deleted the user's file (here: their data). Only a stale socket is removed; anything else is refused."""
    data, folder = tmp_path / "records.jsonl", tmp_path / "state"
    data.write_text('{"text": "a", "label": 0}\n')
    folder.mkdir()
    for path in (data, folder):
        errors = []

        def run(path=path, errors=errors):
            try:
                serve(path, local_handlers())
            except FedspecError as error:
                errors.append(str(error))

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(20)
        assert not thread.is_alive() and "is not a Unix socket" in errors[0]
    assert data.read_text() == '{"text": "a", "label": 0}\n' and folder.is_dir()


def test_a_node_that_expects_another_split_of_the_task_refuses_to_start(tmp_path):
    """`fedspec node --num-partitions N` went into the node config and was never read: the node trained on share i
    of federation.clients shares whatever N said. A number other than federation.clients is refused at start."""
    content = RecordDict({CONFIG: ConfigRecord({LABELS: ["a", "b", "c", "d"]})})
    context = _context(tmp_path)
    context.node_config["num-partitions"] = 3  # the run (OVERRIDES) splits into federation.clients=2
    with pytest.raises(FedspecError, match="num-partitions=3, but the run splits .* federation.clients=2"):
        local_handlers()["query"](_message(content), context)
    assert local_handlers()["query"](_message(content), _context(tmp_path)).content[METRICS][CLIENT_ID] == 1
