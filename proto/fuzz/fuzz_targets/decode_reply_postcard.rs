//! `decode_reply` (postcard) never panics; what decodes is valid and round-trips unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qosroute_proto::{Encoding, MAX_FRAME_BYTES, decode_reply, encode_reply};

fuzz_target!(|data: &[u8]| {
    let encoding = Encoding::Postcard;
    let Ok(reply) = decode_reply(data, encoding) else {
        return;
    };
    assert_eq!(reply.validate(), Ok(()));
    let mut buf = vec![0u8; MAX_FRAME_BYTES];
    let n = encode_reply(&reply, encoding, &mut buf).expect("a decoded reply encodes");
    let again = decode_reply(&buf[..n], encoding).expect("an encoded reply decodes");
    assert_eq!(again, reply);
});
