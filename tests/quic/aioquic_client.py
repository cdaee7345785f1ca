"""An independent QUIC client (aioquic, from PyPI) against a Ketch broker.

Completes a handshake (TLS 1.3, ALPN ketch/1, the broker's CA), authenticates with a token
on one stream, lists topics on another, and prints what it saw as one JSON object:

    python aioquic_client.py HOST PORT CA_FILE TOKEN

Proof that the broker speaks standard QUIC, not only quinn to quinn. The frame layout is
protocol/PROTOCOL.md's: u32 length, then u16 api key + u16 version (requests) or u16 error
code (responses), then the body; strings are u16 length + UTF-8, arrays u32 count.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import struct
import sys

from aioquic.asyncio import connect
from aioquic.quic.configuration import QuicConfiguration

AUTHENTICATE = 22
LIST_TOPICS = 3


def string(text: str) -> bytes:
    data = text.encode()
    return struct.pack(">H", len(data)) + data


def request(api_key: int, body: bytes) -> bytes:
    payload = struct.pack(">HH", api_key, 0) + body
    return struct.pack(">I", len(payload)) + payload


class Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def take(self, n: int) -> bytes:
        if self.at + n > len(self.data):
            raise ValueError("truncated response")
        chunk = self.data[self.at : self.at + n]
        self.at += n
        return chunk

    def u16(self) -> int:
        return int(struct.unpack(">H", self.take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def string(self) -> str:
        return self.take(self.u16()).decode()


def response(frame: bytes) -> tuple[int, Reader]:
    reader = Reader(frame)
    length = reader.u32()
    if length != len(frame) - 4:
        raise ValueError(f"frame says {length} bytes, has {len(frame) - 4}")
    return reader.u16(), reader


async def call(protocol, frame: bytes) -> bytes:
    stream_reader, stream_writer = await protocol.create_stream()
    stream_writer.write(frame)
    stream_writer.write_eof()
    return await asyncio.wait_for(stream_reader.read(), timeout=10)


async def main(host: str, port: int, ca: str, token: str) -> dict:
    configuration = QuicConfiguration(
        is_client=True, alpn_protocols=["ketch/1"], server_name="localhost"
    )
    configuration.verify_mode = ssl.CERT_REQUIRED
    configuration.load_verify_locations(cafile=ca)
    seen: dict = {}
    async with connect(host, port, configuration=configuration) as protocol:
        seen["alpn"] = protocol._quic.tls.alpn_negotiated
        code, reader = response(
            await call(protocol, request(AUTHENTICATE, string("token") + string(token)))
        )
        seen["authenticate_code"] = code
        # The principal when it succeeded, the broker's message when it did not.
        seen["principal" if code == 0 else "authenticate_message"] = reader.string()
        code, reader = response(await call(protocol, request(LIST_TOPICS, b"")))
        seen["list_topics_code"] = code
        if code == 0:
            topics = []
            for _ in range(reader.u32()):
                name = reader.string()
                reader.u32()  # partitions
                reader.u16()  # replication factor
                topics.append(name)
            seen["topics"] = topics
        else:
            seen["message"] = reader.string()
    return seen


if __name__ == "__main__":
    host, port, ca, token = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    print(json.dumps(asyncio.run(asyncio.wait_for(main(host, port, ca, token), timeout=30))))
