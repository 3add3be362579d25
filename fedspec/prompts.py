"""Conversations → token ids for causal LMs: rendering, response masks, generation prompts.

A conversation is rendered with the tokenizer's chat template when it has one (SmolLM2's ChatML, Llama's…),
else with fedspec's plain template::

    System: <content>
    User: <content>
    Assistant: <content><eos>

(the generation prompt ends with ``Assistant:``; the space after it is the answer's first character)

Only the assistant turns are trained (their content and the end-of-turn token that teaches the model to stop);
everything else — system and user turns, the template's markup, padding — carries the label ``IGNORE``. The
rendering is done turn by turn: the text of the conversation up to an assistant turn (with the template's
generation prompt) must be a prefix of the whole text, which holds for every common template; one that
rewrites earlier turns is refused. No special tokens are added beyond what the template writes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .causal_lm import IGNORE
from .data.instructions import Conversations, Message
from .errors import ConfigError, DataError
from .models import Tokenized

PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


def end_of_turn(tokenizer) -> str:
    """The text that ends an assistant turn in the plain template: the tokenizer's EOS (BERT-style
    tokenizers have none and end with SEP)."""
    token = tokenizer.eos_token or tokenizer.sep_token
    if token is None:
        raise ConfigError("the tokenizer has neither an EOS nor a SEP token to end a response with")
    return token


def _bos(tokenizer) -> str:
    """The BOS text a tokenizer puts before every input by its own convention (Llama, Mistral and Gemma base
    models rely on it), or "". Chat templates write their own; the plain template writes it here, because
    conversations are tokenized with ``add_special_tokens=False`` (the template decides every special token)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return ""
    adds = tokenizer("x")["input_ids"][:1] == [bos] and tokenizer("x", add_special_tokens=False)["input_ids"][:1] != [bos]
    return tokenizer.bos_token if adds else ""


def render(tokenizer, messages: tuple[Message, ...], *, generation_prompt: bool = False) -> str:
    """The text of ``messages``; with ``generation_prompt`` it ends where the assistant's answer begins."""
    if getattr(tokenizer, "chat_template", None):
        chat = [{"role": role, "content": content} for role, content in messages]
        return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation_prompt)
    eos = end_of_turn(tokenizer)
    text = _bos(tokenizer) + "".join(f"{PLAIN_ROLES[role]}: {content}{eos if role == 'assistant' else ''}\n" for role, content in messages)
    # The prompt ends at the colon: the space after it belongs to the answer, as BPE and SentencePiece tokenizers
    # join it to the answer's first word ("Ġpositive"). Ending the prompt with the space would leave that token
    # untrained (it starts before the answer) and make generation continue from a lone space token.
    return text + ("Assistant:" if generation_prompt else "")


def assistant_spans(tokenizer, messages: tuple[Message, ...]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns."""
    text = render(tokenizer, messages)
    spans = []
    for turn, (role, _) in enumerate(messages):
        if role != "assistant":
            continue
        prefix = render(tokenizer, messages[:turn], generation_prompt=True)
        upto = render(tokenizer, messages[:turn + 1])
        if not (text.startswith(prefix) and text.startswith(upto) and len(prefix) <= len(upto)):
            raise ConfigError(
                "the tokenizer's chat template renders a conversation differently from its own prefixes (it rewrites "
                "earlier turns), so the response tokens cannot be located; use a model whose template does not"
            )
        spans.append((len(prefix), len(upto)))
    return text, spans


@dataclass(frozen=True)
class EncodedConversations:
    """Right-padded token ids with their response labels, and how many records did not fit."""

    inputs: Tokenized
    labels: torch.Tensor  # (records, max_length): the token at response positions, IGNORE elsewhere
    kept: list[int]  # indices of the encoded records in the conversations given
    skipped: int  # records longer than max_length tokens (or with no response token left)


def encode_conversations(tokenizer, conversations: Conversations, max_length: int) -> EncodedConversations:
    """Tokenize every record to at most ``max_length`` tokens; a longer record is skipped and counted (a
    truncated response would teach the model to stop mid-answer)."""
    rows, label_rows, kept = [], [], []
    for index, record in enumerate(conversations.records):
        encoded = _encode_record(tokenizer, record, max_length)
        if encoded is None:
            continue
        ids, labels = encoded
        rows.append(ids)
        label_rows.append(labels)
        kept.append(index)
    if not rows:
        raise DataError(
            f"none of the {len(conversations)} records fits in model.max_length={max_length} tokens "
            "(prompt and response together); raise model.max_length"
        )
    input_ids = torch.full((len(rows), max_length), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), max_length), dtype=torch.long)
    labels = torch.full((len(rows), max_length), IGNORE, dtype=torch.long)
    for row, (ids, targets) in enumerate(zip(rows, label_rows)):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention_mask[row, :len(ids)] = 1
        labels[row, :len(ids)] = torch.tensor(targets)
    return EncodedConversations(Tokenized(input_ids, attention_mask), labels, kept, len(conversations) - len(rows))


def _encode_record(tokenizer, record: tuple[Message, ...], max_length: int) -> tuple[list[int], list[int]] | None:
    """A record's token ids and response labels, or None when it is left out (longer than ``max_length`` tokens,
    or no response token to predict)."""
    text, spans = assistant_spans(tokenizer, record)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    # A token is trained when it overlaps a response: one that joins the template's last character to the
    # answer's first (a space, a newline) is the answer's first token.
    labels = [token if any(lo <= start < hi or (start < hi and end > lo) for lo, hi in spans) else IGNORE
              for token, (start, end) in zip(ids, encoded["offset_mapping"])]
    if len(ids) > max_length or all(label == IGNORE for label in labels[1:]):
        return None
    return ids, labels


def trained_records(tokenizer, conversations: Conversations, max_length: int) -> list[bool]:
    """Whether :func:`encode_conversations` keeps each record: the records a client trains on, and so the count
    its sample rate and noise are planned and accounted for."""
    return [_encode_record(tokenizer, record, max_length) is not None for record in conversations.records]


def generation_prompts(tokenizer, conversations: Conversations) -> Tokenized:
    """Every record without its last assistant turn, ending with the generation prompt, left-padded (so the
    continuations of a batch start at the same column)."""
    rows = [tokenizer(render(tokenizer, record[:-1], generation_prompt=True), add_special_tokens=False)["input_ids"]
            for record in conversations.records]
    width = max((len(ids) for ids in rows), default=1)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, ids in enumerate(rows):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids):] = 1
    return Tokenized(input_ids, attention_mask)
