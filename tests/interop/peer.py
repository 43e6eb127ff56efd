"""A small patio wire-protocol peer, written from PROTOCOL.md.

Only the standard library and msgpack (Debian: python3-msgpack). It knows the
framing (section 2), packet types (3), serials (4), the handshake in both
roles with the BLAKE2s digest and the server proof (5, 6), discovery (5.1),
and calls with CallRequest / exception ext values (7). It is deliberately
independent of examples/python/patio_msgpack.py, which the tests check
against it.

Everything is synchronous and single-threaded: a test drives one or more
connections step by step and can look at every frame's exact bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import select
import socket
import struct
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import msgpack

# ---- section 2/3: framing and packet types ---------------------------------

HEADER = struct.Struct("!bII")
HEADER_SIZE = HEADER.size  # 9

AUTH_DIGEST = 0
AUTH_REQUEST = 1
AUTH_RESPONSE = 2  # reserved, never sent by a correct peer
AUTH_OK = 3
DISCOVER_REQUEST = 5
DISCOVER_RESPONSE = 6
REQUEST = 10
RESPONSE = 20
ERROR = 30

TYPE_NAMES = {
    AUTH_DIGEST: "AUTH_DIGEST", AUTH_REQUEST: "AUTH_REQUEST",
    AUTH_RESPONSE: "AUTH_RESPONSE", AUTH_OK: "AUTH_OK",
    DISCOVER_REQUEST: "DISCOVER_REQUEST", DISCOVER_RESPONSE: "DISCOVER_RESPONSE",
    REQUEST: "REQUEST", RESPONSE: "RESPONSE", ERROR: "ERROR",
}

NIL = b"\xc0"
PROOF_PERSON = b"patio-ok"
SERIAL_MAX = 4294967294  # 0 and 4294967295 are never sent


def frame(ptype: int, serial: int, payload: bytes) -> bytes:
    return HEADER.pack(ptype, len(payload), serial) + payload


# ---- section 6: digest and proof -------------------------------------------

def auth_digest(p: bytes, key: bytes, salt4: bytes) -> bytes:
    return hashlib.blake2s(p, key=key, salt=salt4).digest()


def server_proof(areq_payload: bytes, key: bytes, salt4: bytes) -> bytes:
    return hashlib.blake2s(
        areq_payload, key=key, salt=salt4, person=PROOF_PERSON,
    ).digest()


def auth_request_payload(p: bytes, key: bytes, salt4: bytes) -> bytes:
    """The 61-byte AUTH_REQUEST payload a patio.h client sends (for 18-byte P)."""
    return (
        b"\x93\xc4\x04" + salt4 + b"\xc4\x20" + auth_digest(p, key, salt4)
        + b"\xc4" + bytes([len(p)]) + p
    )


# ---- section 7: values ------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Request:
    func: str
    args: list
    kwargs: dict
    timeout: Any = None


@dataclasses.dataclass(frozen=True)
class Exc:
    name: str
    message: str


class DecodeError(ValueError):
    pass


def _default(obj: Any) -> Any:
    if isinstance(obj, Request):
        return msgpack.ExtType(1, pack([obj.func, list(obj.args), obj.kwargs, obj.timeout]))
    if isinstance(obj, Exc):
        return msgpack.ExtType(2, pack([obj.name, obj.message]))
    raise TypeError(f"cannot encode {type(obj).__name__}")


def pack(value: Any) -> bytes:
    return msgpack.packb(value, default=_default, use_bin_type=True)


def _ext_hook(code: int, data: bytes) -> Any:
    body = unpack(data)
    if code == 1:
        if (
            not isinstance(body, list) or len(body) != 4
            or not isinstance(body[0], str) or not isinstance(body[1], list)
            or not isinstance(body[2], dict)
            or not all(isinstance(k, str) for k in body[2])
            or isinstance(body[3], bool)
            or not (body[3] is None or isinstance(body[3], (int, float)))
        ):
            raise DecodeError(f"bad CallRequest body {body!r}")
        return Request(*body)
    if code == 2:
        if (
            not isinstance(body, list) or len(body) != 2
            or not all(isinstance(x, str) for x in body)
        ):
            raise DecodeError(f"bad exception body {body!r}")
        return Exc(*body)
    raise DecodeError(f"unexpected ext type {code}")


def unpack(data: bytes) -> Any:
    try:
        value = msgpack.unpackb(
            data, raw=False, strict_map_key=False, use_list=True,
            ext_hook=_ext_hook, timestamp=0,
        )
    except DecodeError:
        raise
    except Exception as e:
        raise DecodeError(f"{type(e).__name__}: {e}") from e
    return value


# ---- connections ------------------------------------------------------------

class Closed(Exception):
    """The peer closed the connection (EOF or reset)."""

    def __init__(self, partial: bytes = b""):
        super().__init__(f"connection closed ({len(partial)} bytes of a partial read)")
        self.partial = partial


@dataclasses.dataclass
class Frame:
    type: int
    size: int
    serial: int
    payload: bytes

    @property
    def raw(self) -> bytes:
        return HEADER.pack(self.type, self.size, self.serial) + self.payload

    @property
    def value(self) -> Any:
        return unpack(self.payload)

    def __repr__(self) -> str:
        name = TYPE_NAMES.get(self.type, str(self.type))
        return f"Frame({name}, serial={self.serial}, payload={self.payload.hex()})"


class Conn:
    """One TCP connection with a receive buffer and a serial counter."""

    def __init__(self, sock: socket.socket, first_serial: int = 1):
        self.sock = sock
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self._next = first_serial
        self.pending: set = set()  # serials of our REQUESTs awaiting an answer
        self.log: List[Tuple[str, Frame]] = []  # ("in"/"out", frame)

    @classmethod
    def connect(cls, host: str, port: int, timeout: float = 5.0, **kw) -> "Conn":
        sock = socket.create_connection((host, port), timeout=timeout)
        return cls(sock, **kw)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    # -- serials (section 4): skip 0, 4294967295 and anything still pending
    def next_serial(self) -> int:
        while True:
            s = self._next
            self._next = 1 if s >= SERIAL_MAX else s + 1
            if s not in self.pending:
                return s

    # -- sending
    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, ptype: int, payload: bytes, serial: Optional[int] = None) -> int:
        if serial is None:
            serial = self.next_serial()
        f = Frame(ptype, len(payload), serial, payload)
        self.log.append(("out", f))
        self.sock.sendall(f.raw)
        return serial

    # -- receiving
    def _fill(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no data in time")
        ready, _, _ = select.select([self.sock], [], [], left)
        if not ready:
            raise TimeoutError("no data in time")
        try:
            chunk = self.sock.recv(1 << 20)
        except (ConnectionResetError, BrokenPipeError):
            chunk = b""
        if not chunk:
            partial, self.buf = self.buf, b""
            raise Closed(partial)
        self.buf += chunk

    def recv_exact(self, n: int, timeout: float = 5.0) -> bytes:
        deadline = time.monotonic() + timeout
        while len(self.buf) < n:
            self._fill(deadline)
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def recv(self, timeout: float = 5.0, max_size: int = 1 << 26) -> Frame:
        deadline = time.monotonic() + timeout
        while len(self.buf) < HEADER_SIZE:
            self._fill(deadline)
        ptype, size, serial = HEADER.unpack(self.buf[:HEADER_SIZE])
        if size > max_size:
            raise DecodeError(f"frame of {size} bytes")
        while len(self.buf) < HEADER_SIZE + size:
            self._fill(deadline)
        payload = self.buf[HEADER_SIZE:HEADER_SIZE + size]
        self.buf = self.buf[HEADER_SIZE + size:]
        f = Frame(ptype, size, serial, payload)
        self.log.append(("in", f))
        return f

    def wait_closed(self, timeout: float = 3.0) -> Tuple[bool, bytes]:
        """Reads until EOF. Returns (closed, every byte received meanwhile)."""
        got = self.buf
        self.buf = b""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False, got
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                return False, got
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                return True, got
            if not chunk:
                return True, got
            got += chunk


# ---- handshake (section 5) --------------------------------------------------

class HandshakeError(Exception):
    pass


@dataclasses.dataclass
class Handshake:
    """What a handshake exchanged, for tests to inspect."""
    frames: List[Tuple[str, Frame]]
    peer_names: List[str]
    token_payload: bytes = b""       # P, the AUTH_DIGEST payload
    auth_request: bytes = b""        # the AUTH_REQUEST payload
    auth_ok: bytes = b""             # the AUTH_OK payload
    salt: bytes = b""


def _finish_discovery(conn: Conn, names: List[str], own_serial: int,
                      timeout: float) -> List[str]:
    """Answers the peer's DISCOVER_REQUEST and waits for the answer to ours."""
    answered = False
    peer_names: Optional[List[str]] = None
    deadline = time.monotonic() + timeout
    while not (answered and peer_names is not None):
        f = conn.recv(max(0.01, deadline - time.monotonic()))
        if f.type == DISCOVER_REQUEST and not answered:
            conn.send(DISCOVER_RESPONSE, pack(list(names)), serial=f.serial)
            answered = True
        elif f.type == DISCOVER_RESPONSE and peer_names is None:
            if f.serial != own_serial:
                raise HandshakeError(f"DISCOVER_RESPONSE serial {f.serial}, expected {own_serial}")
            value = f.value
            if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
                raise HandshakeError(f"discovery answer is not an array of str: {value!r}")
            peer_names = value
        else:
            raise HandshakeError(f"unexpected frame during discovery: {f!r}")
    return peer_names


def client_handshake(conn: Conn, key: bytes, names: List[str] = (),
                     salt: Optional[bytes] = None, require_proof: bool = True,
                     timeout: float = 5.0) -> Handshake:
    """The client role: answer the challenge, check AUTH_OK, discover."""
    f = conn.recv(timeout)
    if f.type != AUTH_DIGEST:
        raise HandshakeError(f"first frame is not AUTH_DIGEST: {f!r}")
    p = f.payload
    salt = os.urandom(4) if salt is None else salt
    areq = auth_request_payload(p, key, salt)
    conn.send(AUTH_REQUEST, areq)
    ok = conn.recv(timeout)
    if ok.type != AUTH_OK:
        raise HandshakeError(f"expected AUTH_OK, got {ok!r}")
    if ok.payload == NIL:
        if require_proof:
            raise HandshakeError("AUTH_OK without a proof")
    elif ok.payload[:2] == b"\xc4\x20" and len(ok.payload) == 34:
        if not hmac.compare_digest(ok.payload[2:], server_proof(areq, key, salt)):
            raise HandshakeError("server proof does not verify")
    else:
        raise HandshakeError(f"AUTH_OK payload {ok.payload.hex()}")
    own = conn.send(DISCOVER_REQUEST, NIL)
    peer_names = _finish_discovery(conn, list(names), own, timeout)
    return Handshake(list(conn.log), peer_names, p, areq, ok.payload, salt)


def server_handshake(conn: Conn, key: bytes, names: List[str] = (),
                     token: Optional[bytes] = None, proof: str = "nil",
                     strict_request_form: bool = True,
                     timeout: float = 5.0) -> Handshake:
    """The server role: challenge, verify, AUTH_OK, discover.

    proof: "nil" answers AUTH_OK with nil as Python patio does, "proof" with
    the patio.h proof, "bad" with a wrong proof. On a bad digest the
    connection is closed and HandshakeError raised.
    """
    token = os.urandom(16) if token is None else token
    p = pack(token)
    conn.send(AUTH_DIGEST, p)
    f = conn.recv(timeout, max_size=1024)
    if f.type != AUTH_REQUEST:
        raise HandshakeError(f"expected AUTH_REQUEST, got {f!r}")
    if strict_request_form and (
        len(f.payload) != 61 or f.payload[:3] != b"\x93\xc4\x04"
        or f.payload[7:9] != b"\xc4\x20" or f.payload[41:43] != b"\xc4\x12"
    ):
        raise HandshakeError(f"AUTH_REQUEST not in the 61-byte form: {f.payload.hex()}")
    value = unpack(f.payload)
    if (
        not isinstance(value, list) or len(value) != 3
        or not all(isinstance(x, bytes) for x in value)
    ):
        raise HandshakeError(f"AUTH_REQUEST is not [bin, bin, bin]: {value!r}")
    salt, digest, echoed = value
    if echoed != p or len(salt) != 4 or not hmac.compare_digest(digest, auth_digest(p, key, salt)):
        conn.close()
        raise HandshakeError("authentication failed")
    if proof == "nil":
        ok = NIL
    elif proof == "proof":
        ok = b"\xc4\x20" + server_proof(f.payload, key, salt)
    else:
        ok = b"\xc4\x20" + bytes(32)
    conn.send(AUTH_OK, ok)
    own = conn.send(DISCOVER_REQUEST, NIL)
    peer_names = _finish_discovery(conn, list(names), own, timeout)
    return Handshake(list(conn.log), peer_names, p, f.payload, ok, salt)


# ---- calls (section 7) -----------------------------------------------------

Handler = Callable[..., Any]


class Session:
    """A connection after the handshake: calls out, answers calls in."""

    def __init__(self, conn: Conn, handlers: Optional[Dict[str, Handler]] = None):
        self.conn = conn
        self.handlers = dict(handlers or {})
        self.results: Dict[int, Frame] = {}
        self.requests_seen: List[Frame] = []

    def start_call(self, func: str, *args: Any, timeout: Any = None,
                   kwargs: Optional[dict] = None) -> int:
        serial = self.conn.next_serial()
        self.conn.pending.add(serial)
        self.conn.send(REQUEST, pack(Request(func, list(args), kwargs or {}, timeout)),
                       serial=serial)
        return serial

    def answer(self, f: Frame) -> None:
        """Executes one incoming REQUEST and sends its RESPONSE or ERROR."""
        self.requests_seen.append(f)
        try:
            req = unpack(f.payload)
        except DecodeError as e:
            self.conn.send(ERROR, pack(Exc("patio_msgpack.SerializationError", str(e))), f.serial)
            return
        if not isinstance(req, Request):
            self.conn.send(ERROR, pack(Exc("AttributeError", "not a CallRequest")), f.serial)
            return
        fn = self.handlers.get(req.func)
        if fn is None:
            self.conn.send(ERROR, pack(Exc("KeyError", req.func)), f.serial)
            return
        try:
            result = fn(*req.args, **req.kwargs)
        except Exception as e:
            msg = e.args[0] if len(e.args) == 1 and isinstance(e.args[0], str) else str(e)
            self.conn.send(ERROR, pack(Exc(type(e).__name__, msg)), f.serial)
            return
        self.conn.send(RESPONSE, pack(result), f.serial)

    def pump(self, timeout: float) -> Frame:
        """Reads one frame and handles it; returns it."""
        f = self.conn.recv(timeout)
        if f.type == REQUEST:
            self.answer(f)
        elif f.type in (RESPONSE, ERROR):
            if f.serial not in self.conn.pending:
                raise HandshakeError(f"answer for a serial not pending: {f!r}")
            self.conn.pending.discard(f.serial)
            self.results[f.serial] = f
        elif f.type == DISCOVER_REQUEST:
            self.conn.send(DISCOVER_RESPONSE, pack(list(self.handlers)), f.serial)
        else:
            raise HandshakeError(f"unexpected frame {f!r}")
        return f

    def wait(self, serial: int, timeout: float = 5.0) -> Frame:
        deadline = time.monotonic() + timeout
        while serial not in self.results:
            self.pump(max(0.01, deadline - time.monotonic()))
        return self.results.pop(serial)

    def call(self, func: str, *args: Any, timeout: Any = None,
             kwargs: Optional[dict] = None, wait: float = 5.0) -> Frame:
        return self.wait(self.start_call(func, *args, timeout=timeout, kwargs=kwargs), wait)

    def serve_until(self, done: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("condition not reached")
            try:
                self.pump(min(left, 0.2))
            except TimeoutError:
                pass
