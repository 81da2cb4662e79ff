"""Broken checkpoints as a user meets them: every fault is a one-line ModelLoadError naming its cause,
and pickled weights are refused by the project's own checks before transformers could open them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from ptp_ros.cli import ask_main
from ptp_ros.vlm import defaults
from ptp_ros.vlm.loading import LoadOptions, ModelLoadError, check_weight_files, load_adapter, unsupported_format

MODELS = Path(__file__).resolve().parents[1] / "ptp_ros" / "models"
SAMPLE = str(MODELS.parent / "data" / "sample_scene.jpg")
CPU = LoadOptions(device="cpu")


def copy_model(tmp_path: Path, name: str = "proxy-llava-next") -> Path:
    return Path(shutil.copytree(MODELS / name, tmp_path / name))


def write_index(model: Path, *shards: str) -> None:
    (model / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {f"w{i}": shard for i, shard in enumerate(shards)}})
    )


def refused(model: Path, match: str) -> str:
    with pytest.raises(ModelLoadError, match=match) as caught:
        load_adapter(model, CPU)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_truncated_weights(tmp_path):
    model = copy_model(tmp_path)
    weights = model / "model.safetensors"
    with weights.open("r+b") as handle:
        handle.truncate(1000)
    assert str(weights) in refused(model, "corrupt or truncated safetensors file")


def test_truncated_tail_of_the_data(tmp_path):
    """Header intact, tensors cut short: the header claims more bytes than the file has."""
    model = copy_model(tmp_path)
    weights = model / "model.safetensors"
    with weights.open("r+b") as handle:
        handle.truncate(weights.stat().st_size - 4096)
    refused(model, r"corrupt or truncated safetensors file .*the file has")


def test_garbage_weights(tmp_path):
    model = copy_model(tmp_path)
    (model / "model.safetensors").write_bytes(b"\x00\xffnot a safetensors file at all" * 100)
    refused(model, "corrupt or truncated safetensors file")


def test_header_claiming_more_data_than_the_file_has(tmp_path):
    model = copy_model(tmp_path)
    header = json.dumps({"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}).encode()
    (model / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    refused(model, "corrupt or truncated safetensors file .*need")


def test_index_naming_a_pickle_is_refused_before_it_is_opened(tmp_path, monkeypatch):
    model = copy_model(tmp_path)
    (model / "model.safetensors").rename(model / "decoy.safetensors")
    torch.save({"w": torch.zeros(1)}, model / "pytorch_model-00001.bin")
    write_index(model, "decoy.safetensors", "pytorch_model-00001.bin")

    def no_unpickling(*args, **kwargs):
        raise AssertionError("a pickle was opened")

    monkeypatch.setattr(torch, "load", no_unpickling)
    refused(model, "pickled weights 'pytorch_model-00001.bin'; pickled weights are refused")


@pytest.mark.parametrize(
    "shard, cause",
    [
        ("../outside.safetensors", "outside the checkpoint directory"),
        ("/tmp/absolute.safetensors", "outside the checkpoint directory"),
        ("model-00002-of-00002.safetensors", "missing from"),
    ],
)
def test_index_naming_files_out_of_reach(tmp_path, shard, cause):
    model = copy_model(tmp_path)
    (model / "model.safetensors").rename(model / "model-00001-of-00002.safetensors")
    shutil.copy(model / "model-00001-of-00002.safetensors", tmp_path / "outside.safetensors")
    write_index(model, "model-00001-of-00002.safetensors", shard)
    assert "model.safetensors.index.json" in refused(model, cause)


@pytest.mark.parametrize(
    "index_text, cause",
    [
        ("{not json", "is unreadable"),
        ('{"metadata": {}}', "has no weight_map"),
    ],
)
def test_unreadable_index(tmp_path, index_text, cause):
    model = copy_model(tmp_path)
    (model / "model.safetensors").rename(model / "model-00001-of-00001.safetensors")
    (model / "model.safetensors.index.json").write_text(index_text)
    refused(model, cause)


def test_pickle_only_checkpoint(tmp_path):
    model = copy_model(tmp_path)
    (model / "model.safetensors").unlink()
    torch.save({"w": torch.zeros(1)}, model / "pytorch_model.bin")
    refused(
        model,
        r"only pickled weights \(pytorch_model.bin\); pickled weights are refused \(convert them to "
        "safetensors",
    )


def test_config_pointing_transformers_at_a_pickle(tmp_path):
    model = copy_model(tmp_path)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "transformers_weights": "adapter_model.bin"}))
    torch.save({"w": torch.zeros(1)}, model / "adapter_model.bin")
    refused(model, "transformers_weights names pickled weights")


def test_weights_of_another_family(tmp_path):
    """A Qwen2.5-VL config over LLaVA-NeXT weights: transformers would only warn and fill in random weights."""
    model = copy_model(tmp_path)
    shutil.copy(MODELS / "proxy-qwen2_5_vl" / "config.json", model / "config.json")
    refused(model, r"cannot load .*weights do not fit the config \(wrong architecture\?\): \d+ of the model's")


def test_config_with_another_width(tmp_path):
    model = copy_model(tmp_path)
    config = json.loads((model / "config.json").read_text())
    config["text_config"]["intermediate_size"] *= 2
    (model / "config.json").write_text(json.dumps(config))
    refused(model, r"cannot load .*weights do not fit the config: \d+ tensors differ in shape, e.g. .*mlp")


def test_other_transformers_failures_are_named_with_the_original_chained(tmp_path):
    model = copy_model(tmp_path)
    (model / "tokenizer.json").write_text("{broken")
    with pytest.raises(ModelLoadError, match=r"cannot load .*proxy-llava-next: JSONDecodeError: ") as caught:
        load_adapter(model, CPU)
    assert isinstance(caught.value.__cause__, ValueError)


def test_healthy_copy_loads(tmp_path):
    model = copy_model(tmp_path)
    assert check_weight_files(model) == [model / "model.safetensors"]
    assert load_adapter(model, CPU).model is not None


def test_cli_reports_a_broken_model_in_one_line(tmp_path, capsys):
    model = copy_model(tmp_path)
    with (model / "model.safetensors").open("r+b") as handle:
        handle.truncate(1000)
    assert ask_main([SAMPLE, "hi", "--model", str(model), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "corrupt or truncated safetensors file" in err and str(model) in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_an_install_without_its_built_in_model_says_so(tmp_path, monkeypatch, capsys):
    """No --model and no shipped checkpoint: a one-line refusal naming the missing path, not an untrained
    stand-in whose answers would look like the model's."""
    missing = tmp_path / "models" / "proxy-llava-next"
    monkeypatch.setattr(defaults, "PROXY_MODEL", missing)
    assert ask_main([SAMPLE, "what colour is the circle?", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


#: config.json of checkpoints users have that no adapter loads (trimmed to the keys that identify them).
OTHER_FORMATS = {
    "internvl_chat": (
        {
            "model_type": "internvl_chat",
            "architectures": ["InternVLChatModel"],
            "auto_map": {
                "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                "AutoModel": "modeling_internvl_chat.InternVLChatModel",
            },
            "llm_config": {"model_type": "internlm2"},
            "vision_config": {"model_type": "intern_vit_6b"},
        },
        r"original remote-code format \(model_type 'internvl_chat'.*never runs code shipped with a "
        r"checkpoint.*OpenGVLab/InternVL3-8B-hf or OpenGVLab/InternVL2_5-8B-MPO-hf",
    ),
    "llava_original": (
        {
            "model_type": "llava",
            "architectures": ["LlavaLlamaForCausalLM"],
            "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        },
        r"original LLaVA repository's format \(architectures LlavaLlamaForCausalLM.*"
        r"llava-hf/llava-v1\.6-vicuna-7b-hf",
    ),
    "llava_mistral": (
        {"model_type": "llava_mistral", "architectures": ["LlavaMistralForCausalLM"]},
        r"original LLaVA repository's format \(architectures LlavaMistralForCausalLM.*"
        r"llava-hf/llava-v1\.6-mistral-7b-hf",
    ),
    "llava_1_5_hf": (
        {"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"]},
        r"LLaVA-1\.5 \(model_type 'llava': one 336-px view, no tiles\), which has no adapter",
    ),
    "qwen_vl": (
        {
            "model_type": "qwen",
            "architectures": ["QWenLMHeadModel"],
            "auto_map": {"AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
        },
        r"Qwen-VL in its remote-code format .*Qwen/Qwen2\.5-VL-7B-Instruct",
    ),
    "qwen2_vl": (
        {"model_type": "qwen2_vl", "architectures": ["Qwen2VLForConditionalGeneration"]},
        r"Qwen2-VL \(model_type 'qwen2_vl'\), which has no adapter; use Qwen2\.5-VL",
    ),
    "other_remote_code": (
        {"model_type": "minicpmv", "auto_map": {"AutoModel": "modeling_minicpmv.MiniCPMV"}},
        r"holds a 'minicpmv' model in a remote-code format \(its config\.json auto_map.*"
        r"Supported: llava_next, internvl, qwen2_5_vl",
    ),
    "other_stock": (
        {"model_type": "llava_onevision"},
        r"holds a 'llava_onevision' model; supported: llava_next, internvl, qwen2_5_vl",
    ),
    "no_model_type": ({}, r"holds a 'unknown' model; supported: "),
}


@pytest.mark.parametrize("name", OTHER_FORMATS)
def test_formats_without_an_adapter_are_refused_naming_what_to_load(tmp_path, name):
    """Refused from config.json alone, before any weight file is looked at or any checkpoint code could run."""
    config, expected = OTHER_FORMATS[name]
    model = tmp_path / name
    model.mkdir()
    (model / "config.json").write_text(json.dumps(config))
    (model / "modeling_internvl_chat.py").write_text("raise SystemExit('checkpoint code ran')\n")
    message = refused(model, expected)
    assert message.startswith(f"{model} holds ")


def test_remote_code_is_not_an_option():
    """trust_remote_code used to be a LoadOptions field (and a node parameter) that changed nothing: the
    remote-code formats were refused either way.  It is gone, so it cannot suggest otherwise."""
    with pytest.raises(TypeError):
        LoadOptions(trust_remote_code=True)


def test_refusals_fit_the_nodes_log_line():
    """The node cuts a configure error at 500 characters: the advice must survive a long path."""
    path = Path("/home/robot/checkpoints/" + "x" * 60)
    for config, _ in OTHER_FORMATS.values():
        assert len(unsupported_format(path, config)) < 480


def test_cli_refuses_a_remote_code_checkpoint_in_one_line(tmp_path, capsys):
    model = tmp_path / "InternVL2-8B"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(OTHER_FORMATS["internvl_chat"][0]))
    assert ask_main([SAMPLE, "hi", "--model", str(model), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "internvl_chat" in err and "-hf" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
