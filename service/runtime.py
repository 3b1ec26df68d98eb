"""The loaded model and the one piece of mutable serving state: which configuration is active.

``TierState`` holds an immutable ``ActiveTier`` behind a single reference. A switch builds a
new one and assigns it, so a reader (a request being admitted, the autoswitcher, an admin
call) sees either the old tier or the new one, never a mixture of bank, index and mode.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from pydantic import ValidationError

from dyce.artifacts import ArtifactLayout, LoadedModel, load_backbone, load_bank_for, load_exits
from dyce.bank import Bank, BankEntry, BankMismatchError
from dyce.config import ExitConfiguration
from dyce.execution_backends import OnnxRuntimeBackend
from dyce.executor import EarlyExitExecutor, ExecutionResult
from dyce.profile import Where, host_name

from .decode import ImageDecoder
from .errors import BadRequest, NotFound, Unprocessable
from .settings import Settings

log = logging.getLogger("dyce.service")

Mode = Literal["auto", "manual"]
SwitchReason = Literal["admin", "autoswitch", "request", "reload", "startup"]


@dataclass(frozen=True)
class Tier:
    """One bank entry, remembered with the bank it came from (indices are per bank)."""

    bank: Bank
    index: int

    @property
    def entry(self) -> BankEntry:
        return self.bank.entries[self.index]

    @property
    def config(self) -> ExitConfiguration:
        return self.entry.config

    @property
    def lam(self) -> float:
        return self.entry.lam

    @property
    def config_id(self) -> str:
        return self.entry.config_id

    @property
    def expected_relative_macs(self) -> float:
        return self.entry.search.relative_macs

    @property
    def expected_relative_cost(self) -> float:
        """What the bank's search traded against: measured time for a latency bank, else MACs."""
        return self.entry.search.relative_cost

    @property
    def expected_accuracy(self) -> float:
        return self.entry.search.accuracy

    def frontier(self) -> list[Tier]:
        """The bank's non-dominated tiers, most accurate first."""
        return [Tier(self.bank, i) for i in reversed(self.bank.frontier())]


@dataclass(frozen=True)
class ActiveTier:
    tier: Tier
    mode: Mode
    reason: SwitchReason
    since_monotonic: float
    since_unix: float


TierListener = Callable[[ActiveTier], None]


class TierState:
    def __init__(self, bank: Bank, mode: Mode, listeners: list[TierListener] | None = None) -> None:
        self._listeners = list(listeners or [])
        self._lock = threading.Lock()  # serialises writers; readers just read the reference
        self._active = self._stamp(Tier(bank, bank.most_accurate()), mode, "startup")
        self._notify(self._active)

    @staticmethod
    def _stamp(tier: Tier, mode: Mode, reason: SwitchReason) -> ActiveTier:
        return ActiveTier(tier, mode, reason, time.monotonic(), time.time())

    def _notify(self, active: ActiveTier) -> None:
        for listener in self._listeners:
            listener(active)

    @property
    def active(self) -> ActiveTier:
        return self._active

    @property
    def bank(self) -> Bank:
        return self._active.tier.bank

    def switch(self, index: int, reason: SwitchReason, mode: Mode | None = None) -> ActiveTier:
        with self._lock:
            current = self._active
            if not 0 <= index < len(current.tier.bank.entries):
                raise NotFound(f"bank has no entry {index} (it has {len(current.tier.bank.entries)})")
            changed = index != current.tier.index
            if changed:
                self._active = self._stamp(Tier(current.tier.bank, index), mode or current.mode, reason)
            elif mode is not None and mode != current.mode:
                self._active = replace(current, mode=mode)
            active = self._active
        if changed:
            log.info(
                "tier switch (%s): bank index %d -> %d, lambda %.4g", reason, current.tier.index, index, active.tier.lam
            )
            self._notify(active)
        return active

    def set_mode(self, mode: Mode) -> ActiveTier:
        with self._lock:
            self._active = replace(self._active, mode=mode)
            return self._active

    def replace_bank(self, bank: Bank) -> ActiveTier:
        """Serve a new bank, at the entry whose lambda is nearest the one that was active."""
        with self._lock:
            previous = self._active
            tier = Tier(bank, bank.nearest_lambda(previous.tier.lam))
            self._active = self._stamp(tier, previous.mode, "reload")
            active = self._active
        log.info("bank reloaded: %d entries, now at index %d (lambda %.4g)", len(bank.entries), tier.index, tier.lam)
        self._notify(active)
        return active

    def resolve(self, lam: float | None, max_relative_macs: float | None) -> Tier | None:
        """A client's own tier: the entry nearest a lambda, or the most accurate within a MAC budget."""
        if lam is not None and max_relative_macs is not None:
            raise BadRequest("ask for a tier by lambda or by max_relative_macs, not both")
        bank = self.bank
        if lam is not None:
            return Tier(bank, bank.nearest_lambda(lam))
        if max_relative_macs is not None:
            index = bank.within_macs(max_relative_macs)
            if index is None:
                cheapest = min(e.search.relative_macs for e in bank.entries)
                raise Unprocessable(
                    f"no configuration fits {max_relative_macs} relative MACs; the cheapest needs {cheapest:.4f}"
                )
            return Tier(bank, index)
        return None


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
        backend = None
        if settings.backend == "onnxruntime":
            onnx_dir = settings.onnx_dir or layout.root / "onnx"
            with _loading(str(onnx_dir), f"export again with `dyce-offline export-onnx --artifacts {layout.root}`"):
                backend = OnnxRuntimeBackend(onnx_dir, torch.device(settings.device), settings.torch_threads or None)
                backend.check_matches(self.manifest.identity, self.model.exit_hashes())
        self.executor = EarlyExitExecutor(backbone, exits, bank.macs, device=settings.device, backend=backend)
        missing = self.unexported_exits(bank)
        if missing:
            raise StartupError(
                f"the bank uses exits {missing} that have no ONNX graph", "rerun `dyce-offline export-onnx`"
            )
        self.where = Where(
            device_type=torch.device(settings.device).type,
            backend=settings.backend,
            host=host_name(settings.device),
            threads=torch.get_num_threads(),
        )
        self.warn_if_costed_elsewhere(bank)
        self.initial_bank = bank
        self.decoder = ImageDecoder(
            self.manifest.preprocess,
            settings.max_image_pixels,
            settings.max_image_side,
            settings.max_image_aspect_ratio,
        )
        self.input_shape = tuple(backbone.input_spec.shape)
        if tuple(self.decoder.shape) != self.input_shape:
            raise StartupError(
                f"preprocessing in {layout.backbone_manifest.name} yields {self.decoder.shape}, the backbone takes "
                f"{self.input_shape}",
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
        for batch in (1, self.settings.max_batch_size):
            images = torch.randn(batch, *self.input_shape, generator=generator)
            for index in bank.frontier():
                self.run(images, bank.entries[index].config)
