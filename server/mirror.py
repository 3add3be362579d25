"""The server's mirror of every client's privacy ledger: what each reply claims it spent, checked, then recorded.

Clients keep their own ledgers; the server keeps a copy built from their replies, for the budget checks before
every round and for the privacy report. The server cannot see a client's noise, but it refuses a claim that
contradicts its own config where it knows the value (DP-SGD on or off, ``train.local_steps``, a fixed σ or sample
rate, round 0's statistic mechanism) or that no accountant can turn into an ε (a σ so small that σ² underflows
divides by zero in Opacus). A refused reply is quarantined before anything is aggregated, so the mirror never holds
an entry that would stop the next round's budget check or the final report.
"""

from __future__ import annotations

import math

from fedspec.privacy import PrivacyLedger
from fedspec.privacy.planning import PlanSettings, client_sample_rate
from fedspec.protocol import ProtocolError, StatisticsReply, TrainReply


def check_claim(ledgers: dict[str, PrivacyLedger], reply: TrainReply | StatisticsReply, round_: int,
                plan: PlanSettings) -> None:
    """Raise a ProtocolError naming what is wrong with the privacy claim of this (not declined) reply."""
    expected = _expected_setting(reply, plan)
    if expected is None:
        if reply.private:
            raise ProtocolError("the reply reports a DP mechanism (metric 'noise-multiplier') the run does not use")
        return
    if not reply.private:
        raise ProtocolError("the run is private, but the reply reports no DP mechanism (metric 'noise-multiplier')")
    sigma, q, steps = expected
    if reply.steps != steps:
        raise ProtocolError(f"the reply reports {reply.steps} DP steps; this run's clients take {steps} a round")
    for name, claimed, configured in (("noise-multiplier", reply.noise_multiplier, sigma),
                                      ("sample-rate", reply.sample_rate, q)):
        if configured is not None and not math.isclose(claimed, configured, rel_tol=1e-9):
            raise ProtocolError(f"the reply reports {name} {claimed!r}; this run sets {configured!r}")
    client = str(reply.client_id)
    trial = {client: ledgers[client].up_to(round_)} if client in ledgers else {}  # a copy: the mirror is untouched
    try:
        record_claim(trial, reply, round_, plan)
        trial[client].epsilon()
    except (ArithmeticError, ValueError, RuntimeError) as error:
        setting = (reply.noise_multiplier, reply.sample_rate, reply.steps)
        raise ProtocolError(f"no ε can be computed for the reply's DP setting (σ, q, steps) = {setting}: "
                            f"{str(error)[:200]}") from None


def record_claim(ledgers: dict[str, PrivacyLedger], reply: TrainReply | StatisticsReply, round_: int,
                 plan: PlanSettings) -> None:
    """Record in the mirror what a client reported it spent this round.

    A client that trained this round before a server crash and trains it again after the resume reports its
    second attempt, while the mirror (rolled back to the checkpoint before the round) knows neither: every attempt
    up to the reported one is recorded, at this reply's setting (a client's σ, q and steps are fixed for the
    run), so the report never shows less ε than the client's own ledger."""
    if not reply.private:
        return
    client = str(reply.client_id)
    ledger = ledgers.setdefault(client, PrivacyLedger(client_id=client, delta=plan.delta, accountant=plan.accountant))
    first = ledger.next_attempt(round_)
    for attempt in range(first, max(first, reply.attempt or first) + 1):
        ledger.record(round_, reply.noise_multiplier, reply.sample_rate, reply.steps, attempt=attempt)


def _expected_setting(reply: TrainReply | StatisticsReply, plan: PlanSettings,
                      ) -> tuple[float | None, float | None, int] | None:
    """(σ, q, steps) the run's config sets for this reply (None where it is the client's to choose), or None when
    the reply must report no DP mechanism at all."""
    if isinstance(reply, StatisticsReply):  # round 0: the statistic's one Gaussian mechanism, if privatized
        if not plan.init_statistics:
            return None
        (sigma, q, steps), = plan.init_statistics
        return sigma, q, steps
    if not plan.enabled:
        return None
    # A fixed rate 1/k: every client trains at it (client_sample_rate; its record count only decides whether it
    # can). Otherwise q = 1/⌈n/B⌉ follows the client's own count, and σ is planned from it.
    q = client_sample_rate(plan, 10**12) if plan.fixed_sample_rate is not None else None
    return plan.noise_multiplier, q, plan.local_steps
