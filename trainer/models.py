"""Load the single-file models ComfyUI users already have into diffusers/transformers classes.

- DiT `qwen_image_edit_2509_*.safetensors` / `qwen_image_edit_2511_*`: diffusers
  `QwenImageTransformer2DModel` names, optionally prefixed `model.diffusion_model.`; float8 files
  (`_fp8_e4m3fn`, scaled or not) are cast to the training dtype (or kept float8 with `--fp8_base`).
  ComfyUI's Edit-2511 files carry the marker `__index_timestep_zero__` (checked, then dropped).
- VAE `qwen_image_vae.safetensors`: Wan-style names (`conv1`, `decoder.head.0.gamma`, ...),
  renamed with diffusers' own Wan converter to `AutoencoderKLQwenImage` names.
- Text encoder `qwen_2.5_vl_7b*.safetensors`: `model.*` -> `model.language_model.*`,
  `visual.*` -> `model.visual.*`; `_fp8_scaled` files hold float8 weights with per-tensor
  scales (`<name>.scale_weight` or `<name>.weight_scale`), dequantized here.

Loading streams: the model is built empty (meta device), the file's header is checked against
it (names and shapes, before any weight is read), then tensors are read a chunk of the file at
a time, each cast to the dtype the empty model holds for it and put straight on its device. The
file is reopened per chunk so the pages already read are released: peak host memory stays close
to the size of the loaded model, not of the file plus the model.

Architectures come from the JSON configs shipped in `configs/`; a file whose safetensors
metadata carries a `config` entry (JSON) is built with that config instead (the test suite's
tiny models do this).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from safetensors import SafetensorError, safe_open
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLProcessor

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
TRANSFORMER_CONFIG = "qwen_image_edit_transformer.json"
VAE_CONFIG = "qwen_image_vae.json"
TEXT_ENCODER_CONFIG = "qwen_2_5_vl_7b_text_encoder.json"
EMBEDDED_CONFIG_KEY = "config"
DIT_PREFIX = "model.diffusion_model."
INDEX_TIMESTEP_ZERO_KEY = "__index_timestep_zero__"  # ComfyUI's marker of an Edit-2511 DiT
DEFAULT_PROCESSOR_REPO = "Qwen/Qwen-Image-Edit-2509"

FP8_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
FP8_AUXILIARY_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")
FP8_MARKER_KEYS = ("scaled_fp8",)
FLOAT8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# How much of a file is read between reopenings: bounds the file pages held while loading.
CHUNK_BYTES = 256 * 2**20
_DTYPE_BYTES = {
    "F64": 8,
    "I64": 8,
    "F32": 4,
    "I32": 4,
    "BF16": 2,
    "F16": 2,
    "I16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}

TensorPlacement = Callable[[str], torch.device]


class ModelFileError(ValueError):
    """A model file that is missing, unreadable, truncated or of the wrong kind."""


@dataclass(frozen=True)
class SafetensorsHeader:
    """What a safetensors file holds, read from its header alone (no tensor data)."""

    path: Path
    what: str  # how the user named it, e.g. "DiT (--dit)"
    metadata: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    nbytes: dict[str, int]
    dtypes: dict[str, str] = field(default_factory=dict)  # safetensors' names: "BF16", "F8_E4M3", "I8", ...


def shipped_config(name: str) -> dict[str, Any]:
    config = json.loads((CONFIG_DIR / name).read_text(encoding="utf-8"))
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _unreadable(path: Path, what: str, exc: BaseException) -> ModelFileError:
    return ModelFileError(
        f"{what} file {path} cannot be read as safetensors ({exc}); "
        "expected a complete .safetensors file (is it truncated or a different format?)"
    )


def read_header(path: str | os.PathLike, what: str) -> SafetensorsHeader:
    """Names, shapes and metadata of a safetensors file, or a ModelFileError naming it."""
    file_path = Path(path)
    if not file_path.is_file():
        raise ModelFileError(f"{what} file not found: {file_path}")
    shapes: dict[str, tuple[int, ...]] = {}
    nbytes: dict[str, int] = {}
    dtypes: dict[str, str] = {}
    try:
        with safe_open(str(file_path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            for key in f.keys():  # noqa: SIM118 (safe_open has keys() but is not iterable)
                view = f.get_slice(key)
                shapes[key] = tuple(view.get_shape())
                dtypes[key] = view.get_dtype()
                count = 1
                for size in shapes[key]:
                    count *= size
                nbytes[key] = count * _DTYPE_BYTES.get(dtypes[key], 4)
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise _unreadable(file_path, what, exc) from exc
    if not shapes:
        raise ModelFileError(f"{what} file {file_path} holds no tensors")
    return SafetensorsHeader(file_path, what, metadata, shapes, nbytes, dtypes)


def read_tensors(header: SafetensorsHeader, keys: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) for `keys`, reopening the file every CHUNK_BYTES so read pages are let go.

    A tensor may share memory with the file while its chunk is open: copy it (or cast it) before
    the next one is asked for if it must outlive the chunk.
    """
    start = 0
    while start < len(keys):
        end, size = start, 0
        while end < len(keys) and (end == start or size + header.nbytes[keys[end]] <= CHUNK_BYTES):
            size += header.nbytes[keys[end]]
            end += 1
        try:
            with safe_open(str(header.path), framework="pt") as f:
                for key in keys[start:end]:
                    yield key, f.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise _unreadable(header.path, header.what, exc) from exc
        start = end


def architecture_config(header: SafetensorsHeader, shipped_name: str) -> dict[str, Any]:
    embedded = header.metadata.get(EMBEDDED_CONFIG_KEY)
    if embedded is None:
        return shipped_config(shipped_name)
    try:
        config = json.loads(embedded)
    except json.JSONDecodeError as exc:
        raise ModelFileError(
            f"{header.what} file {header.path}: its metadata `config` is not valid JSON ({exc})"
        ) from exc
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _build_empty(factory: Callable[[], Any], header: SafetensorsHeader, expected: str) -> Any:
    """Instantiate on the meta device; a config of another architecture is the file's fault."""
    try:
        with init_empty_weights():
            return factory()
    except (TypeError, ValueError) as exc:
        raise ModelFileError(
            f"{header.what} file {header.path} does not match {expected}: its config is not one ({exc})"
        ) from exc


RowRanges = dict[str, tuple[int, int]]  # model name -> (first row, row count) of the file tensor it is cut from
# Model names whose file tensor holds a singleton time axis the model's 2-D layer has not: a causal-3-D
# convolution stored as [out, in, 1, k, k] for a Conv2d of [out, in, k, k] (squeezed as it is read).
TimeSqueezed = frozenset[str]


def _file_shape(
    header: SafetensorsHeader, sources: dict[str, str], rows: RowRanges, name: str, squeezed: TimeSqueezed
) -> tuple[int, ...]:
    shape = header.shapes[sources[name]]
    if name in squeezed:
        shape = (*shape[:2], *shape[3:])
    return (rows[name][1], *shape[1:]) if name in rows else shape


def check_layout(
    header: SafetensorsHeader,
    sources: dict[str, str],
    model: torch.nn.Module,
    expected: str,
    optional: frozenset[str] = frozenset(),
    rows: RowRanges | None = None,
    squeezed: TimeSqueezed = frozenset(),
) -> None:
    """Raise a ModelFileError listing missing/unexpected names and shape mismatches.

    `sources` maps each model name to the file name it is read from; model names in `optional`
    may be absent from the file; `rows` names the model tensors that are a range of rows of a
    fused file tensor (several model names then share one file name); `squeezed` those stored
    with a singleton time axis.
    """
    rows = rows or {}
    state = model.state_dict()
    model_shapes = {k: tuple(v.shape) for k, v in state.items()}
    missing = sorted(set(model_shapes) - set(sources) - optional)
    unexpected = sorted(set(sources) - set(model_shapes))
    fused_too_short = [
        f"{k}: file {header.shapes[sources[k]]} has fewer than {start + count} rows"
        for k, (start, count) in sorted(rows.items())
        if k in sources and header.shapes[sources[k]][0] < start + count
    ]
    mismatched = fused_too_short or [
        f"{k}: file {_file_shape(header, sources, rows, k, squeezed)} vs expected {model_shapes[k]}"
        for k in sorted(set(model_shapes) & set(sources))
        if _file_shape(header, sources, rows, k, squeezed) != model_shapes[k]
    ]
    integer = sorted(
        k
        for k in set(state) & set(sources)
        if state[k].is_floating_point() and header.dtypes.get(sources[k], "F").startswith(("I", "U"))
    )
    if integer:  # a cast would turn them into garbage silently
        raise ModelFileError(
            f"{header.what} file {header.path} holds integer-quantized weights ({len(integer)}, e.g. "
            f"{sources[integer[0]]}: {header.dtypes[sources[integer[0]]]}; ComfyUI's int8, ConvRot or other packed "
            "formats), which this trainer cannot read: use the bf16 file, or an fp8 one"
        )
    if not (missing or unexpected or mismatched):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if mismatched:
        problems.append(f"{len(mismatched)} with other shapes (e.g. {'; '.join(mismatched[:2])})")
    raise ModelFileError(f"{header.what} file {header.path} does not match {expected}: " + ", ".join(problems))


def _fp8_scales(header: SafetensorsHeader) -> tuple[dict[str, str], set[str]]:
    """ComfyUI `_fp8_scaled` layout: {weight name: its scale's name}, and every non-weight name."""
    scales: dict[str, str] = {}
    auxiliary: set[str] = set()
    for key in header.shapes:
        if key in FP8_MARKER_KEYS or key.endswith(FP8_AUXILIARY_SUFFIXES):
            auxiliary.add(key)
            continue
        for suffix in FP8_SCALE_SUFFIXES:
            if key.endswith(suffix):
                scales[key[: -len(suffix)] + ".weight"] = key
                auxiliary.add(key)
                break
    return scales, auxiliary


def _fill(
    model: torch.nn.Module,
    header: SafetensorsHeader,
    sources: dict[str, str],
    placement: TensorPlacement,
    rows: RowRanges | None = None,
    squeezed: TimeSqueezed = frozenset(),
) -> None:
    """Read each model tensor from the file, cast to the dtype the empty model holds for it (float8
    weights of `_fp8_scaled` files multiplied by their scale first), and put it on its device; a
    fused file tensor is cut into the model tensors `rows` names, and those in `squeezed` lose
    their singleton time axis."""
    rows = rows or {}
    scales, _ = _fp8_scales(header)
    scale_values = {key: tensor.clone() for key, tensor in read_tensors(header, sorted(set(scales.values())))}
    file_to_model: dict[str, list[str]] = {}
    for name, source in sources.items():
        file_to_model.setdefault(source, []).append(name)
    dtypes = {name: tensor.dtype for name, tensor in model.state_dict().items()}
    model.requires_grad_(False)
    for key, tensor in read_tensors(header, sorted(file_to_model)):
        if tensor.dtype in FLOAT8_DTYPES and key in scales:
            tensor = _dequantize(tensor, scale_values[scales[key]])
        for name in file_to_model[key]:
            part = tensor.narrow(0, *rows[name]) if name in rows else tensor
            part = part.squeeze(2) if name in squeezed else part
            value = part.to(placement(name), dtypes[name] if part.is_floating_point() else part.dtype)
            if value.data_ptr() == part.data_ptr():
                value = value.clone()  # own the memory: the file's pages are released after the chunk
            set_module_tensor_to_device(model, name, value.device, value=value, dtype=value.dtype)
            del part, value
        del tensor
    for name, buffer in model.named_buffers():  # computed at construction (not in the file)
        if name not in sources and buffer.device != placement(name):
            set_module_tensor_to_device(model, name, placement(name), value=buffer)


def _dequantize(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """A float8 weight times its (per-tensor or per-row) scale, in float32."""
    value = weight.to(torch.float32)
    scale = scale.to(torch.float32)
    return value * (scale.view(-1, *([1] * (value.dim() - 1))) if scale.numel() > 1 else scale)


def _on_cpu(_name: str) -> torch.device:
    return torch.device("cpu")


def _cast_empty(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Set the dtype every floating tensor will be loaded in (the model is still on meta).

    nn.Module.to, not diffusers' override, which warns about from_pretrained's keep-in-fp32 rule
    (none of these models has modules kept in fp32)."""
    torch.nn.Module.to(model, dtype)


def check_dit_version(header: SafetensorsHeader, zero_cond_t: bool) -> None:
    """A DiT file marked as Edit-2511 (ComfyUI's `__index_timestep_zero__`) trains only as 2511."""
    marked_2511 = INDEX_TIMESTEP_ZERO_KEY in header.shapes or DIT_PREFIX + INDEX_TIMESTEP_ZERO_KEY in header.shapes
    if marked_2511 and not zero_cond_t:
        raise ModelFileError(
            f"{header.what} file {header.path} is a Qwen-Image-Edit-2511 model (it carries "
            f"{INDEX_TIMESTEP_ZERO_KEY}): pass --model_version edit-2511"
        )


def count_transformer_blocks(header: SafetensorsHeader) -> int:
    """How many `transformer_blocks.N` a DiT file holds (from its header)."""
    indices = {
        key.removeprefix(DIT_PREFIX).split(".", 2)[1]
        for key in header.shapes
        if key.removeprefix(DIT_PREFIX).startswith("transformer_blocks.")
    }
    return len(indices)


def load_transformer(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    *,
    zero_cond_t: bool = False,
    fp8_base: bool = False,
    placement: TensorPlacement = _on_cpu,
) -> QwenImageTransformer2DModel:
    """The DiT, streamed from its file.

    zero_cond_t: Edit-2511 conditioning (reference tokens get timestep 0); ComfyUI's 2511 files
    carry `__index_timestep_zero__` and are refused without it. fp8_base: the base weights are
    stored as float8 and upcast per layer for compute (diffusers layerwise casting); each tensor is
    cast to float8 as it is read, so no full-precision copy of the model ever exists.
    placement(name) is the device each tensor goes to (e.g. swapped blocks on the CPU).
    """
    what = "DiT (--dit)"
    header = read_header(path, what)
    check_dit_version(header, zero_cond_t)
    config = architecture_config(header, TRANSFORMER_CONFIG)
    if zero_cond_t:
        config["zero_cond_t"] = True
    expected = (
        f"a Qwen-Image(-Edit) transformer with {config.get('num_layers', '?')} blocks "
        f"(diffusers names, optionally prefixed {DIT_PREFIX!r})"
    )
    model = _build_empty(lambda: QwenImageTransformer2DModel(**config), header, expected)
    _cast_empty(model, dtype)
    if fp8_base:
        model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype)
    _, auxiliary = _fp8_scales(header)
    sources = {
        key.removeprefix(DIT_PREFIX): key
        for key in header.shapes
        if key not in auxiliary and key.removeprefix(DIT_PREFIX) != INDEX_TIMESTEP_ZERO_KEY
    }
    check_layout(header, sources, model, expected)
    _fill(model, header, sources, placement)
    return model.eval().requires_grad_(False)


def load_vae(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> AutoencoderKLQwenImage:
    what = "VAE (--vae)"
    header = read_header(path, what)
    # ComfyUI's file uses Wan names; a diffusers-named file passes through the converter unchanged.
    # The converter only renames, so it is given the names themselves as values.
    sources = convert_wan_vae_to_diffusers({key: key for key in header.shapes})
    config = architecture_config(header, VAE_CONFIG)
    expected = "the Qwen-Image VAE (Wan 2.1 layout, 16 latent channels)"
    model = _build_empty(lambda: AutoencoderKLQwenImage(**config), header, expected)
    _cast_empty(model, dtype)
    check_layout(header, sources, model, expected)
    _fill(model, header, sources, lambda _name: torch.device(device))
    return model.eval().requires_grad_(False)


def text_encoder_model_key(key: str) -> str:
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model.") and not key.startswith(("model.language_model.", "model.visual.")):
        return "model.language_model." + key[len("model.") :]
    return key


def text_encoder_config(config: dict[str, Any]) -> Qwen2_5_VLConfig:
    """Qwen2.5-VL's config as every supported transformers reads it: the multimodal rope in both
    spellings (4.x reads `rope_scaling` + `rope_theta`, 5.x `rope_parameters` and still accepts
    `rope_scaling`), and the language model's settings also at the top level (as the model's own
    config.json has them; 4.52.1-4.52.3 read them only there)."""
    text = dict(config.get("text_config", {}))
    rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    if "mrope_section" in rope:
        theta = rope.get("rope_theta", text.get("rope_theta", 1000000.0))
        text["rope_theta"] = theta
        text["rope_scaling"] = {"type": "mrope", "mrope_section": list(rope["mrope_section"])}
        text["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": theta,
            "mrope_section": list(rope["mrope_section"]),
        }
    flat = {k: v for k, v in text.items() if k not in ("model_type", "rope_parameters", "rope_scaling")}
    return Qwen2_5_VLConfig(**{**flat, **config, "text_config": text})


def load_text_encoder(
    path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu"
) -> Qwen2_5_VLForConditionalGeneration:
    what = "text encoder (--text_encoder)"
    header = read_header(path, what)
    _, auxiliary = _fp8_scales(header)
    sources = {text_encoder_model_key(k): k for k in header.shapes if k not in auxiliary}
    config = architecture_config(header, TEXT_ENCODER_CONFIG)
    expected = "Qwen2.5-VL (`model.*` language model and `visual.*` vision tower)"
    model = _build_empty(lambda: Qwen2_5_VLForConditionalGeneration(text_encoder_config(config)), header, expected)
    _cast_empty(model, dtype)
    # Only hidden states are used; ComfyUI files may omit the LM head, which then shares the embedding.
    check_layout(header, sources, model, expected, optional=frozenset({"lm_head.weight"}))
    _fill(model, header, sources, lambda _name: torch.device(device))
    if "lm_head.weight" not in sources:
        model.lm_head.weight = model.model.language_model.embed_tokens.weight
    return model.eval().requires_grad_(False)


# The longest caption or prompt the trainer encodes, in tokens: Qwen-Image's pipelines refuse a
# max_sequence_length above it, and much longer ones overrun the transformer's 4096 text positions.
MAX_PROMPT_TOKENS = 1024


def load_processor(
    tokenizer: str | os.PathLike | None,
    processor_class: Any = Qwen2VLProcessor,
    repo: str = DEFAULT_PROCESSOR_REPO,
    model_name: str = "Qwen-Image-Edit",
) -> Any:
    """Tokenizer + image processor (`processor_class`) from a local folder (itself or its `processor/`)
    or the `processor/` folder of the hub repo `repo`."""
    if tokenizer is not None:
        folder = Path(tokenizer)
        candidates = [folder, folder / "processor"]
        for candidate in candidates:
            if (candidate / "tokenizer_config.json").is_file() or (candidate / "processor_config.json").is_file():
                return processor_class.from_pretrained(str(candidate))
        raise ModelFileError(
            f"--tokenizer {folder}: no tokenizer/processor found there or in {folder / 'processor'} "
            "(expected tokenizer_config.json and processor files, e.g. the `processor` folder of "
            f"{repo})"
        )
    try:
        return processor_class.from_pretrained(repo, subfolder="processor")
    except OSError as exc:
        raise ModelFileError(
            f"could not get the {model_name} processor from the hub ({repo}, processor/): "
            f"{exc}. Pass --tokenizer <folder> with a local copy of that folder."
        ) from exc
