"""Language identification with lingua (its n-gram models ship inside the wheel; no download).

The detector knows all of lingua's 75 languages (so a German page is called
German, not "least unlikely English") and runs in lingua's low-accuracy mode
(trigrams only), which is fast and reliable on texts longer than a sentence.
A document's language is the most likely one on its first `max_chars`
characters; its score is lingua's confidence in it (0-1).
"""

from __future__ import annotations

import functools

MAX_CHARS = 1000


@functools.lru_cache(maxsize=1)
def detector():
    """Return the lingua detector, built once per process (about 0.6 s)."""
    from lingua import LanguageDetectorBuilder

    builder = LanguageDetectorBuilder.from_all_languages().with_low_accuracy_mode()
    return builder.with_preloaded_language_models().build()


def detect(texts: list[str], max_chars: int = MAX_CHARS) -> list[tuple[str, float]]:
    """Return (ISO 639-1 code, confidence) per text; ("unknown", 0.0) where lingua cannot tell.

    A lone surrogate (which lingua, taking UTF-8, cannot be given) counts as `?`.
    """
    results = []
    for text in texts:
        head = text[:max_chars].encode("utf-8", "replace").decode("utf-8")
        values = detector().compute_language_confidence_values(head)
        if values and values[0].value > 0:
            results.append((values[0].language.iso_code_639_1.name.lower(), round(float(values[0].value), 4)))
        else:
            results.append(("unknown", 0.0))
    return results


def check_languages(codes: list[str]) -> None:
    """Raise ValueError naming any code that is not an ISO 639-1 code lingua knows."""
    from lingua import Language

    known = {lang.iso_code_639_1.name.lower() for lang in Language.all()}
    unknown = sorted(set(codes) - known)
    if unknown:
        raise ValueError(f"unknown language codes {unknown}; use ISO 639-1 codes such as en, de, fr")
