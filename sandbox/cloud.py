"""The whole simulated cloud in one object: Entra ID, Business Central and Graph over HTTPS.

Used by the tests and the demo. `env()` gives the app settings (BEHAVIOUR §6) that point the product at
it, including `REQUESTS_CA_BUNDLE` so the product verifies the sandbox's certificate like any other.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
import uuid
from pathlib import Path

from sandbox.bc import BusinessCentralService
from sandbox.bc_webhooks import BcWebhooks
from sandbox.entra import EntraService
from sandbox.graph import GraphService
from sandbox.graph_subscriptions import GraphSubscriptions
from sandbox.httpd import SandboxServer
from sandbox.tls import make_tls

BC_AUDIENCE = "https://api.businesscentral.dynamics.com"
GRAPH_AUDIENCE = "https://graph.microsoft.com"


class Cloud:
    def __init__(self, workdir: Path | None = None, environment: str = "production"):
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="bc-sync-sandbox-"))
        self.tls = make_tls(self.workdir)
        self.tenant_id = str(uuid.uuid4())
        self.client_id = str(uuid.uuid4())
        self.client_secret = "sandbox-" + secrets.token_urlsafe(24)  # throwaway, lives only in this process
        self.environment = environment
        self.entra = EntraService()
        self.entra.add_tenant(self.tenant_id)
        # The Graph permissions the deployment grants (docs/DEPLOY.md): contacts, the mailbox lookup,
        # and the master category list the sync adds its category to (issue 12).
        self.entra.register_app(
            self.tenant_id,
            self.client_id,
            self.client_secret,
            graph_roles=("Contacts.ReadWrite", "User.Read.All", "MailboxSettings.ReadWrite"),
        )
        # The same app registration exposes the API people call (scope access_as_user, app role
        # ContactSync.Admin) and is the page's single-page-application client (BEHAVIOUR §7.7).
        self.entra.expose_api(self.tenant_id, self.client_id)
        self.bc = BusinessCentralService(self.entra.validate, self.tenant_id, environment)
        self.bc.register_entra_app(self.client_id)
        self.graph = GraphService(self.entra.validate)
        self.company_id = self.bc.add_company("CRONUS International Ltd.")
        # Change notifications (issue 15): Graph subscriptions and BC webhooks, delivered from
        # background threads; plain http is accepted for loopback listeners only (sandbox/notify.py).
        self.graph_subscriptions = GraphSubscriptions(self.graph, self.tenant_id, str(self.tls.ca_bundle))
        self.bc_webhooks = BcWebhooks(self.bc, str(self.tls.ca_bundle))
        self._servers = [SandboxServer(s, self.tls.server_context) for s in (self.entra, self.bc, self.graph)]

    def start(self) -> Cloud:
        for s in self._servers:
            s.start()
        return self

    def stop(self) -> None:
        for s in self._servers:
            s.stop()
        self.graph_subscriptions.stop()
        self.bc_webhooks.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Cloud:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def env(self, storage_connection_string: str, table_prefix: str = "ContactSync") -> dict[str, str]:
        return {
            "SYNC_TENANT_ID": self.tenant_id,
            "SYNC_CLIENT_ID": self.client_id,
            "SYNC_CLIENT_SECRET": self.client_secret,
            "SYNC_AUTHORITY_HOST": self.entra.base_url,
            "BC_API_BASE_URL": f"{self.bc.base_url}/v2.0",
            "BC_ENVIRONMENT": self.environment,
            "BC_COMPANY_ID": self.company_id,
            "GRAPH_BASE_URL": f"{self.graph.base_url}/v1.0",
            "AzureWebJobsStorage": storage_connection_string,
            "SYNC_TABLE_PREFIX": table_prefix,
            "REQUESTS_CA_BUNDLE": str(self.tls.ca_bundle),
        }

    def add_person(self, upn: str, display_name: str | None = None, admin: bool = False) -> tuple[str, str]:
        """A colleague with a mailbox who can sign in; returns (object id, throwaway password)."""
        oid = self.graph.add_mailbox(upn, display_name=display_name)
        password = "sandbox-" + secrets.token_urlsafe(9)
        self.entra.add_user(self.tenant_id, upn, oid, display_name, password=password)
        if admin:
            self.entra.assign_app_role(self.tenant_id, self.client_id, oid, "ContactSync.Admin")
        return oid, password

    def allow_redirect(self, uri: str) -> None:
        """Register the page's address as a single-page-application redirect URI of the app."""
        self.entra.add_redirect_uri(self.tenant_id, self.client_id, uri)

    @property
    def authority(self) -> str:
        return f"{self.entra.base_url}/{self.tenant_id}"

    def reset_counters(self) -> None:
        for s in (self.entra, self.bc, self.graph):
            s.counters.reset()
