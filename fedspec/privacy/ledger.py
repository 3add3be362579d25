"""One client's privacy ledger: every round's DP-SGD steps, kept across rounds and restarts.

Flower ClientApps are stateless and processes restart, so an accountant living in memory (or a
new PrivacyEngine per round) forgets earlier rounds and under-reports ε.
The ledger is the client's full history, saved as JSON after each round (atomically, never
pickle), and every ε it reports composes ALL recorded rounds.

File convention: `client-<client_id>.json` (see `ledger_filename`), one per client, in one folder
that `load_ledgers` reads back for the report.
"""

from __future__ import annotations

import json
import numbers
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .accounting import (
    HistoryEntry,
    cumulative_epsilons,
    epsilon,
    validate_accountant,
    validate_delta,
    validate_entry,
)
from .atomic import write_atomic

__all__ = ["LEDGER_FORMAT", "LEDGER_VERSION", "LedgerEntry", "PrivacyLedger", "client_sort_key",
           "ledger_filename", "load_ledgers"]

LEDGER_FORMAT = "fedspec-privacy-ledger"
LEDGER_VERSION = 1
# Client ids become file names: letters, digits, '.', '_', '-', not starting with '.' (no hidden
# files, no path separators, no '..').
_CLIENT_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class LedgerEntry:
    """The DP-SGD steps one client took in one federated round."""

    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    # A round the client trained more than once: the server crashed after the client released its update
    # and resumed from an earlier checkpoint. Every attempt released an update, so every attempt counts.
    attempt: int = 1


def ledger_filename(client_id: str) -> str:
    """The file name a client's ledger is saved under: `client-<client_id>.json`."""
    return f"client-{_validate_client_id(client_id)}.json"


def client_sort_key(client_id: str) -> tuple:
    """Sort key that puts client "2" before "10" (numbers in ids compare as numbers)."""
    parts = re.split(r"(\d+)", client_id)
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in parts)


def _validate_client_id(client_id: str) -> str:
    if not isinstance(client_id, str) or not _CLIENT_ID.fullmatch(client_id):
        raise ValueError(
            f"client_id must be a non-empty string of letters, digits, '.', '_' or '-' not starting "
            f"with '.', got {client_id!r}"
        )
    return client_id


def _validate_round(server_round: int) -> int:
    if isinstance(server_round, bool) or not isinstance(server_round, numbers.Integral) or server_round < 0:
        raise ValueError(f"round must be an integer >= 0, got {server_round!r}")
    return int(server_round)


class PrivacyLedger:
    """Cumulative DP-SGD history of one client over federated rounds.

    `delta` and `accountant` are the client's settings, saved with the ledger; methods that
    compute ε use them unless told otherwise. Rounds must be recorded in increasing order, once
    each: a retried round recorded twice would count its steps twice, so it raises instead.
    Record a round when its update is released to the server.
    """

    def __init__(self, client_id: str, *, delta: float, accountant: str = "rdp") -> None:
        self._client_id = _validate_client_id(client_id)
        self._delta = validate_delta(delta)
        self._accountant = validate_accountant(accountant)
        self._entries: list[LedgerEntry] = []

    @property
    def client_id(self) -> str:
        return self._client_id

    @property
    def delta(self) -> float:
        return self._delta

    @property
    def accountant(self) -> str:
        return self._accountant

    @property
    def entries(self) -> tuple[LedgerEntry, ...]:
        return tuple(self._entries)

    def __repr__(self) -> str:
        return (
            f"PrivacyLedger(client_id={self._client_id!r}, delta={self._delta:g}, "
            f"accountant={self._accountant!r}, rounds={[e.round for e in self._entries]})"
        )

    # --------------------------------------------------------------------------------- recording

    def record(
        self, round: int, noise_multiplier: float, sample_rate: float, steps: int, *, attempt: int = 1
    ) -> LedgerEntry:
        """Append this round's steps; raise if this attempt of the round is already recorded, or if a first
        attempt is out of order. A retried round (``attempt`` > 1, see ``next_attempt``) may come after
        later rounds: a resumed server can roll back past rounds the client already trained."""
        server_round = _validate_round(round)
        sigma, q, steps = validate_entry(noise_multiplier, sample_rate, steps, where=f"round {server_round}")
        if isinstance(attempt, bool) or not isinstance(attempt, numbers.Integral) or attempt < 1:
            raise ValueError(f"attempt must be an integer >= 1, got {attempt!r}")
        for entry in self._entries:
            if (entry.round, entry.attempt) == (server_round, attempt):
                raise ValueError(
                    f"client {self._client_id!r}: round {server_round} is already recorded ({entry}); "
                    "recording it again would count its steps twice"
                )
        if attempt == 1 and self._entries and server_round < self._entries[-1].round:
            raise ValueError(
                f"client {self._client_id!r}: round {server_round} comes before the last recorded round "
                f"{self._entries[-1].round}; rounds must be recorded in order"
            )
        entry = LedgerEntry(server_round, sigma, q, steps, int(attempt))
        self._entries.append(entry)
        return entry

    def next_attempt(self, round: int) -> int:
        """1 for a round not yet recorded, else one more than the attempts already recorded for it."""
        return 1 + sum(1 for e in self._entries if e.round == round)

    def up_to(self, last_round: int) -> PrivacyLedger:
        """A copy holding only the rounds up to ``last_round``: the ledger as it was when that round ended."""
        copy = PrivacyLedger(self._client_id, delta=self._delta, accountant=self._accountant)
        copy._entries = [e for e in self._entries if e.round <= last_round]
        return copy

    def history(self) -> list[HistoryEntry]:
        """All recorded rounds as Opacus-style `(noise_multiplier, sample_rate, steps)` entries."""
        return [(e.noise_multiplier, e.sample_rate, e.steps) for e in self._entries]

    # -------------------------------------------------------------------------------- accounting

    def epsilon(self, delta: float | None = None, accountant: str | None = None) -> float:
        """ε at δ over ALL recorded rounds (defaults: the ledger's own δ and accountant)."""
        return epsilon(self.history(), *self._settings(delta, accountant))

    def epsilon_by_round(
        self, delta: float | None = None, accountant: str | None = None
    ) -> list[tuple[int, float]]:
        """`(round, ε after that round)` for each recorded round: the whole run so far, not the round alone.

        Non-decreasing (see `cumulative_epsilons`); the last value equals `epsilon()` for RDP and
        is never below it for PRV.
        """
        values = cumulative_epsilons(self.history(), *self._settings(delta, accountant))
        return [(e.round, eps) for e, eps in zip(self._entries, values)]

    def would_exceed(
        self,
        budget_epsilon: float,
        delta: float | None = None,
        accountant: str | None = None,
        *,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
    ) -> bool:
        """Whether taking `steps` more steps at (σ, q) would push ε strictly above `budget_epsilon`.

        σ, q and steps are keyword-only: three bare numbers in a row are too easy to swap.
        """
        real = isinstance(budget_epsilon, numbers.Real) and not isinstance(budget_epsilon, bool)
        if not (real and budget_epsilon >= 0):  # also rejects NaN
            raise ValueError(f"budget_epsilon must be a number >= 0, got {budget_epsilon!r}")
        planned = validate_entry(noise_multiplier, sample_rate, steps, where="planned round")
        return epsilon([*self.history(), planned], *self._settings(delta, accountant)) > budget_epsilon

    def _settings(self, delta: float | None, accountant: str | None) -> tuple[float, str]:
        return (
            self._delta if delta is None else delta,
            self._accountant if accountant is None else accountant,
        )

    # ---------------------------------------------------------------------------------- (de)serialization

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": LEDGER_FORMAT,
            "version": LEDGER_VERSION,
            "client_id": self._client_id,
            "delta": self._delta,
            "accountant": self._accountant,
            "entries": [asdict(e) for e in self._entries],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrivacyLedger:
        """Rebuild a ledger, re-validating every entry as if it were recorded now."""
        if not isinstance(data, dict) or data.get("format") != LEDGER_FORMAT:
            raise ValueError(f"not a fedspec privacy ledger (expected format {LEDGER_FORMAT!r})")
        if data.get("version") != LEDGER_VERSION:
            raise ValueError(
                f"unsupported privacy ledger version {data.get('version')!r}; expected {LEDGER_VERSION}"
            )
        try:
            ledger = cls(data["client_id"], delta=data["delta"], accountant=data["accountant"])
            for entry in data["entries"]:
                ledger.record(entry["round"], entry["noise_multiplier"], entry["sample_rate"], entry["steps"],
                              attempt=entry.get("attempt", 1))
        except (KeyError, TypeError) as err:
            raise ValueError(f"malformed privacy ledger: {err!r}") from err
        return ledger

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> PrivacyLedger:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the ledger as JSON, atomically: a crash leaves the previous file intact."""
        write_atomic(path, self.to_json().encode("utf-8"))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PrivacyLedger:
        """Read a ledger; a missing file raises FileNotFoundError (see `load_or_empty`)."""
        text = Path(path).read_text(encoding="utf-8")
        try:
            return cls.from_json(text)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err

    @classmethod
    def load_or_empty(
        cls, path: str | os.PathLike[str], client_id: str, *, delta: float, accountant: str = "rdp"
    ) -> PrivacyLedger:
        """The ledger at `path`, or a new empty one if there is no file yet (a client's first round).

        An existing ledger must belong to the same client and use the same δ and accountant;
        otherwise this raises rather than mixing two guarantees in one history.
        """
        if not Path(path).exists():
            return cls(client_id, delta=delta, accountant=accountant)
        ledger = cls.load(path)
        expected = {"client_id": client_id, "delta": validate_delta(delta), "accountant": accountant}
        found = {"client_id": ledger.client_id, "delta": ledger.delta, "accountant": ledger.accountant}
        if found != expected:
            raise ValueError(f"{path} holds a ledger with {found}, but this client runs with {expected}")
        return ledger


def load_ledgers(directory: str | os.PathLike[str]) -> dict[str, PrivacyLedger]:
    """All `client-*.json` ledgers in `directory`, keyed by client id, in natural client order."""
    folder = Path(directory)
    if not folder.is_dir():
        raise FileNotFoundError(f"no ledger directory at {folder}")
    ledgers: dict[str, PrivacyLedger] = {}
    for path in folder.glob("client-*.json"):
        ledger = PrivacyLedger.load(path)
        if path.name != ledger_filename(ledger.client_id):
            raise ValueError(f"{path} holds the ledger of client {ledger.client_id!r}; its name should be "
                             f"{ledger_filename(ledger.client_id)}")
        ledgers[ledger.client_id] = ledger
    return {cid: ledgers[cid] for cid in sorted(ledgers, key=client_sort_key)}
