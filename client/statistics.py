"""Round 0 on a client: its calibration statistics for a data-driven initialization (CorDA, EVA, LoRA-GA, FWSVD).

The client computes the per-layer sums over up to ``adapter.calibration_examples`` of its records (those with the
smallest seeded hash of their content) on the un-adapted model, and replies with the sums and the number of records
they cover (where the run keeps record counts private and the sums are privatized, the public cap instead: the
count would reveal the number of records of a client with fewer). With ``privacy.private_init_stats`` the sums are
clipped per record and noised (the Gaussian mechanism, ``fedspec.adapters.calibration``) and the release is
recorded in the client's privacy ledger as round 0, (σ₀, q = 1, 1 step), before it leaves the client, so it
composes with every later DP-SGD step in the client's ε; a client whose budget it would exceed refuses to release it.
"""

from __future__ import annotations

import dataclasses

import torch
from flwr.app import Context
from omegaconf import DictConfig
from torch import nn

from fedspec.adapters import Calibration
from fedspec.builders import AdapterSettings, InitStatistics, calibrate
from fedspec.errors import FedspecError
from fedspec.models import Tokenized
from fedspec.privacy.accounting import epsilon, epsilon_text
from fedspec.privacy.disclosures import reveals_record_count
from fedspec.privacy.planning import PlanSettings, check_delta, init_statistics_entries
from fedspec.protocol import (
    ATTEMPT,
    CALIBRATION_EXAMPLES,
    CLIENT_ID,
    EPSILON,
    NOISE_MULTIPLIER,
    NUM_EXAMPLES,
    PRIVATIZED,
    SAMPLE_RATE,
    STEPS,
)

from .released import (
    STATISTICS_FILE,
    load_released,
    received_fingerprint,
    settings_fingerprint,
    store_released,
)
from .runtime import base_model_and_data, client_id, ledger_path, load_ledger, store_ledger


def local_calibration(
    cfg: DictConfig, client: int, model: nn.Module, inputs: Tokenized, labels: torch.Tensor
) -> Calibration:
    """Client ``client``'s (possibly privatized) statistic sums over its seeded subset of records."""
    noise_seed = (cfg.run.seed * 1_000_003 + client * 1009) if cfg.privacy.seed_noise else None
    privacy = InitStatistics.of(cfg).mechanism(seed=noise_seed)
    return calibrate(AdapterSettings.of(cfg.adapter), model, inputs, labels, privacy=privacy,
                     seed=cfg.run.seed * 7919 + client)


def _check_release(cfg: DictConfig, context: Context, client: int, n: int) -> None:
    """Refuse a privatized statistic that this client's DP settings do not cover, as before every DP-SGD round
    (a deployed run has no preflight that would refuse such a config before it starts): δ must be below 1/n on
    its own n records, and the release must not push its ε past its budget."""
    check_delta(float(cfg.privacy.delta), [n], [client])
    plan = PlanSettings.of(cfg)
    if plan.budget_epsilon is None:
        return
    ledger = load_ledger(cfg, context)
    spent = epsilon([*ledger.history(), *init_statistics_entries(cfg.privacy, cfg.adapter.method)], ledger.delta,
                    ledger.accountant)
    if spent > plan.budget_epsilon:
        raise FedspecError(
            f"client {client}: its round-0 statistic "
            f"(privacy.init_noise_multiplier={cfg.privacy.init_noise_multiplier:g}) "
            f"would bring its ε to {epsilon_text(spent)} at δ = {ledger.delta:g}, past {plan.budget_key}="
            f"{plan.budget_epsilon:g}; it is not released: raise privacy.init_noise_multiplier or the budget")


def client_statistics(cfg: DictConfig, context: Context) -> tuple[dict, dict]:
    """(flat statistic tensors, metrics) of this client's round-0 reply. A privatized statistic is kept beside the
    ledger (:mod:`.released`): a server that crashed during round 0 and asks again gets the same one, at no new
    cost, as the uninterrupted run would have."""
    client = client_id(context)
    folder, settings = ledger_path(cfg, context).parent, settings_fingerprint(cfg)
    fingerprint = received_fingerprint(0, {})  # round 0 receives no state: the settings (and seed) decide
    if InitStatistics.of(cfg).private:
        kept = load_released(folder, 0, fingerprint, settings, name=STATISTICS_FILE)
        if kept is not None:
            return kept
    model, data = base_model_and_data(cfg, context)
    if InitStatistics.of(cfg).private:
        _check_release(cfg, context, client, len(data))
    calibration = local_calibration(cfg, client, model, data.inputs, data.labels)
    if calibration.privatized and not reveals_record_count(cfg):
        # The sums cover min(n, calibration_examples) records, which would tell the server n for a smaller client;
        # a client that keeps n to itself reports the public cap, and the server averages over it (a client
        # with fewer records then weighs a little less in the mean, as its records do in the sums).
        calibration = dataclasses.replace(calibration, count=cfg.adapter.calibration_examples)
    metrics = {
        CLIENT_ID: client,
        CALIBRATION_EXAMPLES: calibration.count,
        PRIVATIZED: int(calibration.privatized),
    }
    if reveals_record_count(cfg):
        metrics[NUM_EXAMPLES] = len(data)
    if calibration.privatized:
        ledger = load_ledger(cfg, context)
        for sigma, q, steps in init_statistics_entries(cfg.privacy, cfg.adapter.method):
            attempt = ledger.next_attempt(0)
            ledger.record(0, sigma, q, steps, attempt=attempt)
            # > 1 when a resumed server asks again: the server's mirror must count every release this client made
            metrics.update({NOISE_MULTIPLIER: sigma, SAMPLE_RATE: q, STEPS: steps, ATTEMPT: attempt})
        store_ledger(cfg, context, ledger)
        metrics[EPSILON] = ledger.epsilon()
    tensors = calibration.to_tensors()
    if calibration.privatized:  # after the ledger: a kept statistic always has its release counted
        store_released(folder, 0, fingerprint, tensors, metrics, settings, name=STATISTICS_FILE)
    return tensors, metrics
