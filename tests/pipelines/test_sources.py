"""Built-in and local sources: models and text, splits, errors (a damaged model directory included)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from pipelines import sources
from pipelines.modelio import load_model
from pipelines.sources import SourceError, check_weight_files, load_text, resolve_model, wiki_to_text


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def test_unknown_builtin_model_names_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"unknown built-in model 'builtin:llama-9t'.*builtin:smollm2-135m"):
        resolve_model("builtin:llama-9t", tmp_path)


def test_unknown_builtin_text_names_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"unknown built-in text 'builtin:c4'.*builtin:enwiki"):
        load_text("builtin:c4", "calibration", tmp_path)


def test_existing_directory_is_itself(tiny_model_dir: Path, tmp_path: Path) -> None:
    assert resolve_model(str(tiny_model_dir), tmp_path) == tiny_model_dir


def test_missing_local_path_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="not an existing directory"):
        resolve_model(str(tmp_path / "nope"), tmp_path)


def test_hub_failure_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    def offline(**_: object) -> str:
        raise ConnectionError("no route to host")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(SourceError, match="could not download 'org/model' from the Hugging Face hub"):
        resolve_model("org/model", tmp_path)


def test_failed_build_leaves_no_half_model(tmp_path: Path) -> None:
    def broken(out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed mid-build")

    with pytest.raises(RuntimeError):
        sources._atomic_build(tmp_path / "models" / "m", broken)
    assert list((tmp_path / "models").iterdir()) == []


def test_wiki_markup_is_stripped() -> None:
    markup = (
        "{{Infobox|name={{nested|x}}}}\n'''Aa''' is a [[river|stream]] in [[Estonia]].<ref>{{cite web|x}}</ref>\n"
        "[[File:Aa.jpg|thumb|A [[picture]] of it]]\n== History ==\n{|\n| cell\n|}\n"
        "* It flows <small>north</small>.\n[[Category:Rivers]]"
    )
    assert wiki_to_text(markup) == "Aa is a stream in Estonia.\n\nHistory\n\nIt flows north."


def test_enwiki_splits_share_no_article(cache_dir: Path) -> None:
    articles = sources.enwiki_articles(cache_dir)
    calibration = load_text("builtin:enwiki", "calibration", cache_dir)
    evaluation = load_text("builtin:enwiki", "evaluation", cache_dir)
    held_out = [a for a in articles if sources.is_evaluation_article(a["title"])]
    assert 5 <= len(held_out) <= len(articles) // 5
    for article in articles:
        in_eval = article["text"] in evaluation
        assert in_eval == (article in held_out)
        assert (article["text"] in calibration) != in_eval
    assert len(evaluation) > 48 * 1024 * 4  # enough for 48 windows of 1024 tokens at ~4 chars a token


def test_local_text_splits_every_tenth_paragraph(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("\n\n".join(f"paragraph {i}" for i in range(30)))
    assert load_text(str(path), "evaluation", tmp_path) == "paragraph 9\n\nparagraph 19\n\nparagraph 29"
    calibration = load_text(str(path), "calibration", tmp_path).split("\n\n")
    assert len(calibration) == 27 and "paragraph 9" not in calibration


def test_local_text_directory_reads_sorted_txt_files(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("\n\n".join(f"b{i}" for i in range(5)))
    (tmp_path / "a.txt").write_text("\n\n".join(f"a{i}" for i in range(5)))
    (tmp_path / "skip.md").write_text("not text")
    assert load_text(str(tmp_path), "evaluation", tmp_path) == "b4"


def test_too_short_local_text_has_no_evaluation_part(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("one paragraph only")
    with pytest.raises(SourceError, match="empty evaluation part"):
        load_text(str(path), "evaluation", tmp_path)


@pytest.mark.slow
def test_shipped_smollm2_loads_through_gguf_and_predicts_text(cache_dir: Path) -> None:
    from pipelines.data import eval_windows, perplexity
    from pipelines.modelio import load_model, load_tokenizer

    model_dir = resolve_model("builtin:smollm2-135m", cache_dir)
    assert resolve_model("builtin:smollm2-135m", cache_dir) == model_dir  # reused, not rebuilt
    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    windows = eval_windows(tokenizer, load_text("builtin:enwiki", "evaluation", cache_dir), 256, 2)
    ppl = perplexity(model, windows, batch_size=2)
    assert math.isfinite(ppl) and 5 < ppl < 40


def test_a_hub_prefixed_reference_is_never_a_local_folder(tmp_path, monkeypatch):
    """Where local paths are restricted the service sends hub ids as `hub:<id>`: a folder of that name in
    the worker's directory must not be read instead of the hub."""
    (tmp_path / "owner" / "model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model("owner/model", tmp_path / "cache") == Path("owner/model")  # embedded use: a folder
    with pytest.raises((SourceError, OSError)):
        resolve_model("hub:owner/model", tmp_path / "cache")


def test_builtin_news_is_text_of_another_kind_with_held_out_articles(tmp_path):
    calibration = load_text("builtin:news", "calibration", tmp_path)
    evaluation = load_text("builtin:news", "evaluation", tmp_path)
    held_out, kept = evaluation.split("\n\n"), calibration.split("\n\n")
    assert (len(kept), len(held_out)) == (264, 29)  # 300 articles, 7 repeats dropped
    assert not set(held_out) & set(kept)
    assert "bushfire" in calibration + evaluation


@pytest.mark.parametrize("content", [b"", b"short", b"not a safetensors file", (10**9).to_bytes(8, "little") + b"{}"])
def test_a_damaged_weight_file_is_named_before_loading(tmp_path: Path, tiny_model_dir: Path, content: bytes) -> None:
    damaged = tmp_path / "model"
    shutil.copytree(tiny_model_dir, damaged)
    check_weight_files(damaged)  # the intact copy passes
    (damaged / "model.safetensors").write_bytes(content)
    for load in (lambda: resolve_model(str(damaged), tmp_path), lambda: load_model(damaged)):
        with pytest.raises(SourceError, match=r"model\.safetensors is not a safetensors file"):
            load()
