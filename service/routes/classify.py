"""``/v1/classify``: encoded images in, top-k labels and what the answer cost out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect

from ..decode import check_media_type
from ..deps import ServiceDep
from ..errors import BadRequest, ServiceError
from ..schemas import BatchClassification, Classification, ImageResult, TierInfo, Timings, image_results
from ..serving import Served

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


ClassifyQueryDep = Annotated[ClassifyQuery, Depends()]


async def _serve(
    request: Request, response: Response, service: ServiceDep, query: ClassifyQuery, max_files: int
) -> tuple[Served, list[ImageResult], dict[str, Any]]:
    """Read, decode, queue and wait; returns the answer, per-image results and the shared fields."""
    arrived = request.state.arrived  # set by the edge middleware, before the body was read
    blobs = await _read_images(request, max_files=max_files)
    with service.admit(len(blobs), sum(map(len, blobs)), query.lam, query.max_relative_macs) as admission:
        images = await service.decode(blobs)
        served = await service.classify(request, images, admission, arrived)
    result = served.result
    timings = Timings(
        queue_ms=result.queue_s * 1e3, inference_ms=result.inference_s * 1e3, total_ms=served.total_s * 1e3
    )
    # Named like text-embeddings-inference's, in milliseconds.
    response.headers["x-queue-time"] = f"{timings.queue_ms:.3f}"
    response.headers["x-inference-time"] = f"{timings.inference_ms:.3f}"
    response.headers["x-total-time"] = f"{timings.total_ms:.3f}"
    response.headers["x-config-id"] = result.tier.config_id
    response.headers["x-lambda"] = f"{result.tier.lam:g}"
    shared = {
        "num_positions": service.runtime.backbone_positions,
        "tier": TierInfo.of(result.tier),
        "tier_source": "request" if served.requested else "active",
        "batch_size": result.batch_size,
        "timings": timings,
    }
    results = image_results(result, service.runtime.labels, query.top_k or service.settings.default_top_k)
    return served, results, shared


@router.post("/classify", response_model=Classification, openapi_extra=IMAGE_BODY)
async def classify(
    request: Request, response: Response, service: ServiceDep, query: ClassifyQueryDep
) -> Classification:
    """Classify one image (raw ``image/png|jpeg|webp`` body, or multipart ``file``)."""
    _, (result,), shared = await _serve(request, response, service, query, max_files=1)
    response.headers["x-exit-position"] = str(result.exit_position)
    return Classification(**result.model_dump(), **shared)


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
async def classify_batch(
    request: Request, response: Response, service: ServiceDep, query: ClassifyQueryDep
) -> BatchClassification:
    """Classify several images (multipart, one ``files`` part each); all run under one tier."""
    _, results, shared = await _serve(request, response, service, query, service.settings.max_batch_size)
    return BatchClassification(results=results, **shared)
