"""The one extraction rule (job/evals/extract.py) on many completion formats, traps included."""

from __future__ import annotations

import pytest

from job.evals.extract import answer_region, extract_choice

MCQ = {"A": "Ankle-brachial index", "B": "Staphylococcus aureus", "C": "Abdominal CT", "D": "ACE inhibitors"}
YNM = {"A": "yes", "B": "no", "C": "maybe"}
NESTED = {"A": "Aspirin", "B": "Aspirin and heparin", "C": "Heparin", "D": "Warfarin"}
T = "Let me weigh each option carefully.\n</think>\n"  # a closed reasoning block before the answer

CASES = [
    # --- explicit markers
    ("answer is (B)", T + "The answer is (B).", MCQ, "B"),
    ("Answer: B", T + "Answer: B", MCQ, "B"),
    ("markdown Answer", T + "**Answer:** C", MCQ, "C"),
    ("final answer bold", T + "Final answer: **D**", MCQ, "D"),
    ("correct answer with paren", T + "The correct answer is B) Staphylococcus aureus, because ...", MCQ, "B"),
    ("answer is option", T + "So the answer is option C.", MCQ, "C"),
    ("best choice", T + "The best choice is D.", MCQ, "D"),
    ("I would choose", T + "I would choose A here.", MCQ, "A"),
    ("boxed", T + "Therefore \\boxed{C}", MCQ, "C"),
    ("answer newline letter", T + "Answer:\n\nB", MCQ, "B"),
    ("answer is letter with text", T + "The answer is A. Ankle-brachial index", MCQ, "A"),
    ("answer is A comma", T + "The answer is A, since claudication fits.", MCQ, "A"),
    ("lowercase answer letter", T + "the answer is b.", MCQ, "B"),
    ("lowercase enclosed", T + "the answer is (c)", MCQ, "C"),
    ("lowercase at end of line", T + "answer: d\nThat is all.", MCQ, "D"),
    ("answer is option text", T + "The answer is abdominal CT.", MCQ, "C"),
    ("letter then correct answer", T + "B is the correct answer.", MCQ, "B"),
    ("therefore letter is correct", T + "Therefore, B is correct.", MCQ, "B"),
    ("enclosed letter is the best choice", T + "Thus (D) is the best choice here.", MCQ, "D"),
    ("option letter would be right", T + "Option C would be right, given the imaging.", MCQ, "C"),
    ("verdict after a marker wins", T + "The answer is A? No, on reflection, C is correct.", MCQ, "C"),
    ("so letter is right", T + "Imaging settles it, so D is right.", MCQ, "D"),
    ("a name is not a verdict", T + "Hepatitis B is the most likely answer here.",
     {"A": "Hepatitis A", "B": "Cirrhosis", "C": "Hepatitis B", "D": "Gallstones"}, "C"),
    ("article is not a verdict", T + "A correct answer needs imaging; the answer is C.", MCQ, "C"),
    ("letter is not correct", T + "B is not correct, so the answer is D.", MCQ, "D"),
    # --- Chinese markers (full-width and half-width punctuation)
    ("答案：B", T + "答案：B", MCQ, "B"),
    ("答案是B", T + "所以答案是B。", MCQ, "B"),
    ("正确答案为（C）", T + "正确答案为（C）", MCQ, "C"),
    ("选D", T + "综上，选D。", MCQ, "D"),
    ("正确选项是B", T + "正确选项是B。", MCQ, "B"),
    ("选项B (mention)", T + "因此选项B最合适。", MCQ, "B"),
    ("full-width letter", T + "答案：Ｂ", MCQ, "B"),
    # --- the last explicit marker wins; markers beat weaker forms
    ("self-correction", T + "At first the answer is A, but on reflection the answer is C.", MCQ, "C"),
    ("marker beats option mention", T + "Option A is tempting. The answer is B.", MCQ, "B"),
    ("marker beats listed options", T + "A. x\nB. y\nC. z\nD. w\n\nAnswer: D", MCQ, "D"),
    # --- lone letters
    ("lone letter", T + "B", MCQ, "B"),
    ("lone lowercase letter", T + "c", MCQ, "C"),
    ("lone bold letter", T + "**D**", MCQ, "D"),
    ("lone letter with dot", T + "A.", MCQ, "A"),
    # --- option mentions, enclosed and emphasised letters
    ("option B", T + "Option B fits best.", MCQ, "B"),
    ("choice (C)", T + "I think choice (C) is right.", MCQ, "C"),
    ("bold letter in sentence", T + "It is **B** because of the crusted rash.", MCQ, "B"),
    ("bold letter and text", T + "**C. Abdominal CT** is the first step.", MCQ, "C"),
    ("parenthesised letter", T + "Going with (D) then.", MCQ, "D"),
    ("line starting B.", T + "B. Staphylococcus aureus", MCQ, "B"),
    # --- option text only
    ("option text only", T + "This is impetigo caused by staphylococcus aureus.", MCQ, "B"),
    ("option text punctuation/case", T + "ace-inhibitors cause the cough", MCQ, "D"),
    ("nested option text", T + "Give aspirin and heparin now.", NESTED, "B"),
    # --- PubMedQA yes/no/maybe
    ("pubmedqa letter", T + "The answer is A", YNM, "A"),
    ("pubmedqa answer word", T + "There is no large effect, yet the answer is yes.", YNM, "A"),
    ("pubmedqa bare word", T + "Maybe; the evidence is mixed.", YNM, "C"),
    ("pubmedqa Answer: no", T + "Answer: no", YNM, "B"),
    ("pubmedqa conflicting words", T + "Yes, in part, but no in the elderly.", YNM, None),
    # --- traps
    ("article A at start", T + "A patient with these signs needs urgent care.", MCQ, None),
    ("article a after marker", T + "The answer is a rare disease, hard to say.", MCQ, None),
    ("two letters, no marker", T + "Both (A) and (C) are plausible.", MCQ, None),
    ("two option mentions", T + "Option A or option D, I cannot decide.", MCQ, None),
    ("letter not among options", T + "The answer is E.", MCQ, None),
    ("letter only in reasoning", "The answer is B, I think.\n</think>\nI am not sure.", MCQ, None),
    ("reasoning vs answer", "Hmm, the answer is B.\n</think>\nThe answer is D.", MCQ, "D"),
    ("last think close counts", "x</think>The answer is A</think>The answer is C", MCQ, "C"),
    ("word containing letter", T + "Answer: Aspirin-like drugs are not listed", MCQ, None),
    ("answer is not", T + "The answer is not obvious.", MCQ, None),
    ("empty answer", T, MCQ, None),
    ("no answer at all", T + "I do not know.", MCQ, None),
]


@pytest.mark.parametrize(("completion", "options", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_extraction_rule(completion: str, options: dict[str, str], expected: str | None) -> None:
    assert extract_choice(completion, options, stopped=True) == expected


def test_there_are_at_least_forty_cases() -> None:
    assert len(CASES) >= 40


def test_cut_off_while_reasoning_has_no_answer_even_if_a_letter_was_named() -> None:
    text = "The answer is B, surely, but let me check the other options once more"
    assert answer_region(text, stopped=False) is None
    assert extract_choice(text, MCQ, stopped=False) is None


def test_stopped_without_closing_think_scores_the_whole_completion() -> None:
    assert extract_choice("Straight to it. The answer is C.", MCQ, stopped=True) == "C"


def test_cut_off_after_closing_think_still_reads_the_answer() -> None:
    # The answer came before the limit; only the trailing text was cut.
    assert extract_choice(T + "The answer is B. Further notes on", MCQ, stopped=False) == "B"
