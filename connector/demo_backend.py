"""A small internal host for the demo and the tests: an HTTP service and a TCP echo service.

HTTP: ``GET /sap/opu/odata/...`` answers JSON naming the path, the Host header and every header it
received (what the caller's credentials became on the way: Authorization, a user's certificate:
over HTTPS (`--https-port`, which requires a client certificate of `--client-ca`) the answer also
names the subject of the client certificate as `client_certificate_subject`);
``POST`` echoes the body back (streamed, so large bodies use constant memory); ``GET /ws`` accepts a
WebSocket upgrade and then echoes raw bytes. TCP: every byte is echoed until the client half-closes.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import ssl

import h11
import trio
from cryptography import x509

log = logging.getLogger(__name__)
CHUNK = 65536


async def serve_http(stream: trio.abc.Stream, client_subject: str | None = None) -> None:
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            event = await _next(conn, stream)
            if isinstance(event, h11.ConnectionClosed) or event is None:
                return
            assert isinstance(event, h11.Request)
            headers = {k.decode().lower(): v.decode() for k, v in event.headers}
            target = event.target.decode()
            if headers.get("upgrade", "").lower() == "websocket":
                await _drain(conn, stream)
                await stream.send_all(conn.send(h11.InformationalResponse(
                    status_code=101, headers=[("upgrade", "websocket"), ("connection", "upgrade")])))
                pending, _ = conn.trailing_data
                if pending:
                    await stream.send_all(pending)
                while data := await stream.receive_some(CHUNK):
                    await stream.send_all(data)
                return
            if event.method == b"POST" or event.method == b"PUT":
                length = headers.get("content-length")
                response_headers = [("content-type", headers.get("content-type", "application/octet-stream"))]
                if length is not None:
                    response_headers.append(("content-length", length))
                await stream.send_all(conn.send(h11.Response(status_code=200, headers=response_headers)))
                while True:
                    body_event = await _next(conn, stream)
                    if isinstance(body_event, h11.Data):
                        await stream.send_all(conn.send(h11.Data(data=body_event.data)))
                    elif isinstance(body_event, h11.EndOfMessage):
                        break
                await stream.send_all(conn.send(h11.EndOfMessage()))
            else:
                await _drain(conn, stream)
                answer = {"path": target, "host": headers.get("host"), "method": event.method.decode(),
                          "forwarded_host": headers.get("x-forwarded-host"), "headers": headers}
                if client_subject is not None:
                    answer["client_certificate_subject"] = client_subject
                body = json.dumps(answer).encode()
                await stream.send_all(conn.send(h11.Response(status_code=200, headers=[
                    ("content-type", "application/json"), ("content-length", str(len(body)))])))
                await stream.send_all(conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
            if conn.our_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()
    except (h11.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
        return
    finally:
        await trio.aclose_forcefully(stream)


def https_context(cert: str, key: str, client_ca: str) -> ssl.SSLContext:
    """A server context that requires a client certificate issued by `client_ca`."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=client_ca)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(cert, key)
    return context


async def serve_https(context: ssl.SSLContext, tcp: trio.SocketStream) -> None:
    """`serve_http` over TLS, naming the client certificate's subject (RFC 4514) in its answers."""
    stream = trio.SSLStream(tcp, context, server_side=True)
    try:
        with trio.fail_after(10):
            await stream.do_handshake()
    except (trio.BrokenResourceError, trio.TooSlowError) as exc:
        log.info("TLS handshake with a client failed: %s", exc.__cause__ or exc)
        await trio.aclose_forcefully(stream)
        return
    der = stream.getpeercert(binary_form=True)
    subject = x509.load_der_x509_certificate(der).subject.rfc4514_string() if der else ""
    await serve_http(stream, subject)


async def run_https_backend(host: str, port: int, context: ssl.SSLContext, *,
                            task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(functools.partial(serve_https, context), listeners)


async def _next(conn: h11.Connection, stream: trio.abc.Stream) -> object:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(CHUNK))  # type: ignore[arg-type]  # h11 takes any bytes-like
            continue
        if event is h11.PAUSED:
            return None
        return event


async def _drain(conn: h11.Connection, stream: trio.abc.Stream) -> None:
    while not isinstance(await _next(conn, stream), h11.EndOfMessage):
        pass


async def serve_echo(stream: trio.SocketStream) -> None:
    try:
        while data := await stream.receive_some(CHUNK):
            await stream.send_all(data)
        await stream.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def run_backend(
    host: str, http_port: int, tcp_port: int, *, task_status: trio.TaskStatus[tuple[int, int]] = trio.TASK_STATUS_IGNORED
) -> None:
    async with trio.open_nursery() as nursery:
        http = await nursery.start(functools.partial(trio.serve_tcp, serve_http, http_port, host=host))
        tcp = await nursery.start(functools.partial(trio.serve_tcp, serve_echo, tcp_port, host=host))
        task_status.started((http[0].socket.getsockname()[1], tcp[0].socket.getsockname()[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description="demo internal host: HTTP service and TCP echo")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--http-port", type=int, default=0)
    parser.add_argument("--tcp-port", type=int, default=0)
    parser.add_argument("--https-port", type=int, help="also serve HTTPS here (needs --cert, --key, --client-ca)")
    parser.add_argument("--cert", help="the HTTPS server certificate (PEM)")
    parser.add_argument("--key", help="its private key (PEM)")
    parser.add_argument("--client-ca", help="the CA whose client certificates HTTPS requires")
    args = parser.parse_args()
    if args.https_port is not None and not (args.cert and args.key and args.client_ca):
        parser.error("--https-port needs --cert, --key and --client-ca")

    async def _main() -> None:
        async with trio.open_nursery() as nursery:
            ports = await nursery.start(run_backend, args.host, args.http_port, args.tcp_port)
            started = {"http_port": ports[0], "tcp_port": ports[1]}
            if args.https_port is not None:
                context = https_context(args.cert, args.key, args.client_ca)
                started["https_port"] = await nursery.start(run_https_backend, args.host, args.https_port, context)
            print(json.dumps(started), flush=True)

    trio.run(_main)


if __name__ == "__main__":
    main()
