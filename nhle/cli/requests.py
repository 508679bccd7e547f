"""`nhle request ...` and `nhle schedule`: forget requests from the command line.

nhle request submit --classes 3 --requester dpo@example.com --reason "erasure request 1142"
nhle request list [--status pending]
nhle request init                  # a new, empty ledger, made on purpose (never made in place of a lost one)
nhle request show 7                # the ledger row and its audit report
nhle request process               # process every pending request now (one Prefect flow run)
nhle schedule                      # serve the processing flow as a deployment on params.yaml's cron
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from nhle.adapters.ledger import STATUSES, operator_name
from nhle.cli.jobs import attempt_lines, flows_file, flows_ready, load_flow
from nhle.core.audit import terminal_text
from nhle.core.config import is_default_model, load_params, params_as_dict, resolve_uri
from nhle.core.gates import advice_for_reason


def cmd_submit(args, params) -> int:
    from nhle.adapters.deletions import open_ledger  # noqa: PLC0415 - lazy: torch, MLflow, Prefect
    from nhle.orchestration.requests import RequestRejected, request_line, submit  # noqa: PLC0415 - lazy: torch

    try:
        request = submit(params, Path(args.project_dir), args.classes, args.requester, args.reason)
    except RequestRejected as err:
        print(f"rejected and recorded: {request_line(err.request)}")
        raise ValueError(str(err)) from None
    print(
        f"accepted: {request_line(request)}\nIt is processed by the next `nhle request process` or scheduled run; "
        "until then the servers answer none of its classes."
    )
    print_servers_told(open_ledger(params, args.project_dir).events(request.id))
    return 0


def cmd_withdraw(args, params) -> int:
    from nhle.adapters.deletions import open_ledger  # noqa: PLC0415 - lazy: torch, MLflow, Prefect
    from nhle.orchestration.requests import request_line, withdraw  # noqa: PLC0415 - lazy: torch, MLflow, Prefect

    try:
        event = withdraw(params, Path(args.project_dir), args.id, args.operator, args.reason)
    except KeyError as err:
        raise ValueError(err.args[0]) from None
    ledger = open_ledger(params, args.project_dir)
    print(f"withdrawn by {event.operator}: {request_line(ledger.get(args.id))}")
    print_servers_told(ledger.events(args.id))
    return 0


def print_servers_told(events) -> None:
    """What the servers of serving.notify answered when they were told of the request's last change."""
    told = [e for e in events if e.kind in ("suppressed", "lifted")]
    for server in told[-1].detail["servers"] if told else []:
        if server["outcome"] == "not_told":
            print(f"  {server['url']}: not told ({server['error']}); it reads the ledger at its next poll")
        else:
            print(f"  {server['url']}: suppressing {server['suppressed_classes']} ({server['seconds']} s)")


def cmd_init(args, params) -> int:
    """Create the project's ledger on purpose, where none exists (nhle refuses to make one in
    place of a ledger it cannot find)."""
    from nhle.adapters.deletions import ledger_at, missing_store  # noqa: PLC0415 - lazy: torch, MLflow, Prefect

    url = resolve_uri(params.requests_database(), Path(args.project_dir))
    missing = missing_store(url)
    if missing is None and url.startswith("sqlite"):
        raise ValueError(f"the ledger {url} exists already: nothing created")
    ledger_at.cache_clear()
    ledger_at(url)
    if missing is None:  # a database server: its tables exist now, whatever they already held
        print(f"the forget-request ledger's tables are ready at {url}")
        return 0
    print(
        f"created an empty forget-request ledger at {missing}. Classes deleted before it stay deleted only "
        f"where the registered model's own record keeps them (`nhle request list` shows what the ledger holds)."
    )
    return 0


def cmd_list(args, params) -> int:
    from nhle.adapters.deletions import open_ledger  # noqa: PLC0415 - lazy: torch, MLflow, Prefect
    from nhle.orchestration.requests import REQUEST_HEADER, request_line  # noqa: PLC0415 - lazy: torch, MLflow, Prefect

    requests = open_ledger(params, args.project_dir).list(args.status, params.registry.model_name)
    if not requests:
        print(
            f"no forget requests for {params.registry.model_name}"
            + (f" with status {args.status}" if args.status else "")
        )
        return 0
    print(f"forget requests for {params.registry.model_name}:\n{REQUEST_HEADER}")
    for request in requests:
        print(request_line(request))
    return 0


def cmd_show(args, params) -> int:
    from nhle.adapters.deletions import open_ledger  # noqa: PLC0415 - lazy: torch, MLflow, Prefect
    from nhle.adapters.tracking import configure  # noqa: PLC0415 - lazy: torch, MLflow, Prefect
    from nhle.orchestration.requests import as_json, read_report  # noqa: PLC0415 - lazy: torch, MLflow, Prefect

    ledger = open_ledger(params, args.project_dir)
    try:
        request = ledger.get(args.id)
    except KeyError as err:
        raise ValueError(err.args[0]) from None
    print(as_json(request))
    if request.report_uri and not args.no_report:
        configure(params, args.project_dir)
        print(f"\naudit report ({request.report_uri}):\n")
        print(read_report(request.report_uri))
    for event in ledger.events(request.id):  # after the report: what happened to it since
        print(
            "\n"
            + terminal_text(
                f"{event.kind.upper()} {event.at:%Y-%m-%d %H:%M:%S}Z by {event.operator}: "
                f"{event.reason} {json.dumps(event.detail)}"
            )
        )
    return 0


def cmd_process(args, params) -> int:
    with flows_ready("process_requests") as flows:
        result = flows["process_requests"](
            params=params_as_dict(params), project_dir=str(Path(args.project_dir).resolve())
        )
    for request in result["requests"]:
        print(
            f"request {request['id']}: {request['status']}"
            + (f" -> version {request['model_version_after']}" if request["model_version_after"] else "")
            + (f" ({request['error']})" if request["error"] else "")
            + (f"; audit {request['report_uri']}" if request["report_uri"] else "")
        )

    for line in attempt_lines(result.get("attempts", [])):
        print(f"  {line}")
    if result.get("step_seconds"):
        print("  steps: " + ", ".join(f"{step} {seconds:.2f} s" for step, seconds in result["step_seconds"]))

    for line in sorted(
        {line for r in result["requests"] if r["status"] == "failed" for line in advice_for_reason(r["error"] or "")}
    ):
        print(f"  what to try - {line}")
    if not result["requests"]:
        print("no pending forget requests")
    return 0 if all(r["status"] in ("done", "pending") for r in result["requests"]) else 1


def deployment_name(base: str, params) -> str:
    """A deployment's name: `base` for the project's default model, `base`-MODEL for another, so
    that each registered model has its own deployments."""
    model = params.registry.model_name
    return base if is_default_model(model) else f"{base}-{model}"


def requests_schedule(params) -> tuple[dict, object]:
    """(deployment options, concurrency limit) of every forget-request deployment: params.yaml's
    cron, and at most one run at a time (a run that would overlap is cancelled, not queued)."""
    from prefect.client.schemas.objects import (  # noqa: PLC0415 - lazy: Prefect
        ConcurrencyLimitConfig,
        ConcurrencyLimitStrategy,
    )
    from prefect.schedules import Cron  # noqa: PLC0415 - lazy: Prefect

    options = {
        "schedule": Cron(params.requests.cron, timezone=params.requests.timezone),
        "tags": ["nhle", "forget-requests"],
        "description": "Process every pending forget request of the nhle ledger",
    }
    return options, ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)


def cmd_schedule(args, params) -> int:
    """flow.serve: a deployment with params.yaml's cron and a concurrency limit of one run."""
    project_dir = Path(args.project_dir).resolve()
    flow = load_flow("process_requests")
    os.chdir(project_dir)  # the deployment's working directory
    name = deployment_name(params.requests.deployment, params)
    print(f"serving {flow.name}/{name} on cron {params.requests.cron!r} ({params.requests.timezone}); Ctrl-C stops it")
    # The settings are fixed when the deployment is made: restart `nhle schedule` after editing them.
    parameters = {"params": params_as_dict(params), "project_dir": str(project_dir)}
    options, limit = requests_schedule(params)
    from nhle.adapters.prefect_server import temporary_prefect_server  # noqa: PLC0415 - lazy: torch, MLflow, Prefect

    with temporary_prefect_server():
        flow.serve(name=name, parameters=parameters, global_limit=limit, limit=1, **options)
    return 0


def cmd_deploy(args, params) -> int:
    """Register the flows with a Prefect server for a process work pool's workers (server mode)."""
    from prefect.flows import Flow  # noqa: PLC0415 - lazy: Prefect
    from prefect.settings import get_current_settings  # noqa: PLC0415 - lazy: Prefect

    if not get_current_settings().api.url:
        raise RuntimeError(
            "nhle deploy registers deployments with a Prefect server: set PREFECT_API_URL "
            "(e.g. http://127.0.0.1:4200/api after `prefect server start`)"
        )
    project_dir = Path(args.project_dir).resolve()
    entry = flows_file(project_dir).relative_to(project_dir)

    own_params = Path(args.params).resolve() == project_dir / "params.yaml" and params == load_params(args.params)
    # With the project's own params.yaml as it is, each run reads it afresh; another file, or
    # flags (--name, --set), are frozen in.
    parameters = {"project_dir": str(project_dir), **({} if own_params else {"params": params_as_dict(params)})}
    request_options, request_limit = requests_schedule(params)
    deployments = [  # (flow function, deployment name, options, concurrency limit)
        (
            "train_base",
            "train-base",
            {"tags": ["nhle"], "description": "Train, export and register a base model; promoted if its gates hold"},
            None,
        ),
        (
            "forget",
            "forget",
            {
                "tags": ["nhle"],
                "description": "Forget the given classes from the champion (NHLE + masking), with evidence",
            },
            None,
        ),
        ("process_requests", params.requests.deployment, request_options, request_limit),
    ]
    deployments = [
        (function, deployment_name(name, params), options, limit) for function, name, options, limit in deployments
    ]
    for function, name, options, limit in deployments:
        flow = Flow.from_source(source=str(project_dir), entrypoint=f"{entry}:{function}")
        deployment_id = flow.deploy(
            name=name,
            work_pool_name=args.pool,
            parameters=parameters,
            concurrency_limit=limit,
            build=False,
            push=False,
            print_next_steps=False,
            **options,
        )
        print(f"deployed {flow.name}/{name} to work pool {args.pool!r} ({deployment_id})")
    print(f"start a worker: prefect worker start --pool {args.pool} --type process")
    return 0


def add_commands(commands, add_command, add_model_command) -> None:
    request = add_command(commands, "request", help="forget requests: submit, withdraw, list, show, process")
    actions = request.add_subparsers(dest="action", required=True)

    def action(name, func, help_text):
        parser = add_model_command(actions, name, help_text)
        parser.set_defaults(func=func)
        return parser

    submit = action("submit", cmd_submit, "record a forget request, checked against the current champion")
    submit.add_argument("--classes", required=True, help="class(es) to forget: indices or names, comma separated")
    submit.add_argument("--requester", required=True, help="who asks (a name or an address)")
    submit.add_argument("--reason", required=True, help="why (kept in the ledger and the audit report)")
    withdrawing = action(
        "withdraw", cmd_withdraw, "take back a pending or failed request on record: its classes are answered again"
    )
    withdrawing.add_argument("id", type=int, help="request id")
    withdrawing.add_argument("--reason", required=True, help="why (kept in the ledger)")
    withdrawing.add_argument("--operator", default=operator_name(), help="who withdraws it (default: %(default)s)")
    action("init", cmd_init, "create the forget-request ledger on purpose, where none exists")
    listing = action("list", cmd_list, "list the requests in the ledger")
    listing.add_argument("--status", choices=STATUSES, help="only requests with this status")
    show = action("show", cmd_show, "a request's ledger row and its audit report")
    show.add_argument("id", type=int, help="request id")
    show.add_argument("--no-report", action="store_true", help="only the ledger row")
    action("process", cmd_process, "process every pending request now, in one Prefect flow run")

    schedule = add_model_command(
        commands,
        "schedule",
        "serve the request-processing flow as a Prefect deployment "
        "on params.yaml's requests.cron (a long-running process)",
    )
    schedule.set_defaults(func=cmd_schedule)

    deploy = add_model_command(
        commands,
        "deploy",
        "register the flows with the Prefect server (PREFECT_API_URL) for the workers of a process work pool",
    )
    deploy.add_argument("--pool", required=True, help="the work pool (prefect work-pool create NAME --type process)")
    deploy.set_defaults(func=cmd_deploy)
