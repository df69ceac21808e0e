"""What every command shares: the argument parser that says what is wrong in one line and exits 2.

A module of its own, so that the commands (run, evaluation, sample, export, interpret, frontier)
import it without importing one another.
"""
from __future__ import annotations

import argparse
import sys


class OneLineParser(argparse.ArgumentParser):
    """argparse without prefix matching (`--resum` is not `--resume`), and errors in one line."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        print(f"error: {message}; see --help", file=sys.stderr)
        raise SystemExit(2)
