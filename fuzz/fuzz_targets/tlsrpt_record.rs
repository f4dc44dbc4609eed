#![no_main]
//! `_smtp._tls` TXT parsing: never panics; accepted records have usable destinations.

use libfuzzer_sys::fuzz_target;
use stsrelay::tlsrpt::{Rua, select_tlsrpt_record};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let records: Vec<&str> = text.split('\n').collect();
    if let Ok(r) = select_tlsrpt_record(&records) {
        assert!(!r.rua.is_empty());
        for u in &r.rua {
            match u {
                Rua::Mailto(a) => assert!(a.contains('@')),
                Rua::Https(u) => assert!(u.to_ascii_lowercase().starts_with("https://")),
            }
        }
    }
});
