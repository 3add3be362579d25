"""Helpers the test files share: a trained-looking adapter, and the per-example reference every per-sample-gradient
test compares Opacus against."""

from __future__ import annotations

import torch
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset


def tiny_classifier(name: str = "tiny-bert", seed: int = 0, num_classes: int = 3):
    """(model, tokenizer): a tiny random backbone (last-token pooling for the decoder) with a classification head,
    dropout off."""
    from omegaconf import OmegaConf

    from fedspec.models import build_classifier

    pooling = "last" if name == "tiny-llama" else "mean"
    return build_classifier(OmegaConf.create({"name": name, "pooling": pooling, "dropout": 0.0}), num_classes,
                            seed=seed)


def outputs(model, batch) -> torch.Tensor:
    """The model's eval-mode outputs on a tokenized batch, without gradients."""
    model.eval()
    with torch.no_grad():
        return model(batch.input_ids, batch.attention_mask)


def perturb(model, scale: float = 0.05, seed: int = 1) -> None:
    """Move every trainable tensor away from its initial value, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=generator))


def per_example_grads(model, batch, labels: torch.Tensor, loss=torch.nn.functional.cross_entropy
                      ) -> dict[str, torch.Tensor]:
    """Gradients of each trainable parameter, one example at a time (stacked along dim 0)."""
    grads: dict[str, list[torch.Tensor]] = {}
    for i in range(len(labels)):
        model.zero_grad(set_to_none=True)
        out = model(batch.input_ids[i:i + 1], batch.attention_mask[i:i + 1])
        loss(out, labels[i:i + 1]).backward()
        for name, p in model.named_parameters():
            if p.requires_grad:
                grads.setdefault(name, []).append(p.grad.detach().clone())
    return {name: torch.stack(g) for name, g in grads.items()}


def assert_opacus_matches_per_example_loop(model, batch, labels: torch.Tensor, loss=torch.nn.functional.cross_entropy,
                                           atol: float = 1e-6, relative: float | None = None) -> None:
    """Opacus' per-sample gradients (hooks mode, on the caller's model) equal the per-example loop for every
    trainable tensor, and none is computed for a frozen one. ``loss`` averages the records' losses. ``relative``:
    tolerate differences up to that share of each tensor's largest gradient entry (a low-precision model, whose
    batched and one-by-one passes round differently)."""
    expected = per_example_grads(model, batch, labels, loss)
    params = [p for p in model.parameters() if p.requires_grad]
    loader = DataLoader(TensorDataset(batch.input_ids, batch.attention_mask, labels), batch_size=len(labels))
    hooks, _, _ = PrivacyEngine(accountant="rdp").make_private(
        module=model, optimizer=torch.optim.SGD(params, lr=0.0), data_loader=loader,
        noise_multiplier=0.0, max_grad_norm=1e6, poisson_sampling=False, wrap_model=False,
    )
    try:
        model.zero_grad(set_to_none=True)
        loss(model(batch.input_ids, batch.attention_mask), labels).backward()
        for name, p in model.named_parameters():
            if p.requires_grad:
                tolerance = atol if relative is None else relative * float(expected[name].abs().max())
                assert torch.allclose(p.grad_sample, expected[name], atol=tolerance, rtol=0.0), name
            else:
                assert getattr(p, "grad_sample", None) is None, f"per-sample gradient computed for frozen {name}"
    finally:
        hooks.cleanup()


def train_reply(node: int, metrics: dict | None, update: dict | None):
    """A client's reply to a train instruction as the strategy reads it (Flower's Message needs a running
    federation to be built): ``content.metric_records`` / ``content.array_records``, ``metadata.src_node_id``.
    ``None`` leaves that record out."""
    from types import SimpleNamespace

    from flwr.app import ArrayRecord, MetricRecord

    content = SimpleNamespace(
        array_records={} if update is None else {"arrays": ArrayRecord(update)},
        metric_records={} if metrics is None else {"metrics": MetricRecord(metrics)},
        config_records={},
    )
    return SimpleNamespace(content=content, metadata=SimpleNamespace(src_node_id=node), has_error=lambda: False)
