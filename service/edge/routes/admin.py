"""Operator routes, behind the bearer token: inspect the bank, switch tiers, pin, reload.

Each is one call into the engine, which applies it whole or not at all; across processes the
call travels to the engine's process, so a switch holds for every HTTP worker at once.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends

from ...schemas import ActiveInfo, BankInfo, ModeRequest, ReloadRequest, SwitchRequest
from ..deps import GatewayDep, require_admin

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)])


@router.get("/bank", response_model=BankInfo)
async def bank(gateway: GatewayDep) -> BankInfo:
    return await gateway.engine.bank_info()


@router.get("/active", response_model=ActiveInfo)
async def active(gateway: GatewayDep) -> ActiveInfo:
    return await gateway.engine.active_info()


@router.post("/active", response_model=ActiveInfo)
async def switch(body: SwitchRequest, gateway: GatewayDep) -> ActiveInfo:
    """Switch the active configuration and pin it (manual mode) until ``/admin/mode`` says auto."""
    return await gateway.engine.switch(body)


@router.post("/mode", response_model=ActiveInfo)
async def mode(body: ModeRequest, gateway: GatewayDep) -> ActiveInfo:
    """``manual`` pins the active configuration; ``auto`` hands it to the autoswitcher."""
    return await gateway.engine.set_mode(body)


@router.post("/bank/reload", response_model=ActiveInfo)
async def reload(gateway: GatewayDep, body: ReloadRequest | None = None) -> ActiveInfo:
    """Load a bank file; one that does not validate against the loaded model is refused whole."""
    return await gateway.engine.reload(body)
