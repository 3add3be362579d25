"""Send messages to nodes and collect replies one by one, so progress can be shown as clients finish.

The same protocol as ``Grid.send_and_receive`` (push, then pull until every reply arrived or the timeout
passed), built on the Grid's public ``push_messages`` / ``pull_messages``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from flwr.app import Message
from flwr.serverapp import Grid

POLL_SECONDS = 0.1


def exchange(
    grid: Grid,
    messages: Iterable[Message],
    *,
    timeout: float,
    on_reply: Callable[[Message], None] | None = None,
) -> list[Message]:
    """Replies that arrived within ``timeout`` seconds; late replies are dropped, as Flower does."""
    pending = set(grid.push_messages(messages))
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        arrived = list(grid.pull_messages(pending))
        for reply in arrived:
            pending.discard(reply.metadata.reply_to_message_id)
            replies.append(reply)
            if on_reply is not None:
                on_reply(reply)
        if pending and not arrived:
            time.sleep(POLL_SECONDS)
    return replies
