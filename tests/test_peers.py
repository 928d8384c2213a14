"""llama.cpp as a bench peer: the F32 GGUF it decodes, and the methods' plumbing without it."""
import gguf
import numpy as np
import pytest

from hybrid_sd import bench
from hybrid_sd.eval import llamacpp


def tiny_gguf(path):
    """A GGUF with metadata, a tokenizer array, one F32 and one Q8_0 tensor."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q8_0))
    writer.add_token_list(["a", "b", "c"])
    norm = np.linspace(-1, 1, 32, dtype=np.float32)
    weight = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    writer.add_tensor("norm.weight", norm)
    quantized = gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.w.weight", quantized, raw_shape=quantized.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return norm, gguf.quants.dequantize(quantized, gguf.GGMLQuantizationType.Q8_0)


def test_f32_gguf_has_the_same_weights_and_metadata(tmp_path):
    norm, weight = tiny_gguf(tmp_path / "q.gguf")
    out = llamacpp.write_f32_gguf(tmp_path / "q.gguf", tmp_path / "f.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.gguf", "q.gguf"]  # no temporary left
    reader = gguf.GGUFReader(out)
    tensors = {t.name: t for t in reader.tensors}
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in tensors.values())
    np.testing.assert_array_equal(tensors["norm.weight"].data, norm)
    np.testing.assert_array_equal(tensors["blk.0.w.weight"].data, weight)
    assert reader.fields["general.file_type"].contents() == int(gguf.LlamaFileType.ALL_F32)
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["llama.block_count"].contents() == 1
    assert reader.fields["tokenizer.ggml.tokens"].contents() == ["a", "b", "c"]


def test_an_interrupted_f32_gguf_leaves_nothing(tmp_path, monkeypatch):
    tiny_gguf(tmp_path / "q.gguf")

    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", broken)
    with pytest.raises(KeyboardInterrupt):
        llamacpp.write_f32_gguf(tmp_path / "q.gguf", tmp_path / "f.gguf")
    assert [p.name for p in tmp_path.iterdir()] == ["q.gguf"]


def test_llamacpp_methods_only_where_installed(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(llamacpp, "available", lambda: False)
    assert not set(bench.LLAMACPP) & set(bench.parse_methods(None))
    assert bench.main(["--quick", "--methods", "plain,llamacpp", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "llama-cpp-python" in err and "pip install" in err
    assert not any(tmp_path.iterdir())
    monkeypatch.setattr(llamacpp, "available", lambda: True)
    assert set(bench.LLAMACPP) <= set(bench.parse_methods(None))
    assert bench.method_spec("llamacpp:tree") is None


@pytest.mark.slow
@pytest.mark.skipif(not llamacpp.available(), reason="llama-cpp-python is not installed (optional extra: peers)")
def test_llamacpp_peer_decodes_like_plain(tmp_path):
    methods = ["plain", "llamacpp", "llamacpp-lookup"]
    assert bench.main(["--quick", "--methods", ",".join(methods), "--max-new-tokens", "16", "--no-plots",
                       "--out", str(tmp_path)]) == 0
    import json
    result = json.loads((tmp_path / "results.json").read_text())
    assert all(result["tokens_per_s"][m]["mix"] > 0 for m in methods)
    assert result["equal_outputs"]["llamacpp"] == "4/4"
