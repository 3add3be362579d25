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
