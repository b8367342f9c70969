"""`python -m builder_job --request FILE [--result FILE]`.

The last stdout line is the BuildResult as one line of JSON; it also goes to
/dev/termination-log when that exists (the operator reads it from the pod's
status) and to --result when given. Exit 0: Succeeded (a cache hit too);
1: Failed in a way a retry may fix (a store, the node, an unforeseen error);
2: the request file cannot be read or is not a valid BuildRequest;
3: Failed in a way every retry repeats (invalid model, gate failed, ...): the
builder Job's podFailurePolicy fails the Job on 2 and 3 without retrying.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from pydantic import ValidationError

from optimodel.manifest import field_errors

from optimodel.build import (EXIT_BAD_REQUEST, EXIT_FAILED, EXIT_OK, EXIT_WILL_FAIL_AGAIN,  # noqa: F401
                             TERMINATION_LOG, BuildReason, BuildRequest, BuildResult, exit_code_for)

# tests and local runs point this elsewhere; a pod has /dev/termination-log
TERMINATION_LOG_ENV = "OPTIMODEL_TERMINATION_LOG"
PROFILE_SECONDS_ENV = "OPTIMODEL_PROFILE_SECONDS"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m builder_job", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--request", required=True, type=Path, help="BuildRequest JSON file")
    parser.add_argument("--result", type=Path, help="also write the result line here")
    parser.add_argument("--workdir", type=Path, help="keep intermediate files here (debugging)")
    return parser.parse_args(argv)


def read_request(path: Path) -> BuildRequest:
    """The request, or ValueError naming the file and the offending field."""
    try:
        raw = json.loads(path.read_text())
    except OSError as exc:
        raise ValueError(f"cannot read build request {path}: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"build request {path} is not JSON: {exc}") from exc
    try:
        return BuildRequest.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"field '{err.path or '(root)'}': {err.message}" for err in field_errors(exc))
        raise ValueError(f"build request {path} is invalid: {problems}") from exc


def emit(result: BuildResult, result_file: Path | None) -> None:
    line = result.line()
    for target in filter(None, [result_file, Path(os.environ.get(TERMINATION_LOG_ENV, TERMINATION_LOG))]):
        if target == result_file or target.exists():
            try:
                target.write_text(line + "\n")
            except OSError as exc:
                print(f"[builder] cannot write the result to {target}: {exc}", file=sys.stderr)
    sys.stderr.flush()
    print(line, flush=True)


def _raw_cache_key(path: Path) -> str:
    try:
        value = json.loads(path.read_text()).get("cacheKey", "")
        return value if isinstance(value, str) else ""
    except Exception:
        return ""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        request = read_request(args.request)
    except ValueError as exc:
        print(f"[builder] {exc}", file=sys.stderr)
        emit(BuildResult(state="Failed", reason=BuildReason.INVALID_REQUEST, cache_key=_raw_cache_key(args.request),
                         message=str(exc)), args.result)
        return EXIT_BAD_REQUEST

    from builder_job.pipeline import BuildOptions, run_build
    from builder_job.profile import ProfileSettings

    options = BuildOptions(workdir=args.workdir)
    if os.environ.get(PROFILE_SECONDS_ENV):
        options.profiling = ProfileSettings(seconds_per_batch=float(os.environ[PROFILE_SECONDS_ENV]))
    result = run_build(request, options=options)
    emit(result, args.result)
    return EXIT_OK if result.state == "Succeeded" else exit_code_for(result.reason)


def exit_on_sigterm() -> None:
    """SIGTERM ends the build with exit 143, unwinding through the stages' cleanup (an artifact
    cut short has no manifest, so no reader trusts it).

    As a container's PID 1 the kernel drops a signal that has no handler: without this, a deleted
    builder pod would hang until its grace period ends in SIGKILL."""
    def stop(signum, _frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, stop)


if __name__ == "__main__":
    exit_on_sigterm()
    sys.exit(main())
