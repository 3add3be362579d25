"""The accuracy study's grid: its cells, the command each one runs, the record it leaves, and how a
learning rate is chosen. Pure functions (no torch, no Flower) except :func:`subgroup_scores`; :func:`run_config`
composes Hydra's config."""

from __future__ import annotations

import itertools
import json
import math
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import mean
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from omegaconf import DictConfig

CENTRALIZED = "centralized"
# Adapters whose trainable tensors enter ΔW linearly (exact under FedAvg), and the one strategy they take.
LINEAR_ADAPTERS = {"svfit": "fedavg", "lora_xs": "fedavg"}
DATASETS = {
    # folder under --data: (Hydra overrides, the subgroup scored besides the whole evaluation file)
    # (sst2: scored on a 1,000-row sample of validation.tsv, as the quick and fraction1 grids ran; defaults: every row)
    "sst2": (("data=sst2", "data.path={root}/sst2/train.tsv", "data.eval_path={root}/sst2/validation.tsv",
              "data.eval_examples=1000"),
             "whole sentences (>= 15 words)"),
    "agnews": (("data=agnews", "data.path={root}/agnews/train.tsv"), None),
    "topics": (("data=topics",), None),  # fedspec's generated smoke-test task: checks the runner, not accuracy
}
WHOLE_SENTENCE_WORDS = 15
TUNE_LAST_ROUNDS = 3  # a sweep run is scored by the mean validation accuracy of its last (up to 3) rounds or epochs


@dataclass(frozen=True)
class Grid:
    name: str
    datasets: tuple[str, ...]
    strategies: tuple[str, ...]  # federated strategies, plus "centralized" for `fedspec train`
    adapters: tuple[str, ...]
    epsilons: tuple[float, ...]  # math.inf: no DP
    partitions: tuple[str, ...]  # "iid" or "dir<alpha>"
    seeds: tuple[int, ...]
    lrs: tuple[float, ...]  # the learning-rate sweep of every (dataset, strategy, adapter)
    strategy_lrs: tuple[tuple[str, tuple[float, ...]], ...] = ()  # (strategy, its own sweep) where lrs does not fit
    rounds: int = 10
    clients: int = 20
    tune_epsilon: float = 3.0
    tune_partition: str = "dir0.5"
    overrides: tuple[str, ...] = ()  # for every cell (e.g. a tiny model in tests)
    final_overrides: tuple[str, ...] = ()  # for the final cells only (e.g. scoring every evaluation row)
    partition_overrides: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (partition, what its cells add)
    dataset_overrides: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (dataset, what its cells add)
    dataset_final_overrides: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (dataset, what its finals add)
    centralized_overrides: tuple[str, ...] = ()  # what its `fedspec train` cells add (e.g. train.max_steps)
    tuned: bool = True  # False: no sweep; every strategy runs at its one rate (another grid's sweep chose it)
    fixed: tuple[str, ...] = ()  # in a tuned grid, the strategies at one rate another grid's sweep chose (no sweep)

    def __post_init__(self) -> None:
        if not self.tuned and any(len(self.rates(s)) != 1 for s in self.strategies):
            raise ValueError(f"grid {self.name}: an untuned grid gives every strategy exactly one learning rate")
        if any(len(self.rates(s)) != 1 for s in self.fixed):
            raise ValueError(f"grid {self.name}: a fixed strategy runs at exactly one learning rate")

    def swept(self, strategy: str) -> bool:
        """Whether this grid chooses the strategy's rate by a sweep of its own."""
        return self.tuned and strategy not in self.fixed

    def rates(self, strategy: str) -> tuple[float, ...]:
        """The learning rates of a strategy: its own sweep where one is given, else the grid's."""
        return dict(self.strategy_lrs).get(strategy, self.lrs)


@dataclass(frozen=True)
class Cell:
    dataset: str
    strategy: str
    adapter: str
    epsilon: float
    partition: str
    seed: int
    lr: float | None  # None: a final cell before its sweep has chosen the rate
    tune: bool = False

    @property
    def key(self) -> str:
        eps = "inf" if math.isinf(self.epsilon) else f"{self.epsilon:g}"
        lr = "tbd" if self.lr is None else f"{self.lr:g}"
        return (f"{self.dataset}-{self.strategy}-{self.adapter}-eps{eps}-{self.partition}-s{self.seed}-lr{lr}"
                + ("-tune" if self.tune else ""))

    @property
    def group(self) -> tuple[str, str, str]:
        """The cells that share one tuned learning rate."""
        return self.dataset, self.strategy, self.adapter

    def describe(self) -> str:
        eps = "∞" if math.isinf(self.epsilon) else f"{self.epsilon:g}"
        what = "lr sweep" if self.tune else "final"
        return (f"{self.dataset} {self.strategy} {self.adapter} ε={eps} {self.partition} seed {self.seed} "
                f"lr {self.lr:g} ({what})")


# The defaults against the centralized baseline at the target point: ~2 h on 2 CPU cores. Half the clients
# per round (federation=default), as every data config had when it ran; data=sst2 and data=agnews now carry
# all_clients, which the fraction1 grid measures.
# Dirichlet 0.1 over 20 clients leaves some client with fewer than data.min_client_examples=32 records in every one of
# 1,000 draws: on SST-2's 20,000 (two classes) the best draw's smallest client holds 10 records at seeds 0 and 1, 8 at
# seed 2. Its cells accept clients of 8 (NIID-Bench's Dirichlet split asks for 10); such a client's update weighs
# 8/20,000 in the mean.
DIR01_SMALL_CLIENTS = (("dir0.1", ("data.min_client_examples=8",)),)
# data=sst2's recipe before the records grid moved it to every record of train.tsv in client batches of 128
# (train=large_batch): 20,000 records, batch 32, 8 local steps. The grids that measured it keep it, so their cells
# run again as they ran.
SST2_BATCH32 = (("sst2", ("train=default", "data.max_examples=20000")),)
QUICK = Grid(
    name="quick",
    datasets=("sst2", "agnews"),
    strategies=("fedsvd", CENTRALIZED),
    adapters=("pissa",),
    epsilons=(3.0,),
    partitions=("dir0.5",),
    seeds=(0, 1, 2),
    lrs=(0.5, 1.0, 2.0),
    # The centralized baseline trains A and B on pooled data: at 0.5 it was best of 0.5/1/2 (an edge of the sweep)
    strategy_lrs=((CENTRALIZED, (0.1, 0.25, 0.5, 1.0, 2.0)),),
    overrides=("federation=default",),
    dataset_overrides=SST2_BATCH32,
)
# The grid: every method, ε and partition, each group at its own tuned rate. Its SST-2 cells keep the batch-32
# recipe its sweep range was set for (and the methods, batch32 and partitions grids ran), half the compute of
# train=large_batch per cell; comparing methods needs one recipe for all, not the best one. Its SST-2 finals score
# every row of validation.tsv, as those grids' do, so their runs are its own (accuracy.adopt_shared_results).
MINIMUM = Grid(
    name="minimum",
    datasets=("sst2", "agnews"),
    strategies=("fedsvd", "ffa", "fedit", CENTRALIZED),
    adapters=("pissa", "lora", "svfit"),
    epsilons=(1.0, 3.0, 8.0, math.inf),
    partitions=("dir0.1", "dir0.5", "iid"),
    seeds=(0, 1, 2),
    lrs=(0.25, 0.5, 1.0, 2.0),
    strategy_lrs=((CENTRALIZED, (0.1, 0.25, 0.5, 1.0)),),
    partition_overrides=DIR01_SMALL_CLIENTS,
    dataset_overrides=SST2_BATCH32,
    dataset_final_overrides=(("sst2", ("data.eval_examples=0",)),),
)
SMOKE = Grid(  # a few minutes on a laptop: checks the study runner end to end, proves nothing about accuracy
    name="smoke",
    datasets=("topics",),
    strategies=("fedsvd", CENTRALIZED),
    adapters=("pissa",),
    epsilons=(8.0,),
    partitions=("dir0.5",),
    seeds=(0,),
    lrs=(0.5,),
    rounds=2,
    clients=3,
    tune_epsilon=8.0,
    overrides=("model=tiny-bert", "data.num_examples=240", "data.eval_examples=48", "data.min_client_examples=8",
               "train.local_steps=2", "train.batch_size=16", "federation.fraction=1.0", "federation.client_cpus=1"),
)
# The quick grid's federations with every client in every round. fedspec's accounting already charges each client
# for every round it could take part in (schedule_steps), so fraction 1 costs no ε, only compute; on SST-2's tuning
# split it raised the score from 0.815 to 0.836 (docs/recipe.md). The centralized cells are the quick grid's.
FRACTION1 = Grid(
    name="fraction1",
    datasets=("sst2", "agnews"),
    strategies=("fedsvd",),
    adapters=("pissa",),
    epsilons=(3.0,),
    partitions=("dir0.5",),
    seeds=(0, 1, 2),
    lrs=(0.5, 1.0, 2.0),
    overrides=("federation.fraction=1.0",),
    dataset_overrides=SST2_BATCH32,
)
# The defaults as a user ran them before the records grid (`fedspec simulate --clients 20 --rounds 10 data=sst2 ...
# privacy.target_epsilon=3`: 20,000 records, every client in every round, batch 32, SGD lr 1) against the centralized
# baseline at the same ε, with the learning rates the fraction1 and quick sweeps chose, scored on every row of
# validation.tsv rather than a 1,000-row sample (the trained models are the same: the evaluation rows do not touch
# training). ε ∈ {1, 3, 8, ∞} shows what privacy costs; the rates stay the ones chosen at ε = 3, as a user keeps them.
BATCH32 = Grid(
    name="batch32",
    datasets=("sst2",),
    strategies=("fedsvd", CENTRALIZED),
    adapters=("pissa",),
    epsilons=(1.0, 3.0, 8.0, math.inf),
    partitions=("dir0.5",),
    seeds=(0, 1, 2),
    lrs=(1.0,),
    strategy_lrs=((CENTRALIZED, (0.1,)),),
    overrides=("data.eval_examples=0",),
    tuned=False,
    dataset_overrides=SST2_BATCH32,
)
# Which method to pick: every federated strategy and adapter of the minimum grid against the centralized baseline,
# at the batch-32 recipe's point (SST-2, ε = 3, Dirichlet 0.5, every client every round), each with its own tuned
# rate. The sweep runs on the tuning split as the fraction1 and quick sweeps did (so their FedSVD-PiSSA and
# centralized PiSSA sweep cells are the same runs); the finals score every row of validation.tsv, as the batch32 grid
# does (so its ε = 3 cells at the rates chosen are the same runs).
METHODS = Grid(
    name="methods",
    datasets=("sst2",),
    strategies=("fedsvd", "ffa", "fedit", CENTRALIZED),
    adapters=("pissa", "lora", "svfit"),
    epsilons=(3.0,),
    partitions=("dir0.5",),
    seeds=(0, 1, 2),
    lrs=(0.5, 1.0, 2.0),
    # A sweep whose best rate is its lowest cannot tell an optimum from an edge: FFA-LoRA with LoRA's random A
    # (0.821, 0.810, 0.792 at 0.5, 1, 2), centralized PiSSA (0.824, 0.819 at 0.1, 0.25) and SVFit under FedAvg
    # (tuning scores 0.822, 0.820, 0.817 at 0.5, 1, 2) each get one step lower
    strategy_lrs=((CENTRALIZED, (0.05, 0.1, 0.25, 0.5, 1.0, 2.0)), ("ffa", (0.25, 0.5, 1.0, 2.0)),
                  ("fedavg", (0.25, 0.5, 1.0, 2.0))),
    final_overrides=("data.eval_examples=0",),
    dataset_overrides=SST2_BATCH32,
)
# How the batch-32 recipe fares as the clients' label skew changes: Dirichlet 0.1 (most clients hold nearly one
# class), 0.5 (the batch32 grid's point, so its ε = 3 cells are the same runs) and IID, at the rates that grid keeps.
PARTITIONS = Grid(
    name="partitions",
    datasets=("sst2",),
    strategies=("fedsvd", CENTRALIZED),
    adapters=("pissa",),
    epsilons=(3.0,),
    partitions=("dir0.5", "dir0.1", "iid"),
    seeds=(0, 1, 2),
    lrs=(1.0,),
    strategy_lrs=((CENTRALIZED, (0.1,)),),
    overrides=("data.eval_examples=0",),
    tuned=False,
    partition_overrides=DIR01_SMALL_CLIENTS,
    dataset_overrides=SST2_BATCH32,
)
# More signal per unit of noise (docs/recipe.md, "Where DP's cost goes"): every record of SST-2's train.tsv
# (60,614, not 20,000) lets each client draw batches of 128 at about the sampling rate batch 32 had, so the noise on
# its averaged clipped gradient (σ·C/B) falls about fourfold at the same ε; 4 local steps keep the client compute at
# twice the batch-32 recipe's. At lr 16, the best of a sweep from 1 to 32, it gains 1.7 points over that recipe paired
# by seed (0.837, whole sentences 0.802; docs/recipe.md), so data=sst2 now carries it (train=large_batch). The
# overrides stay explicit: the cells mean the same whatever data=sst2 carries.
RECORDS = Grid(
    name="records",
    datasets=("sst2",),
    strategies=("fedsvd", CENTRALIZED),
    adapters=("pissa",),
    epsilons=(3.0,),
    partitions=("dir0.5",),
    seeds=(0, 1, 2),
    # 4: four times the batch, four times the step at the noise per step batch 32 had; the sweep was widened while
    # its edge won (8: 0.831 against 4's 0.829; 16: 0.839)
    lrs=(1.0, 2.0, 4.0, 8.0, 16.0, 32.0),
    # The baseline: one pass over the same pooled records in batches of 128 (474 DP-SGD steps at ε = 3). Pooled
    # batch 256 over three epochs was stable at lr 2 (docs/recipe.md), but one pass at batch 128 scores 0.848 at
    # lr 0.5, 0.831 at 1 and 0.743 at 2 (one stream's noise is not averaged over 20 clients' updates), and 0.844 at
    # 0.25. The choice, 0.5, is train=large_batch's centralized_lr, the rate of `fedspec train data=sst2`.
    strategy_lrs=((CENTRALIZED, (0.25, 0.5, 1.0, 2.0)),),
    overrides=("data.max_examples=0", "train.batch_size=128", "train.local_steps=4"),
    final_overrides=("data.eval_examples=0",),
)
# The defaults as a user runs them: `fedspec simulate --clients 20 --rounds 10 data=sst2 data.path=… data.eval_path=…
# privacy.target_epsilon=…` with nothing else (every record, every client in every round, batches of 128, 4 local
# steps, the lr of train=large_batch) against `fedspec train` with nothing else: the same records, ε and batch, at
# train=large_batch's centralized_lr (the records grid's centralized sweep chose it). ε ∈ {1, 3, 8} at the rates
# chosen at ε = 3, as a user keeps them. Not ∞: these rates are DP-SGD's, and without DP lr 16 diverges
# (docs/recipe.md); non-private runs take train=default, whose ε = ∞ cells are the batch32 grid's.
# Its ε = 3 cells are the records grid's finals (the same configuration: tests/test_accuracy_study.py).
DEFAULTS = Grid(
    name="defaults",
    datasets=("sst2",),
    strategies=("fedsvd", CENTRALIZED),
    adapters=("pissa",),
    epsilons=(1.0, 3.0, 8.0),
    partitions=("dir0.5",),
    seeds=(0, 1, 2),
    lrs=(16.0,),
    strategy_lrs=((CENTRALIZED, (0.5,)),),  # train=large_batch's centralized_lr: the records grid's choice
    final_overrides=("data.eval_examples=0",),
    tuned=False,
)
# The centralized baseline at the federation's number of DP-SGD steps, as the issue asks ("an equal number of DP-SGD
# steps and the same ε"): the records grid's federation takes 20 clients × 10 rounds × 4 local steps = 800 steps of
# 128 records, and its baseline one pass (474 steps). Here `fedspec train --max-steps 800` takes as many on the pooled
# records (1.7 passes; σ planned for 800 steps at the same ε, so more noise on each), with its own sweep: the step
# count moves the best rate. The federated cells are the records grid's (the same commands, so the same keys).
RECORDS_FEDERATION_STEPS = RECORDS.clients * RECORDS.rounds * 4  # every client in every round (data=sst2)
STEPS = replace(
    RECORDS,
    name="steps",
    lrs=(16.0,),  # the records grid's choice: its tuning cell is that grid's
    strategy_lrs=((CENTRALIZED, (0.25, 0.5, 1.0)),),
    centralized_overrides=(f"train.max_steps={RECORDS_FEDERATION_STEPS}",),
)
# Is the federation's gap to centralized DP at equal steps its noise? Each client plans σ for its own ε over its own
# ~3,000 records (q twenty times the pooled one, so less amplification by subsampling), and the aggregate of the
# records grid's ε = 3 finals carries the noise-to-signal ratio of `fedspec train --max-steps 800` at σ 1.036, 1.185
# and 1.125 (seeds 0–2; benchmarks/noise_equivalent.py) instead of its planned 0.615. Here the steps grid's baseline
# trains at their mean, at the rate its sweep chose: ε then falls below 3 (the same noise buys a pooled run more
# privacy). The federated cells are the records grid's.
FEDERATION_EQUIVALENT_SIGMA = 1.115
NOISE = replace(
    STEPS,
    name="noise",
    strategy_lrs=((CENTRALIZED, (0.5,)),),  # the steps grid's choice
    centralized_overrides=(*STEPS.centralized_overrides, f"privacy.noise_multiplier={FEDERATION_EQUIVALENT_SIGMA}"),
    tuned=False,
)
# The last-five-rounds target with the defaults: at 10 rounds the SST-2 curve still rises (its last five rounds span up
# to 1.5 points, never falling back). The user's ε = 3 command with `--rounds 15` and nothing else (each client's
# noise planned for 15 rounds at the same ε), paired by seed with the defaults grid's 10-round runs. On the batch-32
# recipe 15 rounds brought the spread to 0.4 points at two seeds (docs/recipe.md).
ROUNDS15 = replace(DEFAULTS, name="rounds15", strategies=("fedsvd",), epsilons=(3.0,), rounds=15)
# Does a larger client batch close the federation's gap to centralized DP at equal steps? That gap is what per-client
# accounting costs (the noise grid): each client's σ is planned for its own q, twenty times the pooled one. Batch 256
# × 2 steps carries the same 512 records a client a round as the defaults' 128 × 4, and the step doubles with the
# batch (lr 32 = 2 × 16, the records grid's choice at 128). The defaults' ε = 3 command otherwise, paired by seed with
# the defaults grid's runs; benchmarks/noise_equivalent.py on the finished runs gives the aggregate's σ_eq.
BATCH256 = replace(DEFAULTS, name="batch256", strategies=("fedsvd",), epsilons=(3.0,), lrs=(32.0,), strategy_lrs=(),
                   overrides=("train.batch_size=256", "train.local_steps=2"))
# What privacy costs on AG News: the defaults grid on `data=agnews` as a user runs it (every client in every round,
# batches of 32, train=default's lr 1; centralized at the quick grid's sweep choice 0.1) at ε 1, 3 and 8, three seeds,
# scored on the 1,000 records carved from the training file. The centralized cells compose as the quick grid's did
# (its federation=default is inert for `fedspec train`), so its ε = 3 runs are adopted, as are agnews-lr1's FedSVD
# cells at ε = 3.
AGNEWS = replace(DEFAULTS, name="agnews", datasets=("agnews",), lrs=(1.0,), strategy_lrs=((CENTRALIZED, (0.1,)),),
                 centralized_overrides=("federation=default",), final_overrides=())
# The AG News baseline at the federation's number of DP-SGD steps, as the steps grid is SST-2's: the agnews grid's
# federation takes 20 clients × 10 rounds × 8 local steps = 1,600 steps of 32 records (together about 5.7 passes over
# the pooled records), its baseline one pass (282 steps). Here `fedspec train` takes 1,600 steps on the pooled records
# (5.7 passes; σ planned for 1,600 steps at the same ε), with its own sweep around the one-pass choice 0.1: the step
# count moves the best rate. It first peaked at its lowest rate (tuning scores 0.866, 0.862, 0.726 at 0.05, 0.1, 0.25),
# so it was widened to 0.025, as the study widens every sweep whose best rate is at its edge. FedSVD keeps data=agnews'
# lr 1 (the agnews-lr1 grid); its cells are the agnews grid's.
AGNEWS_FEDERATION_STEPS = AGNEWS.clients * AGNEWS.rounds * 8  # train=default's local steps, every client every round
AGNEWS_STEPS = replace(AGNEWS, name="agnews-steps", epsilons=(3.0,),
                       strategy_lrs=((CENTRALIZED, (0.025, 0.05, 0.1, 0.25)),),
                       centralized_overrides=(*AGNEWS.centralized_overrides,
                                              f"train.max_steps={AGNEWS_FEDERATION_STEPS}"),
                       tuned=True, fixed=("fedsvd",))
# Does `data=agnews` keep train=default's lr 1 or take the quick grid's sweep choice 0.5, at which every earlier AG
# News figure ran? Its FedSVD cells at ε = 3 and lr 1, paired by seed with the fraction-1 runs at 0.5 (docs/recipe.md),
# decided it on the held-out records: it keeps 1.
AGNEWS_LR1 = replace(AGNEWS, name="agnews-lr1", strategies=("fedsvd",), epsilons=(3.0,), lrs=(1.0,), strategy_lrs=())
# FFA-LoRA's sweep could not separate lr 1 from 2 (0.830 against 0.831 on the tuning split; a rerun of the lr-1 cell
# scored 0.831): is its gap to FedSVD (at lr 1) the rate's? Its finals at lr 1 too, paired by seed with those at 2.
FFA_LR1 = replace(METHODS, name="ffa-lr1", strategies=("ffa",), adapters=("pissa",), lrs=(1.0,), strategy_lrs=(),
                  tuned=False)
GRIDS = {grid.name: grid
         for grid in (QUICK, FRACTION1, BATCH32, METHODS, PARTITIONS, RECORDS, STEPS, NOISE, DEFAULTS, ROUNDS15,
                      BATCH256, AGNEWS, AGNEWS_LR1, AGNEWS_STEPS, FFA_LR1, MINIMUM, SMOKE)}
# docs/results.md: what `python benchmarks/accuracy.py` runs and summarizes, each grid under the question it answers
# (every grid also has its own page, docs/results-GRID.md, with its plots, sweep and missing cells).
HEADLINE = (
    ("defaults", "SST-2: the defaults against centralized DP, at ε 1, 3 and 8"),
    ("steps", "SST-2: centralized DP at the federation's number of DP-SGD steps (ε = 3)"),
    ("agnews", "AG News: the defaults against centralized DP, at ε 1, 3 and 8"),
    ("agnews-steps", "AG News: centralized DP at the federation's number of DP-SGD steps (ε = 3)"),
    ("methods", "Strategies and adapters, each at its own tuned rate (SST-2, ε = 3, the batch-32 recipe)"),
)


def needs_data_root(dataset: str) -> bool:
    return any("{root}" in override for override in DATASETS[dataset][0])


def strategies_for(grid: Grid, adapter: str) -> tuple[str, ...]:
    """A linear spectral adapter runs under FedAvg (exact for it) instead of the low-rank strategies."""
    if adapter in LINEAR_ADAPTERS:
        return tuple(dict.fromkeys(LINEAR_ADAPTERS[adapter] if s != CENTRALIZED else s for s in grid.strategies))
    return grid.strategies


def lrs_for(grid: Grid, strategy: str) -> tuple[float, ...]:
    return grid.rates(strategy)


def tuning_cells(grid: Grid) -> list[Cell]:
    return [Cell(d, s, a, grid.tune_epsilon, grid.tune_partition, grid.seeds[0], lr, tune=True)
            for d in grid.datasets for a in grid.adapters for s in strategies_for(grid, a) if grid.swept(s)
            for lr in lrs_for(grid, s)]


def final_cells(grid: Grid) -> list[Cell]:
    """Seed by seed: a study cut short has run every configuration once before it repeats any."""
    return [Cell(d, s, a, e, p, seed, None)
            for seed in grid.seeds for d in grid.datasets for a in grid.adapters for s in strategies_for(grid, a)
            for e in grid.epsilons for p in grid.partitions
            if not (s == CENTRALIZED and p != grid.partitions[0])]  # pooled data has no partition


def stable_index(cell: Cell) -> int:
    """The same number on every machine and Python process (sharding must not depend on hash seeds)."""
    return zlib.crc32(cell.key.encode())


def chosen_lr(grid: Grid, cell: Cell, results: dict[str, dict]) -> float | None:
    """The best learning rate of the cell's group by validation accuracy, or None until its sweep is done."""
    if not grid.swept(cell.strategy):
        return lrs_for(grid, cell.strategy)[0]
    scores = {}
    for tune in tuning_cells(grid):
        if tune.group == cell.group:
            if tune.key not in results:
                return None
            scores[tune.lr] = results[tune.key]["score"]
    return max(scores, key=lambda lr: (scores[lr], -lr)) if scores else None


def command(cell: Cell, grid: Grid, data_root: Path) -> list[str]:
    """The fedspec command line (after `fedspec`) of one cell."""
    overrides = [o.format(root=data_root) for o in DATASETS[cell.dataset][0]]
    # `fedspec train` steps at train.centralized_lr where a recipe sets one (train=large_batch), else at train.lr
    rate = "train.centralized_lr" if cell.strategy == CENTRALIZED else "train.lr"
    overrides += [f"adapter={cell.adapter}", f"{rate}={cell.lr:g}", f"run.seed={cell.seed}"]
    if cell.tune:
        overrides.append("data.validation=true")
    if math.isinf(cell.epsilon):
        overrides.append("privacy=none")
    else:
        overrides.append(f"privacy.target_epsilon={cell.epsilon:g}")
    if cell.partition == "iid":
        overrides.append("data.partition=iid")
    else:
        overrides += ["data.partition=dirichlet", f"data.alpha={float(cell.partition.removeprefix('dir')):g}"]
    overrides += list(dict(grid.dataset_overrides).get(cell.dataset, ()))
    overrides += list(dict(grid.partition_overrides).get(cell.partition, ()))
    overrides += list(grid.overrides)
    if not cell.tune:
        overrides += list(grid.final_overrides)
        overrides += list(dict(grid.dataset_final_overrides).get(cell.dataset, ()))
    if cell.strategy == CENTRALIZED:
        return ["train", *overrides, *grid.centralized_overrides]
    return ["simulate", "--clients", str(grid.clients), "--rounds", str(grid.rounds), f"strategy={cell.strategy}",
            *overrides]


def run_config(command_line: list[str]) -> DictConfig:
    """The configuration a cell's command line runs: the config it composes (--clients / --rounds as the CLI maps
    them), less what its run never reads: simulate does not read fedspec train's rate, and no run reads
    train.rates_need_dp, a check at composition (a train.lr on the command line clears both). Two cells run the same
    thing when their subcommands and run configs are equal, however their overrides are ordered or spelled."""
    from fedspec.config import compose_config

    flags = {"--clients": "federation.clients", "--rounds": "federation.rounds"}
    overrides = [f"{flags[a]}={b}" for a, b in itertools.pairwise(command_line) if a in flags]
    config = compose_config(overrides + [a for a in command_line[1:] if "=" in a], check_files=False)
    del config.train.rates_need_dp
    if command_line[0] == "simulate":
        del config.train.centralized_lr
    return config


def same_run(cell: Cell, grid: Grid, other: Grid, data_root: Path) -> bool:
    """Whether ``grid`` and ``other`` run ``cell`` identically (so one grid's finished run stands for the other's)."""
    ours, theirs = command(cell, grid, data_root), command(cell, other, data_root)
    return ours == theirs or (ours[0] == theirs[0] and run_config(ours) == run_config(theirs))


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def result(cell: Cell, run_dir: Path, *, seconds: float, resumed: bool = False) -> dict:
    """The record a finished cell leaves: accuracy per round (or epoch), ε, bytes sent, wall time."""
    lines = read_metrics(run_dir)
    kind = "epoch" if cell.strategy == CENTRALIZED else "round"
    rows = {}
    for line in lines:  # a resumed run logs its rounds again from the checkpoint on: keep the last of each
        if line["kind"] == kind:
            rows[line[kind]] = line
    curve = [rows[i]["eval_accuracy"] for i in sorted(rows)]
    epsilons = [rows[i].get("max_epsilon", rows[i].get("epsilon")) for i in sorted(rows)]
    uploads = [line["update_bytes"] for line in lines if line["kind"] == "client" and "update_bytes" in line]
    trained = curve[1:] or curve  # round (epoch) 0 is the untrained model: it scores nothing
    # A federation stops before its last round when too few clients have budget left for another: its last round
    # is then not the grid's (the report flags it)
    stopped = next((line["reason"] for line in reversed(lines) if line["kind"] == "stopped"), None)
    tail = trained[-5:]
    record = {
        **{k: v for k, v in cell.__dict__.items()}, "key": cell.key,
        "epsilon": "inf" if math.isinf(cell.epsilon) else cell.epsilon,
        "accuracy": curve[-1],
        "curve": curve,
        "last5_spread": max(tail) - min(tail),
        "score": mean(trained[-TUNE_LAST_ROUNDS:]),
        "max_epsilon": next((e for e in reversed(epsilons) if e is not None), None),
        "bytes_per_client_round": mean(uploads) if uploads else None,
        "seconds": seconds,
        "resumed": resumed,
        "stopped": stopped,
    }
    if kind == "epoch":
        init = next((line for line in lines if line["kind"] == "init"), {})
        record["trainable"] = init.get("trainable_adapter", 0) + init.get("trainable_other", 0)
    if not cell.tune and DATASETS[cell.dataset][1] is not None:
        record.update(subgroup_scores(run_dir))
    summary = f"accuracy {record['accuracy']:.4f}"
    if "subgroup_accuracy" in record:
        summary += f", whole sentences {record['subgroup_accuracy']:.4f}"
    if record["max_epsilon"] is not None:
        from fedspec.privacy.accounting import epsilon_text  # rounded up, as every ε fedspec shows

        summary += f", ε {epsilon_text(record['max_epsilon'])}"
    if stopped is not None:
        summary += f"; stopped after {kind} {len(curve) - 1}: {stopped}"
    record["summary"] = summary
    return record


def last_rounds_drop(curve: list[float], rounds: int = 5) -> float:
    """How far the last ``rounds`` rounds fell below the best round before them: 0 for a curve that only rises,
    the depth of the swing for one that falls back (the spread alone cannot tell the two apart)."""
    trained = curve[1:] or curve
    start = max(len(trained) - rounds, 0)
    return max((max(trained[: i + 1]) - trained[i] for i in range(start, len(trained))), default=0.0)


def subgroup_scores(run_dir: Path) -> dict[str, float | int]:
    """Accuracy of the run's final adapter on two parts of the evaluation file: its whole sentences (>= 15 words;
    SST-2's rows are phrases of its parse trees as well as whole sentences, 22 % of the rows have 15 words or more,
    in train.tsv and validation.tsv alike, and the long ones are the harder part), and its rows that no row the run
    trained on contains (:func:`unseen_rows`)."""
    from fedspec.adapters import load_adapter
    from fedspec.builders import build_task, encode
    from fedspec.config import load_config_file
    from fedspec.models import build_classifier
    from fedspec.training import predict_logits

    cfg = load_config_file(run_dir / "config.yaml")
    task = build_task(cfg.data, cfg.run.seed)
    model, tokenizer = build_classifier(cfg.model, task.num_classes, seed=cfg.run.seed)
    load_adapter(model, run_dir / "adapter")
    inputs, labels = encode(tokenizer, task.eval, cfg.model.max_length)
    right = (predict_logits(model, inputs, cfg.train.eval_batch_size).argmax(-1) == labels).tolist()
    long = [i for i, text in enumerate(task.eval.texts) if len(text.split()) >= WHOLE_SENTENCE_WORDS]
    unseen = unseen_rows(list(task.train.texts), list(task.eval.texts))
    return {"subgroup_accuracy": sum(right[i] for i in long) / len(long),
            "unseen_accuracy": sum(right[i] for i in unseen) / len(unseen) if unseen else None,
            "unseen_rows": len(unseen)}


def unseen_rows(train_texts: list[str], eval_texts: list[str]) -> list[int]:
    """Indices of the evaluation rows that are no run of whole words inside any training row.

    SST-2's rows are the phrases of its sentences' parse trees, and a validation file carved from GLUE's training
    rows (as ``validation.tsv`` is) holds phrases of sentences whose other phrases, or whole sentence, are in
    ``train.tsv``: a model has then trained on the words it is scored on. These rows are the ones it has not."""
    spans: dict[int, set[tuple[str, ...]]] = {}
    wanted = {len(text.split()) for text in eval_texts}
    for text in train_texts:
        words = tuple(text.split())
        for length in wanted:
            if length <= len(words):
                spans.setdefault(length, set()).update(words[i:i + length] for i in range(len(words) - length + 1))
    return [i for i, text in enumerate(eval_texts) if tuple(text.split()) not in spans.get(len(text.split()), ())]


def with_lr(cell: Cell, lr: float) -> Cell:
    return replace(cell, lr=lr)
