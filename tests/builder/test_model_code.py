"""spec.model.code: the code a `pytorch` entrypoint imports reaches the builder as a .py file
or an archive, checksummed like the model, and only then can the module be imported.

Each test gives its module a name of its own: the builder runs in this process here,
and a module imported once stays in sys.modules."""

from __future__ import annotations

import io
import tarfile
import uuid
import zipfile
from pathlib import Path

import pytest

from optimodel.build import BuildReason
from optimodel.cache_key import file_sha256
from optimodel.spec import ModelCode

from builder_job import fetch
from builder_job.errors import BuildError
from builder_job.load import build_entrypoint

from .conftest import ROOT, published_files

CODE = (ROOT / "examples" / "digits_cnn.py").read_text()


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def test_py_file_builds_a_pytorch_source_the_manifest_folder_does_not_hold(make_request, build, digits_build,
                                                                           tmp_path):
    module = unique("cnn")
    code = tmp_path / "code" / f"{module}.py"
    code.parent.mkdir()
    code.write_text(CODE)
    request = make_request(uri=f"file://{digits_build}/digits_cnn.pt", fmt="pytorch",
                           entrypoint=f"{module}:build_model",
                           code={"uri": f"file://{code}", "sha256": file_sha256(code)})
    result = build(request)
    assert (result.state, result.reason) == ("Succeeded", "Succeeded"), result.message


def test_without_code_the_module_is_not_found_and_the_message_says_so(make_request, build, digits_build, store):
    module = unique("cnn")
    result = build(make_request(uri=f"file://{digits_build}/digits_cnn.pt", fmt="pytorch",
                                entrypoint=f"{module}:build_model"))
    assert (result.state, result.reason) == ("Failed", BuildReason.INVALID_MODEL)
    assert module in result.message and "spec.model.code" in result.message
    assert published_files(store) == []


def _zip(path: Path, files: dict[str, str]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return path


def _tar(path: Path, files: dict[str, str]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("pack, suffix", [(_zip, ".zip"), (_tar, ".tar.gz")])
def test_archive_of_a_package(pack, suffix, tmp_path):
    package = unique("models")
    archive = pack(tmp_path / f"code{suffix}", {f"{package}/__init__.py": "", f"{package}/cnn.py": CODE})
    root = fetch.fetch_code(ModelCode(uri=f"file://{archive}"), tmp_path / "work", None)
    module = build_entrypoint(f"{package}.cnn:build_model", str(root))
    assert type(module).__name__ == "Sequential"
    assert root.is_relative_to(tmp_path / "work")


def test_archive_reaching_out_of_its_folder_is_refused(tmp_path):
    archive = _tar(tmp_path / "code.tar.gz", {"../escaped.py": "x = 1"})
    with pytest.raises(BuildError) as err:
        fetch.fetch_code(ModelCode(uri=f"file://{archive}"), tmp_path / "work", None)
    assert err.value.reason == BuildReason.INVALID_MODEL and "code.tar.gz" in err.value.message
    assert not (tmp_path / "work" / "escaped.py").exists()


def test_code_checksum_mismatch(tmp_path):
    code = tmp_path / "cnn.py"
    code.write_text(CODE)
    with pytest.raises(BuildError) as err:
        fetch.fetch_code(ModelCode(uri=f"file://{code}", sha256="0" * 64), tmp_path / "work", None)
    assert err.value.reason == BuildReason.CHECKSUM_MISMATCH and file_sha256(code) in err.value.message


def test_missing_code_file_is_fetch_failed(tmp_path):
    with pytest.raises(BuildError) as err:
        fetch.fetch_code(ModelCode(uri=f"file://{tmp_path}/absent.py"), tmp_path / "work", None)
    assert err.value.reason == BuildReason.FETCH_FAILED and "model code" in err.value.message
