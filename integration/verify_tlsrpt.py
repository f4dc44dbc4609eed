"""Checks the TLS-RPT reports the relay sent, with independent tools: parsedmarc parses
each report e-mail (and the HTTPS bodies), dkimpy verifies the DKIM signatures against
the key published in the test zone (Knot on 127.0.0.53).

usage: verify_tlsrpt.py WORKDIR       (run with the venv's python; exits non-zero on failure)
"""
import glob
import gzip
import json
import sys

import dkim
import dns.resolver
import parsedmarc

W = sys.argv[1]
resolver = dns.resolver.Resolver(configure=False)
resolver.nameservers = ["127.0.0.53"]


def txt(name, timeout=5):
    name = name.decode() if isinstance(name, bytes) else name
    answer = resolver.resolve(name, "TXT", lifetime=timeout)
    return b"".join(answer[0].strings)


def check(cond, what):
    if not cond:
        print(f"FAIL {what}")
        sys.exit(1)


mails = [open(p, "rb").read() for p in sorted(glob.glob(f"{W}/mail/good.test/new/*"))]
reports = [m for m in mails if b"\nTLS-Report-Domain:" in m]
by_domain = {}
for m in reports:
    # RFC 8460 §3: the report's DKIM signature, verified as a TLS-RPT receiver does
    # (the key record says s=tlsrpt).
    check(dkim.verify(m, dnsfunc=txt, tlsrpt="strict"), "dkimpy verifies the report signature")
    parsed = parsedmarc.parse_report_email(m, offline=True)
    check(parsed["report_type"] == "smtp_tls", f"parsedmarc sees an SMTP TLS report: {parsed['report_type']}")
    report = parsed["report"]
    domain = report["policies"][0]["policy_domain"]
    check(f"TLS-Report-Domain: {domain}".encode() in m, "TLS-Report-Domain matches the JSON")
    by_domain[domain] = report
check(set(by_domain) == {"good.test", "bad.test", "testing.test"}, f"one report per domain: {sorted(by_domain)}")


def policy(domain):
    return by_domain[domain]["policies"][0]


def failures(domain):
    return {d["result_type"]: d for d in policy(domain).get("failure_details", [])}


good = policy("good.test")
check(good["policy_type"] == "sts" and good["successful_session_count"] >= 1, f"good.test: {good}")
check(good["failed_session_count"] == 0, f"good.test has no failures: {good}")
check("mode: enforce" in good["policy_strings"], f"good.test policy strings: {good}")
bad = failures("bad.test")
for t in ("certificate-host-mismatch", "certificate-not-trusted", "starttls-not-supported"):
    check(t in bad and bad[t]["failed_session_count"] >= 1, f"bad.test reports {t}: {sorted(bad)}")
check(bad["certificate-host-mismatch"]["receiving_mx_hostname"] == "mx1.bad.test", str(bad))
check(bad["certificate-host-mismatch"]["receiving_ip"] == "127.0.0.26", str(bad))
check(policy("bad.test")["successful_session_count"] == 0, "bad.test: nothing passed")
testing = policy("testing.test")
check("mode: testing" in testing["policy_strings"], str(testing))
check(testing["failed_session_count"] >= 1, f"testing-mode delivery over a bad certificate is a failure: {testing}")
check("certificate-not-trusted" in failures("testing.test"), str(testing))

# HTTPS rua (bad.test): the first POST got a 500, a retry was accepted; same report.
posts = sorted(glob.glob(f"{W}/rua-post-*.bin"))
check(len(posts) >= 2, f"a retry after the 500: {len(posts)} POST(s)")
ids = set()
for p in posts:
    meta = json.load(open(p[:-4] + ".json"))
    check(meta["path"] == "/v1/tlsrpt", meta["path"])
    ctype = {k.lower(): v for k, v in meta["headers"].items()}["content-type"]
    check(ctype == "application/tlsrpt+gzip", ctype)
    body = open(p, "rb").read()
    report = parsedmarc.parse_smtp_tls_report_json(gzip.decompress(body))
    check(report["policies"][0]["policy_domain"] == "bad.test", str(report))
    ids.add(report["report_id"])
check(ids == {by_domain["bad.test"]["report_id"]}, f"HTTPS and e-mail carry the same report: {ids}")
print(f"verified {len(reports)} report e-mails and {len(posts)} HTTPS POSTs")
