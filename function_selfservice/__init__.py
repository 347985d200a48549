"""The self-service page: GET /api/selfservice and /api/selfservice/{asset} (shared/page.py)."""

import azure.functions as func

from shared import page


def main(req: func.HttpRequest) -> func.HttpResponse:
    return page.serve(req)
