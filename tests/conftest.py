"""Shared fixtures: small data directories made by the real stages."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipeline import download, shard, tokenize


@pytest.fixture(scope="session")
def builtin_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 150 documents of the builtin corpus, a 512-token BPE, and shards."""
    data_dir = tmp_path_factory.mktemp("builtin-data")
    download.run(download.DownloadConfig(data_dir=data_dir, max_docs=150))
    tokenize.run(tokenize.TokenizeConfig(data_dir=data_dir, tokenizer="bpe:512"))
    shard.run(shard.ShardConfig(data_dir=data_dir, val_fraction=0.1))
    return data_dir


@pytest.fixture()
def data_copy(builtin_data: Path, tmp_path: Path) -> Path:
    """A private copy of builtin_data, for tests that train or break things."""
    target = tmp_path / "data"
    shutil.copytree(builtin_data, target)
    return target
