"""Send messages to nodes and collect replies one by one, so progress can be shown as clients finish.

The same protocol as ``Grid.send_and_receive`` (push, then pull until every reply arrived or the timeout
passed), built on the Grid's public ``push_messages`` / ``pull_messages``.
"""

from __future__ import annotations

import math
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
    aggregation's keys and shares). Flower's framing and the few scalar metrics are left out."""
    if message.has_error():
        return 0
    content = message.content
    tensors = sum(math.prod(array.shape) * np.dtype(array.dtype).itemsize
                  for record in content.array_records.values() for array in record.values())
    strings = sum(len(value) if isinstance(value, bytes) else len(value.encode()) if isinstance(value, str) else 0
                  for record in content.config_records.values() for value in record.values())
    return tensors + strings


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
