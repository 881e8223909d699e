"""The module's logic without Qt: nodes and values in, nodes out.

``CTSliceInterp.CTSliceInterpLogic`` (the class users get in Slicer's Python console) adds
Slicer's parameter-node support on top of this class; everything it does is here, so pytest on
the ``slicer-core`` wheel exercises the same code as the GUI and the Slicer self-test.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

from .backend_path import ensure_backend_importable

ensure_backend_importable()

from ctsliceinterp.core.errors import CTSliceInterpError, InputError  # noqa: E402

from . import layout, nodes  # noqa: E402
from .local_backend import LocalBackend, shared_local_backend  # noqa: E402
from .session import ProcessingSession, ServerTarget, SessionStatus, check_ca_file  # noqa: E402

# The shipped diffusion model: the local backend and `ctsliceinterp serve` serve it as "default".
DEFAULT_METHOD = "default"
CLASSICAL_FALLBACK = "bspline"
# Same as ctsliceinterp.core.classical.CLASSICAL_METHODS (a test keeps them equal); not imported from
# there because that module needs scipy, and the Lib must import with numpy only (Remote mode).
CLASSICAL_METHODS = ("linear", "bspline", "lanczos")
DIFFUSION_METHOD = "diffusion"


class ProcessingError(CTSliceInterpError):
    """A run failed or was cancelled; the message is meant for the user."""


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


def job_parameters(method: str, spacing: float, steps=None, samples: int = 1, consistency: bool = True,
                   seed=None) -> dict:
    """Server job parameters. ``method`` is a classical method name, ``"diffusion"`` (the
    server's default model) or the name of one of the server's diffusion models."""
    method = (method or DEFAULT_METHOD).strip()
    params = {"spacing": float(spacing)}
    if method.lower() in CLASSICAL_METHODS:
        params["method"] = method.lower()
        return params
    params["method"] = DIFFUSION_METHOD
    if method.lower() != DIFFUSION_METHOD:
        params["model"] = method
    if steps:
        params["steps"] = int(steps)
    samples = 1 if samples is None else int(samples)
    if samples < 1:
        raise InputError(f"the number of samples must be at least 1, got {samples}")
    params["samples"] = samples
    params["consistency"] = bool(consistency)
    if seed is not None:
        params["seed"] = int(seed)
    return params


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

    def stopLocalBackend(self) -> None:
        if self.localBackend is not None:
            self.localBackend.stop()

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
              steps=None, samples: int = 1, consistency: bool = True, server: Optional[str] = None,
              token: Optional[str] = None, seed=None, showResult: bool = True, showUncertainty: bool = True,
              caFile: Optional[str] = None) -> Run:
        """Check the inputs and start a run in the background; returns at once.

        Bad input raises ``InputError`` here, before anything is sent or created."""
        if outputVolume is not None and inputVolume is not None and outputVolume.GetID() == inputVolume.GetID():
            raise InputError("the output volume is the input volume: choose a new output so the input is kept")
        if outputVolume is not None and (
            not outputVolume.IsA("vtkMRMLScalarVolumeNode") or outputVolume.IsA("vtkMRMLLabelMapVolumeNode")
        ):
            raise InputError(f"the output '{outputVolume.GetName()}' must be a scalar volume")
        volume, target = nodes.prepare_input(inputVolume, spacing)
        params = job_parameters(method, spacing, steps, samples, consistency, seed)
        where = self.serverTarget(server, token, caFile)
        session = ProcessingSession(volume, params, where, expected=target).start()
        return Run(session, inputVolume, outputVolume, float(spacing), showResult, showUncertainty)

    def finish(self, run: Run):
        """On the GUI thread, once the run has finished: make the output node(s); return the output.

        Raises ``ProcessingError`` when the run failed or was cancelled (no node is created)."""
        status = run.poll()
        if not status.finished:
            raise RuntimeError("the run has not finished yet")
        if status.state == "cancelled":
            raise ProcessingError("cancelled: nothing was created and the input is unchanged")
        if status.state == "failed":
            raise ProcessingError(status.error or status.message)
        thin, uncertainty = run.session.result
        scene = run.input_node.GetScene() or self.scene
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
            output.SetNodeReferenceID("CTSliceInterpUncertainty", uncertainty_node.GetID())
        if run.show_result:
            layout.show_side_by_side(scene, run.input_node, output, uncertainty_node, run.show_uncertainty)
        logging.info("CTSliceInterp: %s -> %s in %.1f s", run.input_node.GetName(), output.GetName(), status.elapsed)
        return output

    def process(self, inputVolume, outputVolume=None, spacing: float = 1.0, method: str = DEFAULT_METHOD,
                steps=None, samples: int = 1, consistency: bool = True, server: Optional[str] = None,
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
                         caFile: Optional[str] = None):
        """[(label, method)] for the method menu: B-spline plus the server's diffusion models
        (blocking: call it from a worker thread in the GUI)."""
        methods = [("B-spline (classical)", CLASSICAL_FALLBACK)]
        target = self.serverTarget(server, token, caFile)
        target.timeout = timeout  # per request; a local backend's start-up has its own limit
        client = target.connect()
        for model in client.models():
            if model.get("kind", DIFFUSION_METHOD) == DIFFUSION_METHOD:
                methods.append((f"{model['name']} (diffusion, {model.get('device', '?')})", model["name"]))
        return methods
