"""LoRA adapters at run time: every family's adapted logits equal transformers+peft's and the merged-at-convert
model's; requests with different adapters batch together and answer as alone; the --lora-split export loads;
unloading and bad adapters fail with one clear line."""

from __future__ import annotations

import json
import threading

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

from edgellm.api.engine import Engine
from edgellm.errors import UserError
from edgellm.models.loader import load_model
from edgellm.models.lora import LoraSet, UnknownAdapterError, row_groups
from edgellm.models.registry import get_family
from edgellm.weights.convert import convert_weight
from tests.helpers import convert, forward, kv_pool, run_logits
from tests.test_internlm2 import grouped_wqkv, write_internlm2
from tests.test_internlm2 import llama as internlm2_llama
from tests.test_models_parity import build

FAMILIES = ["llama", "mistral-window", "qwen2-untied", "qwen3-untied-bias", "phi3-longrope-partial", "gemma2",
            "gpt_neox-parallel", "internlm2"]
IDS = torch.randint(5, 384, (24,), generator=torch.Generator().manual_seed(3))


def make_adapter(model, out, seed: int = 0, r: int = 4, targets="all-linear"):
    """A PEFT LoRA on every linear layer with random non-zero A and B, saved to `out`; returns the peft model."""
    torch.manual_seed(seed)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets,
                                                    init_lora_weights=False))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.mul_(0.3)  # a clear but moderate change of the logits
    pm.eval().save_pretrained(out)
    return pm


def internlm2_adapter(llama_dir, out) -> None:
    """The llama adapter rewritten for InternLM2's names: q/k/v pairs become one wqkv pair of rank 3r (A
    stacked, B block-diagonal in wqkv's grouped row order; rank_pattern), gate/up/down become w1/w3/w2."""
    cfg = json.loads((llama_dir / "adapter_config.json").read_text())
    t = load_file(llama_dir / "adapter_model.safetensors")
    new = {}
    pre = "base_model.model.model.layers.{i}."
    for i in range(2):
        p = pre.format(i=i)
        a = [t[p + f"self_attn.{x}_proj.lora_A.weight"] for x in "qkv"]
        b = [t[p + f"self_attn.{x}_proj.lora_B.weight"] for x in "qkv"]
        r = a[0].shape[0]
        blocks = [torch.nn.functional.pad(bi, (j * r, (2 - j) * r)) for j, bi in enumerate(b)]
        new[p + "attention.wqkv.lora_A.weight"] = torch.cat(a)
        new[p + "attention.wqkv.lora_B.weight"] = grouped_wqkv(*blocks) * 3  # scale alpha / 3r: undo the 1/3
        for ours, theirs in [("self_attn.o_proj", "attention.wo"), ("mlp.gate_proj", "feed_forward.w1"),
                             ("mlp.up_proj", "feed_forward.w3"), ("mlp.down_proj", "feed_forward.w2")]:
            for h in ("lora_A", "lora_B"):
                new[p + f"{theirs}.{h}.weight"] = t[p + f"{ours}.{h}.weight"]
    out.mkdir()
    cfg.update(rank_pattern={"wqkv": 3 * cfg["r"]}, target_modules=["wqkv", "wo", "w1", "w2", "w3"])
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(new, out / "adapter_model.safetensors")


def merged_model(hf_dir, out, adapter_dir, quant: str = "q0f32"):
    """The adapter merged at conversion (the reference a run-time adapter must equal)."""
    from edgellm.gen_config import gen_config

    convert_weight(hf_dir, quant, out, lora_adapter=adapter_dir, progress=False)
    gen_config(hf_dir, quant, "auto", out)
    return out


def runtime_logits(model_dir, adapter_dir, ids=IDS) -> torch.Tensor:
    model, cfg = load_model(model_dir)
    lora = LoraSet(model, get_family(cfg.model_type), cfg.model_type)
    adapter = lora.read("a", adapter_dir)
    lora.add(adapter)
    pool, slot = kv_pool(model, len(ids))
    with torch.inference_mode(), lora.bound(row_groups([adapter], [len(ids)])):
        return forward(model, pool, slot, ids, 0)


@pytest.mark.parametrize("name", FAMILIES)
def test_runtime_adapter_matches_peft_and_merged(name, tmp_path):
    if name == "internlm2":
        model = internlm2_llama(False)
        write_internlm2(model, False, tmp_path / "hf")
        hf_dir = tmp_path / "hf"
        pm = make_adapter(model, tmp_path / "llama_adapter")
        internlm2_adapter(tmp_path / "llama_adapter", tmp_path / "adapter")
    else:
        model, hf_dir = build(name, tmp_path)
        pm = make_adapter(model, tmp_path / "adapter")
    with torch.inference_mode():
        ref = pm(IDS[None]).logits[0].float()
    # the base converted with the adapter written apart, and the adapter merged at conversion
    base = tmp_path / "base"
    convert_weight(hf_dir, "q0f32", base, lora_adapter=tmp_path / "adapter", lora_split=True, progress=False)
    merged = merged_model(hf_dir, tmp_path / "merged", tmp_path / "adapter")
    from edgellm.gen_config import gen_config

    gen_config(hf_dir, "q0f32", "auto", base)
    merged_logits = run_logits(merged, IDS)
    ours = runtime_logits(base, tmp_path / "adapter")
    split = runtime_logits(base, base / "lora" / "adapter")
    assert (merged_logits - ref).abs().max().item() < 1e-4
    assert (ours - merged_logits).abs().max().item() < 1e-4
    assert (split - merged_logits).abs().max().item() < 1e-4
    plain = run_logits(base, IDS)
    assert (plain - merged_logits).abs().max().item() > 1e-2  # the adapter does change the answer


@pytest.mark.parametrize("quant", ["q4f16_1", "q8f16_1"])
def test_quantized_base(quant, tiny_hf, tmp_path):
    """On a quantized base (native kernels, 16-bit activations), the run-time adapter gives the logits of the
    dequantized base with the adapter merged into its float weights."""
    import transformers as tf

    from edgellm.compile.lowering import float_model
    from edgellm.quantization.layers import repack_model

    make_adapter(tf.AutoModelForCausalLM.from_pretrained(tiny_hf), tmp_path / "adapter")
    q = convert(tiny_hf, tmp_path / quant, quant)
    model, cfg = load_model(q, precision="high")
    ref = float_model(model)
    assert repack_model(model) > 0
    lora = LoraSet(model, get_family(cfg.model_type), cfg.model_type)
    adapter = lora.read("a", tmp_path / "adapter")
    lora.add(adapter)
    for name, (a, b) in adapter.weights.items():
        ref.get_submodule(name).weight.add_(b @ a)
    with torch.inference_mode():
        pool, slot = kv_pool(model, len(IDS))
        want = forward(ref, pool, slot, IDS, 0)
        pool, slot = kv_pool(model, len(IDS))
        plain = forward(model, pool, slot, IDS, 0)
        pool, slot = kv_pool(model, len(IDS))
        with lora.bound(row_groups([adapter], [len(IDS)])):
            got = forward(model, pool, slot, IDS, 0)
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() < 1e-3 * scale
    assert (plain - want).abs().max().item() > 1e-2 * scale


@pytest.fixture(scope="module")
def adapters(tiny_hf, tmp_path_factory):
    import transformers as tf

    out = tmp_path_factory.mktemp("adapters")
    for i, name in enumerate("ab"):
        make_adapter(tf.AutoModelForCausalLM.from_pretrained(tiny_hf), out / name, seed=i + 1, r=4 + 4 * i)
    return out


def run_core(eng, jobs):
    """On the engine's thread, add every (prompt, adapter) request to its core at once and step until all
    are done: one batch. Returns (outputs, the widest step, cached tokens)."""
    return eng.loop.call(lambda: _run_core(eng.core, jobs))


def _run_core(core, jobs):
    from edgellm.engine.request import Request, SamplingParams

    reqs = [Request(f"r{i}", list(p), SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True), lora=ad)
            for i, (p, ad) in enumerate(jobs)]
    for r in reqs:
        core.add(r)
    widths = []
    while core.has_work:
        widths.append(len(core.scheduler.running))
        core.step()
    return [r.sequences[0].output_ids for r in reqs], max(widths), [r.sequences[0].cached_tokens for r in reqs]


def test_mixed_adapters_batch_like_alone(tiny_model_q4, adapters):
    eng = Engine(str(tiny_model_q4), device="cpu", lora_adapters={"a": str(adapters / "a")})
    try:
        eng.load_lora("b", adapters / "b")
        assert eng.lora_adapters == ["a", "b"]
        assert eng.runner.fused is not None  # O2: rows without adapters would take the fused step
        lora = eng.core.lora
        prompt = IDS[:10].tolist()
        alone = {}
        for name in ("a", "b", None):  # same prompt in turn: a prefix computed under another adapter is not reused
            out, _, cached = run_core(eng, [(prompt, lora.get(name) if name else None)])
            alone[name] = out[0]
            assert cached == [0]
        assert len({tuple(v) for v in alone.values()}) == 3  # each adapter answers differently
        jobs = [(prompt, lora.get("a")), (prompt, lora.get("b")), (prompt, None), (prompt, lora.get("a"))]
        together, width, cached = run_core(eng, jobs)
        assert width == 4
        assert together == [alone["a"], alone["b"], alone[None], alone["a"]]
        assert cached[0] > 0  # the same adapter reuses its own prefix
        # the chat API: model="a", "<base>:b", the lora field
        msgs = [{"role": "user", "content": "Hello there"}]

        def ask(**kw):
            r = eng.chat.completions.create(messages=msgs, max_tokens=8, temperature=0, **kw)
            return r.choices[0].message.content

        results = {}
        threads = [threading.Thread(target=lambda k=k, kw=kw: results.__setitem__(k, ask(**kw)))
                   for k, kw in [("a", {"model": "a"}), ("b", {"model": f"{eng.model_id}:b"}), ("none", {}),
                                 ("a2", {"lora": "a"})]]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert results["a"] == results["a2"] == ask(lora="a") and results["none"] == ask()
        assert results["b"] == ask(lora="b")
        eng.unload_lora("a")
        assert eng.lora_adapters == ["b"]
        with pytest.raises(UnknownAdapterError, match="LoRA adapter 'a' is not loaded"):
            ask(lora="a")
        with pytest.raises(UnknownAdapterError, match="model 'a' is not served here"):
            ask(model="a")
        assert ask(model=eng.model_id) == results["none"]
    finally:
        eng.terminate()


def test_split_export_through_cli(tiny_hf, tiny_model, adapters, tmp_path, capsys):
    from edgellm.cli.main import main

    out = tmp_path / "base"
    with pytest.raises(SystemExit) as e:
        main(["convert_weight", str(tiny_hf), "--quantization", "q0f32", "-o", str(out), "--lora-adapter",
              str(adapters / "a"), "--lora-split"])
    assert e.value.code == 0
    assert "Wrote the LoRA adapter apart to" in capsys.readouterr().out
    split = out / "lora" / "a"
    assert json.loads((split / "adapter_config.json").read_text())["edgellm"]["base"]["hidden_size"] == 64
    # the base stays unmerged: its shards equal the plain conversion's
    assert (out / "params_shard_0.bin").read_bytes() == (tiny_model / "params_shard_0.bin").read_bytes()
    merged = merged_model(tiny_hf, tmp_path / "merged", adapters / "a")
    assert (runtime_logits(tiny_model, split) - run_logits(merged, IDS)).abs().max().item() < 1e-4
    # a bad adapter: exit 2, one line, nothing written
    layer9 = "base_model.model.model.layers.9.self_attn.q_proj."
    write_adapter(tmp_path / "bad", {layer9 + "lora_A.weight": torch.ones(4, 64),
                                     layer9 + "lora_B.weight": torch.ones(64, 4)})
    with pytest.raises(SystemExit) as e:
        main(["convert_weight", str(tiny_hf), "--quantization", "q0f32", "-o", str(tmp_path / "o2"), "--lora-adapter",
              str(tmp_path / "bad"), "--lora-split"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: LoRA adapter bad targets") and err.count("\n") == 1
    assert not (tmp_path / "o2" / "lora").exists()


def write_adapter(path, tensors: dict, r: int = 4, **cfg) -> None:
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": r, **cfg}))
    save_file(tensors, path / "adapter_model.safetensors")


def test_bad_adapters_are_refused_with_one_line(tiny_model, adapters, tmp_path):
    pre = "base_model.model.model.layers.0."
    a, b = torch.randn(4, 64), torch.randn(64, 4)
    write_adapter(tmp_path / "rank", {pre + "self_attn.q_proj.lora_A.weight": a,
                                      pre + "self_attn.q_proj.lora_B.weight": b}, r=8)
    write_adapter(tmp_path / "pair", {pre + "self_attn.q_proj.lora_A.weight": a,
                                      pre + "self_attn.q_proj.lora_B.weight": torch.randn(64, 3)})
    write_adapter(tmp_path / "module", {pre + "self_attn.foo_proj.lora_A.weight": a,
                                        pre + "self_attn.foo_proj.lora_B.weight": b})
    layer9 = "base_model.model.model.layers.9.self_attn.q_proj."
    write_adapter(tmp_path / "layer", {layer9 + "lora_A.weight": a, layer9 + "lora_B.weight": b})
    write_adapter(tmp_path / "shape", {pre + "self_attn.q_proj.lora_A.weight": torch.randn(4, 32),
                                       pre + "self_attn.q_proj.lora_B.weight": b})
    write_adapter(tmp_path / "head", {"base_model.model.lm_head.lora_A.weight": a,
                                      "base_model.model.lm_head.lora_B.weight": torch.randn(384, 4)})
    write_adapter(tmp_path / "base", {pre + "self_attn.q_proj.lora_A.weight": a,
                                      pre + "self_attn.q_proj.lora_B.weight": b},
                  edgellm={"base": {"model_type": "qwen2", "hidden_size": 64}})
    cases = {"rank": "rank mismatch", "pair": "rank mismatch", "module": "unknown target module",
             "layer": "unknown target module", "shape": "does not fit this base model",
             "head": "decoder layers' linear layers only", "base": "made for another base model"}
    eng = Engine(str(tiny_model), device="cpu", lora_adapters={"a": str(adapters / "a")})
    try:
        for case, msg in cases.items():
            with pytest.raises(UserError, match=msg) as e:
                eng.load_lora(case, tmp_path / case)
            assert "\n" not in str(e.value)
        with pytest.raises(UserError, match="loaded already"):
            eng.load_lora("a", adapters / "b")
        with pytest.raises(UserError, match="bad LoRA adapter name"):
            eng.load_lora("x:y", adapters / "b")
        with pytest.raises(UnknownAdapterError):
            eng.unload_lora("nope")
        assert eng.lora_adapters == ["a"]  # nothing lost: the engine still answers with its adapter
        r = eng.chat.completions.create(messages=[{"role": "user", "content": "hi"}], lora="a", max_tokens=4)
        assert r.usage.completion_tokens > 0
        # the chat's /set lora=NAME
        from edgellm.chat import ChatSession

        chat = ChatSession(eng, settings={"temperature": 0.0, "max_tokens": 6, "ignore_eos": True})
        assert chat.command("/set lora=zz").startswith("error: LoRA adapter 'zz' is not loaded")
        base = "".join(chat.send("Hello"))
        assert chat.command("/set lora=a") == "set lora=a"
        chat.reset()
        adapted = "".join(chat.send("Hello"))
        assert chat.command("/set lora=none") == "set lora=none" and "lora" not in chat.settings
        chat.reset()
        assert "".join(chat.send("Hello")) == base != adapted
    finally:
        eng.terminate()
    with pytest.raises(UserError, match="needs --lora-adapter"):
        convert_weight(tiny_model, "q0f32", tmp_path / "x", lora_split=True)
    with pytest.raises(UserError, match="expected NAME=DIR"):
        Engine(str(tiny_model), device="cpu", lora_adapters="a")


def test_server_adapters(tiny_model, adapters):
    """A real server: /v1/models lists the adapter; model="name", "<base>:name" and lora="name" pick it;
    after /v1/unload_lora_adapter the name is a 404 with an OpenAI error object."""
    import httpx
    import openai

    from tests.test_serve import Server

    s = Server(tiny_model, "--lora", f"a={adapters / 'a'}", "--allow-lora-updates", "--no-ui")
    try:
        client = openai.OpenAI(base_url=s.base + "/v1", api_key="unused", max_retries=0)
        ids = [m.id for m in client.models.list().data]
        assert ids[1:] == ["a"] and client.models.retrieve("a").parent == ids[0]

        def ask(**kw):
            r = client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                               temperature=0, **kw)
            return r.choices[0].message.content

        base = ask(model=ids[0])
        adapted = ask(model="a")
        assert adapted == ask(model=f"{ids[0]}:a") == ask(model=ids[0], extra_body={"lora": "a"}) != base
        r = httpx.post(s.base + "/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": str(adapters / "b")})
        assert r.status_code == 200 and [m.id for m in client.models.list().data][1:] == ["a", "b"]
        assert httpx.post(s.base + "/v1/unload_lora_adapter", json={"lora_name": "a"}).status_code == 200
        for kw in ({"model": "a"}, {"model": f"{ids[0]}:a"}, {"model": ids[0], "extra_body": {"lora": "a"}}):
            with pytest.raises(openai.NotFoundError) as e:
                ask(**kw)
            assert e.value.body["code"] == "model_not_found" and "'a'" in e.value.body["message"]
        r = httpx.post(s.base + "/v1/load_lora_adapter", json={"lora_name": "c", "lora_path": str(tiny_model)})
        assert r.status_code == 400 and "no adapter_config.json" in r.json()["error"]["message"]
        assert ask(model="b") != base and ask(model=str(tiny_model)) == base  # an alias of the base
    finally:
        s.stop()
