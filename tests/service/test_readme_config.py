"""The README's configuration table is the ``Settings`` class, row for row.

Every setting has a row with its flag, env var, default and description (the field's own
``description``, which is also the ``--help`` text). When a setting changes, print the table
to paste into README.md::

    .venv/bin/python -m tests.service.test_readme_config
"""

from __future__ import annotations

from pathlib import Path

from service.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"
HEADER = "| flag | env var | default | meaning |"

# Defaults shown in words where the value depends on the machine or reads better as typed.
SHOWN_DEFAULTS = {
    "model": "required (`make serve`: the demo model)",
    "preprocess_workers": "`cores, at most 8`",
    "api_workers": "`cores / 4, from 2 to 8 (1 on one core)`",
    "data_dir": "`./data`",
}


def shown_default(name: str) -> str:
    if name in SHOWN_DEFAULTS:
        return SHOWN_DEFAULTS[name]
    default = Settings.model_fields[name].get_default(call_default_factory=True)
    if default is None:
        return "`(unset)`"
    if default == []:
        return "`(empty)`"
    return f"`{default}`"


def expected_rows() -> list[str]:
    rows = [HEADER, "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        flag, env = "--" + name.replace("_", "-"), "LLAVE_" + name.upper()
        rows.append(f"| `{flag}` | `{env}` | {shown_default(name)} | {field.description} |")
    return rows


def readme_rows() -> list[str]:
    lines = README.read_text().splitlines()
    start = lines.index(HEADER)
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    return lines[start:end]


def test_every_setting_has_its_row_and_nothing_else():
    expected, found = expected_rows(), readme_rows()
    missing = [row for row in expected if row not in found]
    stale = [row for row in found if row not in expected]
    assert not missing and not stale, (
        "README.md's configuration table differs from Settings; regenerate it with "
        f"`python -m tests.service.test_readme_config`.\nmissing: {missing}\nstale: {stale}"
    )
    assert found == expected  # same order as the class (and --help)


def test_the_shown_defaults_are_the_real_ones():
    import os

    assert Settings.model_fields["model"].is_required()
    assert str(Settings(model="m").data_dir) == os.path.normpath(SHOWN_DEFAULTS["data_dir"].strip("`"))
    assert Settings(model="m").preprocess_workers == max(1, min(8, os.cpu_count() or 1))


if __name__ == "__main__":
    print("\n".join(expected_rows()))
