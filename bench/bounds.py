"""What a case needs at the very least, in requests and in time, under the latency model.

The lower bound counts only what the APIs force on any correct sync (BEHAVIOUR §3):
- Graph writes go 20 to a `$batch` call; a contacts delta round returns at most 200 items a page
  and always at least one page; a new contact's BC-id tag cannot be `$expand`ed on delta, so each
  unknown Outlook contact costs one batched GET; our own writes come back in the next delta round
  (whether this run or the next reads them, one run pays ceil(writes/200) pages for them).
- BC pages hold up to 20,000 contacts; BC writes go 100 to a `$batch` call.
- The fixed few: the initial sync looks the folder up and creates it (2); an incremental run knows
  its folder from the stored state but must check it is still under Contacts (1): a folder the user
  deleted sits in Deleted Items with the same id and still answers delta, so only the folder listing
  shows it is gone (BEHAVIOUR §4.8). Token requests go to Entra and are counted separately.
- Photos (`syncPhotos`, BEHAVIOUR §4.6): neither API documents binary bodies in `$batch`, so each
  picture read (BC `picture/pictureContent`) and each photo write (Graph `photo/$value`) is one
  request. Which BC contacts have a picture comes with the contact read (`$expand=picture`), so a
  contact without one costs nothing; a BC picture copied to Outlook costs 1 BC read + 1 Graph write,
  and an unchanged one nothing. Graph runs them 4 at a time per mailbox, BC 5 at a time.
- BC reference data: the contact entity's fields from `$metadata`, once per process and API root
  (versions differ: a field the tenant lacks fails the whole read), and the company's Country/Region
  table once per run that maps a country (BC stores codes, Outlook free text) (BEHAVIOUR §4.6).
  A user with several companies (BEHAVIOUR §5.4): every company is read on its own (pages, the
  changed-since query, its Country/Region table), and a run with something to report reads the
  companies' names once (the report names each item's company, the default category is its name).

The time bound is the concurrency bound of the issue: Graph items x latency / 4 per mailbox, where
the items that cannot run side by side (chained delta pages, the folder calls) count one latency each,
and Graph's per-mailbox budget of 10,000 requests per 10 minutes is honoured too (it binds only
above ~10,000 items per run). BC: 5 requests at once per principal, its batch operations one after
another, so BC writes spread over 5 parallel batches at best.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GRAPH_BATCH = 20
GRAPH_DELTA_PAGE = 200
BC_PAGE = 20_000
BC_BATCH = 100


@dataclass(frozen=True)
class Model:
    """The latency model and the service limits it runs under."""

    graph_latency: float = 0.1
    bc_latency: float = 0.05
    graph_concurrency: int = 4
    graph_rate_limit: int = 10_000
    graph_rate_window: float = 600.0
    bc_concurrency: int = 5
    graph_envelope_latency: bool = False  # whether the sandbox also spends it on a $batch envelope


@dataclass(frozen=True)
class Need:
    """The least one mailbox's run has to do (see the module docstring for the why of each term)."""

    graph_writes: int = 0  # contacts created/updated/deleted in Outlook (tags of new BC contacts included)
    delta_in: int = 0  # items the run's delta round must return (user changes, or everything in full)
    echo: int = 0  # our own Outlook writes, returned by the following delta round
    tag_reads: int = 0  # unknown Outlook contacts whose BC-id tag must be read
    graph_fixed: int = 0  # folder lookup/creation and the category on the first run, the folder check after
    bc_read_rows: int | None = None  # contacts in the company, when this run must page through all of them
    bc_read_requests: int = 0  # BC reads that are single requests (the changed-since query)
    bc_writes: int = 0  # BC contacts created/updated
    bc_reference_reads: int = (
        0  # $metadata (first run of a process) and countriesRegions (a run mapping countries)
    )
    photo_graph: int = 0  # Outlook photos read or written, one request each
    photo_bc: int = 0  # BC pictures read or written, one request each

    @property
    def photo_requests(self) -> int:
        return self.photo_graph + self.photo_bc

    # BC companies the user syncs (BEHAVIOUR §5.4): each is paged through and asked for its changes
    # on its own; `bc_read_rows` is per company.
    companies: int = 1

    @property
    def delta_pages(self) -> int:
        pages = max(1, math.ceil(self.delta_in / GRAPH_DELTA_PAGE))
        if self.echo:
            pages += max(1, math.ceil(self.echo / GRAPH_DELTA_PAGE))
        return pages

    @property
    def graph_batches(self) -> int:
        return math.ceil(self.graph_writes / GRAPH_BATCH) + math.ceil(self.tag_reads / GRAPH_BATCH)

    @property
    def graph_requests(self) -> int:
        return self.graph_batches + self.delta_pages + self.graph_fixed + self.photo_graph

    @property
    def bc_requests(self) -> int:
        pages = 0 if self.bc_read_rows is None else max(1, math.ceil(self.bc_read_rows / BC_PAGE))
        reads = (pages + self.bc_read_requests) * self.companies
        return reads + self.bc_reference_reads + math.ceil(self.bc_writes / BC_BATCH) + self.photo_bc

    @property
    def graph_items(self) -> int:
        """Graph operations (batch items and top-level requests): what the mailbox budget counts."""
        return self.graph_writes + self.tag_reads + self.delta_pages + self.graph_fixed + self.photo_graph


def graph_time(need: Need, model: Model) -> float:
    """Seconds one mailbox needs at least: chained requests one at a time, batch items `concurrency`
    at a time, every request admitted only while the sliding-window budget allows."""
    latency, limit, window = model.graph_latency, model.graph_rate_limit, model.graph_rate_window
    admitted: list[float] = []

    def admit(earliest: float) -> float:
        k = len(admitted)
        at = earliest if k < limit else max(earliest, admitted[k - limit] + window)
        admitted.append(at)
        return at

    t = 0.0
    for _ in range(need.delta_pages + need.graph_fixed):
        t = admit(t) + latency
    parallel = need.graph_writes + need.tag_reads + need.photo_graph
    while parallel > 0:
        round_size = min(model.graph_concurrency, parallel)
        t = max(admit(t) for _ in range(round_size)) + latency
        parallel -= round_size
    return t


def bc_time(need: Need, model: Model) -> float:
    """Seconds BC needs at least: reads chained, writes spread over `bc_concurrency` parallel batches."""
    reads = need.bc_requests - math.ceil(need.bc_writes / BC_BATCH) - need.photo_bc
    parallel = math.ceil(need.bc_writes / model.bc_concurrency) + math.ceil(
        need.photo_bc / model.bc_concurrency
    )
    return (reads + parallel) * model.bc_latency


def time_bound(mailbox_needs: list[Need], bc_need: Need, model: Model) -> float:
    """The run's bound: BC first (the plan needs it), then the slowest mailbox; mailboxes are
    independent, so several of them cost no more than the slowest one."""
    return bc_time(bc_need, model) + max((graph_time(n, model) for n in mailbox_needs), default=0.0)
