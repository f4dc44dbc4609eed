#![no_main]
//! Policy body parser: never panics; every accepted policy round-trips through its
//! served text and obeys the RFC's invariants.

use libfuzzer_sys::fuzz_target;
use stsrelay::sts::{MAX_AGE_LIMIT, Mode, Policy};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(p) = Policy::parse(text) {
        assert!(p.max_age <= MAX_AGE_LIMIT);
        assert!(p.mode == Mode::None || !p.mx.is_empty());
        let again = Policy::parse(&p.to_text()).expect("served text reparses");
        assert_eq!(again, p);
        for m in &p.mx {
            // A pattern matches its own domain (exact) or one label under it (wildcard).
            let probe = if m.is_wildcard() { format!("x.{}", m.domain()) } else { m.domain().to_string() };
            assert!(p.matches_mx(&probe));
        }
    }
});
