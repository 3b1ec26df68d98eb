"""Pydantic schemas of the service's own JSON APIs (v1 and admin)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.json_schema import SkipJsonSchema

if TYPE_CHECKING:
    from .engine.api import Answer, TierSummary
    from .engine.tiers import ActiveTier, Tier


class TierInfo(BaseModel):
    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)

    bank_index: int
    lam: float = Field(alias="lambda")
    config_id: str
    expected_accuracy: float
    expected_relative_macs: float

    @classmethod
    def of(cls, tier: Tier | TierSummary) -> TierInfo:
        return cls(
            bank_index=tier.index,
            lam=tier.lam,
            config_id=tier.config_id,
            expected_accuracy=tier.expected_accuracy,
            expected_relative_macs=tier.expected_relative_macs,
        )


class Timings(BaseModel):
    queue_ms: float
    inference_ms: float
    total_ms: float


class Prediction(BaseModel):
    label: str
    class_index: int
    probability: float


class ImageResult(BaseModel):
    predictions: list[Prediction] = Field(description="top-k, most probable first")
    exit_position: int = Field(
        description="0-based backbone segment after which the image left; -1: a saver answered, the backbone never ran"
    )
    relative_macs: float = Field(description="MACs this image cost, relative to the plain backbone")


class Classification(ImageResult):
    model_config = ConfigDict(serialize_by_alias=True)

    num_positions: int
    tier: TierInfo
    tier_source: str = Field(description="'request' when the client chose the tier, else 'active'")
    batch_size: int = Field(description="images in the executor call this request rode in")
    timings: Timings


class BatchClassification(BaseModel):
    model_config = ConfigDict(serialize_by_alias=True)

    results: list[ImageResult]
    num_positions: int
    tier: TierInfo
    tier_source: str
    batch_size: int
    timings: Timings


def image_results(result: Answer, labels: tuple[str, ...], top_k: int) -> list[ImageResult]:
    k = min(top_k, result.probabilities.shape[1])
    probs, classes = torch.topk(result.probabilities, k, dim=1)
    return [
        ImageResult(
            predictions=[
                Prediction(label=labels[c], class_index=c, probability=p)
                for p, c in zip(probs[row].tolist(), classes[row].tolist(), strict=True)
            ],
            exit_position=int(result.exit_positions[row]),
            relative_macs=float(np.float64(result.relative_macs[row])),
        )
        for row in range(probs.shape[0])
    ]


class BankEntryInfo(TierInfo):
    algorithm: str
    dominated: bool
    active: bool
    exits: tuple[int, ...]
    thresholds: tuple[float, ...]
    test_accuracy: float | None
    test_relative_macs: float | None
    expected_relative_latency: float | None = Field(None, description="latency banks: relative measured time")
    expected_saver_share: float | None = Field(
        None, description="banks with savers: share of images a saver answers (search split)"
    )


class CostInfo(BaseModel):
    """What the bank's search traded accuracy against, and whether that holds on this server."""

    kind: str = Field(description="macs (exact anywhere) or latency (measured where `where` says)")
    where: dict[str, str | bool | int | None] | None = None  # None: not recorded by an older profile
    batch: int | None = None
    profiled_elsewhere: list[str] = Field(
        default_factory=list, description="how the profiled set-up differs from this server's"
    )


class SaverInfo(BaseModel):
    index: int = Field(description="its k at position 0 of the configurations")
    kind: str
    relative_macs: float


class BankInfo(BaseModel):
    model_config = ConfigDict(serialize_by_alias=True)

    backbone: str
    num_positions: int = Field(description="positions of every configuration: the saver stage (if any) counts")
    savers: list[SaverInfo] = Field(
        default_factory=list, description="with any, exits[0] of an entry is the saver it uses (0: none)"
    )
    original_accuracy: dict[str, float]
    cost: CostInfo
    entries: list[BankEntryInfo]


class ActiveInfo(BaseModel):
    model_config = ConfigDict(serialize_by_alias=True)

    tier: TierInfo
    mode: str
    reason: str
    since_unix: float
    exits: tuple[int, ...]
    thresholds: tuple[float, ...]

    @classmethod
    def of(cls, active: ActiveTier) -> ActiveInfo:
        return cls(
            tier=TierInfo.of(active.tier),
            mode=active.mode,
            reason=active.reason,
            since_unix=active.since_unix,
            exits=active.tier.config.exits,
            thresholds=active.tier.config.thresholds,
        )


class SwitchRequest(BaseModel):
    """Exactly one selector: a lambda, a bank index, a MAC budget or an accuracy floor."""

    # What the documented schema says, the handler checks: one selector, a JSON number.
    model_config = ConfigDict(
        extra="forbid", populate_by_name=True, json_schema_extra={"minProperties": 1, "maxProperties": 1}
    )

    lam: Annotated[float, Field(ge=0, le=1)] | SkipJsonSchema[None] = Field(None, alias="lambda")
    index: Annotated[int, Field(ge=0)] | SkipJsonSchema[None] = None
    max_relative_macs: Annotated[float, Field(gt=0)] | SkipJsonSchema[None] = None
    min_accuracy: Annotated[float, Field(ge=0, le=1)] | SkipJsonSchema[None] = None

    @field_validator("lam", "index", "max_relative_macs", "min_accuracy", mode="before")
    @classmethod
    def _a_number(cls, value: object) -> object:
        # Only an explicit null gets here (defaults are not validated); pydantic alone would take
        # null as "not given", and "0.5" or true as numbers.
        if value is None or isinstance(value, str | bool):
            raise ValueError("a selector is a JSON number; leave the others out")
        return value


class ModeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: str = Field(pattern="^(auto|manual)$")


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(
        None,
        min_length=1,
        max_length=255,
        pattern=r"^[^\x00]+$",
        description="bank file inside the artefact directory; default bank.json",
    )
