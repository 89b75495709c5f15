//! The Prometheus text parser never panics, and what it reports is consistent: every line is a
//! sample, skipped (blank or comment) or counted as malformed, never more than there are lines.

#![no_main]

use libfuzzer_sys::fuzz_target;
use qosroute_expert_client::prometheus::{MAX_MALFORMED_RECORDED, parse_exposition, parse_line};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let parsed = parse_exposition(&text);
    let lines = text.split('\n').count();
    assert!(parsed.samples.len() + parsed.malformed_count <= lines);
    assert!(parsed.malformed.len() <= MAX_MALFORMED_RECORDED);
    assert!(
        parsed
            .malformed
            .iter()
            .all(|m| m.line >= 1 && m.line <= lines)
    );
    // Line by line gives the same samples as the whole text.
    let one_by_one: Vec<_> = text
        .split('\n')
        .filter_map(|l| parse_line(l).ok().flatten())
        .collect();
    assert_eq!(one_by_one.len(), parsed.samples.len());
    for (a, b) in one_by_one.iter().zip(&parsed.samples) {
        assert_eq!(a.name, b.name);
        assert_eq!(a.labels, b.labels);
        assert!(a.value.to_bits() == b.value.to_bits());
    }
});
