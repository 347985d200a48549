"""Scheduled sync: enqueue one job per enabled user; function_sync_worker runs them."""

import typing

import azure.functions as func

from shared.jobs import fan_out


# typing.List, not list[str]: the Python worker checks the queue output's annotation with
# typing_inspect, which does not see a built-in generic as iterable and refuses to load the function.
def main(timer: func.TimerRequest, jobs: func.Out[typing.List[str]]) -> None:  # noqa: UP006
    fan_out(timer, jobs)
