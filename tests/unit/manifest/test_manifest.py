"""The manifest language: loading, expansion, ids, streaming, and errors that say where and why."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import tracemalloc
from pathlib import Path

import pytest

import wanbatch
from helpers.manifest import load_manifest, write_file
from helpers.outputs import metadata
from helpers.paths import BAD_MANIFESTS, REPO
from wanbatch import catalog
from wanbatch.errors import ManifestError, ManifestInvalid
from wanbatch.manifest import DEFAULT_OUTPUT, Item, Manifest, draw_seed, item_id
from wanbatch.manifest.plan import make_plan

MINIMAL = """\
name: foxes
defaults: {model: wan2.2-t2i-flash, size: "1024*1024", n: 1, prompt_extend: false}
prompts:
  - a red fox in fresh snow
  - a red fox at dawn, watercolor
"""


def items_of(directory: Path, text: str) -> list[Item]:
    manifest = load_manifest(directory, text)
    assert manifest.validate() == []
    items = list(manifest.items())
    assert len(items) == manifest.count()
    return items


def errors_of(directory: Path, text: str, name: str = "job.yaml") -> list[ManifestError]:
    with pytest.raises(ManifestInvalid) as caught:
        load_manifest(directory, text, file_name=name).validate()
    return caught.value.errors


# --- the minimal form and the examples --------------------------------------------------------------


def test_minimal_form_works_as_written(tmp_path: Path) -> None:
    """The issue's minimal manifest gives two one-image flash items with every default filled in."""
    manifest = load_manifest(tmp_path, MINIMAL)
    assert (manifest.name, manifest.region, manifest.budget, manifest.output) == ("foxes", "beijing", None, None)
    assert manifest.validate() == []
    first, second = manifest.items()
    assert first.request() == {
        "region": "beijing",
        "model": "wan2.2-t2i-flash",
        "prompt": "a red fox in fresh snow",
        "negative_prompt": None,
        "size": "1024*1024",
        "n": 1,
        "seed": None,
        "prompt_extend": False,
        "watermark": False,
        "sync": False,
    }
    assert second.prompt == "a red fox at dawn, watercolor"
    assert (first.source, second.source) == (f"{tmp_path.as_posix()}/job.yaml:4", f"{tmp_path.as_posix()}/job.yaml:5")
    assert (first.entry, second.entry, first.replica) == ("prompts[0]", "prompts[1]", 0)
    assert first.output_name(0) == DEFAULT_OUTPUT.format(item_id=first.item_id, index=0)


#: The example manifests of jobs/ (jobs/accounts.example.yaml is an accounts file, not a manifest).
EXAMPLE_JOBS = sorted(p for p in (REPO / "jobs").glob("*.yaml") if not p.name.startswith("accounts."))


@pytest.mark.parametrize("path", EXAMPLE_JOBS, ids=lambda p: p.name)
def test_example_jobs_are_valid(path: Path) -> None:
    """Every shipped example loads, validates without warnings, and expands to its count."""
    manifest = Manifest.from_yaml(path)
    assert manifest.validate() == []
    assert sum(1 for _ in manifest.items()) == manifest.count() > 0


def test_demo_spans_three_models_and_enough_images() -> None:
    """The demo uses at least three models, one of them wan2.6, for at least 24 images in n=4 tasks."""
    items = list(Manifest.from_yaml(REPO / "jobs" / "demo.yaml").items())
    assert len({item.model for item in items}) >= 3 and "wan2.6-t2i" in {item.model for item in items}
    assert sum(item.n for item in items) >= 24 and {item.n for item in items} == {4}
    assert len({item.item_id for item in items}) == len(items)
    assert len({item.output_name(i) for item in items for i in range(item.n)}) == sum(item.n for item in items)


def test_top_level_settings(tmp_path: Path) -> None:
    """name defaults to the file's stem; region, budget, output and max_items are read as given."""
    manifest = load_manifest(
        tmp_path,
        """
        region: singapore
        budget: 12
        output: "{model}/{item_id}-{index}.png"
        max_items: 10
        defaults: {model: wan2.2-t2i-flash}
        prompts: [a fox]
        """,
        file_name="night-run.yaml",
    )
    assert (manifest.name, manifest.region, manifest.budget) == ("night-run", "singapore", 12.0)
    assert (manifest.output, manifest.max_items, manifest.path) == (
        "{model}/{item_id}-{index}.png",
        10,
        tmp_path / "night-run.yaml",
    )
    assert next(manifest.items()).region == "singapore"


def test_public_names() -> None:
    """The module exports exactly its public interface."""
    import wanbatch.manifest

    assert sorted(wanbatch.manifest.__all__) == ["DEFAULT_OUTPUT", "Item", "Manifest", "draw_seed", "item_id"]


def test_foxes_example_is_the_minimal_form() -> None:
    """jobs/foxes.yaml is the issue's minimal manifest, verbatim."""
    assert (REPO / "jobs" / "foxes.yaml").read_text() == MINIMAL


# --- templates, matrix, zip -------------------------------------------------------------------------


def test_templates_take_top_and_entry_variables(tmp_path: Path) -> None:
    """{name} holes are filled from top-level and entry vars; {{ }} are literal braces; values are recorded."""
    (item,) = items_of(
        tmp_path,
        """
        vars: {style: watercolor, animal: cat}
        defaults: {model: wan2.2-t2i-flash}
        prompts:
          - prompt: "a {animal} in {place}, {style} {{sic}}"
            negative_prompt: "{place} fog"
            vars: {animal: red fox, place: snow}
        """,
    )
    assert item.prompt == "a red fox in snow, watercolor {sic}"
    assert item.negative_prompt == "snow fog"
    assert item.variables == {"style": "watercolor", "animal": "red fox", "place": "snow"}


def test_matrix_is_a_cartesian_product_over_parameters_and_variables(tmp_path: Path) -> None:
    """A matrix over model, size, a boolean and a variable yields every combination, last key fastest."""
    items = items_of(
        tmp_path,
        """
        defaults: {n: 1}
        prompts:
          - prompt: "a {animal}"
            matrix:
              animal: [fox, owl]
              model: [wan2.2-t2i-flash, wanx2.1-t2i-turbo]
              size: ["1024*1024", 768x1024]
              prompt_extend: [true, false]
        """,
    )
    assert len(items) == 16
    combos = [(i.variables["animal"], i.model, i.size, i.prompt_extend) for i in items]
    expected = list(
        itertools.product(
            ["fox", "owl"], ["wan2.2-t2i-flash", "wanx2.1-t2i-turbo"], ["1024*1024", "768*1024"], [True, False]
        )
    )
    assert combos == expected
    assert len({item.item_id for item in items}) == 16


def test_top_level_matrix_applies_unless_an_entry_sets_the_key(tmp_path: Path) -> None:
    """A top-level matrix multiplies every entry; an entry's own model replaces that axis."""
    items = items_of(
        tmp_path,
        """
        matrix: {model: [wan2.2-t2i-flash, wanx2.1-t2i-turbo]}
        defaults: {n: 1}
        prompts:
          - a fox
          - prompt: an owl
            model: wan2.6-t2i
        """,
    )
    assert [(i.prompt, i.model) for i in items] == [
        ("a fox", "wan2.2-t2i-flash"),
        ("a fox", "wanx2.1-t2i-turbo"),
        ("an owl", "wan2.6-t2i"),
    ]


def test_zip_walks_lists_side_by_side_and_multiplies_with_a_matrix(tmp_path: Path) -> None:
    """zip pairs the i-th values (parameters too); a matrix on the same entry multiplies the rows."""
    items = items_of(
        tmp_path,
        """
        defaults: {n: 1}
        prompts:
          - prompt: "a {animal} in {place}, {style}"
            zip:
              animal: [fox, heron]
              place: [snow, a marsh]
              model: [wan2.2-t2i-flash, wanx2.1-t2i-turbo]
            matrix: {style: [ink, oil]}
        """,
    )
    assert [(i.prompt, i.model) for i in items] == [
        ("a fox in snow, ink", "wan2.2-t2i-flash"),
        ("a fox in snow, oil", "wan2.2-t2i-flash"),
        ("a heron in a marsh, ink", "wanx2.1-t2i-turbo"),
        ("a heron in a marsh, oil", "wanx2.1-t2i-turbo"),
    ]


def test_a_zip_column_may_repeat_a_value(tmp_path: Path) -> None:
    """zip pairs positions: a value that comes again in a column makes a row of its own, not an error."""
    items = items_of(
        tmp_path,
        """
        defaults: {model: wan2.2-t2i-flash, n: 1}
        prompts:
          - prompt: "a fox, {style}"
            zip:
              style: [photo, painting, photo]
              negative_prompt: [blurry, photo, painting]
        """,
    )
    assert [(i.prompt, i.negative_prompt) for i in items] == [
        ("a fox, photo", "blurry"),
        ("a fox, painting", "photo"),
        ("a fox, photo", "painting"),
    ]


# --- prompts from files -----------------------------------------------------------------------------


def test_txt_file_gives_one_literal_prompt_per_line(tmp_path: Path) -> None:
    """A .txt file: one prompt a line, blanks and # lines skipped, braces literal, source = its line."""
    write_file(tmp_path, "data/lines.txt", "# captions\na fox {not a hole}\n\n  an owl  \n")
    items = items_of(tmp_path, "defaults: {model: wan2.2-t2i-flash}\nprompts:\n  - file: data/lines.txt\n")
    assert [(i.prompt, i.source) for i in items] == [
        ("a fox {not a hole}", f"{tmp_path.as_posix()}/data/lines.txt:2"),
        ("an owl", f"{tmp_path.as_posix()}/data/lines.txt:4"),
    ]


def test_csv_columns_are_variables_and_parameter_columns_set_parameters(tmp_path: Path) -> None:
    """A .csv: columns are variables, a size column sets the size, an empty cell keeps the default."""
    write_file(tmp_path, "data/a.csv", 'animal,habitat,size,n\nfox,snow,,\n"heron, grey",a marsh,1440x1024,2\n')
    items = items_of(
        tmp_path,
        """
        defaults: {model: wan2.2-t2i-flash, size: "512*512", n: 1}
        prompts:
          - file: data/a.csv
            prompt: "a {animal} in {habitat}"
        """,
    )
    assert [(i.prompt, i.size, i.n) for i in items] == [
        ("a fox in snow", "512*512", 1),
        ("a heron, grey in a marsh", "1440*1024", 2),
    ]
    assert items[1].variables == {"animal": "heron, grey", "habitat": "a marsh"}
    assert items[1].source.endswith("data/a.csv:3")


def test_jsonl_keys_are_variables_and_parameters(tmp_path: Path) -> None:
    """A .jsonl: 'prompt' is the prompt, a seed key sets the seed, numbers become text variables."""
    write_file(
        tmp_path, "d.jsonl", '{"prompt": "a boat", "mood": 3}\n\n{"prompt": "a storm", "seed": 5, "mood": "dark"}\n'
    )
    items = items_of(tmp_path, "defaults: {model: wan2.6-t2i, n: 1}\nprompts:\n  - file: d.jsonl\n")
    assert [(i.prompt, i.seed, i.variables["mood"], i.source[-9:]) for i in items] == [
        ("a boat", None, "3", "d.jsonl:1"),
        ("a storm", 5, "dark", "d.jsonl:3"),
    ]


# --- seeds, repeats, overrides ----------------------------------------------------------------------


def test_seed_lists_ranges_and_counts(tmp_path: Path) -> None:
    """seed takes a value, a list, a range (stop excluded) or a count of drawn seeds, each an item."""
    items = items_of(
        tmp_path,
        """
        name: seeds
        defaults: {model: wan2.2-t2i-flash, n: 1}
        prompts:
          - {prompt: a, seed: 7}
          - {prompt: b, seed: [1, 2]}
          - {prompt: c, seed: {range: [10, 16, 2]}}
          - {prompt: d, seed: {count: 3}}
        """,
    )
    seeds = {p: [i.seed for i in items if i.prompt == p] for p in "abcd"}
    assert seeds["a"] == [7] and seeds["b"] == [1, 2] and seeds["c"] == [10, 12, 14]
    assert seeds["d"] == [draw_seed("d", k) for k in range(3)]
    assert len(set(seeds["d"])) == 3 and all(0 <= s <= catalog.SEED_MAX for s in seeds["d"])


def test_drawn_seeds_repeat_across_loads_and_match_across_models(tmp_path: Path) -> None:
    """Drawn seeds are the same on every load and for one prompt under every model and size."""
    text = """
        name: compare
        defaults: {n: 1, seed: {count: 2}}
        matrix: {model: [wan2.2-t2i-flash, wan2.2-t2i-plus], size: ["1024*1024", "1024*1440"]}
        prompts: [a harbour, a meadow]
        """
    first, again = items_of(tmp_path, text), items_of(tmp_path, text)
    assert [i.seed for i in first] == [i.seed for i in again]
    for prompt in ("a harbour", "a meadow"):
        per_combo = {(i.model, i.size): [] for i in first if i.prompt == prompt}
        for item in first:
            if item.prompt == prompt:
                per_combo[(item.model, item.size)].append(item.seed)
        assert len({tuple(seeds) for seeds in per_combo.values()}) == 1
    assert {i.seed for i in first if i.prompt == "a harbour"} != {i.seed for i in first if i.prompt == "a meadow"}


def test_renaming_a_manifest_keeps_its_drawn_seeds_and_items(tmp_path: Path) -> None:
    """Drawn seeds come from the prompt and the draw number alone: a manifest renamed makes the same items (the
    same ids), so a run folder never pays again for them."""
    text = """
        name: {name}
        defaults: {{model: wan2.2-t2i-flash, n: 1, seed: {{count: 3}}}}
        prompts: [a lighthouse, a pier]
        """
    before = items_of(tmp_path, text.format(name="coast"))
    after = items_of(tmp_path, text.format(name="coast-renamed"))
    assert [i.item_id for i in before] == [i.item_id for i in after]


def test_repeats_make_distinct_items_of_one_request(tmp_path: Path) -> None:
    """repeats: 3 gives replicas 0..2 with one request and three different ids."""
    items = items_of(tmp_path, "defaults: {model: wan2.2-t2i-flash, repeats: 3}\nprompts: [a fox]\n")
    assert [i.replica for i in items] == [0, 1, 2]
    assert len({json.dumps(i.request()) for i in items}) == 1
    assert len({i.item_id for i in items}) == 3


def test_an_entry_overrides_every_parameter(tmp_path: Path) -> None:
    """Each parameter set on an entry beats defaults; a regional model name maps to the canonical one."""
    items = items_of(
        tmp_path,
        """
        region: beijing
        defaults: {model: wan2.2-t2i-flash, size: "1024*1024", n: 1, seed: 1, negative_prompt: x,
                   prompt_extend: false, watermark: false, sync: false}
        prompts:
          - a fox
          - prompt: an owl
            model: wan2.6-t2i
            size: 1280 x 1280
            n: 3
            seed: 99
            negative_prompt: blur
            prompt_extend: true
            watermark: true
            region: singapore
            sync: true
          - prompt: a heron
            model: wan2.1-t2i-turbo
            region: singapore
        """,
    )
    assert items[1].request() == {
        "region": "singapore",
        "model": "wan2.6-t2i",
        "prompt": "an owl",
        "negative_prompt": "blur",
        "size": "1280*1280",
        "n": 3,
        "seed": 99,
        "prompt_extend": True,
        "watermark": True,
        "sync": True,
    }
    assert (items[0].model, items[0].region, items[0].negative_prompt) == ("wan2.2-t2i-flash", "beijing", "x")
    assert (items[2].model, items[2].region) == ("wanx2.1-t2i-turbo", "singapore")


def test_yaml_anchors_and_merge_keys_work(tmp_path: Path) -> None:
    """<<: *anchor merges a shared mapping, and keys written beside it win."""
    (item,) = items_of(
        tmp_path,
        """
        defaults: &base {model: wan2.2-t2i-flash, n: 2, watermark: true}
        prompts:
          - <<: *base
            prompt: a fox
            n: 1
        """,
    )
    assert (item.model, item.n, item.watermark) == ("wan2.2-t2i-flash", 1, True)


def test_output_pattern_fields(tmp_path: Path) -> None:
    """The output pattern fills item fields (seed is the image's: seed + index) and variables; an entry's own wins."""
    first, second = items_of(
        tmp_path,
        """
        output: "{model}/{size}/{animal}-{seed}-r{replica}-{index}.png"
        defaults: {model: wan2.2-t2i-flash, n: 2, seed: 5}
        prompts:
          - {prompt: "a {animal}", vars: {animal: fox}}
          - {prompt: an owl, output: "{region}-{n}-{item_id}-{index}.png"}
        """,
    )
    assert first.output_name(1) == "wan2.2-t2i-flash/1024_1024/fox-6-r0-1.png"  # Windows refuses "*"
    assert second.output_name(0) == f"beijing-2-{second.item_id}-0.png"


# --- ids --------------------------------------------------------------------------------------------


def test_item_id_is_sha256_of_request_and_replica(tmp_path: Path) -> None:
    """The id is the documented hash: sha256 of compact sorted JSON [request, replica], 20 hex digits."""
    (item,) = items_of(tmp_path, MINIMAL.replace("  - a red fox at dawn, watercolor\n", ""))
    payload = json.dumps([item.request(), 0], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert item.item_id == hashlib.sha256(payload.encode()).hexdigest()[:20]


def test_ids_are_stable_across_loads_and_survive_edits(tmp_path: Path) -> None:
    """Loading twice gives the same ids; an edit keeps the ids of every unchanged request, wherever it moved."""
    before = [i.item_id for i in items_of(tmp_path, MINIMAL)]
    assert [i.item_id for i in items_of(tmp_path, MINIMAL)] == before
    edited = MINIMAL.replace(
        "prompts:\n", "budget: 3\nprompts:\n  - a grey owl\n  - prompt: a red fox at dawn, watercolor\n    n: 2\n"
    )
    after = {i.prompt + str(i.n): i.item_id for i in items_of(tmp_path, edited)}
    assert after["a red fox in fresh snow1"] == before[0]
    assert after["a red fox at dawn, watercolor1"] == before[1]
    assert after["a red fox at dawn, watercolor2"] not in before


def test_defaults_written_or_implied_give_one_id(tmp_path: Path) -> None:
    """Spelling out the model's defaults, or another size notation, does not change the id."""
    implicit = items_of(tmp_path, "defaults: {model: wan2.2-t2i-flash}\nprompts: [a fox]\n")
    explicit = items_of(
        tmp_path,
        """
        region: beijing
        defaults: {model: wan2.2-t2i-flash, size: 1024x1024, n: 4, prompt_extend: true, watermark: false,
                   sync: false, negative_prompt: ""}
        prompts: ["  a fox  "]
        """,
    )
    assert implicit[0].item_id == explicit[0].item_id


def test_identical_requests_from_two_entries_are_one_item(tmp_path: Path) -> None:
    """Two entries that make the same request and replica yield the same id (the ledger keeps one)."""
    items = items_of(
        tmp_path,
        """
        defaults: {model: wan2.2-t2i-flash}
        prompts:
          - a fox
          - prompt: "a {animal}"
            matrix: {animal: [fox, owl]}
        """,
    )
    assert items[0].item_id == items[1].item_id != items[2].item_id


# --- repeated requests ------------------------------------------------------------------------------


def repeating_csv(directory: Path, rows: int = 200, distinct: int = 50) -> Manifest:
    """``rows`` CSV rows over ``distinct`` prompts, each × 2 models × 3 seeds: row i repeats row i % distinct."""
    lines = ["id,prompt"] + [f"img{i:04d},a fox number {i % distinct}" for i in range(rows)]
    write_file(directory, "data/foxes.csv", "\n".join(lines) + "\n")
    return load_manifest(
        directory,
        """
        defaults: {size: "512*512", n: 1, seed: [1, 2, 3]}
        matrix: {model: [wan2.2-t2i-flash, wan2.2-t2i-plus]}
        prompts:
          - file: data/foxes.csv
            output: "{id}-{model}-{seed}.png"
        """,
    )


def test_the_plan_counts_each_distinct_request_once_and_names_the_rows_that_repeat(tmp_path: Path) -> None:
    """200 rows of 50 prompts × 2 models × 3 seeds plan 300 items (51 CNY), and say which rows repeat which."""
    manifest = repeating_csv(tmp_path)
    assert manifest.count() == 1200  # what the manifest writes; the ledger keeps one item per request
    plan = make_plan(manifest)
    assert (plan["items"], plan["images"], plan["cost"]) == (300, 300, {"CNY": 51.0})
    assert {lane["model"]: lane["items"] for lane in plan["lanes"]} == {"wan2.2-t2i-flash": 150, "wan2.2-t2i-plus": 150}
    repeats = plan["repeats"]
    assert (repeats["rows"], repeats["items"]) == (150, 900)
    csv = (tmp_path / "data" / "foxes.csv").as_posix()
    assert repeats["examples"][0] == {"source": f"{csv}:52", "repeats": f"{csv}:2"}
    assert len({item.item_id for item in manifest.items()}) == 300


def test_repeats_made_on_purpose_stay_distinct_items(tmp_path: Path) -> None:
    """``repeats: 3`` asks for three images of one request: three items, none counted as a repeat."""
    text = "defaults: {model: wan2.2-t2i-flash, n: 1}\nprompts: [{prompt: a fox, repeats: 3}]\n"
    plan = make_plan(load_manifest(tmp_path, text))
    assert plan["items"] == 3 and plan["repeats"]["rows"] == 0


async def test_every_row_finds_its_image_and_the_budget_counts_distinct_requests(tmp_path: Path) -> None:
    """A run under a budget the distinct requests fit pays each once, and metadata lists every CSV row's image."""
    manifest = repeating_csv(tmp_path, rows=20, distinct=5)
    report = await wanbatch.run(manifest, out=tmp_path / "run", simulate=True, speed=600, budget=5.2, gallery=False)
    assert report["items"]["saved"] == 30 and report["cost"] == {"CNY": 5.1}
    rows = metadata(tmp_path / "run")
    served = {source for row in rows for source in row["sources"]}
    csv = (tmp_path / "data" / "foxes.csv").as_posix()
    assert served == {f"{csv}:{line}" for line in range(2, 22)}
    assert all(row["source"] == row["sources"][0] for row in rows)


# --- streaming and limits ---------------------------------------------------------------------------


def _peak_bytes_while(consume) -> int:
    tracemalloc.start()
    try:
        consume()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_million_item_matrix_is_counted_and_streamed(tmp_path: Path) -> None:
    """A 100x100x100 matrix counts 1,000,000 items and yields its first ones in a few megabytes."""
    lists = {key: ", ".join(f"{key}{i}" for i in range(100)) for key in "abc"}
    manifest = load_manifest(
        tmp_path,
        f"""
        defaults: {{model: wan2.2-t2i-flash, n: 1}}
        prompts:
          - prompt: "{{a}} {{b}} {{c}}"
            matrix: {{a: [{lists["a"]}], b: [{lists["b"]}], c: [{lists["c"]}]}}
        """,
    )
    assert manifest.count() == 1_000_000
    prefix: list[Item] = []
    peak = _peak_bytes_while(lambda: prefix.extend(itertools.islice(manifest.items(), 3000)))
    assert [i.prompt for i in prefix[:2]] == ["a0 b0 c0", "a0 b0 c1"]
    assert prefix[-1].prompt == "a0 b29 c99"
    assert peak < 16 * 2**20


def test_million_line_prompts_file_is_counted_and_streamed(tmp_path: Path) -> None:
    """A 1,000,000-line .txt counts exactly and is read lazily: a prefix costs little memory."""
    path = tmp_path / "million.txt"
    with path.open("w") as handle:
        handle.writelines(f"prompt number {i}\n" for i in range(1_000_000))
    manifest = load_manifest(tmp_path, "defaults: {model: wan2.2-t2i-flash, n: 1}\nprompts:\n  - file: million.txt\n")
    assert manifest.count() == 1_000_000
    prefix: list[Item] = []
    peak = _peak_bytes_while(lambda: prefix.extend(itertools.islice(manifest.items(), 3000)))
    assert prefix[-1].prompt == "prompt number 2999" and prefix[-1].source.endswith("million.txt:3000")
    assert peak < 16 * 2**20


def test_count_is_arithmetic(tmp_path: Path) -> None:
    """count() answers for 10**12 items, which no expansion could count, once max_items allows it."""
    values = ", ".join(str(i) for i in range(1000))
    manifest = load_manifest(
        tmp_path,
        f"""
        max_items: 1000000000000
        defaults: {{model: wan2.2-t2i-flash}}
        prompts:
          - prompt: "{{a}} {{b}} {{c}}"
            matrix: {{a: [{values}], b: [{values}], c: [{values}]}}
            seed: {{range: [0, 1000]}}
        """,
    )
    assert manifest.count() == 10**12 and manifest.max_items == 10**12


def test_max_items_can_be_raised(tmp_path: Path) -> None:
    """1,000,001 items (a seed range, walked lazily) are refused by default and accepted with max_items."""
    text = "defaults: {model: wan2.2-t2i-flash}\nprompts:\n  - prompt: a fox\n    seed: {range: [0, 1000001]}\n"
    with pytest.raises(ManifestInvalid, match="allowed: at most 1,000,000"):
        load_manifest(tmp_path, text)
    manifest = load_manifest(tmp_path, "max_items: 1000001\n" + text)
    assert manifest.count() == 1_000_001
    assert [item.seed for item in itertools.islice(manifest.items(), 3)] == [0, 1, 2]


# --- errors -----------------------------------------------------------------------------------------


def _expectations(path: Path) -> tuple[str, int, str, list[str]]:
    text = path.read_text()
    found = re.search(r"^# expect: (\S+):(\d+) (.+)$", text, re.M)
    assert found, f"{path.name} lacks an '# expect: FILE:LINE FIELD' line"
    return found[1], int(found[2]), found[3], re.findall(r"^# says: (.+)$", text, re.M)


def test_bad_corpus_is_large_enough() -> None:
    """The corpus of malformed manifests holds at least 25 cases."""
    assert len(list(BAD_MANIFESTS.glob("*.yaml"))) >= 25


@pytest.mark.parametrize("path", sorted(BAD_MANIFESTS.glob("*.yaml")), ids=lambda p: p.stem)
def test_bad_manifest_names_file_line_and_field(path: Path) -> None:
    """Each malformed manifest is refused with an error at its expected file:line and field, saying why."""
    file, line, field, says = _expectations(path)
    with pytest.raises(ManifestInvalid) as caught:
        Manifest.from_yaml(path).validate()
    located = [e for e in caught.value.errors if Path(e.path).name == file and e.line == line]
    assert any((e.field or "-") == field for e in located), str(caught.value)
    message = str(caught.value)
    assert f"{file}:{line}: " in message
    for phrase in says:
        assert phrase in message


def test_all_errors_are_collected_in_line_order(tmp_path: Path) -> None:
    """Several mistakes are reported together, by line, each with found and allowed."""
    errors = errors_of(
        tmp_path,
        """
        region: bejing
        defaults: {model: wan2.2-t2i-flsh, n: 9}
        prompts:
          - prompt: "a {animl}"
            matrix: {animal: [fox]}
            colour: red
        """,
    )
    assert [(e.line, e.field) for e in errors] == [
        (2, "region"),
        (3, "defaults.model"),
        (3, "defaults.n"),
        (5, "prompts[0].prompt"),
        (7, "prompts[0].colour"),
    ]
    assert all("found" in e.detail and "allowed" in e.detail for e in errors)


def test_per_item_errors_are_all_collected(tmp_path: Path) -> None:
    """validate() reports each bad (size, model) pair once, however many items share it."""
    errors = errors_of(
        tmp_path,
        """
        prompts:
          - prompt: "a {animal}"
            matrix:
              animal: [fox, owl, heron]
              model: [wan2.2-t2i-flash, wan2.6-t2i]
              size: ["512*512", "768*2700", "2000*2000"]
        """,
    )
    found = {(e.field, re.search(r"which (\S+) does not make", e.detail)[1]) for e in errors}
    assert found == {
        ("prompts[0].matrix.size[0]", "wan2.6-t2i"),
        ("prompts[0].matrix.size[1]", "wan2.2-t2i-flash"),
        ("prompts[0].matrix.size[2]", "wan2.6-t2i"),
        ("prompts[0].matrix.size[2]", "wan2.2-t2i-flash"),
    }
    assert all("did you mean" in e.detail for e in errors)


@pytest.mark.parametrize(
    ("written", "says"),
    [
        ("wan2.5-t2i", "did you mean 'wan2.5-t2i-preview'?"),
        ("wan2.2-t2i", "did you mean one of 'wan2.2-t2i-plus', 'wan2.2-t2i-flash'?"),
        ("wan2.7-t2i", None),
        ("flash", None),
    ],
)
def test_a_misspelt_model_is_matched_within_its_version_only(tmp_path: Path, written: str, says: str | None) -> None:
    """A model name is suggested only from the version written (another costs another price); else none."""
    (error,) = errors_of(tmp_path, f"defaults: {{model: {written}}}\nprompts: [a fox]\n")
    assert "allowed: one of wan2.6-t2i, wan2.5-t2i-preview" in error.detail
    if says is None:
        assert "did you mean" not in error.detail
    else:
        assert error.detail.endswith(says) and "wan2.6-t2i'?" not in error.detail


def test_every_error_is_reported_in_one_pass(tmp_path: Path) -> None:
    """A malformed size and two sizes the model does not make are reported together, not one fix at a time."""
    errors = errors_of(
        tmp_path,
        """
        defaults: {model: wan2.2-t2i-flash}
        prompts:
          - {prompt: a fox, size: "1024x"}
          - {prompt: an owl, size: "100*100"}
          - {prompt: a heron, size: "5000*5000"}
          - {prompt: a cat, size: "1024*1024"}
        """,
    )
    assert [(e.line, e.field) for e in errors] == [(4 + i, f"prompts[{i}].size") for i in range(3)]


def test_an_entry_under_a_refused_default_is_not_checked_again(tmp_path: Path) -> None:
    """A refused top-level model is reported once, not again as "no model" on each entry that inherits it."""
    errors = errors_of(
        tmp_path,
        """
        defaults: {model: wan2.7-t2i}
        prompts:
          - a fox
          - {prompt: an owl, model: wan2.2-t2i-flash, size: "100*100"}
        """,
    )
    assert [(e.line, e.field) for e in errors] == [(2, "defaults.model"), (5, "prompts[1].size")]


def test_errors_stop_at_a_cap(tmp_path: Path) -> None:
    """A manifest with 60 bad entries reports 50 errors and says it stopped."""
    bad = "".join(f"  - {{prompt: p{i}, n: {10 + i}}}\n" for i in range(60))
    with pytest.raises(ManifestInvalid) as caught:
        load_manifest(tmp_path, "defaults: {model: wan2.2-t2i-flash}\nprompts:\n" + bad)
    assert len(caught.value.errors) == 50 and caught.value.truncated
    assert "stopped counting" in str(caught.value)


def test_items_raise_at_the_first_bad_item(tmp_path: Path) -> None:
    """items() yields the good items before a bad one, then raises naming it."""
    manifest = load_manifest(
        tmp_path, "defaults: {model: wan2.2-t2i-flash}\nprompts:\n  - a fox\n  - {prompt: b, size: 9*9}\n"
    )
    stream = manifest.items()
    assert next(stream).prompt == "a fox"
    with pytest.raises(ManifestInvalid, match=r"job.yaml:4: prompts\[1\].size"):
        next(stream)


def test_a_long_prompt_is_a_warning_not_an_error(tmp_path: Path) -> None:
    """A prompt past the model's limit validates with a warning naming the limit."""
    manifest = load_manifest(tmp_path, f"defaults: {{model: wan2.2-t2i-flash}}\nprompts:\n  - {'fox ' * 200}\n")
    (warning,) = manifest.validate()
    assert "job.yaml:3" in warning and "reads the first 500" in warning
    assert len(next(manifest.items()).prompt) == 799


def test_a_missing_manifest_is_an_error(tmp_path: Path) -> None:
    """A path that does not exist raises a ManifestError naming it."""
    with pytest.raises(ManifestError, match="no such file"):
        Manifest.from_yaml(tmp_path / "nope.yaml")


@pytest.mark.parametrize("job", EXAMPLE_JOBS, ids=lambda path: path.stem)
def test_survey_counts_what_the_items_are(job: Path) -> None:
    """survey() counts items and images per (region, model) without making them: the same as the items made."""
    manifest = Manifest.from_yaml(job)
    made: dict[tuple[str, str], list[int]] = {}
    for item in manifest.items():
        lane = made.setdefault((item.region, item.model), [0, 0])
        lane[0] += 1
        lane[1] += item.n
    assert manifest.survey().lanes == {key: tuple(value) for key, value in made.items()}
    assert sum(items for items, _ in manifest.survey().lanes.values()) == manifest.count()


def test_digest_follows_the_text_and_the_prompts_files(tmp_path: Path) -> None:
    """The digest changes with the manifest's text or a prompts file's content, and only then."""
    (tmp_path / "p.txt").write_text("a fox\n")
    path = tmp_path / "job.yaml"
    path.write_text("defaults: {model: wan2.2-t2i-flash}\nprompts: [{file: p.txt}]\n")
    first = Manifest.from_yaml(path).digest
    assert Manifest.from_yaml(path).digest == first
    (tmp_path / "p.txt").write_text("a fox\na hare\n")
    second = Manifest.from_yaml(path).digest
    path.write_text("defaults: {model: wan2.2-t2i-flash, n: 2}\nprompts: [{file: p.txt}]\n")
    assert len({first, second, Manifest.from_yaml(path).digest}) == 3


def test_a_prompts_file_is_surveyed_like_the_items_it_makes(tmp_path: Path) -> None:
    """A .txt entry with axes, seeds, repeats and a negative prompt: counts, and each over-long line warned."""
    long = "hare " * 120
    (tmp_path / "p.txt").write_text(f"a fox\n# a comment\n\n{long}\na crow\n")
    manifest = load_manifest(
        tmp_path,
        "defaults: {repeats: 2, seed: [1, 2], negative_prompt: 'blur, {style}'}\n"
        "prompts:\n  - file: p.txt\n    prompt: '{prompt}, {style}'\n"
        "    matrix: {model: [wan2.2-t2i-flash, wan2.6-t2i], style: [ink, oil]}\n",
    )
    made: dict[tuple[str, str], list[int]] = {}
    for item in manifest.items():
        lane = made.setdefault((item.region, item.model), [0, 0])
        lane[0], lane[1] = lane[0] + 1, lane[1] + item.n
    survey = manifest.survey()
    assert survey.lanes == {key: tuple(value) for key, value in made.items()} and sum(made[k][0] for k in made) == 48
    (warning,) = survey.warnings  # wan2.6 reads 2,100 characters: only wan2.2-t2i-flash's 500 are passed
    assert "p.txt:4" in warning and "reads the first 500" in warning


def test_an_item_carries_its_request_as_canonical_json() -> None:
    """request_json (what the ledger stores) is the request as compact sorted JSON, and hashes to the id."""
    for item in Manifest.from_yaml("jobs/seeds-and-repeats.yaml").items():
        assert item.request_json == json.dumps(
            item.request(), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        )
        assert item.item_id == item_id(item.request(), item.replica)


def test_the_items_of_a_prompts_file_are_made_line_by_line_as_any_records(tmp_path: Path) -> None:
    """A .txt file and the same prompts as a .csv make the same requests, variables and sources, item by item."""
    lines = ["a fox", "a hare", "hare " * 120, "a crow"]
    (tmp_path / "p.txt").write_text("".join(f"{line}\n" for line in lines))
    (tmp_path / "p.csv").write_text("prompt\n" + "".join(f"{line}\n" for line in lines))
    job = (
        "name: same\ndefaults: {seed: {count: 2}, negative_prompt: 'blur, {style}'}\nprompts:\n  - file: p.%s\n"
        "    prompt: '{prompt}, {style}'\n    matrix: {model: [wan2.2-t2i-flash, wan2.6-t2i], style: [ink, oil]}\n"
    )
    (tmp_path / "txt.yaml").write_text(job % "txt")
    (tmp_path / "csv.yaml").write_text(job % "csv")
    from_txt = list(Manifest.from_yaml(tmp_path / "txt.yaml").items())
    from_csv = list(Manifest.from_yaml(tmp_path / "csv.yaml").items())
    assert len(from_txt) == 4 * 2 * 2 * 2
    assert [(i.request(), dict(i.variables), i.source.split(":")[1]) for i in from_txt] == [
        (i.request(), dict(i.variables), str(int(i.source.split(":")[1]) - 1)) for i in from_csv
    ]
    assert from_txt[0].variables["prompt"] == "a fox"  # items made earlier keep their own values
