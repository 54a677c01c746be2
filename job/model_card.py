"""The model card: each published artifact's README.md, written after the export and before publishing.

Front matter the Hugging Face Hub reads (base model, datasets, library, the benchmark scores as ``model-index``),
what the model is and where it came from, the recipe, metrics, loss curve, benchmarks, where the alias gate is
expected to leave each alias, answers before and after training, and its limits. Nothing in a card keeps a
URL's credentials (:func:`registry.redact.redact_text`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from job.config import JobConfig
from registry.precheck import UNNUMBERED, AliasOutlook
from registry.redact import printable, redact_text


def _hub_id(uri: str | None) -> str | None:
    """``org/name`` for an ``hf://`` URI: the only kind of name the Hub's card metadata can link to."""
    return uri.removeprefix("hf://").strip("/") if uri and uri.startswith("hf://") else None


def _model_index(name: str, after: dict[str, Any]) -> list[dict[str, Any]]:
    """The benchmark scores after training in the Hub's evaluation-results format (``model-index``), so the
    Hub shows them on the model page: accuracy in percent, one result per benchmark, not verified by the Hub."""
    from job.medical_benchmarks import BENCHMARKS

    results = []
    for bench, score in after.items():
        if not isinstance(score, dict) or not isinstance(score.get("accuracy"), (int, float)):
            continue
        spec = BENCHMARKS.get(bench)
        dataset: dict[str, Any] = {"name": spec.title if spec else bench, "type": spec.dataset if spec else bench}
        if spec is not None:
            dataset["split"] = spec.split
            if spec.subset:
                dataset["config"] = spec.subset
        if score.get("revision"):
            dataset["revision"] = score["revision"]
        results.append({"task": {"type": "text-generation", "name": "Medical multiple-choice QA (generative)"},
                        "dataset": dataset,
                        "metrics": [{"type": "accuracy", "value": round(100 * score["accuracy"], 2),
                                     "name": f"accuracy (greedy, {score.get('scored', '?')} questions, "
                                             f"{score.get('max_new_tokens', '?')} new tokens)",
                                     "verified": False}]})
    return [{"name": name, "results": results}] if results else []


def card_front_matter(cfg: JobConfig, lineage: dict[str, Any], metrics: dict[str, Any], artifact: str) -> str:
    """The card's YAML front matter, as the Hugging Face Hub reads it: ``base_model`` (the Hub id of the base,
    or for the merged weights of ``model.merge_base`` when set; only for an ``hf://`` one) with its relation,
    ``datasets`` (an ``hf://`` training set), ``library_name`` (``peft`` for the adapter, ``transformers`` for
    the merged weights), ``pipeline_tag`` and the benchmark scores as ``model-index``."""
    import yaml

    meta: dict[str, Any] = {"license": "apache-2.0"}
    # The merged weights come from model.merge_base when there is one (a pre-quantized base cannot be merged into).
    source = lineage.get("merge_base") if artifact == "merged" and lineage.get("merge_base") else lineage["base_model"]
    base = _hub_id(source.get("uri"))
    if base:
        meta["base_model"] = base
        meta["base_model_relation"] = "adapter" if artifact == "adapter" else "finetune"
    dataset = _hub_id(lineage["dataset"].get("source"))
    if dataset:
        meta["datasets"] = [dataset]
    meta["library_name"] = "peft" if artifact == "adapter" else "transformers"
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = ["medical", "reasoning", "lora", "medft"]
    index = _model_index(cfg.output.model_name, metrics.get("benchmarks_after") or {})
    if index:
        meta["model-index"] = index
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---"


def _merged_into(merge_base: dict[str, Any] | None) -> str:
    """The card's sentence on ``model.merge_base``: the 16-bit weights the adapter was merged into, when those
    are not the base it trained on."""
    if not merge_base:
        return ""
    return (f" The merged weights are the adapter merged into `{merge_base['uri']}` (revision "
            f"`{merge_base.get('revision') or 'unpinned'}`).")


def model_card(cfg: JobConfig, lineage: dict[str, Any], metrics: dict[str, Any],
               answers: dict[str, list[dict[str, str]]], *, loss_image: str | None = None,
               loss_series: str | None = None, artifact: str = "merged",
               aliases: Sequence[AliasOutlook] = ()) -> str:
    """An artifact's README.md (``artifact``: ``adapter`` or ``merged``): front matter the Hub reads
    (:func:`card_front_matter`), what it is, where it came from, how it scored, where its aliases are expected
    to point (:func:`alias_section`), and its limits.

    ``loss_image`` (and ``loss_series``, the plotted numbers) name files beside the card
    (:mod:`job.loss_curve`), shown under "Loss curve".
    """
    base, data = lineage["base_model"], lineage["dataset"]
    lines = [
        card_front_matter(cfg, lineage, metrics, artifact), "",
        f"# {cfg.output.model_name}", "",
        f"A LoRA fine-tune of `{base['uri']}` (revision `{base.get('revision') or 'unpinned'}`) for step-by-step "
        "medical reasoning, trained and merged by medft. The model reasons inside `<think>...</think>` and then "
        "answers." + _merged_into(lineage.get("merge_base")), "",
        "**Not medical advice.** This model is a research artifact. Its answers can be wrong, incomplete or "
        "out of date and must not be used to diagnose or treat anyone.", "",
        "## Training data", "",
        f"- source: `{data['source']}`" + "".join(f", {key} `{data[key]}`" for key in ("subset", "split")
                                                 if data.get(key) is not None),
        f"- rows used: {data['rows']}, content sha256 `{data['content_sha256']}`", "",
        "## Recipe", "", "```yaml", cfg.to_yaml().strip(), "```", "",
        "## Metrics", "", "| metric | value |", "| --- | --- |",
    ]
    for key, value in metrics.items():
        if isinstance(value, (int, float, str)) or (value is None and not key.startswith("benchmarks_")):
            lines.append(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |")
    if loss_image:
        lines += ["", "## Loss curve", "", f"![Train and eval loss per step]({loss_image})", "",
                  "Train loss at every logged step (`train.logging_steps`). Eval loss on the held-out rows is "
                  "measured only before training (step 0) and after it (the last step): the two points."
                  + (f" The plotted numbers are in [`{loss_series}`]({loss_series})." if loss_series else "")]
    lines += benchmark_section(metrics.get("benchmarks_before") or {}, metrics.get("benchmarks_after") or {})
    lines += alias_section(cfg.output.model_name, aliases)
    lines += ["", "## Answers before and after fine-tuning (greedy)", ""]
    for before, after in zip(answers.get("before", []), answers.get("after", [])):
        lines += [f"**Question:** {before['question']}", "", "Before:", "", "```", before["output"].strip(), "```",
                  "", "After:", "", "```", after["output"].strip(), "```", ""]
    if cfg.export.gguf:
        name, first = cfg.output.model_name, cfg.export.gguf[0]
        lines += ["## Run it locally (GGUF)", "",
                  "The `gguf` artifact holds " + ", ".join(f"`{name}-{t}.gguf`" for t in cfg.export.gguf) + ", each "
                  "with an Ollama Modelfile beside it whose template is the prompt this model was trained with:", "",
                  "```", f"ollama create {name} -f {name}-{first}.Modelfile", f"ollama run {name}", "```", ""]
    lines += ["## License", "", "Apache-2.0 for this adapter and card; the base model's own license applies to "
              "the merged weights.", ""]
    return redact_text("\n".join(lines))  # a card is public: no URL in it keeps its credentials


def benchmark_section(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """The card's benchmark table: accuracy with its 95% interval before and after training, and the
    questions scored, then the protocol they were scored under; no lines when no benchmark was scored."""
    from registry.compare import format_score, protocol_text

    names = list(dict.fromkeys([*before, *after]))
    if not names:
        return []
    lines = ["", "## Benchmarks (generative; accuracy [95% interval])", "",
             "| benchmark | before | after | questions | hit token limit (after) |", "| --- | --- | --- | --- | --- |"]
    for name in names:
        b, a = before.get(name) or {}, after.get(name) or {}
        scored = a.get("scored", b.get("scored", "-"))
        hit = f"{a['hit_limit_share']:.1%}" if isinstance(a.get("hit_limit_share"), (int, float)) else "-"
        lines.append(f"| {name} | {format_score(b)} | {format_score(a)} | {scored} | {hit} |")
    first = after.get(names[0]) or before.get(names[0]) or {}
    limit = first.get("max_new_tokens")
    if limit:
        lines += ["", f"At most {limit} new tokens per answer, {protocol_text(first)}; a subset, when limited, is the "
                  "same seeded one for every model (`medft eval --limit`)."]
    return lines


def alias_section(name: str, aliases: Sequence[AliasOutlook]) -> list[str]:
    """The card's "Aliases" section: for each alias of ``output.aliases`` (as :func:`registry.precheck.
    expected_aliases` judged it), whether registration is expected to point it at this version, or the gate
    keeps it where it is and why; no lines without aliases.

    The card is written before registration and says so: registration runs the gate again, and its output and
    the version's record are what happened.
    """
    if not aliases:
        return []
    lines = ["", "## Aliases", "",
             "Expected at the time the card was written, before this version was registered (`output.aliases`). "
             "Registration runs the benchmark gate again and decides otherwise if an alias moved meanwhile: where "
             f"they differ, what the job printed and the version's record (`medft registry show {name}:{UNNUMBERED}`, "
             f"`alias_refusals`) are authoritative. {name}:{UNNUMBERED} is this version, numbered at registration.",
             ""]
    for outlook in aliases:
        now = "unset" if outlook.holder is None else f"at version {outlook.holder}"
        gate = f" (protected: {', '.join(outlook.require)})" if outlook.require else ""
        head = f"- `{name}@{outlook.alias}`{gate}: "
        if outlook.unchecked is not None:
            lines.append(head + f"not known (it is {now} now); the gate could not be checked before publishing: "
                         + printable(outlook.unchecked))
        elif outlook.refusal is not None:
            lines.append(head + f"stays {now}; the gate refuses this version: " + printable(outlook.refusal))
        else:
            lines.append(head + f"expected to move to this version (it is {now} now)"
                         + ("; it passes the gate" if outlook.require else ""))
    return lines
