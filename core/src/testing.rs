//! Fixtures of the unit tests of this crate.

use std::sync::Arc;

use crate::expert::{ExpertProfile, LatencyModel};
use crate::state::ExpertState;

/// An idle expert with round numbers: 1,000 prompt tokens/s, no prefill overhead, 10 ms decode
/// steps whatever the batch and context; `slots` slots, `kv` KV tokens.
pub(crate) fn expert_10ms(name: &str, slots: u32, kv: u64) -> ExpertState {
    ExpertState::idle(Arc::new(ExpertProfile {
        name: name.into(),
        model: "m".into(),
        hardware: String::new(),
        source: String::new(),
        max_slots: slots,
        kv_tokens: kv,
        latency: LatencyModel {
            prefill_tok_s: 1000.0,
            prefill_overhead_s: 0.0,
            decode_t0_s: 0.01,
            decode_d_s_per_seq: 0.0,
            decode_e_s_per_ctx_token: 0.0,
        },
    }))
}
