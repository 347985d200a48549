"""Deterministic demo data: a Business Central company with a few hundred contacts (a quarter of them
with a picture), and a salesperson's Outlook folder with some contacts of their own (one of them
already in BC)."""

from __future__ import annotations

import random
from typing import Any

FIRST = [
    "Anna",
    "Lars",
    "Ingrid",
    "Ola",
    "Kari",
    "Jonas",
    "Sofie",
    "Henrik",
    "Maja",
    "Erik",
    "Nora",
    "Emil",
    "Ida",
    "Magnus",
    "Sara",
    "Thomas",
    "Julie",
    "Anders",
    "Marte",
    "Kristian",
    "Hilde",
    "Petter",
    "Linn",
    "Fredrik",
    "Camilla",
    "Ahmed",
    "Priya",
    "Chen",
    "Lucía",
    "Zoë",
    "Bjørn",
    "Åse",
]
LAST = [
    "Hansen",
    "Johansen",
    "Olsen",
    "Larsen",
    "Andersen",
    "Pedersen",
    "Nilsen",
    "Kristiansen",
    "Jensen",
    "Karlsen",
    "Johnsen",
    "Pettersen",
    "Eriksen",
    "Berg",
    "Haugen",
    "Hagen",
    "Dahl",
    "Lie",
    "Strand",
    "Nguyen",
    "Khan",
    "Müller",
    "O'Brien",
    "Sæther",
    "Øvrebø",
]
COMPANIES = [
    ("Contoso AS", "Oslo", "0150"),
    ("Fabrikam ASA", "Bergen", "5003"),
    ("Adatum Corp", "Trondheim", "7010"),
    ("Northwind Traders", "Stavanger", "4006"),
    ("Tailspin Toys", "Oslo", "0250"),
    ("Woodgrove Bank", "Drammen", "3015"),
    ("Litware Inc", "Tromsø", "9008"),
    ("Proseware", "Kristiansand", "4610"),
    ("Wide World Importers", "Bodø", "8006"),
    ("Alpine Ski House", "Lillehammer", "2609"),
]
TITLES = ["Purchasing Manager", "CEO", "Sales Rep", "CFO", "Buyer", "Office Manager", "IT Lead", "Accountant"]


def seed_bc(bc: Any, company_id: str, persons: int = 300, seed: int = 7) -> list[dict[str, Any]]:
    """Company contacts, eligible persons and a few ineligible ones (no email, privacy blocked)."""
    rng = random.Random(seed)
    made: list[dict[str, Any]] = []
    numbers: dict[str, str] = {}
    for name, city, postcode in COMPANIES:
        c = bc.seed_contact(
            company_id,
            type="Company",
            displayName=name,
            city=city,
            postalCode=postcode,
            country="NO",
            email=f"post@{_domain(name)}",
            phoneNumber="+47 22 00 00 00",
        )
        numbers[name] = c["number"]
        made.append(c)
    used: set[str] = set()
    for i in range(persons):
        first, last = rng.choice(FIRST), rng.choice(LAST)
        company, city, postcode = rng.choice(COMPANIES)
        local = f"{first}.{last}".lower().replace("'", "").replace(" ", "")
        email = f"{local}@{_domain(company)}"
        if email in used:
            email = f"{local}{i}@{_domain(company)}"
        used.add(email)
        fields: dict[str, Any] = {
            "type": "Person",
            "displayName": f"{first} {last}",
            "companyName": company,
            "companyNumber": numbers[company],
            "jobTitle": rng.choice(TITLES),
            "email": email,
            "phoneNumber": "+47 " + " ".join(str(rng.randint(10, 99)) for _ in range(4)),
            "mobilePhoneNumber": f"+47 9{rng.randint(1000000, 9999999)}",
            "addressLine1": f"{rng.choice(['Storgata', 'Kirkeveien', 'Strandgaten', 'Bryggen'])} {rng.randint(1, 120)}",
            "city": city,
            "postalCode": postcode,
            "country": "NO",
        }
        if i % 37 == 5:
            fields["email"] = ""  # no email: stays in BC only
        if i % 101 == 17:
            fields["privacyBlocked"] = True
        if i % 23 == 3:
            fields["addressLine2"] = f"Floor {rng.randint(1, 9)}"
        made.append(bc.seed_contact(company_id, **fields))
    return made


def seed_outlook(graph: Any, user: str, folder_name: str, bc_contacts: list[dict[str, Any]]) -> str:
    """The salesperson's own contacts in the folder before the first sync; returns the folder id."""
    folder = graph.user_create_folder(user, folder_name)
    fid = folder["id"] if isinstance(folder, dict) else folder
    already = next(c for c in bc_contacts if c.get("type") == "Person" and c.get("email"))
    people = [
        ("Maria Lopez", "maria.lopez@example.org", "Lopez Consulting"),
        ("Kenji Sato", "kenji.sato@example.jp", "Sato Trading"),
        ("Grace Hopper", "grace@example.com", "Navy Labs"),
        (already["displayName"], "  " + already["email"].upper() + " ", already.get("companyName", "")),
    ]
    for name, email, company in people:
        given, _, surname = name.rpartition(" ")
        graph.user_create_contact(
            user,
            fid,
            {
                "displayName": name,
                "givenName": given,
                "surname": surname,
                "companyName": company,
                "emailAddresses": [{"address": email, "name": name}],
            },
        )
    graph.user_create_contact(user, fid, {"displayName": "Someone Without Email", "givenName": "Someone"})
    return fid


def seed_pictures(bc: Any, company_id: str, contacts: list[dict[str, Any]], every: int = 4) -> int:
    """Give every `every`-th person a picture in BC (a small JPEG of its own size), and one person a
    GIF, which Outlook cannot take as a photo (the demo's report names it); returns how many."""
    from sandbox.images import make_jpeg

    persons = [c for c in contacts if c.get("type") == "Person"]
    chosen = persons[::every]
    for n, contact in enumerate(chosen):
        bc.set_picture(company_id, contact["id"], make_jpeg(96 + n % 64, 96 + n % 64, padding=2000 + n))
    if len(persons) > 1:
        gif = b"GIF89a" + (48).to_bytes(2, "little") + (48).to_bytes(2, "little") + bytes(32)
        bc.set_picture(company_id, persons[1]["id"], gif)
    return len(chosen) + (1 if len(persons) > 1 else 0)


def _domain(company: str) -> str:
    return "".join(ch for ch in company.lower() if ch.isalnum())[:20] + ".example"
