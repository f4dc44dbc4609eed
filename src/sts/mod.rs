//! MTA-STS (RFC 8461): the `_mta-sts` record, the policy file, its HTTPS fetch and the
//! caching engine that answers "what policy governs this domain, and may this MX get
//! mail?".

mod cache;
mod engine;
mod fetch;
mod policy;
mod record;

pub use engine::{
    CachedPolicy, Engine, EngineBuilder, EngineError, EngineOptions, EngineSetupError, EngineStats,
    Lookup, MxDecision, Source,
};
pub use fetch::{
    FetchError, FetchOptions, FetcherSetupError, HttpsFetcher, MAX_POLICY_BYTES, PolicyFetcher,
};
pub use policy::{MAX_AGE_LIMIT, Mode, MxPattern, Policy, PolicyError, normalize_host};
pub(crate) use record::is_ext_name;
pub use record::{RecordError, StsRecord, is_sts_record, select_record};
