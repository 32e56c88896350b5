"""Every model folder the project writes loads outside querytune as the model querytune serves: a stage trained from
another folder holds one adapter (the init's and its own combined) on the base its adapter_config.json names, an
export is plain transformers weights with its source's model_version, and each has a card that says what it was
trained from."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from typer.testing import CliRunner

from querytune.cli import app
from querytune.runtime.formats import prompt
from querytune.runtime.generate import Parser
from querytune.runtime.model import ModelFolder
from querytune.train.grpo import GRPORecipe, train_grpo
from querytune.train.targets import click_targets
from tests.test_preference import LORA, ByLength, thai_pairs

FOLDERS = ("sft", "rft", "dpo", "grpo", "export")


def cli(*args: str) -> None:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def folders(tiny_base, small_world_master, tmp_path_factory) -> dict[str, Path]:
    """sft -> rft (SFT from a folder, the path RFT trains through) -> dpo -> grpo -> an export of grpo, on the tiny
    model, through the CLI where it runs without an index. A large learning rate so each adapter changes the greedy
    parses: a folder that loads without its init's adapter answers differently."""
    root = tmp_path_factory.mktemp("folders")
    seed = str(small_world_master / "seed.jsonl")
    tiny = ["--max-steps", "4", "--batch-size", "4", "--lr", "1e-2", "--no-bf16", "--lora-r", "4"]
    cli(
        "train",
        "sft",
        "--data",
        seed,
        "--out",
        str(root / "sft"),
        "--base",
        str(tiny_base),
        "--format",
        "compact",
        *tiny,
    )
    cli("train", "sft", "--data", seed, "--out", str(root / "rft"), "--init", str(root / "sft"), *tiny)
    thai_pairs()[2].to_parquet(root / "pairs.parquet")
    (root / "dpo.yaml").write_text(yaml.safe_dump(LORA | {"lora_r": 8, "lora_alpha": 16, "batch_size": 4}))
    cli(
        "train", "dpo", "--init", str(root / "rft"), "--pairs", str(root / "pairs.parquet"), "--config",
        str(root / "dpo.yaml"), "--world", str(root), "--index", str(root), "--out", str(root / "dpo"),
        "--max-steps", "2", "--lr", "1e-2",
    )  # fmt: skip
    train_grpo(
        click_targets(small_world_master, 8, seed=0),
        ByLength(),
        root / "dpo",
        root / "grpo",
        GRPORecipe() | LORA | {"max_steps": 2, "batch_size": 4, "num_generations": 4, "lr": 1e-2, "beta": 0.04},
        say=lambda _: None,
    )
    cli("export", "--model", str(root / "grpo"), "--out", str(root / "export"))
    return {name: root / name for name in FOLDERS}


def plain_greedy(folder: Path, texts: list[str]) -> list[str]:
    """Greedy completions of `texts` from the folder loaded by plain peft (an adapter) or transformers (an export),
    with querytune's prompt, in one left-padded batch through `generate`."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    meta = json.loads((folder / "querytune.json").read_text())
    auto = AutoPeftModelForCausalLM if meta["adapter"] else AutoModelForCausalLM
    model = auto.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    qt = ModelFolder.open(folder)
    batch = tokenizer(
        [prompt(qt.format, qt.schema, tokenizer, t) for t in texts],
        add_special_tokens=False,
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        generated = model.generate(
            **batch, max_new_tokens=qt.max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id
        )
    eos, out = tokenizer.eos_token_id, []
    for tokens in generated[:, batch.input_ids.shape[1] :].tolist():
        tokens = tokens[: tokens.index(eos) + 1] if eos in tokens else tokens
        out.append(tokenizer.decode(tokens, skip_special_tokens=True).strip())
    return out


@pytest.mark.parametrize("name", FOLDERS)
def test_plain_peft_loads_the_model_querytune_serves(name, folders, small_world_master):
    texts = [json.loads(line)["text"] for line in (small_world_master / "test.jsonl").read_text().splitlines()][:100]
    served = [p.raw for p in Parser(folders[name]).parse(texts)]
    assert len(set(served)) > 1, "the parses must tell models apart"
    assert plain_greedy(folders[name], texts) == served


def test_a_stage_holds_one_adapter_on_the_base_and_cards_say_what_it_was_trained_from(folders, tiny_base):
    chain = ["sft", "rft", "dpo", "grpo"]
    for before, name in zip([None, *chain], chain):
        folder = ModelFolder.open(folders[name])
        adapter = json.loads((folders[name] / "adapter_config.json").read_text())
        assert adapter["base_model_name_or_path"] == str(tiny_base.resolve()) and folder.adapters == [folder.path]
        assert not (folders[name] / "init").exists() and "init_adapters" not in folder.meta
        card = ModelCard.load(folders[name] / "README.md").data.to_dict()
        assert card["base_model"] == tiny_base.name and card["library_name"] == "peft"
        assert card["base_model_relation"] == "adapter" and folder.meta["stage"] in card["tags"]
        facts = card["querytune"]
        assert facts["model_version"] == folder.version and facts["base_weights"]["weights_sha256"]
        if before:  # ranks add up: sft 4, rft 4, dpo 8, grpo 4
            init = ModelFolder.open(folders[before])
            assert facts["trained_from"] == {
                "folder": str(init.path),
                "stage": init.meta["stage"],
                "model_version": init.version,
            }
            assert adapter["r"] == json.loads((init.path / "adapter_config.json").read_text())["r"] + (
                8 if name == "dpo" else 4
            )
    assert (
        ModelCard.load(folders["sft"] / "README.md")
        .data.to_dict()["querytune"]["trained_on"]["data"]
        .endswith("seed.jsonl")
    )
    assert "AutoPeftModelForCausalLM.from_pretrained" in (folders["dpo"] / "README.md").read_text()


def test_export_keeps_the_model_version_and_writes_a_card(folders, tmp_path):
    source, export = ModelFolder.open(folders["grpo"]), ModelFolder.open(folders["export"])
    assert export.version == source.version  # warmed cache entries and labels of the source still match
    card = ModelCard.load(export.path / "README.md").data.to_dict()
    assert card["library_name"] == "transformers" and card["base_model_relation"] == "finetune"
    assert card["querytune"]["exported_from"] == {"stage": "grpo", "model_version": source.version}
    copy = Path(shutil.copytree(export.path, tmp_path / "copy"))
    assert ModelFolder.open(copy).version == source.version
    (copy / "schema.yaml").write_text((copy / "schema.yaml").read_text().replace("description: ", "description: a ", 1))
    assert ModelFolder.open(copy).version != source.version  # its own files changed: its own version


def test_combining_adapters_equals_merging_them_in_turn(tiny_base, folders, tmp_path):
    """Adapters on different modules (zero blocks where one has none), and a chain kept by an older folder (init/0),
    which still loads and combines."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from querytune.runtime.model import combine_adapters

    def lora(targets: list[str], out: Path, r: int, seed: int) -> Path:
        torch.manual_seed(seed)
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(tiny_base), LoraConfig(r=r, lora_alpha=3 * r, target_modules=targets)
        )
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
        model.save_pretrained(out)
        return out

    old = Path(shutil.copytree(folders["sft"], tmp_path / "old"))  # as chains were kept: init/0, then the folder's
    lora(["q_proj"], tmp_path / "q", 2, 0)
    shutil.copytree(tmp_path / "q", old / "init" / "0")
    lora(["v_proj", "down_proj"], old, 3, 1)
    meta = json.loads((old / "querytune.json").read_text())
    (old / "querytune.json").write_text(json.dumps(meta | {"init_adapters": ["init/0"]}))
    folder = ModelFolder.open(old)
    sequential = folder.merged()
    (tmp_path / "one").mkdir()
    combine_adapters(folder.adapters, tmp_path / "one", str(tiny_base))
    one = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), tmp_path / "one")
    assert json.loads((tmp_path / "one" / "adapter_config.json").read_text())["r"] == 5
    merged = one.merge_and_unload().state_dict()
    assert max((merged[k] - w).abs().max().item() for k, w in sequential.state_dict().items()) < 1e-6
    assert any(
        (merged[k] - w).abs().max() > 1e-3
        for k, w in AutoModelForCausalLM.from_pretrained(tiny_base).state_dict().items()
    )

    config = json.loads((old / "adapter_config.json").read_text())
    (old / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    with pytest.raises(ValueError, match="use_dora does not combine"):
        combine_adapters(folder.adapters, tmp_path / "one", str(tiny_base))
