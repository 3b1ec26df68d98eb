"""The model, loaded once from the artefact directory: backbone, exits, savers, bank, executor."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from pydantic import ValidationError

from dyce.artifacts import ArtifactLayout, LoadedModel, load_backbone, load_bank_for, load_exits
from dyce.bank import Bank, BankMismatchError
from dyce.config import ExitConfiguration
from dyce.execution_backends import OnnxRuntimeBackend, TorchBackend
from dyce.executor import EarlyExitExecutor, ExecutionResult
from dyce.profile import Where, host_name

from ..errors import BadRequest, NotFound, Unprocessable
from ..settings import Settings

log = logging.getLogger("dyce.service")


class StartupError(Exception):
    """Why the server cannot start, and what fixes it: ``dyce-serve`` prints it as one line."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(f"{problem}; {fix}")


@contextlib.contextmanager
def _loading(what: str, fix: str) -> Iterator[None]:
    """Any failure while loading ``what`` (missing, corrupt, for other weights) -> StartupError."""
    try:
        yield
    except StartupError:
        raise
    except FileNotFoundError as err:
        raise StartupError(f"{what}: missing file {err.filename or err}", fix) from err
    except ValidationError as err:
        first = err.errors()[0]
        raise StartupError(f"{what}: not a valid artefact ({first['msg']} at {first['loc']})", fix) from err
    except Exception as err:  # corrupt safetensors, torch load errors, BankMismatchError, hash mismatches
        raise StartupError(f"{what}: {type(err).__name__}: {err}", fix) from err


# Triton-style platform names reported by /v2/models/{name}.
PLATFORMS = {"torch": "pytorch_dyce", "onnxruntime": "onnxruntime_dyce"}


class ModelRuntime:
    """Backbone, exits, bank and executor, loaded once from the artefact directory."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.layout = layout = ArtifactLayout(settings.artifacts_dir)
        if not layout.backbone_manifest.is_file():
            raise StartupError(
                f"no artefacts in {layout.root.resolve()} (expected backbone.json, exits.json, bank.json)",
                "build them with `dyce-offline build`, or point DYCE_ARTIFACTS_DIR at them",
            )
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        rebuild = f"rebuild with `dyce-offline build --artifacts {layout.root}`"
        with _loading(f"{layout.backbone_manifest.name} / {layout.backbone_weights.name}", rebuild):
            backbone, self.manifest = load_backbone(layout)
        with _loading(f"{layout.exits_manifest.name} / {layout.exits_weights.name}", rebuild):
            exits, self.exit_manifest = load_exits(layout)
        with _loading(str(layout.bank.name), f"search again with `dyce-offline build --artifacts {layout.root}`"):
            bank = load_bank_for(layout)  # BankMismatchError says which weights it was searched for
        self.model = LoadedModel(backbone, exits, self.manifest, self.exit_manifest, None)
        if bank.saver_stage:  # the savers load only for a bank that uses a saver stage
            with _loading(f"{layout.savers_manifest.name} / {layout.savers_weights.name}", rebuild):
                self.model = self.model.with_savers(layout)
        backbone, exits = self.model.backbone, self.model.exits
        device = torch.device(settings.device)
        if settings.backend == "torch":
            backend = TorchBackend(
                backbone, exits, device, settings.memory_format != "contiguous", rewrite=settings.rewrite_segments
            )
            if backend.rewrites:
                log.info("segments rewritten for inference: %s", "; ".join(map(str, backend.rewrites)))
            if backend.exit_rewrites:
                described = (f"({n}, {k}) {done}" for (n, k), done in backend.exit_rewrites.items())
                log.info("exits rewritten for inference: %s", "; ".join(described))
        else:
            onnx_dir = settings.onnx_dir or layout.root / "onnx"
            with _loading(str(onnx_dir), f"export again with `dyce-offline export-onnx --artifacts {layout.root}`"):
                backend = OnnxRuntimeBackend(onnx_dir, device, settings.torch_threads or None)
                backend.check_matches(self.manifest.identity, self.model.exit_hashes())
        self.executor = EarlyExitExecutor(backbone, exits, bank.macs, device=device, backend=backend)
        missing = self.unexported_exits(bank)
        if missing:
            raise StartupError(
                f"the bank uses exits {missing} that have no ONNX graph", "rerun `dyce-offline export-onnx`"
            )
        self.where = Where(
            device_type=device.type,
            backend=settings.backend,
            host=host_name(settings.device),
            threads=torch.get_num_threads(),
            segment_rewrites=backend.rewritten if isinstance(backend, TorchBackend) else None,
            memory_format=settings.memory_format if isinstance(backend, TorchBackend) else None,
        )
        self.warn_if_costed_elsewhere(bank)
        self.initial_bank = bank
        self.preprocess = preprocess = self.manifest.preprocess
        self.input_shape = tuple(backbone.input_spec.shape)
        yields = (preprocess.channels, preprocess.crop, preprocess.crop)
        if yields != self.input_shape:
            raise StartupError(
                f"preprocessing in {layout.backbone_manifest.name} yields {yields}, "
                f"the backbone takes {self.input_shape}",
                rebuild,
            )

    def costed_elsewhere(self, bank: Bank) -> list[str]:
        """How the set-up a latency bank was profiled on differs from this one (empty: the same,
        or a MAC bank, which is exact anywhere)."""
        if bank.cost.kind != "latency" or bank.cost.where is None:
            return []
        return bank.cost.where.differences(self.where)

    def warn_if_costed_elsewhere(self, bank: Bank) -> None:
        if differences := self.costed_elsewhere(bank):
            log.warning(
                "the bank's tiers were costed on measured time of another set-up (%s): their expected "
                "latencies are not this server's; run `dyce-offline profile` and `search --cost latency` here",
                "; ".join(differences),
            )

    def unexported_exits(self, bank: Bank) -> list[tuple[int, int]]:
        """Exits the bank enables that the ONNX backend cannot run (always none with torch)."""
        backend = self.executor.backend
        if not isinstance(backend, OnnxRuntimeBackend):
            return []
        return sorted(e for e in bank.used_exits() if not backend.has_exit(*e))

    @property
    def labels(self) -> tuple[str, ...]:
        return self.manifest.labels

    @property
    def num_positions(self) -> int:
        """Positions the executor runs: the backbone's, plus the saver stage when there is one."""
        return self.executor.num_positions

    @property
    def saver_stage(self) -> bool:
        return self.model.saver_stage

    @property
    def position_offset(self) -> int:
        """Run-time position - backbone position (what clients and dashboards see; -1: the saver)."""
        return self.model.position_offset

    @property
    def backbone_positions(self) -> int:
        return self.num_positions - self.position_offset

    def run(self, images: torch.Tensor, config: ExitConfiguration) -> ExecutionResult:
        return self.executor.run(images, config=config)

    def load_bank(self, path: str | None) -> Bank:
        """Validate a bank file against the weights in memory; only files in the artefact dir.

        The check uses the identities of the weights loaded at start-up, not the manifests on
        disk: exits rebuilt in place after start-up must not make their bank look valid here.
        """
        root = self.layout.root.resolve()
        try:
            target = (root / path).resolve() if path else self.layout.bank.resolve()
            inside = target.is_relative_to(root)
            found = inside and target.is_file()
        except (OSError, ValueError) as err:  # NUL bytes, names past the file system's limit
            raise BadRequest(f"bank path is not a usable file name: {type(err).__name__}") from None
        if not inside:
            raise BadRequest(f"bank path must lie inside the artefact directory {root}")
        if not found:
            raise NotFound(f"no bank file {Path(path or self.layout.bank.name)} in the artefact directory")
        try:
            bank = Bank.load(target)
        except ValidationError as err:
            # Locations and messages only: the file's content is never echoed back.
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'file'}: {e['msg']}" for e in err.errors()[:5])
            raise Unprocessable(f"bank {target.name} rejected, the previous one keeps serving: {problems}") from None
        except (OSError, UnicodeDecodeError):
            raise Unprocessable(f"bank {target.name} rejected, the previous one keeps serving: unreadable") from None
        try:
            self.model.check_bank(bank)
        except BankMismatchError as err:
            raise Unprocessable(f"bank {target.name} rejected, the previous one keeps serving: {err}") from None
        if bank.macs != self.executor.macs:
            raise Unprocessable(f"bank {target.name} rejected: its MAC table differs from the loaded model's")
        if missing := self.unexported_exits(bank):
            raise Unprocessable(f"bank {target.name} rejected: exits {missing} have no ONNX graph in this deployment")
        self.warn_if_costed_elsewhere(bank)
        return bank

    def warm_up(self, bank: Bank) -> None:
        """Run every frontier configuration (the tiers the autoswitcher uses) once at batch 1 and
        at the largest batch: allocator, kernels and path costs are ready before traffic."""
        generator = torch.Generator().manual_seed(0)
        if self.settings.memory_format == "auto" and isinstance(self.executor.backend, TorchBackend):
            images = torch.randn(self.settings.max_batch_size, *self.input_shape, generator=generator)
            tuned = self.executor.backend.tune_segments(images)
            log.info("segments as timed fastest on this machine: %s", "; ".join(map(str, tuned)))
        for batch in (1, self.settings.max_batch_size):
            images = torch.randn(batch, *self.input_shape, generator=generator)
            for index in bank.frontier():
                self.run(images, bank.entries[index].config)
