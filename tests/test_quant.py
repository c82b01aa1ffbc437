"""Weight formats: int8 weight-only layers, the CPU probe that picks a format, and answers that hold."""
import json
import os
import subprocess
import sys

import pytest
import torch

import memstore
from memstore.model.answer import Answerer
from memstore.model.backbone import load_backbone
from memstore.model.quant import Int8Linear, chosen_format, probe, quantize_int8

# What an AVX2-only CPU looks like to torch, oneDNN and MKL on a newer one: bfloat16 is emulated.
AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
TEXT = ("The capital of Freedonia is Zorbaville. Zorbaville sits on the river Quell and is known for its "
        "copper bridges. The rainy season lasts from March to May, and summers are dry and hot. Ingrid "
        "Halvorsen's manager is Tobias Brennecke, who joined the company in 2019 and runs the logistics team.")


@pytest.mark.parametrize("rows", [1, 64])  # the int8 kernel path, then the de-quantized dense path
def test_int8_linear_is_close_to_the_float_layer(rows):
    torch.manual_seed(0)
    dense = torch.nn.Linear(256, 512)
    quantized = Int8Linear(dense, torch.float32, max_kernel_rows=8)
    x = torch.randn(2, rows, 256)
    expected, got = dense(x), quantized(x)
    assert got.shape == expected.shape and got.dtype == x.dtype
    assert (got - expected).norm() / expected.norm() < 0.02


def test_quantize_swaps_every_linear():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Sequential(torch.nn.Linear(16, 4)))
    assert quantize_int8(model, torch.float32, max_kernel_rows=1) == 2
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())


def _top_tokens(backbone) -> torch.Tensor:
    ids = torch.tensor([backbone.tokenizer(TEXT)["input_ids"]])
    with torch.no_grad():
        hidden = backbone.model.model(input_ids=ids).last_hidden_state[0]
        return torch.stack([backbone.model.lm_head(hidden[i:i + 1])[0].argmax() for i in range(len(hidden))])


def test_int8_and_float32_models_agree_on_the_top_token():
    dense = load_backbone("smollm2-135m", weights="float32")
    quantized = load_backbone("smollm2-135m", weights="int8")
    assert quantized.weights == "int8" and dense.weights == "float32"
    assert not any(isinstance(m, torch.nn.Linear) for m in quantized.model.modules())
    agreement = (_top_tokens(dense) == _top_tokens(quantized)).float().mean().item()
    assert agreement >= 0.85, agreement


def test_quantized_memory_mode_reproduces_its_rag_answer(tmp_path):
    mem = memstore.open(tmp_path / "store")
    mem.add_text(TEXT, source="facts.txt")
    answerer = Answerer(load_backbone("smollm2-135m", weights="int8"), mem.store.kv_dir)

    def retrieve(text):
        return mem.search(text, k=1)

    question = "What is the capital of Freedonia?"
    rag = answerer.ask(question, retrieve, mode="rag", k=1)
    memory = answerer.ask(question, retrieve, mode="memory", k=1, retrieve_every=0)
    assert "Zorbaville" in rag.text and memory.text == rag.text
    mem.close()


def _probe_in(env: dict, cache) -> dict:
    code = ("import json; from memstore.model.quant import probe, chosen_format; p = probe(); "
            "print(json.dumps({'compute': p.compute_dtype, 'rows': p.max_kernel_rows, 'auto': chosen_format('auto')[0]}))")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env, "MEMSTORE_CACHE": str(cache)}, capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_format_follows_the_cpu(tmp_path):
    """bfloat16 compute only where the CPU multiplies it natively; int8 weights where its kernel decodes faster."""
    native = probe()
    has_bf16 = any(getattr(torch.cpu, f, lambda: False)() for f in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    assert native.compute_dtype == ("bfloat16" if has_bf16 else "float32")
    avx2 = _probe_in(AVX2_ONLY, tmp_path)
    assert avx2["compute"] == "float32"
    for found in (avx2, {"auto": chosen_format("auto")[0], "rows": native.max_kernel_rows}):
        assert found["auto"] == "int8" and found["rows"] >= 1  # every x86 CPU with AVX2 has the int8 kernel


def test_a_named_format_is_kept_and_a_bad_one_refused(monkeypatch):
    assert chosen_format("float32") == ("float32", torch.float32)
    monkeypatch.setenv("MEMSTORE_WEIGHTS", "bfloat16")
    assert chosen_format() == ("bfloat16", torch.bfloat16)
    with pytest.raises(ValueError, match="weight format"):
        chosen_format("int3")
