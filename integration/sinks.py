#!/usr/bin/python3
"""SMTP sinks for the integration suite: aiosmtpd servers, each on its own
127.0.0.x:25 inside the test network namespace, with or without STARTTLS.

usage: sinks.py SPEC...   where SPEC is ip:hostname:certfile:keyfile (TLS) or ip:hostname (plain)
Messages are appended to <dir of this spec file>/sink-<ip>.log. Runs until killed.
"""
import asyncio
import ssl
import sys

from aiosmtpd.controller import Controller


class Handler:
    def __init__(self, ip, logdir):
        self.path = f"{logdir}/sink-{ip}.eml"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.startswith("nobody@"):
            return "550 5.1.1 <%s>: no such user" % address
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        with open(self.path, "ab") as f:
            tls = session.ssl is not None
            f.write(b"X-Sink-TLS: " + (b"yes" if tls else b"no") + b"\r\n")
            f.write(b"X-Sink-From: " + envelope.mail_from.encode() + b"\r\n")
            f.write(b"X-Sink-To: " + ",".join(envelope.rcpt_tos).encode() + b"\r\n")
            f.write(envelope.original_content or b"")
            f.write(b"\r\n.\r\n")
        return "250 2.0.0 accepted by sink"


def main():
    logdir = sys.argv[1]
    controllers = []
    for spec in sys.argv[2:]:
        parts = spec.split(":")
        ip, hostname = parts[0], parts[1]
        ctx = None
        if len(parts) == 4:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(parts[2], parts[3])
        c = Controller(Handler(ip, logdir), hostname=ip, port=25, server_hostname=hostname,
                       tls_context=ctx, require_starttls=False, ready_timeout=10)
        c.start()
        controllers.append(c)
    print("sinks ready", flush=True)
    try:
        asyncio.run(asyncio.sleep(3600))
    finally:
        for c in controllers:
            c.stop()


if __name__ == "__main__":
    main()
