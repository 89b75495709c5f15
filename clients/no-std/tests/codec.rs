//! The example's codec against proto's (the gateway's): same request bytes, same replies
//! accepted, same contents, over fixed, generated and garbled messages.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use proptest::prelude::*;
use qosroute_no_std_client::qosroute_proto::{
    self as proto, DecodeError, EncodeError, Encoding, ErrorCode, ErrorReply, FinalReply,
    MAX_CHUNK_BYTES, MAX_ID_BYTES, MAX_MESSAGE_BYTES, MAX_NAME_BYTES, MAX_PROMPT_BYTES,
    MAX_TOKENS_LIMIT, Reply, ReplyChunk, Request, Task,
};
use qosroute_no_std_client::{
    MAX_REPLY_BYTES, MAX_REQUEST_BYTES, ReplyView, RequestRef, decode_reply, encode_request,
    request_frame_bytes,
};

fn hex(s: &str) -> Vec<u8> {
    s.split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect()
}

/// The same request as proto's owned type (the strings must fit its bounds).
fn owned(r: &RequestRef<'_>) -> Request {
    Request {
        v: proto::PROTOCOL_VERSION,
        id: r.id.try_into().unwrap(),
        task: r.task,
        prompt: r.prompt.try_into().unwrap(),
        max_tokens: r.max_tokens,
        slo_s_per_token: r.slo_s_per_token,
        deadline_unix_ms: r.deadline_unix_ms,
        stream: r.stream,
        priority: r.priority,
    }
}

/// Whether the borrowed view holds exactly what proto decoded.
fn same(view: &ReplyView<'_>, reply: &Reply) -> bool {
    match (view, reply) {
        (ReplyView::Chunk(a), Reply::Chunk(b)) => {
            a.v == b.v
                && a.id == b.id.as_str()
                && a.seq == b.seq
                && a.text == b.text.as_str()
                && a.done == b.done
                && a.expert == b.expert.as_str()
        }
        (ReplyView::Final(a), Reply::Final(b)) => {
            a.v == b.v
                && a.id == b.id.as_str()
                && a.expert == b.expert.as_str()
                && a.output_tokens == b.output_tokens
                && a.ttft_ms == b.ttft_ms
                && a.total_ms == b.total_ms
                && a.s_per_token.to_bits() == b.s_per_token.to_bits()
                && a.slo_met == b.slo_met
        }
        (ReplyView::Error(a), Reply::Error(b)) => {
            a.v == b.v && a.id == b.id.as_str() && a.code == b.code && a.message == b.message
        }
        _ => false,
    }
}

/// Both decoders accept `bytes` or both refuse it; when they accept, they agree on the content.
/// Returns whether it was accepted.
fn agree(bytes: &[u8]) -> Result<bool, TestCaseError> {
    let ours = decode_reply(bytes);
    let theirs = proto::decode_reply(bytes, Encoding::Postcard);
    match (&ours, &theirs) {
        (Ok(view), Ok(reply)) => {
            prop_assert!(same(view, reply), "{view:?} vs {reply:?}");
            Ok(true)
        }
        (Err(_), Err(_)) => Ok(false),
        _ => Err(TestCaseError::fail(format!(
            "{bytes:02x?}: ours {ours:?}, proto {theirs:?}"
        ))),
    }
}

#[test]
fn the_documented_request_bytes() {
    // docs/devices.md, section 5.
    let request = RequestRef::new("r1", Task::Mmlu, "Hi")
        .with_max_tokens(8)
        .with_slo_s_per_token(0.1);
    let mut buf = [0u8; 64];
    let frame = encode_request(&request, &mut buf).unwrap();
    assert_eq!(
        frame,
        hex("01 02 72 31 02 02 48 69 08 01 cd cc cc 3d 00 01 00")
    );
    // proto/README.md.
    let request = RequestRef::new("dev1-42", Task::Gsm8k, "What is 7 * 6?")
        .with_max_tokens(64)
        .with_slo_s_per_token(0.05)
        .with_deadline_unix_ms(1_767_225_600_000)
        .with_priority(2);
    let frame = encode_request(&request, &mut buf).unwrap();
    assert_eq!(
        frame,
        hex(
            "01 07 64 65 76 31 2d 34 32 03 0e 57 68 61 74 20 69 73 20 37 20 2a 20 36 3f 40 01 \
             cd cc 4c 3d 01 80 d0 ea b6 b7 33 01 02"
        )
    );
    assert_eq!(
        proto::decode_request(frame, Encoding::Postcard).unwrap(),
        owned(&request)
    );
}

#[test]
fn the_documented_reply_bytes() {
    // docs/devices.md, section 5.
    let chunk = hex("00 01 02 72 31 00 05 74 6f 6b 30 20 00 05 61 6c 70 68 61");
    let ReplyView::Chunk(c) = decode_reply(&chunk).unwrap() else {
        panic!("not a chunk")
    };
    assert_eq!(
        (c.id, c.seq, c.text, c.done, c.expert),
        ("r1", 0, "tok0 ", false, "alpha")
    );
    let fin = hex("01 01 02 72 31 05 61 6c 70 68 61 08 02 26 2b 63 9a 3b 01");
    let ReplyView::Final(f) = decode_reply(&fin).unwrap() else {
        panic!("not a final reply")
    };
    assert_eq!((f.id, f.expert, f.output_tokens), ("r1", "alpha", 8));
    assert_eq!((f.ttft_ms, f.total_ms, f.slo_met), (2, 38, true));
    assert!(
        (f.s_per_token - 0.004_711_5).abs() < 1e-7,
        "{}",
        f.s_per_token
    );
    for bytes in [&chunk, &fin] {
        assert!(agree(bytes).unwrap());
    }
}

#[test]
fn buffers_sized_by_the_bounds_suffice_and_are_tight() {
    // The widest request: every optional field present and at its widest.
    for (id_len, prompt_len) in [(1, 1), (40, 127), (40, 128), (1, 8192), (40, 8192)] {
        let (id, prompt) = ("i".repeat(id_len), "p".repeat(prompt_len));
        let request = RequestRef::new(&id, Task::Chat, &prompt)
            .with_max_tokens(MAX_TOKENS_LIMIT)
            .with_slo_s_per_token(0.05)
            .with_deadline_unix_ms(u64::MAX)
            .with_priority(7);
        let n = request_frame_bytes(id_len, prompt_len);
        let mut buf = vec![0u8; n];
        assert_eq!(encode_request(&request, &mut buf).unwrap().len(), n);
        assert_eq!(
            encode_request(&request, &mut buf[..n - 1]),
            Err(EncodeError::BufferTooSmall)
        );
    }
    assert_eq!(
        request_frame_bytes(MAX_ID_BYTES, MAX_PROMPT_BYTES),
        MAX_REQUEST_BYTES
    );
    // The widest reply: a chunk with every string at its bound and the largest seq.
    let chunk = ReplyChunk::new(
        &"i".repeat(MAX_ID_BYTES),
        u32::MAX,
        &"t".repeat(MAX_CHUNK_BYTES),
        true,
        &"e".repeat(MAX_NAME_BYTES),
    )
    .unwrap();
    let mut buf = vec![0u8; MAX_REPLY_BYTES];
    let n = proto::encode_reply(&Reply::Chunk(chunk), Encoding::Postcard, &mut buf).unwrap();
    assert_eq!(n, MAX_REPLY_BYTES);
    assert!(agree(&buf).unwrap());
}

#[test]
fn invalid_requests_are_refused_before_encoding() {
    let mut buf = [0u8; 128];
    let long_id = "x".repeat(MAX_ID_BYTES + 1);
    for (request, field) in [
        (RequestRef::new("", Task::Chat, "hi"), "id"),
        (RequestRef::new(&long_id, Task::Chat, "hi"), "id"),
        (RequestRef::new("a", Task::Chat, ""), "prompt"),
        (
            RequestRef::new("a", Task::Chat, "hi").with_max_tokens(0),
            "max_tokens",
        ),
        (
            RequestRef::new("a", Task::Chat, "hi").with_slo_s_per_token(f32::NAN),
            "slo_s_per_token",
        ),
        (
            RequestRef::new("a", Task::Chat, "hi").with_priority(8),
            "priority",
        ),
    ] {
        match encode_request(&request, &mut buf) {
            Err(EncodeError::Invalid(e)) => assert_eq!(e.field(), Some(field), "{request:?}"),
            other => panic!("{request:?}: {other:?}"),
        }
    }
}

#[test]
fn truncated_and_extended_replies_are_errors() {
    let replies = [
        Reply::Chunk(ReplyChunk::new("r1", 3, "some text é😀", true, "qwen2.5-7b").unwrap()),
        Reply::Final(FinalReply::new("r1", "alpha", 9, 180, 420, 0.03, true).unwrap()),
        Reply::Error(ErrorReply::new("", ErrorCode::Overloaded, "at capacity").unwrap()),
    ];
    for reply in replies {
        let mut buf = [0u8; MAX_REPLY_BYTES];
        let n = proto::encode_reply(&reply, Encoding::Postcard, &mut buf).unwrap();
        assert!(agree(&buf[..n]).unwrap());
        for cut in 0..n {
            assert!(decode_reply(&buf[..cut]).is_err(), "{reply:?} cut at {cut}");
            assert!(!agree(&buf[..cut]).unwrap());
        }
        assert_eq!(
            decode_reply(&buf[..=n]),
            Err(DecodeError::Malformed {
                reason: "bytes after the end of the message"
            })
        );
    }
    assert!(decode_reply(&[]).is_err());
    assert!(matches!(
        decode_reply(&[0x00, 0x02]),
        Err(DecodeError::UnsupportedVersion { found: 2 })
    ));
    assert!(matches!(
        decode_reply(&[0x03, 0x01]),
        Err(DecodeError::Invalid { field: "type", .. })
    ));
    // An unknown error code (13).
    assert!(matches!(
        decode_reply(&[0x02, 0x01, 0x00, 0x0d, 0x00]),
        Err(DecodeError::Invalid { field: "code", .. })
    ));
}

/// A postcard reply built field by field (proto's encoder refuses invalid ones): the variant
/// index, then the fields.
fn raw<T: serde::Serialize>(index: u32, fields: &T) -> Vec<u8> {
    let mut buf = vec![0u8; 4 * MAX_REPLY_BYTES];
    let n = postcard::to_slice(&(index, fields), &mut buf)
        .unwrap()
        .len();
    buf.truncate(n);
    buf
}

#[test]
fn each_rule_is_checked_as_proto_checks() {
    let (id41, text2049) = ("i".repeat(41), "t".repeat(MAX_CHUNK_BYTES + 1));
    let (text2048, expert65) = ("t".repeat(MAX_CHUNK_BYTES), "e".repeat(MAX_NAME_BYTES + 1));
    let (message256, message257) = ("m".repeat(256), "m".repeat(257));
    let chunk = |v: u8, id: &str, text: &str, done: u8, expert: &str| {
        raw(0, &(v, id, 7u32, text, done, expert))
    };
    let fin = |id: &str, spt: f32| raw(1, &(1u8, id, "alpha", 9u32, 180u32, 420u32, spt, true));
    let error = |id: &str, code: u16, message: &str| raw(2, &(1u8, id, code, message));
    for (bytes, accepted) in [
        (chunk(1, "r1", "hi", 1, "alpha"), true),
        (chunk(1, "r1", &text2048, 0, ""), true),
        (chunk(1, "", "hi", 1, "alpha"), false),
        (chunk(1, &id41, "hi", 1, "alpha"), false),
        (chunk(1, "r1", &text2049, 1, "alpha"), false),
        (chunk(1, "r1", "hi", 1, &expert65), false),
        (chunk(1, "r1", "hi", 2, "alpha"), false),
        (chunk(2, "r1", "hi", 1, "alpha"), false),
        (chunk(0, "r1", "hi", 1, "alpha"), false),
        (fin("r1", 0.03), true),
        (fin("r1", 0.0), true),
        (fin("r1", -0.0), true),
        (fin("r1", -0.5), false),
        (fin("r1", f32::NAN), false),
        (fin("r1", f32::INFINITY), false),
        (fin("", 0.03), false),
        (error("", 6, "busy"), true),
        (error("r1", 12, &message256), true),
        (error("r1", 6, &message257), false),
        (error("r1", 0, "busy"), false),
        (error("r1", 13, "busy"), false),
        (error(&id41, 6, "busy"), false),
    ] {
        assert_eq!(agree(&bytes).unwrap(), accepted, "{bytes:02x?}");
    }
    // Not UTF-8.
    let mut bytes = chunk(1, "r1", "hi", 1, "alpha");
    bytes[7] = 0xff;
    assert!(!agree(&bytes).unwrap());
}

#[test]
fn borrowed_types_are_small() {
    // What a microcontroller keeps on its stack, against proto's owned types.
    assert!(size_of::<RequestRef<'_>>() <= 80);
    assert!(size_of::<ReplyView<'_>>() <= 80);
    assert!(size_of::<Request>() > 8192);
    assert!(size_of::<Reply>() > 2048);
}

/// `s` cut to at most `max` bytes on a character boundary.
fn cut(mut s: String, max: usize) -> String {
    while s.len() > max {
        s.pop();
    }
    s
}

/// Strings of up to `max` bytes, sometimes longer (to `over` more), some exactly at the bound.
fn text(max: usize, over: usize) -> impl Strategy<Value = String> {
    let arbitrary = prop::collection::vec(any::<char>(), 0..=max.min(300))
        .prop_map(move |cs| cut(cs.into_iter().collect(), max + over));
    let at_bound = (
        prop::sample::select(vec!["a", "é", "😀", "\u{1}"]),
        0..=over,
    )
        .prop_map(move |(unit, extra)| cut(unit.repeat(max + extra), max + extra));
    prop_oneof![4 => arbitrary, 1 => at_bound]
}

fn task() -> impl Strategy<Value = Task> {
    prop::sample::select(Task::ALL.to_vec())
}

fn f32_any() -> impl Strategy<Value = f32> {
    prop_oneof![
        4 => 0.0f32..2.0,
        1 => any::<f32>(),
        1 => prop::sample::select(vec![0.0, -0.0, f32::NAN, f32::INFINITY, -1.0, f32::MIN_POSITIVE]),
    ]
}

fn reply() -> impl Strategy<Value = Reply> {
    let chunk = (
        text(MAX_ID_BYTES, 0),
        any::<u32>(),
        text(MAX_CHUNK_BYTES, 0),
        any::<bool>(),
        text(MAX_NAME_BYTES, 0),
    )
        .prop_map(|(id, seq, text, done, expert)| {
            let id = if id.is_empty() { "x".into() } else { id };
            Reply::Chunk(ReplyChunk::new(&id, seq, &text, done, &expert).unwrap())
        });
    let fin = (
        text(MAX_ID_BYTES, 0),
        text(MAX_NAME_BYTES, 0),
        any::<(u32, u32, u32)>(),
        0.0f32..10.0,
        any::<bool>(),
    )
        .prop_map(|(id, expert, (tokens, ttft, total), spt, met)| {
            let id = if id.is_empty() { "x".into() } else { id };
            Reply::Final(FinalReply::new(&id, &expert, tokens, ttft, total, spt, met).unwrap())
        });
    let error = (
        text(MAX_ID_BYTES, 0),
        prop::sample::select(ErrorCode::ALL.to_vec()),
        text(MAX_MESSAGE_BYTES, 0),
    )
        .prop_map(|(id, code, message)| {
            Reply::Error(ErrorReply::new(&id, code, &message).unwrap())
        });
    prop_oneof![chunk, fin, error]
}

proptest! {
    /// Whatever the fields (valid or not), the example encodes what proto encodes, byte for
    /// byte, or refuses what proto refuses with the same error; the gateway decodes the frame.
    #[test]
    fn requests_encode_as_proto_encodes(
        id in text(MAX_ID_BYTES, 4),
        task in task(),
        prompt in text(MAX_PROMPT_BYTES, 4),
        max_tokens in prop_oneof![1..=MAX_TOKENS_LIMIT, any::<u32>()],
        slo in prop::option::of(f32_any()),
        deadline in prop::option::of(any::<u64>()),
        stream in any::<bool>(),
        priority in prop_oneof![0..=7u8, any::<u8>()],
    ) {
        let mut request = RequestRef::new(&id, task, &prompt)
            .with_max_tokens(max_tokens)
            .with_stream(stream)
            .with_priority(priority);
        request.slo_s_per_token = slo;
        request.deadline_unix_ms = deadline;
        let mut ours = vec![0u8; request_frame_bytes(id.len(), prompt.len())];
        let ours = encode_request(&request, &mut ours);
        if id.len() > MAX_ID_BYTES || prompt.len() > MAX_PROMPT_BYTES {
            let too_large = matches!(
                ours,
                Err(EncodeError::Invalid(DecodeError::FieldTooLarge { .. }))
            );
            prop_assert!(too_large, "{:?}", ours);
            return Ok(());
        }
        let owned = owned(&request);
        let mut theirs = vec![0u8; proto::MAX_FRAME_BYTES];
        let theirs = proto::encode_request(&owned, Encoding::Postcard, &mut theirs)
            .map(|n| theirs[..n].to_vec());
        prop_assert_eq!(ours.map(<[u8]>::to_vec), theirs.clone());
        if let Ok(frame) = theirs {
            prop_assert_eq!(proto::decode_request(&frame, Encoding::Postcard), Ok(owned));
        }
    }

    /// Every reply proto (the gateway) encodes decodes here to the same content.
    #[test]
    fn proto_replies_decode_here(reply in reply()) {
        let mut buf = [0u8; MAX_REPLY_BYTES];
        let n = proto::encode_reply(&reply, Encoding::Postcard, &mut buf).unwrap();
        let view = decode_reply(&buf[..n]).unwrap();
        prop_assert!(same(&view, &reply), "{view:?} vs {reply:?}");
        prop_assert_eq!(view.id(), reply.id().as_str());
    }

    /// Garbled replies (bytes overwritten, cut, inserted): never a panic, and accepted here
    /// exactly when proto accepts them.
    #[test]
    fn garbled_replies_are_judged_as_proto_judges(
        reply in reply(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0..3u8), 1..4),
    ) {
        let mut buf = [0u8; MAX_REPLY_BYTES];
        let n = proto::encode_reply(&reply, Encoding::Postcard, &mut buf).unwrap();
        let mut bytes = buf[..n].to_vec();
        for (at, byte, how) in edits {
            let i = at.index(bytes.len().max(1));
            match how {
                0 if !bytes.is_empty() => bytes[i] = byte,
                1 => bytes.truncate(i),
                _ => bytes.insert(i.min(bytes.len()), byte),
            }
        }
        agree(&bytes)?;
    }

    /// Arbitrary bytes: never a panic, same verdict as proto.
    #[test]
    fn garbage_is_judged_as_proto_judges(
        bytes in prop::collection::vec(any::<u8>(), 0..96),
        index in 0..4u8,
    ) {
        let mut bytes = bytes;
        // Mostly a plausible head (a reply type and v = 1), so decoding gets past the start.
        if bytes.len() >= 2 && index < 3 {
            bytes[0] = index;
            bytes[1] = 1;
        }
        agree(&bytes)?;
    }
}
