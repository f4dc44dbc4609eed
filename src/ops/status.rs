//! The HTML status page at `/` of the admin endpoint: queue by state, deliveries and
//! TLS results by policy mode over the last 24 hours, policies in the cache with their
//! expiry. One self-contained page (inline CSS, no scripts), rendered from a
//! [`Status`] snapshot by a pure function.

use super::activity::Recent;
use crate::queue::spool::QueueCounts;
use std::fmt::Write;

/// Policies listed on the page at most (the count says how many there are).
pub const MAX_POLICIES_SHOWN: usize = 200;

/// One cached MTA-STS policy, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRow {
    /// Policy domain.
    pub domain: String,
    /// `enforce`, `testing` or `none`.
    pub mode: String,
    /// `mx` patterns.
    pub mx: Vec<String>,
    /// The `_mta-sts` TXT id it was fetched under.
    pub id: String,
    /// Unix seconds of the fetch.
    pub fetched_at: i64,
    /// Unix seconds at which it expires.
    pub expires_at: i64,
}

/// Everything the page shows.
#[derive(Debug, Clone)]
pub struct Status {
    /// Unix seconds now.
    pub now: i64,
    /// Unix seconds the relay started.
    pub started: i64,
    /// This relay's name (`server.hostname`).
    pub hostname: String,
    /// Ready to take mail (see `/readyz`).
    pub ready: bool,
    /// Spool totals; `None` when the spool could not be read (the error instead).
    pub queue: Result<QueueCounts, String>,
    /// Deliveries running now.
    pub in_flight: usize,
    /// The last 24 hours.
    pub recent: Recent,
    /// Cached policies, at most [`MAX_POLICIES_SHOWN`], soonest expiry first.
    pub policies: Vec<PolicyRow>,
    /// Cached policies in all; `None` when the store could not be read.
    pub policies_total: Option<usize>,
    /// The latest TLS-RPT report of each domain, one row per destination; `None` when
    /// reports are off, `Err` when the ledger could not be read.
    pub reports: Option<Result<Vec<ReportRow>, String>>,
    /// The store: `sqlite`, or Redis with its health.
    pub store: StoreRow,
}

/// The store, as the status page shows it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StoreRow {
    /// `sqlite` or `redis`.
    pub backend: &'static str,
    /// With Redis: its URL (no password), whether it answers, the last failure and
    /// the counter batches kept locally.
    pub redis: Option<crate::store::FleetHealth>,
}

/// One report to one destination, as the status page shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportRow {
    /// The policy domain.
    pub domain: String,
    /// The UTC day reported on (`YYYY-MM-DD`).
    pub day: String,
    /// Where it goes.
    pub rua: String,
    /// `pending`, `sent` or `dropped`.
    pub state: String,
    /// Attempts so far.
    pub attempts: u32,
    /// The last outcome.
    pub last_result: String,
}

/// At most this many report rows are shown.
pub const MAX_REPORTS_SHOWN: usize = 200;

impl Default for Status {
    fn default() -> Self {
        Status {
            now: 0,
            started: 0,
            hostname: String::new(),
            ready: false,
            queue: Err("not read".to_string()),
            in_flight: 0,
            recent: Recent::default(),
            policies: Vec::new(),
            policies_total: None,
            reports: None,
            store: StoreRow::default(),
        }
    }
}

/// Escape text for HTML element content and attribute values.
///
/// ```
/// assert_eq!(stsrelay::ops::status::escape("<a & \"b\">"), "&lt;a &amp; &quot;b&quot;&gt;");
/// ```
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `3d 4h`, `5h 2m`, `7m 3s`, `42s`; negative spans are `-` plus the span.
///
/// ```
/// use stsrelay::ops::status::span;
/// assert_eq!(span(42), "42s");
/// assert_eq!(span(3 * 86400 + 4 * 3600 + 5), "3d 4h");
/// assert_eq!(span(-90), "-1m 30s");
/// ```
pub fn span(secs: i64) -> String {
    if secs < 0 {
        return format!("-{}", span(-secs));
    }
    let (d, h, m, s) = (
        secs / 86400,
        secs % 86400 / 3600,
        secs % 3600 / 60,
        secs % 60,
    );
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

/// A UTC timestamp `YYYY-MM-DD HH:MM` for Unix seconds.
///
/// ```
/// assert_eq!(stsrelay::ops::status::utc(0), "1970-01-01 00:00");
/// assert_eq!(stsrelay::ops::status::utc(1_795_000_000), "2026-11-18 11:06");
/// assert_eq!(stsrelay::ops::status::utc(951_782_400), "2000-02-29 00:00");
/// ```
pub fn utc(t: i64) -> String {
    let secs = t.rem_euclid(86400);
    let (y, m, d) = crate::clock::civil_from_days(t.div_euclid(86400));
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}",
        secs / 3600,
        secs % 3600 / 60
    )
}

const STYLE: &str = "
body{font:15px/1.4 system-ui,-apple-system,'DejaVu Sans',sans-serif;margin:0;background:#f4f5f7;color:#1d2430}
header{background:#1d2430;color:#fff;padding:14px 28px;display:flex;align-items:baseline;gap:18px}
header h1{font-size:20px;margin:0}header .meta{color:#aab3c2;font-size:13px}
.badge{padding:2px 10px;border-radius:10px;font-weight:600;font-size:13px}
.ok{background:#1f9d55;color:#fff}.bad{background:#cc1f1a;color:#fff}
main{padding:18px 28px;display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:18px}
section{background:#fff;border-radius:8px;padding:14px 18px;box-shadow:0 1px 2px rgba(0,0,0,.08)}
section.wide{grid-column:1/-1}
h2{font-size:15px;margin:0 0 10px;color:#4a5568;text-transform:uppercase;letter-spacing:.04em}
.cards{display:flex;gap:12px;flex-wrap:wrap}
.card{flex:1 1 0;min-width:70px;border:1px solid #e2e6ec;border-radius:6px;padding:8px 12px}
.card .n{font-size:26px;font-weight:700}.card .l{font-size:12px;color:#718096}
table{border-collapse:collapse;width:100%;font-size:14px}
th,td{text-align:left;padding:5px 8px;border-bottom:1px solid #edf0f4}
th{color:#718096;font-weight:600;font-size:12px;text-transform:uppercase}
td.num{text-align:right;font-variant-numeric:tabular-nums}th.num{text-align:right}
.enforce{color:#1f6f43;font-weight:600}.testing{color:#b7791f;font-weight:600}.none{color:#718096}
.fail{color:#cc1f1a}.good{color:#1f9d55}.muted{color:#718096;font-size:13px}
";

fn mode_class(mode: &str) -> &'static str {
    match mode {
        "enforce" => "enforce",
        "testing" => "testing",
        _ => "none",
    }
}

/// Render the page.
///
/// ```
/// use stsrelay::ops::status::{render, Status};
/// let html = render(&Status { hostname: "relay.example".into(), ready: true, queue: Ok(Default::default()), ..Default::default() });
/// assert!(html.contains("relay.example") && html.contains("Ready"));
/// ```
pub fn render(s: &Status) -> String {
    let mut h = String::with_capacity(8192);
    let _ = write!(
        h,
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>stsrelay {host}</title>\
         <meta name=viewport content=\"width=device-width\"><style>{STYLE}</style></head><body>\
         <header><h1>stsrelay</h1><span>{host}</span><span class=\"badge {cls}\">{ready}</span>\
         <span class=meta>version {ver} · up {up} · {now} UTC</span></header><main>",
        host = escape(&s.hostname),
        cls = if s.ready { "ok" } else { "bad" },
        ready = if s.ready { "Ready" } else { "Not ready" },
        ver = env!("CARGO_PKG_VERSION"),
        up = span(s.now - s.started),
        now = utc(s.now),
    );
    queue_section(&mut h, s);
    deliveries_section(&mut h, s);
    sessions_section(&mut h, s);
    policies_section(&mut h, s);
    reports_section(&mut h, s);
    store_section(&mut h, s);
    h.push_str("</main></body></html>\n");
    h
}

fn card(h: &mut String, n: impl std::fmt::Display, label: &str, class: &str) {
    let _ = write!(
        h,
        "<div class=card><div class=\"n {class}\">{n}</div><div class=l>{label}</div></div>"
    );
}

fn queue_section(h: &mut String, s: &Status) {
    h.push_str("<section><h2>Queue</h2>");
    match &s.queue {
        Ok(q) => {
            h.push_str("<div class=cards>");
            card(h, q.messages, "messages", "");
            card(h, q.queued, "recipients queued", "");
            card(
                h,
                q.deferred,
                "recipients deferred",
                if q.deferred > 0 { "fail" } else { "" },
            );
            card(h, s.in_flight, "deliveries in flight", "");
            card(
                h,
                q.corrupt,
                "corrupt",
                if q.corrupt > 0 { "fail" } else { "" },
            );
            h.push_str("</div>");
            let oldest = match q.oldest_received_at {
                Some(t) => format!("oldest pending message: {} old", span(s.now - t)),
                None => "nothing pending".to_string(),
            };
            let _ = write!(h, "<p class=muted>{oldest}</p>");
        }
        Err(e) => {
            let _ = write!(h, "<p class=fail>spool unreadable: {}</p>", escape(e));
        }
    }
    h.push_str("</section>");
}

const MODES: [&str; 3] = ["enforce", "testing", "none"];

fn deliveries_section(h: &mut String, s: &Status) {
    let _ = write!(
        h,
        "<section><h2>Deliveries by policy mode, last 24 h</h2><table><tr><th>mode</th>\
         <th class=num>delivered</th><th class=num>deferred</th><th class=num>bounced</th></tr>"
    );
    let d = &s.recent.deliveries;
    for mode in MODES {
        let get = |o: &'static str| d.get(&(mode, o)).copied().unwrap_or(0);
        let (ok, def, b) = (get("delivered"), get("deferred"), get("bounced"));
        let _ = write!(
            h,
            "<tr><td class={mc}>{mode}</td><td class=\"num good\">{ok}</td>\
             <td class=\"num{dc}\">{def}</td><td class=\"num{bc}\">{b}</td></tr>",
            mc = mode_class(mode),
            dc = if def > 0 { " fail" } else { "" },
            bc = if b > 0 { " fail" } else { "" },
        );
    }
    let _ = write!(
        h,
        "</table><p class=muted>recipient outcomes since {} UTC</p></section>",
        utc(s.recent.since)
    );
}

fn sessions_section(h: &mut String, s: &Status) {
    let sessions = &s.recent.sessions;
    // Columns: success first, then every failure type seen, in name order.
    let mut results: Vec<&'static str> = vec!["success"];
    for (_, r) in sessions.keys() {
        if !results.contains(r) {
            results.push(r);
        }
    }
    results[1..].sort_unstable();
    let _ = write!(
        h,
        "<section class=wide><h2>TLS results by policy mode, last 24 h</h2><table><tr><th>mode</th>"
    );
    for r in &results {
        let _ = write!(h, "<th class=num>{}</th>", escape(r));
    }
    h.push_str("</tr>");
    for mode in MODES {
        let _ = write!(h, "<tr><td class={}>{mode}</td>", mode_class(mode));
        for r in &results {
            let n = sessions.get(&(mode, *r)).copied().unwrap_or(0);
            let class = match (*r, n) {
                (_, 0) => "",
                ("success", _) => " good",
                _ => " fail",
            };
            let _ = write!(h, "<td class=\"num{class}\">{n}</td>");
        }
        h.push_str("</tr>");
    }
    h.push_str(
        "</table><p class=muted>one row per MX session: <i>success</i> or the RFC 8460 \
         result type of its failure</p></section>",
    );
}

fn store_section(h: &mut String, s: &Status) {
    h.push_str("<section><h2>Store</h2>");
    match &s.store.redis {
        None => {
            let _ = write!(h, "<p>{} (this node only)</p>", escape(s.store.backend));
        }
        Some(r) => {
            let _ = write!(
                h,
                "<p>Redis {url}: <span class={cls}>{state}</span></p>",
                url = escape(&r.url),
                cls = if r.up { "good" } else { "fail" },
                state = if r.up {
                    "answering"
                } else {
                    "unavailable: policies from the local copy, reports wait"
                },
            );
            if let Some(e) = &r.last_error {
                let _ = write!(h, "<p class=muted>last failure: {}</p>", escape(e));
            }
            let _ = write!(
                h,
                "<p class=\"{}\">TLS-RPT counter batches kept locally: {}</p>",
                if r.spilled_batches > 0 {
                    "fail"
                } else {
                    "muted"
                },
                r.spilled_batches
            );
        }
    }
    h.push_str("</section>");
}

fn policies_section(h: &mut String, s: &Status) {
    let total = match s.policies_total {
        Some(n) => n.to_string(),
        None => "?".to_string(),
    };
    let _ = write!(
        h,
        "<section class=wide><h2>MTA-STS policies in cache ({total})</h2>\
         <table><tr><th>domain</th><th>mode</th><th>mx</th><th>id</th><th>fetched (UTC)</th>\
         <th class=num>expires in</th></tr>"
    );
    for p in &s.policies {
        let left = p.expires_at - s.now;
        let _ = write!(
            h,
            "<tr><td>{d}</td><td class={mc}>{m}</td><td>{mx}</td><td>{id}</td><td>{f}</td>\
             <td class=\"num{ec}\">{e}</td></tr>",
            d = escape(&p.domain),
            mc = mode_class(&p.mode),
            m = escape(&p.mode),
            mx = escape(&p.mx.join(", ")),
            id = escape(&p.id),
            f = utc(p.fetched_at),
            ec = if left <= 0 { " fail" } else { "" },
            e = if left <= 0 {
                "expired".to_string()
            } else {
                span(left)
            },
        );
    }
    h.push_str("</table>");
    if s.policies_total.is_some_and(|n| n > s.policies.len()) {
        let _ = write!(
            h,
            "<p class=muted>showing the {} that expire first</p>",
            s.policies.len()
        );
    }
    if s.policies_total.is_none() {
        h.push_str("<p class=fail>policy store unreadable</p>");
    }
    h.push_str("</section>");
}

fn reports_section(h: &mut String, s: &Status) {
    h.push_str("<section class=wide><h2>TLS-RPT reports (latest per domain)</h2>");
    match &s.reports {
        None => h.push_str("<p class=muted>reports are off (tlsrpt.enabled = false)</p>"),
        Some(Err(e)) => {
            let _ = write!(
                h,
                "<p class=fail>report ledger unreadable: {}</p>",
                escape(e)
            );
        }
        Some(Ok(rows)) if rows.is_empty() => h.push_str("<p class=muted>no reports yet</p>"),
        Some(Ok(rows)) => {
            h.push_str(
                "<table><tr><th>domain</th><th>day</th><th>destination</th><th>state</th>\
                 <th class=num>attempts</th><th>last result</th></tr>",
            );
            for r in rows.iter().take(MAX_REPORTS_SHOWN) {
                let class = match r.state.as_str() {
                    "sent" => "ok",
                    "dropped" => "fail",
                    _ => "",
                };
                let _ = write!(
                    h,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"{class}\">{}</td>\
                     <td class=num>{}</td><td>{}</td></tr>",
                    escape(&r.domain),
                    escape(&r.day),
                    escape(&r.rua),
                    escape(&r.state),
                    r.attempts,
                    escape(&r.last_result),
                );
            }
            h.push_str("</table>");
        }
    }
    h.push_str("</section>");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_shows_queue_recent_and_policies_escaped() {
        let mut recent = Recent::default();
        recent.deliveries.insert(("enforce", "delivered"), 7);
        recent
            .sessions
            .insert(("testing", "certificate-expired"), 2);
        let s = Status {
            now: 1_800_000_000,
            started: 1_799_990_000,
            hostname: "relay<x>".into(),
            ready: true,
            queue: Ok(QueueCounts {
                messages: 3,
                deferred: 2,
                oldest_received_at: Some(1_799_999_000),
                ..Default::default()
            }),
            in_flight: 1,
            recent,
            policies: vec![PolicyRow {
                domain: "example.com".into(),
                mode: "enforce".into(),
                mx: vec!["*.example.com".into()],
                id: "2026<script>".into(),
                fetched_at: 1_799_000_000,
                expires_at: 1_800_086_400,
            }],
            policies_total: Some(1),
            reports: Some(Ok(vec![ReportRow {
                domain: "example.com".into(),
                day: "2026-11-27".into(),
                rua: "mailto:tlsrpt@example.com".into(),
                state: "sent".into(),
                attempts: 1,
                last_result: "queued as 1A2B".into(),
            }])),
            store: StoreRow {
                backend: "redis",
                redis: Some(crate::store::FleetHealth {
                    url: "redis://:***@db:6379".into(),
                    up: false,
                    last_error: Some("refused <x>".into()),
                    spilled_batches: 4,
                }),
            },
        };
        let h = render(&s);
        assert!(h.contains("mailto:tlsrpt@example.com"), "{h}");
        assert!(h.contains("queued as 1A2B"));
        assert!(h.contains("relay&lt;x&gt;"));
        assert!(!h.contains("<script>"));
        assert!(h.contains(">7</td>"), "{h}");
        assert!(h.contains("certificate-expired"));
        assert!(h.contains("oldest pending message: 16m 40s old"));
        assert!(h.contains("1d 0h"));
        assert!(h.contains("*.example.com"));
        assert!(h.contains("Redis redis://:***@db:6379"), "{h}");
        assert!(h.contains("unavailable: policies from the local copy"));
        assert!(h.contains("refused &lt;x&gt;"));
        assert!(h.contains("kept locally: 4"));
    }

    #[test]
    fn unreadable_parts_are_said() {
        let h = render(&Status {
            queue: Err("disk on fire".into()),
            ..Default::default()
        });
        assert!(h.contains("spool unreadable: disk on fire"));
        assert!(h.contains("policy store unreadable"));
        assert!(h.contains("Not ready"));
        assert!(h.contains("reports are off"));
    }
}
