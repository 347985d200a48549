"""The Table Storage layer against a real Azurite (session fixture), one fresh table prefix per test."""

from __future__ import annotations

import json
import threading
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from azure.data.tables import TableServiceClient

from shared.model import Link, RunReport, UserSettings, UserState
from shared.store import (
    ConcurrencyError,
    LeaseLost,
    MalformedRowError,
    Store,
    StoreError,
    decode_key,
    encode_key,
)

ALICE = "alice@contoso.com"
BOB = "bob@contoso.com"
# Valid as a UPN (see shared.model) yet full of characters Table Storage refuses in keys.
ODD_USER = "o'neil/sales#1?x%2fy@contoso.com"
COMPANY = "6f1c0a2e-1b2c-4d3e-8f90-a1b2c3d4e5f6"


class FakeClock:
    def __init__(self) -> None:
        self.now = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def _prefix() -> str:
    return "T" + uuid.uuid4().hex[:10]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(storage_connection_string, clock) -> Store:
    s = Store.from_connection_string(storage_connection_string, prefix=_prefix(), clock=clock)
    s.ensure_tables()
    return s


def _raw(store: Store, conn: str, kind: str):
    """Direct access to a table, to plant hand-edited rows or count what is stored."""
    return TableServiceClient.from_connection_string(conn).get_table_client(store.table_names[kind])


# --- setup ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", "1abc", "a-b", "Contact_Sync", "x" * 56])
def test_invalid_table_prefix_names_the_setting(storage_connection_string, prefix):
    with pytest.raises(ValueError, match="SYNC_TABLE_PREFIX"):
        Store.from_connection_string(storage_connection_string, prefix=prefix)


def test_ensure_tables_is_idempotent_and_missing_tables_fail_loudly(storage_connection_string):
    prefix = _prefix()
    unprepared = Store.from_connection_string(storage_connection_string, prefix=prefix)
    # A missing table must not read as "this user has no state" (that would silently restart syncs).
    with pytest.raises(StoreError, match=f"{prefix}State.*ensure_tables"):
        unprepared.get_state(ALICE)
    unprepared.ensure_tables()
    unprepared.ensure_tables()
    assert unprepared.get_state(ALICE) == UserState(user=ALICE)


def test_errors_name_table_and_operation_but_never_the_key(azurite):
    fake_key = "c2VjcmV0LWtleS10aGF0LW11c3Qtbm90LWxlYWstMTIzNDU2Nzg5MA=="
    conn = (
        f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={fake_key};"
        f"TableEndpoint=http://127.0.0.1:{azurite.table_port}/devstoreaccount1;"
    )
    wrong = Store.from_connection_string(conn, prefix="Leaky")
    with pytest.raises(StoreError) as caught:
        wrong.get_settings(ALICE)
    message = str(caught.value)
    assert "LeakySettings" in message and "read settings of alice@contoso.com" in message and "403" in message
    assert fake_key not in message and "AccountKey" not in message

    with pytest.raises(StoreError) as malformed:
        Store.from_connection_string("AccountKey=" + fake_key + ";garbage")
    assert fake_key not in str(malformed.value)


# --- settings -------------------------------------------------------------------------------------


def test_settings_round_trip_with_filter_and_defaults(store, storage_connection_string):
    alice = UserSettings.from_json(
        {
            "user": "Alice@Contoso.com",
            "companyId": COMPANY,
            "folderName": "Kunder",
            "filter": {"companyName": "Contoso*|Fabrikam", "city": "<>Oslo"},
            "pullEditsFromOutlook": True,
        }
    )
    assert store.get_settings(ALICE) is None
    assert store.put_settings(alice) == alice
    assert store.put_settings(UserSettings(user=BOB)) == UserSettings(user=BOB)

    assert store.get_settings(ALICE) == alice
    bob = store.get_settings(BOB)
    assert bob.enabled and bob.company_id is None and bob.folder_name == "Business Central"
    assert bob.filter == {} and bob.pull_new_from_outlook and not bob.pull_edits_from_outlook
    assert sorted(s.user for s in store.list_settings()) == [ALICE, BOB]

    row = _raw(store, storage_connection_string, "Settings").get_entity(encode_key(ALICE), "settings")
    assert json.loads(row["filter"]) == {"companyName": "Contoso*|Fabrikam", "city": "<>Oslo"}

    # A PUT replaces the row: settings dropped from the document go back to their defaults.
    store.put_settings(UserSettings(user=ALICE, enabled=False))
    assert store.get_settings(ALICE) == UserSettings(user=ALICE, enabled=False)


def test_put_settings_refuses_an_invalid_record(store):
    with pytest.raises(ValueError, match="folderName"):
        store.put_settings(UserSettings(user=ALICE, folder_name="a/b"))
    assert store.get_settings(ALICE) is None


def test_malformed_rows_are_reported_not_raised_by_listings(store, storage_connection_string):
    store.put_settings(UserSettings(user=ALICE))
    raw = _raw(store, storage_connection_string, "Settings")
    hand_edits = {
        "bad-bool@contoso.com": {"enabled": "yes"},
        "bad-json@contoso.com": {"filter": "{companyName: Contoso"},
        "bad-filter@contoso.com": {"filter": json.dumps({"city": "a&b"})},
        "typo@contoso.com": {"enabeld": False},
        "Upper@Contoso.com": {"enabled": True},
        "not a user": {"enabled": True},
    }
    for user, columns in hand_edits.items():
        raw.create_entity({"PartitionKey": user, "RowKey": "settings", **columns})

    valid, problems = store.list_settings_checked()
    assert [s.user for s in valid] == [ALICE]
    found = dict(problems)
    assert set(found) == set(hand_edits)
    assert found["bad-bool@contoso.com"].startswith("enabled:")
    assert found["bad-json@contoso.com"].startswith("filter:")
    assert found["bad-filter@contoso.com"].startswith("filter.city:")
    assert found["typo@contoso.com"].startswith("enabeld:")
    assert found["Upper@Contoso.com"].startswith("PartitionKey:")
    assert found["not a user"].startswith("user:")

    assert [s.user for s in store.list_settings()] == [ALICE]
    with pytest.raises(MalformedRowError, match="enabled"):
        store.get_settings("bad-bool@contoso.com")


def test_delete_settings_stops_the_user_and_forgets_links_and_state_but_keeps_reports(store):
    store.put_settings(UserSettings(user=ALICE))
    store.put_settings(UserSettings(user=BOB))
    store.upsert_links(ALICE, [Link(f"bc-{i}", f"ol-{i}") for i in range(150)])
    store.upsert_links(BOB, [Link("bc-1", "ol-1")])
    state = store.save_state(UserState(user=ALICE, bc_watermark="2026-01-01T00:00:00.000000Z"))
    report = RunReport(user=ALICE, mode="full", status="succeeded")
    store.save_report(report)

    assert store.delete_settings(ALICE) is True
    assert store.get_settings(ALICE) is None
    assert store.get_links(ALICE) == {}
    assert store.get_state(ALICE) == UserState(user=ALICE)
    assert store.get_report(report.runId).runId == report.runId
    assert [s.user for s in store.list_settings()] == [BOB]
    assert list(store.get_links(BOB)) == ["bc-1"]
    # A run still holding the old state can no longer write its watermark.
    with pytest.raises(ConcurrencyError):
        store.save_state(replace(state, bc_watermark="2026-02-01T00:00:00.000000Z"))
    assert store.delete_settings(ALICE) is False


# --- links ----------------------------------------------------------------------------------------


def _links(n: int, tag: str = "") -> list[Link]:
    return [
        Link(
            bc_id=f"{uuid.UUID(int=i)}",
            outlook_id=f"AAMkAD{i:08d}{tag}" + "x" * 120,
            bc_hash=f"b{i}{tag}",
            outlook_hash=f"o{i}{tag}",
            email=f"c{i}@fabrikam.com",
        )
        for i in range(n)
    ]


def _no_etag(links: dict[str, Link]) -> dict[str, Link]:
    return {k: replace(v, etag=None) for k, v in links.items()}


def test_links_upsert_in_transactions_and_idempotent_delete(store):
    links = _links(250)
    store.upsert_links(ALICE, links)
    stored = store.get_links(ALICE)
    assert _no_etag(stored) == {link.bc_id: link for link in links}
    assert all(link.etag for link in stored.values())

    # Re-upsert replaces: changed hashes win, an emptied email stays empty, a BC id given twice keeps
    # its last version (one transaction may not touch an entity twice).
    changed = [replace(link, bc_hash="new", email="") for link in links[:120]]
    store.upsert_links(ALICE, [*changed, replace(changed[0], outlook_hash="last")])
    stored = store.get_links(ALICE)
    assert len(stored) == 250
    assert stored[links[0].bc_id].outlook_hash == "last"
    assert stored[links[1].bc_id].bc_hash == "new" and stored[links[1].bc_id].email == ""
    assert stored[links[200].bc_id].bc_hash == links[200].bc_hash

    gone = [link.bc_id for link in links[:130]]
    store.delete_links(ALICE, [*gone, "never-existed", gone[0]])
    assert sorted(store.get_links(ALICE)) == sorted(link.bc_id for link in links[130:])
    store.delete_links(ALICE, gone)  # all already gone: still fine
    assert len(store.get_links(ALICE)) == 120
    assert store.get_links(BOB) == {}


@pytest.mark.slow
def test_links_round_trip_across_pages_and_transactions(store):
    """Links span Table Storage's 1,000-entity query pages and 100-operation transactions: every one
    comes back exactly as written. (How long this takes is the benchmark's business, not a test's.)"""
    links = _links(2_345)
    store.upsert_links(ALICE, links)
    assert _no_etag(store.get_links(ALICE)) == {link.bc_id: link for link in links}


# --- state ----------------------------------------------------------------------------------------


def test_state_is_saved_only_over_the_version_it_was_read_from(store):
    fresh = store.get_state(ALICE)
    assert fresh == UserState(user=ALICE) and fresh.etag is None

    delta = "https://graph.microsoft.com/v1.0/users/alice/contactFolders/AAMk/contacts/delta?$deltatoken=" + (
        "Zm9vYmFy" * 12_500
    )  # 100 KB: far over one property's 32 K characters
    first = store.save_state(
        replace(fresh, bc_watermark="2026-03-01T10:00:00.000000Z", delta_link=delta, folder_id="AAMkFolder")
    )
    assert first.etag
    assert store.get_state(ALICE) == first

    second = store.save_state(replace(first, bc_watermark="2026-03-01T11:00:00.000000Z", delta_link=None))
    assert second.etag != first.etag
    loaded = store.get_state(ALICE)
    assert loaded == second and loaded.delta_link is None and loaded.folder_id == "AAMkFolder"

    with pytest.raises(ConcurrencyError, match="changed by another writer"):
        store.save_state(replace(first, bc_watermark="2020-01-01T00:00:00.000000Z"))
    with pytest.raises(ConcurrencyError, match="created it first"):
        store.save_state(UserState(user=ALICE, bc_watermark="2020-01-01T00:00:00.000000Z"))
    assert store.get_state(ALICE) == second


# --- run reports ----------------------------------------------------------------------------------


def _report(user: str, items: int, started: datetime | None = None, status: str = "running") -> RunReport:
    report = RunReport(user=user, mode="full", status=status)
    if started is not None:
        report.startedAt = started.isoformat().replace("+00:00", "Z")
    for i in range(items):
        # Random ids, as Graph immutable ids are: the payload hardly compresses, forcing several rows.
        report.add("outlookCreated", str(uuid.uuid4()), "AAMkAD" + uuid.uuid4().hex * 4, f"c{i}@fabrikam.com")
    return report


def _row_count(store: Store, conn: str, kind: str) -> int:
    return sum(1 for _ in _raw(store, conn, kind).list_entities(select=["RowKey"]))


def test_large_report_round_trip_and_shrinking_resave_leaves_no_stale_chunks(
    store, storage_connection_string
):
    big = _report(ALICE, 30_000)
    store.save_report(big)
    loaded = store.get_report(big.runId)
    assert loaded.to_json() == big.to_json() and len(loaded.items) == 30_000
    rows_big = _row_count(store, storage_connection_string, "Runs")

    final = replace(big, status="succeeded", finishedAt="2026-03-01T12:05:00.000000Z", items=big.items[:5])
    store.save_report(final)
    assert store.get_report(big.runId).to_json() == final.to_json()

    # Exactly as many rows as a store that only ever saw the final report.
    reference = Store.from_connection_string(storage_connection_string, prefix=_prefix())
    reference.ensure_tables()
    reference.save_report(final)
    rows_final = _row_count(store, storage_connection_string, "Runs")
    assert rows_final == _row_count(reference, storage_connection_string, "Runs") < rows_big
    assert store.get_report("no-such-run") is None


def test_list_reports_newest_first_with_limit(store):
    t0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
    reports = [_report(ALICE, i + 1, started=t0 + timedelta(minutes=i)) for i in range(5)]
    for report in reports[::2] + reports[1::2]:  # saved out of order
        store.save_report(report)
    store.save_report(_report(BOB, 1, started=t0 + timedelta(hours=1)))
    store.save_report(replace(reports[4], status="succeeded"))  # a status update, not a new run

    listed = store.list_reports(ALICE, limit=3)
    assert [r.runId for r in listed] == [r.runId for r in reversed(reports[2:])]
    assert listed[0].status == "succeeded" and len(listed[0].items) == 5

    summaries = store.list_reports(ALICE, items=False)
    assert [r.runId for r in summaries] == [r.runId for r in reversed(reports)]
    assert summaries[1].items == [] and summaries[1].counts["outlookCreated"] == 4
    assert store.list_reports(ALICE, limit=0) == []
    assert store.list_reports("nobody@contoso.com") == []


# --- leases ---------------------------------------------------------------------------------------


def test_lease_is_exclusive_until_it_expires(store, clock):
    lease = store.acquire_lease(ALICE, "run-1", 60)
    assert lease is not None and lease.holder == "run-1"
    assert lease.expires_at == clock.now + timedelta(seconds=60)

    assert store.acquire_lease(ALICE, "run-2", 60) is None
    current = store.current_lease(ALICE)
    assert (current.holder, current.expires_at) == ("run-1", lease.expires_at)
    assert store.acquire_lease(BOB, "run-2", 60) is not None  # leases are per user

    lease = store.renew_lease(lease, 120)
    clock.advance(100)
    assert store.acquire_lease(ALICE, "run-2", 60) is None  # renewed: still held

    clock.advance(21)
    assert store.current_lease(ALICE) is None  # expired: nobody holds it
    taken = store.acquire_lease(ALICE, "run-2", 60)
    assert taken is not None and store.current_lease(ALICE).holder == "run-2"

    with pytest.raises(LeaseLost, match="lease of alice"):
        store.renew_lease(lease, 60)
    store.release_lease(lease)  # no longer ours: must not free run-2's lease
    assert store.current_lease(ALICE).holder == "run-2"

    store.release_lease(taken)
    assert store.current_lease(ALICE) is None
    store.release_lease(taken)  # already gone
    assert store.acquire_lease(ALICE, "run-3", 60) is not None


def test_an_expired_lease_nobody_took_can_still_be_renewed(store, clock):
    lease = store.acquire_lease(ALICE, "run-1", 10)
    clock.advance(30)
    renewed = store.renew_lease(lease, 10)
    assert renewed.expires_at == clock.now + timedelta(seconds=10)
    assert store.acquire_lease(ALICE, "run-2", 10) is None


def _race(conn: str, prefix: str, clock: FakeClock, user: str, holders: list[str]) -> list:
    stores = [Store.from_connection_string(conn, prefix=prefix, clock=clock) for _ in holders]
    barrier = threading.Barrier(len(holders))
    results: list = [None] * len(holders)

    def contend(i: int) -> None:
        barrier.wait()
        results[i] = stores[i].acquire_lease(user, holders[i], 60)

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(len(holders))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_racers_on_a_free_or_expired_lease_exactly_one_wins(store, clock, storage_connection_string):
    for round_ in range(5):
        user = f"racer{round_}@contoso.com"
        if round_ % 2:  # odd rounds: an expired lease of a crashed run is there to take over
            store.acquire_lease(user, "crashed", 5)
            clock.advance(10)
        holders = [f"timer-{round_}", f"http-{round_}", f"queue-{round_}"]
        results = _race(storage_connection_string, store.prefix, clock, user, holders)
        winners = [r for r in results if r is not None]
        assert len(winners) == 1, results
        assert store.current_lease(user).holder == winners[0].holder


# --- keys -----------------------------------------------------------------------------------------


def test_keys_with_forbidden_characters_round_trip(store, storage_connection_string):
    odd_ids = ["a/b", "c#d", "e?f", "g\\h", "tab\there", "pct%2F", "o'q", "æøå"]
    for value in [ODD_USER, *odd_ids]:
        assert decode_key(encode_key(value)) == value
        assert not set(encode_key(value)) & set("/\\#?\t")

    settings = store.put_settings(UserSettings(user=ODD_USER, folder_name="Kunder"))
    assert settings.user == ODD_USER
    assert store.get_settings(ODD_USER) == settings
    assert store.list_settings_checked() == ([settings], [])

    store.upsert_links(ODD_USER, [Link(bc_id=i, outlook_id=f"ol-{i}") for i in odd_ids])
    assert sorted(store.get_links(ODD_USER)) == sorted(odd_ids)
    store.delete_links(ODD_USER, odd_ids[:3])
    assert sorted(store.get_links(ODD_USER)) == sorted(odd_ids[3:])

    state = store.save_state(UserState(user=ODD_USER, folder_id="f"))
    assert store.get_state(ODD_USER) == state

    report = replace(_report(ODD_USER, 2), runId="run/with#odd?id")
    store.save_report(report)
    assert store.get_report("run/with#odd?id").to_json() == report.to_json()
    assert [r.runId for r in store.list_reports(ODD_USER)] == ["run/with#odd?id"]

    lease = store.acquire_lease(ODD_USER, "holder/1", 30)
    assert store.current_lease(ODD_USER) == lease
    assert store.delete_settings(ODD_USER) is True
    assert store.get_links(ODD_USER) == {}
