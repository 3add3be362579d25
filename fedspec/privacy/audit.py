"""An empirical lower bound on ε from one training run: the canary audit of Steinke, Nasr and Jagielski.

T. Steinke, M. Nasr, M. Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS 2023
(arXiv:2305.08846). The recipe:

1. draw m canaries (here: records made of rare vocabulary words no real record uses, each with a random
   label) and give each one to a client;
2. include each canary in its client's data independently with probability 1/2 (S_i = +1) or not
   (S_i = −1), and train once, the whole federation as usual;
3. score every canary by how much the run lowered its loss (loss under the initial global model minus loss
   under the final one): members were trained on, so their loss drops more;
4. guess +1 for the k₊ highest scores and −1 for the k₋ lowest, abstain on the rest (r = k₊ + k₋ guesses),
   and count the correct guesses v;
5. the theorem below turns (m, r, v) into a p-value for the claim "training is (ε, δ)-DP"; ε̂ is the largest
   ε whose claim is rejected at the stated confidence: with that confidence, the run is *not* better than
   (ε̂, δ)-DP. A correct DP implementation gives ε̂ ≤ ε (with probability ≥ the confidence); the audit has
   power when a non-private run gives a much larger ε̂.

The guess counts are chosen after seeing the scores, from a fixed grid; each candidate is tested at
(1 − confidence) / (grid size), so the union bound keeps the stated confidence for the best one
(Bonferroni), which the paper's experiments, reporting the best of many k, do not do.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy.stats import binom
from torch import nn

from ..data import TextExamples
from .accounting import epsilon_text

__all__ = [
    "AuditResult",
    "CanaryAssignment",
    "audit_scores",
    "canary_assignment",
    "canary_texts",
    "canary_vocabulary",
    "run_canaries",
    "with_canaries",
    "default_guess_counts",
    "epsilon_lower_bound",
    "guesses",
    "loss_per_example",
    "p_value",
]

WORDS_PER_CANARY = 8


# ------------------------------------------------------------------------------------------- the theorem


def p_value(m: int, r: int, v: int, epsilon: float, delta: float = 0.0) -> float:
    """P[at least v of r guesses are correct] for an (ε, δ)-DP training run: Theorem 3.1 of Steinke, Nasr &
    Jagielski (2023), implemented as stated.

    Theorem 3.1 (main result). Let M: {−1, 1}^m → Y be (ε, δ)-DP. Let S ∈ {−1, 1}^m be uniformly random and
    T = A(M(S)) ∈ {−1, 0, 1}^m with ‖T‖₁ ≤ r almost surely. Then for all v ∈ ℝ,

        P[W ≥ v] ≤ f(v) + 2·m·δ · max_{i ∈ {1, ..., m}} (f(v − i) − f(v)) / i,

    where W = Σᵢ max{0, Tᵢ·Sᵢ} counts the correct guesses and f(v) = P[Binomial(r, e^ε / (e^ε + 1)) ≥ v].

    The right-hand side, capped at 1, is the p-value of v correct guesses out of r under the null hypothesis
    "M is (ε, δ)-DP" (the same quantity as `p_value_DP_audit` in the paper's appendix code).
    """
    _check_counts(m, r, v)
    if not (epsilon >= 0 and math.isfinite(epsilon)):
        raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon!r}")
    if not 0.0 <= delta <= 1.0:
        raise ValueError(f"delta must be in [0, 1], got {delta!r}")
    q = 1.0 / (1.0 + math.exp(-epsilon))  # e^ε/(e^ε+1): the accuracy of ε-DP randomized response

    def f(x: int | np.ndarray):
        return binom.sf(np.asarray(x) - 1, r, q)  # P[Binomial(r, q) >= x]; 1 for x <= 0

    beta = float(f(v))
    if delta == 0.0:
        return min(beta, 1.0)
    i = np.arange(1, m + 1)
    alpha = float(np.max((f(v - i) - beta) / i))
    return min(beta + 2.0 * m * delta * alpha, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, confidence: float = 0.95, delta: float = 0.0) -> float:
    """ε̂: the largest ε at which v correct guesses out of r reject "(ε, δ)-DP" at level 1 − confidence.

    The p-value grows with ε, so the rejected ε form an interval [0, ε̂); found by bisection to 1e-6.
    0 when even ε = 0 is not rejected.
    """
    _check_counts(m, r, v)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    significance = 1.0 - confidence
    if p_value(m, r, v, 0.0, delta) >= significance:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) < significance:
        low, high = high, 2.0 * high
        if high > 1e3:  # v = r with a huge r; far beyond any ε an accountant reports
            return math.inf
    while high - low > 1e-6:
        middle = 0.5 * (low + high)
        if p_value(m, r, v, middle, delta) < significance:
            low = middle
        else:
            high = middle
    return low


def _check_counts(m: int, r: int, v: int) -> None:
    for name, value in (("m", m), ("r", r), ("v", v)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if not 0 <= v <= r <= m or m < 1:
        raise ValueError(f"need 0 <= v <= r <= m and m >= 1, got m={m}, r={r}, v={v}")


# ------------------------------------------------------------------------------------------- guessing


def guesses(scores: Sequence[float], k_pos: int, k_neg: int) -> np.ndarray:
    """T ∈ {−1, 0, 1}^m: +1 for the k₊ highest scores, −1 for the k₋ lowest, 0 (abstain) elsewhere.

    Ties are broken by position, which is independent of S; so ‖T‖₁ = k₊ + k₋ always.
    """
    values = np.asarray(scores, dtype=float)
    m = len(values)
    if k_pos < 0 or k_neg < 0 or k_pos + k_neg > m:
        raise ValueError(f"need k_pos, k_neg >= 0 and k_pos + k_neg <= m = {m}, got {k_pos}, {k_neg}")
    order = np.argsort(-values, kind="stable")  # highest first
    out = np.zeros(m, dtype=int)
    out[order[:k_pos]] = 1
    if k_neg:
        out[order[m - k_neg:]] = -1
    return out


def default_guess_counts(m: int) -> list[tuple[int, int]]:
    """The fixed grid of (k₊, k₋) the audit picks from: symmetric guesses on 5%–50% of the canaries each
    side, and positive-only guesses (often stronger under DP, where only a few members stand out)."""
    counts: list[tuple[int, int]] = []
    for share in (0.05, 0.1, 0.2, 0.3, 0.5):
        k = max(1, int(share * m))
        for pair in ((k, k), (k, 0)):
            if sum(pair) <= m and pair not in counts:
                counts.append(pair)
    return counts


def max_detectable_epsilon(m: int, confidence: float = 0.95, delta: float = 0.0,
                           guess_counts: Iterable[tuple[int, int]] | None = None) -> float:
    """The largest ε̂ an audit of m canaries can report at all (every guess of its best rule right): a claimed ε
    above it cannot be refuted by this audit, whatever the run leaks."""
    candidates = list(guess_counts) if guess_counts is not None else default_guess_counts(m)
    per_test = 1.0 - (1.0 - confidence) / len(candidates)
    return max(epsilon_lower_bound(m, min(k_pos + k_neg, m), min(k_pos + k_neg, m), per_test, delta)
               for k_pos, k_neg in candidates)


MAX_DEFAULT_CANARIES = 51_200


def canaries_to_refute(epsilon: float, confidence: float = 0.95, delta: float = 0.0) -> int | None:
    """The fewest canaries (100·2^k, up to MAX_DEFAULT_CANARIES) whose audit could show an ε̂ above ``epsilon``;
    None when even that many could not."""
    m = 100
    while m <= MAX_DEFAULT_CANARIES:
        if max_detectable_epsilon(m, confidence, delta) > epsilon:
            return m
        m *= 2
    return None


@dataclass(frozen=True)
class AuditResult:
    """What the audit found; ``epsilon_lower_bound`` is ε̂ at ``confidence`` (already union-bounded)."""

    canaries: int  # m
    members: int  # canaries that were included
    guesses: int  # r of the chosen (k₊, k₋)
    correct: int  # v
    k_pos: int
    k_neg: int
    confidence: float
    delta: float
    candidates: int  # size of the (k₊, k₋) grid the significance was split over
    epsilon_lower_bound: float
    member_score_mean: float
    nonmember_score_mean: float
    max_detectable: float  # the largest ε̂ this setting could show: claims above it are beyond this audit
    def to_dict(self) -> dict:
        return asdict(self)


def audit_scores(
    scores: Sequence[float],
    included: Sequence[bool],
    *,
    confidence: float = 0.95,
    delta: float = 0.0,
    guess_counts: Iterable[tuple[int, int]] | None = None,
) -> AuditResult:
    """ε̂ from canary scores (higher = more likely a member) and the true inclusion bits.

    Every candidate (k₊, k₋) is tested at significance (1 − confidence) / (number of candidates); the one
    with the largest ε̂ is reported, and with probability ≥ confidence that ε̂ is a true lower bound.
    """
    values = np.asarray(scores, dtype=float)
    member = np.asarray(included, dtype=bool)
    m = len(values)
    if m == 0 or len(member) != m:
        raise ValueError(f"need one inclusion bit per score, got {m} scores and {len(member)} bits")
    if not np.all(np.isfinite(values)):
        raise ValueError("canary scores must be finite")
    candidates = list(guess_counts) if guess_counts is not None else default_guess_counts(m)
    if not candidates:
        raise ValueError("no (k_pos, k_neg) candidates to guess with")
    per_test = 1.0 - (1.0 - confidence) / len(candidates)
    truth = np.where(member, 1, -1)
    best: tuple[float, int, int, int, int] | None = None
    for k_pos, k_neg in candidates:
        guess = guesses(values, k_pos, k_neg)
        r = int(np.abs(guess).sum())
        v = int(np.sum(np.maximum(0, guess * truth)))
        eps = epsilon_lower_bound(m, r, v, per_test, delta) if r else 0.0
        if best is None or eps > best[0]:
            best = (eps, r, v, k_pos, k_neg)
    eps, r, v, k_pos, k_neg = best
    return AuditResult(
        canaries=m, members=int(member.sum()), guesses=r, correct=v, k_pos=k_pos, k_neg=k_neg,
        confidence=confidence, delta=delta, candidates=len(candidates), epsilon_lower_bound=eps,
        member_score_mean=float(values[member].mean()) if member.any() else math.nan,
        nonmember_score_mean=float(values[~member].mean()) if (~member).any() else math.nan,
        max_detectable=max_detectable_epsilon(m, confidence, delta, candidates),
    )


# ------------------------------------------------------------------------------------------- canaries


@dataclass(frozen=True)
class CanaryAssignment:
    """Which client holds canary i, its label, and whether it was included (S_i = +1)."""

    labels: list[int]
    owners: list[int]
    included: list[bool]

    def for_client(self, client: int) -> list[int]:
        """Indices of the canaries included in ``client``'s data."""
        return [i for i, (owner, inc) in enumerate(zip(self.owners, self.included)) if owner == client and inc]

    def included_per_client(self, clients: int) -> list[int]:
        counts = [0] * clients
        for owner, inc in zip(self.owners, self.included):
            counts[owner] += int(inc)
        return counts


def canary_assignment(m: int, clients: int, num_classes: int, seed: int) -> CanaryAssignment:
    """m canaries spread evenly over the clients (in a shuffled order), each with a uniformly random label
    and included with probability 1/2, all drawn from ``seed``.

    Owners and labels do not depend on the inclusion bits, so adding or removing one canary changes exactly
    one client's dataset by one record: the neighbouring datasets record-level DP speaks about.
    """
    if m < 1 or clients < 1 or num_classes < 2:
        raise ValueError(f"need m >= 1, clients >= 1, num_classes >= 2, got {m}, {clients}, {num_classes}")
    rng = random.Random(f"fedspec-canaries:{seed}")
    owners = [i % clients for i in range(m)]
    rng.shuffle(owners)
    labels = [rng.randrange(num_classes) for _ in range(m)]
    included = [rng.random() < 0.5 for _ in range(m)]
    return CanaryAssignment(labels, owners, included)


_WORD = re.compile(r"[a-z]{4,}")
_WORD_MARKERS = ("▁", "Ġ")  # SentencePiece / byte-level BPE word-start markers


def canary_vocabulary(vocabulary: Iterable[str], exclude: Iterable[str]) -> list[str]:
    """Whole lower-case words of a tokenizer's vocabulary (≥ 4 letters) that no training record uses,
    sorted: the rare tokens canaries are made of."""
    used = {word.lower() for text in exclude for word in re.findall(r"[A-Za-z]+", text)}
    words = set()
    for token in vocabulary:
        word = token[1:] if token[:1] in _WORD_MARKERS else token
        if _WORD.fullmatch(word) and word not in used:
            words.add(word)
    return sorted(words)


def canary_texts(words: Sequence[str], m: int, seed: int, words_per_canary: int = WORDS_PER_CANARY) -> list[str]:
    """m texts of ``words_per_canary`` words each, no word shared between two canaries (so what the model
    learns about one canary tells it nothing about another)."""
    if len(words) < m * words_per_canary:
        raise ValueError(
            f"{m} canaries of {words_per_canary} words need {m * words_per_canary} unused vocabulary words, "
            f"but only {len(words)} are available; use fewer canaries (audit.canaries)"
        )
    pool = list(words)
    random.Random(f"fedspec-canary-words:{seed}").shuffle(pool)
    return [" ".join(pool[i * words_per_canary:(i + 1) * words_per_canary]) for i in range(m)]


def run_canaries(m: int, clients: int, seed: int, tokenizer_vocabulary: Iterable[str],
                 task_texts: Iterable[str], num_classes: int) -> tuple[list[str], CanaryAssignment]:
    """The canaries of an audited run (texts and assignment), rebuilt identically by every client and by the
    auditor from the audit settings, the tokenizer's vocabulary and the task's texts."""
    assignment = canary_assignment(m, clients, num_classes, seed)
    texts = canary_texts(canary_vocabulary(tokenizer_vocabulary, task_texts), m, seed)
    return texts, assignment


def with_canaries(examples: TextExamples, texts: Sequence[str], assignment: CanaryAssignment,
                  client: int) -> TextExamples:
    """``examples`` plus the canaries included in ``client``'s data (appended; batches are sampled anyway)."""
    chosen = assignment.for_client(client)
    return TextExamples(
        texts=[*examples.texts, *(texts[i] for i in chosen)],
        labels=[*examples.labels, *(assignment.labels[i] for i in chosen)],
        label_names=examples.label_names,
    )


# -------------------------------------------------------------------------------------------- scoring


@torch.no_grad()
def loss_per_example(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     labels: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """Cross-entropy of every example under ``model`` (eval mode), in float64."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(labels), batch_size):
        logits = model(input_ids[start:start + batch_size], attention_mask[start:start + batch_size])
        out.append(nn.functional.cross_entropy(logits.double(), labels[start:start + batch_size], reduction="none"))
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.float64)


def summary_lines(result: AuditResult, claimed: Mapping[str, float | None]) -> list[str]:
    """Plain-words lines: the audit's ε̂ beside the accountant's ε."""
    lines = [
        f"canaries: {result.canaries} ({result.members} included), guesses: {result.guesses} "
        f"(k₊ = {result.k_pos}, k₋ = {result.k_neg}), correct: {result.correct}",
        f"ε̂ = {result.epsilon_lower_bound:.3f}: with confidence {result.confidence:g}, the run is not "
        f"(ε, δ = {result.delta:g})-DP for any ε < ε̂ (Steinke, Nasr & Jagielski 2023, Theorem 3.1; "
        f"{result.candidates} guess rules, union-bounded)",
    ]
    lines.append(f"the largest ε̂ this audit could show (every guess of its best rule right): "
                 f"{result.max_detectable:.3f}")
    for name, value in claimed.items():
        lines.append(f"{name}: {'none (no DP)' if value is None else epsilon_text(value)}")  # up, as every ε shown
        if value is not None and value >= result.max_detectable:
            needed = canaries_to_refute(value, result.confidence, result.delta)
            more = (f"about {needed} canaries could" if needed else
                    f"not even {MAX_DEFAULT_CANARIES} canaries could")
            lines.append(f"  this audit cannot refute ε = {epsilon_text(value)}: it could show at most ε̂ = "
                         f"{result.max_detectable:.3f} ({more})")
    return lines
