"""argparse types for the number flags of every script (training, evaluation, dataset preparation): a value out
of its flag's range is argparse's own one-line error naming the flag, given while the command line is read."""

from __future__ import annotations

import argparse
import math


def flag_number(kind=float, *, minimum=None, exclusive_minimum=None, maximum=None, exclusive_maximum=None,
                multiple_of=None):
    """An argparse ``type=`` for a number flag: a finite ``kind`` (``int`` or ``float``) with
    ``minimum <= value <= maximum``, ``exclusive_minimum < value < exclusive_maximum`` and ``value % multiple_of == 0``
    (each bound only when given). Anything else is argparse's own one-line error naming the flag, before anything
    runs: ``error: argument --rank: must be at least 1, got 0``."""

    def bounds():
        def text(x):
            return str(x) if isinstance(x, int) else f"{x:g}"

        low = f"[{text(minimum)}" if minimum is not None else (
            f"({text(exclusive_minimum)}" if exclusive_minimum is not None else None)
        high = f"{text(maximum)}]" if maximum is not None else (
            f"{text(exclusive_maximum)})" if exclusive_maximum is not None else None)
        if low and high:
            return f"must be in {low}, {high}"
        if minimum is not None:
            return "must not be negative" if minimum == 0 else f"must be at least {text(minimum)}"
        if exclusive_minimum is not None:
            return "must be positive" if exclusive_minimum == 0 else f"must be above {text(exclusive_minimum)}"
        return f"must be at most {text(maximum)}" if maximum is not None else f"must be below {text(exclusive_maximum)}"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if not ((minimum is None or value >= minimum) and (maximum is None or value <= maximum)
                and (exclusive_minimum is None or value > exclusive_minimum)
                and (exclusive_maximum is None or value < exclusive_maximum)):
            raise argparse.ArgumentTypeError(f"{bounds()}, got {text}")
        if multiple_of is not None and value % multiple_of:
            raise argparse.ArgumentTypeError(f"must be a multiple of {multiple_of}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


POSITIVE_INT = flag_number(int, minimum=1)
NON_NEGATIVE_INT = flag_number(int, minimum=0)
FINITE = flag_number(float)
POSITIVE = flag_number(float, exclusive_minimum=0)
NON_NEGATIVE = flag_number(float, minimum=0)
