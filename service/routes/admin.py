"""Operator routes, behind the bearer token: inspect the bank, switch tiers, pin, reload."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends

from ..deps import ServiceDep, require_admin
from ..errors import BadRequest, Unprocessable
from ..runtime import Tier
from ..schemas import (
    ActiveInfo,
    BankEntryInfo,
    BankInfo,
    CostInfo,
    ModeRequest,
    ReloadRequest,
    SaverInfo,
    SwitchRequest,
    TierInfo,
)

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)])


@router.get("/bank", response_model=BankInfo)
async def bank(service: ServiceDep) -> BankInfo:
    _, state = service.require_ready()
    active = state.active.tier
    bank = active.bank
    entries = []
    for tier in (Tier(bank, i) for i in range(len(bank.entries))):
        entry = tier.entry
        entries.append(
            BankEntryInfo(
                **TierInfo.of(tier).model_dump(),
                algorithm=entry.algorithm,
                dominated=entry.dominated,
                active=tier.index == active.index,
                exits=entry.config.exits,
                thresholds=entry.config.thresholds,
                test_accuracy=entry.test.accuracy if entry.test else None,
                test_relative_macs=entry.test.relative_macs if entry.test else None,
                expected_relative_latency=entry.search.relative_latency,
                expected_saver_share=entry.search.exit_rates[0] if bank.saver_stage else None,
            )
        )
    runtime = service.runtime
    return BankInfo(
        backbone=bank.backbone.name,
        num_positions=bank.num_positions,
        savers=[
            SaverInfo(index=s.index, kind=s.kind, relative_macs=bank.macs.relative_exit(0, s.index))
            for s in bank.savers
        ],
        original_accuracy=bank.original_accuracy,
        cost=CostInfo(
            kind=bank.cost.kind,
            where=bank.cost.where.model_dump() if bank.cost.where else None,
            batch=bank.cost.batch,
            profiled_elsewhere=runtime.costed_elsewhere(bank),
        ),
        entries=entries,
    )


@router.get("/active", response_model=ActiveInfo)
async def active(service: ServiceDep) -> ActiveInfo:
    _, state = service.require_ready()
    return ActiveInfo.of(state.active)


@router.post("/active", response_model=ActiveInfo)
async def switch(body: SwitchRequest, service: ServiceDep) -> ActiveInfo:
    """Switch the active configuration and pin it (manual mode) until ``/admin/mode`` says auto."""
    _, state = service.require_ready()
    chosen = {k: v for k, v in body.model_dump().items() if v is not None}
    if len(chosen) != 1:
        raise BadRequest("give exactly one of: lambda, index, max_relative_macs, min_accuracy")
    bank = state.bank
    if body.lam is not None:
        index = bank.nearest_lambda(body.lam)
    elif body.index is not None:
        index = body.index
    elif body.max_relative_macs is not None:
        index = bank.within_macs(body.max_relative_macs)
    else:
        index = bank.reaching_accuracy(body.min_accuracy)
    if index is None:
        raise Unprocessable(f"no bank entry satisfies {chosen}")
    return ActiveInfo.of(state.switch(index, "admin", mode="manual"))


@router.post("/mode", response_model=ActiveInfo)
async def mode(body: ModeRequest, service: ServiceDep) -> ActiveInfo:
    """``manual`` pins the active configuration; ``auto`` hands it to the autoswitcher."""
    _, state = service.require_ready()
    return ActiveInfo.of(state.set_mode(body.mode))


@router.post("/bank/reload", response_model=ActiveInfo)
async def reload(service: ServiceDep, body: ReloadRequest | None = None) -> ActiveInfo:
    """Load a bank file; one that does not validate against the loaded model is refused whole."""
    runtime, state = service.require_ready()
    bank = await asyncio.to_thread(runtime.load_bank, body.path if body else None)
    return ActiveInfo.of(state.replace_bank(bank))
