"""Translation of the Lib's user-visible text, as ``slicer.i18n.tr`` does for the module file.

``from .i18n import tr as _`` then ``_("text")``, the pattern Slicer's translation tools
extract. Inside Slicer the text goes through ``slicer.app.translate`` with the context Slicer
derives from the calling file (``CTSliceInterpLib.<file>``); without the application (the
``slicer-core`` wheel, PythonSlicer) it is returned as is. Worker threads may call it:
``QCoreApplication::translate`` is thread-safe.
"""

from __future__ import annotations

import sys
from typing import Callable, Optional

_translator: Optional[Callable[[str, str], str]] = None  # (context, text) -> text; None: Slicer's, if any


def set_translator(translator: Optional[Callable[[str, str], str]]) -> None:
    """Use ``translator(context, text)`` instead of Slicer's (tests); None restores Slicer's."""
    global _translator
    _translator = translator


def tr(text: str) -> str:
    caller = sys._getframe(1).f_code.co_filename
    if _translator is not None:
        return _translator(_context(caller), text)
    try:
        from slicer import app
        from slicer.i18n import getContext, translate
    except ImportError:
        return text
    if app is None:
        return text
    return translate(getContext(caller), text)


def _context(source_file: str) -> str:
    try:
        from slicer.i18n import getContext

        return getContext(source_file)
    except ImportError:
        from pathlib import Path

        path = Path(source_file)
        return f"{path.parent.name}.{path.stem}"
