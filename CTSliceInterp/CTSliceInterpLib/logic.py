"""The module's logic without Qt: nodes and values in, nodes out.

``CTSliceInterp.CTSliceInterpLogic`` (the class users get in Slicer's Python console) adds
Slicer's parameter-node support on top of this class; everything it does is here, so pytest on
the ``slicer-core`` wheel exercises the same code as the GUI and the Slicer self-test.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable, Optional

from .backend_path import ensure_backend_importable

ensure_backend_importable()

# The request contract and the method registry (numpy only: no torch, no scipy).
from ctsliceinterp.api import (  # noqa: E402
    CLASSICAL_FALLBACK,
    DIFFUSION_METHOD,
    METHODS,
    RESIDUAL_DIFFUSION_METHOD,
    InterpolationRequest,
)
from ctsliceinterp.api import DEFAULT_METHOD as BACKEND_DEFAULT_METHOD  # noqa: E402
from ctsliceinterp.core.errors import CTSliceInterpError, InputError  # noqa: E402

from . import installer, layout, nodes  # noqa: E402
from .i18n import tr as _  # noqa: E402
from .local_backend import LocalBackend, shared_local_backend  # noqa: E402
from .session import ProcessingSession, ServerTarget, SessionStatus, check_ca_file  # noqa: E402

# The menu's default choice: the backend's default method (its shipped model), which the local
# backend and `ctsliceinterp serve` serve by default.
DEFAULT_METHOD = BACKEND_DEFAULT_METHOD
UNCERTAINTY_REFERENCE = "CTSliceInterpUncertainty"


class ProcessingError(CTSliceInterpError):
    """A run failed or was cancelled; the message is meant for the user."""


def classical_choice() -> tuple:
    """The method menu's classical entry: (translated label, method)."""
    return _("B-spline (classical)"), CLASSICAL_FALLBACK


@dataclass
class Run:
    """A started interpolation: the session plus what is needed to make its nodes."""

    session: ProcessingSession
    input_node: object
    output_node: object
    spacing: float
    show_result: bool = True
    show_uncertainty: bool = True

    def poll(self) -> SessionStatus:
        return self.session.poll()

    def cancel(self) -> None:
        self.session.cancel()


def _menu_method(method: str) -> str:
    """The registry method of a menu choice (a method, or the name of a server's diffusion model)."""
    choice = (method or DEFAULT_METHOD).strip().lower()
    return choice if choice in METHODS else DIFFUSION_METHOD


def method_options(method: str) -> tuple:
    """The request options a menu choice takes (from the registry): the widget enables those."""
    return METHODS[_menu_method(method)].options


def samples_help(method: str) -> str:
    """What the Samples box gives for a menu choice (its tooltip): which output is which."""
    name = _menu_method(method)
    if name == RESIDUAL_DIFFUSION_METHOD:
        return _("Posterior mean (default): the posterior-mean estimate, the most faithful output. 1: one "
                 "realistic sample (its texture is invented). 2 or more: the mean of that many samples, with "
                 "their spread (in HU) as an uncertainty map. The spread shows where samples disagree; it "
                 "ranks the error but is several times smaller than it, so it is not an error bar.")
    if "samples" in METHODS[name].options:
        return _("Default: one sample. 2 or more: the mean of that many samples, with their spread (in HU) as an "
                 "uncertainty map.")
    return _("This method takes no samples.")


def samples_default_label(method: str) -> str:
    """The Samples box's text at 0 (the request leaves samples to the method) for a menu choice."""
    if _menu_method(method) == RESIDUAL_DIFFUSION_METHOD:
        return _("Posterior mean (default)")
    return _("1 sample (default)")


def menu_label(name: str, method: str, device: str) -> str:
    """A server model's method menu entry; residual diffusion says which output is which."""
    if method == RESIDUAL_DIFFUSION_METHOD:  # one whole sentence per string, so translators see it all
        text = _("{name} ({method}, {device}): posterior mean by default; Samples 1: one realistic sample")
    else:
        text = _("{name} ({method}, {device})")
    return text.format(name=name, method=method, device=device)


def job_request(method: str, spacing: float, steps=None, samples: Optional[int] = None, consistency: bool = True,
                seed=None) -> InterpolationRequest:
    """The request for a menu choice: ``method`` is a method of the backend's registry
    (``bspline``, ``diffusion`` = the server's default diffusion model, ...) or the name of one of
    the server's diffusion models. ``samples`` None: the method's default output (residual_diffusion:
    the posterior mean). An option the method does not take is refused (``InputError``), not dropped:
    the widget sends only those of the boxes it enables."""
    choice = (method or DEFAULT_METHOD).strip()
    name, model = (choice.lower(), None) if choice.lower() in METHODS else (DIFFUSION_METHOD, choice)
    if samples is not None and int(samples) < 1:
        raise InputError(_("the number of samples must be at least 1, got {samples}").format(samples=samples))
    options = {"steps": int(steps) if steps else None, "samples": None if samples is None else int(samples),
               "seed": None if seed is None else int(seed)}
    if not METHODS[name].classical:  # classical methods keep their textbook meaning: no correction by default
        options["consistency"] = bool(consistency)
    return InterpolationRequest(method=name, spacing=float(spacing), model=model, **options)


def job_parameters(method: str, spacing: float, steps=None, samples: Optional[int] = None, consistency: bool = True,
                   seed=None) -> dict:
    """Server job parameters for a menu choice (``job_request(...).to_params()``)."""
    return job_request(method, spacing, steps, samples, consistency, seed).to_params()


class MethodsQuery:
    """``availableMethods`` on a daemon thread (it may start the local backend): the GUI polls
    ``done()``; ``cancel()`` stops its waits; it never holds up Slicer's exit."""

    def __init__(self, logic: "InterpolationLogic", server=None, token=None, caFile=None, timeout: float = 10.0):
        self._cancel = threading.Event()
        self._result = None
        self._error: Optional[BaseException] = None
        self._done = threading.Event()
        self.target = logic.serverTarget(server, token, caFile)  # a bad CA file raises here, at once
        self._thread = threading.Thread(target=self._work, args=(logic, timeout), name="CTSliceInterpMethods",
                                        daemon=True)
        self._thread.start()

    def _work(self, logic, timeout) -> None:
        try:
            self._result = logic._methods_of(self.target, timeout, self._cancel)
        except BaseException as exc:  # noqa: BLE001 - handed to the GUI thread by result()
            self._error = exc
        finally:
            self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        return self._done.wait(timeout)

    def cancel(self) -> None:
        self._cancel.set()

    def result(self):
        """[(label, method)] once done; raises what the query raised."""
        if not self._done.is_set():
            raise RuntimeError("the model list has not arrived yet")
        if self._error is not None:
            raise self._error
        return self._result


class InterpolationLogic:
    """Runs interpolations for Slicer volume nodes through the backend server (local or remote)."""

    def __init__(self, scene=None, local_backend_factory: Callable[[], LocalBackend] = shared_local_backend):
        self._scene = scene
        self._local_backend_factory = local_backend_factory
        self.localBackend: Optional[LocalBackend] = None

    @property
    def scene(self):
        if self._scene is not None:
            return self._scene
        import slicer

        return slicer.mrmlScene

    # --- backends -------------------------------------------------------------------------
    def getLocalBackend(self) -> LocalBackend:
        if self.localBackend is None:
            self.localBackend = self._local_backend_factory()
        return self.localBackend

    def serverTarget(self, server: Optional[str] = None, token: Optional[str] = None,
                     caFile: Optional[str] = None) -> ServerTarget:
        """The local backend (``server`` empty) or the server at ``server``. ``caFile``: a PEM file
        with the server's certificate or its CA, for a self-signed or private-CA certificate
        (ignored for the local backend); a missing or unusable file raises ``InputError``."""
        if server:
            caFile = (caFile or "").strip()
            return ServerTarget(url=server.strip(), token=token, ca_file=check_ca_file(caFile) if caFile else None)
        return ServerTarget(local=self.getLocalBackend())

    # --- processing -----------------------------------------------------------------------
    def start(self, inputVolume, outputVolume=None, spacing: float = 1.0, method: str = DEFAULT_METHOD,
              steps=None, samples: Optional[int] = None, consistency: bool = True, server: Optional[str] = None,
              token: Optional[str] = None, seed=None, showResult: bool = True, showUncertainty: bool = True,
              caFile: Optional[str] = None) -> Run:
        """Check the inputs and start a run in the background; returns at once.

        Bad input raises ``InputError`` here, before anything is sent or created."""
        if outputVolume is not None and inputVolume is not None and outputVolume.GetID() == inputVolume.GetID():
            raise InputError(_("the output volume is the input volume: choose a new output so the input is kept"))
        if outputVolume is not None and (
            not outputVolume.IsA("vtkMRMLScalarVolumeNode") or outputVolume.IsA("vtkMRMLLabelMapVolumeNode")
        ):
            raise InputError(_("the output '{name}' must be a scalar volume").format(name=outputVolume.GetName()))
        volume, target = nodes.prepare_input(inputVolume, spacing)
        params = job_parameters(method, spacing, steps, samples, consistency, seed)
        if not server:
            self._check_local_processing()
        where = self.serverTarget(server, token, caFile)
        session = ProcessingSession(volume, params, where, expected=target).start()
        return Run(session, inputVolume, outputVolume, float(spacing), showResult, showUncertainty)

    @staticmethod
    def _check_local_processing() -> None:
        if installer.installing():
            raise InputError(_("the local backend is being installed: wait until that finishes"))
        try:
            installer.check_local_python()
        except installer.LocalProcessingUnavailable as exc:
            raise InputError(str(exc)) from None

    def finish(self, run: Run):
        """On the GUI thread, once the run has finished: make the output node(s); return the output.

        Raises ``ProcessingError`` when the run failed or was cancelled (no node is created)."""
        status = run.poll()
        if not status.finished:
            raise RuntimeError("the run has not finished yet")
        if status.state == "cancelled":
            raise ProcessingError(_("cancelled: nothing was created and the input is unchanged"))
        if status.state == "failed":
            raise ProcessingError(status.error or status.message)
        # The widget cancels a run when the scene closes; a console run, or a node deleted during
        # the run, is caught here (a Python observer on the scene could outlive it).
        if run.input_node.GetScene() is None:
            raise ProcessingError(_("the input volume was removed (or the scene closed) during the run: nothing "
                                    "was created"))
        if run.output_node is not None and run.output_node.GetScene() is None:
            raise ProcessingError(_("the output volume was removed during the run: nothing was created"))
        thin, uncertainty = run.session.result
        scene = run.input_node.GetScene()
        name = nodes.output_name(run.input_node.GetName(), run.spacing)
        output = nodes.write_output(scene, run.input_node, thin, run.output_node, name=name,
                                    expected=run.session.expected)
        uncertainty_node = None
        if uncertainty is not None:
            try:
                uncertainty_node = nodes.write_output(scene, run.input_node, uncertainty, None,
                                                      name=f"{name}_uncertainty", expected=run.session.expected,
                                                      copy_display_from_input=False)
            except Exception:
                if run.output_node is None:
                    nodes.remove_node(scene, output)
                raise
            output.SetNodeReferenceID(UNCERTAINTY_REFERENCE, uncertainty_node.GetID())
        if run.show_result:
            layout.show_side_by_side(scene, run.input_node, output, uncertainty_node, run.show_uncertainty)
        logging.info("CTSliceInterp: %s -> %s in %.1f s", run.input_node.GetName(), output.GetName(), status.elapsed)
        return output

    def process(self, inputVolume, outputVolume=None, spacing: float = 1.0, method: str = DEFAULT_METHOD,
                steps=None, samples: Optional[int] = None, consistency: bool = True, server: Optional[str] = None,
                token: Optional[str] = None, blocking: bool = True,
                progressCallback: Optional[Callable[[SessionStatus], None]] = None, seed=None,
                showResult: bool = True, timeout: Optional[float] = None, caFile: Optional[str] = None):
        """Interpolate ``inputVolume`` onto ``spacing`` mm slices.

        ``server=None`` runs on the local backend (started on first use and kept warm);
        ``server="https://host:8000"`` (with ``token``, and ``caFile`` for a self-signed or
        private-CA certificate) runs remotely. With ``blocking=True``
        (console, scripts) it waits and returns the output node; with ``blocking=False`` it
        returns a ``Run`` to poll (``run.poll()``) and hand to ``finish(run)`` once finished."""
        run = self.start(inputVolume, outputVolume, spacing, method, steps, samples, consistency, server, token,
                         seed, showResult, caFile=caFile)
        if not blocking:
            return run
        try:
            run.session.wait(timeout=timeout, progress=progressCallback)
        except BaseException:
            run.cancel()
            raise
        return self.finish(run)

    def availableMethods(self, server: Optional[str] = None, token: Optional[str] = None, timeout: float = 10.0,
                         caFile: Optional[str] = None, cancel: Optional[threading.Event] = None):
        """[(label, method)] for the method menu: B-spline plus the server's diffusion models
        (blocking: the GUI uses ``startAvailableMethods``). ``cancel`` stops a local backend's
        start-up wait."""
        return self._methods_of(self.serverTarget(server, token, caFile), timeout, cancel)

    def startAvailableMethods(self, server: Optional[str] = None, token: Optional[str] = None,
                              caFile: Optional[str] = None, timeout: float = 10.0) -> MethodsQuery:
        """``availableMethods`` in the background; poll ``done()``, then ``result()``."""
        if not server:
            self._check_local_processing()
        return MethodsQuery(self, server, token, caFile, timeout)

    @staticmethod
    def _methods_of(target: ServerTarget, timeout: float, cancel: Optional[threading.Event]):
        methods = [classical_choice()]
        target.timeout = timeout  # per request; a local backend's start-up has its own limit
        client = target.connect(cancel)
        for model in client.models():
            method = model.get("method") or model.get("kind") or DIFFUSION_METHOD
            if method not in METHODS or METHODS[method].classical:
                continue  # B-spline is listed already; a method this Lib does not know is not offered
            value = model["name"] if method == DIFFUSION_METHOD else method
            methods.append((menu_label(model["name"], method, model.get("device", "?")), value))
        return methods

    def showUncertainty(self, outputVolume, visible: bool = True) -> bool:
        """Show or hide the uncertainty overlay of ``outputVolume`` (a result of ``process``) in
        the right view; False when it has no uncertainty volume."""
        uncertainty = outputVolume.GetNodeReference(UNCERTAINTY_REFERENCE) if outputVolume is not None else None
        if uncertainty is None:
            return False
        layout.show_uncertainty(outputVolume.GetScene() or self.scene, uncertainty, visible)
        return True
