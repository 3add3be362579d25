"""Interoperability with Hugging Face PEFT (a test dependency only): the same initial adapted weights as PEFT's
LoRA, PiSSA, OLoRA, CorDA, EVA and LoRA-GA on the same tiny model (products s·B·A and residual bases, not
factors), and the PEFT LoRA export that PEFT loads on the ORIGINAL backbone with the same outputs."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import fedspec
from fedspec.adapters import adapter_layers, collect_calibration, export_peft, load_adapter
from fedspec.adapters.targets import match_targets
from fedspec.errors import AdapterError
from fedspec.models import build_classifier

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

from helpers import perturb, tiny_classifier  # noqa: E402

# Eight records of at least eight tokens, cut to eight: no padding, so every token weighs the same in PEFT's
# statistics and in fedspec's per-record averages.
TEXTS = [
    "the team won the cup final after a long and hard season",
    "stocks fell sharply after the report on the bank today",
    "a new chip was unveiled today by the largest company in the world",
    "rain delayed the match for two hours in the evening",
    "the central bank raised its interest rates again this spring",
    "scientists found frozen water on the far side of the moon",
    "the striker scored twice in the second half of the game",
    "the new phone sold out within an hour of its launch online",
]
LABELS = torch.tensor([0, 1, 2, 0, 1, 2, 0, 2])


def _encoded(tokenizer, texts=TEXTS, length=8):
    enc = tokenizer(texts, max_length=length, truncation=True, padding="max_length", return_tensors="pt")
    assert bool(enc["attention_mask"].all())
    return enc


def _peft_layers(peft_model) -> dict[str, torch.nn.Module]:
    """PEFT's LoRA layers by the name fedspec gives the same layer in a TextClassifier (``encoder.<path>``)."""
    return {name.replace("base_model.model.", "encoder.", 1): m for name, m in peft_model.named_modules()
            if hasattr(m, "lora_A") and "default" in m.lora_A}


def _peft_product(layer) -> torch.Tensor:
    return layer.scaling["default"] * layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double()


def _ours_product(layer) -> torch.Tensor:
    return layer.scaling * layer.lora_B.weight.double() @ layer.lora_A.weight.double()


def _assert_same_init(ours, theirs, atol=1e-5):
    layers = adapter_layers(ours)
    peft_layers = _peft_layers(theirs)
    assert set(layers) == set(peft_layers)
    for name, layer in layers.items():
        other = peft_layers[name]
        assert torch.allclose(_ours_product(layer), _peft_product(other), atol=atol), name
        assert torch.allclose(layer.base.weight.double(), other.base_layer.weight.double(), atol=atol), name


def _peft_on_backbone(model, **config):
    config.setdefault("target_modules", ["query", "value"])
    return get_peft_model(copy.deepcopy(model.encoder), LoraConfig(**config))


def test_lora_starts_at_the_base_weights_like_peft():
    model, _ = tiny_classifier()
    theirs = _peft_on_backbone(model, r=4, lora_alpha=8)
    fedspec.adapt(model, "lora", 4, alpha=8.0)
    _assert_same_init(model, theirs)
    for layer in adapter_layers(model).values():
        assert torch.count_nonzero(_ours_product(layer)) == 0


@pytest.mark.parametrize("alpha", [4.0, 8.0])
def test_pissa_matches_peft_exact_pissa(alpha):
    model, _ = tiny_classifier()
    theirs = _peft_on_backbone(model, r=4, lora_alpha=alpha, init_lora_weights="pissa")
    fedspec.adapt(model, "pissa", 4, alpha=alpha, svd_method="exact")
    _assert_same_init(model, theirs)


def test_pissa_randomized_is_within_the_randomized_tolerance_of_peft_exact_pissa():
    model, _ = tiny_classifier()
    theirs = _peft_on_backbone(model, r=4, lora_alpha=4, init_lora_weights="pissa")
    fedspec.adapt(model, "pissa", 4, svd_method="randomized", niter=8, oversample=8)
    for name, layer in adapter_layers(model).items():
        expected = _peft_product(_peft_layers(theirs)[name])
        assert torch.linalg.norm(_ours_product(layer) - expected) / torch.linalg.norm(expected) < 1e-3, name


@pytest.mark.parametrize("alpha", [4.0, 8.0])
def test_olora_matches_peft(alpha):
    model, _ = tiny_classifier()
    theirs = _peft_on_backbone(model, r=4, lora_alpha=alpha, init_lora_weights="olora")
    fedspec.adapt(model, "olora", 4, alpha=alpha)
    _assert_same_init(model, theirs)


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_corda_matches_peft_on_the_same_calibration_sample(mode):
    """One calibration record: PEFT's per-sample 1/max² scaling is then a global scale, to which CorDA is
    invariant, so both must give the same factors."""
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    model, tokenizer = tiny_classifier()
    enc = _encoded(tokenizer, TEXTS[:1], length=10)
    backbone = copy.deepcopy(model.encoder)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights="corda",
                        corda_config=CordaConfig(corda_method=mode))
    preprocess_corda(backbone, config, run_model=lambda: backbone(**enc))
    theirs = get_peft_model(backbone, config)

    layers = match_targets(model, ["query", "value"])
    calibration = collect_calibration(model, [(enc["input_ids"], enc["attention_mask"], LABELS[:1])], layers,
                                      ["inputs"])
    fedspec.adapt(model, "corda", 4, alpha=8.0, calibration=calibration, mode=mode)
    _assert_same_init(model, theirs, atol=1e-4)


@pytest.mark.filterwarnings("ignore:lora with eva initialization used with low_cpu_mem_usage")  # PEFT advice
def test_eva_matches_peft_ranks_and_components():
    """All components kept (round(ρ·r) = the layer width), so PEFT's incremental PCA is exact too: the same
    rank redistribution and the same principal subspaces; both start with B = 0 (the base is untouched)."""
    from peft import EvaConfig, initialize_lora_eva_weights

    model, tokenizer = tiny_classifier()
    enc = _encoded(tokenizer)
    targets = ["query", "value", "attention.output.dense"]
    theirs = _peft_on_backbone(model, r=12, lora_alpha=12, target_modules=targets, init_lora_weights="eva",
                               eva_config=EvaConfig(rho=32 / 12, tau=0.99))
    initialize_lora_eva_weights(theirs, [dict(enc)], show_progress_bar=False)

    layers = match_targets(model, targets)
    calibration = collect_calibration(model, [(enc["input_ids"], enc["attention_mask"], LABELS)], layers, ["inputs"])
    fedspec.adapt(model, "eva", 12, targets, alpha=12.0, calibration=calibration, rho=32 / 12)
    ours, peft_layers = adapter_layers(model), _peft_layers(theirs)
    ranks = {name: layer.rank for name, layer in ours.items()}
    assert ranks == {name: layer.r["default"] for name, layer in peft_layers.items()}
    assert len(set(ranks.values())) > 1  # the budget was redistributed
    for name, layer in ours.items():
        A, A_peft = layer.lora_A.weight.double(), peft_layers[name].lora_A["default"].weight.double()
        assert torch.allclose(A.T @ A, A_peft.T @ A_peft, atol=1e-4), name  # the same subspace
        assert torch.allclose(_ours_product(layer), _peft_product(peft_layers[name]))  # both zero
        assert layer.scaling == pytest.approx(peft_layers[name].scaling["default"])


def test_lora_ga_matches_peft():
    """q = min(4r, 32) = 32 makes PEFT's randomized SVD exact. PEFT decomposes the gradient in float32, where
    singular directions of nearly equal singular values are defined only up to a rotation (the tiny model's
    gradient has relative gaps ~1e-6), so the comparison uses what is well defined: the subspace A spans, B·Bᵀ
    (the directions with their scaled singular values) and the residual base + s·B·A = W on both sides."""
    from peft import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga

    model, tokenizer = tiny_classifier()
    enc = _encoded(tokenizer)
    originals = {n: model.get_submodule(n).weight.detach().double().clone()
                 for n in match_targets(model, ["query", "value"])}
    theirs_model = copy.deepcopy(model)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], init_lora_weights="lora_ga",
                        lora_ga_config=LoraGAConfig())

    def train_step():
        logits = theirs_model(enc["input_ids"], enc["attention_mask"])
        torch.nn.functional.cross_entropy(logits, LABELS).backward()

    preprocess_loraga(theirs_model, config, train_step)
    theirs = get_peft_model(theirs_model, config)

    layers = match_targets(model, ["query", "value"])
    calibration = collect_calibration(model, [(enc["input_ids"], enc["attention_mask"], LABELS)], layers,
                                      ["gradients"])
    fedspec.adapt(model, "lora_ga", 8, alpha=16.0, calibration=calibration, svd_method="exact")
    peft_layers = {name.replace("base_model.model.", "", 1): m for name, m in theirs.named_modules()
                   if hasattr(m, "lora_A") and "default" in m.lora_A}

    def close(a, b, rtol=1e-3):
        a, b = a.detach(), b.detach()
        return float(torch.linalg.norm(a - b)) <= rtol * float(torch.linalg.norm(b))

    for name, layer in adapter_layers(model).items():
        other = peft_layers[name]
        A, B = layer.lora_A.weight.double(), layer.lora_B.weight.double()
        A_p, B_p = other.lora_A["default"].weight.double(), other.lora_B["default"].weight.double()
        assert close(A.T @ A, A_p.T @ A_p), name
        assert close(B @ B.T, B_p @ B_p.T), name
        assert torch.allclose(layer.scaling * torch.ones(1), other.scaling["default"] * torch.ones(1))
        for base, product in ((layer.base.weight, _ours_product(layer)), (other.base_layer.weight, _peft_product(other))):
            assert torch.allclose(base.double() + product, originals[name], atol=1e-5), name


# --- export --------------------------------------------------------------------------------------------------


def _check_export(model, tokenizer, out_dir):
    """PEFT loads the export on the original backbone; hidden states and (with the head) logits match."""
    enc = tokenizer(TEXTS[:5], max_length=16, truncation=True, padding="max_length", return_tensors="pt")
    model.eval()
    with torch.no_grad():
        expected_hidden = model.encoder(**enc).last_hidden_state
        expected_logits = model(enc["input_ids"], enc["attention_mask"])
    original, _ = tiny_classifier()  # a fresh copy: the original, un-adapted weights
    loaded = PeftModel.from_pretrained(original.encoder, str(out_dir))
    loaded.eval()
    with torch.no_grad():
        hidden = loaded(**enc).last_hidden_state
    assert torch.allclose(hidden, expected_hidden, atol=1e-5)

    from safetensors.torch import load_file

    head = torch.nn.Linear(hidden.shape[-1], 3)
    head.load_state_dict(load_file(str(out_dir / "classifier_head.safetensors")))
    assert json.loads((out_dir / "fedspec_head.json").read_text())["pooling"] == "mean"
    mask = enc["attention_mask"].unsqueeze(-1).float()
    logits = head((hidden * mask).sum(1) / mask.sum(1))
    assert torch.allclose(logits, expected_logits, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "pissa", "milora", "olora", "soma"])
def test_export_loads_in_peft_on_the_original_backbone(tmp_path, method):
    model, tokenizer = tiny_classifier()
    fedspec.adapt(model, method, 4, alpha=8.0, svd_method="exact")
    model.head.requires_grad_(True)
    perturb(model, seed=3)
    export_peft(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    rank = 4 if method == "lora" else 8  # residual methods: s·B·A − s·B₀·A₀, a rank-2r LoRA
    assert config["r"] == config["lora_alpha"] == rank  # the scaling s = α/r is folded into B
    _check_export(model, tokenizer, tmp_path / "peft")


@pytest.mark.parametrize("method", ["sorsa", "kasa", "adalora", "sora", "lora_xs", "effort", "svfit", "loldu"])
def test_export_of_other_low_rank_updates_loads_in_peft(tmp_path, method):
    """Cores, truncated and spectral residual bases are low-rank updates of W too: PEFT reproduces them."""
    model, tokenizer = tiny_classifier()
    fedspec.adapt(model, method, 4, alpha=8.0, svd_method="exact")
    model.head.requires_grad_(True)
    perturb(model, seed=3)
    export_peft(model, tmp_path / "peft")
    _check_export(model, tokenizer, tmp_path / "peft")


@pytest.mark.parametrize("method", ["corda", "lora_ga"])
def test_export_of_data_driven_residual_methods_is_a_rank_2r_lora(tmp_path, method):
    model, tokenizer = tiny_classifier()
    enc = _encoded(tokenizer)
    kinds = fedspec.adapters.METHODS[method].calibration
    calibration = collect_calibration(model, [(enc["input_ids"], enc["attention_mask"], LABELS)],
                                      match_targets(model, ["query", "value"]), kinds)
    fedspec.adapt(model, method, 4, alpha=8.0, calibration=calibration, svd_method="exact")
    perturb(model, seed=3)
    export_peft(model, tmp_path / "peft")
    _check_export(model, tokenizer, tmp_path / "peft")


def test_eva_export_carries_its_rank_pattern(tmp_path):
    model, tokenizer = tiny_classifier()
    enc = _encoded(tokenizer)
    targets = ["query", "value", "attention.output.dense"]
    calibration = collect_calibration(model, [(enc["input_ids"], enc["attention_mask"], LABELS)],
                                      match_targets(model, targets), ["inputs"])
    fedspec.adapt(model, "eva", 12, targets, alpha=24.0, calibration=calibration, rho=32 / 12)
    perturb(model, seed=3)
    export_peft(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    ranks = {name.removeprefix("encoder."): layer.rank for name, layer in adapter_layers(model).items()}
    r = config["r"]
    assert config["rank_pattern"] == {k: v for k, v in ranks.items() if v != r} != {}
    assert config["alpha_pattern"] == config["rank_pattern"]  # PEFT's scaling is 1 in every layer
    _check_export(model, tokenizer, tmp_path / "peft")


def test_fwsvd_has_no_lora_export(tmp_path):
    model, tokenizer = tiny_classifier()
    enc = _encoded(tokenizer)
    calibration = collect_calibration(model, [(enc["input_ids"], enc["attention_mask"], LABELS)],
                                      match_targets(model, ["query", "value"]), ["fisher"])
    fedspec.adapt(model, "fwsvd", 4, calibration=calibration)
    with pytest.raises(AdapterError, match="cannot export a PEFT LoRA adapter: adapter.method=fwsvd is no low-rank"):
        export_peft(model, tmp_path / "peft")


@pytest.mark.parametrize("method", ["dora", "clip_svd", "salt", "sst"])
def test_normalized_and_full_rank_methods_have_no_lora_export(tmp_path, method):
    model, _ = tiny_classifier()
    fedspec.adapt(model, method, 4)
    with pytest.raises(AdapterError, match=f"adapter.method={method} is no low-rank update of the original weights"):
        export_peft(model, tmp_path / "peft")


def test_cli_export_peft_from_a_run_folder(tmp_path, tiny_cfg):
    from fedspec.centralized import train_centralized
    from fedspec.cli import main

    cfg = tiny_cfg("adapter=pissa", "adapter.rank=4", "privacy=none", "data.num_examples=64", "train.batch_size=32",
                   "data.eval_examples=16")
    result = train_centralized(cfg)
    assert (result.paths.adapter_peft / "adapter_model.safetensors").is_file()  # written by the run itself
    assert "- `adapter-peft/`: the adapter as a PEFT LoRA adapter" in result.paths.summary.read_text()
    out = tmp_path / "exported"
    assert main(["export-peft", str(result.paths.adapter), str(out)]) == 0
    model, tokenizer = build_classifier(cfg.model, 4, seed=cfg.run.seed)
    load_adapter(model, result.paths.adapter)
    enc = tokenizer(TEXTS[:3], max_length=16, truncation=True, padding="max_length", return_tensors="pt")
    original, _ = build_classifier(cfg.model, 4, seed=cfg.run.seed)
    loaded = PeftModel.from_pretrained(original.encoder, str(out)).eval()
    model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(**enc).last_hidden_state, model.encoder(**enc).last_hidden_state, atol=1e-5)
    assert main(["export-peft", str(tmp_path / "nowhere"), str(out)]) == 2
    # the run folder itself stands for its final adapter (the error for a wrong folder offers both): it used to look
    # for config.yaml in the folder above the run and fail
    again = tmp_path / "from-run-folder"
    assert main(["export-peft", str(result.paths.root), str(again)]) == 0
    assert (again / "adapter_model.safetensors").read_bytes() == (out / "adapter_model.safetensors").read_bytes()


def test_a_run_without_a_lora_export_says_why_in_its_summary(tiny_cfg):
    from fedspec.centralized import train_centralized

    cfg = tiny_cfg("adapter=dora", "adapter.rank=4", "privacy=none", "data.num_examples=64", "train.batch_size=32",
                   "data.eval_examples=16")
    result = train_centralized(cfg)
    assert not result.paths.adapter_peft.exists()
    assert "- no `adapter-peft/`: adapter.method=dora is no low-rank update" in result.paths.summary.read_text()


@pytest.mark.parametrize(("name", "folder"), [("minilm", "packaged_minilm_path"), ("smollm2", "packaged_smollm2_path")])
def test_a_classifier_export_names_the_folder_its_backbone_loads_from(tmp_path, monkeypatch, name, folder):
    """adapter_config.json's base_model_name_or_path is what AutoPeftModel loads: a packaged backbone's folder,
    not fedspec's short name (model=smollm2 as a classifier wrote "smollm2", which no hub or folder resolves)."""
    from omegaconf import OmegaConf

    import fedspec.causal_lm
    import fedspec.models
    from fedspec.builders import ModelSettings, write_peft_export

    model, _ = tiny_classifier()
    fedspec.adapt(model, "lora", 4)
    source = tmp_path / "backbone"
    source.mkdir()
    module = fedspec.causal_lm if folder == "packaged_smollm2_path" else fedspec.models
    monkeypatch.setattr(module, folder, lambda: source)
    settings = ModelSettings(OmegaConf.create({"name": name, "path": None}), None, False, 0)
    assert write_peft_export(model, tmp_path / "peft", settings) is None
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(source)
