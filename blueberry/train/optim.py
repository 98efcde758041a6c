"""The study's optimizers: Muon on 2-D hidden matrices + AdamW on the rest, or AdamW alone."""

from __future__ import annotations

import torch

from blueberry.spec import TrainSpec


def build_optimizers(model: torch.nn.Module, spec: TrainSpec) -> list[torch.optim.Optimizer]:
    """One optimizer per parameter family; each param group records its peak LR in `initial_lr`."""
    groups = model.optimizer_groups()
    muon_params = groups.muon
    # torch.optim.Muon takes 2-D parameters only; GLM4's experts are stored as 3-D stacks
    # [experts, out, in] (transformers 5.x), so those go to AdamW with the embeddings and norms.
    adamw_params = groups.muon_3d + groups.adamw
    # fused: one kernel for the whole update (CPU and CUDA). Measured on the 2-core dev CPU, AdamW's step was
    # 1.5-4x faster than the foreach default for the quickstart's and the 512d MoE's parameters.
    adamw_kwargs = dict(betas=tuple(spec.adam_betas), weight_decay=spec.weight_decay, fused=True)
    if spec.optimizer == "adamw":
        return [torch.optim.AdamW(muon_params + adamw_params, lr=spec.lr, **adamw_kwargs)]
    optimizers = []
    if muon_params:
        # adjust_lr_fn="original" scales each update by sqrt(max(1, rows/cols)), as in the study.
        optimizers.append(
            torch.optim.Muon(
                muon_params,
                lr=spec.lr,
                momentum=spec.muon_momentum,
                nesterov=True,
                weight_decay=spec.muon_weight_decay,
                adjust_lr_fn="original",
            )
        )
    optimizers.append(torch.optim.AdamW(adamw_params, lr=spec.lr * spec.adamw_lr_ratio, **adamw_kwargs))
    return optimizers
