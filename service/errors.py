"""One error shape for every route: ``{"error": message, "code": reason}``.

``error`` is a plain string because that is what the Open Inference Protocol specifies (and
what ``tritonclient`` reads); ``code`` is the bounded reason that the rejection metric counts.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


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


def error_response(status_code: int, reason: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    response = JSONResponse({"error": message, "code": reason}, status_code=status_code, headers=headers)
    # The metrics middleware reads the reason from here instead of parsing the body again.
    response.headers["x-error-code"] = reason
    return response


_STATUS_REASONS = {404: "not_found", 405: "method_not_allowed", 413: "too_large", 415: "unsupported_media_type"}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, err: ServiceError) -> JSONResponse:
        return error_response(err.status_code, err.reason, err.message, err.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in err.errors()
        )
        return error_response(422, "invalid", f"invalid request: {problems}")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        reason = _STATUS_REASONS.get(err.status_code, "bad_request" if err.status_code < 500 else "internal")
        return error_response(err.status_code, reason, str(err.detail), dict(err.headers or {}))
