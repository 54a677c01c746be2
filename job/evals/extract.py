"""The one rule that reads the chosen option out of a completion: :func:`extract_choice`.

1. **The answer region.** A reasoning model's completion continues the prompt's opening ``<think>``: the
   answer is the text after the *last* ``</think>``. Without ``</think>``:

   * the model never stopped (it hit ``max_new_tokens`` while still reasoning): no extractable answer;
   * the model stopped (EOS) without closing its reasoning: the whole completion is the answer region. A
     model that ends its turn has given its answer, and one that answers without a think block (a base
     model that is no reasoning model) is still scored; later tiers guard against letters named in passing.

2. **The choice**, from the region (NFKC-normalised, so full-width ``：（Ｂ）`` read as ``:(B)``), by the first
   tier that finds anything:

   1. *Explicit answer markers*, the last one wins (a model that corrects itself is scored on its
      correction): ``answer is (B)``, ``Answer: B``, ``the correct answer is B) ...``, ``final answer:
      **C**``, ``the best choice is D``, ``I would choose B``, ``\\boxed{B}``, ``答案：B``, ``答案是B``,
      ``正确答案为 B``, ``正确选项是B``, ``选B``. After a marker comes a letter (optionally in parentheses, brackets or bold)
      or the text of an option (``The answer is yes``, ``The answer is aspirin``). An uppercase letter must
      not run on into a word (``Aspirin``); a lowercase one counts only when enclosed or followed by
      punctuation or the end of the line, so ``the answer is a rare ...`` is not ``A``.
      The same tier reads a letter named *before* its verdict: ``B is the correct answer``, ``Therefore, (B)
      is correct``, ``Option C is the best choice``, ``so D is right`` (an uppercase letter opening a line
      or clause, after ``option``/``so``/``thus``/``therefore``/``hence``/``then``/``and``, or enclosed;
      then ``is``/``would be``, then ``correct``, ``right`` or ``the (correct|right|best|most likely)
      answer|option|choice``), so ``Hepatitis B is the most likely answer`` is not ``B``.
   2. *A lone letter*: the region is just ``B``, ``b``, ``B.``, ``(B)`` or ``**B**``.
   3. *Option mentions*: ``option B``, ``choice (C)``, ``选项B``.
   4. *Enclosed or emphasised letters*: ``**B**``, ``**B. text**``, ``(B)``, ``[B]``, or a line starting
      ``B.``/``B)``/``B:``.
   5. *Option text*: the text of exactly one option occurs in the region (case, whitespace and punctuation
      ignored, whole words; an option whose text lies inside another matched option's text does not count).
      PubMedQA's options are ``yes``/``no``/``maybe``, so this tier reads its bare yes/no/maybe words.

   Tiers 3-5 must be unambiguous: when the first of them that finds anything finds two different letters
   (``A and C are both possible``), the answer is None. Only letters of the question's options count.

The result is the chosen letter, or None for "no extractable answer" (scored as wrong).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping

from job.templates import THINK_CLOSE

_EN_MARKER = (
    r"(?i:\b(?:(?:final|correct|best|right|true|most\s+likely)\s+)?answer"
    r"(?:\s+(?:is|would\s+be|should\s+be|will\s+be|must\s+be|here\s+is))?"
    r"|\b(?:correct|right|best|most\s+likely)\s+(?:option|choice)(?:\s+(?:is|would\s+be))?"
    r"|\bI\s+(?:would\s+|will\s+)?(?:choose|select|pick|go\s+with))"
    r"[\s:=\-\u2013\u2014>*_]*(?i:(?:option|choice)\s*)?"
)
_ZH_MARKER = r"(?:正确答案|最终答案|答案|正确选项|应选|选择|选)\s*(?:应该是|应为|是|为)?\s*:?\s*"
# A letter named before its verdict ("B is the correct answer", "(C) is correct"): uppercase, and opening a
# line or clause, after "option"/"so"/"thus"..., or enclosed, so neither the article in "A correct answer
# needs ..." nor a name such as "Hepatitis B is the most likely answer" is read as a choice.
_VERDICT_AFTER = re.compile(
    r"(?:(?m:^)[ \t>*-]*|[.:;,!?][ \t]+|(?i:\b(?:option|choice|so|thus|therefore|hence|then|and))[ \t]+"
    r"|[ \t](?=[(\[]|\*\*))"
    r"[*_(\[]*(?P<l>[A-Z])[*_)\]]*[ \t]+(?:is|would\s+be)\s+"
    r"(?:(?:the\s+)?(?:correct|right|best|most\s+likely)\s+(?:answer|option|choice)\b|(?:correct|right)\b)"
)
_BOXED = r"\\boxed\{\s*(?:\\text(?:bf)?\{)?"
_MARKERS = re.compile(f"{_EN_MARKER}|{_ZH_MARKER}|{_BOXED}")
_OPEN = " \t*_([\"'"
_LOWER_FOLLOW = ").:,;*]"
_OPTION_MENTION = re.compile(r"(?:(?i:\b(?:option|choice))|选项)\s*[(\[]?\s*(?P<l>[A-Za-z])(?![A-Za-z0-9])")
_ENCLOSED = (
    re.compile(r"\*\*[(\[]?(?P<l>[A-Z])(?:\*\*|[)\].:])"),
    re.compile(r"\((?P<l>[A-Z])\)"),
    re.compile(r"\[(?P<l>[A-Z])\]"),
    re.compile(r"(?m)^[ \t>*-]*(?P<l>[A-Z])[.):](?:\s|$)"),
)
_LONE = re.compile(r"^[\W_]*(?P<l>[A-Za-z])[\W_]*$")


def answer_region(completion: str, stopped: bool) -> str | None:
    """The text after the last ``</think>``; without one, the whole completion if the model stopped by itself,
    else None (cut off while reasoning)."""
    if THINK_CLOSE in completion:
        return completion.rsplit(THINK_CLOSE, 1)[1]
    return completion if stopped else None


def _normalise_words(text: str) -> str:
    """Lowercase words separated by single spaces: punctuation and whitespace runs become one space."""
    return " ".join(re.sub(r"[\W_]+", " ", text.lower()).split())


def _letter_at(text: str, pos: int, letters: str) -> str | None:
    """The option letter a marker ending at ``pos`` is followed by (see tier 1 for the case rules)."""
    i, enclosed = pos, False
    while i < len(text) and text[i] in _OPEN:
        enclosed = enclosed or text[i] in "(["
        i += 1
    if i >= len(text) or text[i].upper() not in letters:
        return None
    after = text[i + 1:i + 2]
    if after.isalnum():
        return None
    if text[i].isupper() or enclosed or after == "" or after in _LOWER_FOLLOW:
        return text[i].upper()
    rest = text[i + 1:]
    return text[i].upper() if re.match(r"[ \t]*(?:\n|$)", rest) else None


def _option_at(text: str, pos: int, options: Mapping[str, str]) -> str | None:
    """The option whose text starts right after ``pos`` (whole words; the longest one if several do)."""
    ahead = " " + _normalise_words(text[pos:pos + 400]) + " "
    best: tuple[int, str] | None = None
    for letter, option in options.items():
        norm = _normalise_words(option)
        if norm and ahead.startswith(f" {norm} ") and (best is None or len(norm) > best[0]):
            best = (len(norm), letter)
    return best[1] if best else None


def _marked(text: str, options: Mapping[str, str], letters: str) -> str | None:
    """Tier 1: the choice of the last marker (or letter-then-verdict) in ``text`` that names one."""
    found: list[tuple[int, str]] = []
    for m in _MARKERS.finditer(text):
        choice = _letter_at(text, m.end(), letters) or _option_at(text, m.end(), options)
        if choice is not None:
            found.append((m.start(), choice))
    found += [(m.start(), m["l"]) for m in _VERDICT_AFTER.finditer(text) if m["l"] in letters]
    return max(found)[1] if found else None


def _unique(found: set[str]) -> str | None:
    return next(iter(found)) if len(found) == 1 else None


def _option_text(text: str, options: Mapping[str, str]) -> set[str]:
    region = f" {_normalise_words(text)} "
    norms = {letter: _normalise_words(option) for letter, option in options.items()}
    matched = {letter for letter, norm in norms.items() if norm and f" {norm} " in region}
    # "aspirin" inside a matched "aspirin and heparin" is not a second answer.
    return {a for a in matched if not any(b != a and f" {norms[a]} " in f" {norms[b]} " and norms[a] != norms[b]
                                          for b in matched)}


def extract_choice(completion: str, options: Mapping[str, str], *, stopped: bool) -> str | None:
    """The option letter ``completion`` chose, or None when it has no extractable answer.

    ``options``: the question's letter -> text, in order. ``stopped``: whether the model ended by itself
    (EOS) rather than at the token limit. The rule is the module docstring's.
    """
    region = answer_region(completion, stopped)
    if region is None:
        return None
    text = unicodedata.normalize("NFKC", region).strip()
    if not text:
        return None
    letters = "".join(options)
    choice = _marked(text, options, letters)
    if choice is not None:
        return choice
    lone = _LONE.match(text)
    if lone and lone["l"].upper() in letters:
        return lone["l"].upper()
    mentions = {m["l"].upper() for m in _OPTION_MENTION.finditer(text) if m["l"].upper() in letters}
    if mentions:
        return _unique(mentions)
    enclosed = {m["l"] for pattern in _ENCLOSED for m in pattern.finditer(text) if m["l"] in letters}
    if enclosed:
        return _unique(enclosed)
    return _unique(_option_text(text, options))
