# Socketmap scenarios, sourced by integration/run.sh near its end (uses its fixtures:
# inns, wait_listen, wait_for, leaf, vhost, in_maildir, sink_has, $W, $BIN, $HERE,
# passed/failed and the Knot, nginx and MX peers).
#
# 1. postfix-mta-sts-resolver (PMSR, from PyPI in a venv) and `stsrelay socketmap` answer
#    the same requests on the same DNS/HTTPS scenarios; every reply that differs must
#    be one of the documented differences (README, "Differences from PMSR").
# 2. Real Postfix senders ask each server (smtp_tls_policy_maps = socketmap:inet:…)
#    and deliver straight to the MX hosts: good MX -> delivered; wrong-name
#    certificate -> deferred (stsrelay), and what PMSR lets through.
# SOCKETMAP_BENCH=1 also runs the benchmark (benches/socketmap.rs) against both.

sm_ok() { echo "ok   $1"; passed=$((passed+1)); }
sm_fail() { echo "FAIL $1"; failed=$((failed+1)); }
PMSR_VERSION=1.5.1

# --- more scenarios: addresses, certificates, zone records, policy hosts -------------
for last in 32 33 34 35; do inns ip addr add "127.0.0.$last/32" dev lo; done
for d in wild deep none hyphen bigage; do leaf "mta-sts.$d.test" "mta-sts.$d.test"; done
leaf mx1.wild.test '*.wild.test'          # a wildcard certificate, valid for mx1.wild.test
leaf a.b.deep.test a.b.deep.test          # valid for its name, which *.deep.test does not cover
cat >> "$W/test.zone" <<'ZONE'
_mta-sts.wild     TXT "v=STSv1; id=1"
mta-sts.wild      A   127.0.0.80
wild              MX  10 mx1.wild
wild              MX  20 a.b.wild
mx1.wild          A   127.0.0.32
_mta-sts.deep     TXT "v=STSv1; id=1"
mta-sts.deep      A   127.0.0.80
deep              MX  10 a.b.deep
a.b.deep          A   127.0.0.35
_mta-sts.none     TXT "v=STSv1; id=1"
mta-sts.none      A   127.0.0.80
none              MX  10 mx1.good
_mta-sts.hyphen   TXT "v=STSv1; id=2026-11-28"
mta-sts.hyphen    A   127.0.0.80
hyphen            MX  10 mx1.good
_mta-sts.bigage   TXT "v=STSv1; id=1"
mta-sts.bigage    A   127.0.0.80
bigage            MX  10 mx1.good
ZONE
perl -pi -e 's/(hostmaster\.test\. )(\d+)/$1.($2+1)/e' "$W/test.zone"
inns knotc -c "$W/knot.conf" zone-reload test. >/dev/null
for d in wild deep none hyphen bigage; do mkdir -p "$W/www/$d/.well-known"; done
printf 'version: STSv1\nmode: enforce\nmx: *.wild.test\nmax_age: 86400\n' > "$W/www/wild/.well-known/mta-sts.txt"
printf 'version: STSv1\nmode: enforce\nmx: *.deep.test\nmax_age: 86400\n' > "$W/www/deep/.well-known/mta-sts.txt"
printf 'version: STSv1\nmode: none\nmax_age: 86400\n' > "$W/www/none/.well-known/mta-sts.txt"
printf 'version: STSv1\nmode: enforce\nmx: mx1.good.test\nmax_age: 86400\n' > "$W/www/hyphen/.well-known/mta-sts.txt"
printf 'version: STSv1\nmode: enforce\nmx: mx1.good.test\nmax_age: 31557601\n' > "$W/www/bigage/.well-known/mta-sts.txt"
sed -i '$ d' "$W/nginx.conf"   # the closing brace of http { }
for d in wild deep none hyphen bigage; do vhost "mta-sts.$d.test" "root $W/www/$d;" >> "$W/nginx.conf"; done
echo "}" >> "$W/nginx.conf"
inns nginx -c "$W/nginx.conf" -s reload
inns /usr/bin/python3 "$HERE/sinks.py" "$W" \
  "127.0.0.32:mx1.wild.test:$W/mx1.wild.test.pem:$W/mx1.wild.test.key" \
  "127.0.0.35:a.b.deep.test:$W/a.b.deep.test.pem:$W/a.b.deep.test.key" >"$W/sinks2.out" 2>&1 &
pids+=($!)
wait_listen t 127.0.0.32:25
wait_listen t 127.0.0.35:25
# Processes that resolve through the system (PMSR, Postfix) get Knot as their resolver
# in a mount namespace of their own.
echo "nameserver 127.0.0.53" > "$W/resolv.conf"
with_resolver() { inns unshare -m sh -c "mount --bind '$W/resolv.conf' /etc/resolv.conf && exec \"\$@\"" sh "$@"; }
# The zone change is visible (its TTL is 5 s).
for _ in $(seq 1 100); do
  inns "$BIN" --config "$W/stsrelay.toml" check --json wild.test 2>/dev/null | grep -q '"\*.wild.test"' && break
  sleep 0.2
done

# --- the two socketmap servers ---------------------------------------------------------
cp "$W/stsrelay.toml" "$W/socketmap.toml"
cat >> "$W/socketmap.toml" <<CFG
[socketmap]
listen = ["127.0.0.1:8461"]
[socketmap.zones.strict]
strict_testing = true
CFG
RUST_LOG=stsrelay=debug inns "$BIN" --config "$W/socketmap.toml" socketmap >"$W/socketmap.log" 2>&1 &
pids+=($!)
pmsr_ready=0
if ! /usr/bin/python3 -m venv "$W/pmsr" >/dev/null 2>&1; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null 2>&1 || true
  /usr/bin/python3 -m venv "$W/pmsr" >/dev/null 2>&1 || true
fi
if timeout 300 "$W/pmsr/bin/pip" install -q "postfix-mta-sts-resolver==$PMSR_VERSION" >"$W/pmsr-install.log" 2>&1; then
  cat > "$W/pmsr.yml" <<YML
host: 127.0.0.1
port: 8462
cache_grace: 86400
default_zone:
  timeout: 10
zones:
  strict:
    strict_testing: true
    timeout: 10
YML
  SSL_CERT_FILE="$W/ca.pem" with_resolver "$W/pmsr/bin/mta-sts-daemon" -c "$W/pmsr.yml" -v debug >"$W/pmsr.log" 2>&1 &
  pids+=($!)
  wait_listen t 127.0.0.1:8462 && pmsr_ready=1
else
  echo "integration: pip install postfix-mta-sts-resolver failed:"; tail -5 "$W/pmsr-install.log"
fi
wait_listen t 127.0.0.1:8461
[ "$pmsr_ready" = 1 ] && sm_ok pmsr_installed_and_listening || sm_fail pmsr_installed_and_listening

# --- 1. reply comparison -------------------------------------------------------------------
# Requests, and the ones whose replies are expected to differ (README lists each, with why).
if [ "$pmsr_ready" = 1 ] && inns /usr/bin/python3 - "$W/socketmap-compare.txt" <<'PY'
import socket, sys

REQUESTS = ["postfix good.test", "postfix GOOD.Test.", "postfix bad.test", "postfix wild.test",
            "postfix deep.test", "postfix testing.test", "strict testing.test", "postfix nopolicy.test",
            "postfix none.test", "postfix redir.test", "postfix expired.test", "postfix moved.test",
            "postfix hyphen.test", "postfix bigage.test", "postfix nothing.test", "postfix .good.test",
            "postfix [127.0.0.25]", "postfix [mx1.good.test]:25"]
EXPECTED_DIFFERENT = {"postfix bad.test", "postfix wild.test", "postfix deep.test", "strict testing.test",
                      "postfix hyphen.test", "postfix bigage.test"}

def ns(s):
    return b"%d:%s," % (len(s), s)

class Conn:
    def __init__(self, port):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.buf = b""
    def reply(self):
        while True:
            if b":" in self.buf:
                n, rest = self.buf.split(b":", 1)
                n = int(n)
                if len(rest) > n:
                    assert rest[n:n + 1] == b",", self.buf
                    self.buf = rest[n + 1:]
                    return rest[:n].decode()
            chunk = self.s.recv(4096)
            assert chunk, "connection closed"
            self.buf += chunk
    def query(self, req):
        self.s.sendall(ns(req.encode()))
        return self.reply()

def canon(reply):
    # PMSR lists a policy's patterns from a Python set: order is arbitrary.
    words = reply.split(" ")
    return " ".join(("match=" + ":".join(sorted(w[6:].split(":")))) if w.startswith("match=") else w
                    for w in words)

ours, theirs = Conn(8461), Conn(8462)
rows, unexpected = [], []
for req in REQUESTS:
    a, b = ours.query(req), theirs.query(req)
    same = canon(a) == canon(b)
    rows.append((req, a, b, same))
    if same == (req in EXPECTED_DIFFERENT):
        unexpected.append(req)
# Pipelined, all at once: the same answers again, in order (from the caches now).
ours.s.sendall(b"".join(ns(r.encode()) for r in REQUESTS))
again = [ours.reply() for _ in REQUESTS]
with open(sys.argv[1], "w") as f:
    f.write("| request | stsrelay | postfix-mta-sts-resolver |\n|---|---|---|\n")
    for req, a, b, same in rows:
        f.write(f"| `{req}` | `{a}` | {'same' if same else '`' + b + '`'} |\n")
print(open(sys.argv[1]).read())
assert not unexpected, f"replies differ from the documented expectation: {unexpected}"
assert again == [a for _, a, _, _ in rows], again
PY
then sm_ok socketmap_replies_match_pmsr_except_documented_differences
else sm_fail socketmap_replies_match_pmsr_except_documented_differences; fi

# --- 2. real Postfix senders, one per socketmap server ----------------------------------------
# sender NAME IP MAP: a Postfix that delivers straight to MX hosts, asking MAP for TLS policy.
sender() {
  local name=$1 addr=$2 map=$3
  mkdir -p "$W/$name/etc" "$W/$name/queue" "$W/$name/data"
  cp "$W/pf/etc/master.cf" "$W/$name/etc/master.cf"
  cat > "$W/$name/etc/main.cf" <<PF
compatibility_level = 3.6
queue_directory = $W/$name/queue
data_directory = $W/$name/data
inet_interfaces = $addr
inet_protocols = ipv4
myhostname = $name.sender.test
mydestination =
mynetworks = 127.0.0.0/8
alias_maps =
alias_database =
smtp_tls_security_level = may
smtp_tls_CAfile = $W/ca.pem
smtp_tls_loglevel = 1
smtp_tls_policy_maps = socketmap:inet:$map:postfix
maillog_file_prefixes = $W
maillog_file = $W/$name/maillog
PF
  chown root "$W/$name/queue"
  chown postfix "$W/$name/data"
  with_resolver postfix -c "$W/$name/etc" start >"$W/$name/start.out" 2>&1 || cat "$W/$name/start.out"
  wait_listen t "$addr:25"
}
sender pf-sm 127.0.0.33 127.0.0.1:8461
[ "$pmsr_ready" = 1 ] && sender pf-pmsr 127.0.0.34 127.0.0.1:8462
send_via() { # IP MARKER RCPT...
  inns /usr/bin/python3 - "$@" <<'PY'
import smtplib, sys
ip, marker, rcpts = sys.argv[1], sys.argv[2], sys.argv[3:]
with smtplib.SMTP(ip, 25, timeout=10) as s:
    for r in rcpts:
        s.sendmail("alice@client.test", [r], f"From: alice@client.test\r\nSubject: {marker} {r}\r\n\r\nvia {marker}\r\n")
PY
}
deferred_in() { grep -E "to=<$2>.*status=deferred" "$W/$1/maillog" >/dev/null 2>&1; }
send_via 127.0.0.33 sm-stsrelay bob@good.test bob@wild.test bob@bad.test bob@deep.test bob@testing.test
wait_for postfix_stsrelay_enforce_good_mx_delivered in_maildir good.test "sm-stsrelay bob@good.test"
wait_for postfix_stsrelay_wildcard_policy_delivered_to_in_policy_mx sink_has 127.0.0.32 "sm-stsrelay bob@wild.test"
wait_for postfix_stsrelay_wrong_name_certificate_deferred deferred_in pf-sm bob@bad.test
wait_for postfix_stsrelay_mx_outside_wildcard_deferred deferred_in pf-sm bob@deep.test
wait_for postfix_stsrelay_testing_delivered sink_has 127.0.0.27 "sm-stsrelay bob@testing.test"
if grep -rq "sm-stsrelay bob@bad.test" "$W"/sink-127.0.0.2[678].eml 2>/dev/null ||
   grep -q "sm-stsrelay bob@deep.test" "$W/sink-127.0.0.35.eml" 2>/dev/null; then
  sm_fail postfix_stsrelay_never_delivered_outside_the_policy
else sm_ok postfix_stsrelay_never_delivered_outside_the_policy; fi
if grep -q "Verified TLS connection established to mx1.good.test" "$W/pf-sm/maillog"; then
  sm_ok postfix_stsrelay_verified_tls_to_good_mx
else sm_fail postfix_stsrelay_verified_tls_to_good_mx; fi
if [ "$pmsr_ready" = 1 ]; then
  # The same mail through PMSR: its `.bad.test` / `.deep.test` rendering lets Postfix accept
  # a certificate for other.bad.test from mx1.bad.test, and the two-label MX a.b.deep.test.
  send_via 127.0.0.34 sm-pmsr bob@good.test bob@wild.test bob@bad.test bob@deep.test
  wait_for postfix_pmsr_enforce_good_mx_delivered in_maildir good.test "sm-pmsr bob@good.test"
  wait_for postfix_pmsr_wrong_name_certificate_accepted sink_has 127.0.0.26 "sm-pmsr bob@bad.test"
  wait_for postfix_pmsr_mx_outside_wildcard_accepted sink_has 127.0.0.35 "sm-pmsr bob@deep.test"
fi
grep -h "bob@\(bad\|deep\|good\|wild\)" "$W"/pf-*/maillog > "$W/socketmap-postfix.log" 2>/dev/null || true

# --- benchmark (SOCKETMAP_BENCH=1): release stsrelay vs PMSR, quiet logs, cached domains ----
if [ -n "${SOCKETMAP_BENCH:-}" ] && [ "$pmsr_ready" = 1 ]; then
  # The relay retries its deferred test messages every 2 s (debug build, TLS handshakes):
  # delete them so that their bursts do not land in the measurement.
  inns "$BIN" --config "$W/relay.toml" queue list --json | /usr/bin/python3 -c \
    'import json,sys; print("\n".join(m["id"] for m in json.load(sys.stdin)))' |
    while read -r id; do inns "$BIN" --config "$W/relay.toml" queue delete "$id" >/dev/null; done
  (cd "$ROOT" && cargo build --release -q --bin stsrelay && cargo bench --bench socketmap --no-run -q 2>/dev/null)
  sed 's/127.0.0.1:8461/127.0.0.1:8463/' "$W/socketmap.toml" > "$W/socketmap-bench.toml"
  inns "$ROOT/target/release/stsrelay" --config "$W/socketmap-bench.toml" socketmap >"$W/socketmap-bench.log" 2>&1 &
  pids+=($!)
  sed 's/port: 8462/port: 8464/' "$W/pmsr.yml" > "$W/pmsr-bench.yml"
  SSL_CERT_FILE="$W/ca.pem" with_resolver "$W/pmsr/bin/mta-sts-daemon" -c "$W/pmsr-bench.yml" -v warn >"$W/pmsr-bench.log" 2>&1 &
  pids+=($!)
  wait_listen t 127.0.0.1:8463
  wait_listen t 127.0.0.1:8464
  BENCH=$(ls -t "$ROOT"/target/release/deps/socketmap-* | grep -v '\.d$' | head -1)
  inns "$BENCH" --target "stsrelay=127.0.0.1:8463" --target "pmsr=127.0.0.1:8464" \
    --domains good.test,wild.test,bad.test,expired.test,moved.test | tee "$W/socketmap-bench.txt"
fi

inns postfix -c "$W/pf-sm/etc" stop >/dev/null 2>&1 || true
inns postfix -c "$W/pf-pmsr/etc" stop >/dev/null 2>&1 || true
