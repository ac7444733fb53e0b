"""README.md's commands stay true (doc rot): every command line of its ```bash blocks and every
inline `python ...` / `train.py --flag` span is checked against the program's own argparse
parser (imported, nothing spawned or run): each --flag must exist exactly (no abbreviation), and a
whole command must parse with its placeholder values (`...` dropped, `0|1` read as its first
choice), through the same checks the CLI applies before it loads anything (train.py's
engine.train_args.parse_args, generate.py's validate, eval.py's parse_args). Bare backticked
--flags in the prose are checked against the program they describe: the nearest command span
before them in their paragraph, else the programs of their section (its heading and its bash
blocks). Repository paths named in code spans must exist. The Python API snippet runs on the
demo model (slow)."""
from __future__ import annotations

import argparse
import contextlib
import functools
import glob
import io
import os
import re
import shlex
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
README = os.path.join(ROOT, "README.md")

SCRIPTS = ("train.py", "generate.py", "eval.py", "serve.py")
MODULES = ("engine.merge", "engine.gguf_export", "kernels.bench", "kernels.compile_check")
# Commands the README shows that are not ours to check (their flags belong to other tools).
FOREIGN_COMMANDS = ("pip", "curl", "pytest")
# Flags the prose names that belong to another tool, with the tool.
FOREIGN_FLAGS = {
    "--durations": "pytest (.ci/run's test command)",
    "--enable-auto-tool-choice": "vLLM (serve.py's tool calling is modelled on it)",
    "--tool-call-parser": "vLLM (serve.py's tool calling is modelled on it)",
}
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")
_SPAN = re.compile(r"`([^`]+)`")


# ---------------------------------------------------------------- README parsing

class Command:
    """One command line: `prog` is a SCRIPTS/MODULES name, "torchrun", "bash", a
    FOREIGN_COMMANDS name or whatever else the line starts with (an unknown program fails)."""

    def __init__(self, line: int, text: str, tokens: list[str], partial: bool = False):
        self.line, self.text, self.partial = line, text, partial
        self.env: dict[str, str] = {}
        while tokens and _ENV.match(tokens[0]):  # MALLOC_MMAP_THRESHOLD_=1048576 python ...
            k, v = tokens.pop(0).split("=", 1)
            self.env[k] = v
        self.prog, self.args, self.launcher_args = "?", [], []
        self.torchrun = bool(tokens) and tokens[0] == "torchrun"
        if not tokens:
            return
        head = tokens[0]
        if head in ("python", "python3") and len(tokens) > 1:
            if tokens[1] == "-m" and len(tokens) > 2:
                self.prog, self.args = tokens[2], tokens[3:]
            else:
                self.prog, self.args = tokens[1], tokens[2:]
        elif head == "torchrun":
            # torchrun [its flags] SCRIPT.py [the script's flags]
            i = next((i for i, t in enumerate(tokens) if t.endswith(".py")), len(tokens))
            self.launcher_args = tokens[1:i]
            self.prog, self.args = (tokens[i], tokens[i + 1:]) if i < len(tokens) else ("?", [])
        elif head in SCRIPTS:  # `train.py --base` in prose: a script named with some flags
            self.prog, self.args, self.partial = head, tokens[1:], True
        else:
            self.prog, self.args = head, tokens[1:]

    def __repr__(self):
        return f"README.md:{self.line}: {self.text}"


def _split_commands(line: int, text: str, partial: bool = False) -> list[Command]:
    """A shell line (comments already cut or not) -> its commands, split at && || ; |."""
    tokens = shlex.split(text, comments=True)
    out, cur = [], []
    for t in tokens + ["&&"]:
        if t in ("&&", "||", ";", "|"):
            if cur:
                out.append(Command(line, " ".join(shlex.quote(c) for c in cur), cur, partial))
            cur = []
        else:
            cur.append(t)
    return out


def block_commands(lines: list[tuple[int, str]]) -> list[Command]:
    """The commands of a ```bash block: backslash continuations joined, comments dropped, and a
    command quoted in a comment after a colon (`# or static: torchrun ...`) taken as one."""
    out, buf, start = [], "", None
    for no, raw in lines:
        if start is None:
            start = no
        if raw.rstrip().endswith("\\"):
            buf += raw.rstrip()[:-1] + " "
            continue
        buf += raw
        stripped = buf.strip()
        if stripped.startswith("#"):
            m = re.search(r":\s*((?:torchrun|python3?)\s.*)$", stripped)
            if m:
                out += _split_commands(start, m.group(1))
        elif stripped:
            out += _split_commands(start, stripped)
        buf, start = "", None
    return out


class Section:
    def __init__(self, heading: str, line: int):
        self.heading, self.line = heading, line
        self.blocks: list[tuple[str, list[tuple[int, str]]]] = []  # (language, numbered lines)
        self.paragraphs: list[tuple[int, str]] = []  # (first line, text)

    @property
    def programs(self) -> set[str]:
        """Programs this section documents: named in its heading or run in its bash blocks."""
        progs = {c.prog for c in _span_commands(self.line, self.heading)}
        for lang, lines in self.blocks:
            if lang == "bash":
                for c in block_commands(lines):
                    progs.add(c.prog)
                    if c.torchrun:
                        progs.add("torchrun")
        return progs


def sections(text: str) -> list[Section]:
    out = [Section("", 0)]
    fence, para, para_start = None, [], None
    for no, line in enumerate(text.splitlines(), 1):
        if fence is not None:
            if line.startswith("```"):
                out[-1].blocks.append(fence)
                fence = None
            else:
                fence[1].append((no, line))
            continue
        if line.startswith("```") or line.startswith("#") or not line.strip():
            if para:
                out[-1].paragraphs.append((para_start, "\n".join(para)))
                para = []
            if line.startswith("```"):
                fence = (line[3:].strip(), [])
            elif line.startswith("#"):
                out.append(Section(line.lstrip("#").strip(), no))
            continue
        if not para:
            para_start = no
        para.append(line)
    if para:
        out[-1].paragraphs.append((para_start, "\n".join(para)))
    return out


def _is_command_span(span: str) -> bool:
    words = span.split()
    while words and _ENV.match(words[0]):
        words.pop(0)
    return bool(words) and (words[0] in ("python", "python3", "torchrun", "bash")
                            or words[0] in SCRIPTS and len(words) > 1)


def _span_commands(line: int, text: str) -> list[Command]:
    out = []
    for m in _SPAN.finditer(text):
        span = " ".join(m.group(1).split())
        if _is_command_span(span):
            # partial: `train.py --base` (a script and some of its flags) or a program named
            # without arguments (`python -m engine.merge`): flags checked, not a whole command
            for c in _split_commands(line + text.count("\n", 0, m.start()), span):
                c.partial = c.partial or not c.args
                out.append(c)
    return out


def inline_commands(secs: list[Section]) -> list[Command]:
    """Commands written in backticks in the prose (and in headings)."""
    out = []
    for s in secs:
        out += _span_commands(s.line, s.heading)
        for start, text in s.paragraphs:
            out += _span_commands(start, text)
    return out


def flag_mentions(secs: list[Section]) -> list[tuple[int, str, str | None, set[str], str]]:
    """Every --flag in a non-command code span: (line, flag, the program of the nearest command
    span before it in its paragraph or None, the section's programs, the word after the flag in
    the span: its value as written, or "")."""
    out = []
    for s in secs:
        progs = s.programs
        for start, text in s.paragraphs:
            current = None
            for m in _SPAN.finditer(text):
                span = " ".join(m.group(1).split())
                line = start + text.count("\n", 0, m.start())
                if _is_command_span(span):
                    cmds = _split_commands(line, span)
                    current = cmds[0].prog if cmds else current
                    continue
                for f in _FLAG.finditer(span):
                    value = span[f.end():].split(maxsplit=1)
                    value = value[0] if value and not span[f.end():f.end() + 1].strip() else ""
                    out.append((line, f.group(0), current, progs, value))
    return out


@functools.lru_cache(maxsize=None)
def readme() -> tuple[list[Section], list[Command]]:
    with open(README, encoding="utf-8") as f:
        secs = sections(f.read())
    cmds = [c for s in secs for lang, lines in s.blocks if lang == "bash"
            for c in block_commands(lines)]
    return secs, cmds + inline_commands(secs)


# ---------------------------------------------------------------- the programs' parsers

class _Bad(Exception):
    pass


@functools.lru_cache(maxsize=None)
def parser(prog: str) -> argparse.ArgumentParser:
    if prog == "train.py":
        from engine.train_args import build_parser
        return build_parser()
    if prog == "generate.py":
        import generate
        return generate.build_parser()
    if prog == "serve.py":
        import serve
        return serve.build_parser()
    if prog == "eval.py":
        import eval as eval_cli
        return eval_cli.build_parser()
    if prog == "torchrun":
        from torch.distributed.run import get_args_parser
        return get_args_parser()
    if prog == "kernels.compile_check":
        import kernels.bench  # noqa: F401  (kernels imported under TRITON_INTERPRET first)
        old = os.environ.get("TRITON_INTERPRET")
        try:  # compile_check drops TRITON_INTERPRET on import; the kernel tests need it kept
            import kernels.compile_check as mod
        finally:
            if old is not None:
                os.environ["TRITON_INTERPRET"] = old
        return mod.build_parser()
    if prog in MODULES:
        import importlib
        return importlib.import_module(prog).build_parser()
    raise KeyError(prog)


def _placeholders(args: list[str]) -> list[str]:
    """`...` means "more flags": dropped; `0|1` (one of) -> its first choice."""
    out = []
    for a in args:
        if a == "...":
            continue
        if not a.startswith("-") and re.fullmatch(r"[\w.:-]+(\|[\w.:-]+)+", a):
            a = a.split("|")[0]
        out.append(a)
    return out


def _parse(p: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """p.parse_args(argv), any usage error raised as _Bad (whatever the parser's error does)."""
    def error(message):
        raise _Bad(message)
    p.error = error
    try:
        return p.parse_args(argv)
    finally:
        del p.error


def _checked(prog: str, argv: list[str], tmp: str) -> None:
    """The whole command line through the program's own checks before loading anything."""
    if prog == "train.py":
        from engine.train_args import parse_args
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                parse_args(argv)
        except SystemExit:
            raise _Bad(err.getvalue().strip()) from None
    elif prog == "generate.py":
        import generate
        from engine.config import UsageError
        try:
            generate.validate(_parse(parser(prog), argv))
        except UsageError as e:
            raise _Bad(str(e)) from None
    elif prog == "serve.py":
        from engine.serve import parse_adapter_specs
        try:
            parse_adapter_specs(_parse(parser(prog), argv).adapter)
        except ValueError as e:
            raise _Bad(str(e)) from None
    elif prog == "eval.py":
        import eval as eval_cli
        args = _parse(parser(prog), argv)
        # eval.py refuses a --data that does not exist: the README's placeholder files, in tmp
        data = os.path.join(tmp, args.data)
        os.makedirs(os.path.dirname(data), exist_ok=True)
        open(data, "a").close()
        err, cwd = io.StringIO(), os.getcwd()
        os.chdir(tmp)
        try:
            with contextlib.redirect_stderr(err):
                eval_cli.parse_args(argv)
        except SystemExit:
            raise _Bad(err.getvalue().strip()) from None
        finally:
            os.chdir(cwd)
    else:
        _parse(parser(prog), argv)


def unknown_flags(p: argparse.ArgumentParser, args: list[str]) -> list[str]:
    """Flags of `args` the parser does not define exactly (argparse would take an abbreviation)."""
    out = []
    for a in args:
        if a == "--":
            break
        if re.match(r"^--?[A-Za-z]", a) and a.split("=", 1)[0] not in p._option_string_actions:
            out.append(a.split("=", 1)[0])
    return out


# ---------------------------------------------------------------- tests

def _commands():
    return readme()[1]


@pytest.mark.parametrize("cmd", _commands(), ids=lambda c: f"L{c.line}-{c.prog}")
def test_command(cmd, tmp_path):
    """Each README command names a program that exists, uses only its flags, and parses."""
    if cmd.prog in FOREIGN_COMMANDS:
        return
    if cmd.prog == "bash":  # `bash benchmarks/gpu_run.sh OUTDIR`
        assert os.path.isfile(os.path.join(ROOT, cmd.args[0])), f"{cmd}: no {cmd.args[0]}"
        return
    assert cmd.prog in SCRIPTS + MODULES, (
        f"{cmd}: program {cmd.prog!r} is not one this test knows (a new or renamed script? add "
        "it to SCRIPTS / MODULES)")
    path = cmd.prog if cmd.prog in SCRIPTS else cmd.prog.replace(".", "/") + ".py"
    assert os.path.isfile(os.path.join(ROOT, path)), f"{cmd}: {path} does not exist"
    if cmd.torchrun:
        launcher = _placeholders(cmd.launcher_args)
        assert not unknown_flags(parser("torchrun"), launcher), (
            f"{cmd}: torchrun has no {unknown_flags(parser('torchrun'), launcher)}")
        ns = _parse(parser("torchrun"), launcher + [cmd.prog])
        assert ns.training_script == cmd.prog
    args = _placeholders(cmd.args)
    bad = unknown_flags(parser(cmd.prog), args)
    assert not bad, f"{cmd}: {cmd.prog} has no {', '.join(bad)}"
    if not cmd.partial:
        try:
            _checked(cmd.prog, args, str(tmp_path))
        except _Bad as e:
            pytest.fail(f"{cmd}: {cmd.prog} refuses it: {e}")


def test_every_program_is_shown():
    """The extraction finds the README's commands (a broken extractor would check nothing)."""
    progs = {c.prog for c in _commands()}
    assert set(SCRIPTS) | set(MODULES) <= progs, (set(SCRIPTS) | set(MODULES)) - progs
    cmds = [c for c in _commands() if not c.partial]
    assert any(c.torchrun for c in cmds)  # torchrun ... train.py
    assert any(c.env for c in cmds)  # MALLOC_MMAP_THRESHOLD_=... python train.py
    assert len(cmds) >= 30, len(cmds)


def test_flag_mentions():
    """Every backticked --flag in the prose belongs to the program it describes."""
    secs, _ = readme()
    mentions = flag_mentions(secs)
    assert len(mentions) >= 150, len(mentions)  # the prose lists most flags
    bad, valued = [], 0
    for line, flag, current, progs, value in mentions:
        if flag in FOREIGN_FLAGS:
            continue
        owners = ([current] if current else []) + sorted(progs)
        if not owners:  # prose about several programs (`--chat-template` replaces them all)
            owners = list(SCRIPTS + MODULES)
        owner = next((o for o in owners if o in SCRIPTS + MODULES + ("torchrun",)
                      and flag in parser(o)._option_string_actions), None)
        if owner is None:
            bad.append(f"README.md:{line}: {flag} is not a flag of {' or '.join(owners)}")
            continue
        # a value written for a flag with choices (`--finetune full`, `--type f16|bf16|f32|q8_0`)
        # must be among them; FILE|JINJA|chatml-style placeholders are skipped
        choices = parser(owner)._option_string_actions[flag].choices
        alts = value.strip(",;.)").split("|") if value else []
        if choices and alts and all(re.fullmatch(r"[a-z0-9_.-]+", a) for a in alts):
            valued += 1
            wrong = [a for a in alts if a not in choices]
            if wrong:
                bad.append(f"README.md:{line}: {flag} {value}: {owner} takes "
                           f"{', '.join(map(str, choices))}, not {', '.join(wrong)}")
    assert valued >= 4, valued  # the choice check saw the README's valued mentions
    assert not bad, "\n".join(bad)


def test_repo_paths_exist():
    """Code spans naming a file or folder of the repository (engine/finetune.py, .ci/run, ...)."""
    secs, _ = readme()
    # the repository's own top-level folders, not run outputs (.gitignore's out/ and runs/)
    top = {d for d in os.listdir(ROOT) if os.path.isdir(os.path.join(ROOT, d))} - {"out", "runs"}
    # a file a program writes (benchmarks/results/bench.jsonl) is named as its flag's default
    outputs = {a.default for prog in SCRIPTS + MODULES for a in parser(prog)._actions
               if isinstance(a.default, str)}
    checked, missing = 0, []
    texts = [(s.line, s.heading) for s in secs] + [p for s in secs for p in s.paragraphs]
    for start, text in texts:
        for m in _SPAN.finditer(text):
            span = m.group(1).strip()
            if not re.fullmatch(r"[\w.*-]+(/[\w.*-]+)*/?", span) or "/" not in span:
                continue
            if span.split("/")[0] not in top:  # out/RUN, additional_chat_templates/NAME.jinja
                continue
            checked += 1
            if not glob.glob(os.path.join(ROOT, span)) and span not in outputs:
                missing.append(f"README.md:{start + text.count(chr(10), 0, m.start())}: {span}")
    assert checked >= 10, checked
    assert not missing, "\n".join(missing)


def test_env_vars_exist():
    """Every WHETSTONE_* variable the README names is read somewhere in the code."""
    with open(README, encoding="utf-8") as f:
        names = set(re.findall(r"WHETSTONE_[A-Z_]+", f.read()))
    code = ""
    for path in glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "*", "*.py")):
        if os.path.basename(os.path.dirname(path)) != "tests":
            with open(path, encoding="utf-8") as f:
                code += f.read()
    assert names, "the README names no WHETSTONE_* variable any more?"
    assert not [n for n in names if n not in code], sorted(n for n in names if n not in code)


def test_extraction():
    """The extractor on a made-up README: continuations, comments, env prefixes, torchrun, a
    command inside a comment, inline spans, and a stale flag reported."""
    text = "\n".join([
        "### train.py", "", "```bash",
        "python train.py --data x \\", "   --max-steps 3   # a comment --not-a-flag",
        "# or: torchrun --nnodes 2 train.py ...",
        "MALLOC_ARENA_MAX=2 WHETSTONE_KERNELS=torch python train.py && "
        "python generate.py --top-k 4",
        "```", "",
        "Flags: `--lr`, `--no-such-flag`; merge: `python -m engine.merge --base b --adapter a",
        "--out o` (`--rank`, `--lr`).", ""])
    secs = sections(text)
    cmds = [c for s in secs for _, lines in s.blocks for c in block_commands(lines)]
    assert [(c.line, c.prog, c.args) for c in cmds] == [
        (4, "train.py", ["--data", "x", "--max-steps", "3"]),
        (6, "train.py", ["..."]),
        (7, "train.py", []),
        (7, "generate.py", ["--top-k", "4"])]
    assert cmds[1].launcher_args == ["--nnodes", "2"] and cmds[2].env == {
        "MALLOC_ARENA_MAX": "2", "WHETSTONE_KERNELS": "torch"}
    inline = inline_commands(secs)
    assert [(c.line, c.prog, c.args) for c in inline] == [
        (10, "engine.merge", ["--base", "b", "--adapter", "a", "--out", "o"])]
    mentions = [(line, f, cur) for line, f, cur, progs, value in flag_mentions(secs)]
    assert mentions == [(10, "--lr", None), (10, "--no-such-flag", None),
                        (11, "--rank", "engine.merge"), (11, "--lr", "engine.merge")]
    assert secs[1].programs == {"train.py", "generate.py", "torchrun"}
    assert unknown_flags(parser("train.py"), ["--lr", "1", "--no-such-flag", "--max-step", "3"]) \
        == ["--no-such-flag", "--max-step"]  # an abbreviation argparse would take is stale too


def test_checks_catch_bad_values(tmp_path):
    """_checked runs each CLI's own checks: a value the CLI refuses fails, as README text would
    (train.py's are the README's own examples of one-line usage errors)."""
    cases = [("train.py", ["--eval-batches", "0"])] + (
        [] if torch.cuda.is_available() else [("train.py", ["--device", "cuda"])])
    for prog, argv in cases + [("train.py", ["--lr", "-1"]),
                       ("train.py", ["--lora-r", "4"]),  # applies only to adapter fine-tuning
                       ("generate.py", ["--chat", "hi", "--interactive"]),
                       ("eval.py", ["--model", "m", "--data", "d.txt", "--task", "choice",
                                    "--stride", "4"]),
                       ("serve.py", ["--model", "m", "--adapter", "no-equals-sign"]),
                       ("engine.merge", ["--base", "b", "--adapter", "a"]),  # no --out
                       ("kernels.bench", ["--quick", "--only"])]:
        with pytest.raises(_Bad):
            _checked(prog, argv, str(tmp_path))


@pytest.mark.slow
def test_python_api_snippet():
    """The Python API block runs as written on the demo model, and its comments hold."""
    secs, _ = readme()
    blocks = [lines for s in secs for lang, lines in s.blocks
              if lang == "python" and any("load_model(" in t for _, t in lines)]
    assert len(blocks) == 1
    code = "\n".join(t for _, t in blocks[0])
    from engine import hub
    sources = re.findall(r"load_model\(\s*['\"]([^'\"]+)['\"]", code)
    assert sources and set(sources) <= set(hub.REGISTRY), sources  # the demo model only
    ns, out = {"__name__": "readme_snippet"}, io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md (Python API)", "exec"), ns)
    ids, logits, loss, nll, tok = ns["ids"], ns["logits"], ns["loss"], ns["nll"], ns["tok"]
    n = ids.shape[1]
    assert logits.shape == (1, n, ns["model"].config.vocab_size)  # (batch, seq, vocab)
    assert nll.shape == (1, n - 1)  # (batch, seq) per-token NLL
    ref = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="none")
    torch.testing.assert_close(nll[0].detach(), ref.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss.detach(), ref.mean().detach(), rtol=1e-4, atol=1e-4)
    printed = out.getvalue()
    assert "Hi" in printed and printed.rstrip().endswith(f"{tok.bos_id} {tok.eos_id}")
