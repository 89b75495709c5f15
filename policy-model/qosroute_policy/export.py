"""Export of a trained router: ONNX (f32 and int8), golden cases, training report.

The ONNX graph takes the encoder's tensors (see `han.INPUT_NAMES`) with dynamic batch, expert,
running and waiting counts, and returns `logits [B, E + 1]` (last = reject). Its ops are checked
against the subset of ONNX that tract runs. The int8 variant is onnxruntime's dynamic
quantisation of MatMul only (tract rejects com.microsoft ops).
"""

import dataclasses
import json
import os

import numpy as np
import torch

import qosroute_simenv as simenv

from .han import INPUT_NAMES

# ONNX ops this network may use; all are in tract's supported set (tract-onnx 0.23).
TRACT_OPS = {
    "Add", "Sub", "Mul", "Div", "MatMul", "Gemm", "Relu", "Tanh", "Softmax", "Reshape", "Transpose",
    "Concat", "Unsqueeze", "Squeeze", "Shape", "Gather", "Slice", "ReduceSum", "ReduceMean", "Expand",
    "Constant", "ConstantOfShape", "Cast", "Clip", "Max", "Min", "Sqrt", "Pow", "Where", "Equal",
    "Identity", "Range", "Neg", "DynamicQuantizeLinear", "MatMulInteger", "DequantizeLinear",
    "QuantizeLinear",
}

DYNAMIC_AXES = {
    "request": {0: "batch"},
    "expert": {0: "batch", 1: "experts"},
    "running": {0: "batch", 1: "running"},
    "waiting": {0: "batch", 1: "waiting"},
    "running_adj": {0: "batch", 1: "experts", 2: "running"},
    "waiting_adj": {0: "batch", 1: "experts", 2: "waiting"},
    "expert_valid": {0: "batch", 1: "experts"},
    "action_mask": {0: "batch", 1: "actions"},
    "logits": {0: "batch", 1: "actions"},
}


class LogitsOnly(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *inputs):
        return self.model(*inputs)[0]


def golden_observations(count=16, seed=7):
    """Single-request observations (batch 1, as the daemon decides) of varied graph sizes."""
    env = simenv.SimEnv(["configs/experts/paper-3x7b.toml", "configs/experts/edge-mixed.toml"],
                        envs=1, seed=seed, episode_requests=200, load_min=0.5, load_max=3.0)
    cases, step = [], 0
    while len(cases) < count:
        obs = env.observe()
        if step % 37 == 5:
            cases.append({k: v.copy() for k, v in obs.items() if k != "qos_greedy_action"})
        env.step(obs["qos_greedy_action"].astype(np.int64))
        step += 1
    return cases


def export_onnx(model, path):
    model.eval()
    sample = golden_observations(1)[0]
    inputs = tuple(torch.from_numpy(sample[n]) for n in INPUT_NAMES)
    torch.onnx.export(LogitsOnly(model), inputs, path, input_names=INPUT_NAMES, output_names=["logits"],
                      dynamic_axes=DYNAMIC_AXES, opset_version=17, dynamo=False)


def ops_of(path):
    import onnx

    return sorted({n.op_type for n in onnx.load(path).graph.node})


def quantize_int8(src, dst):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(src, dst, op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8)


def run_onnxruntime(path, cases):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    declared = [i.name for i in session.get_inputs()]
    if declared != INPUT_NAMES:
        raise RuntimeError(f"{path}: inputs {declared}, the daemon feeds {INPUT_NAMES}")
    return [session.run(["logits"], {n: c[n] for n in INPUT_NAMES})[0] for c in cases]


def write_outputs(model, args, sizes, history, final_eval, wall_time_s):
    out = args.out
    os.makedirs(out, exist_ok=True)
    model.eval()
    torch.save(model.state_dict(), os.path.join(out, "model.pt"))
    checks = export_all(model, out)
    report = {
        "args": dataclasses.asdict(args),
        "feature_sizes": sizes,
        "parameters": sum(p.numel() for p in model.parameters()),
        "wall_time_s": round(wall_time_s, 1),
        "torch": torch.__version__,
        "export": checks,
        "final_eval": final_eval,
        "history": history,
    }
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    plot_curves(history, os.path.join(out, "curves.png"))
    write_report_markdown(report, os.path.join(out, "REPORT.md"))


def export_all(model, out):
    """ONNX f32 and int8, op check, golden cases, onnxruntime agreement. Returns the checks."""
    f32 = os.path.join(out, "router-f32.onnx")
    int8 = os.path.join(out, "router-int8.onnx")
    export_onnx(model, f32)
    quantize_int8(f32, int8)
    checks = {}
    for name, path in (("f32", f32), ("int8", int8)):
        ops = ops_of(path)
        unsupported = [op for op in ops if op not in TRACT_OPS]
        if unsupported:
            raise RuntimeError(f"{path}: ops tract does not run: {unsupported}")
        checks[name] = {"ops": ops, "bytes": os.path.getsize(path)}
    # Golden cases: torch f32 logits; onnxruntime agreement for both variants.
    cases = golden_observations()
    with torch.no_grad():
        expected = [model(*[torch.from_numpy(c[n]) for n in INPUT_NAMES])[0].numpy() for c in cases]
    for name, path in (("f32", f32), ("int8", int8)):
        got = run_onnxruntime(path, cases)
        finite = [(np.abs(g - e)[e > -1e8]).max() for g, e in zip(got, expected)]
        agree = np.mean([int(g.argmax() == e.argmax()) for g, e in zip(got, expected)])
        checks[name].update({"onnxruntime_max_abs_diff": float(max(finite)), "onnxruntime_argmax_agreement": float(agree)})
    golden = [{
        "inputs": {n: {"shape": list(c[n].shape), "data": c[n].reshape(-1).tolist()} for n in INPUT_NAMES},
        "logits": {"shape": list(e.shape), "data": e.reshape(-1).tolist()},
        "action": int(e.argmax()),
    } for c, e in zip(cases, expected)]
    with open(os.path.join(out, "golden.json"), "w") as f:
        json.dump({"model": "router-f32.onnx", "cases": golden}, f)
    return checks


def reexport(model_dir):
    """Re-exports a trained model (model.pt + report.json) with the current export code."""
    from .han import FlatMlpRouter, HanRouter

    with open(os.path.join(model_dir, "report.json")) as f:
        report = json.load(f)
    a, sizes = report["args"], report["feature_sizes"]
    if a["arch"] == "mlp":
        model = FlatMlpRouter(sizes["request"], sizes["expert"], sizes["in_flight"], a["hidden"])
    else:
        model = HanRouter(sizes["request"], sizes["expert"], sizes["in_flight"], a["hidden"], a["heads"], a["layers"])
    model.load_state_dict(torch.load(os.path.join(model_dir, "model.pt")))
    report["export"] = export_all(model.eval(), model_dir)
    with open(os.path.join(model_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    write_report_markdown(report, os.path.join(model_dir, "REPORT.md"))
    return report["export"]



def plot_curves(history, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    axes[0].plot(history["steps"], history["episode_qos"])
    axes[0].set_title("training episode avg QoS")
    axes[1].plot(history["steps"], history["value_loss"], label="value")
    axes[1].plot(history["steps"], history["policy_loss"], label="policy")
    axes[1].plot(history["steps"], history["imitation"], label="imitation")
    axes[1].plot(history["steps"], history["teacher_agreement"], label="agreement with teacher")
    axes[1].legend(fontsize=7)
    axes[1].set_title("losses (DAgger, then PPO)")
    for i, point in enumerate(history["eval"]):
        for row in point["rows"]:
            axes[2].scatter(point["steps"], row["model"] - row["qos_greedy"], s=10, color=f"C{EVAL_ORDER.index(row['scenario']) % 10}",
                            label=row["scenario"] if i == 0 else None)
    axes[2].axhline(0, color="black", lw=0.8)
    axes[2].set_title("eval: model minus qos-greedy avg QoS")
    if history["eval"]:
        axes[2].legend(fontsize=7)
    for a in axes:
        a.set_xlabel("environment steps")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


EVAL_ORDER = ["paper-3x7b light", "paper-3x7b medium", "paper-3x7b overloaded", "edge-mixed trace x0.5", "edge-mixed trace x1"]


def write_report_markdown(report, path):
    a = report["args"]
    lines = [
        f"# Training report: {a['arch']} router, seed {a['seed']}",
        "",
        f"- teacher {a['teacher']} ({a['planner'] if a['teacher'] == 'qos-planner' else 'no planner'}), "
        f"{a['dagger_iterations'] if a['teacher'] != 'none' else 0} DAgger iterations, then {a['total_steps']} PPO steps; "
        f"{a['num_envs']} envs x {a['episode_requests']}-request episodes, loads {a['load_min']}-{a['load_max']} x capacity, "
        f"impact penalty {'on' if a['impact_penalty'] else 'off'}",
        f"- checkpoint kept: after {report['history'].get('kept_steps', 'all')} environment steps "
        f"(best mean ratio to qos-greedy on the training-split evaluation scenarios)",
        f"- parameters {report['parameters']}, wall time {report['wall_time_s']} s, torch {report['torch']}",
        f"- ONNX f32 {report['export']['f32']['bytes']} B, int8 {report['export']['int8']['bytes']} B; "
        f"onnxruntime vs torch: f32 max |diff| {report['export']['f32']['onnxruntime_max_abs_diff']:.2e}, "
        f"int8 argmax agreement {report['export']['int8']['onnxruntime_argmax_agreement']:.2f}",
        "",
        "Final evaluation (greedy, one seed, %d requests per scenario):" % a["eval_requests"],
        "",
        "| scenario | model | qos-greedy |",
        "|---|---|---|",
    ]
    lines += [f"| {r['scenario']} | {r['model']:.4f} | {r['qos_greedy']:.4f} |" for r in report["final_eval"]]
    lines += ["", "![curves](curves.png)", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    import sys

    torch.set_num_threads(1)
    print(json.dumps(reexport(sys.argv[1] if len(sys.argv) > 1 else "policy-model/models/han"), indent=1))
