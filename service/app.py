"""``create_app(settings)``: the FastAPI application and its request-observing middleware."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import TooLarge, error_response, install_error_handlers
from .routes import admin, classify, metrics, v2
from .serving import Service
from .settings import Settings

log = logging.getLogger("dyce.service")


class ObserveRequests:
    """Pure ASGI middleware (cheaper than BaseHTTPMiddleware): body-size limit, in-flight gauge,
    and one count + duration per answered request, with the rejection reason of errors."""

    def __init__(self, app: ASGIApp, service: Service) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        limit = self.service.settings.max_body_bytes
        metrics = self.service.metrics
        status, reason = 500, None

        async def send_observed(message: Message) -> None:
            nonlocal status, reason
            if message["type"] == "http.response.start":
                status = message["status"]
                for key, value in message.get("headers", ()):
                    if key == b"x-error-code":
                        reason = value.decode()
            await send(message)

        received = 0

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise TooLarge(f"request body exceeds {limit} bytes")
            return message

        metrics.in_flight.inc()
        try:
            declared = _content_length(scope)
            if declared is not None and declared > limit:
                response = error_response(413, "too_large", f"request body of {declared} bytes exceeds {limit} bytes")
                await response(scope, receive, send_observed)
            else:
                await self.app(scope, receive_limited, send_observed)
        finally:
            metrics.in_flight.dec()
            route = scope.get("route")
            if reason is None and status >= 500:
                reason = "internal"
            metrics.request_done(getattr(route, "path", "unmatched"), status, time.perf_counter() - started, reason)


def _content_length(scope: Scope) -> int | None:
    for key, value in scope["headers"]:
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _report_warm_up_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.critical("warm-up failed; the server stays not ready", exc_info=task.exception())


def create_app(settings: Settings) -> FastAPI:
    service = Service(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await service.load()  # artefact problems stop start-up here, with the reason
        warm = asyncio.get_running_loop().create_task(service.warm_up(), name="dyce-warm-up")
        warm.add_done_callback(_report_warm_up_failure)
        try:
            yield
        finally:
            warm.cancel()
            await asyncio.gather(warm, return_exceptions=True)
            await service.stop()

    app = FastAPI(
        title="DyCE Serve",
        version="0.1.0",
        summary="Early-exit image classification with run-time accuracy/compute tiers",
        lifespan=lifespan,
    )
    app.state.service = service
    install_error_handlers(app)

    @app.exception_handler(Exception)
    async def _internal(_: Request, err: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=err)
        return error_response(500, "internal", "internal server error")

    for module in (classify, v2, admin, metrics):
        app.include_router(module.router)
    app.add_middleware(ObserveRequests, service=service)
    return app
