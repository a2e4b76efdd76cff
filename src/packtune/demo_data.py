"""The demo's dataset: small rule-based tasks a tiny model visibly learns in minutes.

Three tasks, in alpaca format (``instruction`` / ``input`` / ``output``):

* **copy**: "Repeat after me: red river stone" -> "red river stone";
* **sound**: "Which sound does a cow make?" (eight phrasings) -> "moo";
* **opposite**: "What is the opposite of hot?" (six phrasings) -> "cold".

The held-out prompts are never in the training set: new word sequences to copy, and
(phrasing, animal) or (phrasing, word) pairs that training shows only in other
combinations. Answering them takes the rule, not a memorised line, so the held-out exact
match before and after training shows what was learned.

``write_demo_dataset`` is deterministic; the shipped ``assets/demo_tasks.jsonl`` is its
output (a test checks that).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = (
    "red blue green black white apple river stone cloud tree house water fire light night "
    "music paper table window garden bread milk sugar salt chair door road city school "
    "friend mother father sister brother king queen horse bird fish dream heart money "
    "book letter story song dance game ball ship train car plane star moon sun rain snow "
    "wind summer winter spring morning evening doctor teacher farmer island mountain forest "
    "flower market village castle bridge tower ocean desert valley"
).split()

SOUNDS = {
    "dog": "woof", "cat": "meow", "cow": "moo", "duck": "quack", "sheep": "baa", "pig": "oink",
    "horse": "neigh", "lion": "roar", "owl": "hoot", "snake": "hiss", "frog": "croak", "bee": "buzz",
}

SOUND_PHRASES = (
    "What sound does a {x} make?",
    "Which sound does a {x} make?",
    "What does a {x} say?",
    "How does a {x} sound?",
    "Tell me the sound of a {x}.",
    "The {x} makes which sound?",
    "What noise does a {x} make?",
    "A {x} says what?",
)

OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark", "old": "new",
    "long": "short", "high": "low", "early": "late", "hard": "soft", "rich": "poor", "strong": "weak",
    "open": "closed", "full": "empty", "clean": "dirty", "wet": "dry",
}

OPPOSITE_PHRASES = (
    "What is the opposite of {x}?",
    "Give the opposite of {x}.",
    "Opposite of {x}?",
    "Name the word opposite to {x}.",
    "What word means the opposite of {x}?",
    "Tell me the opposite of {x}.",
)

COPY_PHRASE = "Repeat after me: {x}"


def _pairs(keys, phrases, rng, held_out):
    """All (phrase, key) pairs, split so every key and every phrase still occurs in training."""
    pairs = [(p, k) for p in phrases for k in keys]
    rng.shuffle(pairs)
    test, seen_k, seen_p, train = [], set(), set(), []
    for p, k in pairs:
        if len(test) < held_out and (p, k) not in test:
            test.append((p, k))
        else:
            train.append((p, k))
            seen_k.add(k)
            seen_p.add(p)
    # Move back any held-out pair whose key or phrase training would never show.
    keep = [(p, k) for p, k in test if k in seen_k and p in seen_p]
    train += [t for t in test if t not in keep]
    return train, keep


def build_demo_tasks(seed: int = 0, copies: int = 1500, held_out_each: int = 12) -> tuple[list[dict], list[dict]]:
    """``(train, held_out)`` lists of alpaca rows."""
    rng = random.Random(seed)
    rows, test = [], []

    def row(instruction: str, output: str, task: str) -> dict:
        return {"instruction": instruction, "input": "", "output": output, "task": task}

    sound_train, sound_test = _pairs(list(SOUNDS), SOUND_PHRASES, rng, held_out_each)
    both = {**OPPOSITES, **{v: k for k, v in OPPOSITES.items()}}
    opp_train, opp_test = _pairs(list(both), OPPOSITE_PHRASES, rng, held_out_each)
    for _ in range(3):  # lookups are few: show each training pair three times
        rows += [row(p.format(x=k), SOUNDS[k], "sound") for p, k in sound_train]
        rows += [row(p.format(x=k), both[k], "opposite") for p, k in opp_train]
    test += [row(p.format(x=k), SOUNDS[k], "sound") for p, k in sound_test]
    test += [row(p.format(x=k), both[k], "opposite") for p, k in opp_test]

    seen: set[str] = set()
    while len(test) < 3 * held_out_each:
        words = " ".join(rng.sample(WORDS, rng.randint(2, 3)))
        if words not in seen:
            seen.add(words)
            test.append(row(COPY_PHRASE.format(x=words), words, "copy"))
    while sum(r["task"] == "copy" for r in rows) < copies:
        words = " ".join(rng.sample(WORDS, rng.randint(1, 3)))
        if words not in seen:
            seen.add(words)
            rows.append(row(COPY_PHRASE.format(x=words), words, "copy"))
    rng.shuffle(rows)
    return rows, test


def write_demo_dataset(folder: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Write ``demo_tasks.jsonl`` (training) and ``demo_heldout.jsonl`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    train, test = build_demo_tasks(seed)
    paths = folder / "demo_tasks.jsonl", folder / "demo_heldout.jsonl"
    for path, rows in zip(paths, (train, test)):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def build_demo_pairs(seed: int = 0, copies: int = 300) -> list[dict]:
    """Preference pairs from the demo tasks' training rows: the right answer chosen, a wrong one
    rejected (another animal's sound, another word's opposite, other words to repeat)."""
    rng = random.Random(seed)
    train, _ = build_demo_tasks(seed, copies=copies)
    sounds = sorted(set(SOUNDS.values()))
    both = {**OPPOSITES, **{v: k for k, v in OPPOSITES.items()}}
    opposites = sorted(set(both.values()))
    pairs = []
    for r in train:
        right = r["output"]
        if r["task"] == "sound":
            wrong = rng.choice([s for s in sounds if s != right])
        elif r["task"] == "opposite":
            wrong = rng.choice([w for w in opposites if w != right])
        else:
            words = right.split()
            wrong = " ".join(rng.sample([w for w in WORDS if w not in words], len(words)))
        pairs.append({"prompt": r["instruction"], "chosen": right, "rejected": wrong, "task": r["task"]})
    return pairs


def write_demo_pairs(folder: str | Path, seed: int = 0) -> Path:
    """Write ``demo_pairs.jsonl`` (``build_demo_pairs``) into ``folder``."""
    path = Path(folder) / "demo_pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in build_demo_pairs(seed)))
    return path
