"""Simulation cost: a client process builds the base model once and every virtual client it runs shares it;
only each client's own (small) tokenized partition is added per client."""

from __future__ import annotations

import pytest

pytest.importorskip("flwr")

from flwr.app import Context, RecordDict  # noqa: E402

import fedspec.client.runtime as runtime  # noqa: E402


def test_virtual_clients_share_one_model_per_process(tiny_cfg, monkeypatch):
    cfg = tiny_cfg("federation.clients=4")
    builds = []
    original = runtime.build_model
    monkeypatch.setattr(runtime, "build_model", lambda *a, **k: builds.append(1) or original(*a, **k))
    runtime._cached_model.cache_clear()
    runtime._cached_partition.cache_clear()
    try:
        seen = []
        for round_ in range(2):
            for client in range(4):
                context = Context(run_id=1, node_id=100 + client, node_config={"partition-id": client},
                                  state=RecordDict(), run_config={})
                model, data = runtime.model_and_data(cfg, context)
                seen.append((id(model), client, len(data)))
        assert len(builds) == 1, "the base model must be built once per process"
        assert len({model_id for model_id, _, _ in seen}) == 1
        sizes = {client: size for _, client, size in seen}
        assert sum(sizes.values()) == 400 and all(size > 0 for size in sizes.values())  # each its own partition
    finally:
        runtime._cached_model.cache_clear()
        runtime._cached_partition.cache_clear()
