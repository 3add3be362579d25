"""Build a task's (train, eval) examples from the ``data`` section of the config.

``load_task`` reads plain attributes, so a Hydra/OmegaConf ``DictConfig``, a dataclass, a
``SimpleNamespace`` or a dict all work; unset keys (missing or None) take the defaults below.

Keys: ``source`` ("synthetic" | "file" | "hf"), ``path`` (file path, or dataset name for "hf"),
``eval_path`` (file, optional), ``split`` / ``eval_split`` ("hf" only), ``text_field``,
``label_field``, ``format``, ``has_header``, ``label_names``, ``num_examples`` (synthetic train size),
``eval_examples`` (synthetic eval size, or the size of the held-out split carved from train when there
is no separate eval data), ``max_examples`` (cap on train size; 0/None = all), ``validation`` (tuning mode:
evaluate on a validation split carved from the training records instead of the held-out data), ``seed``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedspec.data.examples import DataError, TextExamples
from fedspec.data.instructions import Conversations, cast_classification, load_conversations
from fedspec.data.sources import load_examples, load_hf_dataset
from fedspec.data.synthetic import generate_topics

SOURCES: tuple[str, ...] = ("synthetic", "file", "hf")
TASKS: tuple[str, ...] = ("classification", "causal_lm")
DEFAULT_NUM_EXAMPLES = 2000
DEFAULT_EVAL_EXAMPLES = 500
# Without data.eval_examples, a held-out split carved from user data takes at most this share of it.
DEFAULT_HOLDOUT_SHARE = 0.2
VALIDATION_SEED_OFFSET = 7919  # the validation carve differs from a held-out carve of the same seed


def load_task(cfg: Any) -> tuple[TextExamples, TextExamples] | tuple[Conversations, Conversations]:
    """Return (train, eval) examples for the configured data source; the run's seed drives every choice but the
    held-out rows, which data.holdout_seed fixes.

    ``task="causal_lm"`` gives :class:`Conversations`: the records of a JSON-lines instruction file, or — when
    ``prompt`` is set — the classification data cast as generation (``prompt`` around the text, the class's
    word from ``label_words`` as the response)."""
    task = _option(cfg, "task", "classification")
    if task not in TASKS:
        raise DataError(f"data.task={task!r} is not one of: {', '.join(TASKS)}")
    prompt = _option(cfg, "prompt", None)
    if task == "causal_lm" and not prompt:
        return _held_out(cfg, *_instruction_task(cfg, _holdout_seed(cfg)))
    train, evaluation = _classification_task(cfg)
    if task == "causal_lm":
        words = _option(cfg, "label_words", None)
        return cast_classification(train, prompt, words), cast_classification(evaluation, prompt, words)
    return train, evaluation


def _classification_task(cfg: Any) -> tuple[TextExamples, TextExamples]:
    source = _option(cfg, "source", "synthetic")
    seed = int(_option(cfg, "seed", 0))
    if source == "synthetic":
        train, evaluation = _synthetic_task(cfg, seed)
    elif source == "file":
        train, evaluation = _file_task(cfg, _holdout_seed(cfg))
    elif source == "hf":
        train, evaluation = _hf_task(cfg, _holdout_seed(cfg))
    else:
        raise DataError(f"data.source={source!r} is not one of: {', '.join(SOURCES)}")
    present = sorted(set(cap_examples(train, _non_negative_int(cfg, "max_examples", 0), seed).labels))
    if len(present) < 2:
        raise DataError(
            f"the training data holds one class only ({train.label_names[present[0]]!r}): a classifier needs at "
            "least two; check data.path and data.label_field"
        )
    return _held_out(cfg, train, evaluation)


def _held_out(cfg: Any, train, evaluation):
    """Cap the training records at data.max_examples; in tuning mode (data.validation) swap the held-out data
    for a validation split of the training records."""
    seed = int(_option(cfg, "seed", 0))
    train = cap_examples(train, _non_negative_int(cfg, "max_examples", 0), seed)
    if _option(cfg, "validation", False):
        # Tuning mode: the held-out data stays unseen; a validation split of the training records (carved with
        # its own seed, the size of the held-out set but at most a fifth of the training records, so that a large
        # evaluation file does not take the training data away) stands in for it; the model trains on the rest.
        size = min(len(evaluation), int(len(train) * DEFAULT_HOLDOUT_SHARE))
        if size < 1:  # split_holdout's own error would blame data.eval_examples, which did not choose this size
            raise DataError(
                f"data.validation=true carves its validation split from the {len(train)} training records (a fifth "
                "of them at most), which leaves it empty; give more training records (data.max_examples, data.path)"
            )
        return split_holdout(train, size, seed + VALIDATION_SEED_OFFSET)
    return train, evaluation


def split_holdout(examples: TextExamples, eval_size: int, seed: int) -> tuple[TextExamples, TextExamples]:
    """Carve a class-stratified, seeded eval split of ``eval_size`` examples; the rest is train.

    Stratified so that a small eval split still has every class in the data's proportions; both
    splits keep the original order of the examples.
    """
    if not 0 < eval_size < len(examples):  # an empty held-out set would score every round as NaN
        raise DataError(
            f"data.eval_examples={eval_size} must be at least 1 and less than the {len(examples)} examples the "
            "held-out set is carved from (0 means every row of data.eval_path, when one is given); change "
            "data.eval_examples or give data.eval_path"
        )
    rng = np.random.default_rng(seed)
    labels = np.asarray(examples.labels, dtype=np.int64)
    class_sizes = np.bincount(labels, minlength=examples.num_classes)
    quotas = _proportional_quotas(class_sizes, eval_size)
    is_eval = np.zeros(len(examples), dtype=bool)
    for label, quota in enumerate(quotas):
        members = np.flatnonzero(labels == label)
        is_eval[rng.permutation(members)[:quota]] = True
    train_indices, eval_indices = np.flatnonzero(~is_eval), np.flatnonzero(is_eval)
    return examples.subset(train_indices.tolist()), examples.subset(eval_indices.tolist())


def cap_examples(examples: TextExamples, max_examples: int | None, seed: int) -> TextExamples:
    """A seeded random subset of at most ``max_examples`` examples (0/None keeps all), original order kept."""
    if not max_examples or max_examples >= len(examples):
        return examples
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.permutation(len(examples))[:max_examples])
    return examples.subset(chosen.tolist())


# --------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------


def _synthetic_task(cfg: Any, seed: int) -> tuple[TextExamples, TextExamples]:
    num_examples = _non_negative_int(cfg, "num_examples", DEFAULT_NUM_EXAMPLES)
    eval_examples = _non_negative_int(cfg, "eval_examples", DEFAULT_EVAL_EXAMPLES)
    if num_examples < 1:
        raise DataError(f"data.num_examples={num_examples} must be at least 1 for data.source='synthetic'")
    # One pool of distinct sentences, then a split: eval never repeats a training sentence.
    pool = generate_topics(num_examples + eval_examples, seed)
    return split_holdout(pool, eval_examples, seed)


def _holdout_seed(cfg: Any) -> int:
    """The seed of the held-out carve (or of the sample of an evaluation file): data.holdout_seed, not the run's
    seed. Every seed of a study is then scored on the same rows, and no seed's held-out rows can sit in the
    validation split that another seed's learning-rate sweep tuned on."""
    return _non_negative_int(cfg, "holdout_seed", 0)


def _file_task(cfg: Any, holdout_seed: int) -> tuple[TextExamples, TextExamples]:
    path = _option(cfg, "path", None)
    if not path:
        raise DataError(
            "data.path is required when data.source='file'; point it at a .tsv, .csv or .jsonl file"
        )
    options = _file_options(cfg)
    train = load_examples(path, path_key="data.path", **options)
    eval_path = _option(cfg, "eval_path", None)
    if eval_path:
        # Reuse the train label mapping so label 2 means the same class in both files. A bare class id in the eval
        # file is read as a position in that list only when data.label_names gave it: names sorted from the training
        # file's labels say nothing about which id is which class.
        allow_ids = options["label_names"] is not None
        options["label_names"] = train.label_names
        evaluation = load_examples(eval_path, path_key="data.eval_path", allow_ids=allow_ids, **options)
        # data.eval_examples caps a large eval file: the server evaluates on it every round.
        return train, cap_examples(evaluation, _non_negative_int(cfg, "eval_examples", 0), holdout_seed)
    return split_holdout(train, _holdout_size(cfg, len(train)), holdout_seed)


def _instruction_task(cfg: Any, holdout_seed: int) -> tuple[Conversations, Conversations]:
    path = _option(cfg, "path", None)
    if not path or _option(cfg, "source", "file") != "file":
        raise DataError("a causal-LM task reads a JSON-lines file: set data.source=file and data.path (or set "
                        "data.prompt to cast classification data as generation)")
    train = load_conversations(path)
    eval_path = _option(cfg, "eval_path", None)
    if eval_path:
        evaluation = load_conversations(eval_path, path_key="data.eval_path")
        return train, cap_examples(evaluation, _non_negative_int(cfg, "eval_examples", 0), holdout_seed)
    return split_holdout(train, _holdout_size(cfg, len(train)), holdout_seed)


def _hf_task(cfg: Any, holdout_seed: int) -> tuple[TextExamples, TextExamples]:
    name = _option(cfg, "path", None) or _option(cfg, "name", None)
    if not name:
        raise DataError("data.path must name the Hugging Face dataset when data.source='hf'")
    fields = {
        "text_field": str(_option(cfg, "text_field", "text")),
        "label_field": str(_option(cfg, "label_field", "label")),
    }
    label_names = _label_names(cfg)
    train = load_hf_dataset(str(name), str(_option(cfg, "split", "train")), label_names=label_names, **fields)
    eval_split = _option(cfg, "eval_split", None)
    if eval_split:
        evaluation = load_hf_dataset(str(name), str(eval_split), label_names=train.label_names, **fields)
        # data.eval_examples caps it as it caps an eval file: the server evaluates on it every round.
        return train, cap_examples(evaluation, _non_negative_int(cfg, "eval_examples", 0), holdout_seed)
    return split_holdout(train, _holdout_size(cfg, len(train)), holdout_seed)


# --------------------------------------------------------------------------------------------------
# Reading options defensively
# --------------------------------------------------------------------------------------------------


def _option(cfg: Any, key: str, default: Any) -> Any:
    """``cfg.key`` (attribute or mapping item); a missing key or None gives ``default``."""
    if isinstance(cfg, Mapping):
        value = cfg.get(key, default)
    else:
        value = getattr(cfg, key, default)
    return default if value is None else value


def _non_negative_int(cfg: Any, key: str, default: int) -> int:
    value = _option(cfg, key, default)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise DataError(f"data.{key}={value!r} must be a whole number, 0 or more")
    return int(value)


def _file_options(cfg: Any) -> dict[str, Any]:
    has_header = _option(cfg, "has_header", None)
    if has_header is not None and not isinstance(has_header, bool):
        raise DataError(f"data.has_header={has_header!r} must be true, false or null (auto-detect)")
    return {
        "text_field": _option(cfg, "text_field", "text"),
        "label_field": _option(cfg, "label_field", "label"),
        "format": str(_option(cfg, "format", "auto")),
        "has_header": has_header,
        "label_names": _label_names(cfg),
    }


def _label_names(cfg: Any) -> list[str] | None:
    names = _option(cfg, "label_names", None)
    if names is None:
        return None
    if isinstance(names, str) or not isinstance(names, Sequence) or len(names) == 0:
        raise DataError(f"data.label_names={names!r} must be a non-empty list of class names")
    return [str(name) for name in names]


def _holdout_size(cfg: Any, available: int) -> int:
    explicit = _option(cfg, "eval_examples", None)
    if explicit is not None:
        return _non_negative_int(cfg, "eval_examples", 0)
    return min(DEFAULT_EVAL_EXAMPLES, int(available * DEFAULT_HOLDOUT_SHARE))


def _proportional_quotas(class_sizes: np.ndarray, total: int) -> list[int]:
    """Split ``total`` over classes in proportion to their sizes (largest remainder, ties by class id)."""
    exact = class_sizes * total / max(int(class_sizes.sum()), 1)
    quotas = np.floor(exact).astype(np.int64)
    remainder_order = sorted(range(len(exact)), key=lambda label: (-(exact[label] - quotas[label]), label))
    for label in remainder_order[: total - int(quotas.sum())]:
        quotas[label] += 1
    return quotas.tolist()
