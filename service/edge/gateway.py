"""The edge's half of a request: decode, hand the images to the engine, wait for the answer.

One ``Gateway`` per HTTP process. Its ``engine`` is an ``EngineHandle``: the engine itself in a
single-process server, or a ``RemoteEngine`` channel in each of several HTTP worker processes.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from starlette.requests import Request

from ..engine.api import Answer, EngineHandle
from ..errors import ClientGone, Timeout
from ..metrics import Metrics
from ..settings import Settings
from .decode import ImageDecoder, pixels

# Small images decode on the event loop: for a 28x28 PNG the hop to a thread costs more than
# the decoding (~0.2 ms). Anything larger decodes in a thread, so the loop never stalls on it.
INLINE_DECODE_PIXELS = 64 * 64


@dataclass(frozen=True)
class Served:
    """A request's answer from the engine, and how long it took since it arrived."""

    answer: Answer
    total_s: float


class Gateway:
    def __init__(self, settings: Settings, engine: EngineHandle, metrics: Metrics) -> None:
        self.settings = settings
        self.engine = engine
        self.metrics = metrics
        self._decoder: ImageDecoder | None = None
        self._decode_pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="dyce-decode")

    def close(self) -> None:
        self._decode_pool.shutdown(wait=False, cancel_futures=True)

    @property
    def decoder(self) -> ImageDecoder:
        if self._decoder is None:
            self._decoder = ImageDecoder.from_settings(self.engine.info.preprocess, self.settings)
        return self._decoder

    async def decode(self, blobs: list[bytes]) -> torch.Tensor:
        """Encoded images -> one batch tensor; pixel work off the event loop unless tiny, in a
        pool of ``decode_threads`` so concurrent large decodes have bounded memory."""
        decoder = self.decoder
        images = [decoder.open(blob) for blob in blobs]  # headers only: checks limits, cheap
        if sum(pixels(image) for image in images) <= INLINE_DECODE_PIXELS:
            return decoder.batch(images)
        return await asyncio.get_running_loop().run_in_executor(self._decode_pool, decoder.batch, images)

    async def classify(self, request: Request, ticket: Any, images: torch.Tensor, arrived: float) -> Served:
        """Hand admitted ``images`` to the engine and wait for the answer, the deadline or a disconnect."""
        future = self.engine.submit(ticket, images)
        remaining = self.settings.request_timeout_s - (time.perf_counter() - arrived)
        left = False

        def client_left(_: asyncio.Future[None]) -> None:
            nonlocal left
            if not future.done():
                left = True
                future.cancel()

        # The handler awaits the answer's own future, so the answer wakes it directly; asyncio.wait
        # would add a callback hop, after the batch's bookkeeping instead of before it.
        gone = asyncio.ensure_future(_disconnected(request))
        gone.add_done_callback(client_left)
        try:
            async with asyncio.timeout(max(remaining, 0)):
                answer = await future
        except TimeoutError:
            # the deadline cancelled the future: still queued, the batcher skips it; running, its rows are discarded
            raise Timeout(f"no answer within the {self.settings.request_timeout_s:g} s request timeout") from None
        except asyncio.CancelledError:
            if left:
                raise ClientGone("client disconnected before the answer was ready") from None
            raise
        finally:
            gone.remove_done_callback(client_left)
            gone.cancel()
        return Served(answer, time.perf_counter() - arrived)


async def _disconnected(request: Request) -> None:
    """Return when the client goes away (the body is read already, so only disconnect can come)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
