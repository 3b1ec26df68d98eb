"""``dyce-serve``: read the settings, load the model, run uvicorn; one clear line when it cannot.

Everything that can stop the server before it serves (bad settings, missing or corrupt
artefacts, a bank searched for other weights, a failed warm-up) is reported as one line on
stderr saying what is wrong and what fixes it, with exit status 1 (2 for bad settings); the
traceback goes to the log at debug level (``DYCE_LOG_LEVEL=debug``).
"""

from __future__ import annotations

import logging
import sys

from pydantic import ValidationError

log = logging.getLogger("dyce.service")


def _refuse(message: str, status: int) -> None:
    print(f"dyce-serve: {message}", file=sys.stderr)
    raise SystemExit(status)


def main() -> None:
    from .settings import Settings

    try:
        settings = Settings()
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in err.errors())
        _refuse(f"refusing to start, bad settings (DYCE_* variables): {problems}", 2)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.generated_admin_token:
        log.warning("INSECURE DEV MODE: admin token for this run: %s", settings.admin_token.get_secret_value())

    workers = settings.http_processes()
    run_dir = None
    if workers > 1:
        from .multiprocess import prepare_run_dir

        run_dir = prepare_run_dir()  # before anything imports prometheus-client

    import uvicorn

    from .edge.app import create_app
    from .edge.protocol import uvicorn_config
    from .engine.model import ModelRuntime, StartupError

    try:
        runtime = ModelRuntime(settings)
    except StartupError as err:
        log.debug("start-up failed", exc_info=err)
        _refuse(f"cannot start: {err}", 1)
    except Exception as err:  # not foreseen: still one line, the traceback at debug level
        log.debug("start-up failed", exc_info=err)
        _refuse(f"cannot start: {type(err).__name__}: {err} (DYCE_LOG_LEVEL=debug shows the traceback)", 1)

    if run_dir is not None:
        from .multiprocess import serve

        if (failure := serve(settings, runtime, workers, run_dir)) is not None:
            _refuse(f"stopped: {failure}", 1)
        return

    app = create_app(settings, runtime)
    server = uvicorn.Server(uvicorn_config(app, settings))
    engine = app.state.engine
    engine.on_fatal.append(lambda _: setattr(server, "should_exit", True))
    server.run()
    if engine.fatal is not None:
        _refuse(f"stopped: {engine.fatal}", 1)
    if not server.started:
        _refuse("stopped before serving (see the log above)", 1)


if __name__ == "__main__":
    main()
