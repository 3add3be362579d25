"""How long are a run's per-sample gradients, against the clipping bound C of DP-SGD (`privacy.max_grad_norm`)?

    python benchmarks/grad_norms.py RUN_DIR [--records 800]

Rebuilds the run's training records and model from its config.yaml and prints the distribution of per-record
gradient norms of the tensors `fedspec train` trains (adapter factors and head), for the freshly initialized adapter
and for the run's final one, with the share of records DP-SGD clips — overall, for rows of 15 words or more (SST-2's
whole sentences) and for the shorter ones. docs/recipe.md ("Where DP's cost goes on SST-2") rests on it.

The figures describe private training records and are not differentially private: keep them where the data is.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from statistics import median

import torch

from fedspec.adapters import load_adapter
from fedspec.builders import ModelSettings, build_backbone, build_model, build_task
from fedspec.config import load_config_file
from fedspec.training import criterion

LONG_WORDS = 15  # the study's whole sentences (study_cells.WHOLE_SENTENCE_WORDS)


def per_record_norms(model: torch.nn.Module, tokenizer, texts: list[str], labels: list[int],
                     max_length: int) -> list[float]:
    """The L2 norm, over all trainable tensors, of each record's own loss gradient (one backward per record)."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss_fn = criterion(model)
    norms = []
    for text, label in zip(texts, labels):
        encoded = tokenizer([text], truncation=True, max_length=max_length, return_tensors="pt")
        loss = loss_fn(model(encoded["input_ids"], encoded["attention_mask"]), torch.tensor([label]))
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        norms.append(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)).item())
    return norms


def describe(name: str, norms: list[float], bound: float) -> str:
    ordered = sorted(norms)
    p10, p90 = (ordered[round(share * (len(ordered) - 1))] for share in (0.1, 0.9))
    clipped = sum(norm > bound for norm in norms) / len(norms)
    return (f"{name:<24} {len(norms):>7} {median(norms):>8.3f} {p10:>8.3f} {p90:>8.3f} "
            f"{ordered[-1]:>8.3f} {clipped:>9.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a finished run folder (runs/NAME) with config.yaml and adapter/")
    parser.add_argument("--records", type=int, default=800, help="training records to measure (a seeded sample)")
    args = parser.parse_args()

    cfg = load_config_file(args.run_dir / "config.yaml")
    task = build_task(cfg.data, cfg.run.seed)
    settings = ModelSettings.of(cfg)
    order = torch.randperm(len(task.train.texts), generator=torch.Generator().manual_seed(0))[: args.records]
    texts = [task.train.texts[i] for i in order.tolist()]
    labels = [task.train.labels[i] for i in order.tolist()]
    long = [len(text.split()) >= LONG_WORDS for text in texts]
    bound = float(cfg.privacy.max_grad_norm)

    initialized, tokenizer = build_model(settings, task.num_classes, train_A=True)
    trainable = {name for name, p in initialized.named_parameters() if p.requires_grad}
    trained, _ = build_backbone(settings, task.num_classes)
    load_adapter(trained, args.run_dir / "adapter")
    for name, p in trained.named_parameters():
        p.requires_grad_(name in trainable)

    print(f"per-record gradient norms, C = {bound:g}\n{'':<24} {'records':>7} {'median':>8} {'p10':>8} {'p90':>8} "
          f"{'max':>8} {'clipped':>9}")
    for state, model in (("initialized", initialized), ("trained", trained)):
        model.eval()  # dropout off: the norms of the model as it is, not of one random mask
        norms = per_record_norms(model, tokenizer, texts, labels, int(cfg.model.max_length))
        print(describe(f"{state}, all", norms, bound))
        print(describe(f"{state}, >= {LONG_WORDS} words", [n for n, is_long in zip(norms, long) if is_long], bound))
        print(describe(f"{state}, shorter", [n for n, is_long in zip(norms, long) if not is_long], bound))


if __name__ == "__main__":
    main()
