"""Calibration statistics: exact per-example values, sums that add across parties, the privatized release (clipping
bound, noise scale, sensitivity) and its accounting as one Gaussian mechanism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus.accountants.analysis import rdp as rdp_analysis

import fedspec
from fedspec.adapters import Calibration, StatisticsPrivacy, collect_calibration, sum_calibrations
from fedspec.adapters.targets import match_targets
from fedspec.errors import AdapterError
from fedspec.models import tokenize
from fedspec.privacy import epsilon

from helpers import tiny_classifier

TEXTS = [
    "the team won the cup final", "stocks fell sharply after the report", "a new chip was unveiled today",
    "rain delayed the match", "the bank raised its rates", "scientists found water on the moon",
]
LABELS = torch.tensor([0, 1, 2, 0, 1, 2])
KINDS = ("inputs", "gradients", "fisher")


@pytest.fixture(scope="module")
def setup():
    model, tokenizer = tiny_classifier()
    batch = tokenize(tokenizer, TEXTS, 16)
    layers = match_targets(model, ["query", "value"])
    return model, batch, layers


def _collect(model, batch, layers, idx, kinds=KINDS, privacy=None):
    idx = torch.as_tensor(idx)
    return collect_calibration(model, [(batch.input_ids[idx], batch.attention_mask[idx], LABELS[idx])], layers,
                               kinds, privacy=privacy)


def _reference(model, batch, layers, i):
    """Per-example statistics of record i from a plain forward/backward of that record alone."""
    inputs, handles = {}, []
    for name in layers:
        module = model.get_submodule(name)
        handles.append(module.register_forward_hook(lambda m, a, o, name=name: inputs.__setitem__(name, a[0])))
    model.eval()
    model.zero_grad(set_to_none=True)
    out = model(batch.input_ids[i:i + 1], batch.attention_mask[i:i + 1])
    torch.nn.functional.cross_entropy(out, LABELS[i:i + 1]).backward()
    for handle in handles:
        handle.remove()
    stats = {}
    mask = batch.attention_mask[i].bool()
    for name in layers:
        module = model.get_submodule(name)
        x = inputs[name][0][mask].double()
        grad = module.weight.grad.double()
        stats[name] = {"xx": x.T @ x / len(x), "x": x.mean(0), "grad": grad, "fisher": (grad**2).sum(1)}
    model.zero_grad(set_to_none=True)
    model.train()
    return stats


def test_statistics_equal_per_example_references(setup):
    model, batch, layers = setup
    calibration = _collect(model, batch, layers, range(len(TEXTS)))
    references = [_reference(model, batch, layers, i) for i in range(len(TEXTS))]
    assert calibration.count == len(TEXTS)
    for name in layers:
        for key in ("xx", "x", "grad", "fisher"):
            expected = sum(r[name][key] for r in references)
            assert torch.allclose(calibration.sums[name][key], expected, rtol=1e-5, atol=1e-7), (name, key)


def test_sums_of_parts_equal_the_statistics_of_the_pooled_records(setup):
    model, batch, layers = setup
    whole = _collect(model, batch, layers, range(6))
    parts = sum_calibrations([_collect(model, batch, layers, [0, 1]), _collect(model, batch, layers, [2, 3, 4, 5])])
    assert parts.count == whole.count
    for name in layers:
        for key, value in whole.sums[name].items():
            # The input statistics sum float64 products of the same activations: equal to float64 rounding. The
            # gradients come from a float32 backward whose kernels depend on the batch's size (measured: 1e-7 of
            # the largest entry apart on an AMD CPU), so they agree to float32 rounding only.
            exact = key in ("xx", "x")
            atol = 1e-12 if exact else 1e-6 * float(value.abs().max())
            assert torch.allclose(parts.sums[name][key], value, rtol=1e-10 if exact else 1e-5, atol=atol), (name, key)


def test_collection_leaves_the_model_as_it_was(setup):
    model, batch, layers = setup
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    _collect(model, batch, layers, range(3))
    assert model.training
    for n, p in model.named_parameters():
        assert p.requires_grad == flags[n] and p.grad is None and torch.equal(p, state[n]), n


def test_flat_form_round_trips(setup):
    model, batch, layers = setup
    calibration = _collect(model, batch, layers, range(3), kinds=("inputs",))
    back = Calibration.from_tensors(calibration.to_tensors(), kinds=("inputs",))
    assert back.count == 3 and back.layers == calibration.layers
    for name in layers:
        assert torch.equal(back.sums[name]["xx"], calibration.sums[name]["xx"])


def _flat(calibration: Calibration) -> torch.Tensor:
    return torch.cat([calibration.sums[n][k].flatten() for n in sorted(calibration.sums)
                      for k in sorted(calibration.sums[n])])


@pytest.mark.parametrize("kinds", [("inputs",), ("gradients",), ("fisher",), KINDS])
def test_one_record_moves_the_clipped_release_by_at_most_the_clipping_norm(setup, kinds):
    """The sensitivity the Gaussian mechanism is calibrated to: add one record, the released sums (all layers,
    all keys together) move by at most C; an unclipped record would move them by more."""
    model, batch, layers = setup
    exact = _collect(model, batch, layers, [5], kinds=kinds)
    C = 0.5 * float(_flat(exact).norm())  # every record is clipped at this C
    tiny = dict(noise_multiplier=1e-12, max_norm=C)
    without = _collect(model, batch, layers, range(5), kinds=kinds,
                       privacy=StatisticsPrivacy(**tiny, generator=torch.Generator().manual_seed(0)))
    with_it = _collect(model, batch, layers, range(6), kinds=kinds,
                       privacy=StatisticsPrivacy(**tiny, generator=torch.Generator().manual_seed(0)))
    moved = float((_flat(with_it) - _flat(without)).norm())
    assert moved == pytest.approx(C, rel=1e-6)  # clipped exactly to C (it was 2C)
    assert float(_flat(exact).norm()) > C


@pytest.mark.parametrize("subset", [False, True])
def test_noise_has_the_calibrated_scale(setup, subset):
    """σ·C over every record; σ·2C over a fixed-size subset (the mechanism a run's round 0 uses)."""
    model, batch, layers = setup
    exact = _collect(model, batch, layers, range(6), kinds=("gradients",))
    sigma, C = 2.0, 1e6  # C above every record's norm: only the noise differs from the exact sums
    generator = torch.Generator().manual_seed(1)
    mechanism = StatisticsPrivacy.subset_of(sigma, C, generator) if subset else StatisticsPrivacy(sigma, C, generator)
    noisy = _collect(model, batch, layers, range(6), kinds=("gradients",), privacy=mechanism)
    noise = _flat(noisy) - _flat(exact)
    assert noisy.privatized and noisy.noise_multiplier == sigma
    assert float(noise.std()) == pytest.approx(sigma * C * (2 if subset else 1), rel=0.05)  # thousands of coordinates
    assert abs(float(noise.mean())) < 0.05 * sigma * C * (2 if subset else 1)


def test_covariance_noise_is_symmetric(setup):
    model, batch, layers = setup
    noisy = _collect(model, batch, layers, range(3), kinds=("inputs",),
                     privacy=StatisticsPrivacy(1.0, 10.0, torch.Generator().manual_seed(2)))
    for name in layers:
        xx = noisy.sums[name]["xx"]
        assert torch.equal(xx, xx.T)


def test_the_release_is_accounted_as_the_exact_gaussian_mechanism():
    """A ledger entry (σ, q = 1, 1 step) has the Gaussian mechanism's RDP α/(2σ²) at every order."""
    sigma = 5.0
    orders = np.array([1.5, 2.0, 8.0, 32.0, 256.0])
    rdp = rdp_analysis.compute_rdp(q=1.0, noise_multiplier=sigma, steps=1, orders=orders)
    assert np.allclose(rdp, orders / (2 * sigma**2))
    # Composes with DP-SGD in one history: ε grows when the statistic is added.
    dpsgd = [(1.0, 0.05, 100)]
    assert epsilon([(sigma, 1.0, 1), *dpsgd], 1e-5) > epsilon(dpsgd, 1e-5)


def test_privacy_settings_must_be_positive():
    with pytest.raises(AdapterError, match="init_noise_multiplier"):
        StatisticsPrivacy(0.0, 1.0)
    with pytest.raises(AdapterError, match="init_max_norm"):
        StatisticsPrivacy(1.0, -1.0)


def test_a_data_driven_method_without_calibration_is_a_clear_error():
    model, _ = tiny_classifier()
    with pytest.raises(AdapterError, match="adapter.method=corda initializes from data: pass calibration="):
        fedspec.adapt(model, "corda", 4)


def test_calibration_of_the_wrong_kind_is_a_clear_error(setup):
    model, batch, layers = setup
    inputs_only = _collect(model, batch, layers, range(2), kinds=("inputs",))
    fresh, _ = tiny_classifier()
    with pytest.raises(AdapterError, match="adapter.method=lora_ga needs calibration statistics of kind 'gradients'"):
        fedspec.adapt(fresh, "lora_ga", 4, calibration=inputs_only)


def test_calibration_needs_the_base_model(setup):
    model, batch, _ = setup
    adapted, _ = tiny_classifier()
    fedspec.adapt(adapted, "lora", 2)
    layers = match_targets(model, ["query"])
    with pytest.raises(AdapterError, match="calibration needs the base model"):
        collect_calibration(adapted, [(batch.input_ids, batch.attention_mask, LABELS)], layers, ["inputs"])


def test_the_calibration_subset_changes_by_one_record_in_and_one_out_when_a_record_is_added(setup):
    """The round-0 subset is chosen by a seeded hash of each record's content, so a neighbouring dataset (one record
    more) changes it by at most one record in and one out, wherever the new record sits: the sensitivity 2C the
    noise is sized to. A seeded permutation of positions would reshuffle it whole."""
    from fedspec.builders import calibration_subset
    from fedspec.models import Tokenized

    _, batch, _ = setup
    contents = lambda inputs, labels, idx: {(tuple(inputs.input_ids[i][inputs.attention_mask[i].bool()].tolist()),  # noqa: E731
                                             int(labels[i])) for i in idx.tolist()}
    for new in range(len(TEXTS)):  # leave record `new` out, then add it back at the end
        keep = [i for i in range(len(TEXTS)) if i != new] + [new]
        for rows in (keep[:-1], keep):
            assert len(calibration_subset(Tokenized(batch.input_ids[rows], batch.attention_mask[rows]), LABELS[rows],
                                          9, seed=3)) == len(rows)  # fewer records than the cap: all of them
        small = Tokenized(batch.input_ids[keep[:-1]], batch.attention_mask[keep[:-1]])
        large = Tokenized(batch.input_ids[keep], batch.attention_mask[keep])
        before = contents(small, LABELS[keep[:-1]], calibration_subset(small, LABELS[keep[:-1]], 3, seed=3))
        after = contents(large, LABELS[keep], calibration_subset(large, LABELS[keep], 3, seed=3))
        assert len(before) == len(after) == 3 and len(after - before) <= 1 and len(before - after) <= 1
    assert not torch.equal(calibration_subset(batch, LABELS, 3, seed=3), calibration_subset(batch, LABELS, 3, seed=4))


def test_a_fixed_size_subset_is_noised_for_twice_the_clipping_norm():
    mechanism = StatisticsPrivacy.subset_of(1.5, 0.25)
    assert mechanism.noise_std == pytest.approx(2 * 1.5 * 0.25)
    assert StatisticsPrivacy(1.5, 0.25).noise_std == pytest.approx(1.5 * 0.25)  # every record summed: C
