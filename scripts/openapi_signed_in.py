"""Writes openapi/openapi-signed-in.json: the Power Automate connector for flows that act as their owner.

The function-key connector (openapi/openapi.json) is for service flows. This one describes the same
operations under /api/signed-in with OAuth 2.0 (Microsoft Entra ID) instead of a key, so a flow calls
the API with its owner's token under the per-person rules of BEHAVIOUR §7.7. It is generated from
openapi.json so the two never drift; tests/test_page.py checks the committed file is what this writes.

    .venv/bin/python scripts/openapi_signed_in.py
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "openapi" / "openapi.json"
TARGET = ROOT / "openapi" / "openapi-signed-in.json"

_401 = {
    "description": "No valid Entra ID access token for this app (missing, expired, wrong audience or issuer).",
    "schema": {"$ref": "#/definitions/Error"},
}
_403 = {
    "description": "The token is valid but may not do this: another person's data, force, or the list of "
    "all users without the ContactSync.Admin app role.",
    "schema": {"$ref": "#/definitions/Error"},
}


def build(spec: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(spec)
    out["info"]["title"] = "BC Contact Sync (signed in)"
    out["info"]["description"] = (
        "BC Contact Sync for a flow that acts as its owner: the owner's own sync settings, connection check, "
        "syncs and run reports; admins (app role ContactSync.Admin) reach every user."
    )
    out["basePath"] = "/api/signed-in"
    # The shape Power Platform custom connectors use for Microsoft Entra ID (OAuth 2.0, authorization
    # code); the connector's own settings name the app's client id and resource (docs/POWER_AUTOMATE.md).
    out["securityDefinitions"] = {
        "oauth2-auth": {
            "type": "oauth2",
            "flow": "accessCode",
            "authorizationUrl": "https://login.microsoftonline.com/common/oauth2/authorize",
            "tokenUrl": "https://login.microsoftonline.com/common/oauth2/authorize",
            "scopes": {"access_as_user": "Use BC Contact Sync as the signed-in user"},
        }
    }
    out["security"] = [{"oauth2-auth": ["access_as_user"]}]
    for operations in out["paths"].values():
        for op in operations.values():
            if not isinstance(op, dict) or "responses" not in op:
                continue
            op["operationId"] = op["operationId"] + "AsMe"
            op["responses"]["401"] = _401
            op["responses"]["403"] = _403
            location = op["responses"].get("202", {}).get("headers", {}).get("Location")
            if location:  # this door points back at itself: the poller keeps its token, no poll token
                location["description"] = (
                    "URL of the run's report on this door (GET it with the same token until it answers 200)."
                )
    user_param = copy.deepcopy(spec["paths"]["/users/{user}"]["get"]["parameters"][0])
    out["paths"]["/me"] = {
        "get": {
            "operationId": "WhoAmI",
            "summary": "Who am I",
            "description": "The signed-in person: object id, name, whether they are an admin, and their settings row.",
            "parameters": [],
            "responses": {
                "200": {"description": "The signed-in person.", "schema": {"$ref": "#/definitions/Me"}},
                "401": _401,
            },
        }
    }
    out["paths"]["/users/{user}/runs"] = {
        "get": {
            "operationId": "ListRunsAsMe",
            "summary": "List recent runs",
            "description": "The user's 20 latest run reports, newest first, without their item lists.",
            "x-ms-visibility": "advanced",
            "parameters": [user_param],
            "responses": {
                "200": {"description": "The runs.", "schema": {"$ref": "#/definitions/RunList"}},
                "401": _401,
                "403": _403,
            },
        }
    }
    out["definitions"]["Me"] = {
        "type": "object",
        "properties": {
            "objectId": {"type": "string", "description": "Entra object id (oid) of the signed-in person."},
            "name": {"type": "string"},
            "username": {"type": "string", "description": "preferred_username; shown, never used to decide."},
            "isAdmin": {"type": "boolean", "description": "Holds the app role ContactSync.Admin."},
            "user": {
                "type": "string",
                "x-nullable": True,
                "description": "The person's settings row, if any.",
            },
        },
    }
    out["definitions"]["RunList"] = {
        "type": "object",
        "properties": {"runs": {"type": "array", "items": {"$ref": "#/definitions/RunReport"}}},
    }
    return out


def render() -> str:
    return json.dumps(build(json.loads(SOURCE.read_text())), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    TARGET.write_text(render())
    print(f"wrote {TARGET.relative_to(ROOT)}")
