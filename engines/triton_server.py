"""Run Triton Inference Server on a model repository: find the binary, start it, stop it.

Where the server comes from, in this order:

    RPIAE_TRITONSERVER        a `tritonserver` binary; its backends are RPIAE_TRITON_BACKENDS,
                              else <binary>/../../backends (Triton's container layout,
                              /opt/tritonserver/bin and /opt/tritonserver/backends)
    the nvidia-pytriton wheel  `pytriton/tritonserver/bin/tritonserver` and its `backends/`
                              (python backend only), installed as a package or unpacked with
                              `pip install --no-deps --target <env>/pytriton nvidia-pytriton`
                              (the wheel pins numpy<2, so the project installs it beside the
                              environment instead of into it)

The wheel ships its Python backend's stub per Python version; the stub of this Python is
copied beside `libtriton_python.so` (in a private copy of the backends directory when the
wheel's is read-only), and the server finds libpython through LD_LIBRARY_PATH.

`TritonServer` starts the server on free ports in its own process group, waits until it is
ready (or reports the log's last lines when it exits first), and stops the whole group:
no server and no Python-backend stub is left behind.

A Python-backend model instance whose stub process dies (killed, out of memory) is not
restarted by Triton 2.51: every request it is given fails with "Stub process '<instance>'
is not healthy" while the server and the model still report ready. With `watchdog=True`
(what `rpiae serve` does) the server runs with `--model-control-mode=explicit
--load-model=*` and a thread checks each model's stub processes every second; when one is
gone it loads that model again (`reload`: new stubs swap in, its ensemble stays
available), and records the event in `restarts`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from rpiae.cache import default_cache_dir

ENV_BINARY = "RPIAE_TRITONSERVER"
ENV_BACKENDS = "RPIAE_TRITON_BACKENDS"
STUB = "triton_python_backend_stub"


class TritonServerError(RuntimeError):
    """No server to run, or a server that did not start (the message carries its log's tail)."""


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    backends: Path
    source: str  # what found it, for messages

    def describe(self) -> str:
        return f"{self.binary} ({self.source})"

    def problem(self) -> str | None:
        """Why this install cannot run (its binary is missing), or None."""
        return None if self.binary.is_file() else f"{self.binary}: no such tritonserver binary ({self.source})"


def _pytriton_root() -> Path | None:
    spec = importlib.util.find_spec("pytriton")  # locates the package without importing it
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    unpacked = Path(sys.prefix) / "pytriton" / "pytriton"
    return unpacked if unpacked.is_dir() else None


def find_tritonserver() -> TritonInstall | None:
    """The server this machine can run, or None (see the module docstring for the order)."""
    if os.environ.get(ENV_BINARY):
        binary = Path(os.environ[ENV_BINARY]).expanduser()
        backends = Path(os.environ.get(ENV_BACKENDS) or binary.resolve().parent.parent / "backends")
        return TritonInstall(binary, backends, ENV_BINARY)
    root = _pytriton_root()
    if root is not None and (root / "tritonserver" / "bin" / "tritonserver").is_file():
        server = root / "tritonserver"
        return TritonInstall(server / "bin" / "tritonserver", server / "backends", "the nvidia-pytriton wheel")
    return None


def missing_reason() -> str:
    """Why no server can run here, with the command that fixes it."""
    return (f"no tritonserver: set {ENV_BINARY} to a tritonserver binary, or install the nvidia-pytriton wheel "
            f"(pip install --no-deps --target {Path(sys.prefix) / 'pytriton'} nvidia-pytriton==0.7.0)")


def _python_stub(install: TritonInstall) -> Path | None:
    stubs = install.binary.resolve().parent.parent / "python_backend_stubs" / f"{sys.version_info[0]}.{sys.version_info[1]}"
    return stubs / STUB if (stubs / STUB).is_file() else None


def prepare_backends(install: TritonInstall) -> Path:
    """The backend directory to start the server with: the install's own, once the Python
    backend has the stub of this Python beside it (a private copy when it cannot be written)."""
    python_dir = install.backends / "python"
    stub = _python_stub(install)
    if not python_dir.is_dir() or stub is None or (python_dir / STUB).is_file():
        return install.backends  # no python backend, a server with its own stub, or already prepared
    try:
        _place_stub(stub, python_dir)
        return install.backends
    except OSError:
        pass
    key = hashlib.sha256(str(install.backends.resolve()).encode()).hexdigest()[:16]
    private = default_cache_dir() / "triton-backends" / f"{key}-py{sys.version_info[0]}{sys.version_info[1]}"
    if not (private / "python" / STUB).is_file():
        private.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=private.parent, prefix=f".{private.name}."))
        shutil.copytree(install.backends, staging / "backends", symlinks=True)
        _place_stub(stub, staging / "backends" / "python")
        shutil.rmtree(private, ignore_errors=True)
        os.replace(staging / "backends", private)
        shutil.rmtree(staging, ignore_errors=True)
    return private


def _place_stub(stub: Path, python_dir: Path) -> None:
    tmp = python_dir / f".{STUB}.{os.getpid()}.tmp"
    shutil.copyfile(stub, tmp)
    tmp.chmod(0o755)
    os.replace(tmp, python_dir / STUB)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(install: TritonInstall, repository: str | Path, backends: Path, http_port: int, grpc_port: int,
                   extra: list[str] | None = None) -> list[str]:
    """The tritonserver command line: the repository, its backends, the ports, no metrics
    endpoint, then `extra` as given."""
    return [str(install.binary), f"--model-repository={Path(repository).resolve()}",
            f"--backend-directory={backends}", f"--http-port={http_port}", f"--grpc-port={grpc_port}",
            "--allow-metrics=false", *(extra or [])]


def server_env(install: TritonInstall) -> dict[str, str]:
    """The server's environment: libpython of this Python on LD_LIBRARY_PATH (the Python
    backend's stub links it)."""
    env = dict(os.environ)
    libdir = sysconfig.get_config_var("LIBDIR")
    paths = [p for p in (libdir, env.get("LD_LIBRARY_PATH")) if p]
    if paths:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(paths)
    return env


class TritonServer:
    """A tritonserver process on a repository, on free ports (or the ones given).

        with TritonServer("model_repository") as server:
            client = tritonclient.grpc.InferenceServerClient(server.grpc_url)
    """

    def __init__(self, repository: str | Path, install: TritonInstall | None = None, http_port: int | None = None,
                 grpc_port: int | None = None, log_path: str | Path | None = None, extra_args: list[str] | None = None,
                 ready_timeout: float = 180.0, watchdog: bool = False, watch_interval: float = 1.0,
                 inherit_output: bool = False, report=None) -> None:
        self.install = install or find_tritonserver()
        if self.install is None:
            raise TritonServerError(missing_reason())
        if self.install.problem():
            raise TritonServerError(self.install.problem())
        self.repository = Path(repository)
        if not self.repository.is_dir():
            raise TritonServerError(f"{repository}: no such model repository")
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.extra_args = list(extra_args or [])
        self.ready_timeout = ready_timeout
        self.inherit_output = inherit_output and log_path is None  # the log goes to this process's terminal
        self._own_log = log_path is None and not self.inherit_output
        self.log_path = (Path(log_path) if log_path else None if self.inherit_output
                         else Path(tempfile.mkstemp(prefix="tritonserver-", suffix=".log")[1]))
        self.process: subprocess.Popen | None = None
        self.command: list[str] = []
        self.watchdog = watchdog
        self.watch_interval = watch_interval
        self.report = report  # called with one line per model the watchdog reloads
        self.restarts: list[dict] = []  # {"model", "stubs", "seconds", "ok"} per reload
        self._regions: set[str] = set()  # the stubs' shared-memory regions (a killed stub leaves its own)
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        if watchdog and not any(a.startswith("--model-control-mode") for a in self.extra_args):
            self.extra_args += ["--model-control-mode=explicit", "--load-model=*"]

    @property
    def http_url(self) -> str:
        return f"localhost:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"localhost:{self.grpc_port}"

    def start(self) -> "TritonServer":
        backends = prepare_backends(self.install)
        self.command = server_command(self.install, self.repository, backends, self.http_port, self.grpc_port,
                                      self.extra_args)
        with open(self.log_path, "wb") if self.log_path else contextlib.nullcontext() as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT if log else None,
                                            stdin=subprocess.DEVNULL, env=server_env(self.install), start_new_session=True)
        self.wait_ready(self.ready_timeout)
        self.stubs()  # records the stubs' shared-memory regions
        if self.watchdog:
            self._watcher = threading.Thread(target=self._watch, name="triton-watchdog", daemon=True)
            self._watcher.start()
        return self

    # -- the Python backend's stubs --------------------------------------------------------------
    def stubs(self) -> dict[str, list[int]]:
        """model name -> pids of its live Python-backend stub processes."""
        found: dict[str, list[int]] = {}
        for pid in self.group_pids():
            with contextlib.suppress(OSError):
                args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                if args and args[0].endswith(STUB.encode()) and len(args) > 2:
                    model = Path(args[1].decode(errors="replace")).parent.parent.name  # <repo>/<model>/<version>/model.py
                    found.setdefault(model, []).append(pid)
                    self._regions.add(args[2].decode(errors="replace"))  # its shared-memory region
        return found

    def reload(self, model: str) -> None:
        """Load one model again with its own config, one parameter (`rpiae_reload`) changed, as
        the override: Triton loads new instances (new stubs) and swaps them in while the
        ensemble stays available. (A load of an unchanged config does nothing; unload + load
        takes the ensemble down meanwhile.)"""
        with urllib.request.urlopen(f"http://{self.http_url}/v2/models/{model}/config", timeout=30) as r:
            config = json.loads(r.read())
        config.setdefault("parameters", {})["rpiae_reload"] = {"string_value": str(time.time_ns())}
        body = json.dumps({"parameters": {"config": json.dumps(config)}}).encode()
        request = urllib.request.Request(f"http://{self.http_url}/v2/repository/models/{model}/load", data=body,
                                         method="POST", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as r:
            r.read()

    def _watch(self) -> None:
        expected = {m: len(p) for m, p in self.stubs().items()}
        while not self._stop.wait(self.watch_interval):
            if self.process is None or self.process.poll() is not None:
                return
            live = self.stubs()
            for model, count in expected.items():
                if len(live.get(model, [])) >= count or self._stop.is_set():
                    continue
                start = time.monotonic()
                event = {"model": model, "stubs": f"{len(live.get(model, []))} of {count}", "ok": True}
                try:
                    self.reload(model)
                except (urllib.error.URLError, OSError) as e:
                    event.update(ok=False, error=str(e))
                event["seconds"] = round(time.monotonic() - start, 2)
                self.restarts.append(event)
                if self.report is not None:
                    self.report(f"watchdog: a Python stub of {model} died ({event['stubs']} alive); "
                                + (f"reloaded the model in {event['seconds']} s" if event["ok"]
                                   else f"reloading it failed: {event['error']}"))

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                code = self.process.returncode
                self.stop()
                raise TritonServerError(f"tritonserver exited ({code}) before it was ready:\n{self.log_tail()}")
            if self.is_ready():
                return
            time.sleep(0.25)
        self.stop()
        raise TritonServerError(f"tritonserver was not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 10) -> str:
        """Triton's error lines (E...) and the log's last lines, without its tables."""
        if self.log_path is None:
            return "(the log went to the terminal)"
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        keep = [line for line in text.splitlines() if line.strip() and not line.startswith(("|", "+"))]
        errors = [line for line in keep[:-lines] if line.startswith("E") and "CUDA" not in line and "Cuda" not in line]
        return "\n".join(errors[-10:] + keep[-lines:])

    def group_pids(self) -> list[int]:
        """Processes still in the server's process group (the server and its Python stubs)."""
        if self.process is None:
            return []
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    stat = (entry / "stat").read_text()
                    fields = stat[stat.rindex(")") + 2:].split()
                    if int(fields[2]) == self.process.pid and fields[0] != "Z":  # pgrp; zombies are gone
                        pids.append(int(entry.name))
        return pids

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to the group, SIGKILL to what is left after `timeout`; reaps the server."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join()
            self._watcher = None
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 5
        while self.group_pids() and time.monotonic() < deadline:
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)
        for region in self._regions:  # what the server could not remove: the regions of killed stubs
            if "/" not in region:
                with contextlib.suppress(OSError):
                    (Path("/dev/shm") / region).unlink()

    def close(self) -> None:
        self.stop()
        if self._own_log and self.log_path is not None:
            with contextlib.suppress(OSError):
                self.log_path.unlink()

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["TritonInstall", "TritonServer", "TritonServerError", "find_tritonserver", "missing_reason",
           "prepare_backends", "server_command"]
