//! `qosroute_simenv`: the Rust simulator as a Python module for training. It only converts:
//! the environment, scenarios and encoder are `qosroute_sim::training` and
//! `qosroute_core::encoder`.

use std::path::Path;
use std::sync::Arc;

use numpy::{PyArray1, PyArrayMethods, PyReadonlyArray1};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use qosroute_core::encoder::{EXPERT_FEATURES, IN_FLIGHT_FEATURES, REQUEST_FEATURES};
use qosroute_sim::training::{
    ObservationBatch, Scenario, ScenarioConfig, ScenarioSampler, ScenarioSource, VecEnv,
};
use qosroute_sim::{Catalogue, QualityTable, SimError, Simulation, generate};

fn err(e: SimError) -> PyErr {
    PyRuntimeError::new_err(e.to_string())
}

fn quality(path: Option<&str>) -> PyResult<Arc<QualityTable>> {
    let table = match path {
        Some(p) => QualityTable::load(Path::new(p)),
        None => QualityTable::embedded(),
    };
    table.map(Arc::new).map_err(err)
}

fn array<'py>(py: Python<'py>, data: &[f32], shape: &[usize]) -> PyResult<Bound<'py, PyAny>> {
    Ok(PyArray1::from_slice(py, data).reshape(shape)?.into_any())
}

/// K simulations stepped in lockstep; observations are dicts of float32 numpy arrays padded
/// to the largest graph in the batch.
#[pyclass(module = "qosroute_simenv")]
struct SimEnv {
    env: VecEnv,
    batch: ObservationBatch,
}

#[pymethods]
impl SimEnv {
    /// A training environment: every episode a random subset of one of `catalogues`, a
    /// Poisson, bursty or conv-trace workload of `episode_requests` at a load drawn
    /// log-uniformly from [load_min, load_max] times the estimated capacity.
    #[new]
    /// Half the episodes (`random_catalogue_share`) play a random catalogue of
    /// `min_experts..=max_experts` pooled profiles; trace segments come from the trace's first
    /// 40 minutes only.
    #[pyo3(signature = (catalogues, envs, seed, episode_requests=256, load_min=0.2, load_max=3.0, min_experts=2, max_experts=12, random_catalogue_share=0.5, quality_csv=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        catalogues: Vec<String>,
        envs: usize,
        seed: u64,
        episode_requests: usize,
        load_min: f64,
        load_max: f64,
        min_experts: usize,
        max_experts: usize,
        random_catalogue_share: f64,
        quality_csv: Option<&str>,
    ) -> PyResult<Self> {
        let catalogues = catalogues
            .iter()
            .map(|p| Catalogue::load(Path::new(p)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(err)?;
        let config = ScenarioConfig {
            episode_requests,
            load_min,
            load_max,
            min_experts,
            max_experts,
            random_catalogue_share,
            ..ScenarioConfig::default()
        };
        let sampler =
            ScenarioSampler::new(catalogues, quality(quality_csv)?, config).map_err(err)?;
        let env = VecEnv::new(ScenarioSource::Sampled(sampler), envs, seed).map_err(err)?;
        Ok(Self {
            env,
            batch: ObservationBatch::default(),
        })
    }

    /// An evaluation environment: one env per `(catalogue path, workload spec, seed)`, each
    /// played once.
    #[staticmethod]
    #[pyo3(signature = (scenarios, quality_csv=None))]
    fn fixed(scenarios: Vec<(String, String, u64)>, quality_csv: Option<&str>) -> PyResult<Self> {
        let quality = quality(quality_csv)?;
        let scenarios = scenarios
            .into_iter()
            .map(|(catalogue, spec, seed)| {
                Ok(Scenario {
                    catalogue: Catalogue::load(Path::new(&catalogue)).map_err(err)?,
                    workload: generate(&spec, &quality, seed).map_err(err)?,
                    seed,
                    load: f64::NAN,
                })
            })
            .collect::<PyResult<Vec<_>>>()?;
        let env = VecEnv::new(ScenarioSource::Fixed { scenarios, quality }, 0, 0).map_err(err)?;
        Ok(Self {
            env,
            batch: ObservationBatch::default(),
        })
    }

    /// Labels every state with `qos-planner` of this spec (e.g. `qos-planner:k=16,h=20`;
    /// seeded per env from `seed`), or stops with `None`: observations then carry
    /// `planner_action [K]` and `planner_gain [K, E + 1]` (NaN where not valued).
    #[pyo3(signature = (spec, seed=0))]
    fn set_planner(&mut self, spec: Option<&str>, seed: u64) -> PyResult<()> {
        self.env
            .set_planner(spec, seed)
            .map_err(|e| PyValueError::new_err(e.to_string()))
    }

    /// Steps the environments on up to `threads` threads (the simulator runs outside
    /// Python's lock while stepping).
    fn set_threads(&mut self, threads: usize) {
        self.env.set_threads(threads);
    }

    /// Number of environments.
    #[getter]
    fn envs(&self) -> usize {
        self.env.envs()
    }

    /// Whether every fixed scenario has been played to the end.
    fn all_finished(&self) -> bool {
        self.env.all_finished()
    }

    /// The current observations: `request [K, FR]`, `expert [K, E, FE]`,
    /// `running [K, R, FI]`, `waiting [K, W, FI]`, `running_adj [K, E, R]`,
    /// `waiting_adj [K, E, W]`, `expert_valid [K, E]`, `action_mask [K, E + 1]`.
    fn observe<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        self.env.observe(&mut self.batch);
        let b = &self.batch;
        let (k, e, r, w) = (b.envs, b.experts, b.running, b.waiting);
        let d = PyDict::new(py);
        d.set_item("request", array(py, &b.request, &[k, REQUEST_FEATURES])?)?;
        d.set_item("expert", array(py, &b.expert, &[k, e, EXPERT_FEATURES])?)?;
        d.set_item(
            "running",
            array(py, &b.running_nodes, &[k, r, IN_FLIGHT_FEATURES])?,
        )?;
        d.set_item(
            "waiting",
            array(py, &b.waiting_nodes, &[k, w, IN_FLIGHT_FEATURES])?,
        )?;
        d.set_item("running_adj", array(py, &b.running_adj, &[k, e, r])?)?;
        d.set_item("waiting_adj", array(py, &b.waiting_adj, &[k, e, w])?)?;
        d.set_item("expert_valid", array(py, &b.expert_valid, &[k, e])?)?;
        d.set_item("action_mask", array(py, &b.action_mask, &[k, e + 1])?)?;
        d.set_item(
            "qos_greedy_action",
            PyArray1::from_slice(py, &b.qos_greedy_action),
        )?;
        d.set_item(
            "planner_action",
            PyArray1::from_slice(py, &b.planner_action),
        )?;
        d.set_item("planner_gain", array(py, &b.planner_gain, &[k, e + 1])?)?;
        Ok(d)
    }

    /// Applies one action per env (index into the last observation's padded expert axis;
    /// `E` = reject). Returns `rewards`, `dones`, `episode_avg_qos` (NaN unless done) and
    /// `invalid`, `predicted_qos_destroyed`, and `credits`: per env, None, or at the end of its
    /// episode the realised QoS of each request in decision order.
    fn step<'py>(
        &mut self,
        py: Python<'py>,
        actions: PyReadonlyArray1<'py, i64>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let actions = actions.as_slice()?;
        if actions.len() != self.env.envs() {
            return Err(PyValueError::new_err(format!(
                "{} actions for {} environments",
                actions.len(),
                self.env.envs()
            )));
        }
        let actions = actions.to_vec();
        let experts = self.batch.experts;
        let env = &mut self.env;
        let out = py.detach(|| env.step(&actions, experts)).map_err(err)?;
        let d = PyDict::new(py);
        d.set_item("rewards", PyArray1::from_slice(py, &out.rewards))?;
        d.set_item("dones", PyArray1::from_slice(py, &out.dones))?;
        d.set_item(
            "episode_avg_qos",
            PyArray1::from_slice(py, &out.episode_avg_qos),
        )?;
        d.set_item("invalid", PyArray1::from_slice(py, &out.invalid))?;
        d.set_item(
            "predicted_qos_destroyed",
            PyArray1::from_slice(py, &out.predicted_qos_destroyed),
        )?;
        let credits = out
            .credits
            .iter()
            .map(|c| match c {
                Some(c) => Ok(PyArray1::from_slice(py, c).into_any()),
                None => Ok(py.None().into_bound(py)),
            })
            .collect::<PyResult<Vec<_>>>()?;
        d.set_item("credits", credits)?;
        Ok(d)
    }
}

/// Average QoS of a baseline policy on one scenario (same workload and seed as `fixed`).
#[pyfunction]
#[pyo3(signature = (catalogue, workload, seed, policy, quality_csv=None))]
fn baseline_avg_qos(
    catalogue: &str,
    workload: &str,
    seed: u64,
    policy: &str,
    quality_csv: Option<&str>,
) -> PyResult<f64> {
    let quality = quality(quality_csv)?;
    let catalogue = Catalogue::load(Path::new(catalogue)).map_err(err)?;
    let workload = generate(workload, &quality, seed).map_err(err)?;
    let mut p =
        qosroute_core::baseline(policy, seed).map_err(|e| PyValueError::new_err(e.to_string()))?;
    let report = Simulation::new(&catalogue, &quality, &workload, seed)
        .map_err(err)?
        .run(&mut p)
        .map_err(err)?;
    Ok(report.avg_qos)
}

/// Feature widths of the node types.
#[pyfunction]
fn feature_sizes(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("request", REQUEST_FEATURES)?;
    d.set_item("expert", EXPERT_FEATURES)?;
    d.set_item("in_flight", IN_FLIGHT_FEATURES)?;
    Ok(d)
}

#[pymodule]
fn qosroute_simenv(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<SimEnv>()?;
    m.add_function(wrap_pyfunction!(baseline_avg_qos, m)?)?;
    m.add_function(wrap_pyfunction!(feature_sizes, m)?)?;
    Ok(())
}
