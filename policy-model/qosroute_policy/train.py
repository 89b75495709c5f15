"""Training of the learned router against the Rust simulator (CleanRL-style, one file).

Read top to bottom: hyper-parameters, environment, rollouts, expert iteration, PPO, evaluation,
outputs. Run from the repository root:

    python -m qosroute_policy.train --seed 1 --out policy-model/models/han

The environment is `qosroute_simenv.SimEnv` (the Rust simulator through PyO3): every episode is
a random catalogue of 2-12 pooled expert profiles or a subset of one training catalogue, under
Poisson, bursty or conv-trace arrivals (the trace's first 40 minutes only) at 0.2-3x capacity.

1. **Expert iteration (DAgger)** on `qos-planner`: the first episodes follow the planner, later
   ones the network; every visited state is labelled with the planner's choice and its
   per-action gains over `qos-greedy` (soft targets); the network is refit on the aggregate.
2. **PPO** fine-tunes it. The reward of decision t is the realised QoS of the request it routed
   minus the QoS it is predicted to destroy (DESIGN §1): credited once the episode has drained,
   never from completions before the action. Episodes are cut at T requests and bootstrapped.
   The imitation weight and the entropy bonus decay to 0 so the network can leave the teacher.

The checkpoint kept is the best by mean ratio to `qos-greedy` on the training-split evaluation
scenarios (`EVAL_SCENARIOS`), evaluated after every DAgger iteration and every few PPO rollouts.
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
    env_threads: int = 2  # simulator threads while stepping (planner labels are the costly part)
    out: str = "policy-model/models/han"
    arch: str = "han"  # han | mlp (ablation)
    impact_penalty: bool = True  # False: reward = the request's own realised QoS only (ablation)
    teacher: str = "qos-planner"  # qos-planner | qos-greedy | none (ablation: PPO alone)
    planner: str = "qos-planner:k=64"  # the labelling planner: offline, so more futures than the router's 16
    init: str = ""  # start from these weights (a model.pt), e.g. to fine-tune with PPO alone
    # Environment: every episode a random catalogue (2-12 pooled profiles) or a subset of one
    # catalogue, under Poisson, bursty or conv-trace (first 40 minutes) arrivals
    catalogues: list = field(default_factory=lambda: ["configs/experts/paper-3x7b.toml", "configs/experts/edge-mixed.toml"])
    num_envs: int = 16
    episode_requests: int = 256  # one rollout = one episode per env (rewards are credited per request)
    load_min: float = 0.2
    load_max: float = 3.0
    max_experts: int = 12
    random_catalogue_share: float = 0.5
    # Expert iteration (DAgger) on the teacher: iteration 0 follows the teacher, later ones the
    # network (the teacher's action with probability dagger_beta ** i); every state visited is
    # labelled with the teacher's choice and, from the planner, its per-action gains
    dagger_iterations: int = 8
    dagger_epochs: int = 4  # passes over the aggregate after each iteration
    dagger_learning_rate: float = 1e-3
    dagger_beta: float = 0.5
    soft_weight: float = 0.5  # weight of the soft targets softmax(gain / soft_temperature)
    soft_temperature: float = 0.02  # QoS units: gains 0.02 apart weigh e times apart
    value_weight: float = 0.5  # the value head learns the discounted credited returns meanwhile
    # PPO fine-tuning (0 steps: DAgger only)
    total_steps: int = 16_384  # 4 rollouts of 16 x 256
    learning_rate: float = 1e-4
    anneal_lr: bool = True
    gamma: float = 0.95
    gae_lambda: float = 0.95
    num_minibatches: int = 8
    update_epochs: int = 4
    clip_coef: float = 0.2
    ent_coef: float = 0.01  # decays linearly to ent_coef_final
    ent_coef_final: float = 0.0
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    bc_coef: float = 0.5  # imitation of the teacher on PPO's minibatches, decaying linearly to bc_coef_final
    bc_coef_final: float = 0.0
    # Network
    hidden: int = 32
    heads: int = 1  # one head: the same quality here, fewer graph ops in tract (models/README.md)
    layers: int = 1
    # Evaluation on training-split scenarios (greedy actions) after each DAgger iteration and
    # every this many PPO rollouts; the best checkpoint by mean ratio to qos-greedy is kept
    eval_every: int = 2
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
    column moves to the new last position, in the mask, the teachers' actions and the planner's
    gains (NaN where not valued)."""
    e = max(o["expert"].shape[1] for o in observations)
    r = max(o["running"].shape[1] for o in observations)
    w = max(o["waiting"].shape[1] for o in observations)
    batch = {name: [] for name in INPUT_NAMES + ["qos_greedy_action", "planner_action", "planner_gain"]}
    for o in observations:
        k, e0 = o["expert"].shape[:2]
        batch["request"].append(o["request"])
        batch["expert"].append(pad_to(o["expert"], (k, e, o["expert"].shape[2])))
        batch["running"].append(pad_to(o["running"], (k, r, o["running"].shape[2])))
        batch["waiting"].append(pad_to(o["waiting"], (k, w, o["waiting"].shape[2])))
        batch["running_adj"].append(pad_to(o["running_adj"], (k, e, r)))
        batch["waiting_adj"].append(pad_to(o["waiting_adj"], (k, e, w)))
        batch["expert_valid"].append(pad_to(o["expert_valid"], (k, e)))
        for name, fill in [("action_mask", 0.0), ("planner_gain", np.nan)]:
            src = o.get(name, np.full((k, e0 + 1), fill, dtype=np.float32))
            out = np.full((k, e + 1), fill, dtype=np.float32)
            out[:, :e0] = src[:, :e0]
            out[:, e] = src[:, e0]
            batch[name].append(out)
        for name in ["qos_greedy_action", "planner_action"]:
            batch[name].append(remap_actions(o.get(name, o["qos_greedy_action"]), e0, e))
    return {k: np.concatenate(v) for k, v in batch.items()}, e


def remap_actions(actions, e_from, e_to):
    """Actions indexed on a batch padded to e_from experts, re-indexed for e_to (reject moves)."""
    out = np.array(actions, copy=True)
    out[out == e_from] = e_to
    return out


def make_model(args, sizes):
    if args.arch == "mlp":
        return FlatMlpRouter(sizes["request"], sizes["expert"], sizes["in_flight"], args.hidden)
    return HanRouter(sizes["request"], sizes["expert"], sizes["in_flight"], args.hidden, args.heads, args.layers)


# Training-split scenarios only: the conv trace from its start (600 requests: its first two
# minutes), the paper catalogue under Poisson arrivals. Reported results use other scenarios.
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
    was_training = model.training
    model.eval()
    with torch.no_grad():
        while not env.all_finished():
            obs = env.observe()
            logits, _ = model(*to_tensors(obs))
            out = env.step(logits.argmax(dim=-1).numpy().astype(np.int64))
            for i, q in enumerate(out["episode_avg_qos"]):
                if not np.isnan(q):
                    qos[i] = float(q)
    model.train(was_training)
    rows = []
    for j, (name, c, s) in enumerate(EVAL_SCENARIOS):
        mine = qos[j * len(seeds):(j + 1) * len(seeds)]
        base = [baseline_qos(c, s.format(n=n_requests), seed) for seed in seeds]
        rows.append({"scenario": name, "model": float(np.mean(mine)), "qos_greedy": float(np.mean(base))})
    return rows


_BASELINES = {}


def baseline_qos(catalogue, spec, seed):
    key = (catalogue, spec, seed)
    if key not in _BASELINES:
        _BASELINES[key] = simenv.baseline_avg_qos(catalogue, spec, seed, "qos-greedy")
    return _BASELINES[key]


def eval_score(rows):
    """Mean ratio to qos-greedy over the evaluation scenarios (the checkpoint criterion)."""
    return float(np.mean([r["model"] / max(r["qos_greedy"], 1e-9) for r in rows]))


def progress(msg):
    end = "\r" if sys.stderr.isatty() else "\n"
    print(msg, end=end, file=sys.stderr, flush=True)


def credited_rewards(credits, destroyed, impact_penalty):
    """Reward of decision t = the realised QoS of the request it routed (known once the episode
    has drained) minus the QoS it is predicted to destroy among the requests already on the
    expert it chose. Completions before the action are never credited to it."""
    return credits - destroyed if impact_penalty else credits.copy()


def advantages_of(rewards, values, gamma, lam):
    """GAE over one episode per env ([T, K]). Episodes are cut, not ended, at T requests (the
    gateway keeps serving): the step after the last bootstraps with the last state's value."""
    t_len = rewards.shape[0]
    adv = np.zeros_like(rewards)
    last = np.zeros(rewards.shape[1], dtype=np.float32)
    for t in reversed(range(t_len)):
        next_v = values[t + 1] if t + 1 < t_len else values[t]
        delta = rewards[t] + gamma * next_v - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return adv


def discounted_returns(rewards, gamma, tail):
    """Monte-Carlo returns of one episode per env, the tail after it valued at `tail` [K]."""
    out = np.zeros_like(rewards)
    running = tail.astype(np.float32)
    for t in reversed(range(rewards.shape[0])):
        running = rewards[t] + gamma * running
        out[t] = running
    return out


def imitation_loss(logits, batch_idx, data, args):
    """Cross-entropy on the teacher's choice, plus (with the planner) cross-entropy on the soft
    targets softmax(gain / T) over the actions the planner valued."""
    loss = torch.nn.functional.cross_entropy(logits, data["teacher_action"][batch_idx])
    if args.teacher == "qos-planner" and args.soft_weight > 0:
        gain = data["planner_gain"][batch_idx]
        valued = ~torch.isnan(gain)
        scores = torch.where(valued, gain / args.soft_temperature, torch.full_like(gain, -1e9))
        target = torch.softmax(scores, dim=-1)
        logp = torch.log_softmax(logits, dim=-1)
        soft = -(target * torch.where(valued, logp, torch.zeros_like(logp))).sum(dim=-1).mean()
        loss = loss + args.soft_weight * soft
    return loss


def main(argv=None):
    args = parse_args(argv)
    if args.teacher not in ("qos-planner", "qos-greedy", "none"):
        raise SystemExit(f"--teacher must be qos-planner, qos-greedy or none, not {args.teacher}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    started = time.time()
    sizes = simenv.feature_sizes()
    env = simenv.SimEnv(args.catalogues, envs=args.num_envs, seed=args.seed, episode_requests=args.episode_requests,
                        load_min=args.load_min, load_max=args.load_max, max_experts=args.max_experts,
                        random_catalogue_share=args.random_catalogue_share)
    env.set_threads(args.env_threads)
    labelling = args.teacher == "qos-planner"
    if labelling:
        env.set_planner(args.planner, args.seed)
    teacher_key = "planner_action" if labelling else "qos_greedy_action"
    model = make_model(args, sizes)
    if args.init:
        model.load_state_dict(torch.load(args.init))
    k, t_len = args.num_envs, args.episode_requests
    history = {"phase": [], "steps": [], "episode_qos": [], "policy_loss": [], "value_loss": [], "entropy": [],
               "imitation": [], "teacher_agreement": [], "eval": []}
    recent_qos = []
    steps_done = 0
    best = {"score": -np.inf, "state": None, "steps": 0}

    def checkpoint(phase):
        rows = evaluate(model, args.eval_requests)
        score = eval_score(rows)
        history["eval"].append({"steps": steps_done, "phase": phase, "rows": rows, "score": score})
        if score > best["score"]:
            best.update(score=score, state={n: t.clone() for n, t in model.state_dict().items()}, steps=steps_done)
        progress(f"eval ({phase}, {steps_done} steps): ratio to qos-greedy {score:.4f}  " +
                 "  ".join(f"{r['scenario']}: {r['model']:.3f}/{r['qos_greedy']:.3f}" for r in rows))

    def record(phase, policy_loss, value_loss, entropy, imitation, agreement):
        """One point of the training curves; returns the recent episodes' average QoS."""
        ep_qos = float(np.mean(recent_qos[-k:])) if recent_qos else float("nan")
        for key, value in [("phase", phase), ("steps", steps_done), ("episode_qos", ep_qos),
                           ("policy_loss", policy_loss), ("value_loss", value_loss), ("entropy", entropy),
                           ("imitation", imitation), ("teacher_agreement", agreement)]:
            if isinstance(value, torch.Tensor):
                value = value.item()
            history[key].append(float(value) if key not in ("phase", "steps") else value)
        return ep_qos

    def rollout(choose):
        """One episode in every env: T steps of `choose(obs, logits) -> actions`. Returns the
        observations, actions, log-probabilities, values and credited rewards [T, K]."""
        nonlocal steps_done
        observations, actions, logprobs, values, destroyed = [], [], [], [], []
        credits = [None] * k
        for t in range(t_len):
            obs = env.observe()
            with torch.no_grad():
                logits, value = model(*to_tensors(obs))
            action = choose(obs, logits)
            out = env.step(action.astype(np.int64))
            dist = Categorical(logits=logits)
            observations.append(obs)
            actions.append(action)
            logprobs.append(dist.log_prob(torch.from_numpy(action.astype(np.int64))).numpy())
            values.append(value.numpy())
            destroyed.append(out["predicted_qos_destroyed"])
            for i, c in enumerate(out["credits"]):
                if c is not None:
                    if t != t_len - 1:
                        raise RuntimeError("episodes must end together, after episode_requests decisions")
                    credits[i] = c
            recent_qos.extend(float(q) for q in out["episode_avg_qos"] if not np.isnan(q))
        steps_done += k * t_len
        credit = np.stack(credits, axis=1).astype(np.float32)  # [T, K]
        rewards = credited_rewards(credit, np.array(destroyed, dtype=np.float32), args.impact_penalty)
        return observations, np.array(actions), np.array(logprobs), np.array(values), rewards

    def tensors_of(observations, actions=None):
        batch, e_max = collate(observations)
        data = {name: torch.from_numpy(batch[name]) for name in INPUT_NAMES}
        data["teacher_action"] = torch.from_numpy(batch[teacher_key].astype(np.int64))
        data["planner_gain"] = torch.from_numpy(batch["planner_gain"])
        if actions is not None:
            flat = np.concatenate([remap_actions(a, o["expert"].shape[1], e_max) for a, o in zip(actions, observations)])
            data["action"] = torch.from_numpy(flat.astype(np.int64))
        return data

    # 1. Expert iteration on the teacher (DAgger): aggregate labelled states, refit.
    if args.teacher != "none" and args.dagger_iterations > 0:
        aggregate = []
        optimizer = torch.optim.Adam(model.parameters(), lr=args.dagger_learning_rate)
        rng = np.random.default_rng(args.seed)
        for it in range(args.dagger_iterations):
            beta = args.dagger_beta ** it

            def choose(obs, logits):
                own = logits.argmax(dim=-1).numpy()
                teacher = obs[teacher_key]
                return np.where(rng.random(len(own)) < beta, teacher, own)

            observations, actions, _, values, rewards = rollout(choose)
            data = tensors_of(observations)
            data["return"] = torch.from_numpy(discounted_returns(rewards, args.gamma, values[-1]).reshape(-1))
            aggregate.append(data)
            correct = total = 0
            for _ in range(args.dagger_epochs):
                for part in aggregate:
                    n = part["teacher_action"].shape[0]
                    for idx in np.array_split(rng.permutation(n), max(1, n // 512)):
                        idx = torch.from_numpy(idx)
                        logits, value = model(*[part[name][idx] for name in INPUT_NAMES])
                        imitation = imitation_loss(logits, idx, part, args)
                        value_loss = 0.5 * ((value - part["return"][idx]) ** 2).mean()
                        loss = imitation + args.value_weight * value_loss
                        optimizer.zero_grad()
                        loss.backward()
                        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                        optimizer.step()
                        correct += int((logits.argmax(dim=-1) == part["teacher_action"][idx]).sum())
                        total += len(idx)
            agree = correct / max(total, 1)
            ep_qos = record("dagger", float("nan"), value_loss, float("nan"), imitation, agree)
            progress(f"dagger {it + 1}/{args.dagger_iterations} beta {beta:.3f}: {len(aggregate) * k * t_len} states, "
                     f"agreement with {args.teacher} {agree:.3f}, episode QoS {ep_qos:.4f}, "
                     f"{steps_done / (time.time() - started):.0f} steps/s")
            if args.eval_every:
                checkpoint("dagger")
        del aggregate

    if args.init and args.eval_every and not history["eval"]:
        checkpoint("init")

    # 2. PPO on the credited reward, the imitation weight and entropy bonus decaying to their
    # final values so that the network can leave the teacher where it is wrong.
    rollouts = args.total_steps // (k * t_len)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate, eps=1e-5)
    for update in range(1, rollouts + 1):
        frac = (update - 1.0) / max(1, rollouts - 1)
        if args.anneal_lr:
            optimizer.param_groups[0]["lr"] = args.learning_rate * (1.0 - (update - 1.0) / rollouts)
        bc_coef = 0.0 if args.teacher == "none" else args.bc_coef + (args.bc_coef_final - args.bc_coef) * frac
        ent_coef = args.ent_coef + (args.ent_coef_final - args.ent_coef) * frac

        def sample(obs, logits):
            return Categorical(logits=logits).sample().numpy()

        observations, actions, logprobs, values, rewards = rollout(sample)
        advantages = advantages_of(rewards, values, args.gamma, args.gae_lambda)
        returns = advantages + values
        data = tensors_of(observations, actions)
        b_logprobs = torch.from_numpy(logprobs.reshape(-1))
        b_adv = torch.from_numpy(advantages.reshape(-1))
        b_returns = torch.from_numpy(returns.reshape(-1))
        n = b_adv.shape[0]
        agree = total = 0
        for _ in range(args.update_epochs):
            for idx in np.array_split(np.random.permutation(n), args.num_minibatches):
                idx = torch.from_numpy(idx)
                logits, value = model(*[data[name][idx] for name in INPUT_NAMES])
                dist = Categorical(logits=logits)
                ratio = (dist.log_prob(data["action"][idx]) - b_logprobs[idx]).exp()
                adv = b_adv[idx]
                adv = (adv - adv.mean()) / (adv.std() + 1e-8)
                policy_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef)).mean()
                value_loss = 0.5 * ((value - b_returns[idx]) ** 2).mean()
                entropy = dist.entropy().mean()
                loss = policy_loss + args.vf_coef * value_loss - ent_coef * entropy
                imitation = torch.zeros(())
                if bc_coef > 0:
                    imitation = imitation_loss(logits, idx, data, args)
                    loss = loss + bc_coef * imitation
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                agree += int((logits.argmax(dim=-1) == data["teacher_action"][idx]).sum())
                total += len(idx)
        ep_qos = record("ppo", policy_loss, value_loss, entropy, imitation, agree / max(total, 1))
        progress(f"ppo {update}/{rollouts} steps {steps_done} episode QoS {ep_qos:.4f} entropy {entropy.item():.3f} "
                 f"imitation {imitation.item():.3f} (x{bc_coef:.3f}) agreement {agree / max(total, 1):.3f} "
                 f"{steps_done / (time.time() - started):.0f} steps/s")
        if args.eval_every and (update % args.eval_every == 0 or update == rollouts):
            checkpoint("ppo")

    if not args.eval_every or not history["eval"]:
        checkpoint("final")
    model.load_state_dict(best["state"])
    final = next(p["rows"] for p in history["eval"] if p["steps"] == best["steps"])
    history["kept_steps"] = best["steps"]
    wall = time.time() - started
    from .export import write_outputs  # after training: keeps import-time light

    write_outputs(model, args, sizes, history, final, wall)
    print(json.dumps({"out": args.out, "wall_time_s": round(wall, 1), "kept_steps": best["steps"],
                      "eval_ratio": best["score"], "final_eval": final}, indent=1))


if __name__ == "__main__":
    main()
