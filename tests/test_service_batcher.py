"""The batcher's inference thread goes from one step to the next without waiting for the event
loop, and still answers every step as it ends. Real pipeline and demo backbone; the reference is
the plain model."""

from __future__ import annotations

import asyncio
import random
import threading
from types import SimpleNamespace

import torch

from dyce.config import ExitConfiguration
from dyce.executor import EarlyExitExecutor
from dyce.pipeline import EarlyExitPipeline
from dyce.rule import probabilities
from service.engine.batcher import DynamicBatcher
from tests.core_helpers import demo_parts

WAIT_S = 10


def test_a_job_queued_during_a_step_runs_next_on_the_thread_while_the_first_is_answered():
    backbone, exits, macs = demo_parts()
    executor = EarlyExitExecutor(backbone, exits, macs)
    final_only = SimpleNamespace(config=ExitConfiguration.final_only(backbone.num_positions))
    torch.manual_seed(0)
    first_images, second_images = torch.randn(3, 1, 28, 28), torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        expected = [torch.softmax(backbone(images), dim=1) for images in (first_images, second_images)]

    first_step_running, second_job_queued, first_answered = threading.Event(), threading.Event(), threading.Event()
    answered_before_second_step_ended: list[bool] = []

    def on_segment_0(_module, args, _output):
        if args[0].shape[0] == 3:  # the first job's step: hold it until the second job is queued
            first_step_running.set()
            assert second_job_queued.wait(WAIT_S)
        else:  # the second job's step, on the same thread: the first job's answer is out already
            answered_before_second_step_ended.append(first_answered.wait(WAIT_S))

    hook = executor.backend.segments[0].register_forward_hook(on_segment_0)

    async def scenario() -> list[torch.Tensor]:
        loop = asyncio.get_running_loop()
        # Batches of 3: the first job is a full batch at every position, so its step answers it whole.
        batcher = DynamicBatcher(EarlyExitPipeline(executor, 3), max_delay_s=0, max_wait_s=1, capacity=8)
        hops = 0
        submit_to_pool = batcher._pool.submit

        def count_hops(*args, **kwargs):  # every step the loop hands to the inference thread
            nonlocal hops
            hops += 1
            return submit_to_pool(*args, **kwargs)

        batcher._pool.submit = count_hops
        batcher.start()
        try:
            first = batcher.submit(first_images, final_only, False, False, batcher.reserve(3, 0)).future
            first.add_done_callback(lambda _: first_answered.set())
            assert await loop.run_in_executor(None, first_step_running.wait, WAIT_S)
            second = batcher.submit(second_images, final_only, False, False, batcher.reserve(2, 0)).future
            second_job_queued.set()
            answers = await asyncio.wait_for(asyncio.gather(first, second), WAIT_S)
        finally:
            await batcher.stop()
        assert hops == 1  # the second step never went back through the loop
        return [answer.probabilities for answer in answers]

    try:
        got = asyncio.run(scenario())
    finally:
        hook.remove()
    assert answered_before_second_step_ended == [True]
    for answer, reference in zip(got, expected, strict=True):
        torch.testing.assert_close(answer, reference, rtol=1e-4, atol=1e-5)


def test_concurrent_jobs_of_two_tiers_with_cancellations_each_get_their_own_rows_as_if_run_alone():
    """Jobs of random sizes under two configurations arrive at random moments, some given up on
    while queued or running; every job still waiting gets exactly its images' answers, each as
    the executor gives it for that image alone, and nothing stays inside."""
    backbone, exits, macs = demo_parts()
    executor = EarlyExitExecutor(backbone, exits, macs)
    positions = backbone.num_positions
    torch.manual_seed(7)
    sample = torch.randn(64, 1, 28, 28)

    def configuration(plan: dict[int, int]) -> ExitConfiguration:
        """Candidate ``plan[n]`` at position n, its threshold at the median confidence there, so
        about half the images reaching each exit leave at it."""
        exits_on, thresholds, x = [0] * positions, [1.0] * positions, sample
        with torch.no_grad():
            for n in range(positions - 1):
                x = backbone.segments[n](x)
                if n in plan:
                    confidence = probabilities(exits.exit(n, plan[n])(x)).max(dim=1).values
                    exits_on[n], thresholds[n] = plan[n], float(confidence.median())
        exits_on[-1], thresholds[-1] = 1, 0.0
        return ExitConfiguration(exits=tuple(exits_on), thresholds=tuple(thresholds))

    early, late = configuration({0: 1, 1: 2, 2: 1}), configuration({3: 2, 4: 1})
    rng = random.Random(7)
    jobs = [
        (torch.randn(rng.randint(1, 5), 1, 28, 28), rng.choice((early, late)), rng.random() < 0.2) for _ in range(60)
    ]

    async def scenario() -> list:
        batcher = DynamicBatcher(EarlyExitPipeline(executor, 8), max_delay_s=0, max_wait_s=0.002, capacity=64)
        batcher.start()
        futures = []
        try:
            for images, config, give_up in jobs:
                size = images.shape[0]
                job = batcher.submit(images, SimpleNamespace(config=config), False, False, batcher.reserve(size, 0))
                futures.append(job.future)
                if give_up:
                    asyncio.get_running_loop().call_later(rng.random() * 0.01, job.future.cancel)
                await asyncio.sleep(rng.random() * 0.003)
            answers = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), WAIT_S)
            assert not batcher._inside and not batcher._queue and batcher.queued_images == 0
        finally:
            await batcher.stop()
        return answers

    answers = asyncio.run(scenario())
    answered = 0
    for (images, config, give_up), answer in zip(jobs, answers, strict=True):
        if isinstance(answer, asyncio.CancelledError):
            assert give_up
            continue
        answered += 1
        alone = executor.run(images, config)
        assert answer.exit_positions.tolist() == alone.exit_positions.tolist()
        torch.testing.assert_close(answer.probabilities, alone.probabilities, rtol=1e-4, atol=1e-5)
    assert answered >= 40
    exit_positions = {
        int(p) for answer in answers if not isinstance(answer, BaseException) for p in answer.exit_positions
    }
    assert len(exit_positions) >= 5  # the thresholds did send images out at several positions
