"""A minimal DICOM requester over a plain socket, for sending what no well-behaved library
would: command sets and data sets mutated byte by byte (PS3.8 9.3 PDUs, PS3.7 6.3 messages)."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"


def _item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(value)) + value


def _uid(value: str) -> bytes:
    data = value.encode("ascii")
    return data + b"\x00" if len(data) % 2 else data


def element(element: int, value: bytes) -> bytes:
    """One command element, Implicit VR Little Endian, group 0000."""
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def command_set(elements: list[tuple[int, bytes]]) -> bytes:
    body = b"".join(element(tag, value) for tag, value in elements)
    return element(0x0000, struct.pack("<I", len(body))) + body


def store_request(sop_class: bytes, sop_instance: bytes, message_id: int) -> bytes:
    """A C-STORE-RQ command set with the UID values as given (not checked, not padded)."""
    return command_set(
        [
            (0x0002, sop_class),
            (0x0100, struct.pack("<H", 0x0001)),
            (0x0110, struct.pack("<H", message_id)),
            (0x0700, struct.pack("<H", 0x0002)),
            (0x0800, struct.pack("<H", 0x0001)),
            (0x1000, sop_instance),
        ]
    )


class Aborted(Exception):
    """The peer aborted the association or closed the connection."""


@dataclass
class RawAssociation:
    """One association proposing ``sop_class`` in ``transfer_syntax`` as context 1."""

    sock: socket.socket

    @classmethod
    def open(
        cls, port: int, sop_class: str, transfer_syntax: str, called: str = "NNUNET_NODE"
    ) -> RawAssociation:
        sock, kind = cls.request(port, sop_class, transfer_syntax, called)
        if kind != 0x02:
            sock.close()
            raise Aborted(f"association not accepted (PDU type 0x{kind:02X})")
        return cls(sock)

    @classmethod
    def request(
        cls,
        port: int,
        sop_class: str,
        transfer_syntax: str,
        called: str = "NNUNET_NODE",
        calling: str = "FUZZER",
    ) -> tuple[socket.socket, int]:
        """Send an A-ASSOCIATE-RQ; the open socket and the type of the PDU that answered it
        (0x02 A-ASSOCIATE-AC, 0x03 -RJ, 0x07 A-ABORT)."""
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        context = struct.pack(">BBBB", 1, 0, 0, 0) + _item(0x30, _uid(sop_class))
        context += _item(0x40, _uid(transfer_syntax))
        user = _item(0x51, struct.pack(">I", 65536)) + _item(0x52, _uid("1.2.3.4.5.6"))
        body = struct.pack(">HH", 1, 0) + called.ljust(16).encode() + calling.ljust(16).encode()
        body += b"\x00" * 32 + _item(0x10, APPLICATION_CONTEXT) + _item(0x20, context)
        body += _item(0x50, user)
        sock.sendall(struct.pack(">BBI", 0x01, 0, len(body)) + body)
        kind, _ = cls._read_pdu(sock)
        return sock, kind

    @staticmethod
    def _read_exact(sock: socket.socket, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise Aborted("connection closed")
            data += chunk
        return bytes(data)

    @classmethod
    def _read_pdu(cls, sock: socket.socket) -> tuple[int, bytes]:
        kind, _, length = struct.unpack(">BBI", cls._read_exact(sock, 6))
        return kind, cls._read_exact(sock, length)

    def send_message(self, command: bytes, data_set: bytes, fragment: int = 16384) -> None:
        """Command and data set as P-DATA-TF PDUs of one PDV each (context 1)."""
        pdus = [(0x03, command)]
        chunks = [data_set[i : i + fragment] for i in range(0, len(data_set), fragment)] or [b""]
        pdus += [(0x02 if i == len(chunks) - 1 else 0x00, c) for i, c in enumerate(chunks)]
        for control, chunk in pdus:
            pdv = struct.pack(">IBB", len(chunk) + 2, 1, control) + chunk
            self.sock.sendall(struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv)

    def read_status(self) -> int:
        """The Status (0000,0900) of the next response's command set."""
        command = b""
        while True:
            kind, data = self._read_pdu(self.sock)
            if kind != 0x04:
                raise Aborted(f"PDU type 0x{kind:02X} instead of a response")
            offset = 0
            while offset < len(data):
                (length,) = struct.unpack(">I", data[offset : offset + 4])
                control = data[offset + 5]
                value = data[offset + 6 : offset + 4 + length]
                offset += 4 + length
                if control & 0x01:
                    command += value
                    if control & 0x02:
                        return _status(command)

    def release(self) -> None:
        try:
            self.sock.sendall(struct.pack(">BBI", 0x05, 0, 4) + b"\x00" * 4)
            self._read_pdu(self.sock)
        except (OSError, Aborted):
            pass
        finally:
            self.sock.close()


def _status(command: bytes) -> int:
    offset = 0
    while offset + 8 <= len(command):
        group, elem, length = struct.unpack("<HHI", command[offset : offset + 8])
        if (group, elem) == (0x0000, 0x0900):
            return int(struct.unpack("<H", command[offset + 8 : offset + 10])[0])
        offset += 8 + length
    raise AssertionError(f"no Status in the response's command set {command!r}")
