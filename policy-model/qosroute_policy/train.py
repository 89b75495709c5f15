"""PPO training of the learned router against the Rust simulator (CleanRL-style, one file).

Read top to bottom: hyper-parameters, environment, rollout, advantages, update, evaluation,
outputs. Run from the repository root:

    python -m qosroute_policy.train --total-steps 300000 --out policy-model/models/han

The environment is `qosroute_simenv.SimEnv` (the Rust simulator through PyO3): each episode is a
random subset of an expert catalogue under a Poisson, bursty or conv-trace workload at a random
load. The reward of a decision is the QoS completed since the previous decision minus the QoS the
action is predicted to destroy (DESIGN §1). Training starts with a short behaviour-cloning warm
start on `qos-greedy`'s actions, then PPO improves on it.
"""

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.distributions import Categorical

import qosroute_simenv as simenv

from .han import INPUT_NAMES, FlatMlpRouter, HanRouter


@dataclass
class Args:
    # Run
    seed: int = 1
    threads: int = 1  # torch threads: 1 when anything else shares the CPU (2 threads collapse ~80x)
    out: str = "policy-model/models/han"
    arch: str = "han"  # han | mlp (ablation)
    impact_penalty: bool = True  # False: reward = QoS completed only (ablation)
    # Environment
    catalogues: list = field(default_factory=lambda: ["configs/experts/paper-3x7b.toml", "configs/experts/edge-mixed.toml"])
    num_envs: int = 16
    episode_requests: int = 256
    load_min: float = 0.3
    load_max: float = 3.0
    # PPO
    total_steps: int = 300_000
    num_steps: int = 128  # per env per rollout
    learning_rate: float = 1e-4
    anneal_lr: bool = True
    gamma: float = 0.99
    gae_lambda: float = 0.95
    num_minibatches: int = 4
    update_epochs: int = 4
    clip_coef: float = 0.2
    ent_coef: float = 0.0
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    # Behaviour cloning of qos-greedy: a warm start, then a regulariser on PPO's minibatches
    # whose weight decays linearly from bc_coef to bc_coef_final (0 rollouts: no warm start)
    bc_rollouts: int = 8
    bc_epochs: int = 40
    bc_learning_rate: float = 1e-3
    bc_coef: float = 0.5
    bc_coef_final: float = 0.05
    # Network
    hidden: int = 32
    heads: int = 4
    layers: int = 1
    # Evaluation (fixed scenarios, greedy actions) every this many rollouts (0: only at the end)
    eval_every: int = 10
    eval_requests: int = 600


def parse_args(argv=None):
    """Defaults, then a TOML `--config FILE` (keys are the field names), then flags."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, help="TOML file of hyper-parameters")
    for f in dataclasses.fields(Args):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            p.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=None)
        elif isinstance(default, list):
            p.add_argument(flag, type=lambda s: s.split(","), default=None)
        else:
            p.add_argument(flag, type=type(default), default=None)
    ns = vars(p.parse_args(argv))
    values = {}
    if ns.pop("config"):
        import tomllib

        with open(p.parse_args(argv).config, "rb") as f:
            values = tomllib.load(f)
        unknown = set(values) - {f.name for f in dataclasses.fields(Args)}
        if unknown:
            p.error(f"unknown keys in --config: {sorted(unknown)}")
    values.update({k: v for k, v in ns.items() if v is not None})
    return Args(**values)


def to_tensors(obs):
    return [torch.from_numpy(np.ascontiguousarray(obs[name])) for name in INPUT_NAMES]


def pad_to(a, shape):
    """Zero-pads array `a` up to `shape` (same rank)."""
    if a.shape == tuple(shape):
        return a
    out = np.zeros(shape, dtype=a.dtype)
    out[tuple(slice(0, s) for s in a.shape)] = a
    return out


def collate(observations):
    """Stacks per-step observation dicts [K, ...] into one [T*K, ...] batch padded to the
    largest graph. Padding is masked: zero adjacency, expert_valid 0, action_mask 0. The reject
    column moves to the new last position."""
    e = max(o["expert"].shape[1] for o in observations)
    r = max(o["running"].shape[1] for o in observations)
    w = max(o["waiting"].shape[1] for o in observations)
    batch = {name: [] for name in INPUT_NAMES + ["qos_greedy_action"]}
    for o in observations:
        k, e0 = o["expert"].shape[:2]
        batch["request"].append(o["request"])
        batch["expert"].append(pad_to(o["expert"], (k, e, o["expert"].shape[2])))
        batch["running"].append(pad_to(o["running"], (k, r, o["running"].shape[2])))
        batch["waiting"].append(pad_to(o["waiting"], (k, w, o["waiting"].shape[2])))
        batch["running_adj"].append(pad_to(o["running_adj"], (k, e, r)))
        batch["waiting_adj"].append(pad_to(o["waiting_adj"], (k, e, w)))
        batch["expert_valid"].append(pad_to(o["expert_valid"], (k, e)))
        mask = np.zeros((k, e + 1), dtype=np.float32)
        mask[:, :e0] = o["action_mask"][:, :e0]
        mask[:, e] = o["action_mask"][:, e0]
        batch["action_mask"].append(mask)
        teacher = o["qos_greedy_action"].copy()
        teacher[teacher == e0] = e
        batch["qos_greedy_action"].append(teacher)
    return {k: np.concatenate(v) for k, v in batch.items()}, e


def remap_actions(actions, e_from, e_to):
    """Actions indexed on a batch padded to e_from experts, re-indexed for e_to (reject moves)."""
    out = actions.copy()
    out[actions == e_from] = e_to
    return out


def make_model(args, sizes):
    if args.arch == "mlp":
        return FlatMlpRouter(sizes["request"], sizes["expert"], sizes["in_flight"], args.hidden)
    return HanRouter(sizes["request"], sizes["expert"], sizes["in_flight"], args.hidden, args.heads, args.layers)


EVAL_SCENARIOS = [
    ("paper-3x7b light", "configs/experts/paper-3x7b.toml", "poisson:rate=0.5,n={n}"),
    ("paper-3x7b medium", "configs/experts/paper-3x7b.toml", "poisson:rate=1.5,n={n}"),
    ("paper-3x7b overloaded", "configs/experts/paper-3x7b.toml", "poisson:rate=4,n={n}"),
    ("edge-mixed trace x0.5", "configs/experts/edge-mixed.toml", "trace:data/traces/azure-llm-2023-conv.csv,speed=0.5,n={n}"),
    ("edge-mixed trace x1", "configs/experts/edge-mixed.toml", "trace:data/traces/azure-llm-2023-conv.csv,speed=1,n={n}"),
]


def evaluate(model, n_requests, seeds=(101,)):
    """Greedy (argmax) average QoS per fixed scenario, next to qos-greedy on the same workloads."""
    scenarios = [(c, s.format(n=n_requests), seed) for _, c, s in EVAL_SCENARIOS for seed in seeds]
    env = simenv.SimEnv.fixed(scenarios)
    qos = [float("nan")] * len(scenarios)
    model.eval()
    with torch.no_grad():
        while not env.all_finished():
            obs = env.observe()
            logits, _ = model(*to_tensors(obs))
            out = env.step(logits.argmax(dim=-1).numpy().astype(np.int64))
            for i, q in enumerate(out["episode_avg_qos"]):
                if not np.isnan(q):
                    qos[i] = float(q)
    model.train()
    rows = []
    for j, (name, c, s) in enumerate(EVAL_SCENARIOS):
        mine = qos[j * len(seeds):(j + 1) * len(seeds)]
        base = [simenv.baseline_avg_qos(c, s.format(n=n_requests), seed, "qos-greedy") for seed in seeds]
        rows.append({"scenario": name, "model": float(np.mean(mine)), "qos_greedy": float(np.mean(base))})
    return rows


def progress(msg):
    end = "\r" if sys.stderr.isatty() else "\n"
    print(msg, end=end, file=sys.stderr, flush=True)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    started = time.time()
    sizes = simenv.feature_sizes()
    env = simenv.SimEnv(args.catalogues, envs=args.num_envs, seed=args.seed,
                        episode_requests=args.episode_requests, load_min=args.load_min, load_max=args.load_max)
    model = make_model(args, sizes)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate, eps=1e-5)
    k, t_len = args.num_envs, args.num_steps
    rollouts = max(1, args.total_steps // (k * t_len))
    history = {"rollout": [], "steps": [], "episode_qos": [], "policy_loss": [], "value_loss": [], "entropy": [], "eval": []}
    recent_qos = []

    def rollout(policy_actions=True):
        """One rollout of t_len steps in every env. Returns per-step observations and arrays."""
        observations, actions, logprobs, rewards, dones, values = [], [], [], [], [], []
        for _ in range(t_len):
            obs = env.observe()
            with torch.no_grad():
                logits, value = model(*to_tensors(obs))
            dist = Categorical(logits=logits)
            action = dist.sample() if policy_actions else torch.from_numpy(obs["qos_greedy_action"])
            out = env.step(action.numpy().astype(np.int64))
            reward = out["rewards"].copy()
            if not args.impact_penalty:
                reward += out["predicted_qos_destroyed"]
            observations.append(obs)
            actions.append(action.numpy())
            logprobs.append(dist.log_prob(action).numpy())
            rewards.append(reward)
            dones.append(out["dones"].astype(np.float32))
            values.append(value.numpy())
            recent_qos.extend(float(q) for q in out["episode_avg_qos"] if not np.isnan(q))
        with torch.no_grad():
            _, next_value = model(*to_tensors(env.observe()))
        return observations, np.array(actions), np.array(logprobs), np.array(rewards), np.array(dones), np.array(values), next_value.numpy()

    # Behaviour-cloning warm start: collect qos-greedy's decisions once, then fit them.
    teacher_data = []
    for _ in range(args.bc_rollouts):
        observations, *_ = rollout(policy_actions=False)
        batch, _ = collate(observations)
        teacher_data.append(([torch.from_numpy(batch[name]) for name in INPUT_NAMES],
                             torch.from_numpy(batch["qos_greedy_action"].astype(np.int64))))
    if teacher_data:
        bc_optimizer = torch.optim.Adam(model.parameters(), lr=args.bc_learning_rate)
        for epoch in range(args.bc_epochs):
            correct = total = 0
            for tensors, target in teacher_data:
                n = target.shape[0]
                for idx in np.array_split(np.random.permutation(n), args.num_minibatches):
                    idx = torch.from_numpy(idx)
                    logits, _ = model(*[t[idx] for t in tensors])
                    loss = torch.nn.functional.cross_entropy(logits, target[idx])
                    bc_optimizer.zero_grad()
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    bc_optimizer.step()
                    correct += int((logits.argmax(dim=-1) == target[idx]).sum())
                    total += len(idx)
            history.setdefault("warm_start_accuracy", []).append(correct / total)
            progress(f"warm start epoch {epoch + 1}/{args.bc_epochs}: imitation loss {loss.item():.4f}, "
                     f"agreement with qos-greedy {correct / total:.3f}")

    for update in range(1, rollouts + 1):
        if args.anneal_lr:
            optimizer.param_groups[0]["lr"] = args.learning_rate * (1.0 - (update - 1.0) / rollouts)
        observations, actions, logprobs, rewards, dones, values, next_value = rollout()
        # Generalised advantage estimation; done[t] means the episode ended after action t.
        advantages = np.zeros_like(rewards)
        last = np.zeros(k, dtype=np.float32)
        for t in reversed(range(t_len)):
            next_v = next_value if t == t_len - 1 else values[t + 1]
            nonterminal = 1.0 - dones[t]
            delta = rewards[t] + args.gamma * next_v * nonterminal - values[t]
            last = delta + args.gamma * args.gae_lambda * nonterminal * last
            advantages[t] = last
        returns = advantages + values
        # Flatten [T, K] and re-index actions onto the rollout's padded expert axis.
        batch, e_max = collate(observations)
        flat_actions = np.concatenate([remap_actions(a, o["expert"].shape[1], e_max) for a, o in zip(actions, observations)])
        tensors = [torch.from_numpy(batch[name]) for name in INPUT_NAMES]
        b_actions = torch.from_numpy(flat_actions.astype(np.int64))
        b_logprobs = torch.from_numpy(logprobs.reshape(-1))
        b_adv = torch.from_numpy(advantages.reshape(-1))
        b_returns = torch.from_numpy(returns.reshape(-1))
        b_teacher = torch.from_numpy(batch["qos_greedy_action"].astype(np.int64))
        bc_coef = args.bc_coef + (args.bc_coef_final - args.bc_coef) * (update - 1.0) / max(1, rollouts - 1)
        n = b_actions.shape[0]
        for _ in range(args.update_epochs):
            for idx in np.array_split(np.random.permutation(n), args.num_minibatches):
                idx = torch.from_numpy(idx)
                logits, value = model(*[t[idx] for t in tensors])
                dist = Categorical(logits=logits)
                ratio = (dist.log_prob(b_actions[idx]) - b_logprobs[idx]).exp()
                adv = b_adv[idx]
                adv = (adv - adv.mean()) / (adv.std() + 1e-8)
                policy_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef)).mean()
                value_loss = 0.5 * ((value - b_returns[idx]) ** 2).mean()
                entropy = dist.entropy().mean()
                imitation = torch.nn.functional.cross_entropy(logits, b_teacher[idx])
                loss = policy_loss + args.vf_coef * value_loss - args.ent_coef * entropy + bc_coef * imitation
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
        steps = update * k * t_len
        ep_qos = float(np.mean(recent_qos[-50:])) if recent_qos else float("nan")
        history["rollout"].append(update)
        history["steps"].append(steps)
        history["episode_qos"].append(ep_qos)
        history["policy_loss"].append(float(policy_loss.item()))
        history["value_loss"].append(float(value_loss.item()))
        history["entropy"].append(float(entropy.item()))
        history.setdefault("imitation", []).append(float(imitation.item()))
        sps = steps / (time.time() - started)
        progress(f"rollout {update}/{rollouts} steps {steps} episode QoS {ep_qos:.4f} entropy {entropy.item():.3f} "
                 f"imitation {imitation.item():.3f} {sps:.0f} steps/s")
        if args.eval_every and update % args.eval_every == 0 and update != rollouts:
            rows = evaluate(model, args.eval_requests)
            history["eval"].append({"steps": steps, "rows": rows})
            progress("eval " + "  ".join(f"{r['scenario']}: {r['model']:.3f} vs {r['qos_greedy']:.3f}" for r in rows))

    final = evaluate(model, args.eval_requests)
    history["eval"].append({"steps": rollouts * k * t_len, "rows": final})
    wall = time.time() - started
    from .export import write_outputs  # after training: keeps import-time light

    write_outputs(model, args, sizes, history, final, wall)
    print(json.dumps({"out": args.out, "wall_time_s": round(wall, 1), "final_eval": final}, indent=1))


if __name__ == "__main__":
    main()
