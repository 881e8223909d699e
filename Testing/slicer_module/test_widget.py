"""The widget's control flow, run for real on slicer-core with the GUI replaced by test doubles.

There is no Qt here, so ``qt``, the .ui widgets, ``slicer.app`` and Slicer's scripted-module
base classes are stand-ins (``unittest.mock``; the parameter node is a plain object). The
widget's own code, the Lib, MRML and the scene are real. What this can say: the widget's
methods run without attribute errors, and the install, scene-close and overlay flows do what
issue 14 asks. What it cannot say: anything about Qt's behaviour or the .ui's layout (the static
checks and Slicer's own self-test cover those)."""

from __future__ import annotations

import importlib
import sys
import types
from unittest import mock

import pytest

import slicer
from CTSliceInterpLib import installer, testing


class _WithinRange:
    def __init__(self, *bounds):
        self.bounds = bounds


def _parameter_node_wrapper(cls):
    """A plain object with the class's defaults (Slicer's wrapper binds them to MRML)."""
    defaults = {name: getattr(cls, name, None) for name in cls.__annotations__}

    class Wrapped:
        def __init__(self, node=None):
            self.__dict__.update(defaults)

        def connectGui(self, ui):
            return "tag"

        def disconnectGui(self, tag):
            pass

        def AddObserver(self, event, callback, priority=0.0):
            return id(callback)

        def RemoveObserver(self, tag):
            pass

    Wrapped.__name__ = cls.__name__
    return Wrapped


class _ModuleWidget:
    def __init__(self, parent=None):
        self.parent = parent or mock.MagicMock()
        self.layout = mock.MagicMock()

    def setup(self):
        pass

    def resourcePath(self, name):
        return name


class _ModuleLogic:
    def __init__(self, parent=None):
        pass

    def getParameterNode(self):
        return None


class FakeWidget:
    """A Qt widget stand-in: properties are plain attributes; signals record their slots."""

    def __init__(self):
        self.enabled, self.checked, self.text, self.toolTip, self.value = True, False, "", "", 0
        self.currentText, self.currentPath, self.slots = "", "", {}

    def connect(self, signal, slot):
        self.slots[signal] = slot

    def blockSignals(self, blocked):
        return False

    def setVisible(self, visible):
        self.visible = visible

    def setStyleSheet(self, sheet):
        pass

    def appendPlainText(self, text):
        self.text += text + "\n"

    def addItems(self, items):
        pass


class FakeComboBox(FakeWidget):
    def __init__(self):
        super().__init__()
        self.items, self.index = [], -1

    def clear(self):
        self.items, self.index = [], -1

    def addItem(self, label, value=None):
        self.items.append((label, value))

    def findData(self, value):
        return next((i for i, (_, v) in enumerate(self.items) if v == value), -1)

    def setCurrentIndex(self, index):
        self.index = index

    @property
    def currentData(self):
        return self.items[self.index][1] if 0 <= self.index < len(self.items) else None


class FakeUi:
    def __init__(self):
        self.methodComboBox = FakeComboBox()

    def __getattr__(self, name):  # any other widget of the .ui
        widget = FakeWidget()
        setattr(self, name, widget)
        return widget


@pytest.fixture
def module(scene, monkeypatch):
    """``CTSliceInterp.py`` imported with GUI stand-ins, on the test's real scene."""
    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    scripted.ScriptedLoadableModule = type("ScriptedLoadableModule", (), {"__init__": lambda self, parent: None})
    scripted.ScriptedLoadableModuleWidget = _ModuleWidget
    scripted.ScriptedLoadableModuleLogic = _ModuleLogic
    scripted.ScriptedLoadableModuleTest = type("ScriptedLoadableModuleTest", (), {})
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.WithinRange, wrapper.parameterNodeWrapper = _WithinRange, _parameter_node_wrapper
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = i18n.translate = lambda *args: args[-1]
    i18n.getContext = lambda path: "CTSliceInterp"
    for name, stand_in in (("qt", mock.MagicMock()), ("slicer.ScriptedLoadableModule", scripted),
                           ("slicer.parameterNodeWrapper", wrapper), ("slicer.i18n", i18n)):
        monkeypatch.setitem(sys.modules, name, stand_in)
    monkeypatch.setattr(slicer, "app", mock.MagicMock(), raising=False)
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    for name in ("loadUI", "confirmOkCancelDisplay", "WaitCursor", "resetSliceViews"):
        monkeypatch.setattr(slicer.util, name, mock.MagicMock(), raising=False)
    monkeypatch.setattr(slicer.util, "childWidgetVariables", lambda ui: FakeUi())
    monkeypatch.delitem(sys.modules, "CTSliceInterp", raising=False)
    return importlib.import_module("CTSliceInterp")


@pytest.fixture
def widget(module):
    widget = module.CTSliceInterpWidget(parent=mock.MagicMock())
    widget.setup()
    yield widget
    widget.removeObservers()  # before the scene fixture clears the scene


def test_setup_preselects_the_ct_and_connects_nothing_to_quit(module, scene, make_volume):
    from slicerlib_helpers import add_volume_node

    volume = make_volume()
    add_volume_node(scene, volume.replace(array=(volume.array > 0).astype("uint8")), "labels",
                    class_name="vtkMRMLLabelMapVolumeNode")
    ct = add_volume_node(scene, volume, "CT")
    widget = module.CTSliceInterpWidget(parent=mock.MagicMock())
    widget.setup()
    widget.removeObservers()
    assert widget._parameterNode.inputVolume is ct
    assert not [c for c in slicer.app.connect.call_args_list if "aboutToQuit" in str(c)]
    assert widget.ui.methodComboBox.items == [("B-spline (classical)", "bspline")]


def test_install_disables_the_controls_then_lists_the_models(widget, monkeypatch):
    seen = {}
    plan = installer.InstallPlan(pip=["surely-not-installed-pkg>=1"])
    monkeypatch.setattr(installer, "plan_install", lambda requirements=None: plan)
    slicer.util.confirmOkCancelDisplay.return_value = True

    def install(plan, replan=None):
        seen["enabled during install"] = (widget.ui.inputsCollapsibleButton.enabled,
                                          widget.ui.methodCollapsibleButton.enabled,
                                          widget.ui.processingCollapsibleButton.enabled,
                                          widget.ui.applyButton.enabled)
        widget.onApplyButton()  # a second click while pip runs: ignored
        seen["second click"] = widget._run

    monkeypatch.setattr(installer, "install", install)
    monkeypatch.setattr(widget, "refreshMethods", lambda: seen.setdefault("refreshed", True))
    assert widget._ensureLocalBackendInstalled() is False  # no run with the pre-install menu
    assert seen == {"enabled during install": (False, False, False, False), "second click": None,
                    "refreshed": True}
    assert widget.ui.inputsCollapsibleButton.enabled and not widget._installing


def test_slicer_58_gets_the_message_not_a_traceback(widget, monkeypatch):
    def too_old(requirements=None):
        raise installer.LocalProcessingUnavailable("Local processing needs Python >=3.10 (3D Slicer 5.10 or later)")

    monkeypatch.setattr(installer, "plan_install", too_old)
    assert widget._ensureLocalBackendInstalled() is False
    widget.refreshMethods()
    assert "3D Slicer 5.10 or later" in widget.ui.statusLabel.text


def test_closing_the_scene_cancels_the_run(widget):
    run = mock.MagicMock()
    widget._run = run
    widget.onSceneStartClose(None, None)
    run.cancel.assert_called_once()


def test_the_uncertainty_checkbox_acts_on_the_last_result(widget, scene):
    source = testing.add_synthetic_thick_node(scene)
    widget._lastOutput = source
    with mock.patch.object(widget.logic, "showUncertainty") as show:
        widget.onShowUncertaintyToggled(False)
    show.assert_called_once_with(source, False)


def test_cleanup_cancels_the_model_query_and_the_run(widget, monkeypatch):
    stopped = []
    monkeypatch.setattr(sys.modules["CTSliceInterp"], "stop_shared_local_backend", lambda: stopped.append(True))
    widget._methodsQuery, widget._run = mock.MagicMock(), mock.MagicMock()
    widget.cleanup()
    widget._methodsQuery.cancel.assert_called_once()
    widget._run.cancel.assert_called_once()
    assert stopped == [True]


def test_the_samples_box_follows_the_method_and_zero_is_sent_as_the_default(widget, scene):
    """0 in the Samples box is "Posterior mean (default)" for residual_diffusion and reaches the
    Lib as samples=None (the method's default); 1 stays one realistic sample."""
    widget._setMethods([("B-spline (classical)", "bspline"), ("rd", "residual_diffusion"), ("tiny", "tiny")])
    widget.ui.methodComboBox.setCurrentIndex(1)
    widget.onMethodChanged(1)
    assert widget.ui.samplesSpinBox.enabled
    assert widget.ui.samplesSpinBox.specialValueText == "Posterior mean (default)"
    assert "1: one realistic sample" in widget.ui.samplesSpinBox.toolTip
    widget.ui.methodComboBox.setCurrentIndex(2)
    widget.onMethodChanged(2)
    assert widget.ui.samplesSpinBox.specialValueText == "1 sample (default)"
    widget.ui.methodComboBox.setCurrentIndex(1)
    widget.onMethodChanged(1)
    widget._parameterNode.inputVolume = testing.add_synthetic_thick_node(scene)
    assert widget._parameterNode.samples == 0  # the parameter's default
    sent = []
    for samples in (0, 1):
        widget._parameterNode.samples = samples
        with mock.patch.object(widget.logic, "start", side_effect=lambda *a, **k: sent.append(k) or None), \
                mock.patch.object(widget, "_ensureLocalBackendInstalled", return_value=True):
            widget.onApplyButton()
    assert [(k["method"], k["samples"]) for k in sent] == [("residual_diffusion", None), ("residual_diffusion", 1)]
