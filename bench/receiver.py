"""A tiny HTTP/1.1 receiver for the latency benchmark: answers 204 and timestamps each request.

Why not nginx: nginx's ``$msec`` has millisecond resolution, too coarse for a p50 near 2 ms.
This receiver reads each request (headers and ``Content-Length`` body) and records
``time.time()`` (microseconds, the same wall clock as the inserter's) the moment the whole
request is in, plus its path. On SIGTERM it writes ``[[t, path], ...]`` as JSON to ``--out``.
It understands only what httpx sends (keep-alive, Content-Length bodies).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time

RESPONSE = b"HTTP/1.1 204 No Content\r\nServer: bench-receiver\r\n\r\n"


async def main(port: int) -> list[tuple[float, str]]:
    records: list[tuple[float, str]] = []
    stop = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.split(b"\r\n")
                target = lines[0].split(b" ")[1].decode()
                length = 0
                for line in lines[1:]:
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:].strip())
                if length:
                    await reader.readexactly(length)
                records.append((time.time(), target))
                writer.write(RESPONSE)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, IndexError):
            pass
        finally:
            writer.close()

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    server = await asyncio.start_server(handle, "127.0.0.1", port)
    async with server:
        await stop.wait()
    return records


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    received = asyncio.run(main(args.port))
    with open(args.out, "w") as fh:
        json.dump(received, fh)
