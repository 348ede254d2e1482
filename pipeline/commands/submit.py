"""``winnow submit``: run any spec as a Ray job on a cluster, through Ray's job REST API.

The spec is checked here first (the same checks as a local run, before anything is sent), then
submitted with ``ray.job_submission.JobSubmissionClient``: the entrypoint is ``python -m jobs.run``
(the spec's ``kind:`` picks the command), the project folder travels as the job's working
directory (or, with ``--installed``, the cluster's installed winnow runs it), and the spec's text
travels in the job's environment, so the spec file need not exist on the cluster. Token
authentication is Ray's own: ``RAY_AUTH_MODE=token`` with the token in ``RAY_AUTH_TOKEN`` or its
token file adds the ``Authorization`` header; winnow never turns it off.
"""
from __future__ import annotations

import contextlib
import os
import shlex
import sys
import time
from dataclasses import dataclass

from pipeline.contract.errors import ClusterError, ConfigError

NAME = "submit"
DESCRIPTION = """\
Submit a spec to a Ray cluster as a job (checked here first, before anything is sent).

  winnow submit SPEC.yaml [--set dotted.key=value ...] [--address http://HEAD:8265]
                [--entrypoint-num-cpus N] [--entrypoint-num-gpus N] [--installed] [--follow]

--address falls back to RAY_ADDRESS. SPEC may itself be an s3:// or gs:// URL. Paths in the spec
are read on the cluster's nodes: give s3:// or gs:// URLs (each node needs the store's
credentials and endpoint in its own environment) or a mount every node has. Then:
  winnow jobs status ID | logs ID [--follow] | stop ID | list
"""

AGENT_WAIT_S = 60                      # how long a fresh cluster's job agent may take to come up
SPEC_ENV = "WINNOW_SPEC_YAML"          # the spec's text, in the job's environment
SPEC_NAME_ENV = "WINNOW_SPEC_NAME"     # its file name, for messages and the kind routing
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# never uploaded with the working directory: environments, outputs, caches, VCS data
EXCLUDES = [".venv", "venv", ".git", "demo_out", "out", "__pycache__", "*.egg-info", ".pytest_cache", "*.tar",
            "*.parquet", "*.safetensors", "*.ckpt", "*.pt", "*.pth", "*.mp4", "*.mkv"]


@dataclass
class Submission:
    address: str
    spec_path: str
    kind: str
    overrides: list[str]
    entrypoint_num_cpus: float | None = None
    entrypoint_num_gpus: float | None = None
    installed: bool = False
    submission_id: str | None = None
    follow: bool = False


def address_of(given: str | None) -> str:
    address = given or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ConfigError("--address: give the cluster's dashboard address (http://HEAD:8265) or set RAY_ADDRESS")
    if "://" not in address:
        if address.startswith("ray:") or address == "auto":
            raise ConfigError(f"--address: {address!r} is a driver address; jobs go to the dashboard, e.g. "
                              f"http://HEAD:8265")
        address = "http://" + address
    return address


def check_spec(spec_path: str, overrides: list[str]) -> str:
    """Load the spec exactly as ``winnow KIND`` would (raising ``ConfigError`` if it is bad) and
    return its kind. Nothing is created."""
    from pipeline import commands
    from pipeline.cli import parser_for
    from pipeline.contract import storage

    try:
        found = storage.isfile(spec_path)
    except OSError as exc:
        raise ConfigError(f"{spec_path}: {storage.redact(str(exc)).splitlines()[0]}") from None
    if not found:
        raise ConfigError(f"{spec_path}: no such spec file")
    kind = commands.command_of([spec_path])
    argv = [kind, spec_path, *[a for kv in overrides for a in ("--set", kv)]]
    commands.get(kind).from_args(parser_for(kind).parse_args(argv))
    return kind


@contextlib.contextmanager
def talking_to(address: str):
    """Ray's errors from the job API (unreachable, auth refused, unknown job) as one ``ClusterError``
    that names the address; the CLI prints it without a traceback."""
    try:
        yield
    except ClusterError:
        raise
    except Exception as exc:  # noqa: BLE001 - requests, Ray and HTTP errors alike
        hint = ""
        if "uthenticat" in str(exc):
            hint = " (token auth: set RAY_AUTH_MODE=token and the cluster's token in RAY_AUTH_TOKEN)"
        raise ClusterError(
            f"{address}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}{hint}"
        ) from exc


def client(address: str):
    """Ray's job client. Token auth is Ray's: with ``RAY_AUTH_MODE=token`` every request carries
    the token (``RAY_AUTH_TOKEN`` or Ray's token file). As Ray does for an explicit address, it is
    not switched on by guessing, and winnow never switches it off."""
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def entrypoint(sub: Submission) -> str:
    parts = ["python", "-m", "jobs.run", "--spec-env", SPEC_ENV]      # the cluster's python, as Ray runs jobs
    for kv in sub.overrides:
        parts += ["--set", kv]
    return " ".join(shlex.quote(p) for p in parts)


def runtime_env(sub: Submission) -> dict:
    from pipeline.contract import storage

    text = storage.read_text(sub.spec_path)
    env = {"env_vars": {SPEC_ENV: text, SPEC_NAME_ENV: storage.name(sub.spec_path)}}
    if not sub.installed:
        env["working_dir"] = ROOT
        env["excludes"] = EXCLUDES
    return env


def arguments(parser) -> None:
    from pipeline.commands import add_set_argument

    parser.add_argument("spec", help="job spec YAML (any kind: curate, train, sweep, select, curriculum)")
    add_set_argument(parser, "ray.num_cpus=64")
    parser.add_argument("--address", help="the cluster's dashboard, http://HEAD:8265 (default: RAY_ADDRESS)")
    parser.add_argument("--entrypoint-num-cpus", type=float, default=None, help="CPUs reserved for the driver")
    parser.add_argument("--entrypoint-num-gpus", type=float, default=None, help="GPUs reserved for the driver")
    parser.add_argument("--installed", action="store_true",
                        help="run the winnow installed on the cluster instead of uploading this project folder")
    parser.add_argument("--submission-id", default=None, help="a job id of your own (default: Ray picks one)")
    parser.add_argument("--follow", action="store_true", help="print the job's log until it ends")


def from_args(args) -> Submission:
    address = address_of(args.address)
    kind = check_spec(args.spec, args.set)
    for name in ("entrypoint_num_cpus", "entrypoint_num_gpus"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')}: must be 0 or more")
    return Submission(address, args.spec, kind, list(args.set), args.entrypoint_num_cpus, args.entrypoint_num_gpus,
                      args.installed, args.submission_id, args.follow)


def plan(sub: Submission) -> dict:
    return {"address": sub.address, "entrypoint": entrypoint(sub), "kind": sub.kind,
            "working_dir": None if sub.installed else ROOT}


def run(sub: Submission, log=None) -> dict:
    with talking_to(sub.address):
        return _run(sub, log)


def _run(sub: Submission, log=None) -> dict:
    c = client(sub.address)
    for attempt in range(AGENT_WAIT_S):
        try:
            job_id = c.submit_job(
                entrypoint=entrypoint(sub),
                runtime_env=runtime_env(sub),
                submission_id=sub.submission_id,
                entrypoint_num_cpus=sub.entrypoint_num_cpus,
                entrypoint_num_gpus=sub.entrypoint_num_gpus,
                metadata={"winnow_kind": sub.kind, "winnow_spec": os.path.basename(sub.spec_path.rstrip("/"))},
            )
            break
        except RuntimeError as exc:     # a cluster that just started: its job agent is not up yet
            if "try again later" not in str(exc) or attempt == AGENT_WAIT_S - 1:
                raise
            time.sleep(1.0)
    result = {"submission_id": job_id, "address": sub.address, "kind": sub.kind, "status": None}
    if sub.follow:
        result["status"] = follow(c, job_id, log or sys.stdout)
    return result


def format_summary(result: dict) -> str:
    lines = [f"winnow submit: {result['kind']} job {result['submission_id']} on {result['address']}"]
    if result["status"]:
        lines.append(f"  ended: {result['status']}")
    else:
        lines += [f"  winnow jobs status {result['submission_id']}",
                  f"  winnow jobs logs {result['submission_id']} --follow"]
    return "\n".join(lines)


def wait(c, job_id: str, timeout_s: float = 600.0, poll_s: float = 1.0) -> str:
    """Poll until the job ends; its final status."""
    t = time.monotonic()
    while True:
        status = c.get_job_status(job_id)            # a JobStatus: SUCCEEDED, FAILED, STOPPED end it
        if status.is_terminal():
            return status.value
        if time.monotonic() - t > timeout_s:
            raise TimeoutError(f"job {job_id} still {status.value} after {timeout_s:.0f} s")
        time.sleep(poll_s)


def follow(client, job_id: str, log=None) -> str:
    """Print the job's log as it grows until the job ends; its final status."""
    import asyncio

    log = log or sys.stdout

    async def tail():
        async for chunk in client.tail_job_logs(job_id):
            log.write(chunk)
            log.flush()

    asyncio.run(tail())
    return wait(client, job_id)
