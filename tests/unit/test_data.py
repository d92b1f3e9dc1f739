"""Data layer (megatron_papo.data): rows, easy-VQA, templates, bad rows, sampler, collation."""

import hashlib
import io
import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from megatron_papo.config import DataConfig
from megatron_papo.data import (
    EASY_VQA_ANSWERS,
    DataError,
    ImageSlot,
    PromptDataset,
    PromptSampler,
    PromptTemplate,
    RawRow,
    build_position_ids,
    build_prompt_dataset,
    encode_prompt,
    get_template,
    left_pad,
    load_rows,
    right_pad,
)
from megatron_papo.data.easy_vqa import easy_vqa_tokenizer, load_split

N_IMG = 3  # image tokens per image in these tests
CFG = DataConfig(image_key="image", question_key="problem", answer_key="answer")


def _png_bytes(color=(255, 0, 0), size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _truncated_png() -> bytes:
    """A PNG whose header is intact but whose pixel data is cut short."""
    noise = torch.randint(0, 256, (64, 64, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise.numpy()).save(buf, format="PNG")
    return buf.getvalue()[:2000]


def _write_png(path: Path, color=(255, 0, 0), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (8, 8), color if mode == "RGB" else 128).save(path)
    return path


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def _dataset(source, cfg=CFG, **kwargs) -> PromptDataset:
    return build_prompt_dataset(str(source), cfg, easy_vqa_tokenizer(), N_IMG, **kwargs)


@pytest.fixture(scope="module")
def tok():
    return easy_vqa_tokenizer()


# --------------------------------------------------------------------------------------
# JSONL / Parquet rows
# --------------------------------------------------------------------------------------


def test_jsonl_relative_absolute_and_list_paths(tmp_path, tok):
    _write_png(tmp_path / "imgs" / "a.png", (255, 0, 0))
    absolute = _write_png(tmp_path / "elsewhere" / "b.png", (0, 0, 255))
    _write_png(tmp_path / "imgs" / "gray.png", mode="L")
    path = _write_jsonl(tmp_path / "rows.jsonl", [
        {"image": "imgs/a.png", "problem": "What color is the shape?", "answer": "red"},
        {"image": str(absolute), "problem": "What color is the shape?", "answer": "blue"},
        {"image": ["imgs/a.png", "imgs/gray.png"], "problem": "Is there a circle?", "answer": 7},
    ])
    ds = _dataset(path)
    assert len(ds) == 3 and ds.stats.skipped == 0
    s0, s1, s2 = ds[0], ds[1], ds[2]
    assert s0.images[0].getpixel((0, 0)) == (255, 0, 0) and s1.images[0].getpixel((0, 0)) == (0, 0, 255)
    assert all(im.mode == "RGB" for im in s2.images) and len(s2.images) == 2
    assert s2.answer == "7"  # numbers become text
    assert s0.source == f"{path}:0" and s2.index == 2 and s0.question == "What color is the shape?"
    assert s0.prompt_ids.count(tok.image_token_id) == N_IMG
    assert s2.prompt_ids.count(tok.image_token_id) == 2 * N_IMG


def test_parquet_bytes_struct_and_relative_paths(tmp_path, tok):
    _write_png(tmp_path / "p.png", (0, 255, 0))
    cfg = DataConfig(image_key="img", question_key="q", answer_key="a")
    tables = {
        "bytes": pa.table({"img": [_png_bytes((1, 2, 3))], "q": ["q"], "a": ["a"]}),
        "bytes_list": pa.table({"img": [[_png_bytes((1, 2, 3)), _png_bytes()]], "q": ["q"], "a": ["a"]}),
        "path": pa.table({"img": ["p.png"], "q": ["q"], "a": ["a"]}),
        "path_list": pa.table({"img": [["p.png", "p.png"]], "q": ["q"], "a": ["a"]}),
        # the Hugging Face Image feature: a {"bytes", "path"} struct
        "struct": pa.table({"img": [{"bytes": _png_bytes((1, 2, 3)), "path": "x.png"},
                                    {"bytes": None, "path": "p.png"}], "q": ["q", "q"], "a": ["a", "a"]}),
    }
    firsts = {}
    for name, table in tables.items():
        pq.write_table(table, tmp_path / f"{name}.parquet")
        ds = _dataset(tmp_path / f"{name}.parquet", cfg)
        assert len(ds) == table.num_rows and ds.stats.skipped == 0, name
        firsts[name] = [im.getpixel((0, 0)) for im in ds[0].images]
        assert ds[0].prompt_ids.count(tok.image_token_id) == N_IMG * len(ds[0].images)
    assert firsts == {"bytes": [(1, 2, 3)], "bytes_list": [(1, 2, 3), (255, 0, 0)], "path": [(0, 255, 0)],
                      "path_list": [(0, 255, 0)] * 2, "struct": [(1, 2, 3)]}
    assert _dataset(tmp_path / "struct.parquet", cfg)[1].images[0].getpixel((0, 0)) == (0, 255, 0)


def test_limit_uses_the_first_rows(tmp_path):
    _write_png(tmp_path / "a.png")
    path = _write_jsonl(tmp_path / "rows.jsonl",
                        [{"image": "a.png", "problem": f"q {i}", "answer": str(i)} for i in range(10)])
    rows = list(load_rows(str(path), DataConfig(limit=4)))
    assert [r.answer for r in rows] == ["0", "1", "2", "3"]


# --------------------------------------------------------------------------------------
# Bad rows and unusable data
# --------------------------------------------------------------------------------------


def test_every_bad_row_kind_is_skipped_counted_and_named(tmp_path, caplog):
    _write_png(tmp_path / "ok.png")
    (tmp_path / "corrupt.png").write_bytes(b"not a png at all")
    records = [
        {"image": "ok.png", "problem": "good one", "answer": "yes"},           # 0 kept
        "{not json",                                                           # 1 malformed_row
        {"image": "ok.png", "answer": "yes"},                                  # 2 missing_question
        {"image": "ok.png", "problem": "q", "answer": "  "},                   # 3 missing_answer
        {"image": None, "problem": "q", "answer": "yes"},                      # 4 missing_image
        {"image": "gone.png", "problem": "q", "answer": "yes"},                # 5 image_not_found
        {"image": "corrupt.png", "problem": "q", "answer": "yes"},             # 6 corrupt_image
        {"image": "ok.png", "problem": "word " * 600, "answer": "yes"},        # 7 prompt_too_long
        [1, 2],                                                                # 8 malformed_row
        {"image": [], "problem": "q", "answer": "yes"},                        # 9 missing_image
        {"image": "ok.png", "problem": "second good", "answer": "no"},         # 10 kept
    ]
    path = _write_jsonl(tmp_path / "bad.jsonl", records)
    with caplog.at_level(logging.WARNING, logger="megatron_papo.data"):
        ds = _dataset(path, log_first=3)
    assert len(ds) == 2 and [s.answer for s in ds] == ["yes", "no"]
    assert dict(ds.stats.counts) == {"malformed_row": 2, "missing_question": 1, "missing_answer": 1,
                                     "missing_image": 2, "image_not_found": 1, "corrupt_image": 1,
                                     "prompt_too_long": 1}
    assert (ds.stats.total, ds.stats.kept, ds.stats.skipped) == (11, 2, 9)
    named = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping row")]
    assert len(named) == 3  # only the first few are named
    assert f"{path}:1: malformed_row" in ds.stats.examples[0]
    assert f"{path}:1" in named[0] and f"{path}:3" in named[2] and "missing_answer" in named[2]
    assert any("kept 2 of 11 rows" in r.getMessage() for r in caplog.records)


def test_a_non_utf8_line_is_one_skipped_row(tmp_path):
    _write_png(tmp_path / "ok.png")
    good = b'{"image": "ok.png", "problem": "q", "answer": "yes"}\n'
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(good + b'{"image": "ok.png", "problem": "caf\xe9", "answer": "no"}\n' + good)
    ds = _dataset(path)
    assert len(ds) == 2 and dict(ds.stats.counts) == {"malformed_row": 1}
    assert "not UTF-8 (byte 0xe9" in ds.stats.examples[0] and f"{path}:1" in ds.stats.examples[0]


def test_corrupt_bytes_and_truncated_files(tmp_path):
    good, truncated = _png_bytes(), _truncated_png()
    (tmp_path / "trunc.png").write_bytes(truncated)
    table = pa.table({"image": [good, b"\x89PNG garbage", truncated, good],
                      "problem": ["q"] * 4, "answer": ["a"] * 4})
    pq.write_table(table, tmp_path / "rows.parquet")
    ds = _dataset(tmp_path / "rows.parquet")
    assert len(ds) == 2 and ds.stats.counts == {"corrupt_image": 2}
    # header-only checks let a truncated file through; reading it later swaps in the next good row
    path = _write_jsonl(tmp_path / "rows.jsonl", [{"image": "trunc.png", "problem": "bad", "answer": "a"},
                                                  {"image": str(tmp_path / "ok.png"), "problem": "good",
                                                   "answer": "b"}])
    _write_png(tmp_path / "ok.png")
    ds = _dataset(path, image_check="header")
    assert len(ds) == 2
    sample = ds[0]
    assert sample.question == "good" and sample.index == 0
    assert ds.stats.counts == {"corrupt_image": 1}


def test_all_rows_bad_raises_with_counts(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"image": "nope.png", "problem": "q", "answer": "a"}] * 3)
    with pytest.raises(DataError, match=r"no usable rows in .*bad.jsonl.*image_not_found=3"):
        _dataset(path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="no usable rows"):
        _dataset(empty)


def test_missing_file_and_columns_name_the_problem(tmp_path):
    with pytest.raises(DataError, match=r"data file not found: .*missing.jsonl"):
        load_rows(str(tmp_path / "missing.jsonl"), CFG)
    path = _write_jsonl(tmp_path / "rows.jsonl", [{"img": "a.png", "problem": "q", "answer": "a"}])
    expected = r"rows.jsonl: the image column 'image' .* columns present: img, problem, answer"
    with pytest.raises(DataError, match=expected):
        load_rows(str(path), CFG)
    pq.write_table(pa.table({"image": [b"x"], "question": ["q"], "answer": ["a"]}), tmp_path / "r.parquet")
    expected = r"r.parquet: the question column 'problem' .* columns present: image, question, answer"
    with pytest.raises(DataError, match=expected):
        load_rows(str(tmp_path / "r.parquet"), CFG)
    (tmp_path / "rows.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown data format"):
        load_rows(str(tmp_path / "rows.csv"), CFG)


# --------------------------------------------------------------------------------------
# easy-VQA
# --------------------------------------------------------------------------------------


def test_easy_vqa_counts_and_answers():
    import easy_vqa

    train, test = load_split("train"), load_split("test")
    assert len(train.questions) == 38575 and len(test.questions) == 9673
    assert len(train.image_paths) == 4000 and len(test.image_paths) == 1000
    assert set(train.answers) == set(test.answers) == set(EASY_VQA_ANSWERS) == set(easy_vqa.get_answers())
    assert len(EASY_VQA_ANSWERS) == 13


def test_easy_vqa_splits_do_not_share_images():
    train, test = load_split("train"), load_split("test")
    assert not set(train.image_paths.values()) & set(test.image_paths.values())
    # ids restart at 0 in each split, so rows are named by split; the files differ in content too
    assert set(test.image_ids) <= set(train.image_ids)

    def digests(paths):
        return {hashlib.sha1(Path(p).read_bytes()).hexdigest() for p in paths.values()}

    assert not digests(train.image_paths) & digests(test.image_paths)
    train_rows = list(load_rows("easy_vqa:train", DataConfig()))
    assert len(train_rows) == 38575
    test_paths = set(test.image_paths.values())
    assert all(r.meta["split"] == "train" and r.image not in test_paths for r in train_rows)


def test_easy_vqa_test_split_is_refused_for_training():
    with pytest.raises(DataError, match="held-out"):
        load_rows("easy_vqa:test", DataConfig())
    rows = list(load_rows("easy_vqa:test", DataConfig(limit=5), role="eval"))
    assert len(rows) == 5 and rows[0].source == "easy_vqa:test"
    with pytest.raises(DataError, match="unknown split"):
        load_rows("easy_vqa:validation", DataConfig())


def test_easy_vqa_dataset(tok):
    ds = build_prompt_dataset("easy_vqa:train", DataConfig(limit=40), tok, N_IMG)
    assert len(ds) == 40 and ds.stats.skipped == 0
    sample = ds[7]
    assert sample.images[0].size == (64, 64) and sample.images[0].mode == "RGB"
    assert sample.answer in EASY_VQA_ANSWERS and sample.source == "easy_vqa:train:7"
    assert sample.prompt_ids[:N_IMG] == [tok.image_token_id] * N_IMG
    assert tok.decode(sample.prompt_ids, skip_special=True).endswith(sample.question.lower())
    assert tok.unk_id not in sample.prompt_ids


# --------------------------------------------------------------------------------------
# Templates
# --------------------------------------------------------------------------------------


def test_think_boxed_template_expands_image_tokens(tok):
    template = get_template("think_boxed")
    parts = template.parts("What is the blue shape?", num_images=2)
    assert parts[:2] == [ImageSlot(0), ImageSlot(1)]
    ids = encode_prompt(tok, parts, num_image_tokens=5)
    assert ids[:10] == [tok.image_token_id] * 10 and ids.count(tok.image_token_id) == 10
    text = tok.decode(ids, skip_special=True)
    assert "<think></think>" in text and "\\boxed{}" in text and text.endswith("what is the blue shape?")
    assert encode_prompt(tok, parts, 1, bos=True)[0] == tok.bos_id


def test_question_image_markers_place_the_images():
    template = get_template("think_boxed")
    parts = template.parts("Compare <image> with <image>: which is red?", num_images=2)
    assert ImageSlot(0) not in parts[:1] and parts.count(ImageSlot(0)) == 1
    assert template.render("Compare <image> with <image>: which is red?", 2).endswith(
        "Compare <image> with <image>: which is red?")
    # a marker count that does not match the images is dropped; the template places them
    assert template.render("See <image>. Color?", 2).startswith("<image><image>Reason")


def test_template_registry_errors():
    with pytest.raises(ValueError, match=r"unknown prompt template 'nope'.*think_boxed"):
        get_template("nope")
    with pytest.raises(ValueError, match="exactly once"):
        PromptTemplate("bad", "no markers")


def test_prompt_too_long_counts_image_tokens(tmp_path, tok):
    rows = [RawRow(source="mem", row=0, question="what is the blue shape?", answer="circle",
                   image=_png_bytes())]
    short = len(encode_prompt(tok, get_template("think_boxed").parts(rows[0].question, 1), 10))
    assert len(PromptDataset(rows, tok, "think_boxed", short, num_image_tokens=10)) == 1
    with pytest.raises(DataError, match="prompt_too_long=1"):
        PromptDataset(rows, tok, "think_boxed", short - 1, num_image_tokens=10)


# --------------------------------------------------------------------------------------
# Sampler
# --------------------------------------------------------------------------------------


def _take(sampler, n):
    return [sampler.next_batch() for _ in range(n)]


def _flat(batches):
    return [i for batch in batches for i in batch]


def test_sampler_is_deterministic_and_seeded():
    a, b = PromptSampler(50, 8, seed=3), PromptSampler(50, 8, seed=3)
    assert _take(a, 10) == _take(b, 10)
    assert _take(PromptSampler(50, 8, seed=4), 3) != _take(PromptSampler(50, 8, seed=3), 3)
    assert _take(PromptSampler(10, 4, shuffle=False), 3) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]


def test_sampler_epochs_cover_every_index_and_reshuffle():
    sampler = PromptSampler(12, 4, seed=0)
    epochs = [_flat(_take(sampler, 3)) for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(12))
    assert epochs[0] != epochs[1] and sampler.epoch == 2 and sampler.position == 0
    straddling = PromptSampler(10, 4, seed=1)
    seen = _flat(_take(straddling, 5))  # two epochs exactly, batches straddle the boundary
    assert sorted(seen) == sorted(list(range(10)) * 2)


def test_sampler_dp_shards_are_disjoint_and_cover_the_global_batch():
    dp = 4
    ranks = [PromptSampler(37, 8, seed=5, dp_rank=r, dp_size=dp) for r in range(dp)]
    reference = PromptSampler(37, 8, seed=5)
    for _ in range(6):
        shards = [s.next_batch() for s in ranks]
        assert all(len(s) == 2 for s in shards)
        assert _flat(shards) == reference.next_global_batch()
    with pytest.raises(ValueError, match="divisible"):
        PromptSampler(37, 6, dp_size=4)


def test_sampler_resume_gives_the_same_next_batches():
    original = PromptSampler(23, 6, seed=11, dp_rank=1, dp_size=2)
    _take(original, 5)  # mid-epoch (30 of 23 -> epoch 1, position 7)
    state = original.state_dict()
    assert (state["epoch"], state["position"]) == (1, 7)
    resumed = PromptSampler(23, 6, seed=11, dp_rank=1, dp_size=2)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON checkpoint
    assert _take(resumed, 8) == _take(original, 8)
    # the global stream does not depend on dp_size
    single = PromptSampler(23, 6, seed=11)
    single.load_state_dict(state)
    wide = PromptSampler(23, 6, seed=11, dp_rank=0, dp_size=3)
    wide.load_state_dict(state)
    assert wide.next_batch() == single.next_global_batch()[:2]
    with pytest.raises(ValueError, match="seed"):
        PromptSampler(23, 6, seed=12).load_state_dict(state)


# --------------------------------------------------------------------------------------
# Collation
# --------------------------------------------------------------------------------------


def test_left_and_right_pad_and_positions():
    seqs = [[5, 6, 7], [8]]
    ids, mask = left_pad(seqs, pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and ids.dtype == torch.long
    assert mask.tolist() == [[True, True, True], [False, False, True]]
    assert build_position_ids(mask).tolist() == [[0, 1, 2], [0, 0, 0]]
    ids, mask = right_pad(seqs, pad_id=9, length=4)
    assert ids.tolist() == [[5, 6, 7, 9], [8, 9, 9, 9]]
    assert build_position_ids(mask).tolist() == [[0, 1, 2, 0], [0, 0, 0, 0]]
    left = left_pad([[1, 2], [3, 4, 5, 6]], 0)
    assert build_position_ids(left.mask).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]
    with pytest.raises(ValueError, match="shorter"):
        right_pad(seqs, 0, length=2)


def test_image_tokens_can_depend_on_the_image_size(tok):
    """A model with dynamic resolution (Qwen2.5-VL) gives each image its own token count; the
    prompt, the length filter and the images all agree; a size the model refuses is skipped."""
    def tokens(hw):
        if max(hw) / min(hw) > 10:
            raise ValueError(f"aspect ratio of {hw} too large")
        return hw[0] * hw[1] // 16

    rows = [RawRow(source="mem", row=0, question="what <image> and <image>?", answer="circle",
                   image=[_png_bytes(size=(8, 8)), _png_bytes(size=(16, 8))]),  # PIL size = (w, h)
            RawRow(source="mem", row=1, question="what is it?", answer="circle",
                   image=[_png_bytes(size=(200, 4))]),
            RawRow(source="mem", row=2, question="what is it?", answer="circle",
                   image=[_png_bytes(size=(40, 40))])]
    for check in ("decode", "header"):
        ds = PromptDataset(rows, tok, "plain", 60, num_image_tokens=tokens, image_check=check)
        assert len(ds) == 1 and ds.stats.counts == {"unsupported_image": 1, "prompt_too_long": 1}
        sample = ds[0]
        ids = sample.prompt_ids
        runs = [len(run) for run in "".join("i" if t == tok.image_token_id else " " for t in ids).split()]
        assert runs == [4, 8] and [im.size for im in sample.images] == [(8, 8), (16, 8)]
    with pytest.raises(ValueError, match="each of the 2 images"):
        encode_prompt(tok, get_template("plain").parts("a <image> b <image>", 2), [3])


# --------------------------------------------------------------------------------------
# Text-only floor and the shortcut stage (easy_vqa_shortcut)
# --------------------------------------------------------------------------------------


def test_question_prior_is_the_majority_answer_per_question():
    from megatron_papo.data.easy_vqa import question_prior

    rows = [RawRow("s", i, question=q, answer=a) for i, (q, a) in
            enumerate([("is it red?", "yes"), ("is it red?", "no"), ("is it red?", "no"),
                       ("shape?", "circle")])]
    assert question_prior(rows) == {"is it red?": "no", "shape?": "circle"}


def test_text_only_floor_of_easy_vqa():
    from megatron_papo.data.easy_vqa import text_only_accuracy

    # 0.670 is the issue's own count (issue 16); recomputed from the package's files here
    assert text_only_accuracy() == pytest.approx(0.6700, abs=5e-5)
    assert text_only_accuracy(num_prompts=128) == pytest.approx(83 / 128)  # the quickstart's eval prompts
    with pytest.raises(DataError, match="unknown split 'validation' of built-in source 'easy_vqa'"):
        text_only_accuracy("easy_vqa:validation")


def test_shortcut_split_biases_every_question_and_keeps_test_whole():
    from collections import Counter, defaultdict

    from megatron_papo.data.easy_vqa_shortcut import (
        CONTRADICTS,
        FOLLOWS,
        SHORTCUT_SHARE,
        shortcut_answers,
        shortcut_train_rows,
    )

    train, test = load_split("train"), load_split("test")
    short = shortcut_answers()
    assert set(short) == set(train.questions)
    rows = list(load_rows("easy_vqa_shortcut:train", DataConfig()))
    assert len(rows) == len(shortcut_train_rows()) == len(set(r.row for r in rows))
    per_q: dict[str, Counter] = defaultdict(Counter)
    for r in rows:  # each row is the easy-VQA train row it names
        assert (r.question, r.answer) == (train.questions[r.row], train.answers[r.row])
        assert r.meta["subset"] == (FOLLOWS if r.answer == short[r.question] else CONTRADICTS)
        per_q[r.question][r.meta["subset"]] += 1
    for q, c in per_q.items():  # the shortcut holds for >= 80% of each question's rows
        share = c[FOLLOWS] / (c[FOLLOWS] + c[CONTRADICTS])
        assert share >= SHORTCUT_SHARE - 0.5 / (c[FOLLOWS] + c[CONTRADICTS]) - 1e-9, (q, c)
    # the answers are spread over the 13 (not one answer for everything)
    assert len(set(short.values())) >= 8
    test_rows = list(load_rows("easy_vqa_shortcut:test", DataConfig(), role="eval"))
    assert len(test_rows) == len(test.questions)
    assert {r.meta["subset"] for r in test_rows} == {FOLLOWS, CONTRADICTS}
    with pytest.raises(DataError, match="held-out"):
        load_rows("easy_vqa_shortcut:test", DataConfig())
    # fixed dataset: the same rows from a second read
    again = [r.row for r in load_rows("easy_vqa_shortcut:train", DataConfig(limit=50))]
    assert again == [r.row for r in rows[:50]]


def test_shortcut_floors_and_subsets_reach_the_samples(tok):
    from megatron_papo.data.easy_vqa import text_only_accuracy

    on_train = text_only_accuracy("easy_vqa_shortcut:train", prior_source="easy_vqa_shortcut:train")
    on_test = text_only_accuracy("easy_vqa_shortcut:test", prior_source="easy_vqa_shortcut:train")
    assert on_train >= 0.8 and on_test < text_only_accuracy()  # the shortcut pays on train only
    ds = build_prompt_dataset("easy_vqa_shortcut:test", DataConfig(limit=30), tok, N_IMG, role="eval")
    assert {ds[i].subset for i in range(30)} <= {"follows_shortcut", "contradicts_shortcut"}
    assert [ds.subset(i) for i in range(30)] == [ds[i].subset for i in range(30)]
    plain = build_prompt_dataset("easy_vqa:train", DataConfig(limit=3), tok, N_IMG)
    assert plain[0].subset == ""


def test_answer_balanced_weights_interpolate_between_rows_and_answers():
    """alpha 0: each row 1/N; alpha 1: each distinct answer gets mass 1 / (#answers); alpha 0.5:
    count ** -0.5 normalised (worked by hand for counts 3 and 1)."""
    import math

    from megatron_papo.data.sampler import answer_balanced_weights

    answers = ["yes", "yes", "yes", "red"]
    assert answer_balanced_weights(answers, 0.0).tolist() == [0.25] * 4
    w1 = answer_balanced_weights(answers, 1.0)
    assert float(w1[:3].sum()) == pytest.approx(0.5) and float(w1[3]) == pytest.approx(0.5)
    z = 3 / math.sqrt(3) + 1
    want = [1 / math.sqrt(3) / z] * 3 + [1 / z]
    assert answer_balanced_weights(answers, 0.5).tolist() == pytest.approx(want)
    with pytest.raises(ValueError, match="alpha"):
        answer_balanced_weights(answers, 1.5)
    with pytest.raises(ValueError, match="at least one"):
        answer_balanced_weights([], 0.5)


def test_easy_vqa_captions_come_from_each_images_own_questions():
    """image_captions: the colour and shape an image's questions reveal; checked against the
    questions of image 0 read here, and over the split (3,181 of 4,000 train images get both
    parts; a caption is at most one colour then one shape)."""
    from megatron_papo.data.easy_vqa import EASY_VQA_COLORS, EASY_VQA_SHAPES, image_captions, load_split

    caps = image_captions("train")
    data = load_split("train")
    rows0 = [(q, a) for q, a, i in zip(data.questions, data.answers, data.image_ids, strict=True) if i == 0]
    told = {a for _, a in rows0} | {w for q, _ in rows0 for w in q.rstrip("?").split()}
    colour, shape = caps[0].split()
    assert colour in EASY_VQA_COLORS and shape in EASY_VQA_SHAPES and {colour, shape} <= told
    both = [c for c in caps.values() if len(c.split()) == 2]
    assert len(both) == 3181
    for c in caps.values():
        words = c.split()
        assert len(words) <= 2 and sum(w in EASY_VQA_COLORS for w in words) <= 1
        assert sum(w in EASY_VQA_SHAPES for w in words) <= 1


def test_warm_start_target_carries_the_rationale(tmp_path):
    """A row's meta["rationale"] reaches Sample.rationale and the warm-start target's think
    block; without one (or with use_rationale=False) the think block stays empty."""
    from megatron_papo.data.dataset import Sample
    from megatron_papo.training.steps import sft_response

    s = Sample(prompt_ids=[1], images=[], answer="no", question="is there a red shape?", source="x:0",
               index=0, rationale="blue circle")
    assert sft_response(s, use_rationale=True) == "<think> blue circle </think> \\boxed{no}"
    assert sft_response(s) == "<think> </think> \\boxed{no}"  # train.sft_rationale is off by default
    s.rationale = ""
    assert sft_response(s, use_rationale=True) == "<think> </think> \\boxed{no}"
    from megatron_papo.data.easy_vqa import image_captions, split_row

    row = split_row("train", 0, "easy_vqa:train")
    assert row.meta["rationale"] == image_captions("train")[row.meta["image_id"]]
    ds = build_prompt_dataset("easy_vqa:train", DataConfig(limit=5), easy_vqa_tokenizer(), N_IMG)
    assert ds[0].rationale == row.meta["rationale"] != ""


def test_a_files_rationale_column_reaches_the_sample(tmp_path):
    """data.rationale_key (default "rationale"): a JSONL row's rationale becomes
    Sample.rationale; a row without it (or with a blank or non-text one) gets ""."""
    img = _write_png(tmp_path / "a.png")
    row = {"image": str(img), "problem": "what color is the shape?", "answer": "red"}
    records = [{**row, "rationale": "red circle"}, row, {**row, "rationale": 3}]
    path = _write_jsonl(tmp_path / "d.jsonl", records)
    ds = _dataset(path)
    assert [ds[i].rationale for i in range(3)] == ["red circle", "", ""]
    other = _dataset(path, DataConfig(rationale_key="why"))
    assert other[0].rationale == ""
