"""Scheduled sync: enqueue one job per enabled user; function_sync_worker runs them."""

import azure.functions as func

from shared import api


def main(timer: func.TimerRequest, jobs: func.Out[list[str]]) -> None:
    api.fan_out(timer, jobs)
