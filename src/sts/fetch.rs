//! Fetching `https://mta-sts.<domain>/.well-known/mta-sts.txt` by RFC 8461 §3.3's rules.

use super::policy::Policy;
use crate::dns::Resolver;
use crate::tls::{TlsFailure, TrustStore, find_rustls_error};
use crate::tlsrpt::ResultType;
use std::sync::Arc;
use std::time::Duration;

/// Largest policy body accepted (RFC 8461 §3.3 suggests 64 KB; R17).
pub const MAX_POLICY_BYTES: usize = 65_536;

/// A failed policy fetch, classified as the RFC 8460 result type it is reported as.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("policy fetch for {domain} failed ({result_type}): {reason}")]
pub struct FetchError {
    /// The policy domain.
    pub domain: String,
    /// `sts-policy-fetch-error`, `sts-policy-invalid` or `sts-webpki-invalid`.
    pub result_type: ResultType,
    /// What went wrong, for people.
    pub reason: String,
}

/// Where policies come from. The engine takes any implementation, so a custom MTA can
/// supply its own HTTP stack.
#[async_trait::async_trait]
pub trait PolicyFetcher: Send + Sync {
    /// Fetch and parse the policy of `domain` (a normalised policy domain).
    async fn fetch(&self, domain: &str) -> Result<Policy, FetchError>;
}

/// Timeouts and port for [`HttpsFetcher`].
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// TCP+TLS connect timeout.
    pub connect_timeout: Duration,
    /// Deadline for the whole fetch, body included.
    pub total_timeout: Duration,
    /// HTTPS port (443 except in tests).
    pub port: u16,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            connect_timeout: Duration::from_secs(10),
            total_timeout: Duration::from_secs(60),
            port: 443,
        }
    }
}

impl FetchOptions {
    /// From the `[sts]` section of a config.
    pub fn from_config(cfg: &crate::Config) -> FetchOptions {
        FetchOptions {
            connect_timeout: Duration::from_secs(cfg.sts.fetch_connect_timeout_secs),
            total_timeout: Duration::from_secs(cfg.sts.fetch_timeout_secs),
            port: cfg.sts.policy_port,
        }
    }
}

/// The RFC 8461 fetcher: reqwest over rustls with WebPKI (webpki-roots + extra roots),
/// SNI = policy host, no redirects, no HTTP caching, 200 only, `text/plain` only, body
/// capped at 64 KiB while streaming, names resolved by our hickory resolver.
#[derive(Clone)]
pub struct HttpsFetcher {
    client: reqwest::Client,
    opts: FetchOptions,
}

impl std::fmt::Debug for HttpsFetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpsFetcher")
            .field("opts", &self.opts)
            .finish()
    }
}

/// The HTTP client could not be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot build the policy HTTP client: {0}")]
pub struct FetcherSetupError(String);

impl HttpsFetcher {
    /// Build a fetcher that resolves through `resolver` and trusts `trust`.
    pub fn new(
        resolver: Resolver,
        trust: &TrustStore,
        opts: FetchOptions,
    ) -> Result<HttpsFetcher, FetcherSetupError> {
        let tls = (*trust.strict_config()).clone();
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .http1_only()
            .connect_timeout(opts.connect_timeout)
            .timeout(opts.total_timeout)
            .pool_max_idle_per_host(0)
            .user_agent(concat!("stsrelay/", env!("CARGO_PKG_VERSION")))
            .dns_resolver(Arc::new(resolver))
            .build()
            .map_err(|e| FetcherSetupError(e.to_string()))?;
        Ok(HttpsFetcher { client, opts })
    }

    /// The URL fetched for `domain`.
    pub fn url(&self, domain: &str) -> String {
        if self.opts.port == 443 {
            format!("https://mta-sts.{domain}/.well-known/mta-sts.txt")
        } else {
            format!(
                "https://mta-sts.{domain}:{}/.well-known/mta-sts.txt",
                self.opts.port
            )
        }
    }

    async fn fetch_body(&self, domain: &str) -> Result<String, FetchError> {
        let fail = |rt: ResultType, reason: String| FetchError {
            domain: domain.to_string(),
            result_type: rt,
            reason,
        };
        let fetch_error = |reason: String| fail(ResultType::StsPolicyFetchError, reason);
        let url = self.url(domain);
        let mut resp = self
            .client
            .get(&url)
            .send()
            .await
            .map_err(|e| classify_reqwest(domain, &e))?;
        let status = resp.status();
        if status.is_redirection() {
            return Err(fetch_error(format!(
                "HTTP {status} redirect to {:?} not followed (RFC 8461 §3.3)",
                resp.headers()
                    .get("location")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
            )));
        }
        if status != reqwest::StatusCode::OK {
            return Err(fetch_error(format!(
                "HTTP status {status}, only 200 is valid"
            )));
        }
        let ctype = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !is_text_plain(ctype) {
            return Err(fail(
                ResultType::StsPolicyInvalid,
                format!("Content-Type {ctype:?} is not text/plain"),
            ));
        }
        if resp
            .content_length()
            .is_some_and(|l| l > MAX_POLICY_BYTES as u64)
        {
            return Err(fetch_error(format!(
                "policy larger than {MAX_POLICY_BYTES} bytes"
            )));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| classify_reqwest(domain, &e))?
        {
            if body.len() + chunk.len() > MAX_POLICY_BYTES {
                return Err(fetch_error(format!(
                    "policy larger than {MAX_POLICY_BYTES} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        String::from_utf8(body)
            .map_err(|_| fail(ResultType::StsPolicyInvalid, "policy is not UTF-8".into()))
    }
}

#[async_trait::async_trait]
impl PolicyFetcher for HttpsFetcher {
    async fn fetch(&self, domain: &str) -> Result<Policy, FetchError> {
        let body = tokio::time::timeout(self.opts.total_timeout, self.fetch_body(domain))
            .await
            .map_err(|_| FetchError {
                domain: domain.to_string(),
                result_type: ResultType::StsPolicyFetchError,
                reason: format!("no complete answer within {:?}", self.opts.total_timeout),
            })??;
        Policy::parse(&body).map_err(|e| FetchError {
            domain: domain.to_string(),
            result_type: ResultType::StsPolicyInvalid,
            reason: e.to_string(),
        })
    }
}

/// `text/plain`, type and subtype case-insensitive, any parameters (R16).
fn is_text_plain(ctype: &str) -> bool {
    ctype
        .split(';')
        .next()
        .map(|t| t.trim().eq_ignore_ascii_case("text/plain"))
        .unwrap_or(false)
}

fn classify_reqwest(domain: &str, e: &reqwest::Error) -> FetchError {
    let mut reason = e.to_string();
    let mut src = std::error::Error::source(e);
    for _ in 0..8 {
        let Some(s) = src else { break };
        reason.push_str(": ");
        reason.push_str(&s.to_string());
        src = s.source();
    }
    let result_type = match find_rustls_error(e) {
        Some(tls @ rustls::Error::InvalidCertificate(_)) => {
            let f = TlsFailure::from(tls);
            reason = format!("policy host certificate: {} ({})", f.reason, f.reason_code);
            ResultType::StsWebpkiInvalid
        }
        _ if e.is_timeout() => {
            reason = format!("timed out: {reason}");
            ResultType::StsPolicyFetchError
        }
        _ => ResultType::StsPolicyFetchError,
    };
    FetchError {
        domain: domain.to_string(),
        result_type,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn r16_content_types() {
        for ok in [
            "text/plain",
            "text/plain; charset=utf-8",
            "TEXT/Plain;charset=us-ascii; format=flowed",
            "text/plain; charset=iso-8859-1",
        ] {
            assert!(is_text_plain(ok), "{ok}");
        }
        for bad in [
            "text/html",
            "application/octet-stream",
            "",
            "text/plainx",
            "text/plain-x; a=b",
        ] {
            assert!(!is_text_plain(bad), "{bad}");
        }
    }
}
