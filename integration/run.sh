#!/usr/bin/env bash
# Integration suite with real peers, run by .ci/run as root:
#   Knot DNS (authoritative for "test.", and signing "dane." for DANE), unbound (a
#   validating resolver for a DANE Postfix), nginx (HTTPS policy hosts), Postfix and
#   aiosmtpd (MX hosts with and without STARTTLS), redis-server (a fleet of two
#   relays), each on its own 127.0.0.x address
#   inside a network namespace made for the run; the real stsrelay binary checks them.
# KEEP=1 keeps the work directory for inspection.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
[ "$(id -u)" = 0 ] || { echo "integration: needs root (ip netns)"; exit 1; }

need=()
command -v knotd >/dev/null || need+=(knot)
command -v nginx >/dev/null || need+=(nginx)
command -v postfix >/dev/null || need+=(postfix)
/usr/bin/python3 -c 'import aiosmtpd' 2>/dev/null || need+=(python3-aiosmtpd)
/usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
command -v ip >/dev/null || need+=(iproute2)
command -v openssl >/dev/null || need+=(openssl)
command -v redis-server >/dev/null || need+=(redis-server)
command -v curl >/dev/null || need+=(curl)
command -v unbound >/dev/null || need+=(unbound)
if [ ${#need[@]} -gt 0 ]; then
  echo "integration: installing ${need[*]}"
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

(cd "$ROOT" && cargo build -q --bin stsrelay)
BIN="$ROOT/target/debug/stsrelay"
W=$(mktemp -d /tmp/stsrelay-it.XXXXXX)
NS="stsrelay-it-$$"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  ip netns exec "$NS" postfix -c "$W/pf/etc" stop >/dev/null 2>&1 || true
  ip netns exec "$NS" postfix -c "$W/pf2/etc" stop >/dev/null 2>&1 || true
  for p in $(ip netns pids "$NS" 2>/dev/null); do kill "$p" 2>/dev/null || true; done
  ip netns del "$NS" 2>/dev/null || true
  if [ -n "${KEEP:-}" ]; then echo "integration: kept $W"; else rm -rf "$W"; fi
}
trap cleanup EXIT
ip netns add "$NS"
ip netns exec "$NS" ip link set lo up
# Each peer's own address (Postfix insists that inet_interfaces are configured addresses).
for last in 25 26 27 28 29 30 31 53 80 81; do ip netns exec "$NS" ip addr add "127.0.0.$last/32" dev lo; done
inns() { ip netns exec "$NS" "$@"; }

# Wait (bounded) until something listens on proto/addr:port inside the namespace.
wait_listen() {
  local proto=$1 addr=$2
  for _ in $(seq 1 100); do
    if inns ss -H -ln -"$proto" | awk '{print $4}' | grep -qx "$addr"; then return 0; fi
    sleep 0.1
  done
  echo "integration: nothing listens on $proto $addr"; return 1
}

# --- test PKI (openssl) -------------------------------------------------------------
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 \
  -subj "/CN=stsrelay integration CA" -keyout "$W/ca.key" -out "$W/ca.pem" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
# leaf NAME SAN-DNS-NAME...: a certificate for NAME signed by the test CA
leaf() {
  local name=$1; shift
  local san; san=$(printf 'DNS:%s,' "$@"); san=${san%,}
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -subj "/CN=$name" -keyout "$W/$name.key" -out "$W/$name.csr" 2>/dev/null
  printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' "$san" > "$W/$name.ext"
  openssl x509 -req -in "$W/$name.csr" -CA "$W/ca.pem" -CAkey "$W/ca.key" -CAcreateserial \
    -days 30 -extfile "$W/$name.ext" -out "$W/$name.pem" 2>/dev/null
}
leaf mta-sts.good.test mta-sts.good.test
leaf mta-sts.bad.test mta-sts.bad.test
leaf mta-sts.redir.test mta-sts.redir.test
leaf mta-sts.testing.test mta-sts.testing.test
leaf mx1.good.test mx1.good.test
leaf mx1.bad.test other.bad.test                      # wrong name
leaf mx.moved.test mx.moved.test
leaf mta-sts.expired.test mta-sts.expired.test
leaf mta-sts.moved.test mta-sts.moved.test
# An expired certificate needs `openssl ca` (x509 -req cannot back-date).
mkdir -p "$W/ca-db"; : > "$W/ca-db/index.txt"; echo 1000 > "$W/ca-db/serial"
cat > "$W/ca.cnf" <<CNF
[ ca ]
default_ca = test
[ test ]
database = $W/ca-db/index.txt
serial = $W/ca-db/serial
new_certs_dir = $W/ca-db
certificate = $W/ca.pem
private_key = $W/ca.key
default_md = sha256
policy = any
copy_extensions = copy
[ any ]
commonName = supplied
CNF
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=mx.expired.test" \
  -addext "subjectAltName=DNS:mx.expired.test" -keyout "$W/mx.expired.test.key" -out "$W/mx.expired.test.csr" 2>/dev/null
openssl ca -batch -config "$W/ca.cnf" -startdate 20200101000000Z -enddate 20200201000000Z -notext \
  -in "$W/mx.expired.test.csr" -out "$W/mx.expired.test.pem" 2>/dev/null
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 \
  -subj "/CN=mx2.bad.test" -addext "subjectAltName=DNS:mx2.bad.test" \
  -keyout "$W/mx2.bad.test.key" -out "$W/mx2.bad.test.pem" 2>/dev/null   # self-signed

# --- DNS: Knot, authoritative for test. on 127.0.0.53 --------------------------------
mkdir -p "$W/knot"
cat > "$W/test.zone" <<ZONE
\$ORIGIN test.
\$TTL 5
@                 SOA ns.test. hostmaster.test. 1 3600 600 86400 5
@                 NS  ns.test.
ns                A   127.0.0.53
_mta-sts.good     TXT "v=STSv1; id=20261128"
_smtp._tls.good   TXT "v=TLSRPTv1; " "rua=mailto:tlsrpt@good.test"
mta-sts.good      A   127.0.0.80
good              MX  10 mx1.good
mx1.good          A   127.0.0.25
_mta-sts.bad      TXT "v=STSv1; id=1"
mta-sts.bad       A   127.0.0.80
bad               MX  10 mx1.bad
bad               MX  20 mx2.bad
bad               MX  30 mx3.bad
mx1.bad           A   127.0.0.26
mx2.bad           A   127.0.0.27
mx3.bad           A   127.0.0.28
_mta-sts.redir    TXT "v=STSv1; id=1"
mta-sts.redir     A   127.0.0.80
redir             MX  10 mx1.good
_mta-sts.testing  TXT "v=STSv1; id=1"
mta-sts.testing   A   127.0.0.80
testing           MX  10 mx2.bad
nopolicy          MX  10 mx3.bad
reject            MX  10 mx3.bad
client            MX  10 mx.client
_mta-sts.expired  TXT "v=STSv1; id=1"
mta-sts.expired   A   127.0.0.80
expired           MX  10 mx.expired
mx.expired        A   127.0.0.29
_mta-sts.moved    TXT "v=STSv1; id=1"
mta-sts.moved     A   127.0.0.80
moved             MX  10 mx.moved
mx.moved          A   127.0.0.31
mx.client         A   127.0.0.30
ZONE
cat > "$W/knot.conf" <<KNOT
server:
    listen: 127.0.0.53@53
    rundir: "$W/knot"
    user: root:root
database:
    storage: "$W/knot"
log:
  - target: "$W/knot.log"
    any: info
zone:
  - domain: test.
    file: "$W/test.zone"
    storage: "$W/knot"
    zonefile-sync: -1
    journal-content: none
KNOT
inns knotd -c "$W/knot.conf" >"$W/knotd.out" 2>&1 &
pids+=($!)

# --- policy hosts: nginx on 127.0.0.80:443 ---------------------------------------------
mkdir -p "$W/www/good/.well-known" "$W/www/bad/.well-known" "$W/www/testing/.well-known" "$W/nginx-tmp"
printf 'version: STSv1\nmode: testing\nmx: *.bad.test\nmax_age: 86400\n' > "$W/www/testing/.well-known/mta-sts.txt"
mkdir -p "$W/www/expired/.well-known" "$W/www/moved/.well-known"
printf 'version: STSv1\nmode: enforce\nmx: mx.expired.test\nmax_age: 86400\n' > "$W/www/expired/.well-known/mta-sts.txt"
printf 'version: STSv1\nmode: enforce\nmx: mx.old.moved.test\nmax_age: 86400\n' > "$W/www/moved/.well-known/mta-sts.txt"
printf 'version: STSv1\nmode: enforce\nmx: mx1.good.test\nmax_age: 86400\n' > "$W/www/good/.well-known/mta-sts.txt"
printf 'version: STSv1\r\nmode: enforce\r\nmx: *.bad.test\r\nmax_age: 86400\r\n' > "$W/www/bad/.well-known/mta-sts.txt"
vhost() { # name root-or-empty extra
  cat <<VHOST
  server {
    listen 127.0.0.80:443 ssl;
    server_name $1;
    ssl_certificate $W/$1.pem;
    ssl_certificate_key $W/$1.key;
    $2
  }
VHOST
}
cat > "$W/nginx.conf" <<NGINX
user root;
worker_processes 1;
pid $W/nginx.pid;
error_log $W/nginx-error.log;
events { worker_connections 64; }
http {
  log_format hosts '\$host \$request \$status';
  access_log $W/nginx-access.log hosts;
  client_body_temp_path $W/nginx-tmp/body;
  proxy_temp_path $W/nginx-tmp/proxy;
  fastcgi_temp_path $W/nginx-tmp/fastcgi;
  uwsgi_temp_path $W/nginx-tmp/uwsgi;
  scgi_temp_path $W/nginx-tmp/scgi;
  types { }
  default_type text/plain;
$(vhost mta-sts.good.test "root $W/www/good;")
$(vhost mta-sts.bad.test "root $W/www/bad;")
$(vhost mta-sts.testing.test "root $W/www/testing;")
$(vhost mta-sts.expired.test "root $W/www/expired;")
$(vhost mta-sts.moved.test "root $W/www/moved;")
$(vhost mta-sts.redir.test "return 301 https://mta-sts.good.test/.well-known/mta-sts.txt;")
}
NGINX
inns nginx -c "$W/nginx.conf" -g 'daemon off;' >"$W/nginx.out" 2>&1 &
pids+=($!)

# --- MX hosts: Postfix (good, 127.0.0.25) and aiosmtpd (bad ones) -------------------
mkdir -p "$W/pf/etc" "$W/pf/queue" "$W/pf/data"
sed -E 's/^([a-z]+ +(inet|unix|unix-dgram|fifo|pass) +[-yn] +[-yn] +)y/\1n/' /etc/postfix/master.cf > "$W/pf/etc/master.cf"
cat > "$W/pf/etc/main.cf" <<PF
compatibility_level = 3.6
queue_directory = $W/pf/queue
data_directory = $W/pf/data
inet_interfaces = 127.0.0.25
inet_protocols = ipv4
myhostname = mx1.good.test
mydestination =
mynetworks = 127.0.0.0/8
virtual_mailbox_domains = good.test
virtual_mailbox_base = $W/mail
virtual_mailbox_maps = static:good.test/
virtual_uid_maps = static:65534
virtual_gid_maps = static:65534
alias_maps =
alias_database =
local_recipient_maps =
smtpd_tls_cert_file = $W/mx1.good.test.pem
smtpd_tls_key_file = $W/mx1.good.test.key
smtpd_tls_security_level = may
maillog_file_prefixes = $W
maillog_file = $W/pf/maillog
PF
chmod 755 "$W"
mkdir -p "$W/mail"
chown 65534:65534 "$W/mail"
chown root "$W/pf/queue"
chown postfix "$W/pf/data"
inns postfix -c "$W/pf/etc" start >"$W/pf/start.out" 2>&1 || { cat "$W/pf/start.out"; exit 1; }

# --- the sending Postfix (127.0.0.30): relayhost = stsrelay; also the MX of client.test,
# so bounces come home to it -----------------------------------------------------------
mkdir -p "$W/pf2/etc" "$W/pf2/queue" "$W/pf2/data"
cp "$W/pf/etc/master.cf" "$W/pf2/etc/master.cf"
cat > "$W/pf2/etc/main.cf" <<PF
compatibility_level = 3.6
queue_directory = $W/pf2/queue
data_directory = $W/pf2/data
inet_interfaces = 127.0.0.30
inet_protocols = ipv4
myhostname = client.test
myorigin = client.test
mydestination =
mynetworks = 127.0.0.0/8
relayhost = [127.0.0.1]:2525
virtual_mailbox_domains = client.test
virtual_mailbox_base = $W/mail
virtual_mailbox_maps = static:client.test/
virtual_uid_maps = static:65534
virtual_gid_maps = static:65534
alias_maps =
alias_database =
maillog_file_prefixes = $W
maillog_file = $W/pf2/maillog
PF
chown root "$W/pf2/queue"
chown postfix "$W/pf2/data"
inns postfix -c "$W/pf2/etc" start >"$W/pf2/start.out" 2>&1 || { cat "$W/pf2/start.out"; exit 1; }

inns /usr/bin/python3 "$HERE/sinks.py" "$W" \
  "127.0.0.26:mx1.bad.test:$W/mx1.bad.test.pem:$W/mx1.bad.test.key" \
  "127.0.0.27:mx2.bad.test:$W/mx2.bad.test.pem:$W/mx2.bad.test.key" \
  "127.0.0.28:mx3.bad.test" \
  "127.0.0.29:mx.expired.test:$W/mx.expired.test.pem:$W/mx.expired.test.key" \
  "127.0.0.31:mx.moved.test:$W/mx.moved.test.pem:$W/mx.moved.test.key" >"$W/sinks.out" 2>&1 &
pids+=($!)

wait_listen u 127.0.0.53:53
wait_listen t 127.0.0.80:443
for ip in 25 26 27 28 29 30 31; do wait_listen t "127.0.0.$ip:25"; done

cat > "$W/stsrelay.toml" <<CFG
[dns]
nameservers = ["127.0.0.53:53"]
# test. is not signed here: DANE is exercised by dane.sh with its own trust anchor.
dnssec = false
[tls]
extra_roots = ["$W/ca.pem"]
[storage]
data_dir = "$W/data"
[delivery]
port = 25
helo_name = "relay.sender.test"
[sts]
fetch_timeout_secs = 10
CFG
cp "$W/stsrelay.toml" "$W/relay.toml"
cat >> "$W/relay.toml" <<CFG
[server]
listen = "127.0.0.1:2525"
hostname = "relay.sender.test"
[queue]
retry_secs = [2]
CFG
# Not through `inns` (a shell function, so $! would be a subshell): $! is the relay itself.
RUST_LOG=stsrelay=debug ip netns exec "$NS" "$BIN" --config "$W/relay.toml" run >"$W/relay.log" 2>&1 &
RELAY_PID=$!
pids+=($RELAY_PID)
wait_listen t 127.0.0.1:2525

# --- scenarios ----------------------------------------------------------------------
passed=0; failed=0
# expect NAME DOMAIN EXIT PYTHON-ASSERTIONS (over the parsed JSON `r`)
expect() {
  local name=$1 domain=$2 want=$3 asserts=$4 rc=0
  inns "$BIN" --config "$W/stsrelay.toml" check --json "$domain" >"$W/$name.json" 2>"$W/$name.err" || rc=$?
  if [ "$rc" != "$want" ]; then
    echo "FAIL $name: exit $rc, wanted $want"; cat "$W/$name.json" "$W/$name.err"; failed=$((failed+1)); return
  fi
  if /usr/bin/python3 - "$W/$name.json" <<PY
import json, sys
r = json.load(open(sys.argv[1]))
mx = {m["host"]: m for m in r["mx"]}
$asserts
PY
  then echo "ok   $name"; passed=$((passed+1))
  else echo "FAIL $name"; cat "$W/$name.json"; failed=$((failed+1)); fi
}

expect good_domain_passes good.test 0 '
assert r["ok"] is True
assert r["sts_record"] == {"ok": True, "id": "20261128", "error": None}, r["sts_record"]
assert r["policy"]["mode"] == "enforce" and r["policy"]["mx"] == ["mx1.good.test"]
assert r["tlsrpt_record"]["rua"] == ["mailto:tlsrpt@good.test"]
m = mx["mx1.good.test"]
assert m["policy_match"] is True and m["starttls"] is True, m
assert m["tls_version"] in ("TLSv1.3", "TLSv1.2"), m
assert m["certificate"]["ok"] is True, m
'
expect bad_mx_hosts_are_classified bad.test 1 '
assert r["ok"] is False and r["policy"]["ok"] is True
assert mx["mx1.bad.test"]["certificate"]["result_type"] == "certificate-host-mismatch", mx["mx1.bad.test"]
assert mx["mx2.bad.test"]["certificate"]["result_type"] == "certificate-not-trusted", mx["mx2.bad.test"]
assert mx["mx3.bad.test"]["starttls"] is False
assert mx["mx3.bad.test"]["certificate"]["result_type"] == "starttls-not-supported"
assert all(m["policy_match"] is True for m in mx.values())
'
expect redirect_is_not_followed redir.test 1 '
assert r["policy"]["ok"] is False
assert r["policy"]["result_type"] == "sts-policy-fetch-error", r["policy"]
assert "301" in r["policy"]["error"]
assert mx["mx1.good.test"]["policy_match"] is None
'
expect no_record_no_policy nothing.test 1 '
assert r["sts_record"] is None and r["policy"] is None and r["tlsrpt_record"] is None
'
# R14: the redirect was answered once and not followed: the policy at its target
# (mta-sts.good.test) was fetched only by good.test's own check.
hits() { grep -c "^$1 GET /.well-known/mta-sts.txt " "$W/nginx-access.log" || true; }
if [ "$(hits mta-sts.redir.test)" = 1 ] && [ "$(hits mta-sts.good.test)" = 1 ]; then
  echo "ok   redirect_target_never_requested"; passed=$((passed+1))
else
  echo "FAIL redirect_target_never_requested"; cat "$W/nginx-access.log"; failed=$((failed+1))
fi

# --- the relay, with real Postfix as its client -----------------------------------------
inns /usr/bin/python3 - <<'PY'
import smtplib
msg = "From: alice@client.test\r\nSubject: integration {}\r\n\r\nHello from Postfix via stsrelay.\r\n"
with smtplib.SMTP("127.0.0.30", 25, timeout=10) as s:
    for rcpt in ["bob@good.test", "bob@bad.test", "bob@testing.test", "bob@nopolicy.test", "nobody@reject.test",
                 "bob@expired.test", "bob@moved.test"]:
        s.sendmail("alice@client.test", [rcpt], msg.format(rcpt))
PY
# wait_for NAME COMMAND: bounded wait (30 s) for a condition.
wait_for() {
  local name=$1; shift
  for _ in $(seq 1 300); do if "$@" >/dev/null 2>&1; then echo "ok   $name"; passed=$((passed+1)); return; fi; sleep 0.1; done
  echo "FAIL $name"; failed=$((failed+1))
}
in_maildir() { grep -rlq -- "$2" "$W/mail/$1/new/" 2>/dev/null; }
sink_has() { grep -q -- "$2" "$W/sink-$1.eml" 2>/dev/null; }
wait_for enforce_good_mx_delivered_over_verified_tls in_maildir good.test "integration bob@good.test"
if grep -rq "by mx1.good.test (Postfix) with ESMTPS" "$W/mail/good.test/new/"; then echo "ok   good_mx_received_over_tls"; passed=$((passed+1));
else echo "FAIL good_mx_received_over_tls"; failed=$((failed+1)); fi
wait_for testing_mode_bad_cert_delivered sink_has 127.0.0.27 "integration bob@testing.test"
wait_for no_policy_delivered_plaintext sink_has 127.0.0.28 "integration bob@nopolicy.test"
wait_for bounce_reaches_the_sender in_maildir client.test "Final-Recipient: rfc822; nobody@reject.test"
# deferred_with RCPT TEXT: the recipient is deferred and its reason (queue show) contains TEXT.
deferred_with() {
  inns "$BIN" --config "$W/relay.toml" queue list --json > "$W/queue.json" &&
  /usr/bin/python3 - "$W/queue.json" "$1" "$2" <<'PY'
import json, sys
q = json.load(open(sys.argv[1]))
r = [r for m in q for r in m["recipients"] if r["address"] == sys.argv[2]]
assert r and r[0]["state"] == "deferred" and sys.argv[3] in (r[0]["last_reason"] or ""), r
PY
}
wait_for enforce_bad_mx_deferred_with_reason deferred_with bob@bad.test "4.7"
wait_for enforce_expired_cert_deferred deferred_with bob@expired.test "expired"
wait_for enforce_mx_not_in_policy_deferred deferred_with bob@moved.test "not permitted by the MTA-STS policy"
# The domain fixes its policy: new policy file, new TXT id (zone reloaded); one flush later it is delivered.
printf 'version: STSv1\nmode: enforce\nmx: mx.moved.test\nmax_age: 86400\n' > "$W/www/moved/.well-known/mta-sts.txt"
sed -i -e 's/^_mta-sts.moved    TXT "v=STSv1; id=1"/_mta-sts.moved    TXT "v=STSv1; id=2"/' \
  -e 's/hostmaster.test. 1 /hostmaster.test. 2 /' "$W/test.zone"
inns knotc -c "$W/knot.conf" zone-reload test. >/dev/null
sleep 6   # the zone's TTL is 5 s
inns "$BIN" --config "$W/relay.toml" queue flush >/dev/null
wait_for policy_fixed_new_id_delivered sink_has 127.0.0.31 "integration bob@moved.test"
if grep -q "integration bob@expired.test" "$W/sink-127.0.0.29.eml" 2>/dev/null; then
  echo "FAIL expired_mx_got_nothing"; failed=$((failed+1))
else echo "ok   expired_mx_got_nothing"; passed=$((passed+1)); fi
if grep -q "integration bob@bad.test" "$W"/sink-127.0.0.2[678].eml 2>/dev/null; then
  echo "FAIL enforce_never_delivers_to_bad_mx"; failed=$((failed+1))
else echo "ok   enforce_never_delivers_to_bad_mx"; passed=$((passed+1)); fi

# --- operations (metrics, status page, signals); ends with the relay stopped -------
source "$HERE/ops.sh"

# --- TLS-RPT reports: parsedmarc and dkimpy read what the relay sent -----------------
source "$HERE/tlsrpt.sh"

source "$HERE/socketmap.sh"

# --- a fleet: two nodes sharing Redis (storage.backend = "redis") ---------------------
source "$HERE/fleet.sh"

# --- DANE: Knot signs dane.; check, relay + TLS-RPT, Postfix (unbound) via the socketmap
source "$HERE/dane.sh"

echo "integration: $passed passed, $failed failed"
[ "$failed" = 0 ]
