//! Unit tests of `qosroute profile`: the fitting math against synthetic measurements of known
//! models, the prompts and the output.

use super::fit::*;
use qosroute_core::SimRng;

/// Multiplicative noise of ±`amp` (uniform).
fn noisy(rng: &mut SimRng, v: f64, amp: f64) -> f64 {
    let u = rng.below(1_000_001) as f64 / 1_000_000.0;
    v * (1.0 + amp * (2.0 * u - 1.0))
}

#[test]
fn prefill_speed_is_recovered_from_noisy_ttfts() {
    let mut rng = SimRng::derive(3, 1);
    let points: Vec<(f64, f64)> = [32.0, 128.0, 512.0, 1024.0, 2048.0]
        .iter()
        .flat_map(|&p| [p, p, p])
        .map(|p| (p, noisy(&mut rng, p / 850.0, 0.05)))
        .collect();
    let f = prefill(&points).unwrap();
    assert!((f.prefill_tok_s / 850.0 - 1.0).abs() < 0.03, "{f:?}");
    assert!((f.proportional_tok_s / 850.0 - 1.0).abs() < 0.03, "{f:?}");
    assert!((f.relative_tok_s / 850.0 - 1.0).abs() < 0.03, "{f:?}");
    assert!(f.mape < 0.05, "{f:?}");
    assert!(f.affine_intercept_s.abs() < 0.05, "{f:?}");
    // Whichever is written (the affine fit, or the proportional one if noise made the
    // intercept negative), the overhead is small and never negative.
    assert!((0.0..0.05).contains(&f.overhead_s), "{f:?}");
    assert_eq!(f.points, 15);
    assert!(prefill(&[]).is_none());
    assert!(prefill(&[(0.0, 1.0), (10.0, -1.0)]).is_none());
}

#[test]
fn an_overhead_shows_in_the_affine_fit_and_the_mape() {
    // TTFT = 0.05 + p / 1000: the through-origin form cannot hold it exactly.
    let points: Vec<(f64, f64)> = [100.0, 400.0, 1600.0]
        .iter()
        .map(|&p| (p, 0.05 + p / 1000.0))
        .collect();
    let f = prefill(&points).unwrap();
    assert!((f.affine_intercept_s - 0.05).abs() < 1e-9);
    assert!((f.affine_tok_s - 1000.0).abs() < 1e-6);
    assert!(f.affine_mape < 1e-9);
    // The affine fit is the one written.
    assert_eq!(f.fallback, None);
    assert!((f.overhead_s - 0.05).abs() < 1e-9, "{f:?}");
    assert!((f.prefill_tok_s - 1000.0).abs() < 1e-6, "{f:?}");
    assert!(f.mape < 1e-9);
    assert!(f.proportional_mape > 0.05);
    // All tokens over all TTFTs: 2100 / (3 * 0.05 + 2.1).
    assert!((f.proportional_tok_s - 2100.0 / 2.25).abs() < 1e-9, "{f:?}");
    // The relative fit follows the short prompt's fixed cost more.
    assert!(f.relative_tok_s < f.proportional_tok_s, "{f:?}");
}

#[test]
fn one_stalled_request_does_not_move_the_affine_fit() {
    // 2 ms + p / 20,000 at four lengths twice, one of them 92 ms late (as measured on the
    // emulator on a loaded machine): the seven others are on the line, which is the least
    // absolute deviations fit (least squares: 22 ms + p / 23,900).
    let mut points: Vec<(f64, f64)> = [64.0, 512.0, 1024.0, 2048.0]
        .iter()
        .flat_map(|&p| [p, p])
        .map(|p| (p, 0.002 + p / 20_000.0))
        .collect();
    points[3].1 += 0.092;
    let f = prefill(&points).unwrap();
    assert_eq!(f.fallback, None);
    assert!((f.overhead_s - 0.002).abs() < 1e-12, "{f:?}");
    assert!((f.prefill_tok_s - 20_000.0).abs() < 1e-6, "{f:?}");
    let (a, b) = ols(&points).unwrap();
    assert!(a > 0.015 && 1.0 / b > 23_000.0, "{a} {b}");
    assert_eq!(lad(&[(1.0, 1.0), (1.0, 2.0)]), None);
}

#[test]
fn a_negative_intercept_falls_back_to_the_proportional_fit() {
    // Short prompts cheaper than proportional (a prefix cache, say): TTFT = -0.02 + p / 1000
    // fits exactly but predicts nonsense below 20 tokens. Overhead 0, all tokens over all
    // TTFTs instead: 2100 / (2.1 - 3 * 0.02).
    let points: Vec<(f64, f64)> = [100.0, 400.0, 1600.0]
        .iter()
        .map(|&p| (p, -0.02 + p / 1000.0))
        .collect();
    let f = prefill(&points).unwrap();
    assert!((f.affine_intercept_s + 0.02).abs() < 1e-9, "{f:?}");
    assert_eq!(f.fallback, Some("its overhead is negative"));
    assert_eq!(f.overhead_s, 0.0);
    assert!((f.prefill_tok_s - 2100.0 / 2.04).abs() < 1e-9, "{f:?}");
    assert_eq!(f.prefill_tok_s, f.proportional_tok_s);
    assert_eq!(f.mape, f.proportional_mape);
    // TTFT falling with the prompt: no usable rate either.
    let f = prefill(&[(100.0, 0.3), (1000.0, 0.2)]).unwrap();
    assert_eq!(f.fallback, Some("its rate is not positive and finite"));
    assert_eq!(f.overhead_s, 0.0);
    // One length only: no affine fit at all.
    let f = prefill(&[(100.0, 0.3), (100.0, 0.2)]).unwrap();
    assert_eq!(f.fallback, Some("one prompt length only"));
    assert!((f.prefill_tok_s - 200.0 / 0.5).abs() < 1e-9, "{f:?}");
}

#[test]
fn decode_step_coefficients_are_recovered() {
    let mut rng = SimRng::derive(5, 1);
    let (t0, e) = (0.012, 4e-6);
    let points: Vec<(f64, f64)> = (0..40)
        .map(|i| {
            let c = 50.0 + 60.0 * i as f64;
            (c, noisy(&mut rng, t0 + e * c, 0.03))
        })
        .collect();
    let f = decode(&points).unwrap();
    assert!((f.t0_s / t0 - 1.0).abs() < 0.05, "{f:?}");
    assert!((f.e_s_per_ctx_token / e - 1.0).abs() < 0.15, "{f:?}");
    assert!(!f.e_clamped);
    assert!(f.mape < 0.03);
}

#[test]
fn a_negative_context_slope_is_clamped_to_zero() {
    let points = [(100.0, 0.011), (1000.0, 0.0105), (2000.0, 0.0101)];
    let f = decode(&points).unwrap();
    assert!(f.e_clamped);
    assert_eq!(f.e_s_per_ctx_token, 0.0);
    assert!((f.t0_s - 0.0105333).abs() < 1e-6);
}

fn interval(first_s: f64, last_s: f64, n: f64) -> DecodeInterval {
    DecodeInterval {
        first_s,
        last_s,
        prompt_tokens: 100.0,
        output_tokens: n,
        inter_token_s: (last_s - first_s) / (n - 1.0),
    }
}

#[test]
fn peak_overlap_counts_simultaneous_decodes() {
    // Serialised: each starts when the previous ends.
    let serial = [
        interval(0.0, 1.0, 10.0),
        interval(1.0, 2.0, 10.0),
        interval(2.0, 3.0, 10.0),
    ];
    assert_eq!(peak_overlap(&serial), 1);
    let two = [
        interval(0.0, 1.0, 10.0),
        interval(0.1, 1.1, 10.0),
        interval(1.05, 2.0, 10.0),
    ];
    assert_eq!(peak_overlap(&two), 2);
    assert_eq!(peak_overlap(&[]), 0);
}

#[test]
fn the_per_sequence_term_is_recovered_from_synthetic_batches() {
    // Batches of b answers decoding together for the whole interval, step model known.
    let (t0, d, e) = (0.01, 0.002, 1e-6);
    let mut rng = SimRng::derive(9, 1);
    let mut points = Vec::new();
    for b in [1usize, 2, 4, 8] {
        let n = 32.0;
        let ctx = b as f64 * (100.0 + n / 2.0);
        let itl = noisy(&mut rng, t0 + d * (b as f64 - 1.0) + e * ctx, 0.02);
        let batch: Vec<DecodeInterval> = (0..b)
            .map(|_| DecodeInterval {
                first_s: 0.0,
                last_s: itl * (n - 1.0),
                prompt_tokens: 100.0,
                output_tokens: n,
                inter_token_s: itl,
            })
            .collect();
        let no_stall = PrefillStall {
            overhead_s: 0.0,
            tok_s: 1e9,
        };
        points.extend(batch_points(&batch, no_stall, 0.005));
    }
    let f = concurrency(&points, t0, e);
    assert!((f.d_s_per_seq / d - 1.0).abs() < 0.1, "{f:?}");
    assert_eq!(f.points, 14);
    assert!(f.mape < 0.05);
}

#[test]
fn prefill_stalls_are_taken_out_of_the_inter_token_time() {
    // One answer decodes 0..1.1 s with 11 tokens; another's 500-token prefill (0.1 s at
    // 5000 tok/s) ends inside it: the clean inter-token time is 0.1 s.
    let a = interval(0.0, 1.1, 11.0);
    let mut b = interval(0.5, 0.9, 5.0);
    b.prompt_tokens = 500.0;
    let rate_only = PrefillStall {
        overhead_s: 0.0,
        tok_s: 5000.0,
    };
    let pts = batch_points(&[a, b], rate_only, 0.005);
    assert!((pts[0].inter_token_s - 0.1).abs() < 1e-9, "{pts:?}");
    assert!(pts[0].batch > 1.3 && pts[0].batch < 1.4, "{pts:?}");
    // With an overhead of 0.05 s per iteration: two answers admitted in one iteration
    // (first tokens 1 ms apart) and one in another stall the first by 2 * 0.05 s + 3 *
    // 500 tokens / 5000 tok/s = 0.4 s, out of 1.1 + 0.4 s over 10 steps.
    let a = interval(0.0, 1.5, 11.0);
    let mut admitted = [
        interval(0.5, 0.9, 5.0),
        interval(0.501, 0.9, 5.0),
        interval(1.0, 1.4, 5.0),
    ];
    for o in &mut admitted {
        o.prompt_tokens = 500.0;
    }
    let with_overhead = PrefillStall {
        overhead_s: 0.05,
        tok_s: 5000.0,
    };
    let mut all = vec![a];
    all.extend(admitted);
    let pts = batch_points(&all, with_overhead, 0.005);
    assert!((pts[0].inter_token_s - 0.11).abs() < 1e-9, "{pts:?}");
}

#[test]
fn without_overlap_d_is_zero_and_not_identifiable() {
    let stall = PrefillStall {
        overhead_s: 0.01,
        tok_s: 1e3,
    };
    let pts = batch_points(
        &[interval(0.0, 1.0, 10.0), interval(1.0, 2.0, 10.0)],
        stall,
        0.005,
    );
    let f = concurrency(&pts, 0.1, 0.0);
    assert_eq!(f.points, 0);
    assert_eq!(f.d_s_per_seq, 0.0);
    assert!(f.mape.is_nan());
}

#[test]
fn mape_and_median() {
    assert!((mape([(1.1, 1.0), (0.9, 1.0)]) - 0.1).abs() < 1e-12);
    assert!(mape(std::iter::empty()).is_nan());
    assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
    assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
}

#[test]
fn prompts_are_unique_and_sized_in_words() {
    let mut rng = SimRng::derive(1, 7);
    let a = super::synth_prompt("t-1", 10, &mut rng);
    let b = super::synth_prompt("t-2", 10, &mut rng);
    assert_ne!(a[..6], b[..6]);
    assert_eq!(a.split(' ').count(), 1 + 10 + 9);
}
