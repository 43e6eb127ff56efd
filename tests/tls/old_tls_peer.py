#!/usr/bin/env python3
"""tests/tls/old_tls_peer.py MODE CERTDIR [PORT]

A TLS peer that offers TLS 1.1 at most, on the loopback interface, for the
version checks of tests/test_tls.c (patio_tls requires TLS 1.2):

  server       listens on 127.0.0.1 (a free port), accepts one connection
               and runs the TLS handshake as a server that speaks TLS 1.0
               and 1.1 only (Python's ssl module, CERTDIR/server.pem)
  client PORT  connects to 127.0.0.1:PORT and runs the handshake as a
               client that offers TLS 1.0 and 1.1 only
  hello        listens like `server`, reads the ClientHello and answers it
               with a ServerHello of version 3.2 (TLS 1.1) built by hand,
               then reports the alert the client sends back; needs nothing
               from OpenSSL

The server modes first print "port N". Every mode ends with one line
"result: ..." and exit status 0:

  result: refused <why>        the handshake failed (what the test wants)
  result: alert <level> <description>   (hello) the client's alert
  result: connected <version>  the handshake succeeded: TLS 1.1 was accepted
  result: unsupported <why>    this Python/OpenSSL cannot offer TLS 1.1

Every wait is bounded (5 s per socket operation, 15 s in all).
"""
import os
import signal
import socket
import ssl
import struct
import sys
import warnings

TIMEOUT = 5.0


def say(line):
    print(line, flush=True)


def old_context(server, certdir):
    """An SSLContext limited to TLS 1.0-1.1, or a reason it cannot be made."""
    warnings.simplefilter("ignore")  # TLS 1.0/1.1 are deprecated: that is the point
    try:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        # OpenSSL 3 allows TLS 1.1 (SHA-1 signatures) only at level 0
        ctx.set_ciphers("DEFAULT@SECLEVEL=0")
        if server:
            ctx.load_cert_chain(os.path.join(certdir, "server.pem"), os.path.join(certdir, "server.key"))
        else:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
    except (ssl.SSLError, ValueError, AttributeError) as e:
        return None, str(e) or type(e).__name__
    return ctx, None


def listen():
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(TIMEOUT)
    say("port %d" % srv.getsockname()[1])
    return srv


def handshake(sock, ctx, server):
    try:
        tls = ctx.wrap_socket(sock, server_side=server, do_handshake_on_connect=False)
        tls.do_handshake()
    except (ssl.SSLError, OSError) as e:
        return "result: refused %s" % (e,)
    version = tls.version()
    tls.close()
    return "result: connected %s" % version


def recv_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def server_hello():
    """A TLS 1.1 ServerHello record: version 3.2, a random, no session id,
    TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA, no compression, no extensions."""
    body = b"\x03\x02" + os.urandom(32) + b"\x00" + b"\xc0\x09" + b"\x00"
    hs = b"\x02" + struct.pack(">I", len(body))[1:] + body
    return b"\x16\x03\x02" + struct.pack(">H", len(hs)) + hs


def hello_mode():
    srv = listen()
    conn, _ = srv.accept()
    conn.settimeout(TIMEOUT)
    head = recv_exact(conn, 5)
    if len(head) != 5 or head[0] != 22:
        return "result: refused the client did not start with a handshake record (%r)" % (head,)
    recv_exact(conn, struct.unpack(">H", head[3:5])[0])  # the ClientHello
    conn.sendall(server_hello())
    try:
        rec = recv_exact(conn, 7)
    except OSError as e:
        return "result: refused no alert, the connection ended: %s" % (e,)
    if len(rec) == 7 and rec[0] == 21:
        return "result: alert %d %d" % (rec[5], rec[6])
    return "result: refused no alert, the client sent %r" % (rec,)


def main():
    if len(sys.argv) < 3 or sys.argv[1] not in ("server", "client", "hello"):
        say("usage: old_tls_peer.py server|client|hello CERTDIR [PORT]")
        return 2
    mode, certdir = sys.argv[1], sys.argv[2]
    signal.alarm(15)
    if mode == "hello":
        say(hello_mode())
        return 0
    ctx, why = old_context(mode == "server", certdir)
    if ctx is None:
        say("result: unsupported %s" % why)
        return 0
    if mode == "server":
        srv = listen()
        conn, _ = srv.accept()
        conn.settimeout(TIMEOUT)
        say(handshake(conn, ctx, True))
    else:
        sock = socket.create_connection(("127.0.0.1", int(sys.argv[3])), timeout=TIMEOUT)
        say(handshake(sock, ctx, False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
