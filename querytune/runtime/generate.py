"""Batched generation backend (transformers): queries in, validated parses with confidences out.

    querytune predict --model runs/sft "cheap thai near me open now" "24h plumber brooklyn"

`parse` decodes greedily in its own loop: batches sorted by prompt length, left padding, a KV cache from which
finished rows are dropped (a batch costs its rows' own lengths, not its longest row's times its size), only the last
position's logits, and only the chosen token's log-probability kept. Constrained (`constrained=True`), each step's
token mask comes from the schema's grammar compiled by xgrammar (`querytune.runtime.grammar`, the grammar the vLLM
backend decodes under). Every output is read in the model's format (`querytune.runtime.formats`) and validated against
the schema: an invalid output is returned as invalid (with the reason), never raised; values of the schema's `grounded`
slots that the query does not write are dropped (and kept in `Prediction.ungrounded`). The confidence of a parse is the
probability of the whole generated sequence, exp(sum of token log-probabilities), among the tokens it was allowed.
`sample`, `beams` and `branch` (preference tuning) go through transformers' `generate`.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from querytune.runtime.formats import prompt
from querytune.runtime.model import ModelFolder
from querytune.runtime.prediction import Prediction, validate_output
from querytune.schema import Schema


def _through_eos(tokens: list[int], eos: int) -> int:
    """How many generated tokens belong to the completion: up to and including the first end of sequence."""
    return tokens.index(eos) + 1 if eos in tokens else len(tokens)


class Parser:
    """A trained model folder, loaded once (the LoRA adapter merged into the base for speed)."""

    def __init__(
        self,
        model_dir: str | Path | ModelFolder,
        schema: Schema | None = None,
        batch_size: int = 32,
        device: str = "cpu",
        constrained: bool = False,
        int8: bool = False,
    ):
        import torch
        from transformers import AutoTokenizer

        self.folder = folder = ModelFolder.open(model_dir)
        self.meta, self.schema, self.format = folder.meta, schema or folder.schema, folder.format
        self.model_version = folder.version  # what labels, cache entries and predictions carry
        self.tokenizer = AutoTokenizer.from_pretrained(folder.path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = folder.merged(torch.float32).to(device).eval()
        if int8:
            if device != "cpu":
                raise ValueError("int8: dynamic quantisation runs on the CPU only")
            self.model.model = quantize_int8(self.model.model)
        self.device, self.batch_size, self.constrained = device, batch_size, constrained
        self.max_new_tokens = folder.max_new_tokens
        self._grammar = None
        # transformers 5.20 renamed the forward's `past_key_values` to `cache`
        self._cache_keyword = (
            "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        )

    def prompts(self, texts: list[str]) -> list[str]:
        return [prompt(self.format, self.schema, self.tokenizer, t) for t in texts]

    @property
    def grammar(self):
        """The schema's grammar in this model's format, compiled for its tokenizer once
        (`querytune.runtime.grammar.Constraint`)."""
        if self._grammar is None:
            from querytune.runtime.grammar import Constraint

            self._grammar = Constraint(self.schema, self.format, self.tokenizer, self.model.config.vocab_size)
        return self._grammar

    def _constraint(
        self, prompt_length: int, prefixes: list[list[int]] | None = None, on: bool | None = None
    ) -> dict[str, Any]:
        """generate()'s logits_processor keeping the output inside the schema's grammar, when this parser is constrained
        (or `on`). `prefixes`: per row, completion tokens written before the prompt ends."""
        if not (self.constrained if on is None else on):
            return {}
        from transformers import LogitsProcessorList

        return {"logits_processor": LogitsProcessorList([self.grammar.logits_processor(prompt_length, prefixes)])}

    def parse(self, texts: list[str], progress=None) -> list[Prediction]:
        """Parse every text; empty texts are invalid without a model call. `progress(n)` after each batch."""
        results: list[Prediction | None] = [None] * len(texts)
        todo = []
        for i, t in enumerate(texts):
            if not t or not t.strip():
                results[i] = Prediction(t, None, False, 0.0, "", "empty query")
            else:
                todo.append(i)
        ids = [self.tokenizer(p, add_special_tokens=False).input_ids for p in self.prompts([texts[i] for i in todo])]
        order = sorted(range(len(todo)), key=lambda j: len(ids[j]))
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            for j, (tokens, logprob, finished) in zip(batch, self.greedy([ids[j] for j in batch])):
                raw = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
                results[todo[j]] = self._validate(texts[todo[j]], raw, logprob, finished)
            if progress:
                progress(len(batch))
        return results  # type: ignore[return-value]

    def greedy(self, prompts: list[list[int]]) -> list[tuple[list[int], float, bool]]:
        """Greedy completions of tokenised prompts, one batch: per row (tokens through the end of sequence, their
        summed log-probability, whether it ended). A finished row leaves the batch and its KV cache at once."""
        import torch
        from transformers import DynamicCache

        eos, pad, n = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id, len(prompts)
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        position = (mask.cumsum(-1) - 1).clamp(min=0)
        tokens: list[list[int]] = [[] for _ in prompts]
        logprob, finished, alive = [0.0] * n, [False] * n, list(range(n))
        grammar = self.grammar if self.constrained else None
        matchers = [grammar.matcher() for _ in prompts] if grammar else []
        bitmask = grammar.bitmask(n) if grammar else None
        cache, kv = DynamicCache(), self._cache_keyword
        with torch.inference_mode():
            logits = (
                self.model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=position,
                    use_cache=True,
                    logits_to_keep=1,
                    **{kv: cache},
                )
                .logits[:, -1]
                .float()
            )
            position = position[:, -1:]
            for step in range(self.max_new_tokens):
                if grammar:
                    grammar.mask(logits, [matchers[r] for r in alive], bitmask)
                chosen = logits.argmax(-1)
                chosen_logprob = (logits.gather(1, chosen[:, None])[:, 0] - logits.logsumexp(-1)).tolist()
                keep = []
                for k, (row, token) in enumerate(zip(alive, chosen.tolist())):
                    tokens[row].append(token)
                    logprob[row] += chosen_logprob[k]
                    if token == eos:
                        finished[row] = True
                    else:
                        keep.append(k)
                        if grammar:
                            matchers[row].accept_token(token)
                if not keep or step == self.max_new_tokens - 1:
                    break
                if len(keep) < len(alive):
                    index = torch.tensor(keep, device=self.device)
                    cache.batch_select_indices(index)
                    mask, position, chosen = mask[index], position[index], chosen[index]
                    alive = [alive[k] for k in keep]
                mask = torch.cat([mask, mask.new_ones(len(alive), 1)], dim=1)
                position = position + 1
                logits = (
                    self.model(
                        input_ids=chosen[:, None],
                        attention_mask=mask,
                        position_ids=position,
                        use_cache=True,
                        **{kv: cache},
                    )
                    .logits[:, -1]
                    .float()
                )
        return list(zip(tokens, logprob, finished))

    def sample(
        self,
        texts: list[str],
        k: int,
        temperature: float = 1.0,
        seed: int = 0,
        progress=None,
        logprobs: bool = False,
        constrained: bool | None = None,
    ) -> list[list[str]] | list[list[tuple[str, float]]]:
        """`k` sampled completions per text (free decoding, as the policy would write them), raw strings.
        `temperature=0`: the greedy completion (k=1), in the same bf16 free decoding. `logprobs`: each completion
        comes with its log-probability under the model (the sum over its tokens up to the end of sequence), as
        `(text, logprob)`: exp of it is the confidence `parse` reports. A constrained parser samples inside the
        schema's JSON unless `constrained=False`."""
        if temperature <= 0 and k != 1:
            raise ValueError("greedy decoding (temperature 0) gives one completion per text: k must be 1")
        import torch

        torch.manual_seed(seed)
        prompts = self.prompts(texts)
        lengths = [len(self.tokenizer(p, add_special_tokens=False).input_ids) for p in prompts]
        order = sorted(range(len(texts)), key=lambda j: lengths[j])
        results: list[list[str]] = [[] for _ in texts]
        per_batch = max(1, self.batch_size // k)
        for start in range(0, len(order), per_batch):
            batch = order[start : start + per_batch]
            enc = self.tokenizer(
                [prompts[j] for j in batch], return_tensors="pt", padding=True, add_special_tokens=False
            ).to(self.device)
            autocast = (
                torch.autocast("cpu", dtype=torch.bfloat16)
                if self.device == "cpu"
                else torch.autocast("cuda", dtype=torch.bfloat16)
            )
            with torch.inference_mode(), autocast:  # samples need no fp32 exactness; bf16 is ~1.6x faster on CPU
                how = (
                    {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
                    if temperature > 0
                    else {"do_sample": False}
                )
                out = self.model.generate(
                    **enc,
                    max_new_tokens=self.max_new_tokens,
                    num_return_sequences=k,
                    **how,
                    eos_token_id=self.tokenizer.eos_token_id,
                    pad_token_id=self.tokenizer.pad_token_id,
                    output_scores=logprobs,
                    return_dict_in_generate=True,
                    **self._constraint(enc["input_ids"].shape[1], on=constrained),
                )
                if logprobs:  # of the tokens as chosen, under the untempered model
                    scores = self.model.compute_transition_scores(
                        out.sequences,
                        [s * temperature if temperature > 0 else s for s in out.scores],
                        normalize_logits=True,
                    ).float()
            new = out.sequences[:, enc["input_ids"].shape[1] :]
            for row in range(new.shape[0]):
                text = self.tokenizer.decode(new[row], skip_special_tokens=True).strip()
                if logprobs:
                    tokens = new[row].tolist()
                    n = _through_eos(tokens, self.tokenizer.eos_token_id)
                    text = (text, float(scores[row, :n].sum()))
                results[batch[row // k]].append(text)
            if progress:
                progress(len(batch))
        return results

    def beams(self, texts: list[str], k: int, progress=None) -> list[list[str]]:
        """The `k` most likely completions per text by beam search (bf16, `k` beams), most likely first, raw strings.

        For a constrained parser these are the model's best `k` parses inside the schema: on the world's most typed
        texts whose greedy parse has the "what" or "where" wrong, 8 beams held the right one for 88 of 120, 8 free
        samples for 70 and 4 rivals (`branch`) for 59, at about 2.3x the rivals' cost."""
        import torch

        prompts = self.prompts(texts)
        lengths = [len(self.tokenizer(p, add_special_tokens=False).input_ids) for p in prompts]
        order = sorted(range(len(texts)), key=lambda j: lengths[j])
        results: list[list[str]] = [[] for _ in texts]
        per_batch = max(1, self.batch_size // k)
        autocast = torch.autocast("cpu" if self.device == "cpu" else "cuda", dtype=torch.bfloat16)
        for start in range(0, len(order), per_batch):
            batch = order[start : start + per_batch]
            enc = self.tokenizer(
                [prompts[j] for j in batch], return_tensors="pt", padding=True, add_special_tokens=False
            ).to(self.device)
            with torch.inference_mode(), autocast:
                out = self.model.generate(
                    **enc,
                    max_new_tokens=self.max_new_tokens,
                    num_beams=k,
                    num_return_sequences=k,
                    do_sample=False,
                    eos_token_id=self.tokenizer.eos_token_id,
                    pad_token_id=self.tokenizer.pad_token_id,
                    **self._constraint(enc["input_ids"].shape[1]),
                )
            new = out[:, enc["input_ids"].shape[1] :]
            for row in range(new.shape[0]):
                results[batch[row // k]].append(self.tokenizer.decode(new[row], skip_special_tokens=True).strip())
            if progress:
                progress(len(batch))
        return results

    def branch(self, texts: list[str], positions: int = 2, alternatives: int = 2, progress=None) -> list[list[str]]:
        """The greedy completion's nearest rivals: at each of its `positions` least likely tokens, each of the
        `alternatives` next most likely tokens takes the greedy token's place and decoding goes on greedily from
        there (bf16, like `sample`). Up to positions x alternatives raw completions per text.

        Where the model hesitates is where its parse is most often wrong (a category, a cuisine, whether a city
        follows), so these rivals differ from the greedy parse in the one decision in doubt and agree with it
        elsewhere; free samples at the same cost mostly repeat the greedy parse or change it in several places.
        """
        import torch

        prompts = self.prompts(texts)
        prompt_ids = [self.tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
        order = sorted(range(len(texts)), key=lambda j: len(prompt_ids[j]))
        results: list[list[str]] = [[] for _ in texts]
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        autocast = torch.autocast("cpu" if self.device == "cpu" else "cuda", dtype=torch.bfloat16)

        def decode_left_padded(rows: list[list[int]], max_new: int, prefixes: list[list[int]] | None = None):
            width = max(len(r) for r in rows)
            ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.device)
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
            with torch.inference_mode(), autocast:
                return self.model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=max_new,
                    do_sample=False,
                    eos_token_id=eos,
                    pad_token_id=pad,
                    output_scores=True,
                    return_dict_in_generate=True,
                    **self._constraint(width, prefixes),
                ), width

        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            out, width = decode_left_padded([prompt_ids[j] for j in batch], self.max_new_tokens)
            logp = torch.stack(out.scores, 1).float().log_softmax(-1)  # [batch, new tokens, vocab]
            forks: list[tuple[int, list[int]]] = []  # (text index, greedy prefix + rival token)
            for row, j in enumerate(batch):
                tokens = out.sequences[row, width:].tolist()
                n = _through_eos(tokens, eos)
                chosen = logp[row, torch.arange(n), torch.tensor(tokens[:n])]
                for pos in chosen.argsort()[:positions].tolist():
                    top = logp[row, pos].topk(alternatives + 1)  # constrained: tokens the schema rules out have -inf
                    rivals = [
                        t
                        for t, v in zip(top.indices.tolist(), top.values.tolist())
                        if t != tokens[pos] and v > float("-inf")
                    ][:alternatives]
                    forks += [(j, tokens[:pos] + [t]) for t in rivals]
            for f in range(0, len(forks), self.batch_size):
                chunk = forks[f : f + self.batch_size]
                cont, w = decode_left_padded(
                    [prompt_ids[j] + prefix for j, prefix in chunk],
                    max(1, self.max_new_tokens - min(len(prefix) for _, prefix in chunk)),
                    [prefix for _, prefix in chunk],
                )
                for row, (j, prefix) in enumerate(chunk):
                    tokens = prefix + cont.sequences[row, w:].tolist()
                    tokens = tokens[: _through_eos(tokens, eos)]
                    results[j].append(self.tokenizer.decode(tokens, skip_special_tokens=True).strip())
            if progress:
                progress(len(batch))
        return results

    def _validate(self, text: str, raw: str, logprob: float, finished: bool) -> Prediction:
        return validate_output(self.schema, text, raw, logprob, finished, self.max_new_tokens, self.format)


def quantize_int8(module):
    """int8 dynamic quantisation (per-channel weights, activations quantised per call) of a decoder's Linear layers but
    the MLPs' down projections, which `module` (the decoder, not its output head) keeps in fp32 beside the head. The
    down projection reads the activations with the outliers that a per-tensor int8 scale loses; quantising every Linear
    cost 10 points of intent accuracy on the world's test set, leaving those two out costs none measurable and keeps
    most of the speed (eval/RESULTS.md, "Labeling and serving benchmarks")."""
    import warnings

    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    names = {
        name
        for name, layer in module.named_modules()
        if isinstance(layer, torch.nn.Linear) and not name.endswith("down_proj")
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's notice that it moves to torchao
        return quantize_dynamic(module, dict.fromkeys(names, per_channel_dynamic_qconfig), dtype=torch.qint8)
