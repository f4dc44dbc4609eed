//! HTTPS delivery of a report (RFC 8460 §5.4): one POST of the gzipped JSON with
//! `Content-Type: application/tlsrpt+gzip`, the endpoint's certificate checked against
//! the relay's trust store, no redirects, a time limit; only a 2xx counts (R86).

use crate::dns::Resolver;
use crate::tls::TrustStore;
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
}

impl HttpsUploader {
    /// A client that resolves through `resolver`, trusts `trust` (WebPKI roots plus
    /// `tls.extra_roots`) and gives up after `timeout`.
    pub fn new(
        resolver: Resolver,
        trust: &TrustStore,
        timeout: Duration,
    ) -> Result<HttpsUploader, UploaderSetupError> {
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured((*trust.strict_config()).clone())
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .http1_only()
            .connect_timeout(timeout)
            .timeout(timeout)
            .user_agent(concat!("stsrelay/", env!("CARGO_PKG_VERSION")))
            .dns_resolver(Arc::new(resolver))
            .build()
            .map_err(|e| UploaderSetupError(e.to_string()))?;
        Ok(HttpsUploader { client })
    }

    /// POST `gzip` to `url`; `Ok` only for a 2xx answer.
    pub async fn post(&self, url: &str, gzip: &[u8]) -> Result<u16, UploadError> {
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
