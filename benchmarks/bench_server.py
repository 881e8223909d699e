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
4. Diffusion overhead: the job users run by default (the shipped model on the bundled phantom,
   seed 0), in process with the model loaded once and through `serve`, alternating.

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


# --- a server process --------------------------------------------------------------------------
class ServerProcess:
    def __init__(self, *extra: str):
        self.folder = tempfile.TemporaryDirectory(prefix="ctsi-bench-")
        ready = Path(self.folder.name) / "ready.json"
        env = {**os.environ, "PYTHONPATH": str(REPO / "Backend" / "src")}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ctsliceinterp.cli", "serve", "--port", "0", "--ready-file", str(ready), "--log-level", "warning", *extra],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 60
        while not ready.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {self.process.stderr.read().decode()[-400:]}")
            time.sleep(0.05)
        self.url = json.loads(ready.read_text())["url"]
        self.pid = self.process.pid

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
            def submit(self, volume, params=None):
                try:
                    return super().submit(volume, params)
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
            "job_seconds_median": round(statistics.median(durations), 2) if durations else None,
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


def diffusion_overhead(repeats: int) -> dict:
    """The job users run by default: the shipped diffusion model on the bundled phantom, in
    process (model loaded once, as the server keeps it) and through `serve` (default model)."""
    from ctsliceinterp.io import read_volume
    from ctsliceinterp.pipelines.diffusion import Interpolator

    volume = read_volume(REPO / "samples" / "phantom_head_thick_5mm.nii.gz")
    request = InterpolationRequest(method="diffusion", model="default", seed=0)
    params = {"method": "diffusion", "model": "default", "spacing": 1.0, "seed": 0}
    interpolator = Interpolator.load("default", device="cpu")
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
        "model": "default (shipped)",
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


def machine() -> str:
    cpus = os.cpu_count()
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem = float("nan")
    model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.system()} {platform.machine()}, {cpus} CPU cores ({model}), {mem:.0f} GiB RAM, Python {platform.python_version()}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--quick", action="store_true", help="smaller numbers (a smoke run)")
    parser.add_argument("--max-seconds", type=float, default=600)
    parser.add_argument("--skip", nargs="*", default=[], choices=["load", "fuzz", "overhead", "diffusion"])
    args = parser.parse_args()
    deadline = time.monotonic() + args.max_seconds
    figures = {"machine": machine(), "load": None, "fuzz": None, "overhead": None, "diffusion_overhead": None}
    if "load" not in args.skip:
        figures["load"] = load_test(4 if args.quick else 20, 3, (12, 128, 128), deadline)
        print("load:", json.dumps(figures["load"]), flush=True)
    if "fuzz" not in args.skip:
        figures["fuzz"] = {"parser": fuzz_parser(200 if args.quick else 3000), "endpoint": fuzz_endpoint(50 if args.quick else 400)}
        print("fuzz:", json.dumps(figures["fuzz"]), flush=True)
    if "overhead" not in args.skip:
        figures["overhead"] = overhead((20, 256, 256) if args.quick else (50, 512, 512), 2 if args.quick else 9)
        print("overhead:", json.dumps(figures["overhead"]), flush=True)
    if "diffusion" not in args.skip:
        figures["diffusion_overhead"] = diffusion_overhead(1 if args.quick else 3)
        print("diffusion overhead:", json.dumps(figures["diffusion_overhead"]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    ok = True
    if figures["load"]:
        ok &= figures["load"]["error_count"] == 0
    if figures["fuzz"]:
        ok &= figures["fuzz"]["parser"]["crash_count"] == 0 and figures["fuzz"]["endpoint"]["crash_count"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
