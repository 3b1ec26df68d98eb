"""``/v1/classify``: encoded images in, top-k labels and what the answer cost out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect

from ...errors import BadRequest, ServiceError
from ...schemas import BatchClassification, Classification, ImageResult, TierInfo, Timings, image_results
from ..decode import check_media_type
from ..deps import GatewayDep
from ..gateway import Gateway, Served

router = APIRouter(prefix="/v1", tags=["classify"])

TopK = Annotated[int | None, Query(ge=1, description="labels per image (default DYCE_DEFAULT_TOP_K)")]
Lambda = Annotated[float | None, Query(alias="lambda", ge=0, le=1, description="serve at the bank entry nearest")]
MacBudget = Annotated[
    float | None, Query(gt=0, description="serve at the most accurate entry within this relative MAC budget")
]

IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "image/png": {"schema": {"type": "string", "format": "binary", "minLength": 1}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary", "minLength": 1}},
            "image/webp": {"schema": {"type": "string", "format": "binary", "minLength": 1}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "additionalProperties": False,
                    "properties": {"file": {"type": "string", "format": "binary", "minLength": 1}},
                },
                "encoding": {"file": {"contentType": "image/png, image/jpeg, image/webp"}},
            },
        },
    }
}


async def _read_images(request: Request, max_files: int) -> list[bytes]:
    """Raw body (one image) or multipart parts named ``file``/``files``."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        try:
            form = await request.form(max_files=max_files, max_fields=max_files)
        except (ServiceError, ClientDisconnect):  # the body's own limits and a client gone: not malformed
            raise
        except Exception as err:  # python-multipart raises several types for malformed bodies
            raise BadRequest(f"malformed multipart body: {err}") from None
        parts = [p for key in ("file", "files") for p in form.getlist(key) if isinstance(p, UploadFile)]
        if not parts:
            raise BadRequest("multipart body has no `file` part")
        return [await part.read() for part in parts]
    check_media_type(content_type)
    return [await request.body()]


@dataclass
class ClassifyQuery:
    """Query parameters shared by both classify routes."""

    top_k: TopK = None
    lam: Lambda = None
    max_relative_macs: MacBudget = None


async def classify_query(top_k: TopK = None, lam: Lambda = None, max_relative_macs: MacBudget = None) -> ClassifyQuery:
    # A coroutine, not the dataclass itself as the dependency: FastAPI would build that in its
    # thread pool, a thread hop per request.
    return ClassifyQuery(top_k, lam, max_relative_macs)


ClassifyQueryDep = Annotated[ClassifyQuery, Depends(classify_query)]


async def _serve(
    request: Request, headers: dict[str, str], gateway: Gateway, query: ClassifyQuery, max_files: int
) -> tuple[Served, list[ImageResult], dict[str, Any]]:
    """Read, decode, queue and wait; returns the answer, per-image results and the shared fields."""
    arrived = request.state.arrived  # set by the edge middleware, before the body was read
    blobs = await _read_images(request, max_files=max_files)
    engine = gateway.engine
    with engine.admission(len(blobs), sum(map(len, blobs)), query.lam, query.max_relative_macs) as ticket:
        images = await gateway.decode(blobs)
        served = await gateway.classify(request, ticket, images, arrived)
    result = served.answer
    timings = Timings(
        queue_ms=result.queue_s * 1e3, inference_ms=result.inference_s * 1e3, total_ms=served.total_s * 1e3
    )
    # Named like text-embeddings-inference's, in milliseconds.
    headers["x-queue-time"] = f"{timings.queue_ms:.3f}"
    headers["x-inference-time"] = f"{timings.inference_ms:.3f}"
    headers["x-total-time"] = f"{timings.total_ms:.3f}"
    headers["x-config-id"] = result.tier.config_id
    headers["x-lambda"] = f"{result.tier.lam:g}"
    shared = {
        "num_positions": engine.info.backbone_positions,
        "tier": TierInfo.of(result.tier),
        "tier_source": "request" if result.requested else "active",
        "batch_size": result.batch_size,
        "timings": timings,
    }
    results = image_results(result, engine.info.labels, query.top_k or gateway.settings.default_top_k)
    return served, results, shared


def _json(answer: BaseModel, headers: dict[str, str]) -> Response:
    # Serialised once, by the model that was just built: returned as a Response, FastAPI does not
    # validate it against the response model again (the OpenAPI document still declares it).
    return Response(answer.model_dump_json(), media_type="application/json", headers=headers)


async def classify_one(request: Request, gateway: Gateway, query: ClassifyQuery) -> Response:
    """The answer of ``POST /v1/classify``, for its route and for the edge's fast path alike."""
    headers: dict[str, str] = {}
    _, (result,), shared = await _serve(request, headers, gateway, query, max_files=1)
    headers["x-exit-position"] = str(result.exit_position)
    return _json(Classification(**result.model_dump(), **shared), headers)


async def classify_many(request: Request, gateway: Gateway, query: ClassifyQuery) -> Response:
    """The answer of ``POST /v1/classify/batch``, for its route and for the edge's fast path alike."""
    headers: dict[str, str] = {}
    _, results, shared = await _serve(request, headers, gateway, query, gateway.settings.max_batch_size)
    return _json(BatchClassification(results=results, **shared), headers)


@router.post("/classify", response_model=Classification, openapi_extra=IMAGE_BODY)
async def classify(request: Request, gateway: GatewayDep, query: ClassifyQueryDep) -> Response:
    """Classify one image (raw ``image/png|jpeg|webp`` body, or multipart ``file``)."""
    return await classify_one(request, gateway, query)


BATCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["files"],
                    "additionalProperties": False,
                    "properties": {
                        "files": {
                            "type": "array",
                            "minItems": 1,
                            "description": "one part per image, at most DYCE_MAX_BATCH_SIZE",
                            "items": {"type": "string", "format": "binary", "minLength": 1},
                        }
                    },
                },
                "encoding": {"files": {"contentType": "image/png, image/jpeg, image/webp"}},
            },
        },
    }
}


@router.post("/classify/batch", response_model=BatchClassification, openapi_extra=BATCH_BODY)
async def classify_batch(request: Request, gateway: GatewayDep, query: ClassifyQueryDep) -> Response:
    """Classify several images (multipart, one ``files`` part each); all run under one tier."""
    return await classify_many(request, gateway, query)
