"""The demo: a whole sync on the simulated cloud, through the same function entry points Azure calls.

1. start Azurite and the sandbox (Entra ID, Business Central, Graph over HTTPS);
2. seed a demo tenant: a BC company with a few hundred contacts, a salesperson whose Outlook
   "Business Central" folder already holds some contacts of their own;
3. PUT the salesperson's settings and validate the connection (function_users_http);
4. POST a full sync, then an incremental one (function_sync_http) and print both reports;
5. change things on both sides as people would, and run an incremental sync again;
6. a second salesperson syncs into their default Contacts folder (the one phones show) with the
   "Business Central" category, beside their own contacts: one BC also has is adopted, the others
   are left alone (issue 12);
7. with --serve, keep the self-service page up (the function app on http://127.0.0.1:7071) and print
   the colleagues who can sign in to it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import azure.functions as func

from sandbox.bindings import Collector

USER = "alice@contoso.example"
COLLEAGUE = "bob@contoso.example"
ADMIN = "ada@contoso.example"
PAGE_PORT = 7071  # where `func start` serves a function app locally


def call(main, method: str, route: str, body: dict | None = None, **kwargs):
    rest = route.split("/", 1)[1] if "/" in route else ""
    req = func.HttpRequest(
        method=method,
        url=f"https://bc-contact-sync.example/api/{route}",
        headers={"Content-Type": "application/json"},
        route_params={"rest": rest},
        body=json.dumps(body).encode() if body is not None else b"",
    )
    resp = main(req, **kwargs)
    text = resp.get_body().decode() if resp.get_body() else ""
    return resp.status_code, (json.loads(text) if text else None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--contacts", type=int, default=300, help="BC person contacts to seed")
    parser.add_argument("--json", action="store_true", help="print the reports as JSON")
    parser.add_argument(
        "--serve", action="store_true", help="keep the self-service page up after the syncs (Ctrl-C stops it)"
    )
    parser.add_argument("--port", type=int, default=PAGE_PORT, help="local port of the page with --serve")
    args = parser.parse_args(argv)
    # The app's log records are for Application Insights; the demo prints the reports instead. Without a
    # handler, Python's last-resort handler would print each warning (every skipped contact) to stderr.
    logging.getLogger("shared").addHandler(logging.NullHandler())

    from sandbox.azurite import Azurite
    from sandbox.cloud import Cloud
    from sandbox.images import make_jpeg
    from sandbox.seed import seed_bc, seed_outlook, seed_pictures

    with (
        tempfile.TemporaryDirectory(prefix="bc-sync-demo-") as tmp,
        Azurite() as azurite,
        Cloud(Path(tmp)) as cloud,
    ):
        os.environ.update(cloud.env(azurite.connection_string))
        from function_sync_http import main as sync_http
        from function_users_http import main as users_http
        from shared.cli import format_report
        from shared.model import RunReport
        from shared.services import reset_services

        print(
            f"Sandbox up: Entra {cloud.entra.base_url}, BC {cloud.bc.base_url}, Graph {cloud.graph.base_url}"
        )
        contacts = seed_bc(cloud.bc, cloud.company_id, persons=args.contacts)
        pictures = seed_pictures(cloud.bc, cloud.company_id, contacts)
        _, password = cloud.add_person(USER, "Alice Andersen")
        folder_id = seed_outlook(cloud.graph, USER, "Business Central", contacts)
        print(
            f"Seeded {len(contacts)} BC contacts ({pictures} with a picture) and "
            f"{len(cloud.graph.folder_contacts(USER, folder_id))} Outlook contacts for {USER}\n"
        )

        status, body = call(users_http, "PUT", f"users/{USER}", {"folderName": "Business Central"})
        print(f"PUT /api/users/{USER} → {status}")
        status, body = call(users_http, "POST", f"users/{USER}/validate")
        print(f"POST /api/users/{USER}/validate → {status}")
        for c in body["checks"]:
            print(f"  {'ok  ' if c['ok'] else 'FAIL'} {c['name']:<20} {c['message']}")

        def sync(mode: str, title: str, user: str = USER) -> RunReport:
            started = time.monotonic()
            status, body = call(sync_http, "POST", "sync", {"user": user, "mode": mode}, jobs=Collector())
            print(
                f"\n=== {title}: POST /api/sync mode={mode} → {status} in {time.monotonic() - started:.1f}s ==="
            )
            if status != 200:
                print(json.dumps(body, indent=2))
                raise SystemExit(1)
            report = RunReport.from_json(body)
            print(json.dumps(body, indent=2) if args.json else format_report(report, max_items=12))
            return report

        sync("full", "1. First (full) sync")
        second = sync("incremental", "2. Incremental sync right after")
        writes = sum(v for k, v in second.counts.items() if k not in ("skipped", "failed"))
        print(f"\nWrites in the second run: {writes} (a run right after a successful run writes nothing)")

        # 3. People work on both sides.
        person = next(c for c in cloud.bc.contacts(cloud.company_id) if c["type"] == "Person" and c["email"])
        cloud.bc.edit_contact(cloud.company_id, person["id"], jobTitle="Head of Purchasing")
        newbie = cloud.bc.seed_contact(
            cloud.company_id,
            type="Person",
            displayName="Nina Nordmann",
            email="nina@nordmann.example",
            companyName="Nordmann AS",
        )
        in_folder = cloud.graph.folder_contacts(USER, folder_id)
        victim = next(c for c in in_folder if c.get("singleValueExtendedProperties"))
        cloud.graph.user_delete_contact(USER, folder_id, victim["id"])
        olav = cloud.graph.user_create_contact(
            USER,
            folder_id,
            {
                "displayName": "Olav Trygg",
                "givenName": "Olav",
                "surname": "Trygg",
                "emailAddresses": [{"address": "olav@trygg.example", "name": "Olav Trygg"}],
            },
        )
        cloud.graph.set_contact_photo(USER, olav["id"], make_jpeg(120, 120, padding=1500))
        cloud.bc.set_picture(cloud.company_id, newbie["id"], make_jpeg(100, 100, padding=1200))
        print(
            f"\nChanges: BC edited {person['displayName']} and added {newbie['displayName']} with a picture; "
            f"in Outlook {USER} deleted {victim['displayName']} and added Olav Trygg with a photo."
        )
        sync("incremental", "3. Incremental sync after the changes")
        people = {USER: password, COLLEAGUE: default_folder_user(cloud, users_http, sync, contacts)}
        if args.serve:
            serve_page(cloud, args.port, people)
        else:
            print("\nThe self-service page: ./scripts/demo.sh --serve keeps it up and says how to sign in.")
        reset_services()
    return 0


def default_folder_user(cloud, users_http, sync, contacts: list[dict]) -> str:
    """Step 4: a salesperson whose contacts go where the phone looks. Returns their password."""
    _, password = cloud.add_person(COLLEAGUE, "Bjørn Berg")
    own = [
        ("Dentist Dahl", "post@dahl-tannlege.example", ["Personal"]),  # private: never touched
        ("Mum", None, []),  # no email: never touched
    ]
    from shared.mapping import bc_is_eligible

    shared = next(c for c in contacts if c.get("city") == "Oslo" and bc_is_eligible(c) is None)
    own.append(
        (f"{shared['displayName'].split()[0]} (phone)", shared["email"], ["Red category"])
    )  # BC has it
    own_ids = set()
    for name, email, categories in own:
        data: dict = {"displayName": name, "categories": categories}
        if email:
            data["emailAddresses"] = [{"address": email, "name": name}]
        own_ids.add(cloud.graph.user_create_contact(COLLEAGUE, None, data)["id"])
    print(
        f"\n=== 4. {COLLEAGUE} syncs into the default Contacts folder (the one phones show), with a category ===\n"
        f"Their default folder already holds {len(own)} contacts of their own; one has the email of a BC contact."
    )
    status, _ = call(
        users_http,
        "PUT",
        f"users/{COLLEAGUE}",
        {"folderName": None, "category": "Business Central", "filter": {"city": "Oslo"}},
    )
    print(f'PUT /api/users/{COLLEAGUE} {{"folderName": null, "category": "Business Central"}} → {status}')
    sync("full", "4a. Full sync into the default folder", COLLEAGUE)
    again = sync("incremental", "4b. Incremental sync right after", COLLEAGUE)
    print(
        f"Requests of the run right after: Business Central {again.requests.get('bc', 0)}, "
        f"Graph {again.requests.get('graph', 0)} (no folder check: the default folder cannot go)"
    )
    default = cloud.graph.folder_contacts(COLLEAGUE, None)
    print(
        f"\n{COLLEAGUE}'s default Contacts folder ({len(default)} contacts): "
        "the user's own, then adopted, then synced:"
    )
    print(f"  {'name':<28} {'email':<34} {'synced':<8} categories")

    def tagged(c: dict) -> bool:
        return any(p.get("value") for p in c.get("singleValueExtendedProperties") or [])

    def order(c: dict) -> tuple[int, str]:
        kind = 2 if tagged(c) and c["id"] not in own_ids else 1 if tagged(c) else 0
        return kind, c.get("displayName") or ""

    rows = sorted(default, key=order)
    for c in rows[:12]:
        email = ((c.get("emailAddresses") or [{}])[0] or {}).get("address") or "-"
        synced = ("adopted" if c["id"] in own_ids else "yes") if tagged(c) else "no"
        name = (c.get("displayName") or "-")[:28]
        print(f"  {name:<28} {email[:34]:<34} {synced:<8} {', '.join(c.get('categories') or [])}")
    if len(rows) > 12:
        print(f"  … and {len(rows) - 12} more synced contacts")
    colours = {c["displayName"]: c["color"] for c in cloud.graph.master_categories(COLLEAGUE)}
    print(
        f"Master category 'Business Central': colour {colours.get('Business Central', 'none (not created)')}"
    )
    return password


def serve_page(cloud, port: int, people: dict[str, str]) -> None:
    """Serve the function app's HTTP routes on 127.0.0.1:`port` until Ctrl-C, with people to sign in."""
    from tests.local_host import LocalHost  # the repository's stand-in for the Functions host

    _, people[ADMIN] = cloud.add_person(ADMIN, "Ada Admin", admin=True)
    with LocalHost().serve(port) as base:
        page = f"{base}/api/selfservice"
        cloud.allow_redirect(page)
        print(f"\n=== The self-service page: {page} ===")
        print("Sign in (sandbox Entra ID) as one of:")
        roles = {
            USER: "salesperson, folder 'Business Central'",
            COLLEAGUE: "salesperson, default Contacts folder",
            ADMIN: "admin",
        }
        for upn, secret in people.items():
            print(f"  {upn:<24} password {secret:<24} {roles[upn]}")
        print(
            "The sandbox's certificate comes from a throwaway CA, so tell the browser to trust it, e.g.\n"
            f"  chromium --user-data-dir=$(mktemp -d) "
            f"--ignore-certificate-errors-spki-list={cloud.tls.spki_sha256} {page}\n"
            f"or import {cloud.tls.ca_bundle} as a trusted authority in a browser profile of its own.\n"
            "Ctrl-C stops the demo."
        )
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            print("\nStopped.")


if __name__ == "__main__":
    sys.exit(main())
