"""Offline data builders, shards, LLaVA importer and feature cache (real Debian data, small sizes)."""

import io
import json
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from zoo.pipelines.data import (
    SPLITS,
    CorruptShardError,
    FeatureCache,
    LlavaFormatError,
    Media,
    Sample,
    build_emoji_captions,
    build_fashion_vqa,
    build_spoken_words,
    build_wordnet_instructions,
    decode_wav,
    encode_wav,
    import_llava,
    load_split,
    read_shards,
    resample,
    split_of,
    write_dataset,
)
from zoo.pipelines.data.__main__ import main as cli
from zoo.pipelines.data.corpus import corpus_lines, write_corpus
from zoo.pipelines.data.fashion_mnist import CLASSES
from zoo.pipelines.data.speech import DIGITS, WORDS
from zoo.pipelines.data.wordnet import load_noun_synsets, noun_synset_splits, parse_data_line, synset_splits

N = 4  # samples per split in builder tests


def _image(m: Media) -> Image.Image:
    assert m.kind == "image"
    return Image.open(io.BytesIO(m.data))


def _write(splits, out, family):
    return write_dataset(splits, out, task_family=family, source="test")


@pytest.fixture(scope="module")
def built():
    """Each builder once at N per split (module-wide: builders are the slow part)."""
    return {
        "vqa": build_fashion_vqa(N),
        "caption": build_emoji_captions(N),
        "asr": build_spoken_words(N),
        "text": build_wordnet_instructions(N),
    }


def test_every_builder_fills_every_split_with_valid_samples(built):
    for family, splits in built.items():
        assert set(splits) == set(SPLITS)
        for split, samples in splits.items():
            assert len(samples) == N, (family, split)
            for s in samples:
                s.validate()
                assert (s.task_family, s.split) == (family, split)


def test_fashion_vqa_answers_match_real_labels(built):
    from zoo.pipelines.data.fashion_mnist import load_fashion_mnist

    data = load_fashion_mnist("/usr/share/datasets/fashion-mnist")
    assert {k: len(v[0]) for k, v in data.items()} == {"train": 60000, "test": 10000}
    for s in sum(built["vqa"].values(), []):
        _, part, index, question = s.key.split("-")
        img = _image(s.media[0])
        assert img.size == (28, 28) and img.mode == "L"
        pixels = np.asarray(img)
        assert np.array_equal(pixels, data[part][0][int(index)])  # the PNG is the real image
        label = CLASSES[int(data[part][1][int(index)])]
        if question == "what":
            assert s.instruction == "What is shown in this image?" and s.answer == label
        else:
            asked = s.instruction.split(" ", 3)[3].rstrip("?")
            assert asked in CLASSES and s.answer == ("yes" if asked == label else "no")
        assert (s.split == "test") == (part == "test")


def test_emoji_images_are_rendered_and_named_by_unicode(built):
    for s in sum(built["caption"].values(), []):
        ch = chr(int(s.key.removeprefix("emoji-"), 16))
        assert s.answer == unicodedata.name(ch).lower()
        img = _image(s.media[0])
        assert img.size == (32, 32) and img.mode == "RGB"
        px = np.asarray(img).astype(int)
        assert (px.sum(-1) < 600).mean() > 0.05, f"{s.key} looks blank"


def test_spoken_words_are_real_16khz_speech(built):
    vocab = set(DIGITS + WORDS)
    for s in sum(built["asr"].values(), []):
        assert s.answer in vocab
        x, rate = decode_wav(s.media[0].data)
        assert rate == 16000
        assert 0.15 < len(x) / rate <= 2.0
        assert np.sqrt(np.mean(x**2)) > 0.02, f"{s.key} is near silent"


def test_wordnet_parser_and_instructions(built):
    line = "00001930 03 n 01 physical_entity 0 007 @ 00001740 n 0000 | an entity that has physical existence; \"an example\"  \n"
    syn = parse_data_line(line)
    assert syn.lemmas == ("physical entity",) and syn.definition == "an entity that has physical existence"
    assert syn.examples == ("an example",)
    assert len(load_noun_synsets()) > 80000
    kinds = set()
    for s in sum(built["text"].values(), []):
        assert s.media == ()
        kinds.add(s.key.rsplit("-", 1)[1])
        if s.key.endswith("-choice"):
            options = s.instruction.split("Options: ")[1].split(", ")
            assert len(options) == 4 and s.answer in options
    assert kinds == {"define", "name", "choice", "category"}


def test_splits_are_disjoint_including_groups(built):
    for family, splits in built.items():
        keys = {split: {s.key for s in samples} for split, samples in splits.items()}
        assert not (keys["train"] & keys["val"] or keys["train"] & keys["test"] or keys["val"] & keys["test"]), family
    # Groups (one synset's questions; all senses of a word; synsets sharing a definition) never straddle splits.
    full = build_wordnet_instructions(400)
    group = {}
    for split, samples in full.items():
        for s in samples:
            assert group.setdefault(s.key.rsplit("-", 1)[0], split) == split
    synsets = load_noun_synsets()
    splits = synset_splits(synsets)
    by_word, by_definition = {}, {}
    for syn in synsets:
        assert by_word.setdefault(syn.lemmas[0].lower(), splits[syn.key]) == splits[syn.key], syn
        assert by_definition.setdefault(syn.definition, splits[syn.key]) == splits[syn.key], syn
    assert abs(list(splits.values()).count("test") / len(splits) - 0.1) < 0.01


def test_split_rule_is_stable_and_proportional():
    # Golden values: changing the hash silently reshuffles every data set's test split.
    assert [split_of(k) for k in ("fmnist-train-00000", "wn-00001740", "g", "e")] == ["test", "train", "train", "val"]
    got = [split_of(f"k{i}") for i in range(20000)]
    for split, share in (("train", 0.8), ("val", 0.1), ("test", 0.1)):
        assert abs(got.count(split) / len(got) - share) < 0.01


def test_builds_are_deterministic_to_the_byte(tmp_path, built):
    for family, fn in (("caption", build_emoji_captions), ("asr", build_spoken_words), ("vqa", build_fashion_vqa)):
        _write(built[family], tmp_path / "a" / family, family)
        _write(fn(N), tmp_path / "b" / family, family)
        files = sorted(p.name for p in (tmp_path / "a" / family).iterdir())
        assert "manifest.json" in files and "train-000000.tar" in files
        for name in files:
            assert (tmp_path / "a" / family / name).read_bytes() == (tmp_path / "b" / family / name).read_bytes(), (family, name)
    # A smaller limit gives a prefix of a larger one.
    assert build_emoji_captions(2)["val"] == built["caption"]["val"][:2]


def _mixed_samples():
    png = io.BytesIO()
    Image.new("RGB", (5, 3), (10, 200, 30)).save(png, format="PNG")
    wav = encode_wav(np.sin(np.linspace(0, 60, 800)) * 0.5, 16000)
    return {
        "train": [
            Sample("a-1", "mix", "train", "What?", "green", (Media("image", png.getvalue()),)),
            Sample("a-2", "mix", "train", "Say", "hum", (Media("audio", wav), Media("image", png.getvalue()))),
            Sample("a-3", "mix", "train", "Define: x", "a letter"),
        ],
        "val": [Sample("b_1", "mix", "val", "", "only answer")],
        "test": [],
    }


def test_schema_round_trips_through_shards(tmp_path):
    splits = _mixed_samples()
    m = write_dataset(splits, tmp_path, task_family="mix", source="test", max_per_shard=2)
    assert [s["name"] for s in m["splits"]["train"]["shards"]] == ["train-000000.tar", "train-000001.tar"]
    for split in SPLITS:
        assert load_split(tmp_path, split) == splits[split]
    with pytest.raises(ValueError, match="no dots"):
        Sample("a.b", "mix", "train", "q", "a").validate()


def test_wav_round_trip_and_resample_keep_the_signal():
    t = np.arange(22050) / 22050
    x = 0.5 * np.sin(2 * np.pi * 440 * t)
    y, rate = decode_wav(encode_wav(x, 22050))
    assert rate == 22050 and np.abs(y - x).max() < 1e-4
    z = resample(x, 22050, 16000)
    assert len(z) == 16000
    assert np.argmax(np.abs(np.fft.rfft(z))) == 440  # 1 Hz bins over 1 s


def _shard(tmp_path):
    write_dataset(_mixed_samples(), tmp_path, task_family="mix", source="test")
    return tmp_path / "train-000000.tar"


def test_truncated_shard_error_names_shard_and_key(tmp_path):
    shard = _shard(tmp_path)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(CorruptShardError) as e:
        load_split(tmp_path, "train")
    assert str(shard) in str(e.value) and e.value.shard == str(shard)
    assert e.value.key in ("a-1", "a-2") and e.value.key in str(e.value)


def test_shard_cut_at_a_member_boundary_is_caught_by_the_manifest_count(tmp_path):
    shard = _shard(tmp_path)
    import tarfile

    with tarfile.open(shard) as tf:
        members = tf.getmembers()
    first = [m for m in members if m.name.startswith("a-1.")]
    end = max(m.offset_data + -(-m.size // 512) * 512 for m in first)
    shard.write_bytes(shard.read_bytes()[:end])
    with pytest.raises(CorruptShardError, match="truncated") as e:
        load_split(tmp_path, "train")
    assert e.value.key == "a-1" and str(shard) in str(e.value)


def test_garbage_shard_error_names_shard(tmp_path):
    shard = _shard(tmp_path)
    shard.write_bytes(np.random.default_rng(0).bytes(3000))
    with pytest.raises(CorruptShardError) as e:
        list(read_shards([shard]))
    assert str(shard) in str(e.value)


def test_flipped_media_byte_is_caught_by_checksum(tmp_path):
    shard = _shard(tmp_path)
    data = bytearray(shard.read_bytes())
    i = data.index(b"IDAT") + 6  # inside the first PNG's pixel data
    data[i] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match="sha256") as e:
        list(read_shards([shard]))
    assert e.value.key == "a-1"


def _llava_fixture(tmp_path):
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 30), (255, 0, 0)).save(tmp_path / "imgs" / "sub" / "red.jpg")
    Image.new("RGB", (20, 20), (0, 0, 255)).save(tmp_path / "imgs" / "blue.png")
    entries = [
        {"id": "000001", "image": "sub/red.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat color is this?"}, {"from": "gpt", "value": "Red."},
            {"from": "human", "value": "Is it bright?"}, {"from": "gpt", "value": "Yes."}]},
        {"id": "GCC_train.7", "image": "blue.png", "conversations": [
            {"from": "human", "value": "Describe the image.\n<image>"}, {"from": "gpt", "value": "A blue square."}]},
        {"id": "txt", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}]},
    ]  # fmt: skip
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(entries))
    return path


def test_llava_importer(tmp_path):
    path = _llava_fixture(tmp_path)
    splits = import_llava(path, tmp_path / "imgs", image_size=16)
    samples = {s.key: s for s in sum(splits.values(), [])}
    assert set(samples) == {"llava-000001-t0", "llava-000001-t1", "llava-GCC_train_7-t0", "llava-txt-t0"}
    s = samples["llava-000001-t0"]
    assert (s.instruction, s.answer, s.task_family) == ("What color is this?", "Red.", "vqa")
    assert samples["llava-000001-t1"].split == s.split  # turns of one entry share a split
    img = _image(s.media[0])
    assert img.size == (16, 16) and img.getpixel((8, 8))[0] > 200
    assert samples["llava-GCC_train_7-t0"].instruction == "Describe the image."
    assert samples["llava-txt-t0"].media == ()
    # Through the CLI into shards and back.
    assert cli(["import-llava", "--json", str(path), "--image-root", str(tmp_path / "imgs"), "--out", str(tmp_path / "out")]) == 0
    back = {s.key for split in SPLITS for s in load_split(tmp_path / "out", split)}
    assert back == set(samples)


def test_llava_importer_names_bad_entries(tmp_path):
    path = _llava_fixture(tmp_path)
    (tmp_path / "imgs" / "blue.png").unlink()
    with pytest.raises(FileNotFoundError, match="GCC_train.7.*blue.png"):
        import_llava(path, tmp_path / "imgs")
    path.write_text(json.dumps([{"id": "x", "conversations": [{"from": "gpt", "value": "hi"}]}]))
    with pytest.raises(LlavaFormatError, match="'x'.*human"):
        import_llava(path, tmp_path / "imgs")


def test_feature_cache_runs_the_encoder_once_per_unique_image(tmp_path, built):
    images = [s.media[0].data for s in built["caption"]["train"][:3]]
    seen, calls = [], []

    def encoder(batch):
        seen.extend(batch)
        calls.append(len(batch))
        return torch.stack([torch.tensor([len(b), b[-5]], dtype=torch.float32) for b in batch])

    cache = FeatureCache(tmp_path, "toy-encoder@v1", encoder)
    first = cache.encode([images[0], images[1], images[0]])
    assert seen == [images[0], images[1]] and (cache.misses, cache.hits) == (2, 1)
    assert calls == [1, 1]  # each miss alone: its features must not depend on the batch it came in
    assert torch.equal(first[0], first[2]) and first[0][0] == len(images[0])
    again = FeatureCache(tmp_path, "toy-encoder@v1", encoder)  # a new process would see the same files
    out = again.encode(images)
    assert seen == images and (again.misses, again.hits) == (1, 2)
    assert torch.equal(out[1], first[1])
    other = FeatureCache(tmp_path, "toy-encoder@v2", encoder)
    other(images[0])
    assert len(seen) == 4  # another encoder key never reuses v1's features


def test_corpus_excludes_test_definitions(tmp_path):
    counts = write_corpus(tmp_path, max_lines=50)
    assert counts == {"train.txt": 50, "val.txt": 50, "words.txt": 50}
    lines = (tmp_path / "train.txt").read_text().splitlines()
    assert len(lines) == 50 and all(lines)
    splits = noun_synset_splits()
    test_defs = {f"{s.lemmas[0]}: {s.definition}" for s in load_noun_synsets() if splits[s.key] == "test"}
    full = corpus_lines("train") + corpus_lines("val")
    assert len(full) > 70000 and not test_defs & set(full)
    assert any(not line.split(":")[0].islower() or " " in line for line in full)  # fortunes are in too


def test_cli_builds_selected_families(tmp_path):
    assert cli(["build", "--out", str(tmp_path), "--max-per-split", "2", "--families", "caption", "asr"]) == 0
    for family in ("caption", "asr"):
        manifest = json.loads((tmp_path / family / "manifest.json").read_text())
        assert {s: v["count"] for s, v in manifest["splits"].items()} == {"train": 2, "val": 2, "test": 2}
        assert len(load_split(tmp_path / family, "test")) == 2
    assert not (tmp_path / "vqa").exists()
    shutil.rmtree(tmp_path / "asr")


def test_wordnet_category_questions_carry_the_lexicographer_file_of_the_synset():
    from zoo.pipelines.data.wordnet import NOUN_CATEGORIES, build_wordnet_instructions, load_noun_synsets

    by_word = {s.lemmas[0]: s for s in load_noun_synsets()}
    assert by_word["traitor"].category == "person" and by_word["oak"].category == "plant"
    assert by_word["hammer"].category == "artifact"
    splits = build_wordnet_instructions(20, question_types=["category"])
    for sample in splits["train"]:
        assert sample.instruction.startswith("What kind of thing is: ")
        assert sample.answer in NOUN_CATEGORIES.values()


def _fake_espeak(text, voice="en-us", speed=170, pitch=50, sample_rate=16000, max_seconds=2.0):
    return encode_wav(np.zeros(16), sample_rate)  # the split and order logic without synthesis


# sha256 of "<split> <key>" lines of build_spoken_words(None) before `test_voices` existed: the tiny
# zoo's recorded figures depend on exactly these samples, splits and order.
DEFAULT_SPEECH_DIGEST = "666119dbc8c07ef4efcb79117ef908741006bb8733739736bb1c1ff7d91c7b1a"


def _speech_digest(splits):
    import hashlib

    return hashlib.sha256("\n".join(f"{s} {x.key}" for s in splits for x in splits[s]).encode()).hexdigest()


def test_unseen_voices_stay_out_of_train_and_the_default_build_is_unchanged(monkeypatch):
    from zoo.pipelines.data import speech

    monkeypatch.setattr(speech, "espeak_wav", _fake_espeak)
    default = build_spoken_words(None)
    assert {s: len(v) for s, v in default.items()} == {"train": 1167, "val": 143, "test": 130}
    assert _speech_digest(default) == DEFAULT_SPEECH_DIGEST
    assert build_spoken_words(None, test_voices=()) == default and build_spoken_words(None, test_voices=None) == default
    assert all(s.subtype == "" for v in default.values() for s in v)

    held = ["en-gb-scotland", "en-us+klatt2"]  # a list, as a recipe's YAML gives it
    split = build_spoken_words(None, test_voices=held)
    voices = {v.replace("+", "_"): v for v in speech.VOICES}
    # key: speech-<text>-<voice>-s<speed>-p<pitch>
    voice = {s.key: voices[s.key[len(f"speech-{s.answer.replace(' ', '_')}-"):].rsplit("-s", 1)[0]]
             for s in sum(split.values(), [])}
    assert not any(voice[s.key] in held for s in split["train"])
    default_split = {s.key: name for name, v in default.items() for s in v}
    for name, samples in split.items():
        for s in samples:
            unseen = voice[s.key] in held
            assert s.subtype == ("unseen_voice" if unseen else "seen_voice")
            if not unseen:
                assert name == default_split[s.key]  # the voices training hears keep their split
    for name in ("val", "test"):
        assert {s.subtype for s in split[name]} == {"seen_voice", "unseen_voice"}
    unseen = sum(s.subtype == "unseen_voice" for v in split.values() for s in v)
    assert unseen == 30 * 2 * 3 * 2 and abs(sum(s.subtype == "unseen_voice" for s in split["test"]) - unseen / 2) < 30
    with pytest.raises(ValueError, match="not among the voices"):
        build_spoken_words(1, test_voices=["en-au"])
    with pytest.raises(ValueError, match="every voice"):
        build_spoken_words(1, test_voices=speech.VOICES)


def test_spoken_sentences_and_unseen_voices_synthesize_for_real():
    from zoo.pipelines.data.speech import SENTENCES

    splits = build_spoken_words(2, words=("seven",), voices=("en-us", "en-gb"), speeds=(130,), test_voices=["en-gb"],
                                sentences=True)
    assert not any("-en-gb-" in s.key for s in splits["train"])
    for s in sum(splits.values(), []):
        assert s.answer in SENTENCES + ("seven",)
        x, rate = decode_wav(s.media[0].data)
        assert rate == 16000 and 0.15 < len(x) / rate < 4.0
    assert any(len(s.answer.split()) >= 3 for s in sum(splits.values(), []))
