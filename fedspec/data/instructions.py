"""Instruction data for causal-LM tasks: conversations whose assistant turns are what the model learns.

One record is one example — a prompt and its response, or one whole chat — so record-level DP protects an
example as a unit. A JSON-lines file holds one of three shapes (the first record decides; every record must
have it):

- ``{"prompt": …, "response": …}``;
- ``{"question": …, "answer": …}`` (GSM8K's shape: the final answer follows ``####``);
- ``{"messages": [{"role": "system" | "user" | "assistant", "content": …}, …]}``, ending with an assistant turn.

A classification task can be cast as generation too (:func:`cast_classification`): the text goes into a prompt
template and the response is the class's label word, so SST-2 or AG News measure a causal LM by exact match.
Bad records (a missing field, an empty response, a chat that does not end with the assistant) are errors that
name the file and line.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedspec.data.examples import DataError, TextExamples
from fedspec.data.sources import existing_file, read_json_records

ROLES = ("system", "user", "assistant")
SHAPES = {"prompt": "response", "question": "answer"}  # first field → the response field
NO_CLASS = "-"  # the one "class" of instruction data: partitions are IID, nothing to stratify on

Message = tuple[str, str]  # (role, content)


@dataclass(frozen=True)
class Conversations:
    """Records of a causal-LM task. ``labels[i]`` indexes ``label_names`` when the records were cast from a
    classification task (a Dirichlet partition and the exact-match metric use them), else it is 0 for all."""

    records: list[tuple[Message, ...]]
    labels: list[int]
    label_names: list[str]

    def __post_init__(self) -> None:
        object.__setattr__(self, "records", [tuple(record) for record in self.records])
        object.__setattr__(self, "labels", [int(label) for label in self.labels])
        if len(self.records) != len(self.labels):
            raise ValueError(f"Conversations: {len(self.records)} records but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.records)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def subset(self, indices: Iterable[int]) -> Conversations:
        chosen = [int(i) for i in indices]
        return Conversations([self.records[i] for i in chosen], [self.labels[i] for i in chosen], self.label_names)

    def responses(self) -> list[str]:
        """The last assistant turn of every record: the reference a generation is scored against."""
        return [record[-1][1] for record in self.records]


def load_conversations(path: str | Path, *, path_key: str = "data.path") -> Conversations:
    """The records of a JSON-lines instruction file (see the module docstring for the shapes)."""
    file = existing_file(path, path_key)
    numbered = read_json_records(file)
    if not numbered:
        raise DataError(f"{path_key}={str(path)!r} holds no records")
    shape = _shape(numbered[0][1], numbered[0][0], file)
    records = [_record(item, shape, line, file) for line, item in numbered]
    return Conversations(records, [0] * len(records), [NO_CLASS])


def load_prompts(path: str | Path, *, path_key: str = "--file", template: str | None = None) -> Conversations:
    """Prompts to answer, from JSON lines of the instruction shapes; the response (or a final assistant turn) is
    optional and, when present, kept as the reference answer (else the last turn is an empty assistant turn).
    ``template`` (a run's ``data.prompt``, with ``{text}``): each "prompt" or "question" is the text put in it, as
    the run's training put each record's text; a "messages" record is a whole chat, used as it is."""
    file = existing_file(path, path_key)
    records = []
    for line, item in read_json_records(file):
        where = f"line {line} of {file}"
        if "messages" in item:
            turns = _messages(item, where)
            turns = turns if turns[-1][0] == "assistant" else (*turns, ("assistant", ""))
        else:
            field = next((name for name in SHAPES if name in item), None)
            if field is None:
                raise DataError(f"{where}: a prompt record needs \"prompt\", \"question\" or \"messages\"")
            reference = item.get(SHAPES[field])
            text = _text(item, field, where)
            turns = (("user", template.replace("{text}", text) if template else text),
                     ("assistant", reference if isinstance(reference, str) else ""))
        records.append(turns)
    if not records:
        raise DataError(f"{path_key}={str(path)!r} holds no records")
    return Conversations(records, [0] * len(records), [NO_CLASS])


def _shape(first: dict[str, Any], line: int, file: Path) -> str:
    for shape in ("messages", *SHAPES):
        if shape in first:
            return shape
    raise DataError(
        f"line {line} of {file} has fields {sorted(first)}; an instruction record needs \"prompt\" and \"response\", "
        "\"question\" and \"answer\", or \"messages\" (a list of {\"role\", \"content\"})"
    )


def _record(item: dict[str, Any], shape: str, line: int, file: Path) -> tuple[Message, ...]:
    where = f"line {line} of {file}"
    if shape != "messages":
        response_field = SHAPES[shape]
        prompt, response = (_text(item, field, where) for field in (shape, response_field))
        return ("user", prompt), ("assistant", response)
    record = _messages(item, where)
    if record[-1][0] != "assistant":
        raise DataError(f"{where}: the conversation ends with a {record[-1][0]} turn; the last turn must be the "
                        "assistant's response the model learns")
    return record


def _messages(item: dict[str, Any], where: str) -> tuple[Message, ...]:
    messages = item.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects")
    turns = []
    for turn, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise DataError(f"{where}: message {turn} needs a \"role\" of {', '.join(ROLES)} (got {message!r})")
        turns.append((message["role"], _text(message, "content", f"{where}, message {turn}")))
    return tuple(turns)


def _text(item: dict[str, Any], field: str, where: str) -> str:
    value = item.get(field)
    if not isinstance(value, str):
        missing = "is missing" if value is None else f"is {type(value).__name__} {value!r}, not text"
        raise DataError(f"{where}: field \"{field}\" {missing}")
    if not value.strip():
        raise DataError(f"{where}: field \"{field}\" is empty")
    return value


def cast_classification(examples: TextExamples, prompt: str, label_words: Sequence[str] | None) -> Conversations:
    """A classification task as generation: ``prompt`` with ``{text}`` replaced is the user turn, the class's
    label word (``label_words[label]``, default the label names) the response."""
    words = list(label_words) if label_words else list(examples.label_names)
    if len(words) != examples.num_classes:
        raise DataError(f"data.label_words has {len(words)} words for {examples.num_classes} classes "
                        f"({examples.label_names}); give one word per class")
    names = [str(name).lower() for name in examples.label_names]
    if sorted(w.lower() for w in words) == sorted(names) and [w.lower() for w in words] != names:
        # The class names themselves in another order: every record would answer with another class's name.
        raise DataError(f"data.label_words {words} are the class names in another order; label_words[i] is the "
                        f"word of class i, and the classes are, in order: {list(examples.label_names)}")
    if "{text}" not in prompt:
        raise DataError(f"data.prompt={prompt!r} must contain {{text}}, where each record's text goes")
    records = [(("user", prompt.replace("{text}", text)), ("assistant", words[label]))
               for text, label in zip(examples.texts, examples.labels)]
    # The class names stay the task's own: a deployed node labels its own file with them, then casts it the same way.
    return Conversations(records, examples.labels, examples.label_names)
