"""Pieces shared by subcommands: input options and a tqdm progress callback."""

from __future__ import annotations

import argparse
import sys


def add_input_arguments(parser: argparse.ArgumentParser, name: str = "input", help_text: str = "volume file, DICOM folder or ZIP") -> None:
    parser.add_argument(name, help=help_text)
    parser.add_argument("--series", choices=["thick", "thin"], help="for a case ZIP/folder (case_X/1 thick, case_X/2 thin)")
    parser.add_argument("--series-uid", help="SeriesInstanceUID to pick when several series are present")
    parser.add_argument("--detilt", action="store_true",
                        help="resample a gantry-tilted DICOM series onto an orthogonal grid (refused without it)")


class TqdmProgress:
    """A ProgressCallback drawing one tqdm bar per stage on stderr."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and sys.stderr.isatty() or enabled == "always"
        self._bar = None
        self._stage = None

    def __call__(self, event) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if event.stage != self._stage:
            self.close()
            self._stage = event.stage
            self._bar = tqdm(total=event.total, desc=event.stage, unit="step", file=sys.stderr, leave=False)
        self._bar.total = event.total
        self._bar.n = event.done
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def method_of_model(model: str) -> str:
    """The method whose checkpoint ``model`` is (``api.model_method``); for a shipped model whose
    weights are absent, its own method (whose loader says it is not installed); else the
    ``InputError`` naming what a model folder holds."""
    from ..api import METHODS, model_method
    from ..core.errors import InputError

    try:
        return model_method(model)
    except InputError:
        shipped = {m.default_model: m.name for m in METHODS.values() if m.default_model}
        if str(model) in shipped:
            return shipped[str(model)]
        raise
