//! The SSE decoder never panics, stays within its bounds, and decodes any split of a byte
//! stream exactly like the whole stream (events and error alike).
//!
//! Input: the first byte picks the chunk sizes, the rest is the stream.

#![no_main]

use libfuzzer_sys::fuzz_target;
use qosroute_expert_client::{SseDecoder, SseError, SseEvent};

const MAX_LINE: usize = 64;
const MAX_EVENT: usize = 96;

fn decode(chunks: &[&[u8]]) -> (Vec<SseEvent>, Option<SseError>) {
    let mut decoder = SseDecoder::with_limits(MAX_LINE, MAX_EVENT);
    let mut events = Vec::new();
    for chunk in chunks {
        if let Err(e) = decoder.push_into(chunk, &mut events) {
            return (events, Some(e));
        }
    }
    match decoder.finish() {
        Ok(last) => {
            events.extend(last);
            (events, None)
        }
        Err(e) => (events, Some(e)),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&pattern, stream)) = data.split_first() else {
        return;
    };
    let sizes = [
        1 + usize::from(pattern & 7),
        1 + usize::from((pattern >> 3) & 7),
        1 + usize::from(pattern >> 6),
    ];
    let mut chunks = Vec::new();
    let mut rest = stream;
    let mut i = 0;
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(sizes[i % sizes.len()].min(rest.len()));
        chunks.push(chunk);
        rest = tail;
        i += 1;
    }
    let whole = decode(&[stream]);
    let split = decode(&chunks);
    assert_eq!(whole, split, "a split changed the decoded events");
    for event in &whole.0 {
        assert!(event.data.len() <= MAX_EVENT, "event data over the bound");
    }
});
