"""Model cards: the README.md written into every checkpoint and adapter directory.

Follows the Hugging Face model card layout (huggingface_hub's ModelCard: a YAML front matter block
with `library_name`, `base_model`, `tags`, `pipeline_tag`, then Markdown sections), filled with
what issue 4 asks every output to record: base model, data (path, content hash, sizes), method
and hyperparameters, final train/validation metrics, wall time, hardware, the exact command line,
and how to load the result.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import sys

from engine.config import atomic_write_text

MODES = {
    "pretrain": "pretraining from scratch",
    "full": "full fine-tuning",
    "freeze": "partial fine-tuning (only the chosen blocks train)",
    "lora": "LoRA (low-rank adapters; base weights frozen)",
    "dora": "DoRA (weight-decomposed low-rank adapters; base weights frozen)",
    "qlora": "QLoRA (LoRA over an NF4 4-bit quantized, frozen base)",
    "half": "Half Fine-Tuning (alternating halves of the parameters train)",
    "dpo": "DPO preference optimization",
}


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes. For a directory: SHA-256 over its files in sorted order,
    each contributing its relative path, a NUL byte and its own SHA-256 (renames change it)."""
    if os.path.isdir(path):
        h = hashlib.sha256()
        files = sorted(os.path.relpath(os.path.join(root, f), path)
                       for root, _, names in os.walk(path) for f in names if not f.startswith("."))
        for rel in files:
            h.update(rel.replace(os.sep, "/").encode() + b"\0")
            h.update(bytes.fromhex(file_sha256(os.path.join(path, rel), chunk)))
        return h.hexdigest()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"cannot hash {path}: no such file or directory")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "processor\t: arm")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or None


def _ram_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        pass
    return None


def describe_hardware() -> str:
    """One line: GPU name(s) and memory when CUDA is available, the CPU model and cores, RAM, and
    the torch / Python versions."""
    import torch
    parts = []
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        props = torch.cuda.get_device_properties(0)
        parts.append(f"GPU: {n} x {props.name} ({props.total_memory / 2**30:.0f} GiB), "
                     f"CUDA {torch.version.cuda}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpu = f"CPU: {_cpu_model() or 'unknown'}, {cores} cores usable"
    if os.cpu_count() and os.cpu_count() != cores:
        cpu += f" (of {os.cpu_count()})"
    cpu += f", torch threads {torch.get_num_threads()}"
    parts.append(cpu)
    ram = _ram_gib()
    if ram:
        parts.append(f"RAM {ram:.0f} GiB")
    parts.append(f"torch {torch.__version__}, Python {platform.python_version()}")
    return "; ".join(parts)


def peak_memory_mb() -> dict:
    """This process's peak memory so far: resident set size (ru_maxrss: kB on Linux, bytes on
    macOS), and the CUDA allocator's peak when a GPU is in use."""
    import torch
    out = {}
    try:
        import resource
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["peak_rss_mb"] = round(rss / (2**20 if sys.platform == "darwin" else 2**10), 1)
    except ImportError:  # Windows
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def command_line(argv: list[str] | None = None) -> str:
    """The command that started this process, shell-quoted (python SCRIPT ARGS...; under
    torchrun, torchrun --nnodes N --nproc_per_node M SCRIPT ARGS..., from its environment)."""
    argv = sys.argv if argv is None else argv
    world, local = os.environ.get("WORLD_SIZE"), os.environ.get("LOCAL_WORLD_SIZE")
    if world and local and int(world) > 1:
        nodes = int(world) // int(local)
        return shlex.join(["torchrun", "--nnodes", str(nodes), "--nproc_per_node", local]
                          + list(argv))
    return shlex.join(["python"] + list(argv))


def format_duration(seconds: float) -> str:
    s = int(round(seconds))
    h, m, s = s // 3600, s // 60 % 60, s % 60
    text = (f"{h} h {m} min {s} s" if h else f"{m} min {s} s" if m else f"{seconds:.1f} s")
    return text + (f" ({seconds:,.0f} s)" if h or m else "")


def _fmt(v) -> str:
    """A table cell: numbers readable, lists joined, Markdown table syntax escaped."""
    if isinstance(v, bool) or v is None:
        text = str(v).lower() if isinstance(v, bool) else "none"
    elif isinstance(v, int):
        text = f"{v:,}"
    elif isinstance(v, float):
        text = (f"{v:,.1f}" if abs(v) >= 1000 else f"{v:.4f}" if abs(v) >= 1e-3 or v == 0
                else f"{v:.3g}")
        if "." in text and "e" not in text:  # 554.7, not 554.7000; 0.003, not 0.0030
            text = text.rstrip("0").rstrip(".")
    elif isinstance(v, (list, tuple)):
        text = ", ".join(str(x) for x in v)
    elif isinstance(v, dict):
        text = json.dumps(v, sort_keys=True)
    else:
        text = str(v)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(rows: dict, header: tuple[str, str]) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {_fmt(k)} | {_fmt(v)} |" for k, v in rows.items()]
    return "\n".join(lines)


def _yaml_str(s: str) -> str:
    return json.dumps(str(s))  # a JSON string is a valid YAML double-quoted scalar


def render_model_card(directory: str, *, base_model: str | None, data_path: str | None,
                      data_hash: str | None, data_sizes: dict | None, mode: str,
                      hyperparameters: dict, metrics: dict, wall_time_s: float, hardware: str,
                      command: str, adapter: bool, notes: str | None = None,
                      resumed_with: str | None = None) -> str:
    """The README.md text (see write_model_card)."""
    name = os.path.basename(os.path.normpath(directory)) or "model"
    parts = mode.split("+")  # e.g. "lora+dpo": the method, then how it was trained
    tags = ["whetstone", *parts] + (["peft", "adapter"] if adapter else []) + ["text-generation"]
    front = ["---", "library_name: whetstone"]
    if base_model:
        front.append(f"base_model: {_yaml_str(base_model)}")
    front += ["pipeline_tag: text-generation", "tags:"] + [f"- {_yaml_str(t)}" for t in dict.fromkeys(tags)]
    front.append("---")

    what = " with ".join(MODES.get(m, m) for m in parts)
    kind = "An adapter" if adapter else "A model"
    summary = (kind + (f" for `{base_model}`," if base_model else "") + f" trained with Whetstone by {what}"
               + (f" on `{data_path}`" if data_path else "") + ".")
    out = front + ["", f"# {name}", "", summary, ""]

    out += ["## Base model", "", f"`{base_model}`" if base_model else "None: trained from scratch.", ""]

    out += ["## Data", ""]
    out.append(f"- path: `{data_path}`" if data_path else "- path: (none recorded)")
    out.append(f"- sha256: `{data_hash}`" if data_hash else "- sha256: (not recorded)")
    for k, v in (data_sizes or {}).items():
        out.append(f"- {k}: {_fmt(v)}")
    out.append("")

    out += ["## Method and hyperparameters", "", f"Mode: `{mode}` — {what}.", "",
            _table(dict(hyperparameters), ("hyperparameter", "value")), ""]

    out += ["## Results", "", "Final metrics (train and validation):", ""]
    out += [_table(dict(metrics), ("metric", "value")) if metrics else "(no metrics recorded)", ""]

    out += ["## Training time and hardware", "", f"- wall time: {format_duration(wall_time_s)}",
            f"- hardware: {hardware}", ""]

    # the command that reproduces the run; a resume's (its flags are the run's) only as a note
    out += ["## Command", "", "```bash", command]
    out += [f"# resumed with: {resumed_with}"] if resumed_with else []
    out += ["```", ""]

    d = os.path.normpath(directory)
    out += ["## How to use", ""]
    if adapter:
        base = base_model or "BASE_MODEL"
        out += ["The adapter is in PEFT format (`adapter_config.json` + `adapter_model.safetensors`).",
                "", "```python", "from engine import load_model", "",
                f"model, tokenizer = load_model({base!r}, adapter={d!r})", "```", "",
                "```bash", f"python generate.py --model {shlex.quote(base)} --adapter {shlex.quote(d)} "
                           "--chat \"Hello\"", "```", ""]
    else:
        out += ["```python", "from engine import load_model", "",
                f"model, tokenizer = load_model({d!r})", "```", "",
                "```bash", f"python generate.py --checkpoint {shlex.quote(d)} --prompt \"Hello\"",
                "```", ""]
    if notes:
        out += ["## Notes", "", notes.strip(), ""]
    return "\n".join(out)


def write_model_card(directory: str, *, base_model: str | None, data_path: str | None,
                     data_hash: str | None = None, data_sizes: dict | None = None, mode: str,
                     hyperparameters: dict, metrics: dict, wall_time_s: float,
                     hardware: str | None = None, command: str | None = None,
                     adapter: bool = False, notes: str | None = None,
                     resumed_with: str | None = None) -> str:
    """Write `directory`/README.md atomically; returns its path.

    data_hash: SHA-256 of the data (computed with file_sha256 when None and data_path exists).
    mode: a MODES key, or keys joined by "+" ("lora+dpo", "full+half").
    data_sizes: e.g. {"train examples": 900, "validation examples": 100, "train tokens": ...}.
    hyperparameters / metrics: flat dicts rendered as tables. hardware defaults to
    describe_hardware(), command to this process's command line. resumed_with: for a run
    continued with --resume, that command (shown as a comment under `command`, which stays the
    one that started the run).
    """
    if data_hash is None and data_path and os.path.exists(data_path):
        data_hash = file_sha256(data_path)
    text = render_model_card(
        directory, base_model=base_model, data_path=data_path, data_hash=data_hash,
        data_sizes=data_sizes, mode=mode, hyperparameters=hyperparameters, metrics=metrics,
        wall_time_s=wall_time_s, hardware=hardware or describe_hardware(),
        command=command or command_line(), adapter=adapter, notes=notes, resumed_with=resumed_with)
    path = os.path.join(directory, "README.md")
    atomic_write_text(path, text)
    return path
