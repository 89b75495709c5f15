//! What happens on one expert if nothing else arrives: when each request there finishes, and
//! when a new request queued behind them would be admitted. The action impact estimator
//! ([`crate::impact`]) reads its predictions from here.
//!
//! The forecast follows the engine model ([`crate::engine`]) with predicted lengths and a
//! decode step held at its current length:
//! - prefill first: the prefill still ahead of the running requests that have no token yet
//!   (each one's prefill time minus the time it has held a slot, never below zero) stalls
//!   every running request, and nothing is admitted before it ends;
//! - then first come, first served: each waiting request is admitted when a slot is free and
//!   the KV cache holds the context in use plus its prompt and predicted output, at the
//!   earliest at the previous admission; its whole prefill stalls every request running then;
//!   it finishes after its prefill and its remaining decode steps, plus the stalls of the
//!   prefills admitted after it;
//! - a request still without a token finishes `prefill + (D - 1)` steps after it starts (the
//!   prefill yields the first token); one with `d` tokens, `D - d` steps from now.
//!
//! Cost: `O(n log n)` in the requests on the expert, no allocation once the buffers of a
//! reused [`Forecast`] have grown.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use crate::expert::LatencyModel;
use crate::state::{ExpertState, InFlight};

/// Prefill still ahead of a request: none once it has a token; all of it while it waits;
/// otherwise its prefill time minus the time it has held a slot, never below zero.
pub fn remaining_prefill_s(latency: &LatencyModel, request: &InFlight, running: bool) -> f64 {
    if request.generated_tokens > 0 {
        0.0
    } else if running {
        (latency.prefill_s(f64::from(request.prompt_tokens)) - request.slot_elapsed_s).max(0.0)
    } else {
        latency.prefill_s(f64::from(request.prompt_tokens))
    }
}

/// Decode steps still ahead of a request: its predicted output minus its tokens so far, the
/// first token coming from the prefill.
pub fn remaining_steps(request: &InFlight) -> f64 {
    request.expected_output_tokens() - f64::from(request.generated_tokens.max(1))
}

/// A slot-holder in the forecast: when it frees its slot (relative to the stall offset) and
/// the KV tokens it holds.
#[derive(Debug, Clone, Copy)]
struct Holder {
    base_s: f64,
    kv: f64,
    /// `i` for running request i, `!j` for waiting request j.
    tag: isize,
}

impl PartialEq for Holder {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Holder {}
impl PartialOrd for Holder {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Holder {
    /// Reversed: the heap pops the earliest finisher first (ties: the earlier request).
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .base_s
            .total_cmp(&self.base_s)
            .then(other.tag.cmp(&self.tag))
    }
}

/// The forecast of one expert (see the module docs). All times are seconds from now.
#[derive(Debug, Clone, Default)]
pub struct Forecast {
    /// When each running request finishes (in [`ExpertState::running`] order).
    pub running_finish_s: Vec<f64>,
    /// When each waiting request is admitted (in [`ExpertState::waiting`] order).
    pub waiting_admit_s: Vec<f64>,
    /// When each waiting request finishes.
    pub waiting_finish_s: Vec<f64>,
    /// Prefill still ahead of the running requests, during which nothing decodes.
    pub running_prefill_s: f64,
    /// When a new request queued behind every request there would be admitted.
    pub new_admit_s: f64,
    /// Prefill of the waiting requests admitted at that same moment (one engine iteration
    /// prefills them together, so the new request's first token waits for them too).
    pub new_batched_prefill_s: f64,
    /// Requests holding a slot once the new one is admitted, itself included.
    pub new_batch: usize,
    /// The decode step the forecast holds.
    pub step_s: f64,
    heap: BinaryHeap<Holder>,
}

impl Forecast {
    /// The forecast of `expert` for a new request of `prompt_tokens` and
    /// `predicted_output_tokens` queued behind everything there.
    pub fn of(expert: &ExpertState, prompt_tokens: u32, predicted_output_tokens: f64) -> Self {
        let mut f = Self::default();
        f.compute(expert, prompt_tokens, predicted_output_tokens);
        f
    }

    /// Recomputes the forecast in place (reusing buffers).
    pub fn compute(
        &mut self,
        expert: &ExpertState,
        prompt_tokens: u32,
        predicted_output_tokens: f64,
    ) {
        let latency = &expert.profile.latency;
        let slots = (expert.profile.max_slots as usize).max(1);
        let kv_capacity = expert.profile.kv_tokens as f64;
        let step = expert.decode_step_now_s();
        self.step_s = step;
        self.heap.clear();
        self.running_finish_s.clear();
        self.running_finish_s.resize(expert.running.len(), 0.0);
        self.waiting_admit_s.clear();
        self.waiting_finish_s.clear();
        self.waiting_finish_s.resize(expert.waiting.len(), 0.0);

        let prefill_ahead: f64 = expert
            .running
            .iter()
            .map(|r| remaining_prefill_s(latency, r, true))
            .sum();
        self.running_prefill_s = prefill_ahead;
        // Every holder's finish is `base_s + stall`: a prefill admitted later adds to `stall`
        // and so delays everyone holding a slot then.
        let mut stall = prefill_ahead;
        let mut kv_used = 0.0;
        for (r, finish) in expert.running.iter().zip(&mut self.running_finish_s) {
            kv_used += r.context_tokens() as f64;
            *finish = prefill_ahead + remaining_steps(r) * step;
        }
        let need = f64::from(prompt_tokens) + predicted_output_tokens.max(1.0);
        if expert.waiting.is_empty()
            && expert.running.len() < slots
            && kv_used + need <= kv_capacity
        {
            // Nothing queued and room now: no slot changes hands before the new request
            // starts, right after the prefill in progress.
            self.new_admit_s = prefill_ahead;
            self.new_batched_prefill_s = 0.0;
            let still_there = self
                .running_finish_s
                .iter()
                .filter(|&&f| f > prefill_ahead)
                .count();
            self.new_batch = (still_there + 1).min(slots);
            return;
        }
        for (i, (r, &finish)) in expert
            .running
            .iter()
            .zip(&self.running_finish_s)
            .enumerate()
        {
            self.heap.push(Holder {
                base_s: finish - stall,
                kv: r.context_tokens() as f64,
                tag: i as isize,
            });
        }
        let mut last_admit = prefill_ahead;
        let mut admitted_with_last = 0.0;
        for (j, w) in expert.waiting.iter().enumerate() {
            let need = f64::from(w.prompt_tokens) + w.expected_output_tokens();
            let at = self.admit(slots, kv_capacity, need, last_admit, stall, &mut kv_used);
            if at > last_admit {
                admitted_with_last = 0.0;
            }
            let prefill = latency.prefill_s(f64::from(w.prompt_tokens));
            // Admitted together, prompts are prefilled in one iteration: each one's first
            // token waits for all of them.
            admitted_with_last += prefill;
            last_admit = at;
            self.waiting_admit_s.push(at);
            stall += prefill;
            let kv = f64::from(w.prompt_tokens);
            kv_used += kv;
            self.heap.push(Holder {
                base_s: at + admitted_with_last + remaining_steps(w) * step - stall,
                kv,
                tag: !(j as isize),
            });
        }
        let at = self.admit(slots, kv_capacity, need, last_admit, stall, &mut kv_used);
        self.new_admit_s = at;
        self.new_batched_prefill_s = if at > last_admit || expert.waiting.is_empty() {
            0.0
        } else {
            admitted_with_last
        };
        self.new_batch = (self.heap.len() + 1).min(slots);
        while let Some(h) = self.heap.pop() {
            self.record(h, stall);
        }
    }

    /// Admits a request needing `need` KV tokens at the earliest at `not_before`: pops the
    /// finishers that must leave first (recording their finish), returns the admission time.
    fn admit(
        &mut self,
        slots: usize,
        kv_capacity: f64,
        need: f64,
        not_before: f64,
        stall: f64,
        kv_used: &mut f64,
    ) -> f64 {
        let mut at = not_before;
        while self.heap.len() >= slots || (*kv_used + need > kv_capacity && !self.heap.is_empty()) {
            let Some(h) = self.heap.pop() else { break };
            *kv_used -= h.kv;
            at = at.max(h.base_s + stall);
            self.record(h, stall);
        }
        // Whoever is done by then has left: the new prefill stalls only those still there.
        while self.heap.peek().is_some_and(|h| h.base_s + stall <= at) {
            let Some(h) = self.heap.pop() else { break };
            *kv_used -= h.kv;
            self.record(h, stall);
        }
        at
    }

    fn record(&mut self, h: Holder, stall: f64) {
        let finish = h.base_s + stall;
        if h.tag >= 0 {
            if let Some(f) = self.running_finish_s.get_mut(h.tag as usize) {
                *f = finish;
            }
        } else if let Some(f) = self.waiting_finish_s.get_mut(!h.tag as usize) {
            *f = finish;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::task::Task;

    fn request(prompt: u32, output: f64, generated: u32, slot_elapsed: f64) -> InFlight {
        InFlight {
            id: 0,
            task: Task::Chat,
            prompt_tokens: prompt,
            predicted_output_tokens: output,
            generated_tokens: generated,
            elapsed_s: 1.0,
            slot_elapsed_s: slot_elapsed,
            max_output_tokens: None,
            predicted_quality: 0.5,
            slo_s_per_token: 0.1,
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    fn expert(slots: u32, kv: u64) -> ExpertState {
        crate::testing::expert_10ms("x", slots, kv)
    }

    #[test]
    fn remaining_prefill_counts_what_a_request_has_not_yet_done() {
        let l = expert(1, 1000).profile.latency;
        // 200 tokens: 0.2 s of prefill; 0.05 s done.
        assert!(close(
            remaining_prefill_s(&l, &request(200, 10.0, 0, 0.05), true),
            0.15
        ));
        assert_eq!(
            remaining_prefill_s(&l, &request(200, 10.0, 0, 0.5), true),
            0.0
        );
        assert_eq!(
            remaining_prefill_s(&l, &request(200, 10.0, 3, 0.0), true),
            0.0
        );
        assert!(close(
            remaining_prefill_s(&l, &request(200, 10.0, 0, 0.0), false),
            0.2
        ));
        let mut with_overhead = l;
        with_overhead.prefill_overhead_s = 0.1;
        assert!(close(
            remaining_prefill_s(&with_overhead, &request(200, 10.0, 0, 0.05), true),
            0.25
        ));
    }

    #[test]
    fn prefill_ahead_stalls_the_batch_and_delays_admission() {
        let mut e = expert(4, 100_000);
        // A: decoding, 10 steps left. B: 300-token prompt, 0.1 s into its 0.3 s prefill,
        // 20 tokens predicted (19 steps after its prefill).
        e.running.push(request(100, 40.0, 30, 1.0));
        e.running.push(request(300, 20.0, 0, 0.1));
        let f = Forecast::of(&e, 50, 10.0);
        assert!(close(f.running_prefill_s, 0.2));
        assert!(close(f.running_finish_s[0], 0.2 + 10.0 * 0.01));
        assert!(close(f.running_finish_s[1], 0.2 + 19.0 * 0.01));
        assert!(
            close(f.new_admit_s, 0.2),
            "a free slot, after the prefill in progress"
        );
        assert_eq!(f.new_batch, 3);
    }

    #[test]
    fn a_queue_with_nothing_running_is_counted() {
        // Two slots, nothing running, three waiting (each 100-token prompt, 11 tokens).
        let mut e = expert(2, 100_000);
        for _ in 0..3 {
            e.waiting.push(request(100, 11.0, 0, 0.0));
        }
        let f = Forecast::of(&e, 100, 5.0);
        // W0 and W1 admitted at 0, prefilled together (0.1 + 0.1 s); each finishes after
        // both prefills and 10 steps: 0.3 s. Then W2 at 0.3, finishing at 0.3 + 0.1 + 0.1.
        assert_eq!(f.waiting_admit_s, vec![0.0, 0.0, f.waiting_admit_s[2]]);
        assert!(close(f.waiting_finish_s[0], 0.3));
        assert!(close(f.waiting_finish_s[1], 0.3));
        assert!(close(f.waiting_admit_s[2], 0.3));
        assert!(close(f.waiting_finish_s[2], 0.5));
        // The new request takes the other slot freed at 0.3, with W2: their prefills are
        // one iteration, so its first token waits for W2's prefill too.
        assert!(close(f.new_admit_s, 0.3));
        assert!(close(f.new_batched_prefill_s, 0.1));
        // With free slots the queue delays the first token, not the admission.
        let mut e = expert(4, 100_000);
        e.waiting.push(request(100, 11.0, 0, 0.0));
        let f = Forecast::of(&e, 100, 5.0);
        assert_eq!(f.new_admit_s, 0.0);
        assert!(close(f.new_batched_prefill_s, 0.1));
    }

    #[test]
    fn a_full_kv_cache_holds_the_queue_until_enough_finishes() {
        // Room for 1,000 tokens; two running hold 400 each (context now).
        let mut e = expert(8, 1000);
        e.running.push(request(390, 100.0, 10, 1.0)); // 90 steps left
        e.running.push(request(395, 100.0, 5, 1.0)); // 95 steps left
        // The new request needs 100 + 150: 800 + 250 > 1000, so it waits for the first
        // finisher (0.9 s), then 400 + 250 fits.
        let f = Forecast::of(&e, 100, 150.0);
        assert!(close(f.new_admit_s, 0.9));
        assert_eq!(f.new_batch, 2);
        // A prompt that fits nowhere is admitted when everything has left (never stuck).
        let f = Forecast::of(&e, 5000, 10.0);
        assert!(close(f.new_admit_s, 0.95));
    }
}
