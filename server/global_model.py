"""The server's copy of the model: initializes the global adapter once and evaluates every round.

Initialization runs here, once (e.g. PiSSA's SVD): clients receive the factors and, for residual methods,
the init factors ``B0, A0`` from which they rebuild ``W - s·B0·A0`` on their own copy of the base weights.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from fedspec.adapters import Calibration, adapter_state, load_adapter_state, save_adapter
from fedspec.adapters.state import INIT_KEYS
from fedspec.builders import Task, build_model, encode
from fedspec.privacy.planning import schedule_steps
from fedspec.training import evaluate
from fedspec.strategies import get_rule


def split_init_factors(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(trainable/broadcast tensors, residual init factors): the second part is sent once per node."""
    init = {k: v for k, v in state.items() if k.endswith(INIT_KEYS)}
    rest = {k: v for k, v in state.items() if k not in init}
    return rest, init


class GlobalModel:
    def __init__(
        self,
        cfg: DictConfig,
        task: Task,
        *,
        initialize: bool = True,
        calibration: Calibration | None = None,
        rank_pattern: dict[str, int] | None = None,
    ) -> None:
        """``calibration``: the clients' summed round-0 statistics (data-driven methods); ``rank_pattern``: the
        per-layer ranks of a resumed EVA adapter."""
        rule = get_rule(cfg.strategy.name)
        self.cfg = cfg
        self.model, tokenizer = build_model(
            cfg, task.num_classes, train_A=rule.clients_train_A, initialize=initialize, calibration=calibration,
            rank_pattern=rank_pattern, total_steps=schedule_steps(cfg),
        )
        self.eval_inputs, self.eval_labels = encode(tokenizer, task.eval, cfg.model.max_length)

    def state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in adapter_state(self.model).items()}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        load_adapter_state(self.model, state, strict=False)

    def evaluate(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
        if state is not None:
            self.load(state)
        return evaluate(self.model, self.eval_inputs, self.eval_labels, self.cfg.train.eval_batch_size)

    def save(self, directory, metadata: dict) -> None:
        save_adapter(self.model, directory, metadata=metadata)
