"""Muon for the hidden matrices, AdamW for the rest: one optimizer object the `Trainer` can drive.

Design decisions:
- `torch.optim.Muon` only takes 2-D parameters and is meant for hidden weight matrices; embeddings (the
  tied token embedding / output projection, the position embedding), layer norms and biases stay with
  AdamW. `MuonWithAdamW` holds one of each and presents their parameter groups as its own, so the
  Trainer's learning-rate scheduler, gradient clipping, checkpoints and resume see one optimizer.
- Muon runs with `adjust_lr_fn="match_rms_adamw"`, which scales its update to AdamW's size, so both
  groups share the recipe's learning rate and schedule and the lever changes one thing only;
  `adamw_lr_ratio` sets the AdamW half (embeddings, norms, biases) to a multiple of that rate, and the
  scheduler scales each group from its own starting rate.
- Weight decay: the Trainer's rule (none on biases and norms) for AdamW, the recipe's value for Muon.
- The AdamW half follows the recipe's `optim`: `adamw_torch_fused` (every recipe) steps all its tensors in
  one fused kernel, as the Trainer's own AdamW does; on a GPU that saves a launch per tensor and step.
"""

from __future__ import annotations

import torch


class MuonWithAdamW(torch.optim.Optimizer):
    """`torch.optim.Muon` on `hidden_matrices`, `torch.optim.AdamW` on `adamw_groups`, stepped together."""

    def __init__(self, hidden_matrices: list[torch.Tensor], adamw_groups: list[dict], *, lr: float, weight_decay: float,
                 betas: tuple[float, float], eps: float, fused: bool | None = None, adamw_lr_ratio: float = 1.0):
        self.muon = torch.optim.Muon(hidden_matrices, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw")
        self.adamw = torch.optim.AdamW(adamw_groups, lr=lr * adamw_lr_ratio, betas=betas, eps=eps, fused=fused)
        # The same group dicts: a scheduler setting `lr` on these groups sets it on the inner optimizers.
        super().__init__(self.muon.param_groups + self.adamw.param_groups, defaults={"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        self.muon.step()
        self.adamw.step()
        return loss

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        if set(state_dict) != {"muon", "adamw"}:
            raise ValueError("this checkpoint's optimizer state is not Muon+AdamW (the run used use_muon false); "
                             "resume it with --use_muon false, or start a fresh --output_dir.")
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
        self.param_groups[:] = self.muon.param_groups + self.adamw.param_groups


def hidden_matrix_names(model: torch.nn.Module) -> set[str]:
    """The 2-D weights of the transformer blocks (attention and MLP projections), not embeddings or the head."""
    return {name for name, parameter in model.named_parameters()
            if parameter.ndim == 2 and ".h." in f".{name}" and parameter.requires_grad}


def build_muon_with_adamw(model: torch.nn.Module, args, decay_parameter_names: list[str],
                          adamw_lr_ratio: float = 1.0) -> MuonWithAdamW:
    """The optimizer for `use_muon: true`, from the TrainingArguments' learning rate, decay and Adam settings."""
    hidden = hidden_matrix_names(model)
    rest = [(name, p) for name, p in model.named_parameters() if p.requires_grad and name not in hidden]
    adamw_groups = [
        {"params": [p for name, p in rest if name in decay_parameter_names], "weight_decay": args.weight_decay},
        {"params": [p for name, p in rest if name not in decay_parameter_names], "weight_decay": 0.0},
    ]
    return MuonWithAdamW([p for name, p in model.named_parameters() if name in hidden], adamw_groups,
                         lr=args.learning_rate, weight_decay=args.weight_decay,
                         betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                         fused=True if getattr(args.optim, "value", args.optim) == "adamw_torch_fused" else None,
                         adamw_lr_ratio=adamw_lr_ratio)
