"""Segment rewrites (dyce.segment_rewrites) against references that do not use them: a hand
computation, brute force over convolution geometries, and the plain torchvision model."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dyce.segment_rewrites as rewrites
from dyce.backbones import build_backbone
from dyce.execution_backends import TorchBackend
from dyce.savers import attach_savers, build_saver
from dyce.segment_rewrites import CroppedConv2d, crop_dead_taps, rewrite_segment
from tests.core_helpers import demo_parts


def test_a_3x3_convolution_on_a_1x1_map_becomes_its_centre_tap():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 5, 3, padding=1)
    block = nn.Sequential(conv)
    x = torch.randn(4, 8, 1, 1)

    assert crop_dead_taps(block, x) == 1

    cropped = block[0]
    assert isinstance(cropped, CroppedConv2d)
    assert cropped.cropped.kernel_size == (1, 1) and cropped.cropped.padding == (0, 0)
    # By hand: only the centre tap meets the one real pixel, so the convolution is a matrix product.
    by_hand = x.flatten(1) @ conv.weight[:, :, 1, 1].T + conv.bias
    with torch.no_grad():
        torch.testing.assert_close(block(x).flatten(1), by_hand, rtol=1e-5, atol=1e-6)


def test_a_strided_3x3_convolution_on_a_2x2_map_keeps_the_four_taps_that_meet_pixels():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False)
    block = nn.Sequential(conv)
    x = torch.randn(2, 3, 2, 2)

    assert crop_dead_taps(block, x) == 1

    assert block[0].cropped.kernel_size == (2, 2)
    # The one output pixel reads input (0..1, 0..1) through taps (1..2, 1..2).
    by_hand = torch.einsum("bchw,ochw->bo", x, conv.weight[:, :, 1:3, 1:3])
    with torch.no_grad():
        torch.testing.assert_close(block(x)[:, :, 0, 0], by_hand, rtol=1e-5, atol=1e-6)


def _has_output(kernel, stride, padding, dilation, size) -> bool:
    return all(n + 2 * p - d * (k - 1) - 1 >= 0 for k, p, d, n in zip(kernel, padding, dilation, size, strict=True))


SQUARE = [
    ((k, k), (s, s), (p, p), (d, d), (n, n), 1)
    for k, s, p, d, n in itertools.product((1, 2, 3, 5), (1, 2, 3), (0, 1, 2, 3), (1, 2), (1, 2, 3, 5))
]
# Rows and columns differ (a swapped-dimension bug shows), and grouped and depthwise convolutions.
UNEVEN = [
    ((1, 3), (1, 1), (0, 1), (1, 1), (5, 1), 1),
    ((3, 1), (2, 1), (1, 0), (1, 1), (2, 4), 1),
    ((3, 5), (1, 2), (1, 2), (1, 1), (1, 3), 1),
    ((5, 3), (2, 1), (2, 1), (1, 2), (2, 3), 1),
    ((3, 3), (1, 2), (1, 1), (1, 1), (1, 4), 2),
    ((5, 5), (1, 1), (2, 2), (1, 1), (2, 3), 4),
    ((3, 5), (2, 2), (1, 2), (1, 1), (2, 2), 4),
]
GEOMETRIES = [g for g in SQUARE + UNEVEN if _has_output(*g[:5])]


@pytest.mark.parametrize(("kernel", "stride", "padding", "dilation", "size", "groups"), GEOMETRIES)
def test_cropping_keeps_exactly_the_taps_whose_weights_change_the_output(
    kernel, stride, padding, dilation, size, groups
):
    """Brute force: a tap is live when changing its weight changes some output. Where the live
    taps span less than the kernel and a convolution with symmetric padding can run that span
    alone (tried here with torch's own conv2d), the kernel must be cropped to exactly that span;
    elsewhere it stays whole. Either way the answer is the full convolution's."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, kernel, stride, padding, dilation, groups).eval()
    x = torch.randn(2, 4, *size)
    with torch.no_grad():
        reference = conv(x)
        live = torch.zeros(kernel, dtype=torch.bool)
        for i, j in itertools.product(range(kernel[0]), range(kernel[1])):
            weight = conv.weight.clone()
            weight[:, :, i, j] += 1.0
            live[i, j] = not torch.equal(F.conv2d(x, weight, conv.bias, stride, padding, dilation, groups), reference)
    rows, cols = live.any(1).nonzero().flatten().tolist(), live.any(0).nonzero().flatten().tolist()
    croppable = False
    if rows and (rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1) != kernel:
        span = conv.weight[:, :, rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        pads = (padding[0] - rows[0] * dilation[0], padding[1] - cols[0] * dilation[1])
        if min(pads) >= 0:
            with torch.no_grad():
                alone = F.conv2d(x, span, conv.bias, stride, pads, dilation, groups)
            croppable = alone.shape == reference.shape and torch.allclose(alone, reference, rtol=1e-5, atol=1e-5)
    block = nn.Sequential(conv)

    replaced = crop_dead_taps(block, x)

    assert replaced == croppable
    if replaced:
        assert block[0].cropped.kernel_size == (rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1)
    with torch.no_grad():
        torch.testing.assert_close(block(x), reference, rtol=1e-5, atol=1e-5)


def test_the_uneven_geometries_include_crops():
    """The hand-picked uneven cases exercise cropping itself, not only its refusal."""
    cropped = 0
    for kernel, stride, padding, dilation, size, groups in UNEVEN:
        block = nn.Sequential(nn.Conv2d(4, 4, kernel, stride, padding, dilation, groups))
        cropped += crop_dead_taps(block, torch.randn(1, 4, *size))
    assert cropped >= 5


def test_a_cropped_convolution_runs_the_full_kernel_on_any_other_size():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1)
    block = nn.Sequential(conv)
    crop_dead_taps(block, torch.randn(1, 4, 1, 1))
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(block(x), F.conv2d(x, conv.weight, conv.bias, padding=1))


def _random_norm_statistics(module: nn.Module) -> None:
    """Trained-looking batch-norm statistics, so folding them is not the identity."""
    generator = torch.Generator().manual_seed(1)
    for norm in module.modules():
        if isinstance(norm, nn.BatchNorm2d):
            norm.running_mean.copy_(torch.randn(norm.num_features, generator=generator) * 0.1)
            norm.running_var.copy_(torch.rand(norm.num_features, generator=generator) + 0.5)
            norm.weight.data.copy_(torch.rand(norm.num_features, generator=generator) + 0.5)
            norm.bias.data.copy_(torch.randn(norm.num_features, generator=generator) * 0.1)


@pytest.mark.parametrize(
    ("name", "size"),
    [("resnet18", 32), ("resnet50", 32), ("mobilenet_v3_small", 64), ("efficientnet_b0", 64), ("convnext_tiny", 64)],
)
def test_rewritten_segments_answer_as_the_plain_model(name, size):
    torch.manual_seed(0)
    backbone = build_backbone(name)
    _random_norm_statistics(backbone)
    channels = backbone.input_spec.channels
    images = torch.randn(3, channels, size, size)
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())

    folded = cropped = 0
    x = images[:1]
    rewritten = []
    for segment in backbone.segments:
        segment_rewritten, done = rewrite_segment(segment, x)
        rewritten.append(segment_rewritten)
        folded, cropped = folded + done.folded_norms, cropped + done.cropped_convs
        with torch.no_grad():
            x = segment(x)

    with torch.no_grad():
        expected = backbone.model(images)
        y = images
        for segment in rewritten:
            y = segment(y)
        torch.testing.assert_close(backbone.head(y), expected, rtol=1e-4, atol=1e-4)
    # Every batch norm of these families follows a convolution whose output nothing else reads.
    assert folded == norms
    if name.startswith("resnet"):
        assert cropped > 0  # the last stage runs on 1x1 maps at 32x32
    # The loaded model keeps its own modules.
    assert sum(isinstance(m, nn.BatchNorm2d) for m in backbone.modules()) == norms


def test_a_segment_torch_fx_cannot_trace_runs_unfolded_and_unchanged():
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.norm = nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.norm(self.conv(x))
            return y if bool(y.sum() > 0) else -y

    segment = DataDependent().eval()
    _random_norm_statistics(segment)
    x = torch.randn(2, 2, 4, 4)

    rewritten, done = rewrite_segment(segment, x)

    assert not done.traced and done.folded_norms == 0
    with torch.no_grad():
        torch.testing.assert_close(rewritten(x), segment(x))


def test_a_rewrite_that_changes_outputs_is_not_used(monkeypatch, caplog):
    """Fault injection: a tracer that silently computed something else must not reach serving."""
    segment = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2)).eval()
    monkeypatch.setattr(rewrites, "fuse", lambda module, inplace: nn.Sequential(module, nn.ReLU()))
    x = torch.randn(2, 2, 4, 4)

    rewritten, done = rewrite_segment(segment, x)

    assert (done.folded_norms, done.cropped_convs) == (0, 0)
    assert "changed its outputs" in caplog.text
    assert rewritten is segment  # the original modules run, no copy kept
    with torch.no_grad():
        torch.testing.assert_close(rewritten(x), segment(x))


def test_a_segment_in_training_mode_is_refused():
    # Folding uses the running statistics; in training mode batch norm would use the batch's.
    with pytest.raises(ValueError, match="eval mode"):
        rewrite_segment(nn.Sequential(nn.Conv2d(2, 2, 3), nn.BatchNorm2d(2)).train(), torch.randn(1, 2, 4, 4))


def test_the_backend_serves_the_demo_backbone_rewritten_with_the_plain_models_outputs():
    backbone, exits, _ = demo_parts()
    images = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        expected = backbone.model(images)

    backend = TorchBackend(backbone, exits, torch.device("cpu"))

    # 28x28 in: the last two blocks run on 2x2 and 1x1 maps, where 3x3 taps meet only padding.
    assert sum(r.folded_norms for r in backend.rewrites) == sum(
        isinstance(m, nn.BatchNorm2d) for m in backbone.modules()
    )
    assert sum(r.cropped_convs for r in backend.rewrites) == 4
    with torch.inference_mode():
        x = backend.prepare(images)
        for position in range(backbone.num_positions):
            x = backend.segment(position, x)
        torch.testing.assert_close(backend.head_logits(x), expected, rtol=1e-4, atol=1e-5)
    unrewritten = TorchBackend(backbone, exits, torch.device("cpu"), rewrite=False)
    assert unrewritten.rewrites == []
    assert all(a is b for a, b in zip(unrewritten.segments, backbone.segments, strict=True))


def test_the_backend_runs_a_savers_batch_norms_folded_and_leaves_pooled_mlp_exits_uncopied():
    backbone, exits, _ = demo_parts()
    torch.manual_seed(3)
    savers = [build_saver(kind, backbone.input_spec, backbone.num_classes) for kind in ("cnn_small", "cnn_wide")]
    for saver in savers:
        _random_norm_statistics(saver)
    staged, all_exits = attach_savers(backbone, exits, [s.eval() for s in savers], ["cnn_small", "cnn_wide"])
    images = torch.randn(8, 1, 28, 28)
    with torch.no_grad():  # the reference: the savers as trained, before any backend exists
        expected = [saver(images) for saver in savers]

    backend = TorchBackend(staged, all_exits, torch.device("cpu"))

    # Each strided CNN: three Conv-BN-ReLU blocks, every batch norm folded.
    assert {key: done.folded_norms for key, done in backend.exit_rewrites.items()} == {(0, 1): 3, (0, 2): 3}
    assert backend.rewritten
    for k, saver in enumerate(savers, start=1):
        assert backend.exit_modules[0][k - 1] is not saver
        assert not any(isinstance(m, nn.BatchNorm2d) for m in backend.exit_modules[0][k - 1].modules())
    with torch.inference_mode():
        x = backend.prepare(images)
        for k in (1, 2):
            torch.testing.assert_close(backend.exit_logits(0, k, x), expected[k - 1], rtol=1e-4, atol=1e-5)
    # Nothing to fold or crop in a pooled MLP: the loaded module runs, no copy of its weights.
    for spec in all_exits.all_specs():
        if spec.position > 0:
            assert backend.exit_modules[spec.position][spec.index - 1] is all_exits.exit(spec.position, spec.index)
    unrewritten = TorchBackend(staged, all_exits, torch.device("cpu"), rewrite=False)
    assert unrewritten.exit_rewrites == {}
    assert unrewritten.exit_modules[0] == list(all_exits.candidates[0])
