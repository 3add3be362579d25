"""What the privacy report says the server sees, and where a run may write."""

from __future__ import annotations

import pytest

from fedspec.adapters import METHODS
from fedspec.errors import ConfigError
from fedspec.privacy.disclosures import init_uses_client_data


@pytest.mark.parametrize("method", sorted(METHODS))
def test_only_data_driven_initializations_are_reported_as_using_client_data(method):
    uses_data, needs = init_uses_client_data(method)
    assert uses_data == bool(METHODS[method].calibration), needs
    assert uses_data == (method in {"corda", "eva", "lora_ga", "fwsvd"})


@pytest.mark.parametrize("name", ["../x", "a/b", "..", "/tmp/elsewhere"])
def test_a_run_name_cannot_leave_the_output_folder(tiny_cfg, name):
    from fedspec.rundir import run_paths

    cfg = tiny_cfg()
    cfg.run.name = name
    with pytest.raises(ConfigError, match="run.name"):
        run_paths(cfg)


def test_an_unwritable_output_folder_is_refused_before_the_run_starts(tiny_cfg, tmp_path, monkeypatch):
    import os

    from fedspec.rundir import check_run_dir

    cfg = tiny_cfg()
    cfg.run.name = "r"
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cfg.run.output_dir = str(blocker / "runs")  # its would-be parent is a file
    with pytest.raises(ConfigError, match="a-file is not a folder, so the run folder .* cannot be written"):
        check_run_dir(cfg)
    cfg.run.output_dir = str(tmp_path / "read-only" / "runs")
    (tmp_path / "read-only").mkdir()
    # Permission bits do not bind root (the test machine's user): ask os.access as an unprivileged user would answer
    monkeypatch.setattr(os, "access", lambda path, mode: not str(path).endswith("read-only"))
    with pytest.raises(ConfigError, match="read-only is not writable.*choose another run.output_dir"):
        check_run_dir(cfg)
    assert not (tmp_path / "read-only" / "runs").exists()  # nothing was created
