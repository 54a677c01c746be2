"""``output.tags`` and ``output.description``: set in the training config, stored with the registered version."""

import pytest

from job.config import load_config
from registry.errors import ConfigError


def test_tags_and_description_come_from_the_config(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("output:\n  tags: {team: cardio, dataset: v3}\n  description: the cardiology run\n")
    cfg = load_config(str(path), [])
    assert cfg.output.tags == {"team": "cardio", "dataset": "v3"} and cfg.output.description == "the cardiology run"


@pytest.mark.parametrize(("yaml", "needle"), [
    ("output:\n  tags: {'': x}\n", "output.tags"),
    ("output:\n  tags: [a, b]\n", "output.tags"),
    ("output:\n  aliases: [base]\n", "alias 'base' is reserved"),
])
def test_bad_tags_and_reserved_aliases_are_refused_at_load(tmp_path, yaml, needle):
    path = tmp_path / "job.yaml"
    path.write_text(yaml)
    with pytest.raises(ConfigError, match=needle):
        load_config(str(path), [])
