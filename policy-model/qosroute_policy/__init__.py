"""qosroute_policy: the learned router (HAN + PPO), trained against the Rust simulator."""
