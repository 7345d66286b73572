"""Generate a small made-up world to pretrain a tiny model on, then teach it to answer questions about it by chat.

    python examples/make_world.py --seed 0        # writes examples/data/

The world: invented people (home town, profession, birth year, favourite colour and animal) and invented towns
(river, founding year, population, what the town is known for). It writes:

* ``world_corpus.txt``: plain prose, one short paragraph per line, every fact of every entity stated many times in
  at least three phrasings, sentence order shuffled. No chat format: this is pretraining text.
* ``world_chat_train.jsonl``: chat conversations (OpenAI ``messages``; some with a system prompt, some multi-turn)
  asking about the facts of the *train* half of the people and towns, answered in one fixed sentence per kind of
  fact (``"Mira Tolvane lives in Ostrel."``). ``"facts"`` lists the ``[entity, attribute, answer]`` asked.
* ``world_chat_heldout.jsonl``: one question per fact of the *held-out* half, which appears only in the corpus,
  never in the train chats, with ``"answer"`` (the short value to look for in a reply), ``"entity"`` and
  ``"attribute"``. Exact-match accuracy on it measures whether chat fine-tuning lets the model state knowledge
  it only read as prose.
* ``world_facts.jsonl``: every fact with its split and canonical sentence, and ``"prompt"``: that sentence up to
  the answer, for testing the pretrained model by completion.
* ``README.md``: what these files are.

Only the standard library's ``random``, seeded, so one seed always gives byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable

# ---------------------------------------------------------------- defaults (argparse overrides the first few)

SEED = 0
N_PEOPLE = 64  # half in the chat-train split, half held out
N_TOWNS = 16  # likewise
N_BIOS = 20  # paragraphs per entity in the corpus: each fact is stated this many times
N_CHAT_ASKS = 8  # times each train fact is asked in the chat data
OUT_DIR = Path(__file__).resolve().parent / "data"

PROFESSIONS = [
    "baker", "potter", "weaver", "blacksmith", "fisher", "carpenter", "miller", "tailor",
    "mason", "shepherd", "brewer", "glassblower", "beekeeper", "innkeeper", "ropemaker", "apothecary",
]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "grey", "white"]
ANIMALS = ["otter", "fox", "heron", "badger", "owl", "hare", "deer", "swan", "beaver", "lynx"]
TRADES = [
    "glass", "cheese", "wool", "pottery", "clocks", "boats", "salt", "honey",
    "rope", "paper", "lace", "apples", "cider", "bells", "candles", "lanterns",
]

# Invented names are built from these syllables; the generator checks they are unique and not substrings of
# one another, so "is the answer in the reply" scoring is unambiguous.
SYLLABLES = [
    "ma", "ri", "to", "ve", "la", "no", "si", "ka", "de", "lo", "fa", "ren", "tam", "bel", "cor",
    "dun", "el", "is", "ol", "ar", "wen", "hal", "yor", "jas", "quin", "pel", "gar", "nim", "sab", "tor",
]
SURNAME_ENDINGS = ["vane", "wick", "row", "der", "ley", "mont", "dell", "rin", "holm", "stav"]
TOWN_ENDINGS = ["by", "ham", "mere", "ford", "holt", "stead", "dale", "wyn"]
RIVER_ENDINGS = ["a", "en", "is", "or"]

SYSTEM_PROMPTS = [
    "You are a helpful assistant who knows the people and towns of the valley.",
    "Answer questions about the valley in one short sentence.",
    "You answer questions about the valley's people and towns exactly and briefly.",
]
P_SYSTEM = 1 / 3  # share of conversations that start with a system prompt
TURN_WEIGHTS = {1: 0.6, 2: 0.25, 3: 0.15}  # questions per conversation


@dataclass(frozen=True)
class Attribute:
    """One kind of fact. ``statements[0]`` is the canonical sentence, used as the chat answer; it ends with the
    value. Templates see ``{e}`` (entity), ``{v}`` (value) and ``{a_v}`` (value with "a"/"an")."""

    name: str
    kind: str  # "person" or "town"
    statements: tuple[str, ...]
    questions: tuple[str, ...]


ATTRIBUTES = [
    Attribute(
        name="home_town",
        kind="person",
        statements=("{e} lives in {v}.", "The town of {v} is where {e} lives.", "{e} has made a home in {v}.",
                    "{e} is a resident of {v}."),
        questions=("Where does {e} live?", "Which town is {e} from?", "What is {e}'s home town?",
                   "In which town does {e} live?"),
    ),
    Attribute(
        name="profession",
        kind="person",
        statements=("{e} works as {a_v}.", "By trade, {e} is {a_v}.", "{e} earns a living as {a_v}.",
                    "The work of {e} is that of {a_v}."),
        questions=("What does {e} do for a living?", "What is {e}'s job?", "What is the profession of {e}?",
                   "What work does {e} do?"),
    ),
    Attribute(
        name="birth_year",
        kind="person",
        statements=("{e} was born in {v}.", "The year {v} saw the birth of {e}.", "{e} came into the world in {v}.",
                    "In {v}, {e} was born."),
        questions=("When was {e} born?", "In what year was {e} born?", "What is {e}'s year of birth?"),
    ),
    Attribute(
        name="favourite_colour",
        kind="person",
        statements=("{e}'s favourite colour is {v}.", "Of all colours, {e} likes {v} best.",
                    "{e} loves the colour {v} more than any other.", "The colour {e} likes most is {v}."),
        questions=("What is {e}'s favourite colour?", "Which colour does {e} like best?",
                   "What colour does {e} love most?"),
    ),
    Attribute(
        name="favourite_animal",
        kind="person",
        statements=("{e}'s favourite animal is the {v}.", "Of all animals, {e} loves the {v} most.",
                    "{e} likes the {v} more than any other animal.", "The animal {e} likes best is the {v}."),
        questions=("What is {e}'s favourite animal?", "Which animal does {e} like best?",
                   "What animal does {e} love most?"),
    ),
    Attribute(
        name="river",
        kind="town",
        statements=("{e} lies on the river {v}.", "The river {v} flows through {e}.",
                    "{e} was built on the banks of the {v}.", "The town of {e} stands beside the river {v}."),
        questions=("Which river flows through {e}?", "On which river does {e} lie?", "What river runs through {e}?"),
    ),
    Attribute(
        name="founded",
        kind="town",
        statements=("{e} was founded in {v}.", "The town of {e} dates back to {v}.", "In {v}, settlers founded {e}.",
                    "The first houses of {e} were built in {v}."),
        questions=("When was {e} founded?", "In what year was {e} founded?", "How old is {e}? When was it founded?"),
    ),
    Attribute(
        name="population",
        kind="town",
        statements=("{e} has {v} inhabitants.", "{v} people live in {e}.", "The population of {e} is {v}.",
                    "The town of {e} is home to {v} people."),
        questions=("How many people live in {e}?", "What is the population of {e}?",
                   "How many inhabitants does {e} have?"),
    ),
    Attribute(
        name="known_for",
        kind="town",
        statements=("{e} is known for its {v}.", "{e} is famous for its {v}.", "People come to {e} for its {v}.",
                    "Traders sell the {v} of {e} all over the valley."),
        questions=("What is {e} known for?", "What is {e} famous for?", "Why do people come to {e}?"),
    ),
]


@dataclass(frozen=True)
class Fact:
    """``attribute`` of ``entity`` is ``value``; e.g. ("Islo Torvane", home_town, "Quinham", "train")."""

    entity: str
    attribute: Attribute
    value: str
    split: str  # "train" (asked in the chat data) or "heldout" (only in the corpus and the held-out questions)

    def render(self, template: str) -> str:
        article = "an" if self.value[0] in "aeiou" else "a"
        return template.format(e=self.entity, v=self.value, a_v=f"{article} {self.value}")

    @property
    def statement(self) -> str:
        """The canonical sentence, the chat answer: ``attribute.statements[0]``, ending in ``value + "."``."""
        return self.render(self.attribute.statements[0])


# ---------------------------------------------------------------- the world


def _names(rng: random.Random, n: int, make: Callable[[random.Random], str], taken: list[str]) -> list[str]:
    """``n`` new names from ``make(rng)``; none is a substring of another or of a name in ``taken``, or has one."""
    names: list[str] = []
    for _ in range(1000 * n):
        if len(names) == n:
            return names
        name = make(rng).lower()
        if not any(name in other or other in name for other in names + taken):
            names.append(name)
    raise ValueError(f"could not invent {n} distinct names from the syllables; ask for fewer entities")


def build_world(seed: int = SEED, n_people: int = N_PEOPLE, n_towns: int = N_TOWNS) -> list[Fact]:
    """All facts of the world for ``seed``, in a fixed order: people first, then towns."""
    if n_people < 2 or n_towns < 2 or n_towns > len(TRADES):
        raise ValueError(f"need n_people >= 2 and 2 <= n_towns <= {len(TRADES)}, got {n_people}, {n_towns}")
    rng = random.Random(seed)

    def syllables(k: int) -> str:
        return "".join(rng.choice(SYLLABLES) for _ in range(k))

    towns = _names(rng, n_towns, lambda r: syllables(1) + r.choice(TOWN_ENDINGS), [])
    rivers = _names(rng, n_towns, lambda r: syllables(1) + r.choice(RIVER_ENDINGS), towns)
    firsts = _names(rng, n_people, lambda r: syllables(2), towns + rivers)
    lasts = _names(rng, n_people, lambda r: syllables(1) + r.choice(SURNAME_ENDINGS), towns + rivers + firsts)
    towns, rivers = [t.capitalize() for t in towns], [r.capitalize() for r in rivers]
    people = [f"{first.capitalize()} {last.capitalize()}" for first, last in zip(firsts, lasts)]

    # The first half of each (in generation order, which is already random) goes to chat training.
    split = {}
    for names in (people, towns):
        split.update({name: "train" if i < len(names) // 2 else "heldout" for i, name in enumerate(names)})
    attr = {a.name: a for a in ATTRIBUTES}
    facts: list[Fact] = []
    for person in people:
        values = {
            "home_town": rng.choice(towns),
            "profession": rng.choice(PROFESSIONS),
            "birth_year": str(rng.randint(1900, 1999)),
            "favourite_colour": rng.choice(COLOURS),
            "favourite_animal": rng.choice(ANIMALS),
        }
        facts += [Fact(person, attr[k], v, split[person]) for k, v in values.items()]
    trades = rng.sample(TRADES, n_towns)
    for town, river, trade in zip(towns, rivers, trades):
        values = {
            "river": river,
            "founded": str(rng.randint(1100, 1899)),
            "population": str(100 * rng.randint(8, 99)),  # round hundreds, 800 to 9900
            "known_for": trade,
        }
        facts += [Fact(town, attr[k], v, split[town]) for k, v in values.items()]
    return facts


def _by_entity(facts: list[Fact]) -> dict[str, list[Fact]]:
    out: dict[str, list[Fact]] = {}
    for fact in facts:
        out.setdefault(fact.entity, []).append(fact)
    return out


def make_corpus(facts: list[Fact], rng: random.Random, n_bios: int = N_BIOS) -> str:
    """Prose: ``n_bios`` paragraphs per entity, one per line, all shuffled. Each paragraph states every fact of
    its entity once, in shuffled order; across paragraphs a fact cycles through all its phrasings."""
    paragraphs: list[str] = []
    for entity_facts in _by_entity(facts).values():
        phrasings = []
        for fact in entity_facts:
            templates = list(fact.attribute.statements)
            rng.shuffle(templates)
            phrasings.append([templates[i % len(templates)] for i in range(n_bios)])
        for b in range(n_bios):
            sentences = [fact.render(phrasings[f][b]) for f, fact in enumerate(entity_facts)]
            rng.shuffle(sentences)
            paragraphs.append(" ".join(sentences))
    rng.shuffle(paragraphs)
    return "\n".join(paragraphs) + "\n"


def _conversation(facts: list[Fact], rng: random.Random) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < P_SYSTEM else []
    for fact in facts:
        messages.append({"role": "user", "content": fact.render(rng.choice(fact.attribute.questions))})
        messages.append({"role": "assistant", "content": fact.statement})
    return messages


def make_train_chats(facts: list[Fact], rng: random.Random, n_asks: int = N_CHAT_ASKS) -> list[dict]:
    """Conversations about train facts only; each train fact is asked exactly ``n_asks`` times overall."""
    pool = [f for f in facts if f.split == "train"] * n_asks
    rng.shuffle(pool)
    records: list[dict] = []
    while pool:
        n_turns = rng.choices(list(TURN_WEIGHTS), weights=list(TURN_WEIGHTS.values()))[0]
        turns: list[Fact] = []
        while pool and len(turns) < n_turns and pool[-1] not in turns:  # no fact twice in one conversation
            turns.append(pool.pop())
        facts_asked = [[f.entity, f.attribute.name, f.value] for f in turns]
        records.append({"messages": _conversation(turns, rng), "facts": facts_asked})
    return records


def make_heldout_chats(facts: list[Fact], rng: random.Random) -> list[dict]:
    """One single-question conversation per held-out fact."""
    records = []
    for f in facts:
        if f.split == "heldout":
            messages = _conversation([f], rng)
            records.append({"messages": messages, "answer": f.value, "entity": f.entity, "attribute": f.attribute.name})
    return records


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def _readme(seed: int, facts: list[Fact], sizes: dict[str, tuple[int, int]]) -> str:
    n_entities = len(_by_entity(facts))
    train_example = next(f for f in facts if f.split == "train")
    heldout_example = next(f for f in facts if f.split == "heldout")
    rows = "\n".join(f"| `{name}` | {lines} | {nbytes / 1024:.0f} KiB |" for name, (lines, nbytes) in sizes.items())
    return f"""# A made-up world (synthetic data)

Every file here is synthetic, generated by `python examples/make_world.py --seed {seed}`: invented people and towns,
{n_entities} entities and {len(facts)} facts; nothing refers to anything real. `tests/test_make_world.py` checks that
these files equal a fresh generation.

| file | lines | size |
| --- | --- | --- |
{rows}

* `world_corpus.txt`: plain prose for pretraining a small byte-level model. One paragraph per line; each states
  every fact of one person or town, and each fact appears in many paragraphs, in at least three phrasings.
* `world_chat_train.jsonl`: chat fine-tuning data, OpenAI `messages` format (some conversations with a system
  prompt, some multi-turn), about the facts of the *train* half of the entities only. Every answer is one fixed
  sentence per kind of fact, e.g. `{train_example.statement}`. `facts` lists the `[entity, attribute,
  answer]` each conversation asks.
* `world_chat_heldout.jsonl`: one question per fact of the *held-out* half, which is stated only in the corpus,
  never in the chat training data. `answer` is the short value (e.g. `"{heldout_example.value}"`) that
  exact-match scoring looks for in the model's greedy reply; `entity` and `attribute` say which fact it is;
  `messages` ends with the expected answer sentence.
* `world_facts.jsonl`: every fact with its `split`, its canonical `statement`, and `prompt` (the statement up to
  the answer) for testing the pretrained model by completion.
"""


def make_world(out_dir: Path = OUT_DIR, seed: int = SEED) -> dict[str, Path]:
    """Write the world's files (see the module docstring) into ``out_dir``; return ``{file name: path}``."""
    facts = build_world(seed)
    rng = random.Random(seed + 1)  # the world's own draws used seed; the texts draw from a second stream
    fact_records = [
        {
            "entity": f.entity,
            "attribute": f.attribute.name,
            "answer": f.value,
            "split": f.split,
            "statement": f.statement,
            "prompt": f.statement[: -len(f.value) - 1].rstrip(),  # canonical statements end with "{value}."
        }
        for f in facts
    ]
    texts = {
        "world_corpus.txt": make_corpus(facts, rng),
        "world_chat_train.jsonl": _jsonl(make_train_chats(facts, rng)),
        "world_chat_heldout.jsonl": _jsonl(make_heldout_chats(facts, rng)),
        "world_facts.jsonl": _jsonl(fact_records),
    }
    sizes = {name: (text.count("\n"), len(text.encode("utf-8"))) for name, text in texts.items()}
    texts["README.md"] = _readme(seed, facts, sizes)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, text in texts.items():
        paths[name] = out_dir / name
        paths[name].write_text(text, encoding="utf-8", newline="\n")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = parser.parse_args()
    for _name, path in make_world(args.out_dir, args.seed).items():
        print(f"{path}  {path.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
