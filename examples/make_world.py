"""Generate a small made-up world to pretrain a tiny model on, then teach it to answer questions about it by chat.

    python examples/make_world.py --seed 0        # writes examples/data/

The world: invented people (home town, profession, birth year, favourite colour and animal) and invented towns
(river, founding year, population, what the town is known for). It writes:

* ``world_corpus.txt``: plain prose, one short paragraph per line, about one person or town each. Every fact is
  stated ``N_BIOS`` times, in all of its six phrasings, and each statement sits in a run of two to four sentences
  that say the same fact in different words, next to one other such run about the same entity (both in random
  order). No chat format and no questions: this is pretraining text.
* ``world_chat_train.jsonl``: chat conversations (OpenAI ``messages``; some with a system prompt, some multi-turn)
  asking about the facts of the *train* people and towns, answered in one fixed sentence per kind of fact (the
  first phrasing, e.g. ``"Mira Tolvane lives in Ostrel."``). ``"facts"`` lists the ``[entity, attribute,
  answer]`` asked.
* ``world_chat_heldout.jsonl``: one question per fact of the *held-out* people and towns, which appear only in the
  corpus, never in the train chats, with ``"answer"`` (the short value to look for in a reply), ``"entity"`` and
  ``"attribute"``. Exact-match accuracy on it measures whether chat fine-tuning lets the model state knowledge
  it only read as prose.
* ``world_facts.jsonl``: every fact with its split and canonical sentence, and ``"prompt"``: that sentence up to
  the answer, for testing the pretrained model by completion.
* ``README.md``: what these files are.

Why the prose looks like this (``docs/tiny-model.md``, "What changed"): a small model answers questions about
entities it was never asked about only if pretraining let it store each fact in a retrievable way; what is known to
help is reading each fact in several phrasings and orders (knowledge augmentation, Allen-Zhu & Li, "Physics of
Language Models, Part 3.1", 2023). Here every fact has six phrasings, each statement sits in a run that restates
it, and a paragraph is about one entity. Together with more entities and longer pretraining, this took the default
run from 29.7% to 77.6% held-out exact match; which change did how much was not measured separately.

Only the standard library's ``random``, seeded, so one seed always gives byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

# ---------------------------------------------------------------- defaults (argparse overrides the first few)

SEED = 0
N_PEOPLE = 96
N_TOWNS = 32
N_HELDOUT_PEOPLE = 24  # the last ones generated: asked only in the held-out questions
N_HELDOUT_TOWNS = 8
N_BIOS = 20  # times each fact is stated in the corpus (cycling through its phrasings)
RUN_LENGTH = (2, 4)  # a fact's statements come in runs of this many consecutive sentences (min, max)
PARAGRAPH_RUNS = (1, 2)  # runs per paragraph (min, max); a paragraph is about one entity
N_CHAT_ASKS = 4  # times each train fact is asked in the chat data
OUT_DIR = Path(__file__).resolve().parent / "data"

PROFESSIONS = [
    "baker",
    "potter",
    "weaver",
    "blacksmith",
    "fisher",
    "carpenter",
    "miller",
    "tailor",
    "mason",
    "shepherd",
    "brewer",
    "glassblower",
    "beekeeper",
    "innkeeper",
    "ropemaker",
    "apothecary",
]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "grey", "white"]
ANIMALS = ["otter", "fox", "heron", "badger", "owl", "hare", "deer", "swan", "beaver", "lynx"]
TRADES = [
    "glass",
    "cheese",
    "wool",
    "pottery",
    "clocks",
    "boats",
    "salt",
    "honey",
    "rope",
    "paper",
    "lace",
    "baskets",
    "cider",
    "bells",
    "candles",
    "lanterns",
    "carpets",
    "soap",
    "tiles",
    "barrels",
    "knives",
    "saddles",
    "mirrors",
    "bricks",
    "hats",
    "quilts",
    "kites",
    "maps",
    "flutes",
    "jam",
    "linen",
    "combs",
    "drums",
    "ink",
    "spoons",
    "toys",
]

# Invented names are built from syllables (onset + vowel + coda), and no two names share a syllable: a byte-level
# model tells "Ithgar Sistav" from "Sitam Ithwick" badly. The generator also checks that no name is a substring of
# another, so "is the answer in the reply" scoring is unambiguous.
ONSETS = ["b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z"]
VOWELS = ["a", "e", "i", "o", "u"]
CODAS = ["", "n", "r", "l", "s", "m"]
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

    def __post_init__(self) -> None:
        if not self.statements[0].endswith(("{v}.", "{a_v}.")):
            raise ValueError(
                f"{self.name}: the canonical statement must end with the value, got {self.statements[0]!r}"
            )


ATTRIBUTES = [
    Attribute(
        name="home_town",
        kind="person",
        statements=(
            "{e} lives in {v}.",
            "{e}'s home town is {v}.",
            "The town of {v} is where {e} lives.",
            "{e} has made a home in {v}.",
            "{e} comes from the town of {v}.",
            "{e} is a resident of {v}.",
        ),
        questions=(
            "Where does {e} live?",
            "Which town is {e} from?",
            "What is {e}'s home town?",
            "In which town does {e} live?",
            "Where is {e}'s home?",
        ),
    ),
    Attribute(
        name="profession",
        kind="person",
        statements=(
            "{e} works as {a_v}.",
            "{e} earns a living as {a_v}.",
            "By profession, {e} is {a_v}.",
            "{e} has a job as {a_v}.",
            "By trade, {e} is {a_v}.",
            "The work of {e} is that of {a_v}.",
        ),
        questions=(
            "What does {e} do for a living?",
            "What is {e}'s job?",
            "What is the profession of {e}?",
            "What work does {e} do?",
            "What is {e}'s trade?",
        ),
    ),
    Attribute(
        name="birth_year",
        kind="person",
        statements=(
            "{e} was born in {v}.",
            "{e}'s year of birth is {v}.",
            "The year {v} saw the birth of {e}.",
            "{e} came into the world in {v}.",
            "In {v}, {e} was born.",
            "{e} was born in the year {v}.",
        ),
        questions=(
            "When was {e} born?",
            "In what year was {e} born?",
            "What is {e}'s year of birth?",
            "What year was {e} born in?",
        ),
    ),
    Attribute(
        name="favourite_colour",
        kind="person",
        statements=(
            "{e}'s favourite colour is {v}.",
            "Of all colours, {e} likes {v} best.",
            "{e} loves the colour {v} more than any other.",
            "The colour {e} likes most is {v}.",
            "The favourite colour of {e} is {v}.",
            "{e} prefers the colour {v}.",
        ),
        questions=(
            "What is {e}'s favourite colour?",
            "Which colour does {e} like best?",
            "What colour does {e} love most?",
            "What is the favourite colour of {e}?",
        ),
    ),
    Attribute(
        name="favourite_animal",
        kind="person",
        statements=(
            "{e}'s favourite animal is the {v}.",
            "Of all animals, {e} loves the {v} most.",
            "{e} likes the {v} more than any other animal.",
            "The animal {e} likes best is the {v}.",
            "The favourite animal of {e} is the {v}.",
            "{e} prefers the {v} to any other animal.",
        ),
        questions=(
            "What is {e}'s favourite animal?",
            "Which animal does {e} like best?",
            "What animal does {e} love most?",
            "What is the favourite animal of {e}?",
        ),
    ),
    Attribute(
        name="river",
        kind="town",
        statements=(
            "{e} lies on the river {v}.",
            "The river {v} flows through {e}.",
            "{e} was built on the banks of the river {v}.",
            "The river {v} runs through {e}.",
            "The town of {e} stands beside the river {v}.",
            "The river of {e} is the {v}.",
        ),
        questions=(
            "Which river flows through {e}?",
            "On which river does {e} lie?",
            "What river runs through {e}?",
            "What is the river of {e}?",
        ),
    ),
    Attribute(
        name="founded",
        kind="town",
        statements=(
            "{e} was founded in {v}.",
            "The town of {e} dates back to {v}.",
            "In {v}, settlers founded {e}.",
            "The first houses of {e} were built in {v}.",
            "{e} was founded in the year {v}.",
            "The founding of {e} was in {v}.",
        ),
        questions=(
            "When was {e} founded?",
            "In what year was {e} founded?",
            "How old is {e}? When was it founded?",
            "What year was {e} founded in?",
        ),
    ),
    Attribute(
        name="population",
        kind="town",
        statements=(
            "The population of {e} is {v}.",
            "{e} has {v} inhabitants.",
            "{v} people live in {e}.",
            "The town of {e} is home to {v} people.",
            "There are {v} inhabitants in {e}.",
            "{e} counts {v} people.",
        ),
        questions=(
            "How many people live in {e}?",
            "What is the population of {e}?",
            "How many inhabitants does {e} have?",
            "How big is the population of {e}?",
        ),
    ),
    Attribute(
        name="known_for",
        kind="town",
        statements=(
            "{e} is known for its {v}.",
            "{e} is famous for its {v}.",
            "People come to {e} for its {v}.",
            "Traders sell the {v} of {e} all over the valley.",
            "{e} makes the best {v} in the valley.",
            "Everyone knows {e} for its {v}.",
        ),
        questions=(
            "What is {e} known for?",
            "What is {e} famous for?",
            "Why do people come to {e}?",
            "What does {e} make?",
        ),
    ),
]


@dataclass(frozen=True)
class Fact:
    """``attribute`` of ``entity`` is ``value``; e.g. ("Zalfa Fesrow", home_town, "Pardale", "heldout")."""

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


def _names(
    rng: random.Random, n: int, syllables: list[str], n_syllables: int, endings: list[str], taken: list[str]
) -> list[str]:
    """``n`` new names of ``n_syllables`` syllables taken (and removed) from ``syllables``, plus a random ending
    from ``endings`` (none if empty); none is a substring of another or of a name in ``taken``, or has one."""
    names: list[str] = []
    while len(names) < n:
        if len(syllables) < n_syllables:
            raise ValueError(f"ran out of syllables after {len(names)} of {n} names; ask for fewer entities")
        parts = [syllables.pop() for _ in range(n_syllables)]
        name = "".join(parts) + (rng.choice(endings) if endings else "")
        if not any(name in other or other in name for other in names + taken):
            names.append(name)
    return names


def build_world(
    seed: int = SEED,
    n_people: int = N_PEOPLE,
    n_towns: int = N_TOWNS,
    n_heldout_people: int = N_HELDOUT_PEOPLE,
    n_heldout_towns: int = N_HELDOUT_TOWNS,
) -> list[Fact]:
    """All facts of the world for ``seed``, in a fixed order: people first, then towns."""
    if not (0 < n_heldout_people < n_people and 0 < n_heldout_towns < n_towns <= len(TRADES)):
        raise ValueError(
            f"need 0 < held-out < all for people ({n_heldout_people}, {n_people}) and towns "
            f"({n_heldout_towns}, {n_towns}), and at most {len(TRADES)} towns"
        )
    rng = random.Random(seed)
    syllables = [onset + vowel + coda for onset in ONSETS for vowel in VOWELS for coda in CODAS]
    rng.shuffle(syllables)
    towns = _names(rng, n_towns, syllables, 1, TOWN_ENDINGS, [])
    rivers = _names(rng, n_towns, syllables, 1, RIVER_ENDINGS, towns)
    firsts = _names(rng, n_people, syllables, 2, [], towns + rivers)
    lasts = _names(rng, n_people, syllables, 1, SURNAME_ENDINGS, towns + rivers + firsts)
    towns, rivers = [t.capitalize() for t in towns], [r.capitalize() for r in rivers]
    people = [f"{first.capitalize()} {last.capitalize()}" for first, last in zip(firsts, lasts)]

    # The last ones of each (in generation order, which is already random) are held out of the chat data.
    split = {}
    for names, n_heldout in ((people, n_heldout_people), (towns, n_heldout_towns)):
        split.update({name: "train" if i < len(names) - n_heldout else "heldout" for i, name in enumerate(names)})
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
            "founded": str(10 * rng.randint(120, 189)),  # round decades, 1200 to 1890
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


def make_corpus(
    facts: list[Fact],
    rng: random.Random,
    n_bios: int = N_BIOS,
    run_length: tuple[int, int] = RUN_LENGTH,
    paragraph_runs: tuple[int, int] = PARAGRAPH_RUNS,
) -> str:
    """Prose, one paragraph per line, paragraphs shuffled. Every fact is stated ``n_bios`` times, cycling through
    its phrasings in a shuffled order. A fact's statements come in runs of ``run_length`` (min, max) consecutive
    sentences (the same fact, said again in other words); a paragraph is ``paragraph_runs`` (min, max) runs about
    one entity, in random order."""
    paragraphs: list[str] = []
    for entity_facts in _by_entity(facts).values():
        runs: list[list[str]] = []
        for fact in entity_facts:
            templates = list(fact.attribute.statements)
            rng.shuffle(templates)
            statements = [fact.render(templates[i % len(templates)]) for i in range(n_bios)]
            while statements:
                size = rng.randint(*run_length)
                runs.append(statements[:size])
                statements = statements[size:]
        rng.shuffle(runs)
        while runs:
            size = rng.randint(*paragraph_runs)
            paragraphs.append(" ".join(sentence for run in runs[:size] for sentence in run))
            runs = runs[size:]
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
    entities = _by_entity(facts)
    count = {
        (kind, split): sum(1 for fs in entities.values() if fs[0].attribute.kind == kind and fs[0].split == split)
        for kind in ("person", "town")
        for split in ("train", "heldout")
    }
    train_example = next(f for f in facts if f.split == "train")
    heldout_example = next(f for f in facts if f.split == "heldout")
    rows = "\n".join(f"| `{name}` | {lines} | {nbytes / 1024:.0f} KiB |" for name, (lines, nbytes) in sizes.items())
    return f"""# A made-up world (synthetic data)

Every file here is synthetic, generated by `python examples/make_world.py --seed {seed}`: invented people and towns,
{len(entities)} entities and {len(facts)} facts; nothing refers to anything real. `tests/test_make_world.py` checks that
these files equal a fresh generation.

| file | lines | size |
| --- | --- | --- |
{rows}

* `world_corpus.txt`: plain prose for pretraining a small byte-level model. One paragraph per line, about one person
  or town; every fact is stated in many paragraphs and in all of its phrasings, in runs of a few sentences that say
  the same fact in different words. No chat format, no questions.
* `world_chat_train.jsonl`: chat fine-tuning data, OpenAI `messages` format (some conversations with a system
  prompt, some multi-turn), about the facts of the *train* entities only ({count["person", "train"]} people,
  {count["town", "train"]} towns). Every answer is one fixed sentence per kind of fact, e.g.
  `{train_example.statement}`. `facts` lists the `[entity, attribute, answer]` each conversation asks.
* `world_chat_heldout.jsonl`: one question per fact of the *held-out* entities ({count["person", "heldout"]} people,
  {count["town", "heldout"]} towns), whose facts are stated only in the corpus, never in the chat training data.
  `answer` is the short value (e.g. `"{heldout_example.value}"`) that answer-match scoring looks for in the model's
  greedy reply; `entity` and `attribute` say which fact it is; `messages` ends with the expected answer sentence.
* `world_facts.jsonl`: every fact with its `split`, its canonical `statement`, and `prompt` (the statement up to
  the answer) for testing the pretrained model by completion.
"""


def make_world(
    out_dir: Path = OUT_DIR,
    seed: int = SEED,
    n_people: int = N_PEOPLE,
    n_towns: int = N_TOWNS,
    n_heldout_people: int = N_HELDOUT_PEOPLE,
    n_heldout_towns: int = N_HELDOUT_TOWNS,
    n_bios: int = N_BIOS,
    run_length: tuple[int, int] = RUN_LENGTH,
    paragraph_runs: tuple[int, int] = PARAGRAPH_RUNS,
    n_chat_asks: int = N_CHAT_ASKS,
) -> dict[str, Path]:
    """Write the world's files (see the module docstring) into ``out_dir``; return ``{file name: path}``."""
    facts = build_world(seed, n_people, n_towns, n_heldout_people, n_heldout_towns)
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
        "world_corpus.txt": make_corpus(facts, rng, n_bios, run_length, paragraph_runs),
        "world_chat_train.jsonl": _jsonl(make_train_chats(facts, rng, n_chat_asks)),
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
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=SEED, help="one seed always gives byte-identical files")
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR, help="where the files are written")
    counts = {
        "n_people": "people in the world",
        "n_towns": "towns in the world",
        "n_heldout_people": "people asked about only in the held-out questions",
        "n_heldout_towns": "towns asked about only in the held-out questions",
        "n_bios": "times each fact is stated in the corpus",
        "n_chat_asks": "times each train fact is asked in the chat data",
    }
    for name, text in counts.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=globals()[name.upper()], help=text)
    parser.add_argument(
        "--run-length",
        type=int,
        nargs=2,
        default=RUN_LENGTH,
        metavar=("MIN", "MAX"),
        help="consecutive sentences restating one fact",
    )
    parser.add_argument(
        "--paragraph-runs",
        type=int,
        nargs=2,
        default=PARAGRAPH_RUNS,
        metavar=("MIN", "MAX"),
        help="runs of sentences per paragraph",
    )
    args = vars(parser.parse_args())
    args["run_length"], args["paragraph_runs"] = tuple(args["run_length"]), tuple(args["paragraph_runs"])
    try:
        written = make_world(**args)
    except ValueError as error:  # settings that cannot make a world: one line, no traceback
        raise SystemExit(f"make_world.py: error: {error}") from None
    for _name, path in written.items():
        print(f"{path}  {path.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
