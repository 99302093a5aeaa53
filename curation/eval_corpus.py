"""An evaluation corpus for curation quality, from sources the shipped corpus and the tests never used.

Good documents are English docstrings of third-party libraries (networkx,
scipy, scikit-learn, sympy, requests, jinja2, click, flask, markdown; not
Python's own documentation, which the shipped corpus is made of): prose with
code examples, parameter lists and formulas, one docstring per document, as
pages are whole. Non-English text comes from the German, French,
Spanish, Italian, Portuguese and Dutch message catalogues Debian installs
under /usr/share/locale. On top of them, with a fixed seed:

Good documents are distinct (word 5-gram Jaccard below 0.5 with each other).

- near duplicates of good documents: 1-3% of words replaced or dropped, a
  sentence appended, a title line added, or line breaks re-flowed;
- exact duplicates up to whitespace or Unicode form;
- junk of the kinds curation exists to remove: other languages, cookie and
  policy boilerplate, navigation menus, symbol runs, repeated lines, tables of
  numbers, lorem ipsum, documents of one short sentence;
- personal data written into good documents: e-mail addresses, phone numbers,
  public IPv4 addresses and card numbers (Luhn-valid), each recorded.

Every record carries its label: {"id", "text", "label", "of" (the original of
a duplicate), "pii" (planted strings)}. The committed file is
`benchmarks/data/curation_eval.jsonl`; rebuild it with
`python -m curation.eval_corpus` (docstrings are those of the installed
versions; the committed file came from the versions pinned in pyproject.toml
on 2026-12-04).
"""

from __future__ import annotations

import gettext
import importlib
import inspect
import json
import pkgutil
import random
import re
import unicodedata
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "curation_eval.jsonl"
PACKAGES = ("networkx", "scipy", "sklearn", "sympy", "requests", "jinja2", "click", "flask", "markdown")
LANGUAGES = ("de", "fr", "es", "it", "pt", "nl")
MAX_CHARS = 8000  # longer docstrings are left out (a few API references of whole modules)
GOOD_DOCS = 600
SEED = 20261204


def docstrings(package: str, limit: int = 400) -> list[str]:
    """Return up to `limit` distinct docstrings (>= 60 words) of the package's public modules, classes and functions."""
    seen: set[str] = set()
    out: list[str] = []
    root = importlib.import_module(package)
    names = [package] + [m.name for m in pkgutil.walk_packages(root.__path__, package + ".")
                         if "._" not in m.name and ".tests" not in m.name and "test" not in m.name.rsplit(".", 1)[-1]]
    for name in sorted(names):
        try:
            module = importlib.import_module(name)
        except Exception:  # optional dependencies of a submodule
            continue
        members = [module] + [v for k, v in sorted(vars(module).items()) if not k.startswith("_")
                              and (inspect.isclass(v) or inspect.isfunction(v))
                              and getattr(v, "__module__", "").startswith(package)]
        for obj in members:
            doc = inspect.cleandoc(obj.__doc__ or "")
            if len(doc.split()) >= 60 and doc not in seen:
                seen.add(doc)
                out.append(doc)
                if len(out) >= limit:
                    return out
    return out


def shingles(text: str, n: int = 5) -> set[tuple[str, ...]]:
    """Return the set of lower-cased word `n`-grams of `text`."""
    words = text.lower().split()
    return {tuple(words[k:k + n]) for k in range(max(len(words) - n + 1, 1))}


def distinct(texts: list[str], count: int, max_jaccard: float = 0.5) -> list[str]:
    """Return the first `count` texts each of whose word 5-gram Jaccard with every earlier pick is below `max_jaccard`.

    Templated docstrings (a family of polynomials, say) are near copies of each
    other; good documents must be distinct, so that a removed copy is a planted one.
    """
    picked: list[tuple[str, set]] = []
    for text in texts:
        s = shingles(text)
        if all(len(s & t) / len(s | t) < max_jaccard for _, t in picked):
            picked.append((text, s))
            if len(picked) == count:
                break
    return [t for t, _ in picked]


def catalogue_sentences(language: str) -> list[str]:
    """Return translated messages (>= 6 words, letters mostly) of Debian's message catalogues for `language`."""
    out = []
    for path in sorted(Path("/usr/share/locale", language, "LC_MESSAGES").glob("*.mo")):
        try:
            with open(path, "rb") as f:
                catalog = gettext.GNUTranslations(f)._catalog
        except Exception:
            continue
        for msgstr in catalog.values():
            if isinstance(msgstr, str):
                text = " ".join(msgstr.replace("%s", "").replace("%d", "").split())
                if len(text.split()) >= 6 and sum(c.isalpha() for c in text) > 0.7 * len(text):
                    out.append(text)
    return sorted(set(out))


def luhn_card(rng: random.Random) -> str:
    """Return a 16-digit Luhn-valid card number in groups of four."""
    digits = [4] + [rng.randrange(10) for _ in range(14)]
    total = sum(d if i % 2 else (2 * d if 2 * d < 10 else 2 * d - 9) for i, d in enumerate(reversed(digits)))
    digits.append((10 - total % 10) % 10)
    s = "".join(map(str, digits))
    return " ".join(s[k:k + 4] for k in range(0, 16, 4))


def pii_sentence(rng: random.Random) -> tuple[str, list[str]]:
    """Return a sentence carrying personal data and the planted strings."""
    first, last = rng.choice(["anna", "li", "omar", "maria", "john", "keiko"]), rng.choice(["smith", "garcia", "chen"])
    email = f"{first}.{last}{rng.randrange(100)}@{rng.choice(['mail.com', 'example.net', 'uni-bonn.de'])}"
    phone = rng.choice([f"+1 415 {rng.randrange(200, 999)} {rng.randrange(1000, 9999)}",
                        f"({rng.randrange(200, 999)}) {rng.randrange(200, 999)}-{rng.randrange(1000, 9999)}",
                        f"+49 30 {rng.randrange(1000000, 9999999)}"])
    ip = f"{rng.choice([23, 45, 81, 133, 151, 185])}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
    card = luhn_card(rng)
    kind = rng.randrange(4)
    if kind == 0:
        return f"Questions about this function can be sent to {email} at any time.", [email]
    if kind == 1:
        return f"For support, call the maintainers at {phone} on weekdays.", [phone]
    if kind == 2:
        return f"The benchmark server at {ip} hosts the reference results.", [ip]
    return f"The test payment used the card {card} and was refunded.", [card]


def near_duplicate(text: str, rng: random.Random) -> str:
    """Return a near copy of `text`: a few words edited, a sentence added, a title, or re-flowed lines."""
    kind = rng.randrange(5)
    words = text.split(" ")
    if kind <= 1:  # 1-3% of words replaced or dropped
        rate = rng.choice([0.01, 0.02, 0.03])
        out = [w for w in words if not (rng.random() < rate / 2)]
        return " ".join(rng.choice(["the", "a", "this", "value"]) if rng.random() < rate / 2 else w for w in out)
    if kind == 2:
        return text + "\n\nSee the user guide for more details."
    if kind == 3:
        return "Reference documentation\n\n" + text
    return re.sub(r"(?<=\S)\n(?=\S)", " ", text)  # lines re-flowed into paragraphs


def junk(kind: str, rng: random.Random, good: list[str], foreign: dict[str, list[str]]) -> str:
    """Return one junk document of `kind`."""
    if kind == "language":
        lang = rng.choice(sorted(foreign))
        return " ".join(rng.sample(foreign[lang], min(12, len(foreign[lang]))))
    if kind == "boilerplate":
        lines = ["This site uses cookies to improve your experience and to show you personalised offers.",
                 "By continuing to browse you agree to our use of cookies. Read our privacy policy.",
                 "Please review our terms of use before sharing any content from these pages.",
                 "Manage your cookie preferences at any time from the settings page of your account.",
                 "We and our partners store and access information on your device, such as cookies."]
        return "\n\n".join(rng.sample(lines, 4))
    if kind == "menu":
        items = ["Home", "About", "Products", "Blog", "Contact", "Login", "Sign up", "Careers", "Press", "Help",
                 "Pricing", "Docs", "Community", "Partners", "Status", "Legal"]
        return "\n".join(" | ".join(rng.sample(items, 6)) for _ in range(12))
    if kind == "symbols":
        return " ".join("".join(rng.choice("#$%&*@^~|<>…") for _ in range(rng.randrange(2, 7))) for _ in range(120))
    if kind == "repeated":
        line = rng.choice(good).split("\n")[0][:80]
        return "\n".join([line] * 25)
    if kind == "numbers":
        return "\n".join(" ".join(f"{rng.uniform(-1000, 1000):.3f}" for _ in range(8)) for _ in range(30))
    if kind == "lorem":
        base = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut "
                "labore et dolore magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation ullamco.")
        return "\n\n".join([base] * 4)
    if kind == "short":
        return rng.choice(good).split(".")[0].strip()[:120] + "."
    raise ValueError(kind)


JUNK_KINDS = ("language", "boilerplate", "menu", "symbols", "repeated", "numbers", "lorem", "short")


def build(seed: int = SEED) -> list[dict]:
    """Return the labelled evaluation records, in a seeded shuffled order."""
    rng = random.Random(seed)
    pool = [d for p in PACKAGES for d in docstrings(p) if len(d) <= MAX_CHARS]
    rng.shuffle(pool)
    good = distinct(pool, GOOD_DOCS)
    foreign = {lang: s for lang in LANGUAGES if len(s := catalogue_sentences(lang)) >= 40}
    records = [{"id": f"good-{k}", "text": t, "label": "good", "of": "", "pii": []} for k, t in enumerate(good)]
    for k in rng.sample(range(len(good)), 120):  # personal data planted into good documents
        sentence, planted = pii_sentence(rng)
        paragraphs = records[k]["text"].split("\n\n")
        paragraphs.insert(rng.randrange(len(paragraphs) + 1), sentence)
        records[k] |= {"text": "\n\n".join(paragraphs), "label": "good_pii", "pii": planted}
    originals = records[:]
    for n, src in enumerate(rng.sample(originals, 150)):
        records.append({"id": f"near-{n}", "text": near_duplicate(src["text"], rng), "label": "near_duplicate",
                        "of": src["id"], "pii": []})
    for n, src in enumerate(rng.sample(originals, 60)):
        text = src["text"].replace("\n\n", "\n \n\n", 1) if n % 2 else unicodedata.normalize("NFD", src["text"]) + "  "
        records.append({"id": f"exact-{n}", "text": text, "label": "exact_duplicate", "of": src["id"], "pii": []})
    for n in range(160):
        kind = JUNK_KINDS[n % len(JUNK_KINDS)]
        records.append({"id": f"junk-{kind}-{n}", "text": junk(kind, rng, good, foreign), "label": f"junk_{kind}",
                        "of": "", "pii": []})
    head, tail = records[:len(originals)], records[len(originals):]
    rng.shuffle(tail)  # duplicates come after their originals (the first in input order is kept)
    return head + tail


def main() -> None:
    """Build the corpus and write it to `OUT`."""
    records = build()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with open(OUT, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    labels = {}
    for r in records:
        labels[r["label"]] = labels.get(r["label"], 0) + 1
    print(f"{OUT}: {len(records)} records {labels}")


if __name__ == "__main__":
    main()
