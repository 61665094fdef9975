"""The model catalogue: `model_cards/*.md` (YAML front matter + prose) -> typed, versioned cards.

A card is the single source of truth for one released checkpoint::

    ---
    name: moe-llava-tiny
    version: 1.2.0                 # semver
    task_family: image-text        # free-form slug; the zoo's families are listed in the README
    description: One line.
    license: apache-2.0
    config: {...}                  # the model config (a mapping) or a path to a config file
    uri: https://... | hf://org/repo@rev | file://...   # and/or `recipe:` for checkpoints we build
    sha256: <64 hex digits>        # required for http(s) files
    recipe: configs/recipes/x.yaml # how `zoo build` makes it (relative to the folder holding model_cards/)
    output: lora-vqa               # which of the recipe's outputs this card releases
    base: moe-llava-tiny@^1.2      # only for an expert adapter (ESFT): the card of the model it applies to
    base_components: [Qwen2-0.5B, ...]
    metrics:
      - {name: accuracy, value: 0.71, command: "zoo eval CHECKPOINT --family x", dataset: x}
    ---

`metrics` may also be a mapping `name: {value, command[, dataset]}`, and `{}` (or `[]`) while
nothing has been measured yet (built checkpoints get their measured metrics in the installed copy
of the card). A figure measured over several seeds (`zoo experiment`, written by `zoo report
--cards`) is their mean and also has `seeds: [0, 1, 2]` and `interval: [low, high]` (95% Student t).
    Prose...

A card with a `base` releases an expert adapter (`zoo.io.expert_adapter`), not a whole model: what
it installs is the adapter alone (the selected experts' rows), and `zoo.load` loads the base card's
model, checks that it is the base the adapter was made from, and applies the adapter.

Versions are compared as semver (numbers as numbers, pre-releases before releases), never as
strings. A version request is None (the newest release), an exact version ("1.2.0"), a caret
range ("^1.0": >=1.0.0, <2.0.0; for 0.x the minor is the breaking part), or a tilde range
("~1.2": >=1.2.0, <1.3.0).
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from zoo.io.names import check_name

CARD_FIELDS = frozenset(
    {"name", "version", "task_family", "description", "license", "config", "uri", "sha256", "recipe",
     "output", "base", "base_components", "metrics"}
)
REQUIRED_FIELDS = ("name", "version", "task_family", "description", "license", "config")
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]*")
_SLUG_RE = re.compile(r"[a-z0-9][a-z0-9_-]*")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_SEMVER_RE = re.compile(
    r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[A-Za-z-][0-9A-Za-z-]*)(?:\.(?:0|[1-9]\d*|\d*[A-Za-z-][0-9A-Za-z-]*))*))?"
    r"(?:\+([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?"
)


class CatalogError(Exception):
    """A card is malformed, a name is unknown, or no version satisfies a request."""


@functools.total_ordering
@dataclass(frozen=True)
class Version:
    """A semantic version (semver 2.0.0); ordered by semver precedence.

    Attributes:
        major, minor, patch: the numeric core.
        prerelease: dot-separated identifiers after `-` (numbers as ints), empty for a release.
        build: metadata after `+`; ignored in comparisons, as semver says.
    """

    major: int
    minor: int
    patch: int
    prerelease: tuple[int | str, ...] = ()
    build: str = field(default="", compare=False)

    @classmethod
    def parse(cls, text: str) -> Version:
        """Parse `MAJOR.MINOR.PATCH[-PRERELEASE][+BUILD]`; anything else is an error."""
        m = _SEMVER_RE.fullmatch(str(text).strip())
        if not m:
            raise CatalogError(f"{text!r} is not a semantic version MAJOR.MINOR.PATCH (e.g. '1.2.0')")
        pre = tuple(int(p) if p.isdigit() else p for p in m.group(4).split(".")) if m.group(4) else ()
        return cls(int(m.group(1)), int(m.group(2)), int(m.group(3)), pre, m.group(5) or "")

    @property
    def is_prerelease(self) -> bool:
        return bool(self.prerelease)

    def _key(self) -> tuple:
        # A release sorts after its pre-releases; numeric identifiers sort before alphanumeric ones.
        pre = tuple((0, p, "") if isinstance(p, int) else (1, 0, p) for p in self.prerelease)
        return (self.major, self.minor, self.patch, 1 if not pre else 0, pre)

    def __lt__(self, other: Version) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._key() < other._key()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __str__(self) -> str:
        text = f"{self.major}.{self.minor}.{self.patch}"
        if self.prerelease:
            text += "-" + ".".join(map(str, self.prerelease))
        return text + (f"+{self.build}" if self.build else "")


@dataclass(frozen=True)
class VersionSpec:
    """A version request: exact, caret (`^`), tilde (`~`), or None for the newest release.

    Attributes:
        text: the request as written (None: newest release).
        lower: smallest allowed version (inclusive), None when unbounded.
        upper: first version not allowed (exclusive), None when unbounded.
        exact: the one allowed version for an exact request.
    """

    text: str | None
    lower: Version | None = None
    upper: Version | None = None
    exact: Version | None = None

    @classmethod
    def parse(cls, text: str | None) -> VersionSpec:
        """Parse None, "1.2.0", "^1.0", "^1", "~1.2" or "~1.2.3"."""
        if text is None:
            return cls(None)
        text = str(text).strip()
        if text[:1] in ("^", "~"):
            parts = text[1:].split(".")
            if not 1 <= len(parts) <= 3 or not all(p.isdigit() for p in parts):
                raise CatalogError(f"version range {text!r} must look like ^1, ^1.2, ^1.2.3, ~1.2 or ~1.2.3")
            nums = [int(p) for p in parts] + [0] * (3 - len(parts))
            lower = Version(*nums)
            if text[0] == "^":  # the left-most non-zero component given may not change
                if nums[0] > 0 or len(parts) == 1:
                    upper = Version(nums[0] + 1, 0, 0)
                elif nums[1] > 0 or len(parts) == 2:
                    upper = Version(0, nums[1] + 1, 0)
                else:
                    upper = Version(0, 0, nums[2] + 1)
            else:  # tilde: patch-level changes if a minor is given, else minor-level
                upper = Version(nums[0], nums[1] + 1, 0) if len(parts) >= 2 else Version(nums[0] + 1, 0, 0)
            return cls(text, lower=lower, upper=upper)
        try:
            exact = Version.parse(text)
        except CatalogError:
            raise CatalogError(
                f"version request {text!r} is neither an exact version like '1.2.0' nor a range like '^1.0' or '~1.2'"
            ) from None
        return cls(text, exact=exact)

    def allows(self, version: Version) -> bool:
        """Whether `version` satisfies the request (pre-releases only by an exact request)."""
        if self.exact is not None:
            return version == self.exact
        if version.is_prerelease:
            return False
        return (self.lower is None or version >= self.lower) and (self.upper is None or version < self.upper)


@dataclass(frozen=True)
class Metric:
    """A measured number and the command that measured it.

    Attributes:
        name: e.g. "accuracy".
        value: the number (over several seeds: their mean).
        command: the exact command that reproduces it.
        dataset: what it was measured on, when it is not implied by the command.
        seeds: the seeds it was measured over (empty: one build).
        interval: (low, high), the 95% Student-t interval of the mean over `seeds`.
        bootstrap: (low, high), the 95% percentile bootstrap interval of one build's figure over its
            test items (`zoo.pipelines.eval.bootstrap_interval`): the test set's sampling error,
            not the seed's.
    """

    name: str
    value: float
    command: str
    dataset: str | None = None
    seeds: tuple[int, ...] = ()
    interval: tuple[float, float] | None = None
    bootstrap: tuple[float, float] | None = None

    def inside(self, value: float) -> bool | None:
        """Whether `value` (say, another build's figure) lies in the interval; None without one."""
        return None if self.interval is None else self.interval[0] <= value <= self.interval[1]


@dataclass(frozen=True)
class ModelCard:
    """One registered checkpoint (one `model_cards/*.md` file).

    Attributes:
        name: model name, lower-case slug.
        version: its semantic version.
        task_family: the task family slug it belongs to.
        description: one line.
        license: SPDX-like license id.
        config: the model config mapping, or a path to a config file (relative to the repo).
        uri: where the checkpoint is downloaded from (None for ones built locally).
        sha256: full sha256 of the file at `uri` (None for directories with their own manifest,
            `hf://` snapshots, and built checkpoints).
        recipe: the recipe that builds it (`zoo build NAME`), relative to the repository root
            (the parent of the cards directory) unless absolute.
        output: the recipe output this card releases (a stage name, or `<lora stage>-<family>`);
            required with `recipe`.
        base: for an expert adapter card, the card of the model it applies to (`NAME` or
            `NAME@VERSION-REQUEST`); None for a whole model.
        base_components: pretrained parts it starts from.
        metrics: measured metrics with their commands.
        path: the card file.
        body: the card's prose.
    """

    name: str
    version: Version
    task_family: str
    description: str
    license: str
    config: dict[str, Any] | str
    uri: str | None = None
    sha256: str | None = None
    recipe: str | None = None
    output: str | None = None
    base: str | None = None
    base_components: tuple[str, ...] = ()
    metrics: tuple[Metric, ...] = ()
    path: Path | None = None
    body: str = ""

    @property
    def ref(self) -> str:
        """`name@version`."""
        return f"{self.name}@{self.version}"

    @property
    def root(self) -> Path:
        """The directory the card's relative paths (`recipe`, `config`) are relative to."""
        return self.path.resolve().parent.parent if self.path is not None else Path.cwd()

    def resolve_path(self, relative: str) -> Path:
        """A card path field (`recipe`, a `config` path) as an absolute path."""
        p = Path(relative).expanduser()
        return p if p.is_absolute() else self.root / p


def split_front_matter(text: str, where: str) -> tuple[dict[str, Any], str]:
    lines = text.splitlines(keepends=True)
    if not lines or lines[0].strip() != "---":
        raise CatalogError(f"{where}: a model card must start with a '---' line opening its YAML front matter")
    for i in range(1, len(lines)):
        if lines[i].strip() == "---":
            try:
                data = yaml.safe_load("".join(lines[1:i]))
            except yaml.YAMLError as e:
                mark = getattr(e, "problem_mark", None)
                at = f"line {mark.line + 2}, column {mark.column + 1}: " if mark is not None else ""
                problem = getattr(e, "problem", None) or str(e).splitlines()[0]
                raise CatalogError(f"{where}: {at}front matter is not valid YAML: {problem}") from None
            if not isinstance(data, dict):
                raise CatalogError(f"{where}: front matter must be a mapping of fields")
            return data, "".join(lines[i + 1 :])
    raise CatalogError(f"{where}: front matter is not closed by a '---' line")


def join_front_matter(data: dict[str, Any], body: str) -> str:
    """A card file's text from its front matter fields and its prose (inverse of `split_front_matter`)."""
    return "---\n" + yaml.safe_dump(data, sort_keys=False, allow_unicode=True) + "---\n" + body


def _text(data: dict, key: str, where: str, pattern: re.Pattern | None = None) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value.strip():
        raise CatalogError(f"{where}: field {key!r} must be a non-empty string, got {value!r}")
    if pattern is not None and not pattern.fullmatch(value):
        raise CatalogError(f"{where}: field {key!r}={value!r} must match {pattern.pattern}")
    return value.strip()


def _metrics(raw: Any, where: str) -> tuple[Metric, ...]:
    if raw is None:
        return ()
    if isinstance(raw, dict):  # {name: {value, command[, dataset]}}
        if not all(isinstance(k, str) and isinstance(v, dict) and "name" not in v for k, v in raw.items()):
            raise CatalogError(f"{where}: 'metrics' as a mapping must be name -> {{value, command[, dataset, seeds, interval]}}")
        raw = [{"name": k, **v} for k, v in raw.items()]
    if not isinstance(raw, list):
        raise CatalogError(f"{where}: 'metrics' must be a list of {{name, value, command[, dataset]}}")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or set(m) - set(METRIC_FIELDS):
            raise CatalogError(f"{where}: metrics[{i}] must have only {', '.join(METRIC_FIELDS)}, got {m!r}")
        if not isinstance(m.get("command"), str) or not m["command"].strip():
            raise CatalogError(f"{where}: metrics[{i}] ({m.get('name')!r}) has no 'command' that measured it")
        value = m.get("value")
        if not _is_number(value):
            raise CatalogError(f"{where}: metrics[{i}] ({m.get('name')!r}) value must be a number, got {value!r}")
        seeds, interval = m.get("seeds", []), m.get("interval")
        if not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) \
                or len(set(seeds)) != len(seeds):
            raise CatalogError(f"{where}: metrics[{i}] ({m.get('name')!r}) seeds must be a list of distinct integers, "
                               f"got {seeds!r}")
        if interval is not None:
            if not (isinstance(interval, list) and len(interval) == 2 and all(map(_is_number, interval))
                    and interval[0] <= value <= interval[1]):
                raise CatalogError(f"{where}: metrics[{i}] ({m.get('name')!r}) interval must be [low, high] around "
                                   f"the value {value!r}, got {interval!r}")
            if len(seeds) < 2:
                raise CatalogError(f"{where}: metrics[{i}] ({m.get('name')!r}) has an interval but not the >= 2 "
                                   f"seeds it is over (seeds: {seeds!r})")
        boot = m.get("bootstrap")
        if boot is not None and not (isinstance(boot, list) and len(boot) == 2 and all(map(_is_number, boot))
                                     and boot[0] <= value <= boot[1]):
            raise CatalogError(f"{where}: metrics[{i}] ({m.get('name')!r}) bootstrap must be [low, high] around "
                               f"the value {value!r}, got {boot!r}")
        out.append(Metric(_text(m, "name", f"{where}: metrics[{i}]"), float(value), m["command"].strip(), m.get("dataset"),
                          tuple(seeds), None if interval is None else (float(interval[0]), float(interval[1])),
                          None if boot is None else (float(boot[0]), float(boot[1]))))
    return tuple(out)


METRIC_FIELDS = ("name", "value", "command", "dataset", "seeds", "interval", "bootstrap")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_relative_path_uri(uri: str) -> bool:
    """A plain relative path (no scheme like `hf://`, `https://`, `file://`, `pypi:`; not absolute; not `~`)."""
    return not re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*:", uri) and not uri.startswith(("/", "~"))


def parse_card(path: str | os.PathLike) -> ModelCard:
    """Read and validate one model card file.

    Raises:
        CatalogError: naming the file and the field at fault.
    """
    path = Path(path)
    where = str(path)
    data, body = split_front_matter(path.read_text(encoding="utf-8"), where)
    unknown = sorted(set(data) - CARD_FIELDS)
    if unknown:
        raise CatalogError(f"{where}: unknown field(s) {unknown}; card fields are {sorted(CARD_FIELDS)}")
    missing = [k for k in REQUIRED_FIELDS if k not in data]
    if missing:
        raise CatalogError(f"{where}: missing required field(s) {missing}")
    if not isinstance(data["version"], str):  # YAML reads `version: 1.2` as a float
        raise CatalogError(f"{where}: 'version' must be a semantic version like 1.2.0, got {data['version']!r}")
    try:
        version = Version.parse(data["version"])
    except CatalogError as e:
        raise CatalogError(f"{where}: field 'version': {e}") from None
    config = data["config"]
    if not isinstance(config, (dict, str)) or not config:
        raise CatalogError(f"{where}: 'config' must be a mapping or a path to a config file")
    uri = data.get("uri")
    recipe = data.get("recipe")
    if uri is None and recipe is None:
        raise CatalogError(f"{where}: a card needs a 'uri' to download from or a 'recipe' that builds it")
    if uri is not None and (not isinstance(uri, str) or not uri.strip()):
        raise CatalogError(f"{where}: 'uri' must be a non-empty string")
    output = data.get("output")
    if recipe is not None and output is None:
        raise CatalogError(f"{where}: a card with a 'recipe' needs 'output': the recipe output it releases (e.g. lora-vqa)")
    if output is not None and recipe is None:
        raise CatalogError(f"{where}: 'output' names a recipe output but the card has no 'recipe'")
    sha256 = data.get("sha256")
    if sha256 is not None:
        if not isinstance(sha256, str) or not _SHA256_RE.fullmatch(sha256.lower()):
            raise CatalogError(f"{where}: 'sha256' must be the full 64-hex-digit digest, got {sha256!r}")
        sha256 = sha256.lower()
    if isinstance(uri, str) and uri.startswith(("http://", "https://")) and sha256 is None:
        raise CatalogError(f"{where}: an http(s) 'uri' needs the file's 'sha256'")
    base_card = data.get("base")
    if base_card is not None:
        if not isinstance(base_card, str) or not _NAME_RE.fullmatch(base_card.split("@", 1)[0].strip()):
            raise CatalogError(f"{where}: 'base' must name the base model's card as NAME or NAME@VERSION-REQUEST, got {base_card!r}")
        base_card = base_card.strip()
    base = data.get("base_components") or []
    if not isinstance(base, list) or not all(isinstance(b, str) and b for b in base):
        raise CatalogError(f"{where}: 'base_components' must be a list of names")
    name = _text(data, "name", where, _NAME_RE)
    try:
        check_name(name, "card name")
    except ValueError as e:
        raise CatalogError(f"{where}: {e}") from None
    if isinstance(uri, str) and _is_relative_path_uri(uri.strip()):
        uri = str((path.resolve().parent / Path(uri.strip()).expanduser()).resolve())  # against the card's own folder
    return ModelCard(
        name=name,
        version=version,
        task_family=_text(data, "task_family", where, _SLUG_RE),
        description=_text(data, "description", where),
        license=_text(data, "license", where),
        config=config,
        uri=uri.strip() if isinstance(uri, str) else None,
        sha256=sha256,
        recipe=_text(data, "recipe", where) if recipe is not None else None,
        output=_text(data, "output", where, _NAME_RE) if output is not None else None,
        base=base_card,
        base_components=tuple(base),
        metrics=_metrics(data.get("metrics"), where),
        path=path,
        body=body,
    )


def default_cards_dir() -> Path:
    """`$ZOO_MODEL_CARDS`, else the cards shipped with the package (`zoo.resources`)."""
    env = os.environ.get("ZOO_MODEL_CARDS")
    if env:
        return Path(env)
    from zoo.resources import data_root

    return data_root() / "model_cards"


class Catalog:
    """All cards of a directory, indexed by name and version.

    Args:
        cards: the parsed cards; a name@version given twice is an error naming both files.
    """

    def __init__(self, cards: list[ModelCard]) -> None:
        self._by_name: dict[str, dict[Version, ModelCard]] = {}
        for card in cards:
            versions = self._by_name.setdefault(card.name, {})
            if card.version in versions:
                raise CatalogError(f"{card.ref} is defined twice: in {versions[card.version].path} and {card.path}")
            versions[card.version] = card

    @classmethod
    def from_dir(cls, directory: str | os.PathLike | None = None) -> Catalog:
        """Parse every `*.md` card in `directory` (default: `default_cards_dir()`); none is fine."""
        given = directory is not None or bool(os.environ.get("ZOO_MODEL_CARDS"))
        root = Path(directory) if directory is not None else default_cards_dir()
        if given and not root.is_dir():
            env = os.environ.get("ZOO_MODEL_CARDS")
            what = "$ZOO_MODEL_CARDS" if directory is None or (env and str(directory) == env) else "--cards-dir"
            reason = "is not a directory" if root.exists() else "does not exist"
            raise CatalogError(f"model cards directory {str(root)!r} ({what}) {reason}")
        paths = sorted(root.glob("*.md")) if root.is_dir() else []
        return cls([parse_card(p) for p in paths if p.name.lower() != "readme.md"])

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def versions(self, name: str) -> list[Version]:
        """All versions of `name`, oldest first."""
        return sorted(self._versions_of(name))

    def _versions_of(self, name: str) -> dict[Version, ModelCard]:
        if name not in self._by_name:
            close = difflib.get_close_matches(name, self._by_name, n=3)
            hint = f"; did you mean {close}?" if close else ""
            known = self.names()
            raise CatalogError(f"unknown model {name!r}{hint} (registered: {known if known else 'none'})")
        return self._by_name[name]

    def get(self, name: str, version: str | None = None) -> ModelCard:
        """The card for `name` at the newest version that satisfies `version`.

        Args:
            name: a model name, or `name@version-request`.
            version: None (newest release), "1.2.0", "^1.0", or "~1.2".
        """
        if "@" in name:
            if version is not None:
                raise CatalogError(f"give the version either in the name ({name!r}) or as version=, not both")
            name, version = name.split("@", 1)
        cards = self._versions_of(name)
        spec = VersionSpec.parse(version)
        ok = [v for v in cards if spec.allows(v)]
        if not ok:
            have = ", ".join(map(str, sorted(cards)))
            what = "a release" if spec.text is None else f"version {spec.text!r}"
            raise CatalogError(f"no version of {name!r} satisfies {what}; available: {have}")
        return cards[max(ok)]

    def list(self, pattern: str | None = None, task_family: str | None = None, *, all_versions: bool = False) -> list[ModelCard]:
        """Cards whose name matches the glob `pattern` (case-insensitive) and `task_family`.

        Args:
            pattern: e.g. "moe-llava-*"; None matches all.
            task_family: keep only this family.
            all_versions: every version, instead of the newest release (or newest pre-release
                when a model has no release) of each name.
        """
        out = []
        for name in self.names():
            if pattern is not None and not fnmatch.fnmatchcase(name, pattern.lower()):
                continue
            versions = self._by_name[name]
            if all_versions:
                chosen = [versions[v] for v in sorted(versions)]
            else:
                releases = [v for v in versions if not v.is_prerelease]
                chosen = [versions[max(releases or versions)]]
            out.extend(c for c in chosen if task_family is None or c.task_family == task_family)
        return out


def list_models(
    pattern: str | None = None,
    task_family: str | None = None,
    *,
    all_versions: bool = False,
    cards_dir: str | os.PathLike | None = None,
) -> list[ModelCard]:
    """Catalogued models matching `pattern` and `task_family` (see `Catalog.list`)."""
    return Catalog.from_dir(cards_dir).list(pattern, task_family, all_versions=all_versions)


def get_card(name: str, version: str | None = None, *, cards_dir: str | os.PathLike | None = None) -> ModelCard:
    """The card for `name` at the newest version satisfying `version` (see `Catalog.get`)."""
    return Catalog.from_dir(cards_dir).get(name, version)


__all__ = [
    "Metric",
    "ModelCard",
    "Catalog",
    "CatalogError",
    "Version",
    "VersionSpec",
    "default_cards_dir",
    "get_card",
    "join_front_matter",
    "list_models",
    "parse_card",
    "split_front_matter",
]
