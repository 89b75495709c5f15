//! `decode_feedback` never panics; what decodes is valid and round-trips unchanged.
//! The first input byte picks the encoding (even: postcard, odd: JSON).
#![no_main]

use libfuzzer_sys::fuzz_target;
use qosroute_proto::{Encoding, MAX_FRAME_BYTES, decode_feedback, encode_feedback};

fuzz_target!(|data: &[u8]| {
    let Some((selector, payload)) = data.split_first() else {
        return;
    };
    let encoding = if selector & 1 == 0 {
        Encoding::Postcard
    } else {
        Encoding::Json
    };
    let Ok(feedback) = decode_feedback(payload, encoding) else {
        return;
    };
    assert_eq!(feedback.validate(), Ok(()));
    let mut buf = vec![0u8; MAX_FRAME_BYTES];
    let n = encode_feedback(&feedback, encoding, &mut buf).expect("decoded feedback encodes");
    let again = decode_feedback(&buf[..n], encoding).expect("encoded feedback decodes");
    assert_eq!(again, feedback);
});
