"""Config composition, validation with one-line errors, and the round trip through Flower's run_config."""

from __future__ import annotations

import pytest

from fedspec.config import compose_config, config_from_json, config_to_json
from fedspec.errors import ConfigError


def test_defaults_compose_to_the_documented_default_run():
    cfg = compose_config([])
    assert (cfg.model.name, cfg.data.source, cfg.adapter.method, cfg.strategy.name) == ("minilm", "synthetic", "pissa", "fedsvd")
    assert cfg.privacy.enabled and cfg.privacy.target_epsilon == 8.0
    assert cfg.federation.clients == 20


def test_group_and_key_overrides():
    cfg = compose_config(["adapter=lora", "strategy=ffa", "adapter.rank=16", "adapter.targets=[query,key]"])
    assert (cfg.adapter.method, cfg.strategy.name, cfg.adapter.rank) == ("lora", "ffa", 16)
    assert list(cfg.adapter.targets) == ["query", "key"]


def test_a_data_config_carries_its_recipe_and_the_command_line_still_wins():
    assert compose_config([], check_files=False).federation.fraction == 0.5
    for real_data in ("sst2", "agnews"):
        cfg = compose_config([f"data={real_data}"], check_files=False)
        assert cfg.federation.fraction == 1.0 and cfg.federation.clients == 20  # the rest of federation/default
    assert compose_config(["data=sst2", "federation=default"], check_files=False).federation.fraction == 0.5
    assert compose_config(["data=sst2", "federation.fraction=0.3"], check_files=False).federation.fraction == 0.3
    # SST-2's clients hold thousands of records each: every record, in batches of 128
    sst2 = compose_config(["data=sst2"], check_files=False)
    assert (sst2.data.max_examples, sst2.train.batch_size, sst2.train.local_steps) == (0, 128, 4)
    assert compose_config([], check_files=False).train.batch_size == 32
    assert compose_config(["data=agnews"], check_files=False).train.batch_size == 32  # 500 records a client
    back = compose_config(["data=sst2", "train=default"], check_files=False).train
    assert (back.batch_size, back.local_steps, back.lr) == (32, 8, 1.0)
    assert compose_config(["data=sst2", "train.lr=2"], check_files=False).train.batch_size == 128


def test_the_config_handed_to_flower_apps_round_trips_losslessly():
    cfg = compose_config(["adapter.targets=[query,value]", "privacy.noise_multiplier=1.5", "run.name=my-run",
                          "privacy=none"])
    text = config_to_json(cfg)
    assert config_from_json(text) == cfg
    parsed = config_from_json(text)
    parsed.run.name = "changed"  # each call gets its own copy: the parsed config is cached per process
    assert config_from_json(text).run.name == "my-run"


def test_a_client_parses_the_config_without_the_servers_files(tmp_path):
    """On a deployed node data.path names a file on the server's machine: clients parse without checking it."""
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a", "label": 0}\n')
    text = config_to_json(compose_config(["data.source=file", f"data.path={data}"]))
    data.unlink()
    assert config_from_json(text, check_files=False).data.path == str(data)
    with pytest.raises(ConfigError, match="does not exist"):
        config_from_json(text)


@pytest.mark.parametrize(("override", "message"), [
    ("adapter.method=nope", "adapter.method='nope' is not allowed; choose one of: .*pissa"),
    ("strategy.name=fedprox", "strategy.name='fedprox' is not allowed; choose one of: fedsvd, ffa, fedit, fedavg"),
    ("federation.clients=0", "federation.clients=0 is not allowed; a federation needs at least 1 client"),
    ("federation.fraction=1.5", r"federation.fraction=1.5 is not allowed; it must be in \(0, 1\]"),
    ("privacy.delta=2", r"privacy.delta=2.0 is not allowed; it must be in \(0, 1\)"),
    ("privacy.accountant=gdp", "privacy.accountant='gdp' is not allowed; choose one of: rdp, prv"),
    ("adapter.rank=zero", "invalid config value: adapter.rank"),
    ("adapter.svd_method=krylov", "adapter.svd_method='krylov' is not allowed; choose one of: randomized, subspace, exact"),
    ("data=file_that_is_not_a_group", "bad override"),
    # NaN slips past every `x <= 0` check, and ∞ is a setting nowhere: both are named before anything runs
    ("privacy.max_grad_norm=nan", "privacy.max_grad_norm=nan is not allowed; it must be a finite number"),
    ("privacy.target_epsilon=inf", "privacy.target_epsilon=inf is not allowed; it must be a finite number"),
    ("privacy.client_level.clipping_norm=-inf", "privacy.client_level.clipping_norm=-inf is not allowed"),
    ("run.seed=-1", "run.seed=-1 is not allowed; a seed must be 0 or more"),
    # each of these used to run: α <= 0 trained on NaN (PiSSA divides by s = α/r) with exit status 0; the others
    # ended in a traceback from torch, the SVD engine, or Flower's Ray backend (client_cpus=0: a division by zero)
    ("adapter.alpha=0", "adapter.alpha=0.0 is not allowed; it must be > 0"),
    ("adapter.alpha=-4", "adapter.alpha=-4.0 is not allowed; it must be > 0"),
    ("adapter.dropout=1.5", r"adapter.dropout=1.5 is not allowed; it must be in \[0, 1\)"),
    ("model.dropout=1.0", r"model.dropout=1.0 is not allowed; it must be in \[0, 1\)"),
    ("adapter.niter=-1", "adapter.niter=-1 is not allowed; it must be 0 or more"),
    ("adapter.oversample=-3", "adapter.oversample=-3 is not allowed; it must be 0 or more"),
    ("federation.client_cpus=0", "federation.client_cpus=0.0 is not allowed; it must be > 0"),
    ("federation.round_timeout=0", "federation.round_timeout=0.0 is not allowed; it must be > 0"),
    ("data.min_client_examples=-1", "data.min_client_examples=-1 is not allowed; it must be at least 1"),
    # "0 or more" let 0 through: greedy decoding (data.generation_examples, `fedspec generate`) then died in
    # transformers' generate ("`max_new_tokens` must be greater than 0")
    ("model=tiny-llama data.max_new_tokens=0", "data.max_new_tokens=0 is not allowed; an answer is at least 1 token"),
    # a method's options are typed by their defaults (a ValueError from inside KaSA before)
    ("adapter=kasa adapter.options.beta=abc", "adapter.options.beta='abc' is not allowed; it must be a number"),
    ("adapter=sst adapter.options.resample_every=true", "adapter.options.resample_every=True is not allowed; it must "
                                                        "be a number"),
    ("adapter=corda adapter.options.mode=1", "adapter.options.mode=1 is not allowed; it must be a string"),
    # both used to be dropped without a word: [] meant the default targets, and nothing noised the statistics
    ("adapter.targets=[]", r"adapter.targets=\[\] is not allowed; give at least one module-name pattern"),
    ("privacy=none adapter=eva privacy.private_init_stats=true", "privacy.private_init_stats=True is not allowed; "
                                                                  "noised round-0 statistics"),
])
def test_bad_values_fail_with_one_line_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message) as error:
        compose_config(override.split())
    assert "\n" not in str(error.value)


def test_missing_data_file_is_named(tmp_path):
    missing = tmp_path / "nope.tsv"
    with pytest.raises(ConfigError, match=f"data.path='{missing}' does not exist"):
        compose_config(["data.source=file", f"data.path={missing}"])


@pytest.mark.parametrize("override, message", [
    ("federation.secure_aggregation.threshold=0.4", "a majority of each client's neighbours"),
    ("federation.secure_aggregation.threshold=1.0", "it must be in \\[0.5, 1\\)"),
    ("federation.secure_aggregation.neighbours=1", "at least 2"),
    ("federation.secure_aggregation.clip_range=0", "clip_range=0.0 is not allowed"),
    ("federation.secure_aggregation.bits=40", "in 8..32"),
    ("federation.secure_aggregation.max_weight=0", "at least 1"),
])
def test_secure_aggregation_settings_are_checked(override, message):
    with pytest.raises(ConfigError, match=message):
        compose_config([override])


def test_secure_aggregation_with_client_level_dp_plans_the_clients_noise():
    from fedspec.config import check_federated
    from fedspec.privacy.accounting import SKELLAM
    from fedspec.privacy.planning import PlanSettings, plan_client_level

    cfg = compose_config(["federation.secure_aggregation.enabled=true", "privacy=client-dp",
                          "federation.weighting=uniform"])
    check_federated(cfg)
    plan = plan_client_level(PlanSettings.of(cfg))
    assert plan.distributed is not None and plan.accountant == SKELLAM and plan.charged[1] == 1.0
    assert plan.epsilon <= cfg.privacy.client_level.target_epsilon
    with pytest.raises(ConfigError, match="only applies when the clients add the noise") as refused:
        compose_config(["privacy=client-dp", "federation.weighting=uniform", "privacy.client_level.min_survivors=3"])
    # the remedy it names is a real setting (it used to name federation=secure, a config group option that does not exist)
    assert "(federation.secure_aggregation.enabled=true)" in str(refused.value)
    with pytest.raises(ConfigError, match="must be in 2..federation.clients"):
        compose_config(["privacy=client-dp", "federation.weighting=uniform", "privacy.client_level.min_survivors=1",
                        "federation.secure_aggregation.enabled=true"])




@pytest.mark.parametrize("method", ["eva", "corda", "lora_ga", "fwsvd"])
def test_client_level_dp_refuses_a_data_driven_initialization(method):
    """Round 0's statistics are each client's own (clipped per record at most): no client-level ε covers them."""
    with pytest.raises(ConfigError, match=f"adapter.method='{method}' is not allowed; client-level DP cannot cover"):
        compose_config(["privacy=client-dp", "federation.weighting=uniform", f"adapter={method}"])
    compose_config(["privacy=client-dp", "federation.weighting=uniform", "adapter=pissa"])
