"""Score every method at every keep ratio on the proxy task, reusing all work that can be shared.

Per scene: the image is encoded once per distinct set of vision options; instruction attention is
computed once per question and LLM layer; the answer is one prefill.  Question-independent selectors
give one kept set per image, so the image prefix is computed once and each question adds only its own
tokens; question-dependent selectors (PTP with α > 0, FastV) keep K tokens each, so their prefills for
one question run as one batch.  Answers are the greedy first token, exactly what
``adapter.generate(..., max_new_tokens=1)`` returns (a test holds that).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch

from ptp_ros.pipeline import Pipeline, candidate_relevance
from ptp_ros.proxy import Question, Scene
from ptp_ros.pruning import NO_REGION, InLLMPruning, instruction_relevance, resolve_budget
from ptp_ros.vlm.attention import attention_rows, layer_inputs
from ptp_ros.vlm.base import PreparedInput, VisualTokens
from ptp_ros.vlm.in_llm import causal_mask, kept_prompt_mask
from ptp_ros.vlm.stock_adapter import StockModelAdapter, placeholder_positions

from ..proxy.auxiliary import overlapping
from ..proxy.data import answer_logits, answer_token, kept_positions, prefix_embeddings, question_suffix
from ..rows import Row
from .methods import adapter_variant

GLOBAL_ONLY = "global view only"
FULL = "all tokens"
DOWNSCALED = "max_pixels (down-scaled image)"


@dataclass
class Results:
    """Per question (in evaluation order): metadata, and per (label, ratio) correctness and target recall."""

    qtypes: list[str] = field(default_factory=list)
    scenes: list[int] = field(default_factory=list)
    text_tokens: list[int] = field(default_factory=list)  # prompt tokens that are not visual, per question
    visual_tokens: list[int] = field(default_factory=list)  # visual tokens of the unpruned prompt, per question
    region_sizes: list[list[int]] = field(default_factory=list)  # per question, what a per-region pick runs over
    correct: dict[tuple[str, float], list[int]] = field(default_factory=lambda: defaultdict(list))
    predicted: dict[tuple[str, float], list[int]] = field(default_factory=lambda: defaultdict(list))
    recall: dict[tuple[str, float], list[float]] = field(default_factory=lambda: defaultdict(list))
    kept_ratio: dict[tuple[str, float], list[float]] = field(default_factory=lambda: defaultdict(list))
    latency_ms: dict[tuple[str, float], list[dict]] = field(default_factory=lambda: defaultdict(list))  # per stage


class Evaluator:
    """Scores methods on scenes with one adapter of any family (LLaVA-NeXT, InternVL, Qwen2.5-VL, Qwen3-VL).

    Whatever else of the visual tokens the family's LLM reads besides their embeddings (Qwen3-VL's DeepStack)
    reaches every row through the adapter (``llm_visual_inputs``, ``after_llm_layer``): the kept tokens' share
    of it at their positions, every token's in the layers below an in-LLM row's prune layer.

    Rows beyond the methods: all tokens; the global view only, for a model that has one; and, for a
    model whose processor takes any resolution (``adapter.downscaled``: Qwen2.5-VL), the image read at
    the resolution that yields each ratio's token count, the baseline pruning must beat.
    """

    def __init__(self, adapter: StockModelAdapter, methods: list[Row], ratios: tuple[float, ...]):
        self.model, self.processor = adapter.model, adapter.processor
        self.tokenizer = self.processor.tokenizer
        self.methods, self.ratios = methods, tuple(r for r in ratios if r < 1.0)
        self.base = adapter
        self._variants: dict[object, StockModelAdapter] = {adapter.options: adapter}
        self._pipelines: dict[tuple, Pipeline] = {}
        self.downscales = adapter.supports_downscaling

    def variant(self, changes: tuple = ()) -> StockModelAdapter:
        """The adapter with some options changed, over the same model, built once per distinct options."""
        options = dataclasses.replace(self.base.options, **dict(changes))
        if options not in self._variants:
            self._variants[options] = adapter_variant(self.base, changes)
        return self._variants[options]

    def pipeline(self, m: Row) -> Pipeline:
        """The library's pipeline for a method (its selection is the one ``Pipeline.answer`` makes), built once."""
        if m.key() not in self._pipelines:
            self._pipelines[m.key()] = Pipeline(self.variant(m.adapter), m.pipeline_config(max_new_tokens=1))
        return self._pipelines[m.key()]

    def _vision(self, m: Row) -> tuple:
        """The option changes that matter to encoding (all but the LLM layer)."""
        return tuple((k, v) for k, v in m.adapter if k != "llm_layer")

    @torch.no_grad()
    def scene(
        self, scene: Scene, questions: list[Question], results: Results, methods: list[Row] | None = None
    ) -> None:
        """Score ``methods`` (default: all) on one scene's questions, appending to ``results``."""
        methods = self.methods if methods is None else methods
        base = self.base.prepare(scene.image, questions[0].text)
        ids0 = base.inputs["input_ids"][0]
        p, n = _image_span(self.base, base)
        prefix_ids = ids0[:p]
        suffixes = [question_suffix(self.processor, q.text) for q in questions]
        if not torch.equal(suffixes[0], ids0[p + n :]):
            raise RuntimeError("prompt split disagrees with the processor's tokenization")
        full_positions = self.base.rope_positions(base)
        answers = torch.tensor([answer_token(self.tokenizer, q.answer) for q in questions])
        visuals: dict[tuple, VisualTokens] = {}
        for m in methods:
            if self._vision(m) not in visuals:
                visuals[self._vision(m)] = self.variant(self._vision(m)).encode(base)
        reference = next(iter(visuals.values()))
        features = reference.features
        cover = [_covering(reference, scene, q) for q in questions]

        def record(label: str, ratio: float, kept_sets: list[torch.Tensor], logits: torch.Tensor, of: int = n) -> None:
            """``of``: the token count the kept sets index (another than ``n``: a re-read image, whose
            tokens are not the ones the target recall is counted on)."""
            predicted = logits.argmax(-1)
            correct = (predicted == answers).tolist()
            for i, kept in enumerate(kept_sets):
                results.correct[(label, ratio)].append(int(correct[i]))
                results.predicted[(label, ratio)].append(int(predicted[i]))
                results.recall[(label, ratio)].append(_recall(kept, cover[i], n) if of == n else float("nan"))
                results.kept_ratio[(label, ratio)].append(kept.numel() / n)

        def prefill(kept_sets: list[torch.Tensor], question_suffixes: list[torch.Tensor]) -> torch.Tensor:
            """Answer logits with one kept set shared by all questions, or one kept set per question."""
            embeds = torch.stack([prefix_embeddings(self.model, prefix_ids, features[k]) for k in kept_sets])
            positions = _stacked([kept_positions(full_positions, p, n, k) for k in kept_sets])
            visual_inputs = self.base.llm_visual_inputs(
                _prefix_ids(prefix_ids, kept_sets, self.base.image_token_id), reference, torch.cat(kept_sets)
            )
            return answer_logits(
                self.model,
                embeds,
                question_suffixes,
                self.tokenizer.pad_token_id,
                positions,
                visual_inputs=visual_inputs,
            )

        everything = torch.arange(n)
        record(FULL, 1.0, [everything] * len(questions), prefill([everything], suffixes))
        if reference.scores.global_region is not None:
            glob = torch.nonzero(reference.scores.region == reference.scores.global_region).squeeze(1)
            record(GLOBAL_ONLY, 0.0, [glob] * len(questions), prefill([glob], suffixes))

        prompts = [
            PreparedInput(_with_suffix(base.inputs, p + n, suffixes[qi]), (scene.image.shape[:2],), q.text)
            for qi, q in enumerate(questions)
        ]
        unique: dict[tuple, Row] = {}
        for m in methods:
            unique.setdefault(m.key(), m)
        plans = {
            key: plan for key, m in unique.items() if (plan := m.in_llm_plan(self.base.options.llm_layer)) is not None
        }
        rows: dict[tuple[tuple, int], torch.Tensor] = {}
        for m in methods:
            if m.selector.bound.needs_relevance and not m.selector.probe_candidates and m.key() not in plans:
                for qi in range(len(questions)):
                    if (m.adapter, qi) not in rows:
                        rows[(m.adapter, qi)] = self.variant(m.adapter).instruction_attention(
                            prompts[qi], visuals[self._vision(m)]
                        )
        in_llm = (
            [
                self._in_llm_question(
                    [(key, unique[key], plans[key]) for key in plans],
                    visuals,
                    reference,
                    prefix_ids,
                    suffix,
                    full_positions,
                )
                for suffix in suffixes
            ]
            if plans
            else []
        )
        for ratio in self.ratios:
            budget = resolve_budget(n, keep_ratio=ratio)
            if self.downscales:
                self._downscaled(scene, questions, suffixes, budget, ratio, record)
            computed: dict[tuple, tuple[list[torch.Tensor], torch.Tensor]] = {}
            dependent: list[tuple[tuple, Row]] = []
            for key, m in unique.items():
                visual = visuals[self._vision(m)]
                scores = dataclasses.replace(visual.scores, features=features)
                if key in plans:
                    pairs = [in_llm[qi][(key, ratio)] for qi in range(len(questions))]
                    computed[key] = ([k for k, _ in pairs], torch.stack([lg for _, lg in pairs]))
                elif not m.selector.bound.needs_relevance:
                    kept = self.pipeline(m).select(n, scores, budget).kept
                    computed[key] = ([kept] * len(questions), prefill([kept], suffixes))
                else:
                    dependent.append((key, m))
            per_question: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
            for qi in range(len(questions)):
                kept_sets = []
                for _key, m in dependent:
                    visual = visuals[self._vision(m)]
                    selector = m.selector
                    if selector.probe_candidates:
                        relevance = candidate_relevance(
                            self.variant(m.adapter),
                            prompts[qi],
                            visual,
                            selector.bound.options["config"],
                            budget,
                            selector.probe_candidates,
                            selector.reduce,
                        )
                    else:
                        relevance = instruction_relevance(rows[(m.adapter, qi)], selector.reduce)
                    scores = dataclasses.replace(visual.scores, features=features, relevance=relevance)
                    kept_sets.append(self.pipeline(m).select(n, scores, budget).kept)
                for group in _same_length(kept_sets):
                    logits = prefill([kept_sets[j] for j in group], [suffixes[qi]] * len(group))
                    for row, j in enumerate(group):
                        per_question[dependent[j][0]].append((kept_sets[j], logits[row]))
            for key, pairs in per_question.items():
                computed[key] = ([k for k, _ in pairs], torch.stack([lg for _, lg in pairs]))
            for m in methods:
                kept_sets, logits = computed[m.key()]
                record(m.label, ratio, kept_sets, logits)
        results.qtypes.extend(q.qtype for q in questions)
        results.scenes.extend([scene.seed] * len(questions))
        results.text_tokens.extend(p + int(suffix.shape[0]) for suffix in suffixes)
        results.visual_tokens.extend([n] * len(questions))
        results.region_sizes.extend([reference.scores.region_sizes().tolist()] * len(questions))

    def _in_llm_question(
        self,
        entries: list[tuple[tuple, Row, InLLMPruning]],
        visuals: dict,
        reference: VisualTokens,
        prefix_ids: torch.Tensor,
        suffix: torch.Tensor,
        full_positions: torch.Tensor | None,
    ) -> dict[tuple, tuple[torch.Tensor, torch.Tensor]]:
        """{(method key, ratio): (kept, answer logits)} for the methods that rank and drop inside the LLM,
        for one question at every ratio.  The layers below the prune layer run once, over the whole prompt
        (one forward that stops there); each method's ranking rows are read once from its scoring layer's
        input with the library's ``attention_rows``; then, per ratio, the kept rows of every method run
        through the remaining layers as one batch, at their original positions.  What ``Pipeline.answer``
        computes through its hooks (a test holds that)."""
        features = reference.features
        p = prefix_ids.shape[0]
        n = features.shape[0]
        ids = torch.cat(
            [_prefix_ids(prefix_ids, [torch.arange(n)], self.base.image_token_id), suffix[None].to(prefix_ids)], dim=1
        )
        visual_inputs = self.base.llm_visual_inputs(ids, reference, None)
        embeds = torch.cat(
            [prefix_embeddings(self.model, prefix_ids, features), self.model.get_input_embeddings()(suffix)]
        )[None]
        length = embeds.shape[1]
        positions = torch.arange(length)[None]  # [1, L]; [3, 1, L] for 3-D M-RoPE
        if full_positions is not None:
            prefix_pos, start = kept_positions(full_positions, p, n, torch.arange(n))
            suffix_pos = (start + torch.arange(suffix.shape[0])).view(1, 1, -1).expand(prefix_pos.shape[0], 1, -1)
            positions = torch.cat([prefix_pos, suffix_pos], dim=2)
        lm = self.model.model.language_model
        image_pos = torch.arange(p, p + n)
        depth = len(lm.layers)
        wanted = sorted({i for _, _, plan in entries for i in (plan.score_layer, plan.prune_layer) if i < depth})
        inputs, rotary = layer_inputs(
            lm, embeds, wanted, None if full_positions is None else positions, **visual_inputs
        )
        relevance = {}
        for key, m, plan in entries:
            if not m.selector.bound.needs_relevance:  # a control row (random tokens, or none): reads no attention
                relevance[key] = None
                continue
            rows = attention_rows(
                lm.layers[plan.score_layer],
                inputs[plan.score_layer],
                rotary,
                plan.query_positions(image_pos, length),
                image_pos,
            )
            relevance[key] = instruction_relevance(rows.cpu(), m.selector.reduce)  # its own reduction, if any
        out = {}
        for ratio in self.ratios:
            budget = resolve_budget(n, keep_ratio=ratio)
            batches: dict[tuple[int, int], list[tuple[tuple, torch.Tensor]]] = defaultdict(list)
            for key, m, plan in entries:
                visual = visuals[self._vision(m)]
                scores = dataclasses.replace(visual.scores, features=features, relevance=relevance[key])
                kept = self.pipeline(m).select(n, scores, budget).kept
                batches[(plan.prune_layer, kept.numel())].append((key, kept))  # no-visual rows keep none
            for (layer, _), members in batches.items():
                index = torch.stack(
                    [torch.nonzero(kept_prompt_mask(length, image_pos, kept)).squeeze(1) for _, kept in members]
                )  # [B, L'] (equal kept counts)
                hidden = inputs[layer][0, index] if layer < depth else None
                row_positions = positions[..., 0, :][..., index] if positions.dim() == 3 else index
                if hidden is None:  # a plan past the last layer drops nothing: the unpruned answer
                    hidden = lm(
                        inputs_embeds=embeds,
                        position_ids=positions if full_positions is not None else None,
                        use_cache=False,
                        **visual_inputs,
                    ).last_hidden_state.expand(len(members), -1, -1)
                else:
                    kept_inputs = self.base.llm_visual_inputs(
                        ids[0, index], reference, torch.cat([kept for _, kept in members])
                    )  # the kept tokens' rows at their positions, from the prune layer on
                    table = lm.rotary_emb(hidden, row_positions)
                    mask = causal_mask(hidden.shape[1], hidden.dtype, hidden.device)  # causal whatever attention runs
                    for i, decoder_layer in enumerate(lm.layers[layer:], start=layer):
                        hidden = decoder_layer(hidden, attention_mask=mask, position_embeddings=table)
                        hidden = self.base.after_llm_layer(i, hidden, kept_inputs)
                    hidden = lm.norm(hidden)
                logits = self.model.lm_head(hidden[:, -1])
                for row, (key, kept) in enumerate(members):
                    out[(key, ratio)] = (kept.cpu(), logits[row])
        return out

    def _downscaled(
        self, scene: Scene, questions: list[Question], suffixes: list[torch.Tensor], budget: int, ratio: float, record
    ) -> None:
        """The whole image re-read at the highest resolution that yields at most ``budget`` tokens, no pruning."""
        small = self.base.downscaled(budget, scene.image.shape[:2])
        prepared = small.prepare(scene.image, questions[0].text)
        ids = prepared.inputs["input_ids"][0]
        p, m = _image_span(small, prepared)
        everything = torch.arange(m)
        visual = small.encode(prepared)
        embeds = prefix_embeddings(self.model, ids[:p], visual.features)[None]
        positions = kept_positions(small.rope_positions(prepared), p, m, everything)
        visual_inputs = small.llm_visual_inputs(ids[None, : p + m], visual, None)
        logits = answer_logits(
            self.model, embeds, suffixes, self.tokenizer.pad_token_id, positions, visual_inputs=visual_inputs
        )
        record(DOWNSCALED, ratio, [everything] * len(questions), logits, of=m)


def _image_span(adapter: StockModelAdapter, prepared: PreparedInput) -> tuple[int, int]:
    """(position of the first image placeholder, number of placeholders) in a prepared prompt."""
    image_pos = placeholder_positions(prepared.inputs["input_ids"], adapter.image_token_id)
    return int(image_pos[0]), int(image_pos.numel())


def _prefix_ids(prefix_ids: torch.Tensor, kept_sets: list[torch.Tensor], image_token_id: int) -> torch.Tensor:
    """[B, P + K]: the prompt ids that ``prefix_embeddings`` of each kept set (equal counts) stand for: the text
    before the image, then one placeholder per kept visual token."""
    placeholders = torch.full(
        (len(kept_sets), kept_sets[0].numel()), image_token_id, dtype=prefix_ids.dtype, device=prefix_ids.device
    )
    return torch.cat([prefix_ids.expand(len(kept_sets), -1), placeholders], dim=1)


def _stacked(positions: list[tuple[torch.Tensor, int] | None]) -> tuple[torch.Tensor, int] | None:
    """Per-row ``kept_positions`` of one batch → one [3, B, P] tensor (every row's suffix starts alike)."""
    if positions[0] is None:
        return None
    return torch.cat([pos for pos, _ in positions], dim=1), positions[0][1]


def _with_suffix(inputs, image_end: int, suffix: torch.Tensor) -> dict:
    """The processor's tensors with the prompt after the image replaced by ``suffix``: the per-token
    tensors (attention mask, token types) extend with the prompt's last column, a text token's."""
    out = dict(inputs)
    length = inputs["input_ids"].shape[1]
    for k, v in inputs.items():
        if torch.is_tensor(v) and v.dim() == 2 and v.shape == (1, length):
            out[k] = torch.cat([v[:, :image_end], v[:, -1:].expand(1, suffix.shape[0])], dim=1)
    out["input_ids"] = torch.cat([inputs["input_ids"][:, :image_end], suffix[None].to(inputs["input_ids"])], dim=1)
    return out


def _same_length(kept_sets: list[torch.Tensor]) -> list[list[int]]:
    groups: dict[int, list[int]] = defaultdict(list)
    for j, kept in enumerate(kept_sets):
        groups[int(kept.numel())].append(j)
    return list(groups.values())


def _covering(visual: VisualTokens, scene: Scene, question: Question) -> torch.Tensor:
    """Tokens (not the global view's) whose image box overlaps one of the question's target objects."""
    mask = torch.zeros(visual.num_tokens, dtype=torch.bool)
    tile = visual.scores.region != NO_REGION
    if visual.scores.global_region is not None:
        tile &= visual.scores.region != visual.scores.global_region
    for t in question.targets:
        mask |= tile & overlapping(visual.token_boxes, scene.objects[t])
    return mask


def _recall(kept: torch.Tensor, cover: torch.Tensor, n: int) -> float:
    total = int(cover.sum())
    if total == 0:
        return float("nan")
    mask = torch.zeros(n, dtype=torch.bool)
    mask[kept] = True
    return float((mask & cover).sum()) / total


def summarize_ci(values: list[int]) -> tuple[float, float, float]:
    """Accuracy with its 95 % Wilson interval (lo, hi)."""
    k, m = float(np.sum(values)), len(values)
    if m == 0:
        return float("nan"), float("nan"), float("nan")
    z = 1.96
    p = k / m
    centre = (p + z * z / (2 * m)) / (1 + z * z / m)
    half = z * np.sqrt(p * (1 - p) / m + z * z / (4 * m * m)) / (1 + z * z / m)
    return p, centre - half, centre + half
