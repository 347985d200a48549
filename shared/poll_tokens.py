"""Poll tokens: what the `Location` of a `202` carries instead of the caller's function key (BEHAVIOUR §7.6).

Power Automate keeps an action's inputs and outputs in the flow's run history, and the `Location` header
is an output: a function key copied into it would open the whole API to anyone who can read that
history. So the poll URL carries a token that can do exactly one thing, read one run's status and
report, and only until it expires.

A token is ``<expiry>.<mac>``: the expiry in Unix seconds and an HMAC-SHA256 over the run id and that
expiry, base64url without padding. Nothing is stored per token; the check recomputes the MAC for the
run id in the URL and compares in constant time, so a token for one run says nothing about another, a
changed expiry breaks the MAC, and a guess has a 2^-256 chance.

The key is `SYNC_POLL_TOKEN_KEY` when set (a Key Vault reference, at least 32 characters); otherwise
the app creates 32 random bytes once and keeps them in its own Table Storage (`Store.app_secret`), so
every instance of a scaled-out app checks the tokens the others issued. Replacing the key (setting
`SYNC_POLL_TOKEN_KEY`, or deleting the stored row) invalidates every outstanding poll URL, nothing else.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

from shared.model import utcnow

# How long a poll URL works. Longer than any run the queue finishes (a job retries at most five times),
# shorter than Power Automate's 30-day run history, so an old history entry holds a dead URL.
TOKEN_TTL = timedelta(hours=24)
KEY_BYTES = 32
MIN_CONFIGURED_KEY_CHARS = 32
STORED_KEY_NAME = "pollTokenKey"
_TOKEN = re.compile(r"^(\d{1,12})\.([A-Za-z0-9_-]{43})$")  # 43 = base64url of 32 bytes, no padding


class TokenProblem(StrEnum):
    """Why a token was refused; the HTTP answer names it so the caller knows what to do."""

    MISSING = "missing"
    INVALID = "invalid"  # malformed, for another run, tampered with, or signed with another key
    EXPIRED = "expired"


@dataclass(frozen=True)
class PollTokens:
    """Issues and checks the poll tokens of one key. `clock` is injectable so tests move time."""

    key: bytes = field(repr=False)
    ttl: timedelta = TOKEN_TTL
    clock: Callable[[], datetime] = utcnow

    def __post_init__(self) -> None:
        if len(self.key) < KEY_BYTES:
            raise ValueError(f"a poll-token key must be at least {KEY_BYTES} bytes")

    def _mac(self, run_id: str, expires: int) -> str:
        # The purpose prefix keeps this key's MACs from ever doubling as anything else.
        message = f"contact-sync-poll:v1:{run_id}:{expires}".encode()
        digest = hmac.new(self.key, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")

    def issue(self, run_id: str) -> str:
        """A token that lets its holder read run `run_id` until now + ttl."""
        expires = int((self.clock() + self.ttl).timestamp())
        return f"{expires}.{self._mac(run_id, expires)}"

    def check(self, run_id: str, token: str | None) -> TokenProblem | None:
        """None when `token` opens run `run_id` now; otherwise why not.

        The MAC is checked before the expiry, so a forged token is `invalid` whatever expiry it claims,
        and `expired` is only ever said about a token this app really issued for this run.
        """
        if not token:
            return TokenProblem.MISSING
        m = _TOKEN.match(token)
        if m is None:
            return TokenProblem.INVALID
        expires = int(m.group(1))
        if not hmac.compare_digest(self._mac(run_id, expires), m.group(2)):
            return TokenProblem.INVALID
        if self.clock().timestamp() >= expires:
            return TokenProblem.EXPIRED
        return None


def new_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def key_from_setting(value: str) -> bytes:
    """The configured key as bytes: a long random string from Key Vault, used as it is (UTF-8), and
    stretched to 32 bytes by SHA-256 so a key of any allowed length fits `PollTokens`."""
    return hashlib.sha256(value.encode("utf-8")).digest()
