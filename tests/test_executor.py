import copy
import threading
import time

import numpy as np
import pytest
import torch
from torch import nn

from dyce.backbones._segmented import InputSpec, SegmentedModel
from dyce.config import ExitConfiguration
from dyce.execution_backends import TorchBackend
from dyce.executor import EarlyExitExecutor
from dyce.exits import ExitSet
from dyce.simulate import exit_positions, simulate
from tests.core_helpers import demo_parts, quantile_config, records_for

BATCH = 48


@pytest.fixture(scope="module")
def setup():
    backbone, exits, macs = demo_parts()
    torch.manual_seed(1)
    images = torch.randn(BATCH, 1, 28, 28)
    with torch.no_grad():
        labels = backbone(images).argmax(1)
    labels[::5] = (labels[::5] + 1) % 10  # some wrong answers, so accuracy is not trivially 1
    records = records_for(backbone, exits, images, labels)
    configs = {
        "spread": quantile_config(records, {0: (1, 0.8), 2: (2, 0.6), 5: (1, 0.5)}),
        "first": quantile_config(records, {1: (2, 0.3)}),
        "all_first": ExitConfiguration(exits=(1,) + (0,) * 6 + (1,), thresholds=(0.0,) + (1.0,) * 6 + (0.0,)),
        "final": ExitConfiguration.final_only(backbone.num_positions),
    }
    return EarlyExitExecutor(backbone, exits, macs), images, labels, records, configs


@pytest.mark.parametrize("name", ["spread", "first", "all_first", "final"])
def test_executor_equals_the_offline_simulation(setup, name):
    executor, images, labels, records, configs = setup
    config = configs[name]
    result = executor.run(images, config)
    assert result.config is config
    np.testing.assert_array_equal(result.exit_positions.numpy(), exit_positions(records, config))
    sim = simulate(records, config, executor.macs)
    assert result.relative_macs.mean() == pytest.approx(sim.relative_macs)
    correct = (result.probabilities.argmax(1) == labels).float().mean().item()
    assert correct == pytest.approx(sim.accuracy)


def test_spread_configuration_really_exits_at_several_positions(setup):
    executor, images, _, _, configs = setup
    positions = set(executor.run(images, configs["spread"]).exit_positions.tolist())
    assert {0, 2, 5, 7} <= positions


@pytest.mark.parametrize("name", ["spread", "first"])
def test_batched_result_equals_per_sample_result(setup, name):
    executor, images, _, _, configs = setup
    batched = executor.run(images, configs[name])
    for i in range(0, BATCH, 7):
        single = executor.run(images[i : i + 1], configs[name])
        assert single.exit_positions.item() == batched.exit_positions[i].item()
        torch.testing.assert_close(single.probabilities[0], batched.probabilities[i], rtol=1e-4, atol=1e-5)


def test_all_final_configuration_equals_the_plain_torchvision_model(setup):
    executor, images, _, _, configs = setup
    result = executor.run(images, configs["final"])
    with torch.no_grad():
        expected = torch.softmax(executor.backbone.model(images), dim=1)
    torch.testing.assert_close(result.probabilities, expected, rtol=1e-4, atol=1e-6)
    assert (result.exit_positions == executor.num_positions - 1).all()
    assert np.allclose(result.relative_macs, 1.0)


def test_exiting_everything_at_the_first_position_never_runs_later_segments(setup):
    executor, images, _, _, configs = setup
    calls = []
    hooks = [
        module.register_forward_hook(lambda *_, name=name: calls.append(name))
        # The modules that run: the backend's (rewritten) segments.
        for name, module in [(f"segment{n}", s) for n, s in enumerate(executor.backend.segments)]
        + [("head", executor.backbone.head)]
    ]
    try:
        result = executor.run(images, configs["all_first"])
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == ["segment0"]
    assert (result.exit_positions == 0).all()
    assert np.allclose(result.relative_macs, executor.macs.path_costs(configs["all_first"])[0])


def test_later_segments_only_see_the_samples_still_running(setup):
    executor, images, _, _, configs = setup
    seen = []
    hook = executor.backend.segments[3].register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[0]))
    try:
        result = executor.run(images, configs["spread"])
    finally:
        hook.remove()
    assert seen == [int((result.exit_positions >= 3).sum())]
    assert seen[0] < BATCH


def test_switching_while_batches_are_in_flight_gives_each_batch_one_configuration(setup):
    executor, images, _, records, configs = setup
    choices = [configs["spread"], configs["first"], configs["final"]]
    expected = {c: exit_positions(records, c) for c in choices}
    stop = threading.Event()

    def switcher():
        i = 0
        while not stop.is_set():
            executor.set_config(choices[i % len(choices)])
            i += 1

    thread = threading.Thread(target=switcher)
    thread.start()
    try:
        seen = set()
        for _ in range(12):
            result = executor.run(images)
            seen.add(result.config)
            np.testing.assert_array_equal(result.exit_positions.numpy(), expected[result.config])
    finally:
        stop.set()
        thread.join()
    assert seen <= set(choices)


def test_a_configuration_with_unknown_exits_is_refused(setup):
    executor = setup[0]
    bad = ExitConfiguration(exits=(5,) + (0,) * 6 + (1,), thresholds=(0.5,) + (1.0,) * 6 + (0.0,))
    with pytest.raises(ValueError, match="candidates"):
        executor.set_config(bad)
    assert executor.config != bad


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_matches_cpu(setup):
    executor, images, _, _, configs = setup
    backbone, exits, macs = demo_parts()
    on_gpu = EarlyExitExecutor(backbone, exits, macs, device="cuda")
    cpu = executor.run(images, configs["spread"])
    gpu = on_gpu.run(images, configs["spread"])
    torch.testing.assert_close(gpu.probabilities, cpu.probabilities, rtol=1e-3, atol=1e-4)


class SlowInOneLayout(nn.Module):
    """A convolution that takes 5 ms longer whenever its input arrives in ``slow_layout``: which
    layout is faster is known by construction, whatever this machine's kernels do."""

    def __init__(self, slow_layout: torch.memory_format) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.slow_layout = slow_layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_contiguous(memory_format=self.slow_layout):
            time.sleep(0.005)
        return self.conv(x)


def _two_segment_backend(segments: list[nn.Module]) -> tuple[TorchBackend, torch.Tensor, torch.Tensor]:
    """A backend over ``segments`` (4 channels in and out, 6x6 maps), a batch of 8 images, and
    what an untouched copy of the same model answers for them."""
    torch.manual_seed(0)
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    model = nn.Sequential(*segments, head)
    backbone = SegmentedModel("toy", model, segments, head, InputSpec(4, 6, 6), num_classes=3).eval()
    images = torch.randn(8, 4, 6, 6)
    with torch.no_grad():
        plain = copy.deepcopy(model)(images)
    exits = ExitSet.build([4, 4], 3, ("mlp1",)).eval()
    # Unrewritten: tracing would copy the segments (and bake in their sleeps), and these tests watch them.
    return TorchBackend(backbone, exits, torch.device("cpu"), channels_last=True, rewrite=False), images, plain


def test_each_segment_gets_the_layout_measured_faster_and_answers_do_not_change():
    backend, images, plain = _two_segment_backend(
        [SlowInOneLayout(torch.channels_last), SlowInOneLayout(torch.contiguous_format)]
    )

    tuned = backend.tune_segments(images, batch_sizes=[1, 8], repeats=2)

    assert [t.memory_format for t in tuned] == [torch.contiguous_format, torch.channels_last]
    with torch.inference_mode():
        x = backend.prepare(images)
        for position in range(2):
            x = backend.segment(position, x)
            assert x.is_contiguous(memory_format=tuned[position].memory_format)
        torch.testing.assert_close(backend.head_logits(x), plain, rtol=1e-5, atol=1e-6)


class SlowAboveOneRow(nn.Module):
    """A convolution that takes 5 ms longer on any call with more than one row; counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.rows_per_call: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rows_per_call.append(x.shape[0])
        if x.shape[0] > 1:
            time.sleep(0.005)
        return self.conv(x)


def test_a_segment_whose_batched_calls_cost_more_than_single_rows_runs_row_by_row():
    slow = SlowAboveOneRow()
    backend, images, plain = _two_segment_backend([nn.Conv2d(4, 4, 3, padding=1), slow])

    tuned = backend.tune_segments(images, batch_sizes=[1, 2, 8], repeats=2)

    # One row costs microseconds, any two rows 5 ms: at every timed size single rows are cheaper.
    assert tuned[1].singly_below == 9
    slow.rows_per_call.clear()
    with torch.inference_mode():
        x = backend.segment(1, backend.segment(0, backend.prepare(images)))
        torch.testing.assert_close(backend.head_logits(x), plain, rtol=1e-5, atol=1e-6)
    assert slow.rows_per_call == [1] * 8


def test_layouts_chosen_for_the_demo_backbone_keep_the_plain_models_outputs():
    backbone, exits, _ = demo_parts()
    plain = copy.deepcopy(backbone).eval()
    images = torch.randn(16, 1, 28, 28)
    backend = TorchBackend(backbone, exits, torch.device("cpu"))
    tuned = backend.tune_segments(images, batch_sizes=[1, 2, 16], repeats=1)
    assert len(tuned) == backbone.num_positions
    with torch.inference_mode():
        x = backend.prepare(images)
        for position in range(backbone.num_positions):
            x = backend.segment(position, x)
        torch.testing.assert_close(backend.head_logits(x), plain(images), rtol=1e-4, atol=1e-5)
