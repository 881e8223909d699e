"""The client against servers that lie, stall, reset or refuse (issue 16, points 4 and 5).

Each fault is real and local: a raw fake server on 127.0.0.1 (wrong shapes, a Content-Length of
10^12, a gzip bomb, slow drips, an unknown job state), and a proxy that resets an upload in
front of a real server. Every test is bounded in time and in requests."""

from __future__ import annotations

import json
import threading
import time
import tracemalloc
import zlib

import numpy as np
import pytest

from ctsliceinterp.api import InterpolationRequest, target_geometry
from ctsliceinterp.serving.client import Client, ClientError, JobProgress, ServerBusy, ServerUnreachable
from ctsliceinterp.serving.nrrd_bytes import volume_to_nrrd_bytes
from fake_server import BreakingProxy, FakeServer, send_response
from live_server import start_server  # noqa: F401 - fixture

JOB = "J" * 32
MiB = 1024 * 1024


@pytest.fixture
def fake():
    servers = []

    def _start(handler):
        server = FakeServer(handler)
        servers.append(server)
        return server

    yield _start
    for server in servers:
        server.stop()


def thick_volume(make_volume):
    return make_volume(shape=(8, 64, 64)).replace(slice_thickness=5.0)  # 5 mm -> 36 slices at 1 mm


def job_server(result_for, state: str = "done", then_failed_after: int = 0):
    """A fake server that accepts any job and answers every status with ``state`` (or, after
    ``then_failed_after`` polls, "failed", which bounds today's client); ``result_for(request)``
    writes the result response."""
    polls = [0]

    def handler(request):
        if request.method == "POST":
            request.read_body()
            request.send_json(202, {"id": JOB, "state": "queued"})
        elif request.method == "GET" and "/result" in request.path:
            result_for(request)
        elif request.method == "GET":
            polls[0] += 1
            now = "failed" if then_failed_after and polls[0] > then_failed_after else state
            request.send_json(200, {"id": JOB, "state": now, "stage": state, "done": 0, "total": 0, "parts": ["volume"],
                                    "progress": 0.0, "queue_position": 0, "eta_seconds": None, "error": None})
        elif request.method == "DELETE":
            request.send_json(200, {"id": JOB, "state": "cancelled"})

    return handler


# --- 5. the result is checked against the request ----------------------------------------------
def test_a_result_of_the_wrong_shape_is_refused(fake, make_volume, tmp_path, capsys):
    thick = thick_volume(make_volume)
    wrong = make_volume(shape=(3, 8, 8), dtype=np.float32)
    server = fake(job_server(lambda r: r.send(200, volume_to_nrrd_bytes(wrong, gzip=False))))
    with pytest.raises(ClientError, match="shape"):
        Client(server.url, retries=0).run(thick, {"method": "bspline", "spacing": 1.0}, poll_interval=0.05)

    # The command line exits non-zero with one line, and writes nothing.
    pytest.importorskip("SimpleITK")
    from ctsliceinterp.cli import main
    from ctsliceinterp.io import write_volume

    source, out = tmp_path / "thick.nrrd", tmp_path / "thin.nrrd"
    write_volume(thick, str(source))
    assert main(["interpolate", str(source), "-o", str(out), "--server", server.url, "--method", "bspline", "--no-progress"]) != 0
    assert "shape" in capsys.readouterr().err
    assert not out.exists()


def test_a_result_with_shifted_geometry_is_refused(fake, make_volume):
    thick = thick_volume(make_volume)
    expected = target_geometry(thick, InterpolationRequest(method="bspline", spacing=1.0))
    moved = make_volume(shape=expected.shape, spacing=expected.spacing, origin=tuple(np.add(expected.origin, (0, 0, 50.0))), dtype=np.float32)
    server = fake(job_server(lambda r: r.send(200, volume_to_nrrd_bytes(moved, gzip=False))))
    with pytest.raises(ClientError, match="geometry"):
        Client(server.url, retries=0).run(thick, {"method": "bspline", "spacing": 1.0}, poll_interval=0.05)


# --- 5. results are bounded ------------------------------------------------------------------
def test_a_content_length_of_a_terabyte_is_refused_before_allocating(fake, make_volume):
    def huge(request):
        request.sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-nrrd\r\nContent-Length: 1000000000000\r\n\r\nNRRD0004\n")

    server = fake(job_server(huge))
    tracemalloc.start()
    try:
        start = time.monotonic()
        with pytest.raises(ClientError, match="larger|bytes"):
            Client(server.url, retries=0, timeout=5).run(thick_volume(make_volume), {"method": "bspline"}, poll_interval=0.05)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.monotonic() - start < 5
    assert peak < 32 * MiB


def test_a_gzip_bomb_result_is_refused_before_inflating(fake, make_volume):
    """The header declares 1 GiB of float voxels; the body holds 64 KiB of compressed zeros
    (64 MiB inflated). Refused from the header, without inflating anything."""
    header = (b"NRRD0004\ntype: float\ndimension: 3\nspace: left-posterior-superior\nsizes: 1024 1024 256\n"
              b"space directions: (1,0,0) (0,1,0) (0,0,1)\nkinds: domain domain domain\nendian: little\n"
              b"encoding: gzip\nspace origin: (0,0,0)\n\n")
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    payload = compressor.compress(bytes(64 * MiB)) + compressor.flush()
    server = fake(job_server(lambda r: r.send(200, header + payload, {"Content-Type": "application/x-nrrd"})))
    tracemalloc.start()
    try:
        with pytest.raises(ClientError):
            Client(server.url, retries=0, compress=True).run(thick_volume(make_volume), {"method": "bspline"}, poll_interval=0.05)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 * MiB  # today's client inflates it: 128 MiB at the peak


# --- 5. every call has a deadline --------------------------------------------------------------
def test_a_slow_drip_download_hits_the_call_deadline(fake, make_volume):
    thick = thick_volume(make_volume)
    good = volume_to_nrrd_bytes(make_volume(shape=(36, 64, 64), spacing=thick.spacing[:2] + (1.0,), origin=thick.origin, dtype=np.float32), gzip=False)

    def drip(request):  # 1 KiB every 0.1 s (10 KiB/s) of a 590 KB result, for at most 15 s
        request.sock.sendall(f"HTTP/1.1 200 OK\r\nContent-Type: application/x-nrrd\r\nContent-Length: {len(good)}\r\n\r\n".encode())
        end = time.monotonic() + 15
        for start in range(0, len(good), 1024):
            if time.monotonic() > end:
                return False
            request.sock.sendall(good[start:start + 1024])
            time.sleep(0.1)
        return False

    server = fake(job_server(drip))
    client = Client(server.url, retries=0, timeout=2, min_rate=256 * 1024)
    start = time.monotonic()
    with pytest.raises(ServerUnreachable, match="deadline|timed out"):
        client.run(thick, {"method": "bspline", "spacing": 1.0}, poll_interval=0.05)
    assert time.monotonic() - start < 10  # timeout + 590 KB at the minimum rate, not the drip's 15 s


def test_a_status_dripping_its_headers_hits_the_call_deadline(fake):
    def drip(request):
        for byte in b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Slow: " + b"a" * 100:
            request.sock.sendall(bytes([byte]))
            time.sleep(0.2)
        return False

    server = fake(drip)
    start = time.monotonic()
    with pytest.raises(ServerUnreachable):
        Client(server.url, retries=0, timeout=1).status(JOB)
    assert time.monotonic() - start < 4  # one byte per 0.2 s never trips a per-read timeout


def test_a_server_that_goes_silent_after_the_upload_cannot_hold_run(fake, make_volume):
    """The job is accepted, then status requests are read and never answered (a wedged server):
    each one ends at the client's socket timeout, so ``run`` raises instead of waiting for ever,
    whatever its job deadline."""
    released = threading.Event()

    def silent_after_submit(request):
        if request.method == "POST":
            request.read_body()
            request.send_json(202, {"id": JOB, "state": "queued"})
            return None
        released.wait(15)  # holds the connection open, answering nothing
        return False

    server = fake(silent_after_submit)
    start = time.monotonic()
    try:
        with pytest.raises(ServerUnreachable, match="deadline|timed out"):
            Client(server.url, retries=1, timeout=1, backoff=0.1).run(
                thick_volume(make_volume), {"method": "bspline"}, poll_interval=0.5, deadline=3600)
        assert time.monotonic() - start < 8  # two status attempts and one DELETE, about 1.5 s each
        assert server.count("GET", "/v1/jobs/") == 2 and server.count("DELETE") == 1
    finally:
        released.set()


def test_an_unknown_job_state_is_an_error_not_a_poll_forever(fake, make_volume):
    server = fake(job_server(lambda r: r.send(500), state="paused", then_failed_after=50))
    with pytest.raises(ClientError, match="paused"):
        Client(server.url, retries=0).run(thick_volume(make_volume), {"method": "bspline"}, poll_interval=0.05)
    assert server.count("GET", "/v1/jobs/") <= 2


def test_a_job_that_never_finishes_hits_the_job_deadline(fake, make_volume):
    server = fake(job_server(lambda r: r.send(500), state="running"))
    start = time.monotonic()
    with pytest.raises(ClientError, match="deadline|did not finish"):
        Client(server.url, retries=0).run(thick_volume(make_volume), {"method": "bspline"}, poll_interval=0.05, deadline=1.0)
    assert time.monotonic() - start < 4
    assert server.count("DELETE") == 1  # the abandoned job is cancelled on the server


# --- 4. a refusal reaches the client, and an interrupted upload is sent again ------------------
def test_a_full_server_refuses_before_the_body_is_sent(fake, make_volume):
    """The client asks ``Expect: 100-continue``; a server that refuses at once (503) gets no body
    bytes, and the client sees ServerBusy, not a reset."""

    def refuse(request):
        send_response(request.sock, 503, b'{"error": "the job queue is full"}', {"Retry-After": "2", "Content-Type": "application/json"})
        request.read_body(limit=0.5)  # count what arrives after the answer
        return False

    server = fake(refuse)
    big = make_volume(shape=(32, 128, 128), dtype=np.float32)  # 2 MiB
    with pytest.raises(ServerBusy) as info:
        Client(server.url, retries=0, compress=False).submit(big, {})
    assert info.value.retry_after == 2
    assert server.requests[0].headers.get("expect", "").lower() == "100-continue"
    assert server.requests[0].body_bytes == 0


def test_an_upload_reset_midway_is_sent_again(start_server, make_volume):
    """A proxy resets the first upload after 1 MiB, while the client is still sending: no job can
    exist (the server makes one only from a whole body), so the client sends it again instead of
    failing."""
    server = start_server(max_upload_bytes=64 * MiB)
    proxy = BreakingProxy(server.port, should_break=lambda index: index == 0, after_bytes=MiB)
    try:
        thick = make_volume(shape=(6, 1024, 1024), dtype=np.float32)  # 24 MiB raw: more than the socket buffers hold
        thin, _ = Client(proxy.url, retries=2, backoff=0.05, compress=False).run(thick, {"method": "linear", "spacing": 2.5}, poll_interval=0.1)
        assert thin.shape[0] == 11 and proxy.broken == 1
    finally:
        proxy.stop()


# --- the progress event the Slicer widget shows ---------------------------------------------------
def test_run_reports_stage_fraction_queue_position_eta_and_a_message(start_server, make_volume):
    server = start_server(step_delay_seconds=0.05)
    client = Client(server.url)
    blocker = client.submit(make_volume(shape=(6, 32, 32)), {"method": "lanczos"})
    events: list = []
    thin, _ = client.run(make_volume(shape=(6, 32, 32)), {"method": "lanczos", "spacing": 2.5}, progress=events.append, poll_interval=0.05)
    assert thin.shape[0] == 11
    assert all(isinstance(e, JobProgress) and e.message for e in events)
    states = [e.state for e in events]
    assert states[0] == "uploading" and states[-1] == "done" and "running" in states and "downloading" in states
    queued = [e for e in events if e.state == "queued"]
    assert queued and queued[0].queue_position == 1 and "queue" in queued[0].message
    running = [e for e in events if e.state == "running"]
    assert all(0.0 <= e.fraction <= 1.0 for e in events) and running[-1].stage
    assert events[-1].fraction == 1.0
    assert all(e.job_id for e in events[1:])
    client.cancel(blocker) if client.status(blocker)["state"] != "done" else client.result(blocker)
    json.dumps([e.as_dict() for e in events])  # plain data, for a GUI thread or a log
