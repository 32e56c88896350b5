"""The SFT step's levers are numerics-neutral: a padding-free row and completion-only logits give the loss of padded
rows scored at every position, and bf16 weight storage gives the products bf16 autocast gives."""

from __future__ import annotations

import json
import random

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from querytune.labeled import load_labeled
from querytune.schema_file import load_schema
from querytune.train.sft import sft_examples
from querytune.train.step import bf16_weights, completion_loss, lora_parameters, packed_batch, step_flops


@pytest.fixture(scope="module")
def examples(tiny_base, small_world_master):
    schema = load_schema()
    rows, _ = load_labeled(small_world_master / "seed.jsonl", schema)
    return sft_examples(rows[:50], schema, AutoTokenizer.from_pretrained(tiny_base))


def padded_loss(model, examples, tokenizer) -> torch.Tensor:
    """Today's way: padded rows, logits at every position, transformers' own loss over the completion tokens."""
    prompts = [tokenizer(e["prompt"], add_special_tokens=False).input_ids for e in examples]
    completions = [tokenizer(e["completion"], add_special_tokens=False).input_ids for e in examples]
    width = max(len(p) + len(c) for p, c in zip(prompts, completions))
    ids = torch.full((len(examples), width), tokenizer.pad_token_id)
    labels = torch.full((len(examples), width), -100)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        labels[i, len(p) : len(p) + len(c)] = torch.tensor(c)
        mask[i, : len(p) + len(c)] = 1
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


@pytest.mark.parametrize("attention", ["sdpa", "eager", "packed"])
def test_padding_free_completion_loss_equals_the_padded_full_logit_loss(tiny_base, examples, attention):
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    model.set_attn_implementation(attention)
    batch = packed_batch(examples, tokenizer, 6, seed=1)
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    chosen = random.Random(1).sample(examples, 6)  # what packed_batch draws
    with torch.no_grad():
        loss, counts = completion_loss(model, batch)
        model.set_attn_implementation("sdpa")  # packed attention takes only a padding-free row
        reference = padded_loss(model, chosen, tokenizer)
    assert len(starts) == 6 and counts["tokens"] == batch["input_ids"].shape[1]
    assert counts["targets"] == (batch["labels"] != -100).sum()
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)


def test_bf16_weights_give_the_products_of_bf16_autocast(tiny_base, examples):
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    lora = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )
    torch.manual_seed(0)
    plain = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32), lora)
    stored = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32), lora)
    stored.load_state_dict(plain.state_dict())
    bf16_weights(stored)
    assert stored.get_output_embeddings().weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in stored.parameters() if p.requires_grad)  # the adapters train in fp32
    batch = packed_batch(examples, tokenizer, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, _ = completion_loss(plain, batch)
        b, _ = completion_loss(stored, batch)
    a.backward()
    b.backward()
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    grads = [(p.grad, q.grad) for p, q in zip(plain.parameters(), stored.parameters()) if p.requires_grad]
    assert grads and all(torch.equal(g, h) for g, h in grads)


def test_step_flops_follows_its_formula(tiny_base):
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    config = model.config
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    n_lora = lora_parameters(model, lora)
    kv = config.num_key_value_heads * config.hidden_size // config.num_attention_heads
    assert n_lora == config.num_hidden_layers * 4 * ((64 + 64) + (64 + kv))
    assert n_lora == sum(p.numel() for p in get_peft_model(model, lora).parameters() if p.requires_grad)
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    frozen = config.num_hidden_layers * (2 * 64 * 64 + 2 * 64 * kv + 3 * 64 * 128)
    head = config.vocab_size * 64
    expected = 4 * frozen * 100 + 6 * n_lora * 100 + 4 * head * 30 + 6 * 2 * 64 * 5000
    assert step_flops(model, n_lora, tokens=100, targets=30, sum_sq_lengths=5000) == expected


def test_the_levers_train_the_same_adapter_through_trl(tiny_base, small_world_master, tmp_path):
    """Fixed steps, fp32, no dropout: padded rows scored everywhere against one padding-free row with packed attention
    and completion-only logits give the same loss curve and the same adapter (the levers change cost, not training)."""
    from safetensors.torch import load_file

    from querytune.train.sft import SFTRecipe, train_sft

    schema = load_schema()
    rows, _ = load_labeled(small_world_master / "seed.jsonl", schema)
    preset = SFTRecipe(
        max_steps=6,
        batch_size=4,
        lr=1e-3,
        lora_r=4,
        lora_alpha=8,
        warmup_steps=0,
        bf16=False,
        max_minutes=None,
        padding_free=False,
        completion_logits=False,
        attention="sdpa",
    )
    levers = {"padding_free": True, "completion_logits": True, "attention": "packed"}
    for name, extra in [("before", {}), ("levers", levers)]:
        train_sft(rows[:64], schema, tmp_path / name, str(tiny_base), preset | extra, say=lambda _: None)
    losses = {
        name: [json.loads(line)["loss"] for line in (tmp_path / name / "steps.jsonl").read_text().splitlines()]
        for name in ("before", "levers")
    }
    assert len(losses["before"]) == 6 and losses["before"] == pytest.approx(losses["levers"], rel=1e-4)
    before, after = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("before", "levers"))
    assert before.keys() == after.keys() and all(torch.allclose(before[k], after[k], atol=1e-5) for k in before)
    step = json.loads((tmp_path / "levers" / "steps.jsonl").read_text().splitlines()[0])
    assert step["step_tokens"] > step["step_targets"] > 0  # the counts eval/bench_sft.py turns into FLOPs


def test_packed_attention_needs_padding_free(tiny_base, tmp_path):
    from querytune.train.sft import SFTRecipe, train_sft

    with pytest.raises(ValueError, match="padding_free"):
        train_sft(
            [],
            load_schema(),
            tmp_path / "m",
            str(tiny_base),
            SFTRecipe(attention="packed", padding_free=False),
            say=lambda _: None,
        )


def test_labelled_positions_only_gives_trls_fused_log_probs(tiny_base, examples):
    """TRL's fused head scores every position on CPU; compacted to the labelled ones, the log-probabilities (and so the
    DPO and GRPO losses) and their gradients are the same."""
    from trl.trainer.utils import add_fused_lm_head

    from querytune.train.step import labelled_positions_only

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    batch = packed_batch(examples, tokenizer, 4, seed=2)
    results = []
    for compact in (False, True):
        torch.manual_seed(0)
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32),
            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        )
        add_fused_lm_head(model.get_base_model())
        with labelled_positions_only() if compact else torch.enable_grad():
            out = model(
                input_ids=batch["input_ids"],
                position_ids=batch["position_ids"],
                labels=batch["labels"],
                fused_lm_head=True,
            )
        out.log_probs.sum().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        results.append((out.log_probs.detach(), grads))
    (full, full_grads), (compact, compact_grads) = results
    assert (compact != 0).sum() == (batch["labels"][:, 1:] != -100).sum()
    torch.testing.assert_close(compact, full, rtol=1e-5, atol=1e-5)
    for a, b in zip(compact_grads, full_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_merged_adapters_sample_as_unmerged_and_restore_the_weights_exactly(tiny_base):
    from querytune.train.step import merged_adapters

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False),
    ).eval()
    bf16_weights(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        unmerged = model(input_ids=ids).logits.float()
        with merged_adapters(model):
            merged = model(input_ids=ids).logits.float()
        after = model(input_ids=ids).logits.float()
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert torch.equal(after, unmerged)
    torch.testing.assert_close(merged, unmerged, rtol=0.05, atol=0.05)  # bf16 rounding of W + BA against W, BA apart
