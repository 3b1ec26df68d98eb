"""The real-scale path on a tiny data set, on the CPU: an ImageFolder of real Fashion-MNIST
images written as JPEG folders, a torchvision ResNet-18 imported from a local weights file
(random initialisation saved by the test: nothing is downloaded), then train-exits, record,
search, build and the service answering a JPEG."""

from __future__ import annotations

import io
import json

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import models
from torchvision.transforms import v2
from typer.testing import CliRunner

from dyce.artifacts import load_bank_for
from offline.cli import app
from offline.data import read_idx
from offline.layout import OfflineLayout
from offline.records import load_records
from tests.conftest import FASHION_MNIST_DIR, FASHION_MNIST_LABELS, LiveServer, service_settings

TRAIN_PER_CLASS, TEST_PER_CLASS, SEARCH = 6, 3, 20
SIDE = 64  # upsampled from 28: real structure, small files; the backbone's transform crops to 224


def write_image_folder(root, part: str, images: np.ndarray, labels: np.ndarray, per_class: int) -> list[tuple]:
    """``root/part/<NN-label>/<i>.jpg``; returns (path, class index) in ImageFolder's order."""
    written = []
    for c, name in enumerate(FASHION_MNIST_LABELS):
        folder = root / part / f"{c:02d}-{name.replace('/', '-')}"
        folder.mkdir(parents=True)
        for i in np.flatnonzero(labels == c)[:per_class]:
            path = folder / f"{i:05d}.jpg"
            Image.fromarray(images[i]).resize((SIDE, SIDE), Image.BILINEAR).save(path, quality=90)
            written.append((path, c))
    return sorted(written, key=lambda pc: (pc[1], pc[0].name))


def invoke(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("imagefolder")
    data = tmp / "data"
    train_images = read_idx(FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz")[:2000]
    train_labels = read_idx(FASHION_MNIST_DIR / "train-labels-idx1-ubyte.gz")[:2000]
    test_images = read_idx(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz")[:1000]
    test_labels = read_idx(FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz")[:1000]
    write_image_folder(data, "train", train_images, train_labels, TRAIN_PER_CLASS)
    test_files = write_image_folder(data, "test", test_images, test_labels, TEST_PER_CLASS)
    torch.manual_seed(0)
    weights = tmp / "resnet18-random.pth"
    torch.save(models.resnet18(num_classes=len(FASHION_MNIST_LABELS)).state_dict(), weights)

    layout = OfflineLayout(tmp / "artifacts")
    root = ["--artifacts", str(layout.root)]
    invoke(*root, "data", "--source", "image-folder", "--path", str(data), "--search-size", str(SEARCH))
    invoke(*root, "import-backbone", "resnet18", "--weights", str(weights))
    invoke(*root, "train-exits", "--kinds", "mlp1", "--epochs", "2", "--device", "cpu")
    invoke(*root, "record", "--device", "cpu")
    invoke(*root, "search", "--algorithms", "single_pass,baseline", "--grid", "uniform")
    return layout, weights, test_files


def test_records_agree_with_plain_torchvision(imported):
    """The recorded final head is torchvision's resnet18 from the same file on the same JPEGs,
    with torchvision's own ImageNet transform (independent of the toolchain's data path)."""
    layout, weights, test_files = imported
    manifest, records = load_records(layout)
    assert manifest.backbone.name == "resnet18" and manifest.sizes == {
        "search": SEARCH,
        "test": TEST_PER_CLASS * len(FASHION_MNIST_LABELS),
    }
    model = models.resnet18(num_classes=len(FASHION_MNIST_LABELS))
    model.load_state_dict(torch.load(weights, weights_only=True))
    transform = v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize(256, antialias=True),
            v2.CenterCrop(224),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    images = torch.stack([transform(Image.open(path).convert("RGB")) for path, _ in test_files])
    with torch.no_grad():
        probs = torch.softmax(model.eval()(images), dim=1)
    with np.load(layout.records) as data:
        assert np.array_equal(data["test_labels"], [c for _, c in test_files])
        np.testing.assert_allclose(data["test_confidence"][-1, 0], probs.max(1).values.numpy(), rtol=1e-3, atol=1e-5)
    assert records["test"].original_accuracy == pytest.approx(
        float((probs.argmax(1).numpy() == np.array([c for _, c in test_files])).mean())
    )


def test_build_keeps_what_was_made_on_purpose_and_finishes(imported):
    """`build` after the hand-run steps: the ImageFolder splits, the imported backbone and the
    hand-run exits and search stay (their inputs did not change); only the missing report runs.
    (Without a saver: the build's default saver would be a new input of the records, rightly.)"""
    layout, _, _ = imported
    result = CliRunner().invoke(app, ["--artifacts", str(layout.root), "build", "--no-saver"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["ran"] == ["report"]
    assert "kept: made by `dyce-offline import-backbone`" in " ".join(result.output.split())  # unwrap rich
    bank = load_bank_for(layout)
    assert bank.backbone.name == "resnet18" and {e.algorithm for e in bank.entries} == {"single_pass", "baseline"}


def test_the_service_serves_the_imported_backbone(imported):
    layout, _, test_files = imported
    buffer = io.BytesIO()
    Image.open(test_files[0][0]).save(buffer, format="JPEG")
    # resnet18 at 224 on a busy 2-core CPU misses the default 100 ms objective: admit it anyway
    with LiveServer(service_settings(layout.root, autoswitch="manual", slo_p95_ms=60_000)) as server:
        response = httpx.post(
            f"{server.url}/v1/classify", content=buffer.getvalue(), headers={"content-type": "image/jpeg"}, timeout=60
        )
    assert response.status_code == 200, response.text
    body = response.json()
    classes = [f"{c:02d}-{n.replace('/', '-')}" for c, n in enumerate(FASHION_MNIST_LABELS)]
    assert body["num_positions"] == 8  # resnet18: one position per residual block
    assert all(p["label"] == classes[p["class_index"]] for p in body["predictions"])
