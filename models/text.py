"""An offline English text corpus for calibrating and evaluating text encoders.

Nothing can be downloaded at run time, so the sentences come from text that ships with the
interpreter and with scikit-learn: the docstrings of a fixed list of standard-library modules
and the dataset descriptions (``sklearn/datasets/descr/*.rst``). That is real prose written by
people (technical, but varied in length and vocabulary), about 2,000 sentences after filtering.

The split is by a hash of the sentence, not by position, so it does not depend on the order in
which modules list their members: about 20% of sentences are ``test`` (held out from every
search), the rest ``train`` (the calibration pool).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import re
from functools import lru_cache
from pathlib import Path

SPLITS = ("train", "test", "all")
TEST_PERCENT = 20

_MODULES = (
    "argparse", "asyncio", "base64", "bisect", "bz2", "calendar", "cmd", "codecs", "collections",
    "concurrent.futures", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "doctest", "email", "enum", "fnmatch", "fractions", "ftplib", "functools",
    "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html.parser", "http.client", "imaplib",
    "inspect", "io", "itertools", "json", "locale", "logging", "lzma", "mailbox", "math",
    "mimetypes", "multiprocessing", "numbers", "operator", "pathlib", "pdb", "platform", "plistlib",
    "poplib", "pprint", "queue", "random", "reprlib", "sched", "secrets", "selectors", "shlex",
    "shutil", "signal", "smtplib", "socket", "sqlite3", "statistics", "string", "struct",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace",
    "traceback", "typing", "unittest", "urllib.request", "uuid", "warnings", "weakref", "zipfile",
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_CODE_LIKE = re.compile(r"[>{}\[\]=_`|\\]")


def _docstrings() -> list[str]:
    texts = []
    for name in _MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # a stripped-down interpreter: fewer sentences, same code path
            continue
        members = [module] + [getattr(module, n) for n in sorted(dir(module)) if not n.startswith("_")]
        for obj in members:
            if inspect.isfunction(obj) or inspect.isclass(obj) or inspect.ismodule(obj):
                doc = inspect.getdoc(obj)
                if doc:
                    texts.append(doc)
    return texts


def _sklearn_descriptions() -> list[str]:
    import sklearn.datasets

    folder = Path(sklearn.datasets.__file__).parent / "descr"
    return [p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.rst"))]


def _sentences(text: str) -> list[str]:
    """Prose sentences of 8 to 40 words; code, tables and markup lines are dropped."""
    out = []
    for sentence in _SENTENCE_END.split(" ".join(text.split())):
        words = sentence.split()
        if 8 <= len(words) <= 40 and sentence[0].isupper() and not _CODE_LIKE.search(sentence):
            out.append(sentence)
    return out


def _is_test(sentence: str) -> bool:
    return int(hashlib.sha1(sentence.encode()).hexdigest(), 16) % 100 < TEST_PERCENT


@lru_cache(maxsize=1)
def _corpus() -> tuple[str, ...]:
    sentences = {s for text in _docstrings() + _sklearn_descriptions() for s in _sentences(text)}
    # sorted by hash: a fixed, well-mixed order (neighbouring sentences come from different modules)
    return tuple(sorted(sentences, key=lambda s: hashlib.sha1(s.encode()).hexdigest()))


def text_corpus(split: str = "train") -> list[str]:
    """Sentences of one split (``train``, ``test`` or ``all``), in a fixed order."""
    if split not in SPLITS:
        raise ValueError(f"Unknown text split {split!r}; accepted: {', '.join(SPLITS)}.")
    corpus = _corpus()
    if split == "all":
        return list(corpus)
    return [s for s in corpus if _is_test(s) == (split == "test")]
