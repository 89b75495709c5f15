//! `qosroute report`: every published number from one declarative list.
//!
//! `docs/results/experiments.toml` names each experiment: its commands, seeds, kind (`fast`,
//! `long`, `real-engine`) and how its table is drawn. `report run` runs experiments and keeps
//! what their commands wrote, trimmed, with provenance (command, machine, date, commit) as
//! `docs/results/NAME.json`; `report tables` draws `NAME.md` (and `NAME.svg` where the docs show
//! a plot) from the kept JSON alone, and fills the marked regions of the docs
//! (`<!-- report:NAME -->` ... `<!-- /report:NAME -->`) with each experiment's headline table;
//! `report check` fails when a committed table differs from what its JSON gives; `report smoke`
//! runs the reduced form (`ci`) of every fast experiment into a scratch folder.
//!
//! Standard deviations are sample ones (ddof = 1) everywhere (`crate::stats`).
#![allow(clippy::print_stdout)]

mod render;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Where the list, the kept JSON and the tables live, relative to the workspace root.
pub(crate) const RESULTS_DIR: &str = "docs/results";
const LIST: &str = "docs/results/experiments.toml";

/// The documents whose marked regions hold generated tables.
const DOCS: &[&str] = &[
    "README.md",
    "docs",
    "cli/README.md",
    "cross/README.md",
    "policy-model/README.md",
    "policy-model/models/README.md",
];

#[derive(Debug, Args)]
pub struct ReportArgs {
    #[command(subcommand)]
    action: Action,
    /// The workspace root (default: found from the current folder upwards).
    #[arg(long, global = true)]
    root: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Action {
    /// List the experiments: name, kind, kept JSON, date and commit of its record.
    List,
    /// Run experiments (by name, or every one of `--kind`), keep their JSON, redraw the tables.
    Run {
        /// Experiment names (default: every experiment of `--kind`).
        names: Vec<String>,
        /// fast, long or real-engine (default: fast, when no name is given).
        #[arg(long)]
        kind: Option<String>,
        /// Override the experiment's seeds (e.g. 1,2,3).
        #[arg(long)]
        seeds: Option<String>,
    },
    /// Redraw every table and plot from the kept JSON (no experiment runs).
    Tables,
    /// Keep the output of an earlier run of an experiment's commands (one file per run of the
    /// list, in its order), trimmed as `run` trims it, with the provenance given here.
    Import {
        name: String,
        /// The files the runs' commands wrote, one per run.
        files: Vec<PathBuf>,
        /// When the files were written (YYYY-MM-DD).
        #[arg(long)]
        date: String,
        /// The commit they were made at, or what is known of it.
        #[arg(long)]
        commit: String,
        /// Cores and load, or what is known of them.
        #[arg(long)]
        machine: String,
        /// How the files came to be (who ran what, where).
        #[arg(long)]
        note: String,
        /// The commands as they were run, one per run (default: the list's).
        #[arg(long = "command")]
        commands: Vec<String>,
    },
    /// Redraw in memory and fail if a committed table, plot or doc region differs.
    Check,
    /// Run the reduced form of every fast experiment into a scratch folder and draw its tables
    /// there: proves the commands still work, changes nothing in the tree.
    Smoke {
        /// Scratch folder (default: a fresh one under the system's temporary folder).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// The declarative list.
#[derive(Debug, Deserialize)]
pub(crate) struct List {
    pub(crate) experiment: Vec<Experiment>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Kind {
    /// Minutes at most, deterministic or cheap: rerun by `report run`, reduced form in CI.
    Fast,
    /// A long run or one that needs a quiet machine: kept JSON, rerun on demand.
    Long,
    /// Needs a real LLM engine installed: kept JSON, rerun on demand.
    RealEngine,
}

impl Kind {
    fn parse(s: &str) -> anyhow::Result<Self> {
        Ok(match s {
            "fast" => Kind::Fast,
            "long" => Kind::Long,
            "real-engine" => Kind::RealEngine,
            other => bail!("unknown kind `{other}` (fast, long, real-engine)"),
        })
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Fast => "fast",
            Kind::Long => "long",
            Kind::RealEngine => "real-engine",
        }
    }
}

/// How an experiment's kept data becomes tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Render {
    /// `qosroute compare` JSON, one per run (scenario).
    Compare,
    /// `qosroute demo` JSON.
    Demo,
    /// `qosroute bench e2e` JSON, one per run (policy).
    BenchE2e,
    /// criterion's estimates of the listed benchmark ids.
    Criterion,
    /// `qosroute validate` JSON, one per run (load).
    SimVsReal,
    /// Only a one-off record (figures kept as published, with their command and date).
    OneOff,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Experiment {
    pub(crate) name: String,
    pub(crate) title: String,
    pub(crate) kind: Kind,
    pub(crate) render: Render,
    /// Substituted for `{seeds}` in the commands.
    #[serde(default)]
    pub(crate) seeds: Option<String>,
    #[serde(default)]
    pub(crate) run: Vec<RunSpec>,
    /// Compare: a learned router's display name by a part of its model's path (`han:PATH`);
    /// policies of one label are pooled (training seeds x workload seeds).
    #[serde(default)]
    pub(crate) labels: BTreeMap<String, String>,
    /// Criterion: benchmark ids (`group/function/value`) and their row and column in the table.
    #[serde(default)]
    pub(crate) criterion: Vec<CriterionCell>,
    /// What the table means, printed under its title.
    #[serde(default)]
    pub(crate) note: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct RunSpec {
    pub(crate) key: String,
    pub(crate) title: String,
    /// A shell command run from the workspace root; `qosroute` is this binary, `{out}` a
    /// scratch folder, `{seeds}` the seeds.
    pub(crate) command: String,
    /// The file the command writes into `{out}` (compare, bench, validate, demo: its folder).
    #[serde(default)]
    pub(crate) output: Option<String>,
    /// The reduced form run by `report smoke` (fast experiments).
    #[serde(default)]
    pub(crate) ci: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct CriterionCell {
    pub(crate) id: String,
    pub(crate) row: String,
    pub(crate) column: String,
}

/// `docs/results/NAME.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Kept {
    pub(crate) name: String,
    pub(crate) kind: Kind,
    pub(crate) provenance: Provenance,
    /// Captured output, one per run of the list (absent in a one-off record).
    #[serde(default)]
    pub(crate) runs: Vec<KeptRun>,
    /// Figures kept as they were published, when their raw output is gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) one_off: Option<OneOff>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Provenance {
    /// UTC date of the run (YYYY-MM-DD).
    pub(crate) date: String,
    /// `git describe`-like: short commit, `-dirty` when the tree had changes, or a sentence
    /// when it was not recorded.
    pub(crate) commit: String,
    /// Cores and load average.
    pub(crate) machine: String,
    /// Wall-clock seconds of the whole experiment (absent when not measured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) seconds: Option<f64>,
    /// How the record came to be when not by `report run` (imported output of an earlier run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) note: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct KeptRun {
    pub(crate) key: String,
    pub(crate) command: String,
    pub(crate) data: Value,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct OneOff {
    /// The command that produced the figures.
    pub(crate) command: String,
    /// Where the figures were copied from.
    pub(crate) source: String,
    pub(crate) columns: Vec<String>,
    pub(crate) rows: Vec<Vec<String>>,
    #[serde(default)]
    pub(crate) notes: Vec<String>,
}

pub fn run(args: &ReportArgs) -> anyhow::Result<()> {
    let root = match &args.root {
        Some(r) => r.clone(),
        None => find_root()?,
    };
    let list = load_list(&root)?;
    match &args.action {
        Action::List => {
            for e in &list.experiment {
                let kept = load_kept(&root, &e.name).ok();
                let record = kept.as_ref().map_or("no kept JSON".to_owned(), |k| {
                    format!(
                        "{}, {}{}",
                        k.provenance.date,
                        k.provenance.commit,
                        if k.one_off.is_some() { ", one-off" } else { "" }
                    )
                });
                println!(
                    "{:<22} {:<12} {RESULTS_DIR}/{}.json ({record})",
                    e.name,
                    e.kind.name(),
                    e.name
                );
            }
            Ok(())
        }
        Action::Run { names, kind, seeds } => {
            let chosen = choose(&list, names, kind.as_deref())?;
            for e in chosen {
                let kept = run_experiment(&root, e, seeds.as_deref(), Stage::Full, None)?;
                let path = root.join(RESULTS_DIR).join(format!("{}.json", e.name));
                crate::write_output(&path, serde_json::to_string_pretty(&kept)? + "\n")?;
            }
            write_tables(&root, &list, false)
        }
        Action::Tables => write_tables(&root, &list, true),
        Action::Import {
            name,
            files,
            date,
            commit,
            machine,
            note,
            commands,
        } => {
            let e = choose(&list, std::slice::from_ref(name), None)?
                .into_iter()
                .next()
                .context("no experiment")?;
            if files.len() != e.run.len() {
                bail!("`{name}` has {} runs: give one file each", e.run.len());
            }
            if !commands.is_empty() && commands.len() != e.run.len() {
                bail!(
                    "`{name}` has {} runs: give one --command each, or none",
                    e.run.len()
                );
            }
            let mut runs = Vec::new();
            for (i, (r, file)) in e.run.iter().zip(files).enumerate() {
                let file = std::fs::canonicalize(file)
                    .with_context(|| format!("{}: not found", file.display()))?;
                let spec = RunSpec {
                    output: Some(file.display().to_string()),
                    ..r.clone()
                };
                let data = render::capture(&root, e, &spec, &root)?;
                runs.push(KeptRun {
                    key: r.key.clone(),
                    command: commands
                        .get(i)
                        .cloned()
                        .unwrap_or_else(|| r.command.clone()),
                    data,
                });
            }
            let kept = Kept {
                name: e.name.clone(),
                kind: e.kind,
                provenance: Provenance {
                    date: date.clone(),
                    commit: commit.clone(),
                    machine: machine.clone(),
                    seconds: None,
                    note: Some(note.clone()),
                },
                runs,
                one_off: None,
            };
            let path = root.join(RESULTS_DIR).join(format!("{}.json", e.name));
            crate::write_output(&path, serde_json::to_string_pretty(&kept)? + "\n")?;
            write_tables(&root, &list, false)
        }
        Action::Check => {
            let drift = check(&root, &list)?;
            if drift.is_empty() {
                println!(
                    "report check: every table, plot and doc region matches its kept JSON ({} experiments)",
                    list.experiment.len()
                );
                Ok(())
            } else {
                for d in &drift {
                    println!("drift: {d}");
                }
                bail!(
                    "{} generated file(s) differ from their kept JSON: run `qosroute report tables` (never edit them by hand)",
                    drift.len()
                )
            }
        }
        Action::Smoke { out } => {
            let out = match out {
                Some(o) => o.clone(),
                None => std::env::temp_dir()
                    .join(format!("qosroute-report-smoke-{}", std::process::id())),
            };
            std::fs::create_dir_all(&out)
                .with_context(|| format!("{}: cannot create", out.display()))?;
            let started = Instant::now();
            for e in list.experiment.iter().filter(|e| e.kind == Kind::Fast) {
                let kept = run_experiment(&root, e, None, Stage::Smoke, Some(&out))?;
                let files = render::render(e, &kept, &out)?;
                for (name, text) in files.text {
                    crate::write_output(&out.join(name), text)?;
                }
            }
            println!(
                "report smoke: the reduced form of every fast experiment ran in {:.1} s ({})",
                started.elapsed().as_secs_f64(),
                out.display()
            );
            Ok(())
        }
    }
}

fn choose<'a>(
    list: &'a List,
    names: &[String],
    kind: Option<&str>,
) -> anyhow::Result<Vec<&'a Experiment>> {
    if !names.is_empty() {
        return names
            .iter()
            .map(|n| {
                list.experiment
                    .iter()
                    .find(|e| &e.name == n)
                    .with_context(|| format!("no experiment `{n}` in {LIST}"))
            })
            .collect();
    }
    let kind = Kind::parse(kind.unwrap_or("fast"))?;
    Ok(list.experiment.iter().filter(|e| e.kind == kind).collect())
}

/// The workspace root: the nearest folder upwards holding the experiment list.
fn find_root() -> anyhow::Result<PathBuf> {
    let mut dir = std::env::current_dir().context("no current folder")?;
    loop {
        if dir.join(LIST).is_file() {
            return Ok(dir);
        }
        if !dir.pop() {
            bail!("{LIST} not found here or above: run from the workspace or pass --root");
        }
    }
}

pub(crate) fn load_list(root: &Path) -> anyhow::Result<List> {
    let path = root.join(LIST);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let list: List =
        toml::from_str(&text).with_context(|| format!("{}: not a valid list", path.display()))?;
    let mut seen = std::collections::BTreeSet::new();
    for e in &list.experiment {
        if !seen.insert(&e.name) {
            bail!("{}: experiment `{}` twice", path.display(), e.name);
        }
        if e.render != Render::OneOff && e.run.is_empty() {
            bail!("{}: experiment `{}` has no run", path.display(), e.name);
        }
    }
    Ok(list)
}

pub(crate) fn load_kept(root: &Path, name: &str) -> anyhow::Result<Kept> {
    let path = root.join(RESULTS_DIR).join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "{}: cannot read (run `qosroute report run {name}`)",
            path.display()
        )
    })?;
    serde_json::from_str(&text).with_context(|| format!("{}: not a kept record", path.display()))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Full,
    Smoke,
}

/// Runs every command of an experiment (its `ci` form in a smoke run) and captures what they
/// wrote.
fn run_experiment(
    root: &Path,
    e: &Experiment,
    seeds: Option<&str>,
    stage: Stage,
    scratch: Option<&Path>,
) -> anyhow::Result<Kept> {
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let bin_dir = exe
        .parent()
        .context("this executable has no folder")?
        .to_path_buf();
    let path_var = match std::env::var_os("PATH") {
        Some(p) => {
            let mut dirs = vec![bin_dir.clone()];
            dirs.extend(std::env::split_paths(&p));
            std::env::join_paths(dirs).context("PATH")?
        }
        None => bin_dir.clone().into_os_string(),
    };
    let seeds = seeds.or(e.seeds.as_deref()).unwrap_or("1");
    let load_before = load_average();
    // The tree the experiment starts from (commits made while it runs do not count).
    let commit_at_start = commit(root);
    let started = Instant::now();
    let mut runs = Vec::new();
    let mut already_ran: Vec<String> = Vec::new();
    for r in &e.run {
        let template = match stage {
            Stage::Full => r.command.as_str(),
            Stage::Smoke => match &r.ci {
                Some(c) => c.as_str(),
                None => bail!(
                    "fast experiment `{}` run `{}` has no `ci` form",
                    e.name,
                    r.key
                ),
            },
        };
        let out = match scratch {
            Some(s) => s.join(&e.name).join(&r.key),
            None => std::env::temp_dir().join(format!(
                "qosroute-report-{}-{}-{}",
                std::process::id(),
                e.name,
                r.key
            )),
        };
        std::fs::create_dir_all(&out)
            .with_context(|| format!("{}: cannot create", out.display()))?;
        let command = template.replace("{seeds}", seeds);
        let shown = command.replace("{out}", "OUT");
        let concrete = command.replace("{out}", &out.display().to_string());
        if already_ran.contains(&concrete) {
            eprintln!("report: {} / {}: {shown} (ran above)", e.name, r.key);
        } else {
            eprintln!("report: {} / {}: {shown}", e.name, r.key);
            run_command(root, &concrete, &shown, &path_var)
                .with_context(|| format!("{} / {}", e.name, r.key))?;
            already_ran.push(concrete);
        }
        let data = render::capture(root, e, r, &out)?;
        runs.push(KeptRun {
            key: r.key.clone(),
            command: shown,
            data,
        });
    }
    Ok(Kept {
        name: e.name.clone(),
        kind: e.kind,
        provenance: Provenance {
            date: today(),
            commit: commit_at_start,
            machine: machine(load_before),
            seconds: Some((started.elapsed().as_secs_f64() * 10.0).round() / 10.0),
            note: None,
        },
        runs,
        one_off: None,
    })
}

fn run_command(
    root: &Path,
    concrete: &str,
    shown: &str,
    path_var: &std::ffi::OsStr,
) -> anyhow::Result<()> {
    let status = Command::new("bash")
        .arg("-euo")
        .arg("pipefail")
        .arg("-c")
        .arg(concrete)
        .current_dir(root)
        .env("PATH", path_var)
        .status()
        .with_context(|| format!("cannot start bash for `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

/// Draws every experiment's files and writes those that changed; fills the docs' regions.
/// After `run` and `import`, experiments not yet kept are skipped (their doc regions stay as
/// they are); `tables` and `check` want every one.
fn write_tables(root: &Path, list: &List, strict: bool) -> anyhow::Result<()> {
    let scratch = std::env::temp_dir().join(format!("qosroute-report-svg-{}", std::process::id()));
    let expected = expected_files(root, list, &scratch, strict)?;
    for (path, contents) in expected {
        let old = std::fs::read(&path).ok();
        if old.as_deref() != Some(contents.as_slice()) {
            crate::prepare_output(&path)?;
            std::fs::write(&path, &contents)
                .with_context(|| format!("{}: cannot write", path.display()))?;
            eprintln!("wrote {}", path.display());
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(())
}

/// Every generated file (tables, plots, docs with their regions filled) as its JSON gives it.
fn expected_files(
    root: &Path,
    list: &List,
    scratch: &Path,
    strict: bool,
) -> anyhow::Result<Vec<(PathBuf, Vec<u8>)>> {
    std::fs::create_dir_all(scratch)
        .with_context(|| format!("{}: cannot create", scratch.display()))?;
    let mut files = Vec::new();
    let mut headlines = BTreeMap::new();
    let mut index = String::from(render::INDEX_HEAD);
    for e in &list.experiment {
        let kept = match load_kept(root, &e.name) {
            Ok(k) => k,
            Err(err) if !strict => {
                eprintln!("report: skipping `{}`: {err:#}", e.name);
                continue;
            }
            Err(err) => return Err(err),
        };
        let drawn = render::render(e, &kept, scratch)?;
        for (name, text) in drawn.text {
            files.push((root.join(RESULTS_DIR).join(name), text.into_bytes()));
        }
        for name in drawn.svg {
            let bytes =
                std::fs::read(scratch.join(&name)).with_context(|| format!("{name}: not drawn"))?;
            files.push((root.join(RESULTS_DIR).join(name), bytes));
        }
        index.push_str(&render::index_line(e, &kept));
        headlines.insert(e.name.clone(), drawn.headline);
    }
    files.push((root.join(RESULTS_DIR).join("README.md"), index.into_bytes()));
    for doc in docs(root)? {
        let text = std::fs::read_to_string(&doc)
            .with_context(|| format!("{}: cannot read", doc.display()))?;
        let rel = doc.strip_prefix(root).unwrap_or(&doc).to_path_buf();
        if let Some(filled) = fill_regions(&text, &rel, &headlines, strict)? {
            files.push((doc, filled.into_bytes()));
        }
    }
    Ok(files)
}

fn check(root: &Path, list: &List) -> anyhow::Result<Vec<String>> {
    let scratch =
        std::env::temp_dir().join(format!("qosroute-report-check-{}", std::process::id()));
    let expected = expected_files(root, list, &scratch, true)?;
    let _ = std::fs::remove_dir_all(&scratch);
    let mut drift = Vec::new();
    for (path, contents) in expected {
        let shown = path
            .strip_prefix(root)
            .unwrap_or(&path)
            .display()
            .to_string();
        match std::fs::read(&path) {
            Ok(old) if old == contents => {}
            Ok(_) => drift.push(format!("{shown} differs from what its JSON gives")),
            Err(_) => drift.push(format!("{shown} is missing")),
        }
    }
    Ok(drift)
}

/// Markdown files that may hold regions.
fn docs(root: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for d in DOCS {
        let path = root.join(d);
        if path.is_dir() {
            walk(&path, &mut out)?;
        } else if path.is_file() {
            out.push(path);
        }
    }
    let results = root.join(RESULTS_DIR);
    out.retain(|p| !p.starts_with(&results));
    out.sort();
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for entry in
        std::fs::read_dir(dir).with_context(|| format!("{}: cannot list", dir.display()))?
    {
        let path = entry?.path();
        if path.is_dir() {
            walk(&path, out)?;
        } else if path.extension().is_some_and(|x| x == "md") {
            out.push(path);
        }
    }
    Ok(())
}

/// The document with every `<!-- report:NAME -->` ... `<!-- /report:NAME -->` region holding
/// NAME's headline table and a link to its page; `None` when it has no region.
fn fill_regions(
    text: &str,
    rel: &Path,
    headlines: &BTreeMap<String, String>,
    strict: bool,
) -> anyhow::Result<Option<String>> {
    const OPEN: &str = "<!-- report:";
    if !text.contains(OPEN) {
        return Ok(None);
    }
    let depth = rel.parent().map_or(0, |p| p.components().count());
    let up = "../".repeat(depth);
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find(OPEN) {
        let after_open = &rest[start + OPEN.len()..];
        let Some(end_name) = after_open.find(" -->") else {
            bail!("{}: unterminated `{OPEN}`", rel.display());
        };
        let name = &after_open[..end_name];
        let close = format!("<!-- /report:{name} -->");
        let Some(close_at) = after_open.find(&close) else {
            bail!("{}: `{OPEN}{name} -->` has no `{close}`", rel.display());
        };
        let region_end = start + OPEN.len() + close_at + close.len();
        let Some(headline) = headlines.get(name) else {
            if strict {
                bail!("{}: region of unknown experiment `{name}`", rel.display());
            }
            out.push_str(&rest[..region_end]);
            rest = &rest[region_end..];
            continue;
        };
        out.push_str(&rest[..start]);
        out.push_str(&format!("{OPEN}{name} -->\n"));
        out.push_str(&headline.replace("](NAME.", &format!("]({up}{RESULTS_DIR}/{name}.")));
        out.push_str(&close);
        rest = &after_open[close_at + close.len()..];
    }
    out.push_str(rest);
    Ok(Some(out))
}

fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn machine(load_before: Option<f64>) -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    match (load_before, load_average()) {
        (Some(a), Some(b)) => {
            format!("{cores} cores, load average {a:.2} at the start, {b:.2} at the end")
        }
        _ => format!("{cores} cores, load not read"),
    }
}

fn commit(root: &Path) -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(root)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    match git(&["rev-parse", "--short=7", "HEAD"]) {
        Some(head) => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            if dirty { format!("{head}-dirty") } else { head }
        }
        None => "unknown (not a git checkout)".to_owned(),
    }
}

/// Today's UTC date, YYYY-MM-DD (civil from days since 1970, Howard Hinnant's algorithm).
fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_are_filled_with_relative_links() {
        let mut h = BTreeMap::new();
        h.insert("x".to_owned(), "| a |\n\n[more](NAME.md)\n".to_owned());
        let text = "intro\n<!-- report:x -->\nold\n<!-- /report:x -->\nend\n";
        let filled = fill_regions(text, Path::new("docs/page.md"), &h, true)
            .unwrap()
            .unwrap();
        assert_eq!(
            filled,
            "intro\n<!-- report:x -->\n| a |\n\n[more](../docs/results/x.md)\n<!-- /report:x -->\nend\n"
        );
        assert!(
            fill_regions("no region", Path::new("README.md"), &h, true)
                .unwrap()
                .is_none()
        );
        let unknown = "a <!-- report:y -->\nold\n<!-- /report:y --> b";
        assert!(fill_regions(unknown, Path::new("README.md"), &h, true).is_err());
        assert_eq!(
            fill_regions(unknown, Path::new("README.md"), &h, false)
                .unwrap()
                .unwrap(),
            unknown
        );
    }

    #[test]
    fn today_is_a_date() {
        let d = today();
        assert_eq!(d.len(), 10);
        assert!(d.starts_with("20"));
    }
}
