# TLS-RPT scenarios, sourced by run.sh after the relay scenarios (uses its fixtures:
# $W, $BIN, inns, leaf, wait_listen, wait_for, RELAY_PID, passed/failed).
# The relay is restarted with reports enabled; `stsrelay report send` (a second process)
# makes today's reports on the sessions above; the running relay delivers the e-mails
# (to tlsrpt@good.test, the Postfix MX) and retries the HTTPS upload that got a 500.
# parsedmarc and dkimpy (PyPI, in a venv) check what arrived.

tlsrpt_ok() { echo "ok   $1"; passed=$((passed+1)); }
tlsrpt_fail() { echo "FAIL $1"; failed=$((failed+1)); }

if /usr/bin/python3 -m venv "$W/venv" >"$W/pip.log" 2>&1 &&
   timeout 900 "$W/venv/bin/pip" install -q parsedmarc dkimpy >>"$W/pip.log" 2>&1; then
  tlsrpt_ok tlsrpt_tools_installed
else
  tlsrpt_fail tlsrpt_tools_installed; tail -20 "$W/pip.log"
fi

# DKIM key (RSA 2048, PKCS#8 as openssl genpkey writes it) and its record. s=tlsrpt is
# RFC 8460 §3's sample; dkimpy 1.1.8 cannot read the colon list s=email:tlsrpt (README).
openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$W/dkim.pem" 2>/dev/null
dkim_p=$(openssl pkey -in "$W/dkim.pem" -pubout -outform DER | base64 -w0)
dkim_txt=$(printf '%s' "v=DKIM1; k=rsa; s=tlsrpt; p=$dkim_p" | fold -w 200 | sed 's/.*/"&"/' | tr '\n' ' ')
leaf reports.good.test reports.good.test
cat >> "$W/test.zone" <<ZONE
_smtp._tls.bad      TXT "v=TLSRPTv1; rua=mailto:tlsrpt@good.test,https://reports.good.test/v1/tlsrpt"
_smtp._tls.testing  TXT "v=TLSRPTv1;" "rua=mailto:tlsrpt@good.test"
reports.good        A   127.0.0.81
tlsrpt._domainkey.sender TXT $dkim_txt
ZONE
serial=$(awk '$2 == "SOA" {print $5; exit}' "$W/test.zone")
sed -i "s/hostmaster.test. $serial /hostmaster.test. $((serial + 1)) /" "$W/test.zone"
inns knotc -c "$W/knot.conf" zone-reload test. >/dev/null

# The HTTPS endpoint: 500 to the first POST, then 201.
inns /usr/bin/python3 "$HERE/rua_https.py" 127.0.0.81 "$W/reports.good.test.pem" \
  "$W/reports.good.test.key" "$W" 1 >"$W/rua_https.out" 2>&1 &
pids+=($!)
wait_listen t 127.0.0.81:443

# Restart the relay with reports on (the counters are on disk).
kill "$RELAY_PID" 2>/dev/null || true
wait "$RELAY_PID" 2>/dev/null || true
relay_gone() { ! inns ss -H -lnt | awk '{print $4}' | grep -qx 127.0.0.1:2525; }
wait_for relay_stopped relay_gone
cat >> "$W/relay.toml" <<CFG
[tlsrpt]
enabled = true
organization_name = "stsrelay integration"
contact_info = "tlsrpt@sender.test"
dkim_key_file = "$W/dkim.pem"
send_delay_max_secs = 0
https_retry_secs = 2
# The endpoint is on 127.0.0.81 (loopback inside the namespace).
allow_private_rua = true
CFG
RUST_LOG=stsrelay=debug ip netns exec "$NS" "$BIN" --config "$W/relay.toml" run >>"$W/relay.log" 2>&1 &
RELAY_PID=$!
pids+=($RELAY_PID)
wait_listen t 127.0.0.1:2525

zone_has_tlsrpt() { inns "$W/venv/bin/python" -c '
import dns.resolver; r = dns.resolver.Resolver(configure=False); r.nameservers = ["127.0.0.53"]
r.resolve("_smtp._tls.bad.test", "TXT"); r.resolve("tlsrpt._domainkey.sender.test", "TXT")'; }
wait_for tlsrpt_records_published zone_has_tlsrpt

if inns "$BIN" --config "$W/relay.toml" report send --day "$(date -u +%F)" >"$W/report-send.out" 2>&1; then
  tlsrpt_ok report_send_from_a_second_process
else
  tlsrpt_fail report_send_from_a_second_process; cat "$W/report-send.out"
fi
three_reports() { [ "$(grep -l '^TLS-Report-Domain:' "$W"/mail/good.test/new/* 2>/dev/null | wc -l)" -ge 3 ]; }
wait_for report_emails_delivered_by_the_running_relay three_reports
two_posts() { [ -f "$W/rua-post-2.bin" ]; }
wait_for https_report_retried_after_500 two_posts
if inns "$W/venv/bin/python" "$HERE/verify_tlsrpt.py" "$W" >"$W/verify.out" 2>&1; then
  tlsrpt_ok "parsedmarc_and_dkimpy_accept_the_reports ($(tail -1 "$W/verify.out"))"
else
  tlsrpt_fail parsedmarc_and_dkimpy_accept_the_reports; cat "$W/verify.out"
fi
# The ledger: asking again sends nothing new.
inns "$BIN" --config "$W/relay.toml" report send --day "$(date -u +%F)" >"$W/report-send2.out" 2>&1 || true
sleep 3
if grep -q "already in the ledger" "$W/report-send2.out" &&
   [ "$(grep -l '^TLS-Report-Domain:' "$W"/mail/good.test/new/* | wc -l)" -eq 3 ] && [ ! -f "$W/rua-post-3.bin" ]; then
  tlsrpt_ok ledger_sends_each_report_once
else
  tlsrpt_fail ledger_sends_each_report_once; cat "$W/report-send2.out"
fi
