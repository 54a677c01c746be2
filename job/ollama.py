"""The prompt a GGUF is asked with: an Ollama Modelfile per file, and the chat template stored inside it.

Both render exactly the prompt the model was trained with (:meth:`job.templates.Template.prompt`: the
instruction text, the question, the response header and the opening ``<think>``). The prompt is split once
around the question (:func:`prompt_parts`); the Modelfile's ``TEMPLATE`` is then ``head{{ .Prompt }}tail``
with no conditionals, so Ollama's substitution of the question is the whole rendering, and the tests fill it
in the same way for real rows. BOS is not in the text when training's tokenizer added it by itself: the
GGUF's ``tokenizer.ggml.add_bos_token`` says so and llama.cpp (and so Ollama) adds it the same way.

Sampling: DeepSeek's advice for R1 models, temperature 0.6 and top-p 0.95; generation stops at the
tokenizer's EOS.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from job.templates import Template, eos_token
from registry.errors import ConfigError

#: DeepSeek's advised sampling for DeepSeek-R1 and its distilled models.
R1_TEMPERATURE, R1_TOP_P = 0.6, 0.95
_MARKERS = ("MEDFTQUESTIONMARKERA", "MEDFTQUESTIONMARKERB")


@dataclass(frozen=True)
class PromptParts:
    """The training prompt around the question: ``head + question + tail``; ``add_bos`` when the tokenizer's
    BOS goes in front (it is then not in ``head``); ``eos``: the text generation stops at."""

    head: str
    tail: str
    add_bos: bool
    eos: str

    def render(self, question: str) -> str:
        return self.head + question + self.tail


def prompt_parts(template: Template, tokenizer: Any) -> PromptParts:
    """Split ``template``'s prompt around the question; ConfigError when the question is not simply inserted
    (a chat template that rewrites it) or the tokenizer's prefix is not its BOS token."""
    rendered = [template.prompt(marker, tokenizer) for marker in _MARKERS]
    parts = [text.split(marker) for text, marker in zip(rendered, _MARKERS)]
    if any(len(p) != 2 for p in parts) or parts[0] != parts[1]:
        raise ConfigError(f"data.template={template.name}: the prompt does not hold the question as written, "
                          "so no Ollama template can render it; set export.gguf=[]")
    prefix = template.prefix_ids(tokenizer)
    if prefix and prefix != [tokenizer.bos_token_id]:
        raise ConfigError(f"data.template={template.name}: the tokenizer puts {prefix} before a prompt, not only "
                          "its BOS token, which GGUF cannot say; set export.gguf=[]")
    head, tail = parts[0]
    return PromptParts(head=head, tail=tail, add_bos=bool(prefix), eos=eos_token(tokenizer))


def _literal(text: str, where: str, forbidden: tuple[str, ...]) -> str:
    for bad in forbidden:
        if bad in text:
            raise ConfigError(f"{where}: the training prompt contains {bad!r}, which that template syntax would "
                              "read as markup; set export.gguf=[]")
    return text


def go_template(parts: PromptParts) -> str:
    """Ollama's ``TEMPLATE``: ``head{{ .Prompt }}tail``, nothing else."""
    where = "Ollama TEMPLATE"
    return (_literal(parts.head, where, ("{{", '"""')) + "{{ .Prompt }}"
            + _literal(parts.tail, where, ("{{", '"""')))


def fill_go_template(template: str, prompt: str) -> str:
    """What Ollama renders from :func:`go_template` for one question (the only action it holds)."""
    return template.replace("{{ .Prompt }}", prompt, 1)


def chat_template(template: Template, tokenizer: Any, parts: PromptParts) -> str:
    """The Jinja chat template stored in the GGUF: the model's own for ``data.template=chat`` (what it was
    trained with), else every user turn rendered as the training prompt and every assistant turn followed
    by EOS."""
    if template.name == "chat":
        return str(tokenizer.chat_template)
    where, markup = "GGUF chat template", ("{{", "{%", "{#", "%}", "}}", "#}")
    # No whitespace control ('{%-'): the prompt's own newlines are part of it.
    return ("{% for message in messages %}{% if message['role'] == 'user' %}"
            + _literal(parts.head, where, markup) + "{{ message['content'] }}" + _literal(parts.tail, where, markup)
            + "{% elif message['role'] == 'assistant' %}{{ message['content'] }}" + _literal(parts.eos, where, markup)
            + "{% endif %}{% endfor %}")


def modelfile(gguf_name: str, parts: PromptParts, *, model_name: str, template_name: str) -> str:
    """An Ollama Modelfile for the GGUF file ``gguf_name`` lying beside it."""
    if '"' in parts.eos or "\n" in parts.eos:
        raise ConfigError(f"the EOS token {parts.eos!r} cannot be written as an Ollama stop parameter; "
                          "set export.gguf=[]")
    return "\n".join([
        f"# {model_name}: written by medft. TEMPLATE is the prompt the model was trained with "
        f"(data.template={template_name}); sampling as DeepSeek advises for R1 models.",
        f"FROM ./{gguf_name}",
        f'TEMPLATE """{go_template(parts)}"""',
        f'PARAMETER stop "{parts.eos}"',
        f"PARAMETER temperature {R1_TEMPERATURE}",
        f"PARAMETER top_p {R1_TOP_P}",
        "",
    ])


def write_modelfile(gguf_path: Path, parts: PromptParts, *, model_name: str, template_name: str) -> Path:
    """Write ``<gguf stem>.Modelfile`` beside ``gguf_path``; returns its path."""
    path = gguf_path.with_suffix(".Modelfile")
    path.write_text(modelfile(gguf_path.name, parts, model_name=model_name, template_name=template_name),
                    encoding="utf-8")
    return path
