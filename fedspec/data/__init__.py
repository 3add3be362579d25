"""Data for fedspec: the TextExamples model, the generated default task, file/HF loaders, partitioners.

Typical use::

    train, evaluation = load_task(cfg.data)                 # synthetic | file | hf
    parts = partition(train.labels, 20, scheme="dirichlet", alpha=0.5, seed=cfg.seed)
    client_data = [train.subset(indices) for indices in parts]
"""

from fedspec.data.examples import DataError, DataFileNotFoundError, TextExamples
from fedspec.data.partition import SCHEMES, partition, partition_summary
from fedspec.data.sources import FORMATS, load_examples, load_hf_dataset
from fedspec.data.synthetic import TOPIC_LABEL_NAMES, generate_topics
from fedspec.data.tasks import SOURCES, cap_examples, load_task, split_holdout

__all__ = [
    "DataError",
    "DataFileNotFoundError",
    "FORMATS",
    "SCHEMES",
    "SOURCES",
    "TOPIC_LABEL_NAMES",
    "TextExamples",
    "cap_examples",
    "generate_topics",
    "load_examples",
    "load_hf_dataset",
    "load_task",
    "partition",
    "partition_summary",
    "split_holdout",
]
