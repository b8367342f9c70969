"""The helpers every component shares from optimodel: CPU quota, the batch-size ladder, dtype tables,
and the one way a pydantic error becomes a field path."""

from __future__ import annotations

import math
import os
from typing import get_args

import numpy as np
import pytest
from pydantic import ValidationError

from optimodel.batching import batch_size_ladder
from optimodel.build import BuildRequest
from optimodel.cpu import cpu_quota
from optimodel.dtypes import NUMPY_DTYPES, ONNX_ELEM_TYPES, ONNX_NUMPY, V2_DATATYPE, V2_NUMPY
from optimodel.manifest import field_errors
from optimodel.spec import DType

AFFINITY = len(os.sched_getaffinity(0))


@pytest.mark.parametrize("cpu_max, expected", [
    ("100000 100000", 1),
    ("50000 100000", 1),  # half a CPU still needs one thread
    ("150000 100000", min(AFFINITY, 2)),
    ("max 100000", AFFINITY),
    ("6400000 100000", AFFINITY),  # a quota above the cores this process may use
])
def test_cpu_quota_from_cgroup_v2(tmp_path, cpu_max, expected):
    (tmp_path / "cpu.max").write_text(cpu_max + "\n")
    assert cpu_quota(tmp_path) == expected


def test_cpu_quota_from_cgroup_v1_and_without_cgroup(tmp_path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_quota(tmp_path) == 1
    assert cpu_quota(tmp_path / "absent") == AFFINITY


@pytest.mark.parametrize("largest", [1, 3, 8, 12, 32])
def test_batch_sizes_are_powers_of_two_up_to_the_max(largest):
    sizes = batch_size_ladder(largest)
    assert sizes[0] == 1 and sizes[-1] == largest
    assert all(b == 2 ** i for i, b in enumerate(sizes[:-1]))
    assert sizes == sorted(set(sizes))
    assert len(sizes) == math.ceil(math.log2(largest)) + 1 if largest > 1 else sizes == [1]


def test_cpu_quota_reads_cgroup_v2_and_v1(tmp_path):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert cpu_quota(v2) == min(2, len(__import__("os").sched_getaffinity(0)))
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cpu_quota(v2) == len(__import__("os").sched_getaffinity(0))
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("50000")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert cpu_quota(v1) == 1


@pytest.mark.parametrize("largest", [1, 3, 8, 12, 32])
def test_batch_size_ladder_is_powers_of_two_up_to_the_max(largest):
    sizes = batch_size_ladder(largest)
    assert sizes[0] == 1 and sizes[-1] == largest
    assert all(b == 2 ** i for i, b in enumerate(sizes[:-1]))
    assert sizes == sorted(set(sizes))
    assert len(sizes) == math.ceil(math.log2(largest)) + 1 if largest > 1 else sizes == [1]
    assert batch_size_ladder(24) == [1, 2, 4, 8, 16, 24]


def test_dtype_tables_agree_on_every_spec_dtype():
    assert set(NUMPY_DTYPES) == set(get_args(DType)) == set(V2_DATATYPE)
    for name, dtype in NUMPY_DTYPES.items():
        assert V2_NUMPY[V2_DATATYPE[name]] == dtype
    for elem, name in ONNX_ELEM_TYPES.items():
        assert NUMPY_DTYPES[name] == ONNX_NUMPY[elem]
    assert NUMPY_DTYPES["float32"] == np.float32 and ONNX_ELEM_TYPES[1] == "float32"


def test_field_errors_name_the_field_as_the_manifest_writes_it():
    with pytest.raises(ValidationError) as err:
        BuildRequest.model_validate({"modelName": "m", "cacheKey": "k", "maxBatchSize": 0,
                                     "source": {"uri": "file:///m.onnx",
                                                "inputs": [{"name": "x", "dtype": "float99", "shape": [-1]}]}})
    paths = {e.path for e in field_errors(err.value)}
    assert {"source.inputs[0].dtype", "maxBatchSize", "target"} <= paths
    assert {e.path for e in field_errors(err.value, prefix="spec")} >= {"spec.source.inputs[0].dtype"}
