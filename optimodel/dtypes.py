"""Tensor dtypes: the names a TensorSpec declares, and the same types in numpy, ONNX and the
Open Inference Protocol (v2). One table for the builder and the server."""

from __future__ import annotations

import numpy as np

# spec dtype -> numpy dtype (the spec's names are numpy's; "string" is v2 BYTES, held as Python objects)
NUMPY_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32), "int8": np.dtype(np.int8), "uint8": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_), "string": np.dtype(np.object_),
}

# onnx.TensorProto element type -> numpy dtype, spelled out so that no caller needs to import onnx
ONNX_NUMPY: dict[int, np.dtype] = {1: np.dtype(np.float32), 2: np.dtype(np.uint8), 3: np.dtype(np.int8),
                                   5: np.dtype(np.int16), 6: np.dtype(np.int32), 7: np.dtype(np.int64),
                                   9: np.dtype(np.bool_), 10: np.dtype(np.float16), 11: np.dtype(np.float64)}
# onnx element type -> spec dtype, for the numeric types a TensorSpec can declare
ONNX_ELEM_TYPES: dict[int, str] = {k: v.name for k, v in ONNX_NUMPY.items() if v.name in NUMPY_DTYPES}

# spec dtype -> v2 datatype, and every v2 datatype numpy can hold -> numpy dtype
V2_DATATYPE: dict[str, str] = {"float32": "FP32", "float16": "FP16", "int64": "INT64", "int32": "INT32",
                               "int8": "INT8", "uint8": "UINT8", "bool": "BOOL", "string": "BYTES"}
V2_NUMPY: dict[str, np.dtype] = {
    "FP32": np.dtype(np.float32), "FP16": np.dtype(np.float16), "FP64": np.dtype(np.float64),
    "INT64": np.dtype(np.int64), "INT32": np.dtype(np.int32), "INT16": np.dtype(np.int16),
    "INT8": np.dtype(np.int8), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64), "BOOL": np.dtype(np.bool_),
    "BYTES": np.dtype(np.object_),
}
