//! The `stsrelay` command line: a thin layer over the library.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use stsrelay::Config;

#[derive(Parser)]
#[command(
    name = "stsrelay",
    version,
    about = "MTA-STS enforcing SMTP relay and policy checker"
)]
struct Cli {
    /// Config file (TOML). Without it, built-in defaults are used.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay: accept mail on `server.listen`, spool it, deliver it under the
    /// recipients' MTA-STS policies.
    Run,
    /// Run only the Postfix socketmap TLS-policy server (`[socketmap]`, or its defaults:
    /// 127.0.0.1:8461), on the policy cache in `storage.data_dir`. Postfix:
    /// `smtp_tls_policy_maps = socketmap:inet:127.0.0.1:8461:postfix`.
    Socketmap,
    /// Inspect or act on the queue of a relay using the same `storage.data_dir`.
    Queue {
        #[command(subcommand)]
        action: QueueAction,
    },
    /// TLS-RPT reports (RFC 8460) from the sessions counted by a relay with the same
    /// `storage.data_dir`.
    Report {
        #[command(subcommand)]
        action: ReportAction,
    },
    /// SMTP AUTH helpers.
    Auth {
        #[command(subcommand)]
        action: AuthAction,
    },
    /// Check a domain's MTA-STS and TLS-RPT set-up from the sender's side.
    /// Exit status: 0 all checks pass, 1 a check failed, 2 usage or config error.
    Check {
        /// The recipient domain to check.
        domain: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum QueueAction {
    /// Every message: queue id, sender, each recipient with its state, attempts and last reason.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// One message in full (JSON).
    Show {
        /// Queue id.
        id: String,
    },
    /// Make every deferred recipient due now; a running relay retries within a second.
    Flush,
    /// Remove a message and its body.
    Delete {
        /// Queue id.
        id: String,
    },
}

#[derive(Subcommand)]
enum ReportAction {
    /// Print the reports a day would produce, as a JSON array (one per policy domain
    /// with sessions); where each would go is said on standard error.
    Preview {
        /// UTC day, YYYY-MM-DD (default: yesterday; today gives the day so far).
        #[arg(long)]
        day: Option<String>,
        /// Only this policy domain.
        #[arg(long)]
        domain: Option<String>,
    },
    /// Make a day's reports now and send them: e-mail goes through the spool (a running
    /// relay delivers it within seconds), HTTPS is posted at once and retried by the
    /// relay. Each (domain, day, rua) is sent once, ever.
    Send {
        /// UTC day, YYYY-MM-DD (today is allowed: its report ends now).
        #[arg(long)]
        day: String,
        /// Only this policy domain.
        #[arg(long)]
        domain: Option<String>,
    },
}

#[derive(Subcommand)]
enum AuthAction {
    /// Read a password from standard input and print its Argon2id hash, for a
    /// `user:hash` line of `server.auth_users_file`.
    Hash,
}

/// sysexits: configuration error.
const EX_CONFIG: u8 = 78;
/// sysexits: temporary failure.
const EX_TEMPFAIL: u8 = 75;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let cfg = match &cli.config {
        Some(path) => Config::load(path),
        None => Ok(Config::default()),
    };
    let cfg = match cfg {
        Ok(c) => c,
        Err(e) => {
            eprintln!("stsrelay: {e}");
            // `check` promises 2 for usage and config errors; the daemon uses sysexits.
            return ExitCode::from(match cli.command {
                Command::Check { .. } => 2,
                _ => EX_CONFIG,
            });
        }
    };
    init_logging(
        &cfg,
        matches!(cli.command, Command::Run | Command::Socketmap),
    );
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("stsrelay: cannot start the async runtime: {e}");
            return ExitCode::from(71);
        }
    };
    match cli.command {
        Command::Check { domain, json } => rt.block_on(check(&cfg, &domain, json)),
        Command::Run => rt.block_on(run(cfg)),
        Command::Socketmap => rt.block_on(socketmap(cfg)),
        Command::Queue { action } => queue(&cfg, action),
        Command::Report { action } => rt.block_on(report(&cfg, action)),
        Command::Auth {
            action: AuthAction::Hash,
        } => {
            let mut line = String::new();
            if std::io::stdin().read_line(&mut line).is_err()
                || line.trim_end_matches(['\r', '\n']).is_empty()
            {
                eprintln!("stsrelay: give the password on standard input");
                return ExitCode::from(2);
            }
            match stsrelay::smtp::auth::hash_password(line.trim_end_matches(['\r', '\n'])) {
                Ok(h) => {
                    println!("{h}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("stsrelay: {e}");
                    ExitCode::from(70)
                }
            }
        }
    }
}

/// Logs on standard error: `log.format` text or JSON, filter `RUST_LOG` or `log.level`.
/// The one-shot commands log warnings only unless `RUST_LOG` says otherwise.
fn init_logging(cfg: &Config, daemon: bool) {
    use stsrelay::config::LogFormat;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        let level = if daemon {
            cfg.log.level.as_str()
        } else {
            "warn"
        };
        tracing_subscriber::EnvFilter::try_new(level)
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"))
    });
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match cfg.log.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
}

async fn socketmap(cfg: Config) -> ExitCode {
    match stsrelay::socketmap::run(&cfg).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stsrelay: {e}");
            ExitCode::from(if e.is_config() {
                EX_CONFIG
            } else {
                EX_TEMPFAIL
            })
        }
    }
}

async fn report(cfg: &Config, action: ReportAction) -> ExitCode {
    use stsrelay::tlsrpt::Day;
    let parse_day = |d: Option<&str>| -> Result<Day, ExitCode> {
        match d {
            None => Ok(Day::of(stsrelay::clock::Clock::now(&stsrelay::clock::SystemClock)).prev()),
            Some(d) => d.parse::<Day>().map_err(|e| {
                eprintln!("stsrelay: --day: {e}");
                ExitCode::from(2)
            }),
        }
    };
    let (day, domain, send) = match &action {
        ReportAction::Preview { day, domain } => (parse_day(day.as_deref()), domain, false),
        ReportAction::Send { day, domain } => (parse_day(Some(day)), domain, true),
    };
    let day = match day {
        Ok(d) => d,
        Err(code) => return code,
    };
    if send && !cfg.tlsrpt.enabled {
        eprintln!(
            "stsrelay: reports are off (tlsrpt.enabled = false{})",
            cfg.source()
                .map(|p| format!(" in {}", p.display()))
                .unwrap_or_default()
        );
        return ExitCode::from(EX_CONFIG);
    }
    let service = match report_service(cfg).await {
        Ok(s) => s,
        Err((code, e)) => {
            eprintln!("stsrelay: {e}");
            return ExitCode::from(code);
        }
    };
    let result = if send {
        send_reports(&service, day, domain.as_deref()).await
    } else {
        service
            .preview(day, domain.as_deref())
            .await
            .map(|reports| {
                // One JSON array on stdout (scripts can parse it); destinations on stderr.
                for (r, rec) in &reports {
                    let domain = &r.policies[0].policy.policy_domain;
                    match rec {
                        Some(rec) => eprintln!(
                            "{domain}: would go to {}",
                            rec.rua
                                .iter()
                                .map(|u| u.to_string())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                        None => eprintln!("{domain}: publishes no usable TLS-RPT record: not sent"),
                    }
                }
                let all: Vec<_> = reports.into_iter().map(|(r, _)| r).collect();
                match serde_json::to_string_pretty(&all) {
                    Ok(json) => println!("{json}"),
                    Err(e) => eprintln!("stsrelay: {e}"),
                }
            })
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stsrelay: {e}");
            ExitCode::from(match e {
                stsrelay::tlsrpt::ReportError::FutureDay(_) => 2,
                stsrelay::tlsrpt::ReportError::Setup(_) => EX_CONFIG,
                _ => EX_TEMPFAIL,
            })
        }
    }
}

async fn report_service(cfg: &Config) -> Result<stsrelay::tlsrpt::ReportService, (u8, String)> {
    let store = stsrelay::store::Backend::open(cfg).map_err(|e| (EX_TEMPFAIL, e.to_string()))?;
    store.connect().await;
    let spool = stsrelay::queue::spool::Spool::open(&cfg.storage.data_dir)
        .map_err(|e| (EX_TEMPFAIL, e.to_string()))?;
    let resolver = stsrelay::dns::Resolver::from_config(cfg)
        .map_err(|e| (EX_CONFIG, format!("dns.nameservers: {e}")))?;
    let trust =
        stsrelay::tls::TrustStore::from_config(cfg).map_err(|e| (EX_CONFIG, e.to_string()))?;
    stsrelay::tlsrpt::ReportService::new(cfg, store.reports(), resolver, &trust, spool)
        .map_err(|e| (EX_CONFIG, e.to_string()))
}

async fn send_reports(
    service: &stsrelay::tlsrpt::ReportService,
    day: stsrelay::tlsrpt::Day,
    domain: Option<&str>,
) -> Result<(), stsrelay::tlsrpt::ReportError> {
    for g in service.generate(day, domain).await? {
        println!(
            "{}: {}{}",
            g.domain,
            g.report_id
                .as_deref()
                .map(|id| format!("report {id}, {} new destination(s)", g.new_rows))
                .unwrap_or_else(|| "no report".into()),
            g.note.map(|n| format!(" ({n})")).unwrap_or_default()
        );
    }
    for row in service.deliver_due().await? {
        println!(
            "{} {} -> {}: {} ({})",
            row.policy_domain,
            row.day,
            row.rua,
            row.state.as_str(),
            row.last_result.unwrap_or_default()
        );
    }
    Ok(())
}

async fn run(cfg: Config) -> ExitCode {
    // The binary records into Prometheus; the library only calls the `metrics` facade.
    use stsrelay::ops::metrics::{DELAY_BUCKETS, names};
    let builder = metrics_exporter_prometheus::PrometheusBuilder::new().set_buckets_for_metric(
        metrics_exporter_prometheus::Matcher::Full(names::DELIVERY_DELAY.to_string()),
        DELAY_BUCKETS,
    );
    let handle = match builder.and_then(|b| b.install_recorder()) {
        Ok(h) => Some(h),
        Err(e) => {
            tracing::warn!(error = %e, "metrics exporter not installed; /metrics is off");
            None
        }
    };
    stsrelay::ops::metrics::describe();
    let render: Option<stsrelay::ops::admin::MetricsRender> = handle.map(|h| {
        let f: stsrelay::ops::admin::MetricsRender = std::sync::Arc::new(move || {
            h.run_upkeep();
            h.render()
        });
        f
    });
    let source = cfg
        .source()
        .map(|p| format!(" (config file {})", p.display()))
        .unwrap_or_default();
    match stsrelay::relay::run(cfg, render).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is_config() => {
            tracing::error!(error = %e, "cannot start");
            eprintln!("stsrelay: {e}{source}");
            ExitCode::from(EX_CONFIG)
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            eprintln!("stsrelay: {e}");
            ExitCode::from(EX_TEMPFAIL)
        }
    }
}

fn queue(cfg: &Config, action: QueueAction) -> ExitCode {
    use stsrelay::queue::spool::{QueueId, Spool};
    let spool = match Spool::open(&cfg.storage.data_dir) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("stsrelay: {e}");
            return ExitCode::from(EX_TEMPFAIL);
        }
    };
    let parse = |id: &str| {
        id.parse::<QueueId>().map_err(|e| {
            eprintln!("stsrelay: {e}");
            ExitCode::from(2)
        })
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let result = match action {
        QueueAction::List { json } => spool.list().map(|msgs| {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&msgs).unwrap_or_default()
                );
            } else {
                for m in &msgs {
                    println!(
                        "{}  <{}>{}",
                        m.id,
                        m.envelope.mail_from,
                        if m.corrupt { "  CORRUPT" } else { "" }
                    );
                    for r in &m.recipients {
                        println!(
                            "    {:<9} attempts={} {}{}",
                            r.state.as_str(),
                            r.attempts,
                            r.address,
                            r.last_reason
                                .as_deref()
                                .map(|x| format!("  ({x})"))
                                .unwrap_or_default()
                        );
                    }
                }
                println!("{} message(s)", msgs.len());
            }
            ExitCode::SUCCESS
        }),
        QueueAction::Show { id } => match parse(&id) {
            Ok(id) => spool.get(&id).map(|m| match m {
                Some(m) => {
                    println!("{}", serde_json::to_string_pretty(&m).unwrap_or_default());
                    ExitCode::SUCCESS
                }
                None => {
                    eprintln!("stsrelay: no message {id}");
                    ExitCode::from(1)
                }
            }),
            Err(code) => return code,
        },
        QueueAction::Flush => spool.flush_all(now).map(|n| {
            println!("{n} recipient(s) due now");
            ExitCode::SUCCESS
        }),
        QueueAction::Delete { id } => match parse(&id) {
            Ok(id) => spool.delete(&id).map(|found| {
                if found {
                    println!("deleted {id}");
                    ExitCode::SUCCESS
                } else {
                    eprintln!("stsrelay: no message {id}");
                    ExitCode::from(1)
                }
            }),
            Err(code) => return code,
        },
    };
    result.unwrap_or_else(|e| {
        eprintln!("stsrelay: {e}");
        ExitCode::from(EX_TEMPFAIL)
    })
}

async fn check(cfg: &Config, domain: &str, json: bool) -> ExitCode {
    let checker = match stsrelay::check::Checker::from_config(cfg) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("stsrelay: {e}");
            return ExitCode::from(2);
        }
    };
    let report = checker.check(domain).await;
    if json {
        match serde_json::to_string_pretty(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("stsrelay: cannot render JSON: {e}");
                return ExitCode::from(70);
            }
        }
    } else {
        print!("{}", report.to_text());
    }
    if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
