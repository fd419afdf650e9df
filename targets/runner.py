"""The deployable C++ runner and the TVM runtime libraries it needs on the device.

The runtime libraries come from the device platform's wheels of apache-tvm / apache-tvm-ffi on
PyPI (same versions as the host's TVM, so the artifact's ABI matches). They are downloaded as
files with pip, never installed, and unpacked into a cache folder
(``$LRDEPLOY_CACHE`` or ``~/.cache/lrdeploy``) together with the runner built against them.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from lrdeploy.errors import LrdeployError
from lrdeploy.targets.devices import Device

RUNNER_SOURCE = Path(__file__).with_name("runner") / "lrdeploy_runner.cc"
RUNNER = "lrdeploy_runner"
RUNTIME_LIBS = ("libtvm_runtime.so", "libtvm_ffi.so")
_WHEEL_MEMBERS = {
    "apache-tvm": ("tvm/lib/libtvm_runtime.so",),
    "apache-tvm-ffi": ("tvm_ffi/lib/libtvm_ffi.so", "tvm_ffi/include/"),
}


def cache_root() -> Path:
    return Path(os.environ.get("LRDEPLOY_CACHE", Path.home() / ".cache" / "lrdeploy"))


def require_tool(command: str | None, package: str | None, purpose: str) -> str:
    """The full path of ``command``, or a one-line error naming the Debian package."""
    found = shutil.which(command) if command else None
    if found is None:
        hint = f" (Debian package {package}: apt-get install {package})" if package else ""
        raise LrdeployError(f"{purpose} needs {command or 'a tool this device row lacks'}, "
                            f"which is not installed{hint}")
    return found


def download_wheels(requirements: list[str], platforms: list[str], python_version: str,
                    dest: Path, what: str) -> list[Path]:
    """Wheel files for another platform, downloaded with pip (never installed)."""
    platform_args = [arg for platform in platforms for arg in ("--platform", platform)]
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                           "--only-binary=:all:", *platform_args, "--python-version",
                           python_version, "-d", str(dest), *requirements],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise LrdeployError(f"pip could not download {what}: {reason}")
    return sorted(dest.glob("*.whl"))


def runtime_dir(device: Device) -> Path:
    """Folder with the device's runtime libraries and the tvm/ffi headers, fetched on first use."""
    if not device.runtime_platform:
        raise LrdeployError(f"target '{device.name}' has no runtime_platform: no prebuilt TVM "
                            "runtime to run its artifacts with")
    versions = {name: importlib.metadata.version(name) for name in _WHEEL_MEMBERS}
    folder = cache_root() / "runtime" / f"{device.runtime_platform}-tvm{versions['apache-tvm']}"
    if all((folder / "lib" / lib).is_file() for lib in RUNTIME_LIBS):
        return folder
    print(f"fetching the TVM runtime for {device.runtime_platform} from PyPI (~100 MB, once)",
          file=sys.stderr)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        wheels = download_wheels(
            [f"{name}=={v}" for name, v in versions.items()], [device.runtime_platform],
            f"{sys.version_info.major}.{sys.version_info.minor}", Path(tmp) / "wheels",
            f"the {device.runtime_platform} TVM runtime")
        staged = Path(tmp) / "runtime"
        (staged / "lib").mkdir(parents=True)
        for wheel in wheels:
            _unpack(wheel, staged)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staged, folder)
    return folder


def _unpack(wheel: Path, dest: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.namelist():
            if member.endswith(".so") and member.split("/")[-1] in RUNTIME_LIBS:
                (dest / "lib" / Path(member).name).write_bytes(archive.read(member))
            elif member.startswith("tvm_ffi/include/") and not member.endswith("/"):
                target = dest / "include" / Path(member).relative_to("tvm_ffi/include")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.read(member))


def runner_for(device: Device) -> Path:
    """The runner binary for ``device``, built (once per source version) against its runtime."""
    runtime = runtime_dir(device)
    compiler = require_tool(device.runner_compiler, device.runner_compiler_package,
                            f"building the runner for '{device.name}'")
    digest = hashlib.sha256(RUNNER_SOURCE.read_bytes()).hexdigest()[:12]
    binary = runtime / f"{RUNNER}-{digest}"
    if binary.is_file():
        return binary
    with tempfile.TemporaryDirectory(dir=runtime) as tmp:
        staged = Path(tmp) / RUNNER
        command = [compiler, "-std=c++17", "-O2", f"-I{runtime / 'include'}", str(RUNNER_SOURCE),
                   "-o", str(staged), f"-L{runtime / 'lib'}", "-Wl,--no-as-needed",
                   "-ltvm_runtime", "-ltvm_ffi", "-Wl,-rpath,$ORIGIN/lib"]
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode != 0:
            raise LrdeployError(f"building the runner failed: {proc.stderr.strip()[:500]}")
        os.replace(staged, binary)
    return binary


def emulated_command(device: Device, runner: Path, args: list[str]) -> list[str]:
    """The command running ``runner`` under user-mode qemu for ``device`` (the runner finds its
    libraries through its rpath, ``$ORIGIN/lib``)."""
    emulator = require_tool(device.emulator, device.emulator_package,
                            f"emulating '{device.name}'")
    return [emulator, "-L", device.sysroot or "/", str(runner), *args]
