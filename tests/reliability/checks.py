"""The end state BEHAVIOUR §4.5 promises, checked from what a user sees in BC and in the Outlook folder."""

from __future__ import annotations

from collections import Counter
from typing import Any

from shared.filters import parse_filter
from shared.mapping import bc_is_eligible, bc_view, normalize_email, outlook_view
from tests.world import World, tag, writes


def assert_converged(world: World, user: str = "alice@contoso.example") -> None:
    """Outlook holds exactly the eligible BC contacts, once each, with BC's data; BC has no duplicate
    email; the links point at the tagged contacts; and the next run writes nothing."""
    store = world.services.store
    settings = store.get_settings(user)
    flt = parse_filter(settings.filter)
    bc = {c["id"]: c for c in world.cloud.bc.contacts(settings.company_id or world.company)}
    emails = Counter(normalize_email(c["email"]) for c in bc.values() if c["email"])
    assert all(n == 1 for n in emails.values()), f"duplicate emails in BC: {emails.most_common(3)}"
    eligible = {cid for cid, c in bc.items() if bc_is_eligible(c) is None and flt.matches(c)}
    folder = world.outlook(user)
    tags = Counter(tag(c) for c in folder)
    assert None not in tags, "an untagged contact in the folder"
    assert all(n == 1 for n in tags.values()), f"one BC contact twice in Outlook: {tags.most_common(3)}"
    assert set(tags) == eligible
    links = store.get_links(user)
    for c in folder:
        cid = tag(c)
        assert outlook_view(c) == bc_view(bc[cid])
        assert links[cid].outlook_id == c["id"]
    report = world.sync(user)
    assert report.status == "succeeded" and writes(report) == 0, report.counts


def folder_of(world: World, user: str, name: str = "Business Central") -> str:
    found = world.cloud.graph.find_folder(user, name)
    return found["id"] if found else world.cloud.graph.user_create_folder(user, name)["id"]


def new_outlook_contacts(world: World, user: str, n: int, prefix: str = "new") -> list[dict[str, Any]]:
    fid = folder_of(world, user)
    return [
        world.cloud.graph.user_create_contact(
            user,
            fid,
            {
                "displayName": f"Outlook Person {i:02d}",
                "emailAddresses": [{"address": f"{prefix}{i}@outlook.example"}],
            },
        )
        for i in range(n)
    ]
