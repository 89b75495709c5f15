//! The wire contract device authors read: golden examples (also in the README), JSON defaults,
//! every validation error, size limits, version handling, id recovery.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use qosroute_proto::*;
use serde::Serialize;

const GOLDEN_REQUEST_JSON: &str = r#"{"v":1,"id":"dev1-42","task":"gsm8k","prompt":"What is 7 * 6?","max_tokens":64,"slo_s_per_token":0.05,"deadline_unix_ms":1767225600000,"stream":true,"priority":2}"#;
const GOLDEN_MINIMAL_REQUEST_JSON: &str =
    r#"{"v":1,"id":"dev1-43","prompt":"Hello!","max_tokens":32}"#;
const GOLDEN_CHUNK_JSON: &str = r#"{"type":"chunk","v":1,"id":"dev1-42","seq":0,"text":"7 * 6 = 42","done":true,"expert":"qwen2.5-7b"}"#;
const GOLDEN_FINAL_JSON: &str = r#"{"type":"final","v":1,"id":"dev1-42","expert":"qwen2.5-7b","output_tokens":9,"ttft_ms":180,"total_ms":420,"s_per_token":0.03,"slo_met":true}"#;
const GOLDEN_ERROR_JSON: &str = r#"{"type":"error","v":1,"id":"dev1-42","code":6,"message":"the gateway is at capacity; retry later"}"#;
const GOLDEN_FEEDBACK_JSON: &str = r#"{"v":1,"id":"dev1-42","score":0.9}"#;
/// The golden request in postcard (`01 07 "dev1-42" 03 0e "What is 7 * 6?" 40 01 <0.05 f32 LE>
/// 01 <varint 1767225600000> 01 02`).
const GOLDEN_REQUEST_POSTCARD: [u8; 40] = [
    0x01, 0x07, b'd', b'e', b'v', b'1', b'-', b'4', b'2', 0x03, 0x0e, b'W', b'h', b'a', b't', b' ',
    b'i', b's', b' ', b'7', b' ', b'*', b' ', b'6', b'?', 0x40, 0x01, 0xcd, 0xcc, 0x4c, 0x3d, 0x01,
    0x80, 0xd0, 0xea, 0xb6, 0xb7, 0x33, 0x01, 0x02,
];

const README: &str = include_str!("../README.md");

fn golden_request() -> Request {
    Request::new("dev1-42", Task::Gsm8k, "What is 7 * 6?")
        .unwrap()
        .with_max_tokens(64)
        .with_slo_s_per_token(0.05)
        .with_deadline_unix_ms(1_767_225_600_000)
        .with_priority(2)
}

fn golden_replies() -> [(Reply, &'static str); 3] {
    [
        (
            Reply::Chunk(ReplyChunk::new("dev1-42", 0, "7 * 6 = 42", true, "qwen2.5-7b").unwrap()),
            GOLDEN_CHUNK_JSON,
        ),
        (
            Reply::Final(
                FinalReply::new("dev1-42", "qwen2.5-7b", 9, 180, 420, 0.03, true).unwrap(),
            ),
            GOLDEN_FINAL_JSON,
        ),
        (
            Reply::Error(
                ErrorReply::new(
                    "dev1-42",
                    ErrorCode::Overloaded,
                    "the gateway is at capacity; retry later",
                )
                .unwrap(),
            ),
            GOLDEN_ERROR_JSON,
        ),
    ]
}

fn buf() -> Vec<u8> {
    vec![0; MAX_FRAME_BYTES]
}

fn json_request(body: &str) -> Result<Request, DecodeError> {
    decode_request(body.as_bytes(), Encoding::Json)
}

// ---- golden examples -------------------------------------------------------------------------

#[test]
fn golden_request_encodes_and_decodes_in_both_encodings() {
    let r = golden_request();
    let mut b = buf();
    let n = encode_request(&r, Encoding::Json, &mut b).unwrap();
    assert_eq!(std::str::from_utf8(&b[..n]).unwrap(), GOLDEN_REQUEST_JSON);
    assert_eq!(json_request(GOLDEN_REQUEST_JSON).unwrap(), r);

    let n = encode_request(&r, Encoding::Postcard, &mut b).unwrap();
    assert_eq!(&b[..n], GOLDEN_REQUEST_POSTCARD, "postcard layout changed");
    assert_eq!(
        decode_request(&GOLDEN_REQUEST_POSTCARD, Encoding::Postcard).unwrap(),
        r
    );
}

#[test]
fn golden_replies_and_feedback_encode_and_decode() {
    let mut b = buf();
    for (reply, golden) in golden_replies() {
        let n = encode_reply(&reply, Encoding::Json, &mut b).unwrap();
        assert_eq!(std::str::from_utf8(&b[..n]).unwrap(), golden);
        assert_eq!(
            decode_reply(golden.as_bytes(), Encoding::Json).unwrap(),
            reply
        );
    }
    let f = Feedback::new("dev1-42", 0.9).unwrap();
    let n = encode_feedback(&f, Encoding::Json, &mut b).unwrap();
    assert_eq!(std::str::from_utf8(&b[..n]).unwrap(), GOLDEN_FEEDBACK_JSON);
    assert_eq!(
        decode_feedback(GOLDEN_FEEDBACK_JSON.as_bytes(), Encoding::Json).unwrap(),
        f
    );
}

#[test]
fn the_readme_shows_the_golden_examples() {
    for golden in [
        GOLDEN_REQUEST_JSON,
        GOLDEN_MINIMAL_REQUEST_JSON,
        GOLDEN_CHUNK_JSON,
        GOLDEN_FINAL_JSON,
        GOLDEN_ERROR_JSON,
        GOLDEN_FEEDBACK_JSON,
    ] {
        assert!(README.contains(golden), "README.md lacks {golden}");
    }
    let hex: Vec<String> = GOLDEN_REQUEST_POSTCARD
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert!(
        README.contains(&hex.join(" ")),
        "README.md lacks the postcard bytes"
    );
    for code in ErrorCode::ALL {
        let row = format!("| {} | `{}` |", code.as_u16(), code.as_str());
        assert!(README.contains(&row), "README.md lacks the row {row}");
    }
}

#[test]
fn json_replies_decode_with_fields_in_any_order_and_unknown_fields_ignored() {
    let shuffled = r#" { "expert" : "qwen2.5-7b", "done": true, "future": {"a": [1, {"b": null}]},
        "text": "7 * 6 = 42", "seq": 0, "id": "dev1-42", "v": 1, "type": "chunk" } "#;
    let (chunk, _) = &golden_replies()[0];
    assert_eq!(
        &decode_reply(shuffled.as_bytes(), Encoding::Json).unwrap(),
        chunk
    );
}

// ---- JSON defaults -----------------------------------------------------------------------------

#[test]
fn json_defaults_apply_to_omitted_and_null_fields() {
    let r = json_request(GOLDEN_MINIMAL_REQUEST_JSON).unwrap();
    assert_eq!(r.task, Task::Chat);
    assert!(r.stream);
    assert_eq!(r.priority, 0);
    assert_eq!(r.slo_s_per_token, None);
    assert_eq!(r.deadline_unix_ms, None);
    assert_eq!(r.max_tokens, 32);
    let nulls = json_request(
        r#"{"v":1,"id":"a","prompt":"p","max_tokens":1,"task":null,"slo_s_per_token":null,
            "deadline_unix_ms":null,"stream":null,"priority":null}"#,
    )
    .unwrap();
    assert_eq!(
        (nulls.task, nulls.stream, nulls.priority),
        (Task::Chat, true, 0)
    );
    let explicit = json_request(
        r#"{"v":1,"id":"a","prompt":"p","max_tokens":1,"stream":false,"task":"agentverse-mgsm"}"#,
    )
    .unwrap();
    assert!(!explicit.stream);
    assert_eq!(explicit.task, Task::AgentverseMgsm);
}

#[test]
fn json_required_fields_are_reported_by_name() {
    for (body, field) in [
        (r#"{"id":"a","prompt":"p","max_tokens":1}"#, "v"),
        (r#"{"v":1,"prompt":"p","max_tokens":1}"#, "id"),
        (r#"{"v":1,"id":"a","max_tokens":1}"#, "prompt"),
        (r#"{"v":1,"id":"a","prompt":"p"}"#, "max_tokens"),
    ] {
        let e = json_request(body).unwrap_err();
        assert_eq!(e, DecodeError::MissingField { field }, "{body}");
        assert_eq!(e.code(), ErrorCode::Malformed);
        assert_eq!(e.field(), Some(field));
    }
    for (body, field) in [
        (
            r#"{"v":1,"id":"a","seq":0,"text":"t","done":true,"expert":"e"}"#,
            "type",
        ),
        (
            r#"{"type":"chunk","v":1,"id":"a","text":"t","done":true,"expert":"e"}"#,
            "seq",
        ),
        (
            r#"{"type":"chunk","v":1,"id":"a","seq":1,"done":true,"expert":"e"}"#,
            "text",
        ),
        (
            r#"{"type":"final","v":1,"id":"a","expert":"e","output_tokens":1,"ttft_ms":1,"total_ms":1,"s_per_token":0.1}"#,
            "slo_met",
        ),
        (r#"{"type":"error","v":1,"id":"a","message":"m"}"#, "code"),
    ] {
        let e = decode_reply(body.as_bytes(), Encoding::Json).unwrap_err();
        assert_eq!(e, DecodeError::MissingField { field }, "{body}");
    }
    let e = decode_feedback(br#"{"v":1,"id":"a"}"#, Encoding::Json).unwrap_err();
    assert_eq!(e, DecodeError::MissingField { field: "score" });
}

// ---- validation ---------------------------------------------------------------------------------

/// Every validation failure of a request, in both encodings (postcard via `Serialize` of an
/// invalid message, which the encoder itself refuses).
#[test]
fn each_request_validation_error_names_its_field() {
    let ok = || Request::new("id", Task::Chat, "prompt").unwrap();
    let cases: Vec<(Request, &str)> = vec![
        (
            Request {
                id: RequestId::new(),
                ..ok()
            },
            "id",
        ),
        (
            Request {
                prompt: heapless::String::new(),
                ..ok()
            },
            "prompt",
        ),
        (ok().with_max_tokens(0), "max_tokens"),
        (ok().with_max_tokens(MAX_TOKENS_LIMIT + 1), "max_tokens"),
        (ok().with_slo_s_per_token(0.0), "slo_s_per_token"),
        (ok().with_slo_s_per_token(-0.5), "slo_s_per_token"),
        (ok().with_slo_s_per_token(f32::INFINITY), "slo_s_per_token"),
        (ok().with_slo_s_per_token(f32::NAN), "slo_s_per_token"),
        (ok().with_priority(8), "priority"),
    ];
    let mut b = buf();
    for (request, field) in cases {
        let e = request.validate().unwrap_err();
        assert!(
            matches!(e, DecodeError::Invalid { field: f, .. } if f == field),
            "{e:?}"
        );
        assert_eq!(e.code(), ErrorCode::Invalid);
        assert_eq!(
            encode_request(&request, Encoding::Postcard, &mut b),
            Err(EncodeError::Invalid(e))
        );
        let n = postcard::to_slice(&request, &mut b).unwrap().len();
        assert_eq!(
            decode_request(&b[..n], Encoding::Postcard),
            Err(e),
            "postcard {field}"
        );
        // JSON cannot carry NaN or infinities (they encode as null, i.e. "no SLO").
        if request.slo_s_per_token.is_none_or(f32::is_finite) {
            let n = serde_json_core::to_slice(&request, &mut b).unwrap();
            assert_eq!(
                decode_request(&b[..n], Encoding::Json),
                Err(e),
                "json {field}"
            );
        }
    }
    // The limits themselves are fine.
    for r in [
        ok().with_max_tokens(1),
        ok().with_max_tokens(MAX_TOKENS_LIMIT),
        ok().with_priority(7),
    ] {
        assert_eq!(r.validate(), Ok(()));
    }
}

#[test]
fn json_range_errors_name_their_field() {
    for (body, field) in [
        (
            r#"{"v":1,"id":"a","prompt":"p","max_tokens":4294967296}"#,
            "max_tokens",
        ),
        (
            r#"{"v":1,"id":"a","prompt":"p","max_tokens":16385}"#,
            "max_tokens",
        ),
        (
            r#"{"v":1,"id":"a","prompt":"p","max_tokens":1,"priority":256}"#,
            "priority",
        ),
        (
            r#"{"v":1,"id":"a","prompt":"p","max_tokens":1,"priority":8}"#,
            "priority",
        ),
        (
            r#"{"v":1,"id":"a","prompt":"p","max_tokens":1,"task":"poetry"}"#,
            "task",
        ),
        (
            r#"{"v":1,"id":"a","prompt":"p","max_tokens":1,"task":"a-very-long-unknown-task-name"}"#,
            "task",
        ),
        (
            r#"{"v":1,"id":"a","prompt":"p","max_tokens":1,"slo_s_per_token":1e39}"#,
            "slo_s_per_token",
        ),
        (r#"{"v":1,"id":"","prompt":"p","max_tokens":1}"#, "id"),
        (r#"{"v":1,"id":"a","prompt":"","max_tokens":1}"#, "prompt"),
    ] {
        let e = json_request(body).unwrap_err();
        assert!(
            matches!(e, DecodeError::Invalid { field: f, .. } if f == field),
            "{body}: {e:?}"
        );
    }
}

#[test]
fn reply_and_feedback_validation() {
    let mut b = buf();
    // Unknown error codes are a decode error in both encodings.
    for n in [0u64, 13, 65535, 65536] {
        let body = format!(r#"{{"type":"error","v":1,"id":"a","code":{n},"message":"m"}}"#);
        let e = decode_reply(body.as_bytes(), Encoding::Json).unwrap_err();
        assert_eq!(
            e,
            DecodeError::invalid_for_test("code", "unknown error code"),
            "{n}"
        );
    }
    // postcard: variant 2, v 1, id "a", code 13 (varint), message "m".
    let e = decode_reply(&[2, 1, 1, b'a', 13, 1, b'm'], Encoding::Postcard).unwrap_err();
    assert_eq!(e.field(), Some("code"));
    assert_eq!(e.code(), ErrorCode::Invalid);
    // Unknown reply types.
    let e = decode_reply(br#"{"type":"partial","v":1,"id":"a"}"#, Encoding::Json).unwrap_err();
    assert_eq!(e.field(), Some("type"));
    let e = decode_reply(&[3, 1, 1, b'a'], Encoding::Postcard).unwrap_err();
    assert_eq!(e.field(), Some("type"));
    // Empty ids: refused in chunks, finals and feedback, allowed in errors (id unknown).
    let chunk = Reply::Chunk(ReplyChunk::new("", 0, "t", false, "e").unwrap());
    assert_eq!(chunk.validate().unwrap_err().field(), Some("id"));
    let fin = Reply::Final(FinalReply::new("", "e", 1, 1, 1, 0.1, true).unwrap());
    assert_eq!(fin.validate().unwrap_err().field(), Some("id"));
    let anonymous = Reply::Error(ErrorReply::new("", ErrorCode::Malformed, "bad").unwrap());
    for enc in [Encoding::Json, Encoding::Postcard] {
        let n = encode_reply(&anonymous, enc, &mut b).unwrap();
        assert_eq!(decode_reply(&b[..n], enc).unwrap(), anonymous);
    }
    // Final latency must be finite and not negative.
    for bad in [f32::NAN, f32::INFINITY, -0.5] {
        let fin = Reply::Final(FinalReply::new("a", "e", 1, 1, 1, bad, true).unwrap());
        let e = encode_reply(&fin, Encoding::Postcard, &mut b).unwrap_err();
        assert!(matches!(e, EncodeError::Invalid(d) if d.field() == Some("s_per_token")));
    }
    // Feedback scores.
    for bad in [-0.01f32, 1.01, f32::NAN, f32::INFINITY] {
        let f = Feedback::new("a", bad).unwrap();
        assert_eq!(f.validate().unwrap_err().field(), Some("score"), "{bad}");
        let n = postcard::to_slice(&f, &mut b).unwrap().len();
        assert_eq!(
            decode_feedback(&b[..n], Encoding::Postcard)
                .unwrap_err()
                .field(),
            Some("score")
        );
    }
    for good in [0.0f32, 1.0, 0.5] {
        assert!(Feedback::new("a", good).unwrap().validate().is_ok());
    }
    let e = decode_feedback(br#"{"v":1,"id":"a","score":null}"#, Encoding::Json).unwrap_err();
    assert_eq!(e, DecodeError::MissingField { field: "score" });
    let e = decode_feedback(br#"{"v":1,"id":"a","score":2}"#, Encoding::Json).unwrap_err();
    assert_eq!(e.field(), Some("score"));
}

/// `DecodeError::Invalid` has public fields; this builds one for comparisons.
trait InvalidForTest {
    fn invalid_for_test(field: &'static str, reason: &'static str) -> Self;
}
impl InvalidForTest for DecodeError {
    fn invalid_for_test(field: &'static str, reason: &'static str) -> Self {
        DecodeError::Invalid { field, reason }
    }
}

// ---- versions ------------------------------------------------------------------------------------

#[test]
fn other_versions_are_unsupported_even_when_the_rest_does_not_parse() {
    let e = json_request(r#"{"v":2,"id":"a","prompt":"p","max_tokens":1}"#).unwrap_err();
    assert_eq!(e, DecodeError::UnsupportedVersion { found: 2 });
    assert_eq!(e.code(), ErrorCode::UnsupportedVersion);
    // A future layout whose fields have other types: still `unsupported_version`.
    let e = json_request(r#"{"v":7,"id":{"device":"d","n":1},"prompt":["p"]}"#).unwrap_err();
    assert_eq!(e, DecodeError::UnsupportedVersion { found: 7 });
    let e = json_request(r#"{"v":300,"id":"a","prompt":"p","max_tokens":1}"#).unwrap_err();
    assert_eq!(e, DecodeError::UnsupportedVersion { found: 300 });
    let e = decode_reply(br#"{"type":"new","v":2}"#, Encoding::Json).unwrap_err();
    assert_eq!(e, DecodeError::UnsupportedVersion { found: 2 });
    // postcard: the first byte of requests and feedback, the byte after the variant of replies.
    let mut pc = GOLDEN_REQUEST_POSTCARD;
    pc[0] = 2;
    let e = decode_request(&pc, Encoding::Postcard).unwrap_err();
    assert_eq!(e, DecodeError::UnsupportedVersion { found: 2 });
    assert_eq!(
        decode_feedback(&[0, 0xff], Encoding::Postcard).unwrap_err(),
        DecodeError::UnsupportedVersion { found: 0 }
    );
    assert_eq!(
        decode_reply(&[9, 2, 0xff], Encoding::Postcard).unwrap_err(),
        DecodeError::UnsupportedVersion { found: 2 }
    );
}

// ---- sizes ---------------------------------------------------------------------------------------

/// A std mirror of `Request` whose strings are unbounded: produces oversized postcard.
#[derive(Serialize)]
struct LooseRequest<'a> {
    v: u8,
    id: &'a str,
    task: Task,
    prompt: &'a str,
    max_tokens: u32,
    slo_s_per_token: Option<f32>,
    deadline_unix_ms: Option<u64>,
    stream: bool,
    priority: u8,
}

fn loose_request<'a>(id: &'a str, prompt: &'a str) -> LooseRequest<'a> {
    LooseRequest {
        v: 1,
        id,
        task: Task::Chat,
        prompt,
        max_tokens: 10,
        slo_s_per_token: None,
        deadline_unix_ms: None,
        stream: true,
        priority: 0,
    }
}

#[test]
fn oversized_strings_are_too_large_with_their_field_in_both_encodings() {
    let long_id = "i".repeat(MAX_ID_BYTES + 1);
    let long_prompt = "p".repeat(MAX_PROMPT_BYTES + 1);
    let mut b = vec![0; 4 * MAX_FRAME_BYTES];
    for (id, prompt, field, max) in [
        (long_id.as_str(), "p", "id", MAX_ID_BYTES),
        ("i", long_prompt.as_str(), "prompt", MAX_PROMPT_BYTES),
    ] {
        let want = DecodeError::FieldTooLarge { field, max };
        let loose = loose_request(id, prompt);
        let n = postcard::to_slice(&loose, &mut b).unwrap().len();
        let e = decode_request(&b[..n], Encoding::Postcard).unwrap_err();
        assert_eq!(e, want);
        assert_eq!(e.code(), ErrorCode::TooLarge);
        // Truncated right after the length prefix: the prefix alone says too large.
        let prefix_end = if field == "id" {
            3
        } else {
            1 + 1 + id.len() + 1 + 2
        };
        assert_eq!(
            decode_request(&b[..prefix_end], Encoding::Postcard),
            Err(want)
        );
        let n = serde_json_core::to_slice(&loose, &mut b).unwrap();
        assert_eq!(decode_request(&b[..n], Encoding::Json), Err(want));
        assert!(Request::new(id, Task::Chat, prompt).is_err());
    }
    // JSON bounds count unescaped bytes: 8192 escaped characters fit, 8193 do not.
    let at_bound = "\\u0041".repeat(MAX_PROMPT_BYTES);
    let body = format!(r#"{{"v":1,"id":"a","prompt":"{at_bound}","max_tokens":1}}"#);
    assert_eq!(json_request(&body).unwrap().prompt.len(), MAX_PROMPT_BYTES);
    let over = format!(r#"{{"v":1,"id":"a","prompt":"{at_bound}B","max_tokens":1}}"#);
    assert_eq!(
        json_request(&over),
        Err(DecodeError::FieldTooLarge {
            field: "prompt",
            max: MAX_PROMPT_BYTES
        })
    );
    // Too large wins over other problems (here: no max_tokens, no id).
    let over = format!(r#"{{"v":1,"prompt":"{at_bound}B"}}"#);
    assert_eq!(json_request(&over).unwrap_err().code(), ErrorCode::TooLarge);
    // Reply strings.
    let long_text = "t".repeat(MAX_CHUNK_BYTES + 1);
    let body = format!(
        r#"{{"type":"chunk","v":1,"id":"a","seq":0,"text":"{long_text}","done":false,"expert":"e"}}"#
    );
    assert_eq!(
        decode_reply(body.as_bytes(), Encoding::Json),
        Err(DecodeError::FieldTooLarge {
            field: "text",
            max: MAX_CHUNK_BYTES
        })
    );
    let long_name = "e".repeat(MAX_NAME_BYTES + 1);
    let body = format!(
        r#"{{"type":"final","v":1,"id":"a","expert":"{long_name}","output_tokens":1,"ttft_ms":1,"total_ms":1,"s_per_token":0.1,"slo_met":true}}"#
    );
    assert_eq!(
        decode_reply(body.as_bytes(), Encoding::Json),
        Err(DecodeError::FieldTooLarge {
            field: "expert",
            max: MAX_NAME_BYTES
        })
    );
}

/// The postcard string tables name the right field for every string of every reply.
#[test]
fn postcard_reply_strings_over_their_bounds_name_their_field() {
    #[derive(Serialize)]
    struct Chunk<'a>(u8, &'a str, u32, &'a str, bool, &'a str);
    #[derive(Serialize)]
    struct Final<'a>(u8, &'a str, &'a str, u32, u32, u32, f32, bool);
    #[derive(Serialize)]
    struct Error<'a>(u8, &'a str, u16, &'a str);
    #[derive(Serialize)]
    struct Fb<'a>(u8, &'a str, f32);
    let over = |max: usize| "x".repeat(max + 1);
    let mut b = vec![0; 4 * MAX_FRAME_BYTES];
    let mut check =
        |variant: Option<u8>, value: &dyn erased::Ser, field: &'static str, max: usize| {
            let mut at = 0;
            if let Some(v) = variant {
                b[0] = v;
                at = 1;
            }
            let n = at + value.to_postcard(&mut b[at..]);
            let got = match variant {
                Some(_) => decode_reply(&b[..n], Encoding::Postcard).map(drop),
                None => decode_feedback(&b[..n], Encoding::Postcard).map(drop),
            };
            assert_eq!(
                got,
                Err(DecodeError::FieldTooLarge { field, max }),
                "{field}"
            );
        };
    check(
        Some(0),
        &Chunk(1, &over(MAX_ID_BYTES), 0, "t", true, "e"),
        "id",
        MAX_ID_BYTES,
    );
    check(
        Some(0),
        &Chunk(1, "i", 0, &over(MAX_CHUNK_BYTES), true, "e"),
        "text",
        MAX_CHUNK_BYTES,
    );
    check(
        Some(0),
        &Chunk(1, "i", 0, "t", true, &over(MAX_NAME_BYTES)),
        "expert",
        MAX_NAME_BYTES,
    );
    check(
        Some(1),
        &Final(1, "i", &over(MAX_NAME_BYTES), 1, 1, 1, 0.1, true),
        "expert",
        MAX_NAME_BYTES,
    );
    check(
        Some(2),
        &Error(1, "i", 1, &over(MAX_MESSAGE_BYTES)),
        "message",
        MAX_MESSAGE_BYTES,
    );
    check(None, &Fb(1, &over(MAX_ID_BYTES), 0.5), "id", MAX_ID_BYTES);
}

mod erased {
    /// Object-safe postcard serialization for the table test.
    pub trait Ser {
        fn to_postcard(&self, buf: &mut [u8]) -> usize;
    }
    impl<T: serde::Serialize> Ser for T {
        fn to_postcard(&self, buf: &mut [u8]) -> usize {
            postcard::to_slice(self, buf).unwrap().len()
        }
    }
}

#[test]
fn frames_over_the_limit_are_rejected_up_front() {
    let big = vec![b' '; MAX_FRAME_BYTES + 1];
    for enc in [Encoding::Json, Encoding::Postcard] {
        let e = decode_request(&big, enc).unwrap_err();
        assert_eq!(
            e,
            DecodeError::FrameTooLarge {
                len: MAX_FRAME_BYTES + 1
            }
        );
        assert_eq!(e.code(), ErrorCode::TooLarge);
        assert!(decode_reply(&big, enc).is_err());
        assert!(decode_feedback(&big, enc).is_err());
    }
}

#[test]
fn the_worst_case_messages_fit_the_frame_limit() {
    // Control characters are escaped as \u00XX: 6 bytes per byte, the JSON worst case.
    let id = "\u{1}".repeat(MAX_ID_BYTES);
    let prompt = "\u{1}".repeat(MAX_PROMPT_BYTES);
    let r = Request {
        task: Task::AgentverseLogicgrid,
        max_tokens: MAX_TOKENS_LIMIT,
        slo_s_per_token: Some(-f32::MIN_POSITIVE.next_up() * -1.0e-7),
        deadline_unix_ms: Some(u64::MAX),
        stream: false,
        priority: 7,
        ..Request::new(&id, Task::Chat, &prompt).unwrap()
    };
    let mut b = vec![0; 2 * MAX_FRAME_BYTES];
    let json = encode_request(&r, Encoding::Json, &mut b).unwrap();
    assert!(json <= MAX_FRAME_BYTES, "{json} > {MAX_FRAME_BYTES}");
    assert!(
        json > MAX_FRAME_BYTES - 256,
        "the limit is not tight: {json}"
    );
    assert_eq!(decode_request(&b[..json], Encoding::Json).unwrap(), r);
    let pc = encode_request(&r, Encoding::Postcard, &mut b).unwrap();
    assert!(pc < 8300, "{pc}");
    // A buffer of exactly MAX_FRAME_BYTES suffices; a short one is an error, not a panic.
    let mut exact = vec![0; MAX_FRAME_BYTES];
    assert_eq!(encode_request(&r, Encoding::Json, &mut exact), Ok(json));
    let mut short = [0u8; 16];
    for enc in [Encoding::Json, Encoding::Postcard] {
        assert_eq!(
            encode_request(&r, enc, &mut short),
            Err(EncodeError::BufferTooSmall)
        );
    }
    let long_text = "\u{1}".repeat(MAX_CHUNK_BYTES);
    let chunk = Reply::Chunk(
        ReplyChunk::new(
            &id,
            u32::MAX,
            &long_text,
            true,
            &"\u{1}".repeat(MAX_NAME_BYTES),
        )
        .unwrap(),
    );
    let n = encode_reply(&chunk, Encoding::Json, &mut b).unwrap();
    assert!(n <= MAX_FRAME_BYTES);
}

// ---- malformed input -------------------------------------------------------------------------

#[test]
fn malformed_input_is_malformed_not_a_panic() {
    let mut pc = GOLDEN_REQUEST_POSTCARD.to_vec();
    pc.push(0);
    let e = decode_request(&pc, Encoding::Postcard).unwrap_err();
    assert_eq!(e.code(), ErrorCode::Malformed, "trailing bytes: {e}");
    for cut in 0..GOLDEN_REQUEST_POSTCARD.len() {
        let e = decode_request(&GOLDEN_REQUEST_POSTCARD[..cut], Encoding::Postcard).unwrap_err();
        assert_eq!(e.code(), ErrorCode::Malformed, "cut at {cut}");
    }
    // Unknown task index (postcard): invalid task.
    let mut bad_task = GOLDEN_REQUEST_POSTCARD;
    bad_task[9] = 15;
    assert_eq!(
        decode_request(&bad_task, Encoding::Postcard)
            .unwrap_err()
            .field(),
        Some("task")
    );
    // Bad bool.
    let mut bad_bool = GOLDEN_REQUEST_POSTCARD;
    bad_bool[38] = 2;
    assert_eq!(
        decode_request(&bad_bool, Encoding::Postcard)
            .unwrap_err()
            .code(),
        ErrorCode::Malformed
    );
    for body in [
        "",
        "null",
        "[]",
        "{",
        r#"{"v":1,"id":"a","prompt":"p","max_tokens":1"#,
        r#"{"v":1,"id":"a","prompt":"p","max_tokens":1} x"#,
        r#"{"v":1,"id":"a","prompt":"p","max_tokens":1,}"#,
        r#"{"v":1,"id":"a","id":"b","prompt":"p","max_tokens":1}"#,
        r#"{"v":1,"id":"a","prompt":"p","max_tokens":-1}"#,
        r#"{"v":1,"id":"a","prompt":"p","max_tokens":"1"}"#,
        r#"{"v":1,"id":"a","prompt":"p\x","max_tokens":1}"#,
        r#"{"v":1,"id":"a","prompt":"\ud800","max_tokens":1}"#,
    ] {
        let e = json_request(body).unwrap_err();
        assert_eq!(e.code(), ErrorCode::Malformed, "{body}: {e}");
    }
    let e = decode_request(
        b"{\"v\":1,\"id\":\"a\xff\",\"prompt\":\"p\",\"max_tokens\":1}",
        Encoding::Json,
    )
    .unwrap_err();
    assert_eq!(e.code(), ErrorCode::Malformed);
}

#[test]
fn deeply_nested_json_is_refused_without_exhausting_the_stack() {
    let mut body = String::from(r#"{"v":1,"id":"a","prompt":"p","max_tokens":1,"x":"#);
    body.push_str(&"[".repeat(20_000));
    body.push_str(&"]".repeat(20_000));
    body.push('}');
    let e = json_request(&body).unwrap_err();
    assert_eq!(
        e,
        DecodeError::Malformed {
            reason: "JSON nested too deeply"
        }
    );
    // peek_id still finds the id (it scans iteratively).
    assert_eq!(
        peek_id(body.as_bytes(), Encoding::Json).unwrap().as_str(),
        "a"
    );
    // A little nesting in unknown fields is fine.
    let ok = r#"{"v":1,"id":"a","prompt":"p","max_tokens":1,"x":{"y":[[1],[2,{"z":null}]]}}"#;
    assert!(json_request(ok).is_ok());
}

// ---- peek_id ------------------------------------------------------------------------------------

#[test]
fn peek_id_recovers_the_id_of_undecodable_requests() {
    let long_prompt = "p".repeat(MAX_PROMPT_BYTES + 10);
    let escaped_long = "\\n".repeat(MAX_PROMPT_BYTES + 10);
    for body in [
        format!(r#"{{"v":1,"id":"dev\"7","prompt":"{long_prompt}","max_tokens":1}}"#),
        format!(r#"{{"v":1,"prompt":"{escaped_long}","id":"dev\"7"}}"#),
        r#"{"v":9,"x":{"id":"inner"},"id":"dev\"7","prompt":oops"#.to_string(),
        r#"  { "id" : "dev\u00227" , "max_tokens": 0 }"#.to_string(),
    ] {
        assert!(json_request(&body).is_err());
        assert_eq!(
            peek_id(body.as_bytes(), Encoding::Json).unwrap().as_str(),
            "dev\"7",
            "{body}"
        );
    }
    for body in [
        r#"{"prompt":"p"}"#,
        r#"{"id":""}"#,
        r#"{"id":7}"#,
        r#"{"id":"\x"}"#,
        r#"["id","a"]"#,
        r#"{"x":[1,2,"id":"a"}"#,
        "",
    ] {
        assert_eq!(peek_id(body.as_bytes(), Encoding::Json), None, "{body}");
    }
    let too_long_id = format!(r#"{{"id":"{}"}}"#, "i".repeat(MAX_ID_BYTES + 1));
    assert_eq!(peek_id(too_long_id.as_bytes(), Encoding::Json), None);

    // postcard: the (v, id) prefix, whatever follows; even past the frame limit.
    let mut pc = GOLDEN_REQUEST_POSTCARD.to_vec();
    pc.truncate(12);
    assert_eq!(
        peek_id(&pc, Encoding::Postcard).unwrap().as_str(),
        "dev1-42"
    );
    pc.extend(std::iter::repeat_n(0xff, MAX_FRAME_BYTES));
    assert!(decode_request(&pc, Encoding::Postcard).is_err());
    assert_eq!(
        peek_id(&pc, Encoding::Postcard).unwrap().as_str(),
        "dev1-42"
    );
    for bad in [
        &[][..],
        &[1],
        &[1, 5, b'a'],
        &[1, 41],
        &[1, 0],
        &[1, 2, 0xff, 0xfe],
    ] {
        assert_eq!(peek_id(bad, Encoding::Postcard), None, "{bad:?}");
    }
}

// ---- constructors and helpers ---------------------------------------------------------------

#[test]
fn constructors_check_bounds_and_set_defaults() {
    let r = Request::new("a", Task::Mmlu, "q").unwrap();
    assert_eq!(
        (
            r.v,
            r.max_tokens,
            r.stream,
            r.priority,
            r.slo_s_per_token,
            r.deadline_unix_ms
        ),
        (PROTOCOL_VERSION, DEFAULT_MAX_TOKENS, true, 0, None, None)
    );
    let e = Request::new(&"i".repeat(MAX_ID_BYTES + 1), Task::Chat, "q").unwrap_err();
    assert_eq!(
        e,
        FieldTooLong {
            field: "id",
            len: MAX_ID_BYTES + 1,
            max: MAX_ID_BYTES
        }
    );
    assert_eq!(
        ReplyChunk::new("a", 0, &"t".repeat(MAX_CHUNK_BYTES + 1), false, "e")
            .unwrap_err()
            .field,
        "text"
    );
    assert_eq!(
        ReplyChunk::new("a", 0, "t", false, &"e".repeat(65))
            .unwrap_err()
            .field,
        "expert"
    );
    assert_eq!(
        FinalReply::new("a", &"e".repeat(65), 1, 1, 1, 0.1, true)
            .unwrap_err()
            .field,
        "expert"
    );
    assert_eq!(
        ErrorReply::new("a", ErrorCode::Internal, &"m".repeat(MAX_MESSAGE_BYTES + 1))
            .unwrap_err()
            .field,
        "message"
    );
    assert_eq!(Feedback::new(&"i".repeat(41), 0.5).unwrap_err().field, "id");
    // At the bound is fine, multi-byte characters counted in bytes.
    assert!(Request::new(&"é".repeat(MAX_ID_BYTES / 2), Task::Chat, "q").is_ok());
    assert!(Request::new(&"é".repeat(MAX_ID_BYTES / 2 + 1), Task::Chat, "q").is_err());
}

#[test]
fn reply_helpers_and_error_display() {
    let (chunk, _) = &golden_replies()[0];
    assert_eq!(chunk.id().as_str(), "dev1-42");
    assert_eq!(chunk.kind(), "chunk");
    assert_eq!(Reply::TYPES, ["chunk", "final", "error"]);
    let e = DecodeError::FieldTooLarge {
        field: "prompt",
        max: 8192,
    };
    assert_eq!(
        e.to_string(),
        "`prompt` is longer than its bound of 8192 bytes"
    );
    assert_eq!(e.reason(), "field longer than its bound");
    let e = DecodeError::UnsupportedVersion { found: 2 };
    assert_eq!(
        e.to_string(),
        "unsupported protocol version 2 (this gateway speaks 1)"
    );
    assert_eq!(e.field(), Some("v"));
    // The messages the daemon sends back fit an error reply.
    for e in [
        DecodeError::FrameTooLarge { len: usize::MAX },
        DecodeError::Invalid {
            field: "slo_s_per_token",
            reason: "must be a finite number of seconds greater than 0",
        },
    ] {
        assert!(ErrorReply::new("a", e.code(), &e.to_string()).is_ok());
    }
    let answer = "é".repeat(MAX_CHUNK_BYTES);
    let chunks: Vec<&str> = split_text(&answer, MAX_CHUNK_BYTES).collect();
    assert_eq!(chunks.len(), 2);
    assert!(
        chunks
            .iter()
            .all(|c| ReplyChunk::new("a", 0, c, false, "e").is_ok())
    );
}
