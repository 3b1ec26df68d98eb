"""The batcher's inference thread goes from one step to the next without waiting for the event
loop, and still answers every step as it ends. Real pipeline and demo backbone; the reference is
the plain model."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import torch

from dyce.config import ExitConfiguration
from dyce.executor import EarlyExitExecutor
from dyce.pipeline import EarlyExitPipeline
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
