"""The operations workbook and the alert rules query only what the app really logs (issue 14).

The queries live in infra/monitoring/ and are loaded into the Bicep at compile time
(modules/operations.bicep). These tests read them the way the deployment does, pull out the log
record each query filters on (`message == ...`) and every field it reads from that record's JSON
(`x = parse_json(substring(message, strlen("event ")))`, then `x.field`), and compare them with the
records a real sync writes in the sandbox, as Azure stores them: `traces.message` is the record
formatted by Python's default Formatter (the Functions Python worker's AsyncLoggingHandler calls
`self.format(record)` and sends that text alone, Azure/azure-functions-python-worker
azure_functions_worker/dispatcher.py), which the host logs verbatim (`(state, exc) => state`,
Azure/azure-functions-host src/WebJobs.Script.Grpc/Channel/GrpcWorkerChannel.cs). `extra` never
becomes customDimensions on that path ("Custom dimensions not showing in App Insights",
https://github.com/Azure/azure-functions-python-worker/issues/1327), so a query that reads
customDimensions of an app record is reported too. A field renamed in shared/sync.py, or a query
typo, fails here instead of showing an empty chart in Azure.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, replace
from typing import Any

import pytest

from shared.model import UserSettings, user_hash
from shared.subscriptions import maintain
from tests.test_infra import INFRA, MAIN, ROOT, BicepFile, Unevaluable, _named, _text

OPERATIONS = INFRA / "modules" / "operations.bicep"
WORKBOOK = INFRA / "monitoring" / "run-history.workbook.json"
ALICE = "alice@contoso.example"
GHOST = "ghost@contoso.example"

# Records the Functions host writes, not the app: the message each is known by, with its source.
HOST_MESSAGES = {
    # Azure/azure-webjobs-sdk, src/Microsoft.Azure.WebJobs.Extensions.Storage/Queues/QueueProcessor.cs,
    # CopyMessageToPoisonQueueAsync: LogWarning("Message has reached MaxDequeueCount of {0}. Moving
    # message to queue '{1}'."). A warning, so host.json's default level (Warning) keeps it.
    "Moving message to queue '{poison}'",
}


@dataclass(frozen=True)
class Query:
    where: str
    text: str


# ---------------------------------------------------------------------------------------------------
# The queries, as the deployment builds them
# ---------------------------------------------------------------------------------------------------


def _module_argument(name: str) -> Any:
    main = BicepFile.load(MAIN)
    module = main.module("./modules/operations.bicep")
    return main.value(main.prop(main.body(module), "params", name), {})


def _evaluate(bicep: BicepFile, node: Any) -> str:
    """loadTextContent('file'), replace(x, 'token', value) and string(param): what operations.bicep uses."""
    if node.type == "call_expression":
        function = _text(node.child_by_field_name("function"))
        arguments = _named(node.child_by_field_name("arguments"))
        if function == "loadTextContent":
            return (bicep.path.parent / bicep.literal(arguments[0])).read_text()
        if function == "replace":
            return _evaluate(bicep, arguments[0]).replace(
                bicep.literal(arguments[1]), _evaluate(bicep, arguments[2])
            )
        if function == "string":
            return str(_evaluate(bicep, arguments[0]))
    if node.type == "identifier" and _text(node) in bicep.declarations("parameter"):
        default = bicep.param_default(_text(node))
        return str(bicep.value(default, {}) if default is not None else _module_argument(_text(node)))
    if node.type == "member_expression" and _text(node) == "appInsights.id":
        return "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Insights/components/appi-x"
    raise Unevaluable(f"{bicep.where(node)}: cannot evaluate {_text(node)[:60]}")


def alert_queries() -> list[Query]:
    bicep = BicepFile.load(OPERATIONS)
    found = []
    for rule in bicep.resources("Microsoft.Insights/scheduledQueryRules"):
        for criterion in _named(bicep.prop(bicep.body(rule), "properties", "criteria", "allOf")):
            found.append(
                Query(
                    f"{OPERATIONS.name}:{_text(_named(rule)[0])}",
                    _evaluate(bicep, bicep.prop(criterion, "query")),
                )
            )
    return found


def workbook_json() -> dict[str, Any]:
    bicep = BicepFile.load(OPERATIONS)
    (workbook,) = bicep.resources("Microsoft.Insights/workbooks")
    return json.loads(_evaluate(bicep, bicep.prop(bicep.body(workbook), "properties", "serializedData")))


def workbook_queries() -> list[Query]:
    return [
        Query(f"{WORKBOOK.name}:{item['name']}", item["content"]["query"])
        for item in workbook_json()["items"]
        if item["type"] == 3
    ]


def all_queries() -> list[Query]:
    return workbook_queries() + alert_queries()


# ---------------------------------------------------------------------------------------------------
# A small reader for the KQL shapes used
# ---------------------------------------------------------------------------------------------------

MESSAGE_FILTER = re.compile(r'\bmessage\s+(==|startswith|has)\s+"([^"]*)"')
CUSTOM_DIMENSIONS = re.compile(r"\bcustomDimensions(?:\.([A-Za-z_]\w*)|\[\s*[\"']([^\"']+)[\"']\s*\])")
# `run = parse_json(substring(message, strlen("contact sync run ")))`: the record's JSON, after its event.
PARSED = re.compile(
    r'\b([A-Za-z_]\w*)\s*=\s*parse_json\(\s*substring\(\s*message\s*,\s*strlen\(\s*"([^"]*)"\s*\)\s*\)\s*\)'
)
STATUS_VALUES = re.compile(r'\bstatus\s*(?:==\s*"(\w+)"|in\s*\(([^)]*)\))')


def _code(query: str) -> str:
    return "\n".join(line for line in query.splitlines() if not line.strip().startswith("//"))


def message_filter(query: Query) -> tuple[str, str]:
    filters = MESSAGE_FILTER.findall(_code(query.text))
    assert len(filters) == 1, f"{query.where}: expected one `message` filter, found {filters}"
    return filters[0]


def custom_dimensions(query: Query) -> set[str]:
    return {a or b for a, b in CUSTOM_DIMENSIONS.findall(_code(query.text))}


def parsed_columns(query: Query) -> dict[str, str]:
    """Each column a query fills with parse_json of the message, with the event prefix it skips."""
    return dict(PARSED.findall(_code(query.text)))


def fields(query: Query, column: str) -> set[str]:
    read = re.compile(rf"\b{re.escape(column)}(?:\.([A-Za-z_]\w*)|\[\s*[\"']([^\"']+)[\"']\s*\])")
    return {a or b for a, b in read.findall(_code(query.text))}


def status_values(query: Query) -> set[str]:
    values = set()
    for single, listed in STATUS_VALUES.findall(_code(query.text)):
        values |= {single} if single else set(re.findall(r'"(\w+)"', listed))
    return values


def stored_message(record: logging.LogRecord) -> str:
    """What `traces.message` holds for a record: the worker formats it with logging's default
    Formatter (no `extra`) and the host logs that text unchanged."""
    return logging.Formatter().format(record)


def logged_fields(message: str, prefix: str) -> dict[str, Any] | None:
    """KQL's `parse_json(substring(message, strlen(prefix)))`, strictly: the JSON object after the
    prefix, or None where Kusto would get no fields (parse_json of text that is not JSON is a string)."""
    if not message.startswith(prefix):
        return None
    try:
        parsed = json.loads(message[len(prefix) :])
    except json.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _matches(operator: str, text: str, message: str) -> bool:
    return (
        message == text
        if operator == "=="
        else message.startswith(text)
        if operator == "startswith"
        else text in message
    )


def drift(queries: list[Query], records: list[logging.LogRecord]) -> list[str]:
    """Each query's record and fields against the captured records, as Azure stores them: what a query
    reads that nobody logs, or reads in a way Azure does not fill."""
    poison = f"{_module_argument('poisonQueueName')}"
    host = {m.format(poison=poison) for m in HOST_MESSAGES}
    messages = [stored_message(r) for r in records]
    found = []
    for query in queries:
        operator, text = message_filter(query)
        columns = parsed_columns(query)
        if operator == "has" and text in host:
            if custom_dimensions(query) or columns:
                found.append(f"{query.where}: reads fields of a host record")
            continue
        found += [
            f"{query.where}: reads customDimensions.{f}, which the Python worker never fills (python-worker#1327)"
            for f in sorted(custom_dimensions(query))
        ]
        matching = [m for m in messages if _matches(operator, text, m)]
        if not matching:
            found.append(f"{query.where}: no logged record has message {operator} {text!r}")
            continue
        for column, prefix in columns.items():
            parsed = [logged_fields(m, prefix) for m in matching]
            if any(p is None for p in parsed):
                found.append(
                    f"{query.where}: {column}: a matching message has no JSON object after {prefix!r}"
                )
                continue
            logged = set().union(*(p.keys() for p in parsed if p is not None))
            found += [
                f"{query.where}: {column}.{f} is not logged" for f in sorted(fields(query, column) - logged)
            ]
    return found


# ---------------------------------------------------------------------------------------------------
# What the app logs, captured from real runs in the sandbox
# ---------------------------------------------------------------------------------------------------


@pytest.fixture
def logged(world, caplog) -> list[logging.LogRecord]:
    """A succeeded run (with a skipped contact and one throttled request per API) and a failed run."""
    caplog.set_level(logging.INFO)
    for i in range(3):
        world.person(f"Person {i:03d} Sample")
    world.cloud.bc.seed_contact(world.company, type="Company", displayName="Contoso", email="co@example.com")
    world.user(ALICE)
    world.cloud.bc.faults.throttle(count=1, retry_after=0.01, in_batch=False)
    world.cloud.graph.faults.throttle(count=1, retry_after=0.01, in_batch=False)
    assert world.sync(ALICE, mode="full").status == "succeeded"
    ghost = world.services.store.put_settings(UserSettings.from_json({"user": GHOST}))  # no mailbox
    assert world.sync(ghost, mode="full").status == "failed"
    # A timer tick whose public URL Graph cannot reach: the subscription fails validation (BEHAVIOUR §8.2).
    world.services.config = replace(world.services.config, public_url="https://127.0.0.1:9")
    settings = world.services.store.get_settings(ALICE)
    assert settings is not None and maintain(world.services, [settings]).failed == 1
    return list(caplog.records)


def _run_records(records: list[logging.LogRecord]) -> list[dict[str, Any]]:
    found = [logged_fields(stored_message(r), "contact sync run ") for r in records]
    return [f for f in found if f is not None]


def test_every_field_the_workbook_and_alerts_query_is_logged(logged):
    queries = all_queries()
    assert len(workbook_queries()) >= 6 and len(alert_queries()) == 4
    assert drift(queries, logged) == []
    read: dict[str, set[str]] = {}
    for q in queries:
        for column in parsed_columns(q):
            read.setdefault(column, set()).update(fields(q, column))
    assert {"status", "userHash", "dryRun", "bcThrottled"} <= read["run"] and "reason" in read["skip"]


def test_the_drift_check_reports_a_renamed_field_an_unknown_record_and_what_azure_does_not_fill(logged):
    run = 'traces\n| where message startswith "contact sync run {"\n'
    renamed = Query(
        "t:renamed",
        run
        + '| extend run = parse_json(substring(message, strlen("contact sync run ")))\n| project run.durationMs',
    )
    unknown = Query("t:unknown", 'traces\n| where message == "sync run finished"\n| project message')
    legacy = Query("t:legacy", run + "| project tostring(customDimensions.status)")
    offset = Query(
        "t:offset",
        run + '| extend run = parse_json(substring(message, strlen("contact sync ")))\n| project run.status',
    )
    assert drift([renamed, unknown, legacy, offset], logged) == [
        "t:renamed: run.durationMs is not logged",
        "t:unknown: no logged record has message == 'sync run finished'",
        "t:legacy: reads customDimensions.status, which the Python worker never fills (python-worker#1327)",
        "t:offset: run: a matching message has no JSON object after 'contact sync '",
    ]


def test_run_records_reach_traces_as_one_line_of_event_and_json(logged):
    """The message is all Azure keeps: one line, the event, one space, a JSON object, and nothing in
    `extra` that a reader might expect to find in customDimensions."""
    runs = [r for r in logged if stored_message(r).startswith("contact sync run {")]
    assert len(runs) == 2
    for record in logged:
        assert not hasattr(record, "custom_dimensions"), record.getMessage()
    for record in runs:
        message = stored_message(record)
        assert "\n" not in message and message == record.getMessage()
        fields_ = logged_fields(message, "contact sync run ")
        assert fields_ is not None and message.endswith("}")
        assert set(fields_) >= {"runId", "userHash", "mode", "dryRun", "status", "durationSeconds"}


def test_skip_warnings_stop_at_twenty_and_a_summary_counts_the_rest(world, caplog):
    """Each structured line is `event {JSON}` too: 22 skipped contacts give 20 `contact skipped` lines
    with their run and reason, then one `more contacts skipped` line that counts the two not logged."""
    caplog.set_level(logging.INFO)
    for i in range(22):
        world.cloud.bc.seed_contact(
            world.company, type="Company", displayName=f"Company {i:02d}", email=f"c{i}@example.com"
        )
    world.user(ALICE)
    report = world.sync(ALICE, mode="full")
    assert report.counts["skipped"] == 22
    messages = [stored_message(r) for r in caplog.records]
    skips = [logged_fields(m, "contact skipped ") for m in messages if m.startswith("contact skipped {")]
    assert len(skips) == 20
    assert all(s and s["runId"] == report.runId and s["userHash"] == user_hash(ALICE) for s in skips)
    (more,) = [logged_fields(m, "more contacts skipped ") for m in messages if m.startswith("more contacts")]
    assert more is not None and (more["notLogged"], more["skipped"]) == (2, 22)
    assert sum(more["reasons"].values()) == 22 and ALICE not in "\n".join(messages)


def test_status_values_in_queries_are_run_report_statuses():
    openapi = json.loads((ROOT / "openapi" / "openapi.json").read_text())
    statuses = set(openapi["definitions"]["RunReport"]["properties"]["status"]["enum"])
    used = set().union(*(status_values(q) for q in all_queries()))
    assert {"failed", "succeeded", "partial"} <= used <= statuses


def test_the_run_record_counts_throttled_requests_per_api(logged):
    ok, failed = _run_records(logged)
    assert (ok["status"], failed["status"]) == ("succeeded", "failed")
    assert (ok["bcThrottled"], ok["graphThrottled"]) == (1, 1)
    assert (failed["bcThrottled"], failed["graphThrottled"]) == (0, 0)
    assert ok["skipped"] == 1 and ok["bcRequests"] > 0 and ok["graphRequests"] > 0


def test_the_poison_alert_watches_the_queue_the_worker_reads():
    binding = json.loads((ROOT / "function_sync_worker" / "function.json").read_text())["bindings"][0]
    assert _module_argument("poisonQueueName") == f"{binding['queueName']}-poison"
    (poison,) = [q for q in alert_queries() if "poison" in q.where]
    assert message_filter(poison) == ("has", f"Moving message to queue '{binding['queueName']}-poison'")


def test_no_placeholder_is_left_in_a_deployed_query():
    leftovers = [q.where for q in all_queries() if re.search(r"__[A-Z_]+__", q.text)]
    assert leftovers == []
    assert workbook_json()["fallbackResourceIds"][0].endswith("/components/appi-x")


def test_every_alert_notifies_the_action_group_and_the_stale_window_fits_the_query_range():
    bicep = BicepFile.load(OPERATIONS)
    for rule in bicep.resources("Microsoft.Insights/scheduledQueryRules"):
        groups = bicep.prop(bicep.body(rule), "properties", "actions", "actionGroups")
        assert [_text(g) for g in _named(groups)] == ["actionGroup.id"], bicep.where(rule)
    (group,) = bicep.resources("Microsoft.Insights/actionGroups")
    assert "alertEmail" in _text(bicep.prop(bicep.body(group), "properties", "emailReceivers"))
    stale = bicep.body(bicep.declarations("resource")["staleUsersAlert"])
    assert bicep.value(bicep.prop(stale, "properties", "overrideQueryTimeRange"), {}) == "P2D"
    main_max = BicepFile.load(MAIN).declarations("parameter")["staleUserHours"]
    assert "@maxValue(47)" in _text(main_max.prev_named_sibling) and "@maxValue(47)" in _text(
        bicep.declarations("parameter")["staleUserHours"].prev_named_sibling
    ), "stale hours must stay below the two-day query range"


def test_no_mailbox_address_reaches_the_records_the_queries_read(logged):
    """The failed run's warning quoted Graph's error, which names the mailbox; logs name users by hash."""
    read = [r for q in all_queries() for r in logged if _matches(*message_filter(q), r.getMessage())]
    assert any(r.getMessage().startswith("contact sync run failed: ") for r in read)
    text = "\n".join(stored_message(r) for r in read)
    assert ALICE not in text.lower() and GHOST not in text.lower() and "%40" not in text
    assert f"<user {user_hash(GHOST)}>" in text


def test_run_logs_are_not_sampled_away():
    """Adaptive sampling drops a share of each telemetry type it is not told to keep ("Configure
    sampling", https://learn.microsoft.com/azure/azure-functions/configure-monitoring#configure-sampling).
    The workbook counts runs and the failed-run alert fires on single records, so traces must be kept."""
    sampling = json.loads((ROOT / "host.json").read_text())["logging"]["applicationInsights"][
        "samplingSettings"
    ]
    assert not sampling.get("isEnabled", True) or "Trace" in sampling["excludedTypes"].split(";")
