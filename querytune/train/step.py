"""One SFT step: what it computes (the loss on completion positions), what it costs (the FLOPs formula) and in
which dtype it runs fastest on this machine (the probe).

A step reads one padding-free row (TRL's `padding_free`: the batch's examples end to end, their boundaries in
`position_ids`, which transformers' sdpa masks block-diagonally) and projects through the LM head only the
positions a completion token is predicted from (`completion_loss`). TRL 1.16 scores every position on CPU (its
compact path needs Triton), and the head (vocabulary x hidden) is a fifth of SmolLM2-135M's FLOPs while
completions are a third of the tokens. Both are numerics-neutral: the same examples give the same loss.
Measured by `python eval/bench_sft.py` (eval/RESULTS.md, "Training speed").

The DPO and GRPO steps (`querytune.train.dpo`, `querytune.train.grpo`) take the levers that pay there: TRL's fused LM
head on the scored positions only (`labelled_positions_only`) and GRPO's sampling in bf16 with merged adapters
(`SamplingGRPOTrainer`); measured by `python eval/bench_preference.py`.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from trl import GRPOTrainer, SFTTrainer

from querytune.machine import hardware
from querytune.runtime.model import cache_dir


def completion_loss(
    model, inputs: dict, num_items: int | torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean cross-entropy over the completion tokens of `inputs` (labels -100 elsewhere), the LM head applied only
    at the positions that predict one. `num_items`: the divisor (the trainer's count over gradient accumulation);
    by default this batch's completion tokens. Returns the loss and the step's counts (tokens, sum of squared
    sequence lengths, targets, correct)."""
    targets = inputs["labels"][:, 1:]
    positions = (targets != -100).any(0).nonzero().flatten()  # union over rows; a padding-free batch is one row
    forward = {k: v for k, v in inputs.items() if k != "labels"}
    logits = model(**forward, use_cache=False, logits_to_keep=positions).logits
    wanted = targets[:, positions]
    keep = wanted != -100
    logits, wanted = logits[keep].float(), wanted[keep]
    count = keep.sum()
    loss = F.cross_entropy(logits, wanted, reduction="sum") / (count.clamp(min=1) if num_items is None else num_items)
    if "attention_mask" in inputs:  # padded rows
        lengths = inputs["attention_mask"].sum(1)
    else:  # one padding-free row: a sequence starts where its position is 0
        starts = (inputs["position_ids"][0] == 0).nonzero().flatten().tolist() + [inputs["position_ids"].shape[1]]
        lengths = torch.tensor([b - a for a, b in zip(starts, starts[1:])])
    return loss, {
        "tokens": lengths.sum(),
        "sum_sq": (lengths**2).sum(),
        "targets": count,
        "correct": (logits.detach().argmax(-1) == wanted).sum(),
    }


class CompletionSFTTrainer(SFTTrainer):
    """TRL's SFTTrainer with `completion_loss` as its loss; logs token accuracy and the step's token counts."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, counts = completion_loss(model, inputs, num_items_in_batch)
        metrics = self._metrics["train" if model.training else "eval"]
        metrics["mean_token_accuracy"].append((counts["correct"] / counts["targets"].clamp(min=1)).item())
        for name in ("tokens", "targets", "sum_sq"):  # per step, for the FLOPs of eval/bench_sft.py
            metrics[f"step_{name}"].append(float(counts[name]))
        return (loss, None) if return_outputs else loss


def packed_attention(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs,
):
    """Attention for one padding-free row (`attn_implementation="packed"`): the row's sequences, found where
    `position_ids` restart at 0, are laid side by side padded at their ends, and each attends causally within
    itself. Masked sdpa or eager over the row would score all T^2 pairs through a T x T block-diagonal mask; this
    scores sequences x longest^2. Matmuls and an fp32 softmax as transformers' eager does: CPU sdpa's backward
    was slower at these sizes. End padding is exact under a causal mask: a real token never sees a later slot."""
    if position_ids is None or query.shape[0] != 1:
        raise ValueError("packed attention takes one padding-free row with its position_ids (TRL's padding_free)")
    T = query.shape[2]
    starts = (position_ids[0] == 0).nonzero().flatten()
    lengths = torch.diff(starts, append=torch.tensor([T], device=starts.device))
    slots = torch.arange(int(lengths.max()), device=starts.device)
    index = (starts[:, None] + slots).clamp(max=T - 1)  # [sequences, longest]; slots past a sequence's end are ignored
    kept = (slots < lengths[:, None]).flatten().nonzero().flatten()
    n, longest = len(starts), len(slots)
    # index_select, not advanced indexing: its backward is an index_add, several times cheaper than an index_put
    q, k, v = (
        t[0].index_select(1, index.flatten()).unflatten(1, (n, longest)).transpose(0, 1) for t in (query, key, value)
    )
    if q.shape[1] != k.shape[1]:  # grouped-query attention: each key/value head serves a group of query heads
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    scores = torch.matmul(q, k.transpose(-1, -2)) * (scaling if scaling is not None else q.shape[-1] ** -0.5)
    causal = torch.ones(len(slots), len(slots), dtype=torch.bool, device=q.device).triu(1)
    weights = torch.softmax(scores.masked_fill(causal, float("-inf")), dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(F.dropout(weights, p=dropout, training=module.training), v)
    return out.transpose(1, 2).flatten(0, 1).index_select(0, kept).unsqueeze(
        0
    ), None  # [1, T, heads, head_dim], what the model's attention reshapes


AttentionInterface.register("packed", packed_attention)


def bf16_weights(model) -> None:
    """For bf16 autocast: store the frozen linears of `model` (a peft model) in bf16, the LM head as an untied bf16
    copy, and skip peft's cast of each adapter's input to fp32. Autocast reads every matmul's weight in bf16 anyway,
    so the products are the same; what goes is a cast of every weight at every step (the tied head's alone took
    8% of a step). Embeddings, norms, the residual stream and the adapters stay fp32."""
    head = model.get_output_embeddings()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not head and not module.weight.requires_grad:
            module.to(torch.bfloat16)
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = False
    copy = torch.nn.Linear(
        head.in_features, head.out_features, bias=False, dtype=torch.bfloat16, device=head.weight.device
    )
    copy.weight.data.copy_(head.weight.detach())
    copy.requires_grad_(False)
    model.get_base_model().set_output_embeddings(copy)


@contextlib.contextmanager
def labelled_positions_only():
    """Within this block, TRL's fused LM head (DPO's and GRPO's log-probabilities) projects only the positions
    whose label is not -100, as it does on Triton devices; elsewhere it projects every position (fixed tile shapes
    for compilers that eager CPU does not use). A preference row is half prompt or more, and the head is a fifth of
    the model. The kernel itself still picks its CPU path from its own module's check."""
    import trl.trainer.utils as trl_utils

    original = trl_utils._use_triton
    trl_utils._use_triton = lambda device: True
    try:
        yield
    finally:
        trl_utils._use_triton = original


@contextlib.contextmanager
def merged_adapters(model):
    """Within this block the LoRA adapters of `model` (a peft model) are merged into its frozen weights, so a
    decoded token costs one matmul a linear instead of three plus a scaled add; after it, the frozen weights are
    restored bit for bit from a copy (unmerging by subtraction would round bf16 weights a little every step)."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    saved = [m.get_base_layer().weight.detach().clone() for m in layers]
    model.merge_adapter()
    try:
        yield
    finally:
        for layer, weight in zip(layers, saved):
            layer.get_base_layer().weight.data.copy_(weight)
            layer.merged_adapters.clear()  # what unmerge_adapter would leave, without recomputing every delta


class SamplingGRPOTrainer(GRPOTrainer):
    """TRL's GRPOTrainer, sampling its groups faster on CPU: under the training step's bf16 autocast (transformers'
    generate runs outside autocast, where `bf16_weights`' bf16 linears would meet fp32 activations; bf16 reads half
    the weight bytes a decoded token needs) and, with `merged_sampling`, with the adapters merged
    (`merged_adapters`). The log-probabilities the loss reads are computed afresh by the step either way.

    `guides` (prompt token ids -> completion token ids): the first sample of each such prompt's group is replaced by
    its guide, so the group holds a parse the policy would not sample (`querytune.train.grpo`)."""

    def __init__(
        self, *args, merged_sampling: bool = False, guides: dict[tuple[int, ...], list[int]] | None = None, **kwargs
    ):
        super().__init__(*args, **kwargs)
        self.merged_sampling, self.guides = merged_sampling, guides or {}

    def _generate_single_turn(self, prompt_ids, *args, **kwargs):
        on_cpu = not self.use_vllm
        merged = merged_adapters(self.model) if self.merged_sampling and on_cpu else contextlib.nullcontext()
        start = time.perf_counter()
        with (
            merged,
            torch.autocast(self.accelerator.device.type, dtype=torch.bfloat16, enabled=bool(self.args.bf16) and on_cpu),
        ):
            completion_ids, logprobs = super()._generate_single_turn(prompt_ids, *args, **kwargs)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["sampling_seconds"].append(time.perf_counter() - start)
        if self.guides:
            seen = set()
            for i, ids in enumerate(prompt_ids):
                key = tuple(ids)
                if key in self.guides and key not in seen:
                    seen.add(key)
                    completion_ids[i] = list(self.guides[key])
            self._metrics[mode]["guided"].append(len(seen))
        return completion_ids, logprobs


def packed_batch(examples: list[dict[str, str]], tokenizer, size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """`size` random examples as one padding-free row, as TRL's collator builds it: prompt tokens labelled -100."""
    chosen = random.Random(seed).sample(examples, min(size, len(examples)))
    ids, labels, positions = [], [], []
    for e in chosen:
        p = tokenizer(e["prompt"], add_special_tokens=False).input_ids
        c = tokenizer(e["completion"], add_special_tokens=False).input_ids
        ids += p + c
        labels += [-100] * len(p) + c
        positions += list(range(len(p) + len(c)))
    return {
        "input_ids": torch.tensor([ids]),
        "position_ids": torch.tensor([positions]),
        "labels": torch.tensor([labels]),
    }


def lora_parameters(model, lora) -> int:
    """Adapter parameters a LoRA config adds to `model`: r x (in + out) for every linear it targets."""
    targets = lora.target_modules
    return sum(
        lora.r * (m.in_features + m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
        and m is not model.get_output_embeddings()
        and (targets == "all-linear" or any(name.endswith(t) for t in targets))
    )


def step_flops(model, n_lora: int, tokens: int, targets: int, sum_sq_lengths: int) -> float:
    """Model FLOPs of one LoRA SFT step (2 FLOPs a multiply-add), the formula eval/bench_sft.py divides by:

        4 N_frozen tokens      forward and input gradients through the frozen linears (no weight gradients)
      + 6 N_lora tokens        adapters: forward, input and weight gradients
      + 4 N_head targets       the LM head, forward and input gradient, at the positions the loss reads
      + 6 layers d_q sum(L^2)  causal attention scores and weighted sums, forward and backward, per sequence

    N_frozen counts the weights of every linear but the head; `tokens` are real tokens (no padding)."""
    config = model.config.get_text_config()
    head = model.get_output_embeddings()
    frozen = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)
    d_q = config.num_attention_heads * (
        getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    )
    return (
        4 * frozen * tokens
        + 6 * n_lora * tokens
        + 4 * head.weight.numel() * targets
        + 6 * config.num_hidden_layers * d_q * sum_sq_lengths
    )


def pick_dtype(model, lora, batch: dict, steps: int = 3, say=print, weights_in_bf16: bool = True) -> dict[str, Any]:
    """fp32 or bf16 autocast, whichever runs a LoRA training step (`completion_loss`, forward and backward) of `model`
    on `batch` faster on this machine (bf16 only when >= 5% faster: fp32 is exact; with `weights_in_bf16`, the bf16
    arm stores its weights as training will, `bf16_weights`). Measured once per machine and model (not per batch
    size: the ratio barely moves with it, and one answer per machine keeps a command's dtype from depending on its
    data or on a busy moment), cached in cache_dir()/dtype_probe.json and said either way. Returns {"dtype",
    "fp32_s", "bf16_s", "hardware", "measured", "cached"}."""
    import copy

    from peft import get_peft_model

    size = f"{model.config.model_type} {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M"
    key = f"{hardware()} | {size} | {model.config._attn_implementation}" + (
        " | bf16 weights" if weights_in_bf16 else ""
    )
    path = cache_dir() / "dtype_probe.json"
    known = json.loads(path.read_text()) if path.is_file() else {}
    if key in known:
        result = known[key]
        say(
            f"training in {result['dtype']}: the dtype probe of {result.get('measured', 'an earlier run')} "
            f"(fp32 {result['fp32_s']:.2f} s, bf16 {result['bf16_s']:.2f} s a step; {path}; --bf16/--no-bf16 to choose)"
        )
        return result | {"cached": True}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    probes = {
        dtype: get_peft_model(copy.deepcopy(model), copy.deepcopy(lora)).to(device).train()
        for dtype in ("fp32", "bf16")
    }
    if weights_in_bf16:
        bf16_weights(probes["bf16"])
    batch = {k: v.to(device) for k, v in batch.items()}
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for i in range(steps + 1):  # alternating, so a busy moment on a shared machine hits both; the first warms up
        for dtype, probe in probes.items():
            start = time.perf_counter()
            with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bf16"):
                loss, _ = completion_loss(probe, batch)
            loss.backward()
            probe.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            if i:
                times[dtype].append(time.perf_counter() - start)
    del probes
    seconds = {dtype: round(min(t), 3) for dtype, t in times.items()}  # the least disturbed step of each
    result = {
        "dtype": "bf16" if seconds["bf16"] < 0.95 * seconds["fp32"] else "fp32",
        "fp32_s": seconds["fp32"],
        "bf16_s": seconds["bf16"],
        "hardware": key,
        "measured": time.strftime("%Y-%m-%d"),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(known | {key: result}, indent=2) + "\n")
    say(
        f"dtype probe ({key}): fp32 {seconds['fp32']:.2f} s, bf16 {seconds['bf16']:.2f} s per step: "
        f"training in {result['dtype']} (kept for this machine in {path}; --bf16/--no-bf16 to choose)"
    )
    return result | {"cached": False}
