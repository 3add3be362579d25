"""DP-SGD on adapters: per-sample gradients are exact, frozen tensors never get any, training changes only
what it should, and the steps Opacus accounts are the steps taken."""

from __future__ import annotations

import math

import pytest
import torch

import fedspec
from fedspec.adapters import METHODS, MethodSpec, PenaltyStep, register
from fedspec.models import Tokenized, tokenize
from fedspec.privacy.accounting import sample_rate
from fedspec.training import DPSettings, evaluate, predict_logits, train_steps

from helpers import assert_opacus_matches_per_example_loop, tiny_classifier

TEXTS = [
    "the team won the cup final", "stocks fell sharply after the report", "a new chip was unveiled today",
    "rain delayed the match", "the bank raised its rates", "scientists found water on the moon",
]
LABELS = torch.tensor([0, 1, 2, 0, 1, 2])


def _adapted(name: str, method: str, train_A: bool):
    model, tokenizer = tiny_classifier(name)
    fedspec.adapt(model, method, 4, train_A=train_A)
    model.head.requires_grad_(True)
    with torch.no_grad():  # non-zero B so gradients of A are non-trivial too
        for name_, p in model.named_parameters():
            if name_.endswith("lora_B.weight"):
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    return model, tokenize(tokenizer, TEXTS, 12)


@pytest.mark.parametrize(("model_name", "method", "train_A"), [
    ("tiny-bert", "pissa", False),  # FedSVD / FFA-LoRA client mode: B and head only
    ("tiny-bert", "lora", True),
    ("tiny-llama", "pissa", True),
])
def test_per_sample_gradients_match_a_per_example_loop(model_name, method, train_A):
    model, batch = _adapted(model_name, method, train_A)
    model.train()
    assert_opacus_matches_per_example_loop(model, batch, LABELS)


def _batch(texts=TEXTS, labels=LABELS):
    model, tokenizer = tiny_classifier()
    return model, tokenize(tokenizer, texts, 12), labels


def test_dp_training_changes_only_trainable_tensors_and_accounts_every_step():
    model, batch, labels = _batch(TEXTS * 4, LABELS.repeat(4))
    fedspec.adapt(model, "pissa", 4, train_A=False)
    model.head.requires_grad_(True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train_steps(model, batch, labels, steps=5, batch_size=8, lr=1e-2,
                         dp=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, seed=0))
    assert result.steps == 5
    assert result.noise_multiplier == 1.0
    assert result.sample_rate == pytest.approx(sample_rate(24, 8)) == pytest.approx(1 / 3)
    for name, p in model.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == p.requires_grad, name
        assert getattr(p, "grad_sample", None) is None, "hooks must be removed after training"


def test_the_accounted_rate_is_the_planned_one_where_opacus_would_round_it():
    """⌈n/B⌉ = 93: Opacus' own Poisson conversion runs int(1/(1/93)) = 92 batches and accounts q = 1/92, above the
    1/93 the σ was planned for. fedspec's loader keeps both at 93."""
    model, batch, labels = _batch(TEXTS * 31, LABELS.repeat(31))  # 186 records, batch 2: 93 batches per epoch
    fedspec.adapt(model, "pissa", 4, train_A=False)
    result = train_steps(model, batch, labels, steps=2, batch_size=2, lr=1e-2,
                         dp=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, seed=0))
    assert result.sample_rate == sample_rate(186, 2) == 1 / 93


@pytest.mark.parametrize("batches", [3, 93])  # 1/(1/93) rounds below 93 in floating point
def test_a_server_fixed_sample_rate_is_the_rate_opacus_samples_and_accounts(batches):
    """privacy.sample_rate = 1/k: k Poisson batches per epoch whatever the client's size, accounted at exactly 1/k."""
    model, batch, labels = _batch(TEXTS * 40, LABELS.repeat(40))  # 240 records
    fedspec.adapt(model, "pissa", 4, train_A=False)
    result = train_steps(model, batch, labels, steps=20, batch_size=8, lr=1e-2,
                         dp=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=1 / batches, seed=0))
    assert result.sample_rate == 1 / batches  # not 1/⌈240/8⌉ = 1/30
    expected = 20 * 240 / batches
    assert abs(result.examples - expected) < 5 * math.sqrt(expected)  # the records sampled over the 20 steps


def test_a_server_fixed_sample_rate_gives_every_client_the_same_q_and_sigma():
    from fedspec.config import compose_config
    from fedspec.errors import ConfigError
    from fedspec.privacy.planning import PlanSettings, plan_clients

    cfg = PlanSettings.of(compose_config(["privacy.target_epsilon=3", "privacy.sample_rate=0.02"]))
    plans = plan_clients(cfg, [60, 600, 6000])
    assert {p.sample_rate for p in plans} == {0.02} and len({p.noise_multiplier for p in plans}) == 1
    assert len({p.sample_rate for p in plan_clients(PlanSettings.of(compose_config(["privacy.target_epsilon=3"])), [60, 600])}) == 2
    with pytest.raises(ConfigError, match="samples 50 batches per epoch, but a client has only 40 records"):
        plan_clients(cfg, [40, 600])
    with pytest.raises(ConfigError, match=r"privacy.sample_rate=0.03 .* 1/k for a whole number k"):
        compose_config(["privacy.sample_rate=0.03"])


class _Rows(torch.utils.data.Dataset):
    """A dataset of ``n`` rows that only the sampler reads (its rows are never fetched but the first)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor]:
        return (torch.zeros(1),)


@pytest.mark.parametrize("batches", [1, 3, 93, 2105, 40_000])
def test_poisson_batches_keep_each_record_with_at_most_the_accounted_rate(monkeypatch, batches):
    """Opacus keeps a record when torch.rand — float32, on a grid of 2^-24 — is below the rate (cast to float32), so
    a record was kept with chance ⌈fl32(q)·2^24⌉/2^24, above the q accounted: 0.33333337 at q = 1/3, and 1.06e-4
    above q (relative) at SST-2's 2,105 batches per epoch; every ε was computed for a lower rate than the one
    sampled. Fed every point of that grid once, a batch must keep at most q of them, and the loader must still
    run 1/q batches per epoch, the number Opacus accounts q from."""
    from fedspec.training import _poisson_loader

    grid = torch.arange(2**24, dtype=torch.float32) / 2**24  # every value torch.rand can return, once
    loader = _poisson_loader(_Rows(2**24), 1 / batches, torch.Generator().manual_seed(0))
    monkeypatch.setattr(torch, "rand", lambda *args, **kwargs: grid)
    kept = len(next(iter(loader.batch_sampler)))
    assert len(loader) == batches
    assert kept / 2**24 <= 1 / batches
    assert kept / 2**24 > 1 / batches - 2**-24  # and no lower than it need be


def test_empty_poisson_batches_still_take_a_noisy_step():
    model, batch, labels = _batch(TEXTS[:2], LABELS[:2])
    fedspec.adapt(model, "lora", 2)
    model.head.requires_grad_(True)
    before = model.head.weight.detach().clone()
    # q = 1/2 over 2 records: with 20 steps some batches are empty; every step is still counted and noised.
    result = train_steps(model, batch, labels, steps=20, batch_size=1, lr=1e-2,
                         dp=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, seed=3))
    assert result.steps == 20
    assert result.examples < 40
    assert not torch.equal(model.head.weight, before)


def test_a_batch_of_one_record_in_49_divides_the_noised_sum_by_one_not_zero():
    """Opacus divides by int(n · q), and 49 · (1/49) is 0.9999999999999999 in floating point: without the fix the
    first step divided by zero and every trained tensor became ±inf."""
    texts, labels = (TEXTS * 9)[:49], torch.arange(49) % 3
    model, batch, labels = _batch(texts, labels)
    fedspec.adapt(model, "lora", 2)
    model.head.requires_grad_(True)
    train_steps(model, batch, labels, steps=3, batch_size=1, lr=1e-2,
                dp=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, seed=3))
    assert all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad)


def test_a_public_normalizer_keeps_the_record_count_out_of_the_updates_noise_scale():
    """The noised sum is divided by ⌊n·q⌋ by default: at q = 0.05, 399 records divide by 19 and 400 by 20, so the
    update's noise scale shows one record more. A client that keeps n private divides by a public number instead."""
    def update_scale(n: int, normalizer: int | None) -> float:
        texts, labels = (TEXTS * n)[:n], torch.arange(n) % 3
        model, batch, labels = _batch(texts, labels)
        fedspec.adapt(model, "lora", 2)
        before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
        train_steps(model, batch, labels, steps=1, batch_size=20, optimizer="sgd", lr=1.0,
                    dp=DPSettings(noise_multiplier=1e4, max_grad_norm=1.0, sample_rate=0.05, seed=5,
                                  batch_normalizer=normalizer))  # σ this large: the noise is the whole update
        moved = torch.cat([(p.detach() - before[name]).flatten() for name, p in model.named_parameters()
                           if p.requires_grad])
        return float(moved.std())

    assert update_scale(399, None) / update_scale(400, None) == pytest.approx(20 / 19, rel=1e-3)
    assert update_scale(399, 20) / update_scale(400, 20) == pytest.approx(1.0, rel=1e-3)


def test_seeded_dp_training_is_reproducible_and_unseeded_is_not():
    def run(seed):
        model, batch, labels = _batch(TEXTS * 2, LABELS.repeat(2))
        fedspec.adapt(model, "lora", 2)
        train_steps(model, batch, labels, steps=3, batch_size=4, lr=1e-2,
                    dp=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, seed=seed))
        return torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(None), run(None))


def test_plain_training_learns_a_separable_task():
    model, batch, labels = _batch(TEXTS * 8, LABELS.repeat(8))
    fedspec.adapt(model, "lora", 4)
    model.head.requires_grad_(True)
    start = evaluate(model, batch, labels)["loss"]
    train_steps(model, batch, labels, steps=30, batch_size=12, lr=3e-2)
    assert evaluate(model, batch, labels)["loss"] < 0.5 * start


class _ShrinkB(PenaltyStep):
    """A test penalty: ½‖B‖² on every lora_B, so each hook call shrinks B by a known factor."""

    def penalty(self, model):
        return sum(0.5 * (p ** 2).sum() for n, p in model.named_parameters() if n.endswith("lora_B.weight"))


def test_method_hooks_run_after_every_step_under_dp_and_without():
    spec = register(MethodSpec(
        name="test-shrink", initializer=METHODS["lora"].initializer, base_policy="keep", hooks=lambda model, config, context: [_ShrinkB(weight=1.0, lr=0.5)],
    ))
    try:
        for dp in (None, DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, seed=0)):
            model, batch, labels = _batch()
            fedspec.adapt(model, spec.name, 2)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n.endswith("lora_B.weight"):
                        p.fill_(1.0)
            # lr 0 for the optimizer: only the hook moves B, by a factor 0.5 per step.
            train_steps(model, batch, labels, steps=3, batch_size=3, optimizer="sgd", lr=0.0, dp=dp)
            for n, p in model.named_parameters():
                if n.endswith("lora_B.weight"):
                    assert torch.allclose(p, torch.full_like(p, 0.125)), n
    finally:
        del METHODS[spec.name]


def _group_steps(head_clip_share):
    """(head, adapter) norms of one σ = 0 DP-SGD step with lr 1 on the tiny classifier, C = 2."""
    model, tokenizer = tiny_classifier()
    fedspec.adapt(model, "lora", 4)
    model.head.requires_grad_(True)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train_steps(model, tokenize(tokenizer, TEXTS * 4, 12), LABELS.repeat(4), steps=1, batch_size=24,
                optimizer="sgd", lr=1.0, dp=DPSettings(0.0, 2.0, seed=0, head_clip_share=head_clip_share))
    moved = {n: p.detach() - before[n] for n, p in model.named_parameters() if p.requires_grad}
    return tuple(math.sqrt(sum(float(d.square().sum()) for n, d in moved.items() if n.startswith("head.") == head))
                 for head in (True, False))


def test_per_group_clipping_bounds_head_and_adapter_separately_within_the_same_total_norm():
    """privacy.head_clip_share: the head's per-sample gradient is clipped to share·C, the adapter's to √(1−share²)·C:
    the total norm (and so the noise and ε) is C's, and the head can no longer take the adapter's budget."""
    from fedspec.training import group_clip_norms

    model, _ = tiny_classifier()
    fedspec.adapt(model, "lora", 4)
    model.head.requires_grad_(True)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    norms = group_clip_norms(model, 2.0, 0.05)
    assert sum(x * x for x in norms) == pytest.approx(4.0)
    assert sum(x * x for n, x in zip(names, norms) if n.startswith("head.")) == pytest.approx(0.1**2)
    assert group_clip_norms(model, 2.0, None) is None
    flat_head, flat_adapter = _group_steps(None)
    head, adapter = _group_steps(0.05)
    # σ = 0, every record in the batch: a step is the mean of per-sample gradients, each within its group's bound.
    assert flat_head > 0.1 >= head > 0
    assert adapter > flat_adapter  # the adapter's share of the clipped gradient grew


@pytest.mark.parametrize("override, message", [
    ("privacy.head_clip_share=1.5", r"privacy.head_clip_share=1.5 is not allowed; it must be in \(0, 1\)"),
    ("privacy.head_clip_share=0.3 privacy.grad_sample_mode=ghost", "per-group clipping needs privacy.grad_sample_mode=hooks"),
    ("train.physical_batch_size=0", r"train.physical_batch_size=0 is not allowed; it must be at least 1"),
    ("model.dtype=int8", "model.dtype='int8' is not allowed; choose one of: float32, bfloat16, float16"),
])
def test_new_training_settings_are_checked_with_the_fix_named(tiny_cfg, override, message):
    from fedspec.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        tiny_cfg(*override.split())


def test_the_new_settings_can_be_overridden_from_every_config_group(tiny_cfg):
    """Hydra refuses an override of a key its group's YAML lacks: every model and privacy group carries them."""
    assert tiny_cfg("model=tiny-llama", "model.dtype=bfloat16").model.dtype == "bfloat16"
    assert tiny_cfg("model=smollm2", "model.dtype=float16", "data.task=causal_lm").model.dtype == "float16"
    assert tiny_cfg("privacy=client-dp", "federation.weighting=uniform",
                    "privacy.head_clip_share=0.3").privacy.head_clip_share == 0.3
    assert tiny_cfg("train.physical_batch_size=4").train.physical_batch_size == 4


@pytest.mark.parametrize("model_name", ["tiny-bert", "tiny-llama"])
def test_evaluation_in_length_order_returns_every_row_in_its_own_place(model_name):
    """Evaluation batches rows of similar length (less padding); each row's logits must still be the ones the
    model gives it alone, in the caller's order."""
    texts = ["a", "the bank raised its rates again today after the long meeting", "rain", "stocks fell sharply",
             "scientists found water on the moon and then some more", "ok"] * 3
    model, tokenizer = tiny_classifier(model_name)
    fedspec.adapt(model, "pissa", 2)
    data = tokenize(tokenizer, texts, 16)
    logits = predict_logits(model, data, batch_size=4)
    alone = torch.cat([predict_logits(model, Tokenized(data.input_ids[i:i + 1], data.attention_mask[i:i + 1]))
                       for i in range(len(texts))])
    torch.testing.assert_close(logits, alone, rtol=1e-4, atol=1e-5)
    labels = torch.arange(len(texts)) % 3
    expected = torch.nn.functional.cross_entropy(alone, labels).item()
    assert evaluate(model, data, labels, batch_size=4)["loss"] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("model_name", ["tiny-bert", "tiny-llama"])
def test_a_tokenizer_that_pads_on_the_left_still_gives_the_model_every_token(model_name):
    """tokenize followed the tokenizer's padding side, but training and evaluation drop the trailing columns that no
    record of a batch uses: with a tokenizer that pads on the left (common for decoders) they cut the shorter
    records' tokens and kept their padding, and the model scored and trained on nothing of them, without a word."""
    texts = ["a", "the bank raised its rates again today after the long meeting", "rain", "stocks fell sharply"]
    model, tokenizer = tiny_classifier(model_name)
    right = tokenize(tokenizer, texts, 16)
    tokenizer.padding_side = "left"  # as a decoder checkpoint's tokenizer_config.json may set it
    left = tokenize(tokenizer, texts, 16)
    assert torch.equal(left.input_ids, right.input_ids) and torch.equal(left.attention_mask, right.attention_mask)
    alone = torch.cat([predict_logits(model, tokenize(tokenizer, [text], 16)) for text in texts])
    torch.testing.assert_close(predict_logits(model, left, batch_size=4), alone, rtol=1e-4, atol=1e-5)


def test_a_max_length_beyond_the_backbones_positions_is_refused_naming_the_setting():
    """model.max_length above a BERT-style backbone's learned positions (512 for MiniLM, 128 for tiny-bert) failed
    only at the first forward pass, deep in the model: "The expanded size of the tensor (256) must match the existing
    size (128)"."""
    from omegaconf import OmegaConf

    from fedspec.errors import ConfigError
    from fedspec.models import build_classifier

    with pytest.raises(ConfigError, match="model.max_length=256 is more than the 128 positions"):
        build_classifier(OmegaConf.create({"name": "tiny-bert", "max_length": 128 * 2}), 2)
    model, tokenizer = build_classifier(OmegaConf.create({"name": "tiny-bert", "max_length": 128}), 2)
    assert predict_logits(model, tokenize(tokenizer, ["word " * 300], 128)).shape == (1, 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dp_training_on_cuda_draws_its_noise_there_reproducibly():
    """Opacus draws the noise on the trainable tensors' device, and torch refuses a CPU generator for CUDA tensors:
    a seeded DP run on a GPU must work, stay there, and repeat exactly."""
    results = []
    for _ in range(2):
        model, batch, labels = _batch(TEXTS * 4, LABELS.repeat(4))
        fedspec.adapt(model, "pissa", 4, train_A=False)
        model = model.cuda()
        batch = Tokenized(batch.input_ids.cuda(), batch.attention_mask.cuda())
        train_steps(model, batch, labels.cuda(), steps=3, batch_size=8, lr=1e-2,
                    dp=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, seed=0))
        trained = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        assert all(p.is_cuda for p in trained.values())
        results.append(trained)
    for name, tensor in results[0].items():  # same seed, same noise (up to CUDA's reduction order)
        torch.testing.assert_close(tensor, results[1][name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("privacy", ["privacy.noise_multiplier=1.0", "privacy=none"])
def test_fedspec_train_keeps_one_adam_across_its_epochs(tiny_cfg, monkeypatch, privacy):
    """A new Adam each epoch reset its moments and bias correction at every epoch boundary: the baseline's third
    epoch started like its first. One optimizer spans the run, its step count every step of every epoch."""
    from fedspec.centralized import epoch_steps, train_centralized

    made: list[torch.optim.Adam] = []

    class RecordedAdam(torch.optim.Adam):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(torch.optim, "Adam", RecordedAdam)
    cfg = tiny_cfg("train.optimizer=adam", "train.epochs=3", "data.num_examples=64", "data.eval_examples=16",
                   "adapter.rank=2", privacy)
    train_centralized(cfg)
    steps = sum(epoch_steps(cfg.train, 64))  # 3 epochs of ⌈64/16⌉ steps
    assert len(made) == 1
    assert {int(state["step"]) for state in made[0].state.values()} == {steps}


def test_without_dp_an_epoch_of_fedspec_train_is_one_pass_over_every_record(tiny_cfg, monkeypatch):
    """Batches without DP dropped each pass's short last batch, so ⌈n / batch⌉ steps skipped n mod batch records and
    drew the last batch from a second shuffle: `fedspec train privacy=none` called that an epoch. Clients keep full
    batches (drop_last); an epoch of the centralized baseline now sees every record exactly once."""
    import fedspec.centralized as centralized

    model, batch, labels = _batch()  # 6 records in batches of 4: 2 steps
    assert train_steps(model, batch, labels, steps=2, batch_size=4, lr=0.0, drop_last=False).examples == 6
    assert train_steps(model, batch, labels, steps=2, batch_size=4, lr=0.0).examples == 8  # a client: full batches

    seen: list[int] = []

    def recorded(*args, **kwargs):
        result = train_steps(*args, **kwargs)
        seen.append(result.examples)
        return result

    monkeypatch.setattr(centralized, "train_steps", recorded)
    cfg = tiny_cfg("privacy=none", "train.epochs=2", "data.num_examples=40", "data.eval_examples=16",
                   "adapter.rank=2")
    centralized.train_centralized(cfg)
    assert seen == [40, 40]  # 40 records in batches of 16: 3 steps each epoch, the last one of 8
