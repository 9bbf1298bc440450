"""argparse types that refuse values a service cannot run with, at start-up, with the range
in the message (`argument --max-num-batched-tokens: must be an integer >= 1, got 0`), instead
of a service that starts and then spins, divides by zero or never admits anything."""

from __future__ import annotations

import argparse
import math


def int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def float_in(low: float, high: float = math.inf, low_open: bool = True):
    """A finite float in (low, high] (or [low, high] with low_open=False)."""
    bound = f"{'(' if low_open else '['}{low:g}, {high:g}]" if high < math.inf else (
        f"{'>' if low_open else '>='} {low:g}")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number {bound}, got {text!r}")
        if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
            raise argparse.ArgumentTypeError(f"must be a number {bound}, got {text}")
        return value

    parse.__name__ = f"number {bound}"
    return parse


POSITIVE = int_at_least(1)
NON_NEGATIVE = int_at_least(0)
PORT = int_at_least(0)  # 0 = any free port
SECONDS = float_in(0.0)
