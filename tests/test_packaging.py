"""The distribution installs everything under the `fedspec.` namespace, both as a wheel and editable."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The source folders and where the wheel puts them (pyproject.toml's package-dir); configs/ holds no code.
PACKAGE_FOLDERS = {"fedspec": "fedspec", "server": "fedspec/server", "client": "fedspec/client",
                   "strategies": "fedspec/strategies", "simulations": "fedspec/simulations"}


def test_wheel_has_only_the_fedspec_package_and_its_configs(tmp_path):
    # Built from a copy: setuptools reuses the checkout's build/ folder, whose leftovers would hide a module the
    # configuration no longer packages.
    source = tmp_path / "source"
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, source / name)
    for folder in (*PACKAGE_FOLDERS, "configs"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(source)],
        check=True, capture_output=True,
    )
    (wheel,) = tmp_path.glob("fedspec-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"fedspec", wheel.name.split("-py3")[0] + ".dist-info"}
    for module in ("server/app.py", "client/app.py", "strategies/aggregation.py", "simulations/driver.py",
                   "configs/config.yaml", "configs/adapter/pissa.yaml"):
        assert f"fedspec/{module}" in names, module
    # Every module of the source tree ships: a subpackage missing from pyproject's `packages` list works in an
    # editable install (the tests' and CI's) and breaks every real one (a deployed node's `pip install`).
    missing = [str(module) for folder, packaged in PACKAGE_FOLDERS.items() for module in (ROOT / folder).rglob("*.py")
               if f"{packaged}/{module.relative_to(ROOT / folder).as_posix()}" not in names]
    assert not missing, f"not in the wheel (add their packages to pyproject.toml): {missing}"


def test_installed_package_exposes_no_top_level_server_or_client(tmp_path):
    code = (
        "import importlib.util as u, fedspec.server, fedspec.client, fedspec.configs;"
        "print(u.find_spec('server') is None, u.find_spec('client') is None)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, capture_output=True, text=True)
    assert out.stdout.split() == ["True", "True"]
