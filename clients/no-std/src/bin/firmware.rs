//! A bare-metal program (e.g. `thumbv7em-none-eabihf`, a Cortex-M4F) that builds a postcard
//! request in a fixed buffer and decodes a gateway's replies, with no allocator: the link fails
//! if anything needs one ("no global memory allocator found"). Build it with `ci.sh`; it shows
//! the codec links and fits, it is not a flashable image (no vector table, no MQTT stack: feed
//! `frame` to your MQTT client and its payloads to `decode_reply`).
#![no_std]
#![no_main]

#[cfg(not(target_os = "none"))]
compile_error!(
    "the firmware is for a bare-metal target (thumbv7em-none-eabihf): clients/no-std/ci.sh"
);

use core::fmt::Write as _;
use core::hint::black_box;
use core::panic::PanicInfo;

use qosroute_no_std_client::qosroute_proto::{self, Encoding, RequestId, Task};
use qosroute_no_std_client::{ReplyView, RequestRef, decode_reply, encode_request};

/// This device's longest prompt; the request buffer is sized from it.
const MAX_PROMPT: usize = 256;

/// Replies as the gateway sent them (docs/devices.md section 5): a chunk, a final reply, and an
/// error reply.
const REPLIES: [&[u8]; 3] = [
    &[
        0x00, 0x01, 0x02, 0x72, 0x31, 0x00, 0x05, 0x74, 0x6f, 0x6b, 0x30, 0x20, 0x00, 0x05, 0x61,
        0x6c, 0x70, 0x68, 0x61,
    ],
    &[
        0x01, 0x01, 0x02, 0x72, 0x31, 0x05, 0x61, 0x6c, 0x70, 0x68, 0x61, 0x08, 0x02, 0x26, 0x2b,
        0x63, 0x9a, 0x3b, 0x01,
    ],
    &[
        0x02, 0x01, 0x02, 0x72, 0x31, 0x06, 0x04, 0x62, 0x75, 0x73, 0x79,
    ],
];

#[panic_handler]
fn panic(_: &PanicInfo<'_>) -> ! {
    loop {
        core::hint::spin_loop();
    }
}

/// The entry symbol the linker starts from (a real image would take it from its runtime
/// crate, e.g. cortex-m-rt's `#[entry]`).
#[allow(
    unsafe_code,
    reason = "an unmangled entry symbol is the one unsafe attribute here"
)]
#[unsafe(no_mangle)]
pub extern "C" fn _start() -> ! {
    let mut counter: u32 = black_box(42);
    loop {
        // The request: a fresh id per request, formatted without an allocator.
        let mut id = RequestId::new();
        if write!(id, "dev1-{counter}").is_err() {
            continue;
        }
        counter = counter.wrapping_add(1);
        let prompt = black_box("What is 7 * 6?");
        let request = RequestRef::new(&id, Task::Gsm8k, prompt)
            .with_max_tokens(64)
            .with_slo_s_per_token(0.05);
        let mut buf = [0u8; qosroute_no_std_client::request_frame_bytes(
            qosroute_proto::MAX_ID_BYTES,
            MAX_PROMPT,
        )];
        // Publish the frame on qosroute/v1/{site}/req/{device}/pc.
        let _ = black_box(encode_request(&request, &mut buf).map(|frame| frame.len()));

        // The replies, borrowed from the received payloads.
        let mut answer_bytes = 0usize;
        for payload in REPLIES {
            match decode_reply(black_box(payload)) {
                Ok(ReplyView::Chunk(c)) => answer_bytes += c.text.len(),
                Ok(ReplyView::Final(f)) => answer_bytes += black_box(f.output_tokens) as usize,
                Ok(ReplyView::Error(e)) => answer_bytes += usize::from(e.code.as_u16()),
                Err(e) => answer_bytes += usize::from(e.code().as_u16()),
            }
            // proto's own decoder links without an allocator too (heapless, copies the text).
            let _ = black_box(qosroute_proto::decode_reply(payload, Encoding::Postcard));
        }
        black_box(answer_bytes);
    }
}
