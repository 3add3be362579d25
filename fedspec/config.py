"""Structured config: schemas, Hydra composition, validation, and the bridge to Flower's apps.

The YAML tree lives in ``configs/`` (installed as ``fedspec.configs``) and is the one source of default
values; the dataclasses below only fix the keys and their types. ``compose_config(overrides)`` composes
it with Hydra, checks types against the dataclass schemas below and validates values, so a bad value fails
at once with one line naming the key and what is allowed. ``fedspec simulate`` hands its Flower apps the whole
config as one JSON string (``config_to_json`` / ``config_from_json``); under ``flwr run`` the run_config carries
Hydra overrides (``config_from_run_config``).
"""

from __future__ import annotations

import functools
import json
import math
import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigError


@dataclass
class ModelConfig:
    name: str = MISSING
    path: str | None = MISSING
    max_length: int = MISSING
    pooling: str = MISSING
    dropout: float | None = MISSING  # None keeps the checkpoint's dropout
    dtype: str = "float32"  # the frozen base's precision: float32 | bfloat16 | float16 (adapters stay float32)


@dataclass
class DataConfig:
    source: str = MISSING  # synthetic | file | hf
    path: str | None = MISSING
    eval_path: str | None = MISSING
    text_field: str = MISSING
    label_field: str = MISSING
    format: str = MISSING
    num_examples: int = MISSING
    eval_examples: int = MISSING
    max_examples: int | None = MISSING
    partition: str = MISSING  # dirichlet | iid
    alpha: float = MISSING
    min_client_examples: int = MISSING
    validation: bool = MISSING  # tuning: score on a split carved from the training records, never on the held-out data
    holdout_seed: int = 0  # seeds the held-out carve (or the sample of eval_path), fixed whatever run.seed is
    has_header: bool | None = None  # file sources: whether the first row names the columns (None: detect it)
    split: str = "train"  # source=hf: the split to train on (a slice too, quoted: data.split="'train[:10%]'")
    eval_split: str | None = None  # source=hf: the split to score on (None: a held-out set carved from `split`)
    label_names: list[str] | None = None  # file sources: the class names in class-id order (None: from the file)
    task: str = "classification"  # classification | causal_lm
    prompt: str | None = None  # causal_lm on classification data: the user turn, "{text}" replaced by the record's text
    label_words: list[str] | None = None  # causal_lm on classification data: the response for each class
    answer: str = "exact"  # how a generated answer is scored: exact (its first line) | gsm8k (the number after ####)
    generation_examples: int = 0  # held-out records decoded (greedy) for the answer score; 0: none
    max_new_tokens: int = 32  # the longest generated answer


@dataclass
class AdapterSettings:
    method: str = MISSING
    rank: int = MISSING
    alpha: float | None = MISSING  # None: alpha = rank (scaling 1)
    targets: list[str] | None = MISSING  # None: the model family's attention query/value
    dropout: float = MISSING
    svd_method: str = MISSING
    niter: int = MISSING
    oversample: int = MISSING
    svd_pass_precision: str = MISSING  # full | bfloat16 | auto: precision of the randomized SVD's passes over W
    train_head: bool = MISSING
    # Data-driven initializers (CorDA, EVA, LoRA-GA, FWSVD): examples whose statistics initialize the adapter
    # (centralized: from the pooled training data; federated: up to this many per client, summed in round 0).
    calibration_examples: int = MISSING
    options: dict[str, Any] = MISSING  # the method's own hyperparameters (METHODS[method].options: their defaults)


@dataclass
class StrategyConfig:
    name: str = MISSING  # fedsvd | ffa | fedit | fedavg
    server_lr: float = MISSING  # η of the server step η·m (1.0: apply the clients' mean update as it is)
    server_momentum: float = MISSING  # β of m ← β·m + mean update (0.0: no momentum; FedAvgM)


@dataclass
class ClientLevelConfig:
    """Client-level DP on the server: clip each client's whole update, Gaussian noise on the sum."""

    enabled: bool = MISSING
    target_epsilon: float | None = MISSING  # over all rounds, with client sampling rate federation.fraction
    noise_multiplier: float | None = MISSING  # set to skip planning
    clipping_norm: float = MISSING  # bound on the L2 norm of one client's update (all its tensors together)
    delta: float = MISSING  # must be well below 1/federation.clients
    # Under secure aggregation the clients add the noise (distributed Skellam noise, fedspec.privacy.skellam), each
    # 1/min_survivors of it, and a round is summed only when at least this many survive. None: the whole cohort.
    min_survivors: int | None = MISSING


@dataclass
class PrivacyConfig:
    enabled: bool = MISSING  # record-level DP-SGD on every client
    target_epsilon: float | None = MISSING
    noise_multiplier: float | None = MISSING  # set to skip planning
    budget_epsilon: float | None = MISSING  # each client's hard cap (None: target_epsilon)
    delta: float = MISSING
    max_grad_norm: float = MISSING
    accountant: str = MISSING  # rdp | prv
    grad_sample_mode: str = MISSING  # hooks | ghost (per-sample gradients, or ghost clipping's norms only)
    seed_noise: bool = MISSING  # tests only: seeded noise is not private against an adversary who knows the seed
    head_clip_share: float | None = None  # per-group clipping: the head's share of max_grad_norm (None: flat)
    # Every federated client's Poisson rate, the same for all (1/k): q and σ then say nothing of a client's record
    # count. None: q = 1/⌈n/batch_size⌉ per client.
    sample_rate: float | None = None
    # Round 0 of data-driven initializers: release each client's calibration sums clipped and noised (Gaussian
    # mechanism, counted in the client's ε as one step with q = 1), or exactly.
    private_init_stats: bool = MISSING
    init_noise_multiplier: float = MISSING
    # Clipping norm of one record's whole contribution, per statistic kind (inputs, gradients, fisher).
    init_max_norm: dict[str, float] = MISSING
    client_level: ClientLevelConfig = field(default_factory=ClientLevelConfig)


@dataclass
class TrainConfig:
    optimizer: str = MISSING  # adam | sgd
    lr: float = MISSING
    batch_size: int = MISSING
    local_steps: int = MISSING
    epochs: int = MISSING  # centralized `fedspec train`
    max_steps: int | None = None  # `fedspec train`: this many DP-SGD steps instead of epochs whole passes
    centralized_lr: float | None = None  # `fedspec train`'s own rate; None: lr
    rates_need_dp: bool = False  # the rates are DP-SGD's: refused with privacy=none unless the command line sets lr
    eval_batch_size: int = MISSING
    physical_batch_size: int | None = None  # records per forward/backward pass (a small GPU); None: the whole batch
    device: str = "auto"  # auto | cpu | cuda | cuda:N (fedspec.devices)


@dataclass
class SecureAggregationConfig:
    """SecAgg+ (fedspec.secagg): the server learns only the sum of the clients' quantized, weighted updates."""

    enabled: bool = False
    neighbours: int | None = None  # each client masks with this many others on a ring (SecAgg+); None: all (SecAgg)
    threshold: float = 0.5  # shares needed to rebuild a client's secrets: more than this fraction of its neighbours
    clip_range: float = 4.0  # every coordinate of an update is clipped to ±clip_range, then quantized
    bits: int = 24  # 2^bits quantization levels across [-clip_range, clip_range]
    max_weight: int = 1_000_000  # a client's weight (its record count) is capped here


@dataclass
class FederationConfig:
    clients: int = MISSING
    rounds: int = MISSING
    fraction: float = MISSING
    min_clients: int = MISSING
    client_cpus: float = MISSING
    round_timeout: float = MISSING
    weighting: str = MISSING  # examples | uniform (clients send a fixed weight, not their number of records)
    update_clip: float | None = MISSING  # clip each update's norm to this × the cohort's median (0/None: off)
    weight_cap: float | None = MISSING  # cap each client's weight at this × the cohort's median (0/None: off)
    server_device: str = "auto"  # where the server evaluates the global model: auto | cpu | cuda | cuda:N
    secure_aggregation: SecureAggregationConfig = field(default_factory=SecureAggregationConfig)


@dataclass
class AuditConfig:
    """The one-run canary audit (`fedspec audit`); canaries = 0 everywhere else."""

    canaries: int = MISSING  # m canaries, each included in its client's data with probability 1/2
    seed: int = MISSING  # draws the canaries, their owners, labels and inclusion bits
    confidence: float = MISSING  # of the lower bound on epsilon


@dataclass
class RunConfig:
    name: str | None = MISSING
    output_dir: str = MISSING
    seed: int = MISSING
    resume: bool = MISSING
    progress: bool = MISSING


@dataclass
class FedspecConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    adapter: AdapterSettings = field(default_factory=AdapterSettings)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    run: RunConfig = field(default_factory=RunConfig)


# The strategies' names, for validation without importing torch; each one's rule is defined once, in
# strategies/aggregation.py (RULES), and a test keeps the two in step.
STRATEGIES = ("fedsvd", "ffa", "fedit", "fedavg")
CHOICES: dict[str, tuple] = {
    "data.source": ("synthetic", "file", "hf"),
    "data.partition": ("dirichlet", "iid"),
    "data.format": ("auto", "tsv", "csv", "jsonl"),
    "data.task": ("classification", "causal_lm"),
    "data.answer": ("exact", "gsm8k"),
    "adapter.svd_method": ("randomized", "subspace", "exact"),
    "adapter.svd_pass_precision": ("full", "bfloat16", "auto"),
    "strategy.name": STRATEGIES,
    "privacy.accountant": ("rdp", "prv"),
    "privacy.grad_sample_mode": ("hooks", "ghost"),
    "federation.weighting": ("examples", "uniform"),
    "train.optimizer": ("adam", "sgd"),
    "model.pooling": ("mean", "last"),
    "model.dtype": ("float32", "bfloat16", "float16"),
}


# train.device and federation.server_device: auto, cpu, cuda or cuda:N (fedspec.devices resolves them; checked here
# without importing torch)
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


def config_dir() -> Path:
    import fedspec.configs

    return Path(fedspec.configs.__file__).parent


def _one_line(error: OmegaConfBaseException) -> str:
    key = getattr(error, "full_key", None)
    message = str(error).splitlines()[0]
    return f"{key}: {message}" if key else message


def compose_config(
    overrides: list[str] | None = None, config_name: str = "config", *, check_files: bool = True
) -> DictConfig:
    """Compose the Hydra config tree with ``key=value`` overrides, type-check it and validate it
    (``check_files``: see :func:`validate`)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    overrides = list(overrides or [])
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
            raw = compose(config_name=config_name, overrides=overrides)
    except HydraException as error:
        raise ConfigError(f"bad override: {str(error).splitlines()[0]}") from None
    finally:
        GlobalHydra.instance().clear()
    _command_line_rate_wins(raw, overrides)
    return to_structured(raw, check_files=check_files)


def _command_line_rate_wins(raw: DictConfig, overrides: list[str]) -> None:
    """A recipe's rates give way to a train.lr the command line sets: the command line wins over a recipe, so
    train.lr=0.01 must not leave `fedspec train` stepping at the recipe's train.centralized_lr, and a rate the user
    chose is not refused for being a DP-SGD recipe's (train.rates_need_dp)."""
    keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    if "train.lr" in keys:
        with open_dict(raw):
            raw.train.rates_need_dp = False
            if "train.centralized_lr" not in keys:
                raw.train.centralized_lr = None


def to_structured(raw: Any, *, check_files: bool = True) -> DictConfig:
    """Merge a plain or DictConfig mapping into the schemas (type errors name the key) and validate values."""
    schema = OmegaConf.structured(FedspecConfig)
    try:
        cfg = OmegaConf.merge(schema, raw)
        validate(cfg, check_files=check_files)
    except OmegaConfBaseException as error:
        raise ConfigError(f"invalid config value: {_one_line(error)}") from None
    return cfg


def validate(cfg: DictConfig, *, check_files: bool = True) -> None:
    """Value checks that types alone cannot express. Data-dependent checks (δ vs client sizes, budget
    reachability) run when the data is loaded; see ``fedspec.privacy.planning``. ``check_files=False`` skips
    the existence of data.path / data.eval_path: on a deployed client they name files on the server's
    machine (a client with its own data never reads them; one that does gets the loader's error)."""
    from .adapters import METHODS

    def fail(key: str, value: Any, allowed: str) -> None:
        raise ConfigError(f"{key}={value!r} is not allowed; {allowed}")

    # NaN passes every `x <= 0` check below, and ∞ is no setting anywhere
    for key, value in _leaves(OmegaConf.to_container(cfg, throw_on_missing=False)).items():
        if isinstance(value, float) and not math.isfinite(value):
            fail(key, value, "it must be a finite number")
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            fail(key, value, "choose one of: " + ", ".join(allowed))
    for key in ("run.seed", "audit.seed", "data.holdout_seed"):
        if OmegaConf.select(cfg, key) < 0:  # numpy's generators take no negative seed
            fail(key, OmegaConf.select(cfg, key), "a seed must be 0 or more")
    if cfg.adapter.method not in METHODS:
        fail("adapter.method", cfg.adapter.method, "choose one of: " + ", ".join(sorted(METHODS)))
    if cfg.adapter.rank < 1:
        fail("adapter.rank", cfg.adapter.rank, "it must be a positive integer")
    if cfg.adapter.targets is not None and len(cfg.adapter.targets) == 0:  # [] used to mean the default targets
        fail("adapter.targets", [], "give at least one module-name pattern, or null: the model family's query/value")
    if cfg.adapter.alpha is not None and cfg.adapter.alpha <= 0:  # s = α/r: PiSSA and others divide by it
        fail("adapter.alpha", cfg.adapter.alpha, "it must be > 0 (or null: alpha = rank)")
    for key in ("adapter.dropout", "model.dropout"):
        value = OmegaConf.select(cfg, key)
        if value is not None and not 0.0 <= value < 1.0:
            fail(key, value, "it must be in [0, 1), a probability of dropping" + (" (or null: the checkpoint's)"
                                                                                 if key == "model.dropout" else ""))
    for key in ("adapter.niter", "adapter.oversample"):
        if OmegaConf.select(cfg, key) < 0:
            fail(key, OmegaConf.select(cfg, key), "it must be 0 or more")
    if cfg.data.min_client_examples < 1:  # 0 lets a Dirichlet draw leave a client no records: nothing to train on
        fail("data.min_client_examples", cfg.data.min_client_examples,
             "it must be at least 1: every client needs records to train on (its sample rate is batch/records)")
    spec = METHODS[cfg.adapter.method]
    for key in cfg.adapter.options or {}:
        if key not in spec.options:
            fail(f"adapter.options.{key}", cfg.adapter.options[key],
                 f"adapter.method={spec.name} has the options: " + (", ".join(sorted(spec.options)) or "none"))
        _check_option_type(f"adapter.options.{key}", cfg.adapter.options[key], spec.options[key], fail)
    if spec.calibration and cfg.adapter.calibration_examples < 1:
        fail("adapter.calibration_examples", cfg.adapter.calibration_examples,
             f"adapter.method={spec.name} initializes from data: it must be at least 1")
    if cfg.federation.clients < 1:
        fail("federation.clients", cfg.federation.clients, "a federation needs at least 1 client (--clients N, N >= 1)")
    if cfg.federation.rounds < 1:
        fail("federation.rounds", cfg.federation.rounds, "it must be at least 1 (--rounds R)")
    if not 0.0 < cfg.federation.fraction <= 1.0:
        fail("federation.fraction", cfg.federation.fraction, "it must be in (0, 1] (--fraction F)")
    if cfg.strategy.server_lr <= 0:
        fail("strategy.server_lr", cfg.strategy.server_lr, "it must be > 0 (1.0: the plain mean update)")
    if not 0.0 <= cfg.strategy.server_momentum < 1.0:
        fail("strategy.server_momentum", cfg.strategy.server_momentum, "it must be in [0, 1) (0: no momentum)")
    for key in ("federation.update_clip", "federation.weight_cap"):
        value = OmegaConf.select(cfg, key)
        if value is not None and value != 0 and value < 1:
            fail(key, value, "it must be >= 1 (a multiple of the cohort's median) or 0 (off)")
    if cfg.federation.min_clients < 1:
        fail("federation.min_clients", cfg.federation.min_clients, "it must be at least 1")
    for key in ("federation.client_cpus", "federation.round_timeout"):  # Ray divides by the CPUs per client
        if OmegaConf.select(cfg, key) <= 0:
            fail(key, OmegaConf.select(cfg, key), "it must be > 0")
    _validate_secure_aggregation(cfg.federation.secure_aggregation, fail)
    for key in ("train.lr", "train.batch_size", "train.local_steps", "train.epochs", "train.eval_batch_size",
                "model.max_length"):
        value = OmegaConf.select(cfg, key)
        if value <= 0:
            fail(key, value, "it must be positive")
    if cfg.data.source in ("file", "hf") and not cfg.data.path:
        fail("data.path", cfg.data.path, f"data.source={cfg.data.source} needs data.path")
    if cfg.data.source == "file" and check_files:
        for key in ("data.path", "data.eval_path"):
            value = OmegaConf.select(cfg, key)
            if value and not Path(value).expanduser().is_file():
                raise ConfigError(f"{key}={value!r} does not exist; give the path of a TSV, CSV or JSONL file")
    for key in ("train.device", "federation.server_device"):
        value = OmegaConf.select(cfg, key)
        if not DEVICE_PATTERN.fullmatch(str(value)):
            fail(key, value, "choose auto (a GPU when torch sees one), cpu, cuda or cuda:N")
    if cfg.train.centralized_lr is not None and cfg.train.centralized_lr <= 0:
        fail("train.centralized_lr", cfg.train.centralized_lr, "it must be positive (or null: train.lr)")
    if cfg.train.max_steps is not None and cfg.train.max_steps < 1:
        fail("train.max_steps", cfg.train.max_steps, "it must be at least 1 (or null: train.epochs whole passes)")
    if cfg.train.rates_need_dp and not cfg.privacy.enabled:
        rates = f"train.lr={cfg.train.lr:g}" + ("" if cfg.train.centralized_lr is None
                                                else f", train.centralized_lr={cfg.train.centralized_lr:g}")
        raise ConfigError(
            f"privacy=none is refused with this training recipe: its rates ({rates}) are DP-SGD's, steps on "
            "per-sample-clipped, noised gradients, and without DP they diverge (train=large_batch on SST-2: training "
            "loss 94 after two rounds). Add train=default (lr 1, batch 32: 0.841 federated on SST-2 without DP; "
            "docs/recipe.md) or set train.lr")
    if cfg.train.physical_batch_size is not None and cfg.train.physical_batch_size < 1:
        fail("train.physical_batch_size", cfg.train.physical_batch_size, "it must be at least 1 (or null: no split)")
    if cfg.data.task == "causal_lm" and cfg.model.name in ("minilm", "tiny-bert"):
        fail("model.name", cfg.model.name, "data.task=causal_lm needs a decoder: model=smollm2, model=tiny-llama or "
             "model.path=<folder of a causal LM>")
    if cfg.data.generation_examples < 0:
        fail("data.generation_examples", cfg.data.generation_examples, "it must be 0 or more")
    if cfg.data.max_new_tokens < 1:  # greedy decoding (the answer score, `fedspec generate`) needs a token to write
        fail("data.max_new_tokens", cfg.data.max_new_tokens, "an answer is at least 1 token")
    if cfg.data.alpha <= 0:
        fail("data.alpha", cfg.data.alpha, "the Dirichlet concentration must be > 0 (smaller = more skewed)")
    privacy = cfg.privacy
    if privacy.private_init_stats and not privacy.enabled:  # nothing would noise or account the statistics
        fail("privacy.private_init_stats", True, "noised round-0 statistics are charged to record-level DP's ledger: "
             "it needs privacy.enabled=true (privacy=dp)")
    if privacy.enabled:
        if not 0.0 < privacy.delta < 1.0:
            fail("privacy.delta", privacy.delta, "it must be in (0, 1), well below 1/(client dataset size)")
        if privacy.max_grad_norm <= 0:
            fail("privacy.max_grad_norm", privacy.max_grad_norm, "the clipping norm must be > 0")
        if privacy.noise_multiplier is None and privacy.target_epsilon is None:
            fail("privacy.target_epsilon", None, "set privacy.target_epsilon or privacy.noise_multiplier")
        if privacy.noise_multiplier is not None and privacy.noise_multiplier <= 0:
            fail("privacy.noise_multiplier", privacy.noise_multiplier, "it must be > 0")
        if privacy.noise_multiplier is None and privacy.target_epsilon <= 0:
            fail("privacy.target_epsilon", privacy.target_epsilon, "it must be > 0")
        if privacy.head_clip_share is not None and not 0.0 < privacy.head_clip_share < 1.0:
            fail("privacy.head_clip_share", privacy.head_clip_share, "it must be in (0, 1), or null (flat clipping)")
        if privacy.head_clip_share is not None and privacy.grad_sample_mode == "ghost":
            fail("privacy.head_clip_share", privacy.head_clip_share, "per-group clipping needs "
                 "privacy.grad_sample_mode=hooks (ghost clipping clips one flat norm)")
        if privacy.sample_rate is not None:
            _check_fixed_sample_rate(privacy.sample_rate, fail)
        if privacy.budget_epsilon is not None and privacy.budget_epsilon <= 0:
            fail("privacy.budget_epsilon", privacy.budget_epsilon, "it must be > 0 (or null: use target_epsilon)")
        if privacy.private_init_stats:
            if privacy.init_noise_multiplier <= 0:
                fail("privacy.init_noise_multiplier", privacy.init_noise_multiplier, "it must be > 0")
            for kind in spec.calibration:
                norm = (privacy.init_max_norm or {}).get(kind)
                if norm is None or norm <= 0:
                    fail(f"privacy.init_max_norm.{kind}", norm,
                         f"adapter.method={spec.name} releases {kind} statistics: give their clipping norm (> 0)")
    _validate_client_level(cfg, fail)
    audit = cfg.audit
    if audit.canaries < 0:
        fail("audit.canaries", audit.canaries, "it must be >= 0 (0: no canaries)")
    if not 0.0 < audit.confidence < 1.0:
        fail("audit.confidence", audit.confidence, "it must be in (0, 1), e.g. 0.95")


def _check_option_type(key: str, value: Any, default: Any, fail) -> None:
    """A method's option is typed by its default (the schema types it Any): a number stays a number, a string a
    string, so ``adapter.options.beta=abc`` is named here, not a ValueError from inside the method."""
    def kind(x: Any) -> str | None:
        if isinstance(x, bool):
            return "true or false"
        if isinstance(x, (int, float)):
            return "a number"
        return "a string" if isinstance(x, str) else None

    if default is not None and value is not None and kind(default) is not None and kind(value) != kind(default):
        fail(key, value, f"it must be {kind(default)} (default {default!r})")


def _validate_client_level(cfg: DictConfig, fail) -> None:
    level = cfg.privacy.client_level
    if not level.enabled:
        return
    if cfg.federation.weighting != "uniform":
        fail("federation.weighting", cfg.federation.weighting,
             "client-level DP (privacy.client_level.enabled=true) needs federation.weighting=uniform: a client's "
             "weight must not depend on its data, or one client could move the aggregate by more than C/n")
    from .adapters import METHODS

    if cfg.adapter.method in METHODS and METHODS[cfg.adapter.method].calibration:
        # Round 0 sums each client's statistics over up to calibration_examples records, clipped per record at best:
        # against a whole client that is noise σ₀·2C for up to 256·C of signal, which no client-level ε covers.
        fail("adapter.method", cfg.adapter.method,
             "client-level DP cannot cover a data-driven initialization: round 0's statistics are each client's, "
             "clipped per record at most, so the first global adapter would carry one client's data with no "
             "client-level noise; use a method that initializes from the weights alone (e.g. adapter=pissa)")
    if level.clipping_norm <= 0:
        fail("privacy.client_level.clipping_norm", level.clipping_norm, "the clipping norm must be > 0")
    if not 0.0 < level.delta < 1.0:
        fail("privacy.client_level.delta", level.delta, "it must be in (0, 1), well below 1/federation.clients")
    if level.noise_multiplier is None and level.target_epsilon is None:
        fail("privacy.client_level.target_epsilon", None,
             "set privacy.client_level.target_epsilon or privacy.client_level.noise_multiplier")
    if level.noise_multiplier is not None and level.noise_multiplier <= 0:
        fail("privacy.client_level.noise_multiplier", level.noise_multiplier, "it must be > 0")
    if level.noise_multiplier is None and level.target_epsilon <= 0:
        fail("privacy.client_level.target_epsilon", level.target_epsilon, "it must be > 0")
    if level.min_survivors is not None:
        if not cfg.federation.secure_aggregation.enabled:
            fail("privacy.client_level.min_survivors", level.min_survivors,
                 "it only applies when the clients add the noise, under secure aggregation "
                 "(federation.secure_aggregation.enabled=true)")
        if not 2 <= level.min_survivors <= cfg.federation.clients:
            fail("privacy.client_level.min_survivors", level.min_survivors,
                 f"it must be in 2..federation.clients={cfg.federation.clients}")


def _validate_secure_aggregation(secagg: DictConfig, fail) -> None:
    if not 0.5 <= secagg.threshold < 1.0:
        fail("federation.secure_aggregation.threshold", secagg.threshold, "it must be in [0.5, 1): a majority of "
             "each client's neighbours, so that two disjoint groups can never both rebuild its secrets")
    if secagg.neighbours is not None and secagg.neighbours < 2:
        fail("federation.secure_aggregation.neighbours", secagg.neighbours, "it must be at least 2 (or null: all)")
    if not secagg.clip_range > 0:
        fail("federation.secure_aggregation.clip_range", secagg.clip_range, "it must be > 0")
    if not 8 <= secagg.bits <= 32:
        fail("federation.secure_aggregation.bits", secagg.bits, "it must be in 8..32")
    if secagg.max_weight < 1:
        fail("federation.secure_aggregation.max_weight", secagg.max_weight, "it must be at least 1")


def _check_fixed_sample_rate(q: float, fail) -> None:
    """Opacus samples 1/q batches per epoch and accounts q as 1/(that number): q must be 1/k for a whole k."""
    batches = round(1 / q) if 0 < q <= 1 else 0
    if batches < 1 or abs(1 / q - batches) > 1e-6 * batches:
        near = sorted({1 / max(1, math.floor(1 / q)), 1 / max(1, math.ceil(1 / q))}) if 0 < q <= 1 else [0.01]
        fail("privacy.sample_rate", q, "it must be 1/k for a whole number k of batches per epoch (e.g. "
             + " or ".join(f"{v:.6g}" for v in near) + "), or null: 1/⌈n/train.batch_size⌉ per client")


def check_federated(cfg: DictConfig) -> None:
    """The checks only a federation needs (`fedspec train` ignores the strategy): the strategy must suit the
    method's federated rule — FedSVD, FFA-LoRA and FedIT need a low-rank B·A method, FedAvg takes any."""
    from .adapters import METHODS

    if cfg.train.max_steps is not None:
        raise ConfigError(f"train.max_steps={cfg.train.max_steps} counts `fedspec train`'s steps; a federation's "
                          "clients take train.local_steps a round (train.local_steps=…, --rounds): drop it")
    if cfg.strategy.name != "fedavg" and METHODS[cfg.adapter.method].federated != "lowrank":
        lowrank = ", ".join(sorted(n for n, m in METHODS.items() if m.federated == "lowrank"))
        raise ConfigError(
            f"strategy.name={cfg.strategy.name!r} is not allowed; it needs a low-rank (B·A) adapter method "
            f"({lowrank}); use strategy=fedavg for adapter.method={cfg.adapter.method}"
        )


# --- the bridge to Flower's apps -------------------------------------------------------------------------------


def config_to_json(cfg: DictConfig) -> str:
    """The whole, resolved config as one JSON string: what ``fedspec simulate`` hands its Flower apps, and a
    fingerprint of a config (equal configs give equal strings)."""
    return json.dumps(OmegaConf.to_container(cfg, resolve=True), sort_keys=True)


def config_from_json(text: str, *, check_files: bool = True) -> DictConfig:
    """Inverse of :func:`config_to_json`, with the same type checks and validation as at the start (``check_files``:
    see :func:`validate`); parsed once per process (every message of a run carries the same string), a fresh copy
    each call."""
    return _parsed_config(text, check_files).copy()


@functools.lru_cache(maxsize=8)
def _parsed_config(text: str, check_files: bool) -> DictConfig:
    return to_structured(json.loads(text), check_files=check_files)


def config_from_run_config(
    run_config: dict[str, Any],
    resolved: str | None = None,
    run_id: int | None = None,
    *,
    check_files: bool = True,
) -> DictConfig:
    """The config of a Flower app. ``fedspec simulate`` hands its apps the complete, already validated config
    (``resolved``, from :func:`config_to_json`); under ``flwr run`` the run_config's ``overrides`` key holds Hydra overrides of the config
    tree (``--run-config 'overrides="adapter.rank=16 federation.clients=4"'``). Without ``run.name``, a
    ``flwr run`` is named after its Flower run id, the same on the server and on every client. Clients pass
    ``check_files=False`` (see :func:`validate`)."""
    if resolved is not None:
        return config_from_json(resolved, check_files=check_files)
    cfg = _compose_cached(tuple(shlex.split(str(run_config.get("overrides", "")))), check_files).copy()
    if not cfg.run.name and run_id is not None:
        cfg.run.name = f"flwr-run-{run_id}"
    return cfg


@functools.lru_cache(maxsize=8)
def _compose_cached(overrides: tuple[str, ...], check_files: bool) -> DictConfig:
    """Every ClientApp message carries the same run_config: compose the tree once per process."""
    return compose_config(list(overrides), check_files=check_files)


def save_config(cfg: DictConfig, path: str | Path) -> None:
    Path(path).write_text(OmegaConf.to_yaml(cfg))


def load_config_file(path: str | Path) -> DictConfig:
    if not Path(path).is_file():
        raise ConfigError(f"{path} does not exist")
    return to_structured(OmegaConf.load(path))


# Where and how a run runs, not what it computes: a resumed run may change these and nothing else (run.seed is
# what it computes: the partition, the client sampling, the initialization).
RUN_PLACE_KEYS = frozenset({"run.name", "run.output_dir", "run.resume", "run.progress"})


def config_differences(given: DictConfig, saved: DictConfig, *, only: Iterable[str] | None = None) -> list[str]:
    """'key=given (the run has saved)' for every setting ``given`` has otherwise than ``saved``, the keys of
    :data:`RUN_PLACE_KEYS` aside. ``only``: dotted keys or groups (``data``) to compare, and nothing else."""
    ours = _leaves(OmegaConf.to_container(given, resolve=True))
    theirs = _leaves(OmegaConf.to_container(saved, resolve=True))
    scopes = None if only is None else tuple(only)
    return [f"{key}={ours.get(key)} (the run has {theirs.get(key)})" for key in sorted(ours.keys() | theirs.keys())
            if key not in RUN_PLACE_KEYS and ours.get(key) != theirs.get(key)
            and (scopes is None or any(key == scope or key.startswith(f"{scope}.") for scope in scopes))]


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    """Every leaf of a config tree (a plain container), by its dotted key; a list's items by their index."""
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        return {prefix.rstrip("."): node}
    return {key: value for name, child in items for key, value in _leaves(child, f"{prefix}{name}.").items()}


__all__ = [
    "MISSING",
    "check_federated",
    "FedspecConfig",
    "compose_config",
    "config_differences",
    "config_from_json",
    "config_to_json",
    "load_config_file",
    "save_config",
    "to_structured",
    "validate",
]
