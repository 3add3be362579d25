"""What the server knows about privacy budgets left: who declined, who will, and when the run must stop.

Clients enforce their own record-level budget (they decline a round that would push their ε past it); the
server only keeps track, so it can end the run cleanly once fewer than ``federation.min_clients`` clients
could still train. A client is out of budget once it declined, or when the server's mirror of its ledger
shows that one more round at its (σ, q) would exceed the budget — the same check the client makes. The
client-level guarantee (when on) is the server's own: it stops before a release that would exceed
``privacy.client_level.target_epsilon``.
"""

from __future__ import annotations

from omegaconf import DictConfig

from fedspec.privacy import PrivacyLedger
from fedspec.privacy.planning import PlanSettings


class BudgetTracker:
    def __init__(self, cfg: DictConfig, declined: dict[str, list[int]] | None = None) -> None:
        self.cfg = cfg
        self.budget = PlanSettings.of(cfg).budget_epsilon if cfg.privacy.enabled else None
        self.declined: dict[str, list[int]] = {cid: list(rounds) for cid, rounds in (declined or {}).items()}

    def record_decline(self, client: str, round_: int) -> None:
        self.declined.setdefault(client, []).append(round_)

    def out_of_budget(self, ledgers: dict[str, PrivacyLedger]) -> set[str]:
        """Clients that declined, or whose next round would exceed the budget by the server's mirror."""
        if self.budget is None:
            return set()
        out = set(self.declined)
        steps = int(self.cfg.train.local_steps)
        for client, ledger in ledgers.items():
            # The next round repeats the client's last DP-SGD round; round 0's entry is the statistic of a
            # data-driven init (σ₀, q = 1), no DP-SGD step: a client with only that has not trained yet.
            trained = [entry for entry in ledger.entries if entry.round >= 1]
            if client in out or not trained:
                continue
            last = trained[-1]
            if ledger.would_exceed(self.budget, noise_multiplier=last.noise_multiplier,
                                   sample_rate=last.sample_rate, steps=steps):
                out.add(client)
        return out

    def stop_reason(self, clients: list[str], ledgers: dict[str, PrivacyLedger],
                    client_level: PrivacyLedger | None = None, client_level_next: tuple[float, float] | None = None,
                    ) -> str | None:
        """Why the next round must not start, or None."""
        out = self.out_of_budget(ledgers)
        left = len([c for c in clients if c not in out])
        needed = min(int(self.cfg.federation.min_clients), len(clients))
        if self.budget is not None and left < needed:
            return (f"only {left} of {len(clients)} clients have record-level budget left (ε ≤ {self.budget:g}) "
                    f"for another round, fewer than federation.min_clients={needed}")
        target = self.cfg.privacy.client_level.target_epsilon
        if client_level is not None and client_level_next is not None and target is not None:
            sigma, q = client_level_next
            if client_level.would_exceed(float(target), noise_multiplier=sigma, sample_rate=q, steps=1):
                return (f"another round would push the client-level ε past "
                        f"privacy.client_level.target_epsilon={float(target):g}")
        return None
