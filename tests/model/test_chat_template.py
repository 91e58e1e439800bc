"""The chat-template renderer (model/chat_template.py) behaves as transformers' does, feature by feature, and
fails with a message a client can act on."""

from __future__ import annotations

import pytest

from model.chat_template import ChatTemplateError, render
from tests.helpers import chat_tokenizer

transformers = pytest.importorskip("transformers", reason="transformers is the reference implementation")
from transformers.utils.chat_template_utils import render_jinja_template  # noqa: E402

MESSAGES = [{"role": "user", "content": "Café <b>&</b>"}, {"role": "assistant", "content": None, "reasoning": "hm"}]
FEATURES = {
    "tojson keeps order, no escaping": "{{ {'b': 1, 'a': messages[0].content} | tojson }}",
    "tojson options": "{{ messages[0] | tojson(indent=2, sort_keys=true) }}",
    "trim and lstrip blocks": "{% for m in messages %}\n  {% if m.content %}\n[{{ m.role }}]\n  {% endif %}\n"
    "{% endfor %}\n",
    "loop controls": "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.role }}{% endfor %}",
    "null fields left out": "{{ messages[1].content is defined }} {{ messages[1] | tojson }}",
    "reasoning aliased": "{{ messages[1].reasoning_content }} {{ messages[1].thinking }}",
    "tools and documents are None": "{{ tools }} {{ documents }} {{ add_generation_prompt }}",
    "special tokens and kwargs": "{{ bos_token }}|{{ eos_token }}|{{ custom }}",
    "namespace and dict": "{% set ns = namespace(n=0) %}{% set ns.n = ns.n + 2 %}{{ ns.n }} {{ dict(a=1) | tojson }}",
    "generation block": "{% generation %}{{ messages[0].role }}{% endgeneration %}",
}


@pytest.mark.parametrize("feature", list(FEATURES))
def test_feature_renders_as_transformers(feature):
    source = FEATURES[feature]
    kwargs = {"bos_token": "<s>", "eos_token": "</s>", "custom": 7}
    rendered, _ = render_jinja_template(
        [[{k: v for k, v in m.items() if v is not None} for m in MESSAGES]],
        chat_template=source,
        add_generation_prompt=True,
        **kwargs,
    )
    ours = render(
        source, MESSAGES, special_tokens={"bos_token": "<s>", "eos_token": "</s>"}, template_kwargs={"custom": 7}
    )
    assert ours == rendered[0]


def test_raise_exception_is_the_templates_own_message():
    with pytest.raises(ChatTemplateError, match="refused these messages: Conversation roles must alternate"):
        render("{{ raise_exception('Conversation roles must alternate') }}", MESSAGES)


def test_a_failing_template_names_the_error():
    with pytest.raises(ChatTemplateError, match=r"failed to render \(UndefinedError: .*has no attribute 'nope'"):
        render("{{ messages[0].nope.deeper }}", MESSAGES)
    with pytest.raises(ChatTemplateError, match="underscore-prefixed"):
        render("{% set ns = namespace(_secret=1) %}", MESSAGES)
    with pytest.raises(ChatTemplateError, match=r"does not parse \(line 1"):
        render("{% for m in messages %}", MESSAGES)


def test_named_templates_pick_tool_use_when_tools_are_given():
    """transformers' rule for tokenizer_config's list of templates (Hermes ships `default` and `tool_use`)."""
    tok = chat_tokenizer("bamba")
    tok.config["chat_template"] = [{"name": "default", "template": "plain"}, {"name": "tool_use", "template": "tools"}]
    tok = type(tok)(tok.tokenizer, tok.config)
    assert tok.apply_chat_template(MESSAGES) == "plain"
    assert tok.apply_chat_template(MESSAGES, tools=[{"type": "function"}]) == "tools"


def test_chat_template_file_wins_over_the_config(tmp_path):
    tok = chat_tokenizer("qwen3")
    tok.save(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("from the file: {{ messages | length }}")
    assert type(tok).from_dir(tmp_path).apply_chat_template(MESSAGES) == "from the file: 2"
