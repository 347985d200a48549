"""One user's queued sync (from the timer fan-out or an on-demand run that outgrew its budget)."""

import azure.functions as func

from shared.jobs import work


def main(msg: func.QueueMessage) -> None:
    work(msg)
