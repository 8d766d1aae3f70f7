"""Model bundle: writing, loading, scoring and rejection of broken bundles."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest

from crossrank.bundle import Bundle, BundleError, file_sha256, load_bundle
from crossrank.export import quantize_int8, write_bundle
from crossrank.features import InputSpec
from crossrank.models import CrossEncoder, sigmoid

METRICS = {"ndcg@10": 0.81, "num_queries": 40}


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory, fp32_onnx: Path, checkpoint: Path) -> Path:
    out_dir = tmp_path_factory.mktemp("bundles") / "student"
    return write_bundle(fp32_onnx, checkpoint, out_dir, "student", extra_files={"metrics.json": METRICS})


@pytest.fixture(scope="module")
def bundle(bundle_dir: Path) -> Bundle:
    return load_bundle(bundle_dir)


@pytest.fixture
def broken(tmp_path: Path, bundle_dir: Path) -> Path:
    """Return a copy of the bundle that a test may damage."""
    return Path(shutil.copytree(bundle_dir, tmp_path / "bundle"))


def read_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))


def write_config(folder: Path, config: dict) -> None:
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")


def test_bundle_config_contents(bundle_dir: Path) -> None:
    config = read_config(bundle_dir)
    model_sha = file_sha256(bundle_dir / "model.onnx")

    assert sorted(path.name for path in bundle_dir.iterdir()) == ["config.json", "metrics.json", "model.onnx", "tokenizer.json"]
    assert config["format_version"] == 1
    assert config["model_name"] == "student"
    assert config["model_version"] == model_sha[:12]
    assert config["input_spec"] == InputSpec(max_length=64).model_dump(mode="json")
    assert config["score"] == {"function": "sigmoid"}
    assert config["precision"] == "fp32"
    assert config["optimized"] is False
    assert config["files"] == {
        "model.onnx": model_sha,
        "tokenizer.json": file_sha256(bundle_dir / "tokenizer.json"),
        "metrics.json": file_sha256(bundle_dir / "metrics.json"),
    }
    assert config["tokenizer"] == {"vocab_size": 30522, "cls_id": 101, "sep_id": 102, "pad_id": 0}
    assert json.loads((bundle_dir / "metrics.json").read_text(encoding="utf-8")) == METRICS


def test_bundle_scores_match_pytorch(bundle: Bundle, checkpoint: Path, judgments: pd.DataFrame) -> None:
    queries, products = judgments["query"].tolist(), judgments.to_dict("records")
    expected = sigmoid(CrossEncoder.load(checkpoint).predict_logits(queries, products))

    scores = bundle.score(queries, products)

    assert scores.shape == (253,)
    assert np.max(np.abs(scores - expected)) <= 1e-4
    # The head spreads the scores, so the comparison is not between near-constants.
    assert scores.max() - scores.min() > 0.5


def test_bundle_logits_shape_and_dtype(bundle: Bundle, judgments: pd.DataFrame) -> None:
    batch = bundle.builder.build(judgments["query"].tolist()[:7], judgments.to_dict("records")[:7])

    logits = bundle.logits(batch)

    assert logits.shape == (7,)
    assert logits.dtype == np.float32


def test_score_ignores_batch_neighbours_and_padding(bundle: Bundle, judgments: pd.DataFrame) -> None:
    records = judgments.to_dict("records")
    encoded = bundle.builder.encode_pairs([r["query"] for r in records], records)
    lengths = [len(ids) for ids, _ in encoded]
    short, long = int(np.argmin(lengths)), int(np.argmax(lengths))
    assert lengths[long] - lengths[short] >= 20

    alone = bundle.score_sequences([encoded[short]])
    padded = bundle.score_sequences([encoded[short], encoded[long]])

    assert abs(alone[0] - padded[0]) <= 1e-6


def test_score_sequences_keeps_input_order(bundle: Bundle, judgments: pd.DataFrame) -> None:
    records = judgments.to_dict("records")[:30]
    encoded = bundle.builder.encode_pairs([r["query"] for r in records], records)

    in_order = bundle.score_sequences(encoded, batch_size=4)
    one_by_one = np.array([bundle.score_sequences([pair])[0] for pair in encoded])

    assert np.max(np.abs(in_order - one_by_one)) <= 1e-6


def test_score_sequences_rejects_too_long(bundle: Bundle) -> None:
    message = (
        "sequence 1 has 65 ids and 65 token types; expected the same number, between 1 and "
        "max_length 64: build sequences with Bundle.builder"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        bundle.score_sequences([([101, 102], [0, 0]), ([101] * 65, [0] * 65)])


def test_load_rejects_missing_folder(tmp_path: Path) -> None:
    folder = tmp_path / "nowhere"
    message = (
        f"model bundle folder not found: {folder}; pass the folder that the export stage wrote "
        "(it contains model.onnx, tokenizer.json and config.json)"
    )
    with pytest.raises(BundleError, match=re.escape(message)):
        load_bundle(folder)


def test_load_rejects_missing_model(broken: Path) -> None:
    (broken / "model.onnx").unlink()

    message = f"model bundle {broken} has no model.onnx; re-run the export stage to write the bundle again"
    with pytest.raises(BundleError, match=re.escape(message)):
        load_bundle(broken)


def test_load_rejects_flipped_bytes_in_model(broken: Path) -> None:
    model = broken / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 8] = bytes(b ^ 0xFF for b in data[len(data) // 2 : len(data) // 2 + 8])
    model.write_bytes(bytes(data))

    message = (
        f"{model} is corrupted: its sha256 is {file_sha256(model)}, but config.json records "
        f"{read_config(broken)['files']['model.onnx']}; copy the bundle again or re-run the export stage"
    )
    with pytest.raises(BundleError, match=re.escape(message)):
        load_bundle(broken)


def test_load_rejects_truncated_model(broken: Path) -> None:
    model = broken / "model.onnx"
    model.write_bytes(model.read_bytes()[:1000])

    with pytest.raises(BundleError, match=re.escape(f"{model} is corrupted: its sha256 is {file_sha256(model)}")):
        load_bundle(broken)
    # Without the checksum, ONNX Runtime itself rejects the file.
    with pytest.raises(BundleError, match=re.escape(f"{model} failed to load in ONNX Runtime (")):
        load_bundle(broken, verify=False)


def test_load_rejects_vocab_size_mismatch(broken: Path) -> None:
    config = read_config(broken)
    config["tokenizer"]["vocab_size"] = 30000
    write_config(broken, config)

    message = (
        f"{broken / 'tokenizer.json'} does not match config.json: the tokenizer has "
        "{'vocab_size': 30522, 'cls_id': 101, 'sep_id': 102, 'pad_id': 0}, but config.json records "
        "{'vocab_size': 30000, 'cls_id': 101, 'sep_id': 102, 'pad_id': 0}; the tokenizer file belongs "
        "to another model, so copy the bundle again or re-run the export stage"
    )
    with pytest.raises(BundleError, match=re.escape(message)):
        load_bundle(broken)


def test_load_rejects_wrong_format_version(broken: Path) -> None:
    config = read_config(broken)
    config["format_version"] = 2
    write_config(broken, config)

    message = (
        f"{broken / 'config.json'} has format_version 2, expected 1; export the bundle again with "
        "this crossrank version, or serve it with the version that wrote it"
    )
    with pytest.raises(BundleError, match=re.escape(message)):
        load_bundle(broken)


def test_load_rejects_invalid_json(broken: Path) -> None:
    (broken / "config.json").write_text("{not json", encoding="utf-8")

    with pytest.raises(BundleError, match=re.escape(f"{broken / 'config.json'} is not valid JSON (")):
        load_bundle(broken)


def test_load_rejects_missing_key(broken: Path) -> None:
    config = read_config(broken)
    del config["precision"]
    write_config(broken, config)

    message = f"invalid {broken / 'config.json'}: precision: Field required; re-run the export stage"
    with pytest.raises(BundleError, match=re.escape(message)):
        load_bundle(broken)


def test_load_rejects_missing_listed_file(broken: Path) -> None:
    (broken / "metrics.json").unlink()

    message = f"model bundle {broken} has no metrics.json, which config.json lists; re-run the export stage"
    with pytest.raises(BundleError, match=re.escape(message)):
        load_bundle(broken)


def test_load_rejects_graph_without_expected_inputs(broken: Path) -> None:
    # A valid ONNX graph with the wrong signature: y = Identity(x).
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch"])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch"])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "identity", [x], [y])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), broken / "model.onnx")

    message = (
        f"{broken / 'model.onnx'} has inputs ['x'] and outputs ['y']; expected inputs "
        "['input_ids', 'attention_mask', 'token_type_ids'] and an output 'logits': export the model "
        "with crossrank.export.export_onnx"
    )
    with pytest.raises(BundleError, match=re.escape(message)):
        load_bundle(broken, verify=False)


def test_write_bundle_detects_int8(tmp_path: Path, fp32_onnx: Path, checkpoint: Path) -> None:
    int8 = quantize_int8(fp32_onnx, tmp_path / "int8.onnx")

    folder = write_bundle(int8, checkpoint, tmp_path / "bundle", "student", model_version="v7")

    config = load_bundle(folder).config
    assert config.precision == "int8"
    assert config.optimized is False
    assert config.model_version == "v7"


def test_write_bundle_rejects_wrong_precision(tmp_path: Path, fp32_onnx: Path, checkpoint: Path) -> None:
    message = (
        f"precision='int8' was given, but the op types of {fp32_onnx} show precision='fp32'; pass the "
        "matching graph, or leave precision unset to read it from the graph"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        write_bundle(fp32_onnx, checkpoint, tmp_path / "bundle", "student", precision="int8")


def test_write_bundle_rejects_non_empty_folder(tmp_path: Path, fp32_onnx: Path, checkpoint: Path) -> None:
    (tmp_path / "old.json").write_text("{}", encoding="utf-8")

    message = f"bundle folder {tmp_path} exists and is not empty; remove it or choose a new folder"
    with pytest.raises(ValueError, match=re.escape(message)):
        write_bundle(fp32_onnx, checkpoint, tmp_path, "student")


def test_write_bundle_rejects_reserved_extra_file(tmp_path: Path, fp32_onnx: Path, checkpoint: Path) -> None:
    message = (
        "invalid extra bundle file name 'config.json': expected a plain file name ending in .json "
        "other than model.onnx, tokenizer.json and config.json"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        write_bundle(fp32_onnx, checkpoint, tmp_path / "bundle", "student", extra_files={"config.json": {}})


def test_bundle_import_loads_no_torch() -> None:
    code = (
        "import sys, crossrank.bundle; "
        "print(sorted(name for name in sys.modules if name.split('.')[0] in ('torch', 'transformers')))"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout

    assert output.strip() == "[]"
