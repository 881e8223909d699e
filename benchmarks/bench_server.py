"""Robustness figures for the inference server: load, fuzzing, overhead. Loopback only.

    .venv/bin/python benchmarks/bench_server.py [--json out.json] [--quick]

1. Load: 20 concurrent clients x 3 jobs each against a real `ctsliceinterp serve` process.
   Every result is checked against the in-process result; the server's resident memory is read
   from /proc before, during (peak) and after.
2. Fuzzing: hypothesis against `volume_from_nrrd_bytes` (in process) and against POST /v1/jobs
   (random and mutated bodies, headers, parameters). A crash is any 5xx, a dropped connection
   or a dead server; the target is 0.
3. Overhead: the same job (50 x 512 x 512 int16, 5 mm -> 1 mm, B-spline) in process with
   `run.interpolate` and through the server with `Client.run` (raw NRRD on loopback), median
   of alternating runs, with a breakdown of where the extra time goes, a bit-for-bit check of
   every result, and three floors measured in the same run: the same bytes over a plain
   loopback socket, one copy of the result into fresh memory (the least any transport between
   two processes costs), and one write of it into a fresh shared-memory segment.
4. Learned-method overhead: the job users run by default (the default method's shipped model on
   the bundled phantom), in process with the model loaded once and through `serve`, alternating.
5. Latency: small requests on one kept-alive connection (as a long-polling client makes them),
   plain and TLS, against the shipped listening socket (TCP_NODELAY) and against the same server
   on a socket without it (how `serve` bound it before), to show what Nagle's algorithm costs.
6. Full queue: 10 concurrent clients upload 30 MiB each, 4 rounds, to a server with
   `--queue-size 1` and a long job running, plain and TLS: every upload must hear 503 (none
   lost as a reset); then `Client.run` from each client must wait, resubmit and finish.
7. Hostile input: each case from issue 16 sent to a fresh server, with its answer, the time to
   answer and the server's peak memory (VmHWM) before and after.

Bounded: a fixed number of requests, and --max-seconds stops everything (default 600).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "Backend" / "src"))

from ctsliceinterp.serving.client import Client, ServerBusy  # noqa: E402
from ctsliceinterp.core.errors import InputError  # noqa: E402
from ctsliceinterp.serving.nrrd_bytes import volume_from_nrrd_bytes, volume_to_nrrd_bytes  # noqa: E402
from ctsliceinterp.api import InterpolationRequest, interpolate  # noqa: E402
from ctsliceinterp.core.volume import Volume  # noqa: E402
from ctsliceinterp.evaluation.evaluate import cpu_model  # noqa: E402


# --- a server process --------------------------------------------------------------------------
class ServerProcess:
    """A server in its own process: ``ctsliceinterp serve`` with ``extra`` options, or, with
    ``config`` (ServerConfig fields, e.g. a test hook like step_delay_seconds), this script's
    --serve mode, which builds the same app and runs it through the same runner."""

    def __init__(self, *extra: str, config: dict | None = None, tls: tuple | None = None, nodelay: bool = True):
        self.folder = tempfile.TemporaryDirectory(prefix="ctsi-bench-")
        ready = Path(self.folder.name) / "ready.json"
        env = {**os.environ, "PYTHONPATH": str(REPO / "Backend" / "src")}
        if config is None and nodelay:
            command = [sys.executable, "-m", "ctsliceinterp.cli", "serve", "--port", "0", "--ready-file", str(ready), "--log-level", "warning", *extra]
            if tls:
                command += ["--ssl-certfile", str(tls[0]), "--ssl-keyfile", str(tls[1])]
        else:
            spec = {"config": config or {}, "tls": [str(t) for t in tls] if tls else None, "nodelay": nodelay, "ready": str(ready)}
            command = [sys.executable, str(Path(__file__).resolve()), "--serve", json.dumps(spec)]
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while not ready.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {self.process.stderr.read().decode()[-400:]}")
            time.sleep(0.05)
        self.url = json.loads(ready.read_text())["url"]
        self.pid = self.process.pid
        self.port = int(self.url.rsplit(":", 1)[1])

    def memory_mib(self) -> dict:
        """Current (VmRSS) and peak (VmHWM) resident memory of the server process."""
        fields = {}
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    fields[key] = round(int(value.split()[0]) / 1024, 1)
        return fields

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.folder.cleanup()


def ct_like(shape, seed=0, spacing=(0.7, 0.7, 5.0)) -> Volume:
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape], indexing="ij")
    body = (x**2 + y**2) < 0.8
    array = np.where(body, 40 + 400 * np.sin(6 * z) * (x > 0.2) + rng.normal(0, 15, shape), -1000).astype(np.int16)
    return Volume.from_array(array, spacing, (-120.0, -150.0, 30.0), metadata={"slice_thickness": spacing[2]})


# --- 1. load -------------------------------------------------------------------------------------
def load_test(clients: int, jobs_per_client: int, shape, deadline: float) -> dict:
    server = ServerProcess()
    try:
        volumes = [ct_like(shape, seed=s) for s in range(clients)]
        expected = [interpolate(v, InterpolationRequest(method="bspline")).volume.array for v in volumes]
        before = server.memory_mib()
        errors: list[str] = []
        busy = [0]
        durations: list[float] = []
        peak_rss = [before.get("VmRSS", 0.0)]
        lock = threading.Lock()

        class CountingClient(Client):
            def submit(self, volume, params=None, cancel=None):
                try:
                    return super().submit(volume, params, cancel)
                except ServerBusy:
                    with lock:
                        busy[0] += 1
                    raise

        def one_client(index: int) -> None:
            client = CountingClient(server.url, timeout=60)
            for _ in range(jobs_per_client):
                if time.monotonic() > deadline:
                    errors.append("time budget exhausted")
                    return
                start = time.perf_counter()
                try:
                    thin, _ = client.run(volumes[index], {"method": "bspline", "spacing": 1.0}, poll_interval=0.5)
                    if not np.array_equal(thin.array, expected[index]):
                        errors.append(f"client {index}: result is not bit-identical to the in-process result")
                except Exception as exc:  # noqa: BLE001 - every failure is counted
                    errors.append(f"client {index}: {type(exc).__name__}: {exc}")
                with lock:
                    durations.append(time.perf_counter() - start)

        def sample_memory(stop: threading.Event) -> None:
            while not stop.wait(0.1):
                peak_rss[0] = max(peak_rss[0], server.memory_mib().get("VmRSS", 0.0))

        stop = threading.Event()
        sampler = threading.Thread(target=sample_memory, args=(stop,), daemon=True)
        sampler.start()
        start = time.perf_counter()
        threads = [threading.Thread(target=one_client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        stop.set()
        sampler.join()
        time.sleep(0.5)
        after = server.memory_mib()
        health = Client(server.url).health()
        return {
            "clients": clients,
            "jobs_per_client": jobs_per_client,
            "volume_shape": list(shape),
            "jobs_completed": len(durations) - len(errors),
            "errors": errors[:10],
            "error_count": len(errors),
            "busy_503_retries": busy[0],
            "wall_seconds": round(wall, 2),
            "jobs_lost": clients * jobs_per_client - (len(durations) - len(errors)),
            "job_seconds_median": round(statistics.median(durations), 2) if durations else None,
            "job_seconds_p95": round(percentile(durations, 95), 2) if durations else None,
            "job_seconds_max": round(max(durations), 2) if durations else None,
            "rss_mib_before": before.get("VmRSS"),
            "rss_mib_peak_sampled": peak_rss[0],
            "rss_mib_after": after.get("VmRSS"),
            "rss_mib_high_water": after.get("VmHWM"),
            "jobs_held_after": health["queue"]["held"],
        }
    finally:
        server.stop()


# --- 2. fuzzing ----------------------------------------------------------------------------------
def fuzz_parser(examples: int) -> dict:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    valid = volume_to_nrrd_bytes(ct_like((3, 6, 5)), gzip=False)
    valid_gz = volume_to_nrrd_bytes(ct_like((3, 6, 5)), gzip=True)
    outcome = {"examples": 0, "input_errors": 0, "parsed": 0, "crashes": []}

    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(
        st.one_of(
            st.binary(max_size=400),
            st.builds(lambda b: b"NRRD0004\n" + b, st.binary(max_size=400)),
            st.builds(lambda base, pos, junk: base[:pos] + junk + base[pos:], st.sampled_from([valid, valid_gz]), st.integers(0, len(valid)), st.binary(max_size=16)),
            st.builds(lambda base, pos: base[:pos], st.sampled_from([valid, valid_gz]), st.integers(0, len(valid))),
            st.builds(lambda base, pos, byte: base[:pos] + bytes([byte]) + base[pos + 1:], st.sampled_from([valid, valid_gz]), st.integers(0, 400), st.integers(0, 255)),
        )
    )
    def run(data):
        outcome["examples"] += 1
        try:
            volume_from_nrrd_bytes(data, max_voxels=10_000_000)
            outcome["parsed"] += 1
        except InputError:
            outcome["input_errors"] += 1
        except Exception as exc:  # noqa: BLE001 - a crash
            outcome["crashes"].append(f"{type(exc).__name__}: {exc}"[:200])

    run()
    outcome["crash_count"] = len(outcome.pop("crashes"))
    return outcome


def fuzz_endpoint(examples: int) -> dict:
    import http.client

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    server = ServerProcess("--max-upload-mb", "1")
    host, port = server.url.split("//")[1].split(":")
    valid = volume_to_nrrd_bytes(ct_like((3, 6, 5)), gzip=False)
    statuses: dict[int, int] = {}
    crashes: list[str] = []
    protocol_rejects = [0]

    params = st.one_of(
        st.none(),
        st.text(max_size=80),
        st.dictionaries(
            st.sampled_from(["method", "spacing", "target", "model", "steps", "samples", "seed", "consistency", "x"]),
            st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True), st.text(max_size=12),
                      st.lists(st.integers(-3, 9), max_size=10)),
            max_size=5,
        ).map(json.dumps),
    )
    bodies = st.one_of(
        st.binary(max_size=300),
        st.builds(lambda pos, junk: valid[:pos] + junk + valid[pos:], st.integers(0, len(valid)), st.binary(max_size=12)),
        st.builds(lambda pos: valid[:pos], st.integers(0, len(valid))),
        st.just(valid),
    )
    content_types = st.sampled_from(["application/x-nrrd", "application/octet-stream", "multipart/form-data; boundary=xyz", "text/plain", "multipart/form-data"])

    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(bodies, params, content_types)
    def run(body, params_text, content_type):
        headers = {"Content-Type": content_type}
        if params_text is not None:
            headers["X-CTSliceInterp-Params"] = params_text.encode("ascii", "replace").decode("ascii").replace("\n", " ").replace("\r", " ")
        if content_type.startswith("multipart") and body:
            body = b"--xyz\r\nContent-Disposition: form-data; name=\"volume\"\r\n\r\n" + body + b"\r\n--xyz--\r\n"
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            conn.request("POST", "/v1/jobs", body=body, headers=headers)
            response = conn.getresponse()
            payload = response.read()
            statuses[response.status] = statuses.get(response.status, 0) + 1
            if response.status >= 500:
                crashes.append(f"{response.status}: {payload[:120]!r}")
            elif response.status == 202:  # accepted: clean it up so the queue never fills
                job_id = json.loads(payload)["id"]
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=30)
                conn.request("DELETE", f"/v1/jobs/{job_id}")
                conn.getresponse().read()
            elif not payload.startswith(b"{"):
                # uvicorn's own 400 for a header it cannot parse (e.g. control characters):
                # refused before the application sees the request.
                protocol_rejects[0] += 1
            elif "error" not in json.loads(payload):
                crashes.append(f"{response.status} without a JSON error")
        except (OSError, http.client.HTTPException, ValueError) as exc:
            crashes.append(f"{type(exc).__name__}: {exc}")
        finally:
            conn.close()

    try:
        run()
        alive = server.alive() and Client(server.url).health()["status"] == "ok"
    finally:
        server.stop()
    return {"examples": sum(statuses.values()) + len([c for c in crashes if not c[:3].isdigit()]),
            "status_counts": {str(k): v for k, v in sorted(statuses.items())}, "crash_count": len(crashes),
            "rejected_by_http_parser": protocol_rejects[0],
            "crashes": crashes[:5], "server_alive_after": bool(alive)}


# --- 3. overhead ---------------------------------------------------------------------------------
def loopback_copy_seconds(up_bytes: int, down_bytes: int) -> float:
    """The floor for any loopback transfer: ``up_bytes`` one way and ``down_bytes`` back over a
    plain TCP socket on 127.0.0.1 (no HTTP, no parsing), each into a fresh numpy buffer as the
    client and server do. Connection set-up included."""
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    up, down = np.ones(up_bytes, np.uint8), np.ones(down_bytes, np.uint8)

    def receive(sock, size):
        buffer = np.empty(size, np.uint8)
        view, filled = memoryview(buffer), 0
        while filled < size:
            count = sock.recv_into(view[filled:filled + (1 << 22)])
            if not count:
                raise RuntimeError("loopback transfer cut short")
            filled += count
        return buffer

    def server() -> None:
        conn, _ = listener.accept()
        with conn:
            receive(conn, up_bytes)
            conn.sendall(memoryview(down))

    start = time.perf_counter()
    thread = threading.Thread(target=server)
    thread.start()
    with socket.create_connection(listener.getsockname()) as sock:
        sock.sendall(memoryview(up))
        receive(sock, down_bytes)
    seconds = time.perf_counter() - start
    thread.join()
    listener.close()
    return seconds


def one_copy_seconds(result: np.ndarray) -> float:
    """The floor for any hand-off between two processes: the result copied once into fresh memory
    (np.empty + copyto, in this process). A socket, a pipe or a file moves the result at least
    once into memory the receiver has never touched."""
    start = time.perf_counter()
    np.copyto(np.empty_like(result), result)
    return time.perf_counter() - start


def shared_memory_seconds(result: np.ndarray) -> float:
    """The floor for a shared-memory hand-off: the result written once into a fresh POSIX
    shared-memory segment (what a server would do; the reader then maps it without a copy)."""
    from multiprocessing import shared_memory

    start = time.perf_counter()
    segment = shared_memory.SharedMemory(create=True, size=result.nbytes)
    try:
        view = np.ndarray(result.shape, result.dtype, buffer=segment.buf)
        np.copyto(view, result)
        seconds = time.perf_counter() - start
        del view
    finally:
        segment.close()
        segment.unlink()
    return seconds


def overhead(shape, repeats: int) -> dict:
    """In-process and server runs alternate (so load from other processes hits both alike)."""
    volume = ct_like(shape)
    request = InterpolationRequest(method="bspline", spacing=1.0)
    expected = interpolate(volume, request).volume.array  # warm-up (BLAS threads, page faults)
    server = ServerProcess()
    try:
        client = Client(server.url)  # loopback: raw NRRD, no compression
        client.run(volume, {"method": "bspline", "spacing": 1.0}, poll_interval=0.5)  # warm-up
        local, remote, server_job, parts, run_calls, floor, copy, shm = [], [], [], [], [], [], [], []
        for _ in range(repeats):
            floor.append(loopback_copy_seconds(volume.array.nbytes, expected.nbytes))
            copy.append(one_copy_seconds(expected))
            shm.append(shared_memory_seconds(expected))

            start = time.perf_counter()
            interpolate(volume, request)
            local.append(time.perf_counter() - start)

            start = time.perf_counter()
            job_id = client.submit(volume, {"method": "bspline", "spacing": 1.0})
            uploaded = time.perf_counter()
            while True:
                status = client.status(job_id, wait=0.5)
                if status["state"] in ("done", "failed", "cancelled"):
                    break
            finished = time.perf_counter()
            thin, _ = client.result(job_id, status)
            end = time.perf_counter()
            remote.append(end - start)
            server_job.append(status["elapsed_seconds"])
            parts.append({"upload_s": uploaded - start, "wait_s": finished - uploaded, "download_s": end - finished})
            if thin.array.dtype != expected.dtype or not np.array_equal(thin.array, expected):
                raise RuntimeError("the server result is not bit-identical to the in-process result")
            del thin
            # The plain convenience call, which is what the CLI uses.
            start = time.perf_counter()
            client.run(volume, {"method": "bspline", "spacing": 1.0}, poll_interval=0.5)
            run_calls.append(time.perf_counter() - start)
    finally:
        server.stop()
    local_s, remote_s, run_s = statistics.median(local), statistics.median(remote), statistics.median(run_calls)
    median_parts = {k: round(statistics.median(p[k] for p in parts), 3) for k in parts[0]}
    return {
        "input_shape": list(shape),
        "output_shape": list(expected.shape),
        "output_mib": round(expected.nbytes / 2**20, 1),
        "in_process_seconds": round(local_s, 3),
        "in_process_seconds_all": [round(x, 3) for x in local],
        "server_seconds": round(remote_s, 3),
        "server_seconds_all": [round(x, 3) for x in remote],
        "server_job_seconds": round(statistics.median(server_job), 3),
        "client_run_seconds": round(run_s, 3),
        "overhead_percent": round(100 * (remote_s - local_s) / local_s, 1),
        "loopback_floor_seconds": round(statistics.median(floor), 3),
        "loopback_floor_percent": round(100 * statistics.median(floor) / local_s, 1),
        "one_copy_floor_seconds": round(statistics.median(copy), 3),
        "one_copy_floor_percent": round(100 * statistics.median(copy) / local_s, 1),
        "shared_memory_floor_seconds": round(statistics.median(shm), 3),
        "shared_memory_floor_percent": round(100 * statistics.median(shm) / local_s, 1),
        "bit_identical": True,
        "client_run_overhead_percent": round(100 * (run_s - local_s) / local_s, 1),
        "breakdown_median": median_parts,
        "repeats": repeats,
    }


def learned_overhead(repeats: int) -> dict:
    """The job users run by default: the default method's shipped model on the bundled phantom
    (seed 0 where the method samples), in process (model loaded once, as the server keeps it) and
    through `serve` (its default models)."""
    from ctsliceinterp.api import DEFAULT_LEARNED_METHOD, get_method, load_model
    from ctsliceinterp.io import read_volume

    method = get_method(DEFAULT_LEARNED_METHOD)
    volume = read_volume(REPO / "samples" / "phantom_head_thick_5mm.nii.gz")
    request = InterpolationRequest(method=method.name, seed=0 if "seed" in method.options else None)
    params = request.to_params()
    interpolator = load_model(method.name, device="cpu")  # its shipped model; an error if not installed
    server = ServerProcess("--device", "cpu")
    try:
        client = Client(server.url)
        local, remote, server_job, differences = [], [], [], []
        for _ in range(repeats):
            start = time.perf_counter()
            expected = interpolate(volume, request, interpolator=interpolator).volume.array
            local.append(time.perf_counter() - start)

            start = time.perf_counter()
            job_id = client.submit(volume, params)
            while True:
                status = client.status(job_id, wait=5)
                if status["state"] in ("done", "failed", "cancelled"):
                    break
            thin, _ = client.result(job_id, status)
            remote.append(time.perf_counter() - start)
            server_job.append(status["elapsed_seconds"])
            differences.append(float(np.max(np.abs(thin.array.astype(np.float64) - expected))))
    finally:
        server.stop()
    local_s, remote_s = statistics.median(local), statistics.median(remote)
    return {
        "input_shape": list(volume.array.shape),
        "output_shape": list(expected.shape),
        "method": method.name,
        "model": f"{method.default_model} (shipped)",
        "in_process_seconds": round(local_s, 2),
        "in_process_seconds_all": [round(x, 2) for x in local],
        "server_seconds": round(remote_s, 2),
        "server_seconds_all": [round(x, 2) for x in remote],
        "server_job_seconds": round(statistics.median(server_job), 2),
        "overhead_seconds": round(remote_s - local_s, 3),
        "overhead_percent": round(100 * (remote_s - local_s) / local_s, 2),
        # Upload, queueing, status and download: the round trip less the server's own job time.
        "transport_seconds": round(statistics.median(r - j for r, j in zip(remote, server_job)), 3),
        "transport_percent": round(100 * statistics.median(r - j for r, j in zip(remote, server_job)) / local_s, 2),
        "max_abs_difference_hu": max(differences),
        "repeats": repeats,
    }


def percentile(values, q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def certificate(folder: Path):
    sys.path.insert(0, str(REPO / "Testing" / "server"))
    from live_server import self_signed_certificate  # one certificate helper for tests and benchmark

    return self_signed_certificate(folder)


# --- 5. latency of small requests (TCP_NODELAY) ----------------------------------------------------
def latency(requests: int) -> dict:
    import http.client
    import ssl

    folder = tempfile.TemporaryDirectory(prefix="ctsi-bench-tls-")
    cert, key = certificate(Path(folder.name))
    figures = {}
    for tls in (False, True):
        for nodelay in (True, False):
            server = ServerProcess(config={}, tls=(cert, key) if tls else None, nodelay=nodelay)
            try:
                if tls:
                    conn = http.client.HTTPSConnection("127.0.0.1", server.port, timeout=10, context=ssl.create_default_context(cafile=str(cert)))
                else:
                    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
                seconds = []
                for index in range(requests + 5):  # one kept-alive connection, as a long-polling client has
                    start = time.perf_counter()
                    conn.request("GET", "/v1/health")
                    conn.getresponse().read()
                    if index >= 5:
                        seconds.append(time.perf_counter() - start)
                conn.close()
            finally:
                server.stop()
            figures[f"{'tls' if tls else 'plain'}_{'nodelay' if nodelay else 'no_nodelay'}"] = {
                "requests": requests, "p50_ms": round(1000 * statistics.median(seconds), 2), "p95_ms": round(1000 * percentile(seconds, 95), 2)}
    folder.cleanup()
    return figures


# --- 6. a full queue under concurrent uploads ---------------------------------------------------------
def full_queue(clients: int, rounds: int, upload_mib: int) -> dict:
    folder = tempfile.TemporaryDirectory(prefix="ctsi-bench-tls-")
    cert, key = certificate(Path(folder.name))
    big = ct_like((upload_mib * 2, 512, 512), spacing=(0.7, 0.7, 5.0))  # int16: upload_mib MiB raw
    small = ct_like((6, 32, 32))
    figures = {}
    for tls in (False, True):
        # step_delay_seconds (a test hook) holds the blocking job running for the whole run.
        server = ServerProcess(config={"queue_size": 1, "step_delay_seconds": 3.0, "max_upload_bytes": 2 * upload_mib * 2**20},
                               tls=(cert, key) if tls else None)
        try:
            ca = str(cert) if tls else None
            blocker = Client(server.url, ca_file=ca)
            running = blocker.submit(small, {"method": "lanczos"})
            while blocker.status(running)["state"] != "running":
                time.sleep(0.05)
            queued = blocker.submit(small, {"method": "lanczos"})
            outcomes: dict[str, int] = {}
            lock = threading.Lock()

            def upload() -> None:
                try:
                    Client(server.url, ca_file=ca, retries=0, compress=False, timeout=60).submit(big, {})
                    key_ = "accepted"
                except ServerBusy:
                    key_ = "busy_503"
                except Exception as exc:  # noqa: BLE001 - a refusal that did not reach the client
                    key_ = f"lost ({type(exc).__name__})"
                with lock:
                    outcomes[key_] = outcomes.get(key_, 0) + 1

            start = time.perf_counter()
            for _ in range(rounds):
                threads = [threading.Thread(target=upload) for _ in range(clients)]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
            wall = time.perf_counter() - start
            blocker.cancel(queued)
            blocker.cancel(running)
        finally:
            server.stop()
        figures["tls" if tls else "plain"] = {"uploads": clients * rounds, "upload_mib": upload_mib, "outcomes": outcomes,
                                              "lost": sum(v for k, v in outcomes.items() if k.startswith("lost")), "wall_seconds": round(wall, 2)}
    # Client.run waits and resubmits on 503: every job of every client finishes.
    server = ServerProcess(config={"queue_size": 1, "step_delay_seconds": 0.02})
    try:
        volume = ct_like((16, 512, 512))  # 8 MiB raw
        expected = interpolate(volume, InterpolationRequest(method="linear", spacing=2.5)).volume.array
        results: list[str] = []

        def run_one() -> None:
            try:
                thin, _ = Client(server.url, compress=False).run(volume, {"method": "linear", "spacing": 2.5}, poll_interval=0.2)
                results.append("done" if np.array_equal(thin.array, expected) else "wrong")
            except Exception as exc:  # noqa: BLE001
                results.append(type(exc).__name__)

        start = time.perf_counter()
        threads = [threading.Thread(target=run_one) for _ in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        figures["client_run"] = {"clients": clients, "done_bit_identical": results.count("done"), "other": sorted(set(results) - {"done"}),
                                 "wall_seconds": round(time.perf_counter() - start, 2)}
    finally:
        server.stop()
    folder.cleanup()
    return figures


# --- 7. hostile input ------------------------------------------------------------------------------------
def hostile() -> list[dict]:
    """Each case against one fresh `serve` (default limits); the answer, its time, and the
    server's peak resident memory (VmHWM) after the case."""
    import http.client
    import socket
    import zlib

    server = ServerProcess("--no-default-model")
    host, port = "127.0.0.1", server.port
    thick = ct_like((6, 64, 64))
    body = volume_to_nrrd_bytes(thick, gzip=False)
    identity = [1, 0, 0, 0, 1, 0, 0, 0, 1]
    rows = []

    def post(data, params=None, headers=None):
        conn = http.client.HTTPConnection(host, port, timeout=120)
        try:
            conn.request("POST", "/v1/jobs", body=data, headers={"Content-Type": "application/x-nrrd",
                         "X-CTSliceInterp-Params": params if isinstance(params, str) else json.dumps(params or {}), **(headers or {})})
            response = conn.getresponse()
            return f"{response.status} {json.loads(response.read()).get('error', '')}"
        except (OSError, http.client.HTTPException) as exc:
            return f"connection error: {type(exc).__name__}"
        finally:
            conn.close()

    def bomb(type_name: str, inflated: int) -> bytes:
        header = (f"NRRD0004\ntype: {type_name}\ndimension: 3\nspace: left-posterior-superior\nsizes: 1024 1024 512\n"
                  "space directions: (1,0,0) (0,1,0) (0,0,1)\nkinds: domain domain domain\nendian: little\nencoding: gzip\n"
                  "space origin: (0,0,0)\n\n").encode()
        compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
        return header + compressor.compress(bytes(inflated)) + compressor.flush()

    def slow_loris(count: int, seconds: float) -> str:
        """``count`` uploads sending a byte every 2 s, then one normal upload: when was it accepted?"""
        socks, start = [], time.monotonic()
        for _ in range(count):
            sock = socket.create_connection((host, port), timeout=seconds + 30)
            sock.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-nrrd\r\nContent-Length: 1000000\r\n\r\n")
            socks.append(sock)
        answers = []

        def drip(sock) -> None:
            import select

            end = time.monotonic() + seconds
            try:
                while time.monotonic() < end and not select.select([sock], [], [], 2)[0]:  # until the server answers
                    sock.sendall(b"N")
            except OSError:
                pass
            answered = round(time.monotonic() - start, 1)
            try:
                answers.append((answered, sock.recv(200).split(b"\r\n")[0].decode()))
            except OSError as exc:
                answers.append((answered, type(exc).__name__))

        threads = [threading.Thread(target=drip, args=(sock,)) for sock in socks]
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        Client(server.url, timeout=120).submit(thick, {"method": "linear"})
        accepted = round(time.monotonic() - start, 1)
        for thread in threads:
            thread.join()
        for sock in socks:
            sock.close()
        return f"a normal upload alongside was accepted after {accepted} s; the slow ones got: {sorted(set(a[1] for a in answers))} after {min(a[0] for a in answers)}-{max(a[0] for a in answers)} s"

    def slow_head(seconds: float) -> str:
        start = time.monotonic()
        with socket.create_connection((host, port), timeout=seconds + 30) as sock:
            try:
                for byte in b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000:
                    sock.sendall(bytes([byte]))
                    time.sleep(1)
                    if time.monotonic() - start > seconds:
                        return f"still open after {seconds:g} s"
            except OSError as exc:
                return f"closed by the server after {time.monotonic() - start:.1f} s ({type(exc).__name__})"
        return "?"

    def redirect() -> str:
        conn = http.client.HTTPConnection(host, port, timeout=10)
        conn.request("GET", "/v1/health/", headers={"Host": "evil.example"})
        response = conn.getresponse()
        response.read()
        return f"{response.status}, Location: {response.getheader('Location')}"

    def huge_length() -> str:
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-nrrd\r\nContent-Length: 1000000000000\r\n\r\n")
            return sock.recv(300).split(b"\r\n")[0].decode()

    def token_at_start(text: str, mode: int) -> str:
        with tempfile.TemporaryDirectory() as folder:
            token_file = Path(folder) / "token"
            token_file.write_text(text + "\n", encoding="utf-8")
            token_file.chmod(mode)
            ready = Path(folder) / "ready.json"
            process = subprocess.Popen([sys.executable, "-m", "ctsliceinterp.cli", "serve", "--port", "0", "--token-file", str(token_file),
                                        "--no-default-model", "--ready-file", str(ready)],
                                       env={**os.environ, "PYTHONPATH": str(REPO / "Backend" / "src")}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            deadline = time.monotonic() + 30
            while process.poll() is None and not ready.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            started = ready.exists()
            process.terminate()
            err = process.communicate(timeout=30)[1].decode()
            lines = [line for line in err.splitlines() if "token" in line and "serving on" not in line]
            return f"{'started' if started else f'refused (exit {process.returncode})'}: {lines[0].strip()[:160] if lines else ''}"

    far = thick.geometry.with_slices(float(thick.geometry.slice_positions()[0]) + 1_000_000.0, 10, 2.5)
    labels = Volume.from_array(np.random.default_rng(1).integers(0, 4, (6, 64, 64)).astype(np.uint8), (1.0, 1.0, 5.0))
    bomb_short, bomb_double = bomb("short", 1024 * 2**20), bomb("double", 64 * 2**20)  # made before the clock starts
    cases = [
        ("gzip bomb: sizes 1024 1024 512 int16 (1 GiB), 1 MiB of compressed zeros", lambda: post(bomb_short)),
        ("gzip bomb: the same sizes as double (4 GiB declared)", lambda: post(bomb_double)),
        ("target.shape [1e8, 64, 64]", lambda: post(body, {"target": {"shape": [10**8, 64, 64], "spacing": [0.7, 0.7, 1], "origin": [0, 0, 0], "direction": identity}})),
        ("target.shape [10^30, 64, 64]", lambda: post(body, '{"target": {"shape": [1' + "0" * 30 + ', 64, 64], "spacing": [0.7, 0.7, 1], "origin": [0, 0, 0], "direction": [1,0,0,0,1,0,0,0,1]}}')),
        ("spacing 10^400", lambda: post(body, '{"spacing": 1' + "0" * 400 + "}")),
        ("target 1 km from the data", lambda: post(body, {"target": far.to_dict()})),
        ("label map (unsigned char, 4 values)", lambda: post(volume_to_nrrd_bytes(labels))),
        ("Content-Length 10^12", huge_length),
        ("GET /v1/health/ with Host: evil.example", redirect),
        ("4 slow-loris uploads (1 byte / 2 s for 30 s) + 1 normal upload", lambda: slow_loris(4, 30.0)),
        ("request head sent 1 byte / s", lambda: slow_head(30.0)),
        ("token file readable by others (0644)", lambda: token_at_start("x" * 32, 0o644)),
        ("token with a non-Latin-1 character", lambda: token_at_start("geheim-\u2603-0123456789abcdef", 0o600)),
    ]
    rows.append({"case": "(the server at start, before any case)", "answer": "", "seconds": 0.0,
                 "server_peak_rss_mib": server.memory_mib().get("VmHWM"), "server_alive": server.alive()})
    try:
        for name, case in cases:
            start = time.perf_counter()
            answer = case()
            rows.append({"case": name, "answer": answer[:300], "seconds": round(time.perf_counter() - start, 2),
                         "server_peak_rss_mib": server.memory_mib().get("VmHWM"), "server_alive": server.alive()})
            print("  hostile:", json.dumps(rows[-1]), flush=True)
    finally:
        server.stop()
    return rows


def serve_from_spec(spec_text: str) -> int:
    """--serve SPEC: the app from ServerConfig fields, run by the shipped runner; with
    "nodelay": false, on a socket bound as `serve` bound it before TCP_NODELAY (the "before")."""
    import socket

    import uvicorn

    from ctsliceinterp.serving.server import ServerConfig, create_app
    from ctsliceinterp.serving.server.runner import serve, uvicorn_config

    spec = json.loads(spec_text)
    config = ServerConfig(port=0, **spec["config"])
    certfile, keyfile = spec["tls"] or (None, None)
    app = create_app(config)
    if spec["nodelay"]:
        return serve(app, config, certfile, keyfile, ready_file=spec["ready"], log_level="warning")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # proto 0: asyncio does not set TCP_NODELAY either
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn_config(app, config, certfile, keyfile, log_level="warning"))

    def announce() -> None:
        while not server.started:
            time.sleep(0.05)
        url = f"{'https' if certfile else 'http'}://127.0.0.1:{sock.getsockname()[1]}"
        Path(spec["ready"]).write_text(json.dumps({"url": url, "pid": os.getpid()}))

    threading.Thread(target=announce, daemon=True).start()
    server.run(sockets=[sock])
    return 0


def machine() -> str:
    cpus = os.cpu_count()
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem = float("nan")
    model = cpu_model() or ""
    return f"{platform.system()} {platform.machine()}, {cpus} CPU cores ({model}), {mem:.0f} GiB RAM, Python {platform.python_version()}"


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        return serve_from_spec(sys.argv[2])
    sections = ["load", "fuzz", "overhead", "learned", "latency", "full_queue", "hostile"]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--quick", action="store_true", help="smaller numbers (a smoke run)")
    parser.add_argument("--max-seconds", type=float, default=600)
    parser.add_argument("--skip", nargs="*", default=[], choices=sections)
    parser.add_argument("--only", nargs="*", choices=sections, help="run only these sections")
    args = parser.parse_args()
    run = [name for name in (args.only or sections) if name not in args.skip]
    deadline = time.monotonic() + args.max_seconds
    figures = {"machine": machine(), **{("learned_overhead" if name == "learned" else name): None for name in sections}}
    if "load" in run:
        figures["load"] = load_test(4 if args.quick else 20, 3, (12, 128, 128), deadline)
        print("load:", json.dumps(figures["load"]), flush=True)
    if "fuzz" in run:
        figures["fuzz"] = {"parser": fuzz_parser(200 if args.quick else 3000), "endpoint": fuzz_endpoint(50 if args.quick else 400)}
        print("fuzz:", json.dumps(figures["fuzz"]), flush=True)
    if "overhead" in run:
        figures["overhead"] = overhead((20, 256, 256) if args.quick else (50, 512, 512), 2 if args.quick else 9)
        print("overhead:", json.dumps(figures["overhead"]), flush=True)
    if "learned" in run:
        figures["learned_overhead"] = learned_overhead(1 if args.quick else 3)
        print("learned overhead:", json.dumps(figures["learned_overhead"]), flush=True)
    if "latency" in run:
        figures["latency"] = latency(20 if args.quick else 200)
        print("latency:", json.dumps(figures["latency"]), flush=True)
    if "full_queue" in run:
        figures["full_queue"] = full_queue(10, 1 if args.quick else 4, 30)
        print("full queue:", json.dumps(figures["full_queue"]), flush=True)
    if "hostile" in run:
        figures["hostile"] = hostile()
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    ok = True
    if figures["load"]:
        ok &= figures["load"]["error_count"] == 0
    if figures["fuzz"]:
        ok &= figures["fuzz"]["parser"]["crash_count"] == 0 and figures["fuzz"]["endpoint"]["crash_count"] == 0
    if figures["full_queue"]:
        ok &= all(figures["full_queue"][k]["lost"] == 0 for k in ("plain", "tls"))
    if figures["hostile"]:
        ok &= all(row["server_alive"] and not row["answer"].startswith("5") for row in figures["hostile"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
