"""config/README.md documents every key of the schema and of the three shipped configs, with their values."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "config" / "README.md"
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"
CONFIGS = ("config.yaml", "mimic.yaml", "mimic_demo.yaml")
KEY_HEADER = ["key", "meaning", "unit", *CONFIGS, "source"]
ENTRY_HEADER = ["model entry", "architecture", "what it is", *CONFIGS]
PARAM_HEADER = ["architectures", "parameter", "meaning"]
GENERATOR_HEADER = ["generator", "what it changes", *CONFIGS]
ABSENT = "—"  # a value cell of a key the config does not set (the schema default applies)
# Subtrees documented as one row each, not key by key: a model's overrides take the keys of the top-level train:
# and cxr: sections, params are the architecture's (parameter table), generators have their own table.
OPAQUE = {"models.<name>.params", "models.<name>.train", "models.<name>.cxr", "models.<name>.published.train",
          "models.<name>.published.cxr", "models.<name>.published.params", "ddl_cxr.generators.<name>"}


def doc_tables(text: str) -> dict[tuple[str, ...], list[list[str]]]:
    """Markdown tables of ``text`` by header: header cells (lower case) -> body rows (cells, stripped)."""
    tables: dict[tuple[str, ...], list[list[str]]] = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and re.match(r"^\|[\s:|-]+\|$", lines[i + 1]):
            header = tuple(c.strip().lower() for c in lines[i].strip().strip("|").split("|"))
            rows, i = tables.setdefault(header, []), i + 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in re.split(r"(?<!\\)\|", lines[i].strip().strip("|"))])
                i += 1
        else:
            i += 1
    return tables


def code_spans(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def merged(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def schema_paths(node: dict, defs: dict, prefix: str = "") -> set[str]:
    """Every documented key path of the schema: dotted, with ``<name>`` for user-chosen names."""
    if "$ref" in node:  # the referenced definition, with the referring node's own keys merged in
        node = merged(defs[node["$ref"].split("/")[-1]], {k: v for k, v in node.items() if k != "$ref"})
    paths = set()
    variants = [node, *[v for v in node.get("oneOf", []) if v.get("type") == "object"]]
    for variant in variants:
        for key, child in variant.get("properties", {}).items():
            path = f"{prefix}{key}"
            paths.add(path)
            if path not in OPAQUE and isinstance(child, dict):
                paths |= schema_paths(child, defs, path + ".")
        extra = variant.get("additionalProperties")
        if isinstance(extra, dict) and prefix:
            path = f"{prefix}<name>"
            paths.add(path)
            if path not in OPAQUE:
                paths |= schema_paths(extra, defs, path + ".")
    return paths


def config_leaves(config: dict, prefix: str = "") -> dict[str, object]:
    """Key path -> value of every key of a config outside models: and ddl_cxr.generators (own tables)."""
    out = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if path in ("models", "ddl_cxr.generators"):
            out[path] = value
            continue
        out[path] = value
        if isinstance(value, dict):
            out |= config_leaves(value, path + ".")
    return out


@pytest.fixture(scope="module")
def doc():
    assert DOC.exists(), "config/README.md is missing"
    return doc_tables(DOC.read_text())


@pytest.fixture(scope="module")
def configs():
    return {name: yaml.safe_load((ROOT / "config" / name).read_text()) for name in CONFIGS}


def key_rows(doc) -> dict[str, list[str]]:
    rows = doc.get(tuple(KEY_HEADER))
    assert rows, f"config/README.md has no key table with the header | {' | '.join(KEY_HEADER)} |"
    out = {}
    for row in rows:
        assert len(row) == len(KEY_HEADER), f"key row {row[:1]} has {len(row)} cells, not {len(KEY_HEADER)}"
        keys = code_spans(row[0])
        assert len(keys) == 1, f"key cell {row[0]!r} must hold one `key.path`"
        assert keys[0] not in out, f"key {keys[0]} documented twice"
        assert row[1] and row[1] != ABSENT, f"key {keys[0]} has no meaning"
        out[keys[0]] = row
    return out


def test_every_schema_key_has_an_entry(doc):
    schema = yaml.safe_load(SCHEMA.read_text())
    paths = schema_paths(schema, schema["$defs"])
    assert {"missing_tasks", "models.<name>.missing_aware", "ddl_cxr.diffusion.clip_quantile",
            "train.scheduler.eta_min", "cxr.augment.scale", "raw.cxr_image_layout"} <= paths  # every kind of node
    missing = sorted(paths - set(key_rows(doc)))
    assert not missing, f"config/README.md documents no row for these schema keys: {missing}"


def test_no_entry_for_a_key_the_schema_lacks(doc):
    schema = yaml.safe_load(SCHEMA.read_text())
    stale = sorted(set(key_rows(doc)) - schema_paths(schema, schema["$defs"]))
    assert not stale, f"config/README.md documents keys the schema does not have: {stale}"


@pytest.mark.parametrize("name", CONFIGS)
def test_documented_values_are_the_configs(doc, configs, name):
    """Each config column shows that file's value of every key it sets (a YAML literal in backticks), and — where
    the file leaves the key out."""
    rows, column = key_rows(doc), KEY_HEADER.index(name)
    leaves = config_leaves(configs[name])
    for path, row in rows.items():
        if "<name>" in path:
            continue  # per model or generator: the model-entry, parameter and generator tables hold the values
        cell = row[column]
        if path not in leaves:
            assert cell == ABSENT, f"{name} does not set {path}, but its column says {cell!r} (expected {ABSENT})"
            continue
        value = leaves[path]
        if path in ("models", "ddl_cxr.generators") or isinstance(value, dict):
            continue  # a section: its keys have their own rows
        spans = code_spans(cell)
        assert spans, f"{name}: {path} = {value!r}, but its cell {cell!r} holds no `value`"
        assert yaml.safe_load(spans[0]) == value, f"{name}: {path} = {value!r}, documented as {spans[0]!r}"


def test_every_model_entry_and_parameter_is_documented(doc, configs):
    entries = {code_spans(row[0])[0]: row for row in doc.get(tuple(ENTRY_HEADER), [])}
    params = {}
    for row in doc.get(tuple(PARAM_HEADER), []):
        for architecture in code_spans(row[0]):
            for parameter in code_spans(row[1]):
                params[architecture, parameter] = row[2]
    assert entries and params, "config/README.md needs the model-entry and parameter tables"
    for name, config in configs.items():
        column = ENTRY_HEADER.index(name)
        for model, entry in config["models"].items():
            assert model in entries, f"model entry {model!r} of {name} is not in the model-entry table"
            architecture = entry.get("architecture", model)
            assert code_spans(entries[model][1]) == [architecture], f"{model}: architecture is {architecture!r}"
            assert entries[model][column] != ABSENT, f"{name} has {model!r}, but its column says {ABSENT}"
            keys = set(entry["params"]) | set((entry.get("published") or {}).get("params", {}))
            undocumented = sorted(k for k in keys if (architecture, k) not in params)
            assert not undocumented, f"{architecture}: parameters {undocumented} ({name}) have no row"
        for model, row in entries.items():
            if model not in config["models"]:
                assert row[column] == ABSENT, f"{model} is not in {name}, but its column says {row[column]!r}"


def test_every_generator_is_documented(doc, configs):
    rows = {code_spans(row[0])[0]: row for row in doc.get(tuple(GENERATOR_HEADER), [])}
    assert rows, "config/README.md needs the generator table"
    for name, config in configs.items():
        column = GENERATOR_HEADER.index(name)
        generators = (config.get("ddl_cxr") or {}).get("generators", {})
        for generator in generators:
            assert generator in rows, f"generator {generator!r} of {name} has no row"
            assert rows[generator][column] != ABSENT, f"{name} has generator {generator!r}, its column says {ABSENT}"
        for generator, row in rows.items():
            if generator not in generators:
                assert row[column] == ABSENT, f"{name} has no generator {generator!r}; its column says {row[column]!r}"


def test_the_checks_catch_a_gap():
    """The walk and the table parser find a missing row and a wrong value (the tests above cannot pass vacuously)."""
    text = ("| key | meaning | unit | config.yaml | mimic.yaml | mimic_demo.yaml | source |\n"
            "|---|---|---|---|---|---|---|\n"
            "| `seeds` | training seeds | — | `[1]` | `[1, 2, 3]` | — | ours |\n")
    rows = key_rows(doc_tables(text))
    assert set(rows) == {"seeds"}
    assert yaml.safe_load(code_spans(rows["seeds"][4])[0]) == [1, 2, 3]
    schema = {"properties": {"seeds": {}, "a": {"type": "object", "properties": {"b": {}}}}}
    assert schema_paths(schema, {}) - set(rows) == {"a", "a.b"}
