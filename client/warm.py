"""Warm clients: a node-local worker process that keeps the model, the tokenized data and their caches alive
across rounds, so a deployed node stops paying torch's import and the model build for every message.

Flower 1.42 starts a fresh ClientApp process for every message a SuperNode receives, in both isolation modes
(docs/deployment.md, "Cost"). fedspec's ClientApp therefore forwards each message, with the node's context, to
``fedspec worker --socket PATH`` when the SuperNode's node config names that socket (``worker="PATH"``); the
worker runs the very same handlers (:mod:`client.app`) in its long-lived process and sends back the reply and the
node's updated state. The forwarding ClientApp imports neither torch nor the model code.

The link is a Unix socket, created readable and writable by its owner only (the SuperNode's user): no other
local user can reach the worker. Messages travel as Flower's own protobuf serialization, never pickle. When the
worker cannot be reached, the ClientApp runs the message itself (cold) and says so in its log.
"""

from __future__ import annotations

import os
import socket
import socketserver
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Message

from fedspec.errors import FedspecError
from fedspec.launch import remove_stale_socket

WORKER_NODE_CONFIG = "worker"  # node-config key: the warm worker's socket path
_OK, _FAILED = b"\x00", b"\x01"
_LENGTH = struct.Struct("<Q")


class WorkerUnavailable(OSError):
    """No worker listens on the socket (not started, or stopped): the message runs cold in the ClientApp."""


def _send_frames(sock: socket.socket, *frames: bytes) -> None:
    sock.sendall(b"".join(_LENGTH.pack(len(frame)) + frame for frame in frames))


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    chunks, remaining = [], size
    while remaining:
        chunk = sock.recv(min(remaining, 1 << 20))
        if not chunk:
            raise ConnectionError("the warm worker closed the connection mid-message")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _read_frame(sock: socket.socket) -> bytes:
    (size,) = _LENGTH.unpack(_read_exactly(sock, _LENGTH.size))
    return _read_exactly(sock, size)


def forward(socket_path: str, kind: str, msg: Message, context: Context) -> Message:
    """Run one message on the warm worker: its reply, and the node's state updated in ``context``."""
    from flwr.common.serde import context_to_proto, message_to_proto, recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(socket_path)
    except OSError as error:
        sock.close()
        raise WorkerUnavailable(f"no warm worker at {socket_path} ({error.strerror or error})") from None
    with sock:
        _send_frames(sock, kind.encode(), message_to_proto(msg).SerializeToString(),
                     context_to_proto(context).SerializeToString())
        status = _read_exactly(sock, 1)
        if status == _FAILED:
            raise FedspecError(_read_frame(sock).decode("utf-8", "replace"))
        content, state = (recorddict_from_proto(ProtoRecordDict.FromString(_read_frame(sock))) for _ in range(2))
    context.state = state
    return Message(content, reply_to=msg)


def serve(socket_path: str | Path, handlers: dict[str, Callable[[Message, Context], Message]],
          *, ready: Callable[[], None] | None = None) -> None:
    """Answer forwarded messages one at a time until interrupted; each with ``handlers[kind]``."""
    from flwr.common.serde import context_from_proto, message_from_proto, recorddict_to_proto
    from flwr.proto.message_pb2 import Context as ProtoContext
    from flwr.proto.message_pb2 import Message as ProtoMessage

    path = Path(socket_path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_socket(path, ": a warm worker of this node is running already")  # one a killed worker left

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            sock = self.request
            kind = _read_frame(sock).decode()
            msg = message_from_proto(ProtoMessage.FromString(_read_frame(sock)))
            context = context_from_proto(ProtoContext.FromString(_read_frame(sock)))
            started = time.monotonic()
            try:
                if kind not in handlers:
                    raise FedspecError(f"the warm worker has no handler for {kind!r} messages")
                reply = handlers[kind](msg, context)
            except Exception as error:  # the handlers already turned it into one line (client/app.py)
                print(f"fedspec worker: {kind} of run {context.run_id} failed: {error}", file=sys.stderr, flush=True)
                sock.sendall(_FAILED)
                _send_frames(sock, str(error).encode())
                return
            print(f"fedspec worker: {kind} of run {context.run_id} in {time.monotonic() - started:.2f} s",
                  file=sys.stderr, flush=True)
            sock.sendall(_OK)
            _send_frames(sock, recorddict_to_proto(reply.content).SerializeToString(),
                         recorddict_to_proto(context.state).SerializeToString())

    old_umask = os.umask(0o177)  # the socket file is created 0600: only the SuperNode's user may connect
    try:
        server = socketserver.UnixStreamServer(str(path), Handler)
    finally:
        os.umask(old_umask)
    with server:
        print(f"fedspec worker: listening on {path}", file=sys.stderr, flush=True)
        if ready is not None:
            ready()
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            path.unlink(missing_ok=True)
