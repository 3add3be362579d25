"""Send messages to nodes and collect replies one by one, so progress can be shown as clients finish.

The same protocol as ``Grid.send_and_receive`` (push, then pull until every reply arrived or the timeout
passed), built on the Grid's public ``push_messages`` / ``pull_messages``.
"""

from __future__ import annotations

import math
import operator
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Message, Metadata
from flwr.app.message.message import make_message
from flwr.serverapp import Grid

POLL_SECONDS = 0.1
NO_REPLY_IN_TIME = "no reply within federation.round_timeout"  # a client-error line's reason


@dataclass
class Traffic:
    """Payload bytes the server sent to and received from each node (see :func:`payload_bytes`)."""

    sent: Counter = field(default_factory=Counter)
    received: Counter = field(default_factory=Counter)

    def clear(self) -> None:
        self.sent.clear()
        self.received.clear()


def payload_bytes(message: Message) -> int:
    """What a message carries: its tensors and the byte strings and strings of its config records (secure
    aggregation's keys and shares). Flower's framing and the few scalar metrics are left out. Never raises: a
    reply is counted as it arrives, before anything checks it."""
    if message.has_error():
        return 0
    content = message.content
    tensors = sum(_array_bytes(array) for record in content.array_records.values() for array in record.values())
    strings = sum(len(value) if isinstance(value, bytes) else len(value.encode()) if isinstance(value, str) else 0
                  for record in content.config_records.values() for value in record.values())
    return tensors + strings


def _array_bytes(array) -> int:
    """A tensor's size as its header declares it (dtype × shape, without numpy's file header). Flower does not
    check a client's header: one it cannot read (an unknown dtype string, a shape that is not whole numbers)
    counts the raw bytes that arrived instead, and the reply's checks quarantine it (``protocol.reply_tensors``)."""
    declared = _declared_bytes(array)
    if declared is None:
        return len(array.data) if isinstance(array.data, bytes) else 0
    return declared


def _declared_bytes(array) -> int | None:
    """dtype × shape as the array's header states them; None when they do not make a size."""
    try:
        shape = [operator.index(size) for size in array.shape]
        itemsize = np.dtype(array.dtype).itemsize
    except Exception:  # noqa: BLE001 — whatever a client put in the header, counting it must not crash the server
        return None
    return math.prod(shape) * itemsize if all(size >= 0 for size in shape) else None


def exchange(
    grid: Grid,
    messages: Iterable[Message],
    *,
    timeout: float,
    on_reply: Callable[[Message], None] | None = None,
    traffic: Traffic | None = None,
) -> list[Message]:
    """Replies that arrived within ``timeout`` seconds; late replies are dropped, as Flower does.

    Every reply reads as coming from the node the message went to: the SuperLink answers for a node that went
    offline with an error of its own (``NODE_UNAVAILABLE``, sent from the SuperLink's id), which is re-addressed
    so that logs and the strategy name the client that failed. ``traffic`` adds up the payloads both ways."""
    messages = list(messages)
    if traffic is not None:
        for message in messages:
            traffic.sent[message.metadata.dst_node_id] += payload_bytes(message)
    ids = list(grid.push_messages(messages))
    destination = {mid: msg.metadata.dst_node_id for mid, msg in zip(ids, messages)}
    pending = set(ids)
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        arrived = list(grid.pull_messages(pending))
        for reply in arrived:
            pending.discard(reply.metadata.reply_to_message_id)
            node = destination.get(reply.metadata.reply_to_message_id)
            if reply.has_error() and node is not None and reply.metadata.src_node_id != node:
                reply = _from_node(reply, node)
            if traffic is not None:
                traffic.received[reply.metadata.src_node_id] += payload_bytes(reply)
            replies.append(reply)
            if on_reply is not None:
                on_reply(reply)
        if pending and not arrived:
            time.sleep(POLL_SECONDS)
    return replies


def _from_node(reply: Message, node: int) -> Message:
    """The same error reply, with the node it is about as its sender."""
    meta = reply.metadata
    metadata = Metadata(run_id=meta.run_id, message_id=meta.message_id, src_node_id=node, dst_node_id=meta.dst_node_id,
                        reply_to_message_id=meta.reply_to_message_id, group_id=meta.group_id,
                        created_at=meta.created_at, ttl=meta.ttl, message_type=meta.message_type)
    return make_message(metadata, error=reply.error)
