"""Training on real public data from ../shared/data (skipped when it is absent)."""

from __future__ import annotations

from fedspec.centralized import train_centralized
from fedspec.config import compose_config


def test_minilm_learns_sst2_under_dp(shared_data, tmp_path):
    """The packaged MiniLM with a PiSSA adapter, trained centrally under DP-SGD (ε = 8) on 2,000 SST-2
    sentences, is clearly better than chance on held-out SST-2 sentences."""
    cfg = compose_config([
        "data=sst2",
        f"data.path={shared_data / 'sst2' / 'train.tsv'}",
        f"data.eval_path={shared_data / 'sst2' / 'validation.tsv'}",
        "data.max_examples=2000",
        "data.eval_examples=300",
        "train.epochs=1",
        "train.batch_size=64",
        "train.optimizer=adam",  # 32 steps: a centralized run keeps Adam's state over all of them
        "train.lr=0.01",
        "model.max_length=40",
        f"run.output_dir={tmp_path}",
        "run.name=sst2",
        "run.progress=false",
    ])
    result = train_centralized(cfg)
    first, last = result.rows[0], result.rows[-1]
    assert last.epsilon is not None and last.epsilon <= 8.0
    assert last.eval_accuracy > 0.65
    assert last.eval_accuracy > first.eval_accuracy + 0.1
