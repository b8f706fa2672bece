"""The procedural world and the LLM hand-off (splice) against HF's own LLaVA forward."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration

from prumerge_cli import ReducedVisionEncoder
from prumerge_cli.lm.llava_lm import LlavaLm
from prumerge_cli.lm.splice import IGNORE, splice
from prumerge_cli.reducers import ReducedTokens
from prumerge_cli.zoo.tokenizer import build_tokenizer
from prumerge_cli.zoo.world import (
    POSITIONS,
    QUESTION_TYPES,
    RELATIONS,
    as_read,
    ask,
    fingerprint,
    make_sample,
    split_seed,
    vocabulary,
)

from .cli_helpers import run_cli


def test_samples_are_deterministic_and_splits_disjoint():
    a, b = make_sample(split_seed("test", 3)), make_sample(split_seed("test", 3))
    assert a.caption == b.caption and a.qas == b.qas
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert len({split_seed(s, 0) for s in ("train", "val", "test")}) == 3


def test_every_question_type_is_asked_and_tokenizable():
    tok = build_tokenizer()
    unk = tok.unk_token_id
    answers = {kind: [] for kind in QUESTION_TYPES}
    for i in range(200):
        sample = make_sample(split_seed("train", i))
        assert [qa.kind for qa in sample.qas] == list(QUESTION_TYPES)
        for qa in sample.qas:
            ids = tok(f"{qa.question} {qa.reply} {sample.caption}", add_special_tokens=False)["input_ids"]
            assert unk not in ids
            answers[qa.kind].append(qa.answer)
    yes = answers["presence"].count("yes") / 200
    nothing = answers["relation"].count("nothing") / 200
    assert 0.35 < yes < 0.65 and 0.3 < nothing < 0.7, (yes, nothing)
    assert set(answers["count"]) == {"two", "three", "four"}
    assert len(vocabulary()) == len(set(vocabulary()))


def test_questions_are_grammatical_and_read_as_the_model_was_trained():
    tok = build_tokenizer()
    presence = [qa.question for i in range(300) for qa in make_sample(split_seed("test", i)).lesson
                if qa.kind == "presence"]  # fmt: skip
    orange = [q for q in presence if "orange" in q]
    assert orange and all(" an orange " in q for q in orange)
    assert not any(" an " in q for q in presence if q not in orange) and not any(" a orange " in q for q in presence)
    for question in orange:
        assert tok(question).input_ids == tok(as_read(question)).input_ids
        assert tok.decode(tok(question, add_special_tokens=False).input_ids) == as_read(question)
    committed = json.loads((Path(__file__).parents[1] / "prumerge_cli/zoo/llava/tokenizer.json").read_text())
    assert committed["normalizer"] == json.loads(tok.backend_tokenizer.to_str())["normalizer"]


def test_presence_and_relation_say_what_is_at_the_cell_then_answer():
    rng = random.Random(0)
    misses = Counter()
    for i in range(100):
        scene = list(make_sample(split_seed("train", i)).scene)
        there = {POSITIONS[t.cell]: t.name for t in scene}
        presence = ask(scene, "presence", rng)
        *_, colour, shape, _, cell = presence.question.split()
        assert presence.steps == there.get(cell, "nothing") and presence.reply.endswith(presence.answer)
        assert (presence.answer == "yes") == (there.get(cell) == f"{colour} {shape}"), presence
        if presence.answer == "no":
            misses["empty" if cell not in there else "colour" if there[cell].endswith(shape) else "shape"] += 1
        relation = ask(scene, "relation", rng)
        words = relation.question.split()
        row, col = divmod(POSITIONS.index(words[-1]), 3)
        dr, dc = RELATIONS[" ".join(words[3:-4])]
        assert words[:3] == ["what", "color", "is"] and words[-1] in there
        assert relation.steps == POSITIONS[(row + dr) * 3 + col + dc]
        assert relation.answer == there.get(relation.steps, "nothing").split()[0]  # the colour of the name
    assert min(misses.values()) >= 8 and set(misses) == {"empty", "colour", "shape"}  # every kind of near miss


def test_the_fingerprint_follows_what_a_stage_trains_on(monkeypatch):
    from prumerge_cli.zoo import world

    scenes, lessons = fingerprint(lessons=False), fingerprint(lessons=True)
    assert fingerprint(lessons=True) == lessons != scenes
    monkeypatch.setattr(world, "lesson", lambda scene, rng: (world.ask_about(scene[0], "color"),))
    assert fingerprint(lessons=False) == scenes and fingerprint(lessons=True) != lessons  # other questions
    monkeypatch.setattr(world, "SIZES", ("large",))
    assert fingerprint(lessons=False) != scenes  # other images


def test_training_conversation_and_near_miss():
    tok = build_tokenizer()
    for i in range(50):
        sample = make_sample(split_seed("train", i))
        objects = sample.caption.count(" at ")
        kinds = [qa.kind for qa in sample.lesson]
        assert kinds[-1] == "describe" and sample.lesson[-1].answer == sample.caption
        assert kinds.count("color") == kinds.count("shape") == kinds.count("size") == objects
        assert kinds.count("relation") == 3 and kinds.count("presence") == 4 and kinds.count("count") == 1
        true, near = set(sample.caption.split(" and ")), set(sample.near_miss.split(" and "))
        assert len(true - near) == len(near - true) == 1  # one object changed (one of its attributes)
        text = " ".join(f"{qa.question} {qa.reply}" for qa in sample.lesson) + " " + sample.near_miss
        assert tok.unk_token_id not in tok(text, add_special_tokens=False)["input_ids"]
    assert tok("Describe the image.", add_special_tokens=False)["input_ids"] == tok("describe the image .")["input_ids"]


def test_splice_equals_hf_llava_forward(llava_dir, image_paths):
    """With all visual tokens, our spliced LM input gives the logits of HF's own LLaVA forward."""
    lm = LlavaLm.from_pretrained(llava_dir)
    encoder = ReducedVisionEncoder.from_pretrained(llava_dir, "none")
    hf = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    image = Image.open(image_paths[0]).convert("RGB")
    pixels = encoder.processor(images=[image], return_tensors="pt")["pixel_values"]
    question = lm.encode(["what color is the object at center"])[0]
    image_id = hf.config.image_token_index
    ids = torch.tensor([[lm.bos_id, *[image_id] * 64, *question]])
    with torch.no_grad():
        want = hf(input_ids=ids, pixel_values=pixels).logits[0, -1]
        got = lm.next_token_logits(splice(lm.embed, lm.bos_id, encoder(pixels, project=True), [question]))[0]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_splice_pads_right_with_contiguous_positions_and_targets():
    embed = torch.nn.Embedding(10, 4)
    image = ReducedTokens(torch.ones(2, 3, 4), torch.tensor([3, 1]), torch.zeros(2, 3, dtype=torch.long))
    batch = splice(embed, 1, image, [[5, 6], [7]], targets=[[False, True], [True]])
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 0, 0, 0]]
    assert batch.last.tolist() == [5, 2]
    assert batch.labels.tolist() == [[IGNORE] * 4 + [6, IGNORE], [IGNORE, 7] + [IGNORE] * 4]


def test_world_writes_llava_conversation_json(capsys, tmp_path):
    res = run_cli(capsys, "world", "-o", tmp_path / "data", "--split", "val", "--count", "3")
    assert res.code == 0, res.err
    records = json.loads((tmp_path / "data" / "data.json").read_text())
    assert len(records) == 3 and records[0]["id"] == "val-0000000"
    turns = records[0]["conversations"]
    assert turns[0]["from"] == "human" and turns[0]["value"].startswith("<image>\n") and turns[1]["from"] == "gpt"
    sample = make_sample(split_seed("val", 0))
    assert len(turns) == 2 * len(sample.lesson) and turns[1]["value"] == sample.lesson[0].reply
    assert turns[-2]["value"] == "describe the image ." and turns[-1]["value"] == sample.caption
    written = Image.open(tmp_path / "data" / "images" / "val-0000000.png")
    assert np.array_equal(np.asarray(written), np.asarray(sample.image))
