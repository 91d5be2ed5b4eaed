"""`--max-memory` sizes, read by pydantic's ByteSize: every form accepted before still means the
same number of MiB (a unit letter alone is binary, a bare number is MiB); nonsense is refused
with a usage error, never a traceback."""

from __future__ import annotations

import argparse

import pytest

from lcmq.cli import build_parser, parse_memory_mb


@pytest.mark.parametrize(
    ("text", "mib"),
    [
        ("6GiB", 6144),
        ("6gib", 6144),
        (" 6 GiB ", 6144),
        ("1.5GiB", 1536),
        ("6G", 6144),
        ("6g", 6144),
        ("6GB", 5722),
        ("6gb", 5722),
        ("6000MB", 5722),
        ("8GB", 7629),
        ("512MiB", 512),
        ("512M", 512),
        ("512mb", 488),
        ("100", 100),
        ("100.9", 100),
        ("2048KiB", 2),
        ("2048k", 2),
        ("2000kb", 1),
        ("1TiB", 2**20),
        ("1t", 2**20),
        ("1TB", 953674),
    ],
)
def test_the_sizes_accepted_before_keep_their_value(text, mib):
    assert parse_memory_mb(text) == mib


@pytest.mark.parametrize("text", ["", "lots", "GiB", "0", "-1GiB", "0.1KiB", "6 GiBs", "inf", "nan", "infGiB"])
def test_nonsense_sizes_are_a_usage_error(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_memory_mb(text)


def test_max_memory_flag_takes_a_size():
    args = build_parser().parse_args(["worker", "--model", "tiny", "--max-memory", "6000MB"])
    assert args.max_memory == 5722
