"""Lifecycle of the Triton server bundled in nvidia-pytriton, run on our own model repository.

`TritonServer` starts the bundled `tritonserver` binary (python backend only) on a
repository, waits until every model in it answers `/v2/models/<m>/ready`, and
stops it cleanly: SIGINT, a wait, then SIGKILL of its whole process group, so no
tritonserver or python-backend stub outlives it; its temporary backend directory
and its shared-memory regions are removed.

What the bundled binary needs (PLATFORM-NOTES, Serving):
- a backend directory whose `python/` holds the stub built for this interpreter's
  Python version (the wheel ships one per version; PyTriton copies it the same way);
- this interpreter's libpython first on LD_LIBRARY_PATH, then the wheel's own
  libraries (the stub links libcudart from there even on CPU);
- this interpreter's site-packages on PYTHONPATH, so model.py imports torch and
  transformers from our environment (meant for a virtualenv too; verified with
  the global pyenv interpreter only).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import secrets
import shutil
import signal
import site
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

TEMP_PREFIX = "aigc-triton-"
SHM_DIR = "/dev/shm"
_PR_SET_PDEATHSIG = 1


class TritonStartError(RuntimeError):
    """The server exited or did not become ready; the message holds its log tail."""


class TritonCrashed(TritonStartError):
    """The server was killed by a signal while loading its models."""


def pytriton_dir() -> Path:
    """Return the directory of the tritonserver distribution inside the nvidia-pytriton wheel."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("nvidia-pytriton is not installed: pip install nvidia-pytriton==0.7.0")
    return Path(list(spec.submodule_search_locations)[0]) / "tritonserver"


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on `host` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def repository_models(repo: Path) -> list[str]:
    """Return the names of the models in a Triton repository (dirs with a config.pbtxt)."""
    return sorted(p.parent.name for p in Path(repo).glob("*/config.pbtxt"))


def server_env() -> dict[str, str]:
    """Return the environment in which tritonserver and its python stubs find our libraries."""
    env = os.environ.copy()
    wheel_libs = pytriton_dir().parent.parent / "nvidia_pytriton.libs"
    lib_path = [sysconfig.get_config_var("LIBDIR"), str(wheel_libs)]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(lib_path + [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p])
    py_path = site.getsitepackages() + [site.getusersitepackages()]
    env["PYTHONPATH"] = os.pathsep.join(py_path + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["HF_HUB_OFFLINE"] = "1"
    env["HF_HUB_DISABLE_TELEMETRY"] = "1"
    return env


_LIBC = ctypes.CDLL(None)  # loaded here: the child between fork and exec must not dlopen


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the thread that started it dies."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


# Runs beside each tritonserver, in a session of its own (a SIGKILL of the caller's process group
# does not reach it): when the process that started the server is gone without stopping it, it
# kills the server's process group (the python stubs too: they outlive a server that dies while
# they load) and removes its temporary directory and shared memory. It ends with the server.
WATCHDOG = r"""
import glob, os, shutil, signal, sys, time
parent, group, tmp, shm = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
while os.getppid() == parent:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        sys.exit(0)
    time.sleep(0.5)
try:
    os.killpg(group, signal.SIGKILL)
except ProcessLookupError:
    pass
shutil.rmtree(tmp, ignore_errors=True)
for region in glob.glob(shm + "*"):
    os.unlink(region)
"""


class TritonServer:
    """A tritonserver process serving `repo` on `host`; a context manager (start ... stop).

    Ports left at 0 are chosen free. `log_file` keeps the server log (default: a
    file in the temporary directory, removed on stop). A server killed by a signal
    while loading is started again, `start_attempts` times in all. The server gets
    SIGTERM if the thread that started it dies.
    """

    def __init__(
        self,
        repo: Path,
        *,
        host: str = "127.0.0.1",
        http_port: int = 0,
        grpc_port: int = 0,
        metrics_port: int = 0,
        log_file: Path | None = None,
        ready_timeout_s: float = 300.0,
        stop_timeout_s: float = 30.0,
        start_attempts: int = 3,
    ):
        self.repo = Path(repo).resolve()
        self.models = repository_models(self.repo)
        if not self.models:
            raise FileNotFoundError(f"no Triton model repository at {self.repo} (no */config.pbtxt)")
        self.host = host
        self.http_port = http_port or free_port(host)
        self.grpc_port = grpc_port or free_port(host)
        self.metrics_port = metrics_port or free_port(host)
        self.log_file = Path(log_file) if log_file else None
        self.ready_timeout_s = ready_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.start_attempts = start_attempts
        self.start_to_ready_s: float | None = None
        self._proc: subprocess.Popen | None = None
        self._tmp: Path | None = None
        self._watchdog: subprocess.Popen | None = None
        self._log_path: Path | None = None
        self._shm_prefix = f"aigc_triton_{os.getpid()}_{secrets.token_hex(4)}_"

    @property
    def http_url(self) -> str:
        """Return `host:port` of the HTTP endpoint (tritonclient's url form)."""
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        """Return `host:port` of the gRPC endpoint."""
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        """Return the Prometheus metrics URL."""
        return f"http://{self.host}:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        """Return the tritonserver process id while started."""
        return self._proc.pid if self._proc else None

    def __enter__(self) -> "TritonServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> float:
        """Start the server and wait until every model is ready; return the seconds that took.

        Raises TritonStartError (with the log tail) when the server exits or is not
        ready within `ready_timeout_s`; the server is stopped in every failure case.
        """
        if self._proc is not None:
            raise RuntimeError("this TritonServer is already started")
        started = time.perf_counter()
        self._tmp = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX))
        try:
            backends = self._backend_dir(self._tmp)
            self._log_path = self.log_file or self._tmp / "tritonserver.log"
            self._log_path.parent.mkdir(parents=True, exist_ok=True)
            for attempt in range(1, self.start_attempts + 1):
                self._launch(backends)
                try:
                    self._wait_ready()
                    break
                except TritonCrashed as exc:
                    # seen on busy 2-core machines: the python backend aborts with
                    # boost::interprocess::lock_exception while stubs load; a restart loads fine
                    self._stop_process()
                    if attempt == self.start_attempts:
                        raise
                    print(f"[aigc] {str(exc).splitlines()[0]} Starting it again (attempt {attempt + 1} "
                          f"of {self.start_attempts}).", file=sys.stderr, flush=True)
        except BaseException:
            self.stop()
            raise
        self.start_to_ready_s = time.perf_counter() - started
        return self.start_to_ready_s

    def _launch(self, backends: Path) -> None:
        with open(self._log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self._command(backends),
                env=server_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: its stubs die with it, Ctrl-C reaches us only
                preexec_fn=_die_with_parent,
            )
        self._watchdog = subprocess.Popen(
            [sys.executable, "-c", WATCHDOG, str(os.getpid()), str(self._proc.pid), str(self._tmp),
             f"{SHM_DIR}/{self._shm_prefix}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )

    def _backend_dir(self, tmp: Path) -> Path:
        """Return a backend directory holding the python backend and this Python's stub."""
        dist = pytriton_dir()
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.is_file():
            raise RuntimeError(f"nvidia-pytriton ships no python backend stub for Python {version} ({stub})")
        python = tmp / "backends" / "python"
        python.mkdir(parents=True)
        for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
            shutil.copy(dist / "backends" / "python" / name, python / name)
        shutil.copy(stub, python / "triton_python_backend_stub")
        return python.parent

    def _command(self, backends: Path) -> list[str]:
        return [
            str(pytriton_dir() / "bin" / "tritonserver"),
            f"--model-repository={self.repo}",
            f"--backend-directory={backends}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            "--exit-on-error=true",
            # the stub imports torch + transformers before it answers; the default 30 s
            # timeout crashes the server (boost lock_exception) on a busy 2-core machine
            f"--backend-config=python,stub-timeout-seconds={int(self.ready_timeout_s)}",
            # our own shared-memory names, so stop() can remove what a crashed server leaves in /dev/shm
            f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
            f"--exit-timeout-secs={max(1, int(self.stop_timeout_s) - 5)}",
        ]

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        waiting = list(self.models)
        while waiting:
            code = self._proc.poll()
            if code is not None:
                error = TritonCrashed if code < 0 else TritonStartError
                raise error(
                    f"tritonserver exited with code {code} before {', '.join(waiting)} was ready.\n"
                    f"--- server log (last lines) ---\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise TritonStartError(
                    f"tritonserver: {', '.join(waiting)} not ready after {self.ready_timeout_s:.0f}s.\n"
                    f"--- server log (last lines) ---\n{self.log_tail()}"
                )
            waiting = [m for m in waiting if not self._model_ready(m)]
            if waiting:
                time.sleep(0.2)

    def _model_ready(self, model: str) -> bool:
        url = f"http://{self.host}:{self.http_port}/v2/models/{model}/ready"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def is_running(self) -> bool:
        """Return True while the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        """Return the last `lines` lines of the server log."""
        if self._log_path is None or not self._log_path.is_file():
            return "(no log)"
        return "\n".join(self._log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> int | None:
        """Stop the server and its stubs, remove the temporary directory; return its exit code."""
        code = self._stop_process()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        for region in Path(SHM_DIR).glob(self._shm_prefix + "*"):
            region.unlink(missing_ok=True)
        return code

    def _stop_process(self) -> int | None:
        """Stop the server process and its process group; return its exit code."""
        code = None
        if self._proc is not None:
            group = self._proc.pid  # start_new_session: the process group id is the server's pid
            if self._proc.poll() is None:
                self._proc.send_signal(signal.SIGINT)
                try:
                    self._proc.wait(timeout=self.stop_timeout_s)
                except subprocess.TimeoutExpired:
                    os.killpg(group, signal.SIGKILL)
                    self._proc.wait()
            code = self._proc.returncode
            self._reap_group(group)
            self._proc = None
        if self._watchdog is not None:  # it ends once the group is gone
            try:
                self._watchdog.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._watchdog.kill()
                self._watchdog.wait()
            self._watchdog = None
        return code

    @staticmethod
    def _reap_group(group: int, grace_s: float = 5.0) -> None:
        """Wait for the rest of the server's process group (python stubs) to exit; kill what stays."""
        deadline = time.monotonic() + grace_s
        while True:
            try:
                os.killpg(group, 0)
            except ProcessLookupError:
                return
            if time.monotonic() > deadline:
                os.killpg(group, signal.SIGKILL)
                return
            time.sleep(0.1)
