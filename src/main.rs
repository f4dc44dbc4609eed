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

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let cfg = match &cli.config {
        Some(path) => Config::load(path),
        None => Ok(Config::default()),
    };
    let cfg = match cfg {
        Ok(c) => c,
        Err(e) => {
            eprintln!("stsrelay: {e}");
            return ExitCode::from(2);
        }
    };
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
    }
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
