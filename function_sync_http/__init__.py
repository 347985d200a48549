"""On-demand sync for Power Automate: POST /api/sync, GET /api/sync/runs/{runId}."""

import azure.functions as func

from shared.http_api import handle_sync


def main(req: func.HttpRequest, jobs: func.Out[str]) -> func.HttpResponse:
    return handle_sync(req, jobs)
