"""CTSliceInterp: thick-slice CT to thin-slice CT (a regression network, latent diffusion or B-spline) in 3D Slicer.

This file is thin on purpose: Qt lives here (the widget), everything else lives in the Qt-free
``CTSliceInterpLib`` package, which pytest exercises on the ``slicer-core`` wheel. Python console:

    from CTSliceInterp import CTSliceInterpLogic
    thin = CTSliceInterpLogic().process(getNode("CT"), spacing=1.0, method="bspline")
"""

import json
import logging
from typing import Annotated, Optional

import qt
import vtk

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin
from slicer import vtkMRMLScalarVolumeNode

from CTSliceInterpLib import installer, layout, nodes, testing
from CTSliceInterpLib.local_backend import LocalBackend, stop_shared_local_backend
from CTSliceInterpLib.logic import (
    CLASSICAL_FALLBACK,
    DEFAULT_METHOD,
    InputError,
    InterpolationLogic,
    UNCERTAINTY_REFERENCE,
    ProcessingError,
    classical_choice,
    method_options,
    samples_default_label,
    samples_help,
)
from CTSliceInterpLib.session import describe_error

SETTINGS_HISTORY = "CTSliceInterp/ServerHistory"
SETTINGS_TOKENS = "CTSliceInterp/ServerTokens"  # JSON {url: token}, in Slicer's settings only
SETTINGS_CA_FILES = "CTSliceInterp/ServerCAFiles"  # JSON {url: CA certificate path}, likewise
HISTORY_LENGTH = 10


#
# CTSliceInterp
#
class CTSliceInterp(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("CT Slice Interpolation")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Filtering")]
        self.parent.dependencies = []
        self.parent.contributors = ["CTSliceInterp contributors"]
        self.parent.helpText = _(
            "Turns a thick-slice CT (e.g. 5 mm) into a thin-slice CT (e.g. 1 mm) with a through-plane "
            "regression network (the default), latent diffusion, residual latent diffusion (by default its "
            "posterior-mean estimate; Samples 1: one realistic sample) or B-spline interpolation, locally "
            "(CPU/GPU) or on a remote server. The result is a new volume "
            "with exact geometry, shown side by side with the input in linked views. "
            "Research software, not for diagnosis. "
            '<a href="https://github.com/ctsliceinterp/CTSliceInterp/blob/main/docs/slicer.md">Documentation</a>.'
        )
        self.parent.acknowledgementText = _(
            "Built on 3D Slicer, PyTorch, diffusers, FastAPI and SimpleITK. The models are trained on "
            "public CT (see the model cards)."
        )


#
# Parameters
#
@parameterNodeWrapper
class CTSliceInterpParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    outputVolume: vtkMRMLScalarVolumeNode
    spacing: Annotated[float, WithinRange(0.1, 10.0)] = 1.0
    steps: Annotated[int, WithinRange(0, 1000)] = 0
    samples: Annotated[int, WithinRange(0, 16)] = 0  # 0: the method's default output (sent as None)
    consistency: bool = True
    showUncertainty: bool = True
    # Not bound to widgets (the widget handles them): the method's value behind its label, the
    # processing place. The token and the CA file are never stored here (they would be saved with
    # the scene, and belong to the server, not to the data).
    method: str = DEFAULT_METHOD
    remote: bool = False
    serverUrl: str = ""


#
# CTSliceInterpWidget
#
class CTSliceInterpWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run = None
        self._methodsQuery = None  # a MethodsQuery (daemon thread) while the model list is asked for
        self._lastOutput = None  # the last result, for the uncertainty overlay checkbox
        self._installing = False
        self._lastMessage = None
        self._lastState = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CTSliceInterp.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = CTSliceInterpLogic()
        # Runs and model lists work on daemon threads in the Lib; this timer polls them.
        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.connect("timeout()", self._onTimer)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.refreshMethodsButton.connect("clicked(bool)", self.refreshMethods)
        self.ui.checkServerButton.connect("clicked(bool)", self.refreshMethods)
        self.ui.localRadioButton.connect("toggled(bool)", self.onProcessingPlaceChanged)
        self.ui.methodComboBox.connect("currentIndexChanged(int)", self.onMethodChanged)
        self.ui.serverComboBox.connect("currentTextChanged(QString)", self.onServerChanged)
        self.ui.tokenLineEdit.connect("editingFinished()", self.saveToken)
        # Emitted for acceptable paths only (its name filters); clearing is saved on the next use.
        self.ui.caFilePathLineEdit.connect("currentPathChanged(QString)", self.saveCaFile)
        self.ui.showUncertaintyCheckBox.connect("toggled(bool)", self.onShowUncertaintyToggled)
        # Nothing is connected to the application's quit signal: Slicer unloads modules when it
        # quits (qSlicerCoreApplication's quit handler), and that calls cleanup().

        self._setMethods([classical_choice()])
        self.ui.serverComboBox.addItems(self._serverHistory())
        self.ui.progressBar.setVisible(False)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Module unload (application exit or reload): stop polling, cancel what runs (so no
        worker starts a backend again), then stop the local backend and all its processes."""
        self.removeObservers()
        if getattr(self, "_timer", None) is not None:
            self._timer.stop()
        if self._methodsQuery is not None:
            self._methodsQuery.cancel()
        if self._run is not None:
            self._run.cancel()
        stop_shared_local_backend()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        # The run's nodes go with the scene: cancel it (finish() would refuse its result anyway).
        if self._run is not None:
            self._run.cancel()
        self._lastOutput = None
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolume = nodes.first_ct_volume(slicer.mrmlScene)  # label maps skipped
            if firstVolume:
                self._parameterNode.inputVolume = firstVolume

    def setParameterNode(self, inputParameterNode: Optional[CTSliceInterpParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets with a "SlicerParameterName" dynamic property in the .ui are bound here.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
            blocked = [button.blockSignals(True) for button in (self.ui.localRadioButton, self.ui.remoteRadioButton)]
            self.ui.remoteRadioButton.checked = self._parameterNode.remote
            self.ui.localRadioButton.checked = not self._parameterNode.remote
            for button, wasBlocked in zip((self.ui.localRadioButton, self.ui.remoteRadioButton), blocked):
                button.blockSignals(wasBlocked)
            if self._parameterNode.serverUrl:
                self.ui.serverComboBox.currentText = self._parameterNode.serverUrl
            self._updateButtons()

    # --- state of the controls ----------------------------------------------------------------
    def _updateButtons(self, caller=None, event=None) -> None:
        remote = self.ui.remoteRadioButton.checked
        self.ui.remoteSettingsWidget.setVisible(remote)
        method = self._currentMethod()
        options = method_options(method)  # what the chosen method takes (registry)
        self.ui.samplesSpinBox.specialValueText = samples_default_label(method)
        self.ui.samplesSpinBox.toolTip = samples_help(method)
        for widget, option in ((self.ui.stepsSpinBox, "steps"), (self.ui.samplesSpinBox, "samples"),
                               (self.ui.consistencyCheckBox, "consistency")):
            widget.enabled = option in options and self._run is None
        # Also after a run, for the result on screen.
        self.ui.showUncertaintyCheckBox.enabled = "samples" in options or self._lastOutputHasUncertainty()
        if self._installing:
            self.ui.applyButton.text = _("Installing...")
            self.ui.applyButton.toolTip = _("The local backend is being installed.")
            self.ui.applyButton.enabled = False
            return
        if self._run is not None:
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the interpolation; nothing is created and the input is kept.")
            self.ui.applyButton.enabled = True
            return
        self.ui.applyButton.text = _("Interpolate")
        ready = bool(self._parameterNode and self._parameterNode.inputVolume)
        if remote and not self.ui.serverComboBox.currentText.strip():
            ready = False
        self.ui.applyButton.enabled = ready
        self.ui.applyButton.toolTip = (_("Start the interpolation.") if ready
                                       else _("Select an input volume (and a server URL for remote processing)."))

    def _currentMethod(self) -> str:
        value = self.ui.methodComboBox.currentData
        return value if value else CLASSICAL_FALLBACK

    def _setMethods(self, methods) -> None:
        current = self._parameterNode.method if self._parameterNode else DEFAULT_METHOD
        wasBlocked = self.ui.methodComboBox.blockSignals(True)
        self.ui.methodComboBox.clear()
        for label, value in methods:
            self.ui.methodComboBox.addItem(label, value)
        index = self.ui.methodComboBox.findData(current)
        self.ui.methodComboBox.setCurrentIndex(max(0, index))
        self.ui.methodComboBox.blockSignals(wasBlocked)
        self._updateButtons()

    def onMethodChanged(self, index) -> None:
        if self._parameterNode:
            self._parameterNode.method = self._currentMethod()
        self._updateButtons()

    def _lastOutputHasUncertainty(self) -> bool:
        output = self._lastOutput
        return bool(output is not None and output.GetScene() is not None
                    and output.GetNodeReference(UNCERTAINTY_REFERENCE) is not None)

    def onShowUncertaintyToggled(self, checked) -> None:
        if self._lastOutput is not None and self._lastOutput.GetScene() is not None:
            self.logic.showUncertainty(self._lastOutput, checked)

    def onProcessingPlaceChanged(self, local) -> None:
        if self._parameterNode:
            self._parameterNode.remote = not local
        self._setMethods([classical_choice()])
        self._updateButtons()
        if not local and self.ui.serverComboBox.currentText.strip():
            self.refreshMethods()

    def onServerChanged(self, text) -> None:
        if self._parameterNode:
            self._parameterNode.serverUrl = text.strip()
        self.ui.tokenLineEdit.text = self._tokens().get(text.strip(), "")
        wasBlocked = self.ui.caFilePathLineEdit.blockSignals(True)  # loading is not a change to save
        self.ui.caFilePathLineEdit.currentPath = self._caFiles().get(text.strip(), "")
        self.ui.caFilePathLineEdit.blockSignals(wasBlocked)
        self._updateButtons()

    # --- settings (server history, tokens, CA files: never in the scene) -------------------------
    def _serverHistory(self):
        history = slicer.app.settings().value(SETTINGS_HISTORY) or []
        return [history] if isinstance(history, str) else list(history)

    def _rememberServer(self, url) -> None:
        history = [url] + [u for u in self._serverHistory() if u != url]
        slicer.app.settings().setValue(SETTINGS_HISTORY, history[:HISTORY_LENGTH])

    @staticmethod
    def _perServer(key) -> dict:
        try:
            return json.loads(slicer.app.settings().value(key) or "{}")
        except ValueError:
            return {}

    def _savePerServer(self, key, value) -> None:
        url = self.ui.serverComboBox.currentText.strip()
        if url:
            values = self._perServer(key)
            if value:
                values[url] = value
            else:
                values.pop(url, None)
            slicer.app.settings().setValue(key, json.dumps(values))

    def _tokens(self) -> dict:
        return self._perServer(SETTINGS_TOKENS)

    def saveToken(self) -> None:
        self._savePerServer(SETTINGS_TOKENS, self.ui.tokenLineEdit.text.strip())

    def _caFiles(self) -> dict:
        return self._perServer(SETTINGS_CA_FILES)

    def saveCaFile(self) -> None:
        self._savePerServer(SETTINGS_CA_FILES, self.ui.caFilePathLineEdit.currentPath.strip())

    def _server(self):
        """(url, token, CA file) for remote processing; (None, None, None) for local."""
        if not self.ui.remoteRadioButton.checked:
            return None, None, None
        return (self.ui.serverComboBox.currentText.strip(), self.ui.tokenLineEdit.text.strip() or None,
                self.ui.caFilePathLineEdit.currentPath.strip() or None)

    # --- messages ------------------------------------------------------------------------------
    def _log(self, text: str, error: bool = False) -> None:
        self.ui.statusLabel.text = text.splitlines()[0] if text else ""
        self.ui.statusLabel.setStyleSheet("color: #c0392b;" if error else "")
        if text and text != self._lastMessage:
            stamp = qt.QTime.currentTime().toString("HH:mm:ss")
            self.ui.logTextEdit.appendPlainText(f"{stamp}  {text}")
            self._lastMessage = text
        (logging.error if error else logging.info)("CTSliceInterp: %s", text)

    # --- local backend installation --------------------------------------------------------------
    def _ensureLocalBackendInstalled(self) -> bool:
        """True when the local backend can run now. Installing (after one confirmation) returns
        False: the method list is refreshed first, so the next click runs the chosen model, not
        the B-spline that was the only choice before the install."""
        try:
            plan = installer.plan_install()
        except (installer.LocalProcessingUnavailable, OSError) as exc:  # Slicer 5.8, or no bundled backend
            self._log(str(exc), error=True)
            return False
        if plan.empty:
            return True
        if not slicer.util.confirmOkCancelDisplay(plan.describe(), windowTitle=_("Install the local backend")):
            self._log(_("Local processing needs the backend packages; installation was declined. "
                        "Use Remote processing, or click Interpolate again to install."), error=True)
            return False
        self._log(_("Installing the local backend packages (this can take several minutes)..."))
        # The install keeps the GUI painting (pip's output is read with processEvents): nothing in
        # the module may start meanwhile.
        self._installing = True
        self.ui.inputsCollapsibleButton.enabled = False
        self.ui.methodCollapsibleButton.enabled = False
        self.ui.processingCollapsibleButton.enabled = False
        self._updateButtons()
        try:
            with slicer.util.WaitCursor():
                installer.install(plan)
        except Exception as exc:  # noqa: BLE001 - shown to the user
            self._log(_("Installing the local backend failed: {error}").format(error=exc), error=True)
            return False
        finally:
            self._installing = False
            self.ui.inputsCollapsibleButton.enabled = True
            self.ui.methodCollapsibleButton.enabled = True
            self.ui.processingCollapsibleButton.enabled = True
            self._updateButtons()
        self._log(_("Local backend installed. Its models are being listed: choose the method, then click "
                    "Interpolate."))
        self.refreshMethods()
        return False

    # --- methods menu (server's models) ----------------------------------------------------------
    def refreshMethods(self) -> None:
        if self._methodsQuery is not None or self._installing:
            return
        server, token, caFile = self._server()
        if server is None:
            try:
                installed = installer.plan_install().empty
            except (installer.LocalProcessingUnavailable, OSError) as exc:
                self._log(str(exc), error=True)
                return
            if not installed:
                self._log(_("The backend's models appear here once the local backend is installed (on first "
                            "Interpolate)."))
                return
        if server:
            self.saveToken()
            self.saveCaFile()
        try:
            self._methodsQuery = self.logic.startAvailableMethods(server, token, caFile)  # a bad CA file is told now
        except InputError as exc:
            self._log(_("Could not list the models: {error}").format(error=exc), error=True)
            return
        if server:
            self._log(_("Contacting {server}...").format(server=server))
        else:
            self._log(_("Starting the local backend and listing its models..."))
        self._timer.start()

    def _checkMethodsQuery(self) -> None:
        query, self._methodsQuery = self._methodsQuery, None
        try:
            methods = query.result()
        except Exception as exc:  # noqa: BLE001 - shown to the user
            message = describe_error(exc, query.target)
            self._log(_("Could not list the models: {error}").format(error=message), error=True)
            return
        self._setMethods(methods)
        server = self._server()[0]
        if server:
            self._rememberServer(server)
        count = len(methods) - 1
        self._log(_("{count} learned model(s) available.").format(count=count))

    # --- run -------------------------------------------------------------------------------------
    def onApplyButton(self) -> None:
        if self._installing or installer.installing():
            return
        if self._run is not None:
            self._run.cancel()
            self.ui.applyButton.enabled = False
            self._log(_("Cancelling..."))
            return
        server, token, caFile = self._server()
        if server is None and not self._ensureLocalBackendInstalled():
            return
        p = self._parameterNode
        method = self._currentMethod()
        options = method_options(method)  # the disabled boxes keep their values: send only the enabled ones
        try:
            self._run = self.logic.start(
                p.inputVolume, p.outputVolume, spacing=p.spacing, method=method,
                steps=(p.steps or None) if "steps" in options else None,
                samples=(p.samples or None) if "samples" in options else None,
                consistency=p.consistency, server=server, token=token,
                showUncertainty=p.showUncertainty, caFile=caFile,
            )
        except Exception as exc:  # noqa: BLE001 - bad input: a clear message, nothing created
            self._log(str(exc), error=True)
            return
        if server:
            self.saveToken()
            self.saveCaFile()
            self._rememberServer(server)
        self.ui.progressBar.setVisible(True)
        self.ui.progressBar.value = 0
        self._log(_("Started: {input} to {spacing:g} mm").format(input=p.inputVolume.GetName(), spacing=p.spacing))
        self._updateButtons()
        self._timer.start()

    def _onTimer(self) -> None:
        if self._methodsQuery is not None and self._methodsQuery.done():
            self._checkMethodsQuery()
        if self._run is not None:
            status = self._run.poll()
            self.ui.progressBar.value = int(100 * status.progress)
            if status.finished:
                self._lastState = None
                self._finishRun()
            elif status.state != self._lastState:  # the log gets stages, the label every update
                self._lastState = status.state
                self._log(status.message)
            else:
                self.ui.statusLabel.text = status.message
        if self._run is None and self._methodsQuery is None:
            self._timer.stop()

    def _finishRun(self) -> None:
        run, self._run = self._run, None
        self.ui.progressBar.setVisible(False)
        try:
            output = self.logic.finish(run)
        except ProcessingError as exc:
            self._log(str(exc), error=run.poll().state == "failed")
        except Exception as exc:  # noqa: BLE001 - e.g. a result on the wrong grid
            self._log(_("The result could not be used: {error}").format(error=exc), error=True)
        else:
            self._lastOutput = output
            slicer.util.resetSliceViews()
            self._log(_("Done: {output} ({seconds:.1f} s)").format(output=output.GetName(),
                                                                  seconds=run.poll().elapsed))
        self._updateButtons()


#
# CTSliceInterpLogic
#
class CTSliceInterpLogic(ScriptedLoadableModuleLogic, InterpolationLogic):
    """Console/scripting API; see ``InterpolationLogic.process`` for the arguments.

    The logic is in ``CTSliceInterpLib.logic.InterpolationLogic`` (Qt-free, tested with pytest on
    slicer-core); this class adds Slicer's parameter node and keeps the GUI painting while a
    blocking ``process`` waits."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        InterpolationLogic.__init__(self)

    def getParameterNode(self):
        return CTSliceInterpParameterNode(super().getParameterNode())

    def process(self, inputVolume, outputVolume=None, spacing=1.0, method=DEFAULT_METHOD, steps=None, samples=None,
                consistency=True, server=None, token=None, blocking=True, progressCallback=None, caFile=None,
                **kwargs):
        def keepPainting(status):
            if progressCallback is not None:
                progressCallback(status)
            slicer.app.processEvents()

        return InterpolationLogic.process(
            self, inputVolume, outputVolume, spacing=spacing, method=method, steps=steps, samples=samples,
            consistency=consistency, server=server, token=token, blocking=blocking,
            progressCallback=keepPainting if blocking else progressCallback, caFile=caFile, **kwargs)


#
# CTSliceInterpTest
#
class CTSliceInterpTest(ScriptedLoadableModuleTest):
    """Runs in Slicer (``slicer_add_python_unittest``, Reload and Test). The checks are the Lib's
    ``CTSliceInterpLib.testing`` functions, the same ones pytest runs on slicer-core.

    Offline on a stock Slicer, and it changes nothing in Slicer's Python: the classical path runs
    in this process (numpy and scipy ship with Slicer), and the local backend is tested only where
    its packages are installed already (otherwise the test says so and passes those parts; it
    never installs, and Slicer's testing mode would skip an install anyway)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        for test in (self.test_BadInputsLeaveSceneUnchanged, self.test_ClassicalInProcess,
                     self.test_BSplineObliqueLocal, self.test_TinyModelLocal):
            self.setUp()
            test()

    def _localProcessingProblem(self):
        """Why the local backend cannot be tested in this Slicer, or None."""
        try:
            plan = installer.plan_install()
        except (installer.LocalProcessingUnavailable, OSError) as exc:
            return str(exc)
        if not plan.empty:
            return "its packages are not installed in this Slicer (the self-test installs nothing)"
        return None

    def _notTested(self, what, reason):
        # Not self.skipTest: runTest() is called directly (Reload and Test), where a SkipTest
        # exception is an error.
        logging.warning("CTSliceInterpTest: %s not tested: %s", what, reason)
        self.delayDisplay(f"{what}: not tested here ({reason})")

    def test_BadInputsLeaveSceneUnchanged(self):
        self.delayDisplay("Bad inputs")
        logic = CTSliceInterpLogic()
        source = testing.add_synthetic_thick_node(slicer.mrmlScene)
        label = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
        slicer.util.updateVolumeFromArray(label, (slicer.util.arrayFromVolume(source) > 0).astype("uint8"))
        before = slicer.mrmlScene.GetNumberOfNodes()
        for inputNode, outputNode, spacing in ((None, None, 1.0), (label, None, 1.0), (source, source, 1.0),
                                               (source, None, 5.0)):
            with self.assertRaises(InputError):
                logic.process(inputNode, outputNode, spacing=spacing)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), before)
        self.assertIs(nodes.first_ct_volume(slicer.mrmlScene), source)

    def test_ClassicalInProcess(self):
        self.delayDisplay("B-spline on an oblique thick volume, in this process (nothing installed)")
        try:
            installer.check_local_python()
        except installer.LocalProcessingUnavailable as exc:
            self._notTested("B-spline in this process", str(exc))
            return
        source = testing.add_synthetic_thick_node(slicer.mrmlScene)
        output = testing.interpolate_in_process(slicer.mrmlScene, source, spacing=1.0, method="bspline")
        self.assertEqual(output.GetName(), "SyntheticThickCT_1mm")
        testing.check_output_geometry(source, output, 1.0)
        testing.check_output_values_bspline(source, output)
        testing.check_layout(slicer.mrmlScene, source, output)
        layoutManager = slicer.app.layoutManager()
        self.assertEqual(layoutManager.layout, layout.SIDE_BY_SIDE)
        rightView = layoutManager.sliceWidget(layout.RIGHT_VIEW).mrmlSliceCompositeNode()
        self.assertEqual(rightView.GetBackgroundVolumeID(), output.GetID())
        self.delayDisplay("B-spline in this process passed")

    def test_BSplineObliqueLocal(self):
        self.delayDisplay("B-spline on an oblique thick volume, local backend")
        problem = self._localProcessingProblem()
        if problem:
            self._notTested("The local backend", problem)
            return
        logic = CTSliceInterpLogic()
        source = testing.add_synthetic_thick_node(slicer.mrmlScene)
        output = logic.process(source, spacing=1.0, method="bspline", timeout=600)
        self.assertEqual(output.GetName(), "SyntheticThickCT_1mm")
        testing.check_output_geometry(source, output, 1.0)
        testing.check_output_values_bspline(source, output)
        testing.check_layout(slicer.mrmlScene, source, output)
        self.delayDisplay("B-spline through the local backend passed")

    def test_TinyModelLocal(self):
        self.delayDisplay("Untrained tiny diffusion model, local backend")
        problem = self._localProcessingProblem()
        if problem:
            self._notTested("The tiny diffusion model", problem)
            return
        import os

        folder = os.path.join(slicer.app.temporaryPath, "CTSliceInterpTest", "tiny")
        if not os.path.isdir(folder):
            os.makedirs(os.path.dirname(folder), exist_ok=True)
            path, reason = testing.make_untrained_tiny_model(folder)
            if path is None:
                self._notTested("The tiny diffusion model", reason)
                return
        backend = LocalBackend(models=[folder])
        logic = CTSliceInterpLogic()
        logic.localBackend = backend
        try:
            source = testing.add_synthetic_thick_node(slicer.mrmlScene, shape=(6, 32, 32), spacing=(0.8, 0.8, 5.0))
            output = logic.process(source, spacing=1.0, method="tiny", steps=2, samples=2, seed=1, timeout=600)
            testing.check_output_geometry(source, output, 1.0)
            testing.check_output_values_plausible(source, output)
            testing.check_layout(slicer.mrmlScene, source, output)
            uncertainty = output.GetNodeReference(UNCERTAINTY_REFERENCE)
            self.assertIsNotNone(uncertainty)
            testing.check_output_geometry(source, uncertainty, 1.0)
        finally:
            backend.stop()
        self.delayDisplay("Tiny model passed")
