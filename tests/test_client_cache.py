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


def test_a_node_reads_class_ids_in_its_own_file_only_where_data_label_names_says_which_is_which(tiny_cfg, tmp_path):
    """A node labels its own file with the server task's class names; where those were the training file's labels in
    sorted order, a node file of class ids (another export's convention) had each id read as a position in that list:
    its records trained as other classes, without a word."""
    from fedspec.errors import DataError

    train = tmp_path / "train.tsv"
    train.write_text("text\tlabel\n" + "".join(f"t{i}\t{('World', 'Sports')[i % 2]}\n" for i in range(40)))
    node_file = tmp_path / "node.tsv"
    node_file.write_text("text\tlabel\nn0\t0\nn1\t1\n")
    names = ("Sports", "World")  # what the server sends: its training file's labels, sorted
    cfg = tiny_cfg("data.source=file", f"data.path={train}", "data.eval_examples=8", "federation.clients=2")
    with pytest.raises(DataError, match=f"label '0' at line 2 of {node_file} is a class id"):
        runtime._cached_own_data(runtime._key(cfg), str(node_file), names)
    named = tiny_cfg("data.source=file", f"data.path={train}", "data.eval_examples=8", "federation.clients=2",
                     "data.label_names=[Sports,World]")
    assert runtime._cached_own_data(runtime._key(named), str(node_file), names).labels.tolist() == [0, 1]


def test_a_node_reads_its_own_file_with_the_runs_data_has_header(tiny_cfg, tmp_path):
    """data.has_header=false says the first row is a record: the server's loader honoured it, a node's own file was
    always auto-detected, so a first record whose label is no class (a typo) was taken for a header and dropped
    without a word instead of refused."""
    from fedspec.errors import DataError

    train = tmp_path / "train.tsv"
    train.write_text("".join(f"t{i}\t{('World', 'Sports')[i % 2]}\n" for i in range(40)))
    node_file = tmp_path / "node.tsv"
    node_file.write_text("n0\tSprots\nn1\tWorld\nn2\tSports\n")
    names = ("Sports", "World")
    cfg = tiny_cfg("data.source=file", f"data.path={train}", "data.eval_examples=8", "federation.clients=2",
                   "data.has_header=false", "data.text_field=0", "data.label_field=1")
    with pytest.raises(DataError, match=f"unparseable label 'Sprots' at line 1 of {node_file}"):
        runtime._cached_own_data(runtime._key(cfg), str(node_file), names)
