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


def test_padding_does_not_change_the_real_logits():
    """A graph padded with masked experts, running and waiting nodes scores its real actions
    exactly as the unpadded graph: the padding is invisible to the network."""
    torch.manual_seed(1)
    model = HanRouter(sizes()["request"], sizes()["expert"], sizes()["in_flight"]).eval()
    obs = observations(steps=45, envs=1)[-1]
    e = obs["expert"].shape[1]
    batch, e_pad = train.collate([obs, *observations(steps=45, envs=3, seed=9)[-1:]])
    with torch.no_grad():
        alone, _ = model(*train.to_tensors(obs))
        padded, _ = model(*[torch.from_numpy(batch[n][:1]) for n in INPUT_NAMES])
    real = list(range(e)) + [e_pad]  # experts, then reject (moved to the last column)
    assert e_pad >= e
    np.testing.assert_allclose(padded[0, real].numpy(), alone[0].numpy(), rtol=0, atol=1e-5)


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
    train.main(["--arch", arch, "--total-steps", "512", "--num-envs", "4", "--num-steps", "64", "--episode-requests", "40",
                "--bc-rollouts", "1", "--bc-epochs", "2", "--eval-every", "0", "--eval-requests", "40",
                "--out", str(out)])
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
        train.main(["--seed", str(seed), "--total-steps", "512", "--num-envs", "4", "--num-steps", "64",
                    "--episode-requests", "40", "--bc-rollouts", "1", "--bc-epochs", "2", "--eval-every", "0",
                    "--eval-requests", "40", "--out", str(out)])
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
