//! HTTPS delivery of a report (RFC 8460 §5.4): one POST of the gzipped JSON with
//! `Content-Type: application/tlsrpt+gzip`, the endpoint's certificate checked against
//! the relay's trust store, no redirects, a time limit; only a 2xx counts (R86).

use crate::dns::Resolver;
use crate::tls::TrustStore;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// The media type of a gzipped report.
pub const TLSRPT_GZIP: &str = "application/tlsrpt+gzip";

/// Why an upload failed (it will be retried).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UploadError {
    /// No 2xx answer.
    #[error("HTTP {status} from {url}")]
    Status {
        /// The endpoint.
        url: String,
        /// The status code.
        status: u16,
    },
    /// Not attempted: the endpoint is not allowed (permanent).
    #[error("refused to POST to {url}: {reason}")]
    Refused {
        /// The endpoint.
        url: String,
        /// Why.
        reason: String,
    },
    /// Connection, TLS, time limit or another transport error.
    #[error("cannot POST to {url}: {reason}")]
    Transport {
        /// The endpoint.
        url: String,
        /// What went wrong.
        reason: String,
    },
}

/// The HTTP client could not be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot build the report HTTP client: {0}")]
pub struct UploaderSetupError(String);

/// Posts reports to `https:` rua endpoints.
#[derive(Clone, Debug)]
pub struct HttpsUploader {
    client: reqwest::Client,
    allow_private: bool,
}

/// Is `ip` an address a report may be posted to without `tlsrpt.allow_private_rua`?
/// Loopback, private (RFC 1918, ULA), link-local, unspecified, CGNAT, documentation and
/// multicast addresses are not: a domain's TLS-RPT record must not make the relay talk
/// to the operator's internal services.
pub fn is_public(ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(a) => {
            let o = a.octets();
            !(a.is_loopback()
                || a.is_private()
                || a.is_link_local()
                || a.is_unspecified()
                || a.is_broadcast()
                || a.is_multicast()
                || a.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (64..128).contains(&o[1])))
        }
        IpAddr::V6(a) => {
            let s = a.segments();
            !(a.is_loopback()
                || a.is_unspecified()
                || a.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || s[0] == 0x2001 && s[1] == 0x0db8)
        }
    }
}

/// Our resolver, answering only public addresses (see [`is_public`]).
#[derive(Clone)]
struct PublicOnly(Resolver);

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let this = self.0.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let ips: Vec<IpAddr> = this.ips(&host).await?;
            let public: Vec<SocketAddr> = ips
                .iter()
                .filter(|ip| is_public(**ip))
                .map(|ip| SocketAddr::new(*ip, 0))
                .collect();
            if public.is_empty() {
                return Err(format!(
                    "{host} has no public address ({ips:?}); tlsrpt.allow_private_rua is off"
                )
                .into());
            }
            let addrs: reqwest::dns::Addrs = Box::new(public.into_iter());
            Ok(addrs)
        })
    }
}

impl HttpsUploader {
    /// A client that resolves through `resolver`, trusts `trust` (WebPKI roots plus
    /// `tls.extra_roots`) and gives up after `timeout`. Unless `allow_private`, it only
    /// connects to public addresses (host names resolving elsewhere fail, and URLs with
    /// a non-public IP literal are refused).
    pub fn new(
        resolver: Resolver,
        trust: &TrustStore,
        timeout: Duration,
        allow_private: bool,
    ) -> Result<HttpsUploader, UploaderSetupError> {
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured((*trust.strict_config()).clone())
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .http1_only()
            .connect_timeout(timeout)
            .timeout(timeout)
            .user_agent(concat!("stsrelay/", env!("CARGO_PKG_VERSION")))
            .dns_resolver(if allow_private {
                Arc::new(resolver) as Arc<dyn reqwest::dns::Resolve>
            } else {
                Arc::new(PublicOnly(resolver))
            })
            .build()
            .map_err(|e| UploaderSetupError(e.to_string()))?;
        Ok(HttpsUploader {
            client,
            allow_private,
        })
    }

    /// POST `gzip` to `url`; `Ok` only for a 2xx answer.
    pub async fn post(&self, url: &str, gzip: &[u8]) -> Result<u16, UploadError> {
        let literal = reqwest::Url::parse(url).ok().and_then(|u| {
            u.host_str()
                .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_string())
                .and_then(|h| h.parse::<IpAddr>().ok())
        });
        if let Some(ip) = literal
            && !self.allow_private
            && !is_public(ip)
        {
            return Err(UploadError::Refused {
                url: url.to_string(),
                reason: format!("{ip} is not a public address (tlsrpt.allow_private_rua)"),
            });
        }
        let resp = self
            .client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, TLSRPT_GZIP)
            .body(gzip.to_vec())
            .send()
            .await
            .map_err(|e| UploadError::Transport {
                url: url.to_string(),
                reason: describe(&e),
            })?;
        let status = resp.status();
        if status.is_success() {
            Ok(status.as_u16())
        } else {
            Err(UploadError::Status {
                url: url.to_string(),
                status: status.as_u16(),
            })
        }
    }
}

/// The innermost cause, which says what really failed (e.g. the certificate error).
fn describe(e: &reqwest::Error) -> String {
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg = s.to_string();
        src = s.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::is_public;

    #[test]
    fn internal_addresses_are_not_public() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "192.0.2.1",
            "224.0.0.1",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "2001:db8::1",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "2a00:1450:4001:80b::200e",
            "100.128.0.1",
        ] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
    }
}
