"""Contact pictures (`syncPhotos`, BEHAVIOUR §4.6): BC's picture → the Outlook contact's photo, and an
Outlook photo → BC when BC has none. A step of its own after the contact writes (`sync._run`), so
the contact decision table stays about fields, and a photo problem never fails a contact.

What tells a picture changed, without reading it:
- Business Central: writing a contact's picture modifies the contact record (its Image field), so its
  `lastModifiedDateTime` and its etag move (the picture's etag is the contact's); the contacts read
  with `$expand=picture` also say whether it has one (width, height, contentType, no bytes). The
  link keeps the contact's etag as of the last picture check (`Link.photo_stamp`; an etag, not the
  millisecond timestamp, so two changes within one millisecond are still told apart): a contact
  whose etag did not move costs no picture request.
- Outlook: a photo set on a contact changes the contact item, so the folder's delta reports it. Only
  contacts the delta reports (incremental runs), contacts the sync has not checked yet and Outlook
  contacts it adopts are read.
- The link keeps the hash of the picture both sides last agreed on (`Link.photo`), so a picture read
  that shows nothing new writes nothing.

Rules: BC wins when both sides have a picture and they differ. A picture deleted on one side is not
deleted on the other: Graph v1.0 documents no delete for a contact's photo, and BC is the source; an
Outlook photo the sync copied from BC is never sent back to BC after BC removed its picture (its hash
is the one the link holds). Limits: Outlook takes JPEG or PNG under 4 MB ("Update profilePhoto");
BC takes JPEG, PNG or GIF. A picture that cannot be copied is a report item (`photoSkipped`) with the
reason, noted once per picture, never a failed contact.

Cost: one request per picture read and per picture written (neither API documents binary bodies in
`$batch`), plus, after pictures written to BC, one BC list request per 40 of them for their new
etags (so the next run knows those changes were its own). A run that finds nothing
new sends none.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from shared.bc_client import BcClient
from shared.graph_client import GraphClient
from shared.http_client import ApiError
from shared.model import Link, ReportItem, RunReport, earliest, redact

log = logging.getLogger(__name__)

OUTLOOK_MAX_BYTES = 4 * 1024 * 1024  # "Update profilePhoto": the photo must be under 4 MB
OUTLOOK_TYPES = ("image/jpeg", "image/png")
BC_TYPES = ("image/jpeg", "image/png", "image/gif")
NONE = "none"  # Link.photo: checked, and no picture on either side
BC_LOOKUP_CHUNK = 40  # BcClient.get_contacts: ids per request
SKIPPED = "photoSkipped"  # the report item of a picture not copied
# Pictures are single requests, so they go side by side: 4 per mailbox (Graph's concurrency per
# mailbox), and at most 5 BC picture requests at once in this process (BC processes 5 requests of a
# principal at once and queues the rest), however many users run in parallel.
MAILBOX_PARALLEL = 4
_BC_SLOTS = threading.BoundedSemaphore(5)


def photo_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def image_type(data: bytes) -> str | None:
    """The image type from its first bytes (what both services go by), or None if not an image."""
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data.startswith(b"BM"):
        return "image/bmp"
    return None


def why_not_for_outlook(data: bytes) -> str | None:
    """Why Outlook cannot take this picture as a contact photo, in words a person understands."""
    kind = image_type(data)
    if kind not in OUTLOOK_TYPES:
        what = kind.removeprefix("image/").upper() if kind else "not an image Outlook can read"
        return f"the Business Central picture is {what}; Outlook takes JPEG or PNG photos"
    if len(data) >= OUTLOOK_MAX_BYTES:
        return (
            f"the Business Central picture is {len(data) / 1048576:.1f} MB; Outlook takes photos under 4 MB"
        )
    return None


def why_not_for_bc(data: bytes) -> str | None:
    kind = image_type(data)
    if kind not in BC_TYPES:
        return "the Outlook photo is not a JPEG, PNG or GIF picture, which Business Central takes"
    return None


def state_of(link: Link) -> tuple[str, str, str]:
    """The photo state a link keeps: agreed hash, BC etag, Outlook media etag."""
    return link.photo, link.photo_stamp, link.photo_etag


def _stamp(bc: dict[str, Any]) -> str:
    """What tells the contact (and so its picture) changed: its etag, else its timestamp."""
    return str(bc.get("@odata.etag") or bc.get("lastModifiedDateTime") or "")


def new_contact_state(bc: dict[str, Any]) -> tuple[str, str, str] | None:
    """The photo state of a link to an Outlook contact the sync has just created, when it is already
    settled: BC's record says (through `$expand=picture`) it has no picture, and the new contact has no
    photo. Stored with the link itself, so the photo step has nothing to write back (an initial sync
    would otherwise write every link twice). None when the photo step must decide."""
    if "picture" not in bc or bc_has_picture(bc):
        return None
    return NONE, _stamp(bc), ""


def bc_has_picture(record: dict[str, Any]) -> bool:
    """From the contact's `$expand=picture` metadata: an empty picture has no content type and a width of 0."""
    picture = record.get("picture") or {}
    return bool(picture.get("contentType")) or int(picture.get("width") or 0) > 0


@dataclass
class PhotoRun:
    """What the photo step of one run works with."""

    user: str
    folder_id: str
    company_id: str
    bc: BcClient
    graph: GraphClient
    report: RunReport
    links_before: dict[str, Link]  # by BC id, as the run started
    links_now: dict[str, Link]  # by BC id, after the contact writes
    bc_records: dict[str, dict[str, Any]]  # BC records read this run (with `picture` metadata)
    outlook_changed: set[str]  # Outlook ids the delta reported (incremental runs only)
    outlook_created: set[str]  # Outlook ids this run created (they have no photo)
    lock: threading.Lock = field(default_factory=threading.Lock)  # the report and outcome, across workers


@dataclass
class PhotoOutcome:
    """What the run's watermark and delta decisions need to know about the photo step."""

    links: dict[str, Link] = field(default_factory=dict)  # by BC id: links whose photo state changed
    outlook_written: dict[str, str] = field(default_factory=dict)  # Outlook id → its view's fingerprint
    hold_bc_from: str | None = None  # a BC picture that could not be read or written for a passing reason
    hold_delta: bool = False  # an Outlook photo that could not be read or copied for a passing reason


@dataclass
class _Case:
    link: Link  # the link with the photo state carried over from before the run
    outlook_new: bool  # the Outlook contact was created this run
    outlook_unknown: bool  # Outlook may hold a photo the sync has not seen (reported, or newly linked)
    etag: str | None = ""  # the Outlook photo's media etag as read this run (None: no photo, "" not read)

    def inspects_outlook(self) -> bool:
        """Whether this run must look at the Outlook photo (its media etag first, in `$batch`)."""
        return not self.outlook_new and (self.outlook_unknown or not self.link.photo)


def sync_photos(run: PhotoRun) -> PhotoOutcome:
    """Copy the pictures that changed since the last run, in both directions; see the module doc."""
    outcome = PhotoOutcome()
    cases = _cases(run)
    missing = [bc_id for bc_id in cases if bc_id not in run.bc_records]
    records = dict(run.bc_records)
    if missing:
        records.update(_read_bc_records(run, missing, outcome))
    cases = {bc_id: case for bc_id, case in cases.items() if bc_id in records}
    _read_etags(run, [case for case in cases.values() if case.inspects_outlook()])

    def one(bc_id: str) -> tuple[_Case, bytes] | None:
        case, bc = cases[bc_id], records[bc_id]
        try:
            pending = _decide(run, case, bc, outcome)
        except ApiError as exc:
            _transient(run, case, bc, outcome, str(exc))
            return None
        return None if pending is None else (case, pending)

    with ThreadPoolExecutor(max_workers=MAILBOX_PARALLEL) as pool:
        to_bc = [item for item in pool.map(one, sorted(cases)) if item is not None]
    if to_bc:
        _write_to_bc(run, to_bc, outcome)
    return outcome


def _cases(run: PhotoRun) -> dict[str, _Case]:
    """Every link whose picture may have changed on either side, with its photo state."""
    cases: dict[str, _Case] = {}
    for bc_id, link in run.links_now.items():  # a rewritten link keeps its photo state (executor._link)
        before = run.links_before.get(bc_id)
        same_contact = before is not None and before.outlook_id == link.outlook_id
        created = link.outlook_id in run.outlook_created
        unknown = not created and (not same_contact or link.outlook_id in run.outlook_changed)
        bc = run.bc_records.get(bc_id)
        bc_moved = bc is not None and (_stamp(bc) != link.photo_stamp or not link.photo)
        # A contact created this run is a case only when its state is not settled yet: a link written
        # with `new_contact_state` (no picture on either side) has nothing left to do.
        if unknown or bc_moved or (created and not link.photo):
            cases[bc_id] = _Case(link, created, unknown)
    return cases


def _read_etags(run: PhotoRun, cases: list[_Case]) -> None:
    """The media etags of the Outlook photos this run must look at, 20 to a `$batch` call. Unread
    (a failure), a photo is read whole instead."""
    if not cases:
        return
    try:
        etags = run.graph.photo_etags(run.user, run.folder_id, [case.link.outlook_id for case in cases])
    except ApiError as exc:
        log.info("photo step: could not read photo metadata (%s)", redact(str(exc), run.user))
        return
    for case in cases:
        case.etag = etags.get(case.link.outlook_id, "")


def _outlook_photo(run: PhotoRun, case: _Case) -> tuple[str, bytes | None]:
    """The Outlook photo's hash (NONE without one) and its bytes when they had to be read: not when
    its media etag is the one the link agreed on."""
    link = case.link
    if case.outlook_new or case.etag is None:
        return NONE, None
    if case.etag and case.etag == link.photo_etag and link.photo:
        return link.photo, None
    data = run.graph.get_photo(run.user, run.folder_id, link.outlook_id)
    return (photo_hash(data) if data else NONE), data


def _decide(run: PhotoRun, case: _Case, bc: dict[str, Any], outcome: PhotoOutcome) -> bytes | None:
    """One contact: BC's picture to Outlook here, or the Outlook photo returned to be written to BC."""
    link, stamp = case.link, _stamp(bc)
    etag = link.photo_etag if case.etag == "" else (case.etag or "")
    if bc_has_picture(bc):
        data: bytes | None = None
        agreed = link.photo
        if stamp != link.photo_stamp or not link.photo or case.outlook_new:
            data = _bc(run.bc.get_picture, run.company_id, link.bc_id)
            agreed = photo_hash(data) if data else NONE
        seen = case.inspects_outlook() or case.outlook_new
        outlook = _outlook_photo(run, case)[0] if seen else link.photo
        if data is not None and outlook != agreed:
            etag = "" if _to_outlook(run, link, data, outcome) else etag
        elif data is None and outlook != agreed and agreed != NONE:
            data = _bc(run.bc.get_picture, run.company_id, link.bc_id)
            etag = "" if data and _to_outlook(run, link, data, outcome) else etag
        _remember(outcome, link, agreed, stamp, etag)
        return None
    # BC has no picture. One the sync copied to Outlook before stays there and is not sent back.
    state = link.photo or NONE
    if case.inspects_outlook():
        outlook, data = _outlook_photo(run, case)
        if data is not None and outlook not in (NONE, link.photo):
            why = why_not_for_bc(data)
            if why is None:
                return data
            _skip(run, link, why)
            state = outlook
    _remember(outcome, link, state, stamp, etag)
    return None


def _to_outlook(run: PhotoRun, link: Link, data: bytes, outcome: PhotoOutcome) -> bool:
    """Write BC's picture as the Outlook photo; False when Outlook cannot take it (noted)."""
    why = why_not_for_outlook(data)
    if why is not None:
        _skip(run, link, why)
        return False
    kind = image_type(data) or "image/jpeg"
    try:
        run.graph.put_photo(run.user, run.folder_id, link.outlook_id, data, kind)
    except ApiError as exc:
        if exc.status is None or exc.status == 429 or exc.status >= 500:
            raise  # passing: the caller holds the watermark so the next run tries again
        _skip(run, link, f"Outlook refused the Business Central picture ({exc.status} {exc.code})")
        return False
    with run.lock:
        run.report.photos["toOutlook"] = run.report.photos.get("toOutlook", 0) + 1
        # The photo changes the contact item, so the next delta reports it: an echo of this run's write.
        outcome.outlook_written[link.outlook_id] = link.outlook_hash
    return True


def _write_to_bc(run: PhotoRun, pending: list[tuple[_Case, bytes]], outcome: PhotoOutcome) -> None:
    """Outlook photos to BC contacts without a picture: If-Match the record read just now (a 412 means
    BC changed meanwhile: BC wins, the next run sees its change), then their new stamps."""
    fresh = _read_bc_records(run, [case.link.bc_id for case, _ in pending], outcome)
    written: dict[str, tuple[_Case, str]] = {}
    for case, data in pending:
        link = case.link
        bc = fresh.get(link.bc_id)
        if bc is None or bc_has_picture(bc):
            continue  # gone, or BC got a picture meanwhile: the next run copies that one to Outlook
        try:
            kind = image_type(data) or "image/jpeg"
            _bc(run.bc.put_picture, run.company_id, link.bc_id, data, kind, bc["@odata.etag"])
        except ApiError as exc:
            if exc.status == 412:
                why = "not copied to Business Central: the contact changed there meanwhile; Business Central wins"
                _skip(run, link, why)
                # Looked at afresh when BC's change arrives: BC's picture if it has one, else this photo.
                _remember(outcome, link, "", link.photo_stamp, "")
            elif exc.status is not None and 400 <= exc.status < 500 and exc.status != 429:
                _skip(run, link, f"Business Central refused the Outlook photo ({exc.status} {exc.code})")
                _remember(outcome, link, photo_hash(data), _stamp(bc), case.etag or "")
            else:
                _skip(run, link, f"not copied to Business Central: {redact(str(exc), run.user)}")
                outcome.hold_delta = True
            continue
        run.report.photos["toBc"] = run.report.photos.get("toBc", 0) + 1
        written[link.bc_id] = (case, photo_hash(data))
    if written:
        stamps = _read_bc_records(run, list(written), outcome)
        for bc_id, (case, agreed) in written.items():
            _remember(outcome, case.link, agreed, _stamp(stamps.get(bc_id) or {}), case.etag or "")


def _bc(call: Callable[..., Any], *args: Any) -> Any:
    """A BC picture request within the process's share of BC's concurrency."""
    with _BC_SLOTS:
        return call(*args)


def _read_bc_records(run: PhotoRun, ids: Iterable[str], outcome: PhotoOutcome) -> dict[str, dict[str, Any]]:
    try:
        return {c["id"]: c for c in run.bc.get_contacts(run.company_id, sorted(set(ids)), pictures=True)}
    except ApiError as exc:
        log.info("photo step: could not read BC contacts (%s)", redact(str(exc), run.user))
        outcome.hold_delta = True
        return {}


def _remember(outcome: PhotoOutcome, link: Link, photo: str, stamp: str, etag: str) -> None:
    """The photo state a link keeps for the next run (stored by `sync` after this step)."""
    outcome.links[link.bc_id] = replace(link, photo=photo, photo_stamp=stamp, photo_etag=etag)


def _skip(run: PhotoRun, link: Link, reason: str) -> None:
    with run.lock:
        run.report.photos["notCopied"] = run.report.photos.get("notCopied", 0) + 1
        run.report.items.append(
            ReportItem(SKIPPED, link.bc_id, link.outlook_id, link.email or None, f"photo: {reason}")
        )


def _transient(run: PhotoRun, case: _Case, bc: dict[str, Any], outcome: PhotoOutcome, error: str) -> None:
    """A picture read or write that failed for a passing reason: noted, and looked at again next run
    (the BC watermark is held before this contact, and the delta link when Outlook was involved)."""
    _skip(run, case.link, f"not copied this time: {redact(error, run.user)}")
    with run.lock:
        outcome.hold_bc_from = earliest(outcome.hold_bc_from, bc.get("lastModifiedDateTime"))
        outcome.hold_delta = outcome.hold_delta or case.outlook_unknown
