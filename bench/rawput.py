"""The raw limit: the relay's PUTs sent by httpx with no database at all.

Run as a child process by bench/run.py, one variant per process (its own event loop and CPU
reading); prints one JSON line. Variants:

- ``async-clients``: ``--concurrency`` one-connection ``httpx.AsyncClient`` s, one worker
  coroutine each: the relay's own client settings with ``--concurrency 64`` (relay/connect/client.py).
- ``async-pool``: one ``httpx.AsyncClient`` with a pool of ``--concurrency`` connections.
- ``sync-threads``: ``--concurrency`` threads, each with its own ``httpx.Client``.

``--loop uvloop`` runs the async variants on uvloop. Requests carry the relay's headers and the
same bodies (70% SUCCESS, 30% FAILED with errors) to ``/v1/orders/actions/{id}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import threading
import time
from typing import Any

import httpx
from benchlib import CpuWindow, tree_cpu

HEADERS = {"User-Agent": "outbox-relay/bench", "Accept": "application/json"}
REQUEST_HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer bench-token"}
CODES = ["ORDER_IN_WRONG_STATE", "DATA_NOT_FOUND", "OTHER", "UNAVAILABLE"]


def bodies(n: int = 1000, seed: int = 7) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if rng.random() < 0.7:
            payload: dict[str, object] = {"status": "SUCCESS"}
        else:
            payload = {
                "status": "FAILED",
                "errors": [
                    {"code": rng.choice(CODES), "message": f"reason {i}.{k}"}
                    for k in range(rng.randint(1, 3))
                ],
            }
        out.append(json.dumps(payload, separators=(",", ":")).encode())
    return out


class Meter:
    """Counts answers; the monitor snapshots count and CPU at the start and end of the window."""

    def __init__(self) -> None:
        self.count = 0
        self.errors = 0
        self.stop = False


async def _async_main(args: argparse.Namespace) -> dict[str, Any]:
    meter = Meter()
    payloads = bodies()
    url = args.url.rstrip("/") + "/v1/orders/actions/"
    timeout = httpx.Timeout(10.0)
    if args.mode == "async-clients":
        clients = [
            httpx.AsyncClient(
                timeout=timeout,
                limits=httpx.Limits(max_connections=1, max_keepalive_connections=1, keepalive_expiry=30.0),
                follow_redirects=False,
                headers=HEADERS,
            )
            for _ in range(args.concurrency)
        ]
    else:
        shared = httpx.AsyncClient(
            timeout=timeout,
            limits=httpx.Limits(
                max_connections=args.concurrency,
                max_keepalive_connections=args.concurrency,
                keepalive_expiry=30.0,
            ),
            follow_redirects=False,
            headers=HEADERS,
        )
        clients = [shared] * args.concurrency

    async def worker(index: int, client: httpx.AsyncClient) -> None:
        i = index
        while not meter.stop:
            i += args.concurrency
            try:
                answer = await client.put(
                    f"{url}raw-{i}", content=payloads[i % len(payloads)], headers=REQUEST_HEADERS
                )
                if answer.status_code == 204:
                    meter.count += 1
                else:
                    meter.errors += 1
            except httpx.HTTPError:
                meter.errors += 1

    tasks = [asyncio.create_task(worker(k, c)) for k, c in enumerate(clients)]
    await asyncio.sleep(args.warmup)
    window = _window(args)
    c0, e0, cpu0, t0 = meter.count, meter.errors, time.process_time(), time.perf_counter()
    await asyncio.sleep(args.seconds)
    c1, e1, cpu1, t1 = meter.count, meter.errors, time.process_time(), time.perf_counter()
    usage = window.read()
    meter.stop = True
    await asyncio.wait(tasks, timeout=15)
    for client in set(clients):
        await client.aclose()
    return {**_figures(c1 - c0, e1 - e0, cpu1 - cpu0, t1 - t0), "usage": usage}


def _sync_main(args: argparse.Namespace) -> dict[str, Any]:
    meter = Meter()
    lock = threading.Lock()
    payloads = bodies()
    url = args.url.rstrip("/") + "/v1/orders/actions/"

    # Clients are made before the threads start: each one builds an SSL context (tens of ms).
    clients = [
        httpx.Client(timeout=httpx.Timeout(10.0), follow_redirects=False, headers=HEADERS)
        for _ in range(args.concurrency)
    ]

    def worker(index: int) -> None:
        with clients[index] as client:
            i = index
            while not meter.stop:
                i += args.concurrency
                ok = False
                try:
                    answer = client.put(
                        f"{url}raw-{i}", content=payloads[i % len(payloads)], headers=REQUEST_HEADERS
                    )
                    ok = answer.status_code == 204
                except httpx.HTTPError:
                    pass
                with lock:
                    if ok:
                        meter.count += 1
                    else:
                        meter.errors += 1

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(args.concurrency)]
    for t in threads:
        t.start()
    time.sleep(args.warmup)
    window = _window(args)
    c0, e0, cpu0, t0 = meter.count, meter.errors, time.process_time(), time.perf_counter()
    time.sleep(args.seconds)
    c1, e1, cpu1, t1 = meter.count, meter.errors, time.process_time(), time.perf_counter()
    usage = window.read()
    meter.stop = True
    for t in threads:
        t.join(15)
    return {**_figures(c1 - c0, e1 - e0, cpu1 - cpu0, t1 - t0), "usage": usage}


def _window(args: argparse.Namespace) -> CpuWindow:
    if args.nginx_pid:
        return CpuWindow(nginx=lambda: tree_cpu(args.nginx_pid))
    return CpuWindow()


def _figures(count: int, errors: int, cpu: float, elapsed: float) -> dict[str, Any]:
    return {
        "requests": count,
        "errors": errors,
        "seconds": round(elapsed, 3),
        "per_second": round(count / elapsed, 1),
        "cpu_s_per_1000": round(1000 * cpu / count, 3) if count else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--mode", choices=["async-clients", "async-pool", "sync-threads"], required=True)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--nginx-pid", type=int, default=0)
    args = parser.parse_args()
    if args.mode == "sync-threads":
        result = _sync_main(args)
    elif args.loop == "uvloop":
        import uvloop

        result = uvloop.run(_async_main(args))
    else:
        result = asyncio.run(_async_main(args))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
