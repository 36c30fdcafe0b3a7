"""Prompts, resolutions and seeds of `clear synth` (no model needed)."""

from __future__ import annotations

import json

import pytest

from clear_cli.data import layout
from clear_cli.data.prompts import builtin_prompts, load_prompts, prompts_fingerprint
from clear_cli.errors import UsageError


def test_builtin_prompts_are_many_unique_varied_and_stable():
    prompts = builtin_prompts(10_000)
    assert len(prompts) == 10_000 and len(set(prompts)) == 10_000
    assert builtin_prompts(50) == prompts[:50]  # prefix property: asking for more never changes the first ones
    assert all(p and p[0].isupper() and len(p.split()) >= 5 for p in prompts)
    # varied: many distinct subjects and openings, no text requested in the image
    assert len({p.split(",")[0] for p in prompts}) > 9_000
    assert len({p.split()[0] for p in prompts}) > 30
    banned = (" sign", " text", " letters", " logo", " words", " caption", " typography")
    assert not [p for p in prompts if any(b in p.lower() for b in banned)]
    # fixed forever (a dataset records which set it used): pin the first prompt
    assert prompts[0] == ("A pencil sketch of a fluffy fisherman under a cherry blossom canopy, "
                          "northern lights overhead, panoramic view")


def test_prompt_files_of_each_kind(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a red fox\n\n  a blue boat  \n")
    assert load_prompts(txt) == ["a red fox", "a blue boat"]
    jl = tmp_path / "p.jsonl"
    jl.write_text(json.dumps({"prompt": "one", "x": 1}) + "\n\n" + json.dumps({"prompt": "two"}) + "\n")
    assert load_prompts(jl) == ["one", "two"]
    jl2 = tmp_path / "c.jsonl"
    jl2.write_text(json.dumps({"caption": "cap"}) + "\n")
    assert load_prompts(jl2, column="caption") == ["cap"]
    csv = tmp_path / "p.csv"
    csv.write_text('id,text\n1,"a cat, sleeping"\n2,a dog\n')
    assert load_prompts(csv, column="text") == ["a cat, sleeping", "a dog"]
    # the fingerprint follows content and column, not the path
    assert prompts_fingerprint(csv, "text") != prompts_fingerprint(csv, "id")
    assert prompts_fingerprint("builtin", "prompt") == "clear-prompts-v1"


@pytest.mark.parametrize("name,content,column,needle", [
    ("missing.txt", None, "prompt", "file not found"),
    ("empty.txt", "\n \n", "prompt", "holds no prompts"),
    ("bad.csv", "id,text\n1,x\n", "prompt", "no column 'prompt' (columns: id, text)"),
    ("bad.jsonl", '{"text": "x"}\n', "prompt", "line 1 has no 'prompt' field"),
    ("broken.jsonl", "{not json\n", "prompt", "line 1 is not JSON"),
    ("p.yaml", "a: b\n", "prompt", "unknown file type"),
])
def test_bad_prompt_files_are_one_clear_error(tmp_path, name, content, column, needle):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(UsageError) as e:
        load_prompts(path, column=column)
    assert needle in e.value.one_line() and "\n" not in e.value.one_line()


def test_builtin_needs_n():
    with pytest.raises(UsageError, match="--n"):
        load_prompts("builtin")


def test_parse_res():
    assert layout.parse_res("1k") == (1024, 1024)
    assert layout.parse_res("2k") == (2048, 2048)
    assert layout.parse_res("256") == (256, 256)
    assert layout.parse_res("1024x768") == (1024, 768)
    for bad in ("100", "100x64", "1k5", "0", "-16"):
        with pytest.raises(UsageError, match="--res"):
            layout.parse_res(bad)


def test_sample_seeds_depend_on_seed_and_index_only():
    seeds = [layout.sample_seed(0, i) for i in range(1000)]
    assert len(set(seeds)) == 1000 and all(0 <= s < 2**63 for s in seeds)
    assert layout.sample_seed(0, 1) != layout.sample_seed(1, 0)
    assert layout.sample_seed(7, 3) == layout.sample_seed(7, 3)
    assert layout.chunk_indices(2, 10, 4) == [8, 9] and layout.num_chunks(10, 4) == 3
