"""THE local training loop: used by `fedspec train` (centralized) and by every federated client.

One function, :func:`train_steps`, runs a fixed number of optimizer steps on a tokenized dataset, either
plainly or under record-level DP-SGD (Opacus: Poisson sampling, per-sample clipping, Gaussian noise).
:func:`evaluate` reports loss and accuracy.
"""

from __future__ import annotations

import math
import secrets
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from .adapters.hooks import HookContext, training_hooks
from .models import Tokenized


@dataclass(frozen=True)
class DPSettings:
    """Record-level DP-SGD for one training call."""

    noise_multiplier: float
    max_grad_norm: float
    accountant: str = "rdp"
    # How Opacus gets per-sample gradients: "hooks" (per-layer rules, per-sample gradients stored) or "ghost"
    # (per-sample norms only, then a second backward pass); both exact, see fedspec.privacy.grad_samplers.
    grad_sample_mode: str = "hooks"
    # Per-group clipping: the classification head's per-sample gradient is clipped to head_clip_share · C and the
    # adapter's to √(1 − share²) · C, so neither can take the other's part of the clipping budget (at init the
    # head's per-sample gradient is ~10× the adapter's and takes almost all of a flat clip). The total norm stays
    # ≤ C and the noise σ·C, so the privacy accounting is unchanged. None: one flat clip of the whole gradient.
    head_clip_share: float | None = None
    # A Poisson rate fixed by the server (1/k): k batches per epoch at that rate. None: q = 1/⌈n/batch_size⌉, the
    # rate Opacus derives from a loader of that batch size.
    sample_rate: float | None = None
    # What the noised sum of clipped gradients is divided by. None: ⌊n·q⌋, the expected batch. A client that keeps n
    # private (weighting=uniform, secure aggregation) passes a public number (train.batch_size): ⌊n·q⌋ shows in the
    # update's noise scale, σC/⌊n·q⌋, so one record more would be visible where the ε says nothing of n.
    batch_normalizer: int | None = None
    # Seeded noise and sampling are reproducible — and therefore not private against anyone who knows the
    # seed. Tests only; by default both come from generators seeded with OS entropy.
    seed: int | None = None


@dataclass(frozen=True)
class TrainResult:
    mean_loss: float
    steps: int
    examples: int  # records sampled over all steps
    noise_multiplier: float | None = None
    sample_rate: float | None = None


def make_optimizer(params: list[nn.Parameter], name: str, lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    raise ValueError(f"train.optimizer={name!r} is not supported; choose adam or sgd")


def _dataset(data: Tokenized, labels: torch.Tensor) -> TensorDataset:
    return TensorDataset(data.input_ids, data.attention_mask, labels)


def _trim(input_ids: torch.Tensor, attention_mask: torch.Tensor,
          labels: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """Drop the trailing padding columns no example in the batch uses (and the same columns of per-token
    labels): the cost of a step follows its longest example."""
    length = max(int(attention_mask.sum(1).max()), 1) if attention_mask.numel() else 1
    trimmed = (input_ids[:, :length], attention_mask[:, :length])
    if labels is None:
        return trimmed
    return (*trimmed, labels[:, :length] if labels.dim() == 2 else labels)


def _on(device: torch.device, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A batch moved to the model's device (data stays on the CPU until a batch of it is used)."""
    return tuple(t.to(device, non_blocking=True) for t in tensors)


def _model_device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def criterion(model: nn.Module) -> nn.Module:
    """The model's training loss: next-token loss on responses for a causal LM (its ``criterion()``),
    cross-entropy on the class for a classifier."""
    own = getattr(model, "criterion", None)
    return own() if callable(own) else nn.CrossEntropyLoss()


def _cycle(loader: DataLoader) -> Iterator[tuple[torch.Tensor, ...]]:
    """The loader's batches, pass after pass (each pass of a Poisson loader draws fresh samples)."""
    while True:
        yield from loader


def _entropy_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed if seed is not None else secrets.randbits(63))


def train_steps(
    model: nn.Module,
    data: Tokenized,
    labels: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    optimizer: str | torch.optim.Optimizer = "adam",
    lr: float = 1e-3,
    dp: DPSettings | None = None,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
    first_step: int = 0,
    total_steps: int | None = None,
    physical_batch_size: int | None = None,
    drop_last: bool = True,
) -> TrainResult:
    """Run ``steps`` optimizer steps on the trainable parameters of ``model``.

    ``physical_batch_size`` bounds how many records go through the model at once (a small GPU): a larger
    (logical) batch is split into micro-batches whose gradients add up to the same step — under DP by Opacus'
    ``BatchMemoryManager`` (per-sample clipping per micro-batch, the noise once per logical batch), without DP
    by weighting each micro-batch's mean loss by its share of the batch.

    ``first_step`` is the run's global index of this call's first step (an epoch's or a federated round's
    offset): the adapter's hooks see global steps, so a schedule (weight-decay annealing, rank budgets) spans
    the whole run rather than restarting with every call. ``on_step`` still gets the step within the call.

    Under DP each step is one Poisson-sampled batch (expected size ``batch_size``) with per-sample clipping and
    noise; the steps taken are returned so the caller's privacy ledger records exactly what happened.

    After every step the adapter method's hooks run (see ``fedspec.adapters.hooks``). When this call is one part
    of a longer training (an epoch, a federated round), ``first_step`` is the global index of its first step and
    ``total_steps`` the length of the whole training, for schedules; by default this call is all of it.

    ``optimizer`` is a name (a fresh optimizer over the trainable parameters at ``lr``, as a federated client makes
    each round) or an optimizer the caller keeps across calls, so its state (Adam's moments and step count) spans
    them: `fedspec train` passes one for all its epochs.

    Without DP the batches are passes over a shuffle of the records; ``drop_last`` drops each pass's short last batch,
    so that every step of a federated client is a full batch, or keeps it (`fedspec train`: ``ceil(n / batch_size)``
    steps are then exactly one pass over every record). Under DP every batch is Poisson-sampled and this is unused.
    """
    if len(data) == 0:
        raise ValueError("train_steps got an empty dataset")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; call fedspec.adapt first")
    model.train()
    opt = optimizer if isinstance(optimizer, torch.optim.Optimizer) else make_optimizer(params, optimizer, lr)
    loss_fn = criterion(model)
    dataset = _dataset(data, labels)
    schedule = (first_step, total_steps if total_steps is not None else first_step + steps, lr, seed)
    if dp is None:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
        loader = DataLoader(dataset, batch_size=min(batch_size, len(dataset)), sampler=sampler, drop_last=drop_last)
        return _loop(model, opt, loss_fn, loader, steps, on_step, schedule, split=physical_batch_size)
    return _train_private(model, opt, loss_fn, dataset, steps=steps, batch_size=batch_size, dp=dp, on_step=on_step,
                          schedule=schedule, physical_batch_size=physical_batch_size)


def _mark_empty_batch(params: list[nn.Parameter]) -> None:
    """Give Opacus zero per-sample gradients for a Poisson batch that sampled no record.

    Transformers cannot run a forward pass on zero rows, yet DP-SGD must still take the step: the accountant
    counts it and the noise is what makes an empty batch indistinguishable from a full one.
    """
    for p in params:
        p.grad_sample = p.new_zeros((0, *p.shape))  # hooks mode clips and sums these
        p.grad = torch.zeros_like(p)  # ghost mode sums .grad directly


def _loop(model, opt, loss_fn, loader, steps, on_step, schedule, *, private: bool = False,
          split: int | None = None) -> TrainResult:
    """``steps`` optimizer steps. Under Opacus' BatchMemoryManager the loader yields micro-batches and the DP
    optimizer only steps at the end of each logical batch; ``split`` micro-batches a non-private batch here."""
    params = [p for p in model.parameters() if p.requires_grad]
    first_step, total_steps, lr, seed = schedule
    device = _model_device(model)
    # Hooks see the (DP) optimizer: after its step, p.grad holds the privatized gradient.
    hooks = training_hooks(model, HookContext(lr=lr, total_steps=total_steps, optimizer=opt, seed=seed))
    total_loss, examples, step = 0.0, 0, 0
    batches = _cycle(loader)
    while step < steps:
        input_ids, attention_mask, y = next(batches)
        opt.zero_grad(set_to_none=True)  # a DP optimizer keeps the clipped sum of a logical batch's micro-batches
        if len(y) > 0:
            for rows in _micro_batches(len(y), split):
                ids, mask, labels = _on(device, *_trim(input_ids[rows], attention_mask[rows], y[rows]))
                loss = loss_fn(_outputs(model, ids, mask, labels), labels)
                (loss if len(labels) == len(y) else loss * (len(labels) / len(y))).backward()
                total_loss += loss.item() * len(labels)
            examples += len(y)
        elif private:
            _mark_empty_batch(params)
        else:
            continue
        opt.step()
        if getattr(opt, "_is_last_step_skipped", False):  # a micro-batch: its logical batch goes on
            continue
        for hook in hooks:
            hook.after_step(model, first_step + step)
        if on_step is not None:
            on_step(step, total_loss / max(examples, 1))
        step += 1
    return TrainResult(mean_loss=total_loss / max(examples, 1), steps=steps, examples=examples)


def group_clip_norms(model: nn.Module, max_grad_norm: float, head_share: float | None) -> list[float] | None:
    """Opacus' per-parameter clipping norms for per-group clipping (see ``DPSettings.head_clip_share``): the head's
    tensors share head_share · C, the adapter's √(1 − head_share²) · C, each group split evenly over its tensors
    (their root sum of squares is C). None when the share is unset or the model has no trainable head."""
    if head_share is None:
        return None
    is_head = [name.startswith("head.") for name, p in model.named_parameters() if p.requires_grad]
    if all(is_head) or not any(is_head):
        return None
    shares = {True: head_share, False: math.sqrt(1.0 - head_share**2)}
    sizes = {True: sum(is_head), False: len(is_head) - sum(is_head)}
    return [max_grad_norm * shares[head] / math.sqrt(sizes[head]) for head in is_head]


def _outputs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor):
    """What the loss reads: a classifier's logits, or a causal LM's logits at its response positions only."""
    from .causal_lm import CausalLM

    if isinstance(model, CausalLM):
        return model(input_ids, attention_mask, labels)
    return model(input_ids, attention_mask)


def _micro_batches(size: int, split: int | None) -> list[slice]:
    if not split or split >= size:
        return [slice(0, size)]
    return [slice(start, start + split) for start in range(0, size, split)]


def _poisson_loader(dataset, rate: float, generator):
    """Opacus' Poisson loader at ``rate`` = 1/k, built here rather than by Opacus from a batched loader, so that it
    samples at most the rate Opacus accounts, q = 1/(its number of batches per epoch):
    - Opacus runs int(1/rate) batches per epoch, and 1/(1/k) rounds below k in floating point for 6 % of all k
      (93, 99, 105 …): it would account 1/(k−1) where fedspec planned σ for 1/k. The loader is told to run k.
    - It keeps a record when torch.rand, a float32 on a grid of 2^-24, is below the rate cast to float32: a record
      is kept with chance ⌈fl32(rate)·2^24⌉/2^24, up to 2^-24 above 1/k (at 1/k = 1/40,000, ε 3.0006 where 3.000
      was accounted). A multiple of 2^-24 is exact in float32 and kept with exactly that chance: the largest one
      <= 1/k."""
    from opacus.data_loader import DPDataLoader

    batches = round(1 / rate)
    grid = 2**24  # torch.rand's float32 resolution
    if batches > grid:
        raise ValueError(f"a Poisson rate of 1/{batches} is below torch.rand's resolution of 2^-24, so Opacus cannot "
                         "sample it; raise train.batch_size (or privacy.sample_rate)")
    loader = DPDataLoader(dataset, sample_rate=math.floor(grid / batches) / grid, generator=generator)
    loader.batch_sampler.steps = batches  # len(loader): Opacus accounts q = 1/batches
    return loader


def _train_private(model, opt, loss_fn, dataset, *, steps, batch_size, dp: DPSettings, on_step, schedule,
                   physical_batch_size: int | None = None) -> TrainResult:
    from opacus import PrivacyEngine

    from .privacy.accounting import sample_rate
    from .privacy.grad_samplers import check_exact_rules

    check_exact_rules(model)  # never per-sample gradients of frozen weights (Opacus' functorch fallback)
    rate = dp.sample_rate if dp.sample_rate is not None else sample_rate(len(dataset), batch_size)
    loader = _poisson_loader(dataset, rate, _entropy_generator(dp.seed))
    norms = group_clip_norms(model, dp.max_grad_norm, dp.head_clip_share)
    with warnings.catch_warnings():
        # Opacus warns that secure_mode is off: fedspec states the noise source in its privacy report.
        warnings.filterwarnings("ignore", message=".*Secure RNG.*")
        engine = PrivacyEngine(accountant=dp.accountant)
        hooks, dp_opt, *ghost_loss, dp_loader = engine.make_private(
            module=model,
            optimizer=opt,
            data_loader=loader,
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm if norms is None else norms,
            clipping="flat" if norms is None else "per_layer",
            poisson_sampling=False,  # the loader samples by Poisson already (_poisson_loader)
            # On the model's device: Opacus draws the noise there, and torch refuses a CPU generator
            # for CUDA tensors.
            noise_generator=_entropy_generator(None if dp.seed is None else dp.seed + 1, _model_device(model)),
            wrap_model=False,  # keep the caller's model object (and its cached adapter) as it is
            grad_sample_mode=dp.grad_sample_mode,
            criterion=loss_fn,
        )
    # Ghost mode returns its own criterion: its backward() runs the norm pass and the clipped pass.
    loss_fn = ghost_loss[0] if ghost_loss else loss_fn
    # Opacus divides the noised sum by int(n · q); with q = 1/k and n = m·k the float product can land just below m
    # and truncate to m − 1: a step m/(m − 1) too large, or a division by zero when m = 1 (49 records, batch 1).
    expected = max(1, math.floor(len(dataset) * rate + 1e-9))
    dp_opt.expected_batch_size = dp.batch_normalizer or expected
    try:
        with warnings.catch_warnings():
            # Frozen embeddings mean no input of the hooked layers requires grad; the hook is still correct.
            warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
            if physical_batch_size:
                from opacus.utils.batch_memory_manager import BatchMemoryManager

                with BatchMemoryManager(data_loader=dp_loader, max_physical_batch_size=physical_batch_size,
                                        optimizer=dp_opt) as micro_loader:
                    result = _loop(model, dp_opt, loss_fn, micro_loader, steps, on_step, schedule, private=True)
            else:
                result = _loop(model, dp_opt, loss_fn, dp_loader, steps, on_step, schedule, private=True)
    finally:
        hooks.cleanup()
    (sigma, q, accounted_steps), *rest = engine.accountant.history or [(dp.noise_multiplier, 0.0, 0)]
    if rest or accounted_steps != steps:
        raise RuntimeError(f"Opacus accounted {engine.accountant.history}, expected {steps} steps of one setting")
    return TrainResult(result.mean_loss, steps, result.examples, noise_multiplier=sigma, sample_rate=q)


def _by_length(attention_mask: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Row indices in batches of similar length: trimmed to its longest row, a batch then carries little
    padding (SST-2's validation rows: a third of the tokens of batches in file order)."""
    order = torch.argsort(attention_mask.sum(1), stable=True)
    return list(order.split(batch_size))


@torch.no_grad()
def predict_logits(model: nn.Module, data: Tokenized, batch_size: int = 128) -> torch.Tensor:
    """Logits of every row, in the rows' order."""
    was_training = model.training
    model.eval()
    device = _model_device(model)
    logits = None
    for rows in _by_length(data.attention_mask, batch_size):
        out = model(*_on(device, *_trim(data.input_ids[rows], data.attention_mask[rows])))
        if logits is None:  # on the CPU, with the labels they are scored against
            logits = torch.empty((len(data), *out.shape[1:]), dtype=out.dtype)
        logits[rows] = out.cpu()
    model.train(was_training)
    return logits if logits is not None else torch.empty(0)


def evaluate(model: nn.Module, data: Tokenized, labels: torch.Tensor, batch_size: int = 128) -> dict[str, float]:
    """Held-out loss and accuracy. For per-token labels (a causal LM), the loss is the mean negative
    log-likelihood of the response tokens, with its perplexity, and the accuracy is next-token accuracy."""
    if labels.dim() == 2:
        return _evaluate_tokens(model, data, labels, batch_size)
    logits = predict_logits(model, data, batch_size)
    loss = nn.functional.cross_entropy(logits, labels).item()
    accuracy = (logits.argmax(-1) == labels).float().mean().item()
    return {"loss": loss, "accuracy": accuracy}


@torch.no_grad()
def _evaluate_tokens(model: nn.Module, data: Tokenized, labels: torch.Tensor, batch_size: int) -> dict[str, float]:
    was_training = model.training
    model.eval()
    total_nll, correct, tokens = 0.0, 0, 0
    device = _model_device(model)
    for rows in _by_length(data.attention_mask, batch_size):
        ids, mask, y = _on(device, *_trim(data.input_ids[rows], data.attention_mask[rows], labels[rows]))
        nll, right, count = model.response_scores(ids, mask, y)
        total_nll, correct, tokens = total_nll + nll, correct + right, tokens + count
    model.train(was_training)
    loss = total_nll / max(tokens, 1)
    return {"loss": loss, "accuracy": correct / max(tokens, 1), "perplexity": math.exp(min(loss, 700.0))}
