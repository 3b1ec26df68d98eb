from __future__ import annotations

from fastapi import APIRouter, Response

from ..deps import GatewayDep

router = APIRouter(tags=["metrics"])


@router.get("/metrics", include_in_schema=False)
async def metrics(gateway: GatewayDep) -> Response:
    return Response(gateway.metrics.exposition(), media_type=gateway.metrics.content_type)
