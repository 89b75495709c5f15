//! `decode_request` (JSON) never panics; what decodes is valid and round-trips unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qosroute_proto::{Encoding, MAX_FRAME_BYTES, decode_request, encode_request, peek_id};

fuzz_target!(|data: &[u8]| {
    let encoding = Encoding::Json;
    let peeked = peek_id(data, encoding);
    let Ok(request) = decode_request(data, encoding) else {
        return;
    };
    assert_eq!(request.validate(), Ok(()));
    assert_eq!(
        peeked.as_ref(),
        Some(&request.id),
        "peek_id disagrees with decode_request"
    );
    let mut buf = vec![0u8; MAX_FRAME_BYTES];
    let n = encode_request(&request, encoding, &mut buf).expect("a decoded request encodes");
    let again = decode_request(&buf[..n], encoding).expect("an encoded request decodes");
    assert_eq!(again, request);
});
