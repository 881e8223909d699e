"""Qt-free logic of the CTSliceInterp Slicer module (importable with the slicer-core wheel).

- ``backend_path``: where the bundled backend source is; makes ``import ctsliceinterp`` work.
- ``nodes``: volume nodes <-> ``Volume`` (the one RAS/LPS conversion), input checks, output nodes.
- ``local_backend``: the ``ctsliceinterp serve`` child process on 127.0.0.1.
- ``session``: one job run off the GUI thread, polled from a timer.
- ``layout``: side-by-side linked review of input and output.
- ``installer``: what local processing needs in Slicer's Python, and installing it.
- ``logic``: ``InterpolationLogic`` (``process``, ``start``/``finish``) used by the module.
"""
