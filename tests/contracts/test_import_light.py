"""The contract package stays a contract: importing the API types (and building the CLI's parser)
pulls in no inference runtime, no client and none of the local-run or demo code."""

from __future__ import annotations

import json
import subprocess
import sys

API_MODULES = ["optimodel", "optimodel.spec", "optimodel.artifact", "optimodel.build", "optimodel.batching",
               "optimodel.manifest", "optimodel.cache_key", "optimodel.storage", "optimodel.target",
               "optimodel.crd", "optimodel.dataset", "optimodel.cli"]
HEAVY = ["tritonclient", "onnxruntime", "onnx", "torch", "httptools", "uvloop", "matplotlib", "optimodel_local.run",
         "optimodel_local.command", "optimodel_local.demo.main",
         "builder_job", "serving_image", "optimodel_operator"]


def test_api_types_import_no_runtime_client_or_local_code():
    code = (f"import importlib, json, sys\n"
            f"for name in {API_MODULES!r}: importlib.import_module(name)\n"
            f"import optimodel.cli; optimodel.cli.build_parser()\n"
            f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
