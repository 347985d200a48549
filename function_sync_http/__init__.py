"""On-demand sync for Power Automate: POST /api/sync, GET /api/sync/runs/{runId}."""

import azure.functions as func

from shared import api


def main(req: func.HttpRequest, jobs: func.Out[str]) -> func.HttpResponse:
    return api.handle_sync(req, jobs)
