"""Business Central webhook notifications: POST /api/notify/bc (BEHAVIOUR §8.3).

Anonymous at the host, because BC calls it without a key: each entry's subscription id and clientState,
compared with the ones the app stored, are the authorization (shared/bc_webhooks.py).
"""

import typing

import azure.functions as func

from shared.bc_webhooks import handle


# typing.List, not list[str]: see function_sync_timer (the worker's typing_inspect check).
def main(req: func.HttpRequest, jobs: func.Out[typing.List[str]]) -> func.HttpResponse:  # noqa: UP006
    return handle(req, jobs)
