"""The poll URL of a 202: GET /api/poll/{runId}?token=. Anonymous at the host: the poll token is the
authorization (shared/poll_tokens.py), so the URL Power Automate keeps in its run history holds no key."""

import azure.functions as func

from shared.http_api import handle_poll


def main(req: func.HttpRequest) -> func.HttpResponse:
    return handle_poll(req)
