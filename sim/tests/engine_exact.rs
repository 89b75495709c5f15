//! The event-jumping engine must equal a naive engine that simulates every decode step one
//! by one under the same rules (admission at iteration boundaries, FCFS, slot and KV
//! reservation, prefill-prioritised iterations).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::VecDeque;
use std::sync::Arc;

use proptest::prelude::*;
use qosroute_core::{ExpertProfile, LatencyModel};
use qosroute_sim::engine::{EngineEvent, ExpertEngine, Job};

#[derive(Debug, Clone, Copy)]
struct Arrival {
    at: f64,
    prompt: u32,
    output: u32,
}

/// First-token and finish time of every job, stepping one decode step at a time.
fn reference(profile: &ExpertProfile, jobs: &[Arrival]) -> Vec<(f64, f64)> {
    let l = &profile.latency;
    let mut out = vec![(f64::NAN, f64::NAN); jobs.len()];
    let (mut t, mut next) = (0.0f64, 0usize);
    let mut waiting: VecDeque<usize> = VecDeque::new();
    let mut decoding: Vec<(usize, u32)> = Vec::new(); // (job, generated)
    let mut kv: u64 = 0;
    loop {
        while next < jobs.len() && jobs[next].at <= t {
            waiting.push_back(next);
            next += 1;
        }
        let mut prefill = Vec::new();
        while let Some(&i) = waiting.front() {
            let need = u64::from(jobs[i].prompt) + u64::from(jobs[i].output);
            if decoding.len() + prefill.len() < profile.max_slots as usize
                && kv + need <= profile.kv_tokens
            {
                waiting.pop_front();
                kv += need;
                prefill.push(i);
            } else {
                break;
            }
        }
        let finish = |i: usize, t: f64, kv: &mut u64, out: &mut Vec<(f64, f64)>| {
            *kv -= u64::from(jobs[i].prompt) + u64::from(jobs[i].output);
            out[i].1 = t;
        };
        if !prefill.is_empty() {
            let tokens: u64 = prefill.iter().map(|&i| u64::from(jobs[i].prompt)).sum();
            t += l.prefill_s(tokens as f64);
            for i in prefill {
                out[i].0 = t;
                if jobs[i].output <= 1 {
                    finish(i, t, &mut kv, &mut out);
                } else {
                    decoding.push((i, 1));
                }
            }
        } else if !decoding.is_empty() {
            let context: u64 = decoding
                .iter()
                .map(|&(i, g)| u64::from(jobs[i].prompt) + u64::from(g))
                .sum();
            t += l.decode_step_s(decoding.len() as f64, context as f64);
            for d in &mut decoding {
                d.1 += 1;
            }
            let mut k = 0;
            while k < decoding.len() {
                let (i, g) = decoding[k];
                if g >= jobs[i].output {
                    decoding.remove(k);
                    finish(i, t, &mut kv, &mut out);
                } else {
                    k += 1;
                }
            }
        } else if next < jobs.len() {
            t = jobs[next].at;
        } else {
            return out;
        }
    }
}

/// The same jobs through `ExpertEngine`, driven like the simulator drives it.
fn jumping(profile: &ExpertProfile, jobs: &[Arrival]) -> Vec<(f64, f64)> {
    let mut engine = ExpertEngine::new(Arc::new(profile.clone()));
    let mut out = vec![(f64::NAN, f64::NAN); jobs.len()];
    let mut events = Vec::new();
    let record = |events: &mut Vec<EngineEvent>, out: &mut Vec<(f64, f64)>| {
        for ev in events.drain(..) {
            match ev {
                EngineEvent::FirstToken { idx, at_s } => out[idx].0 = at_s,
                EngineEvent::Completed { idx, at_s, .. } => out[idx].1 = at_s,
            }
        }
    };
    for (idx, a) in jobs.iter().enumerate() {
        while engine.next_event_s().is_some_and(|t| t <= a.at) {
            engine.complete_phase(&mut events);
            engine.audit().unwrap();
            record(&mut events, &mut out);
        }
        engine.enqueue(
            Job {
                idx,
                prompt_tokens: a.prompt,
                output_tokens: a.output,
                generated_tokens: 0,
            },
            a.at,
        );
        engine.audit().unwrap();
    }
    while engine.next_event_s().is_some() {
        engine.complete_phase(&mut events);
        engine.audit().unwrap();
        record(&mut events, &mut out);
    }
    out
}

fn profile_strategy() -> impl Strategy<Value = ExpertProfile> {
    (
        1u32..6,
        300u64..4000,
        100.0f64..5000.0,
        0.005f64..0.05,
        0.0f64..0.005,
        0.0f64..1e-4,
    )
        .prop_map(|(slots, kv, pf, t0, d, e)| ExpertProfile {
            name: "e".into(),
            model: "m".into(),
            hardware: String::new(),
            source: String::new(),
            max_slots: slots,
            kv_tokens: kv,
            latency: LatencyModel {
                prefill_tok_s: pf,
                prefill_overhead_s: 0.0,
                decode_t0_s: t0,
                decode_d_s_per_seq: d,
                decode_e_s_per_ctx_token: e,
            },
        })
}

fn jobs_strategy(kv: u64) -> impl Strategy<Value = Vec<Arrival>> {
    // Gaps of exactly zero exercise same-instant arrivals.
    let gap = prop_oneof![1 => Just(0.0f64), 4 => 0.0f64..0.6];
    prop::collection::vec((gap, 1u32..250, 1u32..80), 1..40).prop_map(move |raw| {
        let mut t = 0.0;
        raw.into_iter()
            .map(|(g, p, d)| {
                t += g;
                let p = p.min(kv as u32 - 1);
                let d = d.min((kv - u64::from(p)) as u32);
                Arrival {
                    at: t,
                    prompt: p,
                    output: d,
                }
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn jumping_engine_equals_step_by_step_reference(
        (profile, jobs) in profile_strategy().prop_flat_map(|p| {
            let kv = p.kv_tokens;
            (Just(p), jobs_strategy(kv))
        })
    ) {
        let want = reference(&profile, &jobs);
        let got = jumping(&profile, &jobs);
        for (i, (w, g)) in want.iter().zip(&got).enumerate() {
            let tol = 1e-9 * (1.0 + w.1.abs());
            prop_assert!((w.0 - g.0).abs() <= tol, "job {i} first token: reference {} jumping {}", w.0, g.0);
            prop_assert!((w.1 - g.1).abs() <= tol, "job {i} finish: reference {} jumping {}", w.1, g.1);
        }
    }
}
