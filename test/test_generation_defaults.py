"""Every tool generates with the model's own generation defaults: stock ``generate`` reads the checkpoint's
generation_config, so it stops at the model's end-of-sequence token, and the built-in proxy model (trained to
emit it after its one-word answer) answers in one word with no ``--max-new-tokens`` anywhere."""

from __future__ import annotations

import json

import cv2
import pytest

from ptp_ros.cli import ask_main
from ptp_ros.pipeline import Pipeline, PipelineConfig
from ptp_ros.proxy import make_questions, make_scene, split_seed
from ptp_ros.proxy.scenes import ANSWER_WORDS
from ptp_ros.pruning import ConfiguredSelector
from ptp_ros.vlm.defaults import PROXY_MODEL, default_model_path
from ptp_ros.vlm.loading import LoadOptions, load_adapter

INSTRUCTION = "what colour is the circle?"


@pytest.mark.parametrize("prune_in_llm", [True, False])
def test_generation_stops_at_the_models_eos_token(tiny_model_dir, sample_image, prune_in_llm):
    """The adapter's generate passes no eos of its own: whatever the checkpoint's generation_config names
    ends the answer, before and inside the LLM (the tiny model is made to name its own first token)."""
    adapter = load_adapter(tiny_model_dir, LoadOptions(device="cpu"))
    pipeline = Pipeline(adapter, PipelineConfig(selector=ConfiguredSelector(prune_in_llm=prune_in_llm)))
    prepared = adapter.prepare(sample_image, INSTRUCTION)
    visual = pipeline.encode(prepared)
    budget = pipeline.budget(visual, keep_ratio=0.25)

    def generated() -> list[int]:
        return pipeline.generate(
            prepared, visual, pipeline.score(prepared, visual, budget), budget, 6
        ).generation.token_ids

    free = generated()
    assert len(free) == 6 and free[0] not in free[1:]  # the tiny model's eos never comes: the cap ends it
    adapter.model.generation_config.eos_token_id = free[0]
    assert generated() == free[:1]


@pytest.fixture(scope="module")
def built_in():
    path = default_model_path()
    assert path == PROXY_MODEL, "the package ships its proxy checkpoint"
    return load_adapter(path, LoadOptions(device="cpu"))


@pytest.fixture(scope="module")
def proxy_questions():
    scenes = [make_scene(split_seed("test", k)) for k in range(2)]
    return [(scene, q) for scene in scenes for q in make_questions(scene, per_type=1)]


def _one_answer_word(text: str) -> bool:
    return len(text.split()) == 1 and text in ANSWER_WORDS


def test_the_built_in_model_names_its_end_of_answer_token(built_in):
    eos = built_in.model.generation_config.eos_token_id
    assert eos is not None
    assert built_in.processor.tokenizer.decode([eos], skip_special_tokens=True) == ""


def test_the_built_in_model_answers_one_word_under_the_librarys_defaults(built_in, proxy_questions):
    """``Pipeline`` with its default configuration (what the node, ``ptp-eval --data`` and the lmms-eval plugin
    run, each with its own cap of 16–32 new tokens): the answer word, then the end-of-answer token."""
    default = PipelineConfig()
    pipeline = Pipeline(built_in, default)
    for scene, question in proxy_questions:
        for ratio in (1.0, 0.111):
            answer = pipeline.answer(scene.image, question.text, keep_ratio=ratio)
            assert _one_answer_word(answer.text), (question.text, ratio, answer.text)
            assert answer.new_tokens <= 2 < default.max_new_tokens, (question.text, ratio, answer.new_tokens)


def test_ptp_ask_answers_one_word_without_max_new_tokens(built_in, proxy_questions, tmp_path, capsys):
    scene, question = proxy_questions[0]
    frame = tmp_path / "frame.png"
    assert cv2.imwrite(str(frame), cv2.cvtColor(scene.image, cv2.COLOR_RGB2BGR))
    assert ask_main([str(frame), question.text, "--keep-ratio", "0.111", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert _one_answer_word(answer["answer"]) and answer["new_tokens"] <= 2, answer
