"""(a) PiSSA initialization of every linear layer: `fedspec.adapt(model, "pissa", r)` vs HF PEFT
`init_lora_weights="pissa_niter_4"` on the same model, in the same process, interleaved.

Both methods leave the residual W − s·B·A in the base layer, so the reconstruction error of the rank-r
part is read off the residual: ‖W − W_r‖ / ‖W‖ = ‖W_res‖ / ‖W‖ (mean over layers). The exact truncated SVD
gives the optimum of that error; where an exact SVD is affordable (MiniLM) the distance of each rank-r part
to the exact one, ‖W_r − W_r*‖ / ‖W_r*‖, is reported too. For the 7B-shaped model only the exact singular
values are computed (a full SVD with vectors takes about a minute per 4096² matrix on 2 cores): the
optimum error and the share of the optimal top-r energy each method misses.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

import fedspec
from fedspec.adapters import adapter_layers
from fedspec.config import compose_config
from fedspec.svd.precision import pass_dtype

from common import Row, interleaved, median, seconds, timed, yes_no

MINILM_TARGETS = ["query", "key", "value", "dense"]  # every nn.Linear of BertModel (pooler included)
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def minilm_builder():
    from fedspec.models import load_encoder

    pristine = load_encoder("minilm")
    return lambda: copy.deepcopy(pristine)


def smollm2_builder():
    """SmolLM2-135M-Instruct's decoder (the packaged default LLM), float32."""
    from fedspec.causal_lm import load_causal_lm

    pristine = load_causal_lm("smollm2").lm.model
    return lambda: copy.deepcopy(pristine)


def llama_builder(layers: int = 2):
    """A Llama with 7B shapes (hidden 4096, intermediate 11008) and `layers` blocks of seeded N(0, 0.02)
    weights. `no_init_weights` skips transformers' own initialization, so building costs one fill."""
    from transformers import LlamaConfig, LlamaModel
    from transformers.initialization import no_init_weights

    config = LlamaConfig(vocab_size=1024, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=32)
    with no_init_weights():
        pristine = LlamaModel(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in pristine.parameters():
            p.normal_(0.0, 0.02, generator=generator)
    state = pristine.state_dict()

    def build():
        with no_init_weights():
            model = LlamaModel(config)
        model.load_state_dict(state)
        return model

    return build


def _linear_weights(model: nn.Module, targets: list[str]) -> dict[str, torch.Tensor]:
    from fedspec.adapters import match_targets

    return {name: model.get_submodule(name).weight.detach().clone() for name in match_targets(model, targets)}


def _fedspec_residuals(model) -> dict[str, torch.Tensor]:
    return {name: layer.base.weight.detach() for name, layer in adapter_layers(model).items()}


def _peft_residuals(model) -> dict[str, torch.Tensor]:
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return {name[len(prefix):]: module.get_base_layer().weight.detach()
            for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def _errors(original: dict[str, torch.Tensor], residual: dict[str, torch.Tensor]) -> dict[str, float]:
    return {name: float(residual[name].norm() / W.norm()) for name, W in original.items()}


def _compare(label: str, build, targets: list[str], rank: int, repeats: int, exact: str, warmup: int = 1) -> list[Row]:
    from peft import LoraConfig, get_peft_model

    adapter = compose_config([]).adapter
    options = {"svd_method": adapter.svd_method, "niter": adapter.niter, "oversample": adapter.oversample,
               "pass_precision": adapter.svd_pass_precision}
    original = _linear_weights(build(), targets)
    errors: dict[str, dict[str, float]] = {}
    residuals: dict[str, dict[str, torch.Tensor]] = {}  # kept only where the exact SVD is affordable

    def record(method: str, residual: dict[str, torch.Tensor]) -> None:
        errors[method] = _errors(original, residual)
        if exact == "all":
            residuals[method] = {name: r.clone() for name, r in residual.items()}

    def run_fedspec() -> float:
        model = build()
        seconds_ = timed(lambda: fedspec.adapt(model, "pissa", rank, targets, **options))
        record("fedspec", _fedspec_residuals(model))
        return seconds_

    def run_peft() -> float:
        model = build()
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights="pissa_niter_4")
        holder = {}
        seconds_ = timed(lambda: holder.setdefault("model", get_peft_model(model, config)))
        record("peft", _peft_residuals(holder["model"]))
        return seconds_

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that PiSSA changes the base weights
        times = interleaved({"peft": run_peft, "fedspec": run_fedspec}, repeats=repeats, warmup=warmup)
    t_fed, t_peft = median(times["fedspec"]), median(times["peft"])
    err_fed = _mean(list(errors["fedspec"].values()))
    err_peft = _mean(list(errors["peft"].values()))
    accuracy = f"‖W−W_r‖/‖W‖: fedspec {err_fed:.5f}, PEFT {err_peft:.5f}"
    if exact == "all":
        accuracy += _exact_distances(original, residuals, rank)
    else:
        accuracy += _exact_energy(original, errors, rank)
    passes = {str(pass_dtype(options["pass_precision"], W)).removeprefix("torch.") for W in original.values()}
    setting = (f"{label}: {len(original)} layers, r={rank}; fedspec {options['svd_method']} niter={options['niter']} "
               f"oversample={options['oversample']} pass_precision={options['pass_precision']} "
               f"(passes in {' / '.join(sorted(passes))}) (config defaults); PEFT pissa_niter_4; median of {repeats}")
    speedup = t_peft / t_fed
    return [Row("(a) PiSSA init", setting, seconds(t_fed), f"PEFT {seconds(t_peft)}", f"{speedup:.1f}× faster",
                accuracy, "≥ 3× faster, error ≤ PEFT", yes_no(speedup >= 3 and err_fed <= err_peft))]


def _exact_distances(original, residuals, rank: int) -> str:
    """Full SVDs: the optimum error and each method's distance to the exact rank-r part."""
    optimum, dist = [], {method: [] for method in residuals}
    for name, W in original.items():
        Wd = W.double()
        U, S, Vh = torch.linalg.svd(Wd, full_matrices=False)
        W_r = (U[:, :rank] * S[:rank]) @ Vh[:rank]
        optimum.append(float((S[rank:].square().sum() / S.square().sum()).sqrt()))
        for method, residual in residuals.items():
            dist[method].append(float((Wd - residual[name].double() - W_r).norm() / W_r.norm()))
    return (f"; exact {_mean(optimum):.5f}; ‖W_r−W_r*‖/‖W_r*‖: fedspec {_mean(dist['fedspec']):.1e}, "
            f"PEFT {_mean(dist['peft']):.1e}")


def _exact_energy(original, errors, rank: int) -> str:
    """Exact singular values of one matrix per shape: the optimum error and the share of the optimal
    top-r energy each method misses (W_r is a projection of W, so ‖W_r‖² = ‖W‖² − ‖W_res‖²)."""
    by_shape: dict[tuple, str] = {}  # one matrix per shape, a shape and its transpose counted once
    for name, W in original.items():
        by_shape.setdefault(tuple(sorted(W.shape)), name)
    optimum, missed = [], {method: [] for method in errors}
    for name in by_shape.values():
        W = original[name].double()
        S = torch.linalg.svdvals(W)
        total, top = float(W.square().sum()), float(S[:rank].square().sum())
        optimum.append(((total - top) / total) ** 0.5)
        for method, layer_errors in errors.items():
            captured = total * (1 - layer_errors[name] ** 2)
            missed[method].append((top - captured) / top)
    return (f"; exact {_mean(optimum):.5f} ({len(by_shape)} matrices, one per shape up to transposition); top-r energy missed there: "
            f"fedspec {100 * _mean(missed['fedspec']):.1f}%, PEFT {100 * _mean(missed['peft']):.1f}%")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def run(quick: bool) -> list[Row]:
    torch.manual_seed(0)
    rows = _compare("MiniLM-L6 (all linear layers)", minilm_builder(), MINILM_TARGETS, 8,
                    repeats=9 if quick else 15, exact="all")
    # Warmed up like MiniLM: a process's first bf16 passes also set up oneDNN's kernels for each shape (measured
    # ~0.25 s once per process on the 7B shapes), a one-time cost the repeats' median should not mix in.
    rows += _compare("SmolLM2-135M-Instruct (all 210 linear layers of its 30 blocks)", smollm2_builder(), LLAMA_TARGETS,
                     8, repeats=3 if quick else 7, exact="all")
    rows += _compare("Llama-7B-shaped, 2 layers, random weights", llama_builder(2), LLAMA_TARGETS, 16,
                     repeats=2 if quick else 4, exact="per-shape", warmup=1)
    return rows
