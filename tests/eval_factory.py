"""Benchmark rows written for medft's tests, in each published dataset's exact schema (see
``job/medical_benchmarks.py`` for the verified column names). Every question here is made up; none is taken
from the real datasets.

* ``medqa_rows()``: ``GBaker/MedQA-USMLE-4-options`` rows (question, answer, options A-D, meta_info,
  answer_idx, metamap_phrases).
* ``medmcqa_rows()``: ``openlifescienceai/medmcqa`` rows (id, question, opa-opd, cop 0-3, choice_type, exp,
  subject_name, topic_name).
* ``pubmedqa_rows()``: ``qiaojin/PubMedQA`` ``pqa_labeled`` rows (pubid, question, context as a struct of
  lists, long_answer, final_decision).
* ``write_benchmark(dest, name, suffix)``: those rows as ``.jsonl`` or ``.parquet`` (nested columns as
  structs, as the hub's Parquet export has them); returns the path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.data_factory import write_jsonl, write_parquet

_MEDQA = [
    ("A 34-year-old runner reports calf pain that starts after 2 km and stops within minutes of rest. Which "
     "test best confirms the suspected condition?", ["Ankle-brachial index", "Serum lipase", "Skin biopsy",
                                                      "Lumbar puncture"], "A"),
    ("A 6-year-old has a honey-coloured crusted rash around the mouth. What is the most likely organism?",
     ["Candida albicans", "Staphylococcus aureus", "Herpes zoster", "Borrelia species"], "B"),
    ("A 58-year-old smoker has painless jaundice and a palpable non-tender gallbladder. Which imaging comes "
     "first?", ["Plain chest film", "Knee MRI", "Abdominal CT", "Bone scan"], "C"),
    ("A patient on a new tablet for high blood pressure develops a dry cough. Which drug class is the likely "
     "cause?", ["Beta blockers", "Thiazides", "Calcium channel blockers", "ACE inhibitors"], "D"),
    ("A 25-year-old has sudden pleuritic chest pain after a long flight and a fast heart rate. Which finding "
     "is most supportive?", ["Raised D-dimer", "Low ferritin", "High amylase", "Low calcium"], "A"),
    ("A 70-year-old has a resting tremor in one hand that improves on movement. Which sign also fits?",
     ["Spastic weakness", "Cogwheel rigidity", "Ptosis", "Tongue fasciculation"], "B"),
]

_MEDMCQA = [
    ("Which nerve is at risk in a fracture of the humeral midshaft?", ["Ulnar", "Median", "Radial", "Axillary"],
     2, "Anatomy", "Upper limb"),
    ("Drug of choice for an absence seizure in a child:", ["Ethosuximide", "Phenytoin", "Carbamazepine",
                                                           "Phenobarbital"], 0, "Pharmacology", "CNS"),
    ("Koplik spots are seen in:", ["Mumps", "Measles", "Rubella", "Chickenpox"], 1, "Pediatrics", "Infections"),
    ("The most common site of a peptic ulcer is:", ["Oesophagus", "Jejunum", "Gastric fundus",
                                                    "First part of duodenum"], 3, "Surgery", "Stomach"),
    ("Vitamin deficiency that causes night blindness:", ["Vitamin A", "Vitamin C", "Vitamin D", "Vitamin K"],
     0, "Biochemistry", "Vitamins"),
]

_PUBMEDQA = [
    (21000001, "Does a daily walking programme lower resting blood pressure in older adults?",
     [("BACKGROUND", "Regular activity is advised for people with high blood pressure."),
      ("METHODS", "Two hundred volunteers walked thirty minutes a day for twelve weeks or kept their habits."),
      ("RESULTS", "Resting systolic pressure fell by 6 mmHg in walkers and did not change in controls.")],
     "Daily walking lowered resting blood pressure.", "yes"),
    (21000002, "Is coffee intake linked to a higher risk of ankle sprain in students?",
     [("OBJECTIVE", "To test whether caffeine changes injury rates."),
      ("RESULTS", "Sprain rates were 4.1% and 4.0% with and without daily coffee.")],
     "No association was found.", "no"),
    (21000003, "Can a smartphone photograph grade skin redness as well as a nurse?",
     [("METHODS", "Photographs of sixty forearms were graded by software and by two nurses."),
      ("RESULTS", "Agreement was good for mild redness and poor for severe redness.")],
     "Results were mixed and need a larger study.", "maybe"),
    (21000004, "Does an evening screen curfew improve sleep duration in teenagers?",
     [("BACKGROUND", "Screen use at night is common among teenagers."),
      ("RESULTS", "Teenagers with a curfew slept 35 minutes longer on average.")],
     "A screen curfew lengthened sleep.", "yes"),
]


def medqa_rows() -> list[dict[str, Any]]:
    rows = []
    for question, options, gold in _MEDQA:
        opts = dict(zip("ABCD", options))
        rows.append({"question": question, "answer": opts[gold], "options": opts, "meta_info": "step1",
                     "answer_idx": gold, "metamap_phrases": question.split()[:4]})
    return rows


def medmcqa_rows() -> list[dict[str, Any]]:
    rows = []
    for n, (question, options, cop, subject, topic) in enumerate(_MEDMCQA):
        rows.append({"id": f"0d9c2e1a-{n:04d}-4f00-9a00-made-up-medft", "question": question, "opa": options[0],
                     "opb": options[1], "opc": options[2], "opd": options[3], "cop": cop, "choice_type": "single",
                     "exp": f"Made-up explanation {n}.", "subject_name": subject, "topic_name": topic})
    return rows


def pubmedqa_rows() -> list[dict[str, Any]]:
    rows = []
    for pubid, question, passages, long_answer, decision in _PUBMEDQA:
        context = {"contexts": [p for _, p in passages], "labels": [label for label, _ in passages],
                   "meshes": ["Humans", "Adult"],
                   # In the published rows these two are single strings stored in a Sequence: lists of letters.
                   "reasoning_required_pred": list(decision), "reasoning_free_pred": list(decision)}
        rows.append({"pubid": pubid, "question": question, "context": context, "long_answer": long_answer,
                     "final_decision": decision})
    return rows


ROWS = {"medqa": medqa_rows, "medmcqa": medmcqa_rows, "pubmedqa": pubmedqa_rows}


def write_benchmark(dest: Path, name: str, suffix: str = ".jsonl", rows: list[dict[str, Any]] | None = None) -> Path:
    """``name``'s made-up rows (or ``rows``) written to ``dest/<name><suffix>``."""
    path = dest / f"{name}{suffix}"
    data = ROWS[name]() if rows is None else rows
    if suffix == ".jsonl":
        return write_jsonl(path, data)
    if name != "pubmedqa" or rows is not None:
        return write_parquet(path, data)
    import pyarrow as pa
    import pyarrow.parquet as pq

    # The published Parquet types pubid as int32.
    table = pa.Table.from_pylist(data)
    pq.write_table(table.set_column(0, "pubid", table.column("pubid").cast(pa.int32())), path)
    return path


def answers_and_score(accuracy: float, scored: int = 200, *, path: str = "benchmarks/after/medqa.jsonl",
                      samples: int = 1, benchmark: str = "medqa", **fields: Any) -> tuple[bytes, dict[str, Any]]:
    """An answers file of ``scored`` made-up questions answered ``samples`` times, ``round(accuracy * scored *
    samples)`` of the answers right, and the score recorded with it (as the job or ``medft eval`` records it:
    computed from the file, naming it at ``path`` by sha256 and size; ``fields`` add to or replace its keys,
    e.g. the protocol)."""
    import hashlib

    from registry.answers import AnswerRow, encode, summarize

    right = round(accuracy * scored * samples)
    rows = [AnswerRow(benchmark=benchmark, question_id=f"q{q}", sample=k, seed=None if samples == 1 else 1000 * q + k,
                      prompt_tokens=40, completion=f"Made-up reasoning {q}.{k}</think>The answer is A.",
                      completion_tokens=30, reasoning_tokens=25, choice="A" if q * samples + k < right else "B",
                      gold="A", correct=q * samples + k < right, stop="stop" if q % 10 else "length")
            for q in range(scored) for k in range(samples)]
    data = encode(rows)
    s = summarize(rows)
    score = {"benchmark": benchmark, "accuracy": s.accuracy, "interval": list(s.interval), "correct": s.correct,
             "scored": s.scored, "no_answer_share": s.no_answer_share, "hit_limit_share": s.hit_limit_share,
             "median_reasoning_tokens": s.median_reasoning_tokens, "source": "hf://GBaker/MedQA-USMLE-4-options",
             "limit": scored, "seed": 0, "content_sha256": "c" * 64, "max_new_tokens": 1024,
             **({"temperature": 0.6, "top_p": 0.95, "samples": samples} if samples > 1 else {}),
             "answers_file": {"path": path, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}}
    return data, {**score, **fields}
