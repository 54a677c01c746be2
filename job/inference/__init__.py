"""``medft generate`` and ``medft chat``: ask a registered model version a question, the way it was taught.

A REF is a registry reference (``NAME``, ``NAME:VERSION``, ``NAME@ALIAS``, looked up in the registry the
``--store``/``--registry`` options name) or a published run's folder (``s3://bucket/prefix/runs/<id>``, a
``file://`` URI or a local path), read through its MANIFEST.json. Anything containing ``://``, ``/`` or
``\\`` is taken for a run folder; everything else must be a registry reference.

Loading: the artifact's files are downloaded once into ``<cache>/models/<key>``, every file checked against
the sha256 the record lists, then reused after a check on every use (a stamp per file, a full sha256 when
it changed); ``<key>`` is derived from those checksums, so a cached copy is always the content the record
names. ``--artifact adapter`` loads the version's base model (through
:func:`job.model.pull_weights`, checked against the base weights' recorded sha256) and applies the adapter
with peft. On a GPU with unsloth installed, unsloth's ``FastLanguageModel`` loads the model and switches it
to fast inference; elsewhere plain transformers runs it (float32 on CPU).

Prompting: the template the version was trained with (``data.template`` in its recorded config) builds the
prompt ids exactly as :func:`job.data.prepare` built the masked head of every training example (BOS,
instruction, question, response header, the opening ``<think>\\n``), so the response is opened with
``<think>\\n`` as DeepSeek advises for R1-Distill models and the model continues with its reasoning. Sampling
defaults to DeepSeek's advice too: temperature 0.6, top-p 0.95; temperature 0 is greedy decoding.

Code: nothing in a version's folders runs. Every load passes ``trust_remote_code=False`` and
``use_safetensors=True``; before it, every artifact (and the base model) is checked: safetensors only, no
pickle beside them, every header true, and no ``auto_map`` or ``.py`` file (refused, exit 3), since a record
can claim anything. Only ``--trust-remote-code SHA`` on the command line lifts the code refusal, for a run
folder whose recorded base revision is that commit sha, never for a registry ref.

Every expected failure raises a :mod:`registry.errors` class with one line: a bad or unknown ref
:class:`NotFoundError` (exit 4), a file failing its checksum :class:`DataError` (exit 3), bad usage
:class:`ConfigError` (exit 2).

Modules, each depending only on those before it: :mod:`.refs` (REF to :class:`Version`), :mod:`.artifacts`
(the verified download cache), :mod:`.loading` (weights and tokenizer), :mod:`.console` (terminal streaming),
:mod:`.generate` (one answer), :mod:`.commands` (the ``generate``/``chat`` command bodies).
"""

from job.inference.artifacts import ARTIFACTS, COMPLETE_MARKER, cache_key, fetch_artifact
from job.inference.commands import BASE_REF, CHAT_STOP_WORDS, chat_command, check_text, generate_command, questions
from job.inference.console import CUT_OFF, SectionWriter, TokenStream
from job.inference.generate import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    MAX_SEED,
    Answer,
    Sampling,
    generate,
    split_completion,
    stop_ids,
)
from job.inference.loading import Loaded, load, load_base, unload
from job.inference.refs import Version, is_run_uri, resolve_ref

__all__ = [
    "ARTIFACTS", "BASE_REF", "CHAT_STOP_WORDS", "COMPLETE_MARKER", "CUT_OFF", "DEFAULT_MAX_NEW_TOKENS",
    "DEFAULT_TEMPERATURE", "DEFAULT_TOP_P", "MAX_SEED", "Answer", "Loaded", "Sampling",
    "SectionWriter", "TokenStream", "Version", "cache_key", "chat_command", "check_text", "fetch_artifact",
    "generate", "generate_command", "is_run_uri", "load", "load_base", "questions", "resolve_ref", "split_completion",
    "stop_ids", "unload",
]
