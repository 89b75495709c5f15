//! What `report run` keeps of each command's output, and the tables drawn from it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::{Experiment, Kept, Render, RunSpec};
use crate::plot::{SweepCurve, sweep_curves};
use crate::stats::{mean_std, paired_gain};

/// What one experiment draws: Markdown files (name, text), SVG files drawn into the scratch
/// folder, and its headline (what the docs' regions show; `](NAME.` links are made relative).
pub(crate) struct Drawn {
    pub(crate) text: Vec<(String, String)>,
    pub(crate) svg: Vec<String>,
    pub(crate) headline: String,
}

pub(crate) const INDEX_HEAD: &str = "# Results\n\n\
Every published number of qosroute comes from one list, [`experiments.toml`](experiments.toml), \
run by `qosroute report` (`cargo run --release -p qosroute-cli -- report ...`):\n\n\
- `qosroute report run` runs the fast experiments (`--kind long`, `--kind real-engine`, or names, \
for the others), keeps what their commands wrote as `NAME.json` with its provenance (command, \
machine, date, commit), and redraws the tables;\n\
- `qosroute report tables` redraws every `NAME.md` (and `NAME.svg`) and the tables embedded in the \
docs from the kept JSON, without running anything;\n\
- `qosroute report check` fails when a committed table differs from what its JSON gives (the \
test `cli/tests/report.rs`, so `bash scripts/test.sh` and CI run it), and `qosroute report smoke` \
runs the reduced form of every fast experiment.\n\n\
Mean ± std over seeds is always the sample standard deviation (ddof = 1). A **one-off** record \
holds figures whose raw output was not kept, copied as they were published with their command \
and date; rerunning the experiment replaces it. This page is generated.\n\n\
| experiment | kind | recorded | commit | table |\n|---|---|---|---|---|\n";

pub(crate) fn index_line(e: &Experiment, kept: &Kept) -> String {
    let date = if kept.one_off.is_some() {
        format!("{} (one-off)", kept.provenance.date)
    } else {
        kept.provenance.date.clone()
    };
    format!(
        "| {} | {} | {date} | {} | [{}.md]({}.md) |\n",
        e.title,
        e.kind.name(),
        kept.provenance.commit,
        e.name,
        e.name
    )
}

/// The part of a command's output an experiment keeps.
pub(crate) fn capture(
    root: &Path,
    e: &Experiment,
    r: &RunSpec,
    out: &Path,
) -> anyhow::Result<Value> {
    let output = |default: &str| -> PathBuf {
        let spec = r.output.as_deref().unwrap_or(default);
        let p = PathBuf::from(spec.replace("{out}", &out.display().to_string()));
        if p.is_absolute() { p } else { root.join(p) }
    };
    let read = |path: &Path| -> anyhow::Result<Value> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: the command wrote nothing here", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))
    };
    Ok(match e.render {
        Render::Compare => trim_compare(&read(&output("{out}/compare.json"))?),
        Render::Demo => trim_demo(&read(&output("{out}/demo.json"))?),
        Render::BenchE2e => read(&output("{out}/bench.json"))?,
        Render::SimVsReal => trim_validate(&read(&output("{out}/validate.json"))?),
        Render::Criterion => {
            let base = std::env::var_os("CARGO_TARGET_DIR")
                .map_or_else(|| root.join("target"), PathBuf::from)
                .join("criterion");
            let mut cells = serde_json::Map::new();
            for c in &e.criterion {
                let path = base.join(&c.id).join("new").join("estimates.json");
                let est = read(&path)?;
                let median = &est["median"];
                cells.insert(
                    c.id.clone(),
                    json!({
                        "median_ns": median["point_estimate"],
                        "lower_ns": median["confidence_interval"]["lower_bound"],
                        "upper_ns": median["confidence_interval"]["upper_bound"],
                    }),
                );
            }
            Value::Object(cells)
        }
        Render::OneOff => bail!("`{}` is a one-off record: nothing to run", e.name),
    })
}

/// Compare JSON without the per-expert and per-task breakdowns of every run.
pub(crate) fn trim_compare(v: &Value) -> Value {
    let runs: Vec<Value> = v["runs"]
        .as_array()
        .map(|runs| {
            runs.iter()
                .map(|r| {
                    json!({
                        "policy": r["policy"],
                        "seed": r["seed"],
                        "avg_qos": r["avg_qos"],
                        "slo_violation_rate": r["slo_violation_rate"],
                        "reject_rate": r["reject_rate"],
                        "requests": r["requests"],
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    json!({
        "catalogue": v["catalogue"],
        "workload": v["workload"],
        "seeds": v["seeds"],
        "summary": v["summary"],
        "runs": runs,
    })
}

/// Demo JSON without every request's record: the setup, the summary, each run's counts and
/// timeline.
fn trim_demo(v: &Value) -> Value {
    let mut demo = v["demo"].clone();
    if let Some(obj) = demo.as_object_mut() {
        obj.remove("workloads");
    }
    let runs: Vec<Value> = v["runs"]
        .as_array()
        .map(|runs| {
            runs.iter()
                .map(|r| {
                    let s = &r["summary"];
                    json!({
                        "policy": r["policy"],
                        "seed": r["seed"],
                        "wall_s": r["wall_s"],
                        "requests": s["requests"],
                        "completed": s["completed"],
                        "errors": s["errors"],
                        "errors_by_code": s["errors_by_code"],
                        "lost": s["lost"],
                        "not_sent": s["not_sent"],
                        "duplicated": s["duplicated"],
                        "avg_qos": s["avg_qos"],
                        "slo_violation_rate": s["slo_violation_rate"],
                        "gateway_slo_violation_rate": s["gateway_slo_violation_rate"],
                        "timeline": r["timeline"],
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    json!({"demo": demo, "interrupted": v["interrupted"], "summary": v["summary"], "runs": runs})
}

/// Validate JSON without the per-request rows.
pub(crate) fn trim_validate(v: &Value) -> Value {
    json!({
        "command": v["command"],
        "setup": v["setup"],
        "measured": v["measured"],
        "simulated_replayed_routing": v["simulated_replayed_routing"],
        "simulated_policy": v["simulated_policy"],
        "per_expert": v["per_expert"],
    })
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

fn pct(v: f64) -> String {
    if v.is_finite() {
        format!("{:.1} %", 100.0 * v)
    } else {
        "-".into()
    }
}

fn provenance(e: &Experiment, kept: &Kept) -> String {
    let name = &e.name;
    let p = &kept.provenance;
    if let Some(o) = &kept.one_off {
        return format!(
            "_One-off record: the figures as published in {}; command `{}`, recorded {} ({}), commit {}. \
             Their raw output was not kept, so they cannot be redrawn from it: \
             `qosroute report run {name}` replaces them._\n",
            o.source, o.command, p.date, p.machine, p.commit
        );
    }
    let seconds = p.seconds.map_or(String::new(), |s| format!(", {s:.0} s"));
    let note = p.note.as_ref().map_or(String::new(), |n| format!(" {n}"));
    let std = if matches!(e.render, Render::Compare | Render::Demo) {
        " Mean ± std over seeds: sample std (ddof = 1)."
    } else {
        ""
    };
    format!(
        "_{} experiment, recorded {} at commit {} on {}{seconds}.{note}{std}_\n",
        kept.kind.name(),
        p.date,
        p.commit,
        p.machine
    )
}

fn commands(kept: &Kept) -> String {
    let mut s = String::from("```sh\n");
    let mut shown: Vec<&str> = Vec::new();
    for r in &kept.runs {
        if !shown.contains(&r.command.as_str()) {
            let _ = writeln!(s, "{}", r.command);
            shown.push(&r.command);
        }
    }
    s.push_str("```\n");
    s
}

fn page(e: &Experiment, kept: &Kept, body: &str) -> String {
    let mut s = format!(
        "# {}\n\n<!-- generated by `qosroute report tables` from {}.json: do not edit -->\n\n",
        e.title, e.name
    );
    if let Some(n) = &e.note {
        let _ = writeln!(s, "{n}\n");
    }
    s.push_str(&provenance(e, kept));
    s.push('\n');
    if kept.one_off.is_none() {
        let _ = writeln!(
            s,
            "Regenerate: `qosroute report run {}` (kind {}); the commands it runs (OUT is a scratch folder):\n",
            e.name,
            kept.kind.name()
        );
        s.push_str(&commands(kept));
        s.push('\n');
    }
    s.push_str(body);
    s
}

fn headline(e: &Experiment, kept: &Kept, table: &str) -> String {
    let when = if kept.one_off.is_some() {
        format!("one-off record of {}", kept.provenance.date)
    } else {
        format!(
            "{}, commit {}, {}",
            kept.provenance.date, kept.provenance.commit, kept.provenance.machine
        )
    };
    format!(
        "{table}\n_Generated by `qosroute report` ({when}); commands, provenance and full tables: [{}](NAME.md)._\n",
        e.name
    )
}

pub(crate) fn render(e: &Experiment, kept: &Kept, scratch: &Path) -> anyhow::Result<Drawn> {
    if kept.name != e.name {
        bail!("{}.json holds experiment `{}`", e.name, kept.name);
    }
    if let Some(o) = &kept.one_off {
        let table = plain_table(&o.columns, &o.rows);
        let mut body = table.clone();
        for n in &o.notes {
            let _ = write!(body, "\n- {n}");
        }
        if !o.notes.is_empty() {
            body.push('\n');
        }
        return Ok(Drawn {
            text: vec![(format!("{}.md", e.name), page(e, kept, &body))],
            svg: vec![],
            headline: headline(e, kept, &table),
        });
    }
    let (table, body, svg) = match e.render {
        Render::Compare => compare(e, kept)?,
        Render::Demo => demo(e, kept, scratch)?,
        Render::BenchE2e => bench_e2e(e, kept),
        Render::Criterion => criterion(e, kept),
        Render::SimVsReal => sim_vs_real(e, kept),
        Render::OneOff => bail!("{}.json: a one-off experiment without its record", e.name),
    };
    Ok(Drawn {
        text: vec![(format!("{}.md", e.name), page(e, kept, &body))],
        svg,
        headline: headline(e, kept, &table),
    })
}

fn plain_table(columns: &[String], rows: &[Vec<String>]) -> String {
    let mut s = format!(
        "| {} |\n|{}\n",
        columns.join(" | "),
        "---|".repeat(columns.len())
    );
    for r in rows {
        let _ = writeln!(s, "| {} |", r.join(" | "));
    }
    s
}

/// Display name of a compare policy: a learned router (`han:PATH`) takes the label of the
/// first key its path contains, else `learned (HAN)`; any other policy is itself.
fn label(e: &Experiment, policy: &str) -> String {
    if let Some(path) = policy.strip_prefix("han:") {
        for (key, l) in &e.labels {
            if path.contains(key.as_str()) {
                return l.clone();
            }
        }

        "learned (HAN)".into()
    } else {
        policy.to_owned()
    }
}

fn is_learned(policy: &str) -> bool {
    policy.starts_with("han:")
}

/// One display group of a scenario: every run (policy x seed) pooled.
struct Group {
    name: String,
    learned: bool,
    planner: bool,
    qos: Vec<f64>,
    slo: Vec<f64>,
    reject: Vec<f64>,
    /// Paired with qos-greedy on the same workload seed.
    gains: Vec<f64>,
}

impl Group {
    fn mean_qos(&self) -> f64 {
        mean_std(&self.qos).0
    }

    fn cell(&self) -> String {
        let (m, s) = mean_std(&self.qos);
        format!("{m:.4} ± {s:.4} ({})", pct(mean_std(&self.slo).0))
    }

    fn gain_cell(&self) -> String {
        if self.name == "qos-greedy" || self.gains.is_empty() {
            return String::new();
        }
        let zeros = vec![0.0; self.gains.len()];
        paired_gain(&self.gains, &zeros).map_or(String::new(), |g| {
            format!("{:+.4} ± {:.4} ({}/{})", g.mean, g.std, g.wins, g.pairs)
        })
    }
}

fn groups(e: &Experiment, data: &Value) -> Vec<Group> {
    let runs = data["runs"].as_array().cloned().unwrap_or_default();
    let greedy: BTreeMap<u64, f64> = runs
        .iter()
        .filter(|r| r["policy"] == "qos-greedy")
        .filter_map(|r| Some((r["seed"].as_u64()?, f(&r["avg_qos"]))))
        .collect();
    let mut out: Vec<Group> = Vec::new();
    for r in &runs {
        let policy = r["policy"].as_str().unwrap_or("?");
        let name = label(e, policy);
        let idx = match out.iter().position(|g| g.name == name) {
            Some(i) => i,
            None => {
                out.push(Group {
                    name: name.clone(),
                    learned: is_learned(policy),
                    planner: policy.starts_with("qos-planner"),
                    qos: vec![],
                    slo: vec![],
                    reject: vec![],
                    gains: vec![],
                });
                out.len() - 1
            }
        };
        let g = &mut out[idx];
        let q = f(&r["avg_qos"]);
        g.qos.push(q);
        g.slo.push(f(&r["slo_violation_rate"]));
        g.reject.push(f(&r["reject_rate"]));
        if let Some(base) = r["seed"].as_u64().and_then(|s| greedy.get(&s)) {
            g.gains.push(q - base);
        }
    }
    out
}

fn scenario_table(groups: &[Group]) -> String {
    let mut s = String::from(
        "| policy | runs | avg QoS, mean ± std | SLO miss | refused | paired gain over qos-greedy, mean ± std (wins) |\n|---|---|---|---|---|---|\n",
    );
    let best = groups
        .iter()
        .map(Group::mean_qos)
        .fold(f64::NEG_INFINITY, f64::max);
    for g in groups {
        let (m, sd) = mean_std(&g.qos);
        let q = format!("{m:.4} ± {sd:.4}");
        let q = if m == best { format!("**{q}**") } else { q };
        let _ = writeln!(
            s,
            "| {} | {} | {q} | {} | {} | {} |",
            g.name,
            g.qos.len(),
            pct(mean_std(&g.slo).0),
            pct(mean_std(&g.reject).0),
            g.gain_cell()
        );
    }
    s
}

type Drawing = (String, String, Vec<String>);

fn compare(e: &Experiment, kept: &Kept) -> anyhow::Result<Drawing> {
    let mut body = String::new();
    let mut per_scenario = Vec::new();
    for (spec, run) in e.run.iter().zip(&kept.runs) {
        if spec.key != run.key {
            bail!(
                "{}.json: run `{}` where the list has `{}`",
                e.name,
                run.key,
                spec.key
            );
        }
        per_scenario.push((spec.title.clone(), groups(e, &run.data), &run.data));
    }
    if kept.runs.len() != e.run.len() {
        bail!(
            "{}.json: {} runs, the list has {}",
            e.name,
            kept.runs.len(),
            e.run.len()
        );
    }
    // Summary across scenarios: best other baseline, qos-greedy, the learned routers, the planner.
    let learned: Vec<String> = per_scenario
        .first()
        .map(|(_, gs, _)| {
            gs.iter()
                .filter(|g| g.learned)
                .map(|g| g.name.clone())
                .collect()
        })
        .unwrap_or_default();
    let mut summary = String::from("| scenario | best other baseline | qos-greedy |");
    for l in &learned {
        let _ = write!(summary, " {l} |");
    }
    summary.push_str(" qos-planner |\n|---|---|---|");
    summary.push_str(&"---|".repeat(learned.len() + 1));
    summary.push('\n');
    let mut ratios: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut gains: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for (title, gs, _) in &per_scenario {
        let greedy = gs.iter().find(|g| g.name == "qos-greedy");
        let best_other = gs
            .iter()
            .filter(|g| !g.learned && !g.planner && g.name != "qos-greedy")
            .max_by(|a, b| a.mean_qos().total_cmp(&b.mean_qos()));
        let cell = |g: Option<&Group>| g.map_or("-".to_owned(), Group::cell);
        let _ = write!(
            summary,
            "| {title} | {} | {} |",
            best_other.map_or("-".to_owned(), |g| format!("{} {}", g.name, g.cell())),
            cell(greedy)
        );
        let mut row_groups: Vec<Option<&Group>> = learned
            .iter()
            .map(|l| gs.iter().find(|g| &g.name == l))
            .collect();
        row_groups.push(gs.iter().find(|g| g.planner));
        let best = row_groups
            .iter()
            .flatten()
            .map(|g| g.mean_qos())
            .fold(f64::NEG_INFINITY, f64::max);
        for g in row_groups.iter() {
            let text = cell(*g);
            let bold = g.is_some_and(|g| g.mean_qos() == best);
            let _ = write!(
                summary,
                " {} |",
                if bold { format!("**{text}**") } else { text }
            );
            if let (Some(g), Some(base)) = (g, greedy) {
                let key = if g.planner {
                    "qos-planner".to_owned()
                } else {
                    g.name.clone()
                };
                ratios
                    .entry(key.clone())
                    .or_default()
                    .push(g.mean_qos() / base.mean_qos());
                gains.entry(key).or_default().extend(&g.gains);
            }
        }
        summary.push('\n');
    }
    if per_scenario.len() > 1 {
        let _ = write!(
            summary,
            "| **ratio to qos-greedy**, mean over scenarios (paired wins) | | 1 |"
        );
        for key in learned
            .iter()
            .cloned()
            .chain(std::iter::once("qos-planner".to_owned()))
        {
            let r = ratios.get(&key).map_or(f64::NAN, |r| mean_std(r).0);
            let g = gains.get(&key).cloned().unwrap_or_default();
            let wins = g.iter().filter(|x| **x > 0.0).count();
            let _ = write!(summary, " **{r:.3}x** ({wins}/{}) |", g.len());
        }
        summary.push('\n');
    }
    let _ = writeln!(
        body,
        "Average QoS, mean ± std over runs (SLO-violation rate of served requests in parentheses); \
         a learned router's runs pool its training seeds x workload seeds.\n"
    );
    body.push_str(&summary);
    body.push('\n');
    for (title, gs, data) in &per_scenario {
        let _ = writeln!(
            body,
            "## {title}\n\n`{}` on `{}`, seeds {}.\n",
            data["workload"].as_str().unwrap_or("?"),
            data["catalogue"].as_str().unwrap_or("?"),
            data["seeds"]
        );
        body.push_str(&scenario_table(gs));
        body.push('\n');
    }
    Ok((summary, body, vec![]))
}

fn demo(e: &Experiment, kept: &Kept, scratch: &Path) -> anyhow::Result<Drawing> {
    let run = kept.runs.first().context("demo: no run kept")?;
    let d = &run.data;
    let facts = &d["demo"];
    let runs = d["runs"].as_array().cloned().unwrap_or_default();
    let mut table = String::from(
        "| router | average QoS, mean ± std | SLO misses, devices (gateway) | refused | paired vs `qos-greedy`, mean ± std (seeds won) | fallbacks to `qos-greedy` / out of budget / decisions |\n|---|---|---|---|---|---|\n",
    );
    let summary = d["summary"].as_array().cloned().unwrap_or_default();
    let best = summary
        .iter()
        .map(|s| f(&s["avg_qos_mean"]))
        .fold(f64::NEG_INFINITY, f64::max);
    for s in &summary {
        let policy = s["policy"].as_str().unwrap_or("?");
        let of: Vec<&Value> = runs.iter().filter(|r| r["policy"] == policy).collect();
        let refused: Vec<f64> = of
            .iter()
            .map(|r| f(&r["errors"]) / f(&r["requests"]))
            .collect();
        let q = format!("{:.4} ± {:.4}", f(&s["avg_qos_mean"]), f(&s["avg_qos_std"]));
        let q = if f(&s["avg_qos_mean"]) == best {
            format!("**{q}**")
        } else {
            q
        };
        let gain = &s["gain_over_qos_greedy"];
        let gain = if gain.is_null() {
            String::new()
        } else {
            format!(
                "{:+.4} ± {:.4} ({}/{})",
                f(&gain["mean"]),
                f(&gain["std"]),
                gain["wins"],
                gain["pairs"]
            )
        };
        let count = |v: &Value| v.as_f64().map_or("-".to_owned(), |x| format!("{x:.0}"));
        let _ = writeln!(
            table,
            "| `{policy}` | {q} | {} ({}) | {} | {gain} | {} / {} / {} |",
            pct(f(&s["slo_violation_rate_mean"])),
            pct(f(&s["gateway_slo_violation_rate_mean"])),
            pct(mean_std(&refused).0),
            count(&s["fallbacks"]),
            count(&s["budget_exhausted"]),
            count(&s["decisions"])
        );
    }
    let total = |k: &str| runs.iter().map(|r| r[k].as_u64().unwrap_or(0)).sum::<u64>();
    let mut body = format!(
        "{} experts of `{}`, {} devices replaying minutes {} of `{}` at load {} and {}x speed; \
         seeds {}; {} requests per run. Over all {} runs: {} requests, {} completed, {} error replies \
         (refused), {} lost, {} not sent, {} duplicated{}.\n\n",
        facts["experts"].as_array().map_or(0, Vec::len),
        facts["catalogue"].as_str().unwrap_or("?"),
        facts["devices"],
        facts["trace_window_minutes"],
        facts["trace"].as_str().unwrap_or("?"),
        facts["load"],
        facts["speed"],
        facts["seeds"],
        facts["requests"],
        runs.len(),
        total("requests"),
        total("completed"),
        total("errors"),
        total("lost"),
        total("not_sent"),
        total("duplicated"),
        if d["interrupted"].as_bool() == Some(true) {
            "; **interrupted**"
        } else {
            ""
        }
    );
    body.push_str(&table);
    // The demo's own plot, from the kept timelines: QoS over time, the first seed's runs.
    let first = runs.first().and_then(|r| r["seed"].as_u64());
    let curves: Vec<SweepCurve> = runs
        .iter()
        .filter(|r| r["seed"].as_u64() == first)
        .map(|r| SweepCurve {
            policy: r["policy"].as_str().unwrap_or("?").to_owned(),
            points: r["timeline"]
                .as_array()
                .map(|t| {
                    t.iter()
                        .map(|p| (f(&p["t_s"]), f(&p["avg_qos"]), 0.0))
                        .collect()
                })
                .unwrap_or_default(),
        })
        .collect();
    let svg = format!("{}.svg", e.name);
    sweep_curves(
        &scratch.join(&svg),
        "Average QoS of the requests ending in each interval",
        "seconds since the first request (wall clock)",
        "average QoS",
        &curves,
    )?;
    let _ = write!(
        body,
        "\n![Average QoS over time, seed {}](NAME.svg)\n\nThe demo writes this plot as `out/demo/qos-over-time.svg` (the first seed's runs); here it is redrawn from the kept timelines.\n",
        first.unwrap_or(0)
    );
    let body = body.replace("](NAME.", &format!("]({}.", e.name));
    let headline = format!(
        "![Average QoS over time, seed {}](NAME.svg)\n\n{table}",
        first.unwrap_or(0)
    );
    Ok((headline, body, vec![svg]))
}

fn us_pair(d: &Value) -> String {
    format!("{:.0} / {:.0} µs", f(&d["p50_us"]), f(&d["p99_us"]))
}

type BenchRow = (&'static str, fn(&Value) -> String);

const BENCH_ROWS: &[BenchRow] = &[
    ("bare broker round trip p50 / p99", |d| {
        us_pair(&d["broker_round_trip"])
    }),
    ("(a) publish -> expert p50 / p99", |d| {
        us_pair(&d["added_latency"]["publish_to_expert"])
    }),
    ("(b) first byte -> first reply p50 / p99", |d| {
        us_pair(&d["added_latency"]["expert_to_first_reply"])
    }),
    ("(a)+(b) p50 / p99 (both broker hops in)", |d| {
        us_pair(&d["added_latency"]["added"])
    }),
    ("routed requests/s at saturation (daemon cores)", |d| {
        format!(
            "{:.0} ({:.2})",
            f(&d["throughput"]["requests_per_s"]),
            f(&d["throughput"]["cpu"]["daemon_cores"])
        )
    }),
    ("decisions at saturation, of them rejected", |d| {
        let dec = f(&d["daemon"]["decisions"]);
        format!(
            "{dec:.0}, {}",
            pct(f(&d["daemon"]["requests_by_outcome"]["rejected"]) / dec)
        )
    }),
    ("served per stub, best answers first", |d| {
        d["throughput"]["served_by_expert"]
            .as_object()
            .map_or("-".into(), |m| {
                m.values()
                    .map(|v| v.to_string())
                    .collect::<Vec<_>>()
                    .join(" / ")
            })
    }),
    ("daemon RSS idle / VmHWM at saturation", |d| {
        format!(
            "{:.1} / {:.1} MiB",
            f(&d["memory"]["idle_vmrss_kib"]) / 1024.0,
            f(&d["memory"]["vmhwm_kib"]) / 1024.0
        )
    }),
];

fn bench_e2e(e: &Experiment, kept: &Kept) -> Drawing {
    let rows = BENCH_ROWS;
    let titles: Vec<&str> = e.run.iter().map(|r| r.title.as_str()).collect();
    let mut table = format!(
        "| | {} |\n|---|{}\n",
        titles.join(" | "),
        "---|".repeat(titles.len())
    );
    for (name, cell) in rows {
        let cells: Vec<String> = kept.runs.iter().map(|r| cell(&r.data)).collect();
        let _ = writeln!(table, "| {name} | {} |", cells.join(" | "));
    }
    let mut body = table.clone();
    body.push_str(
        "\nGoals (issue 17):\n\n| run | goal | target | measured | met |\n|---|---|---|---|---|\n",
    );
    for (spec, r) in e.run.iter().zip(&kept.runs) {
        for t in r.data["targets"].as_array().cloned().unwrap_or_default() {
            let _ = writeln!(
                body,
                "| {} | {} | {} | {:.0} {} | {} |",
                spec.title,
                t["what"].as_str().unwrap_or("?"),
                t["target"].as_str().unwrap_or("?"),
                f(&t["measured"]),
                t["unit"].as_str().unwrap_or(""),
                if t["met"].as_bool() == Some(true) {
                    "yes"
                } else {
                    "no"
                }
            );
        }
    }
    (table, body, vec![])
}

fn criterion(e: &Experiment, kept: &Kept) -> Drawing {
    let data = kept.runs.first().map(|r| &r.data);
    let mut rows: Vec<&str> = Vec::new();
    let mut cols: Vec<&str> = Vec::new();
    for c in &e.criterion {
        if !rows.contains(&c.row.as_str()) {
            rows.push(&c.row);
        }
        if !cols.contains(&c.column.as_str()) {
            cols.push(&c.column);
        }
    }
    let time = |ns: f64| {
        if ns >= 1e6 {
            format!("{:.2} ms", ns / 1e6)
        } else {
            format!("{:.0} µs", ns / 1e3)
        }
    };
    let mut table = format!(
        "| | {} |\n|---|{}\n",
        cols.join(" | "),
        "---|".repeat(cols.len())
    );
    for row in &rows {
        let cells: Vec<String> = cols
            .iter()
            .map(|col| {
                e.criterion
                    .iter()
                    .find(|c| c.row == *row && c.column == *col)
                    .and_then(|c| data.map(|d| &d[&c.id]))
                    .map_or("-".into(), |v| time(f(&v["median_ns"])))
            })
            .collect();
        let _ = writeln!(table, "| {row} | {} |", cells.join(" | "));
    }
    let mut body = format!(
        "Criterion medians.\n\n{table}\n| benchmark id | median | 95 % interval |\n|---|---|---|\n"
    );
    for c in &e.criterion {
        if let Some(v) = data.map(|d| &d[&c.id]) {
            let _ = writeln!(
                body,
                "| `{}` | {} | {} - {} |",
                c.id,
                time(f(&v["median_ns"])),
                time(f(&v["lower_ns"])),
                time(f(&v["upper_ns"]))
            );
        }
    }
    (table, body, vec![])
}

fn sim_vs_real(e: &Experiment, kept: &Kept) -> Drawing {
    let mut table = String::from(
        "| run | requests | per-token p50, measured / simulated (error) | per-token p95 | TTFT p50 | TTFT p95 | SLO violations |\n|---|---|---|---|---|---|---|\n",
    );
    for (spec, r) in e.run.iter().zip(&kept.runs) {
        let m = &r.data["measured"];
        let s = &r.data["simulated_replayed_routing"];
        let cell = |k: &str, digits: usize| {
            let (a, b) = (f(&m[k]), f(&s[k]));
            format!(
                "{a:.digits$} / {b:.digits$} ({:+.1} %)",
                (b / a - 1.0) * 100.0
            )
        };
        let slo = format!(
            "{} / {} ({:+.1} pt)",
            pct(f(&m["slo_violation_rate"])),
            pct(f(&s["slo_violation_rate"])),
            (f(&s["slo_violation_rate"]) - f(&m["slo_violation_rate"])) * 100.0
        );
        let _ = writeln!(
            table,
            "| {} | {} | {} | {} | {} | {} | {slo} |",
            spec.title,
            r.data["setup"]["requests"],
            cell("per_token_p50_s", 4),
            cell("per_token_p95_s", 4),
            cell("ttft_p50_s", 3),
            cell("ttft_p95_s", 3),
        );
    }
    let mut body = format!(
        "Measured through mosquitto, `qosrouted` and the real servers, against the simulator with the \
         servers' fitted profiles and the daemon's routing replayed (seconds; the error is \
         simulated relative to measured).\n\n{table}"
    );
    for (spec, r) in e.run.iter().zip(&kept.runs) {
        let _ = writeln!(
            body,
            "\n**{}**: `{}`\n",
            spec.title,
            r.data["command"].as_str().unwrap_or("?")
        );
    }
    (table, body, vec![])
}
