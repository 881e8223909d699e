"""The Lib's user-visible text goes through Slicer's translation (slicer.app.translate in
Slicer; the Lib's ``i18n.set_translator`` stands in for it here), with Slicer's context names."""

from __future__ import annotations

import pytest

from CTSliceInterpLib import i18n, installer, logic, nodes, session
from ctsliceinterp.core.errors import InputError


@pytest.fixture
def translated():
    contexts = set()

    def translate(context, text):
        contexts.add(context)
        return f"«{text}»"

    i18n.set_translator(translate)
    yield contexts
    i18n.set_translator(None)


def test_install_confirmation_is_translated(translated):
    text = installer.InstallPlan(torch=">=2.1", pip=["fastapi>=0.110"]).describe()
    assert "«Local processing needs these Python packages in Slicer's Python:»" in text
    assert "fastapi>=0.110" in text  # requirement strings are not for translators
    assert "CTSliceInterpLib.installer" in translated


def test_errors_and_status_lines_are_translated(translated, scene):
    with pytest.raises(InputError, match="^«no input volume selected"):
        nodes.check_input_node(None)
    target = session.ServerTarget(url="http://127.0.0.1:9")
    from ctsliceinterp.serving.client import ServerUnreachable

    assert session.describe_error(ServerUnreachable("refused"), target).startswith("«cannot reach")
    assert target.description == "«the server at {url}»".format(url="http://127.0.0.1:9")
    with pytest.raises(installer.LocalProcessingUnavailable, match="^«Local processing needs Python"):
        installer.check_local_python(version=(3, 9, 10))
    assert {"CTSliceInterpLib.nodes", "CTSliceInterpLib.session", "CTSliceInterpLib.installer"} <= translated


def test_the_classical_menu_entry_is_translated_once(translated):
    """The widget and the model list use the same translated label (a refresh keeps it)."""
    label, value = logic.classical_choice()
    assert (label, value) == ("«B-spline (classical)»", "bspline")


def test_progress_lines_are_translated(translated):
    from ctsliceinterp.serving.client import JobProgress

    target = session.ServerTarget(url="http://host:8000")
    queued = JobProgress("queued", 0, 0, state="queued", queue_position=2, job_id="j")
    running = JobProgress("sample", 5, 10, state="running", eta_seconds=12.0, job_id="j")
    assert session.describe_progress(queued, target) == "«waiting in the server queue (position {position})»".format(
        position=2)
    assert session.describe_progress(running, target) == "«{stage} {percent:.0f}%»«, about {seconds:.0f} s left»".format(
        stage="sample", percent=50, seconds=12)


def test_without_slicer_the_text_is_unchanged():
    assert logic.classical_choice()[0] == "B-spline (classical)"
