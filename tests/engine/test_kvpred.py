"""KV prediction on tiny random models: the dense forward matches the engine, a perfect
predictor reproduces the base's greedy tokens (keys rotated at the right positions), GQA
shapes, a short training run lowers the loss, checkpoints resume."""

import json

import pytest
import torch

from engine.kvpred.dense import forward_dense, rotate
from engine.kvpred.predictor import EVERY_OTHER_LAYER, KVPredictor, PredictorInfo
from engine.models.loader import load_model, open_weights

from parity_cases import NUM_TOKENS, prompts


def base_model(path):
    return load_model(open_weights(path), torch.float32, torch.device("cpu"), 512)


def greedy_over_prefix(base, prefix, last_token: int, start: int, num_tokens: int) -> list[int]:
    """The base's greedy tokens after a given prompt cache of `start` tokens and the prompt's
    last token (recomputed each step: tiny models only)."""
    tokens = [last_token]
    out = []
    for _ in range(num_tokens):
        hidden, _ = forward_dense(base, torch.tensor(tokens), start=start, prefix=prefix)
        out.append(int(base.compute_logits(hidden[-1:]).argmax()))
        tokens.append(out[-1])
    return out


def predicted_prefix(predictor, base, prompt):
    pred, _ = predictor.predict(torch.tensor(prompt[:-1]))
    return [(rotate(k, base), v) for k, v in pred]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_a_perfect_predictor_gives_the_base_greedy_tokens(arch, tiny_dirs, references):
    """Auxiliary = the base itself, identity maps: the predicted keys (before rotary), rotated by
    the base at their positions, are its own cache, so greedy decoding matches HF exactly."""
    base = base_model(tiny_dirs[arch])
    info = PredictorInfo(str(tiny_dirs[arch]), "self", {}, tuple(range(base.num_layers)), 512)
    predictor = KVPredictor(base, base.cfg, info)
    with torch.no_grad():
        for i in (2, 4, 7):  # 17, 64 and 200 tokens
            prompt = prompts()[i]
            prefix = predicted_prefix(predictor, base, prompt)
            _, true = forward_dense(base, torch.tensor(prompt[:-1]))
            assert all(torch.allclose(rotate(tk, base), pk, atol=1e-5) for (tk, _), (pk, _) in zip(true, prefix))
            got = greedy_over_prefix(base, prefix, prompt[-1], len(prompt) - 1, NUM_TOKENS)
            assert got == references(arch)[i][:len(got)]


def test_every_other_layer_starts_from_the_base_with_gqa_shapes(tiny_dirs):
    base = base_model(tiny_dirs["llama"])
    cfg = base.cfg
    assert cfg.num_kv_heads < cfg.num_heads  # the tiny Llama is GQA
    predictor = KVPredictor.every_other_layer(base, str(tiny_dirs["llama"]), 512)
    assert predictor.aux.num_layers == (cfg.num_layers + 1) // 2
    assert predictor.info.source_layers == tuple(i // 2 for i in range(cfg.num_layers))
    prompt = torch.tensor(prompts()[4])
    with torch.no_grad():
        pred, _ = predictor.predict(prompt)
        _, true = forward_dense(base, prompt)
    assert [k.shape for k, _ in pred] == [(len(prompt), cfg.num_kv_heads, cfg.head_dim)] * cfg.num_layers
    assert torch.allclose(pred[0][0], true[0][0], atol=1e-5)  # layer 0 is copied, its maps identities
    assert predictor.aux.embed_tokens.weight.data_ptr() != base.embed_tokens.weight.data_ptr()  # a copy


def test_save_and_load_round_trip(tiny_dirs, tmp_path):
    base = base_model(tiny_dirs["llama"])
    predictor = KVPredictor.every_other_layer(base, str(tiny_dirs["llama"]), 512)
    with torch.no_grad():
        predictor.k_maps[1].weight.add_(0.01)
    predictor.save(tmp_path / "p", {"step": 7})
    loaded, meta = KVPredictor.load(tmp_path / "p", base.cfg)
    assert meta == {"step": 7} and loaded.info == predictor.info and loaded.info.aux == EVERY_OTHER_LAYER
    prompt = torch.tensor(prompts()[3])
    with torch.no_grad():
        a, _ = predictor.predict(prompt)
        b, _ = loaded.predict(prompt)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))
    other = base_model(tiny_dirs["qwen3"])
    with pytest.raises(ValueError, match="does not hold a predictor"):
        KVPredictor.load(tmp_path / "p", other.cfg)
    meta_file = tmp_path / "p" / "kvpred.json"
    old = {k: v for k, v in json.loads(meta_file.read_text()).items() if k != "weight_layout"}
    meta_file.write_text(json.dumps(old))  # as an older pdserve saved it, weights [in, out]
    with pytest.raises(ValueError, match="saved by an older pdserve"):
        KVPredictor.load(tmp_path / "p", base.cfg)


def test_a_short_training_run_lowers_the_loss_and_resumes(tiny_dirs, tmp_path):
    from engine.kvpred.train import TrainConfig, Trainer, kvpred_loss
    torch.manual_seed(0)
    base = base_model(tiny_dirs["llama"])
    g = torch.Generator().manual_seed(1)
    windows = [torch.randint(3, 60, (48,), generator=g).tolist() for _ in range(4)]  # a small vocabulary: learnable
    predictor = KVPredictor.every_other_layer(base, str(tiny_dirs["llama"]), 512)
    config = TrainConfig(steps=40, seq_len=48, lr=3e-3, checkpoint_every=20)

    def mean_loss(p):
        with torch.no_grad():
            return sum(kvpred_loss(p, base, torch.tensor(w), config.prompt_len)[1].total for w in windows) / 4

    before = mean_loss(predictor)
    history = Trainer(predictor, base, windows, config, tmp_path / "p").run()
    assert [h["step"] for h in history] == list(range(1, 41))
    assert mean_loss(predictor) < 0.8 * before
    assert all(p.grad is None or not p.requires_grad for p in base.parameters())  # the base stays frozen
    # resume: step 40 saved; asking for 50 runs 10 more with the saved optimizer and sampling state
    loaded, meta = KVPredictor.load(tmp_path / "p", base.cfg)
    assert meta["step"] == 40
    more = Trainer(loaded, base, windows, TrainConfig(steps=50, seq_len=48, lr=3e-3), tmp_path / "p", 40).run()
    assert [h["step"] for h in more] == list(range(1, 51))


def test_kvpred_train_cli_reads_text_and_jsonl(tiny_dirs, tmp_path, capsys):
    from scheduler.cli import main
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("the cat sat on the mat. " * 40)
    (docs / "b.jsonl").write_text('{"text": "' + "a dog ran in the park. " * 40 + '"}\n')
    args = ["kvpred", "train", "--base", str(tiny_dirs["llama"]), "--data", str(docs), "--steps", "3",
            "--seq-len", "32", "--out", str(tmp_path / "out"), "--checkpoint-every", "2"]
    assert main(args) == 0
    assert "to step 3" in capsys.readouterr().out
    assert main([*args[:-4], "--steps", "4", "--out", str(tmp_path / "out")]) == 0  # resumes at 3
    assert "to step 4" in capsys.readouterr().out
    (docs / "bad.jsonl").write_text('{"txt": 1}\n')
    assert main(args) == 2 and "needs a string field 'text'" in capsys.readouterr().err


# predicted prefill in the engine: predicted KV through the KV import path

def perfect_predictor(tmp_path, path) -> str:
    """A predictor folder whose auxiliary model is the base itself with identity maps."""
    base = base_model(path)
    predictor = KVPredictor.from_model(base.cfg, str(path), str(path), 512)
    predictor.save(tmp_path / "perfect")
    return str(tmp_path / "perfect")


def engine_with(path, predictor_dir, **config):
    from engine.config import EngineConfig
    from engine.engine import Engine
    return Engine(EngineConfig(model=str(path), kv_predictor=predictor_dir, num_kv_blocks=128, **config))


def run(engine, prompt_list, params):
    for i, p in enumerate(prompt_list):
        engine.add_request(str(i), p, params)
    out = {str(i): [] for i in range(len(prompt_list))}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id] += o.new_token_ids
    return [out[str(i)] for i in range(len(prompt_list))]


@pytest.mark.parametrize("schedule", ["chunked", "whole", "layered"])
def test_a_perfect_predictor_served_gives_hf_greedy_tokens(schedule, tiny_dirs, references, tmp_path):
    """Predicted KV written through the import path, then the base's last prompt token and
    decode over it: with a perfect predictor, exactly HF's greedy tokens; nothing left behind."""
    from engine.sampling_params import SamplingParams
    path = tiny_dirs["llama"]
    engine = engine_with(path, perfect_predictor(tmp_path, path), prefill_schedule=schedule, token_budget=64)
    chosen = [0, 2, 4, 7]  # 1, 17, 64 and 200 tokens: blocks partly filled, a one-token prompt
    got = run(engine, [prompts()[i] for i in chosen],
              SamplingParams(max_tokens=NUM_TOKENS, temperature=0, ignore_eos=True, kv_prediction=True))
    for i, tokens in zip(chosen, got):
        assert tokens == references("llama")[i][:len(tokens)] and len(tokens) == NUM_TOKENS
    assert engine.num_predicted_prefills == sum(len(prompts()[i]) > 1 for i in chosen)
    assert engine.kv.num_used_blocks == 0 and not engine.requests


def test_predicted_prefill_is_deterministic_and_never_enters_the_prefix_cache(tiny_dirs, tmp_path):
    """An (untrained) every-other-layer predictor: greedy output is the same every time, differs
    from full prefill, and a later full prefill of the same prompt reuses none of its blocks."""
    from engine.sampling_params import SamplingParams
    path = tiny_dirs["llama"]
    KVPredictor.every_other_layer(base_model(path), str(path), 512).save(tmp_path / "eol")
    engine = engine_with(path, str(tmp_path / "eol"))
    prompt = prompts()[7]
    greedy = dict(max_tokens=NUM_TOKENS, temperature=0, ignore_eos=True)
    first = run(engine, [prompt], SamplingParams(**greedy, kv_prediction=True))
    assert run(engine, [prompt], SamplingParams(**greedy, kv_prediction=True)) == first
    assert engine.kv.stats.hit_tokens == 0
    full = run(engine, [prompt], SamplingParams(**greedy))
    assert engine.kv.stats.hit_tokens == 0  # the predicted blocks were never registered
    assert full != first
    assert run(engine_with(path, None), [prompt], SamplingParams(**greedy)) == full
    assert engine.kv.num_used_blocks == 0 and not engine.requests and engine.num_predicted_prefills == 2


def test_kv_prediction_is_refused_clearly_without_a_predictor_or_with_n(tiny_dirs, tmp_path):
    from engine.errors import RequestError
    from engine.sampling_params import SamplingParams
    path = tiny_dirs["llama"]
    with pytest.raises(RequestError, match="no KV predictor"):
        engine_with(path, None).add_request("a", [1, 2, 3], SamplingParams(kv_prediction=True))
    engine = engine_with(path, perfect_predictor(tmp_path, path))
    with pytest.raises(RequestError, match="n=1"):
        engine.add_request("a", [1, 2, 3], SamplingParams(n=2, kv_prediction=True))
    assert not engine.requests and engine.kv.num_used_blocks == 0
    with pytest.raises(ValueError, match="no KV predictor"):
        engine_with(path, str(tmp_path))


def test_predicted_prefill_on_a_prefill_engine_ships_to_decode_as_colocated(tiny_dirs, tmp_path):
    """Disaggregated: the prefill engine's predicted KV plus its last token's go over the
    transfer path; the decode engine's output equals colocated predicted prefill, and neither
    side registers the predicted blocks in its prefix cache."""
    from engine.sampling_params import SamplingParams
    from engine.transfer.loopback import LoopbackSink
    path = tiny_dirs["llama"]
    KVPredictor.every_other_layer(base_model(path), str(path), 512).save(tmp_path / "eol")
    params = SamplingParams(max_tokens=NUM_TOKENS, temperature=0, ignore_eos=True, kv_prediction=True)
    chosen = [prompts()[i] for i in (2, 4, 7)]
    colocated = run(engine_with(path, str(tmp_path / "eol")), chosen, params)
    prefill, decode = engine_with(path, str(tmp_path / "eol")), engine_with(path, None)
    prefill.set_kv_sink(LoopbackSink(decode))
    out = {}
    for i, p in enumerate(chosen):
        assert decode.reserve_prefilled(str(i), p, params) is not None
        prefill.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=1, kv_prediction=True))
    while prefill.has_unfinished() or decode.has_unfinished():
        for o in prefill.step():
            if o.finished:
                out[o.request_id] = decode.admit_prefilled(o.request_id, o.new_token_ids[0]).new_token_ids
        for o in decode.step():
            out[o.request_id] += o.new_token_ids
    assert [out[str(i)] for i in range(len(chosen))] == colocated
    for engine in (prefill, decode):
        assert not engine.kv.pool.cached  # no block hash registered
        assert engine.kv.num_used_blocks == 0 and not engine.requests
    again = decode.reserve_prefilled("again", chosen[-1], SamplingParams(max_tokens=1))
    assert again is not None and decode.requests["again"][0].num_cached_tokens == 0  # nothing of it was cached
    decode.abort("again")


def test_http_kv_prediction_field_slo_policy_and_metrics(tiny_dirs, tmp_path):
    """Over HTTP: `kv_prediction: false` never prefills from the predictor, `true` does, and
    left unset it is used once full prefill would miss the TTFT SLO (1 ms here) at the engine's
    measured speed while predicted prefill (every-other-layer: about half the FLOPs) is
    cheaper; /metrics counts predicted prefills."""
    import httpx

    from engine.config import EngineConfig
    from scheduler.config import ServeConfig

    from helpers import LiveServer, assert_no_leak, metric_sum
    path = tiny_dirs["llama"]
    KVPredictor.every_other_layer(base_model(path), str(path), 512).save(tmp_path / "eol")
    server = LiveServer(EngineConfig(model=str(path), kv_predictor=str(tmp_path / "eol"),
                                     num_kv_blocks=128, max_model_len=256),
                        serve_config=ServeConfig(mode="colocated", slo_ttft_ms=1))
    try:
        def complete(**extra):
            body = {"prompt": prompts()[7][:60], "max_tokens": 8, "temperature": 0, "ignore_eos": True, **extra}
            r = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        def predicted():
            return metric_sum(server.url, "pdserve_worker_predicted_prefills_total")

        full = complete(kv_prediction=False)  # also measures the engine's prefill speed
        assert predicted() == 0 and server.engine.stats().prefill_s_per_token > 0
        assert 0.3 < server.engine.stats().kv_prediction_cost < 0.75
        by_predictor = complete(kv_prediction=True)
        assert by_predictor != full and predicted() == 1
        assert complete() == by_predictor and predicted() == 2  # unset: 60 tokens miss a 1 ms SLO
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "n": 2, "kv_prediction": True})
        assert r.status_code == 400 and "n=1" in r.json()["error"]["message"]
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "kv_prediction": "maybe"})
        assert r.status_code == 400
    finally:
        server.stop()
    assert_no_leak(server.engine)


def test_http_kv_prediction_without_a_predictor_is_a_400(tiny_server):
    import httpx
    r = httpx.post(tiny_server.url + "/v1/completions", json={"prompt": "hi", "kv_prediction": True})
    assert r.status_code == 400 and "--kv-predictor" in r.json()["error"]["message"]


def test_kvpred_eval_cli_measures_every_way(tiny_dirs, tmp_path, capsys):
    """`pdserve kvpred eval`: per prompt length, the base (agreement 1), predicted prefill (a
    perfect predictor: the base's tokens and perplexity, at more FLOPs than the base), the
    auxiliary model alone and a truncated prompt no dearer than predicted prefill."""
    import json

    from scheduler.cli import main
    path = tiny_dirs["llama"]
    docs = tmp_path / "held_out.txt"
    docs.write_text(" ".join(f"line {i}: the quick brown fox {i * 7 % 13} jumps." for i in range(300)))
    predictor = perfect_predictor(tmp_path, path)
    args = ["kvpred", "eval", "--predictor", predictor, "--data", str(docs), "--prompt-lens", "16,40",
            "--num-prompts", "2", "--json", str(tmp_path / "eval.json")]
    assert main(args) == 0
    assert "predicted" in capsys.readouterr().out
    results = json.loads((tmp_path / "eval.json").read_text())["results"]
    for L in ("16", "40"):
        ways = {r["way"]: r for r in results[L]}
        assert list(ways) == ["base", "predicted", "aux", "truncated"]
        assert ways["base"]["agreement"] == 1.0 and ways["predicted"]["agreement"] == 1.0
        assert ways["predicted"]["perplexity"] == pytest.approx(ways["base"]["perplexity"], rel=1e-3)
        assert ways["truncated"]["flops"] <= ways["predicted"]["flops"]
        assert ways["truncated"]["prompt_len"] == int(L)  # a perfect predictor costs more than the base
        assert all(ways[w]["ttft_s"] > 0 for w in ("base", "predicted", "truncated"))
    from engine.kvpred.evaluate import truncated_len
    from engine.kvpred.prefill import forward_flops, predicted_flops
    half = KVPredictor.every_other_layer(base_model(path), str(path), 512).aux.cfg
    cfg = base_model(path).cfg
    keep = truncated_len(cfg, half, 400)
    assert keep < 400 and forward_flops(cfg, keep) <= predicted_flops(cfg, half, 400) < forward_flops(cfg, keep + 1)
    assert main(["kvpred", "eval", "--predictor", str(tmp_path), "--data", str(docs), "--base", str(path)]) == 2
    assert "no KV predictor" in capsys.readouterr().err


def test_predicted_prefill_keeps_a_cached_prefix_and_predicts_the_rest(tiny_dirs, references, tmp_path):
    """A prompt whose prefix is cached (exact KV): only the blocks after it are predicted,
    written from the right block at the right positions (a perfect predictor: HF's tokens)."""
    from engine.sampling_params import SamplingParams
    path = tiny_dirs["llama"]
    engine = engine_with(path, perfect_predictor(tmp_path, path))
    prompt = prompts()[7]
    greedy = dict(max_tokens=NUM_TOKENS, temperature=0, ignore_eos=True)
    run(engine, [prompt[:100]], SamplingParams(**greedy))  # caches 6 blocks of the prompt
    engine.add_request("p", prompt, SamplingParams(**greedy, kv_prediction=True))
    assert engine.requests["p"][0].num_cached_tokens == 96
    out = []
    while engine.has_unfinished():
        out += [t for o in engine.step() for t in o.new_token_ids]
    assert out == references("llama")[7] and engine.num_predicted_prefills == 1
    assert engine.kv.num_used_blocks == 0
