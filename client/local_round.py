"""One federated round on a client: load the global adapter, train under DP, account, build the reply."""

from __future__ import annotations

from flwr.app import Context, Message
from omegaconf import DictConfig

from fedspec.adapters import adapter_layers, adapter_roles, adapter_state, load_adapter_state
from fedspec.adapters.state import TRAINED
from fedspec.errors import FedspecError
from fedspec.strategies import client_update, get_rule
from fedspec.strategies.flower import BASE_INIT_KEY
from fedspec.training import DPSettings, train_steps

from .runtime import client_id, load_ledger, model_and_data, noise_multiplier, remember_base_init, store_ledger


def train_one_round(cfg: DictConfig, msg: Message, context: Context) -> tuple[dict, dict]:
    round_ = int(msg.content.config_records["config"]["server-round"])
    rule = get_rule(cfg.strategy.name)
    model, data = model_and_data(cfg, context)
    client = client_id(context)

    base_init = remember_base_init(context, msg.content.array_records.get(BASE_INIT_KEY))
    needs_fixed = any(layer.fixed_tensor_names() for layer in adapter_layers(model).values())
    if needs_fixed and not base_init:
        raise FedspecError(
            f"client {client}: adapter.method={cfg.adapter.method} has fixed tensors (a residual base or frozen "
            "factors), but this node never received them from the server (its state was lost); "
            "restart the run with run.resume=true"
        )
    received = msg.content.array_records["arrays"].to_torch_state_dict()
    load_adapter_state(model, {**received, **base_init})

    dp = None
    if cfg.privacy.enabled:
        sigma = noise_multiplier(cfg, context, len(data))
        seed = (cfg.run.seed * 1_000_003 + client * 1009 + round_) if cfg.privacy.seed_noise else None
        dp = DPSettings(sigma, cfg.privacy.max_grad_norm, cfg.privacy.accountant, seed=seed)
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
        # Schedules (AdaLoRA's rank budget) run over the client's whole schedule, not one round.
        first_step=(round_ - 1) * cfg.train.local_steps,
        total_steps=cfg.federation.rounds * cfg.train.local_steps,
    )
    client_trained = {k for k, role in adapter_roles(model).items() if role == TRAINED}
    update = client_update(adapter_state(model), received, rule, client_trained=client_trained)
    metrics = {
        "client-id": client,
        "num-examples": len(data),
        "train-loss": result.mean_loss,
        "steps": result.steps,
    }
    if dp is not None:
        ledger = load_ledger(cfg, context)
        ledger.record(round_, result.noise_multiplier, result.sample_rate, result.steps,
                      attempt=ledger.next_attempt(round_))
        store_ledger(cfg, context, ledger)
        metrics.update({
            "noise-multiplier": result.noise_multiplier,
            "sample-rate": result.sample_rate,
            "epsilon": ledger.epsilon(),
        })
    return update, metrics
