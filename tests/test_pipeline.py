import numpy as np
import pytest
import torch

from dyce.executor import EarlyExitExecutor
from dyce.pipeline import EarlyExitPipeline
from tests.core_helpers import demo_parts, quantile_config, records_for


@pytest.fixture(scope="module")
def setup():
    backbone, exits, macs = demo_parts()
    torch.manual_seed(3)
    images = torch.randn(96, 1, 28, 28)
    with torch.no_grad():
        labels = backbone(images).argmax(1)
    records = records_for(backbone, exits, images, labels)
    early = quantile_config(records, {0: (1, 0.4), 3: (2, 0.5)})
    late = quantile_config(records, {5: (1, 0.7)})
    return EarlyExitExecutor(backbone, exits, macs), images, early, late


def collect(outputs, count, num_classes=10):
    positions = torch.full((count,), -1)
    probs = torch.zeros(count, num_classes)
    costs = np.zeros(count)
    configs = [None] * count
    for out in outputs:
        positions[out.tags] = out.position
        probs[out.tags] = out.probabilities
        costs[out.tags] = out.relative_macs
        for tag in out.tags:
            configs[tag] = out.config
    return positions, probs, costs, configs


def test_pipeline_gives_every_sample_the_answer_of_the_plain_executor(setup):
    executor, images, early, _ = setup
    executor.set_config(early)
    reference = executor.run(images)
    pipeline = EarlyExitPipeline(executor, batch_size=16)
    batches = [(images[i : i + 10], list(range(i, min(i + 10, 96)))) for i in range(0, 96, 10)]
    positions, probs, costs, _ = collect(pipeline.run(batches), 96)
    assert torch.equal(positions, reference.exit_positions)
    torch.testing.assert_close(probs, reference.probabilities, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(costs, reference.relative_macs)
    assert pipeline.waiting() == 0


def test_segments_run_on_full_batches_until_the_final_flush(setup):
    executor, images, early, _ = setup
    executor.set_config(early)
    sizes = {n: [] for n in range(executor.num_positions)}
    hooks = [
        seg.register_forward_hook(lambda m, inp, out, n=n: sizes[n].append(inp[0].shape[0]))
        for n, seg in enumerate(executor.backend.segments)  # the modules that run (rewritten)
    ]
    try:
        list(
            EarlyExitPipeline(executor, batch_size=16).run(
                [(images[i : i + 16], list(range(i, i + 16))) for i in range(0, 96, 16)]
            )
        )
    finally:
        for hook in hooks:
            hook.remove()
    for n, calls in sizes.items():
        assert all(size <= 16 for size in calls)
        # Partial batches only happen when the input is exhausted: at most one per position.
        assert sum(size < 16 for size in calls) <= 1, (n, calls)
    assert sum(sizes[0]) == 96


def test_samples_keep_the_configuration_they_were_admitted_with(setup):
    executor, images, early, late = setup
    pipeline = EarlyExitPipeline(executor, batch_size=8)
    pipeline.push(images[:48], list(range(48)), early)
    pipeline.push(images[48:], list(range(48, 96)), late)
    outputs = []
    while pipeline.waiting():
        outputs += pipeline.step(flush=True)
    positions, probs, _, configs = collect(outputs, 96)
    assert configs[:48] == [early] * 48 and configs[48:] == [late] * 48
    assert torch.equal(positions[:48], executor.run(images[:48], early).exit_positions)
    assert torch.equal(positions[48:], executor.run(images[48:], late).exit_positions)


def test_step_without_flush_waits_for_a_full_batch(setup):
    executor, images, early, _ = setup
    pipeline = EarlyExitPipeline(executor, batch_size=32)
    pipeline.push(images[:5], list(range(5)), early)
    assert pipeline.step() == []
    assert pipeline.waiting() == 5
    with pytest.raises(ValueError):
        pipeline.push(images[:2], [0], early)
