"""Turning a free-form model answer into something a rule can score, as VLMEvalKit does it
without an LLM judge ("exact_matching"): yes/no extraction, option-letter inference, and the
VQA answer normalization (punctuation, digits, articles) of the official VQA evaluation."""

from __future__ import annotations

import re
import string

_PUNCT = [
    ";",
    r"/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PERIOD_STRIP = re.compile(r"(?<!\d)\.(?!\d)")
_DIGITS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {
    "'ow'sat": "'ow's'at",
    "'ows'at": "'ow's'at",
    "I'dve": "I'd've",
    "Id've": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldn'tve": "couldn't've",
    "couldnt": "couldn't",
    "couldnt've": "couldn't've",
    "couldve": "could've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadn'tve": "hadn't've",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "he'dve": "he'd've",
    "hed": "he'd",
    "hed've": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "isnt": "isn't",
    "it'dve": "it'd've",
    "itd": "it'd",
    "itd've": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightn'tve": "mightn't've",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "shant": "shan't",
    "she'dve": "she'd've",
    "she's": "she's",
    "shed've": "she'd've",
    "shouldn'tve": "shouldn't've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldve": "should've",
    "somebody'd": "somebodyd",
    "somebody'dve": "somebody'd've",
    "somebodyd've": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someone'dve": "someone'd've",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "something'dve": "something'd've",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "there'dve": "there'd've",
    "thered": "there'd",
    "thered've": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "they'dve": "they'd've",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "we'dve": "we'd've",
    "wed've": "we'd've",
    "werent": "weren't",
    "weve": "we've",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "who'dve": "who'd've",
    "whod": "who'd",
    "whod've": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldn'tve": "wouldn't've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldve": "would've",
    "y'all'dve": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'allll": "y'all'll",
    "yall": "y'all",
    "yall'd've": "y'all'd've",
    "yall'll": "y'all'll",
    "you'dve": "you'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}
_REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
_API_FAILURE = "Failed to obtain answer via API"
"""VLMEvalKit's marker of a failed API call: no letter is read from such an answer (only the
option text is tried)."""
_VERBOSE_ANSWER = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")


def process_punctuation(text: str) -> str:
    """The VQA evaluation's punctuation rule: a mark next to a space (or any mark, when the text
    has a digit-comma-digit) is dropped, otherwise it becomes a space; periods not between digits
    go. VLMEvalKit passes ``re.UNICODE`` (= 32) as the ``count`` of the period substitution, so
    at most 32 periods go; we keep that, to score exactly as it does."""
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=32)


def process_digit_article(text: str) -> str:
    """Lower-case, number words to digits, articles dropped, contractions restored."""
    words = [_DIGITS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(text: str) -> str:
    """The VQA answer normalization used before comparing TextVQA answers."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def extract_yes_no(prediction: str) -> str:
    """'Yes', 'No' or 'Unknown': yes/no counts only when the answer's words hold exactly one
    of the two (VLMEvalKit's YOrN_Extraction)."""
    words = process_punctuation(prediction.lower()).split()
    if "yes" in words and "no" not in words:
        return "Yes"
    if "no" in words and "yes" not in words:
        return "No"
    return "Unknown"


def _infer_option(answer: str, choices: dict) -> str | None:
    """The option letter named in the answer: exactly one letter among the last words, 'Z' for
    a refusal, or 'the answer is X'; None when none fits (VLMEvalKit's can_infer_option)."""
    if _API_FAILURE in answer:
        return None
    for refusal in _REFUSALS:
        if refusal in answer:
            return "Z"
    mod = answer
    for c in ".()[],:;!*#{}":
        mod = mod.replace(c, " ")
    words = mod.split()
    named = [c for c in choices if c in words]
    if len(named) == 1:
        ch = named[0]
        if words.index(ch) > len(words) - 5:
            return ch
    elif not named and "Z" in words:
        return "Z"
    m = _VERBOSE_ANSWER.search(answer)
    if m and m.group(1).upper() in choices:
        return m.group(1).upper()
    return None


def _infer_text(answer: str, choices: dict) -> str | None:
    """The option whose text alone appears in a short answer (VLMEvalKit's can_infer_text)."""
    low = answer.lower()
    if len(low) > 2 * sum(len(str(v)) for v in choices.values()):
        return None
    hits = [k for k, v in choices.items() if str(v).lower() in low]
    return hits[0] if len(hits) == 1 else None


def infer_option(prediction: str, choices: dict) -> str | None:
    """The option letter a prediction chooses (letter first, then option text), or None.

    ``choices`` maps letters (A, B, ...) to option texts; 'Z' means a refusal."""
    for k in choices:
        if k not in string.ascii_uppercase:
            raise ValueError(f"option key {k!r} is not a capital letter")
    return _infer_option(prediction, choices) or _infer_text(prediction, choices)


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions), two-row dynamic programme."""
    if len(a) > len(b):
        a, b = b, a
    prev = list(range(len(a) + 1))
    for j, cb in enumerate(b, start=1):
        cur = [j]
        for i, ca in enumerate(a, start=1):
            cur.append(prev[i - 1] if ca == cb else 1 + min(prev[i - 1], prev[i], cur[-1]))
        prev = cur
    return prev[-1]
