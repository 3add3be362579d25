"""The server's copy of the model: initializes the global adapter once and evaluates every round.

Initialization runs here, once (e.g. PiSSA's SVD): clients receive the adapter tensors and, once per node, the
*fixed* ones (e.g. PiSSA's init factors ``B0, A0``, LoRA-XS's frozen bases) from which they rebuild the base on
their own copy of the original weights. Which tensors are fixed, trained by clients or owned by the server is
the method's federated rule, read from the model (``fedspec.adapters.adapter_roles``).

The model lives on ``federation.server_device`` (a GPU when the server's host has one); what leaves this class —
the state broadcast to clients, aggregated and checkpointed — is always on the CPU.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn

from fedspec.adapters import (
    Calibration,
    adapter_config,
    adapter_roles,
    adapter_state,
    get_method,
    load_adapter_state,
    save_adapter,
)
from fedspec.adapters.state import FIXED, TRAINED
from fedspec.builders import ModelSettings, Task, answer_score, apply_adapter, build_backbone, encode
from fedspec.devices import resolve_device
from fedspec.strategies import get_rule
from fedspec.training import evaluate


def split_fixed(
    state: dict[str, torch.Tensor], roles: dict[str, str]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(tensors broadcast every round, fixed tensors): the second part is sent once per node."""
    fixed = {k: v for k, v in state.items() if roles.get(k) == FIXED}
    rest = {k: v for k, v in state.items() if k not in fixed}
    return rest, fixed


class GlobalModel:
    def __init__(
        self,
        cfg: DictConfig,
        task: Task,
        *,
        initialize: bool = True,
        calibration: Calibration | None = None,
        rank_pattern: dict[str, int] | None = None,
        backbone: tuple[nn.Module, object] | None = None,
    ) -> None:
        """``calibration``: the clients' summed round-0 statistics (data-driven methods); ``rank_pattern``: the
        per-layer ranks of a resumed EVA adapter; ``backbone``: the un-adapted model and its tokenizer, when round 0
        already loaded them (:func:`fedspec.builders.build_backbone`)."""
        rule = get_rule(cfg.strategy.name)
        self.cfg = cfg
        settings = ModelSettings.of(cfg)
        self.model, tokenizer = backbone or build_backbone(settings, task.num_classes)
        apply_adapter(settings, self.model, train_A=rule.clients_train_A, initialize=initialize,
                      calibration=calibration, rank_pattern=rank_pattern, federated=True)
        self.device = resolve_device(cfg.federation.server_device, "federation.server_device")
        self.model.to(self.device)
        self.eval_inputs, self.eval_labels = encode(tokenizer, task.eval, cfg.model.max_length)
        self.tokenizer, self.held_out = tokenizer, task.eval

    def state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", copy=True) for k, v in adapter_state(self.model).items()}

    def roles(self) -> dict[str, str]:
        return adapter_roles(self.model)

    def client_trained(self) -> set[str]:
        """The keys clients train and send (the method's federated rule under the configured strategy)."""
        return {k for k, role in self.roles().items() if role == TRAINED}

    def after_round(self, state: dict[str, torch.Tensor], round_: int) -> dict[str, torch.Tensor]:
        """Run the method's server step (e.g. SST's coordinated resampling) on the aggregated state; returns the
        state to broadcast next round (unchanged for methods without one)."""
        config = adapter_config(self.model)
        step = get_method(config.method).server_step
        if step is None:
            return state
        self.load(state)
        step(self.model, config, round_, int(self.cfg.run.seed))
        broadcast, _ = split_fixed(self.state(), self.roles())
        return broadcast

    def load(self, state: dict[str, torch.Tensor]) -> None:
        load_adapter_state(self.model, state, strict=False)

    def evaluate(self, state: dict[str, torch.Tensor] | None = None, *, answers: bool = False) -> dict[str, float]:
        """Held-out loss and accuracy; with ``answers``, a causal LM's answer accuracy too (greedy decoding,
        ``data.generation_examples`` records: costly, so only at the start and the end of a run)."""
        if state is not None:
            self.load(state)
        metrics = evaluate(self.model, self.eval_inputs, self.eval_labels, self.cfg.train.eval_batch_size)
        if answers:
            metrics["answer_accuracy"] = answer_score(self.cfg.data, self.model, self.tokenizer, self.held_out,
                                                     self.cfg.train.eval_batch_size)
        return metrics

    def save(self, directory, metadata: dict) -> None:
        save_adapter(self.model, directory, metadata=metadata)
