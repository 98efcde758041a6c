"""Mixture-of-Experts feed-forward blocks: the repo's own top-k MoE, transformers' GLM-4 and DeepSeek-V3 MoE.

(The dense FFN is transformers' `DeepseekV3MLP` as is; `registry.py` maps `model.ffn` to these.) Every MoE
block returns `(output, Routing)` so the model can log each layer's expert load and add a Switch-style balance
loss, and exposes `n_experts`, `top_k` and `routed_experts()` for the parameter and FLOP accounting. All
dispatch tokens to experts with `sorted_dispatch` (for the transformers blocks registered as an experts
implementation) or, where `grouped_mm_runs_fast` says so or the spec asks, with one `grouped_dispatch`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DeepseekV3Config, Glm4MoeConfig
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE, DeepseekV3TopkRouter
from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeMoE, Glm4MoeTopkRouter

from .dropout import Dropout

if TYPE_CHECKING:  # annotations only: spec imports the registry, which builds these modules
    from ..spec import ModelSpec


class Routing(NamedTuple):
    load: torch.Tensor  # [E] share of token-assignments per expert; sums to 1
    balance_loss: torch.Tensor  # scalar, differentiable through the router probabilities


def switch_balance(probs: torch.Tensor, top_idx: torch.Tensor) -> Routing:
    """Switch Transformer balance loss E * sum_e f_e * P_e.

    probs: [N, E] router probabilities per token; top_idx: [N, k] chosen experts.
    f_e = share of the N*k assignments that went to e, P_e = mean probability of e. Equals 1 when balanced.
    Only P carries gradient: f comes from a discrete top-k.
    """
    n_experts = probs.shape[-1]
    # fp32 even under autocast: the loads are logged and bf16 would round them to ~3 digits
    load = expert_counts(top_idx, n_experts).float() / top_idx.numel()
    return Routing(load, n_experts * (load * probs.float().mean(0)).sum())


def expert_counts(top_idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Token-assignments per expert, computed on the device without a host sync.

    (`torch.bincount` on CUDA reads the largest index to the host to size its output.) N·k·E comparisons:
    nothing next to one expert matmul.
    """
    experts = torch.arange(n_experts, device=top_idx.device)
    return (top_idx.reshape(-1, 1) == experts).sum(0)


# Where experts compute in bf16/fp16 on a CPU, each expert's rows are padded with zero rows to a multiple of this.
# oneDNN, which runs those matmuls (fp32 ones go to a BLAS that caches nothing, and are not padded), builds and
# caches a kernel for every matmul shape it meets. Expert row counts change every step, so every step built new
# kernels mid-step, and their long-lived allocations, placed between the step's temporaries, fragmented the heap
# (which `allocator.py` keeps): at the 512d MoE study recipe (bf16, 2-core AVX512-BF16 EPYC) the process grew
# from 2.8 to 4.7-4.8 GB over its first 8 steps and was still growing, each growing step paying up to seconds of
# page faults. Padded to 64-row multiples it holds 2.7-2.8 GB from the 3rd-5th step, the first 8 steps take
# 40-42 s instead of 51-53 s, and the settled step is no slower (4.5-4.9 s; the padding adds ~3 % to the
# experts' matmuls). Padded rows are zeros whose outputs are dropped: values and gradients are unchanged.
CPU_ROW_MULTIPLE = 64


def sorted_dispatch(
    x: torch.Tensor,
    top_idx: torch.Tensor,
    top_weights: torch.Tensor,
    n_experts: int,
    expert,
    row_multiple: int | None = None,
) -> torch.Tensor:
    """Each token through its top-k experts, one contiguous matmul per expert: sum_k w_k * expert_{i_k}(x).

    x: [N, d]; top_idx, top_weights: [N, k]; expert(e, rows) runs expert e on its rows. The N*k (token, slot)
    pairs are sorted by expert, gathered once, split into one slice per expert, and the weighted outputs are
    un-sorted and summed over the k slots (in a fixed order: deterministic on GPUs too, unlike an index_add).
    Against transformers' eager loop (a boolean mask, an index and an index_add per expert, and a full-size
    gradient per expert slice of the 3-D weights) the GLM-4 MoE block alone trains ≈1.4x faster on CPU at the
    study's 512d shape, a whole 512d model 1.19-1.34x in bf16 with the row padding below (`make bench` prints
    it). `index_select` rather than `x[idx]`: its backward is an index_add, much faster on CPU than indexing's
    accumulating put. One host sync per layer (the counts), as the eager loop has. `row_multiple`: each
    expert's rows are padded to a multiple of it (default `row_multiple_for(x)`).
    """
    n_tokens, k = top_idx.shape
    flat = top_idx.reshape(-1)
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=n_experts).tolist()
    rows = x.index_select(0, order // k)
    multiple = row_multiple or row_multiple_for(x)
    outs = [_padded(expert, e, chunk, multiple) for e, chunk in enumerate(rows.split(counts)) if counts[e]]
    y = torch.cat(outs) * top_weights.reshape(-1)[order, None].to(outs[0].dtype)
    unsort = torch.empty_like(order)
    unsort[order] = torch.arange(order.numel(), device=order.device)
    return sum_slots(y.index_select(0, unsort), n_tokens, k)


def sum_slots(y: torch.Tensor, n_tokens: int, k: int) -> torch.Tensor:
    """Each token's k slot outputs summed: y [N·k, d], token-major, to [N, d]. For k = 2 one add of the two slots,
    the same bits as `sum` (either rounds a + b once): fwd+bwd of 4,096 × 2 × 512 bf16 rows (their gather
    included) in 4.2 ms against 6.5 ms, a sum over a middle dimension of 2 being slow on a CPU (2-core AMX Xeon)."""
    slots = y.view(n_tokens, k, -1)
    return torch.add(*slots.unbind(1)) if k == 2 else slots.sum(dim=1)


def row_multiple_for(x: torch.Tensor) -> int:
    """CPU_ROW_MULTIPLE where experts on input x compute in bf16/fp16 (autocast's dtype or x's) on a CPU, else 1."""
    if x.device.type != "cpu":
        return 1
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    return CPU_ROW_MULTIPLE if dtype in (torch.bfloat16, torch.float16) else 1


def _padded(expert, e: int, rows: torch.Tensor, multiple: int) -> torch.Tensor:
    """expert(e, rows) run on rows padded with zero rows to a multiple of `multiple`, the padding's outputs cut."""
    pad = -rows.shape[0] % multiple
    return expert(e, F.pad(rows, (0, 0, 0, pad)))[: rows.shape[0]] if pad else expert(e, rows)


def glm4_sorted_experts(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
    """`Glm4MoeExperts.forward` (and `DeepseekV3Experts.forward`, the same layout) through `sorted_dispatch`,
    registered as experts_implementation "sorted".

    The 3-D weight stacks are unbound once per call, so backward stacks one gradient per stack instead of
    filling a full-size zero gradient for every expert slice.
    """
    gate_up, down = self.gate_up_proj.unbind(0), self.down_proj.unbind(0)

    def expert(e: int, rows: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(rows, gate_up[e]).chunk(2, dim=-1)
        return F.linear(self.act_fn(gate) * up, down[e])

    out = sorted_dispatch(hidden_states, top_k_index, top_k_weights, self.num_experts, expert)
    return out.to(hidden_states.dtype)


def grouped_dispatch(
    x: torch.Tensor, top_idx: torch.Tensor, top_weights: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, between
) -> torch.Tensor:
    """`sorted_dispatch` with every expert's matmul in one `grouped_mm`: sum_k w_k * expert_{i_k}(x).

    w_in [E, H, d] and w_out [E, d, H'] are the experts' stacked Linear weights (out × in); between(h) maps the
    [S, H] first-layer output to [S, H'] (activation, gating, dropout). The group offsets are a cumulative sum on
    the device, so nothing waits for the host: on CUDA the whole layer queues without a sync. Runs where
    `torch.nn.functional.grouped_mm` does: CUDA Ampere+ in bf16, and CPU (fp32 and bf16); feature sizes must be
    multiples of 16 bytes. Under autocast the matmuls run in the autocast dtype, as `F.linear` would (grouped_mm
    itself is not autocast-aware).
    """
    n_tokens, k = top_idx.shape
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    flat = top_idx.reshape(-1)
    order = flat.argsort(stable=True)
    offsets = expert_counts(top_idx, w_in.shape[0]).cumsum(0).to(torch.int32)
    rows = x.index_select(0, order // k).to(dtype)
    with torch.autocast(device, enabled=False):
        h = F.grouped_mm(rows, w_in.to(dtype).transpose(-2, -1), offs=offsets)
        y = F.grouped_mm(between(h), w_out.to(dtype).transpose(-2, -1), offs=offsets)
    y = y * top_weights.reshape(-1)[order, None].to(y.dtype)
    unsort = torch.empty_like(order)
    unsort[order] = torch.arange(order.numel(), device=order.device)
    return sum_slots(y.index_select(0, unsort), n_tokens, k)


def grouped_mm_runs_fast(x: torch.Tensor, *sizes: int) -> bool:
    """Whether 'auto' takes `grouped_dispatch` for input x: on a CUDA GPU of compute capability ≥ 8.0 computing in
    bf16, with feature sizes grouped_mm accepts. On CPU the sorted dispatch is faster (`make bench`)."""
    if not hasattr(F, "grouped_mm") or not x.is_cuda or torch.cuda.get_device_capability(x.device)[0] < 8:
        return False  # setup.cfg allows torch >= 2.9; an older torch may have no public grouped_mm
    bf16 = torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.bfloat16
    return (bf16 or x.dtype == torch.bfloat16) and all(size % 8 == 0 for size in sizes)


def glm4_grouped_experts(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
    """`Glm4MoeExperts.forward` through `grouped_dispatch` (registered as experts_implementation "grouped")."""

    def gated(h: torch.Tensor) -> torch.Tensor:
        gate, up = h.chunk(2, dim=-1)
        return self.act_fn(gate) * up

    out = grouped_dispatch(hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj, gated)
    return out.to(hidden_states.dtype)


def glm4_auto_experts(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
    """experts_implementation "auto": grouped where grouped_mm runs fast (CUDA Ampere+, bf16), else sorted."""
    if grouped_mm_runs_fast(hidden_states, self.gate_up_proj.shape[-1], self.down_proj.shape[-1]):
        return glm4_grouped_experts(self, hidden_states, top_k_index, top_k_weights)
    return glm4_sorted_experts(self, hidden_states, top_k_index, top_k_weights)


ALL_EXPERTS_FUNCTIONS.register("sorted", glm4_sorted_experts)
ALL_EXPERTS_FUNCTIONS.register("grouped", glm4_grouped_experts)
ALL_EXPERTS_FUNCTIONS.register("auto", glm4_auto_experts)


class TopKMoE(nn.Module):
    """The repo's own MoE (variant `baseline`).

    Router: bias-free Linear(d, E) plus Gaussian noise in training. Each token goes to its top-k experts,
    weighted by a softmax over the k chosen logits; with top-1, by its softmax probability over all experts
    (Switch Transformer's gate), since a softmax over one logit is 1 whatever the router says and the loss would
    never reach the router. Expert: Linear, SiLU, dropout, Linear; no biases.
    """

    # Each expert is its own module. Under `sorted_dispatch` one that no token chose is not in the step's graph
    # and gets no gradient (the optimizer leaves it alone, momentum included), so DDP must look for such
    # parameters (`BlueberryLM.may_skip_parameters`). `grouped_dispatch` stacks every expert's weights, so
    # there an idle expert gets a zero gradient and its optimizer steps on its momentum, as the GLM-4 and
    # DeepSeek-V3 expert stacks always do. Both need an expert idle for a whole optimizer step, which is rare
    # (`moe/layer<i>/idle_experts` counts, at each log step, those idle through every step since the last one).
    skips_idle_experts = True

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.n_experts, self.top_k, self.noise_std = spec.n_experts, spec.top_k, spec.router_noise_std
        self.implementation = spec.experts_implementation  # grouped / auto / sorted (eager: sorted, GLM-4 only)
        self.router = nn.Linear(spec.d_model, spec.n_experts, bias=False)
        self.experts = nn.ModuleList(
            nn.Sequential(
                nn.Linear(spec.d_model, spec.expert_d_ff, bias=False),
                nn.SiLU(),
                Dropout(spec.dropout),
                nn.Linear(spec.expert_d_ff, spec.d_model, bias=False),
            )
            for _ in range(spec.n_experts)
        )

    def routed_experts(self) -> nn.Module:
        return self.experts

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, d], one row per token
        logits = self.router(x)
        if self.training and self.noise_std > 0:
            logits = logits + torch.randn_like(logits) * self.noise_std
        top_logits, top_idx = logits.topk(self.top_k, dim=-1)
        probs = logits.softmax(dim=-1)
        weights = top_logits.softmax(dim=-1) if self.top_k > 1 else probs.gather(-1, top_idx)
        y = self._dispatch(x, top_idx, weights)
        # under autocast the experts run in bf16/fp16: the residual stream keeps x's dtype
        return y.to(x.dtype).view(shape), switch_balance(probs, top_idx)

    def _dispatch(self, x: torch.Tensor, top_idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        d_ff = self.experts[0][0].out_features
        grouped = self.implementation == "grouped" or (
            self.implementation == "auto" and grouped_mm_runs_fast(x, x.shape[-1], d_ff)
        )
        if not grouped:
            return sorted_dispatch(x, top_idx, weights, self.n_experts, lambda e, rows: self.experts[e](rows))
        w_in = torch.stack([expert[0].weight for expert in self.experts])  # [E, d_ff, d]
        w_out = torch.stack([expert[3].weight for expert in self.experts])  # [E, d, d_ff]
        silu, dropout = self.experts[0][1], self.experts[0][2]
        return grouped_dispatch(x, top_idx, weights, w_in, w_out, lambda h: dropout(silu(h)))


class SigmoidRouterMoE(nn.Module):
    """A transformers MoE block (GLM-4 or DeepSeek-V3), its router's scores kept fp32 (ScoresInFp32), plus the routing
    statistics its forward drops.

    Routing stays the block's own (sigmoid scores plus `e_score_correction_bias`, top-k, renormalised weights,
    shared experts): a forward hook on its router keeps the router logits and chosen experts of the current call.
    """

    def __init__(self, moe: nn.Module, n_experts: int, top_k: int):
        super().__init__()
        self.moe = moe
        self.n_experts, self.top_k = n_experts, top_k
        self._router_output = None
        self._load_since_update: torch.Tensor | None = None  # the training steps' loads, from note_load
        self.moe.gate.register_forward_hook(self._keep_router_output)

    def _keep_router_output(self, module, args, output) -> None:
        self._router_output = output  # (router_logits [N, E], top-k weights [N, k], top-k indices [N, k])

    def routed_experts(self) -> nn.Module:
        return self.moe.experts

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        y = self.moe(x)
        router_logits, _, top_idx = self._router_output
        self._router_output = None
        # The Switch-style loss on the sigmoid scores normalised per token: added to the loss with
        # model.balance = aux_loss, else only logged.
        scores = router_logits.sigmoid()
        return y, switch_balance(scores / scores.sum(dim=-1, keepdim=True), top_idx)

    @torch.no_grad()
    def note_load(self, load: torch.Tensor) -> None:
        """Add one training micro-step's load (its `Routing.load`) to those the next `update_bias` evens out.

        The trainer calls this, not `forward`: a forward that kept state would hand `torch.compile` one graph for
        the first micro-step after an update (nothing kept yet) and another for the rest, and a forward that was
        not a training step (the batch-size probe's, the causality check's) would count.
        """
        self._load_since_update = load if self._load_since_update is None else self._load_since_update + load

    @torch.no_grad()
    def update_bias(self, rate: float) -> None:
        """Auxiliary-loss-free balancing (DeepSeek-V3, GLM-4): after an optimizer step, raise the routing bias of
        each expert that got less than the mean load since the last update by `rate`, lower the others'.

        The bias only shifts which experts are chosen (the gate weights use the raw scores), outside backprop.
        Loads are summed over ranks first, so every rank applies the same update.
        """
        load, self._load_since_update = self._load_since_update, None
        if load is None:
            return
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load)
        bias = self.moe.gate.e_score_correction_bias
        bias += rate * torch.sign(load.mean() - load).to(bias.dtype)


class ScoresInFp32:
    """A transformers router whose scores stay fp32 under autocast, as its forward means them to be: it casts the
    tokens and its weight to fp32, which autocast undoes for F.linear (bf16 scores step by 0.004 near 0.5, four
    times the bias update's default rate). Without autocast nothing changes."""

    def forward(self, hidden_states: torch.Tensor):
        with torch.autocast(hidden_states.device.type, enabled=False):
            return super().forward(hidden_states)


class Glm4Router(ScoresInFp32, Glm4MoeTopkRouter):
    pass


class DeepseekRouter(ScoresInFp32, DeepseekV3TopkRouter):
    pass


class Glm4MoE(SigmoidRouterMoE):
    """transformers' `Glm4MoeMoE` (model.ffn = glm4_moe)."""

    def __init__(self, config: Glm4MoeConfig):
        moe = Glm4MoeMoE(config)
        moe.gate = Glm4Router(config)
        super().__init__(moe, config.n_routed_experts, config.num_experts_per_tok)


class DeepseekMoE(SigmoidRouterMoE):
    """transformers' `DeepseekV3MoE` (model.ffn = deepseek_moe): routed experts as 3-D stacks, shared experts."""

    def __init__(self, config: DeepseekV3Config):
        moe = DeepseekV3MoE(config)
        moe.gate = DeepseekRouter(config)
        super().__init__(moe, config.n_routed_experts, config.num_experts_per_tok)
