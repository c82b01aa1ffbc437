"""Decoder weights in the format this CPU runs fastest, chosen by timing it at load.

Decoding one token reads every weight once, so on a CPU it is bound by memory bandwidth:
int8 weights (a quarter of float32's bytes, half of bfloat16's) decode about twice as fast as
bfloat16 (bench/results/speed.json). `Int8Linear` keeps each Linear's weight as int8 with one
scale per output row and runs two paths:

- few rows (decoding, the last position's logits): torch's weight-only int8 kernel, which
  reads int8 weights and bfloat16 activations on any x86 CPU with AVX2;
- many rows (a prompt, a batch of chunks to encode): the weight de-quantized to the compute
  dtype and one dense matmul, where the matmul's cost hides the de-quantization's.

Where the two paths cross, and whether bfloat16 beats float32 as compute dtype, depends on the
CPU (native bfloat16 on AMX / AVX-512 BF16, emulated on AVX2): `probe()` times both on one
core (about two seconds, once per machine) instead of guessing from CPU flags.

torch's dynamic int8 quantization (int8 activations too) decodes faster still but changes too
many answers: in a check on 512 positions of a fixed text, Qwen2.5-0.5B's top token agreed with
float32's at 64% of them, against 96% for weight-only int8 (bench/results/speed.json has the
latter, with bfloat16's 98%).
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from memstore.errors import BackendMissingError, InvalidInputError
from memstore.paths import models_dir

log = logging.getLogger(__name__)

WEIGHT_FORMATS = ("auto", "float32", "bfloat16", "int8")


class Int8Linear(torch.nn.Module):
    """A frozen Linear with int8 weights and a per-output-row scale (weight-only quantization)."""

    def __init__(self, linear: torch.nn.Linear, dense_dtype: torch.dtype, max_kernel_rows: int):
        super().__init__()
        weight = linear.weight.detach()
        scale = weight.abs().amax(dim=1).float().clamp(min=1e-12) / 127.0
        quantized = torch.empty(weight.shape, dtype=torch.int8)
        for start in range(0, weight.shape[0], 512):  # blocks of rows stay in cache: a much faster load
            rows = slice(start, start + 512)
            quantized[rows] = torch.round(weight[rows].float() / scale[rows, None]).clamp_(-127, 127)
        self.register_buffer("weight_int8", quantized)
        self.register_buffer("scale", scale.to(torch.bfloat16))  # the kernel takes the activations' dtype
        self.register_buffer("dense_scale", scale.to(dense_dtype))
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().to(dense_dtype))
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dense_dtype, self.max_kernel_rows = dense_dtype, max_kernel_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] <= self.max_kernel_rows:
            out = torch._weight_int8pack_mm(rows.to(torch.bfloat16).contiguous(), self.weight_int8, self.scale)
            out = out.to(self.dense_dtype)
        else:
            dense = self.weight_int8.to(self.dense_dtype) * self.dense_scale[:, None]
            out = F.linear(rows.to(self.dense_dtype), dense)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, kernel up to {self.max_kernel_rows} rows"


@dataclass(frozen=True)
class Probe:
    """What `probe()` measured on this CPU (milliseconds per matmul of a 1024 x 4096 weight)."""

    dense_ms: dict  # {"float32": {rows: ms}, "bfloat16": {rows: ms}}
    int8_ms: dict  # {rows: ms} of the int8 kernel, empty where it is missing
    int8_dequantized_ms: dict  # {rows: ms} of the de-quantize-then-dense path
    compute_dtype: str
    max_kernel_rows: int  # the int8 kernel is used up to this many rows

    @property
    def int8_decodes_faster(self) -> bool:
        """Whether int8 weights decode faster than dense ones. The probe times one core, but decoding
        runs on all of them and is then bound by memory bandwidth, of which int8 weights need a quarter
        of float32's (half of bfloat16's): a kernel up to INT8_PER_CORE_SLACK times slower per core
        still decodes faster (on an AVX2-only EPYC the two tie on one core and int8 decodes faster on
        two: bench/results/speed_avx2.json)."""
        return bool(self.int8_ms) and self.int8_ms[1] < INT8_PER_CORE_SLACK * self.dense_ms[self.compute_dtype][1]


ROWS = (1, 8, 32, 128)
INT8_PER_CORE_SLACK = 1.5


@functools.cache
def probe() -> Probe:
    """Time dense float32, dense bfloat16 and the int8 kernel on this CPU: once per machine (cached on disk)."""
    path = models_dir() / "cpu-probe.json"
    key = _machine_key()
    try:
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return Probe(**{name: _int_keys(cached[name]) for name in ("dense_ms", "int8_ms", "int8_dequantized_ms")},
                         compute_dtype=cached["compute_dtype"], max_kernel_rows=cached["max_kernel_rows"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    found = _probe_once()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps({"key": key, **asdict(found)}))
    tmp.replace(path)
    return found


def _machine_key() -> str:
    """What decides the kernels' speed: the CPU, torch's build, and the variables that cap the ISA."""
    cpu = platform.processor()
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = "|".join(line for line in info.splitlines()[:40] if line.startswith(("model name", "flags")))
    except OSError:
        pass
    env = {v: os.environ.get(v) for v in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")}
    return hashlib.sha1(f"probe 3|{cpu}|{torch.__version__}|{sorted(env.items())}".encode()).hexdigest()


def _int_keys(table: dict) -> dict:
    return {k: _int_keys(v) if isinstance(v, dict) else v for k, v in
            ((int(k) if k.isdigit() else k, v) for k, v in table.items())}


def _probe_once() -> Probe:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core: per-core speed, unlike a threaded matmul, survives a busy machine
    try:
        return _measure()
    finally:
        torch.set_num_threads(threads)


def _measure() -> Probe:
    torch.manual_seed(0)
    weight = torch.randn(4096, 1024)
    dense_ms = {name: {rows: _time(lambda x, w=weight.to(dtype): F.linear(x, w), rows, dtype) for rows in ROWS}  # noqa: B008 - bound per dtype on purpose
                for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16))}
    # bfloat16 only where it clearly wins on a prompt-sized matmul (it is emulated, and slower, without
    # native support); float32 otherwise
    compute = "bfloat16" if dense_ms["bfloat16"][128] * 1.3 < dense_ms["float32"][128] else "float32"
    linear, dtype = torch.nn.Linear(1024, 4096, bias=False), getattr(torch, compute)
    dequantized = Int8Linear(linear, dtype, max_kernel_rows=0)
    int8_dequantized_ms = {rows: _time(dequantized, rows, dtype) for rows in ROWS}
    int8_ms: dict = {}
    try:
        kernel = Int8Linear(linear, dtype, max_kernel_rows=max(ROWS))
        int8_ms = {rows: _time(kernel, rows, dtype) for rows in ROWS}
    except (RuntimeError, NotImplementedError) as e:  # no int8 kernel on this CPU or build
        log.info("int8 weight kernel unavailable: %s", e)
    kernel_rows = max([rows for rows in int8_ms if int8_ms[rows] < int8_dequantized_ms[rows]], default=0)
    return Probe(dense_ms, int8_ms, int8_dequantized_ms, compute, kernel_rows)


def _time(fn, rows: int, dtype: torch.dtype, repeats: int = 21, least_s: float = 0.05) -> float:
    """Best of `repeats` calls and of at least `least_s` seconds of them: the minimum survives other
    processes taking the core now and then (7 calls did not, with two jobs on two cores)."""
    x = torch.randn(rows, 1024).to(dtype)
    with torch.no_grad():
        fn(x)
        fn(x)
        best, n, started = float("inf"), 0, time.perf_counter()
        while n < repeats or time.perf_counter() - started < least_s:
            t = time.perf_counter()
            fn(x)
            best = min(best, time.perf_counter() - t)
            n += 1
    return best * 1000


def chosen_format(requested: str | None = None) -> tuple[str, torch.dtype]:
    """(weight format, compute dtype) for `requested` (a WEIGHT_FORMATS name), $MEMSTORE_WEIGHTS, or the probe.

    `auto` takes int8 weights where this CPU's int8 kernel decodes faster than dense weights,
    and the compute dtype the probe found faster; an explicit float32 or bfloat16 is both.
    """
    name = requested or os.environ.get("MEMSTORE_WEIGHTS") or "auto"
    if name not in WEIGHT_FORMATS:
        raise InvalidInputError(f"weight format must be one of {', '.join(WEIGHT_FORMATS)}, not {name!r}")
    if name in ("float32", "bfloat16"):
        return name, getattr(torch, name)
    found = probe()
    compute = getattr(torch, found.compute_dtype)
    if name == "int8" and not found.int8_ms:
        raise BackendMissingError("int8 weights need torch's weight-only int8 kernel, which this CPU or build lacks")
    if name == "int8" or found.int8_decodes_faster:
        return "int8", compute
    return found.compute_dtype, compute


@torch.no_grad()
def quantize_int8(model: torch.nn.Module, dense_dtype: torch.dtype, max_kernel_rows: int | None = None) -> int:
    """Replace every Linear of `model` (LM head included) by an Int8Linear, in place; returns how many."""
    rows = probe().max_kernel_rows if max_kernel_rows is None else max_kernel_rows
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(parent, name, Int8Linear(child, dense_dtype, rows))
                swapped += 1
    return swapped
