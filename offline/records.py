"""Step `record`: what every candidate exit and the final head say about every sample of the
search and test splits, plus the MAC table; the only input of the configuration search.

File format (documented, versioned):

``records.json`` (RecordsManifest): format version, backbone identity (name, weights hash),
every exit's identity (position, index k, kind, weights hash), every saver's identity,
``num_candidates`` K_n, the MAC table (absolute MACs; S_n and Delta_{n,k} follow by dividing by
its total), the split sizes. With savers, position 0 is the saver stage (``dyce.savers``) and
backbone position n is position n + 1 of the arrays, of ``num_candidates`` and of the MAC table.

``records.npz``, per split ``s`` in (search, test), arrays over (position n, candidate k-1,
sample m), padded where K_n < max K (confidence NaN, prediction -1, correct False); the final
head is candidate 1 of the last position:

* ``s_confidence`` float32: max softmax probability (``dyce.rule.confidence_and_prediction``);
* ``s_prediction`` int32: the arg-max class;
* ``s_correct`` bool: prediction == label;
* ``s_labels`` int64 (M,).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from dyce.artifacts import ArtifactLayout, load_model
from dyce.backbones import SegmentedModel
from dyce.bank import BackboneIdentity, ExitIdentity
from dyce.exits import ExitSet
from dyce.macs import MacTable, measure_macs
from dyce.numerics import resolve_device
from dyce.rule import confidence_and_prediction, probabilities
from dyce.simulate import ExitRecords

from .data import load_split
from .features import backbone_pass
from .layout import OfflineLayout
from .provenance import current_inputs, write_step_manifest

RECORDED_SPLITS = ("search", "test")


class RecordsManifest(BaseModel):
    model_config = ConfigDict(frozen=True)

    format_version: Literal[1] = 1
    backbone: BackboneIdentity
    exits: tuple[ExitIdentity, ...]
    num_candidates: tuple[int, ...]
    macs: MacTable
    sizes: dict[str, int]
    savers: tuple[ExitIdentity, ...] = ()


def record_split(backbone: SegmentedModel, exits: ExitSet, dataset) -> dict[str, np.ndarray]:
    """Run the backbone once over ``dataset`` and every exit on the real segment outputs."""
    n_pos, k_max = backbone.num_positions, max(exits.num_candidates)
    parts: dict[str, list[np.ndarray]] = {"confidence": [], "prediction": [], "labels": []}

    def keep(outputs: list[torch.Tensor], logits: torch.Tensor, labels: torch.Tensor) -> None:
        m = len(labels)
        confidence = np.full((n_pos, k_max, m), np.nan, dtype=np.float32)
        prediction = np.full((n_pos, k_max, m), -1, dtype=np.int32)
        heads = [(s.position, s.index, exits.exit(s.position, s.index)(outputs[s.position])) for s in exits.all_specs()]
        heads.append((n_pos - 1, 1, logits))
        for n, k, exit_logits in heads:
            conf, pred = confidence_and_prediction(probabilities(exit_logits))
            confidence[n, k - 1], prediction[n, k - 1] = conf.cpu().numpy(), pred.cpu().numpy()
        parts["confidence"].append(confidence)
        parts["prediction"].append(prediction)
        parts["labels"].append(labels.cpu().numpy())

    backbone_pass(backbone, dataset, keep, desc="recording exits")
    labels = np.concatenate(parts["labels"])
    prediction = np.concatenate(parts["prediction"], axis=2)
    return {
        "confidence": np.concatenate(parts["confidence"], axis=2),
        "prediction": prediction,
        "correct": prediction == labels[None, None, :],
        "labels": labels.astype(np.int64),
    }


def record(layout: OfflineLayout, device: str | None = None, savers: bool | None = None) -> RecordsManifest:
    """Records in fp32 whatever the device (the service's numerics: the search must see what it
    will serve); the MAC table is measured on the CPU copy. ``savers``: put the saver stage in
    front (None: when ``train-saver`` made savers)."""
    inputs = current_inputs(layout, ("splits", "backbone", "exits", "savers"))
    model = load_model(layout, savers)
    backbone, exits, backbone_manifest = model.backbone, model.exits, model.backbone_manifest
    device = resolve_device(device)
    backbone.to(device, memory_format=torch.channels_last)
    exits.to(device)
    arrays, sizes = {}, {}
    for split in RECORDED_SPLITS:
        dataset = load_split(layout, split, backbone_manifest.preprocess)
        for name, value in record_split(backbone, exits, dataset).items():
            arrays[f"{split}_{name}"] = value
        sizes[split] = len(arrays[f"{split}_labels"])
    backbone.to("cpu", memory_format=torch.contiguous_format)
    exits.to("cpu")
    manifest = RecordsManifest(
        backbone=backbone_manifest.identity,
        exits=tuple(model.exit_manifest.identities()),
        num_candidates=tuple(exits.num_candidates),
        macs=measure_macs(backbone, exits),
        sizes=sizes,
        savers=tuple(model.saver_identities()),
    )
    np.savez_compressed(layout.records, **arrays)
    layout.records_manifest.write_text(manifest.model_dump_json(indent=1))
    write_step_manifest(layout, "record", "record", record_recipe(model.saver_stage), inputs)
    return manifest


def load_records(layout: OfflineLayout | ArtifactLayout) -> tuple[RecordsManifest, dict[str, ExitRecords]]:
    """The manifest and one ``dyce.simulate.ExitRecords`` per recorded split."""
    root = OfflineLayout(layout.root)
    manifest = RecordsManifest.model_validate_json(root.records_manifest.read_text())
    with np.load(root.records) as data:
        records = {
            split: ExitRecords(
                confidence=data[f"{split}_confidence"],
                correct=data[f"{split}_correct"],
                num_candidates=manifest.num_candidates,
            )
            for split in manifest.sizes
        }
    return manifest, records


def record_recipe(savers: bool) -> dict:
    # Without savers the recipe stays {}, so records made before savers existed are not stale.
    return {"savers": True} if savers else {}
