"""SST (Zhao et al., 2024): U·diag(Σ)·Vᵀ kept factored; all Σ and r sampled (u_i, v_i) pairs train; the pairs
are resampled ∝ σ, with a re-SVD every few resamplings (in a federation, by the server after every round)."""

from __future__ import annotations

import torch
from torch import nn

from ...errors import AdapterError
from ..hooks import HookContext
from ..inject import AdapterConfig
from ..layers import FactorLinear
from ..registry import MethodSpec, register
from .common import cast, full_rank, full_svd, layers_of


def build_layer(base, rank, scaling, *, dropout, options) -> FactorLinear:
    return FactorLinear(base, full_rank(base), rank, dropout=dropout)


def initialize(weights: torch.Tensor, rank: int, scaling: float, *, generator: torch.Generator,
               **_: object) -> dict[str, torch.Tensor]:
    """SST (Zhao et al., 2024): the full thin SVD of W; r triplets drawn multinomially ∝ σ (without replacement)
    become the trainable ones, ordered first."""
    U, S, Vh = full_svd(weights)
    out: dict[str, list[torch.Tensor]] = {k: [] for k in
                                          ("sel_left.weight", "rest_left.weight", "sel_right.weight",
                                           "rest_right.weight", "spectrum.weight")}
    for i in range(weights.shape[0]):
        chosen = torch.multinomial(S[i].clamp_min(1e-30).cpu(), rank, replacement=False, generator=generator)
        mask = torch.ones(S.shape[-1], dtype=torch.bool)
        mask[chosen] = False
        order = torch.cat([chosen, torch.arange(S.shape[-1])[mask]])
        Ui, Si, Vi = U[i][:, order], S[i][order], Vh[i][order]
        out["sel_left.weight"].append(Ui[:, :rank])
        out["rest_left.weight"].append(Ui[:, rank:])
        out["sel_right.weight"].append(Vi[:rank])
        out["rest_right.weight"].append(Vi[rank:])
        out["spectrum.weight"].append(Si)
    return cast({k: torch.stack(v) for k, v in out.items()}, weights.dtype)


def _generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63))


class SpectralResampler:
    """SST's structural update every ``every`` steps: fold the trained vectors, re-SVD every ``resvd_every``-th
    time, draw r new triplets ∝ σ, and reset the optimizer's moment estimates of the tensors that changed meaning
    (the sampled vectors and the re-ordered spectrum). Seeded by (seed, step), so reruns draw the same sets."""

    def __init__(self, every: int, resvd_every: int, context: HookContext) -> None:
        if every < 1:
            raise AdapterError(f"adapter.options.resample_every={every} must be a positive number of steps")
        self.every, self.resvd_every = every, resvd_every
        self.optimizer, self.seed = context.optimizer, context.seed

    @torch.no_grad()
    def after_step(self, model: nn.Module, step: int) -> None:
        if (step + 1) % self.every:
            return
        count = (step + 1) // self.every
        resample_all(model, _generator(self.seed, step), resvd=self.resvd_every > 0 and count % self.resvd_every == 0)
        if self.optimizer is not None:
            for layer in layers_of(model, FactorLinear):
                for p in (layer.sel_left.weight, layer.sel_right.weight, layer.spectrum.weight):
                    self.optimizer.state.pop(p, None)


def resample_all(model: nn.Module, generator: torch.Generator, *, resvd: bool) -> None:
    for layer in layers_of(model, FactorLinear):
        layer.resample(generator, resvd=resvd)


def hooks(model: nn.Module, config: AdapterConfig, context: HookContext) -> list:
    if config.federated:  # the server resamples between rounds (server_step)
        return []
    return [SpectralResampler(int(config.options["resample_every"]), int(config.options["resvd_every"]), context)]


def server_step(model: nn.Module, config: AdapterConfig, round_: int, seed: int) -> None:
    """Federated SST: after aggregating round t, the server folds the averaged vectors, re-SVDs every
    ``resvd_every`` rounds, and draws the next round's r triplets per layer (seeded by the run's seed and the round,
    so a resumed run draws the same and runs of other seeds draw others); the new frozen vectors are broadcast with
    the rest of the state."""
    resvd_every = int(config.options["resvd_every"])
    resample_all(model, _generator(seed, round_), resvd=resvd_every > 0 and round_ % resvd_every == 0)


register(MethodSpec(name="sst", initializer=initialize, base_policy="owned", layer=build_layer,
                    init_needs="weights (full SVD)", federated="nonlinear", hooks=hooks, server_step=server_step))
