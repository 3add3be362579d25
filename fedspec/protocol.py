"""The messages between the server and its clients: every key spelled once, every reply typed and validated.

Flower-free: the client and the strategy convert between these and Flower's records (``MetricRecord`` and
``ConfigRecord`` are mappings of scalars; ``ArrayRecord`` holds the tensors). What a client sends is untrusted
input: :meth:`TrainReply.from_metrics` and :func:`check_update` say exactly what is wrong with a reply, so the
server can leave it out of the round (quarantine it, with the reason in its log) instead of crashing on it.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import FedspecError

if TYPE_CHECKING:  # torch loads only where tensors are checked: a forwarding ClientApp never imports it
    import torch

# RecordDict keys
ARRAYS = "arrays"  # a train reply's tensors: the client's update (trained - received)
METRICS = "metrics"  # every reply's scalars
CONFIG = "config"  # the server's instructions
BASE_INIT = "base-init"  # fixed adapter tensors (e.g. PiSSA's residual init factors), sent once per node
STATISTICS = "statistics"  # round 0 of a data-driven initialization: the client's statistic sums
SECAGG = "secagg"  # secure aggregation's payload (keys, encrypted shares, unmask lists): bytes and strings
MASKED = "masked"  # under secure aggregation, the one tensor of a train reply: the masked, quantized update

# Config keys (server → client)
SERVER_ROUND = "server-round"
VERSION = "fedspec-version"  # the server's fedspec release: clients refuse another
LABELS = "label-names"  # the task's class names: how a node labels its own data file
CALIBRATION_FLAG = "calibration-statistics"  # a query for round 0's statistics
SECAGG_STAGE = "secagg-stage"  # a query of secure aggregation's exchanges: "advertise", "share" or "unmask"
ADVERTISE, SHARE, UNMASK = "advertise", "share", "unmask"
SURVIVORS, DROPPED = "survivors", "dropped"  # the unmask query's lists of node ids (strings: ids are uint64)
NOISE_SHARES = "noise-shares"  # distributed client-level noise: the round's client adds 1/this of the noise

# Metric keys (client → server)
CLIENT_ID = "client-id"
NUM_EXAMPLES = "num-examples"  # absent under federation.weighting=uniform: the server never learns the count
TRAIN_LOSS = "train-loss"
TRAIN_SECONDS = "train-seconds"  # the client's own training time this round (round time minus this: overhead)
STEP_SECONDS = "step-seconds"  # its mean time per optimizer step this round
CUDA = "cuda"  # 1: the client trained on a CUDA device (train.device), 0: on its CPU
PEAK_MEMORY_MIB = "peak-memory-mib"  # CUDA: peak memory torch allocated this round; CPU: the process's peak RSS
STEPS = "steps"
NOISE_MULTIPLIER = "noise-multiplier"
SAMPLE_RATE = "sample-rate"
EPSILON = "epsilon"  # the client's ε over all its steps so far
ATTEMPT = "attempt"  # how many times the client has trained this round (> 1 after a server crash and resume)
DECLINED = "declined"  # 1: the client refused to train (its privacy budget would be exceeded)
BUDGET_EPSILON = "budget-epsilon"
CALIBRATION_EXAMPLES = "calibration-examples"
PRIVATIZED = "privatized"
CLIPPED_COORDINATES = "clipped-coordinates"  # secure aggregation: coordinates clipped to ±clip_range before quantizing

# A record count above this is not a client's dataset but an attempt to take over the weighted mean.
MAX_NUM_EXAMPLES = 10**9
MAX_ATTEMPTS = 1000  # a round retried more often than this is a hostile count, not resumes


class ProtocolError(FedspecError):
    """A reply that does not match what the server sent or what the protocol allows."""


def _number(metrics: Mapping, key: str, *, integer: bool = False, required: bool = True):
    value = metrics.get(key)
    if value is None:
        if required:
            raise ProtocolError(f"the reply has no {key!r} metric")
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError(f"metric {key!r} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ProtocolError(f"metric {key!r} must be finite, got {value!r}")
    if integer:
        if value != int(value):
            raise ProtocolError(f"metric {key!r} must be a whole number, got {value!r}")
        return int(value)
    return float(value)


@dataclass(frozen=True)
class TrainReply:
    """The metrics of a client's reply to a train instruction (declined: it trained nothing)."""

    client_id: int
    declined: bool = False
    train_loss: float | None = None
    steps: int = 0
    num_examples: int | None = None
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    epsilon: float | None = None
    budget_epsilon: float | None = None
    # The client's own count of its attempts at this round: a round it trained before a server crash and again
    # after the resume was released twice, and the server's mirror ledger (reloaded from the checkpoint before
    # that round) must count both.
    attempt: int | None = None
    clipped_coordinates: int | None = None  # secure aggregation: coordinates clipped to ±clip_range
    train_seconds: float | None = None
    step_seconds: float | None = None
    cuda: bool | None = None
    peak_memory_mib: float | None = None

    @property
    def private(self) -> bool:
        """Whether it reports a DP-SGD round for the privacy ledger."""
        return self.noise_multiplier is not None

    def to_metrics(self) -> dict[str, int | float]:
        metrics: dict[str, int | float] = {CLIENT_ID: self.client_id}
        if self.declined:
            metrics[DECLINED] = 1
        for key, value in ((TRAIN_LOSS, self.train_loss), (STEPS, self.steps if not self.declined else None),
                           (NUM_EXAMPLES, self.num_examples), (NOISE_MULTIPLIER, self.noise_multiplier),
                           (SAMPLE_RATE, self.sample_rate), (EPSILON, self.epsilon),
                           (BUDGET_EPSILON, self.budget_epsilon), (ATTEMPT, self.attempt),
                           (CLIPPED_COORDINATES, self.clipped_coordinates), (TRAIN_SECONDS, self.train_seconds),
                           (STEP_SECONDS, self.step_seconds), (CUDA, None if self.cuda is None else int(self.cuda)),
                           (PEAK_MEMORY_MIB, self.peak_memory_mib)):
            if value is not None:
                metrics[key] = value
        return metrics

    @classmethod
    def from_metrics(cls, metrics: Mapping, *, needs_examples: bool) -> TrainReply:
        """Parse and validate; ``needs_examples``: the server weights clients by their record counts."""
        client = _number(metrics, CLIENT_ID, integer=True)
        if client < 0:
            raise ProtocolError(f"metric {CLIENT_ID!r} must be >= 0, got {client}")
        epsilon = _number(metrics, EPSILON, required=False)
        if epsilon is not None and epsilon < 0:
            raise ProtocolError(f"metric {EPSILON!r} must be >= 0, got {epsilon}")
        if _number(metrics, DECLINED, integer=True, required=False):
            return cls(client, declined=True, epsilon=epsilon,
                       budget_epsilon=_number(metrics, BUDGET_EPSILON, required=False))
        steps = _number(metrics, STEPS, integer=True)
        if steps < 1:
            raise ProtocolError(f"metric {STEPS!r} must be >= 1, got {steps}")
        examples = _number(metrics, NUM_EXAMPLES, integer=True, required=needs_examples)
        if examples is not None and not 0 < examples <= MAX_NUM_EXAMPLES:
            raise ProtocolError(f"metric {NUM_EXAMPLES!r} must be in 1..{MAX_NUM_EXAMPLES}, got {examples}")
        sigma = _number(metrics, NOISE_MULTIPLIER, required=False)
        q = _number(metrics, SAMPLE_RATE, required=sigma is not None)
        if sigma is not None and (sigma <= 0 or not 0 < q <= 1):
            raise ProtocolError(f"metrics {NOISE_MULTIPLIER!r}={sigma} and {SAMPLE_RATE!r}={q} are not a DP-SGD "
                                "setting (σ > 0, 0 < q <= 1)")
        attempt = _attempt(metrics)
        clipped = _number(metrics, CLIPPED_COORDINATES, integer=True, required=False)
        if clipped is not None and clipped < 0:
            raise ProtocolError(f"metric {CLIPPED_COORDINATES!r} must be >= 0, got {clipped}")
        seconds, step_seconds, peak = (_number(metrics, key, required=False)
                                       for key in (TRAIN_SECONDS, STEP_SECONDS, PEAK_MEMORY_MIB))
        for key, value in ((TRAIN_SECONDS, seconds), (STEP_SECONDS, step_seconds), (PEAK_MEMORY_MIB, peak)):
            if value is not None and value < 0:
                raise ProtocolError(f"metric {key!r} must be >= 0, got {value}")
        cuda = _number(metrics, CUDA, integer=True, required=False)
        if cuda not in (None, 0, 1):
            raise ProtocolError(f"metric {CUDA!r} must be 0 or 1, got {cuda}")
        # No loss under secure aggregation: a client's own loss is data no DP guarantee covers
        return cls(client, train_loss=_number(metrics, TRAIN_LOSS, required=False), steps=steps, num_examples=examples,
                   noise_multiplier=sigma, sample_rate=q, epsilon=epsilon, attempt=attempt, clipped_coordinates=clipped,
                   train_seconds=seconds,
                   step_seconds=step_seconds, cuda=None if cuda is None else bool(cuda), peak_memory_mib=peak)


@dataclass(frozen=True)
class StatisticsReply:
    """The metrics of a client's round-0 reply: its calibration statistic sums (data-driven initializations)."""

    client_id: int
    calibration_examples: int
    privatized: bool
    noise_multiplier: float | None = None  # a privatized release: one Gaussian mechanism, counted in its ε
    sample_rate: float | None = None
    steps: int = 0
    attempt: int | None = None  # > 1: the client released round 0 before, to a server that then crashed and resumed

    @property
    def private(self) -> bool:
        return self.noise_multiplier is not None

    @classmethod
    def from_metrics(cls, metrics: Mapping) -> StatisticsReply:
        client = _number(metrics, CLIENT_ID, integer=True)
        examples = _number(metrics, CALIBRATION_EXAMPLES, integer=True)
        if client < 0 or examples < 0:
            raise ProtocolError(f"metrics {CLIENT_ID!r}={client} and {CALIBRATION_EXAMPLES!r}={examples} must be >= 0")
        sigma = _number(metrics, NOISE_MULTIPLIER, required=False)
        if sigma is None:
            return cls(client, examples, bool(_number(metrics, PRIVATIZED, integer=True)))
        return cls(client, examples, True, sigma, _number(metrics, SAMPLE_RATE), _number(metrics, STEPS, integer=True),
                   _attempt(metrics))


def _attempt(metrics: Mapping) -> int | None:
    """The optional metric ``attempt``: how many times the client has released this round."""
    attempt = _number(metrics, ATTEMPT, integer=True, required=False)
    if attempt is not None and not 1 <= attempt <= MAX_ATTEMPTS:
        raise ProtocolError(f"metric {ATTEMPT!r} must be in 1..{MAX_ATTEMPTS}, got {attempt}")
    return attempt


def error_reason(reason: str) -> str:
    """The one line of a failed reply: what fedspec's ClientApp raised, without the wrapping Flower's runtimes put
    around it (``<class '…ClientAppException'>:<'\\nException ClientAppException occurred. Message: …'>``)."""
    message = reason.split("Message: ", 1)[-1] if "Message: " in reason else reason
    message = message.removesuffix("'>").strip()
    return (message.splitlines() or [""])[0][:500]


def claimed_identity(claimed: int, node: int, client: int | None) -> None:
    """A reply must come from the client the server mapped to its node at discovery."""
    if claimed != client:
        raise ProtocolError(f"the reply claims client {claimed}, but node {node} is client {client}")


def reply_tensors(array_records: Mapping, name: str) -> dict[str, torch.Tensor]:
    """The tensors of a reply's array record ``name`` (a Flower ``ArrayRecord``), or a ProtocolError when the
    record is missing, or naming the tensor that cannot be read (see :func:`_reply_tensor`)."""
    if name not in array_records:
        raise ProtocolError(f"the reply has no {name!r} record")
    return {key: _reply_tensor(name, key, array) for key, array in array_records[name].items()}


def _reply_tensor(record: str, key: str, array) -> torch.Tensor:
    """One tensor of a reply, read from its bytes (numpy's format). Its header (dtype and shape strings beside the
    bytes) is the client's word, passed on unchecked by Flower and read by the server's traffic count: it must
    say what the bytes hold."""
    import torch

    where = f"tensor {_brief(key)} of the {record!r} record"
    try:
        values = array.numpy()
        header_matches = array.dtype == str(values.dtype) and tuple(array.shape) == values.shape
        tensor = torch.from_numpy(values)
    except Exception as error:  # noqa: BLE001 — whatever a client put there, it is not the server's crash
        raise ProtocolError(f"{where} cannot be read: {str(error)[:200]}") from None
    if not header_matches:
        raise ProtocolError(f"{where} declares dtype {_brief(array.dtype)} and shape {_brief(array.shape)}, "
                            f"but its data holds {values.dtype} of shape {values.shape}")
    return tensor


def _brief(value, limit: int = 120) -> str:
    """``repr(value)``, cut to ``limit`` characters: a client's strings go into the server's log lines."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def check_update(update: Mapping[str, torch.Tensor], sent: Mapping[str, torch.Tensor], expected: Collection[str]) -> None:
    """A client's update must carry exactly the ``expected`` keys, each a finite floating tensor of the shape the
    server sent: nothing is broadcast, nothing is missing, nothing extra rides along."""
    keys = set(update)
    if keys != set(expected):
        missing, extra = sorted(set(expected) - keys), sorted(keys - set(expected))
        raise ProtocolError(f"the update's tensors do not match what the round trains: missing {missing[:3]}, "
                            f"extra {extra[:3]}")
    import torch

    for key, tensor in update.items():
        if not tensor.is_floating_point():
            raise ProtocolError(f"tensor {key!r} must be floating point, got {tensor.dtype}")
        if tuple(tensor.shape) != tuple(sent[key].shape):
            raise ProtocolError(f"tensor {key!r} has shape {tuple(tensor.shape)}, the server sent {tuple(sent[key].shape)}")
        if not torch.isfinite(tensor).all():
            raise ProtocolError(f"tensor {key!r} holds NaN or Inf")


def check_statistics(flat: Mapping[str, torch.Tensor], layout: Mapping[str, tuple[int, ...]], count_key: str,
                     examples: int) -> None:
    """A round-0 reply's statistic sums must be exactly the tensors ``layout`` names (the server's adapted layers and
    the method's kinds), each finite and of that shape, and ``count_key`` the example count its metrics state."""
    if set(flat) != set(layout):
        missing, extra = sorted(set(layout) - set(flat)), sorted(set(flat) - set(layout))
        raise ProtocolError(f"the statistics do not match the adapted layers: missing {missing[:3]}, extra {extra[:3]}")
    import torch

    for key, tensor in flat.items():
        if tuple(tensor.shape) != layout[key]:
            raise ProtocolError(f"statistic {key!r} has shape {tuple(tensor.shape)}, expected {layout[key]}")
        if not torch.isfinite(tensor).all():
            raise ProtocolError(f"statistic {key!r} holds NaN or Inf")
    count = flat[count_key]
    if count.is_floating_point() or count.dtype == torch.bool or int(count) != examples:
        raise ProtocolError(f"the statistics count {count.item()!r} examples, the reply's metric "
                            f"{CALIBRATION_EXAMPLES!r} {examples}")


def check_masked(arrays: Mapping[str, torch.Tensor], size: int) -> torch.Tensor:
    """Under secure aggregation a train reply carries one tensor: the masked update, ``size`` int64 residues."""
    if set(arrays) != {MASKED}:
        raise ProtocolError(f"a secure-aggregation reply must carry only {MASKED!r}, got {sorted(arrays)[:3]}")
    import torch

    vector = arrays[MASKED]
    if vector.dtype != torch.int64 or tuple(vector.shape) != (size,):
        raise ProtocolError(f"{MASKED!r} must be {size} int64 values, got {vector.dtype} of shape {tuple(vector.shape)}")
    if bool(((vector < 0) | (vector >= 2**62)).any()):
        raise ProtocolError(f"{MASKED!r} holds values outside [0, 2^62)")
    return vector
