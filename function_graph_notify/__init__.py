"""Graph change notifications: POST /api/notify/graph (BEHAVIOUR §8.2). Anonymous at the host: Graph sends
no key; each notification's subscription id and clientState are the authorization (shared/graph_notify.py)."""

import azure.functions as func

from shared.graph_notify import handle


def main(req: func.HttpRequest) -> func.HttpResponse:
    return handle(req)
