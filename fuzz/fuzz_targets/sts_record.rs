#![no_main]
//! `_mta-sts` TXT selection and parsing: never panics; a record that parses has a
//! valid id and re-parses to the same id when re-serialised.

use libfuzzer_sys::fuzz_target;
use stsrelay::sts::{StsRecord, select_record};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    // Each line is one TXT record of the RRset.
    let records: Vec<&str> = text.split('\n').collect();
    if let Ok(r) = select_record(&records) {
        assert!((1..=32).contains(&r.id.len()));
        assert!(r.id.bytes().all(|b| b.is_ascii_alphanumeric()));
        let again: StsRecord = format!("v=STSv1; id={}", r.id).parse().expect("reparse");
        assert_eq!(again, r);
    }
});
