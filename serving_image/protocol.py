"""Open Inference Protocol (v2) REST: request parsing, validation and response encoding.

Pure functions over bytes and numpy arrays, so every bad-input case is a unit test
away and the HTTP layer stays a thin shell. Everything is validated here, before a
request reaches the batcher: a bad request must never be packed into a batch where
it could fail its neighbours.

Binary tensor data extension (what tritonclient[http] sends with binary_data=True):
the body is a JSON header of `Inference-Header-Content-Length` bytes followed by the
raw tensors, in input order, each `parameters.binary_data_size` bytes long.

BYTES tensors (a manifest dtype "string") are JSON strings in the JSON form and, in the
binary form, each element as a 4-byte little-endian length then its bytes (Triton's
layout). Inside the server they are numpy object arrays of str (what ONNX Runtime's
tensor(string) takes), so elements must be UTF-8.
"""

from __future__ import annotations

import array
import math
import zlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import orjson

from optimodel.dtypes import V2_DATATYPE, V2_NUMPY
from optimodel.spec import TensorSpec

HEADER_LENGTH = "Inference-Header-Content-Length"

# v2 datatype <-> numpy dtype: the shared tables (the builder uses the same)
NUMPY_DTYPE = V2_NUMPY
_NP_TO_V2 = {v: k for k, v in NUMPY_DTYPE.items()}


def _utf8(value: bytes, name: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"input '{name}': BYTES element is not UTF-8 text ({exc.reason} at byte "
                            f"{exc.start}); this model takes text") from None


def decode_bytes_tensor(raw: bytes | memoryview, count: int, name: str) -> np.ndarray:
    """count length-prefixed elements (uint32 LE length, then the bytes) filling raw exactly."""
    raw = bytes(raw)
    out, offset = [], 0
    for i in range(count):
        if offset + 4 > len(raw):
            raise ProtocolError(f"input '{name}': BYTES data ends at element {i} of {count}")
        length = int.from_bytes(raw[offset:offset + 4], "little")
        offset += 4
        if offset + length > len(raw):
            raise ProtocolError(f"input '{name}': BYTES element {i} claims {length} bytes, "
                                f"{len(raw) - offset} are left")
        out.append(_utf8(raw[offset:offset + length], name))
        offset += length
    if offset != len(raw):
        raise ProtocolError(f"input '{name}': {len(raw) - offset} bytes after the last of {count} BYTES elements")
    arr = np.empty(count, dtype=object)
    arr[:] = out
    return arr


def encode_bytes_tensor(arr: np.ndarray) -> bytes:
    parts = []
    for v in arr.ravel():
        b = v.encode("utf-8") if isinstance(v, str) else bytes(v)
        parts += [len(b).to_bytes(4, "little"), b]
    return b"".join(parts)


class ProtocolError(Exception):
    """A request the server refuses; `status` is the HTTP status, the message names the problem."""

    def __init__(self, message: str, status: int = 400, reason: str = "bad_request"):
        super().__init__(message)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class ModelIO:
    """What the server validates requests against: the manifest's tensors plus policy."""

    name: str
    inputs: Sequence[TensorSpec]
    outputs: Sequence[TensorSpec]
    # TensorSpec cannot declare whether NaN/Inf is acceptable; no model this server
    # runs (classifiers, embedders) wants them, so they are refused unless allowed.
    allow_non_finite: bool = False

    def __post_init__(self):
        object.__setattr__(self, "_inputs", {t.name: t for t in self.inputs})
        object.__setattr__(self, "_outputs", {t.name: t for t in self.outputs})
        # per input, what every request is checked against, looked up once per model, not per request
        object.__setattr__(self, "_plans", {t.name: _InputPlan(t) for t in self.inputs})

    def plan(self, name: str) -> "_InputPlan | None":
        return self._plans.get(name)  # type: ignore[attr-defined]

    def input(self, name: str) -> TensorSpec | None:
        return self._inputs.get(name)  # type: ignore[attr-defined]

    def output(self, name: str) -> TensorSpec | None:
        return self._outputs.get(name)  # type: ignore[attr-defined]


# numpy dtype -> array module typecode of the same item size and kind. array.array(code, list)
# converts a JSON list in C and refuses str, None, lists and objects with TypeError (and values out
# of range with OverflowError); only bools slip through, which the caller rules out first.
_ARRAY_CODES = {np.dtype(dt): code for code in "bBhHiIlLqQfd"
                for dt in (np.dtype(f"{'f' if code in 'fd' else 'u' if code.isupper() else 'i'}"
                                    f"{array.array(code).itemsize}"),)}


class _InputPlan:
    """One model input's checks, precomputed: its spec, v2 datatype, numpy dtype, array typecode."""

    __slots__ = ("spec", "datatype", "dtype", "array_code", "rank", "check_finite")

    def __init__(self, spec: TensorSpec):
        self.spec = spec
        self.datatype = V2_DATATYPE[spec.dtype]
        self.dtype = NUMPY_DTYPE[self.datatype]
        self.array_code = _ARRAY_CODES.get(self.dtype)
        self.rank = len(spec.shape)
        self.check_finite = self.dtype.kind == "f"


@dataclass
class InferRequest:
    id: str | None
    inputs: dict[str, np.ndarray]
    batch: int
    # (name, binary) for each output to return, in response order
    outputs: list[tuple[str, bool]] = field(default_factory=list)


def decode_body(body: bytes, content_encoding: str | None, limit: int) -> bytes:
    """Undo a request Content-Encoding (tritonclient can gzip/deflate), bounded by limit."""
    if not content_encoding or content_encoding == "identity":
        return body
    if content_encoding not in ("gzip", "deflate"):
        raise ProtocolError(f"unsupported Content-Encoding '{content_encoding}'; use gzip, deflate or none", 415,
                            "unsupported_encoding")
    wbits = 16 + zlib.MAX_WBITS if content_encoding == "gzip" else zlib.MAX_WBITS
    try:
        inflater = zlib.decompressobj(wbits)
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise ProtocolError(f"body is not valid {content_encoding} data: {exc}") from exc
    if len(out) > limit:
        raise ProtocolError(f"decompressed body exceeds the limit of {limit} bytes", 413, "body_too_large")
    return out


def _loads(raw: bytes | memoryview) -> Any:
    # orjson: about 10x the stdlib's speed on a float array (the largest single cost of a
    # JSON request in a profile of the MLP); strict JSON (no NaN), nesting capped at 1024
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if "depth" in str(exc) or "recursion" in str(exc):
            raise ProtocolError(f"the inference request is nested too deeply to parse ({exc})") from None
        raise ProtocolError(f"malformed JSON in the inference request: {exc}") from exc
    except RecursionError:
        raise ProtocolError("the inference request is nested too deeply to parse") from None


# Python types a JSON "data" list may hold per v2 datatype kind. JSON strings and
# booleans are refused for numbers: numpy would quietly read "1.5" or true as 1.5 / 1.0.
_JSON_LEAF_TYPES = {"f": frozenset((float, int)), "i": frozenset((int,)), "u": frozenset((int,)),
                    "b": frozenset((bool,)), "O": frozenset((str,))}
_KIND_WORDS = {"f": "numbers", "i": "integers", "u": "integers", "b": "true/false", "O": "strings"}


def _json_array(data: Any, dtype: np.dtype, name: str, rank: int, array_code: str | None = None) -> np.ndarray:
    """array_code: the array module typecode of dtype, given only when the JSON holds no true/false."""
    if not isinstance(data, list):
        raise ProtocolError(f"input '{name}': 'data' must be a list")
    leaves = data if not data or not isinstance(data[0], list) else _flatten(data, rank, name)
    if array_code is not None:
        # one C pass that converts and type-checks at once: the type set and np.asarray below were two
        # passes over the list (5 us each for the MLP's 256 floats); anything it refuses takes the
        # careful path, which names the problem
        try:
            return np.frombuffer(array.array(array_code, leaves), dtype=dtype)
        except (TypeError, OverflowError):
            pass
    # set(map(type, ...)) runs in C: a few microseconds for the MLP's 256 floats
    types = set(map(type, leaves))
    allowed = _JSON_LEAF_TYPES[dtype.kind]
    if not types <= allowed:
        bad = sorted(t.__name__ for t in types - allowed)
        raise ProtocolError(f"input '{name}': {_NP_TO_V2[dtype]} data must hold {_KIND_WORDS[dtype.kind]} "
                            f"only, got {', '.join('list' if b == 'list' else b for b in bad)} values")
    if dtype.kind == "O":  # np.asarray would make a fixed-width unicode array; the engine wants objects
        arr = np.empty(len(leaves), dtype=object)
        arr[:] = leaves
        return arr
    try:
        arr = np.asarray(leaves, dtype=dtype)
    except (ValueError, TypeError, OverflowError) as exc:
        raise ProtocolError(f"input '{name}': data cannot be read as {_NP_TO_V2[dtype]}: {exc}") from exc
    return arr


def _flatten(data: list, rank: int, name: str) -> list:
    """Leaves of nested data, one nesting level per dimension at most; ragged or deeper data is refused."""
    level = data
    for _ in range(rank):
        if not level or not isinstance(level[0], list):
            break
        if not all(isinstance(v, list) for v in level):
            raise ProtocolError(f"input '{name}': data is ragged (nested lists of unequal length)")
        if len({len(v) for v in level}) > 1:
            raise ProtocolError(f"input '{name}': data is ragged (nested lists of unequal length)")
        level = [x for v in level for x in v]
    if level and isinstance(level[0], list):
        raise ProtocolError(f"input '{name}': data is nested deeper than the tensor's rank {rank}")
    return level


_INT_ONLY = frozenset((int,))


def _check_shape(name: str, shape: Any, spec: TensorSpec, max_batch: int) -> tuple[int, ...]:
    # set(map(type)) rather than a generator: no object the cyclic GC tracks (young collections were
    # 2 % of the event loop's samples, triggered by such per-request containers)
    if type(shape) is not list or not set(map(type, shape)) <= _INT_ONLY:
        raise ProtocolError(f"input '{name}': shape must be a list of integers, got {shape!r}")
    if len(shape) != len(spec.shape):
        raise ProtocolError(f"input '{name}': shape {shape} has rank {len(shape)}, the model expects "
                            f"rank {len(spec.shape)} {spec.shape}")
    if shape and min(shape) < 1:
        axis = next(i for i, got in enumerate(shape) if got < 1)
        raise ProtocolError(f"input '{name}': dimension {axis} is {shape[axis]}; dimensions must be positive")
    for axis, want in enumerate(spec.shape):
        if want != -1 and shape[axis] != want:
            raise ProtocolError(f"input '{name}': shape {shape} does not match the model's {spec.shape} "
                                f"(dimension {axis} must be {want})")
    if shape[0] > max_batch:
        raise ProtocolError(f"input '{name}': batch size {shape[0]} exceeds maxBatchSize {max_batch}")
    return tuple(shape)


def parse_infer_request(body: bytes, header_length: int | str | None, model: ModelIO,
                        max_batch: int) -> InferRequest:
    """Validate a v2 infer request (JSON or binary extension) into arrays ready for the batcher."""
    if header_length is not None and header_length != "" and header_length != b"":
        text = header_length.decode("latin-1") if isinstance(header_length, bytes) else str(header_length)
        # plain ASCII digits only: int() would also take " 153 ", "+153" and "1_53"
        if not (text.isascii() and text.isdigit()):
            raise ProtocolError(f"{HEADER_LENGTH} must be an integer (digits only), got {text!r}")
        hlen = int(text)
        if hlen < 0 or hlen > len(body):
            raise ProtocolError(f"{HEADER_LENGTH} is {hlen} but the body has only {len(body)} bytes")
    else:
        hlen = len(body)
    view = memoryview(body)
    header = _loads(view[:hlen])
    if not isinstance(header, dict):
        raise ProtocolError("the inference request must be a JSON object")
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError("'id' must be a string")
    params = header.get("parameters") or {}
    if not isinstance(params, dict):
        raise ProtocolError("'parameters' must be an object")
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise ProtocolError("'inputs' must be a non-empty list")

    offset = hlen
    inputs: dict[str, np.ndarray] = {}
    batch = None
    no_bools = None  # whether the JSON header holds no true/false token, found once when needed
    for item in raw_inputs:
        if not isinstance(item, dict):
            raise ProtocolError("each entry of 'inputs' must be an object")
        name = item.get("name")
        plan = model.plan(name) if isinstance(name, str) else None
        if plan is None:
            expected = ", ".join(t.name for t in model.inputs)
            raise ProtocolError(f"unknown input '{name}'; model '{model.name}' expects: {expected}")
        if name in inputs:
            raise ProtocolError(f"input '{name}' is given twice")
        spec, want_dt, dtype = plan.spec, plan.datatype, plan.dtype
        if item.get("datatype") != want_dt:
            raise ProtocolError(f"input '{name}': datatype {item.get('datatype')!r} does not match the model's {want_dt}")
        shape = _check_shape(name, item.get("shape"), spec, max_batch)
        count = math.prod(shape)
        iparams = item.get("parameters") or {}
        if not isinstance(iparams, dict):
            raise ProtocolError(f"input '{name}': 'parameters' must be an object")
        size = iparams.get("binary_data_size")
        if size is not None:
            if "data" in item:
                raise ProtocolError(f"input '{name}' has both 'data' and binary_data_size")
            if not isinstance(size, int) or size < 0:
                raise ProtocolError(f"input '{name}': binary_data_size must be a non-negative integer")
            if offset + size > len(body):
                raise ProtocolError(f"input '{name}': binary_data_size {size} runs past the end of the body "
                                    f"({len(body) - offset} bytes left)")
            if dtype.kind == "O":
                arr = decode_bytes_tensor(view[offset:offset + size], count, name).reshape(shape)
            elif size != count * dtype.itemsize:
                raise ProtocolError(f"input '{name}': {size} bytes of binary data hold "
                                    f"{size / dtype.itemsize:g} {want_dt} elements, shape {list(shape)} needs {count}")
            else:
                arr = np.frombuffer(body, dtype=dtype, count=count, offset=offset).reshape(shape)
            offset += size
        else:
            if "data" not in item:
                raise ProtocolError(f"input '{name}' has neither 'data' nor binary_data_size")
            code = plan.array_code
            if code is not None:
                if no_bools is None:
                    # true has an r and false an l, and no JSON number has either: two memchr scans
                    # (0.3 us each; searching for "true" itself took 4 us over the MLP's 5 kB). A body
                    # with an r or l anywhere (a key, a name) only takes the careful path
                    head = body if hlen == len(body) else view[:hlen].tobytes()
                    no_bools = b"r" not in head and b"l" not in head
                if not no_bools:
                    code = None
            arr = _json_array(item["data"], dtype, name, plan.rank, code)
            if arr.size != count:
                raise ProtocolError(f"input '{name}': data has {arr.size} elements, shape {list(shape)} needs {count}")
            arr = arr.reshape(shape)
        if plan.check_finite and not model.allow_non_finite and not np.isfinite(arr).all():
            raise ProtocolError(f"input '{name}' contains NaN or Inf, which this model does not accept")
        if batch is None:
            batch = shape[0]
        elif shape[0] != batch:
            raise ProtocolError(f"input '{name}': batch size {shape[0]} differs from the other inputs' {batch}")
        inputs[name] = arr
    if offset != len(body):
        raise ProtocolError(f"{len(body) - offset} bytes of binary data after the last input are not "
                            f"claimed by any binary_data_size")
    # every name in inputs is known and given once, so the count says whether one is missing
    if len(inputs) != len(model.inputs):
        missing = [t.name for t in model.inputs if t.name not in inputs]
        raise ProtocolError(f"missing input(s) {', '.join(missing)} for model '{model.name}'")

    default_binary = bool(params.get("binary_data_output", False))
    raw_outputs = header.get("outputs")
    outputs: list[tuple[str, bool]] = []
    if raw_outputs is None:
        outputs = [(t.name, default_binary) for t in model.outputs]
    else:
        if not isinstance(raw_outputs, list):
            raise ProtocolError("'outputs' must be a list")
        for item in raw_outputs:
            name = item.get("name") if isinstance(item, dict) else None
            if not isinstance(name, str) or model.output(name) is None:
                expected = ", ".join(t.name for t in model.outputs)
                raise ProtocolError(f"unknown output '{name}'; model '{model.name}' has: {expected}")
            oparams = item.get("parameters") or {}
            if not isinstance(oparams, dict):
                raise ProtocolError(f"output '{name}': 'parameters' must be an object")
            if "classification" in oparams:
                raise ProtocolError("the classification extension is not supported")
            outputs.append((name, bool(oparams.get("binary_data", default_binary))))
    return InferRequest(id=request_id, inputs=inputs, batch=batch or 0, outputs=outputs)


def encode_infer_response(model_name: str, request: InferRequest, results: dict[str, np.ndarray],
                          model_version: str = "1") -> tuple[bytes, int | None]:
    """(body, header length) of the v2 response; header length is None for pure JSON."""
    out_meta = []
    blobs = []
    for name, binary in request.outputs:
        arr = results[name]
        entry: dict[str, Any] = {"name": name, "datatype": _NP_TO_V2[arr.dtype], "shape": list(arr.shape)}
        if not binary and arr.dtype.kind == "f" and not np.isfinite(arr).all():
            # JSON has no NaN/Infinity: writing them would send a body no JSON parser accepts
            raise ProtocolError(f"output '{name}' holds NaN or Inf, which JSON cannot carry; request it with "
                                f"parameters.binary_data = true to receive the raw values", 400, "non_finite_output")
        if binary:
            blob = encode_bytes_tensor(arr) if arr.dtype.kind == "O" else np.ascontiguousarray(arr).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif arr.dtype.kind == "O":
            entry["data"] = [v if isinstance(v, str) else bytes(v).decode("utf-8", "replace") for v in arr.ravel()]
        else:
            entry["data"] = arr.ravel()  # orjson writes numpy arrays without a Python list in between
        out_meta.append(entry)
    response: dict[str, Any] = {"model_name": model_name, "model_version": model_version, "outputs": out_meta}
    if request.id is not None:
        response["id"] = request.id
    head = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)


def error_body(message: str) -> bytes:
    return orjson.dumps({"error": message})


def tensor_metadata(specs: Sequence[TensorSpec]) -> list[dict[str, Any]]:
    return [{"name": t.name, "datatype": V2_DATATYPE[t.dtype], "shape": list(t.shape)} for t in specs]
