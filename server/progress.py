"""Live progress of a federation and the table at the end (rich), or plain lines when not on a terminal."""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedspec.privacy.accounting import epsilon_text
from fedspec.render import markdown_table, number, results_table


@dataclass
class RoundRow:
    round: int
    train_loss: float | None
    eval_accuracy: float
    eval_loss: float
    clients: int
    max_epsilon: float | None
    seconds: float
    answer_accuracy: float | None = None  # causal LMs: greedy answers scored, at round 0 and the last round
    quarantined: int = 0  # replies rejected by the server's checks (client-quarantined lines say why)
    bytes_sent: int = 0  # payload bytes to the clients this round (tensors and secure aggregation's byte strings)
    bytes_received: int = 0  # payload bytes from them


ROUND_HEADERS = ["round", "train loss", "eval accuracy", "eval loss", "clients", "rejected", "max client ε",
                 "sent / received", "seconds"]


def byte_size(count: int) -> str:
    """A byte count in the largest binary unit that keeps it ≥ 1: 150536 → "147 KiB"."""
    size, unit = float(count), "B"
    for bigger in ("KiB", "MiB", "GiB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{size:.0f} {unit}" if size >= 100 or unit == "B" else f"{size:.1f} {unit}"


def traffic_cell(sent: int, received: int) -> str:
    """ "66.1 / 18.1 KiB", the unit written once when both share it."""
    (a, unit_a), (b, unit_b) = byte_size(sent).split(), byte_size(received).split()
    return f"{a} / {b} {unit_a}" if unit_a == unit_b else f"{a} {unit_a} / {b} {unit_b}"


def _cells(row: RoundRow) -> list[str]:
    traffic = traffic_cell(row.bytes_sent, row.bytes_received) if row.round else "—"
    return [str(row.round), number(row.train_loss, ".4f"), f"{row.eval_accuracy:.4f}", f"{row.eval_loss:.4f}",
            str(row.clients), str(row.quarantined), epsilon_text(row.max_epsilon), traffic, f"{row.seconds:.1f}"]


def rounds_table(rows: list[RoundRow], title: str = "fedspec federation") -> Table:
    return results_table(title, ROUND_HEADERS, [_cells(r) for r in rows])


def rounds_markdown(rows: list[RoundRow]) -> str:
    return markdown_table(ROUND_HEADERS, [_cells(r) for r in rows])


class FederationProgress:
    """A bar over rounds and one over the clients of the current round; a line per finished round."""

    def __init__(self, total_rounds: int, *, enabled: bool = True, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.enabled = enabled
        self.live = enabled and self.console.is_terminal
        self.total_rounds = total_rounds
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        )
        self._rounds = None
        self._clients = None

    def __enter__(self) -> FederationProgress:
        if self.live:
            self._progress.start()
            self._rounds = self._progress.add_task("rounds", total=self.total_rounds)
        return self

    def __exit__(self, *exc) -> None:
        if self.live:
            self._progress.stop()

    def start_round(self, round_: int, clients: int, completed_rounds: int) -> None:
        if not self.live:
            return
        self._progress.update(self._rounds, completed=completed_rounds)
        if self._clients is not None:
            self._progress.remove_task(self._clients)
        self._clients = self._progress.add_task(f"round {round_}: clients", total=clients)

    def client_done(self) -> None:
        if self.live and self._clients is not None:
            self._progress.advance(self._clients)

    def round_done(self, row: RoundRow) -> None:
        if self.live:
            self._progress.advance(self._rounds)
        if self.enabled:
            loss = "—" if row.train_loss is None else f"{row.train_loss:.4f}"
            eps = "" if row.max_epsilon is None else f"  max ε {epsilon_text(row.max_epsilon)}"
            self.console.print(
                f"round {row.round}/{self.total_rounds}  train loss {loss}  eval acc {row.eval_accuracy:.4f}  "
                f"clients {row.clients}{eps}  ({row.seconds:.1f}s)"
            )

    def note(self, text: str) -> None:
        if self.enabled:  # verbatim: paths and reasons, whose [words] rich would read as markup and drop
            self.console.print(text, markup=False, emoji=False)
