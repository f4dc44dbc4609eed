#!/usr/bin/python3
"""An HTTPS TLS-RPT endpoint for the integration suite: accepts POSTs, saves each body
as <dir>/rua-post-<n>.bin with its headers in <dir>/rua-post-<n>.json, and answers
500 to the first FAIL_FIRST posts, then 201.

usage: rua_https.py IP CERT KEY DIR FAIL_FIRST     (listens on IP:443; runs until killed)
"""
import http.server
import json
import ssl
import sys

ip, cert, key, outdir, fail_first = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
count = 0


class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        global count
        count += 1
        length = min(int(self.headers.get("Content-Length", "0")), 10 << 20)
        body = self.rfile.read(length)
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
