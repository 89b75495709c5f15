//! [`EngineLoad`]: an expert's own view of its load, read from its metrics.
//!
//! **Unknown is never idle.** Every signal is an `Option`: `None` means the engine did not say
//! (no metrics for this kind, metric missing or renamed, endpoint disabled, value not a finite
//! number). The daemon must treat `None` as saturated (or fall back to its own in-flight
//! bookkeeping), never as 0.

use serde_json::Value;
use tokio::time::Instant;

use crate::endpoint::MetricNames;
use crate::prometheus::{Exposition, Sample};

/// The load an engine reports about itself.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EngineLoad {
    /// Requests being decoded (running batch size).
    pub running: Option<u32>,
    /// Requests queued, not yet admitted.
    pub waiting: Option<u32>,
    /// Fill of the KV cache, 0..1.
    pub kv_cache_usage: Option<f64>,
    /// When the scrape's response arrived.
    pub scraped_at: Instant,
}

impl EngineLoad {
    /// Nothing known (kinds without metrics).
    pub fn unknown(scraped_at: Instant) -> Self {
        EngineLoad {
            running: None,
            waiting: None,
            kv_cache_usage: None,
            scraped_at,
        }
    }

    /// Reads the signals named in `names` from a parsed `/metrics`.
    ///
    /// For each signal, the first of its `|`-separated alternative names with any sample is used.
    /// When that metric's samples carry a `model_name` label (vLLM, SGLang), only the series of
    /// `model` count; if none matches (the server knows the model under an alias), all series
    /// count, since one engine process serves one model. Counts are summed over the series
    /// (data-parallel ranks, engines); the KV-cache fill is their maximum, clamped to 0..1.
    pub fn from_metrics(
        exposition: &Exposition,
        names: &MetricNames,
        model: &str,
        scraped_at: Instant,
    ) -> Self {
        let values = |name: &Option<String>| -> Vec<f64> {
            name.as_deref()
                .map(|n| series_values(exposition, n, model))
                .unwrap_or_default()
        };
        EngineLoad {
            running: count(&values(&names.running)),
            waiting: count(&values(&names.waiting)),
            kv_cache_usage: fraction(&values(&names.kv_usage)),
            scraped_at,
        }
    }
}

/// The values of the first alternative in `names` (`a|b|c`) that has samples, filtered by model.
fn series_values(exposition: &Exposition, names: &str, model: &str) -> Vec<f64> {
    for name in names.split('|').map(str::trim).filter(|n| !n.is_empty()) {
        let samples: Vec<&Sample> = exposition.series(name).collect();
        if samples.is_empty() {
            continue;
        }
        let labelled = samples.iter().any(|s| s.label("model_name").is_some());
        let of_model: Vec<f64> = samples
            .iter()
            .filter(|s| s.label("model_name") == Some(model))
            .map(|s| s.value)
            .collect();
        if labelled && !of_model.is_empty() {
            return of_model;
        }
        if labelled {
            tracing::debug!(
                metric = name,
                model,
                "no series for the configured model; using all"
            );
        }
        return samples.iter().map(|s| s.value).collect();
    }
    Vec::new()
}

/// The sum of non-negative finite counts, rounded; `None` when there is none or any is not.
fn count(values: &[f64]) -> Option<u32> {
    if values.is_empty() || values.iter().any(|v| !v.is_finite() || *v < 0.0) {
        return None;
    }
    let sum: f64 = values.iter().sum();
    // Finite and non-negative; `as` saturates at u32::MAX.
    Some(sum.round().min(f64::from(u32::MAX)) as u32)
}

/// The largest finite value, clamped to 0..1; `None` when there is none or any is not finite.
fn fraction(values: &[f64]) -> Option<f64> {
    if values.is_empty() || values.iter().any(|v| !v.is_finite()) {
        return None;
    }
    values
        .iter()
        .copied()
        .reduce(f64::max)
        .map(|v| v.clamp(0.0, 1.0))
}

/// The number of busy slots in llama.cpp's `/slots` JSON: an array of slot objects with
/// `is_processing: bool` (current) or `state: 0|1` (older servers; 1 = processing).
pub fn busy_slots(json: &[u8]) -> Result<u32, String> {
    let value: Value =
        serde_json::from_slice(json).map_err(|e| format!("`/slots` is not JSON: {e}"))?;
    let slots = value.as_array().ok_or("`/slots` is not a JSON array")?;
    let mut busy = 0u32;
    for slot in slots {
        let processing = match (slot.get("is_processing"), slot.get("state")) {
            (Some(Value::Bool(b)), _) => *b,
            (_, Some(state)) => state.as_u64().ok_or("a slot's `state` is not a number")? != 0,
            _ => return Err("a slot has neither `is_processing` nor `state`".to_owned()),
        };
        busy = busy.saturating_add(u32::from(processing));
    }
    Ok(busy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ExpertKind;
    use crate::prometheus::parse_exposition;

    #[test]
    fn vllm_counts_are_summed_for_the_configured_model() {
        let text = "\
vllm:num_requests_running{engine=\"0\",model_name=\"a\"} 2.0
vllm:num_requests_running{engine=\"1\",model_name=\"a\"} 3.0
vllm:num_requests_running{engine=\"0\",model_name=\"b\"} 7.0
vllm:num_requests_waiting{engine=\"0\",model_name=\"a\"} 1.0
vllm:kv_cache_usage_perc{engine=\"0\",model_name=\"a\"} 0.25
vllm:kv_cache_usage_perc{engine=\"1\",model_name=\"a\"} 0.5
";
        let e = parse_exposition(text);
        let at = Instant::now();
        let load = EngineLoad::from_metrics(&e, &ExpertKind::Vllm.default_metric_names(), "a", at);
        assert_eq!(load.running, Some(5));
        assert_eq!(load.waiting, Some(1));
        assert_eq!(load.kv_cache_usage, Some(0.5));
        // An alias the labels do not know: all series count.
        let load =
            EngineLoad::from_metrics(&e, &ExpertKind::Vllm.default_metric_names(), "zzz", at);
        assert_eq!(load.running, Some(12));
    }

    #[test]
    fn the_older_vllm_cache_metric_is_the_fallback_alternative() {
        let e = parse_exposition("vllm:gpu_cache_usage_perc{model_name=\"a\"} 0.75\n");
        let load = EngineLoad::from_metrics(
            &e,
            &ExpertKind::Vllm.default_metric_names(),
            "a",
            Instant::now(),
        );
        assert_eq!(load.kv_cache_usage, Some(0.75));
        assert_eq!(load.running, None);
        assert_eq!(load.waiting, None);
    }

    #[test]
    fn unusable_values_are_unknown_not_zero() {
        assert_eq!(count(&[]), None);
        assert_eq!(count(&[1.0, f64::NAN]), None);
        assert_eq!(count(&[-1.0]), None);
        assert_eq!(count(&[f64::INFINITY]), None);
        assert_eq!(count(&[1.4, 1.4]), Some(3));
        assert_eq!(count(&[1e12]), Some(u32::MAX));
        assert_eq!(fraction(&[1.7]), Some(1.0));
        assert_eq!(fraction(&[-0.1]), Some(0.0));
        assert_eq!(fraction(&[f64::NAN]), None);
        let e = parse_exposition("");
        let none = MetricNames {
            running: None,
            waiting: None,
            kv_usage: None,
        };
        let load = EngineLoad::from_metrics(&e, &none, "a", Instant::now());
        assert_eq!(load, EngineLoad::unknown(load.scraped_at));
    }

    #[test]
    fn busy_slots_counts_processing_slots_in_both_formats() {
        assert_eq!(
            busy_slots(br#"[{"id":0,"is_processing":true},{"id":1,"is_processing":false}]"#),
            Ok(1)
        );
        assert_eq!(
            busy_slots(br#"[{"id":0,"state":1},{"id":1,"state":1},{"id":2,"state":0}]"#),
            Ok(2)
        );
        assert_eq!(busy_slots(b"[]"), Ok(0));
        assert!(busy_slots(br#"[{"id":0}]"#).is_err());
        assert!(busy_slots(br#"{"error":{"code":501}}"#).is_err());
        assert!(busy_slots(b"not json").is_err());
    }
}
