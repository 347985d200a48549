"""The change poll (BEHAVIOUR §8.1): one BC question per company; jobs only for companies that changed."""

import typing

import azure.functions as func

from shared.change_poll import poll


# typing.List, not list[str]: see function_sync_timer (the worker's typing_inspect check).
def main(timer: func.TimerRequest, jobs: func.Out[typing.List[str]]) -> None:  # noqa: UP006
    poll(timer, jobs)
