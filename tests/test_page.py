"""The self-service page's files (BEHAVIOUR §7.7): served by the function app, nothing from a CDN,
MSAL for the browser exactly as locked, every label in English and Norwegian, no secret in its config."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
STATIC = ROOT / "function_selfservice" / "static"
WEB = ROOT / "web"
BUNDLE = STATIC / "msal-browser.min.js"


def locked_msal_version() -> str:
    lock = json.loads((WEB / "package-lock.json").read_text())
    return lock["packages"]["node_modules/@azure/msal-browser"]["version"]


def test_the_committed_msal_bundle_is_the_locked_version():
    version = locked_msal_version()
    assert json.loads((WEB / "package.json").read_text())["devDependencies"]["@azure/msal-browser"] == version
    banner = BUNDLE.read_text(encoding="utf-8")[:200]
    assert banner.startswith(f"/*! @azure/msal-browser v{version} "), banner[:60]


def test_the_committed_bundle_is_byte_for_byte_the_packages_browser_build():
    installed = WEB / "node_modules" / "@azure" / "msal-browser" / "lib" / "msal-browser.min.js"
    if not installed.exists():
        pytest.skip("web/node_modules is not installed (scripts/build_page.sh installs it)")
    assert hashlib.sha256(installed.read_bytes()).digest() == hashlib.sha256(BUNDLE.read_bytes()).digest()


def test_the_page_loads_nothing_from_elsewhere():
    html = (STATIC / "index.html").read_text()
    refs = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert refs and all(not r.startswith(("http:", "https:", "//")) for r in refs), refs
    for ref in refs:
        assert (STATIC / ref.removeprefix("selfservice/")).is_file(), ref
    assert "http" not in (STATIC / "app.css").read_text()


def _language_block(source: str, lang: str) -> str:
    start = source.index(f"\n  {lang}: {{")
    end = source.index("\n  },", start)
    return source[start:end]


def test_every_label_exists_in_english_and_norwegian():
    html = (STATIC / "index.html").read_text()
    source = (STATIC / "app.js").read_text()
    keys = set(re.findall(r'data-i18n="(\w+)"', html)) | set(re.findall(r'\bt\("(\w+)"', source))
    assert len(keys) > 30
    for lang in ("en", "nb"):
        block = _language_block(source, lang)
        missing = sorted(k for k in keys if not re.search(rf"\b{k}:", block))
        assert not missing, f"{lang} lacks {missing}"


def test_the_page_is_served_with_its_config_and_no_secret(client, env):
    page = requests.get(f"{client.base}/api/selfservice", timeout=30)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
    slash = requests.get(f"{client.base}/api/selfservice/", timeout=30, allow_redirects=False)
    assert slash.status_code == 308 and slash.headers["Location"].endswith("/api/selfservice")
    config = requests.get(f"{client.base}/api/selfservice/config.json", timeout=30)
    assert config.json() == {
        "clientId": env["SYNC_CLIENT_ID"],
        "authority": f"{env['SYNC_AUTHORITY_HOST']}/{env['SYNC_TENANT_ID']}",
        "knownAuthority": env["SYNC_AUTHORITY_HOST"].split("://")[1],
        "scope": f"{env['SYNC_CLIENT_ID']}/access_as_user",
    }
    assert env["SYNC_CLIENT_SECRET"] not in config.text
    js = requests.get(f"{client.base}/api/selfservice/msal-browser.min.js", timeout=30)
    assert js.status_code == 200 and js.headers["Content-Type"].startswith("text/javascript")
    for bad in ("../host.json", "..%2Fhost.json", "nope.js"):
        assert requests.get(f"{client.base}/api/selfservice/{bad}", timeout=30).status_code == 404


def test_the_signed_in_connector_is_generated_from_the_key_connector():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "openapi_signed_in", ROOT / "scripts" / "openapi_signed_in.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    committed = (ROOT / "openapi" / "openapi-signed-in.json").read_text()
    assert committed == module.render(), "run: .venv/bin/python scripts/openapi_signed_in.py"
    doc = json.loads(committed)
    assert doc["basePath"] == "/api/signed-in" and doc["security"] == [{"oauth2-auth": ["access_as_user"]}]
    assert doc["securityDefinitions"]["oauth2-auth"]["flow"] == "accessCode"
    assert {"/me", "/users/{user}/runs", "/sync", "/users"} <= set(doc["paths"])


def test_every_signed_in_operation_is_served(client, world):
    """Each documented operation reaches the people's door (401 without a token, never 404)."""
    doc = json.loads((ROOT / "openapi" / "openapi-signed-in.json").read_text())
    for path, operations in doc["paths"].items():
        for method in operations:
            url = (
                client.base
                + doc["basePath"]
                + path.replace("{user}", "a@b.example").replace("{runId}", "0" * 32)
            )
            resp = requests.request(method.upper(), url, timeout=30)
            assert resp.status_code == 401 and resp.json()["error"]["code"] == "Unauthorized", (method, path)
