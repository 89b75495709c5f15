//! `peek_id` never panics; what it finds is a non-empty id within its bound, the id of a
//! request made of it round-trips, and it agrees with `decode_request` / `decode_feedback`
//! whenever they succeed. The first input byte picks the encoding (even: postcard, odd: JSON).
#![no_main]

use libfuzzer_sys::fuzz_target;
use qosroute_proto::{
    Encoding, MAX_FRAME_BYTES, MAX_ID_BYTES, Request, Task, decode_feedback, decode_request,
    encode_request, peek_id,
};

fuzz_target!(|data: &[u8]| {
    let Some((selector, payload)) = data.split_first() else {
        return;
    };
    let encoding = if selector & 1 == 0 {
        Encoding::Postcard
    } else {
        Encoding::Json
    };
    let peeked = peek_id(payload, encoding);
    if let Ok(request) = decode_request(payload, encoding) {
        assert_eq!(peeked.as_ref(), Some(&request.id));
    }
    if let Ok(feedback) = decode_feedback(payload, encoding) {
        assert_eq!(peeked.as_ref(), Some(&feedback.id));
    }
    let Some(id) = peeked else {
        return;
    };
    assert!(!id.is_empty() && id.len() <= MAX_ID_BYTES);
    // The recovered id is usable: an (error) reply or a request carrying it round-trips.
    let request = Request::new(&id, Task::Chat, "p").expect("a peeked id fits");
    let mut buf = vec![0u8; MAX_FRAME_BYTES];
    let n = encode_request(&request, encoding, &mut buf).expect("encodes");
    assert_eq!(peek_id(&buf[..n], encoding), Some(id));
});
