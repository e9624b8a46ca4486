"""Every setting is documented once: the README's table is the one generated from Settings."""

from pathlib import Path

import pytest
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from recommender import cli
from recommender.settings import Settings, settings_table

README = Path(__file__).resolve().parents[1] / "README.md"
START = "<!-- settings:start -->"
END = "<!-- settings:end -->"
REGENERATE = (
    f"regenerate it: run `recommender config` and put its output between {START} and {END} "
    "in README.md"
)


def _readme_table() -> str:
    text = README.read_text()
    assert text.count(START) == 1 and text.count(END) == 1, (
        f"README.md must hold exactly one {START} ... {END} block; {REGENERATE}"
    )
    return text.split(START)[1].split(END)[0].strip()


def _config_command_output(capsys: pytest.CaptureFixture[str]) -> str:
    assert cli.main(["config"]) == 0
    return capsys.readouterr().out


def test_every_setting_has_a_description() -> None:
    undocumented = [
        name for name, field in Settings.model_fields.items() if not (field.description or "")
    ]

    assert undocumented == [], (
        f"settings without a description: {', '.join(undocumented)}; give each Field a "
        f"description=, then {REGENERATE}"
    )


def test_readme_table_is_the_one_generated_from_settings(
    capsys: pytest.CaptureFixture[str],
) -> None:
    generated = _config_command_output(capsys)

    assert _readme_table() == generated.strip(), (
        f"README.md's settings table is stale; {REGENERATE}"
    )


def test_table_has_one_row_per_setting_naming_its_variable_and_default() -> None:
    rows = settings_table().splitlines()[2:]

    variables = [row.split(" | ")[0].removeprefix("| ") for row in rows]
    assert variables == [f"`RECOMMENDER_{name.upper()}`" for name in Settings.model_fields]
    assert "| `RECOMMENDER_PORT` |  | `8000` | Port the HTTP server binds to. |" in rows
    assert any(row.startswith("| `RECOMMENDER_METRICS_DIR` |  | unset |") for row in rows)


def test_config_command_shows_the_defaults_whatever_the_environment_says(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RECOMMENDER_PORT", "9999")

    output = _config_command_output(capsys)

    assert "| `RECOMMENDER_PORT` | `--port` | `8000` |" in output
    assert "9999" not in output


def test_config_command_names_the_options_of_any_subcommand_that_set_a_setting(
    capsys: pytest.CaptureFixture[str],
) -> None:
    output = _config_command_output(capsys)

    assert "| `RECOMMENDER_DATA_DIR` | `--data-dir` | `data` |" in output
    assert "| `RECOMMENDER_DATABASE_URL` | `--database-url` | unset |" in output


def test_a_setting_without_a_description_is_refused_by_name() -> None:
    class Undocumented(Settings):
        hidden_knob: int = 3

    with pytest.raises(ValueError, match="'hidden_knob' has no description"):
        settings_table(settings=Undocumented)


def test_descriptions_cannot_break_the_table_or_hide_placeholders() -> None:
    class Awkward(BaseSettings):
        model_config = SettingsConfigDict(env_prefix="EXAMPLE_")

        path: str = Field("x", description="one | two,\n <model file>.sha256 beside `a|<b>`")

    row = settings_table(settings=Awkward).splitlines()[2]

    assert row == (
        "| `EXAMPLE_PATH` |  | `x` | one \\| two, &lt;model file&gt;.sha256 beside `a\\|<b>` |"
    )
