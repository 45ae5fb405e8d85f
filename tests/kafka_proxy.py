"""A small TCP proxy in front of the Kafka broker, for one client, that can stop forwarding.

A Kafka client reaches the broker at the address the broker advertises in its Metadata
answers, not at its bootstrap address, so a plain proxy would only see the first request.
This one rewrites the broker list of every Metadata response (versions 0-8, the ones without
flexible encoding) to its own address: every connection of the client goes through it.

`stall()` stops forwarding in both directions, on open connections and on new ones (a network
path that goes silent while both processes run). `resume()` resets the connections held
during the stall (as a broken TCP session would end) and forwards again; nothing held is
delivered late.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct

METADATA = 3


class KafkaProxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._generation = 0  # bumped by resume(): connections of a stall are reset
        self._conns: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter | None]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stall(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._generation += 1
        for client, broker in list(self._conns):
            client.transport.abort()
            if broker is not None:
                broker.transport.abort()
        self._flowing.set()

    async def close(self) -> None:
        self.resume()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(BaseException):
                await t

    async def _accept(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        entry: tuple[asyncio.StreamWriter, asyncio.StreamWriter | None] = (cwriter, None)
        self._conns.add(entry)
        try:
            generation = self._generation
            await self._flowing.wait()
            if generation != self._generation:
                return
            breader, bwriter = await asyncio.open_connection(*self.upstream)
            self._conns.discard(entry)
            entry = (cwriter, bwriter)
            self._conns.add(entry)
            pending: dict[int, tuple[int, int]] = {}  # correlation id -> (api key, version)
            up = asyncio.create_task(self._pump(creader, bwriter, pending, requests=True))
            down = asyncio.create_task(self._pump(breader, cwriter, pending, requests=False))
            await asyncio.wait([up, down], return_when=asyncio.FIRST_COMPLETED)
            for t in (up, down):
                t.cancel()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._conns.discard(entry)
            for w in entry:
                if w is not None:
                    w.transport.abort()
            self._tasks.discard(task)

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        pending: dict[int, tuple[int, int]],
        *,
        requests: bool,
    ) -> None:
        generation = self._generation
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while True:
                (size,) = struct.unpack(">i", await reader.readexactly(4))
                frame = await reader.readexactly(size)
                await self._flowing.wait()
                if generation != self._generation:
                    return  # held during a stall: dropped with its connection
                if requests:
                    key, version, corr = struct.unpack(">hhi", frame[:8])
                    pending[corr] = (key, version)
                else:
                    (corr,) = struct.unpack(">i", frame[:4])
                    key, version = pending.pop(corr, (-1, -1))
                    if key == METADATA:
                        frame = self._rewrite(frame, version)
                writer.write(struct.pack(">i", len(frame)) + frame)
                await writer.drain()

    def _rewrite(self, frame: bytes, version: int) -> bytes:
        """Every broker in a Metadata response becomes 127.0.0.1:<this proxy's port>."""
        if version > 8:
            raise ValueError(f"Metadata v{version} (flexible encoding) is not supported")
        pos = 4 + (4 if version >= 3 else 0)  # correlation id, throttle time
        (n,) = struct.unpack(">i", frame[pos : pos + 4])
        out = bytearray(frame[: pos + 4])
        pos += 4
        host = b"127.0.0.1"
        for _ in range(n):
            node = frame[pos : pos + 4]
            (hlen,) = struct.unpack(">h", frame[pos + 4 : pos + 6])
            pos += 6 + hlen + 4  # node id, host, port
            out += node + struct.pack(">h", len(host)) + host + struct.pack(">i", self.port)
            if version >= 1:  # rack: a nullable string
                (rlen,) = struct.unpack(">h", frame[pos : pos + 2])
                end = pos + 2 + max(0, rlen)
                out += frame[pos:end]
                pos = end
        out += frame[pos:]
        return bytes(out)
