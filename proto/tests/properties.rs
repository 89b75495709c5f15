//! Invariants over generated messages and generated garbage.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use proptest::prelude::*;
use qosroute_proto::*;

const ENCODINGS: [Encoding; 2] = [Encoding::Postcard, Encoding::Json];

/// `s` cut to at most `max` bytes on a character boundary.
fn cut(mut s: String, max: usize) -> String {
    while s.len() > max {
        s.pop();
    }
    s
}

/// `unit` repeated, then padded with `a`, to exactly `max` bytes.
fn fill(unit: &str, max: usize) -> String {
    let mut s = unit.repeat(max / unit.len());
    s.push_str(&"a".repeat(max - s.len()));
    s
}

/// Strings of at most `max` bytes (at least `min` = 0 or 1): arbitrary Unicode of any length up
/// to the bound, and strings exactly at the bound made of awkward characters.
fn text(max: usize, min: usize) -> impl Strategy<Value = String> {
    let arbitrary = prop::collection::vec(any::<char>(), 0..=max.min(600))
        .prop_map(move |cs| cut(cs.into_iter().collect(), max));
    let at_bound =
        prop::sample::select(vec!["a", "\u{1}", "\"\\", "é", "€", "😀", "\u{7f}", "\n/"])
            .prop_map(move |unit| fill(unit, max));
    prop_oneof![4 => arbitrary, 1 => at_bound]
        .prop_map(move |s| if s.len() < min { "x".to_string() } else { s })
}

fn task() -> impl Strategy<Value = Task> {
    prop::sample::select(Task::ALL.to_vec())
}

fn positive_f32() -> impl Strategy<Value = f32> {
    prop::num::f32::POSITIVE | prop::num::f32::NORMAL | prop::num::f32::SUBNORMAL
}

fn request() -> impl Strategy<Value = Request> {
    (
        text(MAX_ID_BYTES, 1),
        task(),
        text(MAX_PROMPT_BYTES, 1),
        1..=MAX_TOKENS_LIMIT,
        prop::option::of(positive_f32()),
        prop::option::of(any::<u64>()),
        any::<bool>(),
        0..=MAX_PRIORITY,
    )
        .prop_map(
            |(id, task, prompt, max_tokens, slo, deadline, stream, priority)| Request {
                slo_s_per_token: slo,
                deadline_unix_ms: deadline,
                stream,
                priority,
                max_tokens,
                ..Request::new(&id, task, &prompt).unwrap()
            },
        )
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    prop::sample::select(ErrorCode::ALL.to_vec())
}

fn reply() -> impl Strategy<Value = Reply> {
    prop_oneof![
        (
            text(MAX_ID_BYTES, 1),
            any::<u32>(),
            text(MAX_CHUNK_BYTES, 0),
            any::<bool>(),
            text(MAX_NAME_BYTES, 0)
        )
            .prop_map(|(id, seq, t, done, expert)| {
                Reply::Chunk(ReplyChunk::new(&id, seq, &t, done, &expert).unwrap())
            }),
        (
            text(MAX_ID_BYTES, 1),
            text(MAX_NAME_BYTES, 0),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            prop_oneof![Just(0.0f32), positive_f32()],
            any::<bool>(),
        )
            .prop_map(|(id, expert, out, ttft, total, spt, met)| {
                Reply::Final(FinalReply::new(&id, &expert, out, ttft, total, spt, met).unwrap())
            }),
        (
            text(MAX_ID_BYTES, 0),
            error_code(),
            text(MAX_MESSAGE_BYTES, 0)
        )
            .prop_map(|(id, code, m)| { Reply::Error(ErrorReply::new(&id, code, &m).unwrap()) }),
    ]
}

fn feedback() -> impl Strategy<Value = Feedback> {
    (
        text(MAX_ID_BYTES, 1),
        prop_oneof![0.0f32..=1.0, Just(0.0), Just(1.0)],
    )
        .prop_map(|(id, score)| Feedback::new(&id, score).unwrap())
}

/// Garbage worth feeding a decoder: random bytes, JSON-ish text, and valid encodings with
/// random damage (byte overwrites, truncation, insertion).
fn garbage(valid: impl Strategy<Value = Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let damaged = (
        valid,
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        any::<prop::sample::Index>(),
        any::<bool>(),
    )
        .prop_map(|(mut bytes, edits, cut_at, truncate)| {
            if !bytes.is_empty() {
                for (at, b) in edits {
                    let i = at.index(bytes.len());
                    bytes[i] = b;
                }
                if truncate {
                    bytes.truncate(cut_at.index(bytes.len()));
                }
            }
            bytes
        });
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256),
        "[{}\\[\\]\":,0-9a-z\\\\ .e+-]{0,200}".prop_map(String::into_bytes),
        damaged,
    ]
}

fn encoded_request() -> impl Strategy<Value = Vec<u8>> {
    (request(), prop::sample::select(ENCODINGS.to_vec())).prop_map(|(r, e)| {
        let mut b = vec![0; MAX_FRAME_BYTES];
        let n = encode_request(&r, e, &mut b).unwrap();
        b.truncate(n);
        b
    })
}

fn encoded_reply() -> impl Strategy<Value = Vec<u8>> {
    (reply(), prop::sample::select(ENCODINGS.to_vec())).prop_map(|(r, e)| {
        let mut b = vec![0; MAX_FRAME_BYTES];
        let n = encode_reply(&r, e, &mut b).unwrap();
        b.truncate(n);
        b
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn requests_round_trip_within_the_frame_limit(r in request()) {
        let mut b = vec![0; MAX_FRAME_BYTES];
        for e in ENCODINGS {
            let n = encode_request(&r, e, &mut b).unwrap();
            prop_assert!(n <= MAX_FRAME_BYTES);
            prop_assert_eq!(decode_request(&b[..n], e).unwrap(), r.clone(), "{}", e);
            prop_assert_eq!(peek_id(&b[..n], e), Some(r.id.clone()));
        }
    }

    #[test]
    fn replies_round_trip_within_the_frame_limit(r in reply()) {
        let mut b = vec![0; MAX_FRAME_BYTES];
        for e in ENCODINGS {
            let n = encode_reply(&r, e, &mut b).unwrap();
            prop_assert!(n <= MAX_FRAME_BYTES);
            prop_assert_eq!(decode_reply(&b[..n], e).unwrap(), r.clone(), "{}", e);
        }
    }

    #[test]
    fn feedback_round_trips_within_the_frame_limit(f in feedback()) {
        let mut b = vec![0; MAX_FRAME_BYTES];
        for e in ENCODINGS {
            let n = encode_feedback(&f, e, &mut b).unwrap();
            prop_assert!(n <= MAX_FRAME_BYTES);
            prop_assert_eq!(decode_feedback(&b[..n], e).unwrap(), f.clone(), "{}", e);
            prop_assert_eq!(peek_id(&b[..n], e), Some(f.id.clone()));
        }
    }

    /// Whatever decodes is valid and stable: encoding it again and decoding gives it back;
    /// `peek_id` agrees with a successful decode.
    #[test]
    fn garbage_requests_give_an_error_or_a_valid_stable_message(bytes in garbage(encoded_request())) {
        let mut b = vec![0; MAX_FRAME_BYTES];
        for e in ENCODINGS {
            let peeked = peek_id(&bytes, e);
            if let Ok(r) = decode_request(&bytes, e) {
                prop_assert_eq!(r.validate(), Ok(()));
                let n = encode_request(&r, e, &mut b).unwrap();
                prop_assert_eq!(decode_request(&b[..n], e).unwrap(), r.clone());
                prop_assert_eq!(peeked, Some(r.id));
            }
            if let Ok(f) = decode_feedback(&bytes, e) {
                let n = encode_feedback(&f, e, &mut b).unwrap();
                prop_assert_eq!(decode_feedback(&b[..n], e).unwrap(), f);
            }
        }
    }

    #[test]
    fn garbage_replies_give_an_error_or_a_valid_stable_message(bytes in garbage(encoded_reply())) {
        let mut b = vec![0; MAX_FRAME_BYTES];
        for e in ENCODINGS {
            let _ = peek_id(&bytes, e);
            if let Ok(r) = decode_reply(&bytes, e) {
                prop_assert_eq!(r.validate(), Ok(()));
                let n = encode_reply(&r, e, &mut b).unwrap();
                prop_assert_eq!(decode_reply(&b[..n], e).unwrap(), r);
            }
        }
    }

    #[test]
    fn split_text_pieces_fit_and_reassemble(t in text(3 * MAX_CHUNK_BYTES, 0), max in 0usize..64) {
        for limit in [max, MAX_CHUNK_BYTES] {
            let pieces: Vec<&str> = split_text(&t, limit).collect();
            prop_assert_eq!(pieces.concat(), t.clone());
            prop_assert_eq!(split_text(&t, limit).len(), pieces.len());
            prop_assert!(pieces.iter().all(|p| !p.is_empty() && p.len() <= limit.max(4)));
        }
    }
}
