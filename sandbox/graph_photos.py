"""Simulated Graph contact photos: `/contacts/{id}/photo` (metadata) and `/contacts/{id}/photo/$value`.

What it simulates (Microsoft Graph v1.0, "Get profilePhoto" and "Update profilePhoto",
https://learn.microsoft.com/en-us/graph/api/profilephoto-get and .../profilephoto-update):

* `GET .../contacts/{id}/photo` answers the photo's metadata (`@odata.mediaContentType`, `width`,
  `height`, `id`); `GET .../photo/$value` the binary. Both under `/users/{id}/contacts/{id}` and
  `/users/{id}/contactFolders/{id}/contacts/{id}`, with either id format.
* A contact without a photo answers 404 on both ("If no photo exists, the operation returns 404").
* `PUT` or `PATCH .../photo/$value` with the image bytes as body sets it, answering 200 with no body.
  `Content-Type: image/jpeg` is documented as required; the sandbox takes `image/jpeg` and `image/png`
  (the type Graph itself reports for PNG photos is `image/png`) and refuses any other type with 400.
* The documented size limit: "a limit of 4 MB on the total size of each REST request, this limits the
  size of the photo you can add to under 4 MB" → a body of 4 MiB or more is refused with 413.
* Needs `Contacts.ReadWrite` to write and `Contacts.Read`/`Contacts.ReadWrite` to read, as the rest
  of the contact API.
* Setting a photo is a change of the contact item in Exchange: its `changeKey` and
  `lastModifiedDateTime` change and delta reports the contact as updated (with only its id when
  nothing else changed). [inferred: the photo is an attachment of the contact item; not documented]

What it does not simulate: deleting a contact's photo (the v1.0 delete operation is documented for
user and group photos only), the size variants (`/photos/{size}`), photo writes inside `$batch`
(binary bodies there need base64), image validation beyond reading the JPEG/PNG header, and
resizing (Exchange stores contact photos as given, as far as the sandbox knows). The exact error
codes of a wrong type, a non-image body and an oversize body are not documented; the ones used here
are marked [unverified].
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sandbox.graph as graph_module
from sandbox.httpd import Request, Response
from sandbox.images import image_info

if TYPE_CHECKING:
    from sandbox.graph import GraphService, _Ctx

MAX_PHOTO_BYTES = 4 * 1024 * 1024  # profilephoto-update.md: "under 4 MB"
ACCEPTED_TYPES = ("image/jpeg", "image/png")


@dataclass(frozen=True)
class Photo:
    data: bytes
    content_type: str
    width: int
    height: int

    @property
    def etag(self) -> str:
        return f'W/"{hashlib.sha256(self.data).hexdigest()[:32]}"'


def routes(
    service: GraphService, bases: tuple[str, ...]
) -> list[tuple[str, str, Callable[..., Response], str]]:
    """The photo routes under each contact item path (registered by GraphService._register_routes)."""
    graph_module.EXTRA_KIND_ROLES["photos.get"] = graph_module.CONTACT_READ_ROLES
    graph_module.EXTRA_KIND_ROLES["photos.update"] = graph_module.CONTACT_WRITE_ROLES
    handlers = _Handlers(service)
    out: list[tuple[str, str, Callable[..., Response], str]] = []
    for base in bases:
        item = base + r"/(?P<contact>[^/]+)/(?i:photo)"
        out += [
            ("GET", item, handlers.metadata, "photos.get"),
            ("GET", item + r"/\$value", handlers.content, "photos.get"),
            ("PUT", item + r"/\$value", handlers.update, "photos.update"),
            ("PATCH", item + r"/\$value", handlers.update, "photos.update"),
        ]
    return out


def set_photo(service: GraphService, upn: str, contact_id: str, data: bytes) -> None:
    """A person adding a photo to a contact in Outlook (seeding for tests and the demo)."""
    with service.lock:
        mailbox = service._require_mailbox(upn)
        _store(service, mailbox, service._find_contact(mailbox, contact_id), _parse(data, "image/jpeg"))


def photo_of(service: GraphService, upn: str, contact_id: str) -> bytes | None:
    """The photo bytes of a contact as Outlook shows it, or None (inspection for tests)."""
    with service.lock:
        mailbox = service._require_mailbox(upn)
        photo = service._find_contact(mailbox, contact_id).photo
        return photo.data if photo else None


class _Handlers:
    def __init__(self, service: GraphService) -> None:
        self.service = service

    def _contact(self, ctx: _Ctx, user: str, contact: str, folder: str | None) -> tuple[Any, Any]:
        mailbox = self.service._mailbox(user, ctx)
        if folder is not None:
            self.service._folder(mailbox, folder)
        return mailbox, self.service._find_contact(mailbox, contact)

    def metadata(
        self, req: Request, ctx: _Ctx, user: str, contact: str, folder: str | None = None
    ) -> Response:
        _, found = self._contact(ctx, user, contact, folder)
        photo = _require_photo(found)
        body = {
            "@odata.mediaContentType": photo.content_type,
            "@odata.mediaEtag": photo.etag,
            "id": f"{photo.width}X{photo.height}",
            "height": photo.height,
            "width": photo.width,
        }
        return Response(
            200, self.service._with_context(body, f"users('{user}')/contacts('{contact}')/photo/$entity")
        )

    def content(
        self, req: Request, ctx: _Ctx, user: str, contact: str, folder: str | None = None
    ) -> Response:
        _, found = self._contact(ctx, user, contact, folder)
        photo = _require_photo(found)
        return Response(200, photo.data, {"ETag": photo.etag}, content_type=photo.content_type)

    def update(self, req: Request, ctx: _Ctx, user: str, contact: str, folder: str | None = None) -> Response:
        mailbox, found = self._contact(ctx, user, contact, folder)
        ctype = (req.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        _store(self.service, mailbox, found, _parse(req.body, ctype))
        return Response(200)


def _require_photo(contact: Any) -> Photo:
    if contact.photo is None:
        # profilephoto-get.md: "If no photo exists, the operation returns 404 Not Found."
        # The code and message are [unverified].
        raise graph_module.GraphError(404, "ErrorItemNotFound", "The photo wasn't found.")
    photo: Photo = contact.photo
    return photo


def _parse(data: bytes, content_type: str) -> Photo:
    if len(data) >= MAX_PHOTO_BYTES:
        raise graph_module.GraphError(  # [unverified] code; the limit itself is documented
            413,
            "ErrorRequestEntityTooLarge",
            f"The photo is {len(data)} bytes; a photo must be under 4 MB ({MAX_PHOTO_BYTES} bytes).",
        )
    if content_type not in ACCEPTED_TYPES:
        raise graph_module.GraphError(  # [unverified] code
            400,
            "ErrorInvalidRequest",
            f"Content-Type '{content_type or '(none)'}' is not an image type for a photo.",
        )
    info = image_info(data)
    if info is None or info.content_type not in ACCEPTED_TYPES:
        raise graph_module.GraphError(
            400, "ErrorInvalidImage", "The photo is not a valid image."
        )  # [unverified]
    return Photo(data, info.content_type, info.width, info.height)


def _store(service: GraphService, mailbox: Any, contact: Any, photo: Photo) -> None:
    contact.photo = photo
    contact.change_key, contact.modified = graph_module._change_key(), graph_module._now()
    service._log(mailbox, contact.folder_id, contact, present=True)
