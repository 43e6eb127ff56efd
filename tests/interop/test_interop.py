"""Interoperability tests: a Python peer (peer.py) against the C examples.

    python3 tests/interop/test_interop.py --bin DIR [--filter TEXT]

DIR holds tcp_server, tcp_client, tcp_server_caller, tcp_client_worker and
mesh built from examples/. Prints "ok NAME" or "FAIL NAME: reason" per case
and ends with "cases: N passed, M failed". Every process it starts is
stopped (by its pid) before it exits, also on SIGTERM.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import traceback
from typing import Any, Callable, Dict, List, Optional

sys.dont_write_bytecode = True  # keep __pycache__ out of the source tree

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

import peer  # noqa: E402
from peer import (  # noqa: E402
    AUTH_DIGEST, AUTH_OK, AUTH_REQUEST, DISCOVER_REQUEST, DISCOVER_RESPONSE,
    ERROR, NIL, REQUEST, RESPONSE, Closed, Conn, Exc, Request, Session,
    client_handshake, frame, pack, server_handshake,
)

KEY = b"secret-key"
NAMES = ["mul", "div", "sleep", "echo"]
H = bytes.fromhex

# Section 10's eight values, as Python sends them.
SECTION10_VALUES = [None, True, -1, 1.5, "é", b"\x01\x02", [1], {"k": "v"}]

# Section 7.6: (description, value builder taking the module's classes, hex)
GOLDEN = [
    ("None", lambda m: None, "c0"),
    ("6", lambda m: 6, "06"),
    ("names", lambda m: ["mul", "div", "sleep", "echo"],
     "94 a36d756c a3646976 a5736c656570 a46563686f"),
    ("token", lambda m: bytes(16), "c4 10 00000000000000000000000000000000"),
    ("CallRequest mul", lambda m: m.CallRequest("mul", (1, 2, 3), {}, None),
     "c7 0b 01 94 a36d756c 93010203 80 c0"),
    ("CallRequest sleep", lambda m: m.CallRequest("sleep", (0.5,), {"x": 1}, 0.1),
     "c7 1e 01 94 a5736c656570 91 cb3fe0000000000000 81 a178 01 cb3fb999999999999a"),
    ("CallRequest kw", lambda m: m.CallRequest("kw", (1,), {"a": None}, None),
     "c7 0b 01 94 a26b77 91 01 81 a161 c0 c0"),
    ("CallRequest abc", lambda m: m.CallRequest("abc", (), {}, None),
     "d7 01 94 a3616263 90 80 c0"),
    ("ZeroDivisionError", lambda m: ZeroDivisionError("division by zero"),
     "c7 24 02 92 b15a65726f4469766973696f6e4572726f72 b06469766973696f6e206279207a65726f"),
    ("TimeoutError", lambda m: TimeoutError(), "c7 0f 02 92 ac54696d656f75744572726f72 a0"),
    ("KeyError", lambda m: KeyError("nosuch"), "c7 11 02 92 a84b65794572726f72 a66e6f73756368"),
    ("E", lambda m: m.RemoteError("E", ""), "d6 02 92 a145 a0"),
]

def hexb(s: str) -> bytes:
    return bytes.fromhex(s.replace(" ", ""))

# ---- a tiny harness ---------------------------------------------------------

CASES: List[tuple] = []

def case(name: str, needs: tuple = ()):
    def register(fn):
        CASES.append((name, fn, needs))
        return fn
    return register

class Failure(AssertionError):
    pass

def check(cond: Any, what: str) -> None:
    if not cond:
        raise Failure(what)

def equal(got: Any, want: Any, what: str) -> None:
    if got != want:
        if isinstance(got, (bytes, bytearray)) and isinstance(want, (bytes, bytearray)):
            raise Failure(f"{what}: got {bytes(got).hex()} want {bytes(want).hex()}")
        raise Failure(f"{what}: got {got!r} want {want!r}")

# ---- processes ---------------------------------------------------------------

PROCS: List["Proc"] = []
PID_FILE = ""  # every child's pid is appended here, for the caller to clean up
SANITIZER_MARKERS = ("ERROR: AddressSanitizer", "WARNING: ThreadSanitizer",
                     "ERROR: LeakSanitizer", "runtime error:")
BIN = ""

class Proc:
    """A child process with its stdout and stderr collected by threads."""

    def __init__(self, name: str, *args: str):
        path = os.path.join(BIN, name)
        self.name = name
        self.p = subprocess.Popen(
            [path, *args], stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        PROCS.append(self)
        if PID_FILE:
            with open(PID_FILE, "a") as f:
                f.write(f"{self.p.pid}\n")
        self.out: List[str] = []
        self.err: List[str] = []
        self.cv = threading.Condition()
        for stream, lines in ((self.p.stdout, self.out), (self.p.stderr, self.err)):
            threading.Thread(target=self._reader, args=(stream, lines), daemon=True).start()

    def _reader(self, stream, lines: List[str]) -> None:
        for raw in iter(stream.readline, b""):
            with self.cv:
                lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self.cv.notify_all()
        with self.cv:
            self.cv.notify_all()

    def wait_for(self, pred: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.cv:
            while not pred():
                left = deadline - time.monotonic()
                if left <= 0 or (self.p.poll() is not None and not pred()):
                    # a dead process can still have unread output: one more look
                    self.cv.wait(0.05)
                    return pred()
                self.cv.wait(min(left, 0.1))
            return True

    def wait_line(self, text: str, timeout: float = 10.0, stream: str = "out") -> bool:
        lines = self.out if stream == "out" else self.err
        return self.wait_for(lambda: any(text in ln for ln in lines), timeout)

    def wait_exit(self, timeout: float) -> Optional[int]:
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 5.0) -> Optional[int]:
        """SIGTERM, then SIGKILL if it does not exit. Returns the exit code."""
        if self.p.poll() is None:
            try:
                self.p.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            if self.wait_exit(timeout) is None:
                self.p.kill()
                self.p.wait()
                return None
        return self.p.returncode

    def describe(self) -> str:
        return f"{self.name} rc={self.p.poll()} stdout={self.out[-5:]} stderr={self.err[-5:]}"

def stop_all() -> None:
    for proc in PROCS:
        if proc.p.poll() is None:
            proc.p.kill()
            proc.p.wait()

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

def start_listening(name: str, *args: str, attempts: int = 5) -> tuple:
    """Starts a program that takes --port and prints "ready"; retries ports."""
    last = None
    for _ in range(attempts):
        port = free_port()
        proc = Proc(name, "--port", str(port), *args)
        if proc.wait_line("ready", 10.0):
            return proc, port
        proc.stop(1.0)
        last = proc
    raise Failure(f"{name} did not start: {last.describe() if last else ''}")

def run(name: str, *args: str, timeout: float = 20.0) -> "Proc":
    proc = Proc(name, *args)
    if proc.wait_exit(timeout) is None:
        proc.stop(1.0)
        raise Failure(f"{name} {' '.join(args)} did not finish in {timeout} s")
    proc.wait_for(lambda: True, 0.1)
    time.sleep(0.05)  # let the reader threads drain the pipes
    return proc

class PyServer:
    """A listening socket on an ephemeral port; each accepted connection is
    given to `handler(conn)` on a thread of its own."""

    def __init__(self, handler: Callable[[Conn], None], first_serial: int = 1, tls=None):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        if tls is not None:  # an ssl.SSLContext: accept() then does the TLS handshake
            self.sock = tls.wrap_socket(self.sock, server_side=True)
        self.port = self.sock.getsockname()[1]
        self.handler = handler
        self.first_serial = first_serial
        self.errors: List[str] = []
        self.accepted = 0
        self.closed = False
        self.conns: List[Conn] = []
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def _accept_loop(self) -> None:
        while not self.closed:
            try:
                sock, _ = self.sock.accept()
            except OSError:
                return
            sock.settimeout(None)
            self.accepted += 1
            conn = Conn(sock, first_serial=self.first_serial)
            self.conns.append(conn)
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: Conn) -> None:
        try:
            self.handler(conn)
        except Exception as e:  # recorded; the test decides what it means
            self.errors.append(f"{type(e).__name__}: {e}")
        finally:
            conn.close()

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass
        for c in self.conns:
            c.close()

# ---- the C server, shared by the cases that need it ---------------------------

SERVER: Dict[str, Any] = {}

def c_server() -> int:
    proc = SERVER.get("proc")
    if proc is None or proc.p.poll() is not None:
        proc, port = start_listening(
            "tcp_server", "--key", KEY.decode(), "--handshake-timeout", "2",
        )
        SERVER.update(proc=proc, port=port)
    return SERVER["port"]

def connect_ready(names=(), key=KEY) -> tuple:
    conn = Conn.connect("127.0.0.1", c_server())
    hs = client_handshake(conn, key, names)
    return conn, hs, Session(conn, {})

def expect_closed(conn: Conn, what: str, timeout: float = 3.0, allow_bytes: bool = False) -> None:
    closed, got = conn.wait_closed(timeout)
    check(closed, f"{what}: connection still open after {timeout} s")
    if not allow_bytes:
        equal(got, b"", f"{what}: bytes sent before closing")

def good_connection_works(conn: Session, what: str) -> None:
    f = conn.call("mul", 6, 7)
    equal((f.type, f.payload), (RESPONSE, H("2a")), f"{what}: mul on the good connection")

# ---- the serializer example -------------------------------------------------

def load_serializer():
    path = os.path.join(ROOT, "examples", "python", "patio_msgpack.py")
    spec = importlib.util.spec_from_file_location("patio_msgpack", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["patio_msgpack"] = mod
    spec.loader.exec_module(mod)
    return mod

@case("serializer_golden_encodings")
def _():
    m = load_serializer()
    s = m.MsgpackSerializer()
    for desc, build, want in GOLDEN:
        equal(s.pack(build(m)), hexb(want), f"MsgpackSerializer.pack({desc})")
    # the peer's own encoder, written separately, agrees
    equal(pack(Request("mul", [1, 2, 3], {}, None)), hexb(GOLDEN[4][2]), "peer CallRequest")
    equal(pack(Exc("KeyError", "nosuch")), hexb(GOLDEN[10][2]), "peer exception")

@case("serializer_round_trip")
def _():
    m = load_serializer()
    s = m.MsgpackSerializer()
    for v in SECTION10_VALUES + [2**64 - 1, -2**63, 0.1, [[], {}], {1: "int key"}, ""]:
        equal(s.unpack(s.pack(v)), v, f"round trip of {v!r}")
        equal(s.pack(v), pack(v), f"same bytes as the peer for {v!r}")
    equal(s.unpack(s.pack(tuple(SECTION10_VALUES))), SECTION10_VALUES, "tuple -> list")
    req = s.unpack(s.pack(m.CallRequest("sleep", (0.5,), {"x": 1}, 0.1)))
    check(isinstance(req, m.CallRequest), "CallRequest class back")
    equal((req.func, tuple(req.args), req.kwargs, req.timeout),
          ("sleep", (0.5,), {"x": 1}, 0.1), "CallRequest fields")
    e = s.unpack(hexb(GOLDEN[8][2]))
    check(type(e) is ZeroDivisionError and e.args == ("division by zero",), f"builtin back: {e!r}")
    e = s.unpack(hexb(GOLDEN[9][2]))
    check(type(e) is TimeoutError and e.args == (), f"TimeoutError() back: {e!r}")
    e = s.unpack(hexb(GOLDEN[10][2]))
    check(type(e) is KeyError and e.args == ("nosuch",), f"KeyError back: {e!r}")
    for name in ("myapp.QuotaExceeded", "NoSuchBuiltin", "SystemExit", "UnicodeDecodeError"):
        raw = pack(Exc(name, "why"))
        e = s.unpack(raw)
        check(isinstance(e, m.RemoteError) and isinstance(e, RuntimeError), f"{name} -> {e!r}")
        equal((e.type_name, e.message), (name, "why"), f"{name} fields kept")
        equal(s.pack(e), raw, f"{name} re-encodes to the same bytes")

    class Local(Exception):
        pass
    name, _ = m.exception_fields(Local("x"))
    check(name.endswith(".Local") and "." in name, f"non-builtin named module.QualName: {name}")
    equal(s.pack(ValueError(1, 2)), pack(Exc("ValueError", "(1, 2)")), "str(exc) for many args")
    nested = s.unpack(s.pack([KeyError("k"), {"e": TimeoutError()}]))
    check(type(nested[0]) is KeyError and type(nested[1]["e"]) is TimeoutError, "nested ext")
    equal(s.unpack(H("ca3fc00000")), 1.5, "float32 input")
    for form in ("c7 0b 01", "c8 000b 01", "c9 0000000b 01"):
        raw = hexb(form + " 94 a36d756c 93010203 80 c0")
        equal(s.unpack(raw).func, "mul", f"ext form {form}")

@case("serializer_rejects_bad_input")
def _():
    m = load_serializer()
    s = m.MsgpackSerializer()
    bad = {
        "timestamp ext -1": "d6 ff 00000000",
        "ext type 3": "d4 03 00",
        "trailing bytes": "c0 c0",
        "invalid utf-8": "a2 c3 28",
        "array as map key": "81 91 01 01",
        "map as map key": "81 80 01",
        "bool timeout": "c7 0b 01 94 a36d756c 93010203 80 c3",
        "str timeout": "c7 0c 01 94 a36d756c 93010203 80 a178",
        "non-str kwargs key": "c7 0c 01 94 a36d756c 93010203 81 01 01 c0",
        "3-element CallRequest": "c7 0a 01 93 a36d756c 93010203 80",
        "exception with int": "d6 02 92 a145 01",
        "reserved byte": "c1",
        "truncated": "92 01",
        "timestamp nested": "91 d6 ff 00000000",
    }
    for what, hx in bad.items():
        try:
            v = s.unpack(hexb(hx))
        except m.SerializationError as e:
            check(isinstance(e, ValueError), "SerializationError is a ValueError")
            continue
        raise Failure(f"{what} decoded to {v!r}")
    for obj in ({1, 2}, object(), 2**64, complex(1, 2)):
        try:
            s.pack(obj)
        except m.SerializationError:
            continue
        raise Failure(f"{obj!r} was encoded")

@case("digest_and_proof_vectors")
def _():
    p = hexb("c41000112233445566778899aabbccddeeff")
    equal(peer.auth_digest(p, KEY, H("deadbeef")),
          H("22c645ccb3f208b4ecc95a50091328c0724eadd1fac300148ccb4e4a74f68448"), "keyed")
    equal(peer.auth_digest(p, b"", H("deadbeef")),
          H("18d0c4a9b6d9df006ed89055fdc89578c571c89c14801061f33e950eab6265eb"), "unkeyed")
    equal(peer.auth_digest(b"", bytes(range(32)), H("01020304")),
          H("3bc2c8760b1159536adbdac58f3b7d5af9dc59abd8fdd32663ab49a2ae278df1"), "32-byte key")
    equal(peer.auth_digest(bytes(range(100)), b"k", bytes(4)),
          H("7165d196c9b27d426ef7a9ee375f78b569df99ca0ead1e829fe1ca514fd3d14f"), "100 bytes")
    areq = peer.auth_request_payload(p, KEY, H("deadbeef"))
    equal(frame(AUTH_REQUEST, 1, areq), hexb(
        "01 0000003d 00000001 93 c4 04 deadbeef c4 20 "
        "22c645ccb3f208b4ecc95a50091328c0724eadd1fac300148ccb4e4a74f68448 "
        "c4 12 c41000112233445566778899aabbccddeeff"), "frame #02")
    proof = peer.server_proof(areq, KEY, H("deadbeef"))
    equal(frame(AUTH_OK, 2, b"\xc4\x20" + proof), hexb(
        "03 00000022 00000002 c4 20 "
        "93b1f39a8508f1e39412064f90d5ee4d72e3d00a561106760a5609ad0d2885b8"), "proof frame")

@case("peer_against_itself")
def _():
    a, b = socket.socketpair()
    server_conn, client_conn = Conn(a), Conn(b)
    result: Dict[str, Any] = {}

    def serve():
        try:
            result["hs"] = server_handshake(server_conn, KEY, NAMES, proof="proof")
            sess = Session(server_conn, {"mul": lambda *xs: math.prod(xs)})
            sess.serve_until(lambda: len(sess.requests_seen) >= 1, 5.0)
        except Exception as e:
            result["error"] = e
    t = threading.Thread(target=serve)
    t.start()
    hs = client_handshake(client_conn, KEY, ["x"], require_proof=True)
    sess = Session(client_conn)
    f = sess.call("mul", 2, 3, 7)
    t.join(5)
    check("error" not in result, f"server side: {result.get('error')!r}")
    equal(hs.peer_names, NAMES, "names")
    equal(result["hs"].peer_names, ["x"], "names seen by the server")
    equal(f.value, 42, "mul")
    a.close()
    b.close()

# ---- Python client against the C server --------------------------------------

@case("c_server_handshake_bytes", needs=("tcp_server",))
def _():
    conn = Conn.connect("127.0.0.1", c_server())
    d = conn.recv()
    equal((d.type, d.size, d.serial), (AUTH_DIGEST, 18, 1), "AUTH_DIGEST header")
    equal(d.payload[:2], b"\xc4\x10", "AUTH_DIGEST payload is bin 16")
    salt = H("deadbeef")
    areq = peer.auth_request_payload(d.payload, KEY, salt)
    conn.send(AUTH_REQUEST, areq)
    ok = conn.recv()
    equal((ok.type, ok.size, ok.serial), (AUTH_OK, 34, 2), "AUTH_OK header")
    equal(ok.payload, b"\xc4\x20" + peer.server_proof(areq, KEY, salt), "AUTH_OK proof")
    dr = conn.recv()
    equal(dr.raw, frame(DISCOVER_REQUEST, 3, NIL), "DISCOVER_REQUEST frame")
    # nothing else may come before we answer discovery
    try:
        extra = conn.recv(0.3)
        raise Failure(f"unexpected frame before discovery: {extra!r}")
    except TimeoutError:
        pass
    conn.send(DISCOVER_REQUEST, NIL, serial=2)
    conn.send(DISCOVER_RESPONSE, pack(["cb"]), serial=3)
    resp = conn.recv()
    equal(resp.raw, frame(DISCOVER_RESPONSE, 2, hexb(GOLDEN[2][2])), "DISCOVER_RESPONSE frame")
    sess = Session(conn)
    conn._next = 3
    f = sess.call("mul", 1, 2, 3)
    equal(f.raw, hexb("14 00000001 00000003 06"), "frame #09")
    conn.close()

@case("c_server_calls_and_errors", needs=("tcp_server",))
def _():
    conn, _, s = connect_ready()
    equal(s.call("mul", 1, 2, 3).value, 6, "mul ints")
    equal(s.call("mul", 1.5, 2).value, 3.0, "mul float")
    equal(s.call("mul").value, 1, "mul()")
    equal(s.call("div", 1, 2).value, 0.5, "div")
    serial = s.start_call("div", 1, 0)
    f = s.wait(serial)
    equal(f.raw, frame(ERROR, serial, hexb(GOLDEN[8][2])), "ZeroDivisionError frame (#11)")
    f = s.call("nosuch", 1)
    equal((f.type, f.payload), (ERROR, hexb(GOLDEN[10][2])), "KeyError for an unknown function")
    f = s.call("mul", "x")
    check(f.type == ERROR and f.value.name == "TypeError", f"mul('x'): {f!r}")
    f = s.call("div", 1)
    check(f.type == ERROR and f.value.name == "TypeError", f"div(1): {f!r}")
    f = s.call("mul", 2**62, 4)
    check(f.type == ERROR and f.value.name == "OverflowError", f"overflow: {f!r}")
    f = s.call("echo", *SECTION10_VALUES, timeout=2.5)
    equal(f.type, RESPONSE, "echo answered")
    equal(f.payload, pack(SECTION10_VALUES), "echo of section 10 values, same bytes")
    extra = [2**64 - 1, -2**63, [[[]]], {1: {b"k": [None]}}, "x" * 300, b"\x00" * 70000]
    f = s.call("echo", *extra)
    equal(f.value, extra, "echo of edge values")
    f = s.call("echo", 1, kwargs={"a": 1})
    check(f.type == ERROR and f.value.name == "TypeError", f"echo with kwargs: {f!r}")
    equal(s.call("sleep", 0.01).payload, NIL, "sleep returns None")
    conn.close()

@case("c_server_pipelined_calls", needs=("tcp_server",))
def _():
    conn, _, s = connect_ready()
    n = 300
    batch = b""
    serials = []
    for i in range(n):
        serial = conn.next_serial()
        conn.pending.add(serial)
        serials.append(serial)
        batch += frame(REQUEST, serial, pack(Request("mul", [i, 2], {}, None)))
    conn.send_raw(batch)  # one write, 300 requests
    seen = {}
    while len(seen) < n:
        f = conn.recv(5.0)
        check(f.type == RESPONSE and f.serial in conn.pending, f"unexpected {f!r}")
        conn.pending.discard(f.serial)
        seen[f.serial] = f.value
    equal([seen[sr] for sr in serials], [2 * i for i in range(n)], "every answer matches")
    conn.close()

@case("c_server_callee_timeout", needs=("tcp_server",))
def _():
    conn, _, s = connect_ready()
    t0 = time.monotonic()
    f = s.call("sleep", 0.6, timeout=0.1)
    took = time.monotonic() - t0
    equal((f.type, f.payload), (ERROR, hexb(GOLDEN[9][2])), "TimeoutError after 0.1 s")
    check(took < 0.5, f"TimeoutError took {took:.3f} s")
    f = s.call("sleep", 0.01, timeout=0)
    equal((f.type, f.payload), (ERROR, hexb(GOLDEN[9][2])), "timeout 0 = already expired")
    f = s.call("sleep", 0.01, timeout=5)
    equal(f.payload, NIL, "int timeout accepted")
    f = s.call("sleep", 0.01, timeout=float("nan"))
    equal((f.type, f.payload), (ERROR, hexb(GOLDEN[9][2])), "NaN timeout = already expired")
    f = s.call("sleep", 0.01, timeout=float("inf"))
    equal(f.payload, NIL, "infinite timeout = no limit")
    good_connection_works(s, "after timeouts")
    conn.close()

@case("c_server_undecodable_request", needs=("tcp_server",))
def _():
    conn, _, s = connect_ready()
    for payload in (H("c1"), H("d4 03 00"), H("93 01 02 03"), H("c7 03 01 93 01 02")):
        serial = conn.next_serial()
        conn.pending.add(serial)
        conn.send(REQUEST, payload, serial)
        f = s.wait(serial)
        check(f.type == ERROR, f"{payload.hex()}: {f!r}")
        check(f.value.name in ("patio_msgpack.SerializationError", "AttributeError"),
              f"{payload.hex()}: error {f.value!r}")
    good_connection_works(s, "after undecodable requests")
    conn.close()

@case("c_server_rediscovery_and_python_style_serials", needs=("tcp_server",))
def _():
    # serials as a Python broker's shared counter might hand them out
    conn = Conn.connect("127.0.0.1", c_server(), first_serial=4294967290)
    client_handshake(conn, KEY, ["anything"])
    s = Session(conn)
    conn.send(DISCOVER_REQUEST, NIL, serial=77)
    f = conn.recv()
    equal(f.raw, frame(DISCOVER_RESPONSE, 77, hexb(GOLDEN[2][2])), "a later DISCOVER_REQUEST")
    for _ in range(6):  # crosses the wrap 4294967294 -> 1
        equal(s.call("mul", 3, 3).value, 9, f"mul with serial near wrap ({conn._next})")
    conn.close()

@case("c_server_python_patio_client_with_serializer", needs=("tcp_server",))
def _():
    """What Python patio 0.1.4 with MsgpackSerializer does, step by step."""
    m = load_serializer()
    ser = m.MsgpackSerializer()
    conn = Conn.connect("127.0.0.1", c_server())
    d = conn.recv()
    token = d.payload            # Python takes the raw payload as the token
    salt = os.urandom(4)
    digest = peer.auth_digest(token, KEY, salt)
    conn.send(AUTH_REQUEST, ser.pack((salt, digest, token)))
    ok = conn.recv()
    equal(ok.type, AUTH_OK, "AUTH_OK (payload ignored by Python)")
    conn.send(DISCOVER_REQUEST, ser.pack(None))
    names = None
    while names is None:
        f = conn.recv()
        if f.type == DISCOVER_REQUEST:
            conn.send(DISCOVER_RESPONSE, ser.pack(["py.fn"]), serial=f.serial)
        else:
            names = ser.unpack(f.payload)
    equal(names, NAMES, "names")
    serial = conn.send(REQUEST, ser.pack(m.CallRequest("mul", (1, 2, 3), {}, None)))
    f = conn.recv()
    equal((f.type, f.serial, ser.unpack(f.payload)), (RESPONSE, serial, 6), "mul")
    conn.send(REQUEST, ser.pack(m.CallRequest("div", (1, 0), {}, None)))
    e = ser.unpack(conn.recv().payload)
    check(type(e) is ZeroDivisionError and str(e) == "division by zero", f"div: {e!r}")
    conn.send(REQUEST, ser.pack(m.CallRequest("echo", tuple(SECTION10_VALUES), {}, 2.5)))
    equal(ser.unpack(conn.recv().payload), SECTION10_VALUES, "echo")
    conn.send(REQUEST, ser.pack(m.CallRequest("nosuch", (), {}, None)))
    e = ser.unpack(conn.recv().payload)
    check(type(e) is KeyError and e.args == ("nosuch",), f"nosuch: {e!r}")
    conn.close()

@case("c_server_wrong_key_or_replay_closes_silently", needs=("tcp_server",))
def _():
    conn = Conn.connect("127.0.0.1", c_server())
    d = conn.recv()
    conn.send(AUTH_REQUEST, peer.auth_request_payload(d.payload, b"wrong-key", os.urandom(4)))
    expect_closed(conn, "wrong key")
    # replay: a valid AUTH_REQUEST for another connection's token
    other = Conn.connect("127.0.0.1", c_server())
    foreign = other.recv().payload
    conn = Conn.connect("127.0.0.1", c_server())
    conn.recv()
    conn.send(AUTH_REQUEST, peer.auth_request_payload(foreign, KEY, os.urandom(4)))
    expect_closed(conn, "replayed token")
    other.close()
    # no key at all
    conn = Conn.connect("127.0.0.1", c_server())
    d = conn.recv()
    conn.send(AUTH_REQUEST, peer.auth_request_payload(d.payload, b"", os.urandom(4)))
    expect_closed(conn, "empty key")

@case("c_server_bad_frames_before_auth", needs=("tcp_server",))
def _():
    good, _, s = connect_ready()
    bad = {
        "oversize AUTH_REQUEST": struct.pack("!bII", AUTH_REQUEST, 2000, 1) + bytes(2000),
        "REQUEST first": frame(REQUEST, 1, pack(Request("mul", [1], {}, None))),
        "garbage": b"\xde\xad\xbe\xef" * 8,
        "AUTH_REQUEST not an array": frame(AUTH_REQUEST, 1, pack("x")),
    }
    for what, data in bad.items():
        conn = Conn.connect("127.0.0.1", c_server())
        conn.recv()
        conn.send_raw(data)
        expect_closed(conn, what)
        good_connection_works(s, what)
    conn = Conn.connect("127.0.0.1", c_server())
    conn.recv()
    t0 = time.monotonic()
    expect_closed(conn, "silent client (handshake deadline 2 s)", timeout=6.0)
    took = time.monotonic() - t0
    check(1.0 < took < 5.0, f"deadline after {took:.2f} s")
    good_connection_works(s, "after the deadline")
    good.close()

@case("c_server_bad_frames_after_handshake", needs=("tcp_server",))
def _():
    good, _, s = connect_ready()
    bad = {
        "oversize header": struct.pack("!bII", REQUEST, 0xFFFFFFFF, 5),
        "size over 16 MiB": struct.pack("!bII", REQUEST, 16 * 1024 * 1024 + 1, 5),
        "unknown type 7": frame(7, 5, NIL),
        "reserved AUTH_RESPONSE": frame(2, 5, NIL),
        "negative type": frame(-1, 5, NIL),
        "garbage": bytes(range(256)),
        "stray RESPONSE": frame(RESPONSE, 999, H("06")),
        "stray ERROR": frame(ERROR, 999, hexb(GOLDEN[10][2])),
        "serial 0 REQUEST": frame(REQUEST, 0, pack(Request("mul", [1], {}, None))),
        "AUTH_DIGEST after discovery": frame(AUTH_DIGEST, 5, pack(bytes(16))),
        "DISCOVER_RESPONSE after discovery": frame(DISCOVER_RESPONSE, 5, pack([])),
        "duplicate in-flight serial": (
            frame(REQUEST, 9, pack(Request("sleep", [0.5], {}, None)))
            + frame(REQUEST, 9, pack(Request("sleep", [0.5], {}, None)))),
    }
    for what, data in bad.items():
        conn, _, _ = connect_ready()
        conn.send_raw(data)
        expect_closed(conn, what)
        good_connection_works(s, what)
    good.close()

# ---- the C client against a Python server --------------------------------------

def py_server(names: List[str], handlers: Dict[str, Callable], proof: str = "nil",
              after=None, first_serial: int = 1, key: bytes = KEY, tls=None) -> PyServer:
    state: Dict[str, Any] = {"handshakes": [], "sessions": []}

    def handle(conn: Conn) -> None:
        hs = server_handshake(conn, key, names, proof=proof)
        state["handshakes"].append(hs)
        sess = Session(conn, handlers)
        state["sessions"].append(sess)
        if after:
            after(sess)
        else:
            while True:
                try:
                    sess.pump(30)
                except (Closed, TimeoutError):
                    return
    srv = PyServer(handle, first_serial=first_serial, tls=tls)
    srv.state = state
    return srv

def client(port: int, *args: str, key: bytes = KEY, timeout: float = 20.0) -> Proc:
    return run("tcp_client", "--port", str(port), "--key", key.decode(), *args,
               timeout=timeout)

def mul_handler(*xs):
    return math.prod(xs)

def div_handler(a, b):
    return a / b

def certs(name: str) -> str:
    return os.path.join(os.environ.get("INTEROP_CERTS", ""), name)

def tls_server_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certs("server.pem"), certs("server.key"))
    return ctx

@case("python_ssl_client_calls_c_tls_server", needs=("tls_server",))
def _():
    proc, port = start_listening(
        "tls_server", "--key", KEY.decode(), "--cert", certs("server.pem"),
        "--key-file", certs("server.key"),
    )
    try:
        ctx = ssl.create_default_context(cafile=certs("ca.pem"))
        raw = socket.create_connection(("127.0.0.1", port), timeout=5.0)
        tls = ctx.wrap_socket(raw, server_hostname="localhost")
        check(tls.version() in ("TLSv1.2", "TLSv1.3"), f"negotiated {tls.version()}")
        conn = Conn(tls)
        try:
            # the patio handshake (key auth, discovery) runs inside TLS
            client_handshake(conn, KEY, [])
            good_connection_works(Session(conn, {}), "through Python's ssl module")
        finally:
            conn.close()
        # a client that does not trust the server's CA is refused by TLS
        bad = ssl.create_default_context(cafile=certs("other_ca.pem"))
        raw = socket.create_connection(("127.0.0.1", port), timeout=5.0)
        try:
            bad.wrap_socket(raw, server_hostname="localhost")
            raise Failure("a server certificate from an untrusted CA was accepted")
        except ssl.SSLCertVerificationError:
            pass
        finally:
            raw.close()
    finally:
        proc.stop(2.0)

@case("c_tls_client_calls_python_ssl_server", needs=("tls_client",))
def _():
    srv = py_server(NAMES, {"mul": mul_handler, "div": div_handler}, tls=tls_server_context())
    try:
        p = run("tls_client", "--port", str(srv.port), "--key", KEY.decode(),
                "--ca", certs("ca.pem"), "--server-name", "localhost", "mul", "1", "2", "3")
        equal((p.p.returncode, p.out), (0, ["6"]), f"tls_client mul: {p.describe()}")
        p = run("tls_client", "--port", str(srv.port), "--key", KEY.decode(),
                "--ca", certs("other_ca.pem"), "--server-name", "localhost", "--timeout", "2",
                "mul", "1", "2", "3")
        check(p.p.returncode != 0, f"tls_client trusted a server of another CA: {p.describe()}")
    finally:
        srv.close()

@case("c_client_calls_python_server", needs=("tcp_client",))
def _():
    srv = py_server(NAMES, {"mul": mul_handler, "div": div_handler})
    try:
        p = client(srv.port, "mul", "1", "2", "3")
        equal((p.p.returncode, p.out), (0, ["6"]), f"tcp_client mul: {p.describe()}")
        hs = srv.state["handshakes"][0]
        equal(hs.peer_names, [], "the client offers no functions")
        equal([(f.type, f.serial) for d, f in hs.frames if d == "in"],
              [(AUTH_REQUEST, 1), (DISCOVER_REQUEST, 2), (DISCOVER_RESPONSE, 3)],
              "the client's handshake frames and serials")
        req = srv.state["sessions"][0].requests_seen[0]
        equal(req.serial, 3, "first REQUEST serial (after AUTH_REQUEST 1, DISCOVER_REQUEST 2)")
        equal(req.payload[:14], hexb("c7 13 01 94 a36d756c 93010203 80 cb"),
              "CallRequest bytes (float64 timeout)")
        equal(len(req.payload), 22, "CallRequest size")
        timeout = struct.unpack("!d", req.payload[14:])[0]
        check(0 < timeout <= 20, f"timeout {timeout}")
        p = client(srv.port, "div", "1", "0")
        equal((p.p.returncode, p.err, p.out), (1, ["ZeroDivisionError: division by zero"], []),
              f"tcp_client div 1 0: {p.describe()}")
        p = client(srv.port, "div", "1", "4")
        equal(p.out, ["0.25"], "div 1 4")
    finally:
        srv.close()

@case("c_client_argument_types_and_printing", needs=("tcp_client",))
def _():
    got: List[Any] = []
    extra = [b"\x01\x02", {"k": "v", 1: [None]}, "é", "it's", 'say "hi"', "tab\there",
             1e16, 1e-05, 100.0, -0.0, 0.1, [1, [2, [3]]], float("inf")]

    def echo(*args):
        got.append(list(args))
        return list(args) + extra
    srv = py_server(["echo", "err"], {"echo": echo, "err": lambda: Exc("KeyError", "nosuch")})
    try:
        argv = ["1", "-7", "2.5", "1e3", "abc", "None", "True", "False",
                "18446744073709551615", "inf", "0x10", "-", "9223372036854775807"]
        p = client(srv.port, "echo", *argv)
        want_args = [1, -7, 2.5, 1000.0, "abc", None, True, False, 2**64 - 1, "inf", "0x10",
                     "-", 2**63 - 1]
        equal(got[0], want_args, "arguments as Python received them")
        check(all(type(a) is type(b) for a, b in zip(got[0], want_args)), f"types: {got[0]!r}")
        equal(p.out, [repr(want_args + extra)], "printed like Python's repr")
        p = client(srv.port, "err")
        equal(p.out, ["KeyError('nosuch')"], "an exception value as a result")
    finally:
        srv.close()

@case("c_client_remote_errors_and_timeouts", needs=("tcp_client",))
def _():
    def slow():
        time.sleep(0.2)
        return 1
    srv = py_server(["ghost", "slow"], {"slow": slow})
    try:
        p = client(srv.port, "ghost")
        equal((p.p.returncode, p.err), (1, ["KeyError: ghost"]), f"ghost: {p.describe()}")
        t0 = time.monotonic()
        p = client(srv.port, "--timeout", "1", "nosuch")
        took = time.monotonic() - t0
        check(p.p.returncode == 1 and p.err and p.err[0].startswith("TimeoutError"),
              f"no route: {p.describe()}")
        check(took < 4, f"no route took {took:.2f} s")
    finally:
        srv.close()

@case("c_client_server_proof", needs=("tcp_client",))
def _():
    srv = py_server(["mul"], {"mul": mul_handler}, proof="proof")
    try:
        p = client(srv.port, "--require-proof", "mul", "2", "5")
        equal((p.p.returncode, p.out), (0, ["10"]), f"with a valid proof: {p.describe()}")
    finally:
        srv.close()
    for mode, args in (("bad", ()), ("nil", ("--require-proof",))):
        srv = py_server(["mul"], {"mul": mul_handler}, proof=mode)
        try:
            p = client(srv.port, "--timeout", "1.5", *args, "mul", "2")
            check(p.p.returncode == 1 and not p.out, f"proof={mode}: {p.describe()}")
            check(not srv.state["sessions"] and srv.errors and
                  all(e.startswith("Closed") for e in srv.errors),
                  f"proof={mode}: the client did not close at once: {srv.errors}")
        finally:
            srv.close()

@case("c_client_wrong_key_reconnects", needs=("tcp_client",))
def _():
    srv = py_server(["mul"], {"mul": mul_handler}, key=b"other-key")
    try:
        t0 = time.monotonic()
        p = client(srv.port, "--timeout", "2.5", "mul", "2")
        check(p.p.returncode == 1 and p.err and p.err[0].startswith("ConnectionError"),
              f"wrong key: {p.describe()}")
        check(time.monotonic() - t0 < 6, "gave up in time")
        check(srv.accepted >= 2, f"reconnected after a refused handshake ({srv.accepted} tries)")
    finally:
        srv.close()

@case("c_client_closes_on_bad_frame", needs=("tcp_client",))
def _():
    closed: Dict[str, Any] = {}

    def after(sess: Session) -> None:
        f = sess.conn.recv(10)
        check(f.type == REQUEST, f"expected a REQUEST, got {f!r}")
        sess.conn.send(7, NIL)  # an unknown packet type
        closed["eof"], closed["bytes"] = sess.conn.wait_closed(3)
    srv = py_server(["sleep"], {}, after=after)
    try:
        p = client(srv.port, "--timeout", "4", "sleep", "1")
        check(closed.get("eof"), f"the C client did not close: {closed} {srv.errors}")
        check(p.p.returncode == 1, f"the call failed: {p.describe()}")
    finally:
        srv.close()


@case("c_client_call_fails_at_once_when_connection_drops", needs=("tcp_client",))
def _():
    def after(sess: Session) -> None:
        f = sess.conn.recv(10)
        check(f.type == REQUEST, f"expected a REQUEST, got {f!r}")
        # returning closes the connection with the call unanswered
    srv = py_server(["sleep"], {}, after=after)
    try:
        t0 = time.monotonic()
        p = client(srv.port, "--timeout", "8", "sleep", "5")
        took = time.monotonic() - t0
        check(p.p.returncode == 1 and p.err and p.err[0].startswith("ConnectionError"),
              f"connection lost: {p.describe()}")
        check(took < 3, f"the call failed only after {took:.2f} s")
    finally:
        srv.close()


@case("c_client_rejects_bad_challenges", needs=("tcp_client",))
def _():
    bad = {
        "oversize AUTH_DIGEST": frame(AUTH_DIGEST, 1, pack(bytes(2000))),
        "REQUEST first": frame(REQUEST, 1, pack(Request("mul", [1], {}, None))),
        "8-byte token": frame(AUTH_DIGEST, 1, pack(bytes(8))),
        "token as str": frame(AUTH_DIGEST, 1, pack("x" * 16)),
        "unknown type": frame(9, 1, NIL),
    }
    for what, data in bad.items():
        seen: Dict[str, Any] = {}

        def handle(conn: Conn, data=data, seen=seen) -> None:
            if "first" in seen:  # the reconnect: just hold it
                time.sleep(0.5)
                return
            seen["first"] = True
            conn.send_raw(data)
            seen["closed"], seen["got"] = conn.wait_closed(3)
        srv = PyServer(handle)
        try:
            p = client(srv.port, "--timeout", "1.5", "mul", "2")
            check(seen.get("closed") and seen.get("got") == b"",
                  f"{what}: the client did not close without answering: {seen}")
            check(p.p.returncode == 1, f"{what}: {p.describe()}")
        finally:
            srv.close()

@case("c_client_python_serials_near_wrap", needs=("tcp_client",))
def _():
    srv = py_server(["mul"], {"mul": mul_handler}, first_serial=4294967293)
    try:
        p = client(srv.port, "mul", "3", "4")
        equal((p.p.returncode, p.out), (0, ["12"]), f"{p.describe()}")
    finally:
        srv.close()

# ---- the C worker (server is caller) against a Python server -------------------

@case("c_worker_executes_python_calls", needs=("tcp_client_worker",))
def _():
    done = threading.Event()
    outcome: Dict[str, Any] = {}

    def after(sess: Session) -> None:
        try:
            serials = [sess.start_call("mul", i, i, timeout=5) for i in range(10)]
            outcome["squares"] = [sess.wait(sr).value for sr in serials]
            outcome["type"] = sess.call("mul", "x")
            outcome["nosuch"] = sess.call("nosuch")
            sr = sess.conn.next_serial()
            sess.conn.pending.add(sr)
            sess.conn.send(REQUEST, H("c1"), sr)
            outcome["undecodable"] = sess.wait(sr)
            outcome["expired"] = sess.call("mul", 1, timeout=0)
            sess.conn.send(DISCOVER_REQUEST, NIL, serial=5000)
            outcome["rediscover"] = sess.conn.recv()
        finally:
            done.set()
    srv = py_server([], {}, proof="proof", after=after, first_serial=100)
    try:
        w = Proc("tcp_client_worker", "--port", str(srv.port), "--key", KEY.decode())
        check(done.wait(10), f"worker did not serve: {w.describe()} {srv.errors}")
        check(not srv.errors, f"server errors: {srv.errors}")
        check(w.wait_line("ready", 5), "worker printed ready")
        equal(srv.state["handshakes"][0].peer_names, ["mul"], "the worker offers mul")
        equal(outcome["squares"], [i * i for i in range(10)], "mul(i, i)")
        check(outcome["type"].type == ERROR and outcome["type"].value.name == "TypeError",
              f"mul('x'): {outcome['type']!r}")
        equal(outcome["nosuch"].payload, hexb(GOLDEN[10][2]), "KeyError('nosuch')")
        check(outcome["undecodable"].type == ERROR, f"{outcome['undecodable']!r}")
        equal(outcome["expired"].payload, hexb(GOLDEN[9][2]), "timeout 0")
        equal(outcome["rediscover"].raw, frame(DISCOVER_RESPONSE, 5000, pack(["mul"])),
              "rediscovery")
        equal(w.stop(), 0, "worker exits 0 on SIGTERM")
    finally:
        srv.close()

@case("c_worker_reconnects_after_server_closes", needs=("tcp_client_worker",))
def _():
    def after(sess: Session) -> None:
        equal(sess.call("mul", 6, 7).value, 42, "before the drop")
        # returning closes the connection
    srv = py_server([], {}, after=after)
    try:
        w = Proc("tcp_client_worker", "--port", str(srv.port), "--key", KEY.decode())
        deadline = time.monotonic() + 8
        while len(srv.state["handshakes"]) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        check(len(srv.state["handshakes"]) >= 2,
              f"no reconnect: {srv.accepted} accepted, {srv.errors}, {w.describe()}")
        check(not srv.errors, f"server errors: {srv.errors}")
        equal(w.stop(), 0, "worker exits 0 on SIGTERM")
    finally:
        srv.close()

@case("c_server_caller_waits_for_discovery", needs=("tcp_server_caller",))
def _():
    proc, port = start_listening("tcp_server_caller", "--key", KEY.decode(),
                                 "--interval", "0.2", "--rounds", "1")
    conn = Conn.connect("127.0.0.1", port)
    d = conn.recv()
    salt = os.urandom(4)
    conn.send(AUTH_REQUEST, peer.auth_request_payload(d.payload, KEY, salt))
    equal(conn.recv().type, AUTH_OK, "AUTH_OK")
    dr = conn.recv()
    equal(dr.type, DISCOVER_REQUEST, "DISCOVER_REQUEST")
    conn.send(DISCOVER_RESPONSE, pack(["mul"]), serial=dr.serial)
    # the server knows our names now, but has not answered our own discovery
    # (we have not asked yet): it must not send a REQUEST
    try:
        f = conn.recv(0.6)
        raise Failure(f"frame before our DISCOVER_REQUEST: {f!r}")
    except TimeoutError:
        pass
    own = conn.send(DISCOVER_REQUEST, NIL)
    f = conn.recv()
    equal((f.type, f.serial, f.value), (DISCOVER_RESPONSE, own, []), "DISCOVER_RESPONSE")
    sess = Session(conn, {"mul": mul_handler})
    sess.serve_until(lambda: len(sess.requests_seen) >= 10, 10)
    check(proc.wait_exit(10) == 0, proc.describe())
    conn.close()


@case("c_server_caller_drops_late_answers", needs=("tcp_server_caller",))
def _():
    proc, port = start_listening("tcp_server_caller", "--key", KEY.decode(),
                                 "--interval", "0.9", "--rounds", "2", "--timeout", "0.3")
    conn = Conn.connect("127.0.0.1", port)
    client_handshake(conn, KEY, ["mul"])
    first: List[Any] = []
    while len(first) < 10:  # round one: hold the answers past the caller's timeout
        f = conn.recv(5)
        check(f.type == REQUEST, f"{f!r}")
        first.append(f)
    time.sleep(0.5)
    for f in first:
        req = f.value
        conn.send(RESPONSE, pack(mul_handler(*req.args)), f.serial)
    sess = Session(conn, {"mul": mul_handler})
    sess.serve_until(lambda: len(sess.requests_seen) >= 10, 5)
    check(proc.wait_exit(10) == 0, proc.describe())
    time.sleep(0.1)
    equal(len(proc.out), 3, f"output {proc.out}")
    check(all(x.startswith("TimeoutError") for x in proc.out[1][1:-1].split(", ")),
          f"round one timed out: {proc.out[1]}")
    equal(proc.out[2], "[0, 1, 4, 9, 16, 25, 36, 49, 64, 81]", "round two on the same connection")
    conn.close()


@case("c_server_caller_calls_python_worker", needs=("tcp_server_caller",))
def _():
    proc, port = start_listening("tcp_server_caller", "--key", KEY.decode(),
                                 "--interval", "0.2", "--rounds", "2")
    conn = Conn.connect("127.0.0.1", port)
    hs = client_handshake(conn, KEY, ["mul"])
    equal(hs.peer_names, [], "the caller offers nothing")
    sess = Session(conn, {"mul": mul_handler})
    sess.serve_until(lambda: len(sess.requests_seen) >= 20, 10)
    req = sess.requests_seen[3]
    equal(req.payload[:13], hexb("c7 12 01 94 a36d756c 92 03 03 80 cb"), "REQUEST bytes")
    timeout = struct.unpack("!d", req.payload[13:])[0]
    check(4.0 < timeout <= 5.0, f"the caller's timeout travels: {timeout}")
    check(proc.wait_exit(10) == 0, f"caller exits after two rounds: {proc.describe()}")
    time.sleep(0.1)
    equal(proc.out[-2:], ["[0, 1, 4, 9, 16, 25, 36, 49, 64, 81]"] * 2, "printed results")
    conn.close()

# ---- C against C ----------------------------------------------------------------

@case("c_client_against_c_server", needs=("tcp_server", "tcp_client"))
def _():
    port = c_server()
    p = client(port, "mul", "1", "2", "3")
    equal((p.p.returncode, p.out), (0, ["6"]), p.describe())
    p = client(port, "div", "1", "0")
    equal((p.p.returncode, p.err), (1, ["ZeroDivisionError: division by zero"]), p.describe())
    p = client(port, "--require-proof", "echo", "None", "True", "-1", "1.5", "é")
    equal(p.out, ["[None, True, -1, 1.5, 'é']"], p.describe())
    p = client(port, "--timeout", "1", "sleep", "3")
    check(p.p.returncode == 1 and p.err and p.err[0].startswith("TimeoutError"), p.describe())
    p = client(port, "--timeout", "2", "nosuch", key=b"bad")
    check(p.p.returncode == 1 and p.err and p.err[0].startswith("ConnectionError"), p.describe())

@case("c_caller_against_c_workers", needs=("tcp_server_caller", "tcp_client_worker"))
def _():
    caller, port = start_listening("tcp_server_caller", "--key", "k",
                                   "--interval", "0.3", "--rounds", "3")
    workers = [Proc("tcp_client_worker", "--port", str(port), "--key", "k") for _ in range(2)]
    try:
        check(caller.wait_exit(15) == 0, f"caller: {caller.describe()}")
        time.sleep(0.1)
        want = "[0, 1, 4, 9, 16, 25, 36, 49, 64, 81]"
        equal(caller.out[-3:], [want] * 3, f"results {caller.describe()}")
    finally:
        for w in workers:
            equal(w.stop(), 0, f"worker exit {w.describe()}")

@case("mesh_example", needs=("mesh",))
def _():
    p = run("mesh", timeout=30)
    equal(p.p.returncode, 0, p.describe())
    check(len(p.out) == 4, p.describe())
    for line, me in zip(p.out[:3], ("node-a", "node-b", "node-c")):
        head, _, tail = line.partition(": whoami -> ")
        got = tail.split(", ")
        others = sorted({"node-a", "node-b", "node-c"} - {me})
        check(head == me and len(got) == 4 and sorted(got[:2]) == others
              and got[2:] == got[:2], f"round robin: {line!r}")
    check(p.out[3].startswith("node-a: 100 x mul(i, 2) -> sum 9900"), p.out[3])

@case("examples_print_help", needs=("tcp_server", "tcp_client", "tcp_server_caller",
                                    "tcp_client_worker"))
def _():
    for name in ("tcp_server", "tcp_client", "tcp_server_caller", "tcp_client_worker"):
        p = run(name, "--help", timeout=5)
        check(p.p.returncode == 0 and p.out and p.out[0].startswith("usage:"), p.describe())
        p = run(name, "--port", "nonsense", timeout=5)
        check(p.p.returncode == 2, f"bad option: {p.describe()}")

@case("c_server_stops_on_sigterm", needs=("tcp_server",))
def _():
    conn, _, s = connect_ready()
    good_connection_works(s, "before SIGTERM")
    proc = SERVER.pop("proc")
    equal(proc.stop(), 0, "exit code after SIGTERM")
    closed, _ = conn.wait_closed(2)
    check(closed, "clients see EOF")
    proc.wait_for(lambda: any("protocol errors" in ln for ln in proc.err), 2)
    stats = [ln for ln in proc.err if "protocol errors" in ln]
    check(stats, f"statistics line: {proc.err}")
    # when the whole suite ran, the bad frames and wrong keys above were counted
    nums = [int(w) for w in stats[0].replace(",", " ").split() if w.isdigit()]
    check(len(nums) == 4 and nums[0] > 0 and nums[1] > 0, f"statistics: {stats[0]}")
    proc, _ = start_listening("tcp_server")
    proc.p.send_signal(signal.SIGINT)
    equal(proc.wait_exit(5), 0, "exit code after SIGINT")

# ---- main ---------------------------------------------------------------------

def main() -> int:
    global BIN, PID_FILE
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True, help="directory with the built examples")
    ap.add_argument("--filter", default="", help="run only cases containing this text")
    ap.add_argument("--pid-file", default="", help="append the pid of every child here")
    opts = ap.parse_args()
    BIN = opts.bin
    PID_FILE = opts.pid_file

    def on_term(signum, _frame):
        raise SystemExit(f"stopped by signal {signum}")
    signal.signal(signal.SIGTERM, on_term)

    passed = failed = 0
    try:
        for name, fn, needs in CASES:
            if opts.filter and opts.filter not in name:
                continue
            missing = [n for n in needs if not os.access(os.path.join(BIN, n), os.X_OK)]
            try:
                if missing:
                    raise Failure(f"not built: {', '.join(missing)}")
                fn()
            except Exception as e:
                failed += 1
                detail = "".join(traceback.format_exception_only(type(e), e)).strip()
                print(f"FAIL {name}: {detail}", flush=True)
                if not isinstance(e, Failure):
                    traceback.print_exc(file=sys.stdout)
            else:
                passed += 1
                print(f"ok {name}", flush=True)
    finally:
        proc = SERVER.get("proc")
        if proc is not None:
            proc.stop(2)
        stop_all()
    # programs built with sanitizers report on stderr; none may have
    time.sleep(0.1)
    reports = [(p, ln) for p in PROCS for ln in p.err if any(
        marker in ln for marker in SANITIZER_MARKERS)]
    if reports:
        failed += 1
        print(f"FAIL no_sanitizer_reports: {len(reports)} report lines", flush=True)
        for p, ln in reports[:10]:
            print(f"    {p.name} {' '.join(p.p.args[1:])[:60]}: {ln}", flush=True)
    elif PROCS:
        passed += 1
        print("ok no_sanitizer_reports", flush=True)
    print(f"cases: {passed} passed, {failed} failed", flush=True)
    return 1 if failed else 0

if __name__ == "__main__":
    sys.exit(main())
