"""What DP does not cover in a run, in plain words: everything the server still sees.

The report lists these beside the guarantees, because a guarantee is only as useful as what it leaves out:
the server sees every reply in the clear (unless secure aggregation is on: then only their sum), the metadata clients send to
be weighted and accounted, the metrics they report, and any statistics of client data a data-driven
adapter initialization needs at round 0.
"""

from __future__ import annotations

from omegaconf import DictConfig

from ..adapters.registry import get_method

__all__ = ["init_uses_client_data", "server_sees"]



def reveals_record_count(cfg: DictConfig) -> bool:
    """Whether the server learns each client's number of records: under weighting by examples in the clear; not under
    uniform weighting, nor under secure aggregation, where it learns only the sum of the counts. Where it does not,
    nothing a client sends may depend on its count beyond what its sample rate says (DP-SGD's normalizer, round 0's
    count)."""
    return cfg.federation.weighting == "examples" and not cfg.federation.secure_aggregation.enabled

def init_uses_client_data(method: str) -> tuple[bool, str]:
    """(whether the method's initialization needs statistics of client data, what it needs): the registry's
    ``calibration`` kinds say it, not the free-text description."""
    spec = get_method(method)
    return bool(spec.calibration), spec.init_needs


def server_sees(privacy: DictConfig, federation: DictConfig | None, *, method: str, batch_size: int) -> list[str]:
    """Bullet points (Markdown) for the report's "what is not protected" section: of a federation, or of the
    centralized baseline (``federation=None``). ``method``: the adapter's; ``batch_size``: the clients' (expected)
    batch."""
    if federation is None:
        return [
            "Centralized baseline: all training records are pooled on one machine, so whoever runs it sees every "
            "record; DP covers only what the released adapter reveals about any one record.",
            _noise_source(privacy),
        ]
    level = privacy.client_level.enabled
    secagg = federation.secure_aggregation
    items = []
    if secagg.enabled:
        items.append(
            "**Only the sum of each round's client updates** (secure aggregation, SecAgg+: every update reaches the "
            "server masked; it learns the sum of the weighted, quantized updates of the clients that finished the "
            f"round, never one update alone, unless more than {secagg.threshold:.0%} of a client's neighbours "
            "collude with the server). "
            + ("Each update in the sum is itself a DP release: the ε shown covers the sum." if privacy.enabled
               else "Without record-level DP the sum itself is not protected.")
            + (" Under client-level DP the sum already carries the clients' own noise shares (distributed Skellam "
               "noise): the server never sees it un-noised. The server cannot check an update's norm: each client "
               f"clips its whole update to {privacy.client_level.clipping_norm:g} itself." if level else
               f" The server cannot check an update's norm: each client clips every coordinate to "
               f"±{secagg.clip_range:g} and caps its weight at {secagg.max_weight}.")
        )
        if not level:
            # Beside its masked vector each client reports, in the clear, how many coordinates it clipped (the
            # operator's check on clip_range): a function of one update, not of the sum, so it must be listed. Under
            # client-level DP nothing of one update leaves in the clear: the guarantee covers only the noised sum.
            items.append(
                "**How many coordinates of each client's update were beyond ±clip_range** (`clipped_coordinates`, in "
                "the clear beside its masked vector): a statistic of each update alone, not of the sum"
                + (" (each update is a record-level DP release, so the ε shown covers it)." if privacy.enabled
                   else " (without record-level DP, nothing covers it).")
            )
    elif privacy.enabled:
        items.append(
            "**Each sampled client's update, in the clear, before aggregation** (fedspec has no secure "
            "aggregation). Under record-level DP each update is itself a DP release, so this costs no more "
            "privacy for records than the ε shown" + ("; client-level DP protects only what the server releases, "
                                                     "not these individual updates." if level else ".")
        )
    else:
        items.append("**Each sampled client's update, in the clear and without any noise** (no record-level DP, "
                     "no secure aggregation): it can reveal individual training records to the server.")
    # The accountant's ε is for add/remove-one adjacency, under which a client's record count n is itself
    # private: anything that reveals n exactly is outside the guarantee, and the report must say so.
    if federation.weighting == "examples" and secagg.enabled:
        items.append("**The total number of training records of each round's clients** (their weights, inside the "
                     "masked sum; no client's count alone). The ε shown is for adding or removing one record, under "
                     "which counts are private: this total is **not covered by the ε**. "
                     "`federation.weighting=uniform` sends a fixed weight instead.")
    elif federation.weighting == "examples":
        items.append("**The exact number of training records of each client** (`num-examples`, its aggregation "
                     "weight). The ε shown is for adding or removing one record, under which this count is itself "
                     "private: sending it exactly is **not covered by the ε**. Set `federation.weighting=uniform` "
                     "to send a fixed weight instead.")
    else:
        items.append("No record counts as weights: clients send a fixed weight (`federation.weighting=uniform`).")
    if privacy.enabled and privacy.get("sample_rate") is not None:
        items.append(f"Each client's sample rate and noise multiplier: the same for every client (q = "
                     f"{privacy.sample_rate:g}, fixed by `privacy.sample_rate`), so they say nothing of its record "
                     "count.")
    elif privacy.enabled:
        items.append(
            "**Each client's sample rate q = 1/⌈n/B⌉ and noise multiplier** (the server keeps a copy of every "
            f"ledger for this report): they reveal its number of records n to within one batch of B = "
            f"{batch_size} records, whatever the weighting — also outside the ε, which treats n as "
            "private. `privacy.sample_rate=1/k` (the same q, hence the same σ, for every client) closes this "
            "channel."
        )
    items.append(("Each client's number of local steps and training time" if secagg.enabled else
                  "**Each client's mean training loss in every round it trained** (computed on its records without "
                  "noise: not covered by DP), its number of local steps, its training time") +
                 (", its ε" if privacy.enabled else "") + ".")
    items.append("**Who took part when:** which clients were sampled, which replied, which declined a round "
                 "because their budget was spent, and which failed.")
    uses_data, needs = init_uses_client_data(method)
    if uses_data and privacy.private_init_stats:
        items.append(f"Round-0 statistics of client data: adapter.method={method} initializes from "
                     f"{needs}; each client clipped and noised its sums over a fixed-size subset of its records "
                     f"(Gaussian mechanism, noise σ = {privacy.init_noise_multiplier:g} times the subset's sensitivity "
                     "2C), counted in its ε as round 0. The number of records the sums cover is released only "
                     "where the client's number of records is (federation.weighting=examples in the clear).")
    elif uses_data:
        items.append(f"**Round-0 statistics of client data:** adapter.method={method} initializes from "
                     f"{needs}; these statistics are not privatized in this run (set privacy.private_init_stats=true).")
    else:
        items.append(f"Round-0 statistics of data-driven initializations: none in this run "
                     f"(adapter.method={method} initializes from {needs}, no client data).")
    items.append("Evaluation: the server evaluates the global model on its own held-out data; clients send no "
                 "evaluation metrics.")
    if privacy.enabled or level:
        items.append(_noise_source(privacy))
    return items


def _noise_source(privacy: DictConfig) -> str:
    if privacy.seed_noise:
        return ("**Noise source: seeded (privacy.seed_noise=true), for tests only** — anyone who knows the seed "
                "can remove the noise; no guarantee holds against them.")
    return ("Noise source: torch generators seeded from OS entropy (`secrets`), not a cryptographically secure "
            "RNG (Opacus' secure_mode needs torchcsprng, which does not build on current torch).")
