//! A custom MTA's delivery loop on the stsrelay engine: policy -> allowed MX ->
//! verified TLS. `cargo run --example custom_mta -- example.com [--config FILE]`
//! connects to the domain's MX hosts and stops after STARTTLS (it sends no mail).

use std::net::SocketAddr;
use std::time::Duration;
use stsrelay::Config;
use stsrelay::dns::{MxAnswer, Resolver};
use stsrelay::smtp::outbound::Client;
use stsrelay::sts::Engine;
use stsrelay::tls::TrustStore;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let domain = args
        .get(1)
        .ok_or("usage: custom_mta DOMAIN [--config FILE]")?;
    let cfg = match args.iter().position(|a| a == "--config") {
        Some(i) => Config::load(args.get(i + 1).ok_or("--config needs a file")?.as_ref())?,
        None => Config::default(),
    };
    let (engine, dns, trust) = (
        Engine::from_config(&cfg)?,
        Resolver::from_config(&cfg)?,
        TrustStore::from_config(&cfg)?,
    );

    // 1. Which policy governs the domain? (cached, persisted, refreshed by the engine)
    let lookup = engine.policy(domain).await?;
    println!("policy mode: {:?}", lookup.mode());
    let hosts = match dns.mx(domain).await? {
        MxAnswer::Hosts(h) => h.into_iter().map(|m| m.host).collect(),
        MxAnswer::Implicit => vec![domain.to_string()],
        MxAnswer::Null | MxAnswer::NxDomain => return Err("domain accepts no mail".into()),
    };
    for host in hosts {
        // 2. May this MX get mail at all? (enforce: only hosts matching the mx patterns)
        let decision = lookup.check_mx(&host);
        if !decision.may_deliver() {
            println!("{host}: not in the policy, skipped");
            continue;
        }
        // 3. Connect; under enforce, STARTTLS with a WebPKI-valid certificate is required.
        let Some(ip) = dns.ips(&host).await?.into_iter().next() else {
            continue;
        };
        let addr = SocketAddr::new(ip, cfg.delivery.port);
        let (mut smtp, _) =
            Client::connect(addr, Duration::from_secs(30), Duration::from_secs(60)).await?;
        let ehlo = smtp.ehlo(&cfg.helo_name()).await?;
        let tls_config = if decision.requires_verified_tls() {
            trust.strict_config()
        } else {
            trust.opportunistic_config()
        };
        match (
            ehlo.has_extension("STARTTLS"),
            decision.requires_verified_tls(),
        ) {
            (false, true) => println!("{host}: no STARTTLS under enforce: defer, never plaintext"),
            (false, false) => println!("{host}: plaintext allowed (no enforce policy)"),
            (true, _) => match smtp.starttls(tls_config, &host).await {
                Ok((tls, info)) => {
                    println!(
                        "{host}: {} established; MAIL/RCPT/DATA would follow",
                        info.version
                    );
                    tls.quit().await;
                    return Ok(());
                }
                Err(e) => println!(
                    "{host}: TLS failed ({:?}): try the next MX",
                    e.result_type()
                ),
            },
        }
    }
    println!("no MX qualified: the message is deferred");
    Ok(())
}
