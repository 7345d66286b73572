"""Tests for examples/make_world.py: determinism, the train/held-out separation, and the shipped data files."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

from lora.phi3.chat import load_conversations

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load_example():  # noqa: ANN202 - a module loaded by path
    spec = importlib.util.spec_from_file_location("make_world", EXAMPLES / "make_world.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_world"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


make_world = _load_example()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_world.make_world(tmp_path_factory.mktemp("world"), seed=0)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_same_seed_same_files(world: dict[str, Path], tmp_path: Path) -> None:
    again = make_world.make_world(tmp_path / "again", seed=0)
    other = make_world.make_world(tmp_path / "other", seed=1)
    assert sorted(again) == sorted(world)
    for name in world:
        assert again[name].read_bytes() == world[name].read_bytes(), name
    assert other["world_corpus.txt"].read_bytes() != world["world_corpus.txt"].read_bytes()


def test_shipped_files_equal_a_fresh_generation(world: dict[str, Path]) -> None:
    for name, path in world.items():
        shipped = EXAMPLES / "data" / name
        assert shipped.is_file(), f"{shipped} is missing: run python examples/make_world.py --seed 0"
        assert shipped.read_bytes() == path.read_bytes(), f"{shipped} is stale: run python examples/make_world.py"


def test_heldout_facts_never_in_train_chats(world: dict[str, Path]) -> None:
    train = _jsonl(world["world_chat_train.jsonl"])
    heldout = _jsonl(world["world_chat_heldout.jsonl"])
    train_pairs = {(entity, attribute) for r in train for entity, attribute, _ in r["facts"]}
    heldout_pairs = {(r["entity"], r["attribute"]) for r in heldout}
    assert train_pairs and heldout_pairs and not train_pairs & heldout_pairs
    # Held-out people are not even named in the train chats (held-out towns are: as train people's home towns),
    # and no held-out answer sentence is in them.
    train_text = world["world_chat_train.jsonl"].read_text(encoding="utf-8")
    heldout_people = {r["entity"] for r in heldout if r["attribute"] == "profession"}
    assert heldout_people and not any(person in train_text for person in heldout_people)
    assert not any(r["messages"][-1]["content"] in train_text for r in heldout)
    # The facts file agrees with the chat files, and every fact is in exactly one of them.
    facts = _jsonl(world["world_facts.jsonl"])
    assert {(f["entity"], f["attribute"]) for f in facts if f["split"] == "train"} == train_pairs
    assert {(f["entity"], f["attribute"]) for f in facts if f["split"] == "heldout"} == heldout_pairs
    assert len(heldout) == len(heldout_pairs)


def test_every_chat_fact_is_stated_in_the_corpus(world: dict[str, Path]) -> None:
    corpus = world["world_corpus.txt"].read_text(encoding="utf-8")
    facts = make_world.build_world(seed=0)
    for fact in facts:
        phrasings = [fact.render(t) for t in fact.attribute.statements]
        assert fact.statement in corpus
        assert sum(p in corpus for p in phrasings) >= 3, fact
    answers = {(f.entity, f.attribute.name): f.value for f in facts}
    for r in _jsonl(world["world_chat_train.jsonl"]):
        for entity, attribute, answer in r["facts"]:
            assert answers[entity, attribute] == answer
    for r in _jsonl(world["world_chat_heldout.jsonl"]):
        assert answers[r["entity"], r["attribute"]] == r["answer"]
        assert r["answer"] in r["messages"][-1]["content"]


def test_answers_are_unambiguous(world: dict[str, Path]) -> None:
    """No answer of one attribute occurs as a whole word in another answer of the same attribute or in its
    canonical statement with another value, so the example's answer match (the answer as a whole word in the
    reply) cannot be fooled by a wrong value. Substrings are allowed: "900" inside "1900" is not a whole word."""
    by_attribute: dict[str, set[str]] = {}
    for f in _jsonl(world["world_facts.jsonl"]):
        by_attribute.setdefault(f["attribute"], set()).add(f["answer"])
    for attribute, values in by_attribute.items():
        for a in values:
            word = re.compile(rf"(?<!\w){re.escape(a)}(?!\w)")
            assert not any(a != b and word.search(b) for b in values), (attribute, a)


def test_chat_files_load_and_corpus_is_plain_prose(world: dict[str, Path]) -> None:
    train, stats = load_conversations(world["world_chat_train.jsonl"])
    assert stats.n_loaded == stats.n_lines and 300 <= len(train) <= 5000
    assert any(c[0]["role"] == "system" for c in train) and any(len(c) > 3 for c in train)
    heldout, _ = load_conversations(world["world_chat_heldout.jsonl"])
    assert all(c[-1]["role"] == "assistant" for c in heldout)
    corpus = world["world_corpus.txt"].read_text(encoding="utf-8")
    assert "<|" not in corpus and corpus.isascii()
    assert 200_000 <= len(corpus) <= 1_500_000
    assert sum(path.stat().st_size for path in world.values()) < 5_000_000
