//! The configuration's unit tests.

use super::*;

fn example() -> String {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    std::fs::read_to_string(format!("{root}/configs/qosrouted.example.toml"))
        .unwrap()
        .replace(
            "model_dir = \"policy-model/models/han\"",
            &format!("model_dir = \"{root}/policy-model/models/han\""),
        )
}

/// The keys of the problems `validate` finds in `text`.
fn problem_keys(text: &str) -> Vec<String> {
    Config::parse(text, "x")
        .unwrap()
        .validate()
        .into_iter()
        .map(|p| p.key)
        .collect()
}

#[test]
fn the_example_config_is_valid() {
    let c = Config::parse(&example(), "example").unwrap();
    assert_eq!(c.validate(), Vec::new());
    assert_eq!(c.experts.len(), 2);
    assert_eq!(c.request_filter(), "qosroute/v1/lab/req/#");
    assert!(c.model_file().unwrap().ends_with("router-f32.onnx"));
    assert_eq!(c.profiles()[1].model, "qwen25_7b");
    assert_eq!(c.calibration, CalibrationConfig::default());
    assert_eq!(
        c.calibration.settings(),
        qosroute_core::CalibratorSettings::default()
    );
}

#[test]
fn the_planner_is_checked_and_excludes_a_learned_model() {
    let with = |line: &str| {
        let text = example().replace("fallback = \"qos-greedy\"", line);
        Config::parse(&text, "planner").unwrap().validate()
    };
    // The example has a model_dir: a planner beside it is refused.
    let problems = with("planner = \"qos-planner\"\nfallback = \"qos-greedy\"");
    assert!(
        problems
            .iter()
            .any(|p| p.key == "policy.planner" && p.message.contains("model_dir")),
        "{problems:?}"
    );
    let without_model = || {
        example()
            .lines()
            .filter(|l| !l.starts_with("model_dir"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let text = without_model().replace(
        "fallback = \"qos-greedy\"",
        "planner = \"qos-planner:k=0\"\nfallback = \"qos-planner\"",
    );
    let problems = Config::parse(&text, "planner").unwrap().validate();
    let said = |key: &str, what: &str| {
        problems
            .iter()
            .any(|p| p.key == key && p.message.contains(what))
    };
    assert!(
        said("policy.planner", "k (futures) must be at least 1"),
        "{problems:?}"
    );
    assert!(
        said("policy.fallback", "unknown policy"),
        "the planner is no fallback"
    );
    let text = without_model().replace(
        "fallback = \"qos-greedy\"",
        "planner = \"qos-planner:k=16,h=20\"\nfallback = \"qos-greedy\"",
    );
    let config = Config::parse(&text, "planner").unwrap();
    assert_eq!(config.validate(), Vec::new());
}

#[test]
fn every_problem_is_reported_with_its_key() {
    let text = example()
        .replace("site = \"lab\"", "site = \"a/b\"")
        .replace("url = \"mqtt://127.0.0.1:1883\"", "url = \"tcp://x\"")
        .replace("fallback = \"qos-greedy\"", "fallback = \"magic\"")
        .replace("max_in_flight = 512", "max_in_flight = 0")
        .replace("name = \"l4-qwen\"", "name = \"jetson-orin-llama\"")
        .replace(
            "base_url = \"http://10.0.0.20:8000\"",
            "base_url = \"10.0.0.20:8000\"",
        )
        .replace("prefill_tok_s = 5500.0", "prefill_tok_s = -1.0")
        .replace("mmlu = 0.71", "mmlu = 1.5")
        .replace("prior_weight = 10.0", "prior_weight = 0.0")
        .replace("kind = \"vllm\"", "kind = \"vllm\"\nhealth_timeout_s = 0.0")
        .replace("forgetting = 0.99", "forgetting = 1.5");
    let problems = Config::parse(&text, "bad").unwrap().validate();
    let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
    for key in [
        "site",
        "broker.url",
        "policy.fallback",
        "admission.max_in_flight",
        "expert[1].name",
        "expert[1].base_url",
        "expert[1].latency.prefill_tok_s",
        "expert[1].quality.mmlu",
        "calibration.prior_weight",
        "calibration.forgetting",
        "expert[1].health_timeout_s",
    ] {
        assert!(keys.contains(&key), "{key} missing from {keys:?}");
    }
    assert_eq!(problems.len(), 11, "{problems:?}");
}

#[test]
fn unknown_keys_and_type_errors_fail_the_parse_with_a_location() {
    let err = Config::parse(
        &example().replace("[admission]", "[admission]\nmax_inflight = 3"),
        "x",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("max_inflight"), "{err}");
    let err = Config::parse(
        &example().replace("max_slots = 4", "max_slots = \"four\""),
        "x",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("max_slots") || err.contains("line"), "{err}");
    assert!(
        Config::parse("site = \"x\"", "x").is_err(),
        "broker is required"
    );
}

#[test]
fn missing_model_and_unset_variables_are_problems() {
    let text = example().replace(
        "# username = \"qosrouted\"\n# password_env = \"QOSROUTE_MQTT_PASSWORD\"",
        "username = \"u\"\npassword_env = \"QOSROUTE_TEST_SURELY_UNSET_VARIABLE\"",
    );
    let mut c = Config::parse(&text, "x").unwrap();
    c.policy.model_dir = Some(PathBuf::from("/nonexistent"));
    let keys: Vec<String> = c.validate().into_iter().map(|p| p.key).collect();
    assert!(keys.contains(&"policy.model_dir".to_owned()), "{keys:?}");
    assert!(keys.contains(&"broker.password_env".to_owned()), "{keys:?}");
}

#[test]
fn a_local_experts_device_is_checked_and_resolved() {
    let c = Config::parse(&example(), "x").unwrap();
    assert_eq!(
        c.experts[0].host_device(),
        Some(HostDevice::Gpu(String::new()))
    );
    assert_eq!(c.experts[1].host_device(), None, "not local");
    let text = example()
        .replace("device = \"gpu\"", "device = \"tpu\"")
        .replace("host_busy_above = 0.9", "host_busy_above = 1.5");
    let keys = problem_keys(&text);
    assert!(keys.contains(&"expert[0].device".to_owned()), "{keys:?}");
    assert!(
        keys.contains(&"telemetry.host_busy_above".to_owned()),
        "{keys:?}"
    );
    let text = example().replace("local = true\n", "");
    let keys = problem_keys(&text);
    assert_eq!(
        keys,
        vec!["expert[0].device".to_owned()],
        "device needs local"
    );
    assert_eq!(
        HostDevice::parse("gpu:nvml1"),
        Some(HostDevice::Gpu("nvml1".into()))
    );
    assert_eq!(HostDevice::parse("cpu"), Some(HostDevice::Cpu));
    assert_eq!(HostDevice::parse("gpu:"), None);
}

#[test]
fn a_shadow_policy_must_name_a_policy() {
    let with = |shadow: &str| {
        let text = example().replace(
            "fallback = \"qos-greedy\"",
            &format!("shadow = \"{shadow}\"\nfallback = \"qos-greedy\""),
        );
        Config::parse(&text, "shadow")
            .unwrap()
            .validate()
            .into_iter()
            .filter(|p| p.key == "policy.shadow")
            .map(|p| p.message)
            .collect::<Vec<_>>()
    };
    assert!(with("least-loaded").is_empty());
    assert!(with("qos-planner:k=8").is_empty());
    assert!(with("han:/opt/models/candidate").is_empty());
    assert_eq!(with("nonsense").len(), 1, "{:?}", with("nonsense"));
    assert!(with("han:")[0].contains("folder"), "{:?}", with("han:"));
    assert!(
        with("qos-planner:k=0")[0].contains("k"),
        "{:?}",
        with("qos-planner:k=0")
    );
}
