"""Simulated Graph master categories: `/users/{id}/outlook/masterCategories`.

What it simulates (Microsoft Graph v1.0, "outlookCategory resource type",
https://learn.microsoft.com/en-us/graph/api/resources/outlookcategory, and its list/create/get/
update/delete operations):

* List (`GET`), create (`POST` with `displayName` and `color`), get, update (`PATCH`, only `color`:
  "After a category is created, the name cannot be changed") and delete, each answering the category
  as `{id, displayName, color}`.
* `displayName` "must be unique in a user's master list"; a second category of the same name
  (compared case-insensitively, as Outlook does) is refused with 409. [unverified: the code]
* `color` is `none` or `preset0`..`preset24` (the categoryColor enum); anything else is a 400.
* A new mailbox comes with Outlook's six default colour categories (Red, Orange, Yellow, Green,
  Blue, Purple category). [observed: every new Exchange Online mailbox has them; the list example
  in outlookuser-list-mastercategories.md shows them]
* Permissions: `MailboxSettings.Read` to read and `MailboxSettings.ReadWrite` to write
  (outlookuser-list-mastercategories.md, outlookuser-post-mastercategories.md) — not a Contacts
  permission, so an app with only `Contacts.ReadWrite` gets 403.
* A contact's `categories` is a plain string array (contact.md); Outlook does not require its values
  to be in the master list (an unknown name shows without a colour), and deleting a master category
  leaves the items that carry it unchanged. Filtering contacts by category uses the lambda form
  `categories/any(c:c eq 'name')` (query-parameters.md, "$filter=categories/any(a:a eq '…')").

What it does not simulate: query options on the list (`$filter`, `$top`), the per-category
`@odata.etag`, the 25-colour cap per mailbox, and categories of shared mailboxes.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sandbox.graph as graph_module
from sandbox.httpd import Request, Response

if TYPE_CHECKING:
    from sandbox.graph import GraphService, _Ctx

COLORS = frozenset({"none", *(f"preset{i}" for i in range(25))})
# outlookcategory.md colour table: preset0 Red, preset1 Orange, preset3 Yellow, preset4 Green,
# preset7 Blue, preset8 Purple.
DEFAULTS = (
    ("Red category", "preset0"),
    ("Orange category", "preset1"),
    ("Yellow category", "preset3"),
    ("Green category", "preset4"),
    ("Blue category", "preset7"),
    ("Purple category", "preset8"),
)
READ_ROLES = frozenset({"MailboxSettings.Read", "MailboxSettings.ReadWrite"})
WRITE_ROLES = frozenset({"MailboxSettings.ReadWrite"})


@dataclass
class Category:
    id: str
    display_name: str
    color: str

    def json(self) -> dict[str, str]:
        return {"id": self.id, "displayName": self.display_name, "color": self.color}


def seed_defaults(mailbox: Any) -> None:
    for name, color in DEFAULTS:
        mailbox.categories[name.lower()] = Category(str(uuid.uuid4()), name, color)


def routes(service: GraphService, user: str) -> list[tuple[str, str, Callable[..., Response], str]]:
    for kind in ("categories.list", "categories.get"):
        graph_module.EXTRA_KIND_ROLES[kind] = READ_ROLES
    for kind in ("categories.create", "categories.update", "categories.delete"):
        graph_module.EXTRA_KIND_ROLES[kind] = WRITE_ROLES
    h = _Handlers(service)
    base = user + r"/(?i:outlook)/(?i:masterCategories)"
    one = base + r"/(?P<category>[^/]+)"
    return [
        ("GET", base, h.list, "categories.list"),
        ("POST", base, h.create, "categories.create"),
        ("GET", one, h.get, "categories.get"),
        ("PATCH", one, h.update, "categories.update"),
        ("DELETE", one, h.delete, "categories.delete"),
    ]


def master_categories(service: GraphService, upn: str) -> list[dict[str, str]]:
    """The user's master category list as Outlook shows it (inspection for tests)."""
    with service.lock:
        return [c.json() for c in service._require_mailbox(upn).categories.values()]


def user_add_category(
    service: GraphService, upn: str, display_name: str, color: str = "none"
) -> dict[str, str]:
    """A person adding a category in Outlook (seeding for tests and the demo)."""
    with service.lock:
        return _create(service._require_mailbox(upn), {"displayName": display_name, "color": color}).json()


def _create(mailbox: Any, body: Any) -> Category:
    if not isinstance(body, dict):
        raise graph_module.GraphError(
            400, "RequestBodyRead", "The request body must be a JSON object (a category)."
        )
    _check_keys(body)
    name = body.get("displayName")
    if not isinstance(name, str) or not name.strip():
        raise graph_module.GraphError(
            400, "ErrorInvalidRequest", "The category's displayName must not be empty."
        )
    color = _color(body.get("color", "none"))
    if name.lower() in mailbox.categories:
        raise graph_module.GraphError(  # [unverified] code; uniqueness is documented
            409, "ErrorDuplicateCategory", f"A category with the name '{name}' already exists."
        )
    category = Category(str(uuid.uuid4()), name, color)
    mailbox.categories[name.lower()] = category
    return category


def _check_keys(body: dict[str, Any]) -> None:
    for key in body:
        if key not in ("id", "displayName", "color") and not key.startswith("@odata."):
            raise graph_module._unknown_property(key, "Microsoft.OutlookServices.OutlookCategory")


def _color(value: Any) -> str:
    if not isinstance(value, str) or value.lower() not in COLORS:
        raise graph_module.GraphError(
            400, "RequestBodyRead", f"Requested value '{value}' was not found in the categoryColor enum."
        )
    return "none" if value.lower() == "none" else value.lower()


class _Handlers:
    def __init__(self, service: GraphService) -> None:
        self.service = service

    def _context(self, user: str) -> str:
        return f"users('{user}')/outlook/masterCategories"

    def _find(self, mailbox: Any, category_id: str) -> Category:
        for category in mailbox.categories.values():
            if category.id == category_id.lower():
                found: Category = category
                return found
        raise graph_module.GraphError(404, "ErrorItemNotFound", graph_module.MSG_NOT_FOUND)

    def list(self, req: Request, ctx: _Ctx, user: str) -> Response:
        mailbox = self.service._mailbox(user, ctx)
        values = [c.json() for c in mailbox.categories.values()]
        return Response(200, self.service._with_context({"value": values}, self._context(user)))

    def create(self, req: Request, ctx: _Ctx, user: str) -> Response:
        mailbox = self.service._mailbox(user, ctx)
        category = _create(mailbox, graph_module._json_body(req))
        return Response(201, self.service._with_context(category.json(), self._context(user) + "/$entity"))

    def get(self, req: Request, ctx: _Ctx, user: str, category: str) -> Response:
        found = self._find(self.service._mailbox(user, ctx), category)
        return Response(200, self.service._with_context(found.json(), self._context(user) + "/$entity"))

    def update(self, req: Request, ctx: _Ctx, user: str, category: str) -> Response:
        found = self._find(self.service._mailbox(user, ctx), category)
        body = graph_module._json_body(req)
        if not isinstance(body, dict):
            raise graph_module.GraphError(400, "RequestBodyRead", "The request body must be a JSON object.")
        _check_keys(body)
        if "displayName" in body and body["displayName"] != found.display_name:
            # outlookcategory.md: "After a category is created, the name cannot be changed." [unverified code]
            raise graph_module.GraphError(
                400, "ErrorInvalidRequest", "The name of a category cannot be changed."
            )
        if "color" in body:
            found.color = _color(body["color"])
        return Response(200, self.service._with_context(found.json(), self._context(user) + "/$entity"))

    def delete(self, req: Request, ctx: _Ctx, user: str, category: str) -> Response:
        mailbox = self.service._mailbox(user, ctx)
        found = self._find(mailbox, category)
        del mailbox.categories[found.display_name.lower()]
        return Response(204)
