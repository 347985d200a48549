"""The operator CLI: the same `sync`, `store` and `validate` the functions use, from a terminal.

    python -m shared sync --user alice@contoso.com [--mode full] [--dry-run] [--force] [--json]
    python -m shared sync --all
    python -m shared users list | get USER | put USER [--file settings.json] | delete USER
    python -m shared validate --user alice@contoso.com
    python -m shared report RUN_ID
    python -m shared conformance --user alice@contoso.com [--json]

Settings come from the environment (BEHAVIOUR §6), as in Azure.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from shared.config import Config, ConfigError
from shared.model import ACTIONS, RunReport, RunStatus, UserSettings, ValidationError, normalize_user
from shared.services import Services
from shared.sync import RunInProgress, run_user, run_users
from shared.validate import validate_user


def format_report(report: RunReport, *, max_items: int = 40) -> str:
    """A readable run report: header, counts, then the items worth a look."""
    lines = [
        f"Run {report.runId}  user {report.user}  mode {report.mode}{'  (dry run)' if report.dryRun else ''}",
        f"Status: {report.status}   started {report.startedAt}   finished {report.finishedAt or '-'}",
        f"Requests: Business Central {report.requests.get('bc', 0)}, Graph {report.requests.get('graph', 0)}",
    ]
    photos = report.photos
    if any(photos.values()):
        lines.append(
            f"Photos: {photos.get('toOutlook', 0)} to Outlook, {photos.get('toBc', 0)} to Business Central, "
            f"{photos.get('notCopied', 0)} not copied"
        )
    if report.message:
        lines.append(f"Note: {report.message}")
    width = max(len(a) for a in ACTIONS)
    lines.append("")
    lines.append("  ".join(f"{a:>{width}}" for a in ACTIONS[:5]))
    lines.append("  ".join(f"{report.counts.get(a, 0):>{width}}" for a in ACTIONS[:5]))
    lines.append("  ".join(f"{a:>{width}}" for a in ACTIONS[5:]))
    lines.append("  ".join(f"{report.counts.get(a, 0):>{width}}" for a in ACTIONS[5:]))
    order = {"failed": 0, "safetyStop": 0, "skipped": 2, "photoSkipped": 2}
    items = sorted(report.items, key=lambda i: order.get(i.action, 1))
    # A user with several companies (BEHAVIOUR §5.4): a column says which company, by name.
    companies = any(item.company for item in items)
    if items:
        lines.append("")
        company_head = f"{'company':<20} " if companies else ""
        lines.append(f"{'action':<17} {company_head}{'contact':<24} {'email':<34} reason")
        for item in items[:max_items]:
            name = _cell(item.name or ("(no name)" if item.email else "(no name or email)"), 24)
            company = f"{_cell(item.company or '', 20):<20} " if companies else ""
            lines.append(
                f"{item.action:<17} {company}{name:<24} {_cell(item.email or '', 34):<34} {item.reason or ''}"
            )
        if len(items) > max_items:
            lines.append(f"… and {len(items) - max_items} more items (use --json for all)")
    return "\n".join(lines)


def _cell(text: str, width: int) -> str:
    """`text` cut to a table column, with an ellipsis when it did not fit."""
    return text if len(text) <= width else text[: width - 1] + "…"


def _services() -> Services:
    return Services.from_config(Config.from_env())


def _cmd_sync(args: argparse.Namespace, out: TextIO) -> int:
    services = _services()
    services.store.ensure_tables()
    if args.all:
        users, bad = services.store.list_settings_checked()
        for key, err in bad:
            print(f"skipped user {key}: {err}", file=sys.stderr)
        reports = run_users(services, [u for u in users if u.enabled], args.mode, dry_run=args.dry_run)
    else:
        user = normalize_user(args.user)
        settings = services.store.get_settings(user)
        if settings is None:
            print(
                f"error: no settings for {user}; add them with `python -m shared users put {user}`",
                file=sys.stderr,
            )
            return 2
        try:
            reports = [run_user(services, settings, args.mode, dry_run=args.dry_run, force=args.force)]
        except RunInProgress as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 3
    if args.json:
        json.dump([r.to_json() for r in reports] if args.all else reports[0].to_json(), out, indent=2)
        out.write("\n")
    else:
        out.write("\n\n".join(format_report(r) for r in reports) + "\n")
    return 0 if all(r.status in (RunStatus.SUCCEEDED, RunStatus.SKIPPED) for r in reports) else 1


def _cmd_users(args: argparse.Namespace, out: TextIO) -> int:
    services = _services()
    store = services.store
    store.ensure_tables()
    if args.action == "list":
        users, bad = store.list_settings_checked()
        json.dump(
            {"users": [u.to_json() for u in users], "invalid": [{"user": k, "error": e} for k, e in bad]},
            out,
            indent=2,
        )
    elif args.action == "get":
        settings = store.get_settings(normalize_user(args.user))
        if settings is None:
            print("error: no such user", file=sys.stderr)
            return 2
        json.dump(settings.to_json(), out, indent=2)
    elif args.action == "put":
        body: dict[str, Any] = json.load(open(args.file)) if args.file else {}  # noqa: SIM115
        settings = store.put_settings(UserSettings.from_json(body, user=args.user))
        json.dump(settings.to_json(), out, indent=2)
    elif args.action == "delete":
        if not store.delete_settings(normalize_user(args.user)):
            print("error: no such user", file=sys.stderr)
            return 2
        out.write("deleted")
    out.write("\n")
    return 0


def _cmd_validate(args: argparse.Namespace, out: TextIO) -> int:
    services = _services()
    user = normalize_user(args.user)
    settings = services.store.get_settings(user) or UserSettings(user=user)
    result = validate_user(services, settings)
    if args.json:
        json.dump(result, out, indent=2)
        out.write("\n")
    else:
        for c in result["checks"]:
            out.write(f"{'ok  ' if c['ok'] else 'FAIL'}  {c['name']:<20} {c['message']}\n")
    return 0 if result["ok"] else 1


def _cmd_conformance(args: argparse.Namespace, out: TextIO) -> int:
    import os

    from shared.auth import token_provider
    from shared.conformance import format_table, run_conformance

    # The check never touches Table Storage, so an operator may run it before storage exists; the
    # placeholder only satisfies the settings validation and is never used.
    env = dict(os.environ)
    if not env.get("AzureWebJobsStorage") and not env.get("AzureWebJobsStorage__tableServiceUri"):
        env["AzureWebJobsStorage"] = "UseDevelopmentStorage=true"
    config = Config.from_env(env)
    tokens = token_provider(config)
    tokens.invalidate()  # a cached token would hide a secret revoked since it was issued
    result = run_conformance(config, normalize_user(args.user), tokens=tokens)
    if args.json:
        json.dump(result.to_json(), out, indent=2)
        out.write("\n")
    else:
        out.write(format_table(result) + "\n")
    return 0 if result.ok else 1


def _cmd_report(args: argparse.Namespace, out: TextIO) -> int:
    report = _services().store.get_report(args.run_id)
    if report is None:
        print("error: no such run", file=sys.stderr)
        return 2
    out.write((json.dumps(report.to_json(), indent=2) if args.json else format_report(report)) + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m shared", description="BC Contact Sync operator CLI")
    sub = parser.add_subparsers(dest="command", required=True)
    sync = sub.add_parser("sync", help="run a sync for one user (or --all enabled users)")
    who = sync.add_mutually_exclusive_group(required=True)
    who.add_argument("--user")
    who.add_argument("--all", action="store_true")
    sync.add_argument("--mode", choices=("incremental", "full"), default="incremental")
    sync.add_argument("--dry-run", action="store_true", help="plan and report, write nothing")
    sync.add_argument("--force", action="store_true", help="proceed past the mass-deletion guard")
    sync.add_argument("--json", action="store_true")
    sync.set_defaults(func=_cmd_sync)
    users = sub.add_parser("users", help="per-user settings")
    users.add_argument("action", choices=("list", "get", "put", "delete"))
    users.add_argument("user", nargs="?")
    users.add_argument("--file", help="JSON settings document (for put)")
    users.set_defaults(func=_cmd_users)
    validate = sub.add_parser("validate", help="check tokens, BC company, mailbox and permissions for a user")
    validate.add_argument("--user", required=True)
    validate.add_argument("--json", action="store_true")
    validate.set_defaults(func=_cmd_validate)
    conformance = sub.add_parser(
        "conformance",
        help="check on the real tenant every Graph/BC behaviour the sync relies on (writes nothing to BC; "
        "creates and removes a scratch Outlook folder)",
    )
    conformance.add_argument("--user", required=True, help="a mailbox the app may write to")
    conformance.add_argument("--json", action="store_true")
    conformance.set_defaults(func=_cmd_conformance)
    report = sub.add_parser("report", help="show a stored run report")
    report.add_argument("run_id")
    report.add_argument("--json", action="store_true")
    report.set_defaults(func=_cmd_report)
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = out or sys.stdout
    if getattr(args, "action", None) in ("get", "put", "delete") and not args.user:
        print("error: a user is required", file=sys.stderr)
        return 2
    try:
        code: int = args.func(args, out)
        return code
    except (ConfigError, ValidationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
