//! The table `qosroute bench e2e` prints.

use super::*;

pub(super) fn us(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".into(), |v| format!("{v:.0} us"))
}

pub(super) fn kib(v: Option<u64>) -> String {
    v.map_or_else(
        || "n/a".into(),
        |v| format!("{v} KiB ({:.1} MiB)", v as f64 / 1024.0),
    )
}

pub(super) fn cores(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".into(), |v| format!("{v:.2}"))
}

pub(super) fn print_report(r: &E2eReport) {
    let s = &r.settings;
    println!();
    println!("qosroute bench e2e: policy {} ({})", r.policy, r.router);
    println!(
        "  {} stub experts (zero latency, kind vllm), mosquitto, {} CPUs; max_in_flight {}, device_rate_per_s {:e}",
        s.experts, s.cpus, s.max_in_flight, s.device_rate_per_s
    );
    println!();
    println!(
        "{:<58} {:>10} {:>10} {:>8}",
        "latency (sequential, unloaded)", "p50", "p99", "n"
    );
    let row = |name: &str, st: &Stats| {
        println!(
            "{:<58} {:>10} {:>10} {:>8}",
            name,
            us(st.p50_us),
            us(st.p99_us),
            st.count
        );
    };
    row(
        "bare broker round trip (QoS 1 publish -> receive)",
        &r.broker_round_trip,
    );
    let a = &r.added_latency;
    row(
        "(a) device publish -> request at the expert",
        &a.publish_to_expert,
    );
    row(
        "(b) expert first byte -> device gets first reply",
        &a.expert_to_first_reply,
    );
    row(
        "    expert first byte -> device gets final reply",
        &a.expert_to_final,
    );
    row("(a)+(b) per request (two broker hops included)", &a.added);
    row(
        "device publish -> final reply (stub ~0 s)",
        &a.publish_to_final,
    );
    if !a.errors.is_empty() || r.broker_round_trip_errors > 0 {
        println!(
            "  latency phase errors: {:?}; broker round trips lost: {}",
            a.errors, r.broker_round_trip_errors
        );
    }
    let t = &r.throughput;
    println!();
    println!(
        "throughput: {} devices x {} outstanding, {} s warm-up, {} s counted",
        t.devices, t.window, t.warmup_s, t.counted_s
    );
    println!(
        "  completed {} -> {:.0} routed requests/s; error replies {} ({:.0}/s) {:?}",
        t.completed,
        t.requests_per_s,
        t.errors.values().sum::<u64>(),
        t.error_replies_per_s,
        t.errors
    );
    println!(
        "  under load, publish -> final: p50 {} p99 {}; published {}, unanswered after drain {}",
        us(t.publish_to_final.p50_us),
        us(t.publish_to_final.p99_us),
        t.published_total,
        t.unanswered
    );
    println!(
        "  CPU (cores) in the counted window: qosrouted {}, mosquitto {}, bench {}, machine {}",
        cores(t.cpu.daemon_cores),
        cores(t.cpu.mosquitto_cores),
        cores(t.cpu.bench_cores),
        cores(t.cpu.machine_busy_cores)
    );
    println!(
        "  served per expert: {}",
        t.served_by_expert
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(d) = &r.daemon {
        println!(
            "  daemon: decisions {}, policy fallbacks {}, outcomes {:?}",
            d.decisions, d.policy_fallbacks, d.requests_by_outcome
        );
    }
    println!();
    println!(
        "memory (qosrouted): idle VmRSS {}, after VmRSS {}, VmHWM {}",
        kib(r.memory.idle_vmrss_kib),
        kib(r.memory.after_vmrss_kib),
        kib(r.memory.vmhwm_kib)
    );
    println!();
    println!(
        "{:<70} {:>12} {:>14} {:>5}",
        "target", "goal", "measured", "met"
    );
    for tg in &r.targets {
        let measured = tg
            .measured
            .map_or_else(|| "n/a".into(), |v| format!("{v:.0} {}", tg.unit));
        let met = match tg.met {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "n/a",
        };
        println!(
            "{:<70} {:>12} {:>14} {:>5}",
            tg.what,
            format!("{} {}", tg.target, tg.unit),
            measured,
            met
        );
    }
    if r.connection_errors > 0 {
        println!(
            "  MQTT connection errors on the bench's side: {}",
            r.connection_errors
        );
    }
    println!();
}
