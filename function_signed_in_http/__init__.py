"""The API for signed-in people: /api/signed-in/{me|users…|sync…}, protected by an Entra ID token.

The host lets these requests through without a function key (authLevel anonymous); shared/signed_in.py
refuses every request without a valid access token for this app before anything else happens.
"""

import azure.functions as func

from shared import signed_in


def main(req: func.HttpRequest, jobs: func.Out[str]) -> func.HttpResponse:
    return signed_in.handle(req, jobs)
