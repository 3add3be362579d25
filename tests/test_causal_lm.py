"""Causal-LM fine-tuning: the response-only loss, conversation rendering and masking, data errors, exact per-sample
gradients on decoder layers for every method, generation and the PEFT export of a decoder."""

from __future__ import annotations

import json

import pytest
import torch

import fedspec
from fedspec.adapters import METHODS, collect_calibration
from fedspec.adapters.targets import match_targets
from fedspec.causal_lm import IGNORE, ResponseLoss, load_causal_lm
from fedspec.data import DataError, TextExamples
from fedspec.data.instructions import Conversations, cast_classification, load_conversations, load_prompts
from fedspec.errors import AdapterError, ConfigError
from fedspec.generation import answer_matches, gsm8k_number, stop_tokens
from fedspec.models import load_tokenizer
from fedspec.prompts import assistant_spans, encode_conversations, generation_prompts
from fedspec.training import DPSettings, train_steps

from helpers import assert_opacus_matches_per_example_loop, perturb

DECODER_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
RECORDS = Conversations(
    [(("user", "two plus three"), ("assistant", "five")),
     (("system", "be brief"), ("user", "capital of france"), ("assistant", "paris is the capital")),
     (("user", "hi"), ("assistant", "hello"), ("user", "and again"), ("assistant", "hello again friend"))],
    [0, 0, 0], ["-"])


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny-llama")


def _trained_text(tokenizer, encoded, row: int) -> str:
    return tokenizer.decode([t for t in encoded.labels[row].tolist() if t != IGNORE])


# --- the loss -----------------------------------------------------------------------------------------------------


def test_response_loss_is_each_records_mean_over_its_response_tokens_then_the_mean_over_records():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=generator)
    labels = torch.full((3, 6), IGNORE)
    labels[0, 2:5] = torch.tensor([1, 2, 3])
    labels[1, 1] = 7
    labels[2, 3:6] = torch.tensor([4, 5, 6])
    expected = []
    for row in range(3):
        positions = [t for t in range(1, 6) if labels[row, t] != IGNORE]
        nll = [torch.nn.functional.cross_entropy(logits[row, t - 1], labels[row, t]) for t in positions]
        expected.append(torch.stack(nll).mean())
    torch.testing.assert_close(ResponseLoss("none")(logits, labels), torch.stack(expected))
    torch.testing.assert_close(ResponseLoss()(logits, labels), torch.stack(expected).mean())
    torch.testing.assert_close(ResponseLoss("sum")(logits, labels), torch.stack(expected).sum())
    # Logits that predict prompt or padding positions do not enter the loss.
    changed = logits.clone()
    changed[0, 0] += 100.0  # predicts position 1 (prompt)
    changed[0, 5] += 100.0  # the last position predicts nothing
    torch.testing.assert_close(ResponseLoss()(changed, labels), ResponseLoss()(logits, labels))


# --- rendering and masking ----------------------------------------------------------------------------------------


def test_plain_template_trains_every_assistant_turn_and_its_end_token_and_nothing_else(tokenizer):
    assert tokenizer.chat_template is None  # MiniLM's tokenizer: fedspec's plain template
    encoded = encode_conversations(tokenizer, RECORDS, 64)
    assert encoded.skipped == 0 and encoded.kept == [0, 1, 2]
    assert _trained_text(tokenizer, encoded, 0) == "five [SEP]"
    assert _trained_text(tokenizer, encoded, 1) == "paris is the capital [SEP]"
    assert _trained_text(tokenizer, encoded, 2) == "hello [SEP] hello again friend [SEP]"
    assert (encoded.labels[encoded.inputs.attention_mask == 0] == IGNORE).all()  # padding is never trained
    trained = encoded.labels != IGNORE
    assert torch.equal(encoded.labels[trained], encoded.inputs.input_ids[trained])


def test_with_a_bpe_tokenizer_the_plain_template_trains_the_answers_first_token_and_generation_continues_it():
    """SmolLM2's byte-level BPE joins the space after "Assistant:" to the answer ("Ġpositive"): that token must be
    trained, and the generation prompt must end right before it (not on a lone space token training never saw)."""
    bpe = load_tokenizer("smollm2")
    bpe.chat_template = None  # the plain template, as for a base model without one
    records = Conversations([(("user", "Review: great film"), ("assistant", "positive"))], [0], ["-"])
    encoded = encode_conversations(bpe, records, 64)
    assert _trained_text(bpe, encoded, 0) == " positive" + bpe.eos_token + "\n"
    prompt = generation_prompts(bpe, records)
    prompt_ids = prompt.input_ids[0][prompt.attention_mask[0].bool()].tolist()
    record_ids = encoded.inputs.input_ids[0][encoded.inputs.attention_mask[0].bool()].tolist()
    first_trained = next(i for i, label in enumerate(encoded.labels[0].tolist()) if label != IGNORE)
    assert record_ids[:first_trained] == prompt_ids  # training's context of the answer is the generation prompt


def test_the_plain_template_starts_with_bos_where_the_tokenizer_adds_one():
    """Base Llama/Mistral/Gemma tokenizers put BOS first and their models rely on it: training records and
    generation prompts both start with it (conversations are tokenized without the tokenizer's special tokens)."""
    bpe = load_tokenizer("smollm2")
    bpe.chat_template = None
    records = Conversations([(("user", "Review: great film"), ("assistant", "positive"))], [0], ["-"])
    without = encode_conversations(bpe, records, 64).inputs.input_ids[0, 0].item()
    bpe.add_bos_token = True
    encoded = encode_conversations(bpe, records, 64)
    prompt = generation_prompts(bpe, records)
    assert without != bpe.bos_token_id
    assert encoded.inputs.input_ids[0, 0].item() == bpe.bos_token_id == prompt.input_ids[0, 0].item()
    assert (encoded.inputs.input_ids[0] == bpe.bos_token_id).sum() == 1  # once, as a special token
    assert _trained_text(bpe, encoded, 0) == " positive" + bpe.eos_token + "\n"


def test_chat_template_renders_turns_and_the_generation_prompt_is_the_text_before_the_answer(tokenizer):
    chat = load_tokenizer("tiny-llama")
    chat.chat_template = CHATML
    text, spans = assistant_spans(chat, RECORDS.records[1])
    assert text == ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\ncapital of france<|im_end|>\n"
                    "<|im_start|>assistant\nparis is the capital<|im_end|>\n")
    assert [text[a:b] for a, b in spans] == ["paris is the capital<|im_end|>\n"]
    encoded = encode_conversations(chat, RECORDS, 96)
    assert _trained_text(chat, encoded, 1).startswith("paris is the capital <")
    prompts = generation_prompts(chat, RECORDS)
    first = prompts.input_ids[0][prompts.attention_mask[0].bool()]
    assert chat.decode(first) == chat.decode(chat("<|im_start|>user\ntwo plus three<|im_end|>\n<|im_start|>assistant\n",
                                                  add_special_tokens=False)["input_ids"])
    assert prompts.attention_mask[:, -1].all()  # left padding: every prompt ends in the last column


def test_a_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    chat = load_tokenizer("tiny-llama")
    chat.chat_template = "{{ messages | length }} turns: " + CHATML
    with pytest.raises(ConfigError, match="renders a conversation differently from its own prefixes"):
        encode_conversations(chat, RECORDS, 96)


def test_records_longer_than_max_length_are_skipped_and_counted_never_truncated(tokenizer):
    encoded = encode_conversations(tokenizer, RECORDS, 12)
    assert encoded.kept == [0] and encoded.skipped == 2
    with pytest.raises(DataError, match=r"none of the 3 records fits in model.max_length=3 tokens"):
        encode_conversations(tokenizer, RECORDS, 3)


# --- data ---------------------------------------------------------------------------------------------------------


def _jsonl(tmp_path, *records) -> str:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_the_three_record_shapes_load(tmp_path):
    assert load_conversations(_jsonl(tmp_path, {"prompt": "p", "response": "r"})).records == [
        (("user", "p"), ("assistant", "r"))]
    gsm8k = load_conversations(_jsonl(tmp_path, {"question": "q", "answer": "a\n#### 4"}))
    assert gsm8k.responses() == ["a\n#### 4"]
    chat = load_conversations(_jsonl(tmp_path, {"messages": [{"role": "system", "content": "s"},
                                                             {"role": "user", "content": "u"},
                                                             {"role": "assistant", "content": "a"}]}))
    assert chat.records == [(("system", "s"), ("user", "u"), ("assistant", "a"))]


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85"])
def test_json_lines_whose_text_holds_unicode_line_separators_load_with_their_line_numbers(tmp_path, separator):
    """JSON lines are separated by "\\n" only: json.dumps(..., ensure_ascii=False) (and `fedspec generate`'s own
    output) writes U+2028, U+2029 and U+0085 raw inside strings, and str.splitlines() cut such a record in two
    ("line 1 is not valid JSON")."""
    path = tmp_path / "raw.jsonl"
    records = [{"question": f"two{separator}plus two", "answer": "#### 4"}, {"question": "q"}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    assert load_prompts(path).records[0] == (("user", f"two{separator}plus two"), ("assistant", "#### 4"))
    with pytest.raises(DataError, match='line 2 of .*: field "answer" is missing'):
        load_conversations(path)


def test_plain_texts_to_label_are_one_per_line_whatever_unicode_separators_they_hold(tmp_path):
    """`fedspec predict --file` on a plain-text file: one text per line ("\\n" or "\\r\\n"); str.splitlines() also cut a
    text at U+2028, U+2029 and U+0085, so one review became two predictions."""
    from fedspec.data.sources import load_texts

    path = tmp_path / "texts.txt"
    path.write_bytes("first\u2028still first\r\n\nsecond\u0085 too\nthird".encode())
    assert load_texts(path) == ["first\u2028still first", "second\u0085 too", "third"]


@pytest.mark.parametrize("bad, message", [
    ({"prompt": "p"}, r'line 2 of .*: field "response" is missing'),
    ({"prompt": "p", "response": "  "}, r'line 2 of .*: field "response" is empty'),
    ({"prompt": "p", "response": 3}, r'line 2 of .*: field "response" is int 3, not text'),
    ({"text": "t"}, r'line 1 of .* has fields \[.text.\]; an instruction record needs'),
])
def test_bad_instruction_records_name_the_line_and_field(tmp_path, bad, message):
    records = [{"prompt": "ok", "response": "fine"}, bad] if "text" not in bad else [bad]
    with pytest.raises(DataError, match=message):
        load_conversations(_jsonl(tmp_path, *records))


@pytest.mark.parametrize("messages, message", [
    ([{"role": "user", "content": "u"}], "ends with a user turn; the last turn must be the assistant's"),
    ([{"role": "robot", "content": "u"}, {"role": "assistant", "content": "a"}], 'message 0 needs a "role"'),
    ([], '"messages" must be a non-empty list'),
    ([{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}], 'message 0: field "content" is empty'),
])
def test_bad_chats_are_errors(tmp_path, messages, message):
    with pytest.raises(DataError, match=message):
        load_conversations(_jsonl(tmp_path, {"messages": messages}))


def test_prompt_files_need_no_response(tmp_path):
    prompts = load_prompts(_jsonl(tmp_path, {"question": "q"}, {"prompt": "p", "response": "ref"},
                                  {"messages": [{"role": "user", "content": "m"}]}))
    assert [record[-1] for record in prompts.records] == [("assistant", ""), ("assistant", "ref"), ("assistant", "")]


def test_classification_cast_as_generation_answers_with_label_words():
    examples = TextExamples(["good film", "bad film"], [1, 0], ["0", "1"])
    cast = cast_classification(examples, "Review: {text}\nSentiment?", ["negative", "positive"])
    assert cast.records[0] == (("user", "Review: good film\nSentiment?"), ("assistant", "positive"))
    assert cast.labels == [1, 0] and cast.label_names == ["0", "1"]  # the task's class names, for deployed nodes
    with pytest.raises(DataError, match="2 classes"):
        cast_classification(examples, "{text}", ["only"])
    with pytest.raises(DataError, match="must contain {text}"):
        cast_classification(examples, "no slot", None)
    news = TextExamples(["a", "b"], [0, 3], ["Business", "Sci/Tech", "Sports", "World"])
    with pytest.raises(DataError, match=r"class names in another order.*\['Business', 'Sci/Tech', 'Sports', 'World'\]"):
        cast_classification(news, "{text}", ["World", "Sports", "Business", "Sci/Tech"])


def test_the_agnews_recipe_answers_each_class_with_its_own_name(shared_data):
    """data=agnews data.task=causal_lm: the word a record is trained to answer is its class's name."""
    from fedspec.builders import build_task
    from fedspec.config import compose_config

    cfg = compose_config(["data=agnews", f"data.path={shared_data / 'agnews' / 'train.tsv'}", "data.max_examples=400",
                          "data.eval_examples=100", "data.task=causal_lm", "model=tiny-llama"])
    task = build_task(cfg.data, cfg.run.seed)
    assert task.train.records and all(record[-1][1] == task.train.label_names[label]
                                      for record, label in zip(task.train.records, task.train.labels))


# --- exact per-sample gradients on decoder layers ------------------------------------------------------------------


def _decoder(tokenizer, method: str, encoded, dtype: str = "float32"):
    model = load_causal_lm("tiny-llama", vocab_size=len(tokenizer), seed=0, dtype=dtype)
    calibration = None
    if METHODS[method].calibration:
        batches = [(encoded.inputs.input_ids, encoded.inputs.attention_mask, encoded.labels)]
        calibration = collect_calibration(model, batches, match_targets(model, DECODER_TARGETS),
                                          METHODS[method].calibration)
    fedspec.adapt(model, method, 4, DECODER_TARGETS, calibration=calibration, svd_method="exact")
    return model


@pytest.mark.parametrize("method", sorted(METHODS))
def test_per_sample_gradients_on_every_decoder_projection_match_a_per_example_loop(tokenizer, method):
    encoded = encode_conversations(tokenizer, RECORDS, 32)
    model = _decoder(tokenizer, method, encoded)
    assert not model.lm.get_input_embeddings().weight.requires_grad  # embeddings and (tied) LM head stay frozen
    assert model.lm.get_output_embeddings().weight is model.lm.get_input_embeddings().weight
    perturb(model, 0.1)
    model.train()
    assert_opacus_matches_per_example_loop(model, encoded.inputs, encoded.labels, loss=ResponseLoss(), atol=1e-5)


def test_the_lm_head_is_never_an_adapter_target(tokenizer):
    """The (tied) output layer is applied per response token: adapting it would clip per token under DP-SGD and
    rewrite the tied input embeddings. A catch-all pattern leaves it out; naming it alone is refused."""
    model = load_causal_lm("tiny-llama", vocab_size=len(tokenizer), seed=0)
    everything = match_targets(model, [".*"])
    assert everything and not any(name.endswith("lm_head") for name in everything)
    with pytest.raises(AdapterError, match=r"'lm_head' matches only the model's output layer \(lm.lm_head\)"):
        match_targets(model, ["lm_head"])
    encoded = encode_conversations(tokenizer, RECORDS, 32)
    model.lm.get_output_embeddings().requires_grad_(True)
    with pytest.raises(AdapterError, match="LM head must stay frozen"):
        model(encoded.inputs.input_ids, encoded.inputs.attention_mask, encoded.labels)


def test_ghost_clipping_takes_the_same_causal_lm_step_as_hooks(tokenizer):
    """σ = 0, same Poisson batches: ghost clipping reads the per-record losses from ResponseLoss(reduction=none)."""
    encoded = encode_conversations(tokenizer, Conversations(RECORDS.records * 3, [0] * 9, ["-"]), 32)
    results = {}
    for mode in ("hooks", "ghost"):
        model = _decoder(tokenizer, "pissa", encoded)
        train_steps(model, encoded.inputs, encoded.labels, steps=2, batch_size=4, optimizer="sgd", lr=0.5,
                    dp=DPSettings(0.0, 0.05, grad_sample_mode=mode, seed=4))
        results[mode] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for name, value in results["hooks"].items():
        torch.testing.assert_close(results["ghost"][name], value, rtol=1e-4, atol=1e-6)


# --- generation ---------------------------------------------------------------------------------------------------


def test_greedy_generation_with_a_kv_cache_equals_argmax_decoding_without_one(tokenizer):
    model = load_causal_lm("tiny-llama", vocab_size=len(tokenizer), seed=0)
    fedspec.adapt(model, "pissa", 4, DECODER_TARGETS, svd_method="exact")
    perturb(model, 0.2)
    prompts = generation_prompts(tokenizer, RECORDS)
    new = model.generate(prompts.input_ids, prompts.attention_mask, max_new_tokens=5, eos_token_id=None,
                         pad_token_id=tokenizer.pad_token_id)
    ids, mask = prompts.input_ids, prompts.attention_mask
    model.eval()
    with torch.no_grad():
        for step in range(5):
            position_ids = (mask.cumsum(1) - 1).clamp(min=0)  # left padding: positions count real tokens only
            logits = model.lm(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
            token = logits[:, -1].argmax(-1, keepdim=True)
            assert torch.equal(token.squeeze(1), new[:, step]), step
            ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)


def test_answers_are_scored_by_exact_word_or_gsm8k_number():
    assert answer_matches(" Positive.\nBecause", "positive", "exact")
    assert not answer_matches("negative", "positive", "exact")
    assert gsm8k_number("She earns 9 * 2 = 18.\n#### 1,018") == "1018"
    assert gsm8k_number("so the answer is 42.") == "42"
    assert answer_matches("... #### 18", "work\n#### 18", "gsm8k")
    assert not answer_matches("no number", "#### 18", "gsm8k")
    assert gsm8k_number("#### 5.00") == gsm8k_number("#### 5") == "5" and gsm8k_number("#### .5") == "0.5"
    assert gsm8k_number("#### -0.50") == "-0.5" and gsm8k_number("#### 007") == "7"
    assert gsm8k_number("so #### 72\nuser: another?\nassistant: #### 5") == "72"  # the first answer, not a made-up turn's


def test_exact_answers_keep_the_punctuation_that_tells_label_words_apart():
    """`exact` ignores a sentence's trailing punctuation and quotes around the answer, not every punctuation mark
    at either end: stripping them all made "C++" and "C#" match "C", and "-1" match "+1", so with such label words
    a wrong class scored as right."""
    assert not answer_matches("C++", "C", "exact") and not answer_matches("C#", "C", "exact")
    assert not answer_matches("-1", "+1", "exact") and not answer_matches("+1", "-1", "exact")
    assert answer_matches("C++.", "C++", "exact") and answer_matches("-1", "-1", "exact")
    for said in ["Positive.", '"Positive"', "'positive'.", "**Positive**", "positive!", "  positive  \nmore"]:
        assert answer_matches(said, "positive", "exact"), said
    assert answer_matches("Sci/Tech.", "Sci/Tech", "exact") and not answer_matches("Sci", "Sci/Tech", "exact")


def test_generation_stops_at_the_templates_end_of_turn_where_it_is_not_eos():
    """Training teaches the chat template's end-of-turn token; where a tokenizer's EOS is another token (Gemma's
    <end_of_turn>, Llama 3's <|eot_id|>) generation must stop at it too, not run on into made-up turns."""
    bpe = load_tokenizer("smollm2")
    bpe.eos_token = "<|endoftext|>"
    model = load_causal_lm("tiny-llama", vocab_size=len(bpe), seed=0)
    stops = stop_tokens(model, bpe)
    assert stops[0] == bpe.convert_tokens_to_ids("<|im_end|>") != bpe.eos_token_id
    assert bpe.eos_token_id in stops
    bpe.chat_template = None  # the plain template ends turns with EOS
    assert stop_tokens(model, bpe)[0] == bpe.eos_token_id


def test_peft_export_of_a_decoder_generates_the_same_tokens_as_fedspec(tokenizer, tmp_path):
    peft = pytest.importorskip("peft")
    from fedspec.adapters import export_peft
    from fedspec.causal_lm import tiny_llama

    model = load_causal_lm("tiny-llama", vocab_size=len(tokenizer), seed=0)
    fedspec.adapt(model, "pissa", 4, DECODER_TARGETS, svd_method="exact")
    perturb(model, 0.2)
    export_peft(model, tmp_path / "peft", backbone="lm")
    served = peft.PeftModel.from_pretrained(tiny_llama(len(tokenizer), 0), tmp_path / "peft").eval()
    prompts = generation_prompts(tokenizer, RECORDS)
    ours = model.generate(prompts.input_ids, prompts.attention_mask, max_new_tokens=6, eos_token_id=None,
                          pad_token_id=tokenizer.pad_token_id)
    theirs = served.generate(input_ids=prompts.input_ids, attention_mask=prompts.attention_mask, max_new_tokens=6,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)[:, prompts.input_ids.shape[1]:]
    assert torch.equal(ours, theirs)
    with torch.no_grad():
        torch.testing.assert_close(served(input_ids=prompts.input_ids, attention_mask=prompts.attention_mask).logits,
                                   model.eval()(prompts.input_ids, prompts.attention_mask), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", [None, "hooks", "ghost"])
def test_micro_batches_take_the_same_step_as_the_whole_batch(tokenizer, mode):
    """train.physical_batch_size: Opacus' BatchMemoryManager under DP (σ = 0 to compare), loss weighting without."""
    encoded = encode_conversations(tokenizer, Conversations(RECORDS.records * 4, [0] * 12, ["-"]), 32)
    results = {}
    for physical in (None, 2):
        model = _decoder(tokenizer, "pissa", encoded)
        rows_seen: list[int] = []
        model.register_forward_pre_hook(lambda _, args: rows_seen.append(len(args[0])))
        dp = None if mode is None else DPSettings(0.0, 0.05, grad_sample_mode=mode, seed=4)
        result = train_steps(model, encoded.inputs, encoded.labels, steps=3, batch_size=6, optimizer="sgd", lr=0.5,
                             dp=dp, seed=1, physical_batch_size=physical)
        assert result.steps == 3
        assert max(rows_seen) <= (physical or 12) and (physical is None or len(rows_seen) > 3)
        results[physical] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    moved = [not torch.equal(results[2][n], v) for n, v in _decoder(tokenizer, "pissa", encoded).named_parameters()
             if v.requires_grad]
    assert any(moved)  # the steps did something
    for name, value in results[None].items():
        torch.testing.assert_close(results[2][name], value, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_bfloat16_base_keeps_float32_adapters_with_exact_per_sample_gradients(tokenizer, method):
    """model.dtype=bfloat16 (edge GPUs): the frozen decoder in bfloat16; every adapter tensor, its per-sample
    gradient, the clipping and the noise in float32."""
    encoded = encode_conversations(tokenizer, RECORDS, 32)
    model = _decoder(tokenizer, method, encoded, dtype="bfloat16")
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    assert model.lm.model.layers[0].input_layernorm.weight.dtype == torch.bfloat16  # the frozen decoder
    perturb(model, 0.1)
    model.train()
    # bfloat16 activations round differently in a batch and one by one (the rules are exact: float32 test above)
    assert_opacus_matches_per_example_loop(model, encoded.inputs, encoded.labels, loss=ResponseLoss(), relative=0.1)
    before = {n: p.detach().clone() for n, p in trainable.items()}
    train_steps(model, encoded.inputs, encoded.labels, steps=1, batch_size=3, optimizer="sgd", lr=0.5,
                dp=DPSettings(1.0, 1.0, seed=0))
    assert any(not torch.equal(p, before[n]) for n, p in trainable.items())


def test_logits_at_response_positions_only_give_the_same_loss_and_gradients(tokenizer):
    """Training computes the LM head only where a response token is predicted; loss and gradients equal the full
    logits' (per record, so ghost clipping's per-record losses too)."""
    encoded = encode_conversations(tokenizer, RECORDS, 32)
    model = _decoder(tokenizer, "pissa", encoded)
    perturb(model, 0.1)
    ids, mask, labels = encoded.inputs.input_ids, encoded.inputs.attention_mask, encoded.labels
    results = []
    for compact in (False, True):
        model.zero_grad(set_to_none=True)
        outputs = model(ids, mask, labels) if compact else model(ids, mask)
        per_record = ResponseLoss("none")(outputs, labels)
        per_record.mean().backward()
        results.append((per_record.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (full, full_grads), (compact, compact_grads) = results
    assert model(ids, mask, labels).logits.shape[0] == int((labels[:, 1:] != IGNORE).sum())
    torch.testing.assert_close(compact, full, rtol=1e-5, atol=1e-6)
    for name, grad in full_grads.items():
        torch.testing.assert_close(compact_grads[name], grad, rtol=1e-4, atol=1e-7)


def _tiny_granite(vocab_size: int):
    """A Granite decoder, whose logits are the LM head's divided by ``logits_scaling``."""
    from transformers import GraniteConfig, GraniteForCausalLM

    from fedspec.causal_lm import CausalLM

    torch.manual_seed(0)
    config = GraniteConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=2, logits_scaling=8.0, tie_word_embeddings=True)
    return CausalLM(GraniteForCausalLM(config).eval())


def test_a_model_that_scales_its_logits_trains_on_the_scaled_ones(tokenizer):
    """Response-only logits apply the bare LM head; a model that scales its logits after it (Granite, Gemma 2,
    Falcon-H1) is detected on a probe input and trains on its full, scaled logits instead."""
    encoded = encode_conversations(tokenizer, RECORDS, 32)
    ids, mask, labels = encoded.inputs.input_ids, encoded.inputs.attention_mask, encoded.labels
    granite = _tiny_granite(len(tokenizer))
    assert not granite._plain_head
    scaled = ResponseLoss()(granite(ids, mask, labels), labels)
    torch.testing.assert_close(scaled, ResponseLoss()(granite(ids, mask), labels))
    assert _decoder(tokenizer, "pissa", encoded)._plain_head


@pytest.mark.parametrize("model_kind", ["llama", "granite"])
def test_held_out_scores_in_chunks_equal_those_of_the_full_logits(tokenizer, model_kind):
    """Evaluation never builds batch × tokens × vocabulary logits: chunked over positions (plain head) or rows
    (scaled logits), it sums the same negative log-likelihood and counts the same right predictions."""
    from fedspec.causal_lm import response_mask, response_token_losses

    encoded = encode_conversations(tokenizer, RECORDS, 32)
    ids, mask, labels = encoded.inputs.input_ids, encoded.inputs.attention_mask, encoded.labels
    model = _decoder(tokenizer, "pissa", encoded) if model_kind == "llama" else _tiny_granite(len(tokenizer))
    model.eval()
    with torch.no_grad():
        logits = model(ids, mask)
    nll = response_token_losses(logits, labels).sum().item()
    right = int(((logits[:, :-1].argmax(-1) == labels[:, 1:]) & response_mask(labels)).sum())
    for chunk in (3, 40, 10_000):
        total, correct, count = model.response_scores(ids, mask, labels, chunk_tokens=chunk)
        assert count == int(response_mask(labels).sum()) and correct == right
        assert total == pytest.approx(nll, rel=1e-5)


def test_evas_statistics_of_a_causal_lm_cover_its_response_tokens_only(tokenizer):
    """EVA (as PEFT's use_label_mask) sums each record's layer inputs over its response tokens; CorDA, whose
    reference covers the whole sequence, over every real token."""
    from fedspec.builders import AdapterSettings, calibrate
    from fedspec.config import compose_config

    encoded = encode_conversations(tokenizer, RECORDS, 32)
    ids, mask, labels = encoded.inputs.input_ids, encoded.inputs.attention_mask, encoded.labels
    model = load_causal_lm("tiny-llama", vocab_size=len(tokenizer), seed=0)
    layer = "lm.model.layers.0.self_attn.q_proj"
    seen = []
    handle = dict(model.named_modules())[layer].register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    with torch.no_grad():
        model(ids, mask)
    handle.remove()
    inputs = seen[0].double()
    expected = {}
    for name, keep in (("eva", labels != IGNORE), ("corda", mask.bool())):
        per_record = [inputs[i][keep[i]] for i in range(len(ids))]
        expected[name] = sum(x.T @ x / len(x) for x in per_record)
    for name in ("eva", "corda"):
        cfg = compose_config([f"adapter={name}", "model=tiny-llama", f"adapter.targets=[{layer}]"])
        calibration = calibrate(AdapterSettings.of(cfg.adapter), model, encoded.inputs, labels)
        torch.testing.assert_close(calibration.sums[layer]["xx"], expected[name])
    assert not torch.allclose(expected["eva"], expected["corda"])
