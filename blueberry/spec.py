"""The run spec: one validated description of an experiment run.

A spec is data (JSON under `experiments/`); every field has a default so a spec can be short.
Overrides (CLI, W&B agent) are merged into the raw dict first and the whole spec is validated once.
"""

from __future__ import annotations

import hashlib
import json
import re
import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from blueberry.models import registry

VARIANTS = tuple(registry.PRESETS)
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


def _admits_bool(annotation: Any) -> bool:
    return annotation is bool or any(_admits_bool(arg) for arg in typing.get_args(annotation))


def _holds_bool(value: Any) -> bool:
    """A bool, or a list holding one (adam_betas): one level only, so a hostile deep list costs no recursion."""
    return isinstance(value, bool) or (isinstance(value, (list, tuple)) and any(isinstance(v, bool) for v in value))


def check_path(value: str) -> str:
    """A string the run will open as a path must be one the OS accepts: no NUL, at most 4096 bytes (PATH_MAX)
    in all and 255 (NAME_MAX) per component; else it fails mid-run with ENAMETOOLONG."""
    encoded = value.encode("utf-8", "surrogateescape")
    if b"\x00" in encoded:
        raise ValueError("must not contain a NUL character")
    if len(encoded) > 4096:
        raise ValueError(f"is {len(encoded):,} bytes long, more than a path may be (4096)")
    longest = max(encoded.split(b"/"), key=len)
    if len(longest) > 255:
        raise ValueError(f"has a path component of {len(longest):,} bytes, more than a file name may be (255)")
    return value


class _Strict(BaseModel):
    # No NaN/inf anywhere: JSON's `1e400` and `NaN` parse to them, and no field means them.
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads True as 1 and 1.0 (`--model.n_layers=True` would build one layer). Its other
        # coercions stay: "3" -> 3 (W&B YAML values may be quoted) and 4.0 -> 4 (q_uniform proposes floats).
        if _holds_bool(value) and not _admits_bool(cls.model_fields[info.field_name].annotation):
            raise ValueError("must be a number or text, not a boolean")
        return value


class ModelSpec(_Strict):
    """Architecture: attention × feed-forward (or a preset naming both) and the shape. The vocabulary size comes
    from the tokenizer."""

    # Literal types built from the registry: pydantic names the allowed values, and a typo gets "did you mean".
    variant: Literal[tuple(registry.PRESETS)] | None = Field(  # type: ignore[valid-type]
        None,
        description=f"Preset setting attention and ffn: {', '.join(VARIANTS)}. Default {registry.DEFAULT_PRESET!r} "
        "when neither attention nor ffn is set; else the preset naming the pair, if any.",
    )
    attention: Literal[tuple(registry.ATTENTIONS)] | None = Field(  # type: ignore[valid-type]
        None, description=f"Attention: {' | '.join(registry.ATTENTIONS)}."
    )
    ffn: Literal[tuple(registry.FFNS)] | None = Field(  # type: ignore[valid-type]
        None, description=f"Feed-forward: {' | '.join(registry.FFNS)}."
    )
    balance: Literal["aux_loss", "bias_update", "none"] | None = Field(
        None,
        description="MoE load balancing: the Switch auxiliary loss, DeepSeek-V3's auxiliary-loss-free routing-bias "
        "update (sigmoid-router FFNs), or none. Default: the FFN's (registry.py).",
    )
    bias_update_rate: float = Field(
        1e-3, ge=0, le=1, description="Routing-bias change per optimizer step with balance bias_update."
    )
    d_model: int = Field(128, ge=8, le=16384, description="Hidden size.")
    n_layers: int = Field(2, ge=1, le=128)
    n_heads: int = Field(4, ge=1, le=256)
    max_seq_len: int = Field(1024, ge=8, le=131072, description="Positional (RoPE) limit; data.seq_len must fit.")
    d_ff: int = Field(512, ge=1, le=1_048_576, description="Width of the dense DeepSeek-V3 MLP (ffn mlp).")
    n_experts: int = Field(4, ge=1, le=1024, description="Routed experts (routed FFNs).")
    top_k: int = Field(2, ge=1, le=1024, description="Experts chosen per token.")
    expert_d_ff: int = Field(256, ge=1, le=1_048_576, description="Width of one routed expert.")
    n_shared_experts: int = Field(1, ge=0, le=64, description="Shared experts (ffn glm4_moe, deepseek_moe).")
    router_noise_std: float = Field(0.1, ge=0, le=100, description="Gaussian router noise in training (ffn topk_moe).")
    balance_loss_weight: float = Field(
        0.01, ge=0, le=1000, description="Switch-style load-balancing loss weight (balance aux_loss)."
    )
    q_lora_rank: int = Field(128, ge=1, le=65536, description="MLA query latent rank.")
    kv_lora_rank: int = Field(128, ge=1, le=65536, description="MLA key/value latent rank.")
    qk_nope_head_dim: int = Field(
        0, ge=0, le=4096, description="MLA non-RoPE query/key dims per head (0 as in the study)."
    )
    rope_theta: float = Field(10000.0, gt=0, le=1e12)
    dropout: float = Field(0.1, ge=0, lt=1)
    init_std: float = Field(0.02, gt=0, le=1)
    experts_implementation: Literal["auto", "sorted", "grouped", "eager", "grouped_mm"] = Field(
        "auto",
        description="How the routed experts run: 'sorted' (tokens sorted by expert, one matmul each; reads the "
        "expert counts to the host once per layer), 'grouped' (one torch grouped_mm with offsets kept on the "
        "device: no host sync), 'auto' (grouped on CUDA GPUs where grouped_mm runs: Ampere+ in bf16, else sorted); "
        "GLM-4 / DeepSeek-V3 blocks also take transformers' 'eager' loop and its 'grouped_mm' "
        "(`make bench` measures them).",
    )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def is_moe(self) -> bool:
        return registry.FFNS[self.ffn].routed

    @property
    def label(self) -> str:
        """The preset name, or attention-ffn for a pair no preset names: run names, tags, the W&B `variant` key."""
        return self.variant or f"{self.attention}-{self.ffn}"

    @model_validator(mode="after")
    def _resolve_choices(self) -> ModelSpec:
        """Fill attention and ffn from the preset (or the preset from the pair), then the balance default."""
        if self.variant is None and self.attention is None and self.ffn is None:
            self.variant = registry.DEFAULT_PRESET
        if self.variant is not None:
            preset = registry.PRESETS[self.variant]
            for field_name in ("attention", "ffn"):
                chosen, implied = getattr(self, field_name), getattr(preset, field_name)
                if chosen is not None and chosen != implied:
                    raise ValueError(
                        f"variant {self.variant!r} sets {field_name} {implied!r}, but {field_name} is {chosen!r}: "
                        f"drop one of model.variant and model.{field_name}"
                    )
            self.attention, self.ffn = preset.attention, preset.ffn
        else:
            self.attention = self.attention or registry.PRESETS[registry.DEFAULT_PRESET].attention
            self.ffn = self.ffn or registry.PRESETS[registry.DEFAULT_PRESET].ffn
            preset = registry.preset_for(self.attention, self.ffn)
            self.variant = preset.name if preset else None
        ffn = registry.FFNS[self.ffn]
        if self.balance is None:
            self.balance = ffn.balance
        elif not ffn.routed and self.balance != "none":
            raise ValueError(f"balance {self.balance!r} needs a routed ffn; ffn {self.ffn!r} routes nothing")
        elif self.balance == "bias_update" and not ffn.bias_router:
            routers = ", ".join(f.name for f in registry.FFNS.values() if f.bias_router)
            raise ValueError(
                f"balance 'bias_update' needs a router with a correction bias ({routers}), not {self.ffn!r}"
            )
        return self

    @model_validator(mode="after")
    def _check_shape(self) -> ModelSpec:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head dim d_model/n_heads = {self.head_dim} must be even for RoPE")
        if self.top_k > self.n_experts:
            raise ValueError(f"top_k ({self.top_k}) cannot exceed n_experts ({self.n_experts})")
        min_experts = registry.FFNS[self.ffn].min_experts
        if self.n_experts < min_experts:
            raise ValueError(f"the {self.ffn} router needs n_experts >= {min_experts}")
        grouped = self.experts_implementation in ("grouped", "grouped_mm") and registry.FFNS[self.ffn].routed
        if grouped and (self.d_model % 8 or self.expert_d_ff % 8):  # 'auto' checks this and takes 'sorted'
            raise ValueError(
                f"experts_implementation '{self.experts_implementation}' needs d_model ({self.d_model}) and "
                f"expert_d_ff ({self.expert_d_ff}) to be multiples of 8 (grouped_mm's 16-byte strides)"
            )
        return self


class DataSpec(_Strict):
    """Corpus, tokenizer, split and windows."""

    dataset: str = Field(
        "austen",
        description="'austen' (embedded corpus), a local .jsonl/.json/.parquet/.txt/.csv file (optionally .gz) "
        "or directory of them, "
        "or a Hugging Face dataset name.",
    )
    dataset_config: str | None = Field(None, description="HF dataset config name (e.g. cosmopedia-v2).")
    dataset_split: str = Field("train", description="Split of the source dataset to read documents from.")
    text_field: str = "text"
    id_field: str | None = Field("id", description="Document id field; missing ids fall back to a content hash.")
    streaming: bool = Field(False, description="Stream a remote dataset instead of downloading it whole.")
    max_docs: int | None = Field(None, ge=1, le=2**63 - 1, description="Use only the first N documents.")
    max_chars_per_doc: int | None = Field(None, ge=1, le=2**63 - 1, description="Cut each document to N characters.")
    max_tokens: int | None = Field(
        None,
        ge=64,
        le=2**63 - 1,
        description="Cap on training-split tokens; validation is cut to the same share (prepare.val_cap).",
    )
    val_fraction: float = Field(0.1, gt=0, lt=1, description="Share of documents held out (by id hash).")
    tokenizer: str = Field(
        "bpe", description="'bpe' trains a byte-level BPE on the train split; otherwise an AutoTokenizer name or path."
    )
    vocab_size: int = Field(8192, ge=260, le=262144, description="Vocabulary size of the trained BPE.")
    seq_len: int = Field(128, ge=8, le=131072, description="Context length of training and validation windows.")
    leakage_ngram: int = Field(13, ge=2, le=64, description="n for the token n-gram leakage audit.")

    @field_validator("dataset", "tokenizer")
    @classmethod
    def _name_or_path(cls, value: str) -> str:
        if not value.strip():  # "" would be read as the path ".": the working directory
            raise ValueError("must be a name or a path, not empty")
        return check_path(value)


class TrainSpec(_Strict):
    """Optimisation recipe. `steps`, warmup and the schedule all count optimizer steps."""

    steps: int = Field(200, ge=1, le=10_000_000, description="Optimizer steps.")
    batch_size: Annotated[int, Field(ge=1, le=65536)] | Literal["auto"] = Field(
        16,
        description="Micro-batch size (windows per rank); 'auto' picks the largest that fits and keeps "
        "effective_batch with gradient accumulation.",
    )
    grad_accum: int = Field(1, ge=1, le=1024, description="Micro-batches per optimizer step.")
    effective_batch: int | None = Field(
        None, ge=1, le=1_048_576, description="Windows per optimizer step over all ranks; only with batch_size 'auto'."
    )
    optimizer: Literal["muon", "adamw"] = Field(
        "muon",
        description="muon: Muon on every hidden weight matrix (expert stacks included) + AdamW on the rest; "
        "adamw: AdamW on everything.",
    )
    lr: float = Field(0.01, gt=0, le=10, description="Peak LR (Muon's when optimizer=muon).")
    adamw_lr_ratio: float = Field(0.1, gt=0, le=100, description="AdamW LR = ratio × lr when optimizer=muon.")
    weight_decay: float = Field(
        0.1,
        ge=0,
        le=10,
        description="AdamW weight decay of the hidden matrices (optimizer adamw); the embedding, "
        "norm gains and biases never decay.",
    )
    muon_weight_decay: float = Field(0.0, ge=0, le=10)
    muon_momentum: float = Field(0.95, ge=0, lt=1)
    adam_betas: tuple[float, float] = (0.9, 0.95)
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_fraction: float = Field(0.1, ge=0, lt=1, description="Warmup length as a share of steps.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine floor as a share of the peak LR.")
    grad_clip: float | None = Field(1.0, gt=0, le=1e6, description="Global grad-norm clip; null for none.")
    eval_every: int = Field(
        50,
        ge=1,
        le=10_000_000,
        description="Evaluate on the validation set (its max_tokens share when capped) every N optimizer steps.",
    )
    log_every: int = Field(10, ge=1, le=10_000_000, description="Log train metrics every N optimizer steps.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="torch CPU threads (default: OMP_NUM_THREADS, else the usable cores other processes leave free, "
        "followed as they change while the run trains).",
    )
    progress: bool = Field(True, description="Show a progress bar.")
    compile: bool | Literal["auto"] = Field(
        "auto",
        description="torch.compile the model; 'auto': on CUDA GPUs for runs of at least 4,000 micro-steps (optimizer "
        "steps × accumulation; shorter runs were faster eager on an H200), never on CPU (`make bench` and "
        "`blueberry gpu-check` measure whether it pays).",
    )
    chunked_loss: bool = Field(
        True,
        description="LM head + cross-entropy in chunks of tokens (never the whole batch's fp32 logits); "
        "false: full logits, then the loss.",
    )
    price_per_hour: float | None = Field(
        None,
        ge=0,
        description="USD per device-hour for the run's cost; default $BLUEBERRY_PRICE_PER_HOUR, else the GPU table.",
    )
    checkpoint_every: int | None = Field(
        None,
        ge=1,
        le=10_000_000,
        description="Checkpoint every N optimizer steps and at the end (null: only when stopped by a signal).",
    )
    keep_checkpoints: int = Field(3, ge=1, le=100_000, description="Keep the last K checkpoints.")

    @model_validator(mode="after")
    def _check(self) -> TrainSpec:
        for beta in self.adam_betas:
            if not 0 <= beta < 1:
                raise ValueError(f"adam_betas must lie in [0, 1), got {list(self.adam_betas)}")
        if self.batch_size == "auto":
            if self.effective_batch is None:
                raise ValueError("batch_size 'auto' needs effective_batch (windows per optimizer step)")
            if self.grad_accum != 1:
                raise ValueError("grad_accum is derived when batch_size is 'auto' (from effective_batch): leave it out")
        elif self.effective_batch is not None:
            raise ValueError("effective_batch is only used with batch_size 'auto' (else batch_size × grad_accum)")
        return self


class TrackingSpec(_Strict):
    """Where results go: W&B and the local run record.

    W&B fields left unset (null) follow W&B's own settings (WANDB_PROJECT, `wandb/settings`, ...), then our
    defaults (blueberry.tracking.wandb_settings); a value set here wins over both.
    """

    wandb: Literal["auto", "online", "offline", "disabled"] = Field(
        "auto",
        description="auto: W&B's own mode setting (WANDB_MODE, `wandb offline`/`wandb disabled`/`wandb online`), "
        "else online when an API key exists, else offline.",
    )
    project: str | None = Field(
        None, pattern=NAME_PATTERN, description="W&B project; default WANDB_PROJECT, else blueberry."
    )
    entity: str | None = Field(
        None, pattern=NAME_PATTERN, description="W&B entity; default W&B's (WANDB_ENTITY, login)."
    )
    group: str | None = Field(
        None, pattern=NAME_PATTERN, description="W&B group; default WANDB_RUN_GROUP, else the experiment."
    )
    job_type: str | None = Field(
        None, pattern=NAME_PATTERN, description="W&B job type; default WANDB_JOB_TYPE, else train."
    )
    notes: str | None = Field(None, max_length=4096, description="W&B notes; default WANDB_NOTES.")
    runs_root: str = Field("runs", description="Directory holding the local run records.")
    wandb_dir: str | None = Field(
        None,
        min_length=1,
        max_length=4096,
        description="Where W&B writes its files (wandb.init's dir: <dir>/wandb/offline-run-*); default WANDB_DIR, "
        "else the run's own directory, runs/<experiment>/<run_id>/.",
    )
    wandb_checkpoints: bool = Field(
        False,
        description="Log each checkpoint to W&B as a `model` artifact (aliases latest, step-N, best) and the final "
        "weights as the run's model artifact.",
    )
    system_metrics: bool = Field(
        True,
        description="W&B system metrics (CPU, memory, GPU, network) in the run; unset, W&B's own setting decides "
        "(WANDB__DISABLE_STATS, else on).",
    )

    @field_validator("runs_root")
    @classmethod
    def _check_runs_root(cls, value: str) -> str:
        if not value:
            raise ValueError("must be a directory path, not empty")
        return check_path(value)


class RunSpec(_Strict):
    """A complete, validated experiment run."""

    name: str | None = Field(
        None, pattern=NAME_PATTERN, description="Run name; default derives from experiment, variant, lr and seed."
    )
    experiment: str = Field("default", pattern=NAME_PATTERN, description="Experiment id: the W&B group.")
    tags: list[str] = Field(default_factory=list, max_length=64)
    seed: int = Field(42, ge=0, le=2**32 - 1)
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)

    @model_validator(mode="after")
    def _check(self) -> RunSpec:
        if self.data.seq_len > self.model.max_seq_len:
            raise ValueError(f"data.seq_len ({self.data.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len})")
        for tag in self.tags:
            if not tag or len(tag) > 64:
                raise ValueError(f"tags must be 1-64 characters, got {tag!r}")
        return self

    @property
    def run_name(self) -> str:
        """Deterministic, human-readable run name (W&B display name)."""
        if self.name:
            return self.name
        return f"{self.experiment}-{self.model.label}-lr{self.train.lr:g}-s{self.seed}"

    def to_json_dict(self) -> dict:
        return self.model_dump(mode="json")

    def spec_hash(self) -> str:
        """The run's identity: a hash of the validated spec (canonical JSON) less BOOKKEEPING. A run started again
        with the same spec, or with other bookkeeping settings, is found by it and resumed."""
        return _digest({**self.model_dump(mode="json", exclude=BOOKKEEPING), **self._math_since()})

    def legacy_spec_hash(self) -> str:
        """spec_hash as run records and checkpoints written before 2026-12-04 hold it: over every field."""
        return _digest({**self.to_json_dict(), **self._math_since()})

    def _math_since(self) -> dict:
        """Where the same spec came to compute something else, a mark of it, so that no checkpoint or run record
        of the old math is resumed under the new: a top-1 routed model weights its expert by the router's score
        since 2026-12-05 (README, "The model space"); before, by 1, and its router never learned from the loss."""
        return {"_top1_gate": "router score"} if self.model.is_moe and self.model.top_k == 1 else {}


# Settings that pace, show, keep or price a run, never its math (train.threads changes the order of float sums,
# not what is summed): a run started again with other values of these is the same run.
BOOKKEEPING = {
    "train": {"progress", "threads", "checkpoint_every", "keep_checkpoints", "price_per_hour"},
    "tracking": {"runs_root"},
}


def _digest(tree: dict) -> str:
    return hashlib.sha256(json.dumps(tree, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def safe_name(text: str) -> str:
    """A filesystem- and W&B-safe version of a name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "run"
