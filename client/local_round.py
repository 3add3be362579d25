"""One federated round on a client: check the budget, load the global adapter, train under DP, account, reply.

Before training, a client under record-level DP asks its ledger whether this round's steps would push its
ε past its budget (``privacy.budget_epsilon``, by default ``privacy.target_epsilon``). If so it declines:
it replies with no update and the metric ``declined = 1`` (and its ε so far), trains nothing and spends
nothing; the server records it and goes on without it. A round it has answered already (the server crashed and
resumed into it) gets the same answer again, at no new cost (:mod:`.released`).
"""

from __future__ import annotations

import time
from dataclasses import replace

from flwr.app import Context, Message
from omegaconf import DictConfig

from fedspec.adapters import (
    adapter_layers,
    adapter_roles,
    adapter_state,
    get_method,
    load_adapter_state,
    ranks_in_state,
)
from fedspec.adapters.state import TRAINED
from fedspec.devices import peak_memory_mib, reset_peak_memory
from fedspec.errors import FedspecError
from fedspec.privacy.disclosures import reveals_record_count
from fedspec.privacy.planning import PlanSettings, check_delta, client_sample_rate
from fedspec.protocol import ARRAYS, BASE_INIT, CONFIG, SERVER_ROUND, TrainReply
from fedspec.strategies import client_update, get_rule
from fedspec.training import DPSettings, train_steps

from .released import load_released, received_fingerprint, settings_fingerprint, store_released
from .runtime import (
    client_id,
    ledger_path,
    load_ledger,
    model_and_data,
    noise_multiplier,
    remember_base_init,
    store_ledger,
)


def train_one_round(cfg: DictConfig, msg: Message, context: Context) -> tuple[dict, dict]:
    round_ = int(msg.content.config_records[CONFIG][SERVER_ROUND])
    rule = get_rule(cfg.strategy.name)
    received = msg.content.array_records[ARRAYS].to_torch_state_dict()
    # Per-layer ranks (EVA) were decided by the server in round 0: the received state carries them.
    rank_pattern = ranks_in_state(received) if get_method(cfg.adapter.method).ranks is not None else None
    model, data = model_and_data(cfg, context, rank_pattern)
    client = client_id(context)

    base_init = remember_base_init(context, msg.content.array_records.get(BASE_INIT))
    needs_fixed = any(layer.fixed_tensor_names() for layer in adapter_layers(model).values())
    if needs_fixed and not base_init:
        raise FedspecError(
            f"client {client}: adapter.method={cfg.adapter.method} has fixed tensors (a residual base or frozen "
            "factors), but this node never received them from the server (its state was lost); "
            "restart the run with run.resume=true"
        )
    plan = PlanSettings.of(cfg)
    dp = None
    if cfg.privacy.enabled:
        fingerprint, settings = received_fingerprint(round_, received), settings_fingerprint(cfg)
        released = load_released(ledger_path(cfg, context).parent, round_, fingerprint, settings)
        if released is not None:  # the server resumed into a round this client had answered: the same answer
            return released
        check_delta(float(cfg.privacy.delta), [len(data)], [client])  # a node with its own data: the server never saw n
        sigma = noise_multiplier(plan, context, len(data))
        declined = _decline_if_over_budget(plan, cfg, context, client, sigma, len(data))
        if declined is not None:
            return {}, declined
        seed = (cfg.run.seed * 1_000_003 + client * 1009 + round_) if cfg.privacy.seed_noise else None
        dp = DPSettings(sigma, cfg.privacy.max_grad_norm, cfg.privacy.accountant,
                        grad_sample_mode=cfg.privacy.grad_sample_mode,
                        head_clip_share=cfg.privacy.get("head_clip_share"),
                        sample_rate=client_sample_rate(plan, len(data)) if plan.fixed_sample_rate else None,
                        batch_normalizer=None if reveals_record_count(cfg) else cfg.train.batch_size,
                        seed=seed)

    load_adapter_state(model, {**received, **base_init})
    device = next(model.parameters()).device
    reset_peak_memory(device)
    started = time.perf_counter()
    result = train_steps(
        model,
        data.inputs,
        data.labels,
        steps=cfg.train.local_steps,
        batch_size=cfg.train.batch_size,
        optimizer=cfg.train.optimizer,
        lr=cfg.train.lr,
        dp=dp,
        seed=cfg.run.seed + 1000 * round_ + client,
        # Schedules (SoMA's weight decay, AdaLoRA's rank budget) span the client's whole schedule, not one round.
        first_step=(round_ - 1) * cfg.train.local_steps,
        total_steps=plan.schedule_steps,
        physical_batch_size=cfg.train.physical_batch_size,
    )
    seconds = time.perf_counter() - started
    client_trained = {k for k, role in adapter_roles(model).items() if role == TRAINED}
    trained = {k: v.cpu() for k, v in adapter_state(model).items()}  # the reply holds CPU tensors
    update = client_update(trained, received, rule, client_trained=client_trained)
    # uniform weighting: the server never learns the count
    examples = len(data) if cfg.federation.weighting == "examples" else None
    reply = TrainReply(client, train_loss=result.mean_loss, steps=result.steps, num_examples=examples,
                       train_seconds=round(seconds, 3), step_seconds=round(seconds / max(result.steps, 1), 4),
                       cuda=device.type == "cuda", peak_memory_mib=round(peak_memory_mib(device), 1))
    if dp is not None:
        ledger = load_ledger(cfg, context)
        attempt = ledger.next_attempt(round_)
        ledger.record(round_, result.noise_multiplier, result.sample_rate, result.steps, attempt=attempt)
        store_ledger(cfg, context, ledger)
        reply = replace(reply, noise_multiplier=result.noise_multiplier, sample_rate=result.sample_rate,
                        epsilon=ledger.epsilon(), attempt=attempt)
        store_released(ledger_path(cfg, context).parent, round_, fingerprint, update, reply.to_metrics(), settings)
    return update, reply.to_metrics()


def _decline_if_over_budget(plan: PlanSettings, cfg: DictConfig, context: Context, client: int, sigma: float,
                            n: int) -> dict | None:
    """The reply metrics of a declined round, or None when this round fits the client's budget."""
    budget = plan.budget_epsilon
    if budget is None:
        return None
    ledger = load_ledger(cfg, context)
    q = client_sample_rate(plan, n)  # the rate Opacus will account
    if not ledger.would_exceed(budget, noise_multiplier=sigma, sample_rate=q, steps=plan.local_steps):
        return None
    return TrainReply(client, declined=True, epsilon=ledger.epsilon(), budget_epsilon=budget).to_metrics()
