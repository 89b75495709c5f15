import json
import os

import numpy as np
import pytest
import torch

import qosroute_simenv as simenv
from qosroute_policy import train
from qosroute_policy.export import TRACT_OPS, ops_of
from qosroute_policy.han import INPUT_NAMES, FlatMlpRouter, HanRouter

CATALOGUES = ["configs/experts/paper-3x7b.toml", "configs/experts/edge-mixed.toml"]
# A tiny run of the whole recipe: one DAgger iteration on a cheap planner, two PPO rollouts.
TINY = ["--total-steps", "256", "--num-envs", "4", "--episode-requests", "32", "--dagger-iterations", "1",
        "--dagger-epochs", "1", "--planner", "qos-planner:k=2,h=2,min_futures=1", "--eval-every", "0",
        "--eval-requests", "40"]


def observations(steps=60, envs=4, seed=3):
    env = simenv.SimEnv(CATALOGUES, envs=envs, seed=seed, episode_requests=80, load_min=1.0, load_max=3.0)
    out = []
    for _ in range(steps):
        obs = env.observe()
        out.append(obs)
        env.step(obs["qos_greedy_action"].astype(np.int64))
    return out


def sizes():
    return simenv.feature_sizes()


@pytest.mark.parametrize("arch", [HanRouter, FlatMlpRouter])
def test_logits_are_masked_and_values_finite(arch):
    torch.manual_seed(0)
    model = arch(sizes()["request"], sizes()["expert"], sizes()["in_flight"])
    obs = observations(steps=30)[-1]
    logits, value = model(*train.to_tensors(obs))
    k, e = obs["expert"].shape[:2]
    assert logits.shape == (k, e + 1)
    assert value.shape == (k,)
    mask = torch.from_numpy(obs["action_mask"])
    assert torch.all(logits[mask == 0] < -1e8)
    assert torch.all(torch.isfinite(logits[mask == 1]))
    assert torch.all(torch.isfinite(value))


@pytest.mark.parametrize("arch", [HanRouter, FlatMlpRouter])
def test_padding_does_not_change_the_real_logits(arch):
    """A graph padded with masked experts, running and waiting nodes scores its real actions
    exactly as the unpadded graph, for both architectures: the padding is invisible to the
    network (the MLP's means of in-flight nodes are over real nodes only)."""
    torch.manual_seed(1)
    model = arch(sizes()["request"], sizes()["expert"], sizes()["in_flight"]).eval()
    obs = observations(steps=45, envs=1)[-1]
    e = obs["expert"].shape[1]
    other = observations(steps=45, envs=3, seed=9)[-1]
    batch, e_pad = train.collate([obs, other])
    assert batch["running"].shape[1] > obs["running"].shape[1] or batch["waiting"].shape[1] > obs["waiting"].shape[1]
    with torch.no_grad():
        alone, _ = model(*train.to_tensors(obs))
        padded, _ = model(*[torch.from_numpy(batch[n][:1]) for n in INPUT_NAMES])
    real = list(range(e)) + [e_pad]  # experts, then reject (moved to the last column)
    assert e_pad >= e
    np.testing.assert_allclose(padded[0, real].numpy(), alone[0].numpy(), rtol=0, atol=1e-5)


def test_advantages_bootstrap_a_cut_episode_with_the_last_value():
    """Hand-computed GAE: gamma 0.5, lambda 1; the step after the last is valued V(s_last)."""
    rewards = np.array([[1.0], [0.0]], dtype=np.float32)
    values = np.array([[0.5], [0.2]], dtype=np.float32)
    adv = train.advantages_of(rewards, values, gamma=0.5, lam=1.0)
    # t=1: 0 + 0.5*0.2 - 0.2 = -0.1; t=0: 1 + 0.5*0.2 - 0.5 + 0.5*(-0.1) = 0.55
    np.testing.assert_allclose(adv[:, 0], [0.55, -0.1], rtol=1e-6)
    returns = train.discounted_returns(rewards, 0.5, np.array([0.4]))
    np.testing.assert_allclose(returns[:, 0], [1.0 + 0.5 * 0.2, 0.2], rtol=1e-6)


def test_each_decision_is_credited_with_its_own_requests_qos():
    """The env's credits are the realised QoS of each request in decision order: they add up to
    the episode's average QoS times its requests, and arrive only when the episode ends."""
    env = simenv.SimEnv(CATALOGUES, envs=2, seed=4, episode_requests=50, load_min=1.0, load_max=2.0)
    for t in range(50):
        obs = env.observe()
        out = env.step(obs["qos_greedy_action"].astype(np.int64))
        for i in range(2):
            assert (out["credits"][i] is not None) == (t == 49)
    for i in range(2):
        credits = out["credits"][i]
        assert credits.shape == (50,)
        assert np.all((credits >= 0) & (credits <= 1))
        assert abs(credits.mean() - out["episode_avg_qos"][i]) < 1e-5
    rewards = train.credited_rewards(np.array([0.8, 0.0]), np.array([0.1, 0.3]), impact_penalty=True)
    np.testing.assert_allclose(rewards, [0.7, -0.3])


def test_planner_labels_reach_python_padded_like_the_mask():
    env = simenv.SimEnv(CATALOGUES, envs=3, seed=2, episode_requests=40, load_min=1.5, load_max=3.0)
    env.set_planner("qos-planner:k=4,h=5,min_futures=1", 1)
    for _ in range(20):
        obs = env.observe()
        env.step(obs["planner_action"].astype(np.int64))
    batch, e = train.collate([obs])
    k = obs["expert"].shape[0]
    for i in range(k):
        chosen = batch["planner_action"][i]
        assert batch["action_mask"][i, chosen] == 1.0
        assert not np.isnan(batch["planner_gain"][i, chosen])
        assert batch["planner_gain"][i, batch["qos_greedy_action"][i]] == 0.0


def test_collate_moves_reject_and_teacher_to_the_last_column():
    obs = observations(steps=40, envs=3)
    batch, e_max = train.collate(obs)
    assert batch["action_mask"].shape[1] == e_max + 1
    assert np.all(batch["action_mask"][:, e_max] == 1.0)
    assert np.all(batch["qos_greedy_action"] <= e_max)
    allowed = batch["action_mask"][np.arange(len(batch["qos_greedy_action"])), batch["qos_greedy_action"]]
    assert np.all(allowed == 1.0), "qos-greedy only takes allowed actions"
    acts = np.array([obs[0]["expert"].shape[1]] * 3)
    assert np.all(train.remap_actions(acts, obs[0]["expert"].shape[1], e_max) == e_max)


@pytest.mark.parametrize("arch", ["han", "mlp"])
def test_training_smoke_run_writes_a_model_tract_can_run(tmp_path, arch):
    out = tmp_path / "model"
    train.main(["--arch", arch, *TINY, "--out", str(out)])
    for name in ["model.pt", "router-f32.onnx", "router-int8.onnx", "golden.json", "report.json", "curves.png", "REPORT.md"]:
        assert (out / name).exists(), name
    report = json.loads((out / "report.json").read_text())
    assert report["export"]["f32"]["onnxruntime_max_abs_diff"] < 1e-4
    assert len(report["final_eval"]) == 5
    for variant in ["router-f32.onnx", "router-int8.onnx"]:
        assert set(ops_of(str(out / variant))) <= TRACT_OPS
    golden = json.loads((out / "golden.json").read_text())
    assert len(golden["cases"]) >= 8


def test_training_is_reproducible_from_its_seed(tmp_path):
    """The same seed gives the same weights, bit for bit (one torch thread, seeded simulator),
    and another seed gives other weights: `qosroute train --seed N` is a reproducible recipe."""
    def weights(seed, name):
        out = tmp_path / name
        train.main(["--seed", str(seed), *TINY, "--out", str(out)])
        return torch.load(out / "model.pt")

    first, again, other = weights(3, "a"), weights(3, "b"), weights(4, "c")
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_rewards_from_the_rust_env_without_the_penalty_are_never_lower():
    env = simenv.SimEnv(CATALOGUES, envs=4, seed=5, episode_requests=60, load_min=2.0, load_max=3.0)
    for _ in range(80):
        obs = env.observe()
        out = env.step(obs["qos_greedy_action"].astype(np.int64))
        assert np.all(out["predicted_qos_destroyed"] >= 0)
        assert not np.any(out["invalid"])
