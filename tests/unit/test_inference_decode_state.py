"""DecodeState: the decode loop's device-side bookkeeping, on hand-made token streams."""

from __future__ import annotations

import torch

from megatron_sail.inference.decode_state import DecodeState

STOP = 9


def _run(streams: list[list[int]], budgets: list[int], rows: int, min_new: int = 0) -> DecodeState:
    """Feed per-row token streams (one column per step) until no row runs."""
    state = DecodeState([5, 3, 7, 2][: len(budgets)], budgets, rows, (STOP,), min_new, torch.device("cpu"))
    for step in range(state.width):
        if step and not state.running():
            break
        tokens = torch.tensor(
            [s[step] if step < len(s) else 0 for s in streams] + [0] * (rows - len(streams))
        )
        state.accept(tokens, step)
    return state


def test_stop_budget_and_padding_rows():
    streams = [[1, 2, STOP, 4, 5], [1, 2, 3, 4, 5], [STOP, 1, 1, 1, 1]]
    state = _run(streams, [5, 3, 4], rows=4)  # row 3 pads the batch (SP): never runs
    assert state.rows() == [([1, 2], "stop", STOP), ([1, 2, 3], "length", None), ([], "stop", STOP)]
    assert state.count.tolist() == [2, 3, 0, 0]
    assert not state.running()
    # a row's next input sits right after its last token; ended rows keep a valid position
    assert state.positions().tolist() == [4 + 2, 2 + 3, 6 + 0, 0]


def test_min_new_tokens_ignores_early_stops_and_zero_budgets():
    streams = [[STOP, STOP, 3, STOP], [1, 1, 1, 1]]
    state = _run(streams, [4, 0], rows=2, min_new=2)
    assert state.rows() == [([STOP, STOP, 3], "stop", STOP), ([], "length", None)]


def test_every_row_still_running_until_its_budget():
    state = DecodeState([4, 4], [3, 1], 2, (STOP,), 0, torch.device("cpu"))
    state.accept(torch.tensor([7, 8]), 0)
    assert state.running() and state.live.tolist() == [True, False]
    assert state.tokens.tolist() == [7, 8]  # the next step's inputs
    state.accept(torch.tensor([6, 6]), 1)
    state.accept(torch.tensor([5, 5]), 2)
    assert state.rows() == [([7, 6, 5], "length", None), ([8], "length", None)]
