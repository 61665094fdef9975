"""The model catalogue: card parsing, semver ordering and resolution, listing."""

from __future__ import annotations

import textwrap

import pytest

from zoo.catalog.cards import Catalog, CatalogError, Metric, Version, VersionSpec, get_card, list_models, parse_card

SHA = "ab" * 32


def _card(directory, stem, name="tiny-moe", version="1.0.0", task_family="text", extra="", **fields):
    body = {
        "name": name,
        "version": version,
        "task_family": task_family,
        "description": "A tiny MoE.",
        "license": "apache-2.0",
        "config": "{lm: {hidden_size: 32}, moe: {num_experts: 4}}",
        "uri": f"https://example.org/{name}-{version}.tar",
        "sha256": SHA,
    }
    body.update(fields)
    lines = [f"{k}: {v}" for k, v in body.items() if v is not None]
    path = directory / f"{stem}.md"
    path.write_text("---\n" + "\n".join(lines) + "\n" + extra + "---\n# Card\nProse.\n")
    return path


def test_parse_a_full_card(tmp_path):
    path = _card(
        tmp_path, "a", recipe="configs/recipes/tiny.yaml", output="lora-vqa", base_components="[qwen2-tiny, vit-tiny]",
        extra=textwrap.dedent(
            """\
            metrics:
              - {name: accuracy, value: 0.75, command: "zoo eval tiny-moe --task digits", dataset: sklearn-digits}
            """
        ),
    )
    card = parse_card(path)
    assert card.ref == "tiny-moe@1.0.0"
    assert card.config == {"lm": {"hidden_size": 32}, "moe": {"num_experts": 4}}
    assert card.metrics[0].value == 0.75 and card.metrics[0].command.startswith("zoo eval")
    assert card.base_components == ("qwen2-tiny", "vit-tiny")
    assert card.output == "lora-vqa" and card.resolve_path(card.recipe) == tmp_path.parent / "configs/recipes/tiny.yaml"
    assert card.sha256 == SHA and card.path == path
    assert card.body == "# Card\nProse.\n"


@pytest.mark.parametrize(
    "fields, extra, message",
    [
        ({"licence": "mit"}, "", r"unknown field\(s\) \['licence'\]"),
        ({"license": None}, "", r"missing required field\(s\) \['license'\]"),
        ({"version": "1.2"}, "", "'version' must be a semantic version like 1.2.0, got 1.2"),
        ({"version": "v1.2.0"}, "", "'v1.2.0' is not a semantic version"),
        ({"sha256": SHA[:16]}, "", "full 64-hex-digit digest"),
        ({"sha256": None}, "", r"http\(s\) 'uri' needs the file's 'sha256'"),
        ({"uri": None, "sha256": None}, "", "needs a 'uri' to download from or a 'recipe'"),
        ({"name": "Tiny MoE"}, "", "field 'name'='Tiny MoE' must match"),
        ({}, "metrics:\n  - {name: acc, value: 0.5}\n", r"metrics\[0\] \('acc'\) has no 'command'"),
        ({}, "metrics:\n  - {name: acc, value: high, command: x}\n", "value must be a number"),
        ({}, "metrics:\n  acc: 0.5\n", "as a mapping must be name -> "),
        ({}, "metrics:\n  acc: {value: 0.5}\n", r"metrics\[0\] \('acc'\) has no 'command'"),
        ({"recipe": "configs/recipes/tiny.yaml"}, "", "needs 'output': the recipe output it releases"),
        ({"output": "lora-vqa"}, "", "'output' names a recipe output but the card has no 'recipe'"),
    ],
)
def test_bad_cards_name_the_file_and_field(tmp_path, fields, extra, message):
    path = _card(tmp_path, "bad", extra=extra, **fields)
    with pytest.raises(CatalogError, match=message) as info:
        parse_card(path)
    assert str(path) in str(info.value)


def test_metrics_as_mapping_or_empty(tmp_path):
    card = parse_card(_card(tmp_path, "m", extra='metrics:\n  accuracy: {value: 0.9, command: "zoo eval x"}\n'))
    assert card.metrics == (Metric("accuracy", 0.9, "zoo eval x"),)
    assert parse_card(_card(tmp_path, "e", extra="metrics: {}\n")).metrics == ()


def test_front_matter_must_be_delimited(tmp_path):
    (tmp_path / "x.md").write_text("name: x\n")
    with pytest.raises(CatalogError, match="must start with a '---' line"):
        parse_card(tmp_path / "x.md")
    (tmp_path / "y.md").write_text("---\nname: x\n")
    with pytest.raises(CatalogError, match="not closed"):
        parse_card(tmp_path / "y.md")


def test_semver_precedence_is_numeric_not_string():
    order = ["0.9.0", "1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta.2", "1.0.0-beta.11",
             "1.0.0-rc.1", "1.0.0", "1.2.0", "1.10.0", "2.0.0"]
    versions = [Version.parse(v) for v in order]
    assert sorted(reversed(versions)) == versions
    assert Version.parse("1.10.0") > Version.parse("1.9.0")  # "1.10.0" < "1.9.0" as strings
    assert Version.parse("1.0.0+build.5") == Version.parse("1.0.0")
    assert str(Version.parse("1.0.0-rc.1+b7")) == "1.0.0-rc.1+b7"
    for bad in ("1.0", "01.0.0", "1.0.0-", "1.0.0-01", "latest"):
        with pytest.raises(CatalogError):
            Version.parse(bad)


@pytest.mark.parametrize(
    "spec, allowed, refused",
    [
        ("^1.0", ["1.0.0", "1.2.0", "1.10.3"], ["0.9.9", "2.0.0", "1.3.0-rc.1"]),
        ("^1", ["1.0.0", "1.99.0"], ["2.0.0"]),
        ("^0.2", ["0.2.0", "0.2.9"], ["0.3.0", "0.1.9"]),
        ("^0.0.3", ["0.0.3"], ["0.0.4", "0.0.2"]),
        ("~1.2", ["1.2.0", "1.2.7"], ["1.3.0", "1.1.9"]),
        ("1.2.0", ["1.2.0"], ["1.2.1", "1.20.0"]),
        ("1.3.0-rc.1", ["1.3.0-rc.1"], ["1.3.0"]),
    ],
)
def test_version_specs(spec, allowed, refused):
    s = VersionSpec.parse(spec)
    assert all(s.allows(Version.parse(v)) for v in allowed)
    assert not any(s.allows(Version.parse(v)) for v in refused)


@pytest.fixture
def cards(tmp_path):
    for i, v in enumerate(["1.0.0", "1.2.0", "1.10.0", "2.0.0-rc.1", "0.9.0"]):
        _card(tmp_path, f"tiny-{i}", version=v)
    _card(tmp_path, "audio", name="audio-moe", version="0.1.0", task_family="audio-text")
    _card(tmp_path, "pre", name="preview-moe", version="0.1.0-alpha", task_family="text")
    (tmp_path / "README.md").write_text("not a card\n")
    return tmp_path


def test_resolution(cards):
    reg = Catalog.from_dir(cards)
    assert [str(v) for v in reg.versions("tiny-moe")] == ["0.9.0", "1.0.0", "1.2.0", "1.10.0", "2.0.0-rc.1"]
    assert str(reg.get("tiny-moe").version) == "1.10.0"  # newest release, not the rc, not "1.2.0" > "1.10.0"
    assert str(reg.get("tiny-moe", "^1.0").version) == "1.10.0"
    assert str(reg.get("tiny-moe", "~1.2").version) == "1.2.0"
    assert str(reg.get("tiny-moe", "1.0.0").version) == "1.0.0"
    assert str(reg.get("tiny-moe@2.0.0-rc.1").version) == "2.0.0-rc.1"
    assert str(get_card("tiny-moe", "^0.9", cards_dir=cards).version) == "0.9.0"


def test_resolution_errors(cards):
    reg = Catalog.from_dir(cards)
    with pytest.raises(CatalogError, match=r"unknown model 'tiny-mo'; did you mean \['tiny-moe'\]"):
        reg.get("tiny-mo")
    with pytest.raises(CatalogError, match=r"no version of 'tiny-moe' satisfies version '\^3.0'; available: 0.9.0, 1.0.0"):
        reg.get("tiny-moe", "^3.0")
    with pytest.raises(CatalogError, match="satisfies a release; available: 0.1.0-alpha"):
        reg.get("preview-moe")
    with pytest.raises(CatalogError, match="neither an exact version"):
        reg.get("tiny-moe", "1.2")


def test_duplicate_versions_are_refused(tmp_path):
    a = _card(tmp_path, "a", version="1.0.0")
    b = _card(tmp_path, "b", version="1.0.0+other")  # build metadata does not make a new version
    with pytest.raises(CatalogError, match=rf"tiny-moe@1.0.0(\+other)? is defined twice: in {a} and {b}"):
        Catalog.from_dir(tmp_path)


def test_list_models(cards, monkeypatch):
    refs = [c.ref for c in list_models(cards_dir=cards)]
    assert refs == ["audio-moe@0.1.0", "preview-moe@0.1.0-alpha", "tiny-moe@1.10.0"]
    assert [c.name for c in list_models("TINY-*", cards_dir=cards)] == ["tiny-moe"]
    assert [c.name for c in list_models(task_family="audio-text", cards_dir=cards)] == ["audio-moe"]
    assert len(list_models("tiny-*", all_versions=True, cards_dir=cards)) == 5
    monkeypatch.setenv("ZOO_MODEL_CARDS", str(cards))
    assert len(list_models()) == 3
    with pytest.raises(CatalogError, match=r"model cards directory .*missing' \(--cards-dir\) does not exist"):
        list_models(cards_dir=cards / "missing")  # a typo in the folder is an error, not an empty catalogue
