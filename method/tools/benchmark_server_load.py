"""Benchmark of the search HTTP service under load (method/search_server.py): throughput and latency at 1, 4 and
16 concurrent clients against a real running server.

    python -m method.tools.benchmark --sections server_load [--quick]   (named: not part of a plain --quick run)

A tiny index (the search section's --quick corpus and model: 40 val videos, H 32, ranklist first stage) is served by
`python -m method.search serve`, started as a subprocess on 127.0.0.1 and a free port with its default settings
(--threads 8 --max_queue 4 --request_timeout 30). Each client is a thread of this process with one keep-alive
connection that posts desc_id queries back to back for a fixed time; a client answered 503 waits its Retry-After
(as a well-behaved client does) and goes on. Per level: searches answered (200) per second, p50 / p99 latency of
those answers, and the count of each status. 16 clients are more than one running search plus 4 waiting: the
excess must be answered 503 with a Retry-After, and nothing else but 200 (target); after the load the server must
answer GET /health and a POST /search normally (target). Client and server share the machine's cores.
"""
import http.client
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import torch

from method.search_index import build_index
from method.tools.benchmark import machine_info
from method.tools.benchmark_search import QUICK as SEARCH_QUICK, random_run_dir
from utils.io_utils import load_json, load_jsonl
from utils.run_dir import REPO_ROOT
from utils.synthetic_tvr import generate_corpus

REQUIRES = {"flask": "search", "waitress": "search"}
# Out of a plain --quick run: the server subprocess (torch import, model load) and three load levels took 15-16 s
# on a loaded 2-core machine, past the ~15 s a smoke section may take.
SMOKE_BY_DEFAULT = False
CLIENTS = (1, 4, 16)
SECONDS_PER_LEVEL = {"quick": 0.5, "full": 10.0}
STARTUP_SECONDS = 120  # import torch and load the index and model


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def call(connection, method, path, body=None):
    """One request on a keep-alive connection -> (status, JSON answer, Retry-After header or None)."""
    headers = {"Content-Type": "application/json"} if body is not None else {}
    connection.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
    response = connection.getresponse()
    return response.status, json.loads(response.read() or b"null"), response.getheader("Retry-After")


def client(port, desc_ids, until, records):
    """Post desc_id queries until `until` (perf_counter), appending (status, seconds, Retry-After) to `records`;
    a failed connection is recorded as status "connection error" and reopened."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for i in itertools.count():
        if time.perf_counter() >= until:
            break
        started = time.perf_counter()
        try:
            status, _, retry_after = call(connection, "POST", "/search", {"desc_id": desc_ids[i % len(desc_ids)]})
        except (OSError, http.client.HTTPException):
            records.append(("connection error", time.perf_counter() - started, None))
            connection.close()
            continue
        records.append((status, time.perf_counter() - started, retry_after))
        if status == 503 and retry_after is not None:
            time.sleep(max(0.0, min(float(retry_after), until - time.perf_counter())))
    connection.close()


def load_level(port, desc_ids, n_clients, seconds):
    """`n_clients` clients for `seconds` -> the level's results."""
    records = [[] for _ in range(n_clients)]
    until = time.perf_counter() + seconds
    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(port, desc_ids[i::n_clients] or desc_ids, until, records[i]))
               for i in range(n_clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    flat = [record for client_records in records for record in client_records]
    answered = [seconds for status, seconds, _ in flat if status == 200]
    statuses = sorted({str(status) for status, _, _ in flat})
    return dict(clients=n_clients, wall_seconds=elapsed, searches_per_s=len(answered) / elapsed,
                latency_ms=dict(p50=1e3 * float(np.percentile(answered, 50)),
                                p99=1e3 * float(np.percentile(answered, 99))),
                statuses={status: sum(str(s) == status for s, _, _ in flat) for status in statuses},
                refused_without_retry_after=sum(status == 503 and retry is None for status, _, retry in flat))


def wait_until_healthy(port, server, log_path):
    """Poll GET /health until it answers 200; RuntimeError with the server log's tail if the server exits."""
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if server.poll() is not None:
            with open(log_path) as f:
                raise RuntimeError(f"search server exited with status {server.returncode}:\n{f.read()[-3000:]}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            if call(connection, "GET", "/health")[0] == 200:
                return
        except OSError:
            pass  # not listening yet
        time.sleep(0.2)
    raise RuntimeError(f"search server on port {port} did not answer /health within {STARTUP_SECONDS} s")


def answers_normally(port, desc_id):
    """Whether the server answers /health ok and a /search with moments."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    health = call(connection, "GET", "/health")
    search = call(connection, "POST", "/search", {"desc_id": desc_id})
    return health[0] == 200 and health[1]["status"] == "ok" and search[0] == 200 and len(search[1]["results"]) > 0


def run(args):
    """Build a tiny index, serve it in a subprocess, load it at each level of concurrency -> results dict."""
    seconds = SECONDS_PER_LEVEL["quick" if args.quick else "full"]
    work = tempfile.mkdtemp(prefix="benchmark_server_load_", dir=args.work_dir)
    server = None
    try:
        corpus = SEARCH_QUICK["corpus"]
        data_config = generate_corpus(os.path.join(work, "corpus"), **corpus)
        run_dir = random_run_dir(os.path.join(work, "runs"), data_config, SEARCH_QUICK, corpus, -1)
        index = build_index(os.path.join(work, "index"), run_dir, "ranklist", data_config, "val")["out_dir"]
        val_file = os.path.join(os.path.dirname(data_config), load_json(data_config)["eval_data_path"])
        desc_ids = [row["desc_id"] for row in load_jsonl(val_file)]
        port = free_port()
        log_path = os.path.join(work, "server.log")
        with open(log_path, "w") as log:
            server = subprocess.Popen([sys.executable, "-m", "method.search", "serve", "--index", index,
                                       "--host", "127.0.0.1", "--port", str(port)], cwd=REPO_ROOT, stdout=log,
                                      stderr=subprocess.STDOUT)
        wait_until_healthy(port, server, log_path)
        answers_normally(port, desc_ids[0])  # warm-up
        levels = [load_level(port, desc_ids, n_clients, seconds) for n_clients in CLIENTS]
        after = answers_normally(port, desc_ids[0])
        only_503 = all(set(level["statuses"]) <= {"200", "503"} and not level["refused_without_retry_after"]
                       for level in levels)
        return dict(machine=f"{machine_info(torch.device('cpu'))['cpu']}, {os.cpu_count()} CPUs (server and clients)",
                    date=time.strftime("%Y-%m-%d"), quick=bool(args.quick), n_videos=corpus["n_val_videos"],
                    seconds_per_level=seconds, levels=levels,
                    targets={"only 200 or 503 + Retry-After under load": only_503,
                             "answers /health and /search after the load": after})
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        shutil.rmtree(work, ignore_errors=True)


def table_rows(results):
    """The results as table lines."""
    rows = [f"search server under load: {results['n_videos']} videos, POST /search desc_id, "
            f"{results['seconds_per_level']:g} s per level, --max_queue 4 ({results['machine']}, {results['date']})"]
    rows += [f"  {level['clients']:>2} clients: {level['searches_per_s']:7.1f} searches/s, p50 "
             f"{level['latency_ms']['p50']:7.1f} ms, p99 {level['latency_ms']['p99']:7.1f} ms, statuses "
             + ", ".join(f"{status}: {count}" for status, count in level["statuses"].items())
             for level in results["levels"]]
    return rows
