"""One error shape for every route: ``{"error": message, "code": reason}``.

``error`` is a plain string because that is what the Open Inference Protocol specifies (and
what ``tritonclient`` reads); ``code`` is the bounded reason that the rejection metric counts.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match


class ServiceError(Exception):
    status_code = 400
    reason = "bad_request"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadRequest(ServiceError):
    pass


class UnsupportedMediaType(ServiceError):
    status_code = 415
    reason = "unsupported_media_type"


class TooLarge(ServiceError):
    status_code = 413
    reason = "too_large"


class Unauthorized(ServiceError):
    status_code = 401
    reason = "unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(ServiceError):
    status_code = 403
    reason = "forbidden"


class NotFound(ServiceError):
    status_code = 404
    reason = "not_found"


class Conflict(ServiceError):
    status_code = 409
    reason = "conflict"


class Unprocessable(ServiceError):
    status_code = 422
    reason = "invalid"


class BodyTimeout(ServiceError):
    status_code = 408
    reason = "body_timeout"

    def __init__(self, message: str) -> None:
        # The rest of the body may still arrive: the connection cannot carry another request.
        super().__init__(message, headers={"Connection": "close"})


class QueueFull(ServiceError):
    status_code = 429
    reason = "queue_full"


class ClientGone(ServiceError):
    # nginx's convention for "client closed request"; nobody reads this answer, the metric does.
    status_code = 499
    reason = "client_disconnect"


class NotReady(ServiceError):
    status_code = 503
    reason = "not_ready"


class Timeout(ServiceError):
    status_code = 504
    reason = "timeout"


class ErrorBody(BaseModel):
    """The body of every refusal, as the OpenAPI document declares it."""

    error: str
    code: str


_ERROR_DESCRIPTIONS = {
    400: "malformed request or input",
    401: "no admin bearer token",
    403: "wrong admin token",
    404: "unknown model, version, bank entry or bank file",
    408: "the request body stopped arriving",
    413: "body or image past the size limits",
    415: "content type or image format not accepted",
    422: "invalid parameters or body, or no bank entry satisfies them",
    429: "queue full; retry after Retry-After seconds",
    503: "not ready yet, or overloaded",
    504: "no answer within the request timeout",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for a router: these statuses, each with the ``ErrorBody`` schema. A
    declared 422 also replaces FastAPI's default, whose schema is not what the handler answers."""
    return {status: {"model": ErrorBody, "description": _ERROR_DESCRIPTIONS[status]} for status in statuses}


# What the routes of each router (by prefix) answer besides 200; 408, 413 and 503 can come from
# the middleware on any route. /metrics is left out of the document.
ROUTER_ERRORS = {
    "/v1": error_responses(400, 408, 413, 415, 422, 429, 503, 504),
    "/v2": error_responses(400, 404, 408, 413, 415, 422, 429, 503, 504),
    "/admin": error_responses(400, 401, 403, 404, 408, 413, 422, 503),
}


def error_response(status_code: int, reason: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    response = JSONResponse({"error": message, "code": reason}, status_code=status_code, headers=headers)
    # The metrics middleware reads the reason from here instead of parsing the body again.
    response.headers["x-error-code"] = reason
    return response


_STATUS_REASONS = {404: "not_found", 405: "method_not_allowed", 413: "too_large", 415: "unsupported_media_type"}


def rejection_reasons() -> tuple[str, ...]:
    """Every ``code`` a refusal that reaches the metrics can carry: the bounded label set."""
    reasons = {"overloaded", "internal", "not_live", *_STATUS_REASONS.values()}
    pending = [ServiceError]
    while pending:
        kind = pending.pop()
        reasons.add(kind.reason)
        pending += kind.__subclasses__()
    return tuple(sorted(reasons))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, err: ServiceError) -> JSONResponse:
        return error_response(err.status_code, err.reason, err.message, err.headers)

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(_: Request, __: ClientDisconnect) -> JSONResponse:
        # Nobody reads this answer; it is there so the metrics say 499, not 500, and nothing is logged.
        return error_response(ClientGone.status_code, ClientGone.reason, "client disconnected")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in err.errors()
        )
        return error_response(422, "invalid", f"invalid request: {problems}")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        reason = _STATUS_REASONS.get(err.status_code, "bad_request" if err.status_code < 500 else "internal")
        headers = dict(err.headers or {})
        if err.status_code == 405:
            # Starlette's Allow names the methods of the first route on the path only, and
            # /admin/active has a GET route and a POST route.
            headers["Allow"] = ", ".join(_allowed_methods(request))
        return error_response(err.status_code, reason, str(err.detail), headers)


def _allowed_methods(request: Request) -> list[str]:
    methods = []
    for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] == Match.FULL for route in request.app.router.routes):
            methods.append(method)
    return methods
