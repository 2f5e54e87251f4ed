"""`sluice`: run the embedded stack, workers, and talk to the API."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import click
import httpx

from tasks.names import PERIODIC_TASKS

DEFAULT_API = "http://127.0.0.1:8000"
INGESTABLE_SKIP = {".DS_Store"}


@click.group()
@click.version_option(package_name="sluice")
def main() -> None:
    """Sluice: upload documents, ask questions; a job system that never loses a job."""


def _set_data_dir(data_dir: Path | None) -> None:
    if data_dir is not None:
        # Children and this process's settings both read it from the environment.
        os.environ["SLUICE_DATA_DIR"] = str(data_dir.resolve())
        from sluice.settings import get_settings

        get_settings.cache_clear()


@main.command()
@click.option("--data-dir", type=click.Path(path_type=Path), default=None)
def migrate(data_dir: Path | None) -> None:
    """Upgrade the database to the newest schema."""
    _set_data_dir(data_dir)
    from sluice import migrate as migrations
    from sluice.db import get_engine

    migrations.upgrade(get_engine())
    click.echo(f"database at revision {migrations.head_revision()}")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="Where the embedded database, broker and blobs live [default: ./.sluice]")
def up(host: str, port: int, data_dir: Path | None) -> None:
    """Run everything on one machine: API, a worker for every queue, and beat."""
    _set_data_dir(data_dir)
    from sluice import migrate as migrations
    from sluice import processes
    from sluice.db import dispose_engine, get_engine
    from sluice.logs import configure_logging
    from sluice.settings import get_settings

    configure_logging()
    settings = get_settings()
    settings.resolved_data_dir.mkdir(parents=True, exist_ok=True)
    migrations.upgrade(get_engine())
    dispose_engine()
    children = [processes.Child("api", processes.api_command(host, port), processes.API_ENV)]
    children += [
        processes.Child(f"worker-{q}", processes.worker_command(q), processes.queue_env(q))
        for q in ("parse", "embed", "answer", "maintenance")
    ]
    children.append(processes.Child(
        "beat", processes.beat_command(str(settings.resolved_data_dir / "beat-schedule"))))
    env = processes.child_env({"SLUICE_DATA_DIR": str(settings.resolved_data_dir)})
    click.echo(f"Sluice on http://{host}:{port} (docs: /docs), "
               f"data in {settings.resolved_data_dir}")
    sys.exit(processes.Supervisor(children, env=env).run())


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("-Q", "--queue", "queue", required=True,
              type=click.Choice(["parse", "embed", "answer", "maintenance"]))
@click.option("--metrics-port", type=int, default=None,
              help="Serve this worker's Prometheus metrics on this port (for a worker on "
              "another machine than the API, whose /metrics covers its own machine).")
@click.pass_context
def worker(ctx: click.Context, queue: str, metrics_port: int | None) -> None:
    """Run a Celery worker for one queue with its pool (extra args go to `celery worker`)."""
    from sluice import processes

    argv = processes.worker_command(queue, extra=ctx.args)
    os.environ.update(processes.worker_env(queue, metrics_port=metrics_port))
    os.execv(argv[0], argv)


@main.command()
@click.option("--schedule", default=None, help="beat's schedule file")
def beat(schedule: str | None) -> None:
    """Run Celery beat (exactly one per deployment)."""
    from sluice import processes
    from sluice.settings import get_settings

    path = schedule or str(get_settings().resolved_data_dir / "beat-schedule")
    argv = processes.beat_command(path)
    os.execv(argv[0], argv)


@main.command()
@click.option("--address", default="127.0.0.1", show_default=True)
@click.option("--port", default=5555, show_default=True, type=int)
@click.option("--url-prefix", default=None, help="Serve under this path (behind a proxy).")
def flower(address: str, port: int, url_prefix: str | None) -> None:
    """Run Flower (Celery monitoring) against this deployment's broker; basic auth
    (SLUICE_FLOWER_BASIC_AUTH=user:password) is required outside the embedded mode."""
    from sluice import processes
    from sluice.flower import check_auth, flower_command
    from sluice.settings import get_settings

    settings = get_settings()
    try:
        check_auth(settings.flower_basic_auth, embedded=settings.is_embedded)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    # The credentials go through the environment, not argv (where `ps` would show them).
    argv = flower_command(port=port, address=address, basic_auth=None, url_prefix=url_prefix)
    os.environ.update(processes.WORKER_ENV)
    if settings.flower_basic_auth:
        os.environ["FLOWER_BASIC_AUTH"] = settings.flower_basic_auth
    os.execv(argv[0], argv)


def _client(api: str, workspace: str) -> httpx.Client:
    """With SLUICE_API_KEY set, requests carry the key (whose workspace they act in);
    `X-Workspace` is only read by an API with auth off."""
    from sluice.settings import get_settings

    headers = {"X-Workspace": workspace}
    key = get_settings().api_key
    if key is not None:
        headers = {"Authorization": f"Bearer {key.get_secret_value()}"}
    return httpx.Client(base_url=api, headers=headers, timeout=120)


def _files(paths: tuple[Path, ...]) -> list[Path]:
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file()
                            and p.name not in INGESTABLE_SKIP and not p.name.startswith("."))
        elif path.is_file():
            found.append(path)
        else:
            raise click.BadParameter(f"{path} does not exist")
    return found


FINAL = {"succeeded", "failed", "dead", "cancelled"}


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--wait", is_flag=True, help="Wait until every document is processed.")
@click.option("--force", is_flag=True, help="Ingest again even if identical bytes exist.")
@click.option("--api", default=DEFAULT_API, show_default=True)
@click.option("--workspace", default="default", show_default=True)
def ingest(paths: tuple[Path, ...], wait: bool, force: bool, api: str, workspace: str) -> None:
    """Upload files and directories."""
    files = _files(paths)
    jobs: dict[str, Path] = {}
    with _client(api, workspace) as client:
        with click.progressbar(files, label="uploading", file=sys.stderr) as bar:
            for path in bar:
                with path.open("rb") as fh:
                    resp = client.post("/v1/documents", params={"force": force},
                                       files={"file": (path.name, fh)})
                if resp.status_code >= 400:
                    click.echo(f"\n{path}: {_error_text(resp)}", err=True)
                    continue
                jobs[resp.json()["job_id"]] = path
        if not wait:
            for job_id, path in jobs.items():
                click.echo(f"{job_id}  {path}")
            return
        states = _wait_for(client, list(jobs))
    failed = 0
    for job_id, path in jobs.items():
        job = states[job_id]
        error = job.get("error") or {}
        detail = f"  {error.get('code')}: {error.get('message')}" if error else ""
        failed += job["state"] != "succeeded"
        click.echo(f"{job['state']:<10} {path}{detail}")
    sys.exit(1 if failed else 0)


def _wait_for(client: httpx.Client, job_ids: list[str]) -> dict[str, dict[str, Any]]:
    states: dict[str, dict[str, Any]] = {}
    with click.progressbar(length=len(job_ids), label="processing", file=sys.stderr) as bar:
        pending = list(job_ids)
        while pending:
            still = []
            for job_id in pending:
                job = client.get(f"/v1/jobs/{job_id}").json()
                states[job_id] = job
                if job["state"] in FINAL:
                    bar.update(1)
                else:
                    still.append(job_id)
            pending = still
            if pending:
                time.sleep(0.5)
    return states


def _error_text(resp: httpx.Response) -> str:
    try:
        error = resp.json()["error"]
        return f"{resp.status_code} {error['code']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        return f"{resp.status_code} {resp.text[:200]}"


@main.command()
@click.argument("question")
@click.option("--top-k", default=5, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the whole job as JSON.")
@click.option("--api", default=DEFAULT_API, show_default=True)
@click.option("--workspace", default="default", show_default=True)
def ask(question: str, top_k: int, as_json: bool, api: str, workspace: str) -> None:
    """Ask a question; prints the answer with its citations."""
    with _client(api, workspace) as client:
        resp = client.post("/v1/answers", params={"wait": 60},
                           json={"question": question, "top_k": top_k})
        if resp.status_code >= 400:
            raise click.ClickException(_error_text(resp))
        job = resp.json()
        if "state" not in job:
            job = _wait_for(client, [job["job_id"]])[job["job_id"]]
    if as_json:
        click.echo(json.dumps(job, indent=2))
        return
    if job["state"] != "succeeded":
        raise click.ClickException(f"answer job {job['id']} {job['state']}: {job.get('error')}")
    result = job["result"]
    click.echo(result["answer"])
    for i, cite in enumerate(result["citations"], 1):
        page = f", page {cite['page']}" if cite.get("page") else ""
        click.echo(f"  [{i}] {cite['filename']}{page} (score {cite['score']:.2f})")


@main.command()
@click.argument("job_id", required=False)
@click.option("--state", default=None)
@click.option("--api", default=DEFAULT_API, show_default=True)
@click.option("--workspace", default="default", show_default=True)
def jobs(job_id: str | None, state: str | None, api: str, workspace: str) -> None:
    """Show one job, or list recent jobs."""
    with _client(api, workspace) as client:
        if job_id:
            resp = client.get(f"/v1/jobs/{job_id}")
            if resp.status_code >= 400:
                raise click.ClickException(_error_text(resp))
            click.echo(json.dumps(resp.json(), indent=2))
            return
        params = {"state": state} if state else {}
        for job in client.get("/v1/jobs", params=params).json():
            error = (job.get("error") or {}).get("code") or ""
            click.echo(f"{job['id']}  {job['kind']:<7} {job['state']:<10} {job['stage']:<7} "
                       f"attempts={job['attempts']} {error}")


@main.group()
def dlq() -> None:
    """Dead letters: jobs whose retries ran out."""


def _dlq_filters(queue: str | None, code: str | None, since: str | None) -> dict[str, str]:
    params = {"queue": queue, "error_code": code, "since": since}
    return {k: v for k, v in params.items() if v is not None}


_filter_options = [
    click.option("--queue", default=None, help="parse, embed, answer or maintenance"),
    click.option("--code", default=None, help="error code"),
    click.option("--since", default=None, help="ISO time"),
    click.option("--api", default=DEFAULT_API, show_default=True),
    click.option("--workspace", default="default", show_default=True),
]


def _with_filters(fn: Any) -> Any:
    for option in reversed(_filter_options):
        fn = option(fn)
    return fn


@dlq.command("list")
@_with_filters
def dlq_list(queue: str | None, code: str | None, since: str | None, api: str,
             workspace: str) -> None:
    """List dead jobs."""
    with _client(api, workspace) as client:
        resp = client.get("/v1/dead-letters", params=_dlq_filters(queue, code, since))
        if resp.status_code >= 400:
            raise click.ClickException(_error_text(resp))
    for d in resp.json()["dead_letters"]:
        click.echo(f"{d['id']}  {d['queue']:<11} {d['error']['code']:<22} attempts={d['attempts']}"
                   f"  {d['finished_at']}  {d['error']['message'][:80]}")


@dlq.command("show")
@click.argument("job_id")
@click.option("--api", default=DEFAULT_API, show_default=True)
@click.option("--workspace", default="default", show_default=True)
def dlq_show(job_id: str, api: str, workspace: str) -> None:
    """One dead job with every attempt and traceback."""
    with _client(api, workspace) as client:
        resp = client.get(f"/v1/dead-letters/{job_id}")
    if resp.status_code >= 400:
        raise click.ClickException(_error_text(resp))
    click.echo(json.dumps(resp.json(), indent=2))


@dlq.command("replay")
@click.argument("job_id", required=False)
@_with_filters
def dlq_replay(job_id: str | None, queue: str | None, code: str | None, since: str | None,
               api: str, workspace: str) -> None:
    """Replay one dead job, or every one matching the filters."""
    with _client(api, workspace) as client:
        if job_id:
            resp = client.post(f"/v1/dead-letters/{job_id}/replay")
        else:
            resp = client.post("/v1/dead-letters/replay", params=_dlq_filters(queue, code, since))
    if resp.status_code >= 400:
        raise click.ClickException(_error_text(resp))
    replayed = [job_id] if job_id else resp.json()["replayed"]
    click.echo(f"replayed {len(replayed)} job(s)")


@dlq.command("purge")
@click.argument("job_id", required=False)
@_with_filters
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def dlq_purge(job_id: str | None, queue: str | None, code: str | None, since: str | None,
              api: str, workspace: str, yes: bool) -> None:
    """Discard one dead job, or every one matching the filters."""
    with _client(api, workspace) as client:
        if job_id:
            ids = [job_id]
        else:
            listed = client.get("/v1/dead-letters", params=_dlq_filters(queue, code, since))
            ids = [d["id"] for d in listed.json()["dead_letters"]]
        if not ids or not (yes or click.confirm(f"discard {len(ids)} dead job(s)?")):
            return
        for ident in ids:
            resp = client.delete(f"/v1/dead-letters/{ident}")
            if resp.status_code >= 400:
                raise click.ClickException(_error_text(resp))
    click.echo(f"discarded {len(ids)} job(s)")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the status as one JSON object.")
@click.option("--timeout", default=1.0, show_default=True, type=float,
              help="Seconds to wait for workers to answer.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None)
def status(as_json: bool, timeout: float, data_dir: Path | None) -> None:
    """Queues (depth, oldest wait, workers), workers and their current jobs, dead letters.

    Reads the database and asks the workers over the broker directly (not through the API);
    use the same SLUICE_* settings as the deployment."""
    _set_data_dir(data_dir)
    from sluice.status import system_status

    report = system_status(timeout=timeout)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    db = report.database
    click.echo(f"ready: {'yes' if report.ready else 'NO'}   "
               f"database: {'ok' if db.ok else db.error} (revision {db.revision}, "
               f"head {db.head})   broker: {'ok' if report.broker.ok else report.broker.error}")
    click.echo(f"\n{'QUEUE':<12} {'QUEUED':>7} {'RETRYING':>9} {'RUNNING':>8} "
               f"{'OLDEST WAIT':>12}  WORKERS")
    for name, q in report.queues.items():
        age = "-" if q.oldest_queued_age_s is None else f"{q.oldest_queued_age_s:.1f}s"
        click.echo(f"{name:<12} {q.queued:>7} {q.retrying:>9} {q.running:>8} {age:>12}  "
                   f"{', '.join(q.workers) or 'NONE'}")
    click.echo(f"\nWORKERS ({len(report.workers)} answering)")
    for w in report.workers:
        click.echo(f"  {w.hostname}  queues: {', '.join(w.queues)}")
        for task in w.active or []:
            click.echo(f"    active: {task.stage or task.task} job {task.job_id or '-'} "
                       f"(task {task.task_id})")
    click.echo(f"\nRUNNING JOBS ({report.running_total} in the ledger)")
    for job in report.running_jobs:
        beat = "-" if job.heartbeat_age_s is None else f"{job.heartbeat_age_s:.1f}s ago"
        note = "" if job.worker_answering else "  (worker not answering)"
        click.echo(f"  {job.job_id}  {job.stage:<7} attempt {job.attempt}  on {job.worker}  "
                   f"heartbeat {beat}{note}")
    click.echo(f"\ndead letters: {report.dead_letters}")


if __name__ == "__main__":
    main()


@main.group()
def maintenance() -> None:
    """Housekeeping that beat runs on the maintenance queue."""


@maintenance.command("run")
@click.argument("entry", type=click.Choice(sorted(PERIODIC_TASKS)))
@click.option("--data-dir", type=click.Path(path_type=Path), default=None)
def maintenance_run(entry: str, data_dir: Path | None) -> None:
    """Run one beat entry now, in this process (under the task's lease, so never beside a
    run already going on); print its result as JSON."""
    _set_data_dir(data_dir)
    import tasks.maintenance  # noqa: F401  (registers the tasks)
    from workers.app import app

    result = app.tasks[PERIODIC_TASKS[entry]]()
    click.echo(json.dumps(result, indent=2, sort_keys=True, default=str))


@main.group()
def keys() -> None:
    """API keys (in the database of the SLUICE_* settings; the API needs SLUICE_AUTH_ENABLED=1
    to ask for them)."""


@keys.command("create")
@click.option("--workspace", required=True)
@click.option("--role", required=True, type=click.Choice(["reader", "writer", "admin"]),
              help="reader: search, answers, read; writer: + upload, delete, cancel; "
              "admin: + dead letters, keys, replay")
@click.option("--name", default=None, help="A label for people.")
@click.option("--rate-limit", default=None,
              help="e.g. 100/minute [default: SLUICE_RATE_LIMIT_PER_KEY]")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None)
def keys_create(workspace: str, role: str, name: str | None, rate_limit: str | None,
                data_dir: Path | None) -> None:
    """Create a key and print it, this once: only its hash is stored."""
    _set_data_dir(data_dir)
    from limits import parse

    from api.auth import WORKSPACE_RE
    from api.deps import ensure_workspace
    from models.keys import Role, create_key
    from sluice.db import session_scope

    if not WORKSPACE_RE.match(workspace):
        raise click.BadParameter("1-64 letters, digits, '_', '-', '.'", param_hint="--workspace")
    if rate_limit is not None:
        try:
            parse(rate_limit)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--rate-limit") from exc
    with session_scope() as session:
        ensure_workspace(session, workspace)
        new = create_key(session, workspace_id=workspace, role=Role(role), name=name,
                         rate_limit=rate_limit)
        key_id = new.key.id
    click.echo(f"key {key_id} ({role} of workspace {workspace}); shown this once:", err=True)
    click.echo(new.token)


@keys.command("list")
@click.option("--workspace", default=None, help="Only this workspace's keys.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--data-dir", type=click.Path(path_type=Path), default=None)
def keys_list(workspace: str | None, as_json: bool, data_dir: Path | None) -> None:
    """Keys (never the keys themselves): id, workspace, role, created, last used, revoked."""
    _set_data_dir(data_dir)
    from models.keys import list_keys
    from sluice.db import read_scope

    with read_scope() as session:
        rows = [{"id": k.id, "workspace": k.workspace_id, "role": k.role, "name": k.name,
                 "rate_limit": k.rate_limit, "created_at": k.created_at,
                 "last_used_at": k.last_used_at, "revoked_at": k.revoked_at}
                for k in list_keys(session, workspace_id=workspace)]
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    click.echo(f"{'ID':<17} {'WORKSPACE':<20} {'ROLE':<7} {'LAST USED':<20} {'REVOKED':<20} NAME")
    for r in rows:
        click.echo(f"{r['id']:<17} {r['workspace']:<20} {r['role']:<7} "
                   f"{_when(r['last_used_at']):<20} {_when(r['revoked_at']):<20} "
                   f"{r['name'] or ''}")


def _when(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value is not None else "-"


@keys.command("revoke")
@click.argument("key_id")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None)
def keys_revoke(key_id: str, data_dir: Path | None) -> None:
    """Revoke a key: from now on it gets 401."""
    _set_data_dir(data_dir)
    from models.keys import revoke_key
    from sluice.db import session_scope

    with session_scope() as session:
        if revoke_key(session, key_id=key_id) is None:
            raise click.ClickException(f"no key {key_id}")
    click.echo(f"revoked {key_id}")


@main.group()
def quotas() -> None:
    """Per-workspace quotas: the settings' defaults (SLUICE_QUOTA_*), overridable per
    workspace."""


def _quota_report(workspace: str) -> dict[str, Any]:
    from api.deps import default_quota
    from models import quotas as q
    from sluice.db import read_scope

    with read_scope() as session:
        limits = q.effective_quota(session, workspace_id=workspace, defaults=default_quota())
        used = q.usage(session, workspace_id=workspace)
        return {"workspace": workspace,
                "limits": {n: getattr(limits, n) for n in q.QUOTA_FIELDS},
                "overrides": q.overrides(session, workspace_id=workspace),
                "usage": {"documents": used.documents, "stored_bytes": used.stored_bytes,
                          "queued_jobs": used.queued_jobs}}


@quotas.command("show")
@click.option("--workspace", required=True)
@click.option("--data-dir", type=click.Path(path_type=Path), default=None)
def quotas_show(workspace: str, data_dir: Path | None) -> None:
    """A workspace's quotas (null: unlimited), its overrides (null: the default) and usage."""
    _set_data_dir(data_dir)
    click.echo(json.dumps(_quota_report(workspace), indent=2))


class _QuotaValue(click.ParamType):
    name = "N|default"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> int | str:
        if value == "default":
            return "default"
        try:
            number = int(value)
        except ValueError:
            self.fail(f"{value!r} is neither a number nor 'default'", param, ctx)
        if number < 0:
            self.fail("must be 0 or more", param, ctx)
        return number


@quotas.command("set")
@click.option("--workspace", required=True)
@click.option("--documents", type=_QuotaValue(), default=None)
@click.option("--stored-bytes", type=_QuotaValue(), default=None)
@click.option("--queued-jobs", type=_QuotaValue(), default=None)
@click.option("--answers-per-minute", type=_QuotaValue(), default=None)
@click.option("--data-dir", type=click.Path(path_type=Path), default=None)
def quotas_set(workspace: str, data_dir: Path | None, **values: int | str | None) -> None:
    """Override some of a workspace's quotas (`default` goes back to the setting); the
    others are kept."""
    _set_data_dir(data_dir)
    from api.auth import WORKSPACE_RE
    from api.deps import ensure_workspace
    from models.quotas import set_overrides
    from sluice.db import session_scope

    if not WORKSPACE_RE.match(workspace):
        raise click.BadParameter("1-64 letters, digits, '_', '-', '.'", param_hint="--workspace")
    changes = {name: None if value == "default" else value
               for name, value in values.items() if value is not None}
    with session_scope() as session:
        ensure_workspace(session, workspace)
        set_overrides(session, workspace_id=workspace, values=changes)  # type: ignore[arg-type]
    click.echo(json.dumps(_quota_report(workspace), indent=2))
