"""The channel between HTTP worker processes and the engine's process.

One Unix stream socket per worker; messages are length-prefixed pickles of plain tuples, arrays
among them as their bytes (``_pack``). The worker's ``RemoteEngine`` is an
``EngineHandle`` like the ``Engine`` itself, so routes do not know which side of it they run on.

A request crosses once each way: the worker decodes its images and sends them; the engine
admits them (tier, SLO, queue room: the whole server's, in one place) and queues them in the
same step, without a second round trip. Unlike in one process, that decision comes after the
decode: a worker itself refuses before decoding only what it can tell alone (readiness, sizes,
its own bound on bytes held). A
worker that gives up on a request (deadline, client gone) sends ``cancel``, and the batcher
drops its images if they have not run yet. The engine pushes its state (ready, fatal) to every
worker whenever it changes, so readiness probes never cross the channel. Operator calls travel
as one call each; the engine applies them to its single ``TierState``, so a switch holds for
every worker at once and no answer mixes tiers (a batch reads its tier once, in the engine).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import pickle
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .. import errors
from ..control.admission import check_image_count
from ..errors import BadRequest, NotReady, QueueFull, ServiceError, Timeout
from ..schemas import ActiveInfo, BankInfo, ModeRequest, ReloadRequest, SwitchRequest
from ..settings import Settings
from .api import Answer, Health, TierSummary
from .engine import Engine
from .tiers import check_tier_choice

log = logging.getLogger("dyce.service")

_LENGTH = struct.Struct("<I")
OPERATIONS = ("bank_info", "active_info", "switch", "set_mode", "reload")


def _frame(message: tuple[Any, ...]) -> bytes:
    payload = pickle.dumps(message, protocol=5)
    return _LENGTH.pack(len(payload)) + payload


async def _read(reader: asyncio.StreamReader) -> tuple[Any, ...]:
    (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    return pickle.loads(await reader.readexactly(length))


# The arrays of every request and answer cross as (dtype, shape, bytes), not as pickled numpy
# arrays, and a tier as a tuple of its fields, not as a dataclass: the engine's one event loop
# frames every worker's traffic, and pickling an answer's three arrays and its tier took 12 us
# (35-40 us on a loaded 2-core host) against 0.5 us for the same bytes. A bytearray unpickles
# writable, so ``torch.from_numpy`` takes the images without a copy or a warning.
PackedArray = tuple[str, tuple[int, ...], bytearray]


def _pack(array: np.ndarray) -> PackedArray:
    return array.dtype.str, array.shape, bytearray(np.ascontiguousarray(array))


def _unpack(packed: PackedArray) -> np.ndarray:
    dtype, shape, data = packed
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _error(err: BaseException) -> tuple[str, str, dict[str, str]]:
    if isinstance(err, ServiceError):
        return type(err).__name__, err.message, err.headers
    return "", f"{type(err).__name__}: {err}", {}


def _rebuild(name: str, message: str, headers: dict[str, str]) -> Exception:
    kind = getattr(errors, name, None) if name else None
    if isinstance(kind, type) and issubclass(kind, ServiceError):
        err = ServiceError.__new__(kind)
        ServiceError.__init__(err, message, headers=headers)
        return err
    return RuntimeError(f"the engine failed: {message}")  # the edge answers it 500


def _reply(writer: asyncio.StreamWriter, message: tuple[Any, ...]) -> None:
    """Send a reply; one that cannot be framed still answers its call, with an error."""
    if writer.is_closing():
        return
    try:
        frame = _frame(message)
    except Exception as err:
        log.exception("could not send a %s to a worker", message[0])
        frame = _frame(("error", message[1], "", f"{type(err).__name__}: {err}", {}))
    writer.write(frame)


class EngineServer:
    """The engine's side: serves every worker's connection on one Unix socket."""

    def __init__(self, engine: Engine, path: str) -> None:
        self.engine = engine
        self.path = path
        self._writers: set[asyncio.StreamWriter] = set()
        self._operations: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        engine.on_ready.append(self._broadcast_state)
        engine.on_fatal.append(lambda _: self._broadcast_state())

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, self.path)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()

    def _state(self) -> tuple[Any, ...]:
        engine = self.engine
        info = engine.info if engine.runtime is not None and engine.state is not None else None
        return ("state", info, engine.ready, engine.fatal)

    def _broadcast_state(self) -> None:
        frame = _frame(self._state())
        for writer in self._writers:
            if not writer.is_closing():
                writer.write(frame)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        pending: dict[int, asyncio.Future[Answer]] = {}
        writer.write(_frame(self._state()))
        try:
            while True:
                try:
                    message = await _read(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return  # the worker went away
                kind, call = message[0], message[1]
                if kind == "enqueue":
                    self._enqueue(writer, pending, call, *message[2:])
                elif kind == "cancel":
                    if (future := pending.pop(call, None)) is not None:
                        future.cancel()
                elif kind == "call":
                    task = asyncio.get_running_loop().create_task(self._operate(writer, call, *message[2:]))
                    self._operations.add(task)  # the loop holds tasks weakly
                    task.add_done_callback(self._operations.discard)
        finally:
            self._writers.discard(writer)
            for future in pending.values():
                future.cancel()  # nobody waits for these answers any more: the batcher skips them
            writer.close()

    def _enqueue(
        self,
        writer: asyncio.StreamWriter,
        pending: dict[int, asyncio.Future[Answer]],
        call: int,
        images: PackedArray,
        encoded_bytes: int,
        lam: float | None,
        max_relative_macs: float | None,
    ) -> None:
        try:
            future = self.engine.enqueue(torch.from_numpy(_unpack(images)), encoded_bytes, lam, max_relative_macs)
        except Exception as err:
            _reply(writer, ("error", call, *_error(err)))
            return
        pending[call] = future

        def answered(done: asyncio.Future[Answer]) -> None:
            if pending.pop(call, None) is None or done.cancelled() or writer.is_closing():
                return  # the worker gave up on it, or is gone
            if (err := done.exception()) is not None:
                _reply(writer, ("error", call, *_error(err)))
                return
            answer = done.result()
            tier = answer.tier
            _reply(
                writer,
                (
                    "answer",
                    call,
                    _pack(answer.probabilities.numpy()),
                    _pack(answer.exit_positions),
                    _pack(answer.relative_macs),
                    (tier.index, tier.lam, tier.config_id, tier.expected_accuracy, tier.expected_relative_macs),
                    answer.requested,
                    answer.queue_s,
                    answer.inference_s,
                    answer.batch_size,
                ),
            )

        future.add_done_callback(answered)

    async def _operate(self, writer: asyncio.StreamWriter, call: int, name: str, argument: Any) -> None:
        try:
            if name not in OPERATIONS:
                raise BadRequest(f"unknown engine operation {name!r}")
            operation = getattr(self.engine, name)
            result = await (operation() if argument is None and name.endswith("_info") else operation(argument))
        except Exception as err:
            if not isinstance(err, ServiceError):
                log.exception("engine operation %s failed", name)
            message = ("error", call, *_error(err))
        else:
            message = ("result", call, result)
        _reply(writer, message)


@dataclass(frozen=True)
class RemoteTicket:
    """A request a worker checked and may send: the engine admits it when its images arrive."""

    encoded_bytes: int
    lam: float | None
    max_relative_macs: float | None


class RemoteEngine(Health):
    """A worker's side: the engine as an ``EngineHandle`` across the socket."""

    def __init__(self, settings: Settings, path: str) -> None:
        super().__init__()
        self.settings = settings
        self.path = path
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count()
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._closing = False
        self._bytes_held = 0  # encoded + decoded bytes of this worker's requests not yet answered

    async def connect(self) -> None:
        reader, self._writer = await asyncio.open_unix_connection(self.path)
        self._apply(await _read(reader))  # the engine's state comes first
        self._reader_task = asyncio.get_running_loop().create_task(self._receive(reader), name="dyce-engine-channel")

    async def close(self) -> None:
        self._closing = True
        if self._writer is not None:
            self._writer.close()
        if self._reader_task is not None:
            self._reader_task.cancel()
            await asyncio.gather(self._reader_task, return_exceptions=True)
        self._fail_calls()

    # Requests ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def admission(
        self, images: int, encoded_bytes: int, lam: float | None = None, max_relative_macs: float | None = None
    ) -> Iterator[RemoteTicket]:
        """What can be refused before decoding without the engine's state is refused here; the
        engine admits the rest when the images arrive (tier, SLO, queue room)."""
        self.check_ready()
        check_image_count(images, self.settings.max_batch_size)
        check_tier_choice(lam, max_relative_macs)
        # Decoded images wait here, and in the socket, before the engine admits them: each worker
        # holds at most the server's byte capacity, so its memory stays bounded under any load.
        held = encoded_bytes + images * self.info.decoded_image_bytes
        capacity = self.settings.queue_capacity_bytes
        if self._bytes_held + held > capacity:
            raise QueueFull(
                f"queue is full ({self._bytes_held} bytes of images held by this worker, the limit is {capacity}); "
                "retry shortly",
                headers={"Retry-After": "1"},
            )
        self._bytes_held += held
        try:
            yield RemoteTicket(encoded_bytes, lam, max_relative_macs)
        finally:
            self._bytes_held -= held

    def submit(self, ticket: RemoteTicket, images: torch.Tensor) -> asyncio.Future[Answer]:
        call, future = self._call_future()
        self._send(("enqueue", call, _pack(images.numpy()), ticket.encoded_bytes, ticket.lam, ticket.max_relative_macs))

        def given_up(done: asyncio.Future[Answer]) -> None:
            if done.cancelled() and self._calls.pop(call, None) is not None:
                self._send(("cancel", call))

        future.add_done_callback(given_up)
        return future

    # Operators -----------------------------------------------------------------------------
    async def bank_info(self) -> BankInfo:
        return await self._operate("bank_info", None)

    async def active_info(self) -> ActiveInfo:
        return await self._operate("active_info", None)

    async def switch(self, request: SwitchRequest) -> ActiveInfo:
        return await self._operate("switch", request)

    async def set_mode(self, request: ModeRequest) -> ActiveInfo:
        return await self._operate("set_mode", request)

    async def reload(self, request: ReloadRequest | None) -> ActiveInfo:
        return await self._operate("reload", request)

    async def _operate(self, name: str, argument: Any) -> Any:
        if self._fatal is not None:
            raise NotReady(f"the engine is gone: {self._fatal}")
        call, future = self._call_future()
        self._send(("call", call, name, argument))
        timeout = self.settings.request_timeout_s
        try:
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            raise Timeout(f"the engine did not answer within the {timeout:g} s request timeout") from None
        finally:
            self._calls.pop(call, None)

    # The channel ---------------------------------------------------------------------------
    def _call_future(self) -> tuple[int, asyncio.Future[Any]]:
        if self._fatal is not None:
            raise NotReady(f"the engine is gone: {self._fatal}")
        call = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls[call] = future
        return call, future

    def _send(self, message: tuple[Any, ...]) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(_frame(message))

    def _apply(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "state":
            _, info, ready, fatal = message
            self._info = info or self._info
            self._ready = ready and fatal is None
            if fatal is not None:
                self.fail(fatal)
            return
        future = self._calls.pop(message[1], None)
        if future is None or future.done():
            return  # given up on already
        if kind == "answer":
            probabilities, positions, macs, tier, requested, queue_s, inference_s, batch = message[2:]
            future.set_result(
                Answer(
                    torch.from_numpy(_unpack(probabilities)),
                    _unpack(positions),
                    _unpack(macs),
                    TierSummary(*tier),
                    requested,
                    queue_s,
                    inference_s,
                    batch,
                )
            )
        elif kind == "result":
            future.set_result(message[2])
        elif kind == "error":
            future.set_exception(_rebuild(*message[2:]))

    async def _receive(self, reader: asyncio.StreamReader) -> None:
        reason = "the engine process closed its channel"
        try:
            while True:
                self._apply(await _read(reader))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except asyncio.CancelledError:
            raise
        except Exception as err:  # a frame this worker cannot read: it can no longer trust the channel
            log.exception("the channel to the engine failed")
            reason = f"the channel to the engine failed: {type(err).__name__}: {err}"
        finally:
            if not self._closing:
                self.fail(reason)  # not ready, not live: the worker exits and the supervisor starts another
            self._fail_calls()

    def _fail_calls(self) -> None:
        for future in self._calls.values():
            if not future.done():
                future.set_exception(NotReady("the engine is gone; retry on another replica"))
        self._calls.clear()
