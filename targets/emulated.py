"""An emulated aarch64 board: TVM's own RPC server run by an aarch64 Python under qemu-user.

What it is made of, all cached under ``$LRDEPLOY_CACHE/emulated-aarch64``:

- a sysroot of Debian's arm64 python3.11 and the libraries it links (``apt-get download``, then
  ``dpkg -x``; needs ``dpkg --add-architecture arm64 && apt-get update`` once, as root);
- the aarch64 wheels of apache-tvm / apache-tvm-ffi (the host's versions) and of numpy, psutil,
  cloudpickle, ml_dtypes, typing_extensions, unpacked into ``site/`` (TVM's compiler library
  left out: ``TVM_USE_RUNTIME_LIB=1`` loads only the runtime);
- ``python3``, a wrapper running that Python under ``qemu-aarch64-static -0 "$0"`` so that
  ``sys.executable`` is the wrapper and the server's worker processes run emulated too (there is
  no binfmt registration here).

Servers and trackers started here bind 127.0.0.1 and run in their own process group, which
``stop`` ends as a whole (the RPC server forks a ``popen_worker`` per session). Timings measured
on this device are emulated: they say nothing about a real board.
"""

from __future__ import annotations

import compileall
import importlib.metadata
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from lrdeploy.errors import LrdeployError
from lrdeploy.targets.runner import cache_root, download_wheels, require_tool

PYTHON_DEBS = [
    "libc6", "libgcc-s1", "gcc-12-base", "libstdc++6", "libbz2-1.0", "libcrypt1", "libdb5.3",
    "libexpat1", "libffi8", "liblzma5", "libncursesw6", "libnsl2", "libtirpc3",
    "libgssapi-krb5-2", "libk5crypto3", "libkeyutils1", "libkrb5-3", "libkrb5support0",
    "libcom-err2", "libreadline8", "libsqlite3-0", "libssl3", "libtinfo6", "libuuid1",
    "libzstd1", "zlib1g", "libpython3.11-minimal", "libpython3.11-stdlib", "python3.11-minimal",
]
SERVER_WHEELS = ["apache-tvm", "apache-tvm-ffi", "numpy", "psutil", "cloudpickle", "ml_dtypes",
                 "typing_extensions"]
WHEEL_PLATFORMS = ["manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64"]
_SKIPPED_MEMBERS = ("libtvm_compiler.so", "libtvm_runtime_cuda.so", "/3rdparty/", "tvm/include/",
                    "tvm/src/")
QEMU = "qemu-aarch64-static"
READY_TIMEOUT_S = 180


def device_root() -> Path:
    return cache_root() / "emulated-aarch64"


def prepare() -> Path:
    """Build the emulated device once; returns its folder (with ``python3`` and ``site/``)."""
    root = device_root()
    if (root / "python3").is_file():
        return root
    require_tool(QEMU, "qemu-user-static", "the emulated aarch64 device")
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        staged = Path(tmp) / "device"
        _unpack_debs(Path(tmp) / "debs", staged)
        _unpack_wheels(Path(tmp) / "wheels", staged / "site")
        # The machine may set PYTHONDONTWRITEBYTECODE: without .pyc files, importing TVM under
        # emulation takes ~19 s instead of ~7 s. CPython 3.11's bytecode is the same on both.
        compileall.compile_dir(staged / "site", quiet=1, workers=os.cpu_count() or 1)
        compileall.compile_dir(staged / "usr" / "lib" / "python3.11", quiet=1,
                               workers=os.cpu_count() or 1)
        wrapper = staged / "python3"
        wrapper.write_text(
            "#!/bin/sh\n"
            "# aarch64 Python under user-mode qemu; -0 keeps this wrapper as sys.executable.\n"
            f'here="$(cd "$(dirname "$0")" && pwd)"\n'
            f'exec {QEMU} -L "$here" -0 "$0" "$here/usr/bin/python3.11" "$@"\n')
        wrapper.chmod(0o755)
        os.replace(staged, root)
    return root


def _unpack_debs(download: Path, dest: Path) -> None:
    download.mkdir(parents=True)
    proc = subprocess.run(["apt-get", "download", *[f"{p}:arm64" for p in PYTHON_DEBS]],
                          cwd=download, capture_output=True, text=True)
    if proc.returncode != 0:
        raise LrdeployError(
            "apt-get could not download Debian's arm64 python3.11 (run `dpkg --add-architecture "
            "arm64 && apt-get update` as root first): "
            f"{(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    for deb in sorted(download.glob("*.deb")):
        subprocess.run(["dpkg", "-x", str(deb), str(dest)], check=True)


def _unpack_wheels(download: Path, site: Path) -> None:
    versions = []
    for name in SERVER_WHEELS:
        try:
            versions.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(name)
    for wheel in download_wheels(versions, WHEEL_PLATFORMS, "3.11", download,
                                 "the aarch64 wheels for the emulated device"):
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.namelist():
                if not any(skip in member for skip in _SKIPPED_MEMBERS):
                    archive.extract(member, site)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Service:
    """A server or tracker process group started here, with its log (removed when stopped)."""

    name: str
    process: subprocess.Popen
    port: int
    log: Path
    extra: dict = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        """End the whole process group (the server's forked workers included) and remove its log."""
        self._end_group()
        self.log.unlink(missing_ok=True)

    def _end_group(self) -> None:
        if self.process.poll() is None:
            _signal_group(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        _signal_group(self.process.pid, signal.SIGKILL)
        self.process.wait()
        # Forked workers of the group are reaped by init a moment after the kill.
        deadline = time.monotonic() + 10
        while _group_alive(self.process.pid) and time.monotonic() < deadline:
            time.sleep(0.05)

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _start(name: str, command: list[str], env: dict, port: int, ready: str) -> Service:
    log = Path(tempfile.mkstemp(prefix=f"lrdeploy-{name}-", suffix=".log")[1])
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    service = Service(name, process, port, log)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while ready not in service.log_text():
        if process.poll() is not None or time.monotonic() > deadline:
            last_words = service.log_text().strip()[-300:]
            service.stop()
            raise LrdeployError(f"{name} did not start: {last_words}")
        time.sleep(0.2)
    return service


def start_tracker(port: int | None = None) -> Service:
    """TVM's RPC tracker on this host (it needs tornado), bound to 127.0.0.1."""
    port = port or free_port()
    command = [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1",
               "--port", str(port), "--port-end", str(port + 1)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return _start("rpc_tracker", command, env, port, "bind to")


def start_server(port: int | None = None, tracker: str | None = None,
                 key: str = "rpi4-emulated") -> Service:
    """TVM's RPC server on the emulated aarch64 device, bound to 127.0.0.1; registered with
    ``tracker`` (host:port) under ``key`` when given."""
    root = prepare()
    port = port or free_port()
    command = [str(root / "python3"), "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1",
               "--port", str(port), "--port-end", str(port + 1)]
    if tracker:
        command += ["--tracker", tracker, "--key", key]
    env = dict(os.environ, PYTHONPATH=str(root / "site"), TVM_USE_RUNTIME_LIB="1",
               PYTHONUNBUFFERED="1")
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    service = _start("rpc_server", command, env, port, "bind to")
    service.extra["key"] = key
    return service
