"""``create_app(settings)``: the FastAPI application and its request-observing middleware."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..engine.engine import Engine
from ..engine.model import ModelRuntime
from ..engine.remote import RemoteEngine
from ..errors import ROUTER_ERRORS, BodyTimeout, TooLarge, error_response, install_error_handlers
from ..metrics import Metrics
from ..settings import Settings
from .gateway import Gateway
from .routes import admin, classify, metrics, v2

log = logging.getLogger("dyce.service")


# Routes that must answer even when the server is saturated: probes, scrapes and operators.
UNLIMITED_PREFIXES = ("/v2/health", "/metrics", "/admin")


class FastRoute:
    """A ``POST`` route the edge answers itself, past FastAPI's routing, dependency solving and
    response validation (~0.3 ms of the event loop per request on a 2-core host).

    Only requests with no query string come here: FastAPI's route keeps validating parameters,
    with its own 422s. The answer is the route's own function, errors go to the app's own
    exception handlers (what Starlette's ExceptionMiddleware would call), anything they do not
    handle propagates as it would from the route, and ``scope["route"]`` is the route, so the
    metrics count both paths as one.
    """

    def __init__(
        self,
        route: APIRoute,
        answer: Callable[[Request], Awaitable[Response]],
        handlers: dict[type[Exception], Callable[[Request, Any], Awaitable[Response]]],
    ) -> None:
        self.route = route
        self.answer = answer
        self.handlers = handlers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"] = self.route
        request = Request(scope, receive, send)
        try:
            response = await self.answer(request)
        except Exception as err:
            handler = next((self.handlers[c] for c in type(err).__mro__ if c in self.handlers), None)
            if handler is None:
                raise
            response = await handler(request, err)
        await response(scope, receive, send)


class ObserveRequests:
    """Pure ASGI middleware (cheaper than BaseHTTPMiddleware), the first thing a request meets:

    - the in-flight limit: past ``max_in_flight_requests`` a request is answered 503 at once,
      before its body is read, so overload costs a client milliseconds, not a wait in the event
      loop that no timing header would show;
    - the body-size limit, and a read timeout between body chunks (a client that promises a
      body and stalls gets 408 and its connection closed, instead of holding a slot);
    - the arrival time (``scope["state"]["arrived"]``) that the timing headers count from;
    - the in-flight gauge, and one count + duration per answered request with its error reason.
    """

    def __init__(self, app: ASGIApp, gateway: Gateway, fast_routes: dict[str, FastRoute] | None = None) -> None:
        self.app = app
        self.gateway = gateway
        self.in_flight = 0
        self.fast_routes = fast_routes or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        scope.setdefault("state", {})["arrived"] = started
        settings = self.gateway.settings
        limit, body_timeout = settings.max_body_bytes, settings.body_read_timeout_s
        metrics = self.gateway.metrics
        status, reason = 500, None

        async def send_observed(message: Message) -> None:
            nonlocal status, reason
            if message["type"] == "http.response.start":
                status = message["status"]
                for key, value in message.get("headers", ()):
                    if key == b"x-error-code":
                        reason = value.decode()
            await send(message)

        received, body_done = 0, False

        async def receive_limited() -> Message:
            nonlocal received, body_done
            if body_done:  # only a disconnect can come now; waiting for it has no deadline
                return await receive()
            try:
                async with asyncio.timeout(body_timeout):  # a timer handle, no task per chunk
                    message = await receive()
            except TimeoutError:
                raise BodyTimeout(f"no request body data for {body_timeout:g} s") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > limit:
                    raise TooLarge(f"request body exceeds {limit} bytes")
            return message

        limited = not scope["path"].startswith(UNLIMITED_PREFIXES)
        refused_at_edge = False
        self.in_flight += limited
        metrics.in_flight.inc()
        try:
            declared = _content_length(scope)
            if limited and self.in_flight > settings.max_in_flight_requests:
                refused_at_edge = True
                response = error_response(
                    503,
                    "overloaded",
                    f"{settings.max_in_flight_requests} requests are in flight already; retry shortly",
                    {"Retry-After": "1"},
                )
                await response(scope, receive, send_observed)
            elif declared is not None and declared > limit:
                response = error_response(413, "too_large", f"request body of {declared} bytes exceeds {limit} bytes")
                await response(scope, receive, send_observed)
            elif scope["method"] == "POST" and not scope["query_string"] and scope["path"] in self.fast_routes:
                await self.fast_routes[scope["path"]](scope, receive_limited, send_observed)
            else:
                await self.app(scope, receive_limited, send_observed)
        finally:
            self.in_flight -= limited
            metrics.in_flight.dec()
            # Requests refused before routing have no route: they are counted under "edge".
            route = "edge" if refused_at_edge else getattr(scope.get("route"), "path", "unmatched")
            if reason is None and status >= 500:
                reason = "internal"
            metrics.request_done(route, status, time.perf_counter() - started, reason)


def _content_length(scope: Scope) -> int | None:
    for key, value in scope["headers"]:
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def create_app(settings: Settings, runtime: ModelRuntime | None = None, remote: RemoteEngine | None = None) -> FastAPI:
    """The application. In one process it runs the engine too: ``runtime`` is the loaded model
    when the caller loaded it already (``dyce-serve`` does, to report artefact problems before
    the server starts). An HTTP worker process passes ``remote``, its channel to the engine."""
    observed = Metrics()  # this process's: in one process the engine's and the edge's alike
    observed.edge_started()
    engine: Engine | RemoteEngine = remote if remote is not None else Engine(settings, runtime, observed)
    gateway = Gateway(settings, engine, observed)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if isinstance(engine, RemoteEngine):
            await engine.connect()
            try:
                yield
            finally:
                await engine.close()
                gateway.close()
            return
        await engine.load()  # artefact problems stop start-up here, with the reason
        warm = engine.start_warm_up()
        try:
            yield
        finally:
            warm.cancel()
            await asyncio.gather(warm, return_exceptions=True)
            await engine.stop()
            gateway.close()

    app = FastAPI(
        title="DyCE Serve",
        version="0.1.0",
        summary="Early-exit image classification with run-time accuracy/compute tiers",
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    app.state.engine = engine
    install_error_handlers(app)

    @app.exception_handler(Exception)
    async def _internal(_: Request, err: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=err)
        return error_response(500, "internal", "internal server error")

    # The OpenAPI document lists each router's refusals with their real body (schemathesis checks it).
    for module in (classify, v2, admin, metrics):
        app.include_router(module.router, responses=ROUTER_ERRORS.get(module.router.prefix))
    app.add_middleware(ObserveRequests, gateway=gateway, fast_routes=_fast_routes(app, gateway))
    _document_settings(app, settings)
    return app


def _fast_routes(app: FastAPI, gateway: Gateway) -> dict[str, FastRoute]:
    """The request paths of the hot routes, each with its route and its answer."""
    # The routers' own APIRoute objects: what FastAPI puts in scope["route"] for these paths.
    routes = {r.path: r for module in (classify, v2) for r in module.router.routes if isinstance(r, APIRoute)}
    # What Starlette's ExceptionMiddleware handles; Exception itself is ServerErrorMiddleware's.
    handlers = {key: h for key, h in app.exception_handlers.items() if isinstance(key, type) and key is not Exception}
    model = gateway.settings.model_name

    def route(path: str, answer: Callable[[Request], Awaitable[Response]]) -> FastRoute:
        return FastRoute(routes[path], answer, handlers)

    return {
        "/v1/classify": route("/v1/classify", lambda r: classify.classify_one(r, gateway, classify.ClassifyQuery())),
        "/v1/classify/batch": route(
            "/v1/classify/batch", lambda r: classify.classify_many(r, gateway, classify.ClassifyQuery())
        ),
        f"/v2/models/{model}/infer": route("/v2/models/{name}/infer", lambda r: v2.infer(r, gateway, model)),
        f"/v2/models/{model}/versions/{v2.VERSION}/infer": route(
            "/v2/models/{name}/versions/{version}/infer", lambda r: v2.infer(r, gateway, model, v2.VERSION)
        ),
    }


def _document_settings(app: FastAPI, settings: Settings) -> None:
    """Limits that are settings, not constants, written into the OpenAPI document as generated."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = generate()
            body = schema["paths"]["/v1/classify/batch"]["post"]["requestBody"]["content"]["multipart/form-data"]
            body["schema"]["properties"]["files"]["maxItems"] = settings.max_batch_size
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
