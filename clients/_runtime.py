"""Runtime of the generated ensemble clients (``clients/<ensemble>.py``, written by ``mmfuse gen-clients``).

A generated module holds only what its ``config.pbtxt`` says: an ``EnsembleSpec`` (tensor names, data
types, dims), typed request/response dataclasses, and a sync and an asyncio client class built on the
two bases here. Everything else lives here once:

* numpy in and out: inputs are checked against the spec (dtype, rank, fixed dims; ``-1`` matches any
  size) before anything is sent; TYPE_STRING inputs take ``bytes``/``str``/``None`` (``None`` is the
  empty element) and are always sent from object arrays (numpy's ``S`` dtype would drop trailing NULs);
* long inputs split into batches of at most ``max_batch_size`` rows, with a tqdm progress bar;
* a deadline on every call (``timeout_s``, per attempt);
* retries with exponential back-off and jitter on UNAVAILABLE (server down, model not ready, queue full);
* optional TLS (server-authenticated or mutual) and gzip/deflate compression;
* the asyncio client keeps up to ``max_in_flight`` batches in flight on one channel (pipelining), so one
  client keeps a server's dynamic batcher busy.

Errors are those of ``clients.errors``; checks made before sending raise ``ValueError``.
"""
from __future__ import annotations

import asyncio
import dataclasses
import random
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar, Union

import numpy as np

from mmfuse.wire import as_bytes, infer_inputs

from .errors import MMFuseClientError, ServerUnavailable, from_triton

DEFAULT_URL = "127.0.0.1:8001"

#: Triton wire data type -> the numpy dtype a client sends and receives (BF16 travels as float32 arrays).
NUMPY_DTYPES: dict[str, Any] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BF16": np.float32,
    "BYTES": np.object_,
}

#: What a TYPE_STRING input accepts: one item per row (``None`` or ``b""`` = empty element), or an array.
BytesInput = Union[Sequence[Union[bytes, str, None]], np.ndarray]
#: What a numeric input accepts: anything ``np.asarray`` turns into the right shape and a castable dtype.
ArrayInput = Union[np.ndarray, Sequence[Any]]


# -- specs (what a generated module declares) ------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    name: str  # tensor name in config.pbtxt
    datatype: str  # Triton wire data type: FP32, BOOL, BYTES, ...
    dims: tuple[int, ...]  # without the batch dimension; -1 = any size
    field: str  # the dataclass field that carries it
    optional: bool = False

    def shape_text(self, batched: bool) -> str:
        dims = (["B"] if batched else []) + [str(d) for d in self.dims]
        return "[" + ", ".join(dims) + "]"


@dataclass(frozen=True)
class EnsembleSpec:
    name: str
    max_batch_size: int  # 0: the ensemble does not batch; inputs are sent with exactly ``dims``
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def batched(self) -> bool:
        return self.max_batch_size > 0


# -- options ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TLSOptions:
    """gRPC over TLS. ``root_certificates``: the CA that signed the server (PEM; None: the system's roots).
    ``private_key`` and ``certificate_chain``: this client's key and certificate, for mutual TLS."""

    root_certificates: str | Path | None = None
    private_key: str | Path | None = None
    certificate_chain: str | Path | None = None

    def __post_init__(self) -> None:
        if (self.private_key is None) != (self.certificate_chain is None):
            raise ValueError("TLS: private_key and certificate_chain go together (mutual TLS needs both)")
        for name in ("root_certificates", "private_key", "certificate_chain"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"TLS: {name} file {path} does not exist")

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of tritonclient's gRPC clients (they read the files themselves)."""
        return {
            "ssl": True,
            "root_certificates": None if self.root_certificates is None else str(self.root_certificates),
            "private_key": None if self.private_key is None else str(self.private_key),
            "certificate_chain": None if self.certificate_chain is None else str(self.certificate_chain),
        }


COMPRESSIONS = (None, "gzip", "deflate")


@dataclass(frozen=True)
class ClientOptions:
    url: str = DEFAULT_URL
    timeout_s: float | None = 30.0  # deadline of each call (each attempt); None: no deadline
    retries: int = 3  # further attempts after an UNAVAILABLE answer (0: fail at once)
    backoff_s: float = 0.05  # first back-off; doubles per retry up to backoff_max_s, with jitter
    backoff_max_s: float = 2.0
    max_batch: int | None = None  # rows per request; None: the ensemble's max_batch_size
    max_in_flight: int = 4  # asyncio client: batches in flight at once
    progress: bool | None = None  # progress bar; None: when stderr is a terminal and there are 2+ batches
    compression: str | None = None  # None, "gzip" or "deflate" (requests)
    tls: TLSOptions | None = None
    headers: Mapping[str, str] | None = None  # extra gRPC metadata on every call

    def __post_init__(self) -> None:
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {COMPRESSIONS}, got {self.compression!r}")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0 (or None), got {self.timeout_s}")
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")
        if self.backoff_s < 0 or self.backoff_max_s < self.backoff_s:
            raise ValueError(f"need 0 <= backoff_s <= backoff_max_s, got {self.backoff_s}, {self.backoff_max_s}")
        if self.max_batch is not None and self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {self.max_in_flight}")

    def backoff(self, retry: int) -> float:
        """Sleep before retry number ``retry`` (0-based): exponential, with 'equal jitter'."""
        delay = min(self.backoff_max_s, self.backoff_s * (2 ** retry))
        return delay / 2 + random.uniform(0, delay / 2)


def connect(options: ClientOptions):
    """A ``tritonclient.grpc.InferenceServerClient`` for ``options`` (TLS included)."""
    import tritonclient.grpc as grpcclient

    return grpcclient.InferenceServerClient(options.url, **(options.tls.kwargs() if options.tls else {}))


def connect_async(options: ClientOptions):
    """A ``tritonclient.grpc.aio.InferenceServerClient``; create it inside the event loop that uses it."""
    import tritonclient.grpc.aio as aioclient

    return aioclient.InferenceServerClient(options.url, **(options.tls.kwargs() if options.tls else {}))


# -- numpy in ---------------------------------------------------------------------------------------------
def _as_bytes(item: Any, where: str) -> bytes:
    """mmfuse.wire's element conversion, for the types a TYPE_STRING input takes (anything else: ValueError)."""
    if item is None or isinstance(item, (str, bytes, bytearray, memoryview)):
        return as_bytes(item)
    raise ValueError(f"{where}: elements must be bytes, str or None, got {type(item).__name__}")


def _bytes_array(value: Any, where: str) -> np.ndarray:
    if isinstance(value, (str, bytes, bytearray)):
        raise ValueError(f"{where}: give one item per row (a list), not a single {type(value).__name__}")
    if not isinstance(value, np.ndarray):
        items = list(value)
        if not (items and isinstance(items[0], (list, tuple, np.ndarray))):
            out = np.empty(len(items), dtype=object)  # a flat list: one element per row
            for i, item in enumerate(items):
                out[i] = _as_bytes(item, where)
            return out
        value = np.array(items, dtype=object)  # nested lists: rows of elements
    out = np.empty(value.shape, dtype=object)
    flat_in, flat_out = value.reshape(-1), out.reshape(-1)
    for i, item in enumerate(flat_in):
        flat_out[i] = _as_bytes(item, where)
    return out


def encode_input(spec: EnsembleSpec, tensor: TensorSpec, value: Any) -> np.ndarray:
    """One input as the array that is sent: dtype and shape checked against the spec."""
    where = f"{spec.name}: input {tensor.field} ({tensor.name}, {tensor.datatype} {tensor.shape_text(spec.batched)})"
    if tensor.datatype == "BYTES":
        array = _bytes_array(value, where)
    else:
        array = np.asarray(value)
        target = np.dtype(NUMPY_DTYPES[tensor.datatype])
        if array.dtype != target:
            cast = array.astype(target) if array.dtype.kind in "biuf" else None
            safe = cast is not None and (
                np.can_cast(array.dtype, target, "same_kind")  # e.g. float64 -> float32, int -> float
                or (array.dtype.kind in "iu" and target.kind in "iu" and np.array_equal(cast, array)))  # ints that fit
            if not safe:
                raise ValueError(f"{where}: expected {target} values, got an array of {array.dtype}")
            array = cast
    if spec.batched and array.ndim == 1 and tensor.dims == (1,):
        array = array.reshape(-1, 1)  # a flat list of B items is B rows of one element
    expected = ((-1,) if spec.batched else ()) + tuple(tensor.dims)
    if array.ndim != len(expected) or any(e != -1 and e != a for e, a in zip(expected, array.shape)):
        raise ValueError(f"{where}: got shape {list(array.shape)}")
    return array


def encode_inputs(spec: EnsembleSpec, columns: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], int]:
    """Tensor name -> value  =>  tensor name -> checked array, and the number of rows (0 if unbatched)."""
    arrays: dict[str, np.ndarray] = {}
    for tensor in spec.inputs:
        value = columns.get(tensor.name)
        if value is None:
            if tensor.optional:
                continue
            raise ValueError(f"{spec.name}: input {tensor.field} ({tensor.name}) is required")
        arrays[tensor.name] = encode_input(spec, tensor, value)
    if not spec.batched:
        return arrays, 0
    lengths = {name: len(array) for name, array in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{spec.name}: inputs have different lengths: "
                         + ", ".join(f"{k}={v}" for k, v in lengths.items()))
    n = next(iter(lengths.values()), 0)
    if n == 0:
        raise ValueError(f"{spec.name}: empty input list")
    return arrays, n


# -- one request, with retries ----------------------------------------------------------------------------
def _requested(outputs: Sequence[str]) -> list:
    import tritonclient.grpc as grpcclient

    return [grpcclient.InferRequestedOutput(name) for name in outputs]


def call(connection, ensemble: str, arrays: Mapping[str, np.ndarray], outputs: Sequence[str],
         options: ClientOptions, timeout_s: float | None = None,
         datatypes: Mapping[str, str] | None = None) -> dict[str, np.ndarray]:
    """One ModelInfer on a sync tritonclient connection; UNAVAILABLE is retried with back-off."""
    from tritonclient.utils import InferenceServerException

    inputs, requested = infer_inputs(arrays, datatypes), _requested(outputs)
    attempts = 0
    while True:
        attempts += 1
        try:
            result = connection.infer(ensemble, inputs, outputs=requested,
                                      client_timeout=timeout_s or options.timeout_s,
                                      headers=dict(options.headers) if options.headers else None,
                                      compression_algorithm=options.compression)
            return {name: result.as_numpy(name) for name in outputs}
        except InferenceServerException as error:
            mapped = from_triton(error, ensemble, options.url, attempts)
            if not isinstance(mapped, ServerUnavailable) or attempts > options.retries:
                raise mapped from error
        time.sleep(options.backoff(attempts - 1))


async def call_async(connection, ensemble: str, arrays: Mapping[str, np.ndarray], outputs: Sequence[str],
                     options: ClientOptions, timeout_s: float | None = None,
                     datatypes: Mapping[str, str] | None = None) -> dict[str, np.ndarray]:
    """``call`` on a ``tritonclient.grpc.aio`` connection."""
    from tritonclient.utils import InferenceServerException

    inputs, requested = infer_inputs(arrays, datatypes), _requested(outputs)
    attempts = 0
    while True:
        attempts += 1
        try:
            result = await connection.infer(ensemble, inputs, outputs=requested,
                                            client_timeout=timeout_s or options.timeout_s,
                                            headers=dict(options.headers) if options.headers else None,
                                            compression_algorithm=options.compression)
            return {name: result.as_numpy(name) for name in outputs}
        except InferenceServerException as error:
            mapped = from_triton(error, ensemble, options.url, attempts)
            if not isinstance(mapped, ServerUnavailable) or attempts > options.retries:
                raise mapped from error
        await asyncio.sleep(options.backoff(attempts - 1))


# -- batches and progress ---------------------------------------------------------------------------------
class _NoProgress:
    def update(self, n: int) -> None:
        pass


@contextmanager
def progress_bar(progress: Any, total: int, batches: int, desc: str) -> Iterator[Any]:
    """``progress``: True/False, None (auto: a terminal and 2+ batches), or an object with ``update(n)``
    (a tqdm bar owned by the caller, e.g. one bar over many calls)."""
    if progress is not None and not isinstance(progress, bool):
        yield progress
        return
    show = progress if progress is not None else (batches > 1 and sys.stderr.isatty())
    if not show:
        yield _NoProgress()
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="row", file=sys.stderr, dynamic_ncols=True) as bar:
        yield bar


def batch_slices(n: int, size: int) -> list[slice]:
    return [slice(start, min(n, start + size)) for start in range(0, n, size)]


def concat(spec: EnsembleSpec, parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(parts) == 1:
        return parts[0]
    out = {}
    for name in parts[0]:
        shapes = {p[name].shape[1:] for p in parts}
        if len(shapes) > 1:
            raise MMFuseClientError(
                f"{spec.name}: output {name} came back with different shapes in different batches "
                f"({sorted(shapes)}); send all rows in one batch (max_batch) to get one array")
        out[name] = np.concatenate([p[name] for p in parts], axis=0)
    return out


# -- the two client bases ---------------------------------------------------------------------------------
Req = TypeVar("Req")
Resp = TypeVar("Resp")


class _ClientBase(Generic[Req, Resp]):
    spec: ClassVar[EnsembleSpec]
    request_type: ClassVar[type]
    response_type: ClassVar[type]

    def __init__(self, url: str | None = None, *, options: ClientOptions | None = None, connection: Any = None,
                 **overrides: Any):
        """``url`` and any ``ClientOptions`` field as keywords override ``options``. ``connection``: an open
        tritonclient client to share (not closed by this one)."""
        if url is not None:
            overrides["url"] = url
        self.options = dataclasses.replace(options or ClientOptions(), **overrides)
        self._connection = connection
        self._owns_connection = connection is None
        # The outputs the served ensemble really has (learned once from its metadata): an output of the
        # config this client was generated from that the server does not offer (e.g. SCORE after a
        # switch to a strategy without a task head) is not requested, and comes back as None.
        self._served: tuple[str, ...] | None = None

    def _learn_outputs(self, metadata: Mapping[str, Any] | None) -> None:
        if self._served is None and metadata:
            self._served = tuple(o["name"] for o in metadata.get("outputs", ()))

    def _columns(self, request: Req) -> dict[str, Any]:
        if not isinstance(request, self.request_type):
            raise TypeError(f"{self.spec.name}: expected request type {self.request_type.__name__}, "
                            f"got {type(request).__name__}")
        return {t.name: getattr(request, t.field) for t in self.spec.inputs}

    def _response(self, out: Mapping[str, np.ndarray]) -> Resp:
        return self.response_type(**{t.field: out.get(t.name) for t in self.spec.outputs})

    def _batch_size(self, max_batch: int | None) -> int:
        size = max_batch or self.options.max_batch or self.spec.max_batch_size
        return min(size, self.spec.max_batch_size)

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.spec.outputs if not self._served or t.name in self._served]

    @property
    def datatypes(self) -> dict[str, str]:
        return {t.name: t.datatype for t in self.spec.inputs}


class EnsembleClient(_ClientBase[Req, Resp]):
    """Sync client on ``tritonclient.grpc``. Use as a context manager or call ``close()``."""

    @property
    def connection(self):
        if self._connection is None:
            self._connection = connect(self.options)
        return self._connection

    def close(self) -> None:
        if self._owns_connection and self._connection is not None:
            self._connection.close()
            self._connection = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def is_ready(self) -> bool:
        return bool(self.connection.is_model_ready(self.spec.name))

    def metadata(self) -> dict:
        return self.connection.get_model_metadata(self.spec.name, as_json=True)

    def infer(self, request: Req, *, timeout_s: float | None = None, progress: Any = None,
              max_batch: int | None = None) -> Resp:
        """Send ``request``; rows beyond ``max_batch_size`` go in further requests, one after another."""
        arrays, n = encode_inputs(self.spec, self._columns(request))
        if self._served is None:
            try:
                self._learn_outputs(self.metadata())
            except Exception:  # noqa: BLE001 - the call itself will report an unreachable server
                pass

        def call_(part: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            return call(self.connection, self.spec.name, part, self.output_names, self.options, timeout_s,
                        self.datatypes)

        if not self.spec.batched:
            return self._response(call_(arrays))
        slices = batch_slices(n, self._batch_size(max_batch))
        parts = []
        with progress_bar(self.options.progress if progress is None else progress, n, len(slices),
                          self.spec.name) as bar:
            for s in slices:
                parts.append(call_({name: array[s] for name, array in arrays.items()}))
                bar.update(s.stop - s.start)
        return self._response(concat(self.spec, parts))


class AsyncEnsembleClient(_ClientBase[Req, Resp]):
    """asyncio client on ``tritonclient.grpc.aio``: ``async with`` it, or ``await close()``.

    ``infer`` sends the batches of a long input concurrently, at most ``max_in_flight`` at a time; many
    concurrent ``infer`` calls on one client share its channel."""

    @property
    def connection(self):
        if self._connection is None:
            self._connection = connect_async(self.options)
        return self._connection

    async def close(self) -> None:
        if self._owns_connection and self._connection is not None:
            await self._connection.close()
            self._connection = None

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def is_ready(self) -> bool:
        return bool(await self.connection.is_model_ready(self.spec.name))

    async def metadata(self) -> dict:
        return await self.connection.get_model_metadata(self.spec.name, as_json=True)

    async def infer(self, request: Req, *, timeout_s: float | None = None, progress: Any = None,
                    max_batch: int | None = None, max_in_flight: int | None = None) -> Resp:
        arrays, n = encode_inputs(self.spec, self._columns(request))
        connection = self.connection
        if self._served is None:
            try:
                self._learn_outputs(await self.metadata())
            except Exception:  # noqa: BLE001 - the call itself will report an unreachable server
                pass

        async def call_(part):
            return await call_async(connection, self.spec.name, part, self.output_names, self.options,
                                    timeout_s, self.datatypes)

        if not self.spec.batched:
            return self._response(await call_(arrays))
        slices = batch_slices(n, self._batch_size(max_batch))
        gate = asyncio.Semaphore(max_in_flight or self.options.max_in_flight)
        with progress_bar(self.options.progress if progress is None else progress, n, len(slices),
                          self.spec.name) as bar:
            async def one(s: slice):
                async with gate:
                    out = await call_({name: array[s] for name, array in arrays.items()})
                bar.update(s.stop - s.start)
                return out

            tasks = [asyncio.ensure_future(one(s)) for s in slices]
            try:
                parts = await asyncio.gather(*tasks)
            except BaseException:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
        return self._response(concat(self.spec, list(parts)))


__all__ = [
    "ArrayInput", "AsyncEnsembleClient", "BytesInput", "ClientOptions", "DEFAULT_URL", "EnsembleClient",
    "EnsembleSpec", "NUMPY_DTYPES", "TLSOptions", "TensorSpec", "call", "call_async", "connect", "connect_async",
    "encode_inputs",
]
