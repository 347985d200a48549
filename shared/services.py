"""The composition root: the one place that builds what a run needs from the settings.

`Services` ties the configuration to Table Storage, the MSAL token provider, the shared BC reader and
the two HTTP clients (with Graph's per-mailbox pacing). Everything else receives a `Services` and
never builds these itself, so a test or the benchmark can swap one part (a faster backoff, a timed
store) in one place. The function app keeps one `Services` per process (`get_services`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from azure.data.tables import TableServiceClient

from shared.auth import BC_SCOPE, GRAPH_SCOPE, ManagedIdentityCredential, TokenProvider, token_provider
from shared.bc_client import BcClient
from shared.config import Config, ConfigError
from shared.graph_client import IMMUTABLE_IDS, GraphClient
from shared.http_client import HttpClient, RequestCounter, WindowPacer
from shared.model import utcnow
from shared.poll_tokens import STORED_KEY_NAME, PollTokens, key_from_setting, new_key
from shared.store import Store, pooled_transport
from shared.sync import BcReader

# Graph: 10,000 requests per 10 minutes per app and mailbox (throttling-outlook docs); keep a margin
# for the validation endpoint and the Outlook clients of the same app.
GRAPH_MAILBOX_BUDGET = 9_500
GRAPH_WINDOW_SECONDS = 600.0
# Read timeouts (seconds): BC's queue limit is 8 minutes and its request limit 10 minutes
# (operational-limits-online, dynamics-current-limits), so 630 s = 10 min + 30 s of margin; Graph 120 s.
BC_READ_TIMEOUT = 630.0
# The newest Queue service version the pinned Azurite accepts (the SDK's default can be newer); Azure
# Storage accepts it too.
QUEUE_API_VERSION = "2025-11-05"
GRAPH_READ_TIMEOUT = 120.0

# The Azure SDK's HTTP logging policy writes every request URL at INFO, and a Table Storage URL holds
# the partition key, which is the mailbox address. At WARNING only `userHash` identifies a user.
SDK_LOGGERS = ("azure", "azure.core.pipeline.policies.http_logging_policy")


def quiet_sdk_loggers() -> None:
    """Keep the Azure SDK's loggers at WARNING or above, whatever the root logger's level."""
    for name in SDK_LOGGERS:
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() < logging.WARNING:
            logger.setLevel(logging.WARNING)


@dataclass
class Services:
    """Everything a run needs, built once per process and shared by its runs."""

    config: Config
    store: Store
    tokens: TokenProvider
    bc_reader: BcReader = field(default_factory=BcReader)  # shared by the runs of one schedule tick
    sleep: Callable[[float], None] = time.sleep
    # "Now" for decisions on other services' time limits (BC webhook expiry); tests move it with the
    # sandbox's clock instead of waiting days.
    clock: Callable[[], datetime] = utcnow
    backoff_base: float = 0.5  # seconds; the first retry waits up to this when no Retry-After is sent
    _poll_tokens: PollTokens | None = field(default=None, repr=False)
    _jobs_queue: Any = field(default=None, repr=False)

    def jobs_queue(self) -> Any:
        """The jobs queue as an `azure.storage.queue.QueueClient`, for messages that must wait before
        they are seen (shared/wake.py: a notification's debounce), which an output binding cannot do.
        Base64 like the bindings (host.json `messageEncoding`)."""
        if self._jobs_queue is None:
            from azure.storage.queue import QueueClient, TextBase64DecodePolicy, TextBase64EncodePolicy

            from shared.jobs import QUEUE_NAME  # jobs imports services

            codec: dict[str, Any] = {
                "message_encode_policy": TextBase64EncodePolicy(),
                "message_decode_policy": TextBase64DecodePolicy(),
                "api_version": QUEUE_API_VERSION,
            }
            config = self.config
            if config.storage_connection_string:
                self._jobs_queue = QueueClient.from_connection_string(
                    config.storage_connection_string, QUEUE_NAME, **codec
                )
            elif config.queue_service_uri:
                self._jobs_queue = QueueClient(
                    config.queue_service_uri,
                    QUEUE_NAME,
                    credential=ManagedIdentityCredential(config.storage_client_id),
                    **codec,
                )
            else:
                raise ConfigError("AzureWebJobsStorage__queueServiceUri", "is missing (needed to queue runs)")
        return self._jobs_queue

    def poll_tokens(self) -> PollTokens:
        """The poll-token signer (shared/poll_tokens.py): the configured key, else the one the app keeps
        in Table Storage, read once per process (every instance reads the same row)."""
        if self._poll_tokens is None:
            configured = self.config.poll_token_key
            key = (
                key_from_setting(configured)
                if configured
                else self.store.app_secret(STORED_KEY_NAME, new_key)
            )
            self._poll_tokens = PollTokens(key)
        return self._poll_tokens

    @classmethod
    def from_config(cls, config: Config) -> Services:
        """The app's services; every entry point (functions, CLI) builds them here, so this is also
        where the SDK loggers are kept quiet."""
        quiet_sdk_loggers()
        return cls(config=config, store=store_from_config(config), tokens=token_provider(config))

    def _http(self, service: str, scope: str, counter: RequestCounter, **extra: Any) -> HttpClient:
        return HttpClient(
            service,
            lambda: self.tokens.token(scope),
            counter=counter,
            on_unauthorized=self.tokens.invalidate,
            sleep=self.sleep,
            backoff_base=self.backoff_base,
            **extra,
        )

    def clients(self, counter: RequestCounter) -> tuple[BcClient, GraphClient]:
        # Each client talks only to its configured base: a nextLink or deltaLink elsewhere is
        # refused before a token is fetched. BC queues a principal's requests beyond 5 at once for
        # up to 8 minutes (then 503) and aborts a request after 10 minutes (504): its read timeout
        # outlasts both, so BC's own answer arrives instead of our timeout turning a queued write
        # into an ambiguous one. Graph does not queue; 120 s is ample for a batch of 20.
        bc_http = self._http(
            "bc", BC_SCOPE, counter, base_url=self.config.bc_base_url, timeout=(10.0, BC_READ_TIMEOUT)
        )
        graph_http = self._http(
            "graph",
            GRAPH_SCOPE,
            counter,
            default_headers={"Prefer": IMMUTABLE_IDS},
            pacer=WindowPacer(GRAPH_MAILBOX_BUDGET, GRAPH_WINDOW_SECONDS, sleep=self.sleep),
            base_url=self.config.graph_base_url,
            timeout=(10.0, GRAPH_READ_TIMEOUT),
        )
        bc = BcClient(bc_http, self.config.bc_base_url, self.config.tenant_id, self.config.bc_environment)
        graph = GraphClient(graph_http, self.config.graph_base_url)
        return bc, graph


def store_from_config(config: Config) -> Store:
    """Table Storage by connection string (local, Azurite) or by managed identity (Azure, no keys)."""
    if config.storage_connection_string:
        return Store.from_connection_string(config.storage_connection_string, prefix=config.table_prefix)
    if not config.table_service_uri:  # Config.from_env requires one of the two
        raise ConfigError("AzureWebJobsStorage", "is missing (or set AzureWebJobsStorage__tableServiceUri)")
    service = TableServiceClient(
        endpoint=config.table_service_uri,
        credential=ManagedIdentityCredential(config.storage_client_id),
        transport=pooled_transport(),
    )
    return Store(service, prefix=config.table_prefix)


_services: Services | None = None
_services_lock = threading.Lock()


def get_services() -> Services:
    """The process-wide services (config, store, MSAL app, BC reader), built on first use."""
    global _services
    with _services_lock:
        if _services is None:
            services = Services.from_config(Config.from_env())
            services.store.ensure_tables()
            _services = services
        return _services


def reset_services() -> None:
    """Forget the process-wide services (tests switch environments)."""
    global _services
    with _services_lock:
        _services = None
