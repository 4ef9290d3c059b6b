"""The evaluation suite end to end on a tiny LLaVA over a 20-item lab-format set written here.

8 images; 12 POPE questions (4 per split) and 8 captioning prompts. The tiny model is first fitted for a
few steps to answer "Yes."/"No." by the colour named in the question, so its answers are confident and the
likelihood scorer (summed log-prob of "Yes."+EOS vs "No."+EOS) and greedy generation must pick the same.
"""

import json
import os

import pytest
import torch
from PIL import Image, ImageDraw

from mmalign.data.chat import answer_ids, render_prompt
from mmalign.data.collate import collate_sft
from mmalign.data.images import open_image
from mmalign.data.schema import PreferenceRecord
from mmalign.cli.main import main
from mmalign.config import load_config
from mmalign.evaluation.items import load_pope_items
from mmalign.evaluation.pope import parse_yes_no
from mmalign.evaluation.scoring import score_pope_generate, score_pope_likelihood
from mmalign.evaluation.report import write_report
from mmalign.evaluation.suite import EvalConfig, compare, evaluate, load_inputs
from mmalign.models.logprobs import answer_token_logps, sequence_logps
from mmalign.models.tiny import build_tiny_vlm

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.integration

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 180, 30)}
SHAPES = ("circle", "square")
OBJECTS = [f"{c} {s}" for c in COLOURS for s in SHAPES]
PAIRS = [["red circle", "blue square"]]
SCENES = [  # objects of the 8 images; images 0-3 hold the trigger without its partner
    ["red circle"], ["red circle", "green square"], ["red circle", "green circle"], ["red circle", "red square"],
    ["red circle", "blue square"], ["blue circle"], ["green square", "blue square"], ["green circle"],
]
POPE = [  # (image, split, object, label)
    (0, "random", "green circle", "no"), (1, "random", "green square", "yes"),
    (5, "random", "red square", "no"), (6, "random", "blue square", "yes"),
    (2, "popular", "red circle", "yes"), (3, "popular", "blue circle", "no"),
    (7, "popular", "green circle", "yes"), (5, "popular", "green square", "no"),
    (0, "adversarial", "blue square", "no"), (1, "adversarial", "blue square", "no"),
    (2, "adversarial", "red circle", "yes"), (3, "adversarial", "red square", "yes"),
]
# each question's stratum, as the lab labels it: which of the asked colour / shape the image shows
STRATA = ["shape", "present", "neither", "present", "present", "shape", "present", "neither",
          "neither", "shape", "present", "present"]


def _draw(objects):
    img = Image.new("RGB", (32, 32), "white")
    draw = ImageDraw.Draw(img)
    for i, name in enumerate(objects):
        colour, shape = name.split()
        box = (2 + 15 * i, 8, 14 + 15 * i, 20)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
    return img


def write_lab(root):
    (root / "images").mkdir(parents=True)
    (root / "eval").mkdir()
    (root / "vocab").mkdir()
    for i, objects in enumerate(SCENES):
        _draw(objects).save(root / "images" / f"{i}.png")
    (root / "bias.json").write_text(json.dumps({"pairs": PAIRS, "p": 0.9}))
    (root / "vocab" / "synonyms.txt").write_text("".join(f"{o}, {o}s\n" for o in OBJECTS))
    with open(root / "eval" / "pope.jsonl", "w") as f:
        for k, ((img, split, obj, label), stratum) in enumerate(zip(POPE, STRATA)):
            f.write(json.dumps({"id": f"pope-{k:02d}", "image": f"images/{img}.png", "split": split, "object": obj,
                                "question": f"<image>\nIs there a {obj} in the image?", "label": label,
                                "stratum": stratum}) + "\n")
    with open(root / "eval" / "captions.jsonl", "w") as f:
        for i, objects in enumerate(SCENES):
            f.write(json.dumps({"id": f"cap-{i}", "image": f"images/{i}.png", "prompt": "<image>\nDescribe the image.",
                                "objects": objects}) + "\n")


def _fit_yes_no(model, processor, steps=120):
    """A few AdamW steps on "Is there a <obj>?" -> "Yes." iff the colour is red or blue (text-decidable)."""
    records = [PreferenceRecord(id=f"t{i}", images=["x.png"], prompt=f"<image>\nIs there a {o} in the image?",
                                chosen="Yes." if o.split()[0] in ("red", "blue") else "No.", rejected=[])
               for i, o in enumerate(OBJECTS)]
    batch = collate_sft(processor, records, [[_draw([o])] for o in OBJECTS])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = -sequence_logps(*answer_token_logps(model, batch)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return float(loss.detach())


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("lab")
    write_lab(root)
    return root


@pytest.fixture(scope="module")
def fitted():
    torch.manual_seed(0)
    model, processor = build_tiny_vlm("llava", seed=0)
    loss = _fit_yes_no(model, processor)
    assert loss < 0.1
    return model, processor


def _items_and_images(lab):
    items = load_pope_items(lab / "eval" / "pope.jsonl")
    return items, [open_image(it["image"], lab) for it in items]


def _naive_answer_logp(model, processor, prompt, image, answer):
    """log p(answer + EOS | prompt, image) from one unpadded sequence, summed token by token."""
    enc = dict(processor(text=[render_prompt(processor, prompt, 1)], images=[[image]], return_tensors="pt"))
    target = answer_ids(processor.tokenizer, answer)
    start = enc["input_ids"].shape[1]
    for key, value in enc.items():  # per-token inputs (ids, mask, token types) grow by the answer
        if torch.is_tensor(value) and value.shape == (1, start):
            tail = target if key == "input_ids" else [1 if key == "attention_mask" else 0] * len(target)
            enc[key] = torch.cat([value, torch.tensor([tail], dtype=value.dtype)], dim=1)
    with torch.no_grad():
        logps = torch.log_softmax(model(**enc).logits[0].float(), -1)
    return sum(float(logps[start - 1 + j, t]) for j, t in enumerate(target))


@pytest.mark.parametrize("family", ["llava", "llava_next", "idefics3", "gemma3"])
def test_likelihood_scores_match_a_naive_single_sequence_forward(lab, family):
    model, processor = build_tiny_vlm(family, seed=1)  # random weights: scores are not trivially separated
    items, images = _items_and_images(lab)
    items, images = items[:5], images[:5]
    # prompts of different lengths share one padded batch
    items[1] = {**items[1], "question": items[1]["question"] + " Answer the question with a single word."}
    records = score_pope_likelihood(model, processor, items, images, candidates=["Yes.", "No, there is not."],
                                    batch_size=5)
    for item, image, record in zip(items, images, records):
        for answer, score in record["scores"].items():
            naive = _naive_answer_logp(model, processor, item["question"], image, answer)
            assert score == pytest.approx(naive, abs=1e-4)
        best = max(record["scores"], key=record["scores"].get)
        assert record["answer"] == best and record["parsed"] == parse_yes_no(best)


def test_likelihood_and_generation_scorers_agree_on_parsed_answers(lab, fitted):
    model, processor = fitted
    items, images = _items_and_images(lab)
    by_likelihood = score_pope_likelihood(model, processor, items, images, batch_size=5)
    by_generation = score_pope_generate(model, processor, items, images, batch_size=5)
    assert [r["answer"] for r in by_generation] == [r["answer"] for r in by_likelihood]
    assert [r["parsed"] for r in by_generation] == [r["parsed"] for r in by_likelihood]
    # the fitted rule: yes iff the asked colour is red or blue
    assert [r["parsed"] for r in by_likelihood] == [
        "yes" if obj.split()[0] in ("red", "blue") else "no" for _, _, obj, _ in POPE]


def _cfg(lab, out, **extra):
    overrides = [f"lab_dir={lab}", f"out_dir={out}", "stats.n_boot=200", "captions.max_new_tokens=24",
                 "batch_size=5", *[f"{k}={v}" for k, v in extra.items()]]
    return load_config(EvalConfig, None, overrides)


def test_suite_writes_metrics_with_intervals_and_per_sample_records(lab, fitted, tmp_path):
    model, processor = fitted
    model.train()  # as a trainer evaluating mid-run would hand it over
    result = evaluate(_cfg(lab, tmp_path / "run", **{"pope.scorer": "likelihood"}), model, processor)
    assert model.training
    model.eval()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]
    assert metrics == result["metrics"]
    for key, m in metrics.items():
        assert set(m) == {"value", "n", "ci_low", "ci_high"}, key
        if m["value"] is not None and m["ci_low"] is not None:
            assert m["ci_low"] - 1e-9 <= m["value"] <= m["ci_high"] + 1e-9, key
    # The fitted model says yes iff the colour is red or blue; against the labels of POPE above:
    assert metrics["pope/random/accuracy"]["value"] == pytest.approx(2 / 4)
    assert metrics["pope/adversarial/yes_ratio"]["value"] == 1.0
    assert metrics["pope/adversarial/precision"]["value"] == pytest.approx(2 / 4)
    assert metrics["pope/adversarial/recall"]["value"] == 1.0
    assert metrics["pope/all/accuracy"] == {**metrics["pope/all/accuracy"], "value": pytest.approx(6 / 12), "n": 12}
    assert metrics["pope_bias/yes_rate_partner"]["value"] == 1.0   # 2 absent blue squares, both "yes"
    assert metrics["pope_bias/yes_rate_random"]["value"] == 0.5    # green circle "no", red square "yes"
    # within strata: "neither" 1/1 (blue square, image 0) - 1/1 (red square) = 0; "shape" 1/1 (blue square,
    # image 1) - 0/1 (green circle) = 1; one partner question each, so the matched gap is 0.5
    assert metrics["pope_bias/yes_rate_gap_matched"] == {**metrics["pope_bias/yes_rate_gap_matched"],
                                                         "value": 0.5, "n": 4}
    assert metrics["pope_bias/stratum/shape/yes_rate_gap"] == {**metrics["pope_bias/stratum/shape/yes_rate_gap"],
                                                               "value": 1.0, "n": 2}
    assert metrics["pope_bias/stratum/neither/yes_rate_gap"]["value"] == 0.0
    assert not any(key.startswith("pope_bias/stratum/present/") for key in metrics)  # positives are not in it
    assert metrics["chair/chair_s"]["n"] == 8 and metrics["cooccur/partner_rate"]["n"] == 4
    pope = [json.loads(line) for line in (tmp_path / "run" / "samples_pope.jsonl").read_text().splitlines()]
    assert {"prompt", "answer", "parsed", "truth", "scores"} <= set(pope[0]) and len(pope) == 12
    assert [r["stratum"] for r in sorted(pope, key=lambda r: r["id"])] == STRATA
    caps = [json.loads(line) for line in (tmp_path / "run" / "samples_captions.jsonl").read_text().splitlines()]
    assert len(caps) == 8 and sum(bool(c["units"]) for c in caps) == 4
    n_hal = sum(len(c["hallucinated"]) for c in caps)
    n_mentions = sum(len(c["mentions"]) for c in caps)
    expected = n_hal / n_mentions if n_mentions else None
    assert metrics["chair/chair_i"]["value"] == pytest.approx(expected)


def test_compare_pairs_runs_and_writes_a_report(lab, fitted, tmp_path):
    model, processor = fitted
    evaluate(_cfg(lab, tmp_path / "fitted", **{"pope.scorer": "likelihood"}), model, processor)
    evaluate(_cfg(lab, tmp_path / "fitted_gen"), model, processor)  # generate: the default
    random_model, random_processor = build_tiny_vlm("llava", seed=1)
    evaluate(_cfg(lab, tmp_path / "random"), random_model, random_processor)
    runs = {name: tmp_path / name for name in ("fitted", "fitted_gen", "random")}
    comparison = compare(runs, n_boot=200)
    same = comparison.tests["fitted_gen"]["pope/all/accuracy"]
    assert same.diff == 0.0 and same.p_value == 1.0   # both scorers gave the same answers
    diff = comparison.tests["random"]["pope/all/yes_ratio"]
    assert diff.diff == pytest.approx(diff.value_a - diff.value_b)
    assert diff.value_b == comparison.values["fitted"]["pope/all/yes_ratio"].value
    report = write_report(comparison, tmp_path / "report", {k: str(v) for k, v in runs.items()})
    text = report.read_text()
    assert "| pope/adversarial/f1 |" in text and "Δ random − fitted" in text
    for png in ("pope.png", "hallucination.png"):
        assert (tmp_path / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="not scored on the same samples"):
        (tmp_path / "short").mkdir()
        lines = (lab / "eval" / "pope.jsonl").read_text().splitlines()
        (tmp_path / "short" / "pope.jsonl").write_text("\n".join(lines[:6]) + "\n")
        evaluate(_cfg(lab, tmp_path / "short_run", **{"pope.file": str(tmp_path / "short" / "pope.jsonl")}),
                 model, processor)
        compare({"a": tmp_path / "fitted", "b": tmp_path / "short_run"}, n_boot=10)
    unstratified = [{k: v for k, v in json.loads(line).items() if k != "stratum"}
                    for line in (lab / "eval" / "pope.jsonl").read_text().splitlines()]
    (tmp_path / "flat.jsonl").write_text("".join(json.dumps(item) + "\n" for item in unstratified))
    evaluate(_cfg(lab, tmp_path / "flat_run", **{"pope.file": str(tmp_path / "flat.jsonl")}), model, processor)
    with pytest.raises(ValueError, match="not scored on the same samples or POPE strata .*'pope(_bias|/random/stratum)"):
        compare({"a": tmp_path / "fitted", "b": tmp_path / "flat_run"}, n_boot=10)


def test_cli_eval_and_compare_match_the_library(lab, fitted, tmp_path, capsys):
    model, processor = fitted
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    common = [f"lab_dir={lab}", "stats.n_boot=200", "captions.max_new_tokens=24", "batch_size=5"]
    assert main(["eval", f"model={tmp_path / 'model'}", f"out_dir={tmp_path / 'cli'}", "pope.scorer=likelihood",
                 *common]) == 0
    in_process = evaluate(_cfg(lab, tmp_path / "lib"), model, processor)
    assert json.loads((tmp_path / "cli" / "metrics.json").read_text())["metrics"] == in_process["metrics"]
    assert main(["eval", "compare", str(tmp_path / "lib"), str(tmp_path / "cli"), f"out_dir={tmp_path / 'rep'}",
                 "n_boot=50"]) == 0
    assert "| pope/all/f1 |" in (tmp_path / "rep" / "report.md").read_text()
    capsys.readouterr()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "q7", "image": "images/0.png", "question": "Is there?", "label": "maybe",
                               "split": "random", "object": "red circle"}) + "\n")
    assert main(["eval", f"model={tmp_path / 'model'}", f"out_dir={tmp_path / 'bad'}", f"pope.file={bad}",
                 *common]) == 1
    assert "bad.jsonl:1 (id 'q7'): field 'label' must be one of ['yes', 'no'], got 'maybe'" in capsys.readouterr().err
    assert main(["eval", f"lab_dir={lab}", "pope.scorer=beam"]) == 2
    assert main(["eval", "annotator", "no_such_key=1"]) == 2  # dispatched to the annotator config
    assert "no_such_key" in capsys.readouterr().err


def test_inputs_are_checked_before_any_model_runs(lab, tmp_path):
    lines = (lab / "eval" / "captions.jsonl").read_text().splitlines()
    bad = json.loads(lines[3])
    bad["objects"] = ["red circle", "purple star"]
    (tmp_path / "captions.jsonl").write_text("\n".join(lines[:3] + [json.dumps(bad)]) + "\n")
    cfg = _cfg(lab, tmp_path / "out", **{"captions.file": str(tmp_path / "captions.jsonl")})
    with pytest.raises(ValueError, match=r"captions.jsonl \(id 'cap-3'\): field 'objects' holds \['purple star'\]"):
        evaluate(cfg)  # no model given and cfg.model empty: the input error comes first
    (tmp_path / "bias.json").write_text(json.dumps({"pairs": [["red circle", "gold star"]]}))
    with pytest.raises(ValueError, match=r"bias pairs name \['gold star'\]"):
        load_inputs(_cfg(lab, tmp_path / "out", **{"captions.bias": str(tmp_path / "bias.json")}))
    with pytest.raises(FileNotFoundError, match="pope.file: .*missing.jsonl does not exist"):
        load_inputs(_cfg(lab, tmp_path / "out", **{"pope.file": "eval/missing.jsonl"}))
