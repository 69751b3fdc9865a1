"""The TRM model: a plain `GPT2LMHeadModel` from a small `GPT2Config`, and a faster loss for training it.

Design decisions:
- The saved model is always a stock `GPT2LMHeadModel`, so anything that loads GPT-2 loads TRM.
  Model shapes live in `configs/*.json`; phase 1 always builds from random initialisation.
- Training speed on a CPU is dominated by the tied output projection: for a 256-wide model, the
  50,257-way logits are ~70% of the FLOPs, and the stock loss materialises them for the whole batch
  (batch x 256 x 50257 floats, ~800 MB at batch 16), runs log-softmax over them and keeps them for the
  backward pass, far outside every cache. `chunked_lm_loss` computes the same cross-entropy over the
  final hidden states a chunk of rows at a time, and computes its gradients in the same pass (the
  softmax is its own gradient), so no logits outlive their chunk and nothing is recomputed. Positions
  without a label (phase-2 prompts, padding) are dropped before the projection, so they cost nothing
  there. It returns the same value and gradients as the stock loss (tests compare both) without
  changing the model. Under bf16 autocast (`trm/precision.py`) its two vocabulary-sized products run in
  bf16 with fp32 accumulation, while the softmax, the loss and the summed weight gradient stay fp32.
- The MLP activation of GPT-2 (`gelu_new`) is the tanh approximation of GELU written as seven separate
  tensor operations; `use_fused_gelu` swaps it, for training, for PyTorch's single fused kernel of the
  same formula. The config (and so the saved model) keeps `gelu_new`.
- Normalisation follows `transformers`: the summed loss over label tokens (labels shifted by one,
  -100 ignored) divided by `num_items_in_batch` when the Trainer gives it (gradient accumulation), else
  by the number of label tokens in the batch.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.activations import GELUTanh, NewGELUActivation

from data.files import DataError

IGNORE_INDEX = -100
DEFAULT_LOSS_CHUNK_ROWS = 512


def load_shape(config_name: str | Path) -> GPT2Config:
    """The GPT2Config in `config_name` (a JSON file)."""
    path = Path(config_name)
    if not path.is_file():
        raise FileNotFoundError(f"model config {path} not found; pick one of configs/*.json.")
    try:
        return GPT2Config.from_json_file(str(path))
    except (ValueError, TypeError, UnicodeDecodeError) as error:  # malformed JSON, or not an object of config keys
        raise DataError(f"model config {path} is not a GPT2Config JSON object ({error}); fix it or pick one of configs/*.json.") from None


def build_model(config_name: str | Path, seed: int | None = None, zero_init_projections: bool = False,
                sinusoidal_positions: float = 0.0) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2 of the shape in `config_name` (a GPT2Config JSON file); `zero_init_projections`
    starts every block's attention and MLP output projection at zero (each block begins as the identity), as
    modded-nanogpt does; `sinusoidal_positions` > 0 starts the learned position table at the sinusoids of the
    original Transformer at that root-mean-square size (GPT-2's random start is 0.02): neighbouring positions are
    then one fixed rotation apart, which a previous-token head, the first half of an induction head, can use from
    the start. The model stays a plain `GPT2LMHeadModel`: only its starting values differ."""
    config = load_shape(config_name)
    config.n_ctx = config.n_positions  # saved with the model: llama.cpp's GGUF converter reads the context as n_ctx
    if seed is not None:
        torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    if zero_init_projections:
        with torch.no_grad():
            for block in model.transformer.h:
                block.attn.c_proj.weight.zero_()
                block.mlp.c_proj.weight.zero_()
    if sinusoidal_positions:
        with torch.no_grad():
            model.transformer.wpe.weight.copy_(sinusoid_table(config.n_positions, config.n_embd) * sinusoidal_positions * 2 ** 0.5)
    return model


def sinusoid_table(positions: int, width: int) -> torch.Tensor:
    """sin and cos of each position at geometrically spaced frequencies (Vaswani et al., 2017), interleaved."""
    frequencies = 10000.0 ** (-torch.arange(0, width, 2, dtype=torch.float64) / width)
    angles = torch.arange(positions, dtype=torch.float64)[:, None] * frequencies[None, :]
    table = torch.zeros(positions, width, dtype=torch.float64)
    table[:, 0::2], table[:, 1::2] = angles.sin(), angles.cos()[:, : width // 2]
    return table.float()


def parameter_counts(model: GPT2LMHeadModel) -> dict[str, int]:
    """Total (tied weights counted once), token+position embedding, and non-embedding parameters."""
    total = sum(p.numel() for p in model.parameters())
    embedding = model.transformer.wte.weight.numel() + model.transformer.wpe.weight.numel()
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


def use_fused_gelu(model: GPT2LMHeadModel) -> GPT2LMHeadModel:
    """Replace every `gelu_new` activation module with the fused kernel computing the same function."""
    for block in model.transformer.h:
        if isinstance(block.mlp.act, NewGELUActivation):
            block.mlp.act = GELUTanh()
    return model


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T` against valid `targets`; gradients computed in forward.

    The two vocabulary-sized products run in `product_dtype` (fp32, or bf16 under autocast, where the CPU's
    matrix units accumulate in fp32); the softmax, the loss and the accumulated weight gradient stay fp32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, row_weights, normaliser, chunk_rows, compute_grads, product_dtype, z_loss_weight):
        with torch.autocast(hidden.device.type, enabled=False):
            hidden32, weight32 = hidden.float(), weight.float()
            hidden_p, weight_p = hidden32.to(product_dtype), weight32.to(product_dtype)
            in_fp32 = product_dtype == torch.float32
            loss_sum = hidden32.new_zeros(())
            grad_hidden = torch.empty_like(hidden32) if compute_grads else None
            grad_weight = torch.zeros_like(weight32) if compute_grads else None
            # One logits buffer for all chunks: a fresh 50 MB tensor per chunk costs more in page faults
            # than the softmax itself. The logits are written vocabulary-major (`weight @ h.T`, then viewed
            # transposed): the same product runs ~1.5x faster than `h @ weight.T` (benchmarks/logits_layout.py).
            vocab = weight.shape[0]
            buffer_size = min(chunk_rows, hidden.shape[0]) * vocab
            logits_buffer = hidden32.new_empty(buffer_size)
            product_buffer = logits_buffer if in_fp32 else hidden_p.new_empty(buffer_size)
            for start in range(0, hidden.shape[0], chunk_rows):
                rows = slice(start, start + chunk_rows)
                h, chunk_targets, size = hidden32[rows], targets[rows], min(chunk_rows, hidden.shape[0] - start) * vocab
                scale = row_weights[rows, None] / normaliser  # each row's share of the loss
                product = torch.mm(weight_p, hidden_p[rows].t(), out=product_buffer[:size].view(vocab, -1)).t()
                target_logits = product.gather(1, chunk_targets[:, None]).float()
                max_logits = product.amax(dim=1, keepdim=True).float()
                logits = product if in_fp32 else logits_buffer[:size].view(vocab, -1).t().copy_(product)
                exp_logits = logits.sub_(max_logits).exp_()
                sum_exp = exp_logits.sum(dim=1, keepdim=True)
                log_normaliser = sum_exp.log() + max_logits
                loss_sum += ((log_normaliser - target_logits + z_loss_weight * log_normaliser ** 2) * row_weights[rows, None]).sum()
                if compute_grads:
                    # d(loss)/d(logits) = (exp_logits / sum_exp - one_hot(target)) * scale, the softmax term
                    # times (1 + 2 z log Z) with z-loss. Both terms are applied on the narrow side of each
                    # product (rows of `h`, of `grad_hidden`, of `weight`), so the chunk x vocabulary matrix is
                    # never rewritten for them.
                    row_scale = scale * (1 + 2 * z_loss_weight * log_normaliser) / sum_exp
                    probs = exp_logits if in_fp32 else product.copy_(exp_logits)
                    grad_hidden[rows] = torch.mm(probs, weight_p)
                    grad_hidden[rows].mul_(row_scale).sub_(weight32[chunk_targets] * scale)
                    scaled_h = (h * row_scale).to(product_dtype)
                    if in_fp32:
                        grad_weight.addmm_(probs.t(), scaled_h)
                    else:  # summed over chunks in fp32
                        grad_weight += torch.mm(probs.t(), scaled_h)
                    grad_weight.index_add_(0, chunk_targets, h * -scale)
        if compute_grads:
            ctx.save_for_backward(grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype))
        return loss_sum / normaliser

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_output, grad_weight * grad_output, None, None, None, None, None, None, None


def chunked_lm_loss(
    model: GPT2LMHeadModel,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_rows: int = DEFAULT_LOSS_CHUNK_ROWS,
    prompt_loss_weight: float = 0.0,
    z_loss_weight: float = 0.0,
) -> torch.Tensor:
    """The causal-LM loss of `model(input_ids, labels=labels)`, without materialising the full logits.

    `prompt_loss_weight` > 0 also learns the unlabelled, unpadded positions (phase-2 prompts) at that weight,
    still normalised by the labelled tokens, so the reply loss keeps its scale. `z_loss_weight` adds
    z x (log of the softmax normaliser)^2 per token (PaLM's z-loss), which keeps the logits from drifting. `model` may be wrapped
    (DistributedDataParallel, as `.module`): its forward is called through the wrapper, so the wrapper's
    gradient synchronisation sees the call.
    """
    no_positions = torch.empty(0, dtype=torch.long, device=input_ids.device)  # the model computes no logits itself
    outputs = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, output_hidden_states=True,
                    logits_to_keep=no_positions, use_cache=False)
    hidden = outputs.hidden_states[-1]  # after the final layer norm
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = labels[:, 1:].reshape(-1)
    labelled = targets != IGNORE_INDEX
    if num_items_in_batch is None:
        num_items_in_batch = labelled.sum()
    row_weights = labelled.float()
    if prompt_loss_weight > 0:
        prompt = ~labelled
        if attention_mask is not None:
            prompt &= attention_mask[:, 1:].reshape(-1).bool()
        targets = torch.where(prompt, input_ids[:, 1:].reshape(-1), targets)
        row_weights += prompt.float() * prompt_loss_weight
    # Positions without a weight (prompts, padding) never reach the output projection: in phase 2 that
    # skips most of the model's FLOPs at no change to the loss or its gradients.
    kept = row_weights > 0
    hidden, targets, row_weights = hidden[kept], targets[kept], row_weights[kept]
    normaliser = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=hidden.device).clamp(min=1)
    weight = getattr(model, "module", model).lm_head.weight
    compute_grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    device = hidden.device.type
    in_bf16 = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.bfloat16
    product_dtype = torch.bfloat16 if in_bf16 else torch.float32
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, row_weights, normaliser, chunk_rows, compute_grads, product_dtype,
                                            float(z_loss_weight))
