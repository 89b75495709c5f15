//! The daemon's watchers of its experts and host: health checks with load scrapes, and host
//! telemetry sampling into the router's books.

use std::sync::Arc;
use std::time::Duration;

use qosroute_telemetry::{HostTelemetry, TelemetryOptions};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::shared::Shared;

/// Health-checks every expert each `telemetry.scrape_interval_s` (the first round ran before
/// the broker link started).
pub(super) async fn check_experts(shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let interval = Duration::from_secs_f64(shared.config().telemetry.scrape_interval_s);
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        check_round(&shared).await;
    }
}

/// One health check (and load scrape) of every expert of the configuration in force.
pub(super) async fn check_round(shared: &Arc<Shared>) {
    let config = shared.config();
    let names: Vec<String> = config.experts.iter().map(|e| e.name.clone()).collect();
    let mut checks = JoinSet::new();
    for name in names {
        let reports_load = config
            .experts
            .iter()
            .find(|e| e.name == name)
            .is_some_and(Config::reports_load);
        if let Some(client) = shared.client(&name) {
            checks.spawn(async move {
                let ok = client.health().await.is_ok();
                let load = if ok && reports_load {
                    client.scrape_load().await.ok()
                } else {
                    None
                };
                (name, ok, load)
            });
        }
    }
    while let Some(r) = checks.join_next().await {
        let Ok((name, ok, load)) = r else { continue };
        let now = Instant::now();
        shared
            .router
            .tell(move |router| {
                let Some(e) = router.ledger.index_of(&name) else {
                    return;
                };
                if ok {
                    router.ledger.mark_ok(e, now);
                } else {
                    router.ledger.mark_failed(e, now, Duration::from_secs(5));
                }
                // A scrape without running or waiting counts is no report: the expert stays
                // saturated in the policy's eyes until it reports.
                if let Some(l) = load
                    && let (Some(running), Some(waiting)) = (l.running, l.waiting)
                {
                    router.ledger.reported_load(
                        e,
                        crate::ledger::ReportedLoad {
                            running,
                            waiting,
                            at: now,
                        },
                    );
                }
            })
            .await;
    }
}

/// Samples host telemetry each `telemetry.scrape_interval_s` while an expert of the
/// configuration in force is `local`, into the ledger (the state of local experts) and the
/// metrics. Providers are detected on first need and again when `[telemetry.host]` changes;
/// what is missing is logged once, at detection. Reads run on the blocking pool.
pub(super) async fn sample_host(shared: Arc<Shared>, stop: CancellationToken) {
    let mut telemetry: Option<(TelemetryOptions, HostTelemetry)> = None;
    loop {
        let config = shared.config();
        if config.experts.iter().any(|e| e.local) {
            let options = config.telemetry.host.clone();
            let detected = match telemetry.take() {
                Some((o, t)) if o == options => Some((o, t)),
                _ => {
                    let o = options.clone();
                    tokio::task::spawn_blocking(move || {
                        let (t, notes) = HostTelemetry::detect(&o);
                        tracing::info!(
                            providers = ?t.provider_names(),
                            notes = notes.len(),
                            "host telemetry detected"
                        );
                        (o, t)
                    })
                    .await
                    .ok()
                }
            };
            let sampled = match detected {
                Some((o, mut t)) => tokio::task::spawn_blocking(move || {
                    let sample = t.sample();
                    (o, t, sample)
                })
                .await
                .ok(),
                None => None,
            };
            if let Some((o, t, sample)) = sampled {
                telemetry = Some((o, t));
                let reading = crate::ledger::HostReading {
                    at: Instant::from_std(sample.at),
                    cpu_utilisation: sample.cpu_utilisation,
                    gpu_utilisation: sample
                        .gpus
                        .iter()
                        .map(|g| (g.name.clone(), g.utilisation))
                        .collect(),
                    throttled: sample.throttled == Some(true),
                };
                shared
                    .router
                    .tell(move |router| router.ledger.host_reading(reading))
                    .await;
                if let Ok(mut h) = shared.host.lock() {
                    *h = Some(sample);
                }
            }
        } else {
            telemetry = None;
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs_f64(config.telemetry.scrape_interval_s)) => {}
        }
    }
}
