# Operating stsrelay against the real peers: sourced by integration/run.sh after the
# relay scenarios (uses $BIN, $W, $ROOT, inns, wait_for, passed, failed, pids).
# It ends by stopping the relay with SIGTERM: keep it the last relay scenario.
# SCREENSHOT_OUT=path copies the status page screenshot there (README's picture).

command -v chromium >/dev/null || {
  echo "integration: installing chromium"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-dejavu-core >/dev/null
}
ADMIN=http://127.0.0.1:9725
# The relay's pid inside the namespace (`ip netns exec` may fork: its pid is in pids,
# the relay is its child).
relay_pid() {
  local p
  for p in $(ip netns pids "$NS" 2>/dev/null); do
    if tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null | grep -q -- "$W/relay.toml run"; then
      echo "$p"; return 0
    fi
  done
  return 0
}
RELAY_PID=$(relay_pid)
# The process in pids that waits for it (exits with its status).
RELAY_WAITER=$RELAY_PID
for p in "${pids[@]}"; do
  [ -n "$RELAY_PID" ] && [ "$(awk '{print $4}' "/proc/$RELAY_PID/stat" 2>/dev/null)" = "$p" ] && RELAY_WAITER=$p
done
ok() { echo "ok   $1"; passed=$((passed+1)); }
bad() { echo "FAIL $1"; failed=$((failed+1)); }

# metrics_has PYTHON-ASSERTIONS over m(name, **labels) -> value (0 when absent).
metrics_has() {
  inns curl -sf "$ADMIN/metrics" > "$W/metrics.txt" && /usr/bin/python3 - "$W/metrics.txt" <<PY
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
$1
PY
}
# The relay scenarios above: good.test and moved.test delivered under enforce, bad.test
# and expired.test deferred with certificate failures, testing.test and nopolicy.test
# delivered, reject.test bounced (and its DSN delivered to client.test).
wait_for ops_metrics_after_postfix_deliveries metrics_has '
assert m("stsrelay_messages_received_total") >= 7
assert m("stsrelay_deliveries_total", outcome="delivered", mode="enforce") >= 2
assert m("stsrelay_deliveries_total", outcome="delivered", mode="testing") >= 1
assert m("stsrelay_deliveries_total", outcome="bounced", mode="none") >= 1
assert m("stsrelay_deliveries_total", outcome="deferred", mode="enforce") >= 3
assert m("stsrelay_tls_sessions_total", mode="enforce", result="certificate-host-mismatch") >= 1
assert m("stsrelay_tls_sessions_total", mode="enforce", result="certificate-expired") >= 1
assert m("stsrelay_tls_sessions_total", mode="enforce", result="success") >= 2
assert m("stsrelay_policy_fetches_total", outcome="ok") >= 4
assert m("stsrelay_smtp_replies_total", **{"class": "5xx"}) >= 1
assert m("stsrelay_inbound_sessions_total") >= 1
assert m("stsrelay_queue_recipients", state="deferred") >= 2
'
if [ "$(inns curl -s "$ADMIN/healthz")" = ok ] && [ "$(inns curl -s "$ADMIN/readyz")" = ready ]; then
  ok ops_health_and_readiness
else bad ops_health_and_readiness; fi
inns curl -sf "$ADMIN/" > "$W/status.html"
if grep -q "good.test" "$W/status.html" && grep -q "certificate-host-mismatch" "$W/status.html"; then
  ok ops_status_page_lists_policies_and_failures
else bad ops_status_page_lists_policies_and_failures; fi
# Headless Chromium renders the status page of the relay that served Postfix.
rm -f "$W/status.png"
inns timeout 120 chromium --headless --no-sandbox --disable-gpu --disable-dev-shm-usage --no-first-run \
  --hide-scrollbars --window-size=1280,860 --user-data-dir="$W/chromium" \
  --screenshot="$W/status.png" "$ADMIN/" >"$W/chromium.log" 2>&1 || true
if [ "$(head -c 8 "$W/status.png" 2>/dev/null | od -An -tx1 | tr -d ' \n')" = 89504e470d0a1a0a ]; then
  ok ops_status_page_screenshot
  [ -n "${SCREENSHOT_OUT:-}" ] && cp "$W/status.png" "$SCREENSHOT_OUT"
else bad ops_status_page_screenshot; cat "$W/chromium.log"; fi
# The cargo test takes its screenshot too when Chromium is installed (it skips otherwise).
if (cd "$ROOT" && STSRELAY_SCREENSHOT="$W/status-cargo.png" cargo test -q --test ops \
      metrics_count_deliveries_and_status_page_shows_them >"$W/cargo-ops.log" 2>&1) \
   && [ -s "$W/status-cargo.png" ]; then
  ok ops_cargo_status_page_screenshot
else bad ops_cargo_status_page_screenshot; tail -30 "$W/cargo-ops.log"; fi

if [ -z "$RELAY_PID" ]; then
  echo "FAIL ops: relay process not found"; failed=$((failed+1))
else
# SIGHUP: a [server] key changes live (the SIZE the relay advertises).
ehlo_size() {
  inns /usr/bin/python3 - "$1" <<'PY'
import smtplib, sys
with smtplib.SMTP("127.0.0.1", 2525, timeout=10) as s:
    s.ehlo("it.test")
    assert s.esmtp_features.get("size") == sys.argv[1], s.esmtp_features
PY
}
sed -i 's/^\[server\]$/[server]\nmax_message_size = 7777777/' "$W/relay.toml"
kill -HUP "$RELAY_PID"
wait_for ops_sighup_reload_changes_size ehlo_size 7777777
if grep -q "configuration reloaded" "$W/relay.log"; then ok ops_sighup_logged; else bad ops_sighup_logged; fi

# SIGTERM: a clean stop (exit 0) within the grace period, with a consistent spool.
kill -TERM "$RELAY_PID"
rc=0
if [ "$RELAY_WAITER" != "$RELAY_PID" ]; then wait "$RELAY_WAITER" || rc=$?
else for _ in $(seq 1 600); do [ -d "/proc/$RELAY_PID" ] || break; sleep 0.1; done; fi
if [ "$rc" = 0 ] && grep -q "stopped: " "$W/relay.log"; then ok ops_sigterm_clean_exit
else bad ops_sigterm_clean_exit; tail -5 "$W/relay.log"; fi
if inns "$BIN" --config "$W/relay.toml" queue list --json > "$W/queue-after.json" &&
   /usr/bin/python3 -c 'import json,sys; q=json.load(open(sys.argv[1])); assert all(not m["corrupt"] for m in q), q' "$W/queue-after.json"; then
  ok ops_spool_consistent_after_stop
else bad ops_spool_consistent_after_stop; fi
fi
