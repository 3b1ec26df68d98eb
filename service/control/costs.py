"""What a tier costs: a pipeline step that completes ``b`` images takes ``overhead + b * per_image``.

``overhead`` (Python, dispatch, partial batches) is shared by all tiers. ``per_image`` starts from
the plain model's cost, measured at start-up through the serving pipeline, times the tier's
expected relative cost (see ``CostModel.calibrate``), and then follows live steps with an
exponentially weighted moving average, so it tracks the real input mix and a busier CPU.
Capacity = images per second at full batches.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from dyce.config import ExitConfiguration
from dyce.pipeline import EarlyExitPipeline

from ..engine.batcher import BatchReport
from ..engine.model import ModelRuntime
from ..engine.tiers import Tier

log = logging.getLogger("dyce.service.autoswitch")

EWMA_ALPHA = 0.2
GUARD_PENALTY = 1.25  # a tier whose requests missed the SLO is trusted this much less


@dataclass
class CostEstimate:
    per_image_s: float
    samples: int = 0


class CostModel:
    def __init__(self, overhead_s: float, per_image: dict[ExitConfiguration, float]) -> None:
        self.overhead_s = overhead_s
        self.estimates = {config: CostEstimate(cost) for config, cost in per_image.items()}

    @classmethod
    def calibrate(cls, runtime: ModelRuntime, tiers: list[Tier], batch: int, rounds: int) -> CostModel:
        """Time the plain model (final head only: the same work for any input) through the
        serving pipeline, median of ``rounds``: one image alone gives the fixed cost, ``4 * batch``
        images the cost per image. Each tier starts at that cost times its expected relative MACs.

        Timing each tier on synthetic inputs would be wrong the other way: noise is not confident,
        so nothing exits early and every tier would look as costly as the plain model. The bank's
        MACs come from real images; the online average then replaces this prior with what the
        tier really costs on the traffic it serves.
        """
        generator = torch.Generator().manual_seed(1)
        one = torch.randn(1, *runtime.input_shape, generator=generator)
        many = torch.randn(4 * batch, *runtime.input_shape, generator=generator)
        plain = ExitConfiguration.final_only(runtime.num_positions)

        def timed(images: torch.Tensor) -> float:
            times = []
            for _ in range(rounds):
                pipeline = EarlyExitPipeline(runtime.executor, batch)
                start = time.perf_counter()
                for chunk in images.split(batch):
                    pipeline.push(chunk, list(range(chunk.shape[0])), plain)
                    while pipeline.has_full_batch():
                        pipeline.step()
                while pipeline.waiting():
                    pipeline.step(flush=True)
                times.append(time.perf_counter() - start)
            # The minimum, not the median: a busy host only ever adds time, and a prior inflated
            # by noise would make every tier look unable to meet the SLO.
            return min(times)

        per_image_plain = timed(many) / many.shape[0]
        overhead = max(timed(one) - per_image_plain, 0.0)
        per_image = {tier.config: per_image_plain * tier.expected_relative_cost for tier in tiers}
        log.info("calibrated the plain model: %.3f ms/image, overhead %.3f ms", per_image_plain * 1e3, overhead * 1e3)
        for tier in tiers:
            log.info(
                "tier %d (lambda %.4g, %.3f relative cost): prior capacity %.0f images/s",
                tier.index, tier.lam, tier.expected_relative_cost,
                batch / (overhead + batch * per_image[tier.config]),
            )  # fmt: skip
        return cls(overhead, per_image)

    def per_image(self, config: ExitConfiguration) -> float:
        estimate = self.estimates.get(config)
        if estimate is None:  # a tier of a reloaded bank: assume the costliest known until measured
            return max(e.per_image_s for e in self.estimates.values())
        return estimate.per_image_s

    def capacity(self, config: ExitConfiguration, batch: int) -> float:
        """Images per second at full batches."""
        return batch / (self.overhead_s + batch * self.per_image(config))

    def steady_batch_time(self, config: ExitConfiguration, batch: int, rate: float) -> float:
        """Duration of the batches the batcher forms at ``rate`` images/s: while one batch of
        ``t`` seconds runs, ``rate * t`` images arrive and form the next, so ``t = a + c * rate * t``;
        at most a full batch."""
        load = rate * self.per_image(config)
        full = self.overhead_s + batch * self.per_image(config)
        return full if load >= 1 else min(self.overhead_s / (1 - load), full)

    def observe(self, report: BatchReport) -> None:
        """Follow a step whose images all ran under one configuration."""
        if report.completed < 2 or len(report.configs) != 1:
            return
        (config,) = report.configs
        observed = max(report.inference_s - self.overhead_s, 0.0) / report.completed
        estimate = self.estimates.setdefault(config, CostEstimate(observed))
        estimate.per_image_s += EWMA_ALPHA * (observed - estimate.per_image_s)
        estimate.samples += 1

    def penalise(self, config: ExitConfiguration) -> None:
        estimate = self.estimates.setdefault(config, CostEstimate(self.per_image(config)))
        estimate.per_image_s *= GUARD_PENALTY
