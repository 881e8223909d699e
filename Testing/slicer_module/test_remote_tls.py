"""Remote mode over HTTPS with a self-signed certificate: the Lib against a REAL server on
127.0.0.1 (uvicorn with TLS, in a thread of this process), trusted through ``caFile``."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from CTSliceInterpLib import logic, testing
from CTSliceInterpLib.session import describe_error
from ctsliceinterp.core.errors import InputError

pytest.importorskip("fastapi", reason="the server extra (fastapi, uvicorn) is not installed")
pytest.importorskip("uvicorn", reason="the server extra (fastapi, uvicorn) is not installed")

# The server tests' fixture, imported from its file (Testing/server is on sys.path only when
# that folder is collected; the module name stays the same either way).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
from live_server import TOKEN, self_signed_certificate, start_server  # noqa: E402,F401 - fixture


@pytest.fixture
def tls_server(start_server, tmp_path):
    """(server, its certificate): HTTPS with a self-signed certificate and a token."""
    cert, key = self_signed_certificate(tmp_path)
    server = start_server(ssl_certfile=str(cert), ssl_keyfile=str(key), token=TOKEN)
    assert server.url.startswith("https://")
    return server, cert


def _scene_node_ids(scene):
    return sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes()))


def _nothing_received(server) -> bool:
    counts = server.manager.counts()
    return counts["held"] == 0 and counts["completed"] == 0


def test_round_trip_with_ca_file_keeps_geometry(scene, tls_server):
    server, cert = tls_server
    interp = logic.InterpolationLogic(scene=scene)
    methods = [value for _label, value in interp.availableMethods(server.url, TOKEN, caFile=str(cert))]
    assert methods == ["bspline"]  # the menu came over TLS (this server has no diffusion model)
    source = testing.add_synthetic_thick_node(scene)

    output = interp.process(source, spacing=1.0, method="bspline", server=server.url, token=TOKEN,
                            caFile=str(cert), timeout=60)

    assert output.GetName() == "SyntheticThickCT_1mm"
    testing.check_output_geometry(source, output, 1.0)  # oblique direction, origin, 1 mm slices
    testing.check_output_values_bspline(source, output)
    assert server.manager.counts()["completed"] == 1


def test_without_ca_file_the_message_names_the_certificate(scene, tls_server):
    server, _cert = tls_server
    interp = logic.InterpolationLogic(scene=scene)
    source = testing.add_synthetic_thick_node(scene)
    before = _scene_node_ids(scene)

    with pytest.raises(logic.ProcessingError) as caught:
        interp.process(source, spacing=1.0, method="bspline", server=server.url, token=TOKEN, timeout=60)

    message = str(caught.value)
    assert "certificate" in message and "not trusted" in message, message
    assert "'CA certificate' in the module's Remote settings" in message, message  # what to do about it
    assert _scene_node_ids(scene) == before
    assert _nothing_received(server)
    # The model list (the GUI's Check connection) fails the same way and is described the same way.
    with pytest.raises(Exception) as listing:
        interp.availableMethods(server.url, TOKEN)
    assert "'CA certificate'" in describe_error(listing.value, interp.serverTarget(server.url, TOKEN))


def test_wrong_ca_file_names_that_file(scene, tls_server, tmp_path):
    server, _cert = tls_server
    other, _key = self_signed_certificate(tmp_path, name="other")
    interp = logic.InterpolationLogic(scene=scene)
    source = testing.add_synthetic_thick_node(scene)
    with pytest.raises(logic.ProcessingError, match=f"not trusted by the CA certificate {re.escape(str(other))}"):
        interp.process(source, spacing=1.0, method="bspline", server=server.url, token=TOKEN, caFile=str(other),
                       timeout=60)
    assert _nothing_received(server)


def test_missing_ca_file_is_an_input_error_naming_the_path(scene, tls_server, tmp_path):
    server, _cert = tls_server
    interp = logic.InterpolationLogic(scene=scene)
    source = testing.add_synthetic_thick_node(scene)
    before = _scene_node_ids(scene)
    missing = tmp_path / "no-such-ca.pem"

    # Raised by start() itself, before a session exists: nothing is sent or created.
    with pytest.raises(InputError, match=f"{re.escape(str(missing))} does not exist"):
        interp.start(source, spacing=1.0, method="bspline", server=server.url, token=TOKEN, caFile=str(missing))
    with pytest.raises(InputError, match=re.escape(str(missing))):
        interp.process(source, spacing=1.0, method="bspline", server=server.url, token=TOKEN, caFile=str(missing))
    with pytest.raises(InputError, match=re.escape(str(missing))):
        interp.availableMethods(server.url, TOKEN, caFile=str(missing))
    assert _scene_node_ids(scene) == before
    assert _nothing_received(server)


@pytest.mark.parametrize("kind", ["not PEM", "folder"])
def test_unusable_ca_file_is_an_input_error(scene, tls_server, tmp_path, kind):
    server, _cert = tls_server
    if kind == "folder":
        path, expected = tmp_path, "is a folder"
    else:
        path, expected = tmp_path / "ca.pem", "holds no usable PEM certificate"
        path.write_text("this is not a certificate\n")
    interp = logic.InterpolationLogic(scene=scene)
    source = testing.add_synthetic_thick_node(scene)
    with pytest.raises(InputError, match=f"{re.escape(str(path))} {expected}"):
        interp.start(source, spacing=1.0, method="bspline", server=server.url, token=TOKEN, caFile=str(path))
    assert _nothing_received(server)


def test_ca_file_is_ignored_for_the_local_backend(tmp_path):
    backend = object()
    interp = logic.InterpolationLogic(local_backend_factory=lambda: backend)
    target = interp.serverTarget(None, None, caFile=str(tmp_path / "no-such-ca.pem"))
    assert target.local is backend and target.ca_file is None
