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

from ptp_ros.proxy import Question, Scene
from ptp_ros.pruning import NO_REGION, instruction_relevance, resolve_budget
from ptp_ros.vlm.base import PreparedInput, VisualTokens
from ptp_ros.vlm.llava_next import LlavaNextAdapter, LlavaNextOptions

from ..proxy.data import answer_logits, answer_token, prefix_embeddings, prompt_parts
from .methods import Method

GLOBAL_ONLY = "global view only"
FULL = "all tokens"


@dataclass
class Results:
    """Per question (in evaluation order): metadata, and per (label, ratio) correctness and target recall."""

    qtypes: list[str] = field(default_factory=list)
    scenes: list[int] = field(default_factory=list)
    correct: dict[tuple[str, float], list[int]] = field(default_factory=lambda: defaultdict(list))
    predicted: dict[tuple[str, float], list[int]] = field(default_factory=lambda: defaultdict(list))
    recall: dict[tuple[str, float], list[float]] = field(default_factory=lambda: defaultdict(list))
    kept_ratio: dict[tuple[str, float], list[float]] = field(default_factory=lambda: defaultdict(list))


def _vision_key(options: LlavaNextOptions) -> tuple:
    return options.vision_layer, options.region_score


class Evaluator:
    def __init__(self, adapter: LlavaNextAdapter, methods: list[Method], ratios: tuple[float, ...]):
        self.model, self.processor = adapter.model, adapter.processor
        self.tokenizer = self.processor.tokenizer
        self.methods, self.ratios = methods, tuple(r for r in ratios if r < 1.0)
        self._variants: dict[LlavaNextOptions, LlavaNextAdapter] = {}
        self.base = self.variant(adapter.options)

    def variant(self, options: LlavaNextOptions) -> LlavaNextAdapter:
        """An adapter with other scoring options over the same model (no copy of the weights)."""
        if options not in self._variants:
            self._variants[options] = LlavaNextAdapter(self.model, self.processor, options)
        return self._variants[options]

    @torch.no_grad()
    def scene(self, scene: Scene, questions: list[Question], results: Results,
              methods: list[Method] | None = None) -> None:
        """Score ``methods`` (default: all) on one scene's questions, appending to ``results``."""
        methods = self.methods if methods is None else methods
        base = self.base.prepare(scene.image, questions[0].text)
        ids0 = base.inputs["input_ids"][0]
        image_pos = torch.nonzero(ids0 == self.base.image_token_id).squeeze(1)
        p, n = int(image_pos[0]), int(image_pos.numel())
        prefix_ids = ids0[:p]
        suffixes = [self.tokenizer(prompt_parts(self.processor, q.text)[1], add_special_tokens=False,
                                   return_tensors="pt")["input_ids"][0] for q in questions]
        if not torch.equal(suffixes[0], ids0[p + n:]):
            raise RuntimeError("prompt split disagrees with the processor's tokenization")
        answers = torch.tensor([answer_token(self.tokenizer, q.answer) for q in questions])
        visuals: dict[tuple, VisualTokens] = {}
        for m in methods:
            key = _vision_key(m.adapter)
            if key not in visuals:
                visuals[key] = self.variant(LlavaNextOptions(vision_layer=m.adapter.vision_layer,
                                                             region_score=m.adapter.region_score)).encode(base)
        features = next(iter(visuals.values())).features
        reference = next(iter(visuals.values()))
        cover = [_covering(reference, scene, q) for q in questions]

        def record(label: str, ratio: float, kept_sets: list[torch.Tensor], logits: torch.Tensor) -> None:
            predicted = logits.argmax(-1)
            correct = (predicted == answers).tolist()
            for i, kept in enumerate(kept_sets):
                results.correct[(label, ratio)].append(int(correct[i]))
                results.predicted[(label, ratio)].append(int(predicted[i]))
                results.recall[(label, ratio)].append(_recall(kept, cover[i], n))
                results.kept_ratio[(label, ratio)].append(kept.numel() / n)

        def shared(kept: torch.Tensor) -> torch.Tensor:
            embeds = prefix_embeddings(self.model, prefix_ids, features[kept])[None]
            return answer_logits(self.model, embeds, suffixes, self.tokenizer.pad_token_id)

        everything = torch.arange(n)
        record(FULL, 1.0, [everything] * len(questions), shared(everything))
        glob = torch.nonzero(reference.scores.region == 0).squeeze(1)
        record(GLOBAL_ONLY, 0.0, [glob] * len(questions), shared(glob))

        rows: dict[tuple[int, int], torch.Tensor] = {}
        for m in methods:
            if m.needs_relevance:
                for qi, q in enumerate(questions):
                    if (m.adapter.llm_layer, qi) not in rows:
                        prepared = PreparedInput({"input_ids": torch.cat([ids0[: p + n], suffixes[qi]])[None]},
                                                 scene.image.shape[:2], q.text)
                        rows[(m.adapter.llm_layer, qi)] = self.variant(
                            LlavaNextOptions(llm_layer=m.adapter.llm_layer)).instruction_attention(
                                prepared, visuals[_vision_key(m.adapter)])
        unique: dict[tuple, Method] = {}
        for m in methods:
            unique.setdefault(m.key(), m)
        for ratio in self.ratios:
            budget = resolve_budget(n, keep_ratio=ratio)
            computed: dict[tuple, tuple[list[torch.Tensor], torch.Tensor]] = {}
            dependent: list[tuple[tuple, Method]] = []
            for key, m in unique.items():
                visual = visuals[_vision_key(m.adapter)]
                scores = dataclasses.replace(visual.scores, features=features)
                content = max(1, min(budget, int(scores.region_sizes().sum())))
                if not m.needs_relevance:
                    kept = m.bound()(scores, content).kept
                    computed[key] = ([kept] * len(questions), shared(kept))
                else:
                    dependent.append((key, m))
            per_question: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
            for qi in range(len(questions)):
                kept_sets = []
                for key, m in dependent:
                    visual = visuals[_vision_key(m.adapter)]
                    relevance = instruction_relevance(rows[(m.adapter.llm_layer, qi)], m.reduce)
                    scores = dataclasses.replace(visual.scores, features=features, relevance=relevance)
                    content = max(1, min(budget, int(scores.region_sizes().sum())))
                    kept_sets.append(m.bound()(scores, content).kept)
                for group in _same_length(kept_sets):
                    embeds = torch.stack([prefix_embeddings(self.model, prefix_ids, features[kept_sets[j]])
                                          for j in group])
                    logits = answer_logits(self.model, embeds, [suffixes[qi]] * len(group),
                                           self.tokenizer.pad_token_id)
                    for row, j in enumerate(group):
                        per_question[dependent[j][0]].append((kept_sets[j], logits[row]))
            for key, pairs in per_question.items():
                computed[key] = ([k for k, _ in pairs], torch.stack([lg for _, lg in pairs]))
            for m in methods:
                kept_sets, logits = computed[m.key()]
                record(m.label, ratio, kept_sets, logits)
        results.qtypes.extend(q.qtype for q in questions)
        results.scenes.extend([scene.seed] * len(questions))


def _same_length(kept_sets: list[torch.Tensor]) -> list[list[int]]:
    groups: dict[int, list[int]] = defaultdict(list)
    for j, kept in enumerate(kept_sets):
        groups[int(kept.numel())].append(j)
    return list(groups.values())


def _covering(visual: VisualTokens, scene: Scene, question: Question) -> torch.Tensor:
    """Tile tokens (not the global view) whose image box overlaps one of the question's target objects."""
    mask = torch.zeros(visual.num_tokens, dtype=torch.bool)
    boxes = visual.token_boxes
    tile = (visual.scores.region != NO_REGION) & (visual.scores.region != visual.scores.global_region)
    for t in question.targets:
        x0, y0, x1, y1 = scene.objects[t].box
        mask |= tile & (boxes[:, 0] < x1) & (boxes[:, 2] > x0) & (boxes[:, 1] < y1) & (boxes[:, 3] > y0)
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
