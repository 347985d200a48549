"""The self-service page's files and its config.json (function_selfservice, BEHAVIOUR §7.7).

Static files from function_selfservice/static (MSAL for the browser is committed there; nothing is
loaded from a CDN), plus config.json, which tells the page where to sign in. It holds no secret and no
key: the page gets an access token for this app's API by signing the person in, and calls
/api/signed-in/… with it.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path

import azure.functions as func

from shared import http_api as api
from shared.identity import SCOPE
from shared.services import get_services

STATIC = Path(__file__).resolve().parent.parent / "function_selfservice" / "static"
_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html", ".svg": "image/svg+xml"}
# The page's own rules: scripts and styles only from this app; tokens go to Entra and this API only.
_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self' {authority}; frame-src {authority}; form-action 'self' {authority}; "
    "base-uri 'none'; frame-ancestors 'none'"
)


def page_config() -> dict[str, str]:
    """What MSAL.js needs: the app's client id, the tenant's authority and the API scope to ask for."""
    config = get_services().config
    # A resource may be named by its client id in a scope, whatever its Application ID URI is.
    audience = config.api_audience
    resource = audience if "://" in audience else config.client_id
    return {
        "clientId": config.client_id,
        "authority": config.authority,
        "knownAuthority": config.authority_host.split("://", 1)[1].split("/", 1)[0],
        "scope": f"{resource}/{SCOPE}",
    }


def serve(req: func.HttpRequest) -> func.HttpResponse:
    name = (req.route_params.get("path") or "").strip("/") or "index.html"
    if name == "index.html" and req.url.split("?", 1)[0].endswith("/"):
        # The page's assets are relative to /api/selfservice, and that exact address is its redirect URI.
        return func.HttpResponse(status_code=308, headers={"Location": req.url.split("?", 1)[0].rstrip("/")})
    if name == "config.json":
        return api.json_response(200, page_config(), {"Cache-Control": "no-store"})
    path = (STATIC / name).resolve()
    if STATIC not in path.parents or not path.is_file():
        return api.error(404, "NotFound", f"no such file: {name}")
    mimetype = _TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    authority = get_services().config.authority_host
    headers = {
        "Cache-Control": "no-cache",
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": _CSP.format(authority=authority),
        "Referrer-Policy": "no-referrer",
    }
    return func.HttpResponse(
        path.read_bytes(), status_code=200, mimetype=mimetype, headers=headers, charset="utf-8"
    )
