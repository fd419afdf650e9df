"""passes/ and targets/ install as lrdeploy.passes / lrdeploy.targets, editable and as a wheel."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import lrdeploy.passes
import lrdeploy.targets
from conftest import REPO

PROBE = ("import lrdeploy.passes.svd_matmul, lrdeploy.targets, sys; "
         "print(lrdeploy.passes.__file__); print(lrdeploy.targets.__file__); "
         "print('tvm' in sys.modules)")


def test_editable_install_maps_the_top_level_folders():
    assert Path(lrdeploy.passes.__file__).resolve() == REPO / "passes" / "__init__.py"
    assert Path(lrdeploy.targets.__file__).resolve() == REPO / "targets" / "__init__.py"


def test_wheel_contains_and_imports_passes_and_targets(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".venv", ".git", "out", "build", "dist", "*.egg-info", "__pycache__", ".*cache"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "-w", wheels, source], check=True)
    (wheel,) = wheels.glob("lrdeploy-*.whl")
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
                    site, wheel], check=True)
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
                          check=True)
    passes_file, targets_file, tvm_imported = proc.stdout.split()
    assert Path(passes_file).is_relative_to(site) and Path(targets_file).is_relative_to(site)
    assert tvm_imported == "False"
    assert (site / "bin" / "lrdeploy").exists()
    assert (site / "lrdeploy" / "targets" / "runner" / "lrdeploy_runner.cc").is_file()
    for template in ("Makefile.in", "lrd_backend.h", "main.c", "startup.c", "mps2.ld"):
        assert (site / "lrdeploy" / "targets" / "mcu_c" / template).is_file()
