"""fedspec privacy: per-client (ε, δ) accounting over federated rounds, noise planning and reports.

Opacus does DP-SGD and provides the accountants; this package keeps what Opacus does not: a ledger
per client that composes every round it took part in (never a per-round ε), survives restarts
and stateless ClientApps, plans σ for a whole schedule, and writes the run's privacy report.

- `epsilon(history, delta, accountant="rdp"|"prv")`: ε of `(noise_multiplier, sample_rate, steps)` entries.
- `plan_noise(target_epsilon, delta, sample_rate, steps)`: the smallest σ that stays within a target.
- `PrivacyLedger`: one client's history, saved as `client-<id>.json`; `load_ledgers(dir)` reads them all.
- `write_privacy_report(out_dir, ledgers, delta=..., accountant=...)`: report.json, report.md, epsilon.png.
"""

from .accounting import ACCOUNTANTS, PrivacyBudgetError, cumulative_epsilons, epsilon, plan_noise
from .ledger import LedgerEntry, PrivacyLedger, ledger_filename, load_ledgers
from .report import build_privacy_report, render_markdown, write_privacy_report

__all__ = [
    "ACCOUNTANTS",
    "LedgerEntry",
    "PrivacyBudgetError",
    "PrivacyLedger",
    "build_privacy_report",
    "cumulative_epsilons",
    "epsilon",
    "ledger_filename",
    "load_ledgers",
    "plan_noise",
    "render_markdown",
    "write_privacy_report",
]
