"""The one data model every fedspec task produces: labelled texts plus the names of the labels.

Kept deliberately tiny (plain lists, no tensors) so that loaders, partitioners and the training loop
can share it without importing a tokenizer or a dataset library.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

# fedspec's one DataError (a FedspecError and a ValueError): the CLI prints it as one line.
from fedspec.errors import DataError

__all__ = ["DataError", "DataFileNotFoundError", "TextExamples"]


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A configured data file does not exist (also a FileNotFoundError, for callers that expect one)."""


@dataclass(frozen=True)
class TextExamples:
    """Labelled texts of one classification task.

    ``labels[i]`` is an index into ``label_names``; ``label_names`` fixes the class order, so two
    splits of the same task (train/eval, or two clients) always agree on what label 2 means.
    """

    texts: list[str]
    labels: list[int]
    label_names: list[str]

    def __post_init__(self) -> None:
        # Copy into fresh lists so callers cannot mutate a "frozen" value through a shared list.
        object.__setattr__(self, "texts", list(self.texts))
        object.__setattr__(self, "labels", [int(label) for label in self.labels])
        object.__setattr__(self, "label_names", [str(name) for name in self.label_names])
        if len(self.texts) != len(self.labels):
            raise ValueError(f"TextExamples: {len(self.texts)} texts but {len(self.labels)} labels")
        if not self.label_names:
            raise ValueError("TextExamples: label_names must not be empty")
        out_of_range = [label for label in self.labels if not 0 <= label < len(self.label_names)]
        if out_of_range:
            raise ValueError(
                f"TextExamples: label {out_of_range[0]} is outside 0..{len(self.label_names) - 1} "
                f"(label_names={self.label_names})"
            )

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_classes(self) -> int:
        """Number of classes of the task (not the number present in this split)."""
        return len(self.label_names)

    def subset(self, indices: Iterable[int]) -> TextExamples:
        """The examples at ``indices`` (in that order), keeping the full label set of the task."""
        chosen = [int(i) for i in indices]
        return TextExamples(
            texts=[self.texts[i] for i in chosen],
            labels=[self.labels[i] for i in chosen],
            label_names=self.label_names,
        )

    def label_counts(self) -> list[int]:
        """How many examples each class has, indexed like ``label_names``."""
        counts = [0] * self.num_classes
        for label in self.labels:
            counts[label] += 1
        return counts
