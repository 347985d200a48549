"""The whole simulated cloud (sandbox/cloud.py) offers both kinds of change notification to the product's own
app registration, with tokens from the simulated Entra ID: what issue 15's functions will build on.

Sources: "Receive change notifications through webhooks" (https://learn.microsoft.com/graph/change-notifications-delivery-webhooks)
and "Working with webhooks in Dynamics 365 Business Central"
(https://learn.microsoft.com/dynamics365/business-central/dev-itpro/api-reference/v2.0/dynamics-subscriptions).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import requests

from sandbox.bc import format_datetime
from sandbox.cloud import Cloud
from tests.sandbox.webhook_listener import Listener, listener

__all__ = ["listener"]  # fixture used by name


def _token(cloud: Cloud, scope: str) -> str:
    resp = requests.post(
        f"{cloud.authority}/oauth2/v2.0/token",
        data={
            "grant_type": "client_credentials",
            "client_id": cloud.client_id,
            "client_secret": cloud.client_secret,
            "scope": scope,
        },
        verify=str(cloud.tls.ca_bundle),
        timeout=10,
    )
    assert resp.status_code == 200, resp.text
    return str(resp.json()["access_token"])


def test_the_products_app_can_subscribe_on_both_sides_and_receives_changes(
    tmp_path: Path, listener: Listener
) -> None:
    """With the app's own permissions (Contacts.ReadWrite on Graph, API.ReadWrite.All on BC) a subscription
    on each side passes validation, and an Outlook edit and a BC edit each reach the local listener."""
    with Cloud(tmp_path) as cloud:
        oid, _ = cloud.add_person("alice@contoso.com")
        verify = str(cloud.tls.ca_bundle)
        graph = {"Authorization": f"Bearer {_token(cloud, 'https://graph.microsoft.com/.default')}"}
        bc = {"Authorization": f"Bearer {_token(cloud, 'https://api.businesscentral.dynamics.com/.default')}"}
        expires = format_datetime(datetime.now(UTC) + timedelta(days=2))
        sub = requests.post(
            f"{cloud.graph.base_url}/v1.0/subscriptions",
            json={
                "changeType": "created,updated,deleted",
                "notificationUrl": listener.url,
                "resource": f"users/{oid}/contacts",
                "expirationDateTime": expires,
                "clientState": "graph-state",
            },
            headers=graph,
            verify=verify,
            timeout=20,
        )
        assert sub.status_code == 201, sub.text
        cloud.bc_webhooks.contacts_supported = True
        bc_root = f"{cloud.bc.base_url}/v2.0/{cloud.tenant_id}/{cloud.environment}/api/v2.0"
        created = requests.post(
            f"{bc_root}/subscriptions",
            json={
                "notificationUrl": listener.url,
                "resource": f"/api/v2.0/companies({cloud.company_id})/contacts",
                "clientState": "bc-state",
            },
            headers=bc,
            verify=verify,
            timeout=20,
        )
        assert created.status_code == 201, created.text

        cloud.graph.user_create_contact("alice@contoso.com", None, {"givenName": "Ada"})
        cloud.bc.seed_contact(cloud.company_id, displayName="Grace Hopper")
        cloud.bc_webhooks.flush()
        assert cloud.graph_subscriptions.deliverer.wait_idle(10)
        assert cloud.bc_webhooks.deliverer.wait_idle(10)
        states = sorted(item["clientState"] for r in listener.notifications() for item in r.json()["value"])
        assert states == ["bc-state", "graph-state"]
