"""`prumerge generate` on the embedded LLaVA: streamed greedy answers that agree with the LM's own next-token
logits, a JSONL batch equal to its records asked one by one, seeded sampling, chat templates, clean errors."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from prumerge_cli.generate import Asker, Decoding
from prumerge_cli.lm.prompts import prompt_ids
from prumerge_cli.lm.splice import splice
from prumerge_cli.zoo import LLAVA_DIR
from prumerge_cli.zoo.world import samples_of

from .cli_helpers import run_cli
from .test_cli import assert_clean_error


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    path = tmp_path_factory.mktemp("generate") / "bundle"
    from prumerge_cli import ReducedVisionEncoder

    ReducedVisionEncoder.from_pretrained(LLAVA_DIR, "prumerge").save(path)
    return path


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    folder = tmp_path_factory.mktemp("questions")
    records = []
    for i, sample in enumerate(samples_of("test", 0, 3)):
        sample.image.save(folder / f"{i}.png")
        records += [{"image": f"{i}.png", "prompt": qa.question, "expected": qa.answer} for qa in sample.qas[:2]]
    (folder / "q.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return folder, records


def test_streamed_greedy_answer_agrees_with_the_lm(capsys, bundle, questions):
    folder, records = questions
    asker = Asker(bundle)
    image = samples_of("test", 0, 1)[0].image
    (answer,) = asker.ask([image], [records[0]["prompt"]], Decoding(max_new_tokens=6))
    reduced = asker.encoder.encode_images([image], project=True)
    batch = splice(asker.lm.embed, asker.lm.bos_id, reduced, asker.lm.encode([records[0]["prompt"]]))
    assert answer.token_ids[0] == int(asker.lm.next_token_logits(batch).argmax(-1)[0])
    assert answer.visual_tokens == int(reduced.lengths[0]) and answer.prefill_s > 0
    res = run_cli(capsys, "generate", bundle, "--image", folder / "0.png", "--prompt", records[0]["prompt"],
                  "--max-new-tokens", "6")  # fmt: skip
    assert res.code == 0, res.err
    assert res.out.splitlines()[0] == answer.text
    assert f"{answer.visual_tokens} visual tokens kept; prefill" in res.out


def test_a_batch_equals_its_records_asked_one_by_one(capsys, bundle, questions, tmp_path):
    folder, records = questions
    out = tmp_path / "answers.jsonl"
    res = run_cli(capsys, "generate", bundle, "--batch", folder / "q.jsonl", "-o", out, "--batch-size", "4")
    assert res.code == 0, res.err
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["prompt"] for a in answers] == [r["prompt"] for r in records]
    asker = Asker(bundle)
    for record, answer in zip(records, answers, strict=True):
        image = samples_of("test", int(record["image"][0]), 1)[0].image
        (alone,) = asker.ask([image], [record["prompt"]], Decoding())
        assert answer["answer"] == alone.text and answer["visual_tokens"] == alone.visual_tokens


def test_with_every_token_most_answers_are_right(questions, tmp_path):
    from prumerge_cli import ReducedVisionEncoder

    _, records = questions
    ReducedVisionEncoder.from_pretrained(LLAVA_DIR, "none").save(tmp_path / "full")
    asker = Asker(tmp_path / "full")
    images = [samples_of("test", int(r["image"][0]), 1)[0].image for r in records]
    answers = asker.ask(images, [r["prompt"] for r in records], Decoding())
    assert sum(a.text == r["expected"] for a, r in zip(answers, records, strict=True)) >= 4


def test_sampling_is_seeded_and_a_zero_nucleus_is_greedy(bundle):
    asker = Asker(bundle)
    image, question = samples_of("test", 1, 1)[0].image, "describe the image"
    sampled = [asker.ask([image], [question], Decoding(12, 1.5, 0.9, seed))[0].token_ids for seed in (3, 3, 4)]
    assert sampled[0] == sampled[1]
    greedy = asker.ask([image], [question], Decoding(12))[0].token_ids
    assert asker.ask([image], [question], Decoding(12, 1.0, 0.0, 5))[0].token_ids == greedy


def test_a_chat_template_is_split_at_the_image():
    tokenizer = AutoTokenizer.from_pretrained(str(LLAVA_DIR))
    assert prompt_ids(tokenizer, "what color") == ([], tokenizer("what color", add_special_tokens=False)["input_ids"])
    tokenizer.chat_template = (
        "{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
        "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %} ASSISTANT:"
    )
    before, after = prompt_ids(tokenizer, "what color")
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert before == encode("USER: ") and after == encode("\nwhat color ASSISTANT:")


def test_generate_errors(capsys, bundle, clip_dir, questions, tmp_path):
    folder, _ = questions
    image = folder / "0.png"
    assert_clean_error(run_cli(capsys, "generate", bundle, "--image", image), "give --image and --prompt")
    assert_clean_error(run_cli(capsys, "generate", bundle, "--batch", folder / "q.jsonl"), "needs --output")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n')
    res = run_cli(capsys, "generate", bundle, "--batch", tmp_path / "bad.jsonl", "-o", tmp_path / "a.jsonl")
    assert_clean_error(res, 'needs "image"')
    assert run_cli(capsys, "compress", clip_dir, "-o", tmp_path / "clip").code == 0
    res = run_cli(capsys, "generate", tmp_path / "clip", "--image", image, "--prompt", "hi")
    assert_clean_error(res, "generate needs a LLaVA checkpoint")
    assert not (tmp_path / "a.jsonl").exists()
