# Fleet scenarios (storage.backend = "redis"), sourced by run.sh at its end (uses its
# fixtures: inns, leaf, vhost, wait_listen, wait_for, $W, $BIN, $HERE, $NS, pids,
# passed/failed, Knot and nginx).
#
# A real redis-server (Debian package, AOF on, as README recommends) and two stsrelay
# nodes (ports 2601/2602, admin 9601/9602, own data dirs) share policies, TLS-RPT
# counters and the report ledger:
#   1. node B, started after node A fetched fleet2.test's policy, uses it from Redis
#      (it never fetches it, though the policy host now answers 404) under enforce;
#   2. mail through both nodes; Redis is stopped mid-run: mail still flows, counters
#      are kept locally, and reach Redis once it is back;
#   3. the report run: the HTTPS endpoint hangs on the first upload, the process
#      holding it is killed (-9); another node sends it after the claim's lease. Each
#      domain gets exactly one report, and its session counts are the sum of both
#      nodes' sessions (their metrics).

fl_ok() { echo "ok   $1"; passed=$((passed+1)); }
fl_fail() { echo "FAIL $1"; failed=$((failed+1)); }

# --- Redis, the MX, the policy host and the report endpoint ---------------------------
mkdir -p "$W/redis"
start_redis() {
  ip netns exec "$NS" redis-server --port 6379 --bind 127.0.0.1 --dir "$W/redis" \
    --appendonly yes --appendfsync always --save "" >>"$W/redis.log" 2>&1 &
  REDIS_PID=$!
  pids+=($REDIS_PID)
  wait_listen t 127.0.0.1:6379
}
start_redis

inns ip addr add 127.0.0.82/32 dev lo
inns ip addr add 127.0.0.83/32 dev lo
leaf mx.fleet.test mx.fleet.test
leaf reports.fleet.test reports.fleet.test
leaf mta-sts.fleet2.test mta-sts.fleet2.test
cat >> "$W/test.zone" <<'ZONE'
fleet              MX  10 mx.fleet
fleet2             MX  10 mx.fleet
mx.fleet           A   127.0.0.83
reports.fleet      A   127.0.0.82
_smtp._tls.fleet   TXT "v=TLSRPTv1; rua=https://reports.fleet.test/fleet"
_smtp._tls.fleet2  TXT "v=TLSRPTv1; rua=https://reports.fleet.test/fleet2"
_mta-sts.fleet2    TXT "v=STSv1; id=1"
mta-sts.fleet2     A   127.0.0.80
ZONE
perl -pi -e 's/(hostmaster\.test\. )(\d+)/$1.($2+1)/e' "$W/test.zone"
inns knotc -c "$W/knot.conf" zone-reload test. >/dev/null
mkdir -p "$W/www/fleet2/.well-known"
printf 'version: STSv1\nmode: enforce\nmx: mx.fleet.test\nmax_age: 86400\n' > "$W/www/fleet2/.well-known/mta-sts.txt"
sed -i '$ d' "$W/nginx.conf"
vhost mta-sts.fleet2.test "root $W/www/fleet2;" >> "$W/nginx.conf"
echo "}" >> "$W/nginx.conf"
inns nginx -c "$W/nginx.conf" -s reload
inns /usr/bin/python3 "$HERE/sinks.py" "$W" \
  "127.0.0.83:mx.fleet.test:$W/mx.fleet.test.pem:$W/mx.fleet.test.key" >"$W/sinks-fleet.out" 2>&1 &
pids+=($!)
mkdir -p "$W/fleet-rua"
inns /usr/bin/python3 "$HERE/rua_https.py" 127.0.0.82 "$W/reports.fleet.test.pem" \
  "$W/reports.fleet.test.key" "$W/fleet-rua" 0 1 >"$W/fleet-rua.out" 2>&1 &
pids+=($!)
wait_listen t 127.0.0.83:25
wait_listen t 127.0.0.82:443

# --- two nodes --------------------------------------------------------------------------
node_conf() { # NAME SMTP-PORT ADMIN-PORT
  cp "$W/stsrelay.toml" "$W/node-$1.toml"
  sed -i "s|^data_dir = .*|data_dir = \"$W/node-$1\"\nbackend = \"redis\"\nredis_url = \"redis://127.0.0.1:6379/0\"\nredis_timeout_ms = 300\nredis_retry_secs = 1|" "$W/node-$1.toml"
  cat >> "$W/node-$1.toml" <<CFG
[server]
listen = "127.0.0.1:$2"
hostname = "node-$1.sender.test"
[queue]
retry_secs = [2]
[admin]
listen = "127.0.0.1:$3"
[tlsrpt]
enabled = true
organization_name = "stsrelay fleet"
contact_info = "tlsrpt@sender.test"
send_delay_max_secs = 0
https_timeout_secs = 8
https_retry_secs = 2
claim_lease_secs = 5
allow_private_rua = true
CFG
}
start_node() { # NAME SMTP-PORT
  RUST_LOG=stsrelay=debug ip netns exec "$NS" "$BIN" --config "$W/node-$1.toml" run >>"$W/node-$1.log" 2>&1 &
  eval "NODE_$1=$!"
  pids+=($!)
  wait_listen t "127.0.0.1:$2"
}
node_conf a 2601 9601
node_conf b 2602 9602

# send PORT DOMAIN N TAG: N messages to bob@DOMAIN through the node on PORT.
send() {
  inns /usr/bin/python3 - "$@" <<'PY'
import smtplib, sys
port, domain, n, tag = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
    for i in range(n):
        s.sendmail("alice@client.test", [f"bob@{domain}"],
                   f"From: alice@client.test\r\nSubject: fleet {tag} {i}\r\n\r\nfleet\r\n")
PY
}
# sink_count TAG: messages with "fleet TAG" in the fleet MX's mailbox.
sink_count() { local n; n=$(grep -c "fleet $1 " "$W/sink-127.0.0.83.eml" 2>/dev/null) || true; echo "${n:-0}"; }
sink_has_n() { [ "$(sink_count "$1")" -ge "$2" ]; }
# node_metric NAME PORT PYTHON-EXPR over m(name, **labels) and total(name) (sum over labels).
node_metric() {
  inns curl -sf "http://127.0.0.1:$2/metrics" > "$W/metrics-$1.txt" && /usr/bin/python3 - "$W/metrics-$1.txt" "$3" <<'PY'
import re, sys
samples = {}
for line in open(sys.argv[1]):
    if line.startswith("#") or not line.strip():
        continue
    series, value = line.rsplit(" ", 1)
    name, _, labels = series.partition("{")
    samples[(name, frozenset(re.findall(r'(\w+)="([^"]*)"', labels)))] = float(value)
def m(name, **labels):
    return samples.get((name, frozenset(labels.items())), 0.0)
def total(name):
    return sum(v for (n, _), v in samples.items() if n == name)
r = eval(sys.argv[2])
if r is True or r is False:
    sys.exit(0 if r else 1)
print(int(r))
PY
}

start_node a 2601
send 2601 fleet2.test 1 a-first
wait_for fleet_node_a_fetches_and_delivers_under_enforce sink_has_n a-first 1
# The policy host forgets the policy: a node that fetched now would see none.
mv "$W/www/fleet2/.well-known/mta-sts.txt" "$W/www/fleet2/mta-sts.txt.gone"
start_node b 2602
send 2602 fleet2.test 1 b-first
wait_for fleet_node_b_delivers_with_the_fleets_policy sink_has_n b-first 1
if node_metric b 9602 'm("stsrelay_deliveries_total", outcome="delivered", mode="enforce") >= 1 and total("stsrelay_policy_fetches_total") == 0'; then
  fl_ok fleet_node_b_used_the_shared_policy_without_fetching
else
  fl_fail fleet_node_b_used_the_shared_policy_without_fetching; cat "$W/metrics-b.txt" | grep -E "deliveries|policy_fetches"
fi
mv "$W/www/fleet2/mta-sts.txt.gone" "$W/www/fleet2/.well-known/mta-sts.txt"

# --- mail through both nodes; Redis stops mid-run -----------------------------------------
send 2601 fleet.test 5 run1
send 2602 fleet.test 4 run1
send 2601 fleet2.test 3 run1
send 2602 fleet2.test 2 run1
wait_for fleet_mail_through_both_nodes_delivered sink_has_n run1 14
kill "$REDIS_PID"; wait "$REDIS_PID" 2>/dev/null || true
# Pooled MX connections close after 5 s idle: the mail below opens new sessions, which
# must be counted although Redis is down.
sleep 6
send 2601 fleet.test 3 down
send 2602 fleet.test 2 down
send 2601 fleet2.test 2 down
send 2602 fleet2.test 1 down
wait_for fleet_mail_flows_while_redis_is_down sink_has_n down 8
both_spilled() {
  node_metric a 9601 'm("stsrelay_store_redis_up") == 0 and m("stsrelay_store_spilled_batches") >= 1' &&
  node_metric b 9602 'm("stsrelay_store_redis_up") == 0 and m("stsrelay_store_spilled_batches") >= 1'
}
wait_for fleet_nodes_keep_counters_locally_and_say_so both_spilled
if inns curl -sf http://127.0.0.1:9601/ | grep -q "unavailable: policies from the local copy"; then
  fl_ok fleet_status_page_says_redis_is_down
else
  fl_fail fleet_status_page_says_redis_is_down
fi
start_redis
both_drained() {
  node_metric a 9601 'm("stsrelay_store_redis_up") == 1 and m("stsrelay_store_spilled_batches") == 0' &&
  node_metric b 9602 'm("stsrelay_store_redis_up") == 1 and m("stsrelay_store_spilled_batches") == 0'
}
wait_for fleet_counters_reach_redis_when_it_returns both_drained

# Sessions of both nodes (every session of these nodes was with the fleet MX).
sa=$(node_metric a 9601 'total("stsrelay_tls_sessions_total")') || sa=-1
sb=$(node_metric b 9602 'total("stsrelay_tls_sessions_total")') || sb=-1
sessions=$(( ${sa:--1} + ${sb:--1} ))

# --- the report run: a sender dies mid-upload ----------------------------------------------
inns "$BIN" --config "$W/node-a.toml" report send --day "$(date -u +%F)" >"$W/fleet-report-send.out" 2>&1 &
REPORT_CLI=$!
hung_upload() { [ -f "$W/fleet-rua/rua-hung-1.bin" ]; }
wait_for fleet_first_upload_hangs hung_upload
holder=$(inns ss -Htnp state established dst 127.0.0.82:443 | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2)
if [ -n "$holder" ] && kill -9 "$holder"; then
  fl_ok "fleet_process_holding_the_upload_killed ($( [ "$holder" = "${NODE_a:-}" ] && echo node-a || ([ "$holder" = "${NODE_b:-}" ] && echo node-b || echo report-cli)))"
else
  fl_fail fleet_process_holding_the_upload_killed; inns ss -Htnp
fi
wait "$REPORT_CLI" 2>/dev/null || true
two_reports() { [ -f "$W/fleet-rua/rua-post-2.bin" ]; }
# Bounded: the lease (max(claim_lease_secs, 2 × https_timeout_secs + 5) = 21 s), then
# the next tick of a surviving node.
for _ in $(seq 1 60); do two_reports && break; sleep 1; done
sleep 5   # room for a duplicate to show up
if inns /usr/bin/python3 - "$W/fleet-rua" "$sessions" <<'PY'
import glob, gzip, json, sys
d, sessions = sys.argv[1], int(sys.argv[2])
posts = sorted(glob.glob(f"{d}/rua-post-*.bin"))
by_domain = {}
for p in posts:
    r = json.loads(gzip.decompress(open(p, "rb").read()))
    for pol in r["policies"]:
        dom = pol["policy"]["policy-domain"]
        s = pol["summary"]
        by_domain.setdefault(dom, []).append(
            (r["report-id"], s["total-successful-session-count"] + s["total-failure-session-count"]))
print(by_domain, "sessions:", sessions)
assert sorted(by_domain) == ["fleet.test", "fleet2.test"], by_domain
assert all(len(v) == 1 for v in by_domain.values()), "a domain got two reports"
total = sum(v[0][1] for v in by_domain.values())
assert total == sessions, f"report counts {total} != sessions of both nodes {sessions}"
hung = json.loads(gzip.decompress(open(f"{d}/rua-hung-1.bin", "rb").read()))
assert hung["report-id"] in [v[0][0] for v in by_domain.values()], "the hung upload was not sent again as the same report"
PY
then
  fl_ok "fleet_one_report_per_domain_with_both_nodes_counts ($sessions sessions)"
else
  fl_fail fleet_one_report_per_domain_with_both_nodes_counts; ls "$W/fleet-rua"; cat "$W/fleet-report-send.out"
fi
