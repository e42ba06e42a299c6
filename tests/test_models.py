"""favor.models: PerformerConfig validation, PerformerLM (causality, cached decoding, generation),
PerformerEncoder padding, PerformerClassifier pooling, state_dict, redraw, torch.compile."""

import dataclasses

import pytest
import torch

from favor.models import PerformerClassifier, PerformerConfig, PerformerEncoder, PerformerLM
from favor.nn import FavorAttention, ProjectionRedraw, derive_seed, projection_fingerprint

F64 = torch.float64
TINY = dict(vocab_size=37, d_model=24, n_heads=3, n_layers=2, max_len=64, nb_features=12, chunk_size=8)


def tiny(**changes) -> PerformerConfig:
    return PerformerConfig(**{**TINY, **changes})


def tokens(B, L, seed=0, vocab=37):
    return torch.randint(0, vocab, (B, L), generator=torch.Generator().manual_seed(seed))


def build(cls, cfg, *args, seed=0):
    torch.manual_seed(seed)
    return cls(cfg, *args).double().eval()


# ----------------------------------------------------------------------------- config

def test_config_defaults_and_round_trip():
    cfg = PerformerConfig()
    assert PerformerConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.replace(n_layers=2).n_layers == 2 and cfg.n_layers == 4
    for f in dataclasses.fields(PerformerConfig):
        assert f.metadata.get("help"), f"field {f.name} has no help"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.d_model = 64


def test_config_from_dict_and_replace_name_unknown_keys():
    with pytest.raises(ValueError, match="n_layer'"):
        PerformerConfig.from_dict({"n_layer": 2, "d_model": 64})
    with pytest.raises(ValueError, match="heads"):
        PerformerConfig().replace(heads=2)
    with pytest.raises(ValueError, match="n_heads=5"):
        PerformerConfig().replace(n_heads=5)  # replace validates


BAD_CONFIGS = [
    ({"d_model": 100, "n_heads": 3}, ValueError, "d_model=100"),
    ({"d_model": 30, "n_heads": 2}, ValueError, "even head dim"),
    ({"attention": "linear"}, ValueError, "linear"),
    ({"features": "cosine"}, ValueError, "cosine"),
    ({"kernel": "relu", "features": "positive"}, ValueError, "features='positive'"),
    ({"kernel": "tanh"}, ValueError, "tanh"),
    ({"projection": "sparse"}, ValueError, "sparse"),
    ({"projection": None}, ValueError, "projection=None"),
    ({"scaling": "unit"}, ValueError, "unit"),
    ({"nb_features": 0}, ValueError, "nb_features"),
    ({"nb_features": None}, ValueError, "nb_features"),
    ({"dropout": 1.0}, ValueError, "dropout"),
    ({"dropout": -0.1}, ValueError, "dropout"),
    ({"mlp_ratio": 0.0}, ValueError, "mlp_ratio"),
    ({"vocab_size": 0}, ValueError, "vocab_size"),
    ({"max_len": 0}, ValueError, "max_len"),
    ({"n_layers": 2.0}, TypeError, "n_layers"),
    ({"n_layers": True}, TypeError, "n_layers"),
    ({"rotary": "yes"}, TypeError, "rotary"),
    ({"seed": -3}, ValueError, "seed"),
    ({"chunk_size": 0}, ValueError, "chunk_size"),
    ({"mlp_ratio": float("nan")}, ValueError, "mlp_ratio must be finite"),
    ({"mlp_ratio": float("inf")}, ValueError, "mlp_ratio must be finite"),
    ({"dropout": float("nan")}, ValueError, "dropout must be finite"),
    ({"mlp_ratio": "2"}, TypeError, "mlp_ratio must be a float"),
    ({"key_estimator": "exact"}, ValueError, "unknown key_estimator 'exact'"),
    ({"key_estimator": "normalized", "features": "trig"}, ValueError, "features='trig'"),
    ({"key_estimator": "calibrated", "kernel": "relu"}, ValueError, "kernel='relu'"),
]


@pytest.mark.parametrize("changes,exc,match", BAD_CONFIGS, ids=[str(c) for c, _, _ in BAD_CONFIGS])
def test_config_rejects_bad_values(changes, exc, match):
    with pytest.raises(exc, match=match):
        PerformerConfig(**changes)


def test_config_identity_projection_for_relu():
    cfg = PerformerConfig(kernel="elu", projection=None, nb_features=None)
    assert PerformerLM(cfg).backbone.blocks[0].attn.favor.projection is None
    with pytest.raises(ValueError, match="nb_features=64"):
        PerformerConfig(kernel="elu", projection=None)


# ----------------------------------------------------------------------------- PerformerLM

@pytest.mark.parametrize("attention", ["favor", "softmax"])
def test_lm_changing_future_tokens_leaves_past_logits_bitwise_unchanged(attention):
    model = build(PerformerLM, tiny(attention=attention)).float()
    a = tokens(2, 29)
    b = a.clone()
    b[:, 17:] = tokens(2, 12, seed=1)
    la, lb = model(a), model(b)
    assert la.shape == (2, 29, 37)
    assert torch.equal(la[:, :17], lb[:, :17])
    assert not torch.equal(la[:, 17:], lb[:, 17:])


CACHE_CASES = [
    ("favor-rotary", {}),
    ("favor-learned-pos", {"rotary": False}),
    ("favor-oprf", {"features": "oprf"}),
    ("favor-calibrated-keys", {"key_estimator": "calibrated"}),
    ("favor-hyperbolic_oprf-normalized-keys", {"features": "hyperbolic_oprf", "key_estimator": "normalized"}),
    ("softmax-rotary", {"attention": "softmax"}),
    ("softmax-learned-pos", {"attention": "softmax", "rotary": False}),
]


@pytest.mark.parametrize("changes", [c for _, c in CACHE_CASES], ids=[i for i, _ in CACHE_CASES])
def test_lm_incremental_logits_equal_full_forward(changes):
    model = build(PerformerLM, tiny(**changes))
    idx = tokens(2, 26)
    full = model(idx)
    logits, cache = model(idx[:, :10], return_cache=True)
    outs = [logits]
    for t in range(10, 26):
        logits, cache = model(idx[:, t:t + 1], cache=cache, return_cache=True)
        outs.append(logits)
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-10, atol=1e-10)


def test_tiny_positive_temperature_samples_the_argmax_without_overflow():
    """logits / 1e-45 overflows; shifting by the row max first keeps the top logit at 0."""
    model = build(PerformerLM, tiny(attention="favor"))
    prompt = tokens(2, 5)
    greedy = model.generate(prompt, 6, temperature=0)
    assert torch.equal(model.generate(prompt, 6, temperature=1e-45, generator=torch.Generator().manual_seed(0)), greedy)


@pytest.mark.parametrize("attention", ["favor", "softmax"])
def test_greedy_generation_matches_full_forward_argmax(attention):
    model = build(PerformerLM, tiny(attention=attention))
    prompt = tokens(2, 5)
    out = model.generate(prompt, 12, temperature=0)
    assert out.shape == (2, 17) and torch.equal(out[:, :5], prompt)
    for t in range(5, 17):
        assert torch.equal(out[:, t], model(out[:, :t])[:, -1].argmax(-1))
    assert torch.equal(model.generate(prompt, 12, top_k=1), out)  # top_k=1 is greedy too


def test_sampling_is_reproducible_and_stream_equals_generate():
    model = build(PerformerLM, tiny())
    prompt = tokens(3, 4)
    a = model.generate(prompt, 10, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(3))
    b = model.generate(prompt, 10, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    stream = list(model.generate_stream(prompt, 10, temperature=0.8, top_k=5,
                                        generator=torch.Generator().manual_seed(3)))
    assert len(stream) == 10 and all(t.shape == (3,) and t.dtype == torch.long for t in stream)
    assert torch.equal(torch.stack(stream, 1), a[:, 4:])
    # top-k restricts every sample to the k most likely tokens of the full forward
    for t in range(4, 14):
        top5 = model(a[:, :t])[:, -1].topk(5).indices
        assert (top5 == a[:, t:t + 1]).any(-1).all()
    assert torch.equal(model.generate(prompt, 0), prompt)


BAD_GENERATE = [
    ({"temperature": -1.0}, ValueError, "temperature"),
    ({"temperature": float("inf")}, ValueError, "temperature"),
    ({"top_k": 0}, ValueError, "top_k"),
    ({"top_k": 38}, ValueError, "top_k"),
    ({"max_new_tokens": -1}, ValueError, "max_new_tokens"),
    ({"max_new_tokens": 61}, ValueError, "max_len=64"),
    ({"prompt": torch.zeros(2, 0, dtype=torch.long)}, ValueError, "L0 >= 1"),
    ({"prompt": torch.zeros(2, 3)}, TypeError, "integer"),
    ({"prompt": torch.full((1, 3), 37)}, ValueError, r"\[0, 37\)"),
    ({"generator": 5}, TypeError, "generator"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD_GENERATE, ids=[m for _, _, m in BAD_GENERATE])
def test_generate_validates_before_the_first_token(kwargs, exc, match):
    model = build(PerformerLM, tiny())
    args = {"prompt": tokens(2, 4), "max_new_tokens": 5, **kwargs}
    prompt, n = args.pop("prompt"), args.pop("max_new_tokens")
    with pytest.raises(exc, match=match):
        model.generate_stream(prompt, n, **args)  # raises at the call, not at the first next()


def test_lm_input_errors():
    model = build(PerformerLM, tiny())
    with pytest.raises(ValueError, match="max_len=64"):
        model(tokens(1, 65))
    with pytest.raises(TypeError, match="integer"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        model(tokens(1, 3)[0])
    _, cache = model(tokens(1, 60), return_cache=True)
    with pytest.raises(ValueError, match="offset 60"):
        model(tokens(1, 5), cache=cache)


# ----------------------------------------------------------------------------- state, seeds, redraw

def test_state_dict_round_trip_reproduces_outputs_exactly():
    cfg = tiny(features="hyperbolic")
    src = build(PerformerLM, cfg, seed=0)
    src.redraw_projections_(torch.Generator().manual_seed(9))
    dst = build(PerformerLM, cfg.replace(seed=5), seed=1)  # other weights and projections
    idx = tokens(2, 21)
    assert not torch.equal(dst(idx), src(idx))
    dst.load_state_dict(src.state_dict())
    assert torch.equal(dst(idx), src(idx))
    assert projection_fingerprint(dst) == projection_fingerprint(src)


def test_layer_projections_are_seeded_from_config_seed_and_layer():
    a, b = PerformerLM(tiny()), PerformerLM(tiny())
    c = PerformerLM(tiny(seed=1))
    layers = [m for m in a.modules() if isinstance(m, FavorAttention)]
    assert len(layers) == 2 and not torch.equal(layers[0].projection, layers[1].projection)
    assert layers[1].seed == derive_seed(0, 1)
    assert projection_fingerprint(a) == projection_fingerprint(b) != projection_fingerprint(c)


def test_forward_never_redraws_and_redraw_changes_outputs():
    model = build(PerformerLM, tiny())
    idx = tokens(1, 15)
    fp = projection_fingerprint(model)
    model.train()
    first = model(idx)
    assert torch.equal(model(idx), first) and projection_fingerprint(model) == fp
    assert model.redraw_projections_(torch.Generator().manual_seed(1)) == 2
    assert projection_fingerprint(model) != fp
    assert not torch.equal(model(idx), first)


def test_projection_redraw_schedule_agrees_across_ranks():
    rank0, rank1 = PerformerLM(tiny(seed=0)), PerformerLM(tiny(seed=7))
    s0, s1 = ProjectionRedraw(rank0, every=4, seed=123), ProjectionRedraw(rank1, every=4, seed=123)
    for step in range(1, 9):
        assert s0.maybe_redraw(step) == s1.maybe_redraw(step) == (step % 4 == 0)
    assert projection_fingerprint(rank0) == projection_fingerprint(rank1)


def test_softmax_model_has_no_projections():
    model = PerformerLM(tiny(attention="softmax"))
    assert not any(k.endswith("projection") for k in model.state_dict())
    assert model.redraw_projections_(torch.Generator()) == 0


# ----------------------------------------------------------------------------- encoder, classifier

@pytest.mark.parametrize("attention", ["favor", "softmax"])
def test_encoder_padded_keys_do_not_change_real_tokens(attention):
    enc = build(PerformerEncoder, tiny(attention=attention))
    idx = tokens(2, 19)
    mask = torch.ones(2, 19, dtype=torch.bool)
    mask[0, 12:] = False
    mask[1, 3:5] = False
    other = torch.where(mask, idx, tokens(2, 19, seed=4))
    assert not torch.equal(other, idx)
    ha, hb = enc(idx, mask), enc(other, mask)
    assert ha.shape == (2, 19, 24)
    torch.testing.assert_close(ha[mask], hb[mask], rtol=1e-11, atol=1e-11)
    assert not torch.allclose(enc(idx)[mask], ha[mask])  # the mask matters
    assert enc.mlm_logits(ha).shape == (2, 19, 37)


def test_encoder_is_bidirectional():
    enc = build(PerformerEncoder, tiny())
    a = tokens(1, 10)
    b = a.clone()
    b[0, 9] = (b[0, 9] + 1) % 37
    assert not torch.allclose(enc(a)[0, 0], enc(b)[0, 0])


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_classifier_pooling_honours_the_mask(pooling):
    clf = build(PerformerClassifier, tiny(), 5, pooling)
    idx = tokens(3, 14)
    mask = torch.ones(3, 14, dtype=torch.bool)
    mask[1, 8:] = False
    mask[2, 1:] = False
    other = torch.where(mask, idx, tokens(3, 14, seed=8))
    out = clf(idx, mask)
    assert out.shape == (3, 5)
    torch.testing.assert_close(out, clf(other, mask), rtol=1e-11, atol=1e-11)
    if pooling == "mean":  # mean over the real tokens only
        h = clf.encoder(idx, mask)
        torch.testing.assert_close(out[1], clf.head(h[1, :8].mean(0)), rtol=1e-12, atol=1e-12)


def test_classifier_errors():
    with pytest.raises(ValueError, match="max"):
        PerformerClassifier(tiny(), 3, pooling="max")
    with pytest.raises(ValueError, match="num_classes"):
        PerformerClassifier(tiny(), 0)
    with pytest.raises(TypeError, match="PerformerConfig"):
        PerformerClassifier({"d_model": 8}, 2)


# ----------------------------------------------------------------------------- training, compile

def test_a_few_steps_reduce_the_loss():
    torch.manual_seed(0)
    model = PerformerLM(tiny())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    idx = torch.arange(33).remainder(5).repeat(4, 1)  # a periodic sequence: easy to learn
    losses = []
    for _ in range(30):
        logits = model(idx[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 37), idx[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.slow
def test_torch_compile_matches_eager():
    """One small case: compiling costs ~20 s of CPU on the 2-core reference machine."""
    model = build(PerformerLM, tiny(n_layers=1)).float()
    idx = tokens(2, 12)
    eager = model(idx)
    out = torch.compile(model)(idx)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)


def test_key_estimator_reaches_every_layer_and_round_trips_through_the_config():
    cfg = tiny(key_estimator="calibrated")
    model = build(PerformerLM, cfg)
    layers = [m for m in model.modules() if isinstance(m, FavorAttention)]
    assert layers and all(m.key_estimator == "calibrated" for m in layers)
    assert "key_estimator='calibrated'" in repr(layers[0])
    assert PerformerConfig.from_dict(dataclasses.asdict(cfg)) == cfg
    # a config saved before the option existed loads with the unbiased default
    old = {k: v for k, v in dataclasses.asdict(tiny()).items() if k != "key_estimator"}
    assert PerformerConfig.from_dict(old).key_estimator == "plain"
    # and the option changes the outputs (same weights and projections)
    idx = tokens(2, 20)
    plain = build(PerformerLM, tiny())
    assert not torch.allclose(model(idx), plain(idx))
