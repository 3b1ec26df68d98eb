"""Every knob of the server, read from the environment (prefix ``DYCE_``) by pydantic-settings."""

from __future__ import annotations

import math
import os
import secrets
from pathlib import Path
from typing import Literal

from pydantic import Field, PrivateAttr, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Tokens that appear in examples and tutorials: starting with one is as bad as starting with none.
PLACEHOLDER_TOKENS = frozenset({"", "changeme", "change-me", "admin", "secret", "token", "password", "dyce"})


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DYCE_", extra="ignore")

    artifacts_dir: Path = Field(Path("artifacts"), description="backbone, exits and bank, as dyce-offline writes them")
    device: str = "cpu"
    backend: Literal["torch", "onnxruntime"] = Field(
        "torch", description="what runs the network: eager PyTorch, or the ONNX graphs of `dyce-offline export-onnx`"
    )
    onnx_dir: Path | None = Field(None, description="exported ONNX graphs; default <artifacts_dir>/onnx")
    torch_threads: int = Field(0, ge=0, description="intra-op threads of the inference worker; 0 = torch's default")
    memory_format: Literal["auto", "channels_last", "contiguous"] = Field(
        "auto",
        description="tensor layout of each backbone segment (torch backend); auto = per segment, the layout and "
        "the grouping of small batches (whole, or row by row) timed faster at warm-up on this machine",
    )
    rewrite_segments: bool = Field(
        True,
        description="run exact rewrites of the backbone segments and of the exits with convolutions (savers), "
        "torch backend: batch norms folded into convolutions, kernel taps that only ever meet padding cropped; "
        "false runs the loaded modules as they are",
    )
    model_name: str = Field("dyce", pattern=r"^[A-Za-z0-9_.-]+$")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="debug also logs the traceback behind a start-up failure"
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)

    # Dynamic batching and admission.
    max_batch_size: int = Field(32, ge=1, le=1024, description="images per executor call, also per request")
    max_queue_delay_ms: float = Field(
        0.0, ge=0, description="extra wait to fill a batch; 0 = take what queued up while the last batch ran"
    )
    max_pipeline_wait_ms: float = Field(
        10.0, ge=0, description="longest an image waits inside the pipeline for a full batch at its position"
    )
    queue_capacity: int = Field(256, ge=1, description="queued requests beyond which the server answers 429")
    queue_capacity_images: int = Field(
        1024, ge=1, description="images queued or being decoded beyond which the server answers 429"
    )
    queue_capacity_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1024,
        description="bytes of encoded and decoded images queued or being decoded beyond which the server answers 429",
    )
    decode_threads: int = Field(
        2, ge=1, description="threads that decode large images; bounds the memory of concurrent decodes"
    )
    request_timeout_s: float = Field(10.0, gt=0, description="arrival to answer; past it the server answers 504")

    # The HTTP edge (service/edge/): its processes, and limits that act before a handler runs.
    http_workers: int = Field(
        0,
        ge=0,
        le=64,
        description="HTTP worker processes in front of the one engine process; 0 = from the CPU cores "
        "(1 = one process that runs the engine too)",
    )
    max_in_flight_requests: int = Field(
        256,
        ge=1,
        description="requests inside one HTTP process at once; more are answered 503 at once, body unread",
    )
    max_connections: int = Field(
        2048, ge=1, description="open connections per HTTP process; uvicorn's last-resort backstop"
    )
    keep_alive_timeout_s: float = Field(5.0, gt=0, description="idle keep-alive connections close after this")
    body_read_timeout_s: float = Field(
        10.0, gt=0, description="longest wait for the next chunk of a request body; then 408 and the connection closes"
    )
    max_header_count: int = Field(100, ge=8)
    max_header_bytes: int = Field(64 * 1024, ge=1024)
    max_url_bytes: int = Field(8 * 1024, ge=256)

    # Input limits.
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="decoded width x height; larger = decompression bomb")
    max_image_side: int = Field(8192, ge=1, description="longest side of an image, in pixels")
    max_image_aspect_ratio: float = Field(
        16.0, ge=1, description="longer side / shorter side; bounds the memory of the resize before the crop"
    )

    # Admin.
    admin_token: SecretStr = SecretStr("")
    insecure_dev: bool = Field(False, description="allow a placeholder admin token (a random one is generated)")

    # Tiers and the autoswitcher.
    autoswitch: Literal["auto", "manual"] = Field("auto", description="start with the autoswitcher on, or pinned")
    slo_p95_ms: float = Field(100.0, gt=0, description="latency objective the autoswitcher keeps p95 under")
    autoswitch_interval_s: float = Field(0.25, gt=0)
    autoswitch_target_utilisation: float = Field(0.7, gt=0, le=1, description="load/capacity a tier may run at")
    autoswitch_hysteresis: float = Field(0.1, ge=0, lt=1, description="extra headroom needed to climb to a tier")
    autoswitch_min_dwell_down_s: float = Field(
        0.75, ge=0, description="time on a tier, and under pressure, before stepping down"
    )
    autoswitch_min_dwell_up_s: float = Field(
        2.0, ge=0, description="time on a tier, and with room above, before climbing back"
    )
    autoswitch_window_s: float = Field(1.0, gt=0, description="window of the arrival rate")
    autoswitch_climb_window_s: float = Field(
        2.0, gt=0, description="window of latency p95 and of the rate climbing back looks at"
    )
    calibration_rounds: int = Field(3, ge=1, description="timed runs of the plain model at start-up (median)")

    default_top_k: int = Field(5, ge=1)

    _generated_admin_token: bool = PrivateAttr(False)

    @model_validator(mode="after")
    def _admin_token_is_set(self) -> Settings:
        if self.admin_token.get_secret_value().strip().lower() in PLACEHOLDER_TOKENS:
            if not self.insecure_dev:
                raise ValueError(
                    "DYCE_ADMIN_TOKEN is empty or a placeholder; set a real secret "
                    "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`), "
                    "or set DYCE_INSECURE_DEV=1 for a local development server"
                )
            # Dev mode still guards admin routes, with a token only the local log shows.
            self.admin_token = SecretStr(secrets.token_urlsafe(24))
            self._generated_admin_token = True
        return self

    def http_processes(self, cores: int | None = None) -> int:
        """HTTP worker processes to run; 1 means one process that runs the engine too.

        From the cores this process may use, when not set. Even on 2 cores, two workers beat one
        process under load (bench/peers.py, two runs: +54-97 % images/s with 8 PNGs per request,
        -7 to +26 % with one): the HTTP and decode work of one request overlaps the model work of
        others instead of sharing one interpreter lock with it. One process answers an idle
        server's single request about 0.5 ms sooner (no channel to cross). Beyond 2 cores: half
        the cores when a GPU does the inference, a quarter when the CPU's cores run the model
        too; at most 8.
        """
        if self.http_workers:
            return self.http_workers
        cores = cores or available_cores()
        if cores < 2:
            return 1
        share = 2 if self.device.startswith("cuda") else 4
        return max(2, min(cores // share, 8))

    @property
    def generated_admin_token(self) -> bool:
        return self._generated_admin_token


def available_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup CPU quota (a
    container limited to 2 CPUs on a 64-core node must not start 16 workers)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    return min(cores, max(1, math.ceil(quota))) if quota else cores


def _cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs the cgroup may use (v2 ``cpu.max``, else v1 CFS quota / period); None: no limit."""
    try:
        quota, period = (root / "cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None
