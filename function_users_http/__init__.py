"""Per-user settings and the connection check: /api/users[/{user}[/validate]]."""

import azure.functions as func

from shared import api


def main(req: func.HttpRequest) -> func.HttpResponse:
    return api.handle_users(req)
