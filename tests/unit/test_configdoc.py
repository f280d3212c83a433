"""docs/configuration.md is generated from the handlers and must not go stale."""
from mmfuse import configdoc
from mmfuse.cli import main
from tests.paths import REPO_ROOT


def test_every_key_a_handler_reads_is_described_and_every_described_key_is_read():
    assert configdoc.problems() == []


def test_the_configuration_page_is_up_to_date():
    page = REPO_ROOT / "docs" / "configuration.md"
    assert page.read_text() == configdoc.render(), "docs/configuration.md is stale: run `mmfuse config-docs`"
    assert main(["config-docs", "--check", "--out", str(page)]) == 0


def test_recorded_facts_come_from_the_parsing():
    keys = configdoc.record("image_preprocess")
    assert keys["decode_threads"].kind == "int" and keys["decode_threads"].allowed == "1 to 64"
    assert keys["model_name"].required
    fusion = configdoc.record("fusion")
    assert fusion["strategy"].allowed == "late \\| early \\| hybrid \\| attention" and fusion["strategy"].default == "late"
