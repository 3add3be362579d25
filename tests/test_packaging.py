"""The distribution installs everything under the `fedspec.` namespace, both as a wheel and editable."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_has_only_the_fedspec_package_and_its_configs(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True,
    )
    (wheel,) = tmp_path.glob("fedspec-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"fedspec", wheel.name.split("-py3")[0] + ".dist-info"}
    for module in ("server/app.py", "client/app.py", "strategies/aggregation.py", "simulations/driver.py",
                   "configs/config.yaml", "configs/adapter/pissa.yaml"):
        assert f"fedspec/{module}" in names, module


def test_installed_package_exposes_no_top_level_server_or_client(tmp_path):
    code = (
        "import importlib.util as u, fedspec.server, fedspec.client, fedspec.configs;"
        "print(u.find_spec('server') is None, u.find_spec('client') is None)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, capture_output=True, text=True)
    assert out.stdout.split() == ["True", "True"]
