"""Several HTTP worker processes in front of one engine process (``DYCE_HTTP_WORKERS`` > 1).

```
clients ─▶ listening socket (bound once, shared) ─▶ worker 1..N: uvicorn + FastAPI edge
              (HTTP, body, decode, validation, encoding: scales across cores)
                 │ RemoteEngine ─ Unix socket ─ EngineServer │
                 ▼                                            ▼
          this process: the Engine (model, tier state, admission, batcher, autoswitcher)
```

This process loads the model (a bad artefact is one line and exit status 1, as with one
process), serves the engine's socket, binds the HTTP socket and starts the workers with
``spawn`` (a forked copy of a process that already runs torch threads can deadlock). A worker
that dies is started again; the engine failing stops everything with status 1, so an
orchestrator restarts the replica. Metrics go through prometheus-client's multiprocess mode,
whose directory this process creates empty, beside the engine's socket in a private directory
it removes at the end (or the next start removes, if this process was killed outright).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
from multiprocessing.process import BaseProcess
from pathlib import Path

from .settings import Settings

log = logging.getLogger("dyce.service")

RESTART_PAUSE_S = 1.0  # a worker that dies at once is not restarted in a tight loop


RUN_DIR_PREFIX = "dyce-"
OWNER_FILE = "owner.pid"


def prepare_run_dir(root: Path | None = None) -> Path:
    """A fresh private directory (mode 0700) for the engine's socket and every process's metric
    files; the metrics' place is set before prometheus-client is imported.

    Private because the channel carries pickles: only this user's processes may connect.
    """
    remove_stale_run_dirs(root)
    run_dir = Path(tempfile.mkdtemp(prefix=RUN_DIR_PREFIX, dir=root))
    atexit.register(shutil.rmtree, run_dir, True)  # at exit, whether it served or start-up was refused
    (run_dir / OWNER_FILE).write_text(str(os.getpid()))
    (run_dir / "metrics").mkdir()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(run_dir / "metrics")
    return run_dir


def remove_stale_run_dirs(root: Path | None = None) -> None:
    """Remove the run directories of this user's supervisors that are gone without cleaning up
    (SIGKILL, the OOM killer: atexit never ran), so a crash-looping replica does not fill the
    temporary directory with metric files. A directory whose owner is alive, or that names no
    owner yet (being created), is left alone."""
    for run_dir in Path(root or tempfile.gettempdir()).glob(f"{RUN_DIR_PREFIX}*"):
        try:
            if run_dir.is_symlink() or run_dir.stat().st_uid != os.getuid():
                continue
            owner = int((run_dir / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        if not _process_exists(owner):
            shutil.rmtree(run_dir, ignore_errors=True)
            log.info("removed %s, left by dyce-serve %d, which is gone", run_dir, owner)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def run_worker(settings: Settings, sockets: list[socket.socket], engine_path: str, log_level: str) -> None:
    """One HTTP worker process: the edge, with a ``RemoteEngine`` for an engine."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    import torch
    import uvicorn

    from .edge.app import create_app
    from .edge.protocol import uvicorn_config
    from .engine.remote import RemoteEngine

    torch.set_num_threads(1)  # decoding is per request; the cores belong to the other workers and the engine
    remote = RemoteEngine(settings, engine_path)
    server = uvicorn.Server(uvicorn_config(create_app(settings, remote=remote), settings))
    remote.on_fatal.append(lambda _: setattr(server, "should_exit", True))
    # uvicorn re-raises the SIGINT it handled (a terminal's Ctrl-C reaches every process of the
    # group); the supervisor decides what happens next, so no traceback here.
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=sockets)


class Supervisor:
    def __init__(self, settings: Settings, runtime: object, workers: int, run_dir: Path) -> None:
        self.settings = settings
        self.runtime = runtime
        self.count = workers
        self.run_dir = run_dir
        self.context = multiprocessing.get_context("spawn")
        self.workers: list[BaseProcess] = []
        self.stopping = asyncio.Event()
        self.failure: str | None = None

    def _start_worker(self, listener: socket.socket, engine_path: str) -> BaseProcess:
        process = self.context.Process(
            target=run_worker,
            args=(self.settings, [listener], engine_path, self.settings.log_level),
            name="dyce-http",
            daemon=False,
        )
        process.start()
        return process

    async def run(self) -> None:
        from prometheus_client import multiprocess

        from .engine.engine import Engine
        from .engine.remote import EngineServer
        from .metrics import Metrics

        try:  # first: a port in use is one line, before any model work starts
            listener = _bind(self.settings)
        except OSError as err:
            self.failure = f"cannot listen on {self.settings.host}:{self.settings.port}: {err.strerror or err}"
            return
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stopping.set)
        engine = Engine(self.settings, self.runtime, Metrics())
        engine.on_fatal.append(self._engine_failed)
        await engine.load()
        engine_path = str(self.run_dir / "engine.sock")
        server = EngineServer(engine, engine_path)
        await server.start()
        warm = engine.start_warm_up()
        self.workers = [self._start_worker(listener, engine_path) for _ in range(self.count)]
        log.info(
            "serving on http://%s:%d with %d HTTP worker processes and one engine process; metric files in %s",
            self.settings.host, listener.getsockname()[1], self.count, self.run_dir / "metrics",
        )  # fmt: skip
        try:
            while not self.stopping.is_set():
                try:
                    await asyncio.wait_for(self.stopping.wait(), RESTART_PAUSE_S)
                except TimeoutError:
                    pass
                for i, process in enumerate(self.workers):
                    if not process.is_alive() and not self.stopping.is_set():
                        log.error(
                            "HTTP worker %d exited with status %s; starting another", process.pid, process.exitcode
                        )
                        multiprocess.mark_process_dead(process.pid)
                        self.workers[i] = self._start_worker(listener, engine_path)
        finally:
            for process in self.workers:
                if process.is_alive():
                    process.terminate()  # SIGTERM: uvicorn finishes the requests it holds
            for process in self.workers:
                await asyncio.to_thread(process.join, self.settings.request_timeout_s + 5)
                if process.is_alive():
                    process.kill()
            warm.cancel()
            await asyncio.gather(warm, return_exceptions=True)
            await server.stop()
            await engine.stop()
            listener.close()

    def _engine_failed(self, reason: str) -> None:
        self.failure = reason
        self.stopping.set()


def _bind(settings: Settings) -> socket.socket:
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((settings.host, settings.port))
    listener.listen(2048)
    listener.set_inheritable(True)
    return listener


def serve(settings: Settings, runtime: object, workers: int, run_dir: Path) -> str | None:
    """Run until a signal or an engine failure; the failure, if any."""
    supervisor = Supervisor(settings, runtime, workers, run_dir)
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # uvicorn's workers fall back the same way
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(supervisor.run())
    return supervisor.failure
