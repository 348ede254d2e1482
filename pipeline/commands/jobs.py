"""``winnow jobs``: the Ray jobs of a cluster (``winnow submit``'s and others): list, status, logs, stop."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.contract.config import ConfigError

NAME = "jobs"
DESCRIPTION = """\
The Ray jobs of a cluster.

  winnow jobs list [--address http://HEAD:8265]
  winnow jobs status ID
  winnow jobs logs ID [--follow]
  winnow jobs stop ID

--address falls back to RAY_ADDRESS.
"""

ACTIONS = ("list", "status", "logs", "stop")


@dataclass
class JobsCall:
    action: str
    address: str
    job_id: str | None
    follow: bool = False


def arguments(parser) -> None:
    parser.add_argument("action", choices=ACTIONS)
    parser.add_argument("job_id", nargs="?", help="the submission id (list takes none)")
    parser.add_argument("--address", help="the cluster's dashboard, http://HEAD:8265 (default: RAY_ADDRESS)")
    parser.add_argument("--follow", action="store_true", help="logs: keep printing until the job ends")


def from_args(args) -> JobsCall:
    from pipeline.commands.submit import address_of

    if args.action != "list" and not args.job_id:
        raise ConfigError(f"winnow jobs {args.action}: give the job's submission id (winnow jobs list shows them)")
    return JobsCall(args.action, address_of(args.address), args.job_id, args.follow)


def plan(call: JobsCall) -> dict:
    return {"action": call.action, "address": call.address, "job_id": call.job_id}


def run(call: JobsCall, log=None):
    from pipeline.commands.submit import talking_to

    with talking_to(call.address):
        return _run(call, log)


def _run(call: JobsCall, log=None):
    from pipeline.commands.submit import client

    c = client(call.address)
    if call.action == "list":
        return [(j.submission_id, j.status.value, j.entrypoint, (j.metadata or {}).get("winnow_spec", ""))
                for j in c.list_jobs() if j.submission_id]
    if call.action == "status":
        info = c.get_job_info(call.job_id)
        return {"job": call.job_id, "status": info.status.value, "message": info.message or ""}
    if call.action == "logs":
        from pipeline.commands.submit import follow

        if call.follow:
            return {"job": call.job_id, "status": follow(c, call.job_id, log), "logs": ""}
        return {"job": call.job_id, "logs": c.get_job_logs(call.job_id)}
    stopped = c.stop_job(call.job_id)
    return {"job": call.job_id, "stopped": bool(stopped)}


def format_summary(result) -> str:
    if isinstance(result, list):
        if not result:
            return "no jobs"
        return "\n".join(f"{sid}  {status:<9}  {spec or entry}" for sid, status, entry, spec in result)
    if "logs" in result:
        return result["logs"].rstrip() if result["logs"] else f"job {result['job']} ended: {result.get('status')}"
    if "stopped" in result:
        return f"job {result['job']}: " + ("stop requested" if result["stopped"] else "had already ended")
    return f"job {result['job']}: {result['status']}" + (f" ({result['message']})" if result["message"] else "")
