"""syncPhotos end to end (BEHAVIOUR §4.6, §5), through the HTTP API: BC's picture becomes the Outlook
contact's photo, an Outlook photo goes to BC when BC has none, an unchanged photo costs no request,
a picture Outlook cannot take is reported and the contact still syncs, and `syncPhotos: false`
reads and writes no photo. What is checked is what a person sees: the photo in Outlook, the picture
in BC, the run report and its request counts (the sandbox's own counters, per request kind)."""

from __future__ import annotations

from typing import Any

from sandbox.images import make_jpeg, make_png
from tests.world import World, writes

ALICE = "alice@contoso.example"
PHOTO_KINDS = ("photos.get", "photos.update")
PICTURE_KINDS = ("pictures.get", "pictures.update", "pictures.delete")


def _setup(client: Any, world: World, **settings: Any) -> None:
    world.cloud.graph.add_mailbox(ALICE)
    resp = client("PUT", f"users/{ALICE}", {"user": ALICE, **settings})
    assert resp.status_code in (200, 201), resp.text


def _sync(client: Any, mode: str = "incremental") -> dict[str, Any]:
    resp = client("POST", "sync", {"user": ALICE, "mode": mode})
    assert resp.status_code == 200, resp.text
    report: dict[str, Any] = resp.json()
    assert report["status"] == "succeeded", report
    return report


def _photo_requests(world: World) -> dict[str, int]:
    graph, bc = world.cloud.graph.counters, world.cloud.bc.counters
    return {
        "graph": sum(graph.http_count(kind=k) for k in PHOTO_KINDS),
        "bc": sum(bc.http_count(kind=k) for k in PICTURE_KINDS),
    }


def _outlook_id(world: World, email: str) -> str:
    return str(world.outlook_by_email(ALICE)[email]["id"])


def test_bc_pictures_reach_outlook_on_create_and_on_change_and_an_unchanged_one_costs_nothing(client, world):
    ada = world.person("Ada Lovelace")
    alan = world.person("Alan Turing")
    grace = world.person("Grace Hopper")  # no picture
    first, second = make_jpeg(200, 200, padding=500), make_png(96, 96)
    world.cloud.bc.set_picture(world.company, ada["id"], first)
    world.cloud.bc.set_picture(world.company, alan["id"], second)
    _setup(client, world)

    created = _sync(client, "full")
    ada_outlook = _outlook_id(world, ada["email"])
    assert world.cloud.graph.contact_photo(ALICE, ada_outlook) == first
    assert world.cloud.graph.contact_photo(ALICE, _outlook_id(world, alan["email"])) == second
    assert world.cloud.graph.contact_photo(ALICE, _outlook_id(world, grace["email"])) is None
    assert created["counts"]["outlookCreated"] == 3
    assert created["photos"] == {"toOutlook": 2, "toBc": 0, "notCopied": 0}
    # One picture read per BC contact that has one, one photo write each: nothing for Grace.
    assert _photo_requests(world) == {"graph": 2, "bc": 2}

    world.cloud.reset_counters()
    quiet = _sync(client)
    assert quiet["requests"] == {"bc": 2, "graph": 2}
    assert quiet["photos"] == {"toOutlook": 0, "toBc": 0, "notCopied": 0}
    assert writes_in(quiet) == 0

    changed = make_jpeg(300, 300, padding=900)
    world.cloud.bc.set_picture(world.company, ada["id"], changed)
    world.cloud.reset_counters()
    after_change = _sync(client)
    assert world.cloud.graph.contact_photo(ALICE, ada_outlook) == changed
    assert after_change["photos"]["toOutlook"] == 1
    assert _photo_requests(world) == {"graph": 1, "bc": 1}  # only Ada's picture is read and written

    world.cloud.reset_counters()
    assert _sync(client)["requests"] == {"bc": 2, "graph": 2}  # its own photo write is no change next time
    assert _photo_requests(world) == {"graph": 0, "bc": 0}


def writes_in(report: dict[str, Any]) -> int:
    from shared.model import RunReport

    return writes(RunReport.from_json(report))


def test_an_outlook_photo_goes_to_bc_when_bc_has_none_and_not_when_bc_has_one(client, world):
    plain = world.person("Linus Torvalds")  # no picture in BC
    pictured = world.person("Margaret Hamilton")
    bc_picture = make_jpeg(120, 120, padding=300)
    world.cloud.bc.set_picture(world.company, pictured["id"], bc_picture)
    _setup(client, world)
    _sync(client, "full")
    plain_outlook, pictured_outlook = (
        _outlook_id(world, plain["email"]),
        _outlook_id(world, pictured["email"]),
    )

    users_photo, other_photo = make_jpeg(64, 64, padding=100), make_png(50, 50)
    world.cloud.graph.set_contact_photo(ALICE, plain_outlook, users_photo)
    world.cloud.graph.set_contact_photo(ALICE, pictured_outlook, other_photo)
    world.cloud.reset_counters()
    report = _sync(client)

    assert world.cloud.bc.picture(world.company, plain["id"]) == users_photo
    # BC has its own picture: BC wins, and the Outlook photo is BC's again.
    assert world.cloud.bc.picture(world.company, pictured["id"]) == bc_picture
    assert world.cloud.graph.contact_photo(ALICE, pictured_outlook) == bc_picture
    assert report["photos"] == {"toOutlook": 1, "toBc": 1, "notCopied": 0}

    world.cloud.reset_counters()
    quiet = _sync(client)
    assert quiet["requests"] == {"bc": 2, "graph": 2}
    assert _photo_requests(world) == {"graph": 0, "bc": 0}


def test_a_new_outlook_contact_brings_its_photo_into_bc(client, world):
    _setup(client, world)
    _sync(client, "full")
    folder = world.folder_id(ALICE)
    made = world.cloud.graph.user_create_contact(
        ALICE,
        folder,
        {
            "givenName": "Katherine",
            "surname": "Johnson",
            "displayName": "Katherine Johnson",
            "emailAddresses": [{"address": "katherine@example.com", "name": "Katherine Johnson"}],
        },
    )
    photo = make_jpeg(80, 100, padding=50)
    world.cloud.graph.set_contact_photo(ALICE, made["id"], photo)

    report = _sync(client)

    [bc] = world.bc_by_email()["katherine@example.com"]
    assert report["counts"]["bcCreated"] == 1
    assert world.cloud.bc.picture(world.company, bc["id"]) == photo
    assert report["photos"]["toBc"] == 1


def test_a_picture_outlook_cannot_take_is_reported_by_name_and_the_contact_still_syncs(client, world):
    big = world.person("Big Picture")
    gif = world.person("Gif Picture")
    fine = world.person("Fine Picture")
    world.cloud.bc.set_picture(world.company, big["id"], make_jpeg(4000, 3000, padding=4 * 1024 * 1024))
    gif_bytes = b"GIF89a" + (64).to_bytes(2, "little") + (64).to_bytes(2, "little") + b"\x00" * 20
    world.cloud.bc.set_picture(world.company, gif["id"], gif_bytes)
    world.cloud.bc.set_picture(world.company, fine["id"], make_jpeg(10, 10))
    _setup(client, world)

    report = _sync(client, "full")

    assert report["counts"]["outlookCreated"] == 3 and report["counts"]["failed"] == 0
    outlook = world.outlook_by_email(ALICE)
    assert outlook[big["email"]]["displayName"] == "Big Picture"
    assert world.cloud.graph.contact_photo(ALICE, outlook[big["email"]]["id"]) is None
    assert world.cloud.graph.contact_photo(ALICE, outlook[gif["email"]]["id"]) is None
    assert world.cloud.graph.contact_photo(ALICE, outlook[fine["email"]]["id"]) is not None
    notes = {i["name"]: i["reason"] for i in report["items"] if i["action"] == "photoSkipped"}
    assert set(notes) == {"Big Picture", "Gif Picture"}
    assert "under 4 MB" in notes["Big Picture"] and "4.0 MB" in notes["Big Picture"]
    assert "GIF" in notes["Gif Picture"] and "JPEG or PNG" in notes["Gif Picture"]
    assert report["photos"] == {"toOutlook": 1, "toBc": 0, "notCopied": 2}

    again = _sync(client, "full")  # noted once per picture, not on every run
    assert again["photos"] == {"toOutlook": 0, "toBc": 0, "notCopied": 0}
    assert not [i for i in again["items"] if i["action"] == "photoSkipped"]


def test_sync_photos_false_reads_and_writes_no_photo(client, world):
    ada = world.person("Ada Lovelace")
    world.cloud.bc.set_picture(world.company, ada["id"], make_jpeg(50, 50))
    _setup(client, world, syncPhotos=False)
    assert client("GET", f"users/{ALICE}").json()["syncPhotos"] is False

    _sync(client, "full")
    outlook_id = _outlook_id(world, ada["email"])
    world.cloud.graph.set_contact_photo(ALICE, outlook_id, make_png(20, 20))
    world.cloud.bc.edit_contact(world.company, ada["id"], jobTitle="Analyst")
    report = _sync(client)

    assert report["counts"]["outlookUpdated"] == 1
    assert world.cloud.graph.contact_photo(ALICE, outlook_id) == make_png(20, 20)
    assert world.cloud.bc.picture(world.company, ada["id"]) == make_jpeg(50, 50)
    assert _photo_requests(world) == {"graph": 0, "bc": 0}
    assert report["photos"] == {"toOutlook": 0, "toBc": 0, "notCopied": 0}


def test_sync_photos_must_be_true_or_false(client, world):
    world.cloud.graph.add_mailbox(ALICE)
    resp = client("PUT", f"users/{ALICE}", {"user": ALICE, "syncPhotos": "yes"})

    assert resp.status_code == 400
    assert "syncPhotos" in resp.json()["error"]["message"]
    assert client("GET", f"users/{ALICE}").status_code == 404


def test_an_outlook_edit_that_leaves_the_photo_alone_reads_no_photo(client, world):
    ada = world.person("Ada Lovelace")  # no picture in BC
    _setup(client, world)
    _sync(client, "full")
    outlook_id = _outlook_id(world, ada["email"])
    world.cloud.graph.set_contact_photo(ALICE, outlook_id, make_jpeg(40, 40))
    _sync(client)  # the photo goes to BC; the link learns the Outlook photo's media etag
    world.cloud.graph.user_update_contact(ALICE, world.folder_id(ALICE), outlook_id, jobTitle="Poet")

    world.cloud.reset_counters()
    report = _sync(client)

    # The edit is seen; the photo's metadata (one $batch) shows it unchanged, so no photo is read.
    assert _photo_requests(world) == {"graph": 0, "bc": 0}
    assert world.cloud.graph.counters.item_count(kind="photos.get") == 1
    assert report["photos"] == {"toOutlook": 0, "toBc": 0, "notCopied": 0}


def test_the_users_own_contact_adopted_by_email_brings_its_photo_to_bc(client, world):
    ada = world.person("Ada Lovelace")  # no picture in BC
    world.cloud.graph.add_mailbox(ALICE)
    folder = world.cloud.graph.user_create_folder(ALICE, "Business Central")["id"]
    own = world.cloud.graph.user_create_contact(
        ALICE,
        folder,
        {
            "displayName": "Ada Lovelace",
            "emailAddresses": [{"address": ada["email"], "name": "Ada Lovelace"}],
        },
    )
    photo = make_png(60, 60)
    world.cloud.graph.set_contact_photo(ALICE, own["id"], photo)
    assert client("PUT", f"users/{ALICE}", {"user": ALICE}).status_code == 201

    report = _sync(client, "full")

    assert report["counts"]["linked"] == 1 and report["counts"]["outlookCreated"] == 0
    assert world.cloud.bc.picture(world.company, ada["id"]) == photo
    assert report["photos"]["toBc"] == 1
    world.cloud.reset_counters()
    assert _sync(client)["requests"] == {"bc": 2, "graph": 2}


def test_a_412_on_the_picture_write_is_reported_and_the_photo_follows_once_bcs_change_is_seen(client, world):
    """BC answers 412 when the contact changed between the run's read and its picture write (If-Match,
    "Update picture"): BC wins for now, the contact itself is fine, and the run after BC's change
    looks at the photo afresh."""
    ada = world.person("Ada Lovelace")
    _setup(client, world)
    _sync(client, "full")
    outlook_id = _outlook_id(world, ada["email"])
    photo = make_jpeg(70, 70, padding=77)
    world.cloud.graph.set_contact_photo(ALICE, outlook_id, photo)
    world.cloud.bc.faults.error(412, method="PATCH", path_regex=r"/picture/pictureContent$")

    refused = _sync(client)

    [note] = [i for i in refused["items"] if i["action"] == "photoSkipped"]
    assert note["name"] == "Ada Lovelace" and "changed there meanwhile" in note["reason"]
    assert refused["counts"]["failed"] == 0 and world.cloud.bc.picture(world.company, ada["id"]) is None

    world.cloud.bc.edit_contact(world.company, ada["id"], jobTitle="Countess")  # BC's change arrives
    after = _sync(client)

    assert world.cloud.bc.picture(world.company, ada["id"]) == photo
    assert after["photos"]["toBc"] == 1


def test_a_page_in_place_of_a_picture_is_never_copied_and_the_next_run_tries_again(client, world):
    """A proxy's HTML page with a 2xx where BC's picture bytes should be: not taken for a picture
    (neither copied nor noted as "not an image" for good); the BC watermark is held, so the next run
    reads the picture again and copies it."""
    ada = world.person("Ada Lovelace")
    picture = make_jpeg(90, 90, padding=99)
    world.cloud.bc.set_picture(world.company, ada["id"], picture)
    _setup(client, world)
    world.cloud.bc.faults.unreadable(method="GET", path_regex=r"/picture/pictureContent$")

    first = _sync(client, "full")

    outlook_id = _outlook_id(world, ada["email"])
    assert first["counts"]["outlookCreated"] == 1
    assert world.cloud.graph.contact_photo(ALICE, outlook_id) is None
    [note] = [i for i in first["items"] if i["action"] == "photoSkipped"]
    assert "not copied this time" in note["reason"] and "instead of a picture" in note["reason"]

    second = _sync(client)

    assert world.cloud.graph.contact_photo(ALICE, outlook_id) == picture
    assert second["photos"]["toOutlook"] == 1
