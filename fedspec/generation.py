"""Generation with a trained causal LM, and the answer score of held-out records.

Greedy decoding with a KV cache (``transformers``' ``generate``), prompts left-padded in batches. A generated
answer is scored against the record's reference response by ``data.answer``:

- ``exact``: the first line of the generation equals the reference, ignoring case, surrounding whitespace, quotes
  around it and a sentence's trailing punctuation ("Positive." matches "positive", "C++" does not match "C") — for
  label words and other short answers;
- ``gsm8k``: the number after the first ``####`` (or, when the model wrote none, the last number it wrote) equals
  the number after ``####`` in the reference; thousands separators, leading and trailing zeros are ignored.
"""

from __future__ import annotations

import re

from .causal_lm import CausalLM
from .data.instructions import Conversations
from .prompts import assistant_spans, end_of_turn, generation_prompts

ANSWERS = ("exact", "gsm8k")
_NUMBER = re.compile(r"-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")
_WRAPPERS = "\"'`*_"  # quotes and Markdown emphasis around an answer
_SENTENCE_END = ".,;:!?"


def normalized_text(text: str) -> str:
    """The first line, lowercased, without the quotes or emphasis around it and a sentence's trailing punctuation.
    Only those: a label word's own marks tell classes apart ("C++" from "C", "-1" from "+1")."""
    first_line = text.strip().splitlines()[0] if text.strip() else ""
    return first_line.strip(_WRAPPERS + " ").rstrip(_SENTENCE_END + _WRAPPERS + " ").lower()


def gsm8k_number(text: str) -> str | None:
    """The final answer of a GSM8K-style solution: the first number after the first ``####`` (what follows it
    may be a new, made-up turn), else the last number; written canonically ("1,018" → "1018", "5.00" → "5",
    ".5" → "0.5")."""
    marked = text.split("####", 1)
    candidates = _NUMBER.findall(marked[1]) if len(marked) == 2 else []
    candidates = candidates[:1] or _NUMBER.findall(text)[-1:]
    if not candidates:
        return None
    number = candidates[0].replace(",", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    sign, digits = ("-", number[1:]) if number.startswith("-") else ("", number)
    digits = digits.lstrip("0") or "0"
    digits = "0" + digits if digits.startswith(".") else digits
    return "0" if digits == "0" else sign + digits


def answer_matches(generated: str, reference: str, kind: str) -> bool:
    if kind == "gsm8k":
        expected = gsm8k_number(reference)
        return expected is not None and gsm8k_number(generated) == expected
    return normalized_text(generated) == normalized_text(reference)


def stop_tokens(model: CausalLM, tokenizer) -> list[int]:
    """The tokens that end an answer: the special token the chat template writes after an assistant turn (what
    training taught the model to emit; ``<end_of_turn>`` or ``<|eot_id|>`` where it is not EOS), the plain
    template's end of turn, the tokenizer's EOS and the model's own ``generation_config`` EOS tokens."""
    stops: list[int] = []

    def add(token) -> None:
        for t in token if isinstance(token, (list, tuple)) else [token]:
            if t is not None and t not in stops:
                stops.append(int(t))

    if getattr(tokenizer, "chat_template", None):
        answer = "fedspec-probe-answer"
        text, [(start, end)] = assistant_spans(tokenizer, (("user", "question"), ("assistant", answer)))
        after = text[text.index(answer, start) + len(answer):end]
        first = tokenizer(after, add_special_tokens=False)["input_ids"][:1]
        if first and first[0] in tokenizer.all_special_ids:
            add(first[0])
    else:
        add(tokenizer.convert_tokens_to_ids(end_of_turn(tokenizer)))
    add(tokenizer.eos_token_id)
    add(getattr(getattr(model.lm, "generation_config", None), "eos_token_id", None))
    return stops


def generate_responses(model: CausalLM, tokenizer, conversations: Conversations, *, max_new_tokens: int,
                       batch_size: int = 16) -> list[str]:
    """Greedy answers to every record's prompt (its turns before the last assistant turn)."""
    prompts = generation_prompts(tokenizer, conversations)
    stop = stop_tokens(model, tokenizer)
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        rows = slice(start, start + batch_size)
        ids, mask = prompts.input_ids[rows], prompts.attention_mask[rows]
        width = int(mask.sum(1).max())  # left padding: drop the columns no prompt of this batch uses
        new = model.generate(ids[:, -width:], mask[:, -width:], max_new_tokens=max_new_tokens, eos_token_id=stop,
                             pad_token_id=tokenizer.pad_token_id)
        answers.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    return answers


def answer_accuracy(model: CausalLM, tokenizer, conversations: Conversations, *, kind: str, max_new_tokens: int,
                    batch_size: int = 16) -> dict[str, float]:
    """The share of records whose greedy answer matches the reference (see the module docstring)."""
    answers = generate_responses(model, tokenizer, conversations, max_new_tokens=max_new_tokens, batch_size=batch_size)
    right = sum(answer_matches(answer, reference, kind)
                for answer, reference in zip(answers, conversations.responses()))
    return {"answer_accuracy": right / max(len(answers), 1), "answered": len(answers)}
