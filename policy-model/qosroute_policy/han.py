"""The heterogeneous graph attention network (HAN) of the learned router, in plain tensor ops.

Node types: the arriving request (1 node), experts (E), running requests (R), waiting requests
(W). Edge types: request<->every expert, expert<->its running requests, expert<->its waiting
requests (adjacency masks from the Rust encoder, `qosroute_core::encoder`).

Each layer:
  1. node-level attention per edge type: every expert attends (multi-head, masked dense
     attention) over its running requests, over its waiting requests, and over the request;
  2. semantic attention across the three edge types (HAN): a learned, per-node softmax over the
     type-specific messages;
  3. residual update of experts; the request attends over the experts; running and waiting
     requests receive their expert's embedding back (the reverse edges).

Outputs: one logit per expert node plus one for reject, and a state value, so one model serves
any number of experts.

Size: the shipped router is 1 layer, hidden 32, 4 heads (`train.Args`). Against 2 layers,
hidden 64, 8 heads it scored the same within noise (paired gains over qos-greedy +0.003 vs
+0.004 averaged over six scenarios and three seeds) and decides 3-4x faster in tract
(`policy-model/models/README.md`). Only MatMul, Softmax, Add/Mul, Relu, Tanh, Reshape/Transpose and
ReduceSum/Mean are used: all run in tract (no scatter/gather graph ops).
"""

import torch
from torch import nn

NEG = 1e9


class EdgeMask:
    """An edge type's adjacency `[B, N, M]` (1 = edge) in the form attention reads, built once
    per forward pass and shared by every layer: an additive bias, already expanded over the
    heads so tract adds it element by element rather than through a broadcast, and a per-row
    flag of whether the row has any edge."""

    def __init__(self, adj, heads):
        b, n, m = adj.shape
        bias = (adj - 1.0) * NEG
        # [B, heads, N, M]; one head keeps [B, N, M] (no head axis anywhere: fewer graph ops)
        self.bias = bias if heads == 1 else bias.unsqueeze(1).expand(b, heads, n, m)
        self.has_edge = torch.clamp(adj.sum(dim=-1, keepdim=True), max=1.0)  # [B, N, 1]


def masked_attention(q, k, v, mask, heads):
    """Multi-head attention of queries over keys allowed by `mask` (an `EdgeMask`).

    q: [B, N, H], k/v: [B, M, H]. Rows without any edge get 0. Masked entries get exactly zero
    weight (exp(-1e9) underflows to 0 in f32), so only edge-less rows need the `has_edge` zeroing.
    """
    b, n, h = q.shape
    m = k.shape[1]
    d = h // heads
    if heads == 1:  # the same computation without the head axis's reshapes and transposes
        weights = torch.softmax(torch.matmul(q, k.transpose(1, 2)) * (d ** -0.5) + mask.bias, dim=-1)
        return torch.matmul(weights, v) * mask.has_edge
    q = q.reshape(b, n, heads, d).transpose(1, 2)  # [B, heads, N, d]
    k = k.reshape(b, m, heads, d).transpose(1, 2)
    v = v.reshape(b, m, heads, d).transpose(1, 2)
    scores = torch.matmul(q, k.transpose(2, 3)) * (d ** -0.5)  # [B, heads, N, M]
    weights = torch.softmax(scores + mask.bias, dim=-1)
    out = torch.matmul(weights, v)  # [B, heads, N, d]
    return out.transpose(1, 2).reshape(b, n, h) * mask.has_edge


class EdgeTypeAttention(nn.Module):
    """Experts attending over one neighbour node type."""

    def __init__(self, hidden, heads):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(hidden, hidden)
        self.k = nn.Linear(hidden, hidden)
        self.v = nn.Linear(hidden, hidden)

    def forward(self, experts, neighbours, mask):
        return masked_attention(self.q(experts), self.k(neighbours), self.v(neighbours), mask, self.heads)


class SemanticAttention(nn.Module):
    """HAN's semantic attention: a softmax over edge types of a learned score of each message."""

    def __init__(self, hidden):
        super().__init__()
        self.proj = nn.Linear(hidden, hidden)
        self.score = nn.Linear(hidden, 1, bias=False)

    def forward(self, messages):  # [B, N, T, H]
        beta = torch.softmax(self.score(torch.tanh(self.proj(messages))), dim=2)  # [B, N, T, 1]
        return (beta * messages).sum(dim=2)


class HanLayer(nn.Module):
    def __init__(self, hidden, heads):
        super().__init__()
        self.heads = heads
        self.from_running = EdgeTypeAttention(hidden, heads)
        self.from_waiting = EdgeTypeAttention(hidden, heads)
        self.from_request = nn.Linear(hidden, hidden)
        self.semantic = SemanticAttention(hidden)
        self.expert_update = nn.Linear(hidden, hidden)
        self.request_attention = EdgeTypeAttention(hidden, heads)
        self.request_update = nn.Linear(hidden, hidden)
        self.in_flight_update = nn.Linear(hidden, hidden)

    def forward(self, request, experts, running, waiting, running_adj, waiting_adj, masks):
        # request [B, 1, H], experts [B, E, H], running [B, R, H], waiting [B, W, H]
        m_run = self.from_running(experts, running, masks["running"])
        m_wait = self.from_waiting(experts, waiting, masks["waiting"])
        m_req = self.from_request(request).expand_as(experts)
        messages = torch.stack([m_req, m_run, m_wait], dim=2)  # [B, E, 3, H]
        experts = torch.relu(experts + self.expert_update(self.semantic(messages)))
        # The request attends over the (real) experts.
        m = self.request_attention(request, experts, masks["request"])
        request = torch.relu(request + self.request_update(m))
        # Reverse edges: each running / waiting request gets its expert's embedding.
        to_running = torch.matmul(running_adj.transpose(1, 2), experts)  # [B, R, H]
        to_waiting = torch.matmul(waiting_adj.transpose(1, 2), experts)
        running = torch.relu(running + self.in_flight_update(to_running))
        waiting = torch.relu(waiting + self.in_flight_update(to_waiting))
        return request, experts, running, waiting


class HanRouter(nn.Module):
    """Scores every expert node and reject; also estimates the state value."""

    def __init__(self, request_features, expert_features, in_flight_features, hidden=32, heads=4, layers=1):
        super().__init__()
        self.heads = heads
        self.embed_request = nn.Linear(request_features, hidden)
        self.embed_expert = nn.Linear(expert_features, hidden)
        self.embed_running = nn.Linear(in_flight_features, hidden)
        self.embed_waiting = nn.Linear(in_flight_features, hidden)
        self.layers = nn.ModuleList([HanLayer(hidden, heads) for _ in range(layers)])
        self.expert_score = nn.Sequential(nn.Linear(2 * hidden + expert_features, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self.reject_score = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self.value = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, request, expert, running, waiting, running_adj, waiting_adj, expert_valid, action_mask):
        """Returns masked logits [B, E + 1] (last = reject) and values [B]."""
        raw_expert = expert
        req = torch.relu(self.embed_request(request)).unsqueeze(1)
        exp = torch.relu(self.embed_expert(expert))
        run = torch.relu(self.embed_running(running))
        wait = torch.relu(self.embed_waiting(waiting))
        masks = {
            "running": EdgeMask(running_adj, self.heads),
            "waiting": EdgeMask(waiting_adj, self.heads),
            "request": EdgeMask(expert_valid.unsqueeze(1), self.heads),  # [B, 1, E]
        }
        for layer in self.layers:
            req, exp, run, wait = layer(req, exp, run, wait, running_adj, waiting_adj, masks)
        valid = expert_valid.unsqueeze(-1)
        pooled = (exp * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1.0)  # [B, H]
        req = req.squeeze(1)
        context = torch.cat([req, pooled], dim=-1)
        per_expert = torch.cat([exp, req.unsqueeze(1).expand_as(exp), raw_expert], dim=-1)
        expert_logits = self.expert_score(per_expert).squeeze(-1)  # [B, E]
        reject_logit = self.reject_score(context)  # [B, 1]
        logits = torch.cat([expert_logits, reject_logit], dim=-1)
        logits = logits + (action_mask - 1.0) * NEG
        return logits, self.value(context).squeeze(-1)


def masked_mean(nodes, adj):
    """Mean of the in-flight nodes `[B, N, F]` that some expert links to in `adj` `[B, E, N]`
    (0 when there is none)."""
    real = torch.clamp(adj.sum(dim=1), max=1.0).unsqueeze(-1)  # [B, N, 1]
    return (nodes * real).sum(dim=1) / real.sum(dim=1).clamp(min=1.0)


class FlatMlpRouter(nn.Module):
    """Ablation: an MLP over flat padded features, without the graph's attention.

    Each expert is scored from its own features, the request's, its counts of running and
    waiting requests (row sums of the adjacency masks) and an unstructured mean of every
    in-flight node of the cluster: what a flat feature vector can carry, no message passing.
    The means are over real nodes only (a node is real when an expert links to it), so padding
    never changes a logit.
    """

    def __init__(self, request_features, expert_features, in_flight_features, hidden=64):
        super().__init__()
        flat = request_features + 2 * in_flight_features
        self.expert_score = nn.Sequential(nn.Linear(flat + expert_features + 2, hidden), nn.Tanh(),
                                          nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self.reject_score = nn.Sequential(nn.Linear(flat + expert_features, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self.value = nn.Sequential(nn.Linear(flat + expert_features, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, request, expert, running, waiting, running_adj, waiting_adj, expert_valid, action_mask):
        flat = torch.cat([request, masked_mean(running, running_adj), masked_mean(waiting, waiting_adj)], dim=-1)
        counts = torch.stack([running_adj.sum(dim=-1), waiting_adj.sum(dim=-1)], dim=-1) / 64.0  # [B, E, 2]
        e = expert.shape[1]
        per_expert = torch.cat([expert, counts, flat.unsqueeze(1).expand(-1, e, -1)], dim=-1)
        valid = expert_valid.unsqueeze(-1)
        pooled = (expert * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1.0)
        context = torch.cat([flat, pooled], dim=-1)
        logits = torch.cat([self.expert_score(per_expert).squeeze(-1), self.reject_score(context)], dim=-1)
        logits = logits + (action_mask - 1.0) * NEG
        return logits, self.value(context).squeeze(-1)


INPUT_NAMES = ["request", "expert", "running", "waiting", "running_adj", "waiting_adj", "expert_valid", "action_mask"]
