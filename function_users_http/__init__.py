"""Per-user settings and the connection check: /api/users[/{user}[/validate]]."""

import azure.functions as func

from shared.http_api import handle_users


def main(req: func.HttpRequest) -> func.HttpResponse:
    return handle_users(req)
