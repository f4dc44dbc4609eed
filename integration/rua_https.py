#!/usr/bin/python3
"""An HTTPS TLS-RPT endpoint for the integration suite: accepts POSTs, saves each body
as <dir>/rua-post-<n>.bin with its headers in <dir>/rua-post-<n>.json, and answers
500 to the first FAIL_FIRST posts, then 201. With HANG_FIRST, the first HANG_FIRST
posts are read, saved as <dir>/rua-hung-<n>.bin and never answered (the connection is
held open until the client goes away or 300 s pass): a sender stuck mid-send.

usage: rua_https.py IP CERT KEY DIR FAIL_FIRST [HANG_FIRST]
       (listens on IP:443; runs until killed)
"""
import http.server
import json
import ssl
import sys
import threading
import time

ip, cert, key, outdir, fail_first = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
hang_first = int(sys.argv[6]) if len(sys.argv) > 6 else 0
count = 0
hung = 0
lock = threading.Lock()


class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        global count, hung
        length = min(int(self.headers.get("Content-Length", "0")), 10 << 20)
        body = self.rfile.read(length)
        with lock:
            hang = hung < hang_first
            if hang:
                hung += 1
                n = hung
            else:
                count += 1
        if hang:
            with open(f"{outdir}/rua-hung-{n}.bin", "wb") as f:
                f.write(body)
            self.connection.settimeout(1)
            for _ in range(300):
                try:
                    if self.connection.recv(1) == b"":
                        break  # the client is gone
                except (TimeoutError, ssl.SSLError, OSError) as e:
                    if not isinstance(e, TimeoutError) and "timed out" not in str(e):
                        break
                time.sleep(0)
            self.close_connection = True
            return
        with open(f"{outdir}/rua-post-{count}.bin", "wb") as f:
            f.write(body)
        with open(f"{outdir}/rua-post-{count}.json", "w") as f:
            json.dump({"path": self.path, "headers": dict(self.headers.items())}, f)
        status = 500 if count <= fail_first else 201
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, fmt, *args):
        sys.stderr.write("rua_https: " + fmt % args + "\n")


server = http.server.ThreadingHTTPServer((ip, 443), Handler)
server.timeout = 10
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
server.socket = ctx.wrap_socket(server.socket, server_side=True)
server.serve_forever()
