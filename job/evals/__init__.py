"""Benchmark accuracy of a model on published medical question sets, scored generatively.

Modules, each depending only on those before it:

* :mod:`job.medical_benchmarks` (plain data, in the shared layer because the job config validates against it):
  the benchmark specs (MedQA-USMLE 4 options, MedMCQA, PubMedQA labeled), their column mappings onto one
  :class:`~job.medical_benchmarks.Question`, and the one way a question becomes prompt text.
* :mod:`.sources`: a benchmark's rows from the hub (``datasets``) or a local ``.jsonl``/``.parquet`` file in
  the dataset's own schema, and the seeded subset taken when a limit is given.
* :mod:`.extract`: the one rule that reads the chosen option out of a completion.
* :mod:`.scoring`: per-answer records to a per-benchmark result (accuracy, 95% interval accounting for
  several samples per question, shares, median reasoning length; computed by :mod:`registry.answers`) and
  the comparison of two results.
* :mod:`.runner`: asks every question K times (greedy, or sampled with a seed per answer) through the one
  call into the generation engine and produces the per-answer records.
* :mod:`.suite`, :mod:`.command`, :mod:`.in_job`: several benchmarks at once, ``medft eval``, and the scoring
  inside ``medft train`` (before and after training).
"""
