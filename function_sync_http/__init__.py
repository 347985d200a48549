"""On-demand sync for Power Automate: POST /api/sync, GET /api/sync/runs/{runId}."""

import azure.functions as func

from shared.http_api import handle_sync


# `context` (bound by name; the worker requires the plain func.Context annotation, hence no Optional):
# the inline run logs from its own thread, which needs the invocation id for its records to be kept.
def main(req: func.HttpRequest, jobs: func.Out[str], context: func.Context = None) -> func.HttpResponse:
    return handle_sync(req, jobs, context)
