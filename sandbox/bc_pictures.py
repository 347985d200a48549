"""Simulated Business Central contact pictures: `companies({id})/contacts({id})/picture`.

What it simulates (API v2.0 "picture resource type",
https://learn.microsoft.com/en-us/dynamics365/business-central/dev-itpro/api-reference/v2.0/resources/dynamics_picture,
with "Get picture", "Update picture" and "Delete picture" in the same reference):

* `GET .../contacts({id})/picture` answers the picture entity: `id`, `parentType` ("Contact"),
  `width`, `height`, `contentType` and the `pictureContent@odata.mediaEditLink`/`mediaReadLink`
  of its stream, with an `@odata.etag`.
* `GET .../picture/pictureContent` answers the image bytes with their media type.
* `PATCH .../picture/pictureContent` with the image bytes as body sets the picture (204 No Content);
  `DELETE .../picture` removes it (204). Both need `If-Match` ("Required", dynamics_picture_update.md);
  without it the answer is BC's 400 `BadRequest_InvalidToken`, with a stale tag 412
  `Request_EntityChanged`, as for contacts.
* The picture is the contact record's Image field, so its etag is the contact's, and writing or
  deleting it modifies the contact: the contact's etag and `lastModifiedDateTime` change (a delta
  read by `lastModifiedDateTime` sees it). [inferred from the Contact table; not documented]
* A contact without a picture answers the entity with `width`/`height` 0 and an empty `contentType`,
  and its `pictureContent` answers 204 with no body. [observed in BC's API pages; unverified]
* BC reads the type and size from the image bytes; a body that is not a JPEG, PNG or GIF is refused
  with 400. [unverified code]

* `$expand=picture` on the contacts collection renders each contact's picture entity inline (the
  same properties as "Get picture", without the bytes). `picture` is the contact's documented
  navigation property ("picture resource type": Navigation → contact; the contact resource lists
  `picture`), and BC's API pages take OData's `$expand` on navigation properties. [inferred: the
  docs show no `contacts?$expand=picture` example] Nested options (`picture($select=…)`) are refused.

What it does not simulate: pictures of customers, vendors, items or employees; size limits on
pictures (none is documented for this endpoint beyond the request limits); picture operations inside
`$batch`; and the v2.0 doc's `Content-Type: application/json` for the binary PATCH (taken to be a
documentation slip; any content type is accepted).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sandbox.bc as bc_module
from sandbox.httpd import Request, Response
from sandbox.images import image_info

if TYPE_CHECKING:
    from sandbox.bc import BusinessCentralService, Company, ContactRow


@dataclass(frozen=True)
class Picture:
    data: bytes
    content_type: str
    width: int
    height: int


def register(service: BusinessCentralService, prefix: str) -> None:
    """Add the picture routes (before the service's catch-all)."""
    h = _Handlers(service)
    one = rf"{prefix}/companies\((?P<cid>[^)/]*)\)/contacts\((?P<id>[^)/]*)\)/picture"
    service.route("GET", one, h.get, "pictures.get")
    service.route("DELETE", one, h.delete, "pictures.delete")
    service.route("GET", one + "/pictureContent", h.content, "pictures.get")
    service.route("PATCH", one + "/pictureContent", h.update, "pictures.update")


def expansion(
    service: BusinessCentralService, tenant: str, env: str, company: Company, req: Request
) -> Callable[[Any], dict[str, Any]] | None:
    """The contacts collection's `$expand=picture`, or None when the request has no `$expand`
    (the query engine then refuses one it does not know)."""
    text = req.query.get("$expand")
    if text is None:
        return None
    if text.strip() != "picture":
        raise bc_module.BcError(  # [unverified] text
            400,
            "BadRequest",
            f"The query option '$expand={text}' is not supported by the sandbox here; "
            "it expands only 'picture' on contacts.",
        )
    root = service._root(tenant, env)

    def render(row: ContactRow) -> dict[str, Any]:
        return {"picture": _entity(service, root, company, row)}

    return render


def _entity(service: BusinessCentralService, root: str, company: Company, row: ContactRow) -> dict[str, Any]:
    link = f"{root}/companies({company.id})/contacts({row.id})/picture/pictureContent"
    picture: Picture | None = row.picture
    return {
        "@odata.etag": service._etag(row),
        "id": row.id,
        "parentType": "Contact",
        "width": picture.width if picture else 0,
        "height": picture.height if picture else 0,
        "contentType": picture.content_type if picture else "",
        "pictureContent@odata.mediaEditLink": link,
        "pictureContent@odata.mediaReadLink": link,
    }


def parse_picture(data: bytes) -> Picture:
    info = image_info(data)
    if info is None:
        raise bc_module.BcError(  # [unverified] code and text
            400, "BadRequest", "The picture is not a valid image (JPEG, PNG or GIF)."
        )
    return Picture(data, info.content_type, info.width, info.height)


class _Handlers:
    def __init__(self, service: BusinessCentralService) -> None:
        self.s = service

    def _locate(self, req: Request, cid: str, id: str) -> tuple[Company, ContactRow]:
        company = self.s._company_from_url(req, cid)
        return company, self.s._row_from_url(company, id)

    def get(self, req: Request, tenant: str, env: str, cid: str, id: str) -> Response:
        def run() -> Response:
            with self.s.lock:
                company, row = self._locate(req, cid, id)
                root = self.s._root(tenant, env)
                body: dict[str, Any] = {
                    "@odata.context": f"{root}/$metadata#companies({company.id})/contacts({row.id})/picture/$entity",
                    **_entity(self.s, root, company, row),
                }
                return Response(200, body, {"ETag": body["@odata.etag"]})

        return self.s._answer(run)

    def content(self, req: Request, tenant: str, env: str, cid: str, id: str) -> Response:
        def run() -> Response:
            with self.s.lock:
                _, row = self._locate(req, cid, id)
                picture: Picture | None = row.picture
                if picture is None:
                    return Response(204)
                return Response(200, picture.data, content_type=picture.content_type)

        return self.s._answer(run)

    def update(self, req: Request, tenant: str, env: str, cid: str, id: str) -> Response:
        def run() -> Response:
            with self.s.lock:
                _, row = self._locate(req, cid, id)
                self.s._check_if_match(req, row)
                row.picture = parse_picture(req.body)
                self.s._stamp(row)
            return Response(204)

        return self.s._answer(run)

    def delete(self, req: Request, tenant: str, env: str, cid: str, id: str) -> Response:
        def run() -> Response:
            with self.s.lock:
                _, row = self._locate(req, cid, id)
                self.s._check_if_match(req, row)
                if row.picture is not None:
                    row.picture = None
                    self.s._stamp(row)
            return Response(204)

        return self.s._answer(run)
